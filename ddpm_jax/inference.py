"""A trained model put to use: the network and process a config names, its EMA
parameters from a checkpoint, and samples drawn with the config's sampler.

This is what `--mode=sample`, `--mode=eval` and the training loop's sample
grids share; it knows configs and checkpoints, while `sampling` knows
neither.
"""

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import files
from ddpm_jax import images as images_lib
from ddpm_jax import sampling
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import streams
from ddpm_jax.models import unet_from_config


def build_model_and_diffusion(config: ml_collections.ConfigDict):
  """The U-Net, the diffusion process and the model's input shape (H, W, C)."""
  channels = config.data.num_channels
  learned_variance = config.diffusion.model_var_type in ('learned', 'learned_range')
  model = unet_from_config(config.model, out_channels=channels * (2 if learned_variance else 1))
  d = diffusion_lib.make_diffusion(
    config.diffusion.beta_schedule,
    config.diffusion.num_timesteps,
    config.diffusion.beta_start,
    config.diffusion.beta_end,
  )
  return model, d, (config.data.image_size, config.data.image_size, channels)


def model_output_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keywords every sampler and the bound take about the model's output."""
  return dict(
    clip_denoised=config.sampling.clip_denoised,
    model_mean_type=config.diffusion.model_mean_type,
    model_var_type=config.diffusion.model_var_type,
  )


def make_model_fn(model: nn.Module, params: Any, mesh=None) -> Callable:
  """`model_fn(x_t, t)` for evaluation (no dropout), optionally pinned to the mesh.

  A class-conditional model's is `model_fn(x_t, t, y)`, y int labels [B].
  """

  def model_fn(x_t, t, y=None):
    if mesh is not None:
      # Keep the batch split over devices through the whole chain.
      x_t = jax.lax.with_sharding_constraint(x_t, sharding_lib.batch_sharded(mesh))
    return model.apply({'params': params}, x_t, t, y, train=False)

  return model_fn


def num_classes_of(model: nn.Module) -> int:
  """The classes of a class-conditional model; 0 for an unconditional one."""
  return int(getattr(model, 'num_classes', 0))


def guidance_scale_of(config: ml_collections.ConfigDict) -> float:
  """`sampling.guidance_scale`, where unset means 1 (the plain conditional model)."""
  scale = config.sampling.guidance_scale
  return 1.0 if scale is None else float(scale)


def class_labels(config: ml_collections.ConfigDict, num_samples: int) -> np.ndarray:
  """The labels of `num_samples` samples: `sampling.class_labels`' classes in turn.

  With 'all' sample i has class i mod num_classes, so every batch holds every
  class and the counts are equal when num_samples divides by num_classes.

  Returns:
    int32 [num_samples].

  Raises:
    ValueError: the model is unconditional, or the labels are unset or bad.
  """
  num_classes = config.model.num_classes
  spec = config.sampling.class_labels
  if num_classes <= 0:
    raise ValueError('class labels need a class-conditional model (model.num_classes > 0).')
  if spec is None or not str(spec).strip():
    raise ValueError(
      f'model.num_classes={num_classes}: a class-conditional model is sampled with labels; set '
      "sampling.class_labels to 'all' or to class indices such as '0,3,7'."
    )
  classes = np.asarray(sampling.parse_class_labels(spec, num_classes), np.int32)
  return classes[np.arange(num_samples) % len(classes)]


def sample(
  model: nn.Module,
  params: Any,
  d: diffusion_lib.Diffusion,
  config: ml_collections.ConfigDict,
  shape: tuple[int, ...],
  rng: jax.Array,
  *,
  sampler: str,
  num_steps: int,
  mesh=None,
  labels: Any = None,
  guidance_scale: Any = None,
) -> jax.Array:
  """Draws images in [-1, 1] of `shape` [B, H, W, C] with the named sampler.

  Args:
    model: the U-Net.
    params: its parameters (the EMA ones for evaluation).
    d: the process it was trained with.
    config: the experiment config (uses `diffusion` and `sampling`).
    shape: output shape.
    rng: PRNG key; the result is a deterministic function of it.
    sampler: one of `sampling.SAMPLERS`: 'ddpm' (all T ancestral steps),
      'respaced' (ancestral over num_steps respaced steps), 'ddim', or the
      ODE solvers 'dpm_solver' and 'unipc' (of order `sampling.solver_order`).
    num_steps: steps (model calls) of every sampler but 'ddpm'.
    mesh: optional data mesh to split the batch over.
    labels: a class-conditional model's classes, int [B]; None otherwise.
    guidance_scale: its classifier-free guidance scale (None: 1, no
      guidance); see `sampling.guided_model_fn`.

  Returns:
    float32 images [B, H, W, C].

  Raises:
    ValueError: a conditional model without labels, an unconditional one
      with labels or a guidance scale, or bad labels or scale.
  """
  sampling.check_sampler(sampler, num_steps, d.num_timesteps)
  model_fn = make_model_fn(model, params, mesh)
  options = model_output_options(config)
  num_classes = num_classes_of(model)
  if num_classes:
    if labels is None:
      raise ValueError(
        f'the model is class-conditional ({num_classes} classes): sample it with labels.'
      )
    model_fn = sampling.guided_model_fn(
      model_fn,
      labels,
      1.0 if guidance_scale is None else guidance_scale,
      null_label=num_classes,
      model_var_type=options['model_var_type'],
    )
  elif labels is not None or guidance_scale is not None:
    raise ValueError('labels and guidance_scale need a class-conditional model (num_classes > 0).')
  if sampler == 'ddpm':
    return sampling.p_sample_loop(d, model_fn, shape, rng, **options)
  if sampler == 'respaced':
    return sampling.respaced_sample_loop(d, model_fn, shape, rng, num_steps=num_steps, **options)
  if sampler == 'ddim':
    return sampling.ddim_sample_loop(
      d,
      model_fn,
      shape,
      rng,
      num_steps=num_steps,
      eta=config.sampling.ddim_eta,
      skip=config.sampling.ddim_skip,
      **options,
    )
  solver = (
    sampling.dpm_solver_sample_loop if sampler == 'dpm_solver' else sampling.unipc_sample_loop
  )
  return solver(
    d, model_fn, shape, rng, num_steps=num_steps, order=config.sampling.solver_order, **options
  )


def make_sample_fn(
  model: nn.Module,
  d: diffusion_lib.Diffusion,
  config: ml_collections.ConfigDict,
  shape: tuple[int, ...],
  *,
  sampler: str,
  num_steps: int,
  mesh,
) -> Callable[..., jax.Array]:
  """Jitted `sample_fn(params, rng) -> images [B, H, W, C]`, batch split over `mesh`.

  A class-conditional model's is `sample_fn(params, rng, labels, guidance_scale)`
  with labels int [B] and a scale >= 0 (None: 1), both checked on the host
  and traced, so every scale shares one compiled program.

  Compiled once per shape; B must divide by the number of devices.
  """
  sampling.check_sampler(sampler, num_steps, d.num_timesteps)
  sharding_lib.check_batch_size(shape[0], mesh)
  fn = functools.partial(
    sample,
    model,
    d=d,
    config=config,
    shape=tuple(shape),
    sampler=sampler,
    num_steps=num_steps,
    mesh=mesh,
  )
  replicated = sharding_lib.replicated(mesh)
  num_classes = num_classes_of(model)
  if not num_classes:
    return jax.jit(
      lambda params, rng: fn(params, rng=rng),
      in_shardings=(replicated, replicated),
      out_shardings=sharding_lib.batch_sharded(mesh),
    )
  jitted = jax.jit(
    lambda params, rng, labels, scale: fn(params, rng=rng, labels=labels, guidance_scale=scale),
    in_shardings=(replicated,) * 4,
    out_shardings=sharding_lib.batch_sharded(mesh),
  )

  def conditional_sample_fn(params, rng, labels, guidance_scale=None):
    labels = np.asarray(sampling.check_labels(labels, num_classes))
    if labels.shape != (shape[0],):
      raise ValueError(f'labels must have shape [B] = ({shape[0]},), got {labels.shape}.')
    scale = sampling.check_guidance_scale(1.0 if guidance_scale is None else guidance_scale)
    return jitted(params, rng, labels, np.float32(scale))

  return conditional_sample_fn


@dataclasses.dataclass
class InferenceModel:
  """A trained model ready for sampling and evaluation."""

  model: Any
  diffusion: diffusion_lib.Diffusion
  image_shape: tuple[int, int, int]
  ema_params: Any
  step: int
  mesh: Any


def load_inference_model(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> InferenceModel:
  """Validates the config against the workdir's checkpoint and loads its EMA parameters.

  Raises:
    config_validation.ConfigError: the config cannot work.
    checkpointing.CheckpointError: no checkpoint in the workdir.
    errors.TrainingError: the checkpoint was made with another model config.
  """
  mesh = sharding_lib.make_mesh()
  config_validation.validate(config, num_devices=mesh.devices.size, sample=True)
  files.check_storage(workdir)
  directory = os.path.join(files.absolute(workdir), 'checkpoints')
  if not files.as_path(directory).is_dir():
    raise checkpointing.CheckpointError(
      f'No checkpoint in {directory}: train first with --mode=train and this --workdir.'
    )
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise checkpointing.CheckpointError(
        f'No committed checkpoint in {directory}: train first with --mode=train.'
      )
    model, d, image_shape = build_model_and_diffusion(config)
    abstract = checkpointing.abstract_train_state(model, config, image_shape, mesh)
    state, restored_step = ckpt.restore(
      abstract,
      step,
      check_config=functools.partial(
        checkpointing.check_resume_compatible, config=config, workdir=workdir
      ),
    )
  finally:
    ckpt.close()
  logging.info('Loaded the EMA parameters of step %d from %s.', restored_step, directory)
  return InferenceModel(model, d, image_shape, state.ema_params, restored_step, mesh)


def sampler_name(
  config: ml_collections.ConfigDict, step: int, guidance_scale: float | None = None
) -> str:
  """A file-name tag that fixes everything the samples depend on.

  A class-conditional model's adds its guidance scale (`guidance_scale`, or the
  config's) and class labels.
  """
  smp = config.sampling
  steps = '' if smp.sampler == 'ddpm' else str(smp.num_steps)
  extra = {
    'ddim': f'_eta{smp.ddim_eta:g}_{smp.ddim_skip}',
    'dpm_solver': f'_order{smp.solver_order}',
    'unipc': f'_order{smp.solver_order}',
  }.get(smp.sampler, '')
  if config.model.num_classes > 0:
    scale = guidance_scale_of(config) if guidance_scale is None else guidance_scale
    spec = str(smp.class_labels).strip().replace(',', '-').replace(' ', '')
    if len(spec) > 24:  # A long list of classes: a short digest names it.
      spec = hashlib.sha256(spec.encode()).hexdigest()[:10]
    extra += f'_guidance{scale:g}_classes-{spec}'
  return f'{smp.sampler}{steps}{extra}_step{step}_seed{config.seed}'


def generate_samples(
  config: ml_collections.ConfigDict,
  im: InferenceModel,
  num_samples: int,
  out_dir: str,
  *,
  guidance_scale: float | None = None,
) -> np.ndarray:
  """Makes `num_samples` uint8 images with the config's sampler, resumably.

  Batch i uses the key fold_in(sample key, i) and is written to `out_dir` as
  soon as it is done, so the result depends only on the seed, the checkpoint
  and the sampler, never on how often the job was interrupted. A
  class-conditional model draws sample i with label `class_labels(config, .)[i]`
  at `guidance_scale` (None: the config's).

  Returns:
    uint8 [num_samples, H, W, C].
  """
  batch_size = config.sampling.batch_size
  num_batches = -(-num_samples // batch_size)
  sample_fn = make_sample_fn(
    im.model,
    im.diffusion,
    config,
    (batch_size,) + im.image_shape,
    sampler=config.sampling.sampler,
    num_steps=config.sampling.num_steps,
    mesh=im.mesh,
  )
  base_key = streams.key(config.seed, streams.Stream.SAMPLE)
  conditional = num_classes_of(im.model) > 0
  if conditional:
    labels = class_labels(config, num_batches * batch_size)
    scale = guidance_scale_of(config) if guidance_scale is None else guidance_scale

  def compute(index, _):
    key = jax.random.fold_in(base_key, index)
    if conditional:
      batch_labels = labels[index * batch_size : (index + 1) * batch_size]
      images = sample_fn(im.ema_params, key, batch_labels, scale)
    else:
      images = sample_fn(im.ema_params, key)
    return {'images': images_lib.to_uint8(sharding_lib.gather_to_hosts(images, 'samples'))}

  batches = files.resumable_batches(
    out_dir, range(num_batches), num_batches, compute, what='Sampled'
  )
  return np.concatenate([b['images'] for b in batches])[:num_samples]
