"""Progressive distillation (`ddpm_jax.distillation`) against DDIM and closed forms.

The references: this project's DDIM sampler (`sampling.ddim_sample_loop`,
Song et al. 2021), NumPy transcriptions in float64 of Salimans & Ho 2022's
Algorithm 2 (the two teacher steps, the one-step target, the truncated-SNR
weight), and the exact denoiser of Gaussian data N(MU, S^2), whose ODE
keeps the data's map linear.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import distillation
from ddpm_jax import edm
from ddpm_jax import sampling

SHAPE = (4, 3, 2)
MU, S = 0.3, 0.5


def _gaussian_denoiser(x, sigma, tanh=jnp.tanh, wobble=0.0):
  """E[x_0 | x] for data N(MU, S^2) at noise sigma (scalar or [B]), plus an optional nonlinear term."""
  sigma = jnp.asarray(sigma) if tanh is jnp.tanh else np.asarray(sigma)
  sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  exact = (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)
  return exact + wobble * tanh(x) * sigma / (1 + sigma)


_wobbly = functools.partial(_gaussian_denoiser, wobble=0.05)
_np_wobbly = functools.partial(_gaussian_denoiser, tanh=np.tanh, wobble=0.05)


def _np_step(denoised, x, sigma, sigma_next):
  """A DDIM step, in float64 NumPy, from sigma [B] to sigma_next [B]."""
  r = (np.asarray(sigma_next) / np.asarray(sigma)).reshape((-1,) + (1,) * (x.ndim - 1))
  return denoised + r * (x - denoised)


def _eps_model(x_t, t):
  """A smooth nonlinear eps (or v) model whose output depends on the timestep."""
  c = t.astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return jnp.tanh(x_t) * (0.2 + c / 1000) + 0.1 * x_t


# ---------------------------------------------------------------------------
# The sampler is DDIM.


@pytest.mark.parametrize('schedule, mean_type', [('linear', 'eps'), ('cosine', 'v')])
def test_sample_on_ddpm_levels_is_ddim(schedule, mean_type):
  """Steps on `ddpm_levels(d, K)` from x_T * sqrt(1 + sigma_0^2) equal `ddim_sample_loop` from x_T."""
  with jax.enable_x64(True):
    d = diffusion.make_diffusion(schedule, 1000, dtype=jnp.float64)
    denoiser = edm.denoiser_from_diffusion(d, _eps_model, model_mean_type=mean_type)
    x_T = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE))
    for num_steps in (1, 4, 16):
      levels = distillation.ddpm_levels(d, num_steps)
      want = sampling.ddim_sample_loop(
        d,
        _eps_model,
        SHAPE,
        jax.random.key(0),
        num_steps=num_steps,
        clip_denoised=False,
        model_mean_type=mean_type,
        x_T=x_T,
      )
      got = distillation.sample(
        denoiser,
        levels,
        SHAPE,
        jax.random.key(0),
        prior='vp',
        x_T=x_T * np.sqrt(1 + levels[0] ** 2),
      )
      assert got.dtype == jnp.float64 and levels.shape == (num_steps + 1,)
      # The largest difference at K = 1, 4, 16 is 0 to 2e-14 (x_0 is of order 1).
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_ddpm_levels_call_the_model_at_the_ddim_timesteps():
  seen = []

  def model_fn(x_t, t):
    jax.debug.callback(lambda t: seen.append(np.asarray(t)), t, ordered=True)
    return _eps_model(x_t, t)

  d = diffusion.make_diffusion('linear', 1000)
  levels = distillation.ddpm_levels(d, 8)
  distillation.sample(edm.denoiser_from_diffusion(d, model_fn), levels, SHAPE, jax.random.key(0))
  jax.effects_barrier()
  want = sampling.ddim_timesteps(1000, 8)[::-1]
  np.testing.assert_array_equal([t[0] for t in seen], want)
  assert all(np.all(t == t[0]) for t in seen)
  np.testing.assert_allclose(
    levels[:-1], np.asarray(d.sqrt_recipm1_alphas_cumprod, np.float64)[want], rtol=0
  )
  assert levels.dtype == np.float64 and levels[-1] == 0 and np.all(np.diff(levels) < 0)


def test_sample_calls_the_denoiser_n_times_in_one_scan():
  """Traced once (a Python counter), called at levels[:-1] (a debug callback), equal to a loop."""
  levels = edm.sigma_steps(6, sigma_min=0.01, sigma_max=20.0)
  traces, calls = [], []

  def denoiser(x, sigma, label):
    traces.append(sigma.shape)
    jax.debug.callback(lambda s: calls.append(np.asarray(s)), sigma, ordered=True)
    return _wobbly(x, sigma) + 0.01 * label.reshape(-1, 1, 1)

  label = jnp.arange(4.0)
  run = jax.jit(lambda key: distillation.sample(denoiser, levels, SHAPE, key, label, prior='ve'))
  first, second = run(jax.random.key(0)), run(jax.random.key(1))
  jax.effects_barrier()
  assert traces == [(SHAPE[0],)]
  assert len(calls) == 2 * 6
  np.testing.assert_allclose([c[0] for c in calls[:6]], levels[:-1], rtol=1e-6)
  assert not np.allclose(first, second)
  jaxpr = jax.make_jaxpr(lambda key: distillation.sample(_wobbly, levels, SHAPE, key))(
    jax.random.key(0)
  )
  names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  assert names.count('scan') == 1 and 'while' not in names
  with jax.enable_x64(True):
    x = 20.0 * np.random.default_rng(1).standard_normal(SHAPE)
    got = distillation.sample(_wobbly, levels, SHAPE, jax.random.key(0), x_T=jnp.asarray(x))
    for sigma, sigma_next in zip(levels[:-1], levels[1:]):
      x = np.asarray(distillation.ddim_step(_np_wobbly(x, sigma), x, sigma, sigma_next))
  np.testing.assert_allclose(got, x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize('prior', ['vp', 've'])
def test_the_start_is_the_priors_scaled_normal(prior):
  """One step with D(x) = x returns the start: sqrt(1 + sigma_0^2) z ('vp') or sigma_0 z ('ve')."""
  levels, rng = np.array([7.0, 0.0]), jax.random.key(4)
  got = distillation.sample(lambda x, sigma: x, levels, SHAPE, rng, prior=prior)
  z = jax.random.normal(jax.random.split(rng)[0], SHAPE, jnp.float32)
  scale = np.sqrt(1 + 49.0) if prior == 'vp' else 7.0
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, scale * z, rtol=1e-6)
  if prior == 've':  # the start of `edm.sample` with the same key
    start = edm.sample(lambda x, sigma: x, SHAPE, rng, num_steps=1, sigma_max=7.0)
    np.testing.assert_allclose(got, start, rtol=1e-6)


def test_float64_in_float64_out_and_equal_under_jit():
  levels = edm.sigma_steps(5, sigma_max=20.0)
  with jax.enable_x64(True):
    x_T = jnp.asarray(20.0 * np.random.default_rng(2).standard_normal(SHAPE))
    run = functools.partial(distillation.sample, _wobbly, levels, SHAPE, x_T=x_T)
    eager, jitted = run(jax.random.key(0)), jax.jit(run)(jax.random.key(0))
  assert eager.dtype == jitted.dtype == jnp.float64
  np.testing.assert_allclose(jitted, eager, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------
# Gaussian data: the sampler reproduces the distribution.


def _euler_gain(levels):
  """DDIM's exact map for N(MU, S^2) data: x_0 - MU = gain (x_T - MU), a product over steps."""
  sigma, sigma_next = levels[:-1], levels[1:]
  return np.prod((S**2 + sigma * sigma_next) / (S**2 + sigma**2))


def test_reproduces_gaussian_moments():
  """Exact denoiser, 1024 EDM levels: mean MU and std S within 4 standard errors.

  The chain is linear, x_0 = MU + g (x_T - MU); checked in float64 first.
  Its deterministic biases, |g sigma_max - S| = 1.4e-3 (DDIM is Euler, first
  order: 5.6e-3 at 256 steps) and g MU = 1.9e-3 from the prior's zero mean,
  are below one standard error of the std and the mean (2.5e-3 and 3.5e-3).
  """
  levels = edm.sigma_steps(1024, sigma_min=0.002, sigma_max=80.0, rho=7.0)
  gain = _euler_gain(levels)
  with jax.enable_x64(True):
    x_T = jnp.asarray(80.0 * np.random.default_rng(3).standard_normal((16, 1)))
    got = distillation.sample(_gaussian_denoiser, levels, (16, 1), jax.random.key(0), x_T=x_T)
  np.testing.assert_allclose(got, MU + gain * (np.asarray(x_T) - MU), rtol=1e-11, atol=1e-12)
  n = 20000
  assert abs(gain * 80.0 - S) < S / np.sqrt(2 * n) and abs(gain * MU) < S / np.sqrt(n)
  x = np.asarray(
    distillation.sample(_gaussian_denoiser, levels, (n, 1), jax.random.key(5), prior='ve')
  )
  assert abs(x.mean() - MU) < 4 * S / np.sqrt(n), x.mean()
  assert abs(x.std() - S) < 4 * S / np.sqrt(2 * n), x.std()


# ---------------------------------------------------------------------------
# The target and the loss.


def test_one_step_to_the_target_lands_on_the_teachers_two_steps():
  """ddim_step(target, x, sigma, sigma_next) = x'' per example, and target = x'' at sigma_next = 0."""
  levels = edm.sigma_steps(8, sigma_min=0.01, sigma_max=20.0)
  k = np.array([0, 3, 1, 2])  # student steps; k = 3 ends at sigma = 0
  sigma, sigma_mid, sigma_next = (levels[2 * k + j] for j in range(3))
  rng = np.random.default_rng(6)
  x = rng.standard_normal(SHAPE) * (1 + sigma[:, None, None])
  with jax.enable_x64(True):
    target, x_next = distillation.teacher_target(
      _wobbly, jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(sigma_mid), jnp.asarray(sigma_next)
    )
    landed = distillation.ddim_step(target, jnp.asarray(x), sigma, sigma_next)
  x_mid = _np_step(_np_wobbly(x, sigma), x, sigma, sigma_mid)
  want = _np_step(_np_wobbly(x_mid, sigma_mid), x_mid, sigma_mid, sigma_next)
  assert target.dtype == x_next.dtype == jnp.float64
  np.testing.assert_allclose(x_next, want, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(landed, x_next, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(target[1], x_next[1])
  np.testing.assert_allclose(x_next[1], _np_wobbly(x_mid, sigma_mid)[1], rtol=1e-14)


def _np_loss(student, x0, noise, index, levels):
  """Salimans & Ho's Algorithm 2 loss per example, in float64 NumPy, with the Gaussian teacher."""
  losses = []
  for b, k in enumerate(index):
    s, m, n = levels[2 * k], levels[2 * k + 1], levels[2 * k + 2]
    x = x0[b] + s * noise[b]
    x_mid = _np_step(_np_wobbly(x[None], s), x[None], s, m)
    x_next = _np_step(_np_wobbly(x_mid, m), x_mid, m, n)[0]
    target = (x_next - n / s * x) / (1 - n / s)
    losses.append(max(1 / s**2, 1.0) * np.mean((student(x) - target) ** 2))
  return np.array(losses)


def test_loss_equals_the_papers_weighted_error_per_example():
  """Each example its own step; weights 1 / sigma^2 below sigma = 1 and 1 above it."""
  levels = edm.sigma_steps(8, sigma_min=0.002, sigma_max=80.0)
  index = np.array([3, 0, 2, 1])
  assert levels[6] < 1 < levels[0]  # both sides of the weight's kink
  rng = np.random.default_rng(7)
  x0, noise = rng.uniform(-1, 1, SHAPE), rng.standard_normal(SHAPE)
  with jax.enable_x64(True):
    student = lambda w: lambda x, sigma: w * x  # noqa: E731
    args = (jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(index), levels)
    got = distillation.loss(student(0.9), _wobbly, *args)
    jitted = jax.jit(lambda w: distillation.loss(student(w), _wobbly, *args))(0.9)
    grad = jax.grad(lambda w: distillation.loss(student(w), _wobbly, *args).sum())(0.9)
    wiggle = [
      float(distillation.loss(student(0.9 + h), _wobbly, *args).sum()) for h in (1e-6, -1e-6)
    ]
  want = _np_loss(lambda x: 0.9 * x, x0, noise, index, levels)
  assert got.shape == (4,) and got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(jitted, want, rtol=1e-12)
  assert np.isfinite(float(grad))  # the last step (sigma_next = 0) included
  np.testing.assert_allclose(float(grad), (wiggle[0] - wiggle[1]) / 2e-6, rtol=1e-6)


def test_loss_is_zero_for_the_target_and_closed_form_for_the_exact_denoiser():
  """A student returning the teacher's target has zero loss; the data's exact D a known one.

  On N(MU, S^2) data every denoiser here is linear in y = x - MU: the exact D
  is MU + c y with c = S^2 / (S^2 + sigma^2), the teacher's two DDIM steps
  multiply y by g = (S^2 + sigma sigma_mid) (S^2 + sigma_mid sigma_next)
  / ((S^2 + sigma^2) (S^2 + sigma_mid^2)), so target = MU + y (g - r) / (1 - r)
  with r = sigma_next / sigma, and the exact D's loss is
  w mean(y^2) (c - (g - r) / (1 - r))^2: not zero, as one Euler step is not two.
  """
  levels = edm.sigma_steps(8, sigma_min=0.002, sigma_max=80.0)
  index = np.array([3, 0, 2, 1])
  rng = np.random.default_rng(8)
  x0 = MU + S * rng.standard_normal(SHAPE)
  noise = rng.standard_normal(SHAPE)

  def ideal_student(x, sigma):
    grid = jnp.asarray(levels, x.dtype)
    two_k = jnp.argmin(jnp.abs(sigma[:, None] - grid[None, :-1]), axis=1)
    return distillation.teacher_target(
      _gaussian_denoiser, x, sigma, grid[two_k + 1], grid[two_k + 2]
    )[0]

  with jax.enable_x64(True):
    args = (jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(index), levels)
    zero = np.asarray(distillation.loss(ideal_student, _gaussian_denoiser, *args))
    exact = np.asarray(distillation.loss(_gaussian_denoiser, _gaussian_denoiser, *args))
  sigma, mid, last = (levels[2 * index + j] for j in range(3))
  gain = (S**2 + sigma * mid) * (S**2 + mid * last) / ((S**2 + sigma**2) * (S**2 + mid**2))
  r = last / sigma
  c = S**2 / (S**2 + sigma**2)
  y2 = np.mean((x0 - MU + sigma[:, None, None] * noise) ** 2, axis=(1, 2))
  want = np.maximum(1 / sigma**2, 1) * y2 * (c - (gain - r) / (1 - r)) ** 2
  np.testing.assert_allclose(zero, 0.0, atol=1e-25)
  assert np.all(want > 1e-6)
  np.testing.assert_allclose(exact, want, rtol=1e-9)


# ---------------------------------------------------------------------------
# Nested grids.


def test_coarsen_takes_every_other_level_per_round():
  d = diffusion.make_diffusion('linear', 1000)
  finest = distillation.ddpm_levels(d, 16)
  np.testing.assert_array_equal(distillation.coarsen(finest, 4), finest[::4])
  np.testing.assert_array_equal(distillation.coarsen(finest, 16), finest)
  np.testing.assert_array_equal(distillation.coarsen(finest, 1), [finest[0], 0.0])
  # A round's student grid is every other level of its teacher's.
  levels = edm.sigma_steps(32)
  for n in (16, 8, 4, 2):
    teacher = distillation.coarsen(levels, 2 * n)
    np.testing.assert_array_equal(distillation.coarsen(levels, n), teacher[::2])
  assert distillation.num_rounds(64, 4) == 4 and distillation.num_rounds(4, 4) == 0


@pytest.mark.parametrize(
  'call, message',
  [
    (lambda: distillation.coarsen(edm.sigma_steps(16), 3), '16 steps must be 3 steps times'),
    (lambda: distillation.coarsen(edm.sigma_steps(12), 4), '12 steps must be 4 steps times'),
    (lambda: distillation.coarsen(edm.sigma_steps(16), 0), r'num_steps must be .* \[1, 16\]'),
    (lambda: distillation.coarsen(edm.sigma_steps(16), 32), r'num_steps must be .* \[1, 16\]'),
    (lambda: distillation.coarsen([1.0, 2.0, 0.0], 1), 'strictly decreasing'),
    (lambda: distillation.num_rounds(48, 4), '48 steps must be 4 steps times'),
    (lambda: distillation.num_rounds(2, 4), '2 steps must be 4 steps times'),
    (lambda: distillation.num_rounds(8, 0), 'final_steps'),
    (lambda: distillation.ddpm_levels(diffusion.make_diffusion('linear', 10), 11), 'num_steps'),
  ],
)
def test_bad_grids_raise(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(levels=np.array([2.0, 1.0, 0.5])), 'end in 0'),
    (dict(levels=np.array([2.0, 3.0, 0.0])), 'strictly decreasing'),
    (dict(levels=np.array([2.0, 2.0, 0.0])), 'strictly decreasing'),
    (dict(levels=np.array([0.0])), 'at least 2 noise levels'),
    (dict(levels=np.array([np.nan, 0.0])), 'finite'),
    (dict(prior='edm'), "Unknown prior 'edm'; valid choices: vp, ve"),
    (dict(x_T=jnp.zeros((4, 3, 1))), 'x_T must have the sample shape'),
    (dict(x_T=jnp.zeros(SHAPE, jnp.int32)), 'x_T must be a float array'),
    (dict(shape=(4,)), 'shape'),
    (dict(rng=jax.random.split(jax.random.key(0), 2)), 'rng must be a single PRNG key'),
  ],
)
def test_bad_sample_input_raises_before_tracing(kwargs, message):
  called = []

  def denoiser(x, sigma):
    called.append(1)
    return x

  args = dict(levels=np.array([2.0, 1.0, 0.0]), shape=SHAPE, rng=jax.random.key(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    distillation.sample(denoiser, args.pop('levels'), args.pop('shape'), args.pop('rng'), **args)
  assert not called


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(levels=edm.sigma_steps(3)), 'even number of steps 2N, got 3'),
    (dict(levels=np.array([1.0, 2.0, 0.0])), 'teacher_levels must be strictly decreasing'),
    (dict(noise=jnp.zeros((4, 3))), 'noise must have the shape of x0'),
    (dict(index=jnp.zeros((4, 1), jnp.int32)), 'index must be ints of shape'),
    (dict(index=jnp.zeros((4,))), 'index must be ints of shape'),
    (dict(student=lambda x, sigma: x[..., :1]), 'student must have the shape of x'),
  ],
)
def test_bad_loss_input_raises(kwargs, message):
  args = dict(
    student=lambda x, sigma: x,
    x0=jnp.zeros(SHAPE),
    noise=jnp.zeros(SHAPE),
    index=jnp.zeros((4,), jnp.int32),
    levels=edm.sigma_steps(4),
  )
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    distillation.loss(
      args['student'], _wobbly, args['x0'], args['noise'], args['index'], args['levels']
    )


def test_bad_levels_shapes_raise_in_the_steps():
  x = jnp.ones(SHAPE)
  with pytest.raises(ValueError, match='noise levels must be scalars or one per example'):
    distillation.ddim_step(x, x, jnp.ones((4, 1)), 0.5)
  with pytest.raises(ValueError, match='denoised must have the shape of x'):
    distillation.ddim_step(x[..., :1], x, 1.0, 0.5)
  with pytest.raises(ValueError, match='teacher must have the shape of x'):
    distillation.teacher_target(lambda x, sigma: x[:1], x, 1.0, 0.5, 0.0)
