"""EDM (`ddpm_jax.edm`) against Karras et al.'s formulas, NVlabs/edm and diffusers.

The references here are NumPy transcriptions, in float64, of the formulas of
the EDM paper (arXiv:2206.00364: Eq. 5, Table 1, Algorithm 2) as NVlabs/edm
states them (`edm_sampler`, `EDMLoss`, `EDMPrecond`, `iDDPMPrecond`), and
diffusers' `EDMEulerScheduler` and `HeunDiscreteScheduler` (Karras sigmas)
where they compute the same thing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_jax import diffusion
from ddpm_jax import edm

diffusers = pytest.importorskip('diffusers')

SHAPE = (3, 4, 2)
# Gaussian data N(MU, S^2): its exact denoiser is known in closed form.
MU, S = 0.3, 0.5


def _gaussian_denoiser(x, sigma, tanh=jnp.tanh, wobble=0.0):
  """E[x_0 | x] for data N(MU, S^2) at noise sigma [B], plus an optional nonlinear term."""
  sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  exact = (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)
  return exact + wobble * tanh(x) * sigma / (1 + sigma)


_wobbly = functools.partial(_gaussian_denoiser, wobble=0.05)


def _algorithm2(
  denoiser, x_T, levels, *, S_churn=0.0, S_min=0.0, S_max=np.inf, S_noise=1.0, z=None
):
  """EDM's Algorithm 2 in float64 NumPy, as `edm_sampler` states it; z[i] is step i's noise."""
  num_steps = len(levels) - 1
  x_next = np.asarray(x_T, np.float64)
  batch = x_next.shape[0]
  for i, (t_cur, t_next) in enumerate(zip(levels[:-1], levels[1:])):
    x_cur = x_next
    gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
    t_hat = t_cur + gamma * t_cur
    x_hat = x_cur
    if gamma > 0:
      x_hat = x_cur + np.sqrt(t_hat**2 - t_cur**2) * S_noise * z[i]
    d_cur = (x_hat - denoiser(x_hat, np.full(batch, t_hat))) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if i < num_steps - 1:
      d_prime = (x_next - denoiser(x_next, np.full(batch, t_next))) / t_next
      x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
  return x_next


def _np_wobbly(x, sigma):
  return np.asarray(_gaussian_denoiser(x, sigma, tanh=np.tanh, wobble=0.05))


# ---------------------------------------------------------------------------
# Noise levels.


@pytest.mark.parametrize(
  'num_steps, sigma_min, sigma_max, rho',
  [(18, 0.002, 80.0, 7.0), (2, 0.002, 80.0, 7.0), (35, 0.01, 20.0, 3.0), (7, 0.5, 1.5, 1.0)],
)
def test_sigma_steps_equal_edms_formula(num_steps, sigma_min, sigma_max, rho):
  levels = edm.sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  i = np.arange(num_steps, dtype=np.float64)
  want = (
    sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
  ) ** rho
  assert levels.dtype == np.float64 and levels.shape == (num_steps + 1,)
  np.testing.assert_allclose(levels[:-1], want, rtol=1e-15, atol=0)
  assert levels[-1] == 0.0 and np.all(np.diff(levels) < 0)
  np.testing.assert_allclose(levels[[0, -2]], [sigma_max, sigma_min], rtol=1e-14)


def test_one_step_goes_from_sigma_max_to_zero():
  np.testing.assert_array_equal(edm.sigma_steps(1, sigma_max=80.0), [80.0, 0.0])


@pytest.mark.parametrize(
  'num_steps, sigma_min, sigma_max, rho', [(18, 0.002, 80.0, 7.0), (10, 0.02, 5.0, 3.0)]
)
def test_sigma_steps_equal_diffusers_edm_euler(num_steps, sigma_min, sigma_max, rho):
  scheduler = diffusers.EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  scheduler.set_timesteps(num_steps)
  ours = edm.sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  # diffusers computes in float64 and stores float32.
  np.testing.assert_allclose(scheduler.sigmas.numpy(), ours.astype(np.float32), rtol=1e-7, atol=0)


# ---------------------------------------------------------------------------
# Preconditioning and loss.


def _net(x_in, c_noise, label):
  """A nonlinear raw network that uses every input, the label included."""
  c = c_noise.reshape((-1,) + (1,) * (x_in.ndim - 1))
  y = label.reshape(c.shape)
  return jnp.tanh(x_in) * (1.0 + 0.3 * c) + 0.2 * x_in * y - 0.1 * c


def _np_precondition(x, sigma, label, sigma_data):
  """EDMPrecond's D in float64 NumPy (c_skip, c_out, c_in, c_noise of EDM Table 1)."""
  s = np.broadcast_to(np.asarray(sigma, np.float64), (x.shape[0],)).reshape(-1, 1, 1)
  c_skip = sigma_data**2 / (s**2 + sigma_data**2)
  c_out = s * sigma_data / np.sqrt(s**2 + sigma_data**2)
  c_in = 1 / np.sqrt(sigma_data**2 + s**2)
  c_noise = np.log(s) / 4
  x_in, y = c_in * x, label.reshape(-1, 1, 1)
  F = np.tanh(x_in) * (1.0 + 0.3 * c_noise) + 0.2 * x_in * y - 0.1 * c_noise
  return c_skip * x + c_out * F, F, c_skip, c_out


@pytest.mark.parametrize('sigma', [0.7, np.array([0.002, 0.5, 80.0])])
@pytest.mark.parametrize('sigma_data', [0.5, 1.3])
def test_precondition_equals_edm_precond(sigma, sigma_data):
  rng = np.random.default_rng(0)
  x = 3.0 * rng.standard_normal(SHAPE)
  label = np.array([0.0, 1.0, 2.0])
  with jax.enable_x64(True):
    denoiser = edm.precondition(_net, sigma_data=sigma_data)
    got = denoiser(jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(label))
    jitted = jax.jit(denoiser)(jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(label))
  assert got.dtype == jnp.float64
  want = _np_precondition(x, sigma, label, sigma_data)[0]
  np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)
  np.testing.assert_allclose(jitted, want, rtol=1e-14, atol=1e-14)


def test_precondition_equals_diffusers_edm_euler():
  """EDMEulerScheduler's precondition_inputs / _noise / _outputs, in float64 torch."""
  rng = np.random.default_rng(1)
  x, raw = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
  sigma = np.array([0.01, 0.9, 60.0])
  scheduler = diffusers.EDMEulerScheduler(sigma_data=0.5, prediction_type='epsilon')
  s = torch.tensor(sigma).reshape(-1, 1, 1)
  x_in = scheduler.precondition_inputs(torch.tensor(x), s).numpy()
  c_noise = scheduler.precondition_noise(torch.tensor(sigma)).numpy()
  want = scheduler.precondition_outputs(torch.tensor(x), torch.tensor(raw), s).numpy()
  seen = {}

  def net(x_in, c_noise):
    seen.update(x_in=x_in, c_noise=c_noise)
    return jnp.asarray(raw)

  with jax.enable_x64(True):
    got = edm.precondition(net)(jnp.asarray(x), jnp.asarray(sigma))
  np.testing.assert_allclose(seen['x_in'], x_in, rtol=1e-15)
  np.testing.assert_allclose(seen['c_noise'], c_noise, rtol=1e-15)
  np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize('sigma', [0.3, np.array([0.05, 1.0, 30.0])])
def test_loss_equals_edm_loss(sigma):
  rng = np.random.default_rng(2)
  x0, noise = rng.uniform(-1, 1, SHAPE), rng.standard_normal(SHAPE)
  label = np.array([1.0, 0.0, 3.0])
  with jax.enable_x64(True):
    denoiser = edm.precondition(_net)
    got = edm.loss(denoiser, jnp.asarray(x0), jnp.asarray(sigma), jnp.asarray(noise), label)
  s = np.broadcast_to(np.asarray(sigma, np.float64), (3,)).reshape(-1, 1, 1)
  denoised, F, c_skip, c_out = _np_precondition(x0 + s * noise, sigma, label, 0.5)
  weight = (s**2 + 0.5**2) / (s * 0.5) ** 2
  assert got.shape == SHAPE and got.dtype == jnp.float64
  np.testing.assert_allclose(got, weight * (denoised - x0) ** 2, rtol=1e-13)
  # lambda c_out^2 = 1: the weighted loss is F's error against its own target at unit weight.
  target = (x0 - c_skip * (x0 + s * noise)) / c_out
  np.testing.assert_allclose(got, (F - target) ** 2, rtol=1e-11, atol=1e-14)


def test_bad_sigma_shapes_and_sigma_data_raise():
  denoiser = edm.precondition(lambda x, c: x)
  with pytest.raises(ValueError, match='sigma must be a scalar or one noise level'):
    denoiser(jnp.ones(SHAPE), jnp.ones((3, 1, 1)))
  with pytest.raises(ValueError, match='sigma_data'):
    edm.precondition(lambda x, c: x, sigma_data=0.0)
  with pytest.raises(ValueError, match='noise must have the shape'):
    edm.loss(denoiser, jnp.ones(SHAPE), 1.0, jnp.ones((3, 4)))
  with pytest.raises(ValueError, match='net_fn must return'):
    edm.precondition(lambda x, c: x[..., :1])(jnp.ones(SHAPE), 1.0)


# ---------------------------------------------------------------------------
# The sampler.


@pytest.mark.parametrize('num_steps', [1, 2, 6])
def test_deterministic_sample_equals_algorithm2(num_steps):
  levels = edm.sigma_steps(num_steps, sigma_min=0.01, sigma_max=20.0)
  x_T = 20.0 * np.random.default_rng(3).standard_normal(SHAPE)
  with jax.enable_x64(True):
    got = edm.sample(
      _wobbly,
      SHAPE,
      jax.random.key(0),
      num_steps=num_steps,
      sigma_min=0.01,
      sigma_max=20.0,
      x_T=jnp.asarray(x_T),
    )
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, _algorithm2(_np_wobbly, x_T, levels), rtol=1e-12, atol=1e-13)


def test_churned_sample_equals_algorithm2_with_the_same_noise():
  num_steps, rng = 8, jax.random.key(7)
  churn = dict(S_churn=6.0, S_min=0.1, S_max=5.0, S_noise=1.003)
  levels = edm.sigma_steps(num_steps, sigma_max=20.0)
  with jax.enable_x64(True):
    x_T = 20.0 * jax.random.normal(jax.random.key(1), SHAPE, jnp.float64)
    got = edm.sample(_wobbly, SHAPE, rng, num_steps=num_steps, sigma_max=20.0, x_T=x_T, **churn)
    # The module's noise contract: step i's noise is normal(fold_in(step_key, i)).
    step_key = jax.random.split(rng)[1]
    z = [
      np.asarray(jax.random.normal(jax.random.fold_in(step_key, i), SHAPE, jnp.float64))
      for i in range(num_steps)
    ]
  gammas = [(churn['S_min'] <= t <= churn['S_max']) for t in levels[:-1]]
  assert 0 < sum(gammas) < num_steps  # some steps churn, some do not
  want = _algorithm2(_np_wobbly, np.asarray(x_T), levels, z=z, **churn)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
  plain = _algorithm2(_np_wobbly, np.asarray(x_T), levels)
  assert np.abs(want - plain).max() > 1e-3  # the churn did something


def test_calls_the_denoiser_2n_minus_1_times_in_one_scan():
  """Traced once (a Python counter), run 2N - 1 times per sample (a debug callback)."""
  num_steps, traces, calls = 5, [], []

  def denoiser(x, sigma):
    traces.append(sigma.shape)
    jax.debug.callback(lambda s: calls.append(np.asarray(s)), sigma, ordered=True)
    return _wobbly(x, sigma)

  churn = dict(S_churn=2.0, S_min=0.5, S_max=10.0)
  run = jax.jit(lambda key: edm.sample(denoiser, SHAPE, key, num_steps=num_steps, **churn))
  first = run(jax.random.key(0))
  second = run(jax.random.key(1))
  jax.effects_barrier()
  assert len(traces) == 1 and traces[0] == (SHAPE[0],)  # traced once, sigma per example
  assert len(calls) == 2 * (2 * num_steps - 1)  # two runs
  assert not np.allclose(first, second)
  # The levels it was called at: t_hat of each step, then t_next except after the last.
  levels = edm.sigma_steps(num_steps)
  gamma = min(2.0 / num_steps, np.sqrt(2) - 1)
  t_hat = [t * (1 + gamma) if 0.5 <= t <= 10.0 else t for t in levels[:-1]]
  want = [s for i in range(num_steps) for s in (t_hat[i], levels[i + 1])][:-1]
  np.testing.assert_allclose([c[0] for c in calls[: 2 * num_steps - 1]], want, rtol=1e-6)
  jaxpr = jax.make_jaxpr(lambda key: edm.sample(_wobbly, SHAPE, key, num_steps=num_steps))(
    jax.random.key(0)
  )
  names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  assert names.count('scan') == 1 and 'while' not in names


def test_float64_in_float64_out_and_equal_under_jit():
  with jax.enable_x64(True):
    x_T = jnp.asarray(80.0 * np.random.default_rng(2).standard_normal(SHAPE))
    kwargs = dict(num_steps=4, S_churn=1.0, x_T=x_T)
    eager = edm.sample(_wobbly, SHAPE, jax.random.key(0), **kwargs)
    jitted = jax.jit(functools.partial(edm.sample, _wobbly, SHAPE, **kwargs))(jax.random.key(0))
  assert eager.dtype == jitted.dtype == jnp.float64
  np.testing.assert_allclose(jitted, eager, rtol=1e-12, atol=1e-12)
  drawn = edm.sample(_wobbly, SHAPE, jax.random.key(0), num_steps=3)
  assert drawn.dtype == jnp.float32 and np.all(np.isfinite(drawn))


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(num_steps=0), 'num_steps'),
    (dict(num_steps=2.5), 'num_steps'),
    (dict(sigma_min=80.0), 'sigma_min must be < sigma_max'),
    (dict(sigma_min=1.0, sigma_max=0.5), 'sigma_min must be < sigma_max'),
    (dict(sigma_min=0.0), 'sigma_min'),
    (dict(rho=-1.0), 'rho'),
    (dict(S_churn=-1.0), 'S_churn'),
    (dict(S_noise=float('nan')), 'S_noise'),
    (dict(S_min=2.0, S_max=1.0), 'S_max'),
    (dict(x_T=jnp.zeros((3, 4, 1))), 'x_T must have the sample shape'),
    (dict(x_T=jnp.zeros(SHAPE, jnp.int32)), 'x_T must be a float array'),
    (dict(shape=(3,)), 'shape'),
    (dict(rng=jax.random.split(jax.random.key(0), 2)), 'rng must be a single PRNG key'),
  ],
)
def test_bad_input_raises_before_tracing(kwargs, message):
  called = []

  def denoiser(x, sigma):
    called.append(1)
    return x

  args = dict(shape=SHAPE, rng=jax.random.key(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    edm.sample(denoiser, args.pop('shape'), args.pop('rng'), **args)
  assert not called


def test_heun_converges_at_second_order_to_the_gaussian_ode_solution():
  """The ODE keeps x's standard score: x_0 = MU + (x_T - MU) S / sqrt(S^2 + sigma_max^2)."""
  with jax.enable_x64(True):
    x_T = jnp.asarray(80.0 * np.random.default_rng(10).standard_normal((64, 1)))
    exact = MU + (x_T - MU) * S / np.sqrt(S**2 + 80.0**2)
    errors = np.asarray(
      [
        float(
          jnp.abs(
            edm.sample(_gaussian_denoiser, (64, 1), jax.random.key(0), num_steps=n, x_T=x_T) - exact
          ).max()
        )
        for n in (16, 32, 64)
      ]
    )
  observed = np.log2(errors[:-1] / errors[1:])
  assert np.all(observed > 1.75), (errors, observed)


@pytest.mark.parametrize(
  'num_steps, churn',
  [(64, {}), (80, dict(S_churn=10.0, S_min=0.05, S_max=50.0))],
  ids=['ode', 'churn'],
)
def test_reproduces_gaussian_moments(num_steps, churn):
  """With the exact denoiser the samples have N(MU, S^2)'s mean and std (4 standard errors).

  EDM's 18 steps leave a Heun error above the Monte-Carlo error on one narrow
  Gaussian (S / sigma_max = 1/160), hence the longer chains.
  """
  shape = (4096, 2)
  x = np.asarray(
    edm.sample(_gaussian_denoiser, shape, jax.random.key(3), num_steps=num_steps, **churn)
  )
  n = x.size
  assert abs(x.mean() - MU) < 4 * S / np.sqrt(n)
  assert abs(x.std() - S) < 4 * S / np.sqrt(2 * n)


# diffusers builds its sigmas with np.array over a torch tensor, which NumPy 2 flags.
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_heun_equals_diffusers_heun_discrete_scheduler():
  """diffusers' HeunDiscreteScheduler (Karras sigmas, prediction_type='sample') is Algorithm 2 without churn.

  Fed D itself as the 'sample' prediction, its 2N - 1 steps are EDM's: Euler
  then the mean of both slopes, Euler alone into sigma = 0. What differs by
  design is only where the levels come from: its rho is fixed at 7 and its
  sigma_min / sigma_max are the training schedule's end points (float32
  tables), so ours is run on its end points. It has no churn.
  """
  num_steps = 10
  scheduler = diffusers.HeunDiscreteScheduler(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    use_karras_sigmas=True,
    prediction_type='sample',
  )
  scheduler.set_timesteps(num_steps)
  sigmas = scheduler.sigmas.numpy()
  levels = np.concatenate([sigmas[:1], sigmas[1::2]])
  sigma_min, sigma_max = float(levels[-2]), float(levels[0])
  ours = edm.sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max)
  np.testing.assert_allclose(levels, ours.astype(np.float32), rtol=1e-6, atol=0)
  # Its end points are the DDPM linear schedule's sigma_0 and sigma_{T-1}.
  d = diffusion.make_diffusion('linear', 1000)
  np.testing.assert_allclose(
    [sigma_min, sigma_max], np.asarray(d.sqrt_recipm1_alphas_cumprod)[[0, -1]], rtol=1e-4
  )

  z = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
  x = torch.tensor(z) * scheduler.init_noise_sigma
  x_T = x.numpy().copy()
  calls = 0
  for t in scheduler.timesteps:
    scheduler.scale_model_input(x, t)  # sets the step index; the denoiser takes x unscaled
    sigma = scheduler.sigmas[scheduler.step_index].reshape(1).expand(SHAPE[0])
    x = scheduler.step(_gaussian_denoiser(x, sigma, tanh=torch.tanh, wobble=0.05), t, x).prev_sample
    calls += 1
  got = edm.sample(
    _wobbly,
    SHAPE,
    jax.random.key(0),
    num_steps=num_steps,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    x_T=jnp.asarray(x_T),
  )
  assert calls == 2 * num_steps - 1
  np.testing.assert_allclose(got, x.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# DDPM-trained models as denoisers.


def _iddpm_u(M, C_1=0.001, C_2=0.008):
  """iDDPMPrecond's table u[0..M] (u[M] = 0), by its recursion, in float64."""
  alpha_bar = lambda j: np.sin(0.5 * np.pi * j / M / (C_2 + 1)) ** 2  # noqa: E731
  u = np.zeros(M + 1)
  for j in range(M, 0, -1):
    u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
  return u


def _process_from_betas(betas):
  tables = {k: jnp.asarray(v) for k, v in diffusion._tables_from_betas(betas).items()}
  return diffusion.Diffusion(
    **tables,
    timestep_map=jnp.arange(len(betas), dtype=jnp.int32),
    spec=diffusion.ScheduleSpec('linear', len(betas), 1e-4, 0.02),
  )


def _eps_model(x_t, t):
  """A nonlinear eps model whose output depends on the timestep."""
  c = t.astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return jnp.tanh(x_t) * (0.2 + c / 1000) + 0.1 * x_t


def test_denoiser_from_diffusion_equals_iddpm_precond():
  """EDM's iDDPMPrecond: D = x - sigma F(x / sqrt(sigma^2 + 1), M - 1 - argmin_j |sigma - u_j|)."""
  M = 1000
  u = _iddpm_u(M)
  # The same process as DDPM betas: step t has alpha_t = max(alpha_bar(M-t-1) / alpha_bar(M-t), C_1).
  a = np.sin(0.5 * np.pi * np.arange(M + 1) / M / 1.008) ** 2
  betas = 1 - np.maximum(a[M - 1 - np.arange(M)] / a[M - np.arange(M)], 0.001)
  rng = np.random.default_rng(5)
  on_grid = u[:M]
  off_grid = np.exp(rng.uniform(np.log(u[M - 1]), np.log(u[0]), 64))
  with jax.enable_x64(True):
    d = _process_from_betas(betas)
    np.testing.assert_allclose(np.asarray(d.sqrt_recipm1_alphas_cumprod)[::-1], u[:M], rtol=1e-11)
    denoiser = edm.denoiser_from_diffusion(d, _eps_model)
    for sigma in (on_grid, off_grid):
      x = rng.standard_normal((len(sigma), 2)) * np.sqrt(1 + sigma[:, None] ** 2)
      got = denoiser(jnp.asarray(x), jnp.asarray(sigma))
      index = np.abs(sigma[:, None] - u[None, :]).argmin(1)
      c_noise = M - 1 - index
      F = np.asarray(
        _eps_model(jnp.asarray(x / np.sqrt(sigma[:, None] ** 2 + 1)), jnp.asarray(c_noise))
      )
      np.testing.assert_allclose(got, x - sigma[:, None] * F, rtol=1e-12, atol=1e-12)


def _linear_process_64():
  return diffusion.make_diffusion('linear', 1000, dtype=jnp.float64)


def _as_mean_type(d, mean_type):
  """_eps_model's prediction recast as x0 or v with the process's own tables."""

  def model_fn(x_t, t):
    eps = _eps_model(x_t, t)
    a = jnp.take(d.alphas_cumprod, t).reshape(-1, 1)
    x0 = (x_t - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return {'eps': eps, 'x0': x0, 'v': jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[mean_type]

  return model_fn


@pytest.mark.parametrize('mean_type', ['x0', 'v'])
def test_every_mean_type_gives_the_same_denoiser(mean_type):
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    d = _linear_process_64()
    levels = np.asarray(d.sqrt_recipm1_alphas_cumprod)
    sigma = np.concatenate([levels[[0, 10, 500, 999]], np.exp(rng.uniform(-4, 5, 8))])
    x = jnp.asarray(rng.standard_normal((len(sigma), 2)) * 3)
    want = edm.denoiser_from_diffusion(d, _eps_model)(x, jnp.asarray(sigma))
    got = edm.denoiser_from_diffusion(d, _as_mean_type(d, mean_type), model_mean_type=mean_type)(
      x, jnp.asarray(sigma)
    )
    # A learned-variance model: only the mean channels count.
    learned = edm.denoiser_from_diffusion(
      d,
      lambda x_t, t: jnp.concatenate([_eps_model(x_t, t), 7.0 + x_t], axis=-1),
      model_var_type='learned_range',
    )(x, jnp.asarray(sigma))
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(learned, want, rtol=1e-15, atol=0)


def test_at_the_discrete_levels_d_is_the_models_x0():
  rng = np.random.default_rng(7)
  with jax.enable_x64(True):
    d = _linear_process_64()
    t = np.array([0, 3, 250, 999])
    sigma = np.asarray(d.sqrt_recipm1_alphas_cumprod)[t]
    x_0, eps = rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    x_t = (
      np.asarray(d.sqrt_alphas_cumprod)[t, None] * x_0
      + np.asarray(d.sqrt_one_minus_alphas_cumprod)[t, None] * eps
    )
    x = x_t * np.sqrt(1 + sigma[:, None] ** 2)  # x = x_t / sqrt(a_t) = x_0 + sigma_t eps
    x0_model = _as_mean_type(d, 'x0')
    got = edm.denoiser_from_diffusion(d, x0_model, model_mean_type='x0')(
      jnp.asarray(x), jnp.asarray(sigma)
    )
    want = x0_model(jnp.asarray(x_t), jnp.asarray(t))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_calls_the_model_at_integer_timesteps_and_clamps_sigma():
  seen = []

  def model_fn(x_t, t, label):
    seen.append((np.asarray(t), np.asarray(x_t)))
    return _eps_model(x_t, t) + label.reshape(-1, 1)

  with jax.enable_x64(True):
    d = _linear_process_64()
    levels = np.asarray(d.sqrt_recipm1_alphas_cumprod)
    sigma = np.array([1e-4, levels[0], 0.5 * (levels[10] + levels[11]) - 1e-9, 400.0])
    x = jnp.ones((4, 2))
    label = jnp.asarray([0.0, 1.0, 2.0, 3.0])
    got = edm.denoiser_from_diffusion(d, model_fn)(x, jnp.asarray(sigma), label)
    t, x_t = seen[0]
    eps = np.asarray(_eps_model(jnp.asarray(x_t), jnp.asarray(t))) + np.arange(4.0)[:, None]
  assert t.dtype == np.int32
  np.testing.assert_array_equal(t, [0, 0, 10, 999])
  # Clamped levels move the timestep only: x_t and the step keep the true sigma.
  np.testing.assert_allclose(
    x_t, 1 / np.sqrt(1 + sigma[:, None] ** 2) * np.ones((4, 2)), rtol=1e-15
  )
  np.testing.assert_allclose(got, 1 - sigma[:, None] * eps, rtol=1e-14)


def test_a_respaced_process_calls_the_full_process_timesteps():
  kept = np.arange(0, 1000, 37)
  seen = []

  def model_fn(x_t, t):
    seen.append(np.asarray(t))
    return _eps_model(x_t, t)

  with jax.enable_x64(True):
    full = _linear_process_64()
    respaced = diffusion.respace(full, kept)
    sigma = jnp.asarray(np.asarray(full.sqrt_recipm1_alphas_cumprod)[kept])
    x = jnp.asarray(np.random.default_rng(8).standard_normal((len(kept), 2)))
    got = edm.denoiser_from_diffusion(respaced, model_fn)(x, sigma)
    want = edm.denoiser_from_diffusion(full, model_fn)(x, sigma)
  np.testing.assert_array_equal(seen[0], kept)
  np.testing.assert_allclose(got, want, rtol=1e-13)


def test_xprev_and_unknown_mean_types_are_refused():
  d = diffusion.make_diffusion('linear', 10)
  with pytest.raises(ValueError, match='xprev.*not a denoised x_0'):
    edm.denoiser_from_diffusion(d, _eps_model, model_mean_type='xprev')
  with pytest.raises(ValueError, match='model_mean_type'):
    edm.denoiser_from_diffusion(d, _eps_model, model_mean_type='score')
  with pytest.raises(TypeError, match='diffusion.Diffusion'):
    edm.denoiser_from_diffusion(object(), _eps_model)


@pytest.mark.parametrize(
  'churn', [{}, dict(S_churn=10.0, S_min=0.05, S_max=50.0)], ids=['ode', 'churn']
)
def test_sampling_a_ddpm_models_denoiser_gives_gaussian_moments(churn):
  """The exact eps of Gaussian data on the DDPM linear schedule, sampled through EDM's sampler."""
  d = diffusion.make_diffusion('linear', 1000)

  def exact_eps(x_t, t):
    a = jnp.take(d.alphas_cumprod, t).reshape(-1, 1)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)

  denoiser = edm.denoiser_from_diffusion(d, exact_eps)
  shape = (4096, 2)
  x = np.asarray(
    edm.sample(denoiser, shape, jax.random.key(9), num_steps=80 if churn else 64, **churn)
  )
  n = x.size
  assert abs(x.mean() - MU) < 4 * S / np.sqrt(n)
  assert abs(x.std() - S) < 4 * S / np.sqrt(2 * n)
