"""`--mode=distill`: the step against the distillation loss, the rounds, resume, the students.

The step is checked against `distillation.loss` on the round's own grid (the
trainer draws its levels from the finest grid by stride), the round boundary
against Salimans & Ho's hand-over (the student's EMA becomes the teacher and
the new student, with a fresh optimizer), and the real loop, preempted
in-process and killed in a subprocess, against an uninterrupted distillation,
bit for bit, as tests/test_reliability.py checks training. Sampling a student
through `inference` is checked against `distillation.sample` on its own
unguided conditional denoiser: one call a step.
"""

import functools
import os
import re
import shutil
import signal
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trainer_harness as th
from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import distill
from ddpm_jax import distillation
from ddpm_jax import errors
from ddpm_jax import inference
from ddpm_jax import input_pipeline
from ddpm_jax import sample
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import streams
from ddpm_jax import train

# A one-level 8x8 U-Net (as tests/test_edm_training.py's): fast to compile.
MICRO = {'data.image_size': 8, 'model.ch_mult': (1,), 'model.attn_resolutions': ()}
MICRO_FLAGS = [
  '--config.data.image_size=8',
  '--config.model.ch_mult=(1,)',
  '--config.model.attn_resolutions=()',
]
# Two rounds of two steps: students of 2 and 1 steps from a 4-step DDIM teacher.
DISTILL = {
  'distill.teacher_steps': 4,
  'distill.num_steps': 1,
  'distill.steps_per_round': 2,
  'distill.batch_size': 8,
  'distill.learning_rate': 1e-3,
  'distill.warmup_steps': 0,
  'distill.ema_decay': 0.5,
  'distill.log_every_steps': 1,
  'distill.checkpoint_every_steps': 2,
  'sampling.guidance_scale': 2.0,
}
TEACHER = dict(num_train_steps=2, checkpoint_every_steps=2, log_every_steps=1, sample_every_steps=0)


def _flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def _config(data_dirs, **extra):
  config = th.conditional(th.tiny_config(data_dirs, **TEACHER))
  config.update_from_flattened_dict({**MICRO, **DISTILL, **extra})
  return config


def _restore_distill(workdir, config):
  """The DistillState of W/distill's newest checkpoint."""
  model, _, image_shape = inference.build_model_and_diffusion(config)
  mesh = sharding_lib.make_mesh()
  abstract = distill.abstract_state(model, distill.run_config(config), image_shape, mesh)
  ckpt = checkpointing.Checkpointer(
    os.path.join(workdir, inference.DISTILL_DIR, 'checkpoints'), read_only=True
  )
  try:
    state, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return state


def _assert_distill_states_equal(a, b):
  th.assert_states_equal(a, b)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(a.teacher_params),
    jax.device_get(b.teacher_params),
  )


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """A trained (2-step) class-conditional teacher: (config, data dirs, workdir)."""
  root = tmp_path_factory.mktemp('distill')
  data_dirs = th.make_data(str(root / 'data'))
  config = _config(data_dirs)
  workdir = str(root / 'teacher')
  train.train_and_evaluate(config, workdir)
  return config, data_dirs, workdir


def _copy(workdir, path):
  shutil.copytree(workdir, path)
  os.remove(os.path.join(path, '.train.lock'))
  return str(path)


# ---------------------------------------------------------------------------
# The step.


def _micro_state(config, seed=0):
  model, d, image_shape = inference.build_model_and_diffusion(config)
  rc = distill.run_config(config)
  key = jax.random.key(seed)
  params = distill._new_state(model, rc, image_shape, key).params
  # Perturbed away from the initialisation, so that every branch moves the output.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(
    tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )
  return model, d, image_shape, rc, distill._new_state(model, rc, image_shape, key, params)


@pytest.mark.parametrize('round_index', [0, 1])
def test_a_step_minimises_the_rounds_distillation_loss(teacher, round_index):
  config = teacher[0]
  model, d, image_shape, rc, state = _micro_state(config)
  state = state.replace(step=jnp.asarray(round_index * rc.distill.steps_per_round + 1, jnp.int32))
  batch = {
    'image': jax.random.uniform(jax.random.key(5), (8,) + image_shape, minval=-1, maxval=1),
    'label': jnp.arange(8, dtype=jnp.int32) % 10,
  }
  rng = jax.random.key(9)
  levels = distill.finest_levels(rc, d)
  denoiser = lambda *a, **k: inference.params_denoiser(rc, model, d, *a, **k)
  step = jax.jit(
    functools.partial(distill.distill_step, denoiser=denoiser, levels=levels, config=rc)
  )
  _, metrics = step(state, batch, rng)

  # The same draws, on the round's teacher grid (every 2^round-th level of the finest).
  level_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  teacher_levels = levels[:: 2**round_index]
  num_student_steps = (len(teacher_levels) - 1) // 2
  index = jax.random.randint(level_rng, (8,), 0, num_student_steps)
  noise = jax.random.normal(noise_rng, batch['image'].shape)

  def student(x, sigma, labels):
    return denoiser(state.params, x, sigma, labels, dropout_rng=dropout_rng)

  def guided_teacher(x, sigma, labels):
    return denoiser(state.teacher_params, x, sigma, labels, guidance_scale=2.0)

  expected = distillation.loss(
    student, guided_teacher, batch['image'], noise, index, teacher_levels, batch['label']
  )
  np.testing.assert_allclose(metrics['loss'], jnp.mean(expected), rtol=1e-5)
  assert metrics['finite'] == 1.0


def test_a_round_ends_with_the_students_ema_as_teacher_and_new_student(teacher):
  config = teacher[0]
  model, d, image_shape, rc, state = _micro_state(config)
  spr = rc.distill.steps_per_round
  ema = jax.tree.map(lambda p: p + 0.01, state.params)
  state = state.replace(step=jnp.asarray(spr, jnp.int32), ema_params=ema)
  # Non-zero optimizer moments that the new round must drop.
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
  batch = {
    'image': jnp.zeros((8,) + image_shape),
    'label': jnp.zeros((8,), jnp.int32),
  }
  denoiser = lambda *a, **k: inference.params_denoiser(rc, model, d, *a, **k)
  step = functools.partial(
    distill.distill_step, denoiser=denoiser, levels=distill.finest_levels(rc, d), config=rc
  )
  new, _ = jax.jit(step)(state, batch, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, new.teacher_params, ema)
  # The new student is the EMA after one Adam step from fresh moments, which moves each
  # parameter by at most the learning rate (the old parameters are 0.01 away).
  lr = rc.distill.learning_rate
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1.01 * lr), new.params, ema
  )
  # One update from a fresh optimizer state: its step counts restart.
  counts = [x for x in jax.tree.leaves(new.opt_state) if x.dtype == jnp.int32]
  assert counts and all(int(c) == 1 for c in counts), counts


# ---------------------------------------------------------------------------
# The real loop, interrupted.


@pytest.fixture(scope='module')
def chain(teacher, tmp_path_factory):
  """An uninterrupted distillation, and one preempted after step 1, killed at 3, then finished."""
  config, data_dirs, workdir = teacher
  root = tmp_path_factory.mktemp('distill_chain')
  reference = _copy(workdir, root / 'reference')
  interrupted = _copy(workdir, root / 'interrupted')
  distill.distill(config, reference)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      input_pipeline, 'make_train_iterator', th.preempt_at(0, input_pipeline.make_train_iterator)
    )
    distill.distill(config, interrupted)
  preempted = th.committed_steps(os.path.join(interrupted, inference.DISTILL_DIR))
  flags = (
    th.config_flags(data_dirs, **TEACHER)
    + th.CONDITIONAL_FLAGS
    + MICRO_FLAGS
    + _flags(DISTILL)
    + ['--mode=distill']
  )
  env = th.child_env(DDPM_TEST_SIGNAL_AT_STEP=f'{int(signal.SIGKILL)}:3')
  killed = th.run_trainer(interrupted, flags, env=env)
  return config, reference, interrupted, preempted, killed


def test_sigterm_commits_a_distillation_at_its_step(chain):
  _, _, _, preempted, _ = chain
  assert preempted == [1]  # Not a checkpoint step: saved because of the signal.


def test_a_killed_distillation_restarted_equals_an_uninterrupted_one_bit_for_bit(chain, caplog):
  config, reference, workdir, _, (code, output) = chain
  assert code == -signal.SIGKILL, output[-5000:]
  with caplog.at_level(logging.INFO):
    distill.distill(config, workdir)
  # From step 2 if the round's checkpoint (saved in the background) was committed before the
  # kill, else from step 1: either way after the 2-step student was saved.
  assert re.search(r'Resumed from step [12] ', caplog.text)
  _assert_distill_states_equal(
    _restore_distill(workdir, config), _restore_distill(reference, config)
  )
  distilled = os.path.join(workdir, inference.DISTILL_DIR)
  assert th.read_metrics(distilled) == th.read_metrics(
    os.path.join(reference, inference.DISTILL_DIR)
  )
  assert [r['step'] for r in th.read_metrics(distilled)] == [1, 2, 3, 4]
  for num_steps in (2, 1):  # Each round's student, as its round ended.
    config = config.copy_and_resolve_references()
    config.sampling.sampler, config.sampling.num_steps = 'distilled', num_steps
    a = inference.load_inference_model(config, workdir).sampling_params
    b = inference.load_inference_model(config, reference).sampling_params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  # A grid of each round's student, one row per class.
  assert sorted(os.listdir(os.path.join(distilled, 'samples'))) == [
    'step_00000002.png',
    'step_00000004.png',
  ]


def test_a_student_samples_in_its_steps_unguided_through_mode_sample(chain, tmp_path):
  config, reference, _, _, _ = chain
  config = config.copy_and_resolve_references()
  config.sampling.sampler, config.sampling.num_steps = 'distilled', 2
  config.sampling.num_samples = config.sampling.batch_size = 4
  path = sample.sample_and_save(config, reference)
  assert os.path.basename(path).startswith('distilled2_teacher4_guidance2_classes-all_step2')
  images = np.load(path)['images']
  # The student on its grid, conditioned on the labels in one call a step (no guidance).
  im = inference.load_inference_model(config, reference)
  labels = inference.class_labels(config, 4)
  net = inference.make_model_fn(im.model, im.sampling_params)
  denoiser = inference.denoiser_of(config, im.diffusion, lambda x, t: net(x, t, labels))
  key = jax.random.fold_in(streams.key(config.seed, streams.Stream.SAMPLE), 0)  # Batch 0's.
  grid = distillation.coarsen(distill.finest_levels(config, im.diffusion), 2)
  direct = distillation.sample(denoiser, grid, (4,) + im.image_shape, key, prior='vp')
  expected = np.clip(np.round((np.asarray(direct) + 1) * 127.5), 0, 255).astype(np.uint8)
  assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


# ---------------------------------------------------------------------------
# Clear errors.


def test_distilling_a_workdir_without_a_trained_model_is_a_clear_error(teacher, tmp_path):
  config = teacher[0]
  with pytest.raises(checkpointing.CheckpointError, match='train first with --mode=train'):
    distill.distill(config, str(tmp_path / 'empty'))
  assert not os.path.exists(tmp_path / 'empty' / inference.DISTILL_DIR)


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'distill.teacher_steps': 6, 'distill.num_steps': 4}, r'power of two'),
    ({'distill.teacher_steps': 256}, r'exceeds the process'),
    ({'distill.warmup_steps': 2}, r'distill.warmup_steps=2 must be in \[0'),
  ],
)
def test_a_config_that_cannot_distil_is_refused_before_any_work(teacher, overrides, message):
  config = teacher[0].copy_and_resolve_references()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(config_validation.ConfigError, match=message):
    distill.distill(config, '/nonexistent/never/read')


def test_a_distillation_resumed_with_other_settings_is_refused(chain):
  config, reference, _, _, _ = chain
  config = config.copy_and_resolve_references()
  config.distill.learning_rate = 5e-4
  with pytest.raises(errors.TrainingError, match='distill.learning_rate'):
    distill.distill(config, reference)
  config.distill.learning_rate = DISTILL['distill.learning_rate']
  config.sampling.guidance_scale = 3.0
  with pytest.raises(errors.TrainingError, match='guided at scale 2.0'):
    distill.distill(config, reference)


def test_sampling_a_student_that_is_not_there_names_those_that_are(chain, teacher):
  config, reference, _, _, _ = chain
  config = config.copy_and_resolve_references()
  config.sampling.sampler, config.sampling.num_steps = 'distilled', 2
  with pytest.raises(checkpointing.CheckpointError, match='distil one first'):
    inference.load_inference_model(config, teacher[2])
  config.sampling.guidance_scale = 3.0
  with pytest.raises(errors.TrainingError, match='guided at 2.0'):
    inference.load_inference_model(config, reference)
  config.sampling.guidance_scale, config.sampling.num_steps = 2.0, 3
  with pytest.raises(config_validation.ConfigError, match="not a student's step count"):
    inference.load_inference_model(config, reference)
