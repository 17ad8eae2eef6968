"""The probability-flow ODE likelihood (`ddpm_jax.ode_likelihood`) against closed forms.

Gaussian data N(mu, Sigma) has the exact denoiser D(x, sigma) = mu + Sigma
(Sigma + sigma^2 I)^-1 (x - mu) and the marginal N(mu, Sigma + sigma^2 I) at
every sigma, so the ODE's log-likelihood at sigma_min has a closed form. The
checks run in float64 with tiny images (12 dimensions), so every solve takes
milliseconds.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import diffusion
from ddpm_jax import edm
from ddpm_jax import likelihood
from ddpm_jax import ode_likelihood as ol

SHAPE = (4, 2, 2, 3)
DIMS = math.prod(SHAPE[1:])
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
_rng = np.random.default_rng(0)
# Per-dimension mean and standard deviation of the diagonal Gaussian data.
MU = 0.3 * _rng.normal(size=SHAPE[1:])
S = _rng.uniform(0.2, 0.8, size=SHAPE[1:])


def _diagonal_denoiser(x, sigma, mu=MU, s=S):
  sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  return mu + s**2 / (s**2 + sigma**2) * (x - mu)


def _samples(mu=MU, s=S, seed=1):
  """Points drawn from the data, so every term is of its typical size."""
  return jnp.asarray(mu + s * np.random.default_rng(seed).normal(size=SHAPE))


def _closed_form_nats_per_dim(x, mu=MU, s=S, sigma=SIGMA_MIN):
  return np.asarray(ol.gaussian_prior(np.sqrt(s**2 + sigma**2), mu)(x)) / DIMS


def _ode_nats_per_dim(out):
  """log p per dimension from `bpd`'s parts (the bin offset left out)."""
  return -np.asarray(out['prior_bpd'] + out['flow_bpd']) * math.log(2)


def _solve(denoiser, x, prior, **options):
  run = functools.partial(
    ol.bpd, denoiser, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, prior=prior, **options
  )
  return jax.jit(run)(x, jax.random.key(0))


# ---------------------------------------------------------------------------
# The Gaussian closed form.


@pytest.mark.parametrize('divergence', ['exact', 'hutchinson'])
def test_rk45_matches_the_gaussian_closed_form(x64, divergence):
  # The Jacobian of a diagonal Gaussian's denoiser is diagonal, where Rademacher
  # probes are exact (v_i^2 = 1): both divergences must be tight here.
  x = _samples()
  prior = ol.gaussian_prior(np.sqrt(S**2 + SIGMA_MAX**2), MU)
  out = _solve(
    _diagonal_denoiser,
    x,
    prior,
    solver='rk45',
    rtol=1e-10,
    atol=1e-10,
    divergence=divergence,
    dequantize=False,
  )
  assert out['bpd'].shape == (SHAPE[0],) and out['z'].shape == SHAPE
  np.testing.assert_allclose(_ode_nats_per_dim(out), _closed_form_nats_per_dim(x), atol=1e-8)
  z = MU + (x - MU) * np.sqrt((S**2 + SIGMA_MAX**2) / (S**2 + SIGMA_MIN**2))
  np.testing.assert_allclose(out['z'], z, rtol=1e-7)


def test_heun_error_falls_as_num_steps_squared(x64):
  x = _samples()
  prior = ol.gaussian_prior(np.sqrt(S**2 + SIGMA_MAX**2), MU)
  want = _closed_form_nats_per_dim(x)
  values = {
    n: _ode_nats_per_dim(_solve(_diagonal_denoiser, x, prior, num_steps=n, dequantize=False))
    for n in (64, 128, 256)
  }
  errors = [np.max(np.abs(values[n] - want)) for n in (64, 128, 256)]
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  assert np.all((3.7 < ratios) & (ratios < 4.3)), (errors, ratios)
  assert errors[-1] < 1e-3  # nats/dim at 256 steps (512 calls).
  # Second order all the way in: Richardson's extrapolation of 128 and 256 steps is tight.
  np.testing.assert_allclose((4 * values[256] - values[128]) / 3, want, atol=2e-5)


def _correlated_gaussian(dims, seed=2):
  """Mean, covariance and the exact denoiser of data with a full covariance."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(dims, dims)) / np.sqrt(dims)
  cov = 0.2 * a @ a.T + 0.02 * np.eye(dims)
  mu = 0.2 * rng.normal(size=dims)
  eigenvalues, q = np.linalg.eigh(cov)

  def denoiser(x, sigma):
    flat = x.reshape(x.shape[0], -1) - mu
    shrink = eigenvalues / (eigenvalues + jnp.square(sigma)[:, None])  # [B, dims]
    return (mu + ((flat @ q) * shrink) @ q.T).reshape(x.shape)

  return mu, cov, denoiser


def test_exact_divergence_of_a_full_covariance_matches_its_closed_form(x64):
  mu, cov, denoiser = _correlated_gaussian(DIMS)
  x = jnp.asarray(np.random.default_rng(3).multivariate_normal(mu, cov, SHAPE[0]).reshape(SHAPE))
  big = stats.multivariate_normal(mu, cov + SIGMA_MAX**2 * np.eye(DIMS))
  small = stats.multivariate_normal(mu, cov + SIGMA_MIN**2 * np.eye(DIMS))

  def prior(z):
    return jax.pure_callback(
      lambda v: big.logpdf(np.asarray(v).reshape(len(v), -1)).reshape(-1),
      jax.ShapeDtypeStruct((z.shape[0],), z.dtype),
      z,
    )

  out = _solve(
    denoiser, x, prior, solver='rk45', rtol=1e-10, atol=1e-10, divergence='exact', dequantize=False
  )
  want = small.logpdf(np.asarray(x).reshape(SHAPE[0], -1)) / DIMS
  np.testing.assert_allclose(_ode_nats_per_dim(out), want, atol=1e-8)


def test_hutchinson_is_unbiased(x64):
  # A full covariance's Jacobian is not diagonal, so one probe has variance;
  # over many keys the mean must equal the exact divergence's integral.
  mu, cov, denoiser = _correlated_gaussian(DIMS)
  x = jnp.asarray(np.random.default_rng(4).multivariate_normal(mu, cov, SHAPE[0]).reshape(SHAPE))
  options = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, num_steps=8, dequantize=False)

  def flow_bpd(key, **more):
    return ol.bpd(denoiser, x, key, **options, **more)['flow_bpd']

  exact = jax.jit(functools.partial(flow_bpd, divergence='exact'))(jax.random.key(0))
  draws = jax.jit(jax.vmap(flow_bpd))(jax.random.split(jax.random.key(5), 200))  # [200, B]
  mean, stderr = np.mean(draws, axis=0), np.std(draws, axis=0, ddof=1) / np.sqrt(len(draws))
  assert np.all(stderr > 1e-4)  # The probes do vary: the check has teeth.
  assert np.all(np.abs(mean - exact) < 4 * stderr), (mean, exact, stderr)
  # More probes per solve: the same estimate, with a standard error sqrt(P) times smaller.
  many = jax.jit(functools.partial(flow_bpd, num_probes=64))(jax.random.key(6))
  assert np.all(np.abs(many - exact) < 4 * stderr * np.sqrt(200 / 64))


# ---------------------------------------------------------------------------
# Units, dequantisation and the sigma range.


def test_a_uniform_density_over_the_bins_gives_8_bits_per_dim():
  # The 256 bins of width 2/255 tile [-1 - 1/255, 1 + 1/255], of width 512/255.
  log_density = -DIMS * math.log(512 / 255) * jnp.ones(3)
  np.testing.assert_allclose(ol.bits_per_dim(log_density, DIMS), 8.0, rtol=0, atol=1e-12)


def test_dequantisation_noise_is_uniform_over_one_bin(x64):
  # Data as narrow as a bin: the mean over draws of u ~ U(-w, w), w = 1/255, of
  # -log N(x + u; mu, v) is -log N(x; mu, v) + w^2 / (6 v) per dimension, and it
  # bounds -log2 of the bin's probability from above (Jensen).
  mu, s = np.zeros(SHAPE[1:]), np.full(SHAPE[1:], 1 / 255)
  x = jnp.asarray(np.random.default_rng(10).integers(-1, 2, size=SHAPE) / 127.5)
  run = functools.partial(
    ol.bpd,
    functools.partial(_diagonal_denoiser, mu=mu, s=s),
    x,
    sigma_min=SIGMA_MIN,
    sigma_max=SIGMA_MAX,
    solver='rk45',
    rtol=1e-6,
    atol=1e-6,
    divergence='exact',
    prior=ol.gaussian_prior(np.sqrt(s**2 + SIGMA_MAX**2), mu),
  )
  draws = jax.jit(jax.vmap(lambda key: run(key)['bpd']))(jax.random.split(jax.random.key(11), 200))
  v = s**2 + SIGMA_MIN**2
  nats = -np.asarray(ol.gaussian_prior(np.sqrt(v), mu)(x)) / DIMS + (1 / 255) ** 2 / (
    6 * v[0, 0, 0]
  )
  want = nats / math.log(2) + ol.OFFSET_BITS
  mean, stderr = np.mean(draws, axis=0), np.std(draws, axis=0, ddof=1) / np.sqrt(len(draws))
  assert np.all(np.abs(mean - want) < 4 * stderr), (mean, want, stderr)
  upper = stats.norm.cdf((x + 1 / 255) / np.sqrt(v))
  binned = -np.log2(upper - stats.norm.cdf((x - 1 / 255) / np.sqrt(v))).reshape(SHAPE[0], -1)
  assert np.all(mean > binned.mean(axis=1))


def test_dequantised_bpd_of_a_wide_gaussian_is_its_binned_probability(x64):
  # Over a bin a wide Gaussian's density is nearly flat, so the dequantised
  # bound is tight: it equals -log2 of the probability of each pixel's bin
  # (one draw of the noise u moves it by about x u / s^2 ~ 4e-7 nats per dimension).
  mu, s = np.zeros(SHAPE[1:]), np.full(SHAPE[1:], 100.0)
  pixels = np.random.default_rng(7).integers(0, 256, size=SHAPE).astype(np.uint8)
  x = pixels / 127.5 - 1.0
  out = _solve(
    functools.partial(_diagonal_denoiser, mu=mu, s=s),
    jnp.asarray(x),
    ol.gaussian_prior(np.sqrt(s**2 + SIGMA_MAX**2), mu),
    solver='rk45',
    rtol=1e-10,
    atol=1e-10,
    divergence='exact',
  )
  width = np.sqrt(s**2 + SIGMA_MIN**2)
  probability = stats.norm.cdf((x + 1 / 255) / width) - stats.norm.cdf((x - 1 / 255) / width)
  want = -np.log2(probability).reshape(SHAPE[0], -1).mean(axis=1)
  np.testing.assert_allclose(out['bpd'], want, atol=1e-6)
  assert ol.OFFSET_BITS == pytest.approx(math.log2(127.5), abs=1e-15)


def test_uint8_pixels_are_scaled_as_the_input_pipeline_scales_them():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  x = ol.to_model_range(pixels)
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(x, pixels / 127.5 - 1.0, atol=1e-7)
  np.testing.assert_allclose(np.diff(np.ravel(x)), ol.BIN_WIDTH, atol=1e-6)
  np.testing.assert_array_equal(ol.to_model_range(x), x)  # Floats: already scaled.


def test_process_sigma_range_and_settings():
  d = diffusion.make_diffusion('linear', 1000)
  lo, hi = edm.process_sigma_range(d)
  levels = np.sqrt((1 - np.asarray(d.alphas_cumprod, np.float64)) / np.asarray(d.alphas_cumprod))
  assert lo == pytest.approx(levels[0], rel=1e-4) and hi == pytest.approx(levels[-1], rel=1e-4)
  settings = ol.diffusion_settings(d)
  assert (settings['sigma_min'], settings['sigma_max']) == (lo, hi)
  z = jnp.ones((2, 3))
  # The prior is the bound's N(0, I) at x_T: log N(z; 0, 1 + sigma^2) per dimension.
  want = 3 * stats.norm.logpdf(1.0, scale=math.sqrt(1 + hi**2))
  np.testing.assert_allclose(settings['prior'](z), want, rtol=1e-6)


def _gaussian_eps_model(d, mu, s):
  """E[eps | x_t] of data N(mu, s^2) under the DDPM process d: the exact eps model."""

  def model_fn(x_t, t):
    column = (-1,) + (1,) * (x_t.ndim - 1)
    a = jnp.take(d.sqrt_alphas_cumprod, t).reshape(column)
    b = jnp.take(d.sqrt_one_minus_alphas_cumprod, t).reshape(column)
    return b * (x_t - a * mu) / (a**2 * s**2 + b**2)

  return model_fn


def test_ddpm_model_ode_bpd_sits_beside_its_discrete_bound(x64):
  # The exact eps model of Gaussian data: the ODE's bits/dim (Heun, 64 steps),
  # the discrete bound and the data's own binned probability must agree.
  d = diffusion.make_diffusion('linear', 1000, dtype=jnp.float64)
  model_fn = _gaussian_eps_model(d, MU, S)
  # Away from the edge bins, which the bound's decoder extends to infinity.
  pixels = np.round((np.clip(_samples(), -0.95, 0.95) + 1) * 127.5)
  x = jnp.asarray(pixels / 127.5 - 1.0)
  denoiser = edm.denoiser_from_diffusion(d, model_fn)
  ode = jax.jit(
    functools.partial(
      ol.bpd, denoiser, num_steps=64, divergence='exact', **ol.diffusion_settings(d)
    )
  )(x, jax.random.key(8))
  assert ode['bpd'].shape == (SHAPE[0],) and np.all(np.isfinite(ode['bpd']))
  width = np.sqrt(S**2 + edm.process_sigma_range(d)[0] ** 2)
  upper = stats.norm.cdf((x + 1 / 255 - MU) / width)
  lower = stats.norm.cdf((x - 1 / 255 - MU) / width)
  binned = -np.log2(upper - lower).reshape(SHAPE[0], -1).mean(axis=1)
  np.testing.assert_allclose(ode['bpd'], binned, atol=0.05)
  # One draw of the bound is noisy (about 0.5 bits/dim here, mostly its decoder
  # term); 32 draws bring its mean within 3 standard errors of the data's plus its gap.
  bound = jax.jit(jax.vmap(lambda key: likelihood.calc_bpd_loop(d, model_fn, x, key)['total_bpd']))(
    jax.random.split(jax.random.key(9), 32)
  )
  gap = np.mean(bound) - np.mean(binned)
  assert -0.1 < gap < 0.2, gap


# ---------------------------------------------------------------------------
# Options.


@pytest.mark.parametrize(
  'options, match',
  [
    (dict(num_steps=0), 'num_steps'),
    (dict(num_steps=2.5), 'num_steps'),
    (dict(sigma_min=1.0, sigma_max=1.0), 'sigma_min must be < sigma_max'),
    (dict(sigma_min=-1.0), 'sigma_min'),
    (dict(divergence='gaussian'), "divergence must be one of \\('hutchinson', 'exact'\\)"),
    (dict(solver='euler'), "solver must be one of \\('heun', 'rk45'\\)"),
    (dict(num_probes=0), 'num_probes'),
    (dict(max_steps=0), 'max_steps'),
    (dict(rtol=0.0), 'rtol'),
    (dict(prior=3.0), 'prior'),
  ],
)
def test_bad_options_raise_before_tracing(options, match):
  def denoiser(x, sigma):
    raise AssertionError('traced before the options were checked')

  with pytest.raises(ValueError, match=match):
    ol.bpd(denoiser, jnp.zeros(SHAPE), jax.random.key(0), **options)


def test_rk45_that_runs_out_of_steps_gives_nan():
  run = functools.partial(ol.bpd, _diagonal_denoiser, solver='rk45', max_steps=2)
  out = jax.jit(run)(_samples().astype(jnp.float32), jax.random.key(0))
  assert np.all(np.isnan(out['bpd'])) and int(out['nfe']) == 1 + 6 * 2
