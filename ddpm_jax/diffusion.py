"""The DDPM forward and reverse processes as pure, model-agnostic functions.

A `Diffusion` is a pytree of precomputed tables (float64 NumPy, then cast).
Every function here takes it as its first argument, works for images of any
shape [B, ...] (NHWC in this project), and is safe under `jax.jit` and
`jax.vmap`. Timesteps are 0-indexed int arrays of shape [B]: t = 0 is the
paper's t = 1, as in the original code.

A denoiser enters only through its output (`p_mean_variance`, `p_sample`):
the training objectives that call a model live in `ddpm_jax.losses`, the
bound in `ddpm_jax.likelihood`.

Mean types (what the model predicts): 'eps' (the noise, the paper's choice),
'x0', 'v' (v = sqrt(a) eps - sqrt(1 - a) x0, Salimans & Ho 2022) and 'xprev'
(the posterior mean itself). Variance types: 'fixedlarge' (beta_t, the
paper's CIFAR-10 choice), 'fixedsmall' (the posterior variance), and the
learned 'learned' (log-variance) and 'learned_range' (interpolation between
the two, improved DDPM); learned ones take 2*C output channels, the mean
channels first.
"""

from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import schedules

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

MODEL_MEAN_TYPES = ('eps', 'x0', 'v', 'xprev')
MODEL_VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')


class ScheduleSpec(NamedTuple):
  """How a Diffusion's tables were made; kept so it can be respaced exactly."""

  beta_schedule: str
  num_timesteps: int
  beta_start: float
  beta_end: float


@flax.struct.dataclass
class Diffusion:
  """Precomputed tables of a diffusion process, each of shape [T].

  `timestep_map` maps this process's step index to the timestep the model was
  trained with: the identity for an ordinary process, the kept timesteps for
  a respaced one (`respace`). Every call of a model goes through it.
  """

  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  fixedlarge_variance: Array
  fixedlarge_log_variance: Array
  log_betas: Array
  timestep_map: Array
  spec: ScheduleSpec = flax.struct.field(pytree_node=False)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def _tables_from_betas(betas: np.ndarray) -> dict[str, np.ndarray]:
  """All tables in float64, from betas [T] (the original's formulas)."""
  betas = np.asarray(betas, dtype=np.float64)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
  # The posterior variance is 0 at t = 0; its log is clipped to the value at
  # t = 1 (the original does the same), and 'fixedlarge' uses it there too.
  clipped = (
    np.append(posterior_variance[1], posterior_variance[1:])
    if len(betas) > 1
    else (np.maximum(posterior_variance, 1e-20))
  )
  fixedlarge = np.append(posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
  with np.errstate(divide='ignore'):
    return dict(
      betas=betas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(clipped),
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      fixedlarge_variance=fixedlarge,
      fixedlarge_log_variance=np.log(fixedlarge),
      log_betas=np.log(betas),
    )


def _check_dtype(dtype: Any) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16):
    raise ValueError(f'dtype must be a floating dtype (float32, float64, ...), got {dtype}.')
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError(
      "dtype=float64 needs jax_enable_x64: call jax.config.update('jax_enable_x64', True) first."
    )
  return dtype


def _build(spec: ScheduleSpec, dtype: Any, use_timesteps: np.ndarray | None) -> Diffusion:
  dtype = _check_dtype(dtype)
  betas = schedules.get_beta_schedule(*spec)
  timestep_map = np.arange(spec.num_timesteps)
  if use_timesteps is not None:
    # Respacing keeps a subset S of the timesteps and chooses new betas so that
    # the kept alphas_cumprod are unchanged: beta'_i = 1 - ac[s_i] / ac[s_{i-1}].
    ac = np.cumprod(1.0 - betas)[use_timesteps]
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    timestep_map = np.asarray(use_timesteps)
  tables = {k: jnp.asarray(v, dtype=dtype) for k, v in _tables_from_betas(betas).items()}
  return Diffusion(**tables, timestep_map=jnp.asarray(timestep_map, jnp.int32), spec=spec)


def make_diffusion(
  beta_schedule: str = 'linear',
  num_timesteps: int = 1000,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  dtype: Any = jnp.float32,
) -> Diffusion:
  """Builds the tables of a diffusion process.

  Args:
    beta_schedule: one of `schedules.BETA_SCHEDULES` ('linear', 'quad',
      'const', 'jsd', 'warmup10', 'warmup50', 'cosine', 'sigmoid').
    num_timesteps: T.
    beta_start: first beta of the range-based schedules.
    beta_end: last beta of the range-based schedules.
    dtype: dtype of the tables; float64 needs `jax_enable_x64`.

  Returns:
    A `Diffusion` whose tables are computed in float64 and cast to `dtype`.

  Raises:
    ValueError: unknown schedule, invalid range or dtype.
  """
  spec = ScheduleSpec(beta_schedule, int(num_timesteps), float(beta_start), float(beta_end))
  return _build(spec, dtype, None)


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced subset of K of T timesteps, always keeping 0 and T-1.

  Args:
    num_timesteps: T.
    num_steps: K, with 1 <= K <= T.

  Returns:
    int array [K], increasing.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps}.')
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)


def respace(d: Diffusion, use_timesteps: Sequence[int]) -> Diffusion:
  """Respaced process over a subset of timesteps (improved DDPM, Sec. 4).

  The new process has K = len(use_timesteps) steps whose alphas_cumprod equal
  the original's at those timesteps; its `timestep_map` sends step i to
  use_timesteps[i], so a model trained on the full process is called with the
  timesteps it knows. Tables are recomputed in float64 from the schedule.

  Args:
    d: the full process (not itself respaced).
    use_timesteps: strictly increasing ints in [0, T).

  Returns:
    The respaced `Diffusion`.
  """
  use = np.asarray(use_timesteps, dtype=np.int64)
  if d.timestep_map.shape[0] != d.spec.num_timesteps:
    raise ValueError('respace() takes the full process, not an already respaced one.')
  if (
    use.ndim != 1
    or use.size == 0
    or np.any(np.diff(use) <= 0)
    or use[0] < 0
    or (use[-1] >= d.spec.num_timesteps)
  ):
    raise ValueError(
      'use_timesteps must be strictly increasing integers in '
      f'[0, {d.spec.num_timesteps}), got {use_timesteps!r}.'
    )
  return _build(d.spec, d.betas.dtype, use)


# ---------------------------------------------------------------------------
# Input checks and table look-ups.


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f'Unknown {name} {value!r}; valid choices: {", ".join(choices)}.')


def check_model_options(
  model_mean_type: str = 'eps', model_var_type: str = 'fixedlarge', clip_denoised: bool = False
) -> None:
  """Raises ValueError, naming the valid choices, for a bad model-output option.

  The one check of the options every sampler, loss and bound takes: what the
  model predicts (`MODEL_MEAN_TYPES`), its variance (`MODEL_VAR_TYPES`) and
  whether the predicted x_0 is clipped to [-1, 1].
  """
  if not isinstance(clip_denoised, (bool, np.bool_)):
    raise ValueError(f'clip_denoised must be True or False, got {clip_denoised!r}.')
  _check_choice('model_mean_type', model_mean_type, MODEL_MEAN_TYPES)
  _check_choice('model_var_type', model_var_type, MODEL_VAR_TYPES)


def _check_same_shape(**arrays: Array) -> None:
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f'Shape mismatch: {shapes}; these arrays must have the same shape.')


def _check_timesteps(d: Diffusion, t: Array, x: Array) -> None:
  """Shape check always; range check whenever t is concrete (outside jit)."""
  t_shape = jnp.shape(t)
  if len(t_shape) != 1 or t_shape[0] != jnp.shape(x)[0]:
    raise ValueError(
      f't must have shape [B] = [{jnp.shape(x)[0]}] to match x of shape '
      f'{tuple(jnp.shape(x))}, got {tuple(t_shape)}.'
    )
  if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
    raise ValueError(f't must be an integer array, got dtype {jnp.result_type(t)}.')
  try:
    t_np = np.asarray(t)
  except jax.errors.TracerArrayConversionError:
    return  # Traced: out-of-range values turn into NaN in `_extract` instead.
  if t_np.size and (t_np.min() < 0 or t_np.max() >= d.num_timesteps):
    raise ValueError(
      f'Timesteps must lie in [0, {d.num_timesteps}), got values from {t_np.min()} to {t_np.max()}.'
    )


def _extract(table: Array, t: Array, ndim: int) -> Array:
  """table[t] shaped [B, 1, ..., 1] to broadcast against an array of rank ndim."""
  # Out-of-range traced timesteps give NaN rather than JAX's silent clamping;
  # negative ones are moved past the end first, since take() wraps them.
  t = jnp.where(t < 0, table.shape[0], t)
  values = jnp.take(table, t, mode='fill', fill_value=jnp.nan)
  return values.reshape(values.shape + (1,) * (ndim - 1))


def _coef(d: Diffusion, name: str, t: Array, x: Array) -> Array:
  return _extract(getattr(d, name), t, jnp.ndim(x)).astype(x.dtype)


# ---------------------------------------------------------------------------
# Forward process q.


def q_mean_variance(d: Diffusion, x0: Array, t: Array) -> tuple[Array, Array, Array]:
  """Moments of q(x_t | x_0) = N(sqrt(ac_t) x_0, (1 - ac_t) I).

  Args:
    d: the process.
    x0: clean data [B, ...].
    t: int timesteps [B].

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]).
  """
  _check_timesteps(d, t, x0)
  mean = _coef(d, 'sqrt_alphas_cumprod', t, x0) * x0
  # From the float64-built sqrt table: 1 - ac in float32 loses ~1e-4 relative
  # precision at small t.
  variance = jnp.square(_coef(d, 'sqrt_one_minus_alphas_cumprod', t, x0))
  return mean, variance, jnp.log(variance)


def q_sample(d: Diffusion, x0: Array, t: Array, noise: Array) -> Array:
  """Draws x_t ~ q(x_t | x_0) in closed form: sqrt(ac_t) x_0 + sqrt(1 - ac_t) noise.

  Args:
    d: the process.
    x0: clean data [B, ...].
    t: int timesteps [B].
    noise: standard normal noise, same shape as x0.

  Returns:
    x_t [B, ...].
  """
  _check_same_shape(x0=x0, noise=noise)
  _check_timesteps(d, t, x0)
  return (
    _coef(d, 'sqrt_alphas_cumprod', t, x0) * x0
    + _coef(d, 'sqrt_one_minus_alphas_cumprod', t, x0) * noise
  )


def q_posterior(d: Diffusion, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
  """Moments of the forward posterior q(x_{t-1} | x_t, x_0) (paper Eq. 6-7).

  Args:
    d: the process.
    x0: clean data [B, ...].
    x_t: noisy data [B, ...].
    t: int timesteps [B].

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...]).
  """
  _check_same_shape(x0=x0, x_t=x_t)
  _check_timesteps(d, t, x_t)
  mean = (
    _coef(d, 'posterior_mean_coef1', t, x_t) * x0 + _coef(d, 'posterior_mean_coef2', t, x_t) * x_t
  )
  return (
    mean,
    _coef(d, 'posterior_variance', t, x_t),
    _coef(d, 'posterior_log_variance_clipped', t, x_t),
  )


# ---------------------------------------------------------------------------
# Conversions between parameterizations.


def predict_x0_from_eps(d: Diffusion, x_t: Array, t: Array, eps: Array) -> Array:
  """x_0 = sqrt(1/ac_t) x_t - sqrt(1/ac_t - 1) eps. Shapes: [B, ...]."""
  _check_same_shape(x_t=x_t, eps=eps)
  _check_timesteps(d, t, x_t)
  return (
    _coef(d, 'sqrt_recip_alphas_cumprod', t, x_t) * x_t
    - _coef(d, 'sqrt_recipm1_alphas_cumprod', t, x_t) * eps
  )


def predict_eps_from_x0(d: Diffusion, x_t: Array, t: Array, x0: Array) -> Array:
  """eps = (sqrt(1/ac_t) x_t - x_0) / sqrt(1/ac_t - 1). Shapes: [B, ...]."""
  _check_same_shape(x_t=x_t, x0=x0)
  _check_timesteps(d, t, x_t)
  return (_coef(d, 'sqrt_recip_alphas_cumprod', t, x_t) * x_t - x0) / _coef(
    d, 'sqrt_recipm1_alphas_cumprod', t, x_t
  )


def v_target(d: Diffusion, x0: Array, t: Array, noise: Array) -> Array:
  """v = sqrt(ac_t) noise - sqrt(1 - ac_t) x_0 (Salimans & Ho 2022). Shapes: [B, ...]."""
  _check_same_shape(x0=x0, noise=noise)
  _check_timesteps(d, t, x0)
  return (
    _coef(d, 'sqrt_alphas_cumprod', t, x0) * noise
    - _coef(d, 'sqrt_one_minus_alphas_cumprod', t, x0) * x0
  )


def predict_x0_from_v(d: Diffusion, x_t: Array, t: Array, v: Array) -> Array:
  """x_0 = sqrt(ac_t) x_t - sqrt(1 - ac_t) v. Shapes: [B, ...]."""
  _check_same_shape(x_t=x_t, v=v)
  _check_timesteps(d, t, x_t)
  return (
    _coef(d, 'sqrt_alphas_cumprod', t, x_t) * x_t
    - _coef(d, 'sqrt_one_minus_alphas_cumprod', t, x_t) * v
  )


def predict_x0_from_xprev(d: Diffusion, x_t: Array, t: Array, xprev: Array) -> Array:
  """Inverts the posterior mean: x_0 = (x_{t-1} - coef2 x_t) / coef1. Shapes: [B, ...]."""
  _check_same_shape(x_t=x_t, xprev=xprev)
  _check_timesteps(d, t, x_t)
  return (xprev - _coef(d, 'posterior_mean_coef2', t, x_t) * x_t) / _coef(
    d, 'posterior_mean_coef1', t, x_t
  )


def score_from_eps(d: Diffusion, eps: Array, t: Array) -> Array:
  """Score of q(x_t): grad log q(x_t) = -eps / sqrt(1 - ac_t). Shapes: [B, ...]."""
  _check_timesteps(d, t, eps)
  return -eps / _coef(d, 'sqrt_one_minus_alphas_cumprod', t, eps)


def _is_respaced(d: Diffusion) -> bool:
  return d.timestep_map.shape[0] != d.spec.num_timesteps


def _x0_from_full_process_xprev(d: Diffusion, x_t: Array, t: Array, xprev: Array) -> Array:
  """x_0 from an x_{t-1} prediction of d's full process, at its timesteps timestep_map[t]."""
  full = _tables_from_betas(schedules.get_beta_schedule(*d.spec))
  full_t = jnp.take(d.timestep_map, t)
  coef1 = _extract(jnp.asarray(full['posterior_mean_coef1'], x_t.dtype), full_t, x_t.ndim)
  coef2 = _extract(jnp.asarray(full['posterior_mean_coef2'], x_t.dtype), full_t, x_t.ndim)
  return (xprev - coef2 * x_t) / coef1


# ---------------------------------------------------------------------------
# Reverse process p.


def split_model_output(
  model_output: Array, x_t: Array, model_var_type: str
) -> tuple[Array, Array | None]:
  """Splits a model output into its mean part and (learned) variance part.

  Args:
    model_output: [B, ..., C] or [B, ..., 2C] for the learned variance types.
    x_t: [B, ..., C], the model's input.
    model_var_type: one of `MODEL_VAR_TYPES`.

  Returns:
    (mean_output [B, ..., C], var_output [B, ..., C] or None).
  """
  _check_choice('model_var_type', model_var_type, MODEL_VAR_TYPES)
  x_shape, out_shape = tuple(jnp.shape(x_t)), tuple(jnp.shape(model_output))
  if model_var_type in ('learned', 'learned_range'):
    want = x_shape[:-1] + (2 * x_shape[-1],)
    if out_shape != want:
      raise ValueError(
        f'model_var_type={model_var_type!r} needs a model output of shape '
        f'{want} (2*C channels: mean, then variance), got {out_shape}.'
      )
    return jnp.split(model_output, 2, axis=-1)
  if out_shape != x_shape:
    raise ValueError(
      f'model_var_type={model_var_type!r} needs a model output of the '
      f'input shape {x_shape}, got {out_shape}.'
    )
  return model_output, None


def p_mean_variance(
  d: Diffusion,
  model_output: Array,
  x_t: Array,
  t: Array,
  *,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
  clip_denoised: bool = True,
) -> dict[str, Array]:
  """Mean and variance of p(x_{t-1} | x_t) from a model's output.

  Args:
    d: the process.
    model_output: the model's output at (x_t, t); see `split_model_output`.
    x_t: [B, ..., C].
    t: int timesteps [B].
    model_mean_type: one of `MODEL_MEAN_TYPES`.
    model_var_type: one of `MODEL_VAR_TYPES`.
    clip_denoised: clip the predicted x_0 to [-1, 1] before taking the
      posterior mean (the original's sampling and evaluation default).

  Returns:
    dict with 'mean' [B, ..., C], 'variance' and 'log_variance' (broadcastable
    to [B, ..., C]: [B, 1, ..., 1] for the fixed types), 'pred_x0' and
    'pred_eps' (the noise implied by the possibly clipped pred_x0) [B, ..., C].
  """
  _check_choice('model_mean_type', model_mean_type, MODEL_MEAN_TYPES)
  _check_timesteps(d, t, x_t)
  mean_out, var_out = split_model_output(model_output, x_t, model_var_type)

  if model_var_type == 'fixedlarge':
    log_variance = _coef(d, 'fixedlarge_log_variance', t, x_t)
  elif model_var_type == 'fixedsmall':
    log_variance = _coef(d, 'posterior_log_variance_clipped', t, x_t)
  elif model_var_type == 'learned':
    log_variance = var_out
  else:  # learned_range: the output in [-1, 1] interpolates the two fixed choices.
    frac = (var_out + 1.0) / 2.0
    log_variance = frac * _coef(d, 'log_betas', t, x_t) + (1.0 - frac) * _coef(
      d, 'posterior_log_variance_clipped', t, x_t
    )
  variance = jnp.exp(log_variance)

  maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
  if model_mean_type == 'xprev' and _is_respaced(d):
    # The model predicts the full process's one-step posterior mean, not the
    # respaced step's: read it with the full process's coefficients, then
    # take the respaced step from the x_0 it implies.
    pred_x0 = maybe_clip(_x0_from_full_process_xprev(d, x_t, t, mean_out))
    mean, _, _ = q_posterior(d, pred_x0, x_t, t)
  elif model_mean_type == 'xprev':
    pred_x0 = maybe_clip(predict_x0_from_xprev(d, x_t, t, mean_out))
    mean = mean_out
  else:
    if model_mean_type == 'eps':
      pred_x0 = predict_x0_from_eps(d, x_t, t, mean_out)
    elif model_mean_type == 'x0':
      pred_x0 = mean_out
    else:
      pred_x0 = predict_x0_from_v(d, x_t, t, mean_out)
    pred_x0 = maybe_clip(pred_x0)
    mean, _, _ = q_posterior(d, pred_x0, x_t, t)
  pred_eps = predict_eps_from_x0(d, x_t, t, pred_x0)
  return dict(
    mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, pred_eps=pred_eps
  )


def p_sample(
  d: Diffusion,
  model_output: Array,
  x_t: Array,
  t: Array,
  noise: Array,
  *,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
  clip_denoised: bool = True,
) -> Array:
  """One reverse step: x_{t-1} = mean + exp(log_variance / 2) noise, no noise at t = 0.

  Args:
    d: the process.
    model_output: the model's output at (x_t, t).
    x_t: [B, ..., C].
    t: int timesteps [B].
    noise: standard normal, shape of x_t.
    model_mean_type, model_var_type, clip_denoised: as in `p_mean_variance`.

  Returns:
    x_{t-1} [B, ..., C].
  """
  _check_same_shape(x_t=x_t, noise=noise)
  out = p_mean_variance(
    d,
    model_output,
    x_t,
    t,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    clip_denoised=clip_denoised,
  )
  nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
