"""What every sampling chain shares: argument checks, x_T, step noise, the model call.

The samplers of `sampling` (the paper's chains) and `solvers` (the ODE
solvers) check their arguments here, on static Python values, before
tracing anything, so that a bad argument is a `ValueError` naming the valid
values rather than an error from deep inside a scan.

Randomness: a sampler's `rng` is split once into an initial-noise key and a
step key; the noise of step i is `jax.random.normal(fold_in(step_key, i),
shape)`. A sample is therefore a deterministic function of the key, and since
JAX's threefry draws do not depend on how an array is sharded, it does not
change when the batch is split across devices.
"""

import math
import numbers
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as diffusion_lib

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


def check_diffusion(d: Any) -> None:
  if not isinstance(d, diffusion_lib.Diffusion):
    raise TypeError(f'd must be a diffusion.Diffusion, got {type(d).__name__}.')


def is_int(value: Any) -> bool:
  return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool)


def check_shape(shape: Any) -> tuple[int, ...]:
  """Returns shape as a tuple of ints: [B, ...data dims], at least 2 entries."""
  if (
    not isinstance(shape, (tuple, list))
    or len(shape) < 2
    or not all(is_int(s) and s >= 1 for s in shape)
  ):
    raise ValueError(
      'shape must be a tuple of positive ints, batch first: '
      f'(B, ...data dims, C) with at least 2 entries, got {shape!r}.'
    )
  return tuple(int(s) for s in shape)


def check_int_range(name: str, value: Any, low: int, high: int) -> int:
  """An int in [low, high] (inclusive)."""
  if not is_int(value) or not low <= value <= high:
    raise ValueError(f'{name} must be an integer in [{low}, {high}], got {value!r}.')
  return int(value)


def check_nonnegative(name: str, value: Any) -> float:
  """A static, finite, non-negative real number."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f'{name} must be a non-negative Python number, got {value!r}.')
  value = float(value)
  if not math.isfinite(value) or value < 0:
    raise ValueError(f'{name} must be a finite number >= 0, got {value!r}.')
  return value


def check_rng(rng: Any) -> None:
  """A typed key (shape []) or a raw uint32 key (shape [2] for threefry)."""
  if not hasattr(rng, 'dtype') or not hasattr(rng, 'shape'):
    raise ValueError(f'rng must be a JAX PRNG key, got {type(rng).__name__}.')
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    ok = rng.shape == ()
  else:
    ok = rng.dtype == jnp.uint32 and len(rng.shape) == 1
  if not ok:
    raise ValueError(
      'rng must be a single PRNG key (jax.random.key(seed) or '
      f'jax.random.PRNGKey(seed)), got dtype {rng.dtype} and shape '
      f'{tuple(rng.shape)}; vmap over a batch of keys instead.'
    )


def check_common(
  d: Any,
  shape: Any,
  rng: Any,
  *,
  clip_denoised: bool,
  model_mean_type: str,
  model_var_type: str,
) -> tuple[int, ...]:
  """The checks every sampler makes; returns the shape as a tuple of ints."""
  check_diffusion(d)
  shape = check_shape(shape)
  check_rng(rng)
  diffusion_lib.check_model_options(model_mean_type, model_var_type, clip_denoised)
  return shape


def sample_dtype(d: diffusion_lib.Diffusion) -> jnp.dtype:
  # Samples follow the tables: float64 tables (under jax_enable_x64) give a
  # float64 chain, the usual float32 tables a float32 one.
  return d.alphas_cumprod.dtype


def initial_sample(d: diffusion_lib.Diffusion, shape: tuple[int, ...], rng: Any, x_T: Any) -> Array:
  """x_T ~ N(0, I) from `rng`, or the given `x_T` (checked against `shape`)."""
  dtype = sample_dtype(d)
  if x_T is None:
    return jax.random.normal(rng, shape, dtype)
  if tuple(jnp.shape(x_T)) != shape:
    raise ValueError(f'x_T must have the sample shape {shape}, got {tuple(jnp.shape(x_T))}.')
  if not jnp.issubdtype(jnp.result_type(x_T), jnp.floating):
    raise ValueError(f'x_T must be a float array, got dtype {jnp.result_type(x_T)}.')
  return jnp.asarray(x_T, dtype)


def step_noise(key: Array, i: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """The fresh noise of step i: a function of (key, i) alone."""
  return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def call_model(d: diffusion_lib.Diffusion, model_fn: ModelFn, x: Array, t: Array) -> Array:
  """The model at (x, t) with t mapped to the timesteps the model was trained on."""
  output = model_fn(x, jnp.take(d.timestep_map, t))
  # A model computing in another precision must not change the carry's dtype,
  # or the scan would reject its own output.
  return jnp.asarray(output).astype(x.dtype)


def per_example(batch: int, t: Array) -> Array:
  """A scalar timestep as the int32 [B] vector the model and the process take."""
  return jnp.full((batch,), t, dtype=jnp.int32)
