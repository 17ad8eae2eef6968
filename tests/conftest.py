"""Test-session set-up shared by every test module.

Four CPU devices are forced before JAX initialises, so the multi-device tests
can build a 4-way 'data' mesh in the same process as the single-device ones
(which simply use one device of the four).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from ddpm_jax import runtime  # noqa: E402

# The XLA:CPU flags main.py runs with, so the tests check the same kernels.
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
