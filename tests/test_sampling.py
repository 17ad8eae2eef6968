"""Tests for the samplers against exact output distributions.

For data x_0 ~ N(mu, s^2) (independently per dimension) the optimal noise
predictor is known in closed form,

  E[eps | x_t] = sqrt(1 - a_t) (x_t - sqrt(a_t) mu) / (a_t s^2 + 1 - a_t),

with a = alphas_cumprod, and it is affine in x_t. With it and without
clipping every sampler is a linear-Gaussian chain, x_out = A x_T + sum_i B_i
z_i + c, so the exact mean and variance of its output follow by pushing
(mean, variance) through the same recursion in float64 NumPy. The tests
compare sample moments of a few thousand samples with those exact values,
within 4.5 standard errors of the sampling noise.

The process is short (T = 100, the linear schedule rescaled to keep the
T = 1000 endpoints' total noise: betas from 1e-3 to 0.2) so every chain
compiles and runs in about a second.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion, edm, sampling

T = 100
BETA_START, BETA_END = 1e-4 * 1000 / T, 0.02 * 1000 / T
MU = np.array([-0.4, 0.0, 0.3, 0.6])
S = np.array([0.25, 0.5, 0.35, 0.8])
N = 4000  # samples per moment check
N_SE = 4.5  # tolerance in standard errors


# ---------------------------------------------------------------------------
# The analytic denoiser and the exact propagation of its chains.


def _np_alphas_cumprod(num_timesteps: int, use=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float64 (betas, alphas_cumprod, alphas_cumprod_prev), optionally respaced."""
  betas = np.linspace(1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps, num_timesteps)
  ac = np.cumprod(1.0 - betas)
  if use is not None:
    ac = ac[np.asarray(use)]
  ac_prev = np.append(1.0, ac[:-1])
  return 1.0 - ac / ac_prev, ac, ac_prev


@functools.cache
def _diffusion(num_timesteps: int = T) -> diffusion.Diffusion:
  return diffusion.make_diffusion(
    'linear', num_timesteps, 1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps
  )


def _gaussian_model(
  mu=MU,
  s=S,
  num_timesteps: int = T,
  output: str = 'eps',
  counter: dict[str, int] = None,
  dtype=jnp.float32,
) -> Callable:
  """The optimal predictor for N(mu, s^2) data, as eps, x0 or v.

  It reads alphas_cumprod of the full T-step process at the timesteps it is
  given, like a network trained on that process.
  """
  _, ac_np, _ = _np_alphas_cumprod(num_timesteps)
  ac = jnp.asarray(ac_np, dtype)
  mu, s = jnp.asarray(mu, dtype), jnp.asarray(s, dtype)

  def model_fn(x, t):
    if counter is not None:
      counter['traces'] += 1  # Python side effect: runs once per trace.
    a = jnp.take(ac, t).reshape((-1,) + (1,) * (x.ndim - 1))
    eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return {'eps': eps, 'x0': x0, 'v': jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[output]

  return model_fn


def _affine_coefs(a, mu=MU, s=S):
  """eps_hat = e1 x + e0 and x0_hat = p1 x + p0 at alphas_cumprod a."""
  den = a * s**2 + 1 - a
  e1, e0 = np.sqrt(1 - a) / den, -np.sqrt(1 - a) * np.sqrt(a) * mu / den
  p1, p0 = (1 - np.sqrt(1 - a) * e1) / np.sqrt(a), -np.sqrt(1 - a) * e0 / np.sqrt(a)
  return e1, e0, p1, p0


def _exact_ddpm(var_type: str, use=None, num_timesteps: int = T, mu=MU, s=S):
  """Exact (mean, var) of ancestral sampling's output, and of x_t before each step t."""
  betas, ac, ac_prev = _np_alphas_cumprod(num_timesteps, use)
  m, v = np.zeros_like(mu), np.ones_like(mu)
  marginals = {}
  for t in reversed(range(len(ac))):
    marginals[t] = (m, v)
    a, a_prev, b = ac[t], ac_prev[t], betas[t]
    _, _, p1, p0 = _affine_coefs(a, mu, s)
    c1, c2 = b * np.sqrt(a_prev) / (1 - a), (1 - a_prev) * np.sqrt(1 - b) / (1 - a)
    posterior_var = b * (1 - a_prev) / (1 - a)
    noise_var = {
      'fixedsmall': posterior_var,
      'fixedlarge': b,
      # learned_range with output 0: the geometric mean of the two.
      'learned_range0': np.sqrt(b * posterior_var),
    }[var_type]
    m1 = c1 * p1 + c2
    m, v = m1 * m + c1 * p0, m1**2 * v + (noise_var if t > 0 else 0.0)
  return m, v, marginals


def _ddim_seq(num_steps: int, skip: str, num_timesteps: int = T) -> np.ndarray:
  if skip == 'uniform':
    return np.arange(0, num_timesteps, num_timesteps // num_steps)
  return (np.linspace(0, np.sqrt(0.8 * num_timesteps), num_steps) ** 2).astype(int)


def _exact_ddim(num_steps: int, eta: float, skip: str, num_timesteps: int = T, mu=MU, s=S):
  _, ac, _ = _np_alphas_cumprod(num_timesteps)
  seq = _ddim_seq(num_steps, skip, num_timesteps)
  m, v = np.zeros_like(mu), np.ones_like(mu)
  for i in reversed(range(len(seq))):
    a = ac[seq[i]]
    a_prev = ac[seq[i - 1]] if i > 0 else 1.0
    sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    e1, e0, p1, p0 = _affine_coefs(a, mu, s)
    direction = np.sqrt(1 - a_prev - sigma2)
    m1 = np.sqrt(a_prev) * p1 + direction * e1
    m, v = m1 * m + np.sqrt(a_prev) * p0 + direction * e0, m1**2 * v + sigma2
  return m, v


def _respaced_use(num_steps: int) -> np.ndarray:
  return np.round(np.linspace(0, T - 1, num_steps)).astype(int)


def _moment_errors(x: np.ndarray, mean: np.ndarray, var: np.ndarray):
  """|sample mean - mean| and |sample var - var| in standard errors, per dim."""
  n = x.shape[0]
  x = np.asarray(x, np.float64)
  mean_err = np.abs(x.mean(0) - mean) / np.sqrt(var / n)
  var_err = np.abs(x.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (n - 1)))
  return mean_err, var_err


def _assert_moments(x, mean, var):
  mean_err, var_err = _moment_errors(x, mean, var)
  assert np.all(mean_err < N_SE), (mean_err, np.asarray(x).mean(0), mean)
  assert np.all(var_err < N_SE), (var_err, np.asarray(x).var(0), var)


def _key(seed: int = 0):
  return jax.random.key(seed)


# Each config: (sampler on the T = 100 process, its exact output moments).
_MOMENT_CONFIGS = {
  'ddpm_fixedsmall': (
    lambda k: sampling.p_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, clip_denoised=False, model_var_type='fixedsmall'
    ),
    lambda: _exact_ddpm('fixedsmall')[:2],
  ),
  'ddpm_fixedlarge': (
    lambda k: sampling.p_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, clip_denoised=False, model_var_type='fixedlarge'
    ),
    lambda: _exact_ddpm('fixedlarge')[:2],
  ),
  'ddpm_learned_range': (
    lambda k: sampling.p_sample_loop(
      _diffusion(),
      lambda x, t: jnp.concatenate([_gaussian_model()(x, t), jnp.zeros_like(x)], axis=-1),
      (N, 4),
      k,
      clip_denoised=False,
      model_var_type='learned_range',
    ),
    lambda: _exact_ddpm('learned_range0')[:2],
  ),
  'ddim_eta0_uniform20': (
    lambda k: sampling.ddim_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, num_steps=20, clip_denoised=False
    ),
    lambda: _exact_ddim(20, 0.0, 'uniform'),
  ),
  'ddim_eta1_uniform20': (
    lambda k: sampling.ddim_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, num_steps=20, eta=1.0, clip_denoised=False
    ),
    lambda: _exact_ddim(20, 1.0, 'uniform'),
  ),
  'ddim_eta1_all100': (
    lambda k: sampling.ddim_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, num_steps=T, eta=1.0, clip_denoised=False
    ),
    lambda: _exact_ddim(T, 1.0, 'uniform'),
  ),
  'ddim_eta0_quad20': (
    lambda k: sampling.ddim_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, num_steps=20, skip='quad', clip_denoised=False
    ),
    lambda: _exact_ddim(20, 0.0, 'quad'),
  ),
  'ddim_eta0.5_uniform30': (  # 30 does not divide 100: range(0, 100, 3) has 34 steps.
    lambda k: sampling.ddim_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, num_steps=30, eta=0.5, clip_denoised=False
    ),
    lambda: _exact_ddim(30, 0.5, 'uniform'),
  ),
  'respaced10_fixedlarge': (
    lambda k: sampling.respaced_sample_loop(
      _diffusion(), _gaussian_model(), (N, 4), k, num_steps=10, clip_denoised=False
    ),
    lambda: _exact_ddpm('fixedlarge', use=_respaced_use(10))[:2],
  ),
  'respaced25_fixedsmall': (
    lambda k: sampling.respaced_sample_loop(
      _diffusion(),
      _gaussian_model(),
      (N, 4),
      k,
      num_steps=25,
      clip_denoised=False,
      model_var_type='fixedsmall',
    ),
    lambda: _exact_ddpm('fixedsmall', use=_respaced_use(25))[:2],
  ),
}


@functools.cache
def _samples(name: str) -> np.ndarray:
  return np.asarray(_MOMENT_CONFIGS[name][0](_key(0)), np.float64)


# ---------------------------------------------------------------------------
# The exact propagation itself.


def test_exact_propagation_approaches_the_data_distribution():
  # Ancestral sampling with the optimal denoiser converges to the data
  # distribution as T grows (the reverse-step discretization error shrinks).
  ratio_errors = []
  for num_timesteps in (100, 200, 1000):
    mean, var, _ = _exact_ddpm('fixedsmall', num_timesteps=num_timesteps)
    np.testing.assert_allclose(mean, MU, atol=1e-4)
    ratio_errors.append(np.max(np.abs(var / S**2 - 1)))
  assert ratio_errors[0] > ratio_errors[1] > ratio_errors[2]
  assert ratio_errors[2] < 0.035
  mean, var, _ = _exact_ddpm('fixedlarge', num_timesteps=1000)
  np.testing.assert_allclose(mean, MU, atol=1e-4)
  np.testing.assert_allclose(var, S**2, rtol=0.01)
  # DDIM with eta = 0 over all steps discretizes the probability-flow ODE.
  mean, var = _exact_ddim(1000, 0.0, 'uniform', num_timesteps=1000)
  np.testing.assert_allclose(mean, MU, atol=0.005)
  np.testing.assert_allclose(var, S**2, rtol=0.015)


def test_exact_ddim_eta1_all_steps_is_ddpm_fixedsmall():
  mean_ddim, var_ddim = _exact_ddim(T, 1.0, 'uniform')
  mean_ddpm, var_ddpm, _ = _exact_ddpm('fixedsmall')
  np.testing.assert_allclose(mean_ddim, mean_ddpm, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(var_ddim, var_ddpm, rtol=1e-12)


# ---------------------------------------------------------------------------
# Samplers against the exact output distributions.


@pytest.mark.parametrize('name', list(_MOMENT_CONFIGS))
def test_sample_moments_match_exact_propagation(name):
  mean, var = _MOMENT_CONFIGS[name][1]()
  _assert_moments(_samples(name), mean, var)


def test_moment_check_tells_variance_types_apart():
  # The check has power: fixedlarge samples are far from fixedsmall's exact law.
  mean, var, _ = _exact_ddpm('fixedsmall')
  _, var_err = _moment_errors(_samples('ddpm_fixedlarge'), mean, var)
  assert np.max(var_err) > 3 * N_SE


def test_ddim_eta1_all_steps_equals_ddpm_fixedsmall_sample_by_sample():
  # Both draw the noise of step t from fold_in(step_key, t), so beyond equal
  # laws the two chains give the same samples for the same key.
  np.testing.assert_allclose(_samples('ddim_eta1_all100'), _samples('ddpm_fixedsmall'), atol=2e-5)


def test_clipping_keeps_final_samples_in_range():
  # The last ancestral step (and DDIM's, to a_prev = 1) returns the clipped x0.
  d, model = _diffusion(), _gaussian_model()
  for name, sampler in (
    ('ddpm_fixedlarge', sampling.p_sample_loop),
    ('ddim_eta0_uniform20', functools.partial(sampling.ddim_sample_loop, num_steps=20)),
  ):
    clipped = np.asarray(sampler(d, model, (N, 4), _key(0)))
    assert np.abs(clipped).max() <= 1.0
    assert np.abs(_samples(name)).max() > 1.2  # N(0.6, 0.8^2) data often exceed 1.


@pytest.mark.parametrize(
  'name,mean_type',
  [('ddpm_fixedlarge', 'x0'), ('ddpm_fixedlarge', 'v'), ('ddim_eta0_uniform20', 'v')],
)
def test_mean_parameterizations_agree(name, mean_type):
  # The same optimal predictor given as x0 or v instead of eps: same samples.
  d, model = _diffusion(), _gaussian_model(output=mean_type)
  if name.startswith('ddpm'):
    out = sampling.p_sample_loop(
      d, model, (N, 4), _key(0), clip_denoised=False, model_mean_type=mean_type
    )
  else:
    out = sampling.ddim_sample_loop(
      d, model, (N, 4), _key(0), num_steps=20, clip_denoised=False, model_mean_type=mean_type
    )
  np.testing.assert_allclose(out, _samples(name), atol=1e-4)


def test_ddim_uses_only_the_mean_channels_of_learned_variance_outputs():
  model = _gaussian_model()
  with_variance = lambda x, t: jnp.concatenate([model(x, t), 5.0 + 0 * x], axis=-1)
  out = sampling.ddim_sample_loop(
    _diffusion(),
    with_variance,
    (N, 4),
    _key(0),
    num_steps=20,
    eta=1.0,
    clip_denoised=False,
    model_var_type='learned',
  )
  np.testing.assert_allclose(out, _samples('ddim_eta1_uniform20'), atol=1e-6)


# ---------------------------------------------------------------------------
# Progressive sampling.


def test_progressive_snapshots_and_final_sample():
  d, model = _diffusion(), _gaussian_model()
  x0, snaps = sampling.p_sample_loop_progressive(
    d, model, (N, 4), _key(0), every=20, clip_denoised=False, model_var_type='fixedsmall'
  )
  np.testing.assert_array_equal(snaps['t'], [80, 60, 40, 20, 0])
  assert snaps['x_t'].shape == snaps['pred_x0'].shape == (5, N, 4)
  # The same chain as p_sample_loop for the same key.
  np.testing.assert_allclose(x0, _samples('ddpm_fixedsmall'), rtol=1e-5, atol=1e-6)
  _, _, marginals = _exact_ddpm('fixedsmall')
  _, ac, _ = _np_alphas_cumprod(T)
  for i, t in enumerate([80, 60, 40, 20, 0]):
    x_t = np.asarray(snaps['x_t'][i], np.float64)
    # Each snapshot is the state at its own timestep t ...
    _assert_moments(x_t, *marginals[t])
    # ... and pred_x0 is the denoiser's x0 prediction from that state.
    _, _, p1, p0 = _affine_coefs(ac[t])
    np.testing.assert_allclose(snaps['pred_x0'][i], p1 * x_t + p0, atol=1e-4)


def test_progressive_clipped_predictions_are_in_range():
  _, snaps = sampling.p_sample_loop_progressive(
    _diffusion(), _gaussian_model(), (64, 4), _key(1), every=50
  )
  np.testing.assert_array_equal(snaps['t'], [50, 0])
  assert np.abs(np.asarray(snaps['pred_x0'])).max() <= 1.0


# ---------------------------------------------------------------------------
# Predictor-corrector.


def test_pc_sampler_corrector_moves_toward_the_data_distribution():
  # The corrector's step size uses per-example norms, which concentrate only
  # with many dimensions: 64 per example (the 4 test dims tiled 16 times).
  d = _diffusion()
  mu, s = np.tile(MU, 16), np.tile(S, 16)
  model = _gaussian_model(mu=mu, s=s)

  def var_ratio_error(corrector_steps):
    x = sampling.pc_sample_loop(
      d,
      model,
      (500, 64),
      _key(0),
      corrector_steps=corrector_steps,
      clip_denoised=False,
      model_var_type='fixedsmall',
    )
    x = np.asarray(x, np.float64).reshape(500 * 16, 4)
    np.testing.assert_allclose(x.mean(0), MU, atol=0.05)
    return np.abs(x.var(0) / S**2 - 1)

  with_corrector = var_ratio_error(1)
  assert np.all(with_corrector < 0.15)
  # Without it the T = 100 chain falls clearly short of the data variance.
  assert np.mean(with_corrector) < 0.5 * np.mean(var_ratio_error(0))


def test_pc_corrector_step_size_is_per_example():
  # Scaling one example's score changes only that example's chain: the norms
  # in the step size are taken per example, not over the batch.
  d, model = _diffusion(), _gaussian_model()
  boost = jnp.array([1.0, 1.5, 1.0, 1.0])[:, None]
  kw = dict(corrector_steps=1, clip_denoised=False)
  plain = np.asarray(sampling.pc_sample_loop(d, model, (4, 4), _key(12), **kw))
  boosted = np.asarray(
    sampling.pc_sample_loop(d, lambda x, t: model(x, t) * boost, (4, 4), _key(12), **kw)
  )
  np.testing.assert_allclose(boosted[[0, 2, 3]], plain[[0, 2, 3]], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(boosted[1] - plain[1])) > 0.1


# ---------------------------------------------------------------------------
# Interpolation.


def _interp_data():
  x0_a = MU + S * np.asarray(jax.random.normal(_key(10), (256, 4)))
  x0_b = MU + S * np.asarray(jax.random.normal(_key(11), (256, 4)))
  return jnp.asarray(x0_a, jnp.float32), jnp.asarray(x0_b, jnp.float32)


def test_interpolate_endpoints_at_small_t_reconstruct_inputs():
  d, model = _diffusion(), _gaussian_model()
  x0_a, x0_b = _interp_data()
  out = sampling.interpolate(
    d, model, x0_a, x0_b, _key(5), t=1, lam=jnp.array([0.0, 1.0]), clip_denoised=False
  )
  assert out.shape == (2, 256, 4)
  assert float(jnp.mean(jnp.abs(x0_a - x0_b))) > 0.4
  assert float(jnp.mean(jnp.abs(out[0] - x0_a))) < 0.1
  assert float(jnp.mean(jnp.abs(out[1] - x0_b))) < 0.1


def test_interpolate_shares_noise_across_lambdas():
  d, model = _diffusion(), _gaussian_model()
  x0_a, x0_b = _interp_data()
  lams = jnp.array([0.0, 0.25, 1.0])
  # Data as jit arguments: one compilation serves both pairs below.
  mix = jax.jit(
    lambda a, b: sampling.interpolate(d, model, a, b, _key(6), t=15, lam=lams, clip_denoised=False)
  )
  out = mix(x0_a, x0_b)
  # Same encoding and decoding noise, affine denoiser: affine in lam.
  np.testing.assert_allclose(out[1], 0.75 * out[0] + 0.25 * out[2], atol=1e-4)
  assert float(jnp.mean(jnp.abs(out[0] - out[2]))) > 0.1
  # Identical inputs: the same noise encodes both, so lam has no effect.
  same = mix(x0_a, x0_a)
  np.testing.assert_allclose(same[0], same[2], atol=1e-6)
  np.testing.assert_allclose(same[0], same[1], atol=1e-6)
  # A scalar lam gives that row alone.
  single = sampling.interpolate(d, model, x0_a, x0_b, _key(6), t=15, lam=0.25, clip_denoised=False)
  assert single.shape == (256, 4)
  np.testing.assert_allclose(single, out[1], atol=1e-5)


# ---------------------------------------------------------------------------
# Compilation, transformations, determinism.


def _run(name: str, d: diffusion.Diffusion, model_fn: Callable, shape, **kw) -> Callable:
  """The sampler `name` with everything but the key bound."""
  if name == 'interpolate':
    x0_a = jnp.full(shape, -0.5)
    x0_b = jnp.full(shape, 0.5)
    return functools.partial(
      sampling.interpolate,
      d,
      model_fn,
      x0_a,
      x0_b,
      t=d.num_timesteps // 2,
      lam=jnp.array([0.0, 0.5, 1.0]),
      **kw,
    )
  fn, extra = {
    'p_sample_loop': (sampling.p_sample_loop, {}),
    'progressive': (sampling.p_sample_loop_progressive, {'every': 10}),
    'ddim': (sampling.ddim_sample_loop, {'num_steps': 10, 'eta': 0.5}),
    'respaced': (sampling.respaced_sample_loop, {'num_steps': 10}),
    'pc': (sampling.pc_sample_loop, {'corrector_steps': 2}),
    # The sampler table's 'edm' row on a DDPM model, with churn (the noise of every step).
    'edm': (edm.sample_loop, {'num_steps': 5, 'S_churn': 5.0}),
  }[name]
  return functools.partial(fn, d, model_fn, shape, **extra, **kw)


SAMPLERS = ['p_sample_loop', 'progressive', 'ddim', 'respaced', 'interpolate', 'pc', 'edm']


def _first(out):
  return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize('name', SAMPLERS)
def test_model_is_traced_once_and_chain_is_deterministic(name):
  counter = {'traces': 0}
  # Tracing alone (eval_shape) shows one trace of the model for any T.
  for num_timesteps in (50, 100):
    counter['traces'] = 0
    model = _gaussian_model(num_timesteps=num_timesteps, counter=counter)
    jax.eval_shape(_run(name, _diffusion(num_timesteps), model, (8, 4)), _key(0))
    assert counter['traces'] == 1
  # A jitted chain compiles once and is reused for new keys.
  counter['traces'] = 0
  # Unclipped, so no output sits at the same clip bound for both keys.
  sample = jax.jit(_run(name, _diffusion(), model, (8, 4), clip_denoised=False))
  first = sample(_key(0))
  second = sample(_key(1))
  again = sample(_key(0))
  assert counter['traces'] == 1
  # Deterministic for a key, different for another.
  np.testing.assert_array_equal(_first(again), _first(first))
  assert np.all(np.asarray(_first(first)) != np.asarray(_first(second)))


@pytest.mark.parametrize('name', ['p_sample_loop', 'pc'])
def test_vmap_over_keys_matches_separate_calls(name):
  sample = _run(name, _diffusion(), _gaussian_model(), (8, 4))
  keys = jax.random.split(_key(7), 3)
  batched = jax.vmap(sample)(keys)
  assert batched.shape == (3, 8, 4)
  single = jax.jit(sample)
  for i in range(3):
    np.testing.assert_allclose(batched[i], single(keys[i]), rtol=1e-5, atol=1e-5)


def test_raw_uint32_keys_act_as_the_typed_key_with_the_same_bits():
  sample = jax.jit(_run('p_sample_loop', _diffusion(), _gaussian_model(), (8, 4)))
  raw = jax.random.PRNGKey(7)
  np.testing.assert_array_equal(sample(raw), sample(jax.random.wrap_key_data(raw)))


@pytest.mark.parametrize('name', ['p_sample_loop', 'pc'])
def test_batch_sharding_does_not_change_samples(name):
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  sample = _run(name, _diffusion(), _gaussian_model(), (16, 4))
  single = jax.jit(sample)(_key(8))
  sharded = jax.jit(sample, out_shardings=sharding)(_key(8))
  assert sharded.sharding.is_equivalent_to(sharding, 2)
  assert len(sharded.addressable_shards) == 4
  np.testing.assert_allclose(sharded, single, atol=1e-6)


def test_float64_mode():
  with jax.enable_x64(True):
    d = diffusion.make_diffusion('linear', T, BETA_START, BETA_END, dtype=jnp.float64)
    model = _gaussian_model(dtype=jnp.float64)
    ddpm = sampling.p_sample_loop(
      d, model, (64, 4), _key(9), clip_denoised=False, model_var_type='fixedsmall'
    )
    ddim = sampling.ddim_sample_loop(
      d, model, (64, 4), _key(9), num_steps=T, eta=1.0, clip_denoised=False
    )
    assert ddpm.dtype == ddim.dtype == jnp.float64
    # In float64 the two chains agree to rounding.
    np.testing.assert_allclose(ddim, ddpm, atol=1e-10)
  # The setting is restored: float32 tables give a float32 chain again.
  out = jax.eval_shape(
    functools.partial(sampling.p_sample_loop, _diffusion(), _gaussian_model(), (2, 4)), _key(9)
  )
  assert out.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Bad input.


def _bad_calls():
  x = jnp.zeros((4, 4))
  calls = {
    'shape_1d': (lambda d, m: sampling.p_sample_loop(d, m, (4,), _key()), 'shape'),
    'shape_zero': (lambda d, m: sampling.p_sample_loop(d, m, (4, 0), _key()), 'shape'),
    'shape_float': (lambda d, m: sampling.ddim_sample_loop(d, m, (4.0, 2), _key()), 'shape'),
    'shape_str': (lambda d, m: sampling.pc_sample_loop(d, m, 'abc', _key()), 'shape'),
    'mean_type': (
      lambda d, m: sampling.p_sample_loop(d, m, (4, 4), _key(), model_mean_type='noise'),
      'eps, x0',
    ),
    'var_type': (
      lambda d, m: sampling.ddim_sample_loop(d, m, (4, 4), _key(), model_var_type='big'),
      'fixedlarge',
    ),
    'key_batch': (
      lambda d, m: sampling.p_sample_loop(d, m, (4, 4), jax.random.split(_key(), 2)),
      'rng',
    ),
    'ddim_steps_0': (
      lambda d, m: sampling.ddim_sample_loop(d, m, (4, 4), _key(), num_steps=0),
      r'\[1, 100\]',
    ),
    'ddim_steps_big': (
      lambda d, m: sampling.ddim_sample_loop(d, m, (4, 4), _key(), num_steps=101),
      r'\[1, 100\]',
    ),
    'ddim_skip': (
      lambda d, m: sampling.ddim_sample_loop(d, m, (4, 4), _key(), skip='cubic'),
      'uniform, quad',
    ),
    'ddim_eta_negative': (
      lambda d, m: sampling.ddim_sample_loop(d, m, (4, 4), _key(), eta=-0.1),
      'eta',
    ),
    'ddim_eta_nan': (
      lambda d, m: sampling.ddim_sample_loop(d, m, (4, 4), _key(), eta=float('nan')),
      'eta',
    ),
    'respaced_steps': (
      lambda d, m: sampling.respaced_sample_loop(d, m, (4, 4), _key(), num_steps=0),
      r'\[1, 100\]',
    ),
    'every_not_divisor': (
      lambda d, m: sampling.p_sample_loop_progressive(d, m, (4, 4), _key(), every=30),
      r'divide T = 100.*\[1, 2, 4, 5',
    ),
    'every_zero': (
      lambda d, m: sampling.p_sample_loop_progressive(d, m, (4, 4), _key(), every=0),
      r'\[1, 100\]',
    ),
    'interp_t_negative': (
      lambda d, m: sampling.interpolate(d, m, x, x, _key(), t=-1, lam=0.5),
      r'\[0, 99\]',
    ),
    'interp_t_big': (
      lambda d, m: sampling.interpolate(d, m, x, x, _key(), t=100, lam=0.5),
      r'\[0, 99\]',
    ),
    'interp_t_float': (
      lambda d, m: sampling.interpolate(d, m, x, x, _key(), t=1.5, lam=0.5),
      r'\[0, 99\]',
    ),
    'interp_shapes': (
      lambda d, m: sampling.interpolate(d, m, x, x[:2], _key(), t=5, lam=0.5),
      'same shape',
    ),
    'interp_lam_2d': (
      lambda d, m: sampling.interpolate(d, m, x, x, _key(), t=5, lam=jnp.zeros((2, 2))),
      'lam',
    ),
    'pc_corrector': (
      lambda d, m: sampling.pc_sample_loop(d, m, (4, 4), _key(), corrector_steps=-1),
      '>= 0',
    ),
    'pc_snr': (lambda d, m: sampling.pc_sample_loop(d, m, (4, 4), _key(), snr=-1.0), 'snr'),
  }
  return calls


@pytest.mark.parametrize('case', list(_bad_calls()))
def test_bad_input_raises_before_any_compute(case):
  call, match = _bad_calls()[case]
  counter = {'traces': 0}
  with pytest.raises(ValueError, match=match):
    call(_diffusion(), _gaussian_model(counter=counter))
  assert counter['traces'] == 0


def test_respaced_needs_the_full_process():
  d = _diffusion()
  respaced = diffusion.respace(d, [0, 50, 99])
  with pytest.raises(ValueError, match='full process'):
    sampling.respaced_sample_loop(respaced, _gaussian_model(), (4, 4), _key(), num_steps=2)


# ---------------------------------------------------------------------------
# Classifier-free guidance.
#
# Each class y has Gaussian data N(mu_y, s_y^2) and the null label its own
# Gaussian, so every branch's optimal eps is affine in x_t and so is the
# guided eps_u + s (eps_c - eps_u): DDIM stays a linear-Gaussian chain whose
# output moments follow exactly, class by class.

CLASS_MU = np.array([[-0.5, 0.2, 0.4, 0.0], [0.6, -0.3, 0.1, 0.3]])
CLASS_S = np.array([[0.3, 0.5, 0.2, 0.6], [0.4, 0.25, 0.5, 0.3]])
NULL_MU, NULL_S = np.array([0.05, -0.05, 0.25, 0.15]), np.array([0.6, 0.5, 0.4, 0.5])
NUM_CLASSES = 2


def _class_conditional_model(counter=None):
  """model_fn(x, t, y): class y's optimal eps, the null label's for y = NUM_CLASSES."""
  oracles = [_gaussian_model(mu, s) for mu, s in zip(CLASS_MU, CLASS_S)]
  oracles.append(_gaussian_model(NULL_MU, NULL_S))

  def model_fn(x, t, y):
    if counter is not None:
      counter['calls'].append((x.shape, np.asarray(y)))
    outs = jnp.stack([oracle(x, t) for oracle in oracles])  # [classes + 1, B, ...]
    return jnp.take_along_axis(outs, y[None, :, None], axis=0)[0]

  return model_fn


def _exact_guided_ddim(num_steps, eta, scale, label):
  """Exact (mean, var) of DDIM with the guided affine eps of class `label`."""
  _, ac, _ = _np_alphas_cumprod(T)
  seq = _ddim_seq(num_steps, 'uniform')
  m, v = np.zeros(4), np.ones(4)
  for i in reversed(range(len(seq))):
    a = ac[seq[i]]
    a_prev = ac[seq[i - 1]] if i > 0 else 1.0
    sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    e1_c, e0_c, _, _ = _affine_coefs(a, CLASS_MU[label], CLASS_S[label])
    e1_u, e0_u, _, _ = _affine_coefs(a, NULL_MU, NULL_S)
    e1, e0 = e1_u + scale * (e1_c - e1_u), e0_u + scale * (e0_c - e0_u)
    p1, p0 = (1 - np.sqrt(1 - a) * e1) / np.sqrt(a), -np.sqrt(1 - a) * e0 / np.sqrt(a)
    direction = np.sqrt(1 - a_prev - sigma2)
    m1 = np.sqrt(a_prev) * p1 + direction * e1
    m, v = m1 * m + np.sqrt(a_prev) * p0 + direction * e0, m1**2 * v + sigma2
  return m, v


@functools.cache
def _guided_ddim_samples(scale):
  labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), N)
  guided = sampling.guided_model_fn(
    _class_conditional_model(), labels, scale, null_label=NUM_CLASSES
  )
  d = _diffusion()
  fn = jax.jit(
    lambda k: sampling.ddim_sample_loop(
      d, guided, (len(labels), 4), k, num_steps=20, eta=0.5, clip_denoised=False
    )
  )
  return labels, np.asarray(fn(_key(21)), np.float64)


@pytest.mark.parametrize('var_type', ['fixedlarge', 'learned_range'])
def test_guidance_is_the_formula_in_one_call_on_the_doubled_batch(var_type):
  # An arbitrary nonlinear conditional model; 2C channels with a learned variance.
  def model_fn(x, t, y):
    calls.append((x.shape, np.asarray(t), np.asarray(y)))
    yf = y.astype(jnp.float32)[:, None]
    mean = jnp.sin(x * (yf + 1.0)) + 0.01 * t[:, None] * yf
    if var_type == 'fixedlarge':
      return mean
    return jnp.concatenate([mean, jnp.cos(x + yf)], axis=-1)

  x = jax.random.normal(_key(5), (3, 4))
  t = jnp.array([1, 50, 99], jnp.int32)
  labels = np.array([2, 0, 1], np.int32)
  scale = 2.5
  calls = []
  g = sampling.guided_model_fn(model_fn, labels, scale, null_label=3, model_var_type=var_type)
  out = np.asarray(g(x, t))
  # One call, on 2B examples: [x; x] with [labels; null].
  assert len(calls) == 1
  shape, t_called, y_called = calls[0]
  assert shape == (6, 4)
  np.testing.assert_array_equal(t_called, np.concatenate([t, t]))
  np.testing.assert_array_equal(y_called, [2, 0, 1, 3, 3, 3])
  calls.clear()
  cond = np.asarray(model_fn(x, t, jnp.asarray(labels)))
  uncond = np.asarray(model_fn(x, t, jnp.full((3,), 3, jnp.int32)))
  expected_mean = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
  np.testing.assert_allclose(out[:, :4], expected_mean, rtol=1e-6, atol=1e-6)
  if var_type == 'learned_range':
    assert out.shape == (3, 8)
    np.testing.assert_array_equal(out[:, 4:], cond[:, 4:])  # The conditional branch's.
  # s = 0 is the unconditional model, s = 1 the conditional one.
  for s, branch in ((0.0, uncond), (1.0, cond)):
    g = sampling.guided_model_fn(model_fn, labels, s, null_label=3, model_var_type=var_type)
    np.testing.assert_allclose(np.asarray(g(x, t))[:, :4], branch[:, :4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('label', range(NUM_CLASSES))
def test_guided_ddim_has_the_exact_moments(label):
  labels, x = _guided_ddim_samples(3.0)
  _assert_moments(x[labels == label], *_exact_guided_ddim(20, 0.5, 3.0, label))
  # The check can fail: guidance moved the moments far from the plain conditional model's.
  mean_err, var_err = _moment_errors(x[labels == label], *_exact_guided_ddim(20, 0.5, 1.0, label))
  assert max(mean_err.max(), var_err.max()) > 20


@pytest.mark.parametrize(
  'name, run',
  [
    ('ddpm', lambda d, m, k: sampling.p_sample_loop(d, m, (4, 4), k)),
    ('respaced', lambda d, m, k: sampling.respaced_sample_loop(d, m, (4, 4), k, num_steps=5)),
    ('pc', lambda d, m, k: sampling.pc_sample_loop(d, m, (4, 4), k, corrector_steps=1)),
    ('dpm_solver', lambda d, m, k: sampling.dpm_solver_sample_loop(d, m, (4, 4), k, num_steps=5)),
    ('unipc', lambda d, m, k: sampling.unipc_sample_loop(d, m, (4, 4), k, num_steps=5)),
  ],
)
def test_every_sampler_takes_the_guided_model(name, run):
  # At s = 1 guidance is the conditional model, so each sampler gives its samples.
  del name
  model_fn = _class_conditional_model()
  labels = np.array([0, 1, 1, 0], np.int32)
  guided = sampling.guided_model_fn(model_fn, labels, 1.0, null_label=NUM_CLASSES)

  def conditional(x, t):
    return model_fn(x, t, jnp.asarray(labels))

  d = _diffusion()
  both = jax.jit(lambda k: (run(d, guided, k), run(d, conditional, k)))
  a, b = both(_key(8))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  # And at s = 3 they differ from it.
  strong = sampling.guided_model_fn(model_fn, labels, 3.0, null_label=NUM_CLASSES)
  c = jax.jit(lambda k: run(d, strong, k))(_key(8))
  assert np.abs(np.asarray(c) - np.asarray(b)).max() > 1e-2


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(guidance_scale=-0.5), 'guidance_scale must be a finite number >= 0'),
    (dict(guidance_scale=float('nan')), 'guidance_scale must be a finite number >= 0'),
    (dict(guidance_scale='3'), 'guidance_scale must be a number'),
    (dict(labels=np.zeros((4, 1), np.int32)), r'1-D integer array \[B\]'),
    (dict(labels=np.zeros(4, np.float32)), r'1-D integer array \[B\]'),
    (dict(labels=np.array([0, 1, 2, 1], np.int32)), r'classes in \[0, 2\).*\[2\]'),
    (dict(labels=np.array([0, -1, 1, 1], np.int32)), r'classes in \[0, 2\).*\[-1\]'),
    (dict(null_label=0), 'null_label must be the number of classes'),
    (dict(model_var_type='learnt'), 'model_var_type'),
  ],
)
def test_bad_guidance_input_is_a_clear_error(kwargs, match):
  args = dict(labels=np.array([0, 1, 1, 0], np.int32), guidance_scale=2.0, null_label=NUM_CLASSES)
  args.update(kwargs)
  counter = {'calls': []}
  labels, scale = args.pop('labels'), args.pop('guidance_scale')
  with pytest.raises(ValueError, match=match):
    sampling.guided_model_fn(_class_conditional_model(counter), labels, scale, **args)
  assert not counter['calls']


def test_labels_of_another_batch_size_are_refused_when_called():
  labels = np.array([0, 1, 1], np.int32)
  guided = sampling.guided_model_fn(_class_conditional_model(), labels, 2.0, null_label=2)
  with pytest.raises(ValueError, match=r'one class per sample, shape \[B\] = \(4,\)'):
    sampling.ddim_sample_loop(_diffusion(), guided, (4, 4), _key(), num_steps=5)
