"""Test-session set-up shared by every test module.

Four CPU devices are forced before JAX initialises, so the multi-device tests
can build a 4-way 'data' mesh in the same process as the single-device ones
(which simply use one device of the four). The `x64` fixture runs a test in
float64; `precision` runs it once in float32 and once in float64.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from ddpm_jax import runtime  # noqa: E402

# The XLA:CPU flags main.py runs with, so the tests check the same kernels, at LLVM's lowest
# optimisation level: the same programs and fusions, compiled in about 60% of the time (the tiny
# U-Net's training step: 12 s against 20 s), which is most of what the suite spends. Child
# processes get the same flags (trainer_harness.child_env), so compiled programs are shared.
os.environ['XLA_FLAGS'] = ' '.join(
  os.environ.get('XLA_FLAGS', '').split() + ['--xla_backend_optimization_level=0']
)
runtime.configure_xla_flags()

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)

# Tests compile the same small programs many times (each training run of the
# tiny config builds the same step); a session-wide persistent cache turns
# the repeats into cache hits.
import tempfile  # noqa: E402

# pytest-xdist workers share one directory per run (they get the same run id).
_run_id = os.environ.get('PYTEST_XDIST_TESTRUNUID')
_cache_dir = (
  os.path.join(tempfile.gettempdir(), f'ddpm_jax_xla_{_run_id}')
  if _run_id
  else tempfile.mkdtemp(prefix='ddpm_jax_xla_')
)
jax.config.update('jax_compilation_cache_dir', _cache_dir)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

from collections.abc import Iterator  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64() -> Iterator[None]:
  """Runs a test with jax_enable_x64 on, restoring the previous setting after."""
  with jax.enable_x64(True):
    yield


class Precision(NamedTuple):
  """The floating-point precision a `precision` test runs in."""

  name: str  # 'float32' or 'float64'.
  dtype: Any

  def pick(self, *, float32: Any, float64: Any) -> Any:
    """This precision's value: a tolerance, or the timesteps its round trips reach."""
    return float64 if self.name == 'float64' else float32


@pytest.fixture(params=['float32', 'float64'])
def precision(request: pytest.FixtureRequest) -> Iterator[Precision]:
  """Runs a test once in float32 and once in float64 (with jax_enable_x64 on).

  A test asks the yielded `Precision` for its dtype and, through `pick`, for
  the tolerance each precision allows: float64 keeps its tight bounds and
  float32 its own.
  """
  if request.param == 'float64':
    with jax.enable_x64(True):
      yield Precision('float64', jnp.float64)
  else:
    assert not jax.config.jax_enable_x64
    yield Precision('float32', jnp.float32)


# Modules that train, start processes or compile many programs, the longest first (measured
# with --durations). With `--dist loadscope` a worker takes whole modules in this order, so
# the long ones start at once and the many short ones fill the end on both workers.
_LONGEST_FIRST = (
  'test_reliability',
  'test_train',
  'test_sample_eval',
  'test_benchmarks_smoke',
  'test_distill',
  'test_gcs',
  'test_multihost',
  'test_gcs_multihost',
  'test_edm_training',
  'test_solvers',
  'test_fid',
  'test_sampling',
  'test_train_fid',
  'test_kernels',
  'test_default_sweep',
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """Runs the long modules first (the order within a module is kept)."""
  del config
  rank = {name: index for index, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
