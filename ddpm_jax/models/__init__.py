"""Noise-prediction networks: the DDPM U-Net, its layer sets and a builder from configs."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ddpm_jax.models import layers
from ddpm_jax.models.unet import UNet

__all__ = ['UNet', 'unet_from_config', 'DTYPES', 'layers']

# Compute dtypes a config may name; parameters stay float32 either way.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def unet_from_config(model_config: ml_collections.ConfigDict, out_channels: int) -> UNet:
  """Builds the U-Net described by a model config.

  Args:
    model_config: ConfigDict with fields `ch` (int), `ch_mult` (sequence of
      int), `num_res_blocks` (int), `attn_resolutions` (sequence of int,
      spatial side lengths), `dropout` (float), `resamp_with_conv` (bool),
      `dtype` ('float32' or 'bfloat16', the compute dtype) and optionally
      `layers` (one of `layers.LAYER_CHOICES`; default 'auto') and
      `num_classes` (class labels of a class-conditional network; default 0,
      unconditional).
    out_channels: output channels, e.g. 3 for eps or 6 with learned variance.

  Returns:
    An unbound `UNet`; with layers 'auto' its `layers` is None, so the set is
    picked by the platform it runs on.

  Raises:
    ValueError: if `dtype` or `layers` is not one of the supported names.
  """
  dtype_name = str(model_config.dtype)
  if dtype_name not in DTYPES:
    raise ValueError(f'unknown model dtype {dtype_name!r}; valid choices: {sorted(DTYPES)}')
  layers_name = str(model_config.get('layers', 'auto'))
  layer_set = layers.resolve(layers_name)
  return UNet(
    ch=int(model_config.ch),
    ch_mult=tuple(int(m) for m in model_config.ch_mult),
    num_res_blocks=int(model_config.num_res_blocks),
    attn_resolutions=tuple(int(r) for r in model_config.attn_resolutions),
    dropout=float(model_config.dropout),
    out_ch=int(out_channels),
    resamp_with_conv=bool(model_config.resamp_with_conv),
    dtype=DTYPES[dtype_name],
    layers=None if layers_name == 'auto' else layer_set,
    num_classes=int(model_config.get('num_classes', 0)),
  )
