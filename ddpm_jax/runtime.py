"""How a ddpm-jax process sets itself up: malloc, XLA flags, several processes, the compile cache.

main.py makes one call, `setup(workdir)`, right after parsing its flags:

  1. Huge pages for malloc (Linux, glibc >= 2.35, THP in 'madvise' mode):
     XLA:CPU allocates each execution's temporaries as one large block and
     frees it afterwards, and glibc maps such a block afresh every time, so
     every training step would fault hundreds of MiB back in, 4 KiB at a
     time. With `glibc.malloc.hugetlb=1` the block comes in 2 MiB pages
     (docs/performance.md). glibc reads the tunable only at process start,
     so the process re-executes itself once with it, before JAX is
     imported. `DDPM_JAX_HUGE_PAGES=0` opts out; library users set
     `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` themselves.
  2. XLA:CPU flags (`XLA_CPU_FLAGS`), added to $XLA_FLAGS unless the user
     set them; `DDPM_JAX_XLA_CPU_FLAGS=0` opts out. Other backends ignore them.
  3. Several processes (several hosts, or several processes on one machine)
     call `jax.distributed.initialize` before anything else touches JAX:
       * explicitly: `JAX_COORDINATOR_ADDRESS` (host:port of process 0),
         `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, e.g. two processes on one
         machine:

             JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 \\
                 JAX_PROCESS_ID=0 python main.py --config=... --workdir=DIR &
             JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 \\
                 JAX_PROCESS_ID=1 python main.py --config=... --workdir=DIR

       * detected: SLURM with more than one task, or a multi-host TPU VM
         slice (JAX reads the cluster's own variables);
       * otherwise a single process, and nothing is called.
     On CPU, processes exchange gradients through gloo.
  4. TensorFlow (the input pipeline) is kept off the accelerators, and
     compiled programs are cached across runs (`DDPM_JAX_COMPILATION_CACHE`,
     '' turns the cache off).

Nothing here imports JAX or TensorFlow at module level, so step 1 can run
before them.
"""

import os
import sys
from typing import Any
from collections.abc import Mapping

from absl import logging

TUNABLE_NAME = 'glibc.malloc.hugetlb'
TUNABLE = TUNABLE_NAME + '=1'
TUNABLES_ENV = 'GLIBC_TUNABLES'
# Set to 0 to leave malloc as it is.
OPT_OUT_ENV = 'DDPM_JAX_HUGE_PAGES'
# The first glibc with the `glibc.malloc.hugetlb` tunable.
MIN_GLIBC = (2, 35)
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# Default of the arguments below: read them from this machine.
_THIS_MACHINE: Any = object()


def glibc_version() -> tuple | None:
  """(major, minor) of the running glibc, or None (another libc or OS)."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != 'glibc':
    return None
  try:
    return tuple(int(part) for part in version.split('.')[:2])
  except ValueError:
    return None


def thp_mode(path: str = THP_SETTING) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1 : end] if 0 <= start < end else None


def environment_with_huge_pages(
  environ: Mapping[str, str],
  *,
  glibc: tuple | None = _THIS_MACHINE,
  thp: str | None = _THIS_MACHINE,
) -> dict[str, str] | None:
  """The environment to re-execute with, or None when there is nothing to gain.

  Nothing to gain: the user opted out, or already chose a `glibc.malloc.hugetlb`
  value; the libc is not glibc >= 2.35 (the tunable would be ignored); the
  kernel has no transparent huge pages, or gives them to every mapping anyway
  ('always'). `glibc` (None: not glibc) and `thp` (None: no THP) default to
  what this machine has.
  """
  if environ.get(OPT_OUT_ENV, '1') == '0':
    return None
  tunables = environ.get(TUNABLES_ENV, '')
  if any(t.split('=', 1)[0] == TUNABLE_NAME for t in tunables.split(':')):
    return None
  glibc = glibc_version() if glibc is _THIS_MACHINE else glibc
  if glibc is None or glibc < MIN_GLIBC:
    return None
  if (thp_mode() if thp is _THIS_MACHINE else thp) != 'madvise':
    return None
  env = dict(environ)
  env[TUNABLES_ENV] = f'{tunables}:{TUNABLE}' if tunables else TUNABLE
  return env


def reexec_with_huge_pages() -> None:
  """Re-executes this Python command once with the tunable set (see the module doc).

  Returns without doing anything when `environment_with_huge_pages` says there
  is nothing to gain, which is also the case in the re-executed process, or
  when the interpreter's path is unknown. It replaces the process (same pid,
  arguments and interpreter options), so call it before any work the new
  process would have to do again.
  """
  env = environment_with_huge_pages(os.environ)
  if env is None or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


# Where compiled programs are cached across runs; '' turns the cache off.
COMPILATION_CACHE_ENV = 'DDPM_JAX_COMPILATION_CACHE'

# XLA:CPU flags, neither of which changes the math (docs/performance.md has why and the
# figures): YNNPACK only for reductions, and the memory-ordered scheduler.
XLA_CPU_FLAGS = (
  '--xla_cpu_experimental_ynn_fusion_type=reduce',
  '--xla_cpu_enable_concurrency_optimized_scheduler=false',
)
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


def setup(workdir: str, **distributed: Any) -> None:
  """Everything main.py needs before its work: huge pages, XLA flags, `initialize`.

  Call it once, first thing after parsing flags: it may re-execute the process.

  Args:
    workdir: the run's directory (created).
    **distributed: passed to `initialize`.
  """
  reexec_with_huge_pages()
  initialize(workdir, **distributed)


def initialize(
  workdir: str,
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Multi-process start-up, host-only TensorFlow, and the persistent compile cache.

  Must run before any JAX computation (it sets XLA's flags and may start the
  distributed runtime).

  Args:
    workdir: the run's directory, local or gs:// (created; its parent, or
      bucket, must be writable).
    coordinator_address: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).
    num_processes: processes in the run (default: $JAX_NUM_PROCESSES).
    process_id: this process, in [0, num_processes) (default: $JAX_PROCESS_ID).
  """
  import jax  # pylint: disable=g-import-not-at-top

  configure_xla_flags()
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None:
    num_processes = _env_int('JAX_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int('JAX_PROCESS_ID')
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if explicit or _is_cluster_environment():
    # JAX fills in whatever is None from the cluster environment.
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  # tf.data only feeds the host; keep TensorFlow off the accelerators, and quiet.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  # Compiled programs are cached across runs (a warm restart skips compiling).
  cache_dir = os.environ.get(
    COMPILATION_CACHE_ENV, os.path.join(os.path.expanduser('~'), '.cache', 'ddpm_jax', 'xla')
  )
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  logging.info(
    'JAX %s: process %d of %d, %d local / %d global devices (%s).',
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  from ddpm_jax import files  # pylint: disable=g-import-not-at-top  (it imports JAX)
  from ddpm_jax import gcs  # pylint: disable=g-import-not-at-top

  # A missing or forbidden bucket fails here, naming it, before any work.
  gcs.check_bucket(workdir)
  files.makedirs(workdir)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'${name} must be an integer, got {value!r}.') from None


def _is_cluster_environment() -> bool:
  env = os.environ
  return int(env.get('SLURM_NTASKS', '1')) > 1 or (
    'TPU_WORKER_HOSTNAMES' in env and ',' in env['TPU_WORKER_HOSTNAMES']
  )
