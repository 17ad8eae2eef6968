"""Smoke tests of the benchmark suite (`run.py --quick`) and the GPU check (`device_check.py --smoke`).

The quick run measures every row with tiny models; its numbers mean nothing,
so nothing here is timed: the test checks that every row ran without error
and that the JSON report is complete and well formed. The helper tests check
that the diffusers peer is the same network as ddpm-jax's U-Net (through
ddpm-jax's own diffusers-config reader), that measurements take turns, that
the peak-memory probe sees an allocation and what the FLOP count counts.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import device_check  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import workloads  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from configs import cifar10, fashion_mnist  # noqa: E402
from ddpm_jax.models import layers  # noqa: E402
from ddpm_jax.models.diffusers_import import unet_kwargs_from_diffusers_config  # noqa: E402

ROWS = (
  'train_step',
  'forward',
  'flops',
  'sampling',
  'bpd',
  'compile',
  'input_pipeline',
  'scaling',
  'steps',
)
QUICK = dict(quick=True, num_timesteps=10)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'quick.json'
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'benchmarks', 'run.py'), '--quick', '--out', str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_row_ran_without_error(report):
  data, _ = report
  assert set(ROWS) <= set(data['rows'])
  for name, result in data['raw'].items():
    if name == 'compile':
      for run in ('cold', 'warm'):
        assert 'error' not in result[run], result[run].get('traceback', result[run])
    else:
      assert 'error' not in result, result.get('traceback', result)


def test_rows_hold_positive_measurements(report):
  rows = report[0]['rows']
  for name in ('train_step', 'forward'):
    for key in ('jax_images_per_s', 'torch_images_per_s', 'ratio', 'flops_per_image'):
      assert _positive(rows[name][key]), (name, key, rows[name][key])
  assert _positive(rows['flops']['limit_flops_per_s'])
  assert _positive(rows['flops']['forward_jax_fraction'])
  # FLOP/s use the network's FLOPs as defined (the reference layers; the
  # quick model has no upsampling layer, where the fast layers would execute
  # fewer). The fast training step executes about as many: on CPU the small
  # images' input gradients also compute the taps that fall on the padding.
  assert rows['forward']['flops_per_image'] >= rows['forward']['executed_flops_per_image'] > 0
  train = rows['train_step']
  assert 0.8 < train['flops_per_image'] / train['executed_flops_per_image'] < 1.2
  for key in ('chain_s', 'bare_forwards_s', 'diffusers_s', 'speedup_vs_diffusers'):
    assert _positive(rows['sampling'][key]), key
  assert _positive(rows['bpd']['fraction_of_forward'])
  for run in ('cold', 'warm'):
    for part in ('train', 'sampler'):
      assert _positive(rows['compile'][run][part]['total_s'])
  assert _positive(rows['input_pipeline']['ratio'])
  settings = report[0]['settings']
  assert [r['batch'] for r in rows['scaling']['rows']] == settings['scaling_batches']
  for r in rows['scaling']['rows']:
    for workload in workloads.SCALING_WORKLOADS:
      assert _positive(r[workload]['images_per_s'])
      assert r[workload]['memory']['peak_rss_mib'] > 0
  assert [r['steps'] for r in rows['steps']['rows']] == settings['step_counts']


def test_the_report_records_machine_and_versions(report):
  data, _ = report
  meta = data['meta']
  assert meta['machine'] and meta['backend'] == meta['info']['backend']
  for name in ('jax', 'flax', 'torch', 'diffusers'):
    assert meta['versions'][name]
  assert meta['info']['torch_version'] and meta['loadavg_1m_end'] >= 0


def test_headline_numbers_are_printed(report):
  data, stdout = report
  assert len(data['headline']) == 12
  for name, value in data['headline'].items():
    assert _positive(value) or ('overhead' in name and math.isfinite(value)), (name, value)
    assert name in stdout


@pytest.mark.parametrize('config_module', [cifar10, fashion_mnist])
def test_diffusers_peer_is_the_same_network(config_module):
  config = config_module.get_config()
  size, channels = config.data.image_size, config.data.num_channels
  kwargs = workloads.diffusers_unet_kwargs(config.model, size, channels, channels)
  back = unet_kwargs_from_diffusers_config(dict(_class_name='UNet2DModel', **kwargs))
  assert back == dict(
    ch=config.model.ch,
    ch_mult=tuple(config.model.ch_mult),
    num_res_blocks=config.model.num_res_blocks,
    attn_resolutions=tuple(config.model.attn_resolutions),
    dropout=config.model.dropout,
    out_ch=channels,
    resamp_with_conv=True,
    num_classes=config.model.num_classes,
  )


def test_cifar10_peer_has_the_public_ddpm_layout():
  kwargs = workloads.diffusers_unet_kwargs(cifar10.get_config().model, 32, 3, 3)
  assert kwargs['block_out_channels'] == (128, 256, 256, 256)
  assert kwargs['down_block_types'] == (
    'DownBlock2D',
    'AttnDownBlock2D',
    'DownBlock2D',
    'DownBlock2D',
  )
  assert kwargs['up_block_types'] == ('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D')


def test_time_interleaved_takes_turns_after_warmup():
  calls = []
  result = common.time_interleaved(
    {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, repeats=3, warmup=2
  )
  assert calls == ['a', 'a', 'b', 'b'] + ['a', 'b'] * 3
  assert result['a']['repeats'] == 3 and len(result['b']['times_s']) == 3
  assert result['a']['median_s'] >= 0


def test_peak_memory_sees_an_allocation():
  mem = common.PeakMemory()
  with mem:
    block = np.ones(32 * 1024 * 1024 // 4, np.float32)  # 32 MiB, every page touched
    del block
  assert mem.result['workload_mib'] >= 30


def test_model_flops_count_the_upsampling_convolution_as_defined():
  # Two levels: one upsampling layer, 4x4 -> 8x8 at 64 channels. XLA counts
  # the multiply-adds of the taps that fall inside the image. As defined the
  # layer is a 3x3 convolution of the 8x8 upsampled image: 22 valid
  # (output, tap) pairs per axis, 22**2 per channel pair. The fast layer runs
  # four 2x2 convolutions at 4x4, each with 7 valid pairs per axis
  # (4 * 7**2), plus the [16, 9] x [9, 64 * 64] matmul that builds their taps.
  config = workloads.experiment_config('cifar10', QUICK)
  config.model.ch_mult = (1, 2)
  config.model.layers = 'fast'
  batch, channels = 2, 2 * config.model.ch
  forward = workloads.JaxForward(config, batch)
  assert forward.cost['flops'] == forward.flops(layers.FAST)
  upsample_as_defined = dataclasses.replace(
    layers.FAST, upsample_conv=layers.REFERENCE.upsample_conv
  )
  saved = 2 * batch * (22**2 - 4 * 7**2) * channels**2 - 2 * 16 * 9 * channels**2
  assert forward.flops(upsample_as_defined) - forward.cost['flops'] == saved


def test_bfloat16_runs_both_networks_in_bfloat16():
  # --dtype bfloat16: model.dtype for ddpm-jax, autocast for the peer; the
  # peer's output dtype shows that autocast is on.
  spec = dict(QUICK, dtype='bfloat16')
  config = workloads.experiment_config('cifar10', spec)
  assert config.model.dtype == 'bfloat16'
  assert workloads.experiment_config('fashion_mnist', spec).model.dtype == 'bfloat16'
  jax_forward = workloads.JaxForward(config, 2)
  # The U-Net returns float32; inside, activations are bfloat16 (XLA:CPU
  # widens each convolution's operands, so look for the arrays, not the ops).
  assert 'bf16[2,8,8,32]' in jax_forward.compiled.as_text()
  assert jax_forward.cost['flops'] > 0  # counted on the lowered program
  torch_forward = workloads.TorchForward(config, 2)
  import torch  # pylint: disable=g-import-not-at-top

  with torch.inference_mode(), torch_forward.autocast():
    assert torch_forward.model(torch_forward.x, torch_forward.t).sample.dtype == torch.bfloat16
  workloads.TorchTrain(config, 2)()  # the float32 loss over the bf16 output


def test_device_check_smoke_runs_every_row(tmp_path):
  # benchmarks/device_check.py --smoke: every row of the GPU check, tiny, on this machine.
  out = tmp_path / 'device_check.json'
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'benchmarks', 'device_check.py'), '--smoke', '--out', out],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  with open(out) as f:
    data = json.load(f)
  names = [f'{kind}_{dtype}' for dtype in device_check.DTYPES for kind in device_check.KINDS]
  assert list(data['rows']) == names
  for name in names:
    row = data['rows'][name]
    for key in ('ratio', 'jax_images_per_s', 'torch_images_per_s', 'jax_tflops_per_s'):
      assert _positive(row[key]), (name, key, row[key])
    assert name in proc.stdout
  flops = data['meta']['model_flops_per_image']
  assert flops['train'] == 3 * flops['forward']
  assert flops['sampling'] == data['settings']['sample_steps'] * flops['forward']


def test_ode_vs_bound_smoke_reports_both_bits_per_dim(tmp_path):
  # benchmarks/ode_vs_bound.py --smoke: a tiny conditional U-Net, the bound and the ODE on 4 images.
  out = tmp_path / 'ode_vs_bound.json'
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'ode_vs_bound.py'),
      '--smoke',
      f'--json={out}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  with open(out) as f:
    data = json.load(f)
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == data
  assert data['num_images'] == 4 and data['machine']
  for name in ('bound', 'ode'):
    assert _positive(data[name]['bpd']) and _positive(data[name]['wall_s']), data[name]
  assert data['ode']['denoiser_calls_per_image'] == 2 * data['ode_settings']['num_steps']
  assert data['ode_settings']['solver'] == 'heun'
  assert math.isfinite(data['ode_minus_bound']['bpd'])


@pytest.mark.parametrize('model_var_type', ['fixedlarge', 'learned_range'])
def test_benchmark_models_are_the_trainers(model_var_type):
  from ddpm_jax import inference  # pylint: disable=g-import-not-at-top

  config = cifar10.get_config()
  config.diffusion.model_var_type = model_var_type
  model, d, shape = workloads.model_and_diffusion(config)
  want_model, want_d, want_shape = inference.build_model_and_diffusion(config)
  assert (model, shape) == (want_model, want_shape)
  np.testing.assert_array_equal(d.betas, want_d.betas)
