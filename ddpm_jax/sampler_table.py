"""The one table of the samplers a config can name, and the only place a config becomes a sampler.

Each row maps a `sampling.sampler` name to the chain that draws the samples,
whether it takes `num_steps`, the other `sampling.*` fields it reads (as the
chain's keywords) and how they name its files, and which `diffusion.kind`s of
model it samples ('edm' is the only row for an EDM model). Config validation, inference
(`--mode=sample`, `--mode=eval`, the training grids) and the benchmarks all
read it, so a sampler is added here and nowhere else.
"""

import dataclasses
from typing import Any
from collections.abc import Callable

import jax
import ml_collections

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import distillation
from ddpm_jax import edm
from ddpm_jax import sampling
from ddpm_jax import solvers


def _ddim_tag(kw: dict[str, Any]) -> str:
  return f'_eta{kw["eta"]:g}_{kw["skip"]}'


def _pc_tag(kw: dict[str, Any]) -> str:
  return f'_corrector{kw["corrector_steps"]}_snr{kw["snr"]:g}'


def _solver_tag(kw: dict[str, Any]) -> str:
  tag = f'_order{kw["order"]}'
  if kw['dynamic_threshold'] is not None:
    tag += f'_threshold{kw["dynamic_threshold"]:g}'
  if kw['final_sigma'] != 'zero':
    tag += f'_final-{kw["final_sigma"]}'
  return tag


def _edm_tag(kw: dict[str, Any]) -> str:
  tag = f'_sigma{kw["sigma_min"]:g}-{kw["sigma_max"]:g}_rho{kw["rho"]:g}'
  if kw['S_churn'] > 0:
    tag += f'_churn{kw["S_churn"]:g}_smin{kw["S_min"]:g}_smax{kw["S_max"]:g}'
    tag += f'_snoise{kw["S_noise"]:g}'
  return tag


def _distilled_tag(kw: dict[str, Any]) -> str:
  return f'_teacher{kw["teacher_steps"]}'


_SOLVER_FIELDS = (
  ('order', 'solver_order'),
  ('dynamic_threshold', 'dynamic_threshold'),
  ('final_sigma', 'solver_final_sigma'),
)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A row of the table.

  Attributes:
    function: the chain, `function(d, model_fn, shape, rng, **keywords)`.
    summary: what it does, in a few words (for error messages).
    takes_num_steps: it makes `sampling.num_steps` model calls (else a fixed number).
    fields: (keyword of `function`, `sampling.*` field that gives it) pairs.
    check: raises ValueError for bad values of those keywords.
    tag: the file-name tag of those keywords' values (and of `config_fields`').
    config_fields: (keyword, dotted field of another config block) pairs.
    kinds: the `diffusion.kind`s of the models it samples.
    steps_up_to_T: num_steps may not exceed the process's T (it steps through its timesteps).
    student: it samples a distilled student (`--mode=distill`), whose teacher's guidance is
      built in: a class-conditional one is called once a step with its labels, unguided.
  """

  function: Callable[..., jax.Array]
  summary: str
  takes_num_steps: bool
  fields: tuple[tuple[str, str], ...] = ()
  check: Callable[..., Any] = lambda **_: None
  tag: Callable[[dict[str, Any]], str] = lambda _: ''
  config_fields: tuple[tuple[str, str], ...] = ()
  kinds: tuple[str, ...] = ('ddpm',)
  steps_up_to_T: bool = True
  student: bool = False


SAMPLERS: dict[str, Sampler] = {
  'ddpm': Sampler(sampling.p_sample_loop, 'all T ancestral steps (the paper)', False),
  'respaced': Sampler(
    sampling.respaced_sample_loop, 'K ancestral steps of a respaced process', True
  ),
  'ddim': Sampler(
    sampling.ddim_sample_loop,
    'K DDIM steps',
    True,
    (('eta', 'ddim_eta'), ('skip', 'ddim_skip')),
    sampling.check_ddim_options,
    _ddim_tag,
  ),
  'pc': Sampler(
    sampling.pc_sample_loop,
    'T ancestral steps, each after Langevin corrector steps',
    False,
    (('corrector_steps', 'pc_corrector_steps'), ('snr', 'pc_snr')),
    sampling.check_pc_options,
    _pc_tag,
  ),
  'dpm_solver': Sampler(
    solvers.dpm_solver_sample_loop,
    'K steps of DPM-Solver++',
    True,
    _SOLVER_FIELDS,
    solvers.check_options,
    _solver_tag,
  ),
  'unipc': Sampler(
    solvers.unipc_sample_loop,
    'K steps of UniPC',
    True,
    _SOLVER_FIELDS,
    solvers.check_options,
    _solver_tag,
  ),
  'edm': Sampler(
    edm.sample_loop,
    "N Heun steps of EDM's sampler, 2N - 1 model calls",
    True,
    (
      ('S_churn', 'edm_S_churn'),
      ('S_min', 'edm_S_min'),
      ('S_max', 'edm_S_max'),
      ('S_noise', 'edm_S_noise'),
    ),
    edm.check_options,
    _edm_tag,
    config_fields=(
      ('sigma_min', 'edm.sigma_min'),
      ('sigma_max', 'edm.sigma_max'),
      ('rho', 'edm.rho'),
    ),
    kinds=('ddpm', 'edm'),
    steps_up_to_T=False,
  ),
  'distilled': Sampler(
    distillation.sample_loop,
    'N DDIM steps of the student distilled to take them (--mode=distill), N model calls',
    True,
    tag=_distilled_tag,
    config_fields=(
      ('teacher_steps', 'distill.teacher_steps'),
      ('sigma_min', 'edm.sigma_min'),
      ('sigma_max', 'edm.sigma_max'),
      ('rho', 'edm.rho'),
    ),
    kinds=('ddpm', 'edm'),
    steps_up_to_T=False,
    student=True,
  ),
}
KINDS = ('ddpm', 'edm')


def row(name: str) -> Sampler:
  """The row of `name`; ValueError naming the valid choices for any other."""
  if name not in SAMPLERS:
    choices = '; '.join(f'{choice} ({row.summary})' for choice, row in SAMPLERS.items())
    raise ValueError(f'Unknown sampler {name!r}; valid choices: {choices}.')
  return SAMPLERS[name]


def keywords(name: str, smp: ml_collections.ConfigDict) -> dict[str, Any]:
  """The chain's keywords that the `sampling` config block gives it."""
  return {keyword: smp[field] for keyword, field in row(name).fields}


def config_keywords(name: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The chain's keywords that other blocks of the experiment config give it (the 'edm' range)."""
  found = {}
  for keyword, dotted in row(name).config_fields:
    block, field = dotted.split('.')
    found[keyword] = config[block][field]
  return found


def check(name: str, num_steps: int, num_timesteps: int, kind: str = 'ddpm') -> None:
  """Raises ValueError for an unknown sampler, a step count it cannot make, or another kind.

  Args:
    name: the sampler's name.
    num_steps: its model calls, or steps (read only where the sampler takes them).
    num_timesteps: T of the process.
    kind: the model's `diffusion.kind`.
  """
  sampler = row(name)
  if kind not in sampler.kinds:
    fits = ', '.join(choice for choice, other in SAMPLERS.items() if kind in other.kinds)
    raise ValueError(
      f'Sampler {name!r} does not sample a diffusion.kind={kind!r} model; the samplers that '
      f'do: {fits}.'
    )
  if not sampler.takes_num_steps:
    return
  if sampler.steps_up_to_T and not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'Sampler {name!r} needs 1 <= num_steps <= {num_timesteps}, got {num_steps}.')
  if num_steps < 1:
    raise ValueError(f'Sampler {name!r} needs num_steps >= 1, got {num_steps}.')


def field_problems(smp: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with the `sampling` fields of every sampler, chosen or not, one line each."""
  problems, seen = [], set()
  for sampler in SAMPLERS.values():
    if sampler.fields in seen:
      continue
    seen.add(sampler.fields)
    try:
      sampler.check(**{keyword: smp[field] for keyword, field in sampler.fields})
    except ValueError as e:
      names = ', '.join(f'sampling.{field}' for _, field in sampler.fields)
      problems.append(f'{names}: {e}')
  return problems


def tag(name: str, num_steps: int, config: ml_collections.ConfigDict) -> str:
  """A file-name tag that fixes everything the sampler's output depends on, e.g. 'ddim50_eta0_uniform'.

  Args:
    name: the sampler.
    num_steps: its model calls or steps.
    config: the experiment config (its `sampling` block and the row's `config_fields`).
  """
  sampler = row(name)
  steps = str(num_steps) if sampler.takes_num_steps else ''
  kw = dict(keywords(name, config.sampling), **config_keywords(name, config))
  return f'{name}{steps}{sampler.tag(kw)}'


def draw(
  name: str,
  d: diffusion_lib.Diffusion,
  model_fn: Callable[..., jax.Array],
  shape: tuple[int, ...],
  rng: jax.Array,
  *,
  num_steps: int,
  smp: ml_collections.ConfigDict,
  **model_options: Any,
) -> jax.Array:
  """Samples of `shape` from the named chain with the `sampling` block's settings.

  Args:
    name: the sampler.
    d: the process the model was trained with.
    model_fn: `model_fn(x_t, t)` (a guided one for a class-conditional model); an EDM
      model's raw network `model_fn(x_in, c_noise)` for 'edm'.
    shape: static sample shape (B, H, W, C).
    rng: a PRNG key.
    num_steps: model calls, where the sampler takes them.
    smp: the `sampling` config block.
    **model_options: clip_denoised, model_mean_type, model_var_type; for 'edm' also its
      noise range (sigma_min, sigma_max, rho) and, for an EDM model, sigma_data.

  Returns:
    x_0 of `shape`.
  """
  sampler = row(name)
  kw = dict(keywords(name, smp), **model_options)
  if sampler.takes_num_steps:
    kw['num_steps'] = num_steps
  return sampler.function(d, model_fn, shape, rng, **kw)
