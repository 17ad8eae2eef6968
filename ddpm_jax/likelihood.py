"""The variational bound on the negative log-likelihood, in bits per dimension.

    L = L_T + sum_{t>1} L_{t-1} + L_0
      = KL(q(x_T|x_0) || N(0, I))                       (prior_bpd)
      + sum_t KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))   (vb_terms_bpd, t > 0)
      - log p(x_0 | x_1)                                 (discretized decoder, t = 0)

Each term is averaged over the data dimensions and divided by ln 2, so the sum
is in bits/dim, the unit the paper reports (3.70-3.75 on CIFAR-10).
`calc_bpd_loop` evaluates all T terms in one `lax.scan`.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion as diffusion_lib

Array = jax.Array
_LN2 = math.log(2.0)


def _mean_flat(x: Array) -> Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

  All arguments broadcast against each other.
  """
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x: Array) -> Array:
  """The tanh approximation of the standard normal CDF used by the original code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
  """Log-probability of uint8 data under a Gaussian discretized to 256 bins.

  Data are pixel values v in {0..255} rescaled to x = v/127.5 - 1. Each value
  owns the bin [x - 1/255, x + 1/255]; the two outermost bins extend to -inf
  and +inf so the 256 probabilities sum to 1.

  Args:
    x: data in [-1, 1] on the 256-value grid, [B, ...].
    means: Gaussian means, broadcastable to x.
    log_scales: log standard deviations, broadcastable to x.

  Returns:
    Elementwise log-probabilities in nats, shape of x.
  """
  if jnp.shape(x) != jnp.broadcast_shapes(jnp.shape(x), jnp.shape(means), jnp.shape(log_scales)):
    raise ValueError(
      f'means {jnp.shape(means)} and log_scales {jnp.shape(log_scales)} must '
      f'broadcast to the shape of x {jnp.shape(x)}.'
    )
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(
    x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
  )


def prior_bpd(d: diffusion_lib.Diffusion, x0: Array) -> Array:
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim.

  Args:
    d: the process.
    x0: data [B, ...].

  Returns:
    [B]. Independent of any model; near 0 for a well-designed schedule.
  """
  t = jnp.full((x0.shape[0],), d.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = diffusion_lib.q_mean_variance(d, x0, t)
  return _mean_flat(normal_kl(mean, log_variance, 0.0, 0.0) * jnp.ones_like(x0)) / _LN2


def vb_terms_bpd(
  d: diffusion_lib.Diffusion,
  model_output: Array,
  x0: Array,
  x_t: Array,
  t: Array,
  *,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> dict[str, Array]:
  """One term of the bound at timesteps t, in bits/dim.

  For t > 0 the term is KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)); at t = 0 it
  is the discretized decoder's negative log-likelihood -log p(x_0|x_1).

  Args:
    d: the process.
    model_output: the model's output at (x_t, t).
    x0: data [B, ..., C] in [-1, 1].
    x_t: noisy data [B, ..., C].
    t: int timesteps [B].
    clip_denoised, model_mean_type, model_var_type: as in
      `diffusion.p_mean_variance`.

  Returns:
    dict with 'output' [B] (the term in bits/dim) and 'pred_x0' [B, ..., C].
  """
  true_mean, _, true_log_variance = diffusion_lib.q_posterior(d, x0, x_t, t)
  out = diffusion_lib.p_mean_variance(
    d,
    model_output,
    x_t,
    t,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    clip_denoised=clip_denoised,
  )
  kl = (
    _mean_flat(
      normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']) * jnp.ones_like(x0)
    )
    / _LN2
  )
  decoder_nll = (
    -_mean_flat(discretized_gaussian_log_likelihood(x0, out['mean'], 0.5 * out['log_variance']))
    / _LN2
  )
  return dict(output=jnp.where(t == 0, decoder_nll, kl), pred_x0=out['pred_x0'])


def calc_bpd_loop(
  d: diffusion_lib.Diffusion,
  model_fn: Callable[[Array, Array], Array],
  x0: Array,
  rng: Array,
  *,
  clip_denoised: bool = True,
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
) -> dict[str, Array]:
  """The full variational bound of x0, every term, in one `lax.scan`.

  Runs t = T-1 .. 0 (the original's order), drawing fresh noise for each t
  from `fold_in(rng, t)`.

  Args:
    d: the process.
    model_fn: `model_fn(x_t, t) -> output`.
    x0: data [B, ..., C] in [-1, 1] on the 256-value grid.
    rng: a PRNG key.
    clip_denoised, model_mean_type, model_var_type: as in
      `diffusion.p_mean_variance`.

  Returns:
    dict with 'total_bpd' [B] (the bound: sum of terms_bpd plus prior_bpd),
    'terms_bpd' [B, T] (L_{t-1} for t > 0 and L_0 at index 0), 'prior_bpd' [B]
    and 'mse' [B, T] (squared error of the predicted x_0 at each t).
  """
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  batch = x0.shape[0]

  def one_term(carry, t_scalar):
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, x0.dtype)
    x_t = diffusion_lib.q_sample(d, x0, t, noise)
    model_output = model_fn(x_t, jnp.take(d.timestep_map, t))
    term = vb_terms_bpd(
      d,
      model_output,
      x0,
      x_t,
      t,
      clip_denoised=clip_denoised,
      model_mean_type=model_mean_type,
      model_var_type=model_var_type,
    )
    mse = _mean_flat(jnp.square(term['pred_x0'] - x0))
    return carry, (term['output'], mse)

  timesteps = jnp.arange(d.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  _, (terms, mses) = jax.lax.scan(one_term, None, timesteps)
  # The scan ran from T-1 down to 0; put the terms in timestep order.
  terms_bpd = jnp.flip(terms, axis=0).T
  mse = jnp.flip(mses, axis=0).T
  prior = prior_bpd(d, x0)
  return dict(
    total_bpd=jnp.sum(terms_bpd, axis=1) + prior, terms_bpd=terms_bpd, prior_bpd=prior, mse=mse
  )
