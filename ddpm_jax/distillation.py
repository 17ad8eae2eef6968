"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) on denoisers.

"Progressive Distillation for Fast Sampling of Diffusion Models"
(arXiv:2202.00512) trains a student to take ONE deterministic DDIM step
where its teacher takes two, halving the number of sampling steps per
round. Here every model is a denoiser D(x, sigma) in EDM's variables
x = x_0 + sigma n (`edm.Denoiser`), so the same math serves a DDPM-trained
model (`edm.denoiser_from_diffusion`) and an EDM one (`edm.precondition`).
In these variables a DDIM step (eta = 0) is an Euler step of the
probability-flow ODE:

  x_next = D + (sigma_next / sigma) (x - D),   D = D(x, sigma).

The teacher's two steps sigma -> sigma_mid -> sigma_next land on x''; the
student's one step lands there when its D is

  target = (x'' - (sigma_next / sigma) x) / (1 - sigma_next / sigma),

which the student learns with the weight max(SNR, 1) = max(1 / sigma^2, 1)
(the paper's "truncated SNR"). The teacher may be classifier-free guided
(a denoiser built on `guidance.guided_model_fn`, guidance being a denoiser
too), which distils a fixed guidance scale into the student (Meng et al.
2023, "On Distillation of Guided Diffusion Models", arXiv:2210.03142).

  * `ddpm_levels`: the DDIM grid of a DDPM model as noise levels (an EDM
    model's grid is `edm.sigma_steps`).
  * `coarsen`, `num_rounds`: the nested grids of the rounds.
  * `ddim_step`, `sample`: the deterministic DDIM sampler on any grid.
  * `teacher_target`, `loss`: one round's training target and loss.

Randomness in `sample` follows `chain`: `rng` splits once into an
initial-noise key and a step key (unused: the chain is deterministic).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import chain
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import edm
from ddpm_jax import sampling

Array = jax.Array
PRIORS = ('vp', 've')


# ---------------------------------------------------------------------------
# Grids of noise levels (static NumPy arrays).


def _check_levels(levels: Any, name: str = 'levels') -> np.ndarray:
  """A static grid: float64 [N + 1], N >= 1, finite, strictly decreasing, ending in 0."""
  levels = np.asarray(levels, np.float64)
  if levels.ndim != 1 or levels.shape[0] < 2:
    raise ValueError(
      f'{name} must be a 1-D array of at least 2 noise levels (N + 1 for N steps), '
      f'got shape {levels.shape}.'
    )
  if not np.all(np.isfinite(levels)) or levels[-1] != 0.0:
    raise ValueError(f'{name} must be finite and end in 0, got {levels}.')
  if not np.all(np.diff(levels) < 0):
    raise ValueError(f'{name} must be strictly decreasing, got {levels}.')
  return levels


def _power_of_two_ratio(larger: int, smaller: int, what: str) -> int:
  """log2(larger / smaller), or ValueError naming both numbers."""
  ratio, remainder = divmod(larger, smaller)
  if remainder or ratio & (ratio - 1):
    raise ValueError(
      f'{what}: {larger} steps must be {smaller} steps times a power of two, '
      f'but {larger} / {smaller} = {larger / smaller:g}.'
    )
  return ratio.bit_length() - 1


def ddpm_levels(d: diffusion_lib.Diffusion, num_steps: int) -> np.ndarray:
  """The noise levels of `sampling.ddim_sample_loop`'s K steps on a DDPM process.

  The timesteps of `sampling.ddim_timesteps(T, K, 'uniform')`, from the
  largest down, as sigma_t = sqrt((1 - a_t) / a_t), then 0. Sampling them
  with `sample` is that DDIM sampler, and `edm.denoiser_from_diffusion` calls
  the model at exactly these integer timesteps (its rounding finds each one).

  Args:
    d: the process the model was trained on (or a respacing of it).
    num_steps: K in [1, T].

  Returns:
    float64 NumPy array [K + 1], decreasing, ending in 0.

  Raises:
    ValueError: for num_steps outside [1, T].
    TypeError: when d is not a `diffusion.Diffusion`.
  """
  chain.check_diffusion(d)
  timesteps = sampling.ddim_timesteps(d.num_timesteps, num_steps, 'uniform')
  sigmas = np.asarray(jax.device_get(d.sqrt_recipm1_alphas_cumprod), np.float64)
  return np.append(sigmas[timesteps[::-1]], 0.0)


def coarsen(levels: Any, num_steps: int) -> np.ndarray:
  """The grid of N steps inside a grid of K steps: every (K / N)-th level.

  Every round's grid is a coarsening of the finest one; for a DDPM model
  `coarsen(ddpm_levels(d, K0), N)`, which need not be `ddpm_levels(d, N)`
  (the DDIM timesteps of T // N and T // K0 need not nest).

  Args:
    levels: a grid of K steps, [K + 1], decreasing, ending in 0.
    num_steps: N in [1, K], with K / N a power of two.

  Returns:
    float64 NumPy array [N + 1]: levels[::K // N].

  Raises:
    ValueError: for a bad grid, or an N outside [1, K] or whose K / N is
      not a power of two (naming both numbers).
  """
  levels = _check_levels(levels)
  finest = len(levels) - 1
  if not chain.is_int(num_steps) or not 1 <= num_steps <= finest:
    raise ValueError(f'num_steps must be an integer in [1, {finest}], got {num_steps!r}.')
  _power_of_two_ratio(finest, int(num_steps), 'coarsen')
  return levels[:: finest // int(num_steps)].copy()


def num_rounds(finest_steps: int, final_steps: int) -> int:
  """The number of halving rounds R from K0 = finest_steps down to final_steps = K0 / 2^R.

  Raises:
    ValueError: for steps that are not integers >= 1, or a K0 that is not
      final_steps times a power of two (naming both numbers).
  """
  for name, value in (('finest_steps', finest_steps), ('final_steps', final_steps)):
    if not chain.is_int(value) or value < 1:
      raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
  return _power_of_two_ratio(int(finest_steps), int(final_steps), 'num_rounds')


# ---------------------------------------------------------------------------
# The DDIM sampler on a grid.


def _column(value: Any, x: Array) -> Array:
  """A scalar, or one value per example [B] as a column [B, 1, ...], in x's dtype."""
  value = jnp.asarray(value)
  batch = jnp.shape(x)[0]
  if value.shape == ():
    return value.astype(x.dtype)
  if value.shape != (batch,):
    raise ValueError(
      f'noise levels must be scalars or one per example, shape [B] = ({batch},), '
      f'got shape {tuple(value.shape)}.'
    )
  return value.astype(x.dtype).reshape((batch,) + (1,) * (jnp.ndim(x) - 1))


def _like(output: Any, x: Array, what: str) -> Array:
  """A denoiser's output checked against x's shape and cast to x's dtype (the scan's carry)."""
  output = jnp.asarray(output)
  if output.shape != x.shape:
    raise ValueError(f'{what} must have the shape of x {x.shape}, got {output.shape}.')
  return output.astype(x.dtype)


def ddim_step(denoised: Array, x: Array, sigma: Any, sigma_next: Any) -> Array:
  """One DDIM step (eta = 0), i.e. Euler on the ODE: D + (sigma_next / sigma) (x - D).

  Song et al.'s x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat, divided by
  sqrt(a_s), in x = x_t / sqrt(a_t) and sigma_t = sqrt((1 - a_t) / a_t).
  sigma_next = 0 gives D exactly.

  Args:
    denoised: D(x, sigma), x's shape [B, ...].
    x: the current point [B, ...].
    sigma: its noise level, > 0: a scalar or [B].
    sigma_next: the next level, >= 0: a scalar or [B].

  Returns:
    x at sigma_next, x's shape and dtype.

  Raises:
    ValueError: for a denoised of another shape than x, or levels of
      another shape than () or [B].
  """
  x = jnp.asarray(x)
  denoised = _like(denoised, x, 'denoised')
  ratio = _column(sigma_next, x) / _column(sigma, x)
  return denoised + ratio * (x - denoised)


def sample(
  denoiser: edm.Denoiser,
  levels: Any,
  shape: Any,
  rng: Array,
  *args: Any,
  prior: str = 'vp',
  x_T: Array | None = None,
) -> Array:
  """N deterministic DDIM steps down a grid of N + 1 levels, in one `lax.scan`.

  The denoiser is traced once and called exactly N times, at sigma =
  levels[i] for step i. The start is x_T, or z * s with z ~ N(0, I) from
  `rng`'s initial-noise key, s = sqrt(1 + sigma_0^2) for prior 'vp' (a DDPM
  model's x_T ~ N(0, I) at its first timestep, in EDM's variables) or
  s = sigma_0 for 've' (an EDM model, as `edm.sample`).

  Args:
    denoiser: `denoiser(x, sigma, *args) -> D`, x [B, ...], sigma [B].
    levels: static grid [N + 1], decreasing, ending in 0 (`ddpm_levels`,
      `edm.sigma_steps`, `coarsen`).
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    *args: passed to the denoiser after sigma (a class label [B], say).
    prior: 'vp' or 've', the start's scale when x_T is None.
    x_T: optional start at levels[0] in EDM's variables, `shape`; its float
      dtype is the chain's (float64 with x64 enabled gives a float64 sample).

  Returns:
    The sample at sigma = 0, `shape`, in x_T's dtype (float32 when x_T is None).

  Raises:
    ValueError: before tracing, for a bad grid, prior, shape, key, or an
      x_T of the wrong shape or dtype.
  """
  levels = _check_levels(levels)
  if prior not in PRIORS:
    raise ValueError(f'Unknown prior {prior!r}; valid choices: {", ".join(PRIORS)}.')
  shape = chain.check_shape(shape)
  chain.check_rng(rng)
  init_key, _ = jax.random.split(rng)
  scale = float(np.sqrt(1.0 + levels[0] ** 2) if prior == 'vp' else levels[0])
  x_start = edm.initial_sample(shape, init_key, x_T, scale)
  dtype = x_start.dtype

  def body(x, step):
    sigma, sigma_next = step
    denoised = denoiser(x, jnp.full((shape[0],), sigma, dtype), *args)
    denoised = _like(denoised, x, 'denoiser')
    return ddim_step(denoised, x, sigma, sigma_next), None

  steps = (jnp.asarray(levels[:-1], dtype), jnp.asarray(levels[1:], dtype))
  x0, _ = jax.lax.scan(body, x_start, steps)
  return x0


# ---------------------------------------------------------------------------
# One round of distillation.


def teacher_target(
  teacher: edm.Denoiser, x: Array, sigma: Array, sigma_mid: Array, sigma_next: Array, *args: Any
) -> tuple[Array, Array]:
  """The denoised value whose one DDIM step lands where the teacher's two steps do.

  x' and x'' are the teacher's DDIM steps from x to sigma_mid and on to
  sigma_next; target = (x'' - r x) / (1 - r) with r = sigma_next / sigma
  solves `ddim_step(target, x, sigma, sigma_next) == x''`. At sigma_next = 0,
  r = 0 and target = x'' exactly; 1 - r never vanishes on a decreasing grid.

  Args:
    teacher: `teacher(x, sigma, *args) -> D`, e.g. a guided DDPM model's denoiser.
    x: points [B, ...] at sigma.
    sigma, sigma_mid, sigma_next: decreasing levels, scalars or [B]
      (sigma > sigma_mid > sigma_next >= 0).
    *args: passed to the teacher after sigma.

  Returns:
    (target, x''), both of x's shape and dtype.

  Raises:
    ValueError: for levels of another shape than () or [B], or a teacher
      output of another shape than x.
  """
  x = jnp.asarray(x)
  x_mid = ddim_step(_like(teacher(x, sigma, *args), x, 'teacher'), x, sigma, sigma_mid)
  denoised = _like(teacher(x_mid, sigma_mid, *args), x, 'teacher')
  x_next = ddim_step(denoised, x_mid, sigma_mid, sigma_next)
  ratio = _column(sigma_next, x) / _column(sigma, x)
  return (x_next - ratio * x) / (1.0 - ratio), x_next


def loss(
  student: edm.Denoiser,
  teacher: edm.Denoiser,
  x0: Array,
  noise: Array,
  index: Array,
  teacher_levels: Any,
  *args: Any,
) -> Array:
  """Salimans & Ho's distillation loss per example, on the teacher's grid of 2N steps.

  Example b with k = index[b] starts at sigma = teacher_levels[2k] from
  x = x0 + sigma noise; its target is `teacher_target` over
  teacher_levels[2k + 1] to teacher_levels[2k + 2], without gradient. The
  loss is max(1 / sigma^2, 1) |student(x, sigma) - target|^2, averaged
  over the non-batch axes.

  Args:
    student: `student(x, sigma, *args) -> D`, sigma [B]; the trained model.
    teacher: `teacher(x, sigma, *args) -> D`, sigma [B]; fixed.
    x0: clean data [B, ...].
    noise: standard normal noise, x0's shape.
    index: int student steps [B] in [0, N) (an out-of-range index gives NaN).
    teacher_levels: static grid [2N + 1] (the student's is teacher_levels[::2]).
    *args: passed to both denoisers after sigma (a class label [B], say).

  Returns:
    The weighted loss [B] in x0's dtype.

  Raises:
    ValueError: for a bad grid or one of an odd number of steps, noise of
      another shape than x0, or an index that is not ints [B].
  """
  teacher_levels = _check_levels(teacher_levels, 'teacher_levels')
  if (len(teacher_levels) - 1) % 2:
    raise ValueError(
      f'teacher_levels must have an even number of steps 2N, got {len(teacher_levels) - 1}.'
    )
  x0 = jnp.asarray(x0)
  if jnp.shape(noise) != x0.shape:
    raise ValueError(f'noise must have the shape of x0 {x0.shape}, got {jnp.shape(noise)}.')
  if jnp.shape(index) != x0.shape[:1] or not jnp.issubdtype(jnp.result_type(index), jnp.integer):
    raise ValueError(
      f'index must be ints of shape [B] = ({x0.shape[0]},), got dtype '
      f'{jnp.result_type(index)} and shape {tuple(jnp.shape(index))}.'
    )
  grid = jnp.asarray(teacher_levels, x0.dtype)
  sigma, sigma_mid, sigma_next = (jnp.take(grid, 2 * index + j) for j in range(3))
  x = x0 + _column(sigma, x0) * noise
  target, _ = teacher_target(teacher, x, sigma, sigma_mid, sigma_next, *args)
  target = jax.lax.stop_gradient(target)
  return weighted_error(_like(student(x, sigma, *args), x, 'student'), target, sigma)


def weighted_error(denoised: Array, target: Array, sigma: Array) -> Array:
  """max(1 / sigma^2, 1) |denoised - target|^2 per example (the "truncated SNR" weight).

  Args:
    denoised: the student's D [B, ...].
    target: `teacher_target`'s, same shape.
    sigma: the levels [B].

  Returns:
    [B], the mean over the non-batch axes.
  """
  error = jnp.square(denoised - target)
  weight = jnp.maximum(1.0 / jnp.square(sigma), 1.0)
  return weight * jnp.mean(error, axis=tuple(range(1, error.ndim)))


# ---------------------------------------------------------------------------
# A model's grid and the sampler table's chain.


def levels(
  d: diffusion_lib.Diffusion | None,
  num_steps: int,
  *,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
) -> np.ndarray:
  """A DDIM teacher's grid of `num_steps` steps: a DDPM model's (d given) or an EDM model's.

  `ddpm_levels(d, num_steps)` for a DDPM model; for an EDM model (d None)
  `edm.sigma_steps(num_steps, sigma_min=, sigma_max=, rho=)`, the grid of its own sampler.
  """
  if d is None:
    return edm.sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  return ddpm_levels(d, num_steps)


def sample_loop(
  d: diffusion_lib.Diffusion | None,
  model_fn: Any,
  shape: Any,
  rng: Array,
  *,
  num_steps: int,
  teacher_steps: int,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  sigma_data: float | None = None,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
  clip_denoised: bool = True,
  x_T: Array | None = None,
) -> Array:
  """A distilled student's N DDIM steps (`sample`), with the signature of the project's chains.

  The student of N steps steps on `coarsen(levels(., teacher_steps), N)`, the
  grid it was distilled on. A DDPM model (sigma_data None) is `model_fn(x_t, t)`
  of the process `d`, made a denoiser by `edm.denoiser_from_diffusion`, and
  starts as DDIM does (prior 'vp'); an EDM model (sigma_data given) is its raw
  network, preconditioned by `edm.precondition`, and starts at sigma_max (prior
  've'). A class-conditional student takes its labels in `model_fn`, unguided:
  the teacher's guidance is distilled into it.

  Args:
    d: the DDPM model's process; None for an EDM model.
    model_fn: see above.
    shape: static sample shape (B, ...).
    rng: a PRNG key.
    num_steps: the student's steps N (N model calls).
    teacher_steps: the first teacher's steps K0 (`distill.teacher_steps`).
    sigma_min, sigma_max, rho: an EDM model's grid (`edm.sigma_steps`).
    sigma_data: an EDM model's data standard deviation; None for a DDPM model.
    model_mean_type, model_var_type: a DDPM model's outputs.
    clip_denoised: not used: the student was distilled on the unclipped ODE.
    x_T: optional start at the first level, in EDM's variables, as in `sample`.

  Returns:
    The sample, `shape`.

  Raises:
    ValueError: for a grid of steps that is not teacher_steps / 2^k, or bad settings.
  """
  del clip_denoised
  if sigma_data is not None:
    denoiser = edm.precondition(model_fn, sigma_data=sigma_data)
    grid, prior = (
      levels(None, teacher_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho),
      've',
    )
  else:
    denoiser = edm.denoiser_from_diffusion(
      d, model_fn, model_mean_type=model_mean_type, model_var_type=model_var_type
    )
    grid, prior = ddpm_levels(d, teacher_steps), 'vp'
  return sample(denoiser, coarsen(grid, num_steps), shape, rng, prior=prior, x_T=x_T)
