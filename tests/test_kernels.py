"""Each CPU kernel computes its plain flax layer's function: values and gradients, jitted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from ddpm_jax.kernels import dense as dense_kernel
from ddpm_jax.kernels.group_norm import GroupNorm
from ddpm_jax.kernels.upsample_conv import upsample2x_conv3x3
from ddpm_jax.models import layers
from ddpm_jax.models.layers import upsample_nearest2x


def _grads(f, variables, x, cotangent):
  """Jitted gradient of sum(f(v, x) * cotangent) with respect to (v, x)."""
  loss = lambda v, x: jnp.sum(f(v, x).astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, (0, 1)))(variables, x)


@pytest.mark.parametrize(
  'shape, groups', [((2, 8, 8, 64), 32), ((3, 4, 5, 96), 32), ((2, 16, 256), 32), ((1, 4, 4, 8), 4)]
)
def test_group_norm_equals_flax_group_norm(shape, groups):
  # Off-centre, scaled activations and non-trivial affine parameters.
  keys = jax.random.split(jax.random.key(0), 4)
  x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
  reference = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  variables = {
    'params': {
      'scale': 1.0 + jax.random.normal(keys[2], (shape[-1],)),
      'bias': jax.random.normal(keys[3], (shape[-1],)),
    }
  }
  ours = GroupNorm(num_groups=groups, epsilon=1e-6)
  assert jax.tree.map(jnp.shape, ours.init(keys[1], x)) == jax.tree.map(jnp.shape, variables)
  want = jax.jit(reference.apply)(variables, x)
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, x), want, rtol=0, atol=2e-5)
  # The gradients too (the training step differentiates through it).
  cotangent = jax.random.normal(keys[0], shape)
  for got, expected in zip(
    jax.tree.leaves(_grads(ours.apply, variables, x, cotangent)),
    jax.tree.leaves(_grads(reference.apply, variables, x, cotangent)),
  ):
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize('swish', [False, True])
def test_group_norm_with_swish_equals_flax_and_stores_only_its_input(swish, capsys):
  keys = jax.random.split(jax.random.key(1), 3)
  shape = (2, 8, 8, 64)
  x = 2.0 * jax.random.normal(keys[0], shape) - 0.5
  variables = {
    'params': {
      'scale': 1.0 + jax.random.normal(keys[1], (64,)),
      'bias': jax.random.normal(keys[2], (64,)),
    }
  }
  activation = nn.swish if swish else (lambda y: y)
  reference = lambda v, x: activation(nn.GroupNorm(num_groups=32, epsilon=1e-6).apply(v, x))
  ours = lambda v, x: layers.FAST.norm(swish=swish).apply(v, x)
  np.testing.assert_allclose(
    jax.jit(ours)(variables, x), jax.jit(reference)(variables, x), rtol=0, atol=2e-5
  )
  cotangent = jax.random.normal(keys[0], shape)
  for got, expected in zip(
    jax.tree.leaves(_grads(ours, variables, x, cotangent)),
    jax.tree.leaves(_grads(reference, variables, x, cotangent)),
  ):
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))
  # The backward pass recomputes the normalised (and swished) tensor: the
  # only full-size value kept from the forward pass is the input itself.
  capsys.readouterr()
  print_saved_residuals(ours, variables, x)
  full_size = [
    line for line in capsys.readouterr().out.splitlines() if line.startswith('f32[2,8,8,64]')
  ]
  assert full_size == ['f32[2,8,8,64] from the argument x'], full_size


def test_group_norm_bf16_output_with_float32_statistics():
  x = 100.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
  ours = GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.bfloat16)
  variables = ours.init(jax.random.key(1), x)
  y = jax.jit(ours.apply)(variables, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  # A large mean with unit spread: bf16 statistics would lose the spread.
  np.testing.assert_allclose(np.asarray(y, np.float32).std(), 1.0, atol=0.05)


@pytest.mark.parametrize('shape', [(4, 16), (2, 8, 24), (2, 4, 4, 16)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_layers_gradient_equals_autodiff(shape, dtype):
  # The fast Dense layer's dot_general has a hand-written backward pass
  # (kernels.dense.matmul_last_axis): values bitwise nn.Dense's, gradients
  # to the dtype's precision.
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], shape)
  plain = nn.Dense(8, dtype=dtype)
  ours = layers.FAST.dense(8, dtype=dtype)
  variables = plain.init(keys[1], x)
  variables = {
    'params': {'kernel': variables['params']['kernel'], 'bias': jax.random.normal(keys[2], (8,))}
  }
  assert ours.dot_general is dense_kernel.dot_general
  cotangent = jax.random.normal(keys[0], shape[:-1] + (8,))
  np.testing.assert_array_equal(
    jax.jit(ours.apply)(variables, x), jax.jit(plain.apply)(variables, x)
  )
  got = _grads(ours.apply, variables, x, cotangent)
  want = _grads(plain.apply, variables, x, cotangent)
  assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=tol * float(np.abs(w).max()))


@pytest.mark.parametrize('shape', [(2, 4, 4, 8), (1, 7, 5, 16), (3, 1, 2, 4)])
def test_upsample_conv_equals_conv_of_the_upsampled_image(shape):
  keys = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], (3, 3, shape[-1], 6))

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
      upsample_nearest2x(x),
      kernel,
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST,
    )

  want = jax.jit(reference)(x, kernel)
  got = jax.jit(upsample2x_conv3x3)(x, kernel)
  assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], 6)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
  # Its gradients too: the training step differentiates through it.
  cotangent = jax.random.normal(keys[2], want.shape)
  grad = lambda f: jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * cotangent), (0, 1)))(x, kernel)
  for g, expected in zip(grad(upsample2x_conv3x3), grad(reference)):
    np.testing.assert_allclose(g, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))
  # bfloat16 compute: output dtype, and still the same function (to bf16 precision).
  low = jax.jit(upsample2x_conv3x3, static_argnames='dtype')(x, kernel, dtype=jnp.bfloat16)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(low, np.float32), want, rtol=0, atol=0.03 * float(np.abs(want).max())
  )
