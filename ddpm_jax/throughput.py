"""Training throughput: images/s, model FLOPs, TFLOP/s per device and MFU.

The FLOPs are the U-Net's model FLOPs, counted once per run from its config
(`forward_flops_per_image`), the same on every platform and for every layer
set: XLA's count of the compiled step depends on both, and on a GPU misses
the convolutions handed to library calls. They are the multiply-adds (x 2)
of the network as defined: every convolution (taps on the zero padding
excluded, since they add nothing), every dense layer and attention's two
matrix products. Left out, a few percent of XLA's count of the same forward
pass: GroupNorm, swish, softmax, bias and residual additions, the sinusoidal
embedding, the class embedding's lookup, and average pooling.

A training step counts 3x the forward pass, the usual model-FLOPs
convention: the backward pass takes the gradients with respect to the
activations and to the weights, each about one forward pass of
multiply-adds. The optimizer and the EMA (elementwise) are left out. MFU is
the achieved model FLOP/s per device over the device's dense bf16 peak
(`PEAK_TFLOPS`, or the config's `training.peak_tflops`).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

from absl import logging

# The backward pass costs about two forward passes (see the module doc).
TRAIN_FORWARD_RATIO = 3.0

# Dense bf16 peak TFLOP/s of one device (a TPU chip, a GPU), from the vendors'
# data sheets: the usual denominator of MFU. Keys are lower-case fragments of
# `jax.Device.device_kind`, most specific first.
PEAK_TFLOPS = (
  ('v5 lite', 197.0),  # TPU v5e
  ('v5e', 197.0),
  ('v5p', 459.0),
  ('v5', 459.0),  # TPU v5p reports 'TPU v5'
  ('v6 lite', 918.0),  # TPU v6e (Trillium)
  ('v6e', 918.0),
  ('v4', 275.0),
  ('h200', 989.0),
  ('h100 pcie', 756.0),
  ('h100', 989.0),  # SXM
  ('a100', 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak TFLOP/s of a device kind, or None when it is not in `PEAK_TFLOPS`."""
  kind = device_kind.lower()
  for fragment, tflops in PEAK_TFLOPS:
    if fragment in kind:
      return tflops
  return None


def device_peak_tflops(device_kind: str, configured: float = 0.0) -> float | None:
  """`configured` where given (> 0), else the table's peak; None (logged) where neither is known.

  Args:
    device_kind: `jax.Device.device_kind`, e.g. 'TPU v4' or 'NVIDIA H100 80GB HBM3'.
    configured: the config's `training.peak_tflops`; 0 reads the table.
  """
  peak = configured or peak_tflops(device_kind)
  if peak is None:
    logging.info(
      'MFU is left out of the logs: no peak FLOP/s is known for device kind %r '
      '(set training.peak_tflops to give one).',
      device_kind,
    )
  return peak


def _taps(size: int, stride: int = 1, pad: tuple[int, int] = (1, 1), kernel: int = 3) -> int:
  """(output position, kernel tap) pairs along one axis whose tap reads inside the input."""
  out = (size + pad[0] + pad[1] - kernel) // stride + 1
  return sum(0 <= o * stride + j - pad[0] < size for o in range(out) for j in range(kernel))


def _conv(height: int, width: int, c_in: int, c_out: int, **axis: Any) -> int:
  """Multiply-adds of a 3x3 convolution over an input of height x width."""
  return _taps(height, **axis) * _taps(width, **axis) * c_in * c_out


def forward_flops_per_image(
  model_config: Any, image_shape: Sequence[int], out_channels: int | None = None
) -> float:
  """Model FLOPs of one U-Net forward pass on one image (see the module doc).

  Args:
    model_config: the config's `model` group (or anything with its fields):
      `ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`, and optionally
      `resamp_with_conv` (default True) and `num_classes` (a lookup: no FLOPs).
    image_shape: (H, W, C) of the input.
    out_channels: the network's output channels (default C; 2C with a
      learned variance).

  Returns:
    2 x the multiply-adds of the convolutions, dense layers and attention.
  """
  height, width, channels = (int(n) for n in image_shape)
  ch, mults = int(model_config.ch), [int(m) for m in model_config.ch_mult]
  attn = {int(r) for r in model_config.attn_resolutions}
  resample = bool(getattr(model_config, 'resamp_with_conv', True))
  temb = 4 * ch

  def res_block(c_in, c_out):
    macs = _conv(height, width, c_in, c_out) + temb * c_out + _conv(height, width, c_out, c_out)
    return macs + (height * width * c_in * c_out if c_in != c_out else 0)

  def attn_block(c):
    n = height * width
    return 4 * n * c * c + 2 * n * n * c  # q, k, v and the projection; logits and mixing.

  macs = ch * temb + temb * temb  # The timestep embedding's two dense layers.
  macs += _conv(height, width, channels, ch)
  skips, c = [ch], ch
  for level, mult in enumerate(mults):
    for _ in range(int(model_config.num_res_blocks)):
      macs += res_block(c, ch * mult)
      c = ch * mult
      macs += attn_block(c) if height in attn else 0
      skips.append(c)
    if level != len(mults) - 1:
      if resample:  # Stride 2, one row and column of padding at the bottom and right.
        macs += _conv(height, width, c, c, stride=2, pad=(0, 1))
      height, width = height // 2, width // 2
      skips.append(c)
  macs += 2 * res_block(c, c) + attn_block(c)
  for level in reversed(range(len(mults))):
    for _ in range(int(model_config.num_res_blocks) + 1):
      macs += res_block(c + skips.pop(), ch * mults[level])
      c = ch * mults[level]
      macs += attn_block(c) if height in attn else 0
    if level != 0:
      height, width = 2 * height, 2 * width
      macs += _conv(height, width, c, c) if resample else 0
  macs += _conv(height, width, c, channels if out_channels is None else int(out_channels))
  return 2.0 * macs


def train_flops_per_image(
  model_config: Any, image_shape: Sequence[int], out_channels: int | None = None
) -> float:
  """Model FLOPs of one training step per image: `TRAIN_FORWARD_RATIO` forward passes."""
  return TRAIN_FORWARD_RATIO * forward_flops_per_image(model_config, image_shape, out_channels)


class Throughput:
  """A training run's rates at a measured step rate.

  Attributes:
    batch_size: global images per step.
    flops_per_image: model FLOPs of one step per image (`train_flops_per_image`).
    peak_tflops: one device's peak, or None (then no MFU).
    num_devices: devices the global batch is spread over.
  """

  def __init__(
    self,
    batch_size: int,
    flops_per_image: float,
    peak_tflops: float | None = None,
    num_devices: int = 1,
  ):
    self.batch_size = batch_size
    self.flops_per_image = flops_per_image
    self.peak_tflops = peak_tflops
    self.num_devices = num_devices

  def metrics(self, steps_per_sec: float) -> dict[str, float]:
    """images_per_sec, tflops_per_device, and mfu where the peak is known."""
    images_per_sec = steps_per_sec * self.batch_size
    tflops = images_per_sec * self.flops_per_image / self.num_devices / 1e12
    found = {'images_per_sec': images_per_sec, 'tflops_per_device': tflops}
    if self.peak_tflops:
      found['mfu'] = tflops / self.peak_tflops
    return found


def for_training(
  config: Any,
  image_shape: Sequence[int],
  out_channels: int,
  *,
  device_kind: str,
  num_devices: int,
) -> Throughput:
  """The `Throughput` of a training run of `config` (an experiment config).

  Args:
    config: with `model` (see `forward_flops_per_image`) and `training`
      (`batch_size`, `peak_tflops`).
    image_shape: (H, W, C) of the model's input.
    out_channels: the U-Net's output channels.
    device_kind: the kind of the devices trained on.
    num_devices: how many.
  """
  flops = train_flops_per_image(config.model, image_shape, out_channels)
  logging.info(
    'Model FLOPs: %.4g GFLOP a training step per image (%.4g per forward pass).',
    flops / 1e9,
    flops / TRAIN_FORWARD_RATIO / 1e9,
  )
  return _for_run(config, flops, device_kind, num_devices)


def _for_run(config: Any, flops: float, device_kind: str, num_devices: int) -> Throughput:
  return Throughput(
    int(config.training.batch_size),
    flops,
    device_peak_tflops(device_kind, config.training.peak_tflops),
    num_devices,
  )


def for_distillation(
  config: Any,
  image_shape: Sequence[int],
  out_channels: int,
  *,
  device_kind: str,
  num_devices: int,
) -> Throughput:
  """The `Throughput` of a distillation (`--mode=distill`): the student's training step plus
  the teacher's two forward passes per image, each on a doubled batch when guided."""
  forward = forward_flops_per_image(config.model, image_shape, out_channels)
  guided = 2 if config.model.num_classes > 0 else 1
  flops = TRAIN_FORWARD_RATIO * forward + 2 * guided * forward
  return _for_run(config, flops, device_kind, num_devices)
