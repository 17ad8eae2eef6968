"""Tests of the beta schedules and the precomputed diffusion tables.

Every schedule is checked against an independent float64 formula written from
the original DDPM code's definitions (element by element with `math`, not with the
vectorised NumPy of `ddpm_jax.schedules`), the tables against the golden
values of the original DDPM code, and the float32 tables against the float64
ones cast (they must not be accumulated in float32). Respacing is checked
here too, since it only rebuilds tables.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import schedules

T = 1000
B0, B1 = 1e-4, 0.02
RTOL = 1e-12

# Every [T] table of a Diffusion (timestep_map is an int table, spec is static).
TABLE_NAMES = tuple(
  f.name for f in dataclasses.fields(diffusion.Diffusion) if f.name not in ('timestep_map', 'spec')
)


# ---------------------------------------------------------------------------
# Independent float64 reference formulas (the original code's tables).


def _ref_linear(n: int) -> np.ndarray:
  return np.array([B0 + (B1 - B0) * i / (n - 1) for i in range(n)])


def _ref_quad(n: int) -> np.ndarray:
  lo, hi = math.sqrt(B0), math.sqrt(B1)
  return np.array([(lo + (hi - lo) * i / (n - 1)) ** 2 for i in range(n)])


def _ref_const(n: int) -> np.ndarray:
  return np.array([B1] * n)


def _ref_jsd(n: int) -> np.ndarray:
  # 1 / linspace(T, 1, T): 1/T, 1/(T-1), ..., 1/2, 1.
  return np.array([1.0 / (n - i) for i in range(n)])


def _ref_warmup(percent: int) -> Callable[[int], np.ndarray]:
  def betas(n: int) -> np.ndarray:
    k = n * percent // 100
    warm = [B0 + (B1 - B0) * i / (k - 1) for i in range(k)]
    return np.array(warm + [B1] * (n - k))

  return betas


def _ref_cosine(n: int) -> np.ndarray:
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])


REFERENCE_BETAS: dict[str, Callable[[int], np.ndarray]] = {
  'linear': _ref_linear,
  'quad': _ref_quad,
  'const': _ref_const,
  'jsd': _ref_jsd,
  'warmup10': _ref_warmup(10),
  'warmup50': _ref_warmup(50),
  'cosine': _ref_cosine,
}


def _ref_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
  """The original code's tables, computed with plain float64 NumPy."""
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  with np.errstate(divide='ignore'):
    return {
      'betas': betas,
      'alphas_cumprod': ac,
      'alphas_cumprod_prev': ac_prev,
      'sqrt_alphas_cumprod': np.sqrt(ac),
      'sqrt_one_minus_alphas_cumprod': np.sqrt(1.0 - ac),
      'sqrt_recip_alphas_cumprod': 1.0 / np.sqrt(ac),
      'sqrt_recipm1_alphas_cumprod': np.sqrt((1.0 - ac) / ac),
      'posterior_variance': post_var,
      'posterior_log_variance_clipped': np.log(np.concatenate([[post_var[1]], post_var[1:]])),
      'posterior_mean_coef1': betas * np.sqrt(ac_prev) / (1.0 - ac),
      'posterior_mean_coef2': (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      'fixedlarge_variance': np.concatenate([[post_var[1]], betas[1:]]),
      'fixedlarge_log_variance': np.log(np.concatenate([[post_var[1]], betas[1:]])),
      'log_betas': np.log(betas),
    }


# ---------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize('name', sorted(REFERENCE_BETAS))
@pytest.mark.parametrize('num_timesteps', [1000, 40])
def test_betas_match_reference_formula(name, num_timesteps):
  expected = REFERENCE_BETAS[name](num_timesteps)
  got = schedules.get_beta_schedule(name, num_timesteps)
  assert got.dtype == np.float64
  assert got.shape == (num_timesteps,)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


def test_every_schedule_is_covered():
  # A new schedule must get a reference here (sigmoid is tested by its properties).
  assert set(schedules.BETA_SCHEDULES) == set(REFERENCE_BETAS) | {'sigmoid'}


def test_warmup_lengths():
  for name, k in (('warmup10', 100), ('warmup50', 500)):
    betas = schedules.get_beta_schedule(name, T)
    assert betas[0] == B0
    assert betas[k - 1] == B1
    assert np.all(np.diff(betas[:k]) > 0)
    np.testing.assert_array_equal(betas[k:], B1)


def test_sigmoid_schedule_properties():
  betas = schedules.get_beta_schedule('sigmoid', T)
  assert np.all((betas > 0) & (betas < 1))
  ac = np.cumprod(1.0 - betas)
  assert np.all(np.diff(ac) < 0)
  assert ac[0] > 0.999
  assert ac[-1] < 1e-5
  # alpha_bar(u) is symmetric about u = 1/2 with alpha_bar(1/2) = 1/2, and the
  # product of the first T/2 alphas telescopes to alpha_bar(1/2).
  np.testing.assert_allclose(ac[T // 2 - 1], 0.5, rtol=1e-12)


@pytest.mark.parametrize('name', schedules.BETA_SCHEDULES)
def test_schedule_ignores_or_uses_range(name):
  betas = schedules.get_beta_schedule(name, 100, beta_start=1e-3, beta_end=0.05)
  if name in ('linear', 'quad', 'warmup10', 'warmup50'):
    assert betas[0] == pytest.approx(1e-3, rel=1e-12)
    assert betas[-1] == pytest.approx(0.05, rel=1e-12)
  elif name == 'const':
    np.testing.assert_array_equal(betas, 0.05)
  else:
    np.testing.assert_array_equal(betas, schedules.get_beta_schedule(name, 100))


# ---------------------------------------------------------------------------
# Golden values of the original code (linear unless named otherwise, T = 1000).

GOLDEN = [
  ('linear', 'betas', 1, 1.1991991991991993e-04),
  ('linear', 'alphas_cumprod', 0, 0.9999),
  ('linear', 'alphas_cumprod', 499, 0.07858724288177824),
  ('linear', 'alphas_cumprod', 999, 4.035829765375676e-05),
  ('linear', 'posterior_variance', 1, 5.4531876613021935e-05),
  ('linear', 'posterior_variance', 999, 0.01999998352656061),
  ('linear', 'posterior_log_variance_clipped', 0, -9.81672513529567),
  ('linear', 'posterior_log_variance_clipped', 1, -9.81672513529567),
  ('linear', 'fixedlarge_log_variance', 1, -9.028686371949341),
  ('linear', 'log_betas', 1, -9.028686371949341),
  ('linear', 'posterior_mean_coef1', 999, 1.2835148717224682e-04),
  ('linear', 'posterior_mean_coef2', 999, 0.9899486782675173),
  ('cosine', 'betas', 0, 4.128422482196914e-05),
  ('cosine', 'alphas_cumprod', 999, 2.4287669070348567e-09),
  ('quad', 'betas', 500, 0.005742071067688482),
  ('quad', 'alphas_cumprod', 999, 0.0007334124595808159),
]


@pytest.mark.parametrize(
  'schedule,table,index,expected', GOLDEN, ids=[f'{s}-{n}[{i}]' for s, n, i, _ in GOLDEN]
)
def test_golden_values(x64, schedule, table, index, expected):
  d = diffusion.make_diffusion(schedule, T, dtype=jnp.float64)
  values = getattr(d, table)
  assert values.dtype == jnp.float64
  np.testing.assert_allclose(float(values[index]), expected, rtol=RTOL, atol=0)


def test_clipped_and_fixedlarge_log_variances(x64):
  d = diffusion.make_diffusion('linear', T, dtype=jnp.float64)
  post_var = np.asarray(d.posterior_variance)
  assert post_var[0] == 0.0
  clipped = np.asarray(d.posterior_log_variance_clipped)
  assert clipped[0] == clipped[1]
  np.testing.assert_allclose(clipped[1:], np.log(post_var[1:]), rtol=RTOL)
  fixedlarge = np.asarray(d.fixedlarge_log_variance)
  np.testing.assert_allclose(fixedlarge[0], np.log(post_var[1]), rtol=RTOL)
  np.testing.assert_allclose(fixedlarge[1:], np.log(np.asarray(d.betas)[1:]), rtol=RTOL)
  np.testing.assert_allclose(np.exp(fixedlarge), np.asarray(d.fixedlarge_variance), rtol=RTOL)


@pytest.mark.parametrize('name', ['linear', 'cosine', 'quad', 'warmup10', 'sigmoid'])
def test_all_tables_match_reference_formulas(x64, name):
  d = diffusion.make_diffusion(name, T, dtype=jnp.float64)
  expected = _ref_tables(schedules.get_beta_schedule(name, T))
  assert set(expected) == set(TABLE_NAMES)
  for table in TABLE_NAMES:
    got = getattr(d, table)
    assert got.dtype == jnp.float64, table
    np.testing.assert_allclose(np.asarray(got), expected[table], rtol=1e-11, atol=0, err_msg=table)
  np.testing.assert_array_equal(np.asarray(d.timestep_map), np.arange(T))
  assert d.num_timesteps == T


def test_jsd_ends_with_beta_one(x64):
  d = diffusion.make_diffusion('jsd', T, dtype=jnp.float64)
  assert float(d.betas[-1]) == 1.0
  assert float(d.alphas_cumprod[-1]) == 0.0
  # x_T is independent of x_0: the posterior at the last step ignores x_T.
  assert float(d.posterior_mean_coef2[-1]) == 0.0


# ---------------------------------------------------------------------------
# float32 tables are the float64 ones cast.


@pytest.mark.parametrize('name', ['linear', 'cosine', 'jsd', 'sigmoid'])
def test_float32_tables_are_cast_float64_tables(name):
  d32 = diffusion.make_diffusion(name, T)
  with jax.enable_x64(True):
    d64 = diffusion.make_diffusion(name, T, dtype=jnp.float64)
    tables64 = {k: np.asarray(getattr(d64, k)) for k in TABLE_NAMES}
  for table in TABLE_NAMES:
    got = np.asarray(getattr(d32, table))
    assert got.dtype == np.float32, table
    np.testing.assert_array_equal(got, tables64[table].astype(np.float32), err_msg=table)


def test_float32_cumprod_is_not_accumulated_in_float32():
  d32 = diffusion.make_diffusion('linear', T)
  betas = _ref_linear(T)
  np.testing.assert_array_equal(
    np.asarray(d32.alphas_cumprod), np.cumprod(1.0 - betas).astype(np.float32)
  )
  # The check above can tell: accumulating in float32 gives different values.
  accumulated = np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)
  assert np.any(accumulated != np.asarray(d32.alphas_cumprod))


def test_default_dtype_is_float32_and_bfloat16_is_allowed():
  assert diffusion.make_diffusion().betas.dtype == jnp.float32
  d16 = diffusion.make_diffusion(num_timesteps=10, dtype=jnp.bfloat16)
  assert d16.alphas_cumprod.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Respacing.


@pytest.mark.parametrize('name', ['linear', 'cosine', 'quad'])
@pytest.mark.parametrize('num_steps', [1, 2, 10, 50, 999, 1000])
def test_respaced_alphas_cumprod_equal_originals(x64, name, num_steps):
  d = diffusion.make_diffusion(name, T, dtype=jnp.float64)
  keep = diffusion.space_timesteps(T, num_steps)
  r = diffusion.respace(d, keep)
  assert r.num_timesteps == num_steps
  assert r.betas.dtype == jnp.float64
  np.testing.assert_array_equal(np.asarray(r.timestep_map), keep)
  # The new betas are stored as 1 - ratio; when a ratio is tiny (cosine's last
  # kept step: 2.4e-9 / 0.03) 1 - (1 - ratio) keeps only its absolute float64
  # precision, hence the atol of a few ulps of 1.
  np.testing.assert_allclose(
    np.asarray(r.alphas_cumprod), np.asarray(d.alphas_cumprod)[keep], rtol=1e-10, atol=1e-16
  )
  betas = np.asarray(r.betas)
  assert np.all((betas > 0) & (betas < 1))
  # The other tables follow from the new betas by the usual formulas.
  if num_steps > 1:
    expected = _ref_tables(betas)
    for table in TABLE_NAMES:
      np.testing.assert_allclose(
        np.asarray(getattr(r, table)), expected[table], rtol=1e-11, err_msg=table
      )


def test_respace_keeps_float32_dtype():
  d = diffusion.make_diffusion()
  r = diffusion.respace(d, diffusion.space_timesteps(T, 10))
  assert r.alphas_cumprod.dtype == jnp.float32
  assert r.timestep_map.dtype == jnp.int32
  # Rebuilt from the float64 schedule, then cast: the kept values are bit-equal.
  np.testing.assert_array_equal(
    np.asarray(r.alphas_cumprod), np.asarray(d.alphas_cumprod)[np.asarray(r.timestep_map)]
  )


@pytest.mark.parametrize(
  'num_timesteps,num_steps',
  [(1000, 2), (1000, 10), (1000, 250), (1000, 999), (1000, 1000), (50, 7), (4000, 100)],
)
def test_space_timesteps_keeps_ends(num_timesteps, num_steps):
  keep = diffusion.space_timesteps(num_timesteps, num_steps)
  assert keep.shape == (num_steps,)
  assert np.issubdtype(keep.dtype, np.integer)
  assert keep[0] == 0 and keep[-1] == num_timesteps - 1
  assert np.all(np.diff(keep) > 0)
  # Evenly spaced: every gap within one step of the ideal spacing.
  ideal = (num_timesteps - 1) / (num_steps - 1)
  assert np.all(np.abs(np.diff(keep) - ideal) <= 1.0)


def test_space_timesteps_known_values():
  np.testing.assert_array_equal(
    diffusion.space_timesteps(1000, 10), [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
  )
  np.testing.assert_array_equal(diffusion.space_timesteps(1000, 1), [999])


@pytest.mark.parametrize('num_steps', [0, -1, 1001])
def test_space_timesteps_rejects_bad_counts(num_steps):
  with pytest.raises(ValueError, match='num_steps'):
    diffusion.space_timesteps(1000, num_steps)


def test_respacing_a_respaced_process_is_an_error():
  d = diffusion.make_diffusion()
  r = diffusion.respace(d, diffusion.space_timesteps(T, 10))
  with pytest.raises(ValueError, match='already respaced'):
    diffusion.respace(r, [0, 1, 2])


@pytest.mark.parametrize('use', [[], [5, 5, 6], [10, 3], [-1, 4], [0, 1000], [[0, 1]]])
def test_respace_rejects_bad_timesteps(use):
  with pytest.raises(ValueError, match='strictly increasing'):
    diffusion.respace(diffusion.make_diffusion(), use)


# ---------------------------------------------------------------------------
# Bad input.


def test_unknown_schedule_lists_valid_choices():
  with pytest.raises(ValueError) as err:
    diffusion.make_diffusion('cosin')
  message = str(err.value)
  assert "'cosin'" in message
  for name in schedules.BETA_SCHEDULES:
    assert name in message
  with pytest.raises(ValueError, match='valid choices'):
    schedules.get_beta_schedule('Linear', 10)


@pytest.mark.parametrize('name', ['linear', 'quad', 'const', 'warmup10'])
@pytest.mark.parametrize(
  'beta_start,beta_end', [(0.0, 0.02), (-1e-4, 0.02), (0.02, 1e-4), (1e-4, 1.0), (1e-4, 1.5)]
)
def test_invalid_beta_range(name, beta_start, beta_end):
  with pytest.raises(ValueError, match='beta_start'):
    diffusion.make_diffusion(name, 100, beta_start=beta_start, beta_end=beta_end)


@pytest.mark.parametrize('num_timesteps', [0, -5, 10.5])
def test_invalid_num_timesteps(num_timesteps):
  with pytest.raises(ValueError, match='num_timesteps'):
    schedules.get_beta_schedule('linear', num_timesteps)


def test_float64_without_x64_is_an_error():
  assert not jax.config.jax_enable_x64
  with pytest.raises(ValueError, match='jax_enable_x64'):
    diffusion.make_diffusion(dtype=jnp.float64)
  with pytest.raises(ValueError, match='jax_enable_x64'):
    diffusion.make_diffusion(dtype='float64')


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_, 'complex64'])
def test_non_float_dtype_is_an_error(dtype):
  with pytest.raises(ValueError, match='floating dtype'):
    diffusion.make_diffusion(num_timesteps=10, dtype=dtype)
