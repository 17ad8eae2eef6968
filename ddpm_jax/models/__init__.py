"""Noise-prediction networks: the DDPM U-Net and a builder from configs."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ddpm_jax.models.unet import UNet

__all__ = ["UNet", "unet_from_config", "DTYPES"]

# Compute dtypes a config may name; parameters stay float32 either way.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def unet_from_config(model_config: ml_collections.ConfigDict, out_channels: int) -> UNet:
  """Builds the U-Net described by a model config.

  Args:
    model_config: ConfigDict with fields `ch` (int), `ch_mult` (sequence of
      int), `num_res_blocks` (int), `attn_resolutions` (sequence of int,
      spatial side lengths), `dropout` (float), `resamp_with_conv` (bool) and
      `dtype` ('float32' or 'bfloat16', the compute dtype).
    out_channels: output channels, e.g. 3 for eps or 6 with learned variance.

  Returns:
    An unbound `UNet`.

  Raises:
    ValueError: if `dtype` is not one of the supported names.
  """
  dtype_name = str(model_config.dtype)
  if dtype_name not in DTYPES:
    raise ValueError(
        f"unknown model dtype {dtype_name!r}; valid choices: {sorted(DTYPES)}")
  return UNet(
      ch=int(model_config.ch),
      ch_mult=tuple(int(m) for m in model_config.ch_mult),
      num_res_blocks=int(model_config.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in model_config.attn_resolutions),
      dropout=float(model_config.dropout),
      out_ch=int(out_channels),
      resamp_with_conv=bool(model_config.resamp_with_conv),
      dtype=DTYPES[dtype_name],
  )
