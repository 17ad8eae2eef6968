"""The ODE solvers (DPM-Solver++, UniPC): equal to diffusers, convergent at their order, checked.

Also the sampling fixes that came with them: every sampler takes x_T, DDIM
makes exactly the model calls asked for, and respaced ancestral sampling
reads an x_{t-1} model with the full process's coefficients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_jax import diffusion
from ddpm_jax import sampling

diffusers = pytest.importorskip('diffusers')

SHAPE = (3, 4, 4, 2)
SOLVERS = {'dpm_solver': sampling.dpm_solver_sample_loop, 'unipc': sampling.unipc_sample_loop}


def _model_pair(d, prediction):
  """One smooth, nonlinear model in JAX and in torch (same float32 table)."""
  table = np.asarray(d.alphas_cumprod, np.float32)

  def output(x, a, tanh):
    eps = tanh(x) * (0.3 + 0.5 * a) + 0.1 * x
    if prediction == 'eps':
      return eps
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    return x0 if prediction == 'x0' else a**0.5 * eps - (1 - a) ** 0.5 * x0

  def jax_fn(x, t):
    return output(x, jnp.take(jnp.asarray(table), t).reshape(-1, 1, 1, 1), jnp.tanh)

  def torch_fn(x, t):
    return output(x, torch.tensor(table[int(t)]), torch.tanh)

  return jax_fn, torch_fn


def _diffusers_samples(solver, d, order, num_steps, prediction, torch_fn, x_T):
  kwargs = dict(
    num_train_timesteps=d.num_timesteps,
    trained_betas=np.asarray(d.betas),
    solver_order=order,
    prediction_type={'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}[prediction],
  )
  if solver == 'dpm_solver':
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', **kwargs)
  else:
    scheduler = diffusers.UniPCMultistepScheduler(**kwargs)
  scheduler.set_timesteps(num_steps)
  x = torch.tensor(x_T)
  for t in scheduler.timesteps:
    x = scheduler.step(torch_fn(x, t), t, x).prev_sample
  return x.numpy()


def _ours(solver, d, jax_fn, order, num_steps, prediction, x_T, **kwargs):
  fn = jax.jit(
    lambda x: SOLVERS[solver](
      d,
      jax_fn,
      SHAPE,
      None,
      num_steps=num_steps,
      order=order,
      x_T=x,
      model_mean_type=prediction,
      **kwargs,
    )
  )
  return np.asarray(fn(x_T))


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('num_steps', [1, 3, 12, 20])
@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_equals_diffusers(solver, order, num_steps, schedule):
  d = diffusion.make_diffusion(schedule, 1000)
  jax_fn, torch_fn = _model_pair(d, 'eps')
  x_T = np.random.default_rng(num_steps).standard_normal(SHAPE).astype(np.float32)
  want = _diffusers_samples(solver, d, order, num_steps, 'eps', torch_fn, x_T)
  got = _ours(solver, d, jax_fn, order, num_steps, 'eps', x_T)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('prediction', ['x0', 'v'])
@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_equals_diffusers_for_x0_and_v_models(solver, prediction):
  d = diffusion.make_diffusion('linear', 1000)
  jax_fn, torch_fn = _model_pair(d, prediction)
  x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
  want = _diffusers_samples(solver, d, 2, 10, prediction, torch_fn, x_T)
  np.testing.assert_allclose(
    _ours(solver, d, jax_fn, 2, 10, prediction, x_T), want, rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_orders_give_different_samples(solver):
  # The tolerance above is far below what the order changes: the comparison can fail.
  d = diffusion.make_diffusion('linear', 1000)
  jax_fn, _ = _model_pair(d, 'eps')
  x_T = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
  samples = [_ours(solver, d, jax_fn, order, 12, 'eps', x_T) for order in (1, 2, 3)]
  assert np.abs(samples[0] - samples[1]).max() > 1e-2
  assert np.abs(samples[1] - samples[2]).max() > 1e-3


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_learned_variance_uses_only_the_mean_channels(solver):
  d = diffusion.make_diffusion('linear', 100)
  jax_fn, _ = _model_pair(d, 'eps')
  x_T = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
  with_variance = lambda x, t: jnp.concatenate([jax_fn(x, t), 5.0 + x], axis=-1)
  plain = _ours(solver, d, jax_fn, 2, 8, 'eps', x_T)
  learned = np.asarray(
    SOLVERS[solver](
      d, with_variance, SHAPE, None, num_steps=8, x_T=x_T, model_var_type='learned_range'
    )
  )
  np.testing.assert_allclose(learned, plain, rtol=1e-6, atol=1e-6)


# The probability-flow ODE of Gaussian data N(mu, s^2) has a closed-form
# solution: x_t stays at the same standard score of its Gaussian marginal.
# On a process whose logSNR is linear in t the solvers' steps are uniform in
# logSNR, the variable their order refers to.
MU, S = 0.3, 0.5


def _linear_logsnr_process(num_timesteps=1000):
  half_logsnr = np.linspace(4.0, -4.0, num_timesteps)
  alphas_cumprod = 1.0 / (1.0 + np.exp(-2.0 * half_logsnr))
  betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
  tables = {k: jnp.asarray(v) for k, v in diffusion._tables_from_betas(betas).items()}
  return diffusion.Diffusion(
    **tables,
    timestep_map=jnp.arange(num_timesteps, dtype=jnp.int32),
    spec=diffusion.ScheduleSpec('linear', num_timesteps, 1e-4, 0.02),
  )


def _gaussian_solver_errors(solver, order, step_counts):
  d = _linear_logsnr_process()

  def exact_eps(x, t):
    a = jnp.take(d.alphas_cumprod, t).reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)

  x_T = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2, 2, 1)))
  a_T, a_0 = d.alphas_cumprod[-1], d.alphas_cumprod[0]
  score = (x_T - jnp.sqrt(a_T) * MU) / jnp.sqrt(a_T * S**2 + 1 - a_T)
  exact = jnp.sqrt(a_0) * MU + jnp.sqrt(a_0 * S**2 + 1 - a_0) * score
  errors = []
  for num_steps in step_counts:
    x = SOLVERS[solver](
      d, exact_eps, x_T.shape, None, num_steps=num_steps, order=order, x_T=x_T, final_sigma='min'
    )
    errors.append(float(jnp.abs(x - exact).max()))
  return np.asarray(errors)


# The global order: DPM-Solver++ k has order k; UniPC's corrector adds one.
# Order 3 starts with a first- and a second-order step (there are no earlier
# predictions yet), which limits both to a global order of about 2.
@pytest.mark.parametrize(
  'solver, order, expected',
  [
    ('dpm_solver', 1, 1),
    ('dpm_solver', 2, 2),
    ('dpm_solver', 3, 2),
    ('unipc', 1, 2),
    ('unipc', 2, 3),
    ('unipc', 3, 2),
  ],
)
def test_converges_to_the_gaussian_ode_solution_at_its_order(solver, order, expected):
  with jax.enable_x64(True):
    errors = _gaussian_solver_errors(solver, order, (40, 80, 160))
  observed = np.log2(errors[:-1] / errors[1:])
  assert np.all(observed > expected - 0.25), (errors, observed)
  assert errors[-1] < 2e-2


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_compiles_once_and_works_under_vmap(solver):
  d = diffusion.make_diffusion('linear', 100)
  traces = []

  def model_fn(x, t):
    traces.append(1)
    return 0.1 * x

  fn = jax.jit(functools.partial(SOLVERS[solver], d, model_fn, (2, 3, 3, 1), num_steps=6, order=3))
  first = fn(jax.random.key(0))
  second = fn(jax.random.key(1))
  assert len(traces) == 1 and not np.allclose(first, second)
  keys = jax.random.split(jax.random.key(0), 2)
  batched = jax.vmap(fn)(keys)
  np.testing.assert_allclose(batched[1], fn(keys[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_float64_follows_the_tables(solver):
  with jax.enable_x64(True):
    d = diffusion.make_diffusion('linear', 100, dtype=jnp.float64)
    x = SOLVERS[solver](d, lambda x, t: 0.1 * x, (2, 3, 3, 1), jax.random.key(0), num_steps=5)
    assert x.dtype == jnp.float64 and np.all(np.isfinite(x))


def test_clipping_and_dynamic_thresholding_bound_the_prediction():
  d = diffusion.make_diffusion('linear', 100)
  x_T = 3.0 * np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
  # One step to sigma = 0 returns the (processed) x_0 prediction itself.
  x0_model = lambda x, t: 4.0 * x
  kwargs = dict(num_steps=1, x_T=x_T, model_mean_type='x0')
  raw = sampling.dpm_solver_sample_loop(d, x0_model, SHAPE, None, **kwargs)
  np.testing.assert_allclose(raw, 4.0 * x_T, rtol=1e-6)
  clipped = sampling.dpm_solver_sample_loop(d, x0_model, SHAPE, None, clip_denoised=True, **kwargs)
  np.testing.assert_allclose(clipped, np.clip(4.0 * x_T, -1, 1))
  thresholded = np.asarray(
    sampling.unipc_sample_loop(d, x0_model, SHAPE, None, dynamic_threshold=0.9, **kwargs)
  )
  flat = np.abs(4.0 * x_T).reshape(SHAPE[0], -1)
  s = np.maximum(np.quantile(flat, 0.9, axis=1), 1.0).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(thresholded, np.clip(4.0 * x_T, -s, s) / s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(order=0), 'order must be one of'),
    (dict(order=4), 'order must be one of'),
    (dict(num_steps=0), r'num_steps must be an integer in \[1, 100\]'),
    (dict(num_steps=101), r'num_steps must be an integer in \[1, 100\]'),
    (dict(model_mean_type='xprev'), 'need a model of eps, x0 or v'),
    (dict(model_mean_type='score'), 'Unknown model_mean_type'),
    (dict(final_sigma='max'), 'Unknown final_sigma'),
    (dict(dynamic_threshold=0.0), r'dynamic_threshold must be a quantile in \(0, 1\]'),
    (dict(x_T=np.zeros((2, 3, 3, 1), np.float32)), r'x_T must have the sample shape'),
    (dict(x_T=np.zeros(SHAPE, np.int32)), 'x_T must be a float array'),
  ],
)
def test_bad_input_is_a_clear_error(solver, kwargs, message):
  d = diffusion.make_diffusion('linear', 100)
  with pytest.raises(ValueError, match=message):
    SOLVERS[solver](d, lambda x, t: x, SHAPE, jax.random.key(0), **kwargs)


def test_no_key_and_no_x_T_is_a_clear_error():
  d = diffusion.make_diffusion('linear', 100)
  with pytest.raises(ValueError, match='rng must be a JAX PRNG key'):
    sampling.unipc_sample_loop(d, lambda x, t: x, SHAPE, None)


# ---------------------------------------------------------------------------
# x_T for every sampler, and the two sampling fixes.

# Every sampler draws x_T from the first half of its key, so one seed starts them all alike.
EVERY_SAMPLER = {
  'p_sample_loop': sampling.p_sample_loop,
  'p_sample_loop_progressive': lambda *a, **k: sampling.p_sample_loop_progressive(
    *a, every=10, **k
  )[0],
  'ddim_sample_loop': functools.partial(sampling.ddim_sample_loop, num_steps=5),
  'respaced_sample_loop': functools.partial(sampling.respaced_sample_loop, num_steps=5),
  'pc_sample_loop': sampling.pc_sample_loop,
  'dpm_solver_sample_loop': functools.partial(sampling.dpm_solver_sample_loop, num_steps=5),
  'unipc_sample_loop': functools.partial(sampling.unipc_sample_loop, num_steps=5),
}


@pytest.mark.parametrize('name', sorted(EVERY_SAMPLER))
def test_x_T_replaces_the_initial_draw(name):
  d = diffusion.make_diffusion('linear', 20)
  model_fn = lambda x, t: 0.1 * x
  shape, key = (2, 4, 4, 1), jax.random.key(5)
  drawn = jax.random.normal(jax.random.split(key)[0], shape)
  fn = EVERY_SAMPLER[name]
  np.testing.assert_array_equal(fn(d, model_fn, shape, key, x_T=drawn), fn(d, model_fn, shape, key))
  other = fn(d, model_fn, shape, key, x_T=drawn + 1.0)
  assert not np.allclose(other, fn(d, model_fn, shape, key))
  with pytest.raises(ValueError, match='x_T must have the sample shape'):
    fn(d, model_fn, shape, key, x_T=drawn[:1])


@pytest.mark.parametrize('num_steps', [1, 3, 7, 30, 99, 100])
def test_ddim_makes_exactly_the_model_calls_asked_for(num_steps):
  d = diffusion.make_diffusion('linear', 100)
  calls = []

  def model_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return 0.1 * x

  for skip in sampling.DDIM_SKIP_TYPES:
    calls.clear()
    sampling.ddim_sample_loop(
      d, model_fn, (1, 2, 2, 1), jax.random.key(0), num_steps=num_steps, skip=skip
    ).block_until_ready()
    assert len(calls) == num_steps, skip
    assert len(sampling.ddim_timesteps(100, num_steps, skip)) == num_steps


def test_respaced_xprev_model_is_read_with_the_full_process():
  with jax.enable_x64(True):
    d = diffusion.make_diffusion('linear', 1000, dtype=jnp.float64)
    dr = diffusion.respace(d, diffusion.space_timesteps(1000, 10))
    rs = np.random.default_rng(0)
    x0 = jnp.asarray(rs.uniform(-1, 1, (2, 4, 4, 1)))
    noise = jnp.asarray(rs.standard_normal(x0.shape))
    i = jnp.array([5, 5])
    t = dr.timestep_map[i]
    x_t = diffusion.q_sample(d, x0, t, noise)
    xprev = diffusion.q_posterior(d, x0, x_t, t)[0]  # A perfect xprev model of the full process.
    out = diffusion.p_mean_variance(dr, xprev, x_t, i, model_mean_type='xprev', clip_denoised=False)
    np.testing.assert_allclose(out['pred_x0'], x0, atol=1e-10)
    # The respaced step's mean is the respaced posterior's at that x_0.
    np.testing.assert_allclose(out['mean'], diffusion.q_posterior(dr, x0, x_t, i)[0], atol=1e-10)
    # And so a perfect xprev model samples as a perfect x0 model does.
    perfect_x0 = lambda x, tt: jnp.broadcast_to(x0[:1], x.shape)

    def perfect_xprev(x, tt):
      return diffusion.q_posterior(d, jnp.broadcast_to(x0[:1], x.shape), x, tt)[0]

    key = jax.random.key(0)
    kw = dict(num_steps=10, clip_denoised=False)
    np.testing.assert_allclose(
      sampling.respaced_sample_loop(
        d, perfect_xprev, (2, 4, 4, 1), key, model_mean_type='xprev', **kw
      ),
      sampling.respaced_sample_loop(d, perfect_x0, (2, 4, 4, 1), key, model_mean_type='x0', **kw),
      atol=1e-8,
    )
