"""`--mode=sample`: draw images from the newest checkpoint's EMA parameters.

Samples are made in batches whose keys are fold_in(sample key, batch index),
so the result depends only on the seed, the checkpoint and the sampler, never
on how often the run was interrupted: each finished batch is written to
`DIR/samples/<name>/batch_<index>.npz` at once, and a restart skips those.
When all are done they are joined into `DIR/samples/<name>.npz` (uint8 NHWC
under the key 'images') and a PNG grid of the first 64. A class-conditional
model's samples follow `sampling.class_labels` at `sampling.guidance_scale`;
its npz also holds their int32 'labels' [N], and `<name>_classes.png` shows
one row per class.
"""

import logging
import os

import jax
import ml_collections
import numpy as np

from ddpm_jax import files
from ddpm_jax import images as images_lib
from ddpm_jax import inference
from ddpm_jax import sampler_table
from ddpm_jax import sampling
from ddpm_jax import streams


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs `--mode=sample`; returns the path of the written .npz."""
  im = inference.load_inference_model(config, workdir)
  name = inference.sampler_name(config, im.step)
  samples_dir = os.path.join(files.absolute(workdir), 'samples')
  images = inference.generate_samples(
    config, im, config.sampling.num_samples, os.path.join(samples_dir, name)
  )
  path = os.path.join(samples_dir, f'{name}.npz')
  arrays = {'images': images}
  if im.model.num_classes:
    arrays['labels'] = inference.class_labels(config, len(images))
  if jax.process_index() == 0:
    files.save_npz(path, **arrays)
    scale = images_lib.readable_upscale(im.image_shape[0])
    images_lib.save_png(
      images_lib.make_grid(images[:64]), os.path.join(samples_dir, f'{name}.png'), upscale=scale
    )
    if 'labels' in arrays:
      images_lib.save_png(
        images_lib.class_grid(images, arrays['labels']),
        os.path.join(samples_dir, f'{name}_classes.png'),
        upscale=scale,
      )
    if config.sampling.figures and (
      inference.kind_of(config) == 'edm' or config.sampling.sampler == 'distilled'
    ):
      # They follow the teacher's ancestral chains, which neither an EDM model nor a student has.
      logging.info('No figures: the progressive and interpolation figures follow DDPM chains.')
    elif config.sampling.figures:
      save_figures(config, im, samples_dir, name)
  logging.info('Wrote %d samples of shape %s to %s.', len(images), images.shape[1:], path)
  return path


def save_figures(
  config: ml_collections.ConfigDict, im: inference.InferenceModel, samples_dir: str, name: str
) -> None:
  """The paper's progressive-generation (Fig. 6) and interpolation (Fig. 8) figures.

  A class-conditional model draws both of the first class of `sampling.class_labels`.
  """
  kw = inference.model_output_options(config)
  conditional = im.model.num_classes > 0
  label = inference.class_labels(config, 1)[0] if conditional else None

  def model_fn(batch):
    """The model for a figure of `batch` images, all of class `label` where there are classes."""
    labels = np.full((batch,), label, np.int32) if conditional else None
    return inference.sampling_model_fn(
      im.model,
      im.ema_params,
      model_var_type=kw['model_var_type'],
      labels=labels,
      guidance_scale=config.sampling.guidance_scale if conditional else None,
    )

  key = streams.key(config.seed, streams.Stream.FIGURE)
  num_timesteps = im.diffusion.num_timesteps
  every = max(num_timesteps // 10, 1)
  while num_timesteps % every:
    every -= 1
  progressive = jax.jit(
    lambda k: sampling.p_sample_loop_progressive(
      im.diffusion, model_fn(4), (4,) + im.image_shape, k, every=every, **kw
    )
  )
  _, snapshots = progressive(key)
  # Rows: 4 samples; columns: predicted x0 as t goes from T to 0.
  pred_x0 = np.asarray(snapshots['pred_x0'])  # [S, 4, H, W, C]
  tiles = np.transpose(pred_x0, (1, 0, 2, 3, 4)).reshape((-1,) + im.image_shape)
  images_lib.save_png(
    images_lib.make_grid(images_lib.to_uint8(tiles), num_columns=pred_x0.shape[0]),
    os.path.join(samples_dir, f'{name}_progressive.png'),
    upscale=images_lib.readable_upscale(im.image_shape[0]),
  )

  # Interpolation between two images drawn by DDIM (the config's eta and skip), decoded from t = T/2.
  ddim = sampler_table.keywords('ddim', config.sampling)
  pair = np.asarray(
    jax.jit(
      lambda k: sampling.ddim_sample_loop(
        im.diffusion,
        model_fn(2),
        (2,) + im.image_shape,
        k,
        num_steps=min(50, num_timesteps),
        **ddim,
        **kw,
      )
    )(jax.random.fold_in(key, 1))
  )
  lams = np.linspace(0.0, 1.0, 8)
  mixed = jax.jit(
    lambda k: sampling.interpolate(
      im.diffusion, model_fn(1), pair[:1], pair[1:], k, t=num_timesteps // 2, lam=lams, **kw
    )
  )(jax.random.fold_in(key, 2))
  row = np.concatenate([pair[:1], np.asarray(mixed)[:, 0], pair[1:]])
  images_lib.save_png(
    images_lib.make_grid(images_lib.to_uint8(row), num_columns=len(row)),
    os.path.join(samples_dir, f'{name}_interpolation.png'),
    upscale=images_lib.readable_upscale(im.image_shape[0]),
  )
