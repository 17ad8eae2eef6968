"""The train state, the optimizer and one pure training step.

`TrainState` is flax's, extended with EMA parameters and a count of
consecutive skipped (non-finite) steps. `train_step` is a pure function of
(state, batch, rng); the loop in `ddpm_jax/train.py` jits it over the mesh.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import edm as edm_lib
from ddpm_jax import losses as losses_lib
from ddpm_jax import streams
from ddpm_jax.kernels import adam as adam_kernel

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


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """Adam with `learning_rate_schedule` and global-norm clipping.

  `kernels.adam.clipped_adam`: optax's chain of `clip_by_global_norm` and
  `adam`, with that chain's state, so checkpoints restore with either.
  """
  return adam_kernel.clipped_adam(
    learning_rate_schedule(optim),
    b1=optim.beta1,
    b2=optim.beta2,
    eps=optim.eps,
    max_norm=optim.grad_clip,
  )


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * min(step / warmup_steps, 1), the original's warm-up, then an optional cosine decay.

  With `optim.decay_steps` > 0 the rate falls from `learning_rate` at the end of
  the warm-up to `final_lr_fraction * learning_rate` at step `decay_steps`
  (half a cosine), and stays there: short runs end on a settled model.
  """
  warmup_steps = max(optim.warmup_steps, 0)
  if warmup_steps:
    warmup = optax.linear_schedule(0.0, optim.learning_rate, warmup_steps)
  else:
    warmup = optax.constant_schedule(optim.learning_rate)
  if optim.decay_steps <= 0:
    return warmup
  decay = optax.cosine_decay_schedule(
    optim.learning_rate, optim.decay_steps - warmup_steps, alpha=optim.final_lr_fraction
  )
  return optax.join_schedules([warmup, decay], [warmup_steps])


def ema_decay_at(
  step: Array, optim: ml_collections.ConfigDict, global_batch: int | None = None
) -> Array:
  """The EMA decay used after `step` updates.

  With `optim.ema_halflife_images` = H > 0 the decay is EDM's, 0.5 ** (global_batch / H): the
  EMA forgets half of its past every H training images, whatever the batch. Its warm-up
  (`optim.ema_warmup`) is EDM's ramp-up, H <= 0.05 x the images seen so far. Otherwise it is
  `optim.ema_decay`, warmed up as min(decay, (1 + step) / (10 + step)).

  Args:
    step: the number of updates before this one (int scalar).
    optim: the optimizer config (uses the EMA fields).
    global_batch: images per step over all devices; needed with a half-life.

  Returns:
    float32 scalar in [0, 1).
  """
  halflife = float(optim.get('ema_halflife_images', 0.0))
  if halflife > 0:
    if global_batch is None:
      raise ValueError('optim.ema_halflife_images > 0 needs the global batch size.')
    if optim.ema_warmup:
      seen = jnp.asarray(step).astype(jnp.float32) * global_batch
      # EDM's ramp-up: early on the EMA follows the fast-moving parameters closely.
      halflife = jnp.maximum(jnp.minimum(halflife, 0.05 * seen), 1e-8)
    return jnp.power(jnp.float32(0.5), global_batch / jnp.asarray(halflife, jnp.float32))
  decay = jnp.asarray(optim.ema_decay, jnp.float32)
  if optim.ema_warmup:
    step = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def update_state(
  state: TrainState,
  grads: Any,
  grad_norm: Array,
  finite: Array,
  optim: ml_collections.ConfigDict,
  global_batch: int | None = None,
) -> TrainState:
  """The optimizer's step and the EMA of the new parameters; only the counters if not `finite`.

  Args:
    state: the current state.
    grads: gradient of the loss, same structure as `state.params`.
    grad_norm: global L2 norm of `grads`.
    finite: scalar bool; False skips the update (parameters, optimizer
      state and EMA stay as they were).
    optim: the optimizer config (uses the EMA fields).
    global_batch: images per step over all devices (for an EMA half-life).

  Returns:
    The state after the step, its step counter one higher.
  """

  def apply_update():
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, optim, global_batch)
    return params, opt_state, optax.incremental_update(params, state.ema_params, 1.0 - decay)

  # lax.cond rather than a per-leaf jnp.where: XLA would copy the `finite`
  # computation into every leaf's fusion, which made compiling very slow.
  params, opt_state, ema_params = jax.lax.cond(
    finite, apply_update, lambda: (state.params, state.opt_state, state.ema_params)
  )
  return state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    ema_params=ema_params,
    nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
  )


def create_train_state(
  model: nn.Module, config: ml_collections.ConfigDict, rng: Array, image_shape: tuple[int, int, int]
) -> TrainState:
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
  y = jnp.zeros((1,), jnp.int32) if getattr(model, 'num_classes', 0) else None
  params = model.init({'params': rng}, x, t, y, train=False)['params']
  return TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=make_optimizer(config.optim),
    # A copy, not an alias: the loop donates the state, and a buffer donated
    # twice is an error.
    ema_params=jax.tree.map(jnp.copy, params),
    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
  )


def drop_labels(labels: Array, rng: Array, rate: float, null_label: int) -> Array:
  """Replaces each label by `null_label` with probability `rate` (classifier-free guidance).

  Args:
    labels: int labels [B].
    rng: the key of this step's label dropout.
    rate: the probability of dropping a label, in [0, 1].
    null_label: the label that stands for "no class" (num_classes).

  Returns:
    int32 labels [B].
  """
  dropped = jax.random.bernoulli(rng, rate, labels.shape)
  return jnp.where(dropped, null_label, labels).astype(jnp.int32)


def _ddpm_loss(model_fn: Any, images: Array, rng: Array, noise: Array, *, diffusion, dc) -> Array:
  """The DDPM objective (`losses.training_losses`) at uniform timesteps, averaged."""
  t = jax.random.randint(rng, (images.shape[0],), 0, diffusion.num_timesteps)
  losses = losses_lib.training_losses(
    diffusion,
    model_fn,
    images,
    t,
    noise,
    loss_type=dc.loss_type,
    model_mean_type=dc.model_mean_type,
    model_var_type=dc.model_var_type,
    vlb_weight=dc.vlb_weight,
    min_snr_gamma=dc.min_snr_gamma if dc.min_snr_gamma > 0 else None,
  )
  return jnp.mean(losses)


def edm_sigmas(rng: Array, batch: int, edm: ml_collections.ConfigDict) -> Array:
  """EDM's training noise levels: ln(sigma) ~ N(P_mean, P_std^2), one per example, float32 [B]."""
  return jnp.exp(edm.P_mean + edm.P_std * jax.random.normal(rng, (batch,), jnp.float32))


def _edm_loss(
  model_fn: Any, images: Array, rng: Array, noise: Array, *, edm: ml_collections.ConfigDict
) -> Array:
  """EDM's objective: `edm.loss` of the preconditioned network at log-normal sigma, averaged.

  The U-Net is the raw network F: its timestep input takes c_noise = ln(sigma) / 4, as the
  positional embedding of NVlabs/edm's DDPM++ does.
  """
  sigma = edm_sigmas(rng, images.shape[0], edm).astype(images.dtype)
  denoiser = edm_lib.precondition(model_fn, sigma_data=edm.sigma_data)
  return jnp.mean(edm_lib.loss(denoiser, images, sigma, noise, sigma_data=edm.sigma_data))


def train_step(
  state: TrainState,
  batch: dict[str, Array],
  rng: Array,
  *,
  diffusion: diffusion_lib.Diffusion,
  config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, Array]]:
  """One optimisation step on a batch: returns the new state and its metrics.

  A step whose loss or gradient is non-finite changes nothing but the step
  counter (which keeps data and randomness moving on) and the non-finite
  counter: parameters, optimizer state and EMA stay as they were.

  With `config.diffusion.kind` = 'edm' the objective is EDM's (`_edm_loss`);
  the noise-level key that draws DDPM's timesteps draws its sigmas, and every
  other draw, the update and the EMA are the same.

  Args:
    state: the current state.
    batch: {'image': float [B, H, W, C] in [-1, 1]}, and 'label' int [B]
      when `config.model.num_classes` > 0.
    rng: this step's key (the loop passes fold_in(seed key, step)).
    diffusion: the process (unused by kind 'edm').
    config: the experiment config (uses `diffusion`, `edm`, `optim`, and
      `model.num_classes`, `model.class_dropout`).

  Returns:
    (new state, metrics) with scalar metrics 'loss', 'grad_norm',
    'learning_rate', 'finite' (1.0 if the step was applied).
  """
  images = batch['image']
  level_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  noise = jax.random.normal(noise_rng, images.shape, images.dtype)
  num_classes = config.model.get('num_classes', 0)
  labels = None
  if num_classes:
    label_rng = jax.random.fold_in(rng, int(streams.Stream.LABEL_DROPOUT))
    labels = drop_labels(batch['label'], label_rng, config.model.class_dropout, num_classes)
  if config.diffusion.get('kind', 'ddpm') == 'edm':
    objective = functools.partial(_edm_loss, edm=config.edm)
  else:
    objective = functools.partial(_ddpm_loss, diffusion=diffusion, dc=config.diffusion)

  def loss_fn(params):
    # The timestep input: DDPM's int timesteps, or EDM's c_noise.
    def model_fn(x_t, timesteps):
      return state.apply_fn(
        {'params': params}, x_t, timesteps, labels, train=True, rngs={'dropout': dropout_rng}
      )

    return objective(model_fn, images, level_rng, noise)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.tree.norm(grads)
  # A NaN or Inf anywhere in the gradient makes its norm non-finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  new_state = update_state(state, grads, grad_norm, finite, config.optim, images.shape[0])
  metrics = dict(
    loss=loss,
    grad_norm=grad_norm,
    learning_rate=learning_rate_schedule(config.optim)(state.step),
    finite=finite.astype(jnp.float32),
  )
  return new_state, metrics


def train_steps(
  state: TrainState,
  batches: dict[str, Array],
  seed_key: Array,
  *,
  step_fn: Any = None,
  **step_keywords: Any,
) -> tuple[TrainState, dict[str, Array]]:
  """K steps in one call, over a stack of K batches.

  Step s uses the key fold_in(seed_key, s), so a run's randomness depends
  only on the seed and the step, not on K or on where it was resumed.

  The K steps are unrolled at trace time rather than run by `lax.scan`,
  because XLA:CPU runs and compiles a training step inside a while loop far
  slower than in straight-line code (docs/performance.md). K is small, so the
  unrolled program stays small.

  Args:
    state: the current state.
    batches: {'image': [K, B, H, W, C]}, and 'label' [K, B] for a conditional model.
    seed_key: the run's base key.
    step_fn: the step, `step_fn(state, batch, rng, **step_keywords)` (default
      `train_step`; a distillation passes its own).
    **step_keywords: its keywords (`train_step`'s diffusion and config).

  Returns:
    (new state, metrics) with each metric stacked to shape [K].
  """
  step_fn = step_fn or train_step
  num_steps = batches['image'].shape[0]
  all_metrics = []
  for i in range(num_steps):
    batch = jax.tree.map(lambda x, i=i: x[i], batches)
    state, metrics = step_fn(
      state, batch, jax.random.fold_in(seed_key, state.step), **step_keywords
    )
    all_metrics.append(metrics)
  return state, jax.tree.map(lambda *xs: jnp.stack(xs), *all_metrics)
