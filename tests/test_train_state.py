"""The fused optimizer + EMA update against optax's chain (make_optimizer)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ddpm_jax import train_state as ts


def _optim(grad_clip, warmup_steps=3, ema_warmup=False):
  return ml_collections.ConfigDict(dict(
      learning_rate=2e-4, warmup_steps=warmup_steps, beta1=0.9, beta2=0.999, eps=1e-8,
      grad_clip=grad_clip, ema_decay=0.9, ema_warmup=ema_warmup))


def _state(optim):
  keys = jax.random.split(jax.random.key(0), 3)
  params = {'conv': {'kernel': jax.random.normal(keys[0], (3, 3, 4, 8)),
                     'bias': jnp.zeros((8,))},
            'dense': {'kernel': 0.1 * jax.random.normal(keys[1], (8, 5))}}
  return ts.TrainState.create(
      apply_fn=None, params=params, tx=ts.make_optimizer(optim),
      ema_params=jax.tree.map(jnp.copy, params), nonfinite_in_a_row=jnp.zeros((), jnp.int32))


def _optax_step(state, grads, optim):
  updated = state.apply_gradients(grads=grads)
  decay = ts.ema_decay_at(state.step, optim)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params,
                     updated.params)
  return updated.replace(ema_params=ema)


def _fused_step(state, grads, optim):
  params, opt_state, ema = ts.adam_ema_update(state, grads, optax.tree.norm(grads), optim)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema)


@pytest.mark.parametrize('grad_clip, grad_scale, ema_warmup', [
    (1.0, 10.0, False),   # clipping active on every step
    (1.0, 1e-3, True),    # clipping inactive; EMA warm-up
    (0.0, 1.0, False),    # no clipping: adam alone in the chain
])
def test_fused_update_equals_optax_chain_and_ema(grad_clip, grad_scale, ema_warmup):
  optim = _optim(grad_clip, ema_warmup=ema_warmup)
  reference = fused = _state(optim)
  optax_step = jax.jit(lambda s, g: _optax_step(s, g, optim))
  fused_step = jax.jit(lambda s, g: _fused_step(s, g, optim))
  # Through the learning-rate warm-up (3 steps) and beyond; bias corrections
  # change every step.
  for step in range(6):
    keys = jax.random.split(jax.random.key(step + 1), 3)
    grads = jax.tree.map(lambda p, k: grad_scale * jax.random.normal(k, p.shape),
                         reference.params, {'conv': {'kernel': keys[0], 'bias': keys[1]},
                                            'dense': {'kernel': keys[2]}})
    reference, fused = optax_step(reference, grads), fused_step(fused, grads)
    assert jax.tree.structure(fused.opt_state) == jax.tree.structure(reference.opt_state)
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(reference)):
      assert got.dtype == want.dtype
      if jnp.issubdtype(want.dtype, jnp.integer):
        np.testing.assert_array_equal(got, want)   # step and the optax counts
      else:
        np.testing.assert_allclose(got, want, rtol=0,
                                   atol=2e-6 * max(float(np.abs(want).max()), 1e-30))
  # The parameters did move (a no-op update would also match a no-op).
  assert float(jnp.abs(fused.params['dense']['kernel'] - _state(optim).params['dense']['kernel'])
               .max()) > 1e-4
