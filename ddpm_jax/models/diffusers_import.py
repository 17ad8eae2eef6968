"""Imports diffusers `UNet2DModel` weights in the DDPM layout into `UNet`.

diffusers' `UNet2DModel` with the original DDPM settings (e.g. the public
`google/ddpm-cifar10-32` weights) computes exactly the function of
`ddpm_jax.models.unet.UNet`:

  block_out_channels = ch * ch_mult, layers_per_block = num_res_blocks,
  down blocks DownBlock2D / AttnDownBlock2D and the mirrored up blocks
  UpBlock2D / AttnUpBlock2D (attention at the same levels both ways),
  UNetMidBlock2D with attention, norm_num_groups 32, norm_eps 1e-6,
  flip_sin_to_cos False, freq_shift 1, downsample_padding 0 (pad bottom/right
  by one, like TF's stride-2 'SAME'), single-head attention
  (attention_head_dim None), silu, conv resampling.

A class-conditional `UNet2DModel` (`num_class_embeds` = N with
`class_embed_type` None, whose label embedding is added to the timestep
embedding) imports as the conditional `UNet` with num_classes = N - 1: the
last of its N embeddings is taken as the null label of classifier-free
guidance, the convention of models trained with it.

Any other setting changes the function and is rejected with a ValueError.
Weights are read with the `safetensors` NumPy API, so torch is only needed
for legacy `.bin` files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.layers import NORM_EPS, NUM_GROUPS
from ddpm_jax.models.unet import UNet

SAFETENSORS_NAME = 'diffusion_pytorch_model.safetensors'
BIN_NAME = 'diffusion_pytorch_model.bin'

# Config entries that must hold exactly these values (diffusers defaults
# differ for several of them, so absent entries are checked against the
# diffusers default below).
_REQUIRED = {
  'center_input_sample': False,
  'time_embedding_type': 'positional',
  'flip_sin_to_cos': False,
  'freq_shift': 1,
  'mid_block_type': 'UNetMidBlock2D',
  'mid_block_scale_factor': 1,
  'downsample_padding': 0,
  'downsample_type': 'conv',
  'upsample_type': 'conv',
  'norm_num_groups': NUM_GROUPS,
  'resnet_time_scale_shift': 'default',
  'add_attention': True,
  'class_embed_type': None,
}
# diffusers 0.42 `UNet2DModel.__init__` defaults, for entries a config omits.
_DIFFUSERS_DEFAULTS = {
  'sample_size': None,
  'in_channels': 3,
  'out_channels': 3,
  'center_input_sample': False,
  'time_embedding_type': 'positional',
  'time_embedding_dim': None,
  'freq_shift': 0,
  'flip_sin_to_cos': True,
  'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
  'mid_block_type': 'UNetMidBlock2D',
  'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
  'block_out_channels': (224, 448, 672, 896),
  'layers_per_block': 2,
  'mid_block_scale_factor': 1,
  'downsample_padding': 1,
  'downsample_type': 'conv',
  'upsample_type': 'conv',
  'dropout': 0.0,
  'act_fn': 'silu',
  'attention_head_dim': 8,
  'norm_num_groups': 32,
  'attn_norm_num_groups': None,
  'norm_eps': 1e-5,
  'resnet_time_scale_shift': 'default',
  'add_attention': True,
  'class_embed_type': None,
  'num_class_embeds': None,
  'num_train_timesteps': None,  # only read by the 'learned' time embedding
}


def _attention_levels(cfg: Mapping[str, Any], problems: list[str]) -> list[int]:
  """Levels with attention, checking the down and up paths agree."""
  down, up = list(cfg['down_block_types']), list(cfg['up_block_types'])
  n = len(cfg['block_out_channels'])
  if len(down) != n or len(up) != n:
    problems.append(
      f'down_block_types ({len(down)}), up_block_types ({len(up)}) and '
      f'block_out_channels ({n}) must have the same length'
    )
    return []
  levels = []
  for level in range(n):
    d, u = down[level], up[n - 1 - level]
    if d not in ('DownBlock2D', 'AttnDownBlock2D'):
      problems.append(f'down_block_types[{level}]={d!r} (supported: DownBlock2D, AttnDownBlock2D)')
    if u not in ('UpBlock2D', 'AttnUpBlock2D'):
      problems.append(
        f'up_block_types[{n - 1 - level}]={u!r} (supported: UpBlock2D, AttnUpBlock2D)'
      )
    if (d == 'AttnDownBlock2D') != (u == 'AttnUpBlock2D'):
      problems.append(
        f'attention at level {level} only on one path ({d!r} down, {u!r} '
        'up); the DDPM U-Net attends at the same resolutions both ways'
      )
    if d == 'AttnDownBlock2D':
      levels.append(level)
  return levels


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Translates a diffusers `UNet2DModel` config into `UNet` arguments.

  Args:
    config: the parsed config.json of a diffusers `UNet2DModel`.

  Returns:
    keyword arguments for `UNet` (ch, ch_mult, num_res_blocks,
    attn_resolutions, dropout, out_ch, resamp_with_conv, num_classes).

  Raises:
    ValueError: naming every setting that the DDPM U-Net does not implement.
  """
  class_name = config.get('_class_name', 'UNet2DModel')
  if class_name != 'UNet2DModel':
    raise ValueError(f'expected a diffusers UNet2DModel config, got _class_name={class_name!r}')
  unknown = sorted(k for k in config if not k.startswith('_') and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f'unsupported diffusers UNet2DModel config entries: {unknown}')
  cfg = {**_DIFFUSERS_DEFAULTS, **config}
  if 'attention_head_dim' not in config:
    # Configs written before diffusers had this entry (e.g. the original
    # google/ddpm-* uploads, "_diffusers_version" 0.0.4) hold the original
    # single-head DDPM weights. diffusers 0.42 would read the absence as its
    # default of 8 channels per head; the DDPM network has one head.
    cfg['attention_head_dim'] = None
  problems = []
  for key, want in _REQUIRED.items():
    if cfg[key] != want:
      problems.append(f'{key}={cfg[key]!r} (need {want!r})')
  if cfg['act_fn'] not in ('silu', 'swish'):
    problems.append(f"act_fn={cfg['act_fn']!r} (need 'silu')")
  if not np.isclose(float(cfg['norm_eps']), NORM_EPS, rtol=1e-6, atol=0.0):
    problems.append(f'norm_eps={cfg["norm_eps"]!r} (need {NORM_EPS})')
  if cfg['attn_norm_num_groups'] not in (None, NUM_GROUPS):
    problems.append(
      f'attn_norm_num_groups={cfg["attn_norm_num_groups"]!r} (need None or {NUM_GROUPS})'
    )

  num_class_embeds = cfg['num_class_embeds']
  if num_class_embeds is not None and (
    not isinstance(num_class_embeds, int) or num_class_embeds < 2
  ):
    problems.append(
      f'num_class_embeds={num_class_embeds!r} (need None or an int >= 2: the classes and '
      'the null label)'
    )
  channels = [int(c) for c in cfg['block_out_channels']]
  ch = channels[0]
  if any(c % ch for c in channels):
    problems.append(f'block_out_channels={channels} are not multiples of the first entry')
  if cfg['time_embedding_dim'] not in (None, 4 * ch):
    problems.append(f'time_embedding_dim={cfg["time_embedding_dim"]!r} (need None or {4 * ch})')

  levels = _attention_levels(cfg, problems)
  # Single-head attention everywhere: diffusers uses heads = C // head_dim.
  head_dim = cfg['attention_head_dim']
  if head_dim is not None:
    attn_channels = [channels[level] for level in levels] + [channels[-1]]
    if any(c != head_dim for c in attn_channels):
      problems.append(
        f'attention_head_dim={head_dim!r} gives multi-head attention; the DDPM '
        'U-Net has one head (use None)'
      )

  attn_resolutions = ()
  if levels:
    size = cfg['sample_size']
    if isinstance(size, (list, tuple)):
      if len(size) != 2 or size[0] != size[1]:
        problems.append(f'sample_size={size!r} must be square')
      size = size[0]
    if not isinstance(size, int):
      problems.append(
        f'sample_size={cfg["sample_size"]!r}: an integer image size is needed '
        'to place attention by resolution'
      )
    else:
      attn_resolutions = tuple(size // 2**level for level in levels)

  if problems:
    raise ValueError('unsupported diffusers UNet2DModel config: ' + '; '.join(problems))
  return dict(
    ch=ch,
    ch_mult=tuple(c // ch for c in channels),
    num_res_blocks=int(cfg['layers_per_block']),
    attn_resolutions=attn_resolutions,
    dropout=float(cfg['dropout']),
    out_ch=int(cfg['out_channels']),
    resamp_with_conv=True,
    num_classes=0 if num_class_embeds is None else num_class_embeds - 1,
  )


# --- Tensor conversion -------------------------------------------------------


def _conv(w: np.ndarray) -> np.ndarray:
  """PyTorch OIHW conv weight -> Flax HWIO kernel."""
  if w.ndim != 4:
    raise ValueError(f'expected a 4-D conv weight, got shape {w.shape}')
  return np.transpose(w, (2, 3, 1, 0))


def _linear(w: np.ndarray) -> np.ndarray:
  """PyTorch [out, in] linear weight (or [out, in, 1, 1] 1x1 conv) -> [in, out]."""
  if w.ndim == 4 and w.shape[2:] == (1, 1):
    w = w[:, :, 0, 0]
  if w.ndim != 2:
    raise ValueError(f'expected a 2-D linear weight, got shape {w.shape}')
  return w.T


def _same(w: np.ndarray) -> np.ndarray:
  return w


# (diffusers layer suffix, Flax submodule, conversion of `.weight`, Flax
# name of `.weight`). Biases always map to `bias` unchanged.
_RESNET_LAYERS = (
  ('norm1', 'norm1', _same, 'scale'),
  ('conv1', 'conv1', _conv, 'kernel'),
  ('time_emb_proj', 'temb_proj', _linear, 'kernel'),
  ('norm2', 'norm2', _same, 'scale'),
  ('conv2', 'conv2', _conv, 'kernel'),
  ('conv_shortcut', 'nin_shortcut', _linear, 'kernel'),
)
_ATTN_LAYERS = (
  ('group_norm', 'norm', _same, 'scale'),
  ('to_q', 'q', _linear, 'kernel'),
  ('to_k', 'k', _linear, 'kernel'),
  ('to_v', 'v', _linear, 'kernel'),
  ('to_out.0', 'proj_out', _linear, 'kernel'),
)
# Names used by diffusers' attention blocks before 0.14 (older checkpoints).
_LEGACY_ATTN_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _normalise_legacy_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in tensors.items():
    m = re.match(r'^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$', name)
    if m:
      name = f'{m.group(1)}.{_LEGACY_ATTN_NAMES[m.group(2)]}.{m.group(3)}'
    out[name] = value
  return out


def _block_prefixes(num_levels: int, num_res_blocks: int, attn_levels: set[int]):
  """Yields (diffusers prefix, Flax module name, layer table) for every layer."""
  yield 'conv_in', 'conv_in', (('', '', _conv, 'kernel'),)
  yield 'time_embedding.linear_1', 'temb_dense0', (('', '', _linear, 'kernel'),)
  yield 'time_embedding.linear_2', 'temb_dense1', (('', '', _linear, 'kernel'),)
  yield 'class_embedding', 'class_embed', (('', '', _same, 'embedding'),)
  for level in range(num_levels):
    for i in range(num_res_blocks):
      yield f'down_blocks.{level}.resnets.{i}', f'down_{level}_block_{i}', _RESNET_LAYERS
      if level in attn_levels:
        yield f'down_blocks.{level}.attentions.{i}', f'down_{level}_attn_{i}', _ATTN_LAYERS
    if level != num_levels - 1:
      yield (
        f'down_blocks.{level}.downsamplers.0.conv',
        f'down_{level}_downsample',
        (('', '', _conv, 'kernel'),),
      )
  yield 'mid_block.resnets.0', 'mid_block_1', _RESNET_LAYERS
  yield 'mid_block.attentions.0', 'mid_attn_1', _ATTN_LAYERS
  yield 'mid_block.resnets.1', 'mid_block_2', _RESNET_LAYERS
  for up_index in range(num_levels):
    level = num_levels - 1 - up_index
    for i in range(num_res_blocks + 1):
      yield f'up_blocks.{up_index}.resnets.{i}', f'up_{level}_block_{i}', _RESNET_LAYERS
      if level in attn_levels:
        yield f'up_blocks.{up_index}.attentions.{i}', f'up_{level}_attn_{i}', _ATTN_LAYERS
    if level != 0:
      yield (
        f'up_blocks.{up_index}.upsamplers.0.conv',
        f'up_{level}_upsample',
        (('', '', _conv, 'kernel'),),
      )
  yield 'conv_norm_out', 'norm_out', (('', '', _same, 'scale'),)
  yield 'conv_out', 'conv_out', (('', '', _conv, 'kernel'),)


def convert_diffusers_state_dict(
  tensors: Mapping[str, np.ndarray],
  model: UNet,
  image_shape: tuple[int, int, int],
) -> dict[str, Any]:
  """Converts a diffusers `UNet2DModel` state dict into `model`'s parameters.

  Args:
    tensors: diffusers parameter name -> NumPy array (PyTorch layouts).
    model: the `UNet` the weights are for (from
      `unet_kwargs_from_diffusers_config`).
    image_shape: (H, W, C) of the model input, used to trace the expected
      parameter shapes.

  Returns:
    The Flax 'params' collection (nested dict of float32 jax arrays), for
    `model.apply({'params': params}, x, t, train=...)`.

  Raises:
    ValueError: if a diffusers tensor is left unused, a Flax parameter is not
      filled, or a shape does not match.
  """
  tensors = _normalise_legacy_names(dict(tensors))
  h, w, c = image_shape
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  expected = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32), labels, train=False
    )
  )['params']
  attn_levels = {
    level for level in range(len(model.ch_mult)) if h // 2**level in set(model.attn_resolutions)
  }

  params: dict[str, dict[str, np.ndarray]] = {}
  used: set[str] = set()
  problems: list[str] = []

  def take(
    src: str, convert: Callable[[np.ndarray], np.ndarray], module: str, sub: str, leaf: str
  ) -> None:
    if src not in tensors:
      return
    used.add(src)
    value = np.asarray(convert(np.asarray(tensors[src])), dtype=np.float32)
    node = params.setdefault(module, {})
    if sub:
      node = node.setdefault(sub, {})
    node[leaf] = value

  for prefix, module, layers in _block_prefixes(
    len(model.ch_mult), model.num_res_blocks, attn_levels
  ):
    for suffix, sub, convert, weight_name in layers:
      base = f'{prefix}.{suffix}' if suffix else prefix
      take(f'{base}.weight', convert, module, sub, weight_name)
      take(f'{base}.bias', _same, module, sub, 'bias')

  unused = sorted(set(tensors) - used)
  if unused:
    problems.append(f'{len(unused)} diffusers tensors not used: {unused[:10]}')
  flat_expected = {
    jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)
  }
  flat_got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  missing = sorted(set(flat_expected) - set(flat_got))
  if missing:
    problems.append(f'{len(missing)} Flax parameters not filled: {missing[:10]}')
  extra = sorted(set(flat_got) - set(flat_expected))
  if extra:
    problems.append(f'{len(extra)} converted tensors have no Flax parameter: {extra[:10]}')
  wrong = [
    f'{k}: got {flat_got[k].shape}, need {flat_expected[k].shape}'
    for k in sorted(set(flat_got) & set(flat_expected))
    if flat_got[k].shape != flat_expected[k].shape
  ]
  if wrong:
    problems.append(f'{len(wrong)} shape mismatches: {wrong[:10]}')
  if problems:
    raise ValueError('diffusers weights do not fit the DDPM U-Net: ' + '; '.join(problems))
  return jax.tree.map(jnp.asarray, params)


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  st_path = os.path.join(path, SAFETENSORS_NAME)
  bin_path = os.path.join(path, BIN_NAME)
  if os.path.exists(st_path):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    return load_file(st_path)
  if os.path.exists(bin_path):
    # Legacy pickled checkpoints need torch to unpickle; weights_only avoids
    # running arbitrary code from the file.
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
        f'reading {bin_path} needs torch (pip install -r requirements-peers.txt)'
      ) from e
    state = torch.load(bin_path, map_location='cpu', weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()}
  raise FileNotFoundError(f'no {SAFETENSORS_NAME} or {BIN_NAME} in {path}')


def load_diffusers_unet(
  path: str | os.PathLike[str], *, dtype: Any = jnp.float32
) -> tuple[UNet, dict[str, Any]]:
  """Loads a diffusers `UNet2DModel` folder (DDPM layout) as a Flax `UNet`.

  Args:
    path: folder with config.json and diffusion_pytorch_model.safetensors
      (or the legacy diffusion_pytorch_model.bin), as written by
      `UNet2DModel.save_pretrained`.
    dtype: compute dtype of the returned model; parameters are float32.

  Returns:
    (model, params): an unbound `UNet` and its 'params' collection, for
    `model.apply({'params': params}, x, t, train=False)` with x NHWC in
    [B, H, W, in_channels] and t int32 [B] (and labels y int32 [B] after t
    for a class-conditional model). The output matches the diffusers
    model's `sample` (with `class_labels=y`) transposed to NHWC.

  Raises:
    ValueError: for a config the DDPM U-Net does not implement, or weights
      that do not fit it (unused tensors, unfilled parameters, wrong shapes).
    FileNotFoundError: if the folder has no config or weights.
  """
  path = os.fspath(path)
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'no config.json in {path}')
  with open(config_path) as f:
    config = json.load(f)
  model = UNet(**unet_kwargs_from_diffusers_config(config), dtype=dtype)
  # Parameter shapes do not depend on the image size beyond divisibility,
  # but attention placement does: trace at the configured size.
  size = config.get('sample_size') or 2 ** (len(model.ch_mult) - 1)
  if isinstance(size, (list, tuple)):
    size = size[0]
  size = int(size)
  in_channels = int(config.get('in_channels', _DIFFUSERS_DEFAULTS['in_channels']))
  params = convert_diffusers_state_dict(_read_tensors(path), model, (size, size, in_channels))
  return model, params
