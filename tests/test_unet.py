"""Tests for the DDPM U-Net: shapes, exact parameter counts, initialisation,
dropout, bf16 compute, input validation and the config builder.

The layer sets are compared in test_layers.py, the kernels in test_kernels.py."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax.models import unet_from_config
from ddpm_jax.models.layers import upsample_nearest2x
from ddpm_jax.models.unet import UNet, timestep_embedding

# A tiny model (ch 32, two levels, attention at 8x8) keeps compiled tests fast.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def _init_shapes(model, size, channels=3):
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)


def _num_params(variables):
  return sum(math.prod(a.shape) for a in jax.tree.leaves(variables))


_APPLY_CACHE = {}


def _init(model, x, t):
  """Real (jitted) initialisation with the model's own initialisers."""
  return jax.jit(lambda x, t: model.init(jax.random.key(0), x, t, train=False))(x, t)


def _apply(model, variables, x, t, train=False, rng=None):
  """Jitted apply, compiled once per (model, train) and reused across tests."""
  if (model, train) not in _APPLY_CACHE:
    _APPLY_CACHE[model, train] = jax.jit(functools.partial(model.apply, train=train))
  rngs = None if rng is None else {'dropout': rng}
  return _APPLY_CACHE[model, train](variables, x, t, rngs=rngs)


def _perturbed(params, seed, scale=0.05):
  """Adds noise to every parameter so the zero-init layers are not ~0 and
  outputs depend on every part of the network (NumPy, so nothing compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32)), params
  )


@pytest.fixture(scope='module')
def tiny():
  """A tiny fp32 U-Net at 16x16: fresh variables and perturbed parameters."""
  model = UNet(**TINY, dropout=0.1)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([3, 700], jnp.int32)
  variables = _init(model, x, t)
  params = _perturbed(variables['params'], seed=2)
  return dict(model=model, variables=variables, params=params, x=x, t=t)


@pytest.mark.parametrize(
  'ch_mult,size,in_ch,out_ch',
  [
    ((1, 2), 8, 1, 1),
    ((1, 2), 16, 3, 6),
    ((1, 2), 32, 1, 3),
    ((1, 2, 2), 8, 3, 3),
    ((1, 2, 2), 16, 1, 6),
    ((1, 2, 2), 32, 3, 6),
    ((1, 2, 2), 32, 1, 1),
    ((1, 2, 2, 2), 16, 3, 3),
  ],
)
def test_output_shape_and_dtype(ch_mult, size, in_ch, out_ch):
  model = UNet(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(8,), out_ch=out_ch)
  x = jax.ShapeDtypeStruct((2, size, size, in_ch), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out, _ = jax.eval_shape(
    lambda x, t: model.init_with_output(jax.random.key(0), x, t, train=False), x, t
  )
  assert out.shape == (2, size, size, out_ch)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize(
  'kwargs,size,expected',
  [
    (dict(), 32, 35_746_307),  # CIFAR-10, eps output
    (dict(out_ch=6), 32, 35_749_766),  # CIFAR-10, learned variance
    (dict(ch_mult=(1, 1, 2, 2, 4, 4)), 256, 113_673_219),  # CelebA-HQ/LSUN
  ],
)
def test_exact_parameter_counts(kwargs, size, expected):
  assert _num_params(_init_shapes(UNet(**kwargs), size)) == expected


def test_attention_placed_at_given_resolution():
  # 32x32 with ch_mult (1, 2, 2): levels at 32, 16, 8; attention at 16 only
  # (and always in the middle), after every res block of that level.
  params = _init_shapes(
    UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,)), 32
  )['params']
  attn = sorted(k for k in params if 'attn' in k)
  assert attn == [
    'down_1_attn_0',
    'down_1_attn_1',
    'mid_attn_1',
    'up_1_attn_0',
    'up_1_attn_1',
    'up_1_attn_2',
  ]


def test_initialisation_scales(tiny):
  """Kernels follow variance scaling (fan_avg, uniform); the residual branch
  ends, attention output and final conv use scale 1e-10; biases are 0."""
  params = tiny['variables']['params']
  zero_layers = {'conv2', 'proj_out', 'conv_out'}
  checked_zero = checked_default = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [p.key for p in path]
    leaf = np.asarray(leaf)
    if names[-1] == 'bias':
      np.testing.assert_array_equal(leaf, 0.0)
    elif names[-1] == 'kernel':
      receptive = math.prod(leaf.shape[:-2])
      fan_avg = 0.5 * receptive * (leaf.shape[-2] + leaf.shape[-1])
      scale = 1e-10 if names[-2] in zero_layers else 1.0
      limit = math.sqrt(3.0 * scale / fan_avg)
      assert np.abs(leaf).max() <= limit
      # Uniform on [-limit, limit]: the largest draw is close to the limit.
      assert np.abs(leaf).max() > 0.5 * limit
      if scale == 1.0:
        checked_default += 1
      else:
        checked_zero += 1
    elif names[-1] == 'scale':  # GroupNorm
      np.testing.assert_array_equal(leaf, 1.0)
  # 8 res blocks (2 down, 2 middle, 4 up: conv2), 4 attention blocks
  # (proj_out: 1 down, 1 middle, 2 up) and conv_out.
  assert checked_zero == 8 + 4 + 1
  assert checked_default > checked_zero


def test_fresh_model_outputs_near_zero(tiny):
  # The zero init is scale 1e-10, not exactly 0: with unit-scale activations
  # the output is O(1e-5) (the original TF model behaves the same), far
  # below the O(1) targets the network learns.
  x = 3.0 * tiny['x']
  out = _apply(tiny['model'], tiny['variables'], x, jnp.array([0, 999], jnp.int32))
  assert np.abs(x).max() > 3.0
  assert np.abs(out).max() < 1e-4
  # The perturbed model is far from zero, so the bound above is not vacuous.
  out = _apply(tiny['model'], {'params': tiny['params']}, x, tiny['t'])
  assert np.abs(out).max() > 1e-2


def test_output_depends_on_timestep(tiny):
  model, params, x = tiny['model'], tiny['params'], tiny['x']
  a = _apply(model, {'params': params}, x, jnp.array([0, 0]))
  b = _apply(model, {'params': params}, x, jnp.array([500, 500]))
  assert np.abs(a - b).max() > 1e-3


def test_dropout_active_only_in_training(tiny):
  model, params, x, t = (tiny[k] for k in ('model', 'params', 'x', 't'))
  v = {'params': params}
  eval1 = _apply(model, v, x, t)
  eval2 = _apply(model, v, x, t)
  np.testing.assert_array_equal(eval1, eval2)
  # Evaluation equals a dropout-free model in training mode.
  no_drop = _apply(UNet(**TINY, dropout=0.0), v, x, t, train=True)
  np.testing.assert_allclose(eval1, no_drop, atol=1e-6)

  def train(seed):
    return _apply(model, v, x, t, train=True, rng=jax.random.key(seed))

  np.testing.assert_array_equal(train(0), train(0))
  assert np.abs(train(0) - train(1)).max() > 1e-3
  assert np.abs(train(0) - eval1).max() > 1e-3


def test_bf16_compute_gives_close_float32_output(tiny):
  model, params, x, t = (tiny[k] for k in ('model', 'params', 'x', 't'))
  fp32 = _apply(model, {'params': params}, x, t)
  bf16_model = UNet(**TINY, dropout=0.1, dtype=jnp.bfloat16)
  bf16 = _apply(bf16_model, {'params': params}, x, t)
  assert bf16.dtype == jnp.float32
  rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
  assert 0.0 < rel < 0.05


@pytest.mark.parametrize(
  'kwargs,shape,match',
  [
    (dict(ch_mult=(1, 2, 2)), (1, 10, 10, 3), 'divisible by 4'),
    (dict(ch_mult=(1, 2)), (1, 16, 15, 3), 'divisible by 2'),
    (dict(ch_mult=(1, 2)), (1, 16, 8, 3), 'square'),
    (dict(ch=48, ch_mult=(1, 2)), (1, 16, 16, 3), 'GroupNorm groups'),
    (dict(ch_mult=(1, 2)), (16, 16, 3), 'NHWC'),
  ],
)
def test_bad_inputs_raise(kwargs, shape, match):
  model = UNet(**{**TINY, **kwargs})
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)


def test_timestep_shape_must_match_batch():
  model = UNet(**TINY)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((3,), jnp.int32)
  with pytest.raises(ValueError, match=r't must have shape'):
    jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)


def test_non_square_allowed_without_attention():
  model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
  x = jax.ShapeDtypeStruct((1, 16, 8, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  out, _ = jax.eval_shape(
    lambda x, t: model.init_with_output(jax.random.key(0), x, t, train=False), x, t
  )
  assert out.shape == (1, 16, 8, 3)


def test_timestep_embedding_closed_form():
  t = jnp.array([0, 1, 250, 999])
  emb = np.asarray(timestep_embedding(t, 128))
  assert emb.shape == (4, 128)
  tf = np.array([0.0, 1.0, 250.0, 999.0])
  # half = 64: freq_0 = 1, freq_63 = 1e-4, sines first then cosines.
  np.testing.assert_allclose(emb[:, 0], np.sin(tf), atol=2e-5)
  np.testing.assert_allclose(emb[:, 64], np.cos(tf), atol=2e-5)
  np.testing.assert_allclose(emb[:, 63], np.sin(tf * 1e-4), atol=1e-6)
  np.testing.assert_allclose(emb[:, 127], np.cos(tf * 1e-4), atol=1e-6)
  freq_1 = math.exp(-math.log(10000.0) / 63)
  np.testing.assert_allclose(emb[:, 1], np.sin(tf * freq_1), atol=5e-5)


def test_upsample_nearest2x_matches_repeat():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  expected = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  np.testing.assert_array_equal(upsample_nearest2x(jnp.asarray(x)), expected)


def test_resampling_without_conv_has_no_resampling_params():
  model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resamp_with_conv=False)
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  out, variables = jax.eval_shape(
    lambda x, t: model.init_with_output(jax.random.key(0), x, t, train=False), x, t
  )
  assert out.shape == (1, 8, 8, 3)
  assert not [k for k in variables['params'] if 'sample' in k]
  with_conv = _init_shapes(
    UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), 8, 1
  )['params']
  assert sorted(k for k in with_conv if 'sample' in k) == ['down_0_downsample', 'up_1_upsample']


def _model_config(**overrides):
  cfg = ml_collections.ConfigDict(
    dict(
      ch=64,
      ch_mult=(1, 2, 2),
      num_res_blocks=3,
      attn_resolutions=(8, 4),
      dropout=0.2,
      resamp_with_conv=False,
      dtype='bfloat16',
    )
  )
  cfg.update(overrides)
  return cfg


def test_unet_from_config():
  model = unet_from_config(_model_config(), out_channels=6)
  assert model == UNet(
    ch=64,
    ch_mult=(1, 2, 2),
    num_res_blocks=3,
    attn_resolutions=(8, 4),
    dropout=0.2,
    out_ch=6,
    resamp_with_conv=False,
    dtype=jnp.bfloat16,
  )
  assert unet_from_config(_model_config(dtype='float32'), 3).dtype == jnp.float32


def test_unet_from_config_rejects_unknown_dtype():
  with pytest.raises(ValueError, match=r'float16.*valid choices.*bfloat16.*float32'):
    unet_from_config(_model_config(dtype='float16'), 3)


def test_class_conditional_unet_adds_only_a_class_embedding(tiny):
  model = UNet(**TINY, dropout=0.1, num_classes=4)
  x, t = tiny['x'], tiny['t']
  y = jnp.array([1, 4], jnp.int32)  # 4: the null label.
  init = jax.jit(lambda x, t, y: model.init(jax.random.key(0), x, t, y, train=False))
  params = dict(init(x, t, y)['params'])
  # One (num_classes + 1) x 4ch table more; every other parameter as the unconditional model's.
  embedding = params.pop('class_embed')['embedding']
  assert embedding.shape == (5, 4 * TINY['ch'])
  jax.tree.map(np.testing.assert_array_equal, params, dict(tiny['variables']['params']))

  # The table is added to the timestep embedding: with it zero, the unconditional function.
  apply = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y, train=False))
  zeroed = dict(tiny['params'], class_embed={'embedding': jnp.zeros_like(embedding)})
  np.testing.assert_allclose(
    apply(zeroed, x, t, y), _apply(tiny['model'], {'params': tiny['params']}, x, t), atol=1e-6
  )
  perturbed = dict(tiny['params'], class_embed={'embedding': embedding})
  a, b = apply(perturbed, x, t, y), apply(perturbed, x, t, jnp.array([2, 4], jnp.int32))
  assert np.abs(a[0] - b[0]).max() > 1e-3  # Another class, another output...
  np.testing.assert_array_equal(a[1], b[1])  # ...and the same one where the label is the same.


@pytest.mark.parametrize(
  'num_classes, y, match',
  [
    (4, None, r'class-conditional \(num_classes=4\): pass labels y'),
    (0, jnp.array([1, 2]), r'unconditional \(num_classes=0\); it takes no labels'),
    (4, jnp.array([1, 2, 3]), r'y must be integer labels of shape \[B\] = \(2,\)'),
    (4, jnp.array([1.0, 2.0]), r'y must be integer labels'),
  ],
)
def test_labels_must_fit_the_model(num_classes, y, match):
  model = UNet(**TINY, num_classes=num_classes)
  x, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y, train=False))


def test_unet_from_config_reads_num_classes():
  assert unet_from_config(_model_config(), 3).num_classes == 0  # Configs without the field.
  assert unet_from_config(_model_config(num_classes=10), 3).num_classes == 10
