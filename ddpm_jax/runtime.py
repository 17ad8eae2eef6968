"""Process-level set-up shared by every mode of main.py.

Multi-process runs (several hosts, or several processes on one machine) call
`jax.distributed.initialize` before anything else touches JAX. Where it is
called with what:

  * Explicitly: the arguments of `initialize`, or the environment variables
    `JAX_COORDINATOR_ADDRESS` (host:port of process 0, which also runs the
    coordinator), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. E.g. two processes
    on one machine:

        JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 \
            JAX_PROCESS_ID=0 python main.py --config=... --workdir=DIR &
        JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 \
            JAX_PROCESS_ID=1 python main.py --config=... --workdir=DIR

  * Detected: SLURM with more than one task, or a multi-host TPU VM slice;
    JAX reads the cluster's own variables.

  * Otherwise a single process, and nothing is called.

On CPU, processes exchange gradients through gloo (JAX's default CPU
collectives).
"""

import os
from typing import Optional

import jax
from absl import logging

# Where compiled programs are cached across runs; '' turns the cache off.
COMPILATION_CACHE_ENV = 'DDPM_JAX_COMPILATION_CACHE'

# XLA:CPU flags the U-Net runs fastest with (jaxlib 0.10.2). By default XLA:CPU
# hands convolutions, matmuls, reductions and elementwise fusions to YNNPACK;
# for this network its convolution kernels are slower than XLA's own, and its
# kernel-gradient convolution is 3.5x slower (71 against 240 GFLOP/s at
# 8x32x32x128, measured on this project's 2-core Xeon). Keeping YNNPACK for
# reductions only made the CIFAR-10 U-Net's forward pass 0.505 -> 0.424 s and
# its gradient 1.89 -> 1.43 s at batch 8 (benchmarks/ has the full comparison).
# Only which kernel computes a convolution changes (float rounding), not the
# math: no fast-math.
# The concurrency-optimised scheduler orders independent ops so that more of
# them can run at once, which keeps more buffers alive: turning it off cut
# the CIFAR-10 training step's XLA temp memory 518 -> 464 MiB (batch 8; 250
# -> 152 MiB at batch 1 with the GroupNorm recompute) at the same speed and
# with bitwise the same results. CPU-only flags; other backends ignore them.
XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',
                 '--xla_cpu_enable_concurrency_optimized_scheduler=false')
# Set to 0 to leave XLA_FLAGS as the user gave them.
XLA_FLAGS_ENV = 'DDPM_JAX_XLA_CPU_FLAGS'


def configure_xla_flags() -> None:
  """Adds `XLA_CPU_FLAGS` to $XLA_FLAGS, keeping any flag the user set.

  XLA reads $XLA_FLAGS once, when JAX creates its first backend, so this must
  run before any JAX computation (main.py, the benchmarks and the tests call
  it first thing). Set $DDPM_JAX_XLA_CPU_FLAGS=0 to opt out.
  """
  if os.environ.get(XLA_FLAGS_ENV, '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '').split()
  given = {flag.split('=', 1)[0] for flag in flags}
  flags += [flag for flag in XLA_CPU_FLAGS if flag.split('=', 1)[0] not in given]
  os.environ['XLA_FLAGS'] = ' '.join(flags)


def initialize(workdir: str, *, coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
  """Multi-process start-up, host-only TensorFlow, and the persistent compile cache.

  Must run before any JAX computation (it sets XLA's flags and may start the
  distributed runtime).

  Args:
    workdir: the run's directory (created; its parent must be writable).
    coordinator_address: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).
    num_processes: processes in the run (default: $JAX_NUM_PROCESSES).
    process_id: this process, in [0, num_processes) (default: $JAX_PROCESS_ID).
  """
  configure_xla_flags()
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None:
    num_processes = _env_int('JAX_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int('JAX_PROCESS_ID')
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if explicit or _is_cluster_environment():
    # JAX fills in whatever is None from the cluster environment.
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  # tf.data only feeds the host; keep TensorFlow off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  # Compiled programs are cached across runs (a warm restart skips compiling).
  cache_dir = os.environ.get(COMPILATION_CACHE_ENV,
                             os.path.join(os.path.expanduser('~'), '.cache', 'ddpm_jax', 'xla'))
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s).', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  os.makedirs(workdir, exist_ok=True)


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'${name} must be an integer, got {value!r}.') from None


def _is_cluster_environment() -> bool:
  env = os.environ
  return (int(env.get('SLURM_NTASKS', '1')) > 1 or
          ('TPU_WORKER_HOSTNAMES' in env and ',' in env['TPU_WORKER_HOSTNAMES']))
