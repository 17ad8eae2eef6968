"""Tests of the forward, posterior and reverse processes and the training losses.

The references are closed forms derived independently of `ddpm_jax.diffusion`:
the one-step kernel q(x_t | x_{t-1}) applied t+1 times (exactly and by Monte
Carlo), Bayes' rule for the posterior, the paper's Eq. 11 for its mean, the
score of a Gaussian, and the identities between the eps / x0 / v / xprev
parameterizations. Float64 checks run under `jax.enable_x64` (the `x64` fixture);
those that hold in both precisions run in each, at its own tolerance
(the `precision` fixture).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import likelihood
from ddpm_jax import losses as losses_lib

T = 1000
SHAPE = (5, 4, 4, 3)  # [B, H, W, C]
# One timestep per example: both ends, the paper's t = 2, and the middle.
T_MIX = np.array([0, 1, 250, 500, T - 1], dtype=np.int32)
# Moderate timesteps, where float32 round trips stay within ~1e-5.
T_MODERATE = np.array([0, 1, 100, 250, 500], dtype=np.int32)

REF_BETAS = np.linspace(1e-4, 0.02, T)  # The original's float64 linear schedule.
REF_AC = np.cumprod(1.0 - REF_BETAS)
REF_AC_PREV = np.concatenate([[1.0], REF_AC[:-1]])


def _data(seed: int, dtype=jnp.float32, shape=SHAPE) -> tuple[jax.Array, jax.Array]:
  """x0 uniform in [-1, 1] and standard normal noise, both of `shape`."""
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.uniform(-1.0, 1.0, shape), dtype),
    jnp.asarray(rng.standard_normal(shape), dtype),
  )


def _bcast(values: np.ndarray, ndim: int = len(SHAPE)) -> np.ndarray:
  """[B] -> [B, 1, ..., 1]."""
  return np.asarray(values).reshape((-1,) + (1,) * (ndim - 1))


def _diffusion(dtype) -> diffusion.Diffusion:
  """The linear schedule of T steps, its tables in `dtype`."""
  return diffusion.make_diffusion('linear', T, dtype=dtype)


def _d64() -> diffusion.Diffusion:
  return _diffusion(jnp.float64)


# Compiled once per model_fn: many eager ops cost more compile time than one jit.
_jit_losses = jax.jit(
  losses_lib.training_losses,
  static_argnums=1,
  static_argnames=('loss_type', 'model_mean_type', 'model_var_type', 'vlb_weight', 'min_snr_gamma'),
)


# ---------------------------------------------------------------------------
# Forward process: closed form against the one-step kernel.


@pytest.mark.parametrize('t', [0, 1, 17, 499, 999])
def test_q_mean_variance_is_the_one_step_kernel_applied_t_plus_1_times(x64, t):
  d = _d64()
  x0, _ = _data(0, jnp.float64)
  # Propagate x_{k} = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) z exactly: the mean
  # stays a multiple of x0 and the variance follows v <- (1 - beta) v + beta.
  coef, var = 1.0, 0.0
  for k in range(t + 1):
    coef *= np.sqrt(1.0 - REF_BETAS[k])
    var = (1.0 - REF_BETAS[k]) * var + REF_BETAS[k]
  mean, variance, log_variance = diffusion.q_mean_variance(d, x0, jnp.full((SHAPE[0],), t))
  assert mean.dtype == variance.dtype == jnp.float64
  assert variance.shape == log_variance.shape == (SHAPE[0], 1, 1, 1)
  np.testing.assert_allclose(mean, coef * np.asarray(x0), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(variance, var, rtol=1e-11)
  np.testing.assert_allclose(log_variance, np.log(var), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize('t', [9, 99])
def test_q_sample_matches_monte_carlo_of_the_kernel(x64, t):
  d = _d64()
  n = 50_000
  x0_values = np.array([0.7, -0.3])
  rng = np.random.default_rng(t)
  chain = np.broadcast_to(x0_values, (n, 2)).copy()
  for k in range(t + 1):
    chain = np.sqrt(1.0 - REF_BETAS[k]) * chain + np.sqrt(REF_BETAS[k]) * rng.standard_normal(
      chain.shape
    )
  # q_sample draws from the closed form with its own noise: same distribution.
  x0 = jnp.asarray(np.broadcast_to(x0_values, (n, 2)))
  ts = jnp.full((n,), t)
  direct = np.asarray(diffusion.q_sample(d, x0, ts, jnp.asarray(rng.standard_normal((n, 2)))))
  mean, variance, _ = diffusion.q_mean_variance(d, x0[:1], ts[:1])
  mean, variance = np.asarray(mean)[0], float(variance[0, 0])
  for samples in (chain, direct):
    # Five standard errors: a deterministic seed, and wrong moments miss by far more.
    np.testing.assert_allclose(samples.mean(0), mean, atol=5 * np.sqrt(variance / n))
    np.testing.assert_allclose(samples.var(0), variance, rtol=5 * np.sqrt(2.0 / n))


def test_q_sample_value(x64):
  d = _d64()
  x0, noise = _data(1, jnp.float64)
  expected = _bcast(np.sqrt(REF_AC[T_MIX])) * np.asarray(x0) + _bcast(
    np.sqrt(1.0 - REF_AC[T_MIX])
  ) * np.asarray(noise)
  np.testing.assert_allclose(
    diffusion.q_sample(d, x0, jnp.asarray(T_MIX), noise), expected, rtol=1e-12, atol=1e-14
  )


def test_q_mean_variance_float32_agrees_with_q_sample_noise_scale():
  """The variance q_mean_variance reports is the one q_sample draws with.

  Both come from float64 tables cast to float32, so they should agree to
  float32 precision at every t, including t = 0 where 1 - ac_0 = 1e-4.
  """
  d = diffusion.make_diffusion()
  x0, _ = _data(2)
  t = jnp.asarray(T_MIX)
  _, variance, log_variance = diffusion.q_mean_variance(d, x0, t)
  expected = (1.0 - REF_AC[T_MIX]).astype(np.float32)
  np.testing.assert_allclose(variance[:, 0, 0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(
    log_variance[:, 0, 0, 0], np.log(1.0 - REF_AC[T_MIX]), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    variance[:, 0, 0, 0], np.square(np.asarray(d.sqrt_one_minus_alphas_cumprod)[T_MIX]), rtol=1e-6
  )


# ---------------------------------------------------------------------------
# Parameterization round trips.


def test_predict_x0_from_eps_inverts_q_sample(precision):
  p = precision
  d = _diffusion(p.dtype)
  x0, noise = _data(4, p.dtype)
  # 1 / sqrt(ac) amplifies float32 rounding ~160x at t = 999: moderate t only.
  t = jnp.asarray(p.pick(float32=T_MODERATE, float64=T_MIX))
  x_t = diffusion.q_sample(d, x0, t, noise)
  x0_hat = diffusion.predict_x0_from_eps(d, x_t, t, noise)
  assert x0_hat.dtype == p.dtype
  np.testing.assert_allclose(x0_hat, x0, atol=p.pick(float32=1e-5, float64=1e-11))


def test_predict_eps_from_x0_inverts_predict_x0_from_eps(x64):
  d = _d64()
  x_t, eps = _data(5, jnp.float64)
  t = jnp.asarray(T_MIX)
  x0 = diffusion.predict_x0_from_eps(d, x_t, t, eps)
  np.testing.assert_allclose(diffusion.predict_eps_from_x0(d, x_t, t, x0), eps, atol=1e-10)
  # And the other way round.
  eps2 = diffusion.predict_eps_from_x0(d, x_t, t, x_t * 0.5)
  np.testing.assert_allclose(diffusion.predict_x0_from_eps(d, x_t, t, eps2), x_t * 0.5, atol=1e-10)


def test_v_target_value_and_round_trip(precision):
  p = precision
  d = _diffusion(p.dtype)
  x0, noise = _data(6, p.dtype)
  t = jnp.asarray(T_MIX)  # No 1/sqrt(ac) amplification: fine even at t = 999 in float32.
  v = diffusion.v_target(d, x0, t, noise)
  assert v.dtype == p.dtype
  expected = _bcast(np.sqrt(REF_AC[T_MIX])) * np.asarray(noise, np.float64) - _bcast(
    np.sqrt(1.0 - REF_AC[T_MIX])
  ) * np.asarray(x0, np.float64)
  np.testing.assert_allclose(
    v, expected, rtol=p.pick(float32=1e-6, float64=1e-12), atol=p.pick(float32=1e-6, float64=1e-14)
  )
  x_t = diffusion.q_sample(d, x0, t, noise)
  np.testing.assert_allclose(
    diffusion.predict_x0_from_v(d, x_t, t, v), x0, atol=p.pick(float32=1e-5, float64=1e-12)
  )


def test_predict_x0_from_xprev_inverts_the_posterior_mean(x64):
  d = _d64()
  x0, noise = _data(8, jnp.float64)
  t = jnp.asarray(T_MIX)
  x_t = diffusion.q_sample(d, x0, t, noise)
  mean, _, _ = diffusion.q_posterior(d, x0, x_t, t)
  # coef1 is 1.3e-4 at t = 999, so x0 is recovered with a 1e4 amplification.
  np.testing.assert_allclose(diffusion.predict_x0_from_xprev(d, x_t, t, mean), x0, atol=1e-10)


# ---------------------------------------------------------------------------
# The forward posterior q(x_{t-1} | x_t, x_0).


def test_posterior_mean_is_paper_eq_11(x64):
  d = _d64()
  x0, eps = _data(9, jnp.float64)
  t = jnp.asarray(T_MIX)
  x_t = diffusion.q_sample(d, x0, t, eps)
  mean, _, _ = diffusion.q_posterior(d, x0, x_t, t)
  # mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps).
  alpha, beta, ac = 1.0 - REF_BETAS[T_MIX], REF_BETAS[T_MIX], REF_AC[T_MIX]
  expected = (np.asarray(x_t) - _bcast(beta / np.sqrt(1.0 - ac)) * np.asarray(eps)) / _bcast(
    np.sqrt(alpha)
  )
  np.testing.assert_allclose(mean, expected, atol=1e-12)


def test_posterior_is_bayes_product_of_gaussians(x64):
  d = _d64()
  x0, x_t = _data(10, jnp.float64)
  ts = np.array([1, 2, 250, 500, 999], dtype=np.int32)
  mean, variance, log_variance = diffusion.q_posterior(d, x0, x_t, jnp.asarray(ts))
  # Prior x_{t-1} | x0 ~ N(sqrt(ac_prev) x0, 1 - ac_prev); likelihood
  # x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta). Multiply and normalise.
  alpha, beta, ac_prev = 1.0 - REF_BETAS[ts], REF_BETAS[ts], REF_AC_PREV[ts]
  precision = 1.0 / (1.0 - ac_prev) + alpha / beta
  post_var = 1.0 / precision
  post_mean = _bcast(post_var) * (
    _bcast(np.sqrt(ac_prev) / (1.0 - ac_prev)) * np.asarray(x0)
    + _bcast(np.sqrt(alpha) / beta) * np.asarray(x_t)
  )
  assert variance.shape == log_variance.shape == (SHAPE[0], 1, 1, 1)
  np.testing.assert_allclose(variance[:, 0, 0, 0], post_var, rtol=1e-11)
  np.testing.assert_allclose(log_variance[:, 0, 0, 0], np.log(post_var), rtol=1e-11)
  np.testing.assert_allclose(mean, post_mean, rtol=1e-11, atol=1e-13)


def test_posterior_at_t0_is_x0_with_zero_variance(x64):
  d = _d64()
  x0, x_t = _data(11, jnp.float64)
  t = jnp.zeros((SHAPE[0],), jnp.int32)
  mean, variance, log_variance = diffusion.q_posterior(d, x0, x_t, t)
  np.testing.assert_allclose(mean, x0, atol=1e-14)
  np.testing.assert_array_equal(variance, 0.0)
  # The log-variance is clipped to its t = 1 value, not -inf.
  np.testing.assert_allclose(log_variance, np.log(float(d.posterior_variance[1])), rtol=1e-12)


# ---------------------------------------------------------------------------
# Score.


def test_score_from_eps_is_the_gaussian_score(x64):
  d = _d64()
  rng = np.random.default_rng(12)
  mu = rng.uniform(-1, 1, SHAPE)
  sigma = rng.uniform(0.1, 0.5, SHAPE)
  x_t = jnp.asarray(rng.standard_normal(SHAPE))
  a = _bcast(REF_AC[T_MIX])
  # x0 ~ N(mu, sigma^2) gives x_t ~ N(sqrt(a) mu, a sigma^2 + 1 - a); the
  # optimal eps is E[eps | x_t] = Cov(eps, x_t) / Var(x_t) (x_t - E x_t).
  var = a * sigma**2 + 1.0 - a
  centered = np.asarray(x_t) - np.sqrt(a) * mu
  optimal_eps = np.sqrt(1.0 - a) * centered / var
  score = diffusion.score_from_eps(d, jnp.asarray(optimal_eps), jnp.asarray(T_MIX))
  # The true score by differentiating the log-density.
  log_density = lambda x: jnp.sum(-0.5 * (x - np.sqrt(a) * mu) ** 2 / var)
  true_score = jax.grad(log_density)(x_t)
  np.testing.assert_allclose(score, true_score, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(score, -centered / var, rtol=1e-10, atol=1e-12)
  # Sign: the score points back towards the mean.
  assert np.all(np.sign(np.asarray(score)) == -np.sign(centered))


# ---------------------------------------------------------------------------
# p_mean_variance and p_sample.


def _consistent_outputs(d, x0, noise, t):
  x_t = diffusion.q_sample(d, x0, t, noise)
  return x_t, {
    'eps': noise,
    'x0': x0,
    'v': diffusion.v_target(d, x0, t, noise),
    'xprev': diffusion.q_posterior(d, x0, x_t, t)[0],
  }


@pytest.mark.parametrize('mean_type', diffusion.MODEL_MEAN_TYPES)
def test_mean_types_agree_for_consistent_outputs(precision, mean_type):
  p = precision
  d = _diffusion(p.dtype)
  x0, noise = _data(13, p.dtype)
  t = jnp.asarray(p.pick(float32=T_MODERATE, float64=T_MIX))
  x_t, outputs = _consistent_outputs(d, x0, noise, t)
  out = diffusion.p_mean_variance(
    d,
    outputs[mean_type],
    x_t,
    t,
    model_mean_type=mean_type,
    model_var_type='fixedsmall',
    clip_denoised=False,
  )
  np.testing.assert_allclose(
    out['mean'], outputs['xprev'], atol=p.pick(float32=1e-5, float64=1e-12)
  )
  np.testing.assert_allclose(out['pred_x0'], x0, atol=p.pick(float32=1e-4, float64=1e-10))
  np.testing.assert_allclose(out['pred_eps'], noise, atol=p.pick(float32=1e-4, float64=1e-9))
  for key in out:
    assert out[key].dtype == p.dtype, key


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
def test_clipping_clamps_pred_x0(x64, mean_type):
  d = _d64()
  x0, noise = _data(15, jnp.float64)
  t = jnp.asarray(T_MIX)
  x_t = diffusion.q_sample(d, x0, t, noise)
  # Outputs whose implied x0 is 3 x0 + 0.5: most of it outside [-1, 1].
  far_x0 = 3.0 * x0 + 0.5
  output = {
    'eps': diffusion.predict_eps_from_x0(d, x_t, t, far_x0),
    'x0': far_x0,
    'v': diffusion.v_target(d, far_x0, t, diffusion.predict_eps_from_x0(d, x_t, t, far_x0)),
  }[mean_type]
  kwargs = dict(model_mean_type=mean_type, model_var_type='fixedlarge')
  unclipped = diffusion.p_mean_variance(d, output, x_t, t, clip_denoised=False, **kwargs)
  clipped = diffusion.p_mean_variance(d, output, x_t, t, clip_denoised=True, **kwargs)
  np.testing.assert_allclose(unclipped['pred_x0'], far_x0, atol=1e-9)
  assert np.abs(np.asarray(unclipped['pred_x0'])).max() > 1.5
  np.testing.assert_allclose(clipped['pred_x0'], np.clip(np.asarray(far_x0), -1, 1), atol=1e-9)
  assert np.abs(np.asarray(clipped['pred_x0'])).max() <= 1.0
  # The mean is the posterior mean of the clipped x0.
  np.testing.assert_allclose(
    clipped['mean'], diffusion.q_posterior(d, clipped['pred_x0'], x_t, t)[0], atol=1e-12
  )
  np.testing.assert_allclose(
    clipped['pred_eps'], diffusion.predict_eps_from_x0(d, x_t, t, clipped['pred_x0']), atol=1e-9
  )


def test_clipping_with_xprev_clamps_pred_x0_only(x64):
  d = _d64()
  x0, x_t = _data(16, jnp.float64)
  t = jnp.asarray(T_MIX)
  xprev = diffusion.q_posterior(d, 3.0 * x0, x_t, t)[0]
  out = diffusion.p_mean_variance(
    d, xprev, x_t, t, model_mean_type='xprev', model_var_type='fixedlarge', clip_denoised=True
  )
  np.testing.assert_allclose(out['pred_x0'], np.clip(3.0 * np.asarray(x0), -1, 1), atol=1e-9)
  np.testing.assert_array_equal(out['mean'], xprev)


@pytest.mark.parametrize(
  'var_type,table',
  [('fixedlarge', 'fixedlarge_log_variance'), ('fixedsmall', 'posterior_log_variance_clipped')],
)
def test_fixed_variances_equal_the_tables(x64, var_type, table):
  d = _d64()
  x0, x_t = _data(17, jnp.float64)
  t = jnp.asarray(T_MIX)
  out = diffusion.p_mean_variance(d, x0, x_t, t, model_var_type=var_type)
  expected = np.asarray(getattr(d, table))[T_MIX]
  assert out['log_variance'].shape == (SHAPE[0], 1, 1, 1)
  np.testing.assert_array_equal(out['log_variance'][:, 0, 0, 0], expected)
  np.testing.assert_allclose(out['variance'][:, 0, 0, 0], np.exp(expected), rtol=1e-14)


def test_fixedlarge_is_beta_and_fixedsmall_is_posterior_variance(x64):
  d = _d64()
  x0, x_t = _data(18, jnp.float64)
  t = jnp.asarray(T_MIX)
  large = diffusion.p_mean_variance(d, x0, x_t, t, model_var_type='fixedlarge')['variance']
  small = diffusion.p_mean_variance(d, x0, x_t, t, model_var_type='fixedsmall')['variance']
  post_var_1 = REF_BETAS[1] * (1 - REF_AC[0]) / (1 - REF_AC[1])
  expected_large = np.where(T_MIX == 0, post_var_1, REF_BETAS[T_MIX])
  post_var = REF_BETAS[T_MIX] * (1 - REF_AC_PREV[T_MIX]) / (1 - REF_AC[T_MIX])
  expected_small = np.where(T_MIX == 0, post_var_1, post_var)
  np.testing.assert_allclose(large[:, 0, 0, 0], expected_large, rtol=1e-11)
  np.testing.assert_allclose(small[:, 0, 0, 0], expected_small, rtol=1e-11)


def test_learned_variance_is_exp_of_output(x64):
  d = _d64()
  x0, x_t = _data(19, jnp.float64)
  log_var = jnp.asarray(np.random.default_rng(19).uniform(-8, 0, SHAPE))
  t = jnp.asarray(T_MIX)
  out = diffusion.p_mean_variance(
    d,
    jnp.concatenate([x0, log_var], -1),
    x_t,
    t,
    model_mean_type='x0',
    model_var_type='learned',
    clip_denoised=False,
  )
  np.testing.assert_array_equal(out['log_variance'], log_var)
  np.testing.assert_allclose(out['variance'], np.exp(np.asarray(log_var)), rtol=1e-14)
  # The first C channels are the mean part.
  np.testing.assert_allclose(out['pred_x0'], x0, atol=0)


@pytest.mark.parametrize('value', [-1.0, 0.0, 1.0])
def test_learned_range_interpolates_fixed_log_variances(x64, value):
  d = _d64()
  x0, x_t = _data(20, jnp.float64)
  t = jnp.asarray(T_MIX)
  output = jnp.concatenate([x0, jnp.full(SHAPE, value)], -1)
  out = diffusion.p_mean_variance(
    d, output, x_t, t, model_mean_type='x0', model_var_type='learned_range'
  )
  small = _bcast(np.asarray(d.posterior_log_variance_clipped)[T_MIX])
  large = _bcast(np.log(REF_BETAS[T_MIX]))
  frac = (value + 1.0) / 2.0
  expected = np.broadcast_to(frac * large + (1 - frac) * small, SHAPE)
  np.testing.assert_allclose(out['log_variance'], expected, rtol=1e-13)


@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall', 'learned'])
def test_p_sample_adds_scaled_noise_except_at_t0(var_type):
  d = diffusion.make_diffusion()
  x0, x_t = _data(21)
  _, noise = _data(22)
  t = jnp.asarray(np.array([0, 0, 1, 500, 999], dtype=np.int32))
  output = x0 if var_type != 'learned' else jnp.concatenate([x0, jnp.full(SHAPE, -3.0)], -1)
  kwargs = dict(model_mean_type='x0', model_var_type=var_type, clip_denoised=True)
  out = diffusion.p_mean_variance(d, output, x_t, t, **kwargs)
  sample = diffusion.p_sample(d, output, x_t, t, noise, **kwargs)
  added = np.asarray(sample - out['mean'])
  np.testing.assert_array_equal(added[:2], 0.0)
  expected = np.asarray(jnp.exp(0.5 * out['log_variance']) * noise)[2:]
  np.testing.assert_allclose(added[2:], expected, rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(added[2:]) > 0)


# ---------------------------------------------------------------------------
# Training losses.


def _perfect_model(d, x0, noise, mean_type):
  """A model_fn that returns the exact target of `mean_type` for (x0, noise)."""

  def model_fn(x_t, t_model):
    del t_model
    t = jnp.asarray(T_MIX)  # Unspaced process: the model's t is the step itself.
    return {
      'eps': noise,
      'x0': x0,
      'v': diffusion.v_target(d, x0, t, noise),
      'xprev': diffusion.q_posterior(d, x0, x_t, t)[0],
    }[mean_type]

  return model_fn


@pytest.mark.parametrize('mean_type', diffusion.MODEL_MEAN_TYPES)
def test_mse_of_perfect_model_is_zero(mean_type):
  d = diffusion.make_diffusion()
  x0, noise = _data(23)
  losses = losses_lib.training_losses(
    d,
    _perfect_model(d, x0, noise, mean_type),
    x0,
    jnp.asarray(T_MIX),
    noise,
    model_mean_type=mean_type,
  )
  assert losses.shape == (SHAPE[0],)
  assert losses.dtype == jnp.float32
  np.testing.assert_allclose(losses, 0.0, atol=1e-12)


def test_mse_of_zero_model_is_mean_squared_noise():
  d = diffusion.make_diffusion()
  x0, noise = _data(24)
  losses = losses_lib.training_losses(
    d, lambda x, t: jnp.zeros_like(x), x0, jnp.asarray(T_MIX), noise
  )
  expected = np.mean(np.square(np.asarray(noise)), axis=(1, 2, 3))
  np.testing.assert_allclose(losses, expected, rtol=1e-6)


def _grid_x0(seed: int, shape=SHAPE) -> np.ndarray:
  """Data on the uint8 grid, with both extreme values present."""
  v = np.random.default_rng(seed).integers(0, 256, shape)
  v.reshape(-1)[:2] = [0, 255]
  return v / 127.5 - 1.0


def _ref_decoder_loglik(x: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
  """The original code's discretized Gaussian log-likelihood, in float64 NumPy."""
  approx_cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
  inv = np.exp(-log_scale)
  cdf_plus = approx_cdf(inv * (x - mean + 1 / 255))
  cdf_min = approx_cdf(inv * (x - mean - 1 / 255))
  return np.where(
    x < -0.999,
    np.log(np.maximum(cdf_plus, 1e-12)),
    np.where(
      x > 0.999,
      np.log(np.maximum(1 - cdf_min, 1e-12)),
      np.log(np.maximum(cdf_plus - cdf_min, 1e-12)),
    ),
  )


def test_kl_loss_of_perfect_model_is_zero_for_t_positive(precision):
  p = precision
  d = _diffusion(p.dtype)
  x0 = jnp.asarray(_grid_x0(25), p.dtype)
  _, noise = _data(25, p.dtype)
  losses = _jit_losses(
    d,
    _perfect_model(d, x0, noise, 'eps'),
    x0,
    jnp.asarray(T_MIX),
    noise,
    loss_type='kl',
    model_var_type='fixedsmall',
  )
  assert losses.shape == (SHAPE[0],) and losses.dtype == p.dtype
  np.testing.assert_allclose(losses[1:], 0.0, atol=p.pick(float32=1e-4, float64=1e-12))
  # At t = 0 the term is the decoder NLL in bits/dim: the model mean is x0
  # itself (coef1[0] = 1, coef2[0] = 0) with log-scale 0.5 log(posterior_var[1]).
  post_var_1 = REF_BETAS[1] * (1 - REF_AC[0]) / (1 - REF_AC[1])
  x = np.asarray(x0, np.float64)[0]
  expected = -np.mean(_ref_decoder_loglik(x, x, np.full_like(x, 0.5 * np.log(post_var_1))))
  np.testing.assert_allclose(
    losses[0], expected / np.log(2), rtol=p.pick(float32=1e-5, float64=1e-10)
  )


def test_kl_loss_of_wrong_model_is_positive_kl():
  d = diffusion.make_diffusion()
  x0, noise = _data(27)
  t = jnp.asarray(T_MIX)
  losses = losses_lib.training_losses(
    d, lambda x, tt: jnp.zeros_like(x), x0, t, noise, loss_type='kl', model_var_type='fixedlarge'
  )
  x_t = diffusion.q_sample(d, x0, t, noise)
  true_mean, _, true_logvar = diffusion.q_posterior(d, x0, x_t, t)
  out = diffusion.p_mean_variance(d, jnp.zeros_like(x0), x_t, t, clip_denoised=False)
  kl = likelihood.normal_kl(true_mean, true_logvar, out['mean'], out['log_variance'])
  expected = np.mean(np.asarray(kl), axis=(1, 2, 3)) / np.log(2)
  np.testing.assert_allclose(losses[1:], expected[1:], rtol=1e-5)
  assert np.all(np.asarray(losses[1:]) > 0)


@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
def test_hybrid_needs_learned_variance(var_type):
  d = diffusion.make_diffusion()
  x0, noise = _data(28)
  with pytest.raises(ValueError, match='hybrid.*learned'):
    losses_lib.training_losses(
      d, lambda x, t: x, x0, jnp.asarray(T_MIX), noise, loss_type='hybrid', model_var_type=var_type
    )


@pytest.mark.parametrize('var_type', ['learned', 'learned_range'])
def test_hybrid_gradient_reaches_mean_only_through_mse(x64, var_type):
  d = _d64()
  x0 = jnp.asarray(_grid_x0(29))
  _, noise = _data(29, jnp.float64)
  rng = np.random.default_rng(30)
  mean_part = np.asarray(noise) + 0.3 * rng.standard_normal(SHAPE)
  var_part = (
    rng.uniform(-0.9, 0.9, SHAPE) if var_type == 'learned_range' else rng.uniform(-9.0, -3.0, SHAPE)
  )
  params = jnp.asarray(np.concatenate([mean_part, var_part], -1))
  t = jnp.asarray(np.array([0, 3, 250, 500, 999], dtype=np.int32))
  c = SHAPE[-1]

  def losses(p, loss_type):
    return losses_lib.training_losses(
      d, lambda x, tt: p, x0, t, noise, loss_type=loss_type, model_var_type=var_type
    )

  @functools.partial(jax.jit, static_argnums=1)
  def value_and_grad(p, loss_type):
    return losses(p, loss_type), jax.grad(lambda q: jnp.sum(losses(q, loss_type)))(p)

  hybrid_value, g_hybrid = value_and_grad(params, 'hybrid')
  mse_value, g_mse = value_and_grad(params, 'mse')
  kl_value, g_kl = value_and_grad(params, 'kl')
  g_kl = 0.001 * T * g_kl
  np.testing.assert_allclose(hybrid_value, mse_value + 0.001 * T * kl_value, rtol=1e-12)

  # Mean channels: only the MSE's gradient (the bound's is stopped)...
  np.testing.assert_allclose(g_hybrid[..., :c], g_mse[..., :c], rtol=1e-12, atol=1e-15)
  # ... although the bound alone does depend on the mean, so the stop matters.
  assert np.abs(np.asarray(g_kl[..., :c])).max() > 1e-3
  # Variance channels: only the bound's gradient.
  np.testing.assert_array_equal(g_mse[..., c:], 0.0)
  np.testing.assert_allclose(g_hybrid[..., c:], g_kl[..., c:], rtol=1e-10, atol=1e-15)
  assert np.abs(np.asarray(g_hybrid[..., c:])).max() > 0


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
def test_min_snr_gamma_weighting(x64, mean_type):
  d = _d64()
  x0, noise = _data(31, jnp.float64)
  t = jnp.asarray(np.array([0, 50, 200, 400, 999], dtype=np.int32))
  zero_model = lambda x, tt: jnp.zeros_like(x)
  plain = losses_lib.training_losses(d, zero_model, x0, t, noise, model_mean_type=mean_type)
  weighted = losses_lib.training_losses(
    d, zero_model, x0, t, noise, model_mean_type=mean_type, min_snr_gamma=5.0
  )
  ac = REF_AC[np.asarray(t)]
  snr = ac / (1 - ac)
  assert snr.max() > 5.0 > snr.min()  # Both sides of the clip are exercised.
  weight = {
    'eps': np.minimum(snr, 5.0) / snr,
    'x0': np.minimum(snr, 5.0),
    'v': np.minimum(snr, 5.0) / (snr + 1),
  }[mean_type]
  np.testing.assert_allclose(weighted, np.asarray(plain) * weight, rtol=1e-10)


def test_min_snr_gamma_rejects_xprev():
  d = diffusion.make_diffusion()
  x0, noise = _data(32)
  with pytest.raises(ValueError, match='min-SNR'):
    losses_lib.training_losses(
      d, lambda x, t: x, x0, jnp.asarray(T_MIX), noise, model_mean_type='xprev', min_snr_gamma=5.0
    )


def test_model_fn_receives_mapped_timesteps():
  d = diffusion.respace(diffusion.make_diffusion(), diffusion.space_timesteps(T, 10))
  x0, noise = _data(33)
  seen = []

  def model_fn(x_t, t):
    seen.append(np.asarray(t))
    return jnp.zeros_like(x_t)

  t = jnp.asarray(np.array([0, 1, 3, 5, 9], dtype=np.int32))
  losses = losses_lib.training_losses(d, model_fn, x0, t, noise)
  assert losses.shape == (SHAPE[0],)
  assert len(seen) == 1
  np.testing.assert_array_equal(seen[0], [0, 111, 333, 555, 999])
  # The respaced process noises with the kept timesteps' alphas_cumprod.
  full = diffusion.make_diffusion()
  np.testing.assert_allclose(
    diffusion.q_sample(d, x0, t, noise),
    diffusion.q_sample(full, x0, jnp.asarray(seen[0]), noise),
    atol=1e-6,
  )


@pytest.mark.parametrize('loss_type', losses_lib.LOSS_TYPES)
def test_losses_shape_and_finite(loss_type):
  d = diffusion.make_diffusion()
  x0 = jnp.asarray(_grid_x0(34), jnp.float32)
  _, noise = _data(34)
  losses = losses_lib.training_losses(
    d,
    lambda x, t: jnp.concatenate([0.1 * x, jnp.zeros_like(x)], -1),
    x0,
    jnp.asarray(T_MIX),
    noise,
    loss_type=loss_type,
    model_var_type='learned_range',
  )
  assert losses.shape == (SHAPE[0],)
  assert np.all(np.isfinite(np.asarray(losses)))


# ---------------------------------------------------------------------------
# jit, vmap, float64.


def test_functions_under_jit_match_eager():
  d = diffusion.make_diffusion()
  x0, noise = _data(35)
  t = jnp.asarray(T_MIX)
  np.testing.assert_allclose(
    jax.jit(diffusion.q_sample)(d, x0, t, noise),
    diffusion.q_sample(d, x0, t, noise),
    rtol=1e-6,
    atol=1e-7,
  )
  sample = functools.partial(
    diffusion.p_sample, model_mean_type='eps', model_var_type='fixedlarge', clip_denoised=True
  )
  np.testing.assert_allclose(
    jax.jit(sample)(d, noise, x0, t, noise), sample(d, noise, x0, t, noise), rtol=1e-6, atol=1e-6
  )
  model_fn = lambda x, tt: jnp.concatenate([0.5 * x, jnp.zeros_like(x)], -1)
  loss = functools.partial(
    losses_lib.training_losses, loss_type='hybrid', model_var_type='learned_range'
  )
  np.testing.assert_allclose(
    jax.jit(loss, static_argnums=1)(d, model_fn, x0, t, noise),
    loss(d, model_fn, x0, t, noise),
    rtol=1e-5,
  )


def test_vmap_of_q_sample_over_a_leading_axis():
  d = diffusion.make_diffusion()
  rng = np.random.default_rng(36)
  x0 = jnp.asarray(rng.uniform(-1, 1, (3,) + SHAPE), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((3,) + SHAPE), jnp.float32)
  t = jnp.asarray(rng.integers(0, T, (3, SHAPE[0])), jnp.int32)
  batched = jax.vmap(functools.partial(diffusion.q_sample, d))(x0, t, noise)
  assert batched.shape == (3,) + SHAPE
  for i in range(3):
    np.testing.assert_allclose(
      batched[i], diffusion.q_sample(d, x0[i], t[i], noise[i]), rtol=1e-6, atol=1e-7
    )


def test_outputs_keep_the_tables_precision(precision):
  p = precision
  d = _diffusion(p.dtype)
  x0 = jnp.asarray(_grid_x0(37), p.dtype)
  _, noise = _data(37, p.dtype)
  t = jnp.asarray(T_MIX)
  x_t = diffusion.q_sample(d, x0, t, noise)
  outputs = [
    x_t,
    *diffusion.q_mean_variance(d, x0, t),
    *diffusion.q_posterior(d, x0, x_t, t),
    diffusion.predict_x0_from_eps(d, x_t, t, noise),
    diffusion.score_from_eps(d, noise, t),
    diffusion.p_sample(d, noise, x_t, t, noise),
  ]
  outputs += list(diffusion.p_mean_variance(d, noise, x_t, t).values())
  for loss_type in losses_lib.LOSS_TYPES:
    outputs.append(
      jax.jit(
        losses_lib.training_losses,
        static_argnums=1,
        static_argnames=('loss_type', 'model_var_type'),
      )(
        d,
        lambda x, tt: jnp.concatenate([x, x], -1),
        x0,
        t,
        noise,
        loss_type=loss_type,
        model_var_type='learned_range',
      )
    )
  for i, out in enumerate(outputs):
    assert out.dtype == p.dtype, i


# ---------------------------------------------------------------------------
# Bad input.


def test_mismatched_shapes_are_rejected():
  d = diffusion.make_diffusion()
  x0, noise = _data(39)
  t = jnp.asarray(T_MIX)
  with pytest.raises(ValueError, match='Shape mismatch'):
    diffusion.q_sample(d, x0, t, noise[..., :2])
  with pytest.raises(ValueError, match='Shape mismatch'):
    diffusion.q_posterior(d, x0, x0[:, :3], t)
  with pytest.raises(ValueError, match='Shape mismatch'):
    diffusion.predict_x0_from_eps(d, x0, t, noise[:, :, :, :1])
  with pytest.raises(ValueError, match='Shape mismatch'):
    diffusion.p_sample(d, x0, x0, t, noise[:4])


@pytest.mark.parametrize(
  'bad_t',
  [np.zeros((4,), np.int32), np.zeros((6,), np.int32), np.zeros((5, 1), np.int32), np.int32(3)],
  ids=['short', 'long', 'column', 'scalar'],
)
def test_wrong_t_shape_is_rejected(bad_t):
  d = diffusion.make_diffusion()
  x0, noise = _data(40)
  with pytest.raises(ValueError, match=r't must have shape \[B\] = \[5\]'):
    diffusion.q_sample(d, x0, jnp.asarray(bad_t), noise)


@pytest.mark.parametrize('value', [-1, T, T + 7])
def test_out_of_range_t_is_rejected_when_concrete(value):
  d = diffusion.make_diffusion()
  x0, noise = _data(41)
  t = jnp.asarray(np.array([0, 1, value, 2, 3], dtype=np.int32))
  with pytest.raises(ValueError, match=r'\[0, 1000\)'):
    diffusion.q_sample(d, x0, t, noise)
  with pytest.raises(ValueError, match=r'\[0, 1000\)'):
    losses_lib.training_losses(d, lambda x, tt: x, x0, t, noise)
  # A respaced process has its own, shorter range.
  r = diffusion.respace(d, diffusion.space_timesteps(T, 10))
  with pytest.raises(ValueError, match=r'\[0, 10\)'):
    diffusion.q_sample(r, x0, jnp.asarray(np.array([0, 1, 10, 2, 3], np.int32)), noise)


@pytest.mark.parametrize('value', [-1, T])
def test_out_of_range_t_under_jit_gives_nan(value):
  d = diffusion.make_diffusion()
  x0, noise = _data(42)
  t = jnp.asarray(np.array([0, 1, value, 2, 3], dtype=np.int32))
  out = np.asarray(jax.jit(diffusion.q_sample)(d, x0, t, noise))
  assert np.all(np.isnan(out[2])), 'out-of-range t must not be clamped or wrapped'
  assert np.all(np.isfinite(np.delete(out, 2, axis=0)))
  x0_hat = np.asarray(jax.jit(diffusion.predict_x0_from_eps)(d, x0, t, noise))
  assert np.all(np.isnan(x0_hat[2]))


def test_non_integer_t_is_rejected():
  d = diffusion.make_diffusion()
  x0, noise = _data(43)
  with pytest.raises(ValueError, match='integer'):
    diffusion.q_sample(d, x0, jnp.asarray(T_MIX, jnp.float32), noise)


@pytest.mark.parametrize(
  'kwarg,choices',
  [('model_mean_type', diffusion.MODEL_MEAN_TYPES), ('model_var_type', diffusion.MODEL_VAR_TYPES)],
)
def test_unknown_mean_or_var_type_lists_valid_choices(kwarg, choices):
  d = diffusion.make_diffusion()
  x0, x_t = _data(44)
  t = jnp.asarray(T_MIX)
  for fn in (
    lambda: diffusion.p_mean_variance(d, x0, x_t, t, **{kwarg: 'epsilon'}),
    lambda: losses_lib.training_losses(d, lambda x, tt: x, x0, t, x_t, **{kwarg: 'epsilon'}),
  ):
    with pytest.raises(ValueError) as err:
      fn()
    message = str(err.value)
    assert "'epsilon'" in message and kwarg in message
    assert all(choice in message for choice in choices)


def test_unknown_loss_type_lists_valid_choices():
  d = diffusion.make_diffusion()
  x0, noise = _data(45)
  with pytest.raises(ValueError) as err:
    losses_lib.training_losses(d, lambda x, t: x, x0, jnp.asarray(T_MIX), noise, loss_type='l2')
  assert "'l2'" in str(err.value)
  assert all(choice in str(err.value) for choice in losses_lib.LOSS_TYPES)


@pytest.mark.parametrize('var_type', ['learned', 'learned_range'])
@pytest.mark.parametrize('channels', [3, 5, 9])
def test_learned_variance_needs_2c_channels(var_type, channels):
  d = diffusion.make_diffusion()
  x0, x_t = _data(46)
  output = jnp.zeros(SHAPE[:-1] + (channels,))
  with pytest.raises(ValueError, match=r'2\*C'):
    diffusion.p_mean_variance(d, output, x_t, jnp.asarray(T_MIX), model_var_type=var_type)
  with pytest.raises(ValueError, match=r'2\*C'):
    losses_lib.training_losses(
      d, lambda x, t: output, x0, jnp.asarray(T_MIX), x_t, model_var_type=var_type
    )


@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
def test_fixed_variance_rejects_2c_channels(var_type):
  d = diffusion.make_diffusion()
  x0, x_t = _data(47)
  output = jnp.concatenate([x0, x0], -1)
  with pytest.raises(ValueError, match='input shape'):
    diffusion.p_mean_variance(d, output, x_t, jnp.asarray(T_MIX), model_var_type=var_type)
  with pytest.raises(ValueError, match='input shape'):
    losses_lib.training_losses(
      d, lambda x, t: output, x0, jnp.asarray(T_MIX), x_t, model_var_type=var_type
    )
