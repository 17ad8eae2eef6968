"""runtime.configure_xla_flags: XLA:CPU flags main.py, the benchmarks and the tests run with."""

import os
import subprocess
import sys

from ddpm_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  assert flags == ['--xla_force_host_platform_device_count=2', f'{name}=dot',
                   *runtime.XLA_CPU_FLAGS[1:]]


def test_opt_out_leaves_xla_flags_alone(monkeypatch):
  assert _configured(monkeypatch, '--xla_cpu_enable_fast_math=false', opt_out='0') == [
      '--xla_cpu_enable_fast_math=false']


def test_this_jaxlib_accepts_the_flags():
  # XLA aborts the process on a flag it does not know (e.g. after a jaxlib
  # upgrade renamed it): check in a fresh process that computes something.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', runtime.XLA_FLAGS_ENV)}
  code = ('from ddpm_jax import runtime; runtime.configure_xla_flags(); import jax, os; '
          'print(float(jax.numpy.ones(3).sum()), os.environ["XLA_FLAGS"])')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[0] == '3.0'
  assert all(flag in proc.stdout.split() for flag in runtime.XLA_CPU_FLAGS)
