"""The U-Net's building blocks, as sets: plain flax layers, or the fast CPU kernels.

`UNet(layers=...)` takes one `Layers` set, the way flax's ImageNet ResNet
takes `conv: ModuleDef`. Every set creates the same parameters (names,
shapes, initialisation) and computes the same function up to float
rounding, so one checkpoint loads with any of them:

  REFERENCE  plain flax: nn.Conv, nn.Dense, nn.GroupNorm (+ swish),
             nn.Dropout, and nearest x2 upsampling then nn.Conv.
  FAST       REFERENCE with the kernels of `ddpm_jax.kernels` (GroupNorm, the
             Dense layers' gradient, the upsampling convolution at the input
             resolution), faster on CPU (docs/performance.md); the Dense
             kernel's CPU-only part is chosen with `lax.platform_dependent`.

The config field `model.layers` names a set: 'auto' (by platform,
`for_platform`), 'reference' or 'fast'.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.kernels import dense as dense_kernel
from ddpm_jax.kernels import group_norm as group_norm_kernel
from ddpm_jax.kernels import upsample_conv as upsample_conv_kernel

# GroupNorm groups and epsilon everywhere in the original network.
NUM_GROUPS = 32
NORM_EPS = 1e-6

ModuleDef = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Layers:
  """Constructors of the U-Net's layers, each called inside a compact method.

  Attributes:
    conv: 3x3 convolution with `nn.Conv`'s arguments (kernel size 3x3 and
      padding 1 bound; the downsampling layer overrides strides and padding).
    dense: `nn.Dense`.
    norm: GroupNorm over NUM_GROUPS groups with epsilon NORM_EPS, then swish
      if `swish=True`; takes `swish`, `dtype`, `param_dtype` and `name`.
    dropout: `nn.Dropout`.
    upsample_conv: nearest x2 upsampling then a 3x3 'SAME' convolution;
      takes `nn.Conv`'s `features`, initialisers, dtypes and name.
  """

  conv: ModuleDef
  dense: ModuleDef
  norm: ModuleDef
  dropout: ModuleDef
  upsample_conv: ModuleDef


def upsample_nearest2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling, [B, H, W, C] -> [B, 2H, 2W, C]."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def _group_norm_then_swish(*, swish: bool = False, **kwargs) -> Callable[[jax.Array], jax.Array]:
  norm = nn.GroupNorm(num_groups=NUM_GROUPS, epsilon=NORM_EPS, **kwargs)
  return (lambda x: nn.swish(norm(x))) if swish else norm


def _upsample_then_conv(features: int, **kwargs) -> Callable[[jax.Array], jax.Array]:
  # Created in the caller's scope, so its parameters sit where `UpsampleConv`'s do.
  conv = nn.Conv(features, (3, 3), padding=1, **kwargs)
  return lambda x: conv(upsample_nearest2x(x))


REFERENCE = Layers(
  conv=functools.partial(nn.Conv, kernel_size=(3, 3), padding=1),
  dense=nn.Dense,
  norm=_group_norm_then_swish,
  dropout=nn.Dropout,
  upsample_conv=_upsample_then_conv,
)

# Only the kernels that made the CIFAR-10 U-Net faster on CPU (docs/performance.md).
FAST = dataclasses.replace(
  REFERENCE,
  dense=functools.partial(nn.Dense, dot_general=dense_kernel.dot_general),
  norm=functools.partial(group_norm_kernel.GroupNorm, num_groups=NUM_GROUPS, epsilon=NORM_EPS),
  upsample_conv=upsample_conv_kernel.UpsampleConv,
)

LAYER_SETS = {'reference': REFERENCE, 'fast': FAST}
LAYER_CHOICES = ('auto',) + tuple(LAYER_SETS)

# The set 'auto' picks on each platform: the fast set wherever it was measured no slower
# (docs/performance.md).
_PLATFORM_SETS = {'cpu': 'fast', 'gpu': 'fast', 'tpu': 'fast'}


def for_platform(platform: str | None = None) -> Layers:
  """The layer set 'auto' means on `platform` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  return LAYER_SETS[_PLATFORM_SETS.get(platform, 'reference')]


def resolve(name: str) -> Layers:
  """The layer set a config names: one of `LAYER_CHOICES`.

  Raises:
    ValueError: for any other name, naming the valid choices.
  """
  if name == 'auto':
    return for_platform()
  if name not in LAYER_SETS:
    raise ValueError(f'unknown layer set {name!r}; valid choices: {LAYER_CHOICES}')
  return LAYER_SETS[name]
