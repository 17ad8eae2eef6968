"""Samplers of a trained denoiser, each chain a single compiled `jax.lax.scan`.

All samplers take a `diffusion.Diffusion` and `model_fn(x_t, t) -> output`,
any pure function of x_t [B, ...] and int32 timesteps t [B] (a U-Net closure
as much as an analytic denoiser). Before every call of the model the step
index goes through `d.timestep_map`, so a respaced process calls a model
trained on the full process with the timesteps it knows.

  * `p_sample_loop`: ancestral sampling, t = T-1 .. 0 (DDPM, Algorithm 2).
  * `p_sample_loop_progressive`: the same chain with snapshots of x_t and of
    the predicted x_0 (the paper's progressive generation, Fig. 6).
  * `ddim_sample_loop`: DDIM (Song et al. 2021, Eq. 12) on a subsequence of
    timesteps, deterministic for eta = 0.
  * `respaced_sample_loop`: ancestral sampling on a respaced process
    (improved DDPM, Nichol & Dhariwal 2021, Sec. 4).
  * `interpolate`: interpolation in the latent x_t (the paper's Sec. 4.3).
  * `pc_sample_loop`: predictor-corrector sampling (Song et al. 2021,
    score SDE): Langevin corrector steps followed by the ancestral predictor.
  * `dpm_solver_sample_loop`, `unipc_sample_loop`: multistep solvers of the
    probability-flow ODE (DPM-Solver++, Lu et al. 2022b; UniPC, Zhao et al.
    2023), 10-20 model calls; equal to diffusers' schedulers.
  * `guided_model_fn`: classifier-free guidance (Ho & Salimans 2022) of a
    class-conditional model, as a `model_fn` that every sampler above takes.

Randomness: `rng` is split once into an initial-noise key and a step key;
the noise of step i is `jax.random.normal(fold_in(step_key, i), shape)`. A
sample is therefore a deterministic function of the key, and since JAX's
threefry draws do not depend on how an array is sharded, it does not change
when the batch is split across devices. Every sampler checks its arguments
before tracing anything and raises `ValueError` naming the valid values.
"""

import functools
import math
import numbers
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as diffusion_lib

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

DDIM_SKIP_TYPES = ('uniform', 'quad')
# The samplers a config can name (`sampling.sampler`): all T ancestral steps,
# ancestral steps on a respaced process, DDIM, and the two ODE solvers.
SAMPLERS = ('ddpm', 'respaced', 'ddim', 'dpm_solver', 'unipc')


# ---------------------------------------------------------------------------
# Argument checks: all run on static Python values, before any tracing.


def _check_diffusion(d: Any) -> None:
  if not isinstance(d, diffusion_lib.Diffusion):
    raise TypeError(f'd must be a diffusion.Diffusion, got {type(d).__name__}.')


def _is_int(value: Any) -> bool:
  return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool)


def _check_shape(shape: Any) -> tuple[int, ...]:
  """Returns shape as a tuple of ints: [B, ...data dims], at least 2 entries."""
  if (
    not isinstance(shape, (tuple, list))
    or len(shape) < 2
    or not all(_is_int(s) and s >= 1 for s in shape)
  ):
    raise ValueError(
      'shape must be a tuple of positive ints, batch first: '
      f'(B, ...data dims, C) with at least 2 entries, got {shape!r}.'
    )
  return tuple(int(s) for s in shape)


def _check_int_range(name: str, value: Any, low: int, high: int) -> int:
  """An int in [low, high] (inclusive)."""
  if not _is_int(value) or not low <= value <= high:
    raise ValueError(f'{name} must be an integer in [{low}, {high}], got {value!r}.')
  return int(value)


def _check_nonnegative(name: str, value: Any) -> float:
  """A static, finite, non-negative real number."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f'{name} must be a non-negative Python number, got {value!r}.')
  value = float(value)
  if not math.isfinite(value) or value < 0:
    raise ValueError(f'{name} must be a finite number >= 0, got {value!r}.')
  return value


def _check_rng(rng: Any) -> None:
  """A typed key (shape []) or a raw uint32 key (shape [2] for threefry)."""
  if not hasattr(rng, 'dtype') or not hasattr(rng, 'shape'):
    raise ValueError(f'rng must be a JAX PRNG key, got {type(rng).__name__}.')
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    ok = rng.shape == ()
  else:
    ok = rng.dtype == jnp.uint32 and len(rng.shape) == 1
  if not ok:
    raise ValueError(
      'rng must be a single PRNG key (jax.random.key(seed) or '
      f'jax.random.PRNGKey(seed)), got dtype {rng.dtype} and shape '
      f'{tuple(rng.shape)}; vmap over a batch of keys instead.'
    )


def check_sampler(name: str, num_steps: int, num_timesteps: int) -> None:
  """Raises ValueError for a sampler name not in `SAMPLERS` or an impossible step count."""
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; valid choices: {", ".join(SAMPLERS)}.')
  if name != 'ddpm' and not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'Sampler {name!r} needs 1 <= num_steps <= {num_timesteps}, got {num_steps}.')


# ---------------------------------------------------------------------------
# Classifier-free guidance.


def check_guidance_scale(scale: Any) -> Any:
  """A finite number >= 0 as a float, or a traced scalar (whose value the caller checks).

  Raises:
    ValueError: for anything else, naming what the scale means.
  """
  if isinstance(scale, jax.core.Tracer):
    if jnp.shape(scale) != ():
      raise ValueError(f'guidance_scale must be a scalar, got shape {jnp.shape(scale)}.')
    return scale
  if isinstance(scale, (np.ndarray, jax.Array)) and np.shape(scale) == ():
    scale = scale.item()
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
    raise ValueError(f'guidance_scale must be a number >= 0, got {scale!r}.')
  if not math.isfinite(scale) or scale < 0:
    raise ValueError(
      f'guidance_scale must be a finite number >= 0 (0: unconditional, 1: conditional, '
      f'> 1: guided), got {scale!r}.'
    )
  return float(scale)


def check_labels(labels: Any, num_classes: int) -> Array:
  """Class labels [B] of ints in [0, num_classes); values are checked unless traced.

  Raises:
    ValueError: for labels that are not a 1-D integer array, or (when
      concrete) hold values outside [0, num_classes).
  """
  if not hasattr(labels, 'shape'):
    labels = np.asarray(labels)
  if len(labels.shape) != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f'labels must be a 1-D integer array [B], got dtype {labels.dtype} and shape '
      f'{tuple(labels.shape)}.'
    )
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
      raise ValueError(
        f'labels must be classes in [0, {num_classes}) (the null label {num_classes} is '
        f"guidance's own), got {sorted(set(bad.tolist()))[:10]}."
      )
  return jnp.asarray(labels, jnp.int32)


def parse_class_labels(spec: str, num_classes: int) -> tuple[int, ...]:
  """The classes a `sampling.class_labels` string names, in order.

  Args:
    spec: 'all' (every class, 0 .. num_classes - 1) or comma-separated class
      indices such as '3' or '0,3,7'.
    num_classes: the model's number of classes.

  Returns:
    The classes, e.g. (0, 3, 7).

  Raises:
    ValueError: for an empty spec, a non-integer entry or a class outside
      [0, num_classes).
  """
  spec = str(spec).strip()
  if spec == 'all':
    return tuple(range(num_classes))
  try:
    classes = tuple(int(part) for part in spec.split(','))
  except ValueError:
    classes = ()
  if not classes:
    raise ValueError(
      f"class labels {spec!r}: use 'all' or class indices separated by commas, e.g. '0,3,7'."
    )
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f'class labels {bad} are not classes in [0, {num_classes}).')
  return classes


def guided_model_fn(
  model_fn: Callable[[Array, Array, Array], Array],
  labels: Array,
  guidance_scale: float | Array,
  *,
  null_label: int,
  model_var_type: str = 'fixedlarge',
) -> ModelFn:
  """Classifier-free guidance of a class-conditional model, as a `model_fn(x_t, t)`.

  g(x_t, t) = eps_u + s (eps_c - eps_u), with eps_c = model_fn(x_t, t, labels)
  and eps_u = model_fn(x_t, t, null), computed in ONE call of `model_fn` on
  the doubled batch ([x_t; x_t], [t; t], [labels; null]). s = 0 is the
  unconditional model, s = 1 the conditional one, s > 1 guides. This s is
  diffusers' `guidance_scale`; Ho & Salimans (2022) write the same rule as
  (1 + w) eps_c - w eps_u, so their w is s - 1. Weights summing to one make
  the rule the same for x0 and v predictions as for eps.

  With a learned variance (2C output channels) the first C (mean) channels
  are combined as above and the last C come from the conditional branch, as
  in GLIDE. Every sampler takes the result unchanged.

  Args:
    model_fn: `model_fn(x_t [N, ...], t int32 [N], y int32 [N]) -> [N, ..., C or 2C]`,
      the conditional network; y = `null_label` means "no class".
    labels: int classes [B] in [0, null_label), one per sample.
    guidance_scale: s >= 0, a Python number (or a traced scalar, whose value
      the caller checks).
    null_label: the null label (the model's num_classes), >= 1.
    model_var_type: one of `diffusion.MODEL_VAR_TYPES`; 'learned' and
      'learned_range' mean 2C output channels.

  Returns:
    `g(x_t [B, ...], t [B]) -> [B, ..., C or 2C]`.

  Raises:
    ValueError: for a negative or non-finite scale, labels that are not
      ints [B] in [0, null_label) (the batch size is checked when g is
      called), a bad null label or variance type.
  """
  if not _is_int(null_label) or null_label < 1:
    raise ValueError(f'null_label must be the number of classes (an int >= 1), got {null_label!r}.')
  diffusion_lib.check_model_options(model_var_type=model_var_type)
  scale = check_guidance_scale(guidance_scale)
  labels = check_labels(labels, int(null_label))
  learned = model_var_type in ('learned', 'learned_range')

  def guided(x_t: Array, t: Array) -> Array:
    batch = x_t.shape[0]
    if labels.shape != (batch,):
      raise ValueError(
        f'labels must have one class per sample, shape [B] = ({batch},), got {labels.shape}.'
      )
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    y = jnp.concatenate([labels, jnp.full((batch,), null_label, jnp.int32)])
    out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), y)
    cond, uncond = out[:batch], out[batch:]
    if learned:
      channels = cond.shape[-1] // 2
      mean_c, var_c = cond[..., :channels], cond[..., channels:]
      mean_u = uncond[..., :channels]
      return jnp.concatenate([mean_u + scale * (mean_c - mean_u), var_c], axis=-1)
    return uncond + scale * (cond - uncond)

  return guided


# ---------------------------------------------------------------------------
# Shared pieces of the chains.


def _sample_dtype(d: diffusion_lib.Diffusion) -> jnp.dtype:
  # Samples follow the tables: float64 tables (under jax_enable_x64) give a
  # float64 chain, the usual float32 tables a float32 one.
  return d.alphas_cumprod.dtype


def _initial_sample(
  d: diffusion_lib.Diffusion, shape: tuple[int, ...], rng: Any, x_T: Any
) -> Array:
  """x_T ~ N(0, I) from `rng`, or the given `x_T` (checked against `shape`)."""
  dtype = _sample_dtype(d)
  if x_T is None:
    return jax.random.normal(rng, shape, dtype)
  if tuple(jnp.shape(x_T)) != shape:
    raise ValueError(f'x_T must have the sample shape {shape}, got {tuple(jnp.shape(x_T))}.')
  if not jnp.issubdtype(jnp.result_type(x_T), jnp.floating):
    raise ValueError(f'x_T must be a float array, got dtype {jnp.result_type(x_T)}.')
  return jnp.asarray(x_T, dtype)


def _step_noise(key: Array, i: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def _call_model(d: diffusion_lib.Diffusion, model_fn: ModelFn, x: Array, t: Array) -> Array:
  """The model at (x, t) with t mapped to the timesteps the model was trained on."""
  output = model_fn(x, jnp.take(d.timestep_map, t))
  # A model computing in another precision must not change the carry's dtype,
  # or the scan would reject its own output.
  return jnp.asarray(output).astype(x.dtype)


def _full(batch: int, t: Array) -> Array:
  return jnp.full((batch,), t, dtype=jnp.int32)


def _ancestral_step(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
  noise_key: Array,
  options: dict[str, Any],
  x: Array,
  t_scalar: Array,
  with_pred_x0: bool = False,
) -> tuple[Array, Array]:
  """x_{t-1} ~ p(x_{t-1} | x_t) with the noise of step t; optionally pred_x0."""
  t = _full(x.shape[0], t_scalar)
  output = _call_model(d, model_fn, x, t)
  noise = _step_noise(noise_key, t_scalar, x.shape, x.dtype)
  x_prev = diffusion_lib.p_sample(d, output, x, t, noise, **options).astype(x.dtype)
  pred_x0 = None
  if with_pred_x0:
    # Same expressions as inside p_sample; XLA computes them once.
    pred_x0 = diffusion_lib.p_mean_variance(d, output, x, t, **options)['pred_x0']
  return x_prev, pred_x0


def _ancestral_chain(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
  x_start: Array,
  timesteps: Array,
  noise_key: Array,
  options: dict[str, Any],
) -> Array:
  """Runs ancestral steps over `timesteps` (descending) in one scan."""
  step = functools.partial(_ancestral_step, d, model_fn, noise_key, options)

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
  model_fn: ModelFn,
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
  _check_diffusion(d)
  shape = _check_shape(shape)
  _check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  init_key, noise_key = jax.random.split(rng)
  x_t = _initial_sample(d, shape, init_key, x_T)
  return _ancestral_chain(d, model_fn, x_t, _descending(d.num_timesteps - 1), noise_key, options)


def p_sample_loop_progressive(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
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
  _check_diffusion(d)
  shape = _check_shape(shape)
  _check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  num_timesteps = d.num_timesteps
  every = _check_int_range('every', every, 1, num_timesteps)
  if num_timesteps % every:
    divisors = [k for k in range(1, num_timesteps + 1) if num_timesteps % k == 0]
    raise ValueError(f'every must divide T = {num_timesteps} (one of {divisors}), got {every}.')
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  init_key, noise_key = jax.random.split(rng)
  x_start = _initial_sample(d, shape, init_key, x_T)
  step = functools.partial(_ancestral_step, d, model_fn, noise_key, options, with_pred_x0=True)

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
  num_steps = _check_int_range('num_steps', num_steps, 1, num_timesteps)
  if skip == 'uniform':
    return np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
  if skip == 'quad':
    return (np.linspace(0, math.sqrt(0.8 * num_timesteps), num_steps) ** 2).astype(np.int64)
  raise ValueError(f'Unknown skip {skip!r}; valid choices: {", ".join(DDIM_SKIP_TYPES)}.')


def ddim_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
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

  From x ~ N(0, I) at the largest visited timestep, each step from t to the
  previous visited timestep s (a_s = 1 after the last, t = 0) is

    x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s),

  with a = alphas_cumprod, x0_hat the (clipped) predicted x_0 and eps_hat the
  noise it implies. eta = 0 is deterministic; eta = 1 over all T steps is
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
  _check_diffusion(d)
  shape = _check_shape(shape)
  _check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  eta = _check_nonnegative('eta', eta)
  if skip not in DDIM_SKIP_TYPES:
    raise ValueError(f'Unknown skip {skip!r}; valid choices: {", ".join(DDIM_SKIP_TYPES)}.')
  seq = ddim_timesteps(d.num_timesteps, num_steps, skip)
  dtype = _sample_dtype(d)
  a_t = jnp.take(d.alphas_cumprod, seq).astype(dtype)
  a_prev = jnp.concatenate([jnp.ones((1,), dtype), a_t[:-1]])
  index = jnp.arange(len(seq), dtype=jnp.int32)
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  init_key, noise_key = jax.random.split(rng)
  batch = shape[0]

  def body(x, step):
    i, t_scalar, a, a_s = step
    t = _full(batch, t_scalar)
    output = _call_model(d, model_fn, x, t)
    out = diffusion_lib.p_mean_variance(d, output, x, t, **options)
    sigma = eta * jnp.sqrt((1.0 - a_s) / (1.0 - a)) * jnp.sqrt(1.0 - a / a_s)
    direction = jnp.sqrt(jnp.maximum(1.0 - a_s - sigma**2, 0.0))
    noise = _step_noise(noise_key, i, x.shape, x.dtype)
    x_s = jnp.sqrt(a_s) * out['pred_x0'] + direction * out['pred_eps'] + sigma * noise
    return x_s.astype(x.dtype), None

  x_start = _initial_sample(d, shape, init_key, x_T)
  steps = (index, jnp.asarray(seq, jnp.int32), a_t, a_prev)
  x0, _ = jax.lax.scan(body, x_start, steps, reverse=True)
  return x0


def respaced_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
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
  _check_diffusion(d)
  _check_shape(shape)
  _check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  num_steps = _check_int_range('num_steps', num_steps, 1, d.num_timesteps)
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
  model_fn: ModelFn,
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
  _check_diffusion(d)
  _check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  shape_a, shape_b = tuple(jnp.shape(x0_a)), tuple(jnp.shape(x0_b))
  if shape_a != shape_b or len(shape_a) < 2:
    raise ValueError(
      f'x0_a and x0_b must have the same shape [B, ...] with at least 2 '
      f'dims, got {shape_a} and {shape_b}.'
    )
  t = _check_int_range('t', t, 0, d.num_timesteps - 1)
  if jnp.ndim(lam) not in (0, 1):
    raise ValueError(f'lam must be a scalar or a 1-D array [L], got shape {jnp.shape(lam)}.')
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  dtype = _sample_dtype(d)
  x0_a, x0_b = jnp.asarray(x0_a, dtype), jnp.asarray(x0_b, dtype)
  encode_key, noise_key = jax.random.split(rng)
  noise = jax.random.normal(encode_key, shape_a, dtype)
  t_vec = _full(shape_a[0], t)
  x_t_a = diffusion_lib.q_sample(d, x0_a, t_vec, noise)
  x_t_b = diffusion_lib.q_sample(d, x0_b, t_vec, noise)

  def decode(weight):
    weight = jnp.asarray(weight, dtype)
    x_t = (1.0 - weight) * x_t_a + weight * x_t_b
    return _ancestral_chain(d, model_fn, x_t, _descending(t), noise_key, options)

  if jnp.ndim(lam) == 0:
    return decode(lam)
  return jax.vmap(decode)(jnp.asarray(lam))


def pc_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
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
  _check_diffusion(d)
  shape = _check_shape(shape)
  _check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  if not _is_int(corrector_steps) or corrector_steps < 0:
    raise ValueError(f'corrector_steps must be an integer >= 0, got {corrector_steps!r}.')
  corrector_steps = int(corrector_steps)
  snr = _check_nonnegative('snr', snr)
  options = dict(
    clip_denoised=clip_denoised, model_mean_type=model_mean_type, model_var_type=model_var_type
  )
  evals_per_t = corrector_steps + 1
  init_key, noise_key = jax.random.split(rng)
  batch = shape[0]
  axes = tuple(range(1, len(shape)))

  def body(x, k):
    t_scalar = d.num_timesteps - 1 - k // evals_per_t
    t = _full(batch, t_scalar)
    output = _call_model(d, model_fn, x, t)
    noise = _step_noise(noise_key, k, x.shape, x.dtype)

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

  x_start = _initial_sample(d, shape, init_key, x_T)
  evaluations = jnp.arange(d.num_timesteps * evals_per_t, dtype=jnp.int32)
  x0, _ = jax.lax.scan(body, x_start, evaluations)
  return x0


# ---------------------------------------------------------------------------
# Multistep solvers of the probability-flow ODE (DPM-Solver++, UniPC).
#
# Both work in data prediction: with alpha_t = sqrt(a_t), sigma_t =
# sqrt(1 - a_t) and lambda_t = log(alpha_t / sigma_t), the ODE's solution from
# s to t is exact in its linear part and integrates the model's x_0 against
# e^{-lambda}, approximated from the last `order` predictions. The timesteps
# and every rule about step orders are those of diffusers' schedulers with
# their defaults, so the samples agree with theirs to float rounding.

SOLVER_ORDERS = (1, 2, 3)
# Where the solvers end: 'zero' denoises to sigma = 0 (x_0) in the last step;
# 'min' stops at timestep 0's sigma and returns x there (diffusers'
# final_sigmas_type 'sigma_min').
FINAL_SIGMAS = ('zero', 'min')


def solver_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The K decreasing timesteps the ODE solvers visit: round(linspace(0, T-1, K+1)) without 0.

  The sample at the last of them is carried to sigma = 0 (x_0) by the final step.
  """
  num_steps = _check_int_range('num_steps', num_steps, 1, num_timesteps)
  return np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def _check_solver_args(
  d,
  shape,
  rng,
  x_T,
  order,
  model_mean_type,
  model_var_type,
  clip_denoised,
  dynamic_threshold,
  final_sigma,
):
  _check_diffusion(d)
  shape = _check_shape(shape)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  if model_mean_type == 'xprev':
    raise ValueError(
      "The ODE solvers need a model of eps, x0 or v; model_mean_type='xprev' "
      'predicts a step of the ancestral chain instead.'
    )
  if not _is_int(order) or order not in SOLVER_ORDERS:
    raise ValueError(f'order must be one of {SOLVER_ORDERS}, got {order!r}.')
  if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
    raise ValueError(f'dynamic_threshold must be a quantile in (0, 1], got {dynamic_threshold!r}.')
  if final_sigma not in FINAL_SIGMAS:
    raise ValueError(
      f'Unknown final_sigma {final_sigma!r}; valid choices: {", ".join(FINAL_SIGMAS)}.'
    )
  if x_T is None:
    _check_rng(rng)
    # The same initial-noise key as every other sampler: one seed, one x_T for all.
    rng = jax.random.split(rng)[0]
  return shape, _initial_sample(d, shape, rng, x_T)


def _solver_tables(
  d: diffusion_lib.Diffusion, timesteps: np.ndarray, dtype: Any, final_sigma: str
) -> tuple[Array, Array, Array]:
  """alpha, sigma and lambda [K + 1] at the visited timesteps, then at the end point."""
  a = jnp.take(d.alphas_cumprod, jnp.asarray(timesteps)).astype(dtype)
  ratio = jnp.sqrt((1.0 - a) / a)  # sigma / alpha, diffusers' "sigma"
  a_0 = d.alphas_cumprod[0].astype(dtype)
  last = jnp.zeros((1,), dtype) if final_sigma == 'zero' else jnp.sqrt((1.0 - a_0) / a_0)[None]
  ratio = jnp.concatenate([ratio, last])
  alpha = 1.0 / jnp.sqrt(jnp.square(ratio) + 1.0)
  sigma = ratio * alpha
  return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)  # lambda = +inf at sigma = 0


def _data_prediction(
  d,
  model_fn,
  x,
  t_scalar,
  alpha,
  sigma,
  model_mean_type,
  model_var_type,
  clip_denoised,
  dynamic_threshold,
):
  """The model's x_0 at (x, t), from whatever it predicts; optionally clipped or thresholded."""
  output = _call_model(d, model_fn, x, _full(x.shape[0], t_scalar))
  mean_out, _ = diffusion_lib.split_model_output(output, x, model_var_type)
  if model_mean_type == 'eps':
    x0 = (x - sigma * mean_out) / alpha
  elif model_mean_type == 'v':
    x0 = alpha * x - sigma * mean_out
  else:
    x0 = mean_out
  if dynamic_threshold is not None:
    # Imagen's dynamic thresholding: per example, s = the quantile of |x_0|
    # (at least 1); clip to [-s, s] and rescale to [-1, 1].
    axes = tuple(range(1, x.ndim))
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * len(axes)).astype(x0.dtype)
    x0 = jnp.clip(x0, -s, s) / s
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0


def _solver_setup(
  d,
  model_fn,
  shape,
  rng,
  x_T,
  num_steps,
  order,
  model_mean_type,
  model_var_type,
  clip_denoised,
  dynamic_threshold,
  final_sigma,
):
  """Checks a solver's arguments; returns shape, x_T, the timesteps, their tables and the x_0 predictor."""
  shape, x_start = _check_solver_args(
    d,
    shape,
    rng,
    x_T,
    order,
    model_mean_type,
    model_var_type,
    clip_denoised,
    dynamic_threshold,
    final_sigma,
  )
  timesteps = solver_timesteps(d.num_timesteps, num_steps)
  tables = _solver_tables(d, timesteps, x_start.dtype, final_sigma)
  predict = functools.partial(
    _data_prediction,
    d,
    model_fn,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    clip_denoised=clip_denoised,
    dynamic_threshold=dynamic_threshold,
  )
  return shape, x_start, timesteps, tables, predict


def _dpm_solver_orders(num_steps: int, order: int, final_sigma: str) -> np.ndarray:
  """The order of each step: lower at the start (warm-up) and at the end, as diffusers does."""
  orders = []
  for i in range(num_steps):
    warm = min(i, order)  # predictions available before this step
    # A step to sigma = 0 is only defined at order 1.
    lower_final = i == num_steps - 1 and (final_sigma == 'zero' or num_steps < 15)
    if order == 1 or warm < 1 or lower_final:
      orders.append(1)
    elif order == 2 or warm < 2 or (i == num_steps - 2 and num_steps < 15):
      orders.append(2)
    else:
      orders.append(3)
  return np.asarray(orders, np.int32)


def _dpm_solver_update(order: int, x, preds, i, tables):
  """One DPM-Solver++ step of `order` from timestep index i to i + 1 (Lu et al. 2022b)."""
  alpha, sigma, lam = tables
  h = lam[i + 1] - lam[i]
  phi = jnp.expm1(-h)
  x_next = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * phi * preds[0]
  if order == 1:
    return x_next
  r0 = (lam[i] - lam[i - 1]) / h
  d1_0 = (preds[0] - preds[1]) / r0
  if order == 2:
    return x_next - 0.5 * alpha[i + 1] * phi * d1_0
  r1 = (lam[i - 1] - lam[i - 2]) / h
  d1_1 = (preds[1] - preds[2]) / r1
  d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
  d2 = (d1_0 - d1_1) / (r0 + r1)
  return (
    x_next
    + alpha[i + 1] * (phi / h + 1.0) * d1
    - alpha[i + 1] * ((phi + h) / jnp.square(h) - 0.5) * d2
  )


def dpm_solver_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
  shape: Sequence[int],
  rng: Array,
  *,
  num_steps: int = 20,
  order: int = 2,
  x_T: Array | None = None,
  clip_denoised: bool = False,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
  dynamic_threshold: float | None = None,
  final_sigma: str = 'zero',
) -> Array:
  """Multistep DPM-Solver++ (Lu et al. 2022b) of the probability-flow ODE, `num_steps` model calls.

  Equal, to float rounding, to diffusers' `DPMSolverMultistepScheduler(
  algorithm_type='dpmsolver++', solver_order=order)` with its other defaults
  (linspace timesteps, lower-order final steps, final sigma 0) on the same
  betas, x_T and model. Deterministic given x_T.

  Args:
    d: the process (T steps; may be respaced).
    model_fn: as in `p_sample_loop`; called once per step.
    shape: static sample shape (B, ...).
    rng: a PRNG key for x_T ~ N(0, I); unused when `x_T` is given.
    num_steps: K in [1, T], the number of model calls.
    order: 1, 2 or 3 (1 is DDIM with eta = 0 on these timesteps).
    x_T: optional starting sample of `shape`.
    clip_denoised: clip each predicted x_0 to [-1, 1].
    model_mean_type: 'eps', 'x0' or 'v'.
    model_var_type: any of `diffusion.MODEL_VAR_TYPES`; only a learned
      variance's mean channels are used.
    dynamic_threshold: optional quantile p in (0, 1] for Imagen's dynamic
      thresholding of the predicted x_0 (e.g. 0.995).
    final_sigma: 'zero' (default) ends with x_0; 'min' ends at timestep 0
      and returns x_0's noisy neighbour there (diffusers' 'sigma_min').

  Returns:
    x_0 of `shape`.
  """
  shape, x_start, timesteps, tables, predict = _solver_setup(
    d,
    model_fn,
    shape,
    rng,
    x_T,
    num_steps,
    order,
    model_mean_type,
    model_var_type,
    clip_denoised,
    dynamic_threshold,
    final_sigma,
  )
  alpha, sigma, _ = tables
  updates = [functools.partial(_dpm_solver_update, k) for k in range(1, order + 1)]

  def body(carry, step):
    x, preds = carry  # preds: the x_0 predictions of the last `order` steps, newest first
    i, t_scalar, step_order = step
    x0 = predict(x, t_scalar, alpha[i], sigma[i])
    preds = jnp.concatenate([x0[None], preds[:-1]])
    x_next = jax.lax.switch(step_order - 1, updates, x, preds, i, tables)
    return (x_next.astype(x.dtype), preds), None

  steps = (
    jnp.arange(len(timesteps), dtype=jnp.int32),
    jnp.asarray(timesteps, jnp.int32),
    jnp.asarray(_dpm_solver_orders(len(timesteps), order, final_sigma)),
  )
  init = (x_start, jnp.zeros((order,) + shape, x_start.dtype))
  (x0, _), _ = jax.lax.scan(body, init, steps)
  return x0


def _unipc_update(
  order: int,
  corrector: bool,
  x,
  m0,
  older,
  lam_t,
  lam_s0,
  lam_older,
  alpha_t,
  sigma_t,
  sigma_s0,
  model_t=None,
):
  """UniP (predictor) or UniC (corrector) of `order` with B(h) = e^h - 1 (Zhao et al. 2023, bh2).

  `m0` is the x_0 prediction at s0, `older[k]` (lambda `lam_older[k]`) the
  one k + 1 steps before it; the corrector also takes `model_t`, the
  prediction at the new point.
  """
  hh = -(lam_t - lam_s0)
  h_phi_1 = jnp.expm1(hh)
  b_h = h_phi_1
  x_next = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * m0
  # b_k = h phi_{k+1}(h) k! / B(h); R[k, j] = r_j^k with r = (rks..., 1).
  h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1.0, []
  for k in range(1, order + 1):
    b.append(h_phi_k * factorial / b_h)
    factorial *= k + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  rks = [(lam_older[k] - lam_s0) / (lam_t - lam_s0) for k in range(order - 1)]
  d1s = [(older[k] - m0) / rks[k] for k in range(order - 1)]
  rows = [jnp.stack([r**k for r in rks + [jnp.ones_like(lam_t)]]) for k in range(order)]
  if not corrector:
    if order == 1:
      return x_next
    if order == 2:
      rhos = [0.5]
    else:
      rhos = list(jnp.linalg.solve(jnp.stack(rows[:-1])[:, :-1], jnp.stack(b[:-1])))
    return x_next - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, d1s))
  rhos = [0.5] if order == 1 else list(jnp.linalg.solve(jnp.stack(rows), jnp.stack(b)))
  correction = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), jnp.zeros_like(x))
  return x_next - alpha_t * b_h * (correction + rhos[-1] * (model_t - m0))


def _unipc_orders(num_steps: int, order: int) -> np.ndarray:
  """The predictor order of each step: min(order, steps left, predictions so far + 1)."""
  return np.asarray([min(order, num_steps - i, i + 1) for i in range(num_steps)], np.int32)


def unipc_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: ModelFn,
  shape: Sequence[int],
  rng: Array,
  *,
  num_steps: int = 10,
  order: int = 2,
  x_T: Array | None = None,
  clip_denoised: bool = False,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
  dynamic_threshold: float | None = None,
  final_sigma: str = 'zero',
) -> Array:
  """UniPC (Zhao et al. 2023; bh2, data prediction): a multistep predictor-corrector ODE solver.

  Each step's model call also corrects the previous step (UniC) before
  predicting the next (UniP), so K steps cost K model calls. Equal, to float
  rounding, to diffusers' `UniPCMultistepScheduler(solver_order=order)` with
  its other defaults on the same betas, x_T and model.

  Args:
    d, model_fn, shape, rng, x_T, clip_denoised, model_mean_type,
    model_var_type, dynamic_threshold, final_sigma: as in `dpm_solver_sample_loop`.
    num_steps: K in [1, T], the number of model calls.
    order: 1, 2 or 3, the predictor's order (the corrector's is one more).

  Returns:
    x_0 of `shape`.
  """
  shape, x_start, timesteps, tables, predict = _solver_setup(
    d,
    model_fn,
    shape,
    rng,
    x_T,
    num_steps,
    order,
    model_mean_type,
    model_var_type,
    clip_denoised,
    dynamic_threshold,
    final_sigma,
  )
  alpha, sigma, lam = tables
  orders = _unipc_orders(len(timesteps), order)

  def at(table, i):
    return table[jnp.maximum(i, 0)]

  def predictor(k):
    def update(x, preds, i, _):
      older = [preds[j] for j in range(1, k)]
      return _unipc_update(
        k,
        False,
        x,
        preds[0],
        older,
        lam[i + 1],
        lam[i],
        [at(lam, i - j) for j in range(1, k)],
        alpha[i + 1],
        sigma[i + 1],
        sigma[i],
      )

    return update

  def corrector(k):
    def update(x, last_x, preds, i, x0):
      # Corrects x_i, predicted from last_x at i - 1, with the new prediction x0.
      older = [preds[j] for j in range(1, k)]
      return _unipc_update(
        k,
        True,
        last_x,
        preds[0],
        older,
        lam[i],
        at(lam, i - 1),
        [at(lam, i - 1 - j) for j in range(1, k)],
        alpha[i],
        sigma[i],
        at(sigma, i - 1),
        model_t=x0,
      )

    return update

  correctors = [lambda x, *_: x] + [corrector(k) for k in range(1, order + 1)]
  predictors = [predictor(k) for k in range(1, order + 1)]

  def body(carry, step):
    x, last_x, preds = carry  # preds: the last `order` x_0 predictions, newest first
    i, t_scalar, step_order, previous_order = step
    x0 = predict(x, t_scalar, alpha[i], sigma[i])
    x = jax.lax.switch(previous_order, correctors, x, last_x, preds, i, x0).astype(x.dtype)
    preds = jnp.concatenate([x0[None], preds[:-1]])
    x_next = jax.lax.switch(step_order - 1, predictors, x, preds, i, None)
    return (x_next.astype(x.dtype), x, preds), None

  steps = (
    jnp.arange(len(timesteps), dtype=jnp.int32),
    jnp.asarray(timesteps, jnp.int32),
    jnp.asarray(orders),
    jnp.asarray(np.concatenate([[0], orders[:-1]]), jnp.int32),
  )
  init = (x_start, x_start, jnp.zeros((order,) + shape, x_start.dtype))
  (x0, _, _), _ = jax.lax.scan(body, init, steps)
  return x0
