"""The package's imports run one way: from the math up to the entry points.

Each module has a rank; a module may import only modules of a lower rank
(or, within a subpackage, modules of its own subpackage that it lists
below). The walk reads the source with `ast`, so imports inside functions
count too.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'ddpm_jax'

# Lower rank first. A module may import any module of a lower rank.
RANKS = [
  # Leaves: no project imports beyond each other's rank.
  {'errors'},
  {'sharding', 'gcs'},
  {'files', 'streams', 'schedules'},
  {'images', 'runtime', 'throughput'},
  {'diffusion'},
  {'likelihood'},
  {'losses'},
  {'chain'},
  {'guidance', 'solvers', 'edm'},
  {'ode_likelihood'},
  {'sampling'},
  {'distillation'},
  {'sampler_table'},
  # Networks, their kernels, data and metrics know nothing of diffusion.
  {'kernels'},
  {'models'},
  {'datasets'},
  {'input_pipeline', 'metrics'},
  {'train_state', 'config_validation', 'inception_fid'},
  {'checkpointing'},
  {'inference'},
  {'train', 'sample', 'evaluate'},
  {'distill'},
]
# Independent of everything above the leaves, whatever their rank.
INDEPENDENT = {'kernels', 'models', 'datasets', 'input_pipeline', 'metrics'}
LEAVES = RANKS[0] | RANKS[1] | RANKS[2] | RANKS[3]


def _rank(unit):
  for rank, units in enumerate(RANKS):
    if unit in units:
      return rank
  raise AssertionError(f'{PACKAGE}.{unit} has no rank in tests/test_imports.py: give it one.')


def _unit(module):
  """ddpm_jax.models.unet -> 'models'; ddpm_jax.train -> 'train'."""
  return module.split('.')[1] if module.count('.') >= 1 else ''


def _project_imports(path, module):
  """The ddpm_jax modules a file imports, as dotted names."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = set()
  package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE + '.'))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      if base == PACKAGE or base.startswith(PACKAGE + '.'):
        # `from a.b import c` imports the module a.b.c where there is one, else a.b.
        for alias in node.names:
          name = f'{base}.{alias.name}'
          found.add(name if _is_module(name) else base)
  return found


def _is_module(dotted):
  path = os.path.join(ROOT, *dotted.split('.'))
  return os.path.isdir(path) or os.path.exists(path + '.py')


def _modules():
  for directory, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in sorted(names):
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        yield path, rel[: -len('.__init__')] if rel.endswith('.__init__') else rel


MODULES = sorted(_modules(), key=lambda item: item[1])


@pytest.mark.parametrize('path, module', MODULES, ids=[m for _, m in MODULES])
def test_imports_point_down(path, module):
  unit = _unit(module)
  if not unit:
    return  # ddpm_jax/__init__.py
  upward = []
  for imported in sorted(_project_imports(path, module)):
    other = _unit(imported)
    if other == unit:
      continue  # Within a subpackage: checked for cycles below.
    allowed = _rank(other) < _rank(unit) and (
      unit not in INDEPENDENT or other in LEAVES or other in INDEPENDENT
    )
    if not allowed:
      upward.append(imported)
  assert not upward, f'{module} imports {upward}, which are not below it.'


def test_no_import_cycles():
  graph = {
    module: {m for m in _project_imports(path, module) if m != module} for path, module in MODULES
  }
  visiting, done = set(), set()

  def visit(module, trail):
    if module in done:
      return
    assert module not in visiting, f'import cycle: {" -> ".join(trail + [module])}'
    visiting.add(module)
    for imported in graph.get(module, ()):
      visit(imported, trail + [module])
    visiting.discard(module)
    done.add(module)

  for module in graph:
    visit(module, [])


def test_every_module_has_a_rank():
  for _, module in MODULES:
    if _unit(module):
      _rank(_unit(module))
