"""The real training loop on the tiny config, through the real data pipeline."""

import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import inference
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import streams
from ddpm_jax import train
from ddpm_jax import train_state as train_state_lib
from trainer_harness import restore as params_of
from trainer_harness import tiny_config as make_config
from trainer_harness import write_fake_fashion_mnist


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  write_fake_fashion_mnist(str(root / 'idx'))
  return str(root / 'idx'), str(root / 'tfds')


def test_train_writes_checkpoints_samples_and_resumes(data_dirs, tmp_path):
  workdir = str(tmp_path / 'run')
  config = make_config(data_dirs)
  metrics = train.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics['loss'])
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  assert ckpt.all_steps() == [2, 4, 6]
  ckpt.close()
  assert os.path.exists(os.path.join(workdir, 'samples', 'step_00000006.png'))
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['model']['ch'] == config.model.ch

  # Same command with more steps resumes at 6 rather than starting over.
  config.training.num_train_steps = 8
  train.train_and_evaluate(config, workdir)
  state = params_of(workdir, config)
  assert int(state.step) == 8


def test_resumed_run_equals_uninterrupted_run(data_dirs, tmp_path):
  # Steps 0..4 in one go, against 0..2 then a restart for 2..4: same bits.
  config = make_config(data_dirs, num_train_steps=4, sample_every_steps=0)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  config.training.num_train_steps = 2
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  config.training.num_train_steps = 4
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  a = params_of(str(tmp_path / 'straight'), config)
  b = params_of(str(tmp_path / 'resumed'), config)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.ema_params, b.ema_params)
  jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


def test_steps_per_call_matches_single_steps(data_dirs, tmp_path):
  config = make_config(
    data_dirs, num_train_steps=4, sample_every_steps=0, checkpoint_every_steps=4, log_every_steps=4
  )
  train.train_and_evaluate(config, str(tmp_path / 'k1'))
  config.training.steps_per_call = 2
  train.train_and_evaluate(config, str(tmp_path / 'k2'))
  a, b = params_of(str(tmp_path / 'k1'), config), params_of(str(tmp_path / 'k2'), config)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), a.params, b.params
  )


def _tiny_state_and_batch(config, batch_size):
  model, d, image_shape = inference.build_model_and_diffusion(config)
  # Jitted (at the session's lowest optimisation level): about 4x quicker than running it eagerly.
  create = jax.jit(
    functools.partial(train_state_lib.create_train_state, model, config, image_shape=image_shape)
  )
  state = create(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, batch_size) + image_shape, minval=-1, maxval=1)
  batches = {'image': images}
  if config.model.num_classes:
    batches['label'] = jax.random.randint(jax.random.key(2), (2, batch_size), 0, 10)
  return state, d, batches


@pytest.mark.parametrize('num_classes', [0, 10])
def test_four_devices_match_one_device(data_dirs, num_classes):
  config = make_config(data_dirs)
  config.model.dropout = 0.0
  config.model.num_classes = num_classes  # 10: labels and label dropout split four ways.
  state, d, batches = _tiny_state_and_batch(config, 8)
  step = functools.partial(train_state_lib.train_steps, diffusion=d, config=config)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = sharding_lib.make_mesh(devices)
    rep = sharding_lib.replicated(mesh)
    fn = jax.jit(
      step, in_shardings=(rep, sharding_lib.batch_sharded(mesh, 1), rep), out_shardings=(rep, rep)
    )
    placed = jax.device_put(batches, sharding_lib.batch_sharded(mesh, 1))
    new_state, metrics = fn(jax.device_put(state, rep), placed, jax.random.key(7))
    results.append((jax.device_get(new_state.params), jax.device_get(metrics['loss'])))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
    results[0][0],
    results[1][0],
  )


def test_label_dropout_replaces_the_given_fraction_by_the_null_label():
  labels = jnp.arange(200_000, dtype=jnp.int32) % 10
  key = jax.random.key(4)
  dropped = np.asarray(train_state_lib.drop_labels(labels, key, 0.1, 10))
  is_null = dropped == 10
  # Within 4.5 standard errors of 0.1 (SE = sqrt(0.1 * 0.9 / n) = 6.7e-4).
  assert abs(is_null.mean() - 0.1) < 4.5 * np.sqrt(0.09 / len(labels)), is_null.mean()
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
  assert not (np.asarray(train_state_lib.drop_labels(labels, key, 0.0, 10)) == 10).any()
  assert (np.asarray(train_state_lib.drop_labels(labels, key, 1.0, 10)) == 10).all()


def test_train_step_drops_labels_on_their_own_stream(data_dirs):
  config = make_config(data_dirs)
  config.model.num_classes = 10
  config.model.class_dropout = 0.5
  _, d, _ = inference.build_model_and_diffusion(config)
  seen = []

  def recording_model(variables, x, t, y, **kwargs):
    # A one-parameter stand-in for the U-Net, quick outside jit: only the labels matter here.
    del t, kwargs
    seen.append(np.asarray(y))
    return x * variables['params']['w']

  params = {'w': jnp.ones(())}
  state = train_state_lib.TrainState.create(
    apply_fn=recording_model,
    params=params,
    tx=train_state_lib.make_optimizer(config.optim),
    ema_params=params,
    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
  ).replace(step=jnp.asarray(0, jnp.int32))
  batch = {
    'image': jnp.zeros((64, 16, 16, 1)),
    'label': jax.random.randint(jax.random.key(2), (64,), 0, 10),
  }
  rng = jax.random.key(11)
  train_state_lib.train_step(state, batch, rng, diffusion=d, config=config)
  # The step's key folded with the stream's id: the timestep, noise and dropout keys are untouched.
  label_rng = jax.random.fold_in(rng, int(streams.Stream.LABEL_DROPOUT))
  expected = train_state_lib.drop_labels(batch['label'], label_rng, 0.5, 10)
  np.testing.assert_array_equal(seen[0], np.asarray(expected))
  assert 0 < (seen[0] == 10).sum() < 64


def test_loss_falls(data_dirs):
  config = make_config(data_dirs)
  config.model.dropout = 0.0
  config.optim.learning_rate = 2e-3
  state, d, _ = _tiny_state_and_batch(config, 16)
  images = jax.random.uniform(jax.random.key(1), (40, 16, 16, 16, 1), minval=-1, maxval=1)
  images = jnp.round(images) * 0.8  # A simple, learnable distribution.
  # One compiled step, called 40 times (train_steps unrolls its K steps).
  fn = jax.jit(functools.partial(train_state_lib.train_step, diffusion=d, config=config))
  losses = []
  for i in range(images.shape[0]):
    state, metrics = fn(state, {'image': images[i]}, jax.random.key(i))
    losses.append(float(metrics['loss']))
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  assert losses[-10:].mean() < 0.7 * losses[:5].mean(), losses


def test_nonfinite_step_is_skipped(data_dirs):
  config = make_config(data_dirs)
  config.optim.warmup_steps = 0  # Else the first applied update has learning rate 0.
  state, d, batches = _tiny_state_and_batch(config, 4)
  poisoned = batches['image'].at[0, 0, 0, 0, 0].set(jnp.nan)
  fn = jax.jit(functools.partial(train_state_lib.train_steps, diffusion=d, config=config))
  skipped, metrics = fn(state, {'image': poisoned[:1]}, jax.random.key(3))
  assert float(metrics['finite'][0]) == 0.0
  assert int(skipped.step) == 1 and int(skipped.nonfinite_in_a_row) == 1
  for before, after in (
    (state.params, skipped.params),
    (state.opt_state, skipped.opt_state),
    (state.ema_params, skipped.ema_params),
  ):
    jax.tree.map(np.testing.assert_array_equal, before, after)
  # A finite step afterwards is applied and resets the counter.
  applied, metrics = fn(skipped, {'image': batches['image'][1:]}, jax.random.key(3))
  assert float(metrics['finite'][0]) == 1.0 and int(applied.nonfinite_in_a_row) == 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), applied.params, state.params)
  # Nearly all: a few parameters (e.g. attention's key bias, to which softmax
  # is invariant) have exactly zero gradient.
  assert np.mean(jax.tree.leaves(changed)) > 0.9


def test_bad_batch_size_is_rejected_before_work():
  config = tiny.get_config()
  config.training.batch_size = 6
  with pytest.raises(config_validation.ConfigError, match='does not divide by the 4 devices'):
    config_validation.validate(config, num_devices=4)


def test_mismatched_checkpoint_config_is_refused(data_dirs, tmp_path):
  workdir = str(tmp_path / 'run')
  config = make_config(data_dirs, num_train_steps=2, sample_every_steps=0)
  train.train_and_evaluate(config, workdir)
  config.model.ch = 64
  config.training.num_train_steps = 4
  with pytest.raises(train.TrainingError, match='model.ch: checkpoint has 32, config has 64'):
    train.train_and_evaluate(config, workdir)
