"""The throughput in the training logs: images/s, TFLOP/s per device and MFU."""

import types

import pytest

from configs import tiny
from ddpm_jax import train


class _Compiled:
  """Stands in for a `jax.stages.Compiled` whose cost analysis counts `flops`."""

  def __init__(self, flops):
    self._flops = flops

  def cost_analysis(self):
    return {'flops': self._flops}


def _throughput(device_kind, steps_per_call=1, peak_tflops=0.0):
  tc = tiny.get_config().training
  tc.steps_per_call, tc.peak_tflops = steps_per_call, peak_tflops
  return train._Throughput(tc, types.SimpleNamespace(device_kind=device_kind))


def test_mfu_is_the_step_rate_over_the_devices_peak():
  throughput = _throughput('TPU v4', steps_per_call=2)
  throughput.measure(_Compiled(4e12))  # Two steps a call: 2 TFLOP a step.
  metrics = throughput.metrics(steps_per_sec=10.0)
  assert metrics['images_per_sec'] == 10.0 * 8
  assert metrics['tflops_per_device'] == pytest.approx(20.0)
  assert metrics['mfu'] == pytest.approx(20.0 / 275.0)


def test_a_given_peak_overrides_the_table():
  throughput = _throughput('TPU v4', peak_tflops=100.0)
  throughput.measure(_Compiled(1e12))
  assert throughput.metrics(steps_per_sec=5.0)['mfu'] == pytest.approx(0.05)


def test_no_mfu_where_the_peak_is_unknown(caplog):
  with caplog.at_level('INFO'):
    throughput = _throughput('cpu')
  assert 'MFU is left out' in caplog.text and "'cpu'" in caplog.text
  throughput.measure(_Compiled(1e9))
  metrics = throughput.metrics(steps_per_sec=2.0)
  assert metrics['tflops_per_device'] == pytest.approx(2e-3)
  assert 'mfu' not in metrics


def test_without_a_flop_count_only_images_per_second():
  throughput = _throughput('TPU v4')
  throughput.measure(_Compiled(-1.0))  # XLA's answer when it cannot count.
  assert set(throughput.metrics(steps_per_sec=1.0)) == {'images_per_sec'}
