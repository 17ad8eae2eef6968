"""The training loop: `train_and_evaluate(config, workdir)`.

Reads the whole story top to bottom: validate the config, build the model and
the process, restore or create the state, then loop: assemble a global batch
from each host's slice, run `steps_per_call` jitted steps, and at their
intervals log, draw a sample grid from the EMA parameters and checkpoint.
Re-running with the same workdir resumes from the newest committed
checkpoint; data order and randomness depend only on (seed, step), so a
resumed run continues exactly as an uninterrupted one would.
"""

import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import generate
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import train_state as train_state_lib
from ddpm_jax.models import unet_from_config

# Sections that must match between a checkpoint and the config resuming it:
# a different network or process would silently train something else.
_MUST_MATCH_ON_RESUME = ('model', 'diffusion')
# fold_in constants that keep the init and grid keys apart from step keys.
_INIT_KEY = 2**31 - 1
_GRID_KEY = 2**31 - 2


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite steps, a workdir in use, a mismatch)."""


def build_model_and_diffusion(config: ml_collections.ConfigDict):
  """The U-Net, the diffusion process and the model's input shape (H, W, C)."""
  channels = config.data.num_channels
  learned_variance = config.diffusion.model_var_type in ('learned', 'learned_range')
  model = unet_from_config(config.model, out_channels=channels * (2 if learned_variance else 1))
  d = diffusion_lib.make_diffusion(
      config.diffusion.beta_schedule, config.diffusion.num_timesteps,
      config.diffusion.beta_start, config.diffusion.beta_end)
  return model, d, (config.data.image_size, config.data.image_size, channels)


def abstract_train_state(model, config, image_shape, mesh) -> Any:
  """Shapes, dtypes and (replicated) shardings of the state, without allocating it."""
  abstract = jax.eval_shape(
      functools.partial(train_state_lib.create_train_state, model, config,
                        image_shape=image_shape), jax.random.key(0))
  replicated = sharding_lib.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)


def check_resume_compatible(saved_config: Dict[str, Any], config: ml_collections.ConfigDict,
                            workdir: str) -> None:
  """Raises TrainingError if the checkpoint was made with another model or process."""
  current = json.loads(config.to_json_best_effort())
  differences = []
  for section in _MUST_MATCH_ON_RESUME:
    saved, now = saved_config.get(section, {}), current.get(section, {})
    for key in sorted(set(saved) | set(now)):
      if saved.get(key) != now.get(key):
        differences.append(f'{section}.{key}: checkpoint has {saved.get(key)!r}, '
                           f'config has {now.get(key)!r}')
  if differences:
    raise TrainingError(
        f'The checkpoint in {workdir} was made with a different configuration:\n  ' +
        '\n  '.join(differences) + '\nUse a new --workdir, or the original config.')


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on the workdir; a second trainer is refused."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, '.train.lock')
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise TrainingError(f'{workdir} is in use by another trainer (it holds {path}); '
                          'stop it first or use another --workdir.') from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _PreemptionFlag:
  """Set by SIGTERM; the loop checkpoints at the next step and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      logging.warning('Received signal %d: saving a checkpoint, then exiting.', signum)
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread (e.g. a test runner thread).
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _stack_batches(iterator, k: int) -> Dict[str, np.ndarray]:
  batches = [next(iterator) for _ in range(k)]
  return {key: np.stack([b[key] for b in batches]) for key in ('image',)}


def _is_due(step: int, every: int, last_step: int) -> bool:
  return every > 0 and (step % every == 0 or step == last_step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains (or resumes training) until `config.training.num_train_steps`.

  Args:
    config: the experiment config (see configs/default.py).
    workdir: checkpoints, TensorBoard logs and sample grids go here.

  Returns:
    The metrics of the last log step, as floats (empty if nothing ran).
  """
  mesh = sharding_lib.make_mesh()
  config_validation.validate(config, num_devices=mesh.devices.size)
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0
  lock = workdir_lock(workdir) if is_chief else contextlib.nullcontext()
  with lock, _PreemptionFlag() as preemption:
    return _train(config, workdir, mesh, preemption, is_chief)


def _train(config, workdir, mesh, preemption, is_chief) -> Dict[str, float]:
  tc = config.training
  model, d, image_shape = build_model_and_diffusion(config)
  config_json = config.to_json_best_effort()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    max_to_keep=tc.keep_checkpoints)

  # Restore or create the state. A checkpoint that exists is never ignored.
  abstract = abstract_train_state(model, config, image_shape, mesh)
  if ckpt.latest_step() is not None:
    check_resume_compatible(ckpt.restore_config(), config, workdir)
    state, start_step = ckpt.restore(abstract)
    logging.info('Resumed from step %d in %s.', start_step, ckpt.directory)
  else:
    init = jax.jit(functools.partial(train_state_lib.create_train_state, model, config,
                                     image_shape=image_shape),
                   out_shardings=sharding_lib.replicated(mesh))
    state = init(jax.random.fold_in(jax.random.key(config.seed), _INIT_KEY))
    start_step = 0
    if is_chief:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config_json)
  if int(state.step) != start_step:
    raise TrainingError(f'Checkpoint {start_step} holds a state at step {int(state.step)}.')

  k = tc.steps_per_call
  seed_key = jax.random.key(config.seed)
  # From the state itself: its static parts (apply_fn, tx) must match exactly.
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  train_fn = jax.jit(
      functools.partial(train_state_lib.train_steps, diffusion=d, config=config),
      in_shardings=(state_sharding, sharding_lib.batch_sharded(mesh, 1),
                    sharding_lib.replicated(mesh)),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=0)
  sample_fn = None
  if tc.sample_every_steps > 0:
    sample_fn = generate.make_sample_fn(
        model, d, config, (tc.num_sample_images,) + image_shape,
        sampler=config.sampling.grid_sampler, num_steps=config.sampling.grid_num_steps,
        mesh=mesh)

  data = input_pipeline.make_train_iterator(
      config, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(json.loads(config_json)).items()})

  last_step = tc.num_train_steps
  step = start_step
  metric_sums, metric_count = None, 0
  last_metrics: Dict[str, float] = {}
  timer_step, timer_time = step, time.time()
  logging.info('Training %s from step %d to %d on %d device(s), global batch %d.',
               config.data.dataset, step, last_step, mesh.devices.size, tc.batch_size)
  try:
    while step < last_step:
      if preemption.requested or ckpt.reached_preemption(step):
        logging.warning('Preempted at step %d: checkpointing and exiting.', step)
        ckpt.save(step, state, config_json)
        ckpt.wait()
        break
      batch = sharding_lib.host_to_global(_stack_batches(data, k), mesh, leading_axes=1)
      state, metrics = train_fn(state, batch, seed_key)
      step += k
      # Metrics stay on device until a log step.
      summed = jax.tree.map(jnp.sum, metrics)
      metric_sums = summed if metric_sums is None else jax.tree.map(jnp.add, metric_sums, summed)
      metric_count += k

      if _is_due(step, tc.log_every_steps, last_step):
        sums = jax.device_get(metric_sums)
        nonfinite_in_a_row = int(state.nonfinite_in_a_row)
        last_metrics = {name: float(v) / metric_count for name, v in sums.items()}
        now = time.time()
        steps_per_sec = (step - timer_step) / max(now - timer_time, 1e-9)
        last_metrics['steps_per_sec'] = steps_per_sec
        last_metrics['skipped_steps'] = metric_count - sums['finite']
        writer.write_scalars(step, last_metrics)
        eta = (last_step - step) / max(steps_per_sec, 1e-9)
        logging.info('step %d/%d (%.1f%%)  loss %.5f  grad_norm %.3f  %.2f steps/s  ETA %s',
                     step, last_step, 100.0 * step / last_step, last_metrics['loss'],
                     last_metrics['grad_norm'], steps_per_sec, _format_seconds(eta))
        metric_sums, metric_count = None, 0
        timer_step, timer_time = step, now
        if nonfinite_in_a_row >= tc.max_consecutive_nonfinite:
          raise TrainingError(
              f'{nonfinite_in_a_row} training steps in a row had a non-finite loss or gradient '
              f'(stopped at step {step}; limit training.max_consecutive_nonfinite='
              f'{tc.max_consecutive_nonfinite}). The last checkpoint holds finite values; lower '
              'the learning rate or check the data.')

      if sample_fn is not None and _is_due(step, tc.sample_every_steps, last_step):
        # The same key every time, so successive grids show the same samples improving.
        samples = sample_fn(state.ema_params, jax.random.fold_in(seed_key, _GRID_KEY))
        grid = images_lib.make_grid(images_lib.to_uint8(jax.device_get(samples)))
        if is_chief:
          images_lib.save_png(grid, os.path.join(workdir, 'samples', f'step_{step:08d}.png'))
        writer.write_images(step, {'samples': grid[None]})

      if _is_due(step, tc.checkpoint_every_steps, last_step):
        ckpt.save(step, state, config_json)
    writer.flush()
    ckpt.wait()
  finally:
    ckpt.close()
    writer.close()
  return last_metrics


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return flat


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}'
