"""The model FLOP count and the throughput in the training logs: images/s, TFLOP/s, MFU.

The analytic count is checked against an independent one: XLA's cost
analysis of the same network, built with the reference layers and lowered
(not compiled) from abstract parameters, so no device work is done. XLA also
counts the elementwise operations the analytic count leaves out, so the
analytic count must be below XLA's by a small margin.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from configs import cifar10, tiny
from ddpm_jax import inference
from ddpm_jax import throughput
from ddpm_jax import train_state as train_state_lib


def _model_and_shape(config):
  config.model.layers = 'reference'  # The network as defined.
  model, diffusion, shape = inference.build_model_and_diffusion(config)
  return model, diffusion, shape


def _xla_forward_flops_per_image(config, batch=2):
  model, _, shape = _model_and_shape(config)
  spec = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct(s, dtype)
  args = (spec(batch, *shape, dtype=jnp.float32), spec(batch))
  if config.model.num_classes:
    args += (spec(batch),)
  init = lambda *a: model.init(jax.random.key(0), *a, train=False)['params']
  params = jax.eval_shape(init, *args)
  apply = jax.jit(lambda p, *a: model.apply({'params': p}, *a, train=False))
  return apply.lower(params, *args).cost_analysis()['flops'] / batch, params


def test_cifar10_forward_count_agrees_with_xla():
  config = cifar10.get_config()
  xla, params = _xla_forward_flops_per_image(config)
  assert sum(p.size for p in jax.tree.leaves(params)) == 35_746_307  # The paper's 35.7M.
  analytic = throughput.forward_flops_per_image(config.model, (32, 32, 3))
  # Measured: 11.620 against XLA's 11.661 GFLOP; XLA adds norms, swish, softmax and sums.
  assert analytic == pytest.approx(11.6195e9, rel=1e-4)
  assert 0.0 < 1.0 - analytic / xla < 0.01


def test_class_conditional_tiny_forward_count_agrees_with_xla():
  config = tiny.get_config()
  config.model.num_classes = 10
  xla, _ = _xla_forward_flops_per_image(config)
  analytic = throughput.forward_flops_per_image(config.model, (16, 16, 1))
  # At 32-64 channels the elementwise operations weigh more: 1.5% measured.
  assert 0.0 < 1.0 - analytic / xla < 0.03


def test_tiny_count_without_resampling_convolutions_agrees_with_xla():
  config = tiny.get_config()
  config.model.resamp_with_conv = False
  xla, _ = _xla_forward_flops_per_image(config)
  analytic = throughput.forward_flops_per_image(config.model, (16, 16, 1))
  assert 0.0 < 1.0 - analytic / xla < 0.03


def test_training_step_counts_three_forward_passes_as_xla_roughly_does():
  config = tiny.get_config()
  model, diffusion, shape = _model_and_shape(config)
  batch = config.training.batch_size
  state = jax.eval_shape(
    functools.partial(train_state_lib.create_train_state, model, config, image_shape=shape),
    jax.random.key(0),
  )
  batches = {'image': jax.ShapeDtypeStruct((1, batch) + shape, jnp.float32)}
  step = jax.jit(functools.partial(train_state_lib.train_steps, diffusion=diffusion, config=config))
  key = jax.eval_shape(lambda: jax.random.key(0))
  xla = step.lower(state, batches, key).cost_analysis()['flops'] / batch
  analytic = throughput.train_flops_per_image(config.model, shape)
  assert analytic == 3 * throughput.forward_flops_per_image(config.model, shape)
  # XLA's backward also has the elementwise ops' gradients, Adam and the EMA.
  assert 0.0 < 1.0 - analytic / xla < 0.05


def test_output_channels_and_padding_count():
  # One level, no attention, 4x4 input: conv_in, a res block, conv_out.
  config = tiny.get_config().model
  config.ch, config.ch_mult, config.attn_resolutions = 32, (1,), ()
  config.num_res_blocks = 0
  # Valid (output, tap) pairs of a padded 3x3 convolution over 4: 3 * 4 - 2.
  taps = 10**2
  temb = 32 * 128 + 128 * 128
  mid = 2 * (2 * taps * 32 * 32 + 128 * 32)
  attn = 4 * 16 * 32 * 32 + 2 * 16 * 16 * 32
  up = taps * 64 * 32 + 128 * 32 + taps * 32 * 32 + 16 * 64 * 32
  expected = lambda out: 2 * (temb + taps * 3 * 32 + mid + attn + up + taps * 32 * out)
  assert throughput.forward_flops_per_image(config, (4, 4, 3)) == expected(3)
  assert throughput.forward_flops_per_image(config, (4, 4, 3), out_channels=6) == expected(6)


def test_mfu_is_the_step_rate_over_the_devices_peak():
  rates = throughput.Throughput(8, 1e12, peak_tflops=275.0, num_devices=2)
  metrics = rates.metrics(steps_per_sec=10.0)
  assert metrics['images_per_sec'] == 80.0
  # 80 images/s x 1 TFLOP over 2 devices.
  assert metrics['tflops_per_device'] == pytest.approx(40.0)
  assert metrics['mfu'] == pytest.approx(40.0 / 275.0)


def test_a_given_peak_overrides_the_table():
  config = tiny.get_config()
  config.training.peak_tflops = 100.0
  rates = throughput.for_training(config, (16, 16, 1), 1, device_kind='TPU v4', num_devices=1)
  assert rates.peak_tflops == 100.0
  assert throughput.device_peak_tflops('TPU v4') == 275.0
  flops = throughput.train_flops_per_image(config.model, (16, 16, 1))
  assert rates.metrics(steps_per_sec=5.0)['mfu'] == pytest.approx(5 * 8 * flops / 1e14)


def test_no_mfu_where_the_peak_is_unknown(caplog):
  with caplog.at_level('INFO'):
    rates = throughput.for_training(
      tiny.get_config(), (16, 16, 1), 1, device_kind='cpu', num_devices=1
    )
  assert 'MFU is left out' in caplog.text and "'cpu'" in caplog.text
  metrics = rates.metrics(steps_per_sec=2.0)
  assert metrics['tflops_per_device'] > 0
  assert 'mfu' not in metrics


@pytest.mark.parametrize(
  'device_kind, tflops',
  [
    ('TPU v4', 275.0),
    ('TPU v5 lite', 197.0),
    ('TPU v5e', 197.0),
    ('TPU v5', 459.0),
    ('TPU v5p', 459.0),
    ('TPU v6 lite', 918.0),
    ('NVIDIA A100-SXM4-80GB', 312.0),
    ('NVIDIA H100 80GB HBM3', 989.0),
    ('NVIDIA H100 PCIe', 756.0),
    ('NVIDIA H200', 989.0),
    ('cpu', None),
    ('NVIDIA GeForce RTX 4090', None),
  ],
)
def test_peak_tflops_of_known_accelerators_and_none_elsewhere(device_kind, tflops):
  assert throughput.peak_tflops(device_kind) == tflops
