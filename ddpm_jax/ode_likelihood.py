"""The probability-flow ODE likelihood, in bits/dim (score_sde's method in EDM's variables).

A denoiser D(x, sigma) defines the probability-flow ODE dx/dsigma = f(x, sigma)
= (x - D(x, sigma)) / sigma (EDM, Karras et al. 2022). Its flow carries the
marginals p_sigma of x = x_0 + sigma n into each other, so by the
instantaneous change of variables (Chen et al. 2018) d log p_sigma(x(sigma)) /
dsigma = -div_x f, and integrating x and the divergence together from
sigma_min up to sigma_max gives

    log p_sigma_min(x) = log p_prior(x(sigma_max)) + int_{sigma_min}^{sigma_max} div f dsigma

(Song et al. 2021, score_sde's `likelihood.py`, there in the SDE's time t).

  * The density is that of the flow's model at sigma_min, not at 0: data
    convolved with N(0, sigma_min^2 I), far narrower than a pixel's bin for
    EDM's 0.002 (a bin is 2/255 = 0.0078 wide).
  * The prior is a Gaussian: N(0, sigma_max^2 I) unless `prior` says otherwise
    (the data's own spread, sigma_data^2 ~ 0.25, is left out: at sigma_max = 80
    it moves the prior's log-density by about 2e-5 nats per dimension);
    `diffusion_settings` gives a DDPM process's N(0, (1 + sigma_{T-1}^2) I),
    its N(0, I) at x_T.
  * The divergence is Hutchinson's estimate v^T (df/dx) v with Rademacher
    probes v, one reverse-mode product per probe, the probes drawn once and
    kept along the path (as score_sde does); or, for small images and tests,
    exact: one product per dimension.
  * The integrator is Heun's method on EDM's sigma grid (`edm.sigma_steps`, 2
    calls per step, one `lax.scan`), or Dormand-Prince 5(4) with scipy's step
    control under `lax.while_loop` (score_sde uses scipy's RK45 at
    rtol = atol = 1e-5); its one step size is shared by the batch, as scipy's
    is in score_sde, so an example's value moves with its batch within the
    tolerance.

Data scaling (input_pipeline): pixel k in {0..255} is x = k / 127.5 - 1 and
owns the bin [x - 1/255, x + 1/255] of width 2/255; the 256 bins tile
[-1 - 1/255, 1 + 1/255]. Uniform dequantisation adds u ~ U(-1/255, 1/255) per
dimension, and a density p in these units gives a probability of about
p * (2/255)^D to a pixel, so bits/dim = -log p / (D ln 2) + log2(255/2), the
offset being 6.994 (score_sde's data has 256 bins of width 2/256 on [-1, 1],
hence its 7). A density uniform over the bins' union gives exactly 8.

What is bound and what is estimate: E_u[-log p(x + u)] / (D ln 2) + log2(255/2)
is an upper bound on -log2 P(k) / D for the discrete model P(k) = integral
of p_sigma_min over k's bin (Jensen's inequality); one draw of u, and
Hutchinson's probes, make `bpd` an unbiased estimate of that bound, up to the
integrator's error (which is neither: it falls as num_steps^-2 for Heun).
Without dequantisation the value is the density at the bin's centre times the
bin's width, neither a bound nor unbiased.
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
from ddpm_jax import edm

Array = jax.Array
Prior = Callable[[Array], Array]

# Pixel k is x = k / 127.5 - 1 (input_pipeline), so one bin is 2/255 wide in x.
BIN_WIDTH = 2.0 / 255.0
# -log2 P(pixel) ~ -log2 p(x) - log2(BIN_WIDTH): the bits a density in x lacks per dimension.
OFFSET_BITS = math.log2(1.0 / BIN_WIDTH)
DIVERGENCES = ('hutchinson', 'exact')
SOLVERS = ('heun', 'rk45')
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# Priors, units and a DDPM process's settings.


def gaussian_prior(std: Any, mean: Any = 0.0) -> Prior:
  """The log-density of N(mean, std^2) per dimension, summed over each example.

  Args:
    std: > 0, a scalar or an array that broadcasts against one example [...].
    mean: a scalar or such an array.

  Returns:
    `prior(z) -> log p(z)`, z [B, ...] -> [B] in z's dtype.
  """

  def prior(z: Array) -> Array:
    scale = jnp.asarray(std, z.dtype)
    centred = (z - jnp.asarray(mean, z.dtype)) / scale
    logp = -0.5 * jnp.square(centred) - jnp.log(scale) - 0.5 * math.log(2 * math.pi)
    logp = jnp.broadcast_to(logp, z.shape)
    return jnp.sum(logp.reshape(z.shape[0], -1), axis=1)

  return prior


def bits_per_dim(log_density: Array, num_dims: int) -> Array:
  """-log p / (D ln 2) plus the bin offset: a density in x as bits per 8-bit pixel.

  Args:
    log_density: log p(x) in nats of a density over the model's x units, [B].
    num_dims: D, the dimensions of one example.

  Returns:
    [B] bits/dim: -log_density / (D ln 2) + log2(255/2).
  """
  return -log_density / (num_dims * _LN2) + OFFSET_BITS


def diffusion_settings(d: diffusion_lib.Diffusion) -> dict[str, Any]:
  """`bpd`'s sigma_min, sigma_max and prior for a model trained as the DDPM process d.

  The prior N(0, (1 + sigma_{T-1}^2) I) is the discrete bound's N(0, I) at
  x_T, since x = x_T sqrt(1 + sigma_{T-1}^2). Use as
  `bpd(edm.denoiser_from_diffusion(d, model_fn), images, rng, **diffusion_settings(d))`.
  """
  chain.check_diffusion(d)
  sigma_min, sigma_max = edm.process_sigma_range(d)
  return dict(
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    prior=gaussian_prior(math.sqrt(1.0 + sigma_max**2)),
  )


def to_model_range(images: Any) -> Array:
  """uint8 pixels to x = k / 127.5 - 1 in float32; float images (already in [-1, 1]) unchanged."""
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be uint8 pixels or floats in [-1, 1], got {images.dtype}.')
  return images


# ---------------------------------------------------------------------------
# The dynamics: drift and divergence.


def _dynamics(denoiser: edm.Denoiser, args: tuple, probes: Array | None) -> Callable:
  """`(state, sigma) -> (f, div f)` for f = (x - D(x, sigma, *args)) / sigma, x = state[0].

  One `jax.vjp` per call gives f and the vector-Jacobian products (reverse
  mode, since the U-Net's fast kernels define only their VJPs); the divergence
  is exact with probes None, else Hutchinson's mean of v^T J v over the probes.
  """

  def drift(x: Array, sigma: Array) -> Array:
    levels = jnp.full((x.shape[0],), sigma, x.dtype)
    return (x - jnp.asarray(denoiser(x, levels, *args)).astype(x.dtype)) / sigma

  def dynamics(state: tuple[Array, Array], sigma: Array) -> tuple[Array, Array]:
    x = state[0]
    f, vjp = jax.vjp(lambda y: drift(y, sigma), x)
    batch = x.shape[0]
    if probes is None:
      div = _exact_trace(vjp, x)
    else:
      (products,) = jax.vmap(vjp)(probes)
      products = (products * probes).reshape(probes.shape[0], batch, -1)
      div = jnp.mean(jnp.sum(products, axis=2), axis=0)
    return f, div

  return dynamics


def _exact_trace(vjp: Callable[[Array], tuple[Array]], x: Array) -> Array:
  """tr(df/dx) per example, one product per dimension (examples are independent)."""
  batch, dims = x.shape[0], math.prod(x.shape[1:])

  def add_row(i, total):
    basis = jnp.zeros((dims,), x.dtype).at[i].set(1).reshape(x.shape[1:])
    (row,) = vjp(jnp.broadcast_to(basis, x.shape))
    return total + row.reshape(batch, dims)[:, i]

  return jax.lax.fori_loop(0, dims, add_row, jnp.zeros((batch,), x.dtype))


# ---------------------------------------------------------------------------
# Integrators over the state (x, accumulated divergence).


def _heun(dynamics: Callable, state: tuple, levels: np.ndarray) -> tuple[tuple, Array]:
  """Heun's method through the increasing levels: one `lax.scan` over its 2N calls.

  Call 2i is step i's Euler predictor at levels[i], call 2i + 1 its corrector
  at levels[i + 1]; one call per scan body halves what XLA compiles.
  """
  dtype = state[0].dtype
  steps = np.diff(levels)
  plan = (
    jnp.asarray(np.tile([True, False], len(steps))),
    jnp.asarray(np.stack([levels[:-1], levels[1:]], axis=1).ravel(), dtype),
    jnp.asarray(np.repeat(steps, 2), dtype),
  )

  def call(carry, plan):
    state, start, slope = carry
    predictor, sigma, h = plan
    k = dynamics(state, sigma)
    euler = _combine(state, h, [k], (1.0,))
    heun = _combine(start, h, [slope, k], (0.5, 0.5))
    carry = jax.tree.map(
      lambda a, b: jnp.where(predictor, a, b), (euler, state, k), (heun, start, slope)
    )
    return carry, None

  (state, _, _), _ = jax.lax.scan(call, (state, state, state), plan)
  return state, jnp.asarray(2 * len(steps), jnp.int32)


def _combine(state: tuple, h: Array, slopes: list, weights: tuple) -> tuple:
  """state + h * sum_i weights[i] * slopes[i], over the pytree."""

  def leaf(y, *ks):
    return y + h * sum((w * k for w, k in zip(weights, ks) if w), jnp.zeros_like(y))

  return jax.tree.map(leaf, state, *slopes)


# Dormand & Prince (1980), the tableau of scipy's RK45. Row j of _DP_A makes stage
# j's point from the slopes before it; its last row is the 5th-order weights, so
# the last stage is f(y_new), the next step's first (FSAL). _DP_E: the 5th- minus
# the embedded 4th-order weights.
_DP_C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
_DP_A = np.zeros((7, 7))
_DP_A[1, :1] = [1 / 5]
_DP_A[2, :2] = [3 / 40, 9 / 40]
_DP_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_DP_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_DP_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_DP_A[6, :6] = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_DP_E = np.array([-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40])


def _rms(tree: tuple, scale: tuple) -> Array:
  """sqrt(mean((tree / scale)^2)) over every entry of the pytree (scipy's norm)."""
  parts = jax.tree.leaves(jax.tree.map(lambda a, s: jnp.square(a / s), tree, scale))
  return jnp.sqrt(sum(jnp.sum(p) for p in parts) / sum(p.size for p in parts))


def _weighted(state: tuple, h: Array, weights: Array, slopes: tuple) -> tuple:
  """state + h * sum_i weights[i] slopes[i], with the slopes stacked on a leading axis."""
  return jax.tree.map(lambda y, k: y + h * jnp.tensordot(weights, k, axes=1), state, slopes)


def _rk45(
  dynamics: Callable, state: tuple, t0: float, t1: float, rtol: float, atol: float, max_steps: int
) -> tuple[tuple, Array, Array]:
  """Dormand-Prince 5(4) from t0 to t1 with scipy's step control, under `lax.while_loop`.

  The six new stages of a step run in a `fori_loop`, so the network is
  compiled twice (there and for the first slope), not seven times.

  Returns the state at t1, the number of dynamics calls, and whether t1 was
  reached within max_steps tries.
  """
  dtype = state[0].dtype
  t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
  tableau, nodes, error_weights = (jnp.asarray(a, dtype) for a in (_DP_A, _DP_C, _DP_E))
  k1 = dynamics(state, t0)
  scale = jax.tree.map(lambda y: atol + rtol * jnp.abs(y), state)
  # scipy's first guess without its extra call: 1% of the state's size over its slope's.
  h = 0.01 * _rms(state, scale) / jnp.maximum(_rms(k1, scale), 1e-12)
  h = jnp.clip(h, 1e-6 * (t1 - t0), t1 - t0)

  def body(carry):
    t, y, k1, h, tries, calls = carry
    last = h >= t1 - t
    h = jnp.where(last, t1 - t, h)
    slopes = jax.tree.map(lambda k: jnp.zeros((7,) + k.shape, k.dtype).at[0].set(k), k1)

    def stage(j, slopes):
      k = dynamics(_weighted(y, h, tableau[j], slopes), t + nodes[j] * h)
      return jax.tree.map(lambda ks, kj: ks.at[j].set(kj), slopes, k)

    slopes = jax.lax.fori_loop(1, 7, stage, slopes)
    y_new = _weighted(y, h, tableau[6], slopes)
    error = _weighted(jax.tree.map(jnp.zeros_like, y), h, error_weights, slopes)
    bound = jax.tree.map(lambda a, b: atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)), y, y_new)
    norm = _rms(error, bound)
    accept = norm <= 1.0
    factor = jnp.clip(0.9 * norm ** (-0.2), 0.2, 10.0)

    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)

    k7 = jax.tree.map(lambda ks: ks[6], slopes)
    t_new = jnp.where(accept, jnp.where(last, t1, t + h), t)
    return t_new, keep(y_new, y), keep(k7, k1), h * factor, tries + 1, calls + 6

  def running(carry):
    return (carry[0] < t1) & (carry[4] < max_steps)

  init = (t0, state, k1, h, jnp.int32(0), jnp.int32(1))
  t, state, _, _, _, calls = jax.lax.while_loop(running, body, init)
  return state, calls, t >= t1


# ---------------------------------------------------------------------------
# Bits per dimension.


def _check_level(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f'{name} must be a positive Python number, got {value!r}.')
  if not math.isfinite(float(value)) or float(value) <= 0:
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}.')
  return float(value)


def _check_options(
  *,
  sigma_min,
  sigma_max,
  num_steps,
  rho,
  solver,
  rtol,
  atol,
  max_steps,
  divergence,
  num_probes,
  prior,
) -> None:
  """Every static option, before any tracing."""
  sigma_min, sigma_max = _check_level('sigma_min', sigma_min), _check_level('sigma_max', sigma_max)
  if sigma_min >= sigma_max:
    raise ValueError(f'sigma_min must be < sigma_max, got {sigma_min} and {sigma_max}.')
  if solver not in SOLVERS:
    raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
  if divergence not in DIVERGENCES:
    raise ValueError(f'divergence must be one of {DIVERGENCES}, got {divergence!r}.')
  if not chain.is_int(num_steps) or num_steps < 1:
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
  if not chain.is_int(max_steps) or max_steps < 1:
    raise ValueError(f'max_steps must be an integer >= 1, got {max_steps!r}.')
  if not chain.is_int(num_probes) or num_probes < 1:
    raise ValueError(f'num_probes must be an integer >= 1, got {num_probes!r}.')
  for name, value in (('rho', rho), ('rtol', rtol), ('atol', atol)):
    _check_level(name, value)
  if prior is not None and not callable(prior):
    raise ValueError(f'prior must be None or a callable z -> log p(z) [B], got {prior!r}.')


def bpd(
  denoiser: edm.Denoiser,
  images: Any,
  rng: Array,
  *args: Any,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  num_steps: int = 64,
  rho: float = 7.0,
  solver: str = 'heun',
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = 1000,
  divergence: str = 'hutchinson',
  num_probes: int = 1,
  dequantize: bool = True,
  prior: Prior | None = None,
) -> dict[str, Array]:
  """Bits/dim of images under the probability-flow ODE of a denoiser, per example.

  Integrates x and its divergence from sigma_min up to sigma_max (see the
  module docstring for the bound, the estimate and the units). Jittable: bind
  the options with `functools.partial` and jit over (images, rng, *args).

  Args:
    denoiser: `denoiser(x, sigma, *args) -> D`, x [B, ...], sigma [B]: an
      `edm.precondition`ed network, or `edm.denoiser_from_diffusion` of a
      DDPM model (then pass `**diffusion_settings(d)`). It must treat the
      examples independently (the exact divergence relies on it).
    images: uint8 pixels [B, ...], or floats already scaled to [-1, 1] by
      k / 127.5 - 1 (the eval pipeline's); float64 with x64 enabled computes
      in float64.
    rng: a PRNG key; split into the dequantisation noise and the probes.
    *args: passed to the denoiser after sigma (a class label [B], say).
    sigma_min: > 0, where the likelihood is taken (of data convolved with N(0, sigma_min^2)).
    sigma_max: > sigma_min, where the prior is.
    num_steps: Heun steps, on `edm.sigma_steps(num_steps + 1, ...)` read upwards.
    rho: the Heun grid's spacing (7: EDM's, dense at small sigma).
    solver: 'heun' (fixed grid, 2 num_steps calls) or 'rk45' (adaptive).
    rtol, atol: RK45's tolerances (score_sde: 1e-5 both).
    max_steps: RK45's most tries (accepted or rejected steps); an example
      that has not reached sigma_max by then gets bpd NaN.
    divergence: 'hutchinson' (Rademacher probes) or 'exact' (one product per
      dimension: small images and tests).
    num_probes: Hutchinson probes, averaged; the same probes all along the path.
    dequantize: add U(-1/255, 1/255) noise first (the bound); False takes the
      density at the pixel values.
    prior: `prior(z) -> log p(z)` [B] at sigma_max; None: N(0, sigma_max^2 I).

  Returns:
    dict of 'bpd' [B] (= prior_bpd + flow_bpd + OFFSET_BITS), 'prior_bpd' [B]
    (-log p_prior(z) / (D ln 2)), 'flow_bpd' [B] (-int div f / (D ln 2)),
    'z' (x at sigma_max, the images' shape) and 'nfe' (evaluations of the
    dynamics, each one denoiser call and its VJPs; a scalar int32).

  Raises:
    ValueError: before tracing, for num_steps, max_steps or num_probes < 1,
      sigma_min >= sigma_max, a non-positive rho, rtol or atol, an unknown
      solver or divergence, a prior that is not callable, or a bad key.
  """
  _check_options(
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    num_steps=num_steps,
    rho=rho,
    solver=solver,
    rtol=rtol,
    atol=atol,
    max_steps=max_steps,
    divergence=divergence,
    num_probes=num_probes,
    prior=prior,
  )
  chain.check_rng(rng)
  x = to_model_range(images)
  dequantize_key, probe_key = jax.random.split(rng)
  # Both draws are flat, then reshaped: XLA:CPU compiles threefry over a rank-4
  # or rank-5 shape several times slower (3 s against 0.4 s for a small image).
  if dequantize:
    half = BIN_WIDTH / 2
    noise = jax.random.uniform(dequantize_key, (x.size,), x.dtype, -half, half)
    x = x + noise.reshape(x.shape)
  probes = None
  if divergence == 'hutchinson':
    signs = jax.random.rademacher(probe_key, (num_probes * x.size,))
    probes = signs.astype(x.dtype).reshape((num_probes,) + x.shape)
  dynamics = _dynamics(denoiser, args, probes)
  state = (x, jnp.zeros((x.shape[0],), x.dtype))
  if solver == 'heun':
    grid = edm.sigma_steps(num_steps + 1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    state, nfe = _heun(dynamics, state, grid[-2::-1])
    reached = jnp.asarray(True)
  else:
    state, nfe, reached = _rk45(dynamics, state, sigma_min, sigma_max, rtol, atol, max_steps)
  z, integral = state
  prior = gaussian_prior(sigma_max) if prior is None else prior
  num_dims = math.prod(x.shape[1:])
  log_prior = jnp.asarray(prior(z)).astype(x.dtype)
  prior_bpd = -log_prior / (num_dims * _LN2)
  flow_bpd = -integral / (num_dims * _LN2)
  total = jnp.where(reached, bits_per_dim(log_prior + integral, num_dims), jnp.nan)
  return dict(bpd=total, prior_bpd=prior_bpd, flow_bpd=flow_bpd, z=z, nfe=nfe)
