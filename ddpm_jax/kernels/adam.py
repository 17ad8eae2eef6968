"""Adam after global-norm clipping, as an optax transformation with one division per element.

Replaces `optax.chain(optax.clip_by_global_norm(max_norm), optax.adam(...))`
in the training step: optax divides every element three times (clipping and
both bias corrections) and computes the gradient's norm again; here those
are per-step scalars, and the caller's norm is reused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def reference(
  learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float, max_norm: float
) -> optax.GradientTransformation:
  """The optax chain `clipped_adam` computes: clipping (if max_norm > 0), then Adam."""
  adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  return optax.chain(optax.clip_by_global_norm(max_norm), adam) if max_norm > 0 else adam


# A jit of its own, traced once per parameter shape rather than once per
# leaf; XLA inlines it, so the compiled program is the same.
@functools.partial(jax.jit, static_argnames=('b1', 'b2', 'eps'))
def _leaf_update(grad, mu, nu, scalars, *, b1, b2, eps):
  """One parameter's update and moments; `scalars` are the per-step factors."""
  clip_scale, inv_correction_1, inv_correction_2, step_size = scalars
  grad = grad * clip_scale.astype(grad.dtype)
  mu = (1 - b1) * grad + b1 * mu
  nu = (1 - b2) * (grad * grad) + b2 * nu
  return step_size * mu * inv_correction_1 / (jnp.sqrt(nu * inv_correction_2) + eps), mu, nu


def clipped_adam(
  learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float, max_norm: float
) -> optax.GradientTransformationExtraArgs:
  """`reference(...)` with the same state, and the same updates up to float rounding.

  Args:
    learning_rate: the schedule (a callable of the step count).
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.
    max_norm: clip the gradient to this global norm; 0 or less turns
      clipping off.

  Returns:
    A transformation whose `update(grads, state, params=None, grad_norm=None)`
    takes the gradient's global norm when the caller has it already.
  """
  init_fn = reference(learning_rate, b1=b1, b2=b2, eps=eps, max_norm=max_norm).init

  def update_fn(grads, state, params=None, *, grad_norm=None):
    del params
    if max_norm > 0:
      clip_state, (adam, schedule_state) = state
      grad_norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
      clip_scale = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    else:
      adam, schedule_state = state
      clip_scale = jnp.ones((), jnp.float32)
    count = optax.safe_increment(adam.count)
    # As optax: decay ** count in float32, then one reciprocal per step.
    scalars = (
      clip_scale,
      1.0 / (1.0 - jnp.float32(b1) ** count),
      1.0 / (1.0 - jnp.float32(b2) ** count),
      -learning_rate(schedule_state.count),
    )
    per_leaf = jax.tree.map(
      lambda g, m, v: _leaf_update(g, m, v, scalars, b1=b1, b2=b2, eps=eps), grads, adam.mu, adam.nu
    )
    updates, mu, nu = jax.tree.transpose(
      jax.tree.structure(grads), jax.tree.structure((0, 0, 0)), per_leaf
    )
    adam = adam._replace(count=count, mu=mu, nu=nu)
    schedule_state = schedule_state._replace(count=optax.safe_increment(schedule_state.count))
    state = (clip_state, (adam, schedule_state)) if max_norm > 0 else (adam, schedule_state)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
