"""The train state, the optimizer and one pure training step.

`TrainState` is flax's, extended with EMA parameters and a count of
consecutive skipped (non-finite) steps. `train_step` is a pure function of
(state, batch, rng); the loop in `ddpm_jax/train.py` jits it over the mesh.
"""

import functools
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import losses as losses_lib

Array = jax.Array


class TrainState(train_state.TrainState):
  """Flax's TrainState plus EMA parameters and a non-finite step counter.

  Attributes:
    ema_params: exponential moving average of `params`; used for sampling
      and evaluation, as in the paper.
    nonfinite_in_a_row: how many steps in a row had a non-finite loss or
      gradient (and were therefore skipped); reset by a finite step.
  """
  ema_params: Any
  nonfinite_in_a_row: Array


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with linear warm-up to a constant rate and global-norm clipping.

  This transformation defines the optimizer state and its initialisation;
  `train_step` applies the same update (with the EMA) through
  `adam_ema_update`, which tests check against this chain.
  """
  schedule = learning_rate_schedule(optim)
  adam = optax.adam(schedule, b1=optim.beta1, b2=optim.beta2, eps=optim.eps)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam)
  return adam


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * min(step / warmup_steps, 1), the original's warm-up."""
  if optim.warmup_steps <= 0:
    return optax.constant_schedule(optim.learning_rate)
  return optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)


def ema_decay_at(step: Array, optim: ml_collections.ConfigDict) -> Array:
  """The EMA decay used after `step` updates (with optional warm-up)."""
  decay = jnp.asarray(optim.ema_decay, jnp.float32)
  if optim.ema_warmup:
    step = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


# A jit of its own: traced once per distinct parameter shape (not once for
# each of the U-Net's 328 leaves), which cuts the training step's tracing
# time; XLA inlines it, so the compiled program is the same.
@functools.partial(jax.jit, static_argnames=('b1', 'b2', 'eps'))
def _adam_ema_leaf_update(param, grad, mu, nu, ema, scalars, *, b1, b2, eps):
  """One parameter's clipped Adam step and EMA; `scalars` are the per-step factors."""
  clip_scale, inv_correction_1, inv_correction_2, step_size, decay = scalars
  grad = grad * clip_scale.astype(grad.dtype)
  mu = (1 - b1) * grad + b1 * mu
  nu = (1 - b2) * (grad * grad) + b2 * nu
  direction = mu * inv_correction_1 / (jnp.sqrt(nu * inv_correction_2) + eps)
  param = param + step_size * direction
  return param, mu, nu, decay * ema + (1.0 - decay) * param


def adam_ema_update(state: 'TrainState', grads: Any, grad_norm: Array,
                    optim: ml_collections.ConfigDict) -> Tuple[Any, Any, Any]:
  """`make_optimizer`'s update, then the EMA, in one pass over each parameter.

  Returns (params, opt_state, ema_params) equal, up to float rounding, to
  `state.apply_gradients(grads=grads)` followed by the EMA of the new
  parameters (tests/test_train_state.py compares them), with the same optax
  state structure, so checkpoints do not depend on which one ran. optax
  divides every element three times (clipping, both bias corrections); here
  the clip factor and the bias corrections are per-step scalar reciprocals,
  leaving one division per element: on the CIFAR-10 U-Net (35.7M
  parameters, 2-core CPU) 101 -> 60 ms per step. (XLA already fused optax's
  chain into one pass per parameter; the same pass with optax's divisions
  took as long as optax.)

  Args:
    state: the current state (its opt_state made by `make_optimizer(optim)`).
    grads: gradient of the loss, same structure as `state.params`.
    grad_norm: global L2 norm of `grads` (computed once by the caller).
    optim: the optimizer config.
  """
  if optim.grad_clip > 0:
    clip_state, (adam, schedule_state) = state.opt_state
    clip_scale = jnp.where(grad_norm < optim.grad_clip, 1.0, optim.grad_clip / grad_norm)
  else:
    adam, schedule_state = state.opt_state
    clip_scale = jnp.ones((), jnp.float32)
  count = optax.safe_increment(adam.count)
  # As optax: decay ** count in float32, then one reciprocal per step.
  inv_correction_1 = 1.0 / (1.0 - jnp.float32(optim.beta1) ** count)
  inv_correction_2 = 1.0 / (1.0 - jnp.float32(optim.beta2) ** count)
  step_size = -learning_rate_schedule(optim)(schedule_state.count)
  decay = ema_decay_at(state.step, optim)
  scalars = (clip_scale, inv_correction_1, inv_correction_2, step_size, decay)
  per_leaf = jax.tree.map(
      lambda *leaves: _adam_ema_leaf_update(*leaves, scalars, b1=optim.beta1, b2=optim.beta2,
                                            eps=optim.eps),
      state.params, grads, adam.mu, adam.nu, state.ema_params)
  params, mu, nu, ema = jax.tree.transpose(
      jax.tree.structure(state.params), jax.tree.structure((0, 0, 0, 0)), per_leaf)
  adam = adam._replace(count=count, mu=mu, nu=nu)
  schedule_state = schedule_state._replace(count=optax.safe_increment(schedule_state.count))
  opt_state = ((clip_state, (adam, schedule_state)) if optim.grad_clip > 0
               else (adam, schedule_state))
  return params, opt_state, ema


def create_train_state(model: nn.Module, config: ml_collections.ConfigDict, rng: Array,
                       image_shape: Tuple[int, int, int]) -> TrainState:
  """Initialises parameters, optimizer state and EMA (a copy of the parameters).

  Args:
    model: the denoiser, called as `model.apply(variables, x, t, train=...)`.
    config: the experiment config (uses `optim`).
    rng: PRNG key for the initialisation.
    image_shape: (H, W, C) of the model's input.

  Returns:
    A fresh `TrainState` at step 0.
  """
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  params = model.init({'params': rng}, x, t, train=False)['params']
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=make_optimizer(config.optim),
      # A copy, not an alias: the loop donates the state, and a buffer donated
      # twice is an error.
      ema_params=jax.tree.map(jnp.copy, params), nonfinite_in_a_row=jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: Dict[str, Array], rng: Array, *,
               diffusion: diffusion_lib.Diffusion,
               config: ml_collections.ConfigDict) -> Tuple[TrainState, Dict[str, Array]]:
  """One optimisation step on a batch: returns the new state and its metrics.

  A step whose loss or gradient is non-finite changes nothing but the step
  counter (which keeps data and randomness moving on) and the non-finite
  counter: parameters, optimizer state and EMA stay as they were.

  Args:
    state: the current state.
    batch: {'image': float [B, H, W, C] in [-1, 1]}.
    rng: this step's key (the loop passes fold_in(seed key, step)).
    diffusion: the process.
    config: the experiment config (uses `diffusion`, `optim`).

  Returns:
    (new state, metrics) with scalar metrics 'loss', 'grad_norm',
    'learning_rate', 'finite' (1.0 if the step was applied).
  """
  images = batch['image']
  t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (images.shape[0],), 0, diffusion.num_timesteps)
  noise = jax.random.normal(noise_rng, images.shape, images.dtype)
  dc = config.diffusion

  def loss_fn(params):
    def model_fn(x_t, timesteps):
      return state.apply_fn({'params': params}, x_t, timesteps, train=True,
                            rngs={'dropout': dropout_rng})
    losses = losses_lib.training_losses(
        diffusion, model_fn, images, t, noise, loss_type=dc.loss_type,
        model_mean_type=dc.model_mean_type, model_var_type=dc.model_var_type,
        vlb_weight=dc.vlb_weight,
        min_snr_gamma=dc.min_snr_gamma if dc.min_snr_gamma > 0 else None)
    return jnp.mean(losses)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.tree.norm(grads)
  # A NaN or Inf anywhere in the gradient makes its norm non-finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply_update():
    return adam_ema_update(state, grads, grad_norm, config.optim)

  # lax.cond rather than a per-leaf jnp.where: XLA would copy the `finite`
  # computation into every leaf's fusion, which made compiling very slow.
  params, opt_state, ema_params = jax.lax.cond(
      finite, apply_update, lambda: (state.params, state.opt_state, state.ema_params))
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1))
  metrics = dict(loss=loss, grad_norm=grad_norm,
                 learning_rate=learning_rate_schedule(config.optim)(state.step),
                 finite=finite.astype(jnp.float32))
  return new_state, metrics


def train_steps(state: TrainState, batches: Dict[str, Array], seed_key: Array, *,
                diffusion: diffusion_lib.Diffusion,
                config: ml_collections.ConfigDict) -> Tuple[TrainState, Dict[str, Array]]:
  """K steps in one call, over a stack of K batches.

  Step s uses the key fold_in(seed_key, s), so a run's randomness depends
  only on the seed and the step, not on K or on where it was resumed.

  The K steps are unrolled at trace time rather than run by `lax.scan`:
  XLA:CPU ran a training step inside a while loop about 100x slower, and
  compiled it 7x slower, than the same step in straight-line code (measured
  on this project's CPU machines; a scanned forward pass is not affected).
  K is small, so the unrolled program stays small.

  Args:
    state: the current state.
    batches: {'image': [K, B, H, W, C]}.
    seed_key: the run's base key.
    diffusion, config: as in `train_step`.

  Returns:
    (new state, metrics) with each metric stacked to shape [K].
  """
  num_steps = batches['image'].shape[0]
  all_metrics = []
  for i in range(num_steps):
    batch = jax.tree.map(lambda x, i=i: x[i], batches)
    state, metrics = train_step(state, batch, jax.random.fold_in(seed_key, state.step),
                                diffusion=diffusion, config=config)
    all_metrics.append(metrics)
  return state, jax.tree.map(lambda *xs: jnp.stack(xs), *all_metrics)
