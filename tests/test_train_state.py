"""The train step's update (update_state, kernels.adam) against optax's chain and the EMA written out."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ddpm_jax import train_state as ts
from ddpm_jax.kernels import adam as adam_kernel


def _optim(grad_clip, warmup_steps=3, ema_warmup=False):
  return ml_collections.ConfigDict(
    dict(
      learning_rate=2e-4,
      warmup_steps=warmup_steps,
      decay_steps=0,
      final_lr_fraction=0.0,
      beta1=0.9,
      beta2=0.999,
      eps=1e-8,
      grad_clip=grad_clip,
      ema_decay=0.9,
      ema_warmup=ema_warmup,
    )
  )


def _state(optim):
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    'conv': {'kernel': jax.random.normal(keys[0], (3, 3, 4, 8)), 'bias': jnp.zeros((8,))},
    'dense': {'kernel': 0.1 * jax.random.normal(keys[1], (8, 5))},
  }
  return ts.TrainState.create(
    apply_fn=None,
    params=params,
    tx=ts.make_optimizer(optim),
    ema_params=jax.tree.map(jnp.copy, params),
    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
  )


def _reference_step(state, grads, optim):
  """optax's chain (clipping, then Adam with the warm-up schedule), then the EMA."""
  adam = optax.adam(
    optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps),
    b1=optim.beta1,
    b2=optim.beta2,
    eps=optim.eps,
  )
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam) if optim.grad_clip else adam
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ts.ema_decay_at(state.step, optim)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def _grads(step, state, scale):
  keys = jax.random.split(jax.random.key(step + 1), 3)
  return jax.tree.map(
    lambda p, k: scale * jax.random.normal(k, p.shape),
    state.params,
    {'conv': {'kernel': keys[0], 'bias': keys[1]}, 'dense': {'kernel': keys[2]}},
  )


@pytest.mark.parametrize(
  'grad_clip, grad_scale, ema_warmup',
  [
    (1.0, 10.0, False),  # clipping active on every step
    (1.0, 1e-3, True),  # clipping inactive; EMA warm-up
    (0.0, 1.0, False),  # no clipping: adam alone in the chain
  ],
)
def test_update_equals_optax_chain_and_ema(grad_clip, grad_scale, ema_warmup):
  optim = _optim(grad_clip, ema_warmup=ema_warmup)
  reference = ours = _state(optim)
  reference_step = jax.jit(lambda s, g: _reference_step(s, g, optim))
  our_step = jax.jit(lambda s, g: ts.update_state(s, g, optax.tree.norm(g), jnp.array(True), optim))
  # Through the learning-rate warm-up (3 steps) and beyond; bias corrections
  # change every step.
  for step in range(6):
    grads = _grads(step, reference, grad_scale)
    reference, ours = reference_step(reference, grads), our_step(ours, grads)
    assert jax.tree.structure(ours.opt_state) == jax.tree.structure(reference.opt_state)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
      assert got.dtype == want.dtype
      if jnp.issubdtype(want.dtype, jnp.integer):
        np.testing.assert_array_equal(got, want)  # step, the optax counts, nonfinite_in_a_row
      else:
        np.testing.assert_allclose(
          got, want, rtol=0, atol=2e-6 * max(float(np.abs(want).max()), 1e-30)
        )
  # The parameters did move (a no-op update would also match a no-op).
  assert (
    float(jnp.abs(ours.params['dense']['kernel'] - _state(optim).params['dense']['kernel']).max())
    > 1e-4
  )


def test_nonfinite_update_changes_only_the_counters():
  optim = _optim(1.0)
  state = _state(optim)
  skipped = jax.jit(
    lambda s, g: ts.update_state(s, g, jnp.float32(jnp.nan), jnp.array(False), optim)
  )(state, _grads(0, state, 1.0))
  assert int(skipped.step) == 1 and int(skipped.nonfinite_in_a_row) == 1
  for name in ('params', 'opt_state', 'ema_params'):
    jax.tree.map(np.testing.assert_array_equal, getattr(skipped, name), getattr(state, name))


@pytest.mark.parametrize('grad_clip', [1.0, 0.0])
def test_optimizer_has_optax_chains_state_and_computes_a_missing_norm(grad_clip):
  # Checkpoints written with either optimizer restore into the other.
  optim = _optim(grad_clip)
  params = _state(optim).params
  ours = ts.make_optimizer(optim)
  chain = adam_kernel.reference(
    ts.learning_rate_schedule(optim),
    b1=optim.beta1,
    b2=optim.beta2,
    eps=optim.eps,
    max_norm=optim.grad_clip,
  )
  assert jax.tree.structure(ours.init(params)) == jax.tree.structure(chain.init(params))
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
  state = ours.init(params)
  given = ours.update(grads, state, params, grad_norm=optax.tree.norm(grads))
  jax.tree.map(np.testing.assert_array_equal, given, ours.update(grads, state, params))


@pytest.mark.parametrize('warmup_steps', [0, 10])
def test_learning_rate_warms_up_then_follows_half_a_cosine_to_its_floor(warmup_steps):
  optim = _optim(1.0, warmup_steps=warmup_steps)
  optim.decay_steps, optim.final_lr_fraction = 110, 0.1
  schedule = ts.learning_rate_schedule(optim)
  lr, floor = optim.learning_rate, 0.1 * optim.learning_rate
  for step in range(0, 130, 7):
    if step < warmup_steps:
      expected = lr * step / warmup_steps
    else:
      progress = min((step - warmup_steps) / (110 - warmup_steps), 1.0)
      expected = floor + (lr - floor) * 0.5 * (1.0 + np.cos(np.pi * progress))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-12)
  assert float(schedule(10_000)) == pytest.approx(floor)


def test_without_decay_steps_the_rate_stays_at_its_peak():
  optim = _optim(1.0, warmup_steps=4)
  optim.decay_steps = 0
  schedule = ts.learning_rate_schedule(optim)
  assert [float(schedule(s)) for s in (0, 2, 4, 10_000)] == pytest.approx([0.0, 1e-4, 2e-4, 2e-4])
