"""Tests of the variational bound in bits/dim (`ddpm_jax.likelihood`).

Golden values are the original DDPM code's, kept in this file; the other references are
closed forms recomputed here in float64 NumPy (Gaussian KL, the discretized
decoder, the Bayes posterior) or Monte Carlo estimates. The full-bound loop is
checked with an oracle denoiser that knows x0, for which every KL term must
vanish and only the decoder term remains.
"""

import math
from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import likelihood

LN2 = math.log(2.0)
SHAPE = (3, 4, 4, 3)  # [B, H, W, C]


def _grid_x0(seed: int, shape=SHAPE) -> np.ndarray:
  """Data on the uint8 grid v/127.5 - 1, with both extreme values present."""
  v = np.random.default_rng(seed).integers(0, 256, shape)
  v.reshape(-1)[:2] = [0, 255]
  return v / 127.5 - 1.0


def _ref_decoder_loglik(x, mean, log_scale) -> np.ndarray:
  """The original code's discretized Gaussian log-likelihood, float64 NumPy, nats."""
  approx_cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
  centered = x - mean
  inv = np.exp(-np.asarray(log_scale, np.float64))
  cdf_plus = approx_cdf(inv * (centered + 1 / 255))
  cdf_min = approx_cdf(inv * (centered - 1 / 255))
  return np.where(
    x < -0.999,
    np.log(np.maximum(cdf_plus, 1e-12)),
    np.where(
      x > 0.999,
      np.log(np.maximum(1 - cdf_min, 1e-12)),
      np.log(np.maximum(cdf_plus - cdf_min, 1e-12)),
    ),
  )


def _ref_tables(num_timesteps: int):
  """betas, alphas_cumprod and posterior variance of the linear schedule, float64."""
  betas = np.linspace(1e-4, 0.02, num_timesteps)
  ac = np.cumprod(1 - betas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  return betas, ac, betas * (1 - ac_prev) / (1 - ac)


# ---------------------------------------------------------------------------
# normal_kl.


@pytest.mark.parametrize(
  'args,expected',
  [((1.0, 0.0, 0.0, 0.0), 0.5), ((0.0, math.log(2.0), 0.0, 0.0), 0.1534264097200273)],
)
def test_normal_kl_golden(x64, args, expected):
  value = likelihood.normal_kl(*[jnp.float64(a) for a in args])
  assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value), expected, rtol=1e-14)


def test_normal_kl_matches_closed_form_and_is_zero_for_equal_gaussians(x64):
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 50))
  lv1, lv2 = rng.uniform(-5, 2, size=(2, 50))
  s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
  expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
  got = likelihood.normal_kl(jnp.asarray(m1), jnp.asarray(lv1), jnp.asarray(m2), jnp.asarray(lv2))
  np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-13)
  assert np.all(np.asarray(got) > 0)
  np.testing.assert_allclose(
    likelihood.normal_kl(jnp.asarray(m1), jnp.asarray(lv1), jnp.asarray(m1), jnp.asarray(lv1)),
    0.0,
    atol=1e-15,
  )


def test_normal_kl_broadcasts():
  kl = likelihood.normal_kl(jnp.zeros((2, 3, 1)), jnp.zeros((2, 1, 1)), 0.0, jnp.zeros((1, 4)))
  assert kl.shape == (2, 3, 4)
  np.testing.assert_array_equal(kl, 0.0)


def test_normal_kl_matches_monte_carlo(x64):
  m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
  n = 400_000
  x = m1 + math.exp(0.5 * lv1) * np.random.default_rng(1).standard_normal(n)
  log_p = lambda x, m, lv: -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))
  ratio = log_p(x, m1, lv1) - log_p(x, m2, lv2)
  kl = float(
    likelihood.normal_kl(jnp.float64(m1), jnp.float64(lv1), jnp.float64(m2), jnp.float64(lv2))
  )
  assert abs(ratio.mean() - kl) < 5 * ratio.std() / math.sqrt(n)


# ---------------------------------------------------------------------------
# Discretized Gaussian decoder.


@pytest.mark.parametrize(
  'x,expected',
  [(-1.0, -0.35344120866375206), (0.0, -0.9050181142111203), (1.0, -0.35344120866375206)],
)
def test_decoder_golden_at_first_step_scale(x64, x, expected):
  d = diffusion.make_diffusion(dtype=jnp.float64)
  log_scale = 0.5 * d.fixedlarge_log_variance[0]
  value = likelihood.discretized_gaussian_log_likelihood(
    jnp.full((1,), x), jnp.float64(x), log_scale
  )
  assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value[0]), expected, rtol=1e-12)


def test_decoder_golden_unit_scale(x64):
  value = likelihood.discretized_gaussian_log_likelihood(
    jnp.zeros((1,)), jnp.float64(0.0), jnp.float64(0.0)
  )
  np.testing.assert_allclose(float(value[0]), -5.76705747360343, rtol=1e-12)


def test_decoder_matches_reference_formula(x64):
  rng = np.random.default_rng(2)
  x = _grid_x0(2)
  # Means near the data for most dimensions (likely bins), anywhere for the rest.
  means = np.where(
    rng.uniform(size=SHAPE) < 0.8,
    x + rng.uniform(-0.02, 0.02, SHAPE),
    rng.uniform(-1.2, 1.2, SHAPE),
  )
  log_scales = rng.uniform(-6, 0.5, SHAPE)
  got = likelihood.discretized_gaussian_log_likelihood(
    jnp.asarray(x), jnp.asarray(means), jnp.asarray(log_scales)
  )
  assert got.shape == SHAPE
  expected = _ref_decoder_loglik(x, means, log_scales)
  # Compared as probabilities: a bin far in the tail is a difference of two CDF
  # values near 1, whose float64 cancellation error is ~1e-16 absolute.
  np.testing.assert_allclose(np.exp(np.asarray(got)), np.exp(expected), rtol=1e-10, atol=1e-15)
  likely = expected > -10
  assert likely.mean() > 0.5  # Most of the comparisons are of likely bins.
  np.testing.assert_allclose(np.asarray(got)[likely], expected[likely], rtol=1e-12)


@pytest.mark.parametrize('mean', [-1.0, -0.3, 0.0, 0.77, 1.2])
@pytest.mark.parametrize('log_scale', [-6.0, -3.0, -1.0, 0.0, 1.0])
def test_decoder_probabilities_sum_to_one(precision, mean, log_scale):
  p = precision
  grid = jnp.arange(256, dtype=p.dtype) / 127.5 - 1.0
  log_p = likelihood.discretized_gaussian_log_likelihood(
    grid, jnp.asarray(mean, p.dtype), jnp.asarray(log_scale, p.dtype)
  )
  assert log_p.dtype == p.dtype
  # In float64 each of the 256 bins may be floored at 1e-12: at most 2.6e-10 too much.
  np.testing.assert_allclose(
    np.exp(np.asarray(log_p, np.float64)).sum(), 1.0, atol=p.pick(float32=1e-4, float64=3e-10)
  )


def test_decoder_rejects_params_that_do_not_broadcast_to_x():
  with pytest.raises(ValueError, match='broadcast'):
    likelihood.discretized_gaussian_log_likelihood(jnp.zeros((2, 1)), jnp.zeros((2, 3)), 0.0)


# ---------------------------------------------------------------------------
# Prior term.


def test_prior_bpd_golden(precision):
  p = precision
  d = diffusion.make_diffusion(dtype=p.dtype)
  x0 = np.zeros((4, 2, 2, 3))
  x0[1], x0[2] = 1.0, -1.0
  x0[3, :1] = 1.0  # Half the dimensions at 1, half at 0: the mean of the two.
  got = likelihood.prior_bpd(d, jnp.asarray(x0, p.dtype))
  assert got.shape == (4,) and got.dtype == p.dtype
  at_0, at_1 = 5.874783886761826e-10, 2.9112945420286456e-05
  # In float32, -1 - lv + exp(lv) cancels to within ~1e-7 of its 1e-9 value.
  np.testing.assert_allclose(
    got,
    [at_0, at_1, at_1, (at_0 + at_1) / 2],
    rtol=p.pick(float32=1e-2, float64=1e-10),
    atol=p.pick(float32=1e-7, float64=0.0),
  )


# ---------------------------------------------------------------------------
# One term of the bound.


def test_vb_terms_match_independent_computation(x64):
  num_timesteps = 1000
  d = diffusion.make_diffusion(dtype=jnp.float64)
  betas, ac, post_var = _ref_tables(num_timesteps)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  rng = np.random.default_rng(3)
  x0 = _grid_x0(3)
  x_t = rng.standard_normal(SHAPE)
  eps_hat = rng.standard_normal(SHAPE)
  ts = np.array([0, 1, 700])
  got = likelihood.vb_terms_bpd(
    d,
    jnp.asarray(eps_hat),
    jnp.asarray(x0),
    jnp.asarray(x_t),
    jnp.asarray(ts, jnp.int32),
    clip_denoised=True,
    model_mean_type='eps',
    model_var_type='fixedlarge',
  )
  assert got['output'].shape == (SHAPE[0],)
  for i, t in enumerate(ts):
    pred_x0 = np.clip(x_t[i] / np.sqrt(ac[t]) - np.sqrt(1 / ac[t] - 1) * eps_hat[i], -1, 1)
    np.testing.assert_allclose(got['pred_x0'][i], pred_x0, atol=1e-12)
    coef1 = betas[t] * np.sqrt(ac_prev[t]) / (1 - ac[t])
    coef2 = (1 - ac_prev[t]) * np.sqrt(1 - betas[t]) / (1 - ac[t])
    model_mean = coef1 * pred_x0 + coef2 * x_t[i]
    model_logvar = np.log(post_var[1] if t == 0 else betas[t])
    if t == 0:
      expected = -np.mean(_ref_decoder_loglik(x0[i], model_mean, 0.5 * model_logvar)) / LN2
    else:
      true_mean = coef1 * x0[i] + coef2 * x_t[i]
      true_var = post_var[t]
      kl = (
        0.5 * (model_logvar - np.log(true_var))
        + (true_var + (true_mean - model_mean) ** 2) / (2 * np.exp(model_logvar))
        - 0.5
      )
      expected = np.mean(kl) / LN2
    np.testing.assert_allclose(got['output'][i], expected, rtol=1e-10)


# ---------------------------------------------------------------------------
# The full bound.

SMALL_T = 50


def _oracle(d: diffusion.Diffusion, x0: jax.Array):
  """A denoiser that knows x0 and returns the exact noise of x_t."""
  return lambda x_t, t: diffusion.predict_eps_from_x0(d, x_t, t, x0)


# The model of the runs below that use a deliberately poor denoiser.
_blind_model = lambda x_t, t: 0.3 * x_t


class _BlindRun(NamedTuple):
  d: diffusion.Diffusion
  x0: jax.Array
  key: jax.Array
  out: dict[str, jax.Array]
  run: Callable[[jax.Array], dict[str, jax.Array]]  # The jitted loop, key -> out.
  traces: list[tuple[int, ...]]  # The t shapes model_fn was traced with.


@pytest.fixture(scope='module')
def blind_run() -> _BlindRun:
  """One jitted float32 bound evaluation of a poor denoiser, shared by several tests."""
  d = diffusion.make_diffusion(num_timesteps=SMALL_T)
  x0 = jnp.asarray(_grid_x0(4), jnp.float32)
  traces = []

  def model_fn(x_t, t):
    traces.append(t.shape)
    return _blind_model(x_t, t)

  run = jax.jit(
    lambda key: likelihood.calc_bpd_loop(
      d, model_fn, x0, key, clip_denoised=True, model_mean_type='eps', model_var_type='fixedlarge'
    )
  )
  key = jax.random.key(0)
  return _BlindRun(d, x0, key, run(key), run, traces)


def test_calc_bpd_loop_shapes_and_total(blind_run):
  d, x0, out = blind_run.d, blind_run.x0, blind_run.out
  b = SHAPE[0]
  assert out['total_bpd'].shape == (b,)
  assert out['prior_bpd'].shape == (b,)
  assert out['terms_bpd'].shape == (b, SMALL_T)
  assert out['mse'].shape == (b, SMALL_T)
  for v in out.values():
    assert v.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v)))
  np.testing.assert_allclose(
    out['total_bpd'], np.asarray(out['terms_bpd']).sum(1) + np.asarray(out['prior_bpd']), rtol=1e-6
  )
  np.testing.assert_allclose(out['prior_bpd'], likelihood.prior_bpd(d, x0), rtol=1e-6)
  assert np.all(np.asarray(out['terms_bpd'])[:, 1:] > 0)  # A wrong model pays at every t.


def test_calc_bpd_loop_terms_are_vb_terms_with_fresh_noise_per_t(blind_run):
  d, x0, key, out = blind_run.d, blind_run.x0, blind_run.key, blind_run.out

  @jax.jit
  def term_at(t_value):
    t = jnp.full((SHAPE[0],), t_value, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, t_value), x0.shape, x0.dtype)
    x_t = diffusion.q_sample(d, x0, t, noise)
    term = likelihood.vb_terms_bpd(
      d,
      _blind_model(x_t, t),
      x0,
      x_t,
      t,
      clip_denoised=True,
      model_mean_type='eps',
      model_var_type='fixedlarge',
    )
    return term['output'], jnp.mean(jnp.square(term['pred_x0'] - x0), axis=(1, 2, 3))

  for t_value in (0, 1, 17, SMALL_T - 1):
    term, mse = term_at(t_value)
    np.testing.assert_allclose(out['terms_bpd'][:, t_value], term, rtol=1e-5)
    np.testing.assert_allclose(out['mse'][:, t_value], mse, rtol=1e-5)


def test_calc_bpd_loop_traces_model_once(blind_run):
  second = blind_run.run(jax.random.key(1))
  # One scan body, traced once, reused for both keys: no Python loop over t.
  assert blind_run.traces == [(SHAPE[0],)]
  # The key matters: a poor model's KL terms depend on the noise drawn.
  assert not np.allclose(blind_run.out['total_bpd'], second['total_bpd'], rtol=1e-4)


def _expected_decoder_bpd(x0: np.ndarray, num_timesteps: int) -> np.ndarray:
  """The t = 0 term of a model with the exact mean: x0, at scale 0.5 log(post_var[1])."""
  _, _, post_var = _ref_tables(num_timesteps)
  log_scale = np.full_like(x0, 0.5 * np.log(post_var[1]))
  return -_ref_decoder_loglik(x0, x0, log_scale).mean(axis=(1, 2, 3)) / LN2


def test_calc_bpd_loop_with_oracle(blind_run, precision):
  p = precision
  d = diffusion.make_diffusion(num_timesteps=SMALL_T, dtype=p.dtype)
  x0 = jnp.asarray(_grid_x0(4), p.dtype)  # blind_run's data, for the comparison below.
  # Eager this time (the shared run is jitted).
  out = likelihood.calc_bpd_loop(
    d,
    _oracle(d, x0),
    x0,
    blind_run.key,
    clip_denoised=False,
    model_mean_type='eps',
    model_var_type='fixedsmall',
  )
  terms = np.asarray(out['terms_bpd'])
  assert terms.dtype == p.dtype
  # KL of the true posterior to itself.
  np.testing.assert_allclose(terms[:, 1:], 0.0, atol=p.pick(float32=1e-4, float64=1e-12))
  np.testing.assert_allclose(
    terms[:, 0],
    _expected_decoder_bpd(np.asarray(x0, np.float64), SMALL_T),
    rtol=p.pick(float32=1e-4, float64=1e-10),
  )
  np.testing.assert_allclose(out['mse'], 0.0, atol=p.pick(float32=1e-12, float64=1e-20))
  np.testing.assert_allclose(
    out['total_bpd'],
    terms[:, 0] + np.asarray(out['prior_bpd']),
    rtol=p.pick(float32=1e-6, float64=1e-12),
  )
  # The exact denoiser has a lower bound than the poor one, by a wide margin.
  assert np.all(np.asarray(out['total_bpd']) < np.asarray(blind_run.out['total_bpd']) - 1.0)


def test_calc_bpd_loop_respaced_model_sees_original_timesteps(x64):
  full = diffusion.make_diffusion(dtype=jnp.float64)
  r = diffusion.respace(full, diffusion.space_timesteps(1000, 10))
  x0_np = _grid_x0(9)
  x0 = jnp.asarray(x0_np)
  # The oracle works in the full process's timesteps: it is exact only if the
  # loop passes it the kept timesteps (0, 111, ..., 999), not the steps 0..9.
  out = likelihood.calc_bpd_loop(
    r, _oracle(full, x0), x0, jax.random.key(6), clip_denoised=False, model_var_type='fixedsmall'
  )
  assert out['terms_bpd'].shape == (SHAPE[0], 10)
  np.testing.assert_allclose(out['terms_bpd'][:, 1:], 0.0, atol=1e-10)
  # The decoder term of the respaced process: its step 0 is timestep 0 with
  # the posterior variance of its own step 1 (timestep 111).
  ac = np.asarray(full.alphas_cumprod)
  post_var_1 = (1 - ac[111] / ac[0]) * (1 - ac[0]) / (1 - ac[111])
  log_scale = np.full_like(x0_np, 0.5 * np.log(post_var_1))
  expected = -_ref_decoder_loglik(x0_np, x0_np, log_scale).mean(axis=(1, 2, 3)) / LN2
  np.testing.assert_allclose(out['terms_bpd'][:, 0], expected, rtol=1e-9)
