"""A Dense layer's matmul whose gradient reads a materialised cotangent.

Replaces `nn.Dense`'s `dot_general`: under autodiff XLA:CPU fused the
GroupNorm/swish backward pass into a strided, transposed copy feeding the
kernel gradient; one 2-D matmul over a cotangent written out first avoids it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_last_axis(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """[..., I] x [I, O] -> [..., O]."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _fwd(x, kernel, precision):
  return matmul_last_axis(x, kernel, precision), (x, kernel)


def _bwd(precision, residuals, g):
  x, kernel = residuals
  # The same two products as autodiff's; the barrier (CPU only) makes XLA
  # write the cotangent out in its natural layout before both read it.
  g = jax.lax.platform_dependent(g, cpu=jax.lax.optimization_barrier, default=lambda g: g)
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dkernel = jax.lax.dot_general(flat_x, flat_g, (((0,), (0,)), ((), ())), precision=precision)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


matmul_last_axis.defvjp(_fwd, _bwd)


def dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None, **other):
  """`lax.dot_general` for `nn.Dense(dot_general=...)`.

  x's last axis against the kernel's first goes to `matmul_last_axis`; any
  other contraction, or arguments beyond precision, go to lax unchanged.
  """
  (x_contract, k_contract), (x_batch, k_batch) = dimension_numbers
  if (
    tuple(x_contract) != (x.ndim - 1,)
    or tuple(k_contract) != (0,)
    or x_batch
    or k_batch
    or preferred_element_type not in (None, jnp.result_type(x, kernel))
    or other
  ):
    return jax.lax.dot_general(
      x,
      kernel,
      dimension_numbers,
      precision=precision,
      preferred_element_type=preferred_element_type,
      **other,
    )
  return matmul_last_axis(x, kernel, precision)
