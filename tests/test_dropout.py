"""The U-Net's dropout draws exactly flax's mask, on every path."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.models import dropout


def _flax_and_ours(rate, x, key):
  rngs = {"dropout": key}
  ours = dropout.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
  theirs = nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
  return ours, theirs


@pytest.mark.parametrize("shape", [(8, 32, 32, 128), (3, 5, 7), (1,), (2, 1, 4, 3)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_equals_flax_bit_for_bit(shape, rate):
  x = jax.random.normal(jax.random.key(1), shape)
  for key in (jax.random.key(7), jax.random.PRNGKey(7)):  # typed and raw keys
    ours, theirs = _flax_and_ours(rate, x, key)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
  # The mask really is random and has the asked-for rate.
  if np.prod(shape) > 10000:
    kept = float(jnp.mean(ours != 0))
    assert abs(kept - (1 - rate)) < 0.01


def test_dropout_equals_flax_in_bfloat16_and_under_jit():
  x = jax.random.normal(jax.random.key(2), (4, 6, 6, 8)).astype(jnp.bfloat16)
  apply = jax.jit(lambda module, x, key: module.apply({}, x, deterministic=False,
                                                       rngs={"dropout": key}),
                  static_argnums=0)
  ours = apply(dropout.Dropout(0.1), x, jax.random.key(3))
  theirs = apply(nn.Dropout(0.1), x, jax.random.key(3))
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(ours, theirs)


def test_dropout_edge_rates_and_deterministic():
  x = jnp.arange(12.0).reshape(3, 4)
  rngs = {"dropout": jax.random.key(0)}
  np.testing.assert_array_equal(dropout.Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs), x)
  np.testing.assert_array_equal(dropout.Dropout(0.5).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs),
                                jnp.zeros_like(x))


@pytest.mark.parametrize("p", [0.1, 0.9, 0.3333])
def test_bernoulli_equals_jax_random(p):
  key = jax.random.key(11)
  np.testing.assert_array_equal(dropout.bernoulli(key, p, (17, 33)),
                                jax.random.bernoulli(key, p, (17, 33)))


def test_threefry2x32_equals_jax_random_bits():
  key = jax.random.key(5)
  words = jax.random.key_data(key)
  low = jnp.arange(1000, dtype=jnp.uint32)
  high, low_bits = dropout.threefry2x32((words[0], words[1]), (jnp.zeros_like(low), low))
  np.testing.assert_array_equal(high ^ low_bits, jax.random.bits(key, (1000,)))


def test_other_key_implementations_fall_back_to_jax():
  key = jax.random.key(4, impl="rbg")
  np.testing.assert_array_equal(dropout.bernoulli(key, 0.9, (6, 7)),
                                jax.random.bernoulli(key, 0.9, (6, 7)))


def test_non_partitionable_threefry_falls_back_to_jax():
  key = jax.random.key(9)
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(dropout.bernoulli(key, 0.9, (6, 7)),
                                  jax.random.bernoulli(key, 0.9, (6, 7)))


def test_sharded_mask_equals_the_single_device_mask():
  devices = np.array(jax.devices()[:4])
  mesh = Mesh(devices, ("data",))
  sharding = NamedSharding(mesh, P("data"))
  x = jax.device_put(jax.random.normal(jax.random.key(1), (8, 4, 4, 16)), sharding)
  apply = lambda x, key: dropout.Dropout(0.1).apply({}, x, deterministic=False,
                                                    rngs={"dropout": key})
  sharded = jax.jit(apply, out_shardings=sharding)(x, jax.random.key(3))
  # Both compiled: eager x / 0.9 and XLA's compiled division round differently.
  single = jax.jit(apply)(np.asarray(x), jax.random.key(3))
  assert sharded.sharding == sharding
  np.testing.assert_array_equal(sharded, single)
