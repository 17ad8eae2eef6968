"""Tests for importing diffusers `UNet2DModel` weights into the Flax U-Net.

The reference is diffusers itself (PyTorch, CPU): a randomly initialised
`UNet2DModel` in the DDPM layout is saved with `save_pretrained`, loaded with
`load_diffusers_unet`, and both networks are run on the same inputs.
Needs the test peers: `pip install -r requirements-peers.txt`.
"""

import functools
import json
import math

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
import torch

from torch_peers import import_torchvision

import_torchvision()  # diffusers imports it when installed.
from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top

from ddpm_jax.models.diffusers_import import (
  SAFETENSORS_NAME,
  convert_diffusers_state_dict,
  load_diffusers_unet,
  unet_kwargs_from_diffusers_config,
)
from ddpm_jax.models.unet import UNet

# The diffusers settings under which UNet2DModel is the original DDPM U-Net.
DDPM_SETTINGS = dict(
  norm_eps=1e-6,
  flip_sin_to_cos=False,
  freq_shift=1,
  downsample_padding=0,
  attention_head_dim=None,
  norm_num_groups=32,
  act_fn='silu',
  dropout=0.1,
)

TINY = dict(
  sample_size=16,
  in_channels=3,
  out_channels=6,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
  up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
  **DDPM_SETTINGS,
)

CIFAR10 = dict(
  sample_size=32,
  in_channels=3,
  out_channels=3,
  block_out_channels=(128, 256, 256, 256),
  layers_per_block=2,
  down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
  **DDPM_SETTINGS,
)


def _random_diffusers_unet(kwargs, seed):
  """A diffusers UNet2DModel with every parameter perturbed (norm scales and
  all biases included), so that every converted tensor affects the output."""
  torch.manual_seed(seed)
  model = UNet2DModel(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _reference(model, x_nhwc, t):
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.from_numpy(t).long())
  return out.sample.numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(lambda params, x, t: model.apply({'params': params}, x, t, train=False))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  model = _random_diffusers_unet(TINY, seed=0)
  path = tmp_path_factory.mktemp('tiny_unet')
  model.save_pretrained(path)
  return model, path


def test_tiny_outputs_match_diffusers(tiny):
  torch_model, path = tiny
  model, params = load_diffusers_unet(path)
  assert model == UNet(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1, out_ch=6
  )
  x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
  t = np.array([0, 1, 500, 999], np.int32)
  ref = _reference(torch_model, x, t)
  out = np.asarray(_jitted_apply(model)(params, x, t))
  assert out.shape == (4, 16, 16, 6)
  assert np.abs(ref).max() > 0.5  # a meaningful comparison, not 0 vs 0
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_outputs_match_at_several_timesteps(tiny):
  torch_model, path = tiny
  model, params = load_diffusers_unet(path)
  x = np.random.default_rng(1).standard_normal((4, 16, 16, 3)).astype(np.float32)
  for step in (3, 123, 640, 998):
    t = np.full((4,), step, np.int32)
    np.testing.assert_allclose(
      np.asarray(_jitted_apply(model)(params, x, t)),
      _reference(torch_model, x, t),
      atol=1e-4,
      rtol=0,
    )


def test_class_conditional_outputs_match_diffusers(tmp_path):
  # 4 classes and the null label: diffusers' num_class_embeds counts both.
  torch_model = _random_diffusers_unet(dict(TINY, num_class_embeds=5), seed=3)
  torch_model.save_pretrained(tmp_path)
  model, params = load_diffusers_unet(tmp_path)
  assert model.num_classes == 4
  assert params['class_embed']['embedding'].shape == (5, 128)
  x = np.random.default_rng(3).standard_normal((5, 16, 16, 3)).astype(np.float32)
  t = np.array([0, 7, 250, 600, 999], np.int32)
  y = np.array([0, 1, 2, 3, 4], np.int32)  # 4: the null label.
  with torch.no_grad():
    out = torch_model(
      torch.from_numpy(x.transpose(0, 3, 1, 2)),
      torch.from_numpy(t).long(),
      class_labels=torch.from_numpy(y).long(),
    )
  ref = out.sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(
    jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y, train=False))(params, x, t, y)
  )
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  # The labels matter: another class gives another output.
  other = np.asarray(model.apply({'params': params}, x, t, (y + 1) % 5, train=False))
  assert np.abs(other - ref).max() > 1e-2


def test_bin_checkpoint_loads_the_same_weights(tiny, tmp_path):
  torch_model, path = tiny
  torch_model.save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / 'diffusion_pytorch_model.bin').exists()
  assert not (tmp_path / SAFETENSORS_NAME).exists()
  _, from_bin = load_diffusers_unet(tmp_path)
  _, from_safetensors = load_diffusers_unet(path)
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)


def test_legacy_attention_names_are_accepted(tiny):
  _, path = tiny
  tensors = load_file(str(path / SAFETENSORS_NAME))
  legacy = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  renamed = {}
  for name, value in tensors.items():
    for new, old in legacy.items():
      name = name.replace(f'.{new}.', f'.{old}.')
    renamed[name] = value
  assert any('.proj_attn.' in n for n in renamed)
  model, params = load_diffusers_unet(path)
  converted = convert_diffusers_state_dict(renamed, model, (16, 16, 3))
  jax.tree.map(np.testing.assert_array_equal, converted, params)


@pytest.mark.parametrize(
  'edit,match',
  [
    (lambda d: d.pop('conv_in.bias'), r'not filled.*conv_in'),
    (lambda d: d.update({'extra.weight': np.zeros(3, np.float32)}), r'not used.*extra\.weight'),
    (
      lambda d: d.update({'conv_out.bias': np.zeros(5, np.float32)}),
      r'shape mismatches.*conv_out.*\(5,\).*\(6,\)',
    ),
  ],
)
def test_weight_mismatches_are_reported(tiny, edit, match):
  _, path = tiny
  tensors = dict(load_file(str(path / SAFETENSORS_NAME)))
  edit(tensors)
  model = UNet(**unet_kwargs_from_diffusers_config(UNet2DModel.load_config(path)))
  with pytest.raises(ValueError, match=match):
    convert_diffusers_state_dict(tensors, model, (16, 16, 3))


def test_cifar10_layout_matches_diffusers(tmp_path):
  """The full google/ddpm-cifar10-32 layout, random weights."""
  torch_model = _random_diffusers_unet(CIFAR10, seed=1)
  torch_model.save_pretrained(tmp_path)
  model, params = load_diffusers_unet(tmp_path)
  assert model == UNet(dropout=0.1)  # the paper's CIFAR-10 network
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == 35_746_307
  x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
  t = np.array([10, 900], np.int32)
  ref = _reference(torch_model, x, t)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(np.asarray(_jitted_apply(model)(params, x, t)), ref, atol=1e-4, rtol=0)


# --- Config validation (no weights needed) -----------------------------------


def _config(**overrides):
  cfg = {
    '_class_name': 'UNet2DModel',
    '_diffusers_version': '0.42.1',
    **{k: list(v) if isinstance(v, tuple) else v for k, v in CIFAR10.items()},
  }
  cfg.update(overrides)
  return cfg


def test_cifar10_config_translates_to_the_paper_network():
  kwargs = unet_kwargs_from_diffusers_config(_config())
  assert kwargs == dict(
    ch=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
    out_ch=3,
    resamp_with_conv=True,
    num_classes=0,
  )


def test_config_without_attention_head_dim_is_single_head():
  # Configs from before diffusers had the entry hold single-head DDPM weights.
  cfg = _config()
  del cfg['attention_head_dim']
  assert unet_kwargs_from_diffusers_config(cfg)['attn_resolutions'] == (16,)


@pytest.mark.parametrize(
  'overrides,match',
  [
    (dict(flip_sin_to_cos=True), 'flip_sin_to_cos'),
    (dict(freq_shift=0), 'freq_shift'),
    (dict(downsample_padding=1), 'downsample_padding'),
    (dict(norm_eps=1e-5), 'norm_eps'),
    (dict(norm_num_groups=16), 'norm_num_groups'),
    (dict(attention_head_dim=8), 'attention_head_dim'),
    (dict(resnet_time_scale_shift='scale_shift'), 'resnet_time_scale_shift'),
    (dict(center_input_sample=True), 'center_input_sample'),
    (dict(time_embedding_type='fourier'), 'time_embedding_type'),
    (dict(act_fn='gelu'), 'act_fn'),
    (dict(class_embed_type='timestep'), 'class_embed_type'),
    (dict(num_class_embeds=1), 'num_class_embeds'),
    (
      dict(up_block_types=['UpBlock2D', 'UpBlock2D', 'UpBlock2D', 'UpBlock2D']),
      'attention at level 1 only on one path',
    ),
    (
      dict(down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D', 'DownBlock2D']),
      'CrossAttnDownBlock2D',
    ),
    (dict(block_out_channels=[128, 192, 256, 256]), 'not multiples'),
    (dict(sample_size=None), 'sample_size'),
    (dict(mystery_option=3), 'mystery_option'),
    (dict(_class_name='UNet2DConditionModel'), 'UNet2DConditionModel'),
  ],
)
def test_unsupported_config_is_rejected(overrides, match):
  with pytest.raises(ValueError, match=match):
    unet_kwargs_from_diffusers_config(_config(**overrides))


def test_missing_files_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    load_diffusers_unet(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(_config()))
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model'):
    load_diffusers_unet(tmp_path)
