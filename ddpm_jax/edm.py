"""EDM (Karras et al. 2022): preconditioning, loss and the Heun sampler beside DDPM.

"Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364) writes every diffusion model as a denoiser D(x, sigma)
of x = x_0 + sigma * n, n ~ N(0, I), and samples by integrating the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma_max
down to 0. The formulas here are the paper's (Tables 1 and 2, Algorithm 2)
as its reference code states them (NVlabs/edm: `edm_sampler` in generate.py,
`EDMLoss` in training/loss.py, `EDMPrecond` and `iDDPMPrecond` in
training/networks.py).

  * `sigma_steps`: the noise levels of the sampler, uniform in sigma^(1/rho).
  * `precondition`: D from a raw network F with EDM's c_skip, c_out, c_in
    and c_noise, for models trained the EDM way.
  * `loss`: EDM's weighted denoising loss at given noise levels.
  * `sample`: Algorithm 2 (Heun, Euler on the last step, optional churn).
  * `denoiser_from_diffusion`: D of a model trained as a discrete DDPM, so
    `sample` also runs on every model this project has trained.
  * `sample_loop`: `sample` on either kind of model, as the sampler table's
    'edm' row (ddpm_jax/sampler_table.py).

Signatures. A denoiser is `denoiser(x, sigma, *args) -> D`: x [B, ...],
sigma a scalar or one level per example [B], D of x's shape and dtype; the
extra positional `args` (a class label [B], say) reach the network
unchanged. A raw EDM network is `net_fn(x_in, c_noise, *args)` with
c_noise [B]; a DDPM model is this project's `model_fn(x_t, t, *args)` with
int32 timesteps t [B]. `sample` calls `denoiser(x, sigma)` with sigma [B]:
bind labels (and guidance) in a closure first.

Randomness in `sample` follows `chain`: `rng` splits once into an
initial-noise key and a step key, and the churn noise of step i is
`jax.random.normal(fold_in(step_key, i), shape)`.
"""

import math
import numbers
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import chain
from ddpm_jax import diffusion as diffusion_lib

Array = jax.Array
Denoiser = Callable[..., Array]


# ---------------------------------------------------------------------------
# Argument checks (static Python values, before any tracing).


def _check_positive(name: str, value: Any) -> float:
  """A static, finite real number > 0."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f'{name} must be a positive Python number, got {value!r}.')
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}.')
  return value


def _check_churn(S_churn: Any, S_min: Any, S_max: Any, S_noise: Any) -> tuple[float, ...]:
  """The churn settings as floats; S_max may be +inf (churn at every level above S_min)."""
  S_churn = chain.check_nonnegative('S_churn', S_churn)
  S_min = chain.check_nonnegative('S_min', S_min)
  S_noise = chain.check_nonnegative('S_noise', S_noise)
  if isinstance(S_max, bool) or not isinstance(S_max, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f'S_max must be a Python number (float("inf") allowed), got {S_max!r}.')
  S_max = float(S_max)
  if math.isnan(S_max) or S_max < S_min:
    raise ValueError(f'S_max must be a number >= S_min = {S_min}, got {S_max!r}.')
  return S_churn, S_min, S_max, S_noise


def _sigma_column(sigma: Any, x: Array) -> tuple[Array, Array]:
  """sigma (a scalar or [B]) as a column [B, 1, ...] that broadcasts against x, and as [B]."""
  sigma = jnp.asarray(sigma)
  batch = jnp.shape(x)[0]
  if sigma.shape not in ((), (batch,)):
    raise ValueError(
      f'sigma must be a scalar or one noise level per example, shape [B] = ({batch},), '
      f'got shape {tuple(sigma.shape)}.'
    )
  sigma = jnp.broadcast_to(sigma.astype(x.dtype), (batch,))
  return sigma.reshape((batch,) + (1,) * (jnp.ndim(x) - 1)), sigma


def _output_like(output: Any, x: Array, what: str) -> Array:
  """A network's output checked against x's shape and cast to x's dtype (the scan's carry)."""
  output = jnp.asarray(output)
  if output.shape != jnp.shape(x):
    raise ValueError(
      f'{what} must return an array of the input shape {x.shape}, got {output.shape}.'
    )
  return output.astype(x.dtype)


# ---------------------------------------------------------------------------
# Noise levels, preconditioning and loss.


def sigma_steps(
  num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
  """The sampler's noise levels: N levels uniform in sigma^(1/rho), then 0.

  sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
  for i = 0 .. N-1 (EDM Eq. 5, `edm_sampler`'s `t_steps`), and sigma_N = 0.
  One step (N = 1) goes from sigma_max straight to 0.

  Args:
    num_steps: N >= 1.
    sigma_min: the last nonzero level, > 0.
    sigma_max: the first level, > sigma_min.
    rho: > 0; larger values put more steps at low noise (EDM uses 7).

  Returns:
    float64 NumPy array [N + 1], decreasing, ending in 0.

  Raises:
    ValueError: for num_steps < 1, sigma_min >= sigma_max, or a level or rho
      that is not a finite positive number.
  """
  if not chain.is_int(num_steps) or num_steps < 1:
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
  sigma_min = _check_positive('sigma_min', sigma_min)
  sigma_max = _check_positive('sigma_max', sigma_max)
  rho = _check_positive('rho', rho)
  if sigma_min >= sigma_max:
    raise ValueError(f'sigma_min must be < sigma_max, got {sigma_min} and {sigma_max}.')
  ramp = np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1)
  levels = (
    sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
  ) ** rho
  return np.append(levels, 0.0)


def precondition(net_fn: Callable[..., Array], *, sigma_data: float = 0.5) -> Denoiser:
  """EDM's denoiser around a raw network: D = c_skip x + c_out F(c_in x, c_noise).

  With s = sigma_data (EDM Table 1, `EDMPrecond`): c_skip = s^2 / (sigma^2 + s^2),
  c_out = sigma s / sqrt(sigma^2 + s^2), c_in = 1 / sqrt(sigma^2 + s^2),
  c_noise = ln(sigma) / 4. They keep the network's input and training target
  at unit variance for data of standard deviation s.

  Args:
    net_fn: `net_fn(x_in, c_noise, *args) -> F`, x_in [B, ...], c_noise [B]
      in the input's dtype, F of x_in's shape (any float dtype). Our U-Net
      fits with c_noise fed to its timestep input.
    sigma_data: s > 0, the data's standard deviation (0.5 for images in [-1, 1]).

  Returns:
    `denoiser(x, sigma, *args) -> D`: x [B, ...], sigma a scalar or [B] (> 0),
    D of x's shape and dtype.

  Raises:
    ValueError: for a sigma_data that is not a finite positive number; the
      denoiser raises it for a sigma of another shape than () or [B].
  """
  sigma_data = _check_positive('sigma_data', sigma_data)

  def denoiser(x: Array, sigma: Any, *args: Any) -> Array:
    column, per_example = _sigma_column(sigma, x)
    total = jnp.square(column) + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = column * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    c_noise = jnp.log(per_example) / 4
    output = _output_like(net_fn(c_in * x, c_noise, *args), x, 'net_fn')
    return c_skip * x + c_out * output

  return denoiser


def loss(
  denoiser: Denoiser,
  x0: Array,
  sigma: Any,
  noise: Array,
  *args: Any,
  sigma_data: float = 0.5,
) -> Array:
  """EDM's weighted denoising loss, elementwise (`EDMLoss` for given sigma and noise).

  lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2 with lambda = (sigma^2 + s^2) / (sigma s)^2
  (EDM Table 1), which makes the loss of `precondition`'s D equal to
  |F - F_target|^2 at unit weight. The trainer draws sigma (log-normal,
  ln sigma ~ N(P_mean, P_std^2), EDM's -1.2 and 1.2) and reduces the result.

  Args:
    denoiser: `denoiser(x, sigma, *args)`, e.g. from `precondition`.
    x0: clean data [B, ...].
    sigma: noise levels, a scalar or [B], > 0.
    noise: standard normal noise, x0's shape.
    *args: passed to the denoiser after sigma (a class label [B], say).
    sigma_data: s > 0, as in `precondition`.

  Returns:
    The weighted squared error [B, ...] in x0's dtype.

  Raises:
    ValueError: for noise of another shape than x0, a sigma of another shape
      than () or [B], or a bad sigma_data.
  """
  sigma_data = _check_positive('sigma_data', sigma_data)
  if jnp.shape(noise) != jnp.shape(x0):
    raise ValueError(f'noise must have the shape of x0 {jnp.shape(x0)}, got {jnp.shape(noise)}.')
  x0 = jnp.asarray(x0)
  column, _ = _sigma_column(sigma, x0)
  weight = (jnp.square(column) + sigma_data**2) / jnp.square(column * sigma_data)
  denoised = _output_like(denoiser(x0 + column * noise, sigma, *args), x0, 'denoiser')
  return weight * jnp.square(denoised - x0)


# ---------------------------------------------------------------------------
# The sampler.


def _evaluation_plan(
  levels: np.ndarray, churn: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per denoiser call k = 0 .. 2N-2 (float64): its step, stage, sigma, step size, churn scale.

  Step i's first call (the Euler stage) evaluates D at (x_hat, t_hat); its
  second (the correction, all steps but the last) at (x_next, t_next).
  """
  S_churn, S_min, S_max, S_noise = churn
  num_steps = len(levels) - 1
  t_cur, t_next = levels[:-1], levels[1:]
  in_range = (S_min <= t_cur) & (t_cur <= S_max)
  gamma = np.where(in_range, min(S_churn / num_steps, math.sqrt(2) - 1), 0.0)
  t_hat = t_cur + gamma * t_cur
  noise_scale = np.sqrt(t_hat**2 - t_cur**2) * S_noise
  step = np.repeat(np.arange(num_steps), 2)[:-1]
  first = np.tile([True, False], num_steps)[:-1]
  sigma = np.where(first, t_hat[step], t_next[step])
  return step, first, sigma, (t_next - t_hat)[step], np.where(first, noise_scale[step], 0.0)


def initial_sample(shape: tuple[int, ...], rng: Array, x_T: Any, scale: float) -> Array:
  """scale * N(0, I) in float32 from `rng`, or the given x_T (checked; its float dtype kept)."""
  if x_T is None:
    return scale * jax.random.normal(rng, shape, jnp.float32)
  if tuple(jnp.shape(x_T)) != shape:
    raise ValueError(f'x_T must have the sample shape {shape}, got {tuple(jnp.shape(x_T))}.')
  if not jnp.issubdtype(jnp.result_type(x_T), jnp.floating):
    raise ValueError(f'x_T must be a float array, got dtype {jnp.result_type(x_T)}.')
  return jnp.asarray(x_T)


def sample(
  denoiser: Denoiser,
  shape: Any,
  rng: Array,
  *,
  num_steps: int = 18,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  S_churn: float = 0.0,
  S_min: float = 0.0,
  S_max: float = float('inf'),
  S_noise: float = 1.0,
  x_T: Array | None = None,
) -> Array:
  """EDM's sampler (Algorithm 2): Heun steps on `sigma_steps`, Euler on the last.

  Step i from t_i to t_{i+1}: with gamma = min(S_churn / N, sqrt(2) - 1)
  where S_min <= t_i <= S_max (else 0), t_hat = t_i + gamma t_i and
  x_hat = x_i + sqrt(t_hat^2 - t_i^2) S_noise z; then d = (x_hat - D(x_hat, t_hat)) / t_hat,
  x_{i+1} = x_hat + (t_{i+1} - t_hat) d, corrected by the slope at x_{i+1}
  (the mean of both) except on the last step, where t_{i+1} = 0. With
  S_churn = 0 this is Heun's method on the probability-flow ODE.

  The chain is one `lax.scan` over the 2N - 1 denoiser calls, so the
  denoiser is traced once and called exactly 2N - 1 times. z of step i is
  `normal(fold_in(step_key, i))` (see the module docstring).

  Args:
    denoiser: `denoiser(x, sigma) -> D`, x [B, ...] and sigma [B] in the
      sample's dtype; `precondition` or `denoiser_from_diffusion` with any
      label bound in a closure.
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    num_steps: N >= 1 (2N - 1 denoiser calls).
    sigma_min, sigma_max, rho: the noise levels, see `sigma_steps`. EDM
      first clips them to the range the network supports; here the caller
      picks them (`denoiser_from_diffusion` clamps levels outside its range).
    S_churn: >= 0, total churn (0: deterministic ODE sampler).
    S_min, S_max: churn only at levels in [S_min, S_max].
    S_noise: >= 0, scale of the churn noise (EDM's 1.003 and up offsets
      detail lost by an imperfect denoiser).
    x_T: optional start at sigma_max, `shape`, already scaled by sigma_max;
      its float dtype is the chain's (float64 with x64 enabled gives a
      float64 sample). None: sigma_max * N(0, I) in float32 from `rng`.

  Returns:
    The sample at sigma = 0, `shape`, in x_T's dtype (float32 when x_T is None).

  Raises:
    ValueError: before tracing, for a bad shape, key, level, churn setting,
      or an x_T of the wrong shape or dtype.
  """
  shape = chain.check_shape(shape)
  chain.check_rng(rng)
  levels = sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  churn = _check_churn(S_churn, S_min, S_max, S_noise)
  init_key, noise_key = jax.random.split(rng)
  x_start = initial_sample(shape, init_key, x_T, sigma_max)
  dtype = x_start.dtype
  steps, firsts, sigmas, step_sizes, noise_scales = _evaluation_plan(levels, churn)
  with_churn = bool(np.any(noise_scales > 0))

  def body(carry, plan):
    x, x_hat, slope_cur = carry
    i, is_first, sigma, step_size, noise_scale = plan
    if with_churn:
      z = chain.step_noise(noise_key, i, shape, dtype)
      x_hat = jnp.where(is_first, x + noise_scale * z, x_hat)
    else:
      x_hat = jnp.where(is_first, x, x_hat)
    # The Euler stage evaluates at x_hat, the correction at the Euler result.
    point = jnp.where(is_first, x_hat, x)
    denoised = _output_like(denoiser(point, jnp.full((shape[0],), sigma, dtype)), point, 'denoiser')
    slope = (point - denoised) / sigma
    slope_cur = jnp.where(is_first, slope, slope_cur)
    mean_slope = jnp.where(is_first, slope, 0.5 * slope_cur + 0.5 * slope)
    return (x_hat + step_size * mean_slope, x_hat, slope_cur), None

  plan = (
    jnp.asarray(steps, jnp.int32),
    jnp.asarray(firsts),
    jnp.asarray(sigmas, dtype),
    jnp.asarray(step_sizes, dtype),
    jnp.asarray(noise_scales, dtype),
  )
  (x0, _, _), _ = jax.lax.scan(body, (x_start, x_start, jnp.zeros_like(x_start)), plan)
  return x0


# ---------------------------------------------------------------------------
# DDPM-trained models as denoisers.


def denoiser_from_diffusion(
  d: diffusion_lib.Diffusion,
  model_fn: Callable[..., Array],
  *,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> Denoiser:
  """The denoiser of a model trained as a discrete DDPM (EDM's VP view, as `iDDPMPrecond`).

  The VP process x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps is x = x_t / sqrt(a_t)
  = x_0 + sigma_t eps with sigma_t = sqrt((1 - a_t) / a_t). So D(x, sigma)
  calls the model at the timestep t whose sigma_t is nearest to sigma (in
  sigma, as `iDDPMPrecond.round_sigma`) on x_t = x / sqrt(1 + sigma^2), reads
  its output as eps with the tables at t, and returns x - sigma eps. The
  model is only ever called at the integer timesteps it was trained on,
  through `d.timestep_map` (a respaced process calls the full process's
  timesteps). A sigma outside [sigma_0, sigma_{T-1}] is clamped: the model
  runs at t = 0 or T - 1 while x_t and the step keep the true sigma, so
  D -> x as sigma -> 0. For an eps model D equals `iDDPMPrecond` at every
  sigma in that range; for every mean type D is the model's x_0 at the
  discrete sigma_t, and everywhere the ODE's slope (x - D) / sigma is the
  model's own eps, as in DDIM. Rounding to the nearest level (rather than
  interpolating two levels' outputs) keeps one model call per denoiser call.

  Args:
    d: the process the model was trained on (or a respacing of it).
    model_fn: `model_fn(x_t, t, *args) -> output`, x_t [B, ...], int32 t [B].
    model_mean_type: what the model predicts: 'eps', 'x0' or 'v'.
    model_var_type: as for the samplers; learned-variance outputs (2C
      channels) are accepted and only their mean channels are used.

  Returns:
    `denoiser(x, sigma, *args) -> D`: x [B, ...], sigma a scalar or [B],
    D of x's shape and dtype; `args` go to `model_fn` after t.

  Raises:
    ValueError: for an unknown mean or variance type, or 'xprev' (a model of
      the posterior mean x_{t-1} predicts a step of the ancestral chain, not
      x_0, so it has no denoiser at an arbitrary sigma).
    TypeError: when d is not a `diffusion.Diffusion`.
  """
  chain.check_diffusion(d)
  diffusion_lib.check_model_options(model_mean_type, model_var_type)
  if model_mean_type == 'xprev':
    raise ValueError(
      "denoiser_from_diffusion needs a model of eps, x0 or v; model_mean_type='xprev' "
      'predicts the posterior mean x_{t-1} of one ancestral step, not a denoised x_0.'
    )

  def denoiser(x: Array, sigma: Any, *args: Any) -> Array:
    x = jnp.asarray(x)
    column, per_example = _sigma_column(sigma, x)
    levels = d.sqrt_recipm1_alphas_cumprod  # sigma_t, increasing in t
    t = jnp.argmin(jnp.abs(per_example[:, None] - levels[None, :].astype(x.dtype)), axis=1)
    t = t.astype(jnp.int32)
    x_t = x / jnp.sqrt(1.0 + jnp.square(column))
    output = chain.call_model(d, lambda x_in, t_in: model_fn(x_in, t_in, *args), x_t, t)
    output, _ = diffusion_lib.split_model_output(output, x_t, model_var_type)
    if model_mean_type == 'eps':
      eps = output
    elif model_mean_type == 'x0':
      eps = diffusion_lib.predict_eps_from_x0(d, x_t, t, output).astype(x.dtype)
    else:
      # eps = sqrt(a) v + sqrt(1 - a) x_t (Salimans & Ho 2022).
      column_shape = (-1,) + (1,) * (x.ndim - 1)
      sqrt_a = jnp.take(d.sqrt_alphas_cumprod, t).reshape(column_shape).astype(x.dtype)
      sqrt_1ma = jnp.take(d.sqrt_one_minus_alphas_cumprod, t).reshape(column_shape)
      eps = sqrt_a * output + sqrt_1ma.astype(x.dtype) * x_t
    return x - column * eps

  return denoiser


# ---------------------------------------------------------------------------
# The sampler table's chain.


def check_options(*, S_churn: Any, S_min: Any, S_max: Any, S_noise: Any) -> None:
  """Raises ValueError for churn settings `sample` refuses (the 'edm' row's check)."""
  _check_churn(S_churn, S_min, S_max, S_noise)


def process_sigma_range(d: diffusion_lib.Diffusion) -> tuple[float, float]:
  """(sigma_0, sigma_{T-1}) of a discrete process: the levels its model was trained at."""
  levels = np.asarray(jax.device_get(d.sqrt_recipm1_alphas_cumprod), np.float64)
  return float(levels[0]), float(levels[-1])


def sample_loop(
  d: diffusion_lib.Diffusion | None,
  model_fn: Callable[..., Array],
  shape: Any,
  rng: Array,
  *,
  num_steps: int,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  S_churn: float = 0.0,
  S_min: float = 0.0,
  S_max: float = float('inf'),
  S_noise: float = 1.0,
  sigma_data: float | None = None,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
  clip_denoised: bool = True,
  x_T: Array | None = None,
) -> Array:
  """`sample` with the signature of the project's other chains, on either kind of model.

  A DDPM model (sigma_data None): `model_fn(x_t, t)` of the process `d`, made a denoiser
  by `denoiser_from_diffusion`; the noise range is cut to the levels it was trained at,
  [max(sigma_min, sigma_0), min(sigma_max, sigma_{T-1})], as NVlabs/edm's `edm_sampler`
  cuts it to a network's supported range. An EDM model (sigma_data given):
  `model_fn(x_in, c_noise)` is the raw network, preconditioned by `precondition`; `d` is
  not used. Either `model_fn` may be classifier-free guided (`guidance.guided_model_fn`):
  its weights sum to one, so guiding F (or eps) is guiding D.

  Args:
    d: the DDPM model's process; None (or anything) for an EDM model.
    model_fn: see above.
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    num_steps: Heun steps N (2N - 1 model calls).
    sigma_min, sigma_max, rho: the noise levels of `sigma_steps`.
    S_churn, S_min, S_max, S_noise: the churn of `sample`.
    sigma_data: an EDM model's data standard deviation; None for a DDPM model.
    model_mean_type, model_var_type: a DDPM model's outputs.
    clip_denoised: not used: EDM's sampler integrates the ODE unclipped.
    x_T: optional start at the (cut) sigma_max, as in `sample`.

  Returns:
    The sample at sigma = 0, `shape`, in x_T's dtype (float32 when x_T is None).

  Raises:
    ValueError: for bad settings, or a noise range outside the DDPM process's levels.
  """
  del clip_denoised
  if sigma_data is not None:
    denoiser = precondition(model_fn, sigma_data=sigma_data)
  else:
    lowest, highest = process_sigma_range(d)
    if not (sigma_min < highest and sigma_max > lowest):
      raise ValueError(
        f'the noise range [{sigma_min:g}, {sigma_max:g}] misses the levels the DDPM model was '
        f'trained at, [{lowest:.4g}, {highest:.4g}].'
      )
    sigma_min, sigma_max = max(sigma_min, lowest), min(sigma_max, highest)
    denoiser = denoiser_from_diffusion(
      d, model_fn, model_mean_type=model_mean_type, model_var_type=model_var_type
    )
  return sample(
    denoiser,
    shape,
    rng,
    num_steps=num_steps,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    rho=rho,
    S_churn=S_churn,
    S_min=S_min,
    S_max=S_max,
    S_noise=S_noise,
    x_T=x_T,
  )
