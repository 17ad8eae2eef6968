"""Process-level set-up shared by every mode of main.py."""

import os

import jax
from absl import logging


def initialize(workdir: str) -> None:
  """Multi-host start-up, host-only TensorFlow, and the persistent compile cache.

  Args:
    workdir: the run's directory (its parent must be writable).
  """
  # On a multi-host TPU/GPU slice the cluster is discovered from the
  # environment; a single process needs (and must not call) nothing.
  if _is_multi_host_environment():
    jax.distributed.initialize()
  # tf.data only feeds the host; keep TensorFlow off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  # Compiled programs are cached across runs (a warm restart skips compiling).
  cache_dir = os.environ.get('DDPM_JAX_COMPILATION_CACHE',
                             os.path.join(os.path.expanduser('~'), '.cache', 'ddpm_jax', 'xla'))
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s).', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  os.makedirs(workdir, exist_ok=True)


def _is_multi_host_environment() -> bool:
  env = os.environ
  return bool(env.get('JAX_COORDINATOR_ADDRESS') or env.get('COORDINATOR_ADDRESS') or
              int(env.get('SLURM_NTASKS', '1')) > 1 or
              int(env.get('JAX_NUM_PROCESSES', '1')) > 1 or
              ('TPU_WORKER_HOSTNAMES' in env and ',' in env['TPU_WORKER_HOSTNAMES']))
