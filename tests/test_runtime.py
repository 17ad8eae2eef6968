"""ddpm_jax.runtime: the huge-page re-execution and the XLA:CPU flags main.py runs with."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ddpm_jax import runtime

ROOT = REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


def _decide(environ, glibc=GLIBC, thp='madvise'):
  return runtime.environment_with_huge_pages(environ, glibc=glibc, thp=thp)


def test_adds_the_tunable_and_keeps_the_users_others():
  assert _decide({'A': '1'}) == {'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  env = _decide({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize(
  'environ, glibc, thp',
  [
    ({'DDPM_JAX_HUGE_PAGES': '0'}, GLIBC, 'madvise'),  # opted out
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC, 'madvise'),  # the user's choice
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, GLIBC, 'madvise'),  # already re-executed
    ({}, (2, 34), 'madvise'),  # glibc ignores the tunable
    ({}, None, 'madvise'),  # not glibc
    ({}, GLIBC, 'always'),  # every mapping has them
    ({}, GLIBC, 'never'),  # the kernel has none
  ],
)
def test_nothing_to_gain_means_no_reexecution(environ, glibc, thp):
  assert _decide(environ, glibc=glibc, thp=thp) is None


def test_reads_the_kernel_mode(tmp_path):
  setting = tmp_path / 'enabled'
  setting.write_text('always [madvise] never\n')
  assert runtime.thp_mode(str(setting)) == 'madvise'
  assert runtime.thp_mode(str(tmp_path / 'missing')) is None


# Starts, re-executes once (or not), then mallocs and touches 64 MiB and
# reports how much of it the kernel backed with huge pages.
_CHILD = textwrap.dedent("""
    import ctypes, json, os, sys
    sys.path.insert(0, {repo!r})
    with open({log!r}, 'a') as f:
      f.write('start\\n')
    from ddpm_jax import runtime
    runtime.reexec_with_huge_pages()

    def anon_huge_kib():
      with open('/proc/self/smaps_rollup') as f:
        return sum(int(l.split()[1]) for l in f if l.startswith('AnonHugePages:'))

    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype = ctypes.c_void_p
    before = anon_huge_kib()
    size = 64 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    print(json.dumps(dict(argv=sys.argv[1:], flags=sys.flags.dont_write_bytecode,
                          tunables=os.environ.get('GLIBC_TUNABLES', ''),
                          huge_mib=(anon_huge_kib() - before) / 1024)))
""")


def _run_child(tmp_path, **env_overrides):
  log = tmp_path / 'starts.log'
  script = tmp_path / 'child.py'
  script.write_text(_CHILD.format(repo=REPO, log=str(log)))
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', runtime.OPT_OUT_ENV)}
  env.update(env_overrides)
  out = subprocess.run(
    [sys.executable, '-B', str(script), '--flag=x', 'arg'],
    env=env,
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  return json.loads(out.strip().splitlines()[-1]), log.read_text().count('start')


def test_main_reexecutes_once_with_the_tunable_and_malloc_gets_huge_pages(tmp_path):
  expected = runtime.environment_with_huge_pages(
    {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', runtime.OPT_OUT_ENV)}
  )
  report, starts = _run_child(tmp_path)
  # Arguments and interpreter options (-B) survive the re-execution.
  assert report['argv'] == ['--flag=x', 'arg'] and report['flags'] == 1
  if expected is None:  # this machine has nothing to gain (see the decision tests)
    assert starts == 1 and 'hugetlb' not in report['tunables']
    return
  assert starts == 2
  assert report['tunables'] == 'glibc.malloc.hugetlb=1'
  # The kernel backed most of the 64 MiB block with 2 MiB pages.
  assert report['huge_mib'] >= 32, report


def test_opting_out_leaves_malloc_alone(tmp_path):
  report, starts = _run_child(tmp_path, DDPM_JAX_HUGE_PAGES='0')
  assert starts == 1 and report['tunables'] == ''
  if runtime.thp_mode() == 'madvise':
    # Without the tunable nothing asks for huge pages: the control for the test above.
    assert report['huge_mib'] < 8, report


# XLA:CPU flags.


def _configured(monkeypatch, xla_flags=None, opt_out=None):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv(runtime.XLA_FLAGS_ENV, raising=False)
  if xla_flags is not None:
    monkeypatch.setenv('XLA_FLAGS', xla_flags)
  if opt_out is not None:
    monkeypatch.setenv(runtime.XLA_FLAGS_ENV, opt_out)
  runtime.configure_xla_flags()
  return os.environ.get('XLA_FLAGS', '').split()


def test_adds_the_flags_once(monkeypatch):
  assert _configured(monkeypatch) == list(runtime.XLA_CPU_FLAGS)
  runtime.configure_xla_flags()
  assert os.environ['XLA_FLAGS'].split() == list(runtime.XLA_CPU_FLAGS)


def test_keeps_the_users_flags_and_values(monkeypatch):
  name = runtime.XLA_CPU_FLAGS[0].split('=')[0]
  flags = _configured(monkeypatch, f'--xla_force_host_platform_device_count=2 {name}=dot')
  # The user's value wins; the flags the user did not set are still added.
  assert flags == [
    '--xla_force_host_platform_device_count=2',
    f'{name}=dot',
    *runtime.XLA_CPU_FLAGS[1:],
  ]


def test_opt_out_leaves_xla_flags_alone(monkeypatch):
  assert _configured(monkeypatch, '--xla_cpu_enable_fast_math=false', opt_out='0') == [
    '--xla_cpu_enable_fast_math=false'
  ]


def test_this_jaxlib_accepts_the_flags():
  # XLA aborts the process on a flag it does not know (e.g. after a jaxlib
  # upgrade renamed it): check in a fresh process that computes something.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', runtime.XLA_FLAGS_ENV)}
  code = (
    'from ddpm_jax import runtime; runtime.configure_xla_flags(); import jax, os; '
    'print(float(jax.numpy.ones(3).sum()), os.environ["XLA_FLAGS"])'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[0] == '3.0'
  assert all(flag in proc.stdout.split() for flag in runtime.XLA_CPU_FLAGS)
