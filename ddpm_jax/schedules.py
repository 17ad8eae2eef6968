"""Beta schedules of the forward process, computed in float64 NumPy.

Every schedule returns `betas` of shape [T] with 0 < beta < 1. The tables
derived from them (cumulative products, posterior coefficients) are built in
`ddpm_jax.diffusion`, also in float64, and only then cast to the working dtype;
float32 cumulative products drift visibly over 1000 steps.

Sources: `linear`, `quad`, `const`, `jsd`, `warmupK` follow the original DDPM
code (diffusion_tf/diffusion_utils_2.py); `cosine` is improved DDPM's
(Nichol & Dhariwal 2021, Eq. 17); `sigmoid` is the schedule of Jabri et al.
2022 (RIN), a common third choice.
"""

import math
from collections.abc import Callable

import numpy as np


def _linear(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _quad(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def _const(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  del beta_start
  return np.full(num_timesteps, beta_end, dtype=np.float64)


def _jsd(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  # 1/T, 1/(T-1), ..., 1: the schedule of Sohl-Dickstein et al. 2015.
  del beta_start, beta_end
  return 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)


def _warmup(fraction: float) -> Callable[[int, float, float], np.ndarray]:
  def schedule(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    warmup_steps = int(num_timesteps * fraction)
    betas[:warmup_steps] = np.linspace(beta_start, beta_end, warmup_steps, dtype=np.float64)
    return betas

  return schedule


def _cosine(
  num_timesteps: int, beta_start: float, beta_end: float, s: float = 0.008, max_beta: float = 0.999
) -> np.ndarray:
  # alpha_bar(u) = cos^2((u + s)/(1 + s) * pi/2), betas from its ratios, capped
  # at 0.999 so the last steps do not become singular.
  del beta_start, beta_end
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _sigmoid(
  num_timesteps: int,
  beta_start: float,
  beta_end: float,
  start: float = -3.0,
  end: float = 3.0,
  tau: float = 1.0,
  max_beta: float = 0.999,
) -> np.ndarray:
  # alpha_bar(u) follows a rescaled sigmoid from 1 at u = 0 to 0 at u = 1.
  del beta_start, beta_end
  sig = lambda z: 1 / (1 + np.exp(-z))
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  v_start, v_end = sig(start / tau), sig(end / tau)
  alpha_bar = (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
  return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, max_beta)


_SCHEDULES = {
  'linear': _linear,
  'quad': _quad,
  'const': _const,
  'jsd': _jsd,
  'warmup10': _warmup(0.1),
  'warmup50': _warmup(0.5),
  'cosine': _cosine,
  'sigmoid': _sigmoid,
}

BETA_SCHEDULES = tuple(_SCHEDULES)
# Schedules that read beta_start / beta_end; the others ignore them.
RANGE_SCHEDULES = ('linear', 'quad', 'const', 'warmup10', 'warmup50')


def get_beta_schedule(
  name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
  """Returns the float64 betas of a named schedule.

  Args:
    name: one of `BETA_SCHEDULES`.
    num_timesteps: T, the number of diffusion steps (>= 1).
    beta_start: first beta of the range-based schedules.
    beta_end: last beta of the range-based schedules (the constant of `const`).

  Returns:
    float64 array [T] of betas, each in (0, 1] (only `jsd` reaches 1).

  Raises:
    ValueError: unknown name, T < 1, or a beta range outside (0, 1).
  """
  if name not in _SCHEDULES:
    raise ValueError(f'Unknown beta_schedule {name!r}; valid choices: {", ".join(BETA_SCHEDULES)}.')
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f'num_timesteps must be a positive integer, got {num_timesteps!r}.')
  if name in RANGE_SCHEDULES and not 0 < beta_start <= beta_end < 1:
    raise ValueError(
      'The beta range must satisfy 0 < beta_start <= beta_end < 1, '
      f'got beta_start={beta_start}, beta_end={beta_end}.'
    )
  betas = _SCHEDULES[name](int(num_timesteps), float(beta_start), float(beta_end))
  # jsd ends at exactly 1 (x_T independent of x_0), as in the original.
  assert betas.shape == (num_timesteps,) and np.all((betas > 0) & (betas <= 1)), name
  return betas
