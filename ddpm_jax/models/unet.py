"""The DDPM U-Net (Ho et al. 2020, appendix B) in Flax Linen.

The network follows the original TF code (`diffusion_tf/models/unet.py`):
a PixelCNN++-style U-Net with pre-activation residual blocks that add a
projected sinusoidal timestep embedding, single-head self-attention at chosen
spatial resolutions (plus one in the middle), GroupNorm with 32 groups, and
"zero" (scale 1e-10) initialisation of the last layer of every residual
branch and of the output convolution, so a fresh model predicts ~0.

The layers themselves come from a `Layers` set (`ddpm_jax.models.layers`):
plain flax layers or faster kernels with the same parameters and function.
With `num_classes` > 0 the network is class-conditional: a learned
embedding of the label (num_classes + 1 rows, the last one the "null" label
that classifier-free guidance trains and samples with) is added to the
timestep embedding, as in ADM and GLIDE. With num_classes = 0 (the paper's
setting) the parameters and the function are the unconditional network's.

Tensors are NHWC. Parameter names are this project's own; see
`ddpm_jax.models.diffusers_import` for the mapping to diffusers'
`UNet2DModel`, whose DDPM layout computes exactly the same function.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers as layers_lib
from ddpm_jax.models.layers import NUM_GROUPS, Layers, upsample_nearest2x

# TF's `variance_scaling_initializer(scale, mode='fan_avg',
# distribution='uniform')`, as in the original `default_init`. The original
# "zero" init is the same with scale 1e-10 (not exactly zero, which keeps the
# fan computation and the weights' signs random).
default_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
zero_init = nn.initializers.variance_scaling(1e-10, 'fan_avg', 'uniform')


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal timestep embedding of the original DDPM code.

  With half = dim // 2 the frequencies are
  freq_k = exp(-ln(10000) * k / (half - 1)), k = 0..half-1, and the
  embedding is [sin(t * freq), cos(t * freq)] (sines first).

  Args:
    t: timesteps, shape [B], any integer or float dtype.
    dim: embedding width; must be even and at least 4.

  Returns:
    float32 array of shape [B, dim].
  """
  if dim % 2 or dim < 4:
    raise ValueError(f'timestep embedding width must be even and >= 4, got {dim}')
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResBlock(nn.Module):
  """Pre-activation residual block with an additive timestep embedding.

  GN -> swish -> conv3x3 -> (+ Dense(swish(temb))) -> GN -> swish -> dropout
  -> conv3x3 (zero init); a 1x1 (NIN) projection on the shortcut when the
  channel count changes.
  """

  out_ch: int
  dropout: float
  layers: Layers

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
    """x [B, H, W, C_in], temb [B, T] (before its swish) -> [B, H, W, out_ch].

    `train` enables dropout (which needs the 'dropout' rng).
    """
    layers = self.layers
    h = layers.norm(swish=True, name='norm1')(x)
    h = layers.conv(self.out_ch, name='conv1')(h)
    h = h + layers.dense(self.out_ch, name='temb_proj')(nn.swish(temb))[:, None, None, :]
    h = layers.norm(swish=True, name='norm2')(h)
    h = layers.dropout(rate=self.dropout)(h, deterministic=not train)
    h = layers.conv(self.out_ch, kernel_init=zero_init, name='conv2')(h)
    if x.shape[-1] != self.out_ch:
      # A 1x1 convolution is a Dense over the channel axis.
      x = layers.dense(self.out_ch, name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual.

  GN -> q, k, v (1x1, C channels) -> softmax(q k^T / sqrt(C)) v -> 1x1
  projection (zero init) -> + x.
  """

  layers: Layers

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    layers = self.layers
    b, height, width, c = x.shape
    h = layers.norm(name='norm')(x).reshape(b, height * width, c)
    q = layers.dense(c, name='q')(h)
    k = layers.dense(c, name='k')(h)
    v = layers.dense(c, name='v')(h)
    # Scaling q (N*C values) is cheaper than scaling the N*N logits.
    q = q * jnp.asarray(c**-0.5, q.dtype)
    logits = jnp.einsum('bqc,bkc->bqk', q, k)
    # Softmax in float32 even under bf16 compute, for stable normalisation.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum('bqk,bkc->bqc', weights, v)
    h = layers.dense(c, kernel_init=zero_init, name='proj_out')(h)
    return x + h.reshape(b, height, width, c)


class UNet(nn.Module):
  """The DDPM noise-prediction U-Net.

  Attributes:
    ch: base channel count; level i has ch * ch_mult[i] channels.
    ch_mult: channel multiplier per resolution level; the image is halved
      len(ch_mult) - 1 times.
    num_res_blocks: residual blocks per level on the way down (the way up
      has one more per level, each taking a skip connection).
    attn_resolutions: spatial sizes (H) at which self-attention follows
      every residual block.
    dropout: dropout rate inside the residual blocks (active with
      train=True; needs the 'dropout' rng).
    out_ch: output channels (3 for eps, 6 for eps plus learned variance).
    resamp_with_conv: downsample with a stride-2 conv3x3 and follow the
      nearest upsample with a conv3x3; otherwise 2x2 average pooling and plain
      nearest upsampling.
    dtype: compute dtype (float32, or bfloat16 on accelerators). The output
      is always float32.
    param_dtype: parameter dtype.
    layers: the building blocks; None picks them by platform
      (`layers.for_platform`). Every set has the same parameters.
    num_classes: class labels of a class-conditional network; 0 makes it
      unconditional. The label `num_classes` is the null label.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  out_ch: int = 3
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layers: Layers | None = None
  num_classes: int = 0

  def _layers(self) -> Layers:
    """The layer set, with the original's initialisation and this network's dtypes bound."""
    layers = self.layers or layers_lib.for_platform()
    bind = functools.partial(functools.partial, dtype=self.dtype, param_dtype=self.param_dtype)
    return Layers(
      conv=bind(layers.conv, kernel_init=default_init),
      dense=bind(layers.dense, kernel_init=default_init),
      norm=bind(layers.norm),
      dropout=layers.dropout,
      upsample_conv=bind(layers.upsample_conv, kernel_init=default_init),
    )

  def _check_shapes(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> None:
    if x.ndim != 4:
      raise ValueError(f'UNet expects NHWC images [B, H, W, C], got shape {x.shape}')
    (_, height, width, _), factor = x.shape, 2 ** (len(self.ch_mult) - 1)
    if height % factor or width % factor:
      msg = f'(2**(len(ch_mult)-1) with ch_mult={tuple(self.ch_mult)})'
      raise ValueError(f'image size {height}x{width} must be divisible by {factor} {msg}')
    if self.attn_resolutions and height != width:
      raise ValueError(
        f'image must be square with attn_resolutions (side lengths), got {height}x{width}'
      )
    if bad := sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % NUM_GROUPS}):
      msg = f'channel counts {bad} (ch={self.ch} x ch_mult={tuple(self.ch_mult)})'
      raise ValueError(f'{msg} are not divisible by the {NUM_GROUPS} GroupNorm groups')
    if t.shape != (x.shape[0],):
      raise ValueError(f't must have shape [B] = ({x.shape[0]},), got {t.shape}')
    if self.num_classes == 0 and y is not None:
      raise ValueError('this U-Net is unconditional (num_classes=0); it takes no labels y')
    if self.num_classes > 0:
      if y is None:
        raise ValueError(
          f'this U-Net is class-conditional (num_classes={self.num_classes}): pass labels y '
          f'[B] in [0, {self.num_classes}] ({self.num_classes} is the null label)'
        )
      if y.shape != (x.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(
          f'y must be integer labels of shape [B] = ({x.shape[0]},), got {y.dtype} {y.shape}'
        )

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
  ) -> jax.Array:
    """Predicts the noise (or other target) for a batch of noisy images.

    Args:
      x: noisy images, float array of shape [B, H, W, C] (NHWC); H and W
        divisible by 2**(len(ch_mult) - 1).
      t: integer timesteps, shape [B] (0-indexed, as in the original code).
      y: integer class labels [B] in [0, num_classes] (num_classes is the
        null label) for a class-conditional network; None otherwise.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      float32 array of shape [B, H, W, out_ch].

    Raises:
      ValueError: at trace time, for a bad image size or channel count, or
        labels missing, given to an unconditional network, or of the wrong shape.
    """
    t = jnp.asarray(t)
    y = None if y is None else jnp.asarray(y)
    self._check_shapes(x, t, y)
    layers = self._layers()
    res_block = functools.partial(ResBlock, dropout=self.dropout, layers=layers)
    attn_block = functools.partial(AttnBlock, layers=layers)
    num_levels, attn_res = len(self.ch_mult), frozenset(self.attn_resolutions)

    temb = timestep_embedding(t, self.ch)
    temb = layers.dense(4 * self.ch, name='temb_dense0')(temb)
    temb = layers.dense(4 * self.ch, name='temb_dense1')(nn.swish(temb))
    if self.num_classes > 0:
      # Embed's default init (unit normal rows), as ADM's nn.Embedding.
      embed = nn.Embed(
        self.num_classes + 1,
        4 * self.ch,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='class_embed',
      )
      temb = temb + embed(y)

    hs = [layers.conv(self.ch, name='conv_in')(x)]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(self.ch * mult, name=f'down_{level}_block_{i}')(hs[-1], temb, train=train)
        if h.shape[1] in attn_res:
          h = attn_block(name=f'down_{level}_attn_{i}')(h)
        hs.append(h)
      if level != num_levels - 1:
        h = hs[-1]
        if self.resamp_with_conv:
          # Pad one row/column at the bottom/right only: TF's stride-2 'SAME'
          # on even sizes, and diffusers' Downsample2D with padding=0.
          downsample = dict(strides=2, padding=((0, 1), (0, 1)), name=f'down_{level}_downsample')
          h = layers.conv(h.shape[-1], **downsample)(h)
        else:
          h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        hs.append(h)

    h = hs[-1]
    h = res_block(h.shape[-1], name='mid_block_1')(h, temb, train=train)
    h = attn_block(name='mid_attn_1')(h)
    h = res_block(h.shape[-1], name='mid_block_2')(h, temb, train=train)

    for level in reversed(range(num_levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
        block = res_block(self.ch * self.ch_mult[level], name=f'up_{level}_block_{i}')
        h = block(h, temb, train=train)
        if h.shape[1] in attn_res:
          h = attn_block(name=f'up_{level}_attn_{i}')(h)
      if level != 0:
        if self.resamp_with_conv:
          h = layers.upsample_conv(h.shape[-1], name=f'up_{level}_upsample')(h)
        else:
          h = upsample_nearest2x(h)
    assert not hs, 'every skip connection must be consumed'

    h = layers.norm(swish=True, name='norm_out')(h)
    h = layers.conv(self.out_ch, kernel_init=zero_init, name='conv_out')(h)
    return h.astype(jnp.float32)
