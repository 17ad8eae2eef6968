"""`--mode=sample`: draw images from the newest checkpoint's EMA parameters.

Samples are made in batches whose keys are fold_in(seed key, batch index), so
the result depends only on the seed, the checkpoint and the sampler, never on
how often the run was interrupted: each finished batch is written to
`DIR/samples/<name>/batch_<index>.npz` at once, and a restart skips those.
When all are done they are joined into `DIR/samples/<name>.npz` (uint8 NHWC
under the key 'images') and a PNG grid of the first 64.
"""

import dataclasses
import functools
import glob
import logging
import os
import time
from typing import Any, Optional, Tuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import generate
from ddpm_jax import images as images_lib
from ddpm_jax import sampling
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import train

# fold_in constants for the sampling keys (distinct from training's).
_SAMPLE_KEY = 2**31 - 3
_FIGURE_KEY = 2**31 - 4


@dataclasses.dataclass
class InferenceModel:
  """A trained model ready for sampling and evaluation."""
  model: Any
  diffusion: diffusion_lib.Diffusion
  image_shape: Tuple[int, int, int]
  ema_params: Any
  step: int
  mesh: Any


def load_inference_model(config: ml_collections.ConfigDict, workdir: str,
                         step: Optional[int] = None) -> InferenceModel:
  """Validates the config against the workdir's checkpoint and loads its EMA parameters.

  Raises:
    checkpointing.CheckpointError: no checkpoint in the workdir.
    train.TrainingError: the checkpoint was made with another model config.
  """
  mesh = sharding_lib.make_mesh()
  config_validation.validate(config, num_devices=mesh.devices.size)
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(
        f'No checkpoint in {directory}: train first with --mode=train and this --workdir.')
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise checkpointing.CheckpointError(
          f'No committed checkpoint in {directory}: train first with --mode=train.')
    model, d, image_shape = generate.build_model_and_diffusion(config)
    abstract = train.abstract_train_state(model, config, image_shape, mesh)
    state, restored_step = ckpt.restore(abstract, step, check_config=functools.partial(
        train.check_resume_compatible, config=config, workdir=workdir))
  finally:
    ckpt.close()
  logging.info('Loaded the EMA parameters of step %d from %s.', restored_step, directory)
  return InferenceModel(model, d, image_shape, state.ema_params, restored_step, mesh)


def sampler_name(config: ml_collections.ConfigDict, step: int) -> str:
  """A file-name tag that fixes everything the samples depend on."""
  smp = config.sampling
  steps = '' if smp.sampler == 'ddpm' else str(smp.num_steps)
  extra = f'_eta{smp.ddim_eta:g}_{smp.ddim_skip}' if smp.sampler == 'ddim' else ''
  return f'{smp.sampler}{steps}{extra}_step{step}_seed{config.seed}'


def generate_samples(config: ml_collections.ConfigDict, im: InferenceModel, num_samples: int,
                     out_dir: str) -> np.ndarray:
  """Makes `num_samples` uint8 images, resumably, with batch files in `out_dir`.

  Returns:
    uint8 [num_samples, H, W, C].
  """
  batch_size = config.sampling.batch_size
  num_batches = -(-num_samples // batch_size)
  os.makedirs(out_dir, exist_ok=True)
  sample_fn = generate.make_sample_fn(
      im.model, im.diffusion, config, (batch_size,) + im.image_shape,
      sampler=config.sampling.sampler, num_steps=config.sampling.num_steps, mesh=im.mesh)
  base_key = jax.random.fold_in(jax.random.key(config.seed), _SAMPLE_KEY)
  is_chief = jax.process_index() == 0
  start, done_now = time.time(), 0
  for index in range(num_batches):
    path = os.path.join(out_dir, f'batch_{index:05d}.npz')
    if os.path.exists(path):
      continue  # Finished before an interruption: never redone.
    images = sample_fn(im.ema_params, jax.random.fold_in(base_key, index))
    images = images_lib.to_uint8(multihost_utils.process_allgather(images, tiled=True))
    if is_chief:
      _atomic_savez(path, images=images)
    done_now += 1
    rate = done_now / (time.time() - start)
    remaining = num_batches - index - 1
    logging.info('Sampled batch %d/%d (%.2f batches/s, ETA %.0f s).', index + 1, num_batches,
                 rate, remaining / max(rate, 1e-9))
  multihost_utils.sync_global_devices('samples written')
  files = sorted(glob.glob(os.path.join(out_dir, 'batch_*.npz')))[:num_batches]
  return np.concatenate([np.load(f)['images'] for f in files])[:num_samples]


def _atomic_savez(path: str, **arrays: np.ndarray) -> None:
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs `--mode=sample`; returns the path of the written .npz."""
  im = load_inference_model(config, workdir)
  name = sampler_name(config, im.step)
  samples_dir = os.path.join(os.path.abspath(workdir), 'samples')
  images = generate_samples(config, im, config.sampling.num_samples,
                            os.path.join(samples_dir, name))
  path = os.path.join(samples_dir, f'{name}.npz')
  if jax.process_index() == 0:
    _atomic_savez(path, images=images)
    images_lib.save_png(images_lib.make_grid(images[:64]), os.path.join(samples_dir, f'{name}.png'))
    if config.sampling.figures:
      save_figures(config, im, samples_dir, name)
  logging.info('Wrote %d samples of shape %s to %s.', len(images), images.shape[1:], path)
  return path


def save_figures(config: ml_collections.ConfigDict, im: InferenceModel, samples_dir: str,
                 name: str) -> None:
  """The paper's progressive-generation (Fig. 6) and interpolation (Fig. 8) figures."""
  model_fn = generate.make_model_fn(im.model, im.ema_params)
  kw = dict(clip_denoised=config.sampling.clip_denoised,
            model_mean_type=config.diffusion.model_mean_type,
            model_var_type=config.diffusion.model_var_type)
  key = jax.random.fold_in(jax.random.key(config.seed), _FIGURE_KEY)
  num_timesteps = im.diffusion.num_timesteps
  every = max(num_timesteps // 10, 1)
  while num_timesteps % every:
    every -= 1
  progressive = jax.jit(lambda k: sampling.p_sample_loop_progressive(
      im.diffusion, model_fn, (4,) + im.image_shape, k, every=every, **kw))
  _, snapshots = progressive(key)
  # Rows: 4 samples; columns: predicted x0 as t goes from T to 0.
  pred_x0 = np.asarray(snapshots['pred_x0'])  # [S, 4, H, W, C]
  tiles = np.transpose(pred_x0, (1, 0, 2, 3, 4)).reshape((-1,) + im.image_shape)
  images_lib.save_png(
      images_lib.make_grid(images_lib.to_uint8(tiles), num_columns=pred_x0.shape[0]),
      os.path.join(samples_dir, f'{name}_progressive.png'), upscale=2)

  # Interpolation between two generated images, decoded from t = T/2.
  pair = np.asarray(jax.jit(lambda k: generate.sample(
      im.model, im.ema_params, im.diffusion, config, (2,) + im.image_shape, k,
      sampler='ddim', num_steps=min(50, num_timesteps)))(jax.random.fold_in(key, 1)))
  lams = np.linspace(0.0, 1.0, 8)
  mixed = jax.jit(lambda k: sampling.interpolate(
      im.diffusion, model_fn, pair[:1], pair[1:], k, t=num_timesteps // 2, lam=lams, **kw))(
          jax.random.fold_in(key, 2))
  row = np.concatenate([pair[:1], np.asarray(mixed)[:, 0], pair[1:]])
  images_lib.save_png(images_lib.make_grid(images_lib.to_uint8(row), num_columns=len(row)),
                      os.path.join(samples_dir, f'{name}_interpolation.png'), upscale=2)
