"""Multistep solvers of the probability-flow ODE: DPM-Solver++ and UniPC.

Both work in data prediction: with alpha_t = sqrt(a_t), sigma_t =
sqrt(1 - a_t) and lambda_t = log(alpha_t / sigma_t), the ODE's solution from
s to t is exact in its linear part and integrates the model's x_0 against
e^{-lambda}, approximated from the last `order` predictions. The timesteps
and every rule about step orders are those of diffusers' schedulers with
their defaults, so the samples agree with theirs to float rounding.

  * `dpm_solver_sample_loop`: DPM-Solver++ (Lu et al. 2022b), one model call
    a step, orders 1-3.
  * `unipc_sample_loop`: UniPC (Zhao et al. 2023, bh2): each model call
    first corrects the last step (`unic_update`), then predicts the next one
    (`unip_update`).

Each chain is one `lax.scan`; like every sampler they take a
`diffusion.Diffusion` and any `model_fn(x_t, t)`.
"""

import dataclasses
import functools
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import chain
from ddpm_jax import diffusion as diffusion_lib

Array = jax.Array

SOLVER_ORDERS = (1, 2, 3)
# Where the solvers end: 'zero' denoises to sigma = 0 (x_0) in the last step,
# diffusers' default; 'min' stops at timestep 0's sigma and returns x there,
# as DPM-Solver's own code does (diffusers' final_sigmas_type 'sigma_min').
FINAL_SIGMAS = ('zero', 'min')


def solver_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The K decreasing timesteps the ODE solvers visit: round(linspace(0, T-1, K+1)) without 0.

  The sample at the last of them is carried to the end point by the final step.
  """
  num_steps = chain.check_int_range('num_steps', num_steps, 1, num_timesteps)
  return np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _Grid:
  """The visited timesteps [K] and alpha, sigma, lambda [K + 1] there and at the end point."""

  timesteps: np.ndarray
  alpha: Array
  sigma: Array
  lam: Array


def _make_grid(d: diffusion_lib.Diffusion, num_steps: int, dtype: Any, final_sigma: str) -> _Grid:
  timesteps = solver_timesteps(d.num_timesteps, num_steps)
  a = jnp.take(d.alphas_cumprod, jnp.asarray(timesteps)).astype(dtype)
  ratio = jnp.sqrt((1.0 - a) / a)  # sigma / alpha, diffusers' "sigma"
  a_0 = d.alphas_cumprod[0].astype(dtype)
  last = jnp.zeros((1,), dtype) if final_sigma == 'zero' else jnp.sqrt((1.0 - a_0) / a_0)[None]
  ratio = jnp.concatenate([ratio, last])
  alpha = 1.0 / jnp.sqrt(jnp.square(ratio) + 1.0)
  sigma = ratio * alpha
  lam = jnp.log(alpha) - jnp.log(sigma)  # +inf at sigma = 0
  return _Grid(timesteps, alpha, sigma, lam)


def _predict_x0(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
  x: Array,
  t_scalar: Array,
  alpha: Array,
  sigma: Array,
  *,
  model_mean_type: str,
  model_var_type: str,
  clip_denoised: bool,
  dynamic_threshold: float | None,
) -> Array:
  """The model's x_0 at (x, t), from whatever it predicts; optionally clipped or thresholded."""
  output = chain.call_model(d, model_fn, x, chain.per_example(x.shape[0], t_scalar))
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
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x0.dtype)
    x0 = jnp.clip(x0, -s, s) / s
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0


@dataclasses.dataclass(frozen=True)
class _Setup:
  """A solver's checked start: x_T, its grid and its x_0 predictor `predict(x, t, alpha, sigma)`."""

  shape: tuple[int, ...]
  x_start: Array
  grid: _Grid
  predict: Callable[..., Array]


def _set_up(
  d: Any,
  model_fn: chain.ModelFn,
  shape: Any,
  rng: Any,
  *,
  x_T: Any,
  num_steps: int,
  order: int,
  model_mean_type: str,
  model_var_type: str,
  clip_denoised: bool,
  dynamic_threshold: float | None,
  final_sigma: str,
) -> _Setup:
  """Checks a solver's arguments before any tracing and prepares what both solvers start from."""
  chain.check_diffusion(d)
  shape = chain.check_shape(shape)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  if model_mean_type == 'xprev':
    raise ValueError(
      "The ODE solvers need a model of eps, x0 or v; model_mean_type='xprev' "
      'predicts a step of the ancestral chain instead.'
    )
  check_options(order=order, dynamic_threshold=dynamic_threshold, final_sigma=final_sigma)
  if x_T is None:
    chain.check_rng(rng)
    # The same initial-noise key as every other sampler: one seed, one x_T for all.
    rng = jax.random.split(rng)[0]
  x_start = chain.initial_sample(d, shape, rng, x_T)
  predict = functools.partial(
    _predict_x0,
    d,
    model_fn,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    clip_denoised=clip_denoised,
    dynamic_threshold=dynamic_threshold,
  )
  return _Setup(shape, x_start, _make_grid(d, num_steps, x_start.dtype, final_sigma), predict)


def check_options(*, order: Any, dynamic_threshold: Any, final_sigma: Any) -> None:
  """Raises ValueError, naming the valid values, for a bad order, threshold or final sigma."""
  if not chain.is_int(order) or order not in SOLVER_ORDERS:
    raise ValueError(f'order must be one of {SOLVER_ORDERS}, got {order!r}.')
  if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
    raise ValueError(f'dynamic_threshold must be a quantile in (0, 1], got {dynamic_threshold!r}.')
  if final_sigma not in FINAL_SIGMAS:
    raise ValueError(
      f'Unknown final_sigma {final_sigma!r}; valid choices: {", ".join(FINAL_SIGMAS)}.'
    )


# ---------------------------------------------------------------------------
# DPM-Solver++.


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


def dpm_solver_update(order: int, x: Array, preds: Array, i: Array, *, grid: _Grid) -> Array:
  """One DPM-Solver++ step of `order` from grid point i to i + 1 (Lu et al. 2022b, Alg. 2).

  `preds` holds the x_0 predictions, newest (at point i) first.
  """
  alpha, sigma, lam = grid.alpha, grid.sigma, grid.lam
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
  model_fn: chain.ModelFn,
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
    model_fn: `model_fn(x_t, t) -> output`, called once per step.
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
      thresholding of the predicted x_0 (e.g. 0.995), which keeps strongly
      guided samples in range without clipping them flat.
    final_sigma: 'zero' (default) ends with x_0; 'min' ends at timestep 0
      and returns x_0's noisy neighbour there (see `FINAL_SIGMAS`).

  Returns:
    x_0 of `shape`.
  """
  setup = _set_up(
    d,
    model_fn,
    shape,
    rng,
    x_T=x_T,
    num_steps=num_steps,
    order=order,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    clip_denoised=clip_denoised,
    dynamic_threshold=dynamic_threshold,
    final_sigma=final_sigma,
  )
  grid = setup.grid
  updates = [functools.partial(dpm_solver_update, k, grid=grid) for k in range(1, order + 1)]

  def body(carry, step):
    x, preds = carry  # preds: the x_0 predictions of the last `order` steps, newest first
    i, t_scalar, step_order = step
    x0 = setup.predict(x, t_scalar, grid.alpha[i], grid.sigma[i])
    preds = jnp.concatenate([x0[None], preds[:-1]])
    x_next = jax.lax.switch(step_order - 1, updates, x, preds, i)
    return (x_next.astype(x.dtype), preds), None

  num_visited = len(grid.timesteps)
  steps = (
    jnp.arange(num_visited, dtype=jnp.int32),
    jnp.asarray(grid.timesteps, jnp.int32),
    jnp.asarray(_dpm_solver_orders(num_visited, order, final_sigma)),
  )
  init = (setup.x_start, jnp.zeros((order,) + setup.shape, setup.x_start.dtype))
  (x0, _), _ = jax.lax.scan(body, init, steps)
  return x0


# ---------------------------------------------------------------------------
# UniPC: UniP predicts, UniC corrects, both with B(h) = e^h - 1 (bh2).


def _unipc_terms(
  order: int,
  x: Array,
  m0: Array,
  older: list[Array],
  lam_t,
  lam_s0,
  lam_older,
  alpha_t,
  sigma_t,
  sigma_s0,
):
  """What UniP and UniC of `order` share for a step from s0 to t.

  Returns the first-order step from x at s0, B(h), the b_k = h phi_{k+1}(h)
  k! / B(h), the divided differences D1_k = (older_k - m0) / r_k and the
  rows R[k] = (r_1^k, ..., r_{order-1}^k, 1) of the order conditions.
  """
  hh = -(lam_t - lam_s0)
  b_h = jnp.expm1(hh)
  x_first = (sigma_t / sigma_s0) * x - alpha_t * b_h * m0
  h_phi_k, factorial, b = b_h / hh - 1.0, 1.0, []
  for k in range(1, order + 1):
    b.append(h_phi_k * factorial / b_h)
    factorial *= k + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  rks = [(lam_older[k] - lam_s0) / (lam_t - lam_s0) for k in range(order - 1)]
  d1s = [(older[k] - m0) / rks[k] for k in range(order - 1)]
  rows = [jnp.stack([r**k for r in rks + [jnp.ones_like(lam_t)]]) for k in range(order)]
  return x_first, b_h, b, d1s, rows


def unip_update(order: int, x: Array, m0: Array, older: list[Array], **span) -> Array:
  """UniP of `order` (Zhao et al. 2023, Alg. 2): x at t from x at s0 and the predictions there.

  `m0` is the x_0 prediction at s0, `older[k]` the one k + 1 points before;
  `span` holds lam_t, lam_s0, lam_older (their lambdas), alpha_t, sigma_t
  and sigma_s0.
  """
  x_first, b_h, b, d1s, rows = _unipc_terms(order, x, m0, older, **span)
  if order == 1:
    return x_first
  if order == 2:
    rhos = [0.5]
  else:
    rhos = list(jnp.linalg.solve(jnp.stack(rows[:-1])[:, :-1], jnp.stack(b[:-1])))
  return x_first - span['alpha_t'] * b_h * sum(rho * d for rho, d in zip(rhos, d1s))


def unic_update(
  order: int, x: Array, m0: Array, older: list[Array], model_t: Array, **span
) -> Array:
  """UniC of `order` (Zhao et al. 2023, Alg. 1): x at t corrected with `model_t`, the new prediction there.

  `x`, `m0`, `older` and `span` are those the predictor of the step had.
  """
  x_first, b_h, b, d1s, rows = _unipc_terms(order, x, m0, older, **span)
  rhos = [0.5] if order == 1 else list(jnp.linalg.solve(jnp.stack(rows), jnp.stack(b)))
  correction = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), jnp.zeros_like(x))
  return x_first - span['alpha_t'] * b_h * (correction + rhos[-1] * (model_t - m0))


def _unipc_orders(num_steps: int, order: int) -> np.ndarray:
  """The predictor order of each step: min(order, steps left, predictions so far + 1)."""
  return np.asarray([min(order, num_steps - i, i + 1) for i in range(num_steps)], np.int32)


def unipc_sample_loop(
  d: diffusion_lib.Diffusion,
  model_fn: chain.ModelFn,
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
  setup = _set_up(
    d,
    model_fn,
    shape,
    rng,
    x_T=x_T,
    num_steps=num_steps,
    order=order,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    clip_denoised=clip_denoised,
    dynamic_threshold=dynamic_threshold,
    final_sigma=final_sigma,
  )
  alpha, sigma, lam = setup.grid.alpha, setup.grid.sigma, setup.grid.lam
  orders = _unipc_orders(len(setup.grid.timesteps), order)

  def at(table, i):
    return table[jnp.maximum(i, 0)]

  def span(i_from, i_to, k):
    """The lambdas, alphas and sigmas of a step from grid point i_from to i_to."""
    return dict(
      lam_t=lam[i_to],
      lam_s0=at(lam, i_from),
      lam_older=[at(lam, i_from - j) for j in range(1, k)],
      alpha_t=alpha[i_to],
      sigma_t=sigma[i_to],
      sigma_s0=at(sigma, i_from),
    )

  def predictor(k):
    def update(x, preds, i):
      return unip_update(k, x, preds[0], [preds[j] for j in range(1, k)], **span(i, i + 1, k))

    return update

  def corrector(k):
    def update(x, last_x, preds, i, x0):
      # Redoes the step that led from last_x at i - 1 to x at i, with the new prediction x0.
      older = [preds[j] for j in range(1, k)]
      return unic_update(k, last_x, preds[0], older, x0, **span(i - 1, i, k))

    return update

  correctors = [lambda x, *_: x] + [corrector(k) for k in range(1, order + 1)]
  predictors = [predictor(k) for k in range(1, order + 1)]

  def body(carry, step):
    x, last_x, preds = carry  # preds: the last `order` x_0 predictions, newest first
    i, t_scalar, step_order, previous_order = step
    x0 = setup.predict(x, t_scalar, alpha[i], sigma[i])
    x = jax.lax.switch(previous_order, correctors, x, last_x, preds, i, x0).astype(x.dtype)
    preds = jnp.concatenate([x0[None], preds[:-1]])
    x_next = jax.lax.switch(step_order - 1, predictors, x, preds, i)
    return (x_next.astype(x.dtype), x, preds), None

  steps = (
    jnp.arange(len(orders), dtype=jnp.int32),
    jnp.asarray(setup.grid.timesteps, jnp.int32),
    jnp.asarray(orders),
    jnp.asarray(np.concatenate([[0], orders[:-1]]), jnp.int32),
  )
  init = (setup.x_start, setup.x_start, jnp.zeros((order,) + setup.shape, setup.x_start.dtype))
  (x0, _, _), _ = jax.lax.scan(body, init, steps)
  return x0
