"""Sampling with a trained U-Net: the config's sampler, jitted over the data mesh."""

import functools
from typing import Any, Callable, Tuple

import flax.linen as nn
import jax
import ml_collections

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import sampling
from ddpm_jax import sharding as sharding_lib
from ddpm_jax.models import unet_from_config

SAMPLERS = ('ddpm', 'respaced', 'ddim')


def build_model_and_diffusion(config: ml_collections.ConfigDict):
  """The U-Net, the diffusion process and the model's input shape (H, W, C)."""
  channels = config.data.num_channels
  learned_variance = config.diffusion.model_var_type in ('learned', 'learned_range')
  model = unet_from_config(config.model, out_channels=channels * (2 if learned_variance else 1))
  d = diffusion_lib.make_diffusion(
      config.diffusion.beta_schedule, config.diffusion.num_timesteps,
      config.diffusion.beta_start, config.diffusion.beta_end)
  return model, d, (config.data.image_size, config.data.image_size, channels)


def make_model_fn(model: nn.Module, params: Any, mesh=None) -> Callable:
  """`model_fn(x_t, t)` for evaluation (no dropout), optionally pinned to the mesh."""
  def model_fn(x_t, t):
    if mesh is not None:
      # Keep the batch split over devices through the whole chain.
      x_t = jax.lax.with_sharding_constraint(x_t, sharding_lib.batch_sharded(mesh))
    return model.apply({'params': params}, x_t, t, train=False)
  return model_fn


def check_sampler(name: str, num_steps: int, num_timesteps: int) -> None:
  """Raises ValueError for an unknown sampler or an impossible step count."""
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; valid choices: {", ".join(SAMPLERS)}.')
  if name != 'ddpm' and not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'Sampler {name!r} needs 1 <= num_steps <= {num_timesteps}, got {num_steps}.')


def sample(model: nn.Module, params: Any, d: diffusion_lib.Diffusion,
           config: ml_collections.ConfigDict, shape: Tuple[int, ...], rng: jax.Array, *,
           sampler: str, num_steps: int, mesh=None) -> jax.Array:
  """Draws images in [-1, 1] of `shape` [B, H, W, C] with the named sampler.

  Args:
    model: the U-Net.
    params: its parameters (the EMA ones for evaluation).
    d: the process it was trained with.
    config: the experiment config (uses `diffusion` and `sampling`).
    shape: output shape.
    rng: PRNG key; the result is a deterministic function of it.
    sampler: 'ddpm' (all T ancestral steps), 'respaced' (ancestral over
      num_steps respaced steps) or 'ddim'.
    num_steps: steps of 'respaced' and 'ddim'.
    mesh: optional data mesh to split the batch over.

  Returns:
    float32 images [B, H, W, C].
  """
  check_sampler(sampler, num_steps, d.num_timesteps)
  model_fn = make_model_fn(model, params, mesh)
  kw = dict(clip_denoised=config.sampling.clip_denoised,
            model_mean_type=config.diffusion.model_mean_type,
            model_var_type=config.diffusion.model_var_type)
  if sampler == 'ddpm':
    return sampling.p_sample_loop(d, model_fn, shape, rng, **kw)
  if sampler == 'respaced':
    return sampling.respaced_sample_loop(d, model_fn, shape, rng, num_steps=num_steps, **kw)
  return sampling.ddim_sample_loop(d, model_fn, shape, rng, num_steps=num_steps,
                                   eta=config.sampling.ddim_eta, skip=config.sampling.ddim_skip,
                                   **kw)


def make_sample_fn(model: nn.Module, d: diffusion_lib.Diffusion,
                   config: ml_collections.ConfigDict, shape: Tuple[int, ...], *,
                   sampler: str, num_steps: int, mesh) -> Callable[[Any, jax.Array], jax.Array]:
  """Jitted `sample_fn(params, rng) -> images [B, H, W, C]`, batch split over `mesh`.

  Compiled once per shape; B must divide by the number of devices.
  """
  check_sampler(sampler, num_steps, d.num_timesteps)
  sharding_lib.check_batch_size(shape[0], mesh)
  fn = functools.partial(sample, model, d=d, config=config, shape=tuple(shape),
                         sampler=sampler, num_steps=num_steps, mesh=mesh)
  return jax.jit(lambda params, rng: fn(params, rng=rng),
                 in_shardings=(sharding_lib.replicated(mesh), sharding_lib.replicated(mesh)),
                 out_shardings=sharding_lib.batch_sharded(mesh))
