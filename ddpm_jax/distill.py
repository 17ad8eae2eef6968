"""Few-step students: `--mode=distill`, progressive distillation of a trained model.

    python main.py --config=configs/fashion_mnist.py --workdir=W --mode=distill

The teacher is the EMA parameters of W's newest checkpoint, sampled by DDIM on
`distill.teacher_steps` levels (`ddpm_jax/distillation.py` has the math). A
student, initialised from the teacher, learns to take one step where the
teacher takes two; when a round of `distill.steps_per_round` steps ends, its
EMA parameters become the next round's teacher and its next student, with a
fresh optimizer, until a student takes `distill.num_steps` steps. A
class-conditional teacher is distilled as it samples, guided at
`sampling.guidance_scale` (Meng et al. 2023), so its student takes one call
per step for the guided result.

Everything lives in W/distill/: checkpoints, metrics.jsonl, TensorBoard, the
grid of each round's student, and in `students/<N>/` the EMA parameters of
the student that takes N steps, saved as its round ends, which
`sampling.sampler='distilled'` with `sampling.num_steps=N` samples. The loop is
the trainer's (`train.run`), so a distillation resumes bit for bit after a
crash, commits its step on SIGTERM, and runs on gs:// and on every device.
"""

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import distillation
from ddpm_jax import errors
from ddpm_jax import files
from ddpm_jax import inference
from ddpm_jax import input_pipeline
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import streams
from ddpm_jax import throughput as throughput_lib
from ddpm_jax import train
from ddpm_jax import train_state as train_state_lib

Array = jax.Array


class DistillState(train_state_lib.TrainState):
  """The student's train state (parameters, optimizer, EMA) and its round's teacher."""

  teacher_params: Any


def run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config the loop runs a distillation with: `training` and `optim` from `distill`.

  Every round has `distill.steps_per_round` steps; the learning rate warms up
  and decays to 0 by a cosine within each round (the optimizer restarts with
  each student). The grids come at each round's end, FID never.
  """
  dc = config.distill
  rc = config.copy_and_resolve_references()
  rounds = distillation.num_rounds(dc.teacher_steps, dc.num_steps)
  rc.training.batch_size = dc.batch_size
  rc.training.num_train_steps = rounds * dc.steps_per_round
  rc.training.log_every_steps = dc.log_every_steps
  rc.training.checkpoint_every_steps = dc.checkpoint_every_steps
  rc.training.sample_every_steps = dc.steps_per_round
  rc.training.fid_every_steps = 0
  rc.optim.learning_rate = dc.learning_rate
  rc.optim.warmup_steps = dc.warmup_steps
  rc.optim.decay_steps = dc.steps_per_round
  rc.optim.final_lr_fraction = 0.0
  rc.optim.ema_decay = dc.ema_decay
  rc.optim.ema_halflife_images = 0.0
  rc.optim.ema_warmup = False
  return rc


def student_steps(config: ml_collections.ConfigDict, round_index: int) -> int:
  """How many steps the student of round `round_index` (from 0) takes."""
  return config.distill.teacher_steps // 2 ** (round_index + 1)


def finest_levels(config: ml_collections.ConfigDict, d) -> np.ndarray:
  """The first teacher's noise levels (every student's are a subset): float64 [K + 1]."""
  return inference.distill_levels(config, d, config.distill.teacher_steps)


def _new_state(model, rc, image_shape, key, teacher_params=None) -> DistillState:
  """Round 0's state: student, its EMA and the teacher all equal to `teacher_params`."""
  fresh = train_state_lib.create_train_state(model, rc, key, image_shape)
  params = fresh.params if teacher_params is None else teacher_params
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # The loop donates the state: no aliases.
  return DistillState.create(
    apply_fn=fresh.apply_fn,
    params=copy(params),
    tx=fresh.tx,
    ema_params=copy(params),
    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
    teacher_params=copy(params),
  )


def abstract_state(model, rc, image_shape, mesh) -> DistillState:
  """Shapes, dtypes and (replicated) shardings of a distillation's state, without allocating it."""
  abstract = jax.eval_shape(
    functools.partial(_new_state, model, rc, image_shape), jax.random.key(0)
  )
  replicated = sharding_lib.replicated(mesh)
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
  )


def distill_step(
  state: DistillState,
  batch: dict[str, Array],
  rng: Array,
  *,
  denoiser,
  levels: np.ndarray,
  config: ml_collections.ConfigDict,
) -> tuple[DistillState, dict[str, Array]]:
  """One step of the student on a batch; at a round's first step, the student becomes the teacher.

  Args:
    state: the current state (its step says the round).
    batch: {'image': [B, H, W, C] in [-1, 1]}, and 'label' [B] for a conditional model.
    rng: this step's key.
    denoiser: `denoiser(params, x, sigma, labels, guidance_scale) -> D` of the network.
    levels: `finest_levels`, float64 [K + 1].
    config: the run config (`run_config`).

  Returns:
    (new state, metrics) as `train_state.train_step`'s.
  """
  dc = config.distill
  steps_per_round = dc.steps_per_round
  step = state.step
  # Salimans & Ho: each round's student starts as a copy of the last round's, which becomes the
  # teacher; a fresh optimizer state restarts the learning-rate schedule for the round.
  new_round = (step > 0) & (step % steps_per_round == 0)
  state = jax.lax.cond(
    new_round,
    lambda s: s.replace(
      params=s.ema_params,
      teacher_params=s.ema_params,
      opt_state=s.tx.init(s.ema_params),
    ),
    lambda s: s,
    state,
  )
  images = batch['image']
  labels = batch.get('label')
  scale = config.sampling.guidance_scale if labels is not None else None
  round_index = step // steps_per_round
  # Round r's teacher steps on every 2^r-th of the finest levels, its student on every 2^(r+1)-th.
  stride = jnp.left_shift(1, round_index)
  num_student_steps = dc.teacher_steps // (2 * stride)
  level_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  k = jax.random.randint(level_rng, (images.shape[0],), 0, num_student_steps)
  table = jnp.asarray(levels, images.dtype)
  start = 2 * k * stride
  sigma, sigma_mid, sigma_next = (jnp.take(table, start + i * stride) for i in range(3))
  noise = jax.random.normal(noise_rng, images.shape, images.dtype)
  teacher = functools.partial(denoiser, state.teacher_params, guidance_scale=scale)
  x = images + sigma.reshape((-1,) + (1,) * (images.ndim - 1)) * noise
  target, _ = distillation.teacher_target(teacher, x, sigma, sigma_mid, sigma_next, labels)
  target = jax.lax.stop_gradient(target)

  def loss_fn(params):
    student = functools.partial(denoiser, params, guidance_scale=None, dropout_rng=dropout_rng)
    per_example = distillation.weighted_error(student(x, sigma, labels), target, sigma)
    return jnp.mean(per_example)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = train_state_lib.update_state(
    state, grads, grad_norm, finite, config.optim, images.shape[0]
  )
  metrics = dict(
    loss=loss,
    grad_norm=grad_norm,
    learning_rate=train_state_lib.learning_rate_schedule(config.optim)(step % steps_per_round),
    finite=finite.astype(jnp.float32),
  )
  return new_state, metrics


def distill_steps(state, batches, seed_key, **kw):
  """K `distill_step`s in one call, as `train_state.train_steps` runs training's."""
  return train_state_lib.train_steps(state, batches, seed_key, step_fn=distill_step, **kw)


def distill(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, float]:
  """Distils the workdir's trained model (or resumes doing so) into W/distill/.

  Args:
    config: the experiment config of the trained model, with its `distill` block.
    workdir: the trained run's workdir (local or gs://).
    devices: the devices to run on (default: all).

  Returns:
    The metrics of the last log step.

  Raises:
    config_validation.ConfigError: the config cannot distil (nothing was done).
    checkpointing.CheckpointError: the workdir holds no trained model.
    errors.TrainingError: the distillation's checkpoint was made with other settings.
  """
  mesh = sharding_lib.make_mesh(devices)
  config_validation.validate(config, num_devices=mesh.devices.size)
  problems = config_validation.distill_problems(config, num_devices=mesh.devices.size)
  if problems:
    raise config_validation.ConfigError('The config cannot distil:\n  ' + '\n  '.join(problems))
  workdir = files.absolute(workdir)
  # The teacher first: a workdir with no trained model fails here, before anything is written.
  teacher = inference.load_inference_model(config, workdir)
  rc = run_config(config)
  out = os.path.join(workdir, inference.DISTILL_DIR)
  make_job = functools.partial(_job, teacher=teacher, teacher_workdir=workdir)
  return train.run(rc, out, mesh, make_job)


def _check_resume(saved_config: dict[str, Any], *, config, workdir) -> None:
  """A distillation resumes only with its model, process, distillation and guidance."""
  checkpointing.check_resume_compatible(
    saved_config, config, workdir, sections=('model', 'diffusion', 'edm', 'distill')
  )
  saved = (saved_config.get('sampling') or {}).get('guidance_scale')
  if saved != config.sampling.guidance_scale:
    raise errors.TrainingError(
      f'The distillation in {workdir} distils the teacher guided at scale {saved}; the config '
      f'has sampling.guidance_scale={config.sampling.guidance_scale}. Use the same scale, or '
      'remove the distill/ folder to distil again.'
    )


def _job(rc, workdir, mesh, ckpt, is_chief, *, teacher, teacher_workdir) -> train.Job:
  dc = rc.distill
  model, d, image_shape = teacher.model, teacher.diffusion, teacher.image_shape
  restored = train.restore(
    rc,
    workdir,
    mesh,
    ckpt,
    abstract_state(model, rc, image_shape, mesh),
    check_config=functools.partial(_check_resume, config=rc, workdir=workdir),
  )
  input_pipeline.dataset_info(rc)
  if restored is None and is_chief:
    files.write_json(
      os.path.join(workdir, 'teacher.json'),
      {'workdir': teacher_workdir, 'step': teacher.step},
    )
  state, start_step = restored or train.start_state(
    functools.partial(_new_state, model, rc, image_shape, teacher_params=teacher.ema_params),
    mesh,
    streams.key(rc.seed, streams.Stream.INIT),
    rc,
    workdir,
    is_chief,
  )
  levels = finest_levels(rc, d)
  denoiser = functools.partial(inference.params_denoiser, rc, model, d)
  students = checkpointing.Checkpointer(
    os.path.join(workdir, inference.STUDENTS_DIR), max_to_keep=None, async_save=False
  )
  config_json = rc.to_json_best_effort()

  def after_step(step: int, state: DistillState) -> bool:
    if step % dc.steps_per_round:
      return False
    num_steps = student_steps(rc, step // dc.steps_per_round - 1)
    # A rerun of a round after a crash makes the same student, bit for bit: keep the saved one.
    if num_steps not in students.all_steps():
      students.save(num_steps, {'ema_params': state.ema_params}, config_json)
      students.wait()
      logging.info('Saved the %d-step student (step %d).', num_steps, step)
    return True

  grid_key = streams.key(rc.seed, streams.Stream.GRID)
  grid_labels = None
  if rc.model.num_classes > 0:
    grid_labels = inference.class_labels(rc, rc.training.num_sample_images)
  grid_fns = {}

  def grid_fn(state: DistillState) -> Array:
    # The grid comes at a round's end: the student that round made.
    num_steps = student_steps(rc, int(state.step) // dc.steps_per_round - 1)
    if num_steps not in grid_fns:
      grid_fns[num_steps] = inference.make_sample_fn(
        model,
        d,
        rc,
        (rc.training.num_sample_images,) + image_shape,
        sampler='distilled',
        num_steps=num_steps,
        mesh=mesh,
      )
    fn = grid_fns[num_steps]
    if grid_labels is None:
      return fn(state.ema_params, grid_key)
    return fn(state.ema_params, grid_key, grid_labels, rc.sampling.guidance_scale)

  return train.Job(
    state=state,
    start_step=start_step,
    steps_fn=functools.partial(distill_steps, denoiser=denoiser, levels=levels, config=rc),
    grid_fn=grid_fn if rc.training.num_sample_images > 0 else None,
    grid_labels=grid_labels,
    throughput=throughput_lib.for_distillation(
      rc,
      image_shape,
      model.out_ch,
      device_kind=mesh.devices.flat[0].device_kind,
      num_devices=mesh.devices.size,
    ),
    after_step=after_step,
  )
