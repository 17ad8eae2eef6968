"""The layer sets: one parameter tree, one function, chosen by name or platform."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax.models import UNet, layers, unet_from_config

# A tiny model that still has every kind of layer: 3x3 and strided convs,
# Dense (timestep, shortcut, attention), norms, dropout, upsampling conv.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)


def _inputs():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  return x, jnp.array([3, 700], jnp.int32)


@pytest.fixture(scope='module')
def initialised():
  """Each set's initial variables of the tiny model (real, jitted initialisation)."""
  x, t = _inputs()
  init = lambda m: jax.jit(lambda x, t: m.init(jax.random.key(0), x, t, train=False))
  return {name: init(UNet(**TINY, layers=s))(x, t) for name, s in layers.LAYER_SETS.items()}


def test_layer_sets_share_the_parameter_tree_and_its_initialisation(initialised):
  x, t = _inputs()
  shapes = {
    name: jax.eval_shape(
      lambda x, t: UNet(**TINY, layers=s).init(jax.random.key(0), x, t, train=False), x, t
    )
    for name, s in layers.LAYER_SETS.items()
  }
  assert shapes['fast'] == shapes['reference']
  jax.tree.map(np.testing.assert_array_equal, initialised['fast'], initialised['reference'])


@pytest.mark.parametrize('train', [False, True])
def test_fast_layers_compute_the_reference_function(train, initialised):
  x, t = _inputs()
  variables = initialised['fast']
  # Perturbed, so the zero-init layers are not ~0 and every layer matters
  # (in NumPy, so nothing compiles).
  rng = np.random.default_rng(2)
  params = jax.tree.map(
    lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32), variables['params']
  )
  cotangent = jax.random.normal(jax.random.key(3), x.shape)

  def value_and_grads(layer_set):
    def loss(params, x):
      out = UNet(**TINY, layers=layer_set).apply(
        {'params': params}, x, t, train=train, rngs={'dropout': jax.random.key(4)}
      )
      return jnp.sum(out * cotangent), out

    grads = jax.value_and_grad(loss, (0, 1), has_aux=True)
    return jax.jit(grads)(params, x)

  (_, fast_out), fast_grads = value_and_grads(layers.FAST)
  (_, ref_out), ref_grads = value_and_grads(layers.REFERENCE)
  assert np.abs(ref_out).max() > 0.5
  np.testing.assert_allclose(fast_out, ref_out, rtol=0, atol=1e-5 * float(np.abs(ref_out).max()))
  # Relative to each leaf's scale, but not below the whole gradient's: a few
  # leaves (attention's key bias, to which softmax is invariant) have a zero
  # gradient, computed as rounding noise in both sets.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads)):
    leaf_scale = max(float(np.abs(want).max()), 1e-3 * scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * leaf_scale)


def test_resolve_names_every_choice_and_rejects_others():
  assert layers.resolve('reference') is layers.REFERENCE
  assert layers.resolve('fast') is layers.FAST
  assert layers.resolve('auto') is layers.for_platform()
  assert set(layers.LAYER_CHOICES) == {'auto'} | set(layers.LAYER_SETS)
  with pytest.raises(ValueError, match=r"'bogus'.*valid choices.*auto.*reference.*fast"):
    layers.resolve('bogus')


def test_auto_runs_the_fast_layers_where_they_were_measured():
  for platform in ('cpu', 'gpu', 'tpu'):
    assert layers.for_platform(platform) is layers.FAST
  assert layers.for_platform('something_new') is layers.REFERENCE


def test_unet_from_config_reads_the_layer_set():
  cfg = ml_collections.ConfigDict(
    dict(
      ch=32,
      ch_mult=(1, 2),
      num_res_blocks=1,
      attn_resolutions=(8,),
      dropout=0.1,
      resamp_with_conv=True,
      dtype='float32',
    )
  )
  # Configs written before the field existed mean 'auto': picked when run.
  assert unet_from_config(cfg, 3).layers is None
  cfg.layers = 'auto'
  assert unet_from_config(cfg, 3) == UNet(**TINY)
  cfg.layers = 'reference'
  assert unet_from_config(cfg, 3).layers is layers.REFERENCE
  cfg.layers = 'fast'
  assert unet_from_config(cfg, 3).layers is layers.FAST
  cfg.layers = 'bogus'
  with pytest.raises(ValueError, match='valid choices'):
    unet_from_config(cfg, 3)
