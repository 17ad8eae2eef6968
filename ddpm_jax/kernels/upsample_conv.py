"""Nearest x2 upsampling then a 3x3 convolution, computed at the input resolution.

Replaces `nn.Conv(upsample_nearest2x(x))`: each output phase of that
convolution reads only two distinct input rows and columns, so the layer is
four 2x2 convolutions of the input (16 instead of 36 multiply-adds per input
pixel and channel pair), with no upsampled copy of x.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Output row 2i + a of a 'SAME' 3x3 convolution of the upsampled image reads
# upsampled rows 2i + a - 1, 2i + a, 2i + a + 1, which are input rows
# (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: two distinct rows. So
# each of the four output phases (a, a') is a 2x2 convolution of the input
# whose taps are sums of the 3x3 kernel's. _PHASE_ROWS[a][r] lists the 3x3
# kernel rows (or columns) that fall on row r of phase a's 2x2 window.
_PHASE_ROWS = (((0,), (1, 2)), ((0, 1), (2,)))


def _phase_tap_matrix() -> np.ndarray:
  """[16, 9] 0/1 matrix: 2x2 tap (a, a', r, c) of phase (a, a') sums these 3x3 taps."""
  rows = np.zeros((2, 2, 3), np.float32)  # [phase a, window row r, kernel row]
  for a in (0, 1):
    for r in (0, 1):
      rows[a, r, list(_PHASE_ROWS[a][r])] = 1
  return np.einsum('ari,bcj->abrcij', rows, rows).reshape(16, 9)


_PHASE_TAPS = _phase_tap_matrix()


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array, dtype: Dtype = None) -> jax.Array:
  """conv3x3(upsample_nearest2x(x), kernel), 'SAME' zero padding, no bias.

  Args:
    x: [B, H, W, C_in].
    kernel: [3, 3, C_in, C_out] (HWIO), summed in its own dtype.
    dtype: compute dtype of the convolutions (default: x's).

  Returns:
    [B, 2H, 2W, C_out].
  """
  b, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  dtype = dtype or x.dtype
  x = x.astype(dtype)
  # All 16 phase taps as one [16, 9] x [9, C_in * C_out] matmul of 0/1
  # weights (the same sums, at full precision): XLA:CPU runs it and its
  # gradient as plain matmuls, where slices, adds and stacks became strided
  # copies and pads.
  taps = jnp.dot(
    jnp.asarray(_PHASE_TAPS, kernel.dtype),
    kernel.reshape(9, c_in * c_out),
    precision=jax.lax.Precision.HIGHEST,
  )
  phase_kernels = taps.reshape(2, 2, 2, 2, c_in, c_out).astype(dtype)  # [a, a', r, c, in, out]
  rows = []
  for a in (0, 1):
    # Phase a's window covers input rows (i - 1, i) for a = 0, (i, i + 1) for a = 1.
    phases = [
      jax.lax.conv_general_dilated(
        x,
        phase_kernels[a, a2],
        (1, 1),
        ((1 - a, a), (1 - a2, a2)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
      for a2 in (0, 1)
    ]
    rows.append(jnp.stack(phases, axis=3))  # [B, H, W, 2 (a'), C_out]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, c_out)  # [B, H, 2 (a), W, 2, C_out]


class UpsampleConv(nn.Module):
  """Nearest x2 upsampling then a 3x3 'SAME' convolution with bias.

  Its parameters ('kernel' [3, 3, C_in, features] and 'bias') and their
  initialisation are those of the `nn.Conv` that would follow the
  upsampling, so checkpoints and imported weights are the same.

  Attributes:
    features: output channels.
    kernel_init: initialiser of 'kernel'.
    bias_init: initialiser of 'bias'.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, 2H, 2W, features]."""
    kernel = self.param(
      'kernel', self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype
    )
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    return upsample2x_conv3x3(x, kernel, dtype=self.dtype) + bias.astype(self.dtype)
