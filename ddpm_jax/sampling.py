"""The paper's sampling chains, each a single compiled `jax.lax.scan`.

All samplers take a `diffusion.Diffusion` and `model_fn(x_t, t) -> output`,
any pure function of x_t [B, ...] and int32 timesteps t [B] (a U-Net closure
as much as an analytic denoiser). Before every call of the model the step
index goes through `d.timestep_map`, so a respaced process calls a model
trained on the full process with the timesteps it knows.

  * `p_sample_loop`: ancestral sampling, t = T-1 .. 0 (DDPM, Algorithm 2),
    one `ancestral_step` per timestep.
  * `p_sample_loop_progressive`: the same chain with snapshots of x_t and of
    the predicted x_0 (the paper's progressive generation, Fig. 6).
  * `ddim_sample_loop`: DDIM (Song et al. 2021, Eq. 12) on a subsequence of
    timesteps, one `ddim_step` each, deterministic for eta = 0.
  * `respaced_sample_loop`: ancestral sampling on a respaced process
    (improved DDPM, Nichol & Dhariwal 2021, Sec. 4).
  * `interpolate`: interpolation in the latent x_t (the paper's Sec. 4.3).
  * `pc_sample_loop`: predictor-corrector sampling (Song et al. 2021,
    score SDE): Langevin corrector steps followed by the ancestral predictor.

The ODE solvers (`solvers`) and classifier-free guidance (`guidance`) have
modules of their own; their public names are importable from here too. The
argument checks, x_T and the step noise every chain shares are in `chain`:
a sample is a deterministic function of `rng`, whatever the sharding.
"""

import functools
import math
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import chain
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.guidance import check_guidance_scale as check_guidance_scale
from ddpm_jax.guidance import check_labels as check_labels
from ddpm_jax.guidance import guided_model_fn as guided_model_fn
from ddpm_jax.guidance import parse_class_labels as parse_class_labels
from ddpm_jax.solvers import SOLVER_ORDERS as SOLVER_ORDERS
from ddpm_jax.solvers import dpm_solver_sample_loop as dpm_solver_sample_loop
from ddpm_jax.solvers import solver_timesteps as solver_timesteps
from ddpm_jax.solvers import unipc_sample_loop as unipc_sample_loop

Array = jax.Array
ModelFn = chain.ModelFn

DDIM_SKIP_TYPES = ('uniform', 'quad')


def ancestral_step(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  noise_key: Array,
  options: dict[str, Any],
  x: Array,
  t_scalar: Array,
  with_pred_x0: bool = False,
) -> tuple[Array, Array]:
  """One ancestral step, x_{t-1} ~ p(x_{t-1} | x_t) (Algorithm 2, line 4), with the noise of step t.

  `options` are `p_sample`'s keywords (clip_denoised, model_mean_type,
  model_var_type). Returns x_{t-1} and, with `with_pred_x0`, the predicted x_0.
  """
  t = chain.per_example(x.shape[0], t_scalar)
  output = chain.call_model(d, model_fn, x, t)
  noise = chain.step_noise(noise_key, t_scalar, x.shape, x.dtype)
  x_prev = diffusion_lib.p_sample(d, output, x, t, noise, **options).astype(x.dtype)
  pred_x0 = None
  if with_pred_x0:
    # Same expressions as inside p_sample; XLA computes them once.
    pred_x0 = diffusion_lib.p_mean_variance(d, output, x, t, **options)['pred_x0']
  return x_prev, pred_x0


def _ancestral_chain(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  x_start: Array,
  timesteps: Array,
  noise_key: Array,
  options: dict[str, Any],
) -> Array:
  """Runs ancestral steps over `timesteps` (descending) in one scan."""
  step = functools.partial(ancestral_step, d, model_fn, noise_key, options)

  def body(x, t_scalar):
    x_prev, _ = step(x, t_scalar)
    return x_prev, None

  x_end, _ = jax.lax.scan(body, x_start, timesteps)
  return x_end


def _descending(start: int) -> Array:
  """int32 [start, start-1, ..., 0]."""
  return jnp.arange(start, -1, -1, dtype=jnp.int32)


# ---------------------------------------------------------------------------
# Public samplers.


def p_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  shape: Sequence[int],
  rng: Array,
  *,
  x_T: Array | None = None,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> Array:
  """Ancestral sampling from x_T ~ N(0, I) down to x_0 (DDPM, Algorithm 2).

  Args:
    d: the process (T steps; may be respaced).
    model_fn: `model_fn(x_t, t) -> output`, x_t of `shape`, t int32 [B].
    shape: static sample shape (B, ...data dims), e.g. (B, H, W, C).
    rng: a PRNG key.
    x_T: optional starting sample of `shape` instead of one drawn from `rng`
      (which still draws the steps' noise).
    clip_denoised: clip the predicted x_0 to [-1, 1] at every step (the
      original's sampling default).
    model_mean_type: what the model predicts, one of
      `diffusion.MODEL_MEAN_TYPES`.
    model_var_type: one of `diffusion.MODEL_VAR_TYPES`; learned types take a
      model output with 2*C channels.

  Returns:
    x_0 of `shape`, in the dtype of the diffusion tables.
  """
  shape = chain.check_common(
    d,
    shape,
    rng,
    clip_denoised=clip_denoised,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
  )
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  init_key, noise_key = jax.random.split(rng)
  x_t = chain.initial_sample(d, shape, init_key, x_T)
  return _ancestral_chain(d, model_fn, x_t, _descending(d.num_timesteps - 1), noise_key, options)


def p_sample_loop_progressive(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  shape: Sequence[int],
  rng: Array,
  *,
  every: int = 100,
  x_T: Array | None = None,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> tuple[Array, dict[str, Array]]:
  """Ancestral sampling that also records the chain every `every` steps.

  Snapshots are taken at the timesteps t divisible by `every` (the original's
  choice): t = T - every, T - 2 every, ..., 0, in sampling order. Each holds
  the state x_t at that timestep and the x_0 the model predicts from it, the
  quantities of the paper's Fig. 6. The chain and its randomness are those of
  `p_sample_loop`, so the final sample is the same for the same rng.

  Args:
    d: the process (T steps).
    model_fn: as in `p_sample_loop`.
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    every: snapshot interval; must divide T.
    x_T: as in `p_sample_loop`.
    clip_denoised, model_mean_type, model_var_type: as in `p_sample_loop`.

  Returns:
    (x_0 of `shape`, {'x_t': [S, B, ...], 'pred_x0': [S, B, ...], 't': int32
    [S]}) with S = T // every.
  """
  shape = chain.check_common(
    d,
    shape,
    rng,
    clip_denoised=clip_denoised,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
  )
  num_timesteps = d.num_timesteps
  every = chain.check_int_range('every', every, 1, num_timesteps)
  if num_timesteps % every:
    divisors = [k for k in range(1, num_timesteps + 1) if num_timesteps % k == 0]
    raise ValueError(f'every must divide T = {num_timesteps} (one of {divisors}), got {every}.')
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  init_key, noise_key = jax.random.split(rng)
  x_start = chain.initial_sample(d, shape, init_key, x_T)
  step = functools.partial(ancestral_step, d, model_fn, noise_key, options, with_pred_x0=True)

  def inner(carry, t_scalar):
    x, _, _ = carry
    x_prev, pred_x0 = step(x, t_scalar)
    # Keeping this step's input and prediction in the carry leaves, at the end
    # of a chunk, those of its last step (the snapshot) without a second,
    # separately traced model call.
    return (x_prev, x, pred_x0), None

  def outer(x, chunk_timesteps):
    init = (x, jnp.zeros_like(x), jnp.zeros_like(x))
    (x_end, x_snap, pred_snap), _ = jax.lax.scan(inner, init, chunk_timesteps)
    return x_end, (x_snap, pred_snap, chunk_timesteps[-1])

  # Row s runs t = T-1-s*every down to T-(s+1)*every, a multiple of `every`.
  chunks = _descending(num_timesteps - 1).reshape(num_timesteps // every, every)
  x0, (xs, preds, ts) = jax.lax.scan(outer, x_start, chunks)
  return x0, {'x_t': xs, 'pred_x0': preds, 't': ts}


def check_ddim_options(*, eta: Any, skip: Any) -> tuple[float, str]:
  """DDIM's eta (a number >= 0) and skip (one of `DDIM_SKIP_TYPES`), checked."""
  eta = chain.check_nonnegative('eta', eta)
  if skip not in DDIM_SKIP_TYPES:
    raise ValueError(f'Unknown skip {skip!r}; valid choices: {", ".join(DDIM_SKIP_TYPES)}.')
  return eta, skip


def ddim_timesteps(num_timesteps: int, num_steps: int, skip: str = 'uniform') -> np.ndarray:
  """The increasing timestep subsequence DDIM visits (the DDIM code's choices).

  Args:
    num_timesteps: T.
    num_steps: K in [1, T].
    skip: 'uniform': 0, c, 2c, ..., (K - 1) c with c = T // K, so K model
      calls whether or not K divides T (diffusers' 'leading' spacing; the DDIM
      code's range(0, T, c) takes up to 2K - 1 steps when it does not); 'quad':
      floor(linspace(0, sqrt(0.8 T), K)**2), K entries, denser near t = 0
      (repeated entries, possible when K is close to T, are steps that leave
      x unchanged).

  Returns:
    int64 array of timesteps, non-decreasing, in [0, T).
  """
  num_steps = chain.check_int_range('num_steps', num_steps, 1, num_timesteps)
  if skip == 'uniform':
    return np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
  if skip == 'quad':
    return (np.linspace(0, math.sqrt(0.8 * num_timesteps), num_steps) ** 2).astype(np.int64)
  raise ValueError(f'Unknown skip {skip!r}; valid choices: {", ".join(DDIM_SKIP_TYPES)}.')


def ddim_step(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  x: Array,
  t_scalar: Array,
  a_t: Array,
  a_s: Array,
  noise: Array,
  *,
  eta: float,
  **options: Any,
) -> Array:
  """One DDIM step from timestep t to the earlier visited s (Song et al. 2021, Eq. 12).

    x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)   (Eq. 16),

  with a = alphas_cumprod, x0_hat the (clipped) predicted x_0, eps_hat the
  noise it implies and z = `noise`. `options` are `p_mean_variance`'s keywords.
  """
  t = chain.per_example(x.shape[0], t_scalar)
  output = chain.call_model(d, model_fn, x, t)
  out = diffusion_lib.p_mean_variance(d, output, x, t, **options)
  sigma = eta * jnp.sqrt((1.0 - a_s) / (1.0 - a_t)) * jnp.sqrt(1.0 - a_t / a_s)
  direction = jnp.sqrt(jnp.maximum(1.0 - a_s - sigma**2, 0.0))
  x_s = jnp.sqrt(a_s) * out['pred_x0'] + direction * out['pred_eps'] + sigma * noise
  return x_s.astype(x.dtype)


def ddim_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  shape: Sequence[int],
  rng: Array,
  *,
  num_steps: int = 50,
  eta: float = 0.0,
  skip: str = 'uniform',
  x_T: Array | None = None,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> Array:
  """DDIM sampling (Song, Meng, Ermon 2021, Eq. 12).

  From x ~ N(0, I) at the largest visited timestep, one `ddim_step` to each
  earlier visited timestep (a_s = 1 after the last, t = 0). eta = 0 is deterministic; eta = 1 over all T steps is
  ancestral DDPM with 'fixedsmall' variance. Learned-variance outputs are
  accepted and only their mean channels are used.

  Args:
    d: the process (T steps).
    model_fn: as in `p_sample_loop`.
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    num_steps: K in [1, T]; see `ddim_timesteps`.
    eta: >= 0; the amount of fresh noise (values above 1 leave
      1 - a_s - sigma^2 < 0 at some steps, which is clamped to 0).
    skip: 'uniform' or 'quad' (see `ddim_timesteps`).
    x_T: as in `p_sample_loop`.
    clip_denoised, model_mean_type, model_var_type: as in `p_sample_loop`.

  Returns:
    x_0 of `shape`.
  """
  shape = chain.check_common(
    d,
    shape,
    rng,
    clip_denoised=clip_denoised,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
  )
  eta, skip = check_ddim_options(eta=eta, skip=skip)
  seq = ddim_timesteps(d.num_timesteps, num_steps, skip)
  dtype = chain.sample_dtype(d)
  a_t = jnp.take(d.alphas_cumprod, seq).astype(dtype)
  a_prev = jnp.concatenate([jnp.ones((1,), dtype), a_t[:-1]])  # a_s = 1 after t = 0
  index = jnp.arange(len(seq), dtype=jnp.int32)
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  init_key, noise_key = jax.random.split(rng)

  def body(x, step):
    i, t_scalar, a_t, a_s = step
    noise = chain.step_noise(noise_key, i, x.shape, x.dtype)
    return ddim_step(d, model_fn, x, t_scalar, a_t, a_s, noise, eta=eta, **options), None

  x_start = chain.initial_sample(d, shape, init_key, x_T)
  steps = (index, jnp.asarray(seq, jnp.int32), a_t, a_prev)
  x0, _ = jax.lax.scan(body, x_start, steps, reverse=True)
  return x0


def respaced_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  shape: Sequence[int],
  rng: Array,
  *,
  num_steps: int,
  x_T: Array | None = None,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> Array:
  """Ancestral sampling on a process respaced to `num_steps` evenly spaced steps.

  Builds `diffusion.respace(d, diffusion.space_timesteps(T, num_steps))`,
  whose alphas_cumprod at the kept timesteps are those of d and whose betas
  (hence 'fixedlarge' / 'fixedsmall' variances) follow from them, and runs
  `p_sample_loop` on it; the model is called with the kept timesteps of the
  full process (improved DDPM, Sec. 4).

  Args:
    d: the full process (not itself respaced).
    model_fn: a model trained on d, as in `p_sample_loop`.
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    num_steps: K in [1, T].
    x_T: as in `p_sample_loop`.
    clip_denoised, model_mean_type, model_var_type: as in `p_sample_loop`.

  Returns:
    x_0 of `shape`.
  """
  chain.check_common(
    d,
    shape,
    rng,
    clip_denoised=clip_denoised,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
  )
  num_steps = chain.check_int_range('num_steps', num_steps, 1, d.num_timesteps)
  # The tables are rebuilt from d's (static) schedule spec, so this also works
  # when d itself is a traced jit argument.
  respaced = diffusion_lib.respace(d, diffusion_lib.space_timesteps(d.num_timesteps, num_steps))
  return p_sample_loop(
    respaced,
    model_fn,
    shape,
    rng,
    x_T=x_T,
    clip_denoised=clip_denoised,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
  )


def interpolate(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  x0_a: Array,
  x0_b: Array,
  rng: Array,
  *,
  t: int,
  lam: float | Array,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> Array:
  """Interpolates two batches of data in the latent x_t (the paper's Sec. 4.3).

  Both are encoded with q(x_t | x_0) using the same noise, mixed as
  (1 - lam) x_t^a + lam x_t^b, and decoded with the reverse process from t
  down to 0. Every lam uses the same encoding and decoding noise, so the
  outputs differ only through the mixing. Larger t gives coarser, more
  varied interpolants; t = 0 decodes once, to the posterior mean of the
  predicted x_0.

  Args:
    d: the process (T steps).
    model_fn: as in `p_sample_loop`.
    x0_a: data [B, ...] in [-1, 1].
    x0_b: data of the same shape.
    rng: a PRNG key.
    t: static int in [0, T), the latent's timestep.
    lam: the mixing weight: a scalar, or an array [L] of them.
    clip_denoised, model_mean_type, model_var_type: as in `p_sample_loop`.

  Returns:
    [B, ...] for a scalar lam, [L, B, ...] for lam of shape [L]; in the dtype
    of the diffusion tables.
  """
  chain.check_diffusion(d)
  chain.check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  shape_a, shape_b = tuple(jnp.shape(x0_a)), tuple(jnp.shape(x0_b))
  if shape_a != shape_b or len(shape_a) < 2:
    raise ValueError(
      f'x0_a and x0_b must have the same shape [B, ...] with at least 2 '
      f'dims, got {shape_a} and {shape_b}.'
    )
  t = chain.check_int_range('t', t, 0, d.num_timesteps - 1)
  if jnp.ndim(lam) not in (0, 1):
    raise ValueError(f'lam must be a scalar or a 1-D array [L], got shape {jnp.shape(lam)}.')
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  dtype = chain.sample_dtype(d)
  x0_a, x0_b = jnp.asarray(x0_a, dtype), jnp.asarray(x0_b, dtype)
  encode_key, noise_key = jax.random.split(rng)
  noise = jax.random.normal(encode_key, shape_a, dtype)
  t_vec = chain.per_example(shape_a[0], t)
  x_t_a = diffusion_lib.q_sample(d, x0_a, t_vec, noise)
  x_t_b = diffusion_lib.q_sample(d, x0_b, t_vec, noise)

  def decode(weight):
    weight = jnp.asarray(weight, dtype)
    x_t = (1.0 - weight) * x_t_a + weight * x_t_b
    return _ancestral_chain(d, model_fn, x_t, _descending(t), noise_key, options)

  if jnp.ndim(lam) == 0:
    return decode(lam)
  return jax.vmap(decode)(jnp.asarray(lam))


def check_pc_options(*, corrector_steps: Any, snr: Any) -> tuple[int, float]:
  """Predictor-corrector's corrector_steps (an int >= 0) and snr (a number >= 0), checked."""
  if not chain.is_int(corrector_steps) or corrector_steps < 0:
    raise ValueError(f'corrector_steps must be an integer >= 0, got {corrector_steps!r}.')
  return int(corrector_steps), chain.check_nonnegative('snr', snr)


def pc_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  shape: Sequence[int],
  rng: Array,
  *,
  corrector_steps: int = 1,
  snr: float = 0.16,
  x_T: Array | None = None,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> Array:
  """Predictor-corrector sampling for the VP process (score SDE, Song et al. 2021).

  At each t = T-1 .. 0, `corrector_steps` Langevin steps targeting q(x_t),

    x <- x + e s + sqrt(2 e) z,  e = 2 alpha_t (snr ||z|| / ||s||)^2,

  with s = -eps_hat / sqrt(1 - alphas_cumprod_t) the model's score,
  alpha_t = 1 - beta_t and norms taken per example over all its dimensions
  (so one example's step does not depend on the rest of the batch), are
  followed by one ancestral step (the predictor, as in `p_sample_loop`). The
  score uses the model's unclipped noise prediction: Langevin dynamics needs
  the score of the noisy marginal, which clipping x_0 would bias.

  All T * (corrector_steps + 1) model evaluations run in one scan whose body
  calls the model once and then applies the corrector or the predictor update.

  Args:
    d: the process (T steps).
    model_fn: as in `p_sample_loop`.
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    corrector_steps: Langevin steps per timestep, >= 0 (0 is `p_sample_loop`
      with a different noise stream).
    snr: the signal-to-noise ratio setting the Langevin step size, >= 0.
    x_T: as in `p_sample_loop`.
    clip_denoised, model_mean_type, model_var_type: as in `p_sample_loop`
      (for the predictor).

  Returns:
    x_0 of `shape`.
  """
  shape = chain.check_common(
    d,
    shape,
    rng,
    clip_denoised=clip_denoised,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
  )
  corrector_steps, snr = check_pc_options(corrector_steps=corrector_steps, snr=snr)
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  evals_per_t = corrector_steps + 1
  init_key, noise_key = jax.random.split(rng)
  batch = shape[0]
  axes = tuple(range(1, len(shape)))

  def body(x, k):
    t_scalar = d.num_timesteps - 1 - k // evals_per_t
    t = chain.per_example(batch, t_scalar)
    output = chain.call_model(d, model_fn, x, t)
    noise = chain.step_noise(noise_key, k, x.shape, x.dtype)

    if model_mean_type == 'eps':
      eps = diffusion_lib.split_model_output(output, x, model_var_type)[0]
    else:
      eps = diffusion_lib.p_mean_variance(
        d,
        output,
        x,
        t,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=False,
      )['pred_eps']
    score = diffusion_lib.score_from_eps(d, eps, t)
    score_norm = jnp.sqrt(jnp.sum(jnp.square(score), axis=axes, keepdims=True))
    noise_norm = jnp.sqrt(jnp.sum(jnp.square(noise), axis=axes, keepdims=True))
    alpha = 1.0 - jnp.take(d.betas, t_scalar).astype(x.dtype)
    # A zero score (no information) gets no step rather than an infinite one;
    # the inner where keeps the unused branch (and its gradient) finite.
    has_score = score_norm > 0
    ratio = jnp.where(has_score, snr * noise_norm / jnp.where(has_score, score_norm, 1.0), 0.0)
    step_size = 2.0 * alpha * jnp.square(ratio)
    x_corrected = x + step_size * score + jnp.sqrt(2.0 * step_size) * noise

    x_predicted = diffusion_lib.p_sample(d, output, x, t, noise, **options)
    is_corrector = (k % evals_per_t) < corrector_steps
    return jnp.where(is_corrector, x_corrected, x_predicted).astype(x.dtype), None

  x_start = chain.initial_sample(d, shape, init_key, x_T)
  evaluations = jnp.arange(d.num_timesteps * evals_per_t, dtype=jnp.int32)
  x0, _ = jax.lax.scan(body, x_start, evaluations)
  return x0
