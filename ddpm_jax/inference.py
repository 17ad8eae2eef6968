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
from ddpm_jax import distillation
from ddpm_jax import edm
from ddpm_jax import errors
from ddpm_jax import files
from ddpm_jax import gcs
from ddpm_jax import guidance
from ddpm_jax import images as images_lib
from ddpm_jax import sampler_table
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


def kind_of(config: ml_collections.ConfigDict) -> str:
  """The model's `diffusion.kind`: 'ddpm' or 'edm' (configs without the field are 'ddpm')."""
  return config.diffusion.get('kind', 'ddpm')


def sampler_options(config: ml_collections.ConfigDict, sampler: str) -> dict[str, Any]:
  """The keywords the named sampler takes about the model and from blocks beside `sampling`.

  A DDPM model's are `model_output_options`; an EDM model's is its sigma_data (the 'edm' row
  then preconditions the raw network). The 'edm' row adds its noise range (`edm.*`).
  """
  if kind_of(config) == 'edm':
    options = dict(sigma_data=config.edm.sigma_data)
  else:
    options = model_output_options(config)
  return dict(options, **sampler_table.config_keywords(sampler, config))


def make_model_fn(model: nn.Module, params: Any, mesh=None) -> Callable:
  """`model_fn(x_t, t)` for evaluation (no dropout), optionally pinned to the mesh.

  A class-conditional model's is `model_fn(x_t, t, y)`, y int labels [B]. An EDM
  model's t is its float c_noise = ln(sigma) / 4 (the U-Net's timestep input).
  """

  def model_fn(x_t, t, y=None):
    if mesh is not None:
      # Keep the batch split over devices through the whole chain.
      x_t = jax.lax.with_sharding_constraint(x_t, sharding_lib.batch_sharded(mesh))
    return model.apply({'params': params}, x_t, t, y, train=False)

  return model_fn


def denoiser_of(
  config: ml_collections.ConfigDict, d: diffusion_lib.Diffusion, model_fn: Callable
) -> Callable:
  """EDM's `denoiser(x, sigma, *args)` of a `model_fn` of either kind.

  An EDM model's is its preconditioned network; a DDPM model's is
  `edm.denoiser_from_diffusion` of its process. `args` (a class label [B]) reach `model_fn`.
  """
  if kind_of(config) == 'edm':
    return edm.precondition(model_fn, sigma_data=config.edm.sigma_data)
  return edm.denoiser_from_diffusion(
    d,
    model_fn,
    model_mean_type=config.diffusion.model_mean_type,
    model_var_type=config.diffusion.model_var_type,
  )


def make_denoiser(config: ml_collections.ConfigDict, im: 'InferenceModel') -> Callable:
  """`denoiser_of` a loaded model's EMA parameters (no dropout)."""
  return denoiser_of(config, im.diffusion, make_model_fn(im.model, im.ema_params, im.mesh))


def params_denoiser(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  d: diffusion_lib.Diffusion,
  params: Any,
  x: jax.Array,
  sigma: Any,
  labels: Any = None,
  *,
  guidance_scale: Any = None,
  dropout_rng: Any = None,
) -> jax.Array:
  """D(x, sigma) of the network with `params`, for training on denoisers (distillation).

  A class-conditional network is guided towards `labels` at `guidance_scale`, or, with no
  scale, conditioned on them in one call. With `dropout_rng` the network runs in training
  mode (dropout on).
  """

  def net(x_in, t, y=None):
    if dropout_rng is None:
      return model.apply({'params': params}, x_in, t, y, train=False)
    return model.apply({'params': params}, x_in, t, y, train=True, rngs={'dropout': dropout_rng})

  model_fn = net
  if labels is not None and guidance_scale is not None:
    model_fn = guidance.guided_model_fn(
      net,
      labels,
      guidance_scale,
      null_label=num_classes_of(model),
      model_var_type=config.diffusion.model_var_type,
    )
  elif labels is not None:
    model_fn = lambda x_in, t: net(x_in, t, labels)
  return denoiser_of(config, d, model_fn)(x, sigma)


# A distillation (`--mode=distill`) lives in WORKDIR/DISTILL_DIR; the student that takes N
# steps in WORKDIR/STUDENTS_DIR/N.
DISTILL_DIR = 'distill'
STUDENTS_DIR = 'students'


def distill_levels(
  config: ml_collections.ConfigDict, d: diffusion_lib.Diffusion, num_steps: int
) -> np.ndarray:
  """The noise levels of a DDIM teacher of `num_steps` steps (`distillation.levels`)."""
  return distillation.levels(
    d if kind_of(config) == 'ddpm' else None,
    num_steps,
    sigma_min=config.edm.sigma_min,
    sigma_max=config.edm.sigma_max,
    rho=config.edm.rho,
  )


def num_classes_of(model: nn.Module) -> int:
  """The classes of a class-conditional model; 0 for an unconditional one."""
  return int(getattr(model, 'num_classes', 0))


def class_labels(config: ml_collections.ConfigDict, num_samples: int) -> np.ndarray:
  """The labels of `num_samples` samples: `sampling.class_labels`' classes in turn.

  With 'all' sample i has class i mod num_classes, so every batch holds every
  class and the counts are equal when num_samples divides by num_classes.

  Args:
    config: a validated config of a class-conditional model (validation
      resolves unset class labels to 'all').
    num_samples: how many labels.

  Returns:
    int32 [num_samples].
  """
  classes = guidance.parse_class_labels(config.sampling.class_labels, config.model.num_classes)
  return np.asarray(classes, np.int32)[np.arange(num_samples) % len(classes)]


def sampling_model_fn(
  model: nn.Module,
  params: Any,
  *,
  model_var_type: str,
  mesh=None,
  labels: Any = None,
  guidance_scale: Any = None,
) -> Callable:
  """The `model_fn(x_t, t)` that samplers call: guided towards `labels` for a conditional model.

  This is the one place where a class-conditional model becomes a guided
  `model_fn` (`guidance.guided_model_fn`); an unconditional model's is
  `make_model_fn`'s. An EDM model's is its raw network F(x_in, c_noise),
  guided alike: EDM's D = c_skip x + c_out F is affine in F, so
  F_u + s (F_c - F_u) gives D = D_u + s (D_c - D_u), the guided denoiser.

  Raises:
    ValueError: a conditional model without labels or scale, an
      unconditional one with them, or bad labels or scale.
  """
  model_fn = make_model_fn(model, params, mesh)
  num_classes = num_classes_of(model)
  if not num_classes:
    if labels is not None or guidance_scale is not None:
      raise ValueError(
        'labels and guidance_scale need a class-conditional model (num_classes > 0).'
      )
    return model_fn
  if labels is None or guidance_scale is None:
    raise ValueError(
      f'the model is class-conditional ({num_classes} classes): sample it with labels and a '
      'guidance scale.'
    )
  return guidance.guided_model_fn(
    model_fn, labels, guidance_scale, null_label=num_classes, model_var_type=model_var_type
  )


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
    d: the process it was trained with (unused by an EDM model).
    config: the experiment config (uses `diffusion`, `sampling` and, for 'edm', `edm`).
    shape: output shape.
    rng: PRNG key; the result is a deterministic function of it.
    sampler: a name of `sampler_table.SAMPLERS`; its other settings come
      from the config's `sampling` block.
    num_steps: model calls, where the sampler takes them.
    mesh: optional data mesh to split the batch over.
    labels: a class-conditional model's classes, int [B]; None otherwise.
    guidance_scale: its classifier-free guidance scale; None otherwise.

  Returns:
    float32 images [B, H, W, C].

  Raises:
    ValueError: see `sampling_model_fn` and `sampler_table.check`.
  """
  sampler_table.check(sampler, num_steps, d.num_timesteps, kind_of(config))
  options = sampler_options(config, sampler)
  if sampler_table.row(sampler).student and labels is not None:
    # A distilled student has its teacher's guidance built in: one conditional call a step.
    conditional = make_model_fn(model, params, mesh)
    model_fn = lambda x_t, t: conditional(x_t, t, labels)
  else:
    model_fn = sampling_model_fn(
      model,
      params,
      model_var_type=config.diffusion.model_var_type,
      mesh=mesh,
      labels=labels,
      guidance_scale=guidance_scale,
    )
  return sampler_table.draw(
    sampler, d, model_fn, shape, rng, num_steps=num_steps, smp=config.sampling, **options
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
  with labels int [B] and a scale >= 0, both checked on the host and traced,
  so every scale shares one compiled program; its `.lower(...)` takes the same
  arguments, and `.checked(labels, guidance_scale)` gives them as the compiled
  program takes them.

  Compiled once per shape; B must divide by the number of devices.
  """
  sampler_table.check(sampler, num_steps, d.num_timesteps, kind_of(config))
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

  def checked(labels, guidance_scale):
    labels = np.asarray(guidance.check_labels(labels, num_classes))
    if labels.shape != (shape[0],):
      raise ValueError(f'labels must have shape [B] = ({shape[0]},), got {labels.shape}.')
    return labels, np.float32(guidance.check_guidance_scale(guidance_scale))

  def conditional_sample_fn(params, rng, labels, guidance_scale):
    return jitted(params, rng, *checked(labels, guidance_scale))

  # Ahead-of-time compilation, as a jitted function has it (benchmarks time compiling apart).
  conditional_sample_fn.lower = lambda params, rng, labels, guidance_scale: jitted.lower(
    params, rng, *checked(labels, guidance_scale)
  )
  conditional_sample_fn.checked = checked
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
  # What the configured sampler samples: a distilled student's EMA parameters for
  # 'distilled' (`load_student`), else `ema_params`.
  sampling_params: Any = None

  def __post_init__(self):
    if self.sampling_params is None:
      self.sampling_params = self.ema_params


def load_inference_model(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> InferenceModel:
  """Validates the config against the workdir's checkpoint and loads its EMA parameters.

  Validation resolves the config's sampling defaults (`config_validation.validate`).

  Raises:
    config_validation.ConfigError: the config cannot work.
    checkpointing.CheckpointError: no checkpoint in the workdir.
    errors.TrainingError: the checkpoint was made with another model config.
  """
  mesh = sharding_lib.make_mesh()
  config_validation.validate(config, num_devices=mesh.devices.size)
  gcs.check_bucket(workdir)
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
  im = InferenceModel(model, d, image_shape, state.ema_params, restored_step, mesh)
  if config.sampling.sampler == 'distilled':
    im.sampling_params = load_student(
      config, workdir, config.sampling.num_steps, abstract.ema_params
    )
  return im


def load_student(
  config: ml_collections.ConfigDict, workdir: str, num_steps: int, abstract_params: Any
) -> Any:
  """The EMA parameters of the distilled student that samples in `num_steps` steps.

  Raises:
    checkpointing.CheckpointError: the workdir has no such student (the message lists those it has).
    errors.TrainingError: the student was distilled with another model, teacher grid or
      guidance scale than the config's.
  """
  directory = os.path.join(files.absolute(workdir), DISTILL_DIR, STUDENTS_DIR)
  students = checkpointing.Checkpointer(directory, read_only=True)
  try:
    available = sorted(students.all_steps()) if files.as_path(directory).is_dir() else []
    if num_steps not in available:
      raise checkpointing.CheckpointError(
        f'No {num_steps}-step student in {directory}: '
        + (
          f'it has students of {", ".join(map(str, available))} steps (sampling.num_steps).'
          if available
          else 'distil one first with --mode=distill and this --workdir.'
        )
      )
    restored, _ = students.restore(
      {'ema_params': abstract_params},
      num_steps,
      check_config=functools.partial(_check_student, config=config, directory=directory),
    )
  finally:
    students.close()
  logging.info('Loaded the %d-step student from %s.', num_steps, directory)
  return restored['ema_params']


def _check_student(saved: dict[str, Any], *, config, directory: str) -> None:
  sections = ('model', 'diffusion') + (('edm',) if kind_of(config) == 'edm' else ())
  checkpointing.check_resume_compatible(saved, config, directory, sections=sections)
  problems = []
  saved_teacher = saved['distill']['teacher_steps']
  if saved_teacher != config.distill.teacher_steps:
    problems.append(
      f'distill.teacher_steps: the student has {saved_teacher}, the config '
      f'{config.distill.teacher_steps} (its noise levels come from them)'
    )
  saved_scale = saved['sampling'].get('guidance_scale')
  if config.model.num_classes and saved_scale != config.sampling.guidance_scale:
    problems.append(
      f'sampling.guidance_scale: the student was distilled from the teacher guided at '
      f'{saved_scale}, the config asks for {config.sampling.guidance_scale} (a student has '
      'its guidance built in)'
    )
  if problems:
    raise errors.TrainingError(
      f'The students in {directory} do not fit the config:\n  ' + '\n  '.join(problems)
    )


def sampler_name(
  config: ml_collections.ConfigDict, step: int, guidance_scale: float | None = None
) -> str:
  """A file-name tag that fixes everything the samples depend on.

  A class-conditional model's adds its guidance scale (`guidance_scale`, or the
  config's) and class labels.
  """
  smp = config.sampling
  name = sampler_table.tag(smp.sampler, smp.num_steps, config)
  if config.model.num_classes > 0:
    scale = smp.guidance_scale if guidance_scale is None else guidance_scale
    spec = str(smp.class_labels).strip().replace(',', '-').replace(' ', '')
    if len(spec) > 24:  # A long list of classes: a short digest names it.
      spec = hashlib.sha256(spec.encode()).hexdigest()[:10]
    name += f'_guidance{scale:g}_classes-{spec}'
  return f'{name}_step{step}_seed{config.seed}'


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
    scale = config.sampling.guidance_scale if guidance_scale is None else guidance_scale

  def compute(index, _):
    key = jax.random.fold_in(base_key, index)
    if conditional:
      batch_labels = labels[index * batch_size : (index + 1) * batch_size]
      images = sample_fn(im.sampling_params, key, batch_labels, scale)
    else:
      images = sample_fn(im.sampling_params, key)
    return {'images': images_lib.to_uint8(sharding_lib.gather_to_hosts(images, 'samples'))}

  batches = files.resumable_batches(
    out_dir, range(num_batches), num_batches, compute, what='Sampled'
  )
  return np.concatenate([b['images'] for b in batches])[:num_samples]
