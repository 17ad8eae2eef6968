"""FID during training: logged at its steps, and the training itself left bit for bit alone."""

import functools
import glob
import os
import shutil

import pytest
import tensorflow as tf

from ddpm_jax import train
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import frechet
from trainer_harness import assert_states_equal
from trainer_harness import read_metrics
from trainer_harness import restore
from trainer_harness import tiny_config
from trainer_harness import write_fake_fashion_mnist


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  write_fake_fashion_mnist(str(root / 'idx'))
  return str(root / 'idx'), str(root / 'tfds')


@pytest.fixture
def fid_cache(monkeypatch, tmp_path):
  """A private statistics cache, and the distance by eigh (sqrtm of 2048 x 2048 takes half a
  minute on 2 cores; eigh gives the same value)."""
  cache = tmp_path / 'fid_cache'
  monkeypatch.setenv(fid.CACHE_ENV, str(cache))
  exact = frechet.frechet_distance
  monkeypatch.setattr(frechet, 'frechet_distance', functools.partial(exact, method='eigh'))
  return cache


def _tensorboard_tags(workdir):
  tags = set()
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


def test_fid_is_logged_at_its_steps_and_training_stays_bitwise(data_dirs, tmp_path, fid_cache):
  # 8 samples against the fake test split's 16 images at steps 2 and 4; step 2 is no log step,
  # so its FID waits for step 4's write.
  config = tiny_config(
    data_dirs,
    num_train_steps=4,
    log_every_steps=4,
    checkpoint_every_steps=2,
    sample_every_steps=0,
    fid_every_steps=2,
    fid_num_samples=8,
  )
  config.eval.fid_reference_split = 'test'
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)
  records = read_metrics(straight)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert [r['step'] for r in records if 'fid' in r] == [2, 4]
  assert all(0 < r['fid'] < float('inf') for r in records if 'fid' in r)
  assert {'fid', 'fid_sampling_seconds', 'fid_features_seconds'} <= _tensorboard_tags(straight)
  # The reference statistics were computed once, into the cache.
  stats = fid.statistics_path('fashion_mnist_local-resize', 'test', 16, None, str(fid_cache))
  assert os.path.exists(stats)

  # Killed after step 2's checkpoint and resumed: the same FID at step 4 and the same state.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns('events.*', '.train.lock'))
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  train.train_and_evaluate(config, resumed)
  assert read_metrics(resumed) == records
  assert_states_equal(restore(resumed, config), restore(straight, config))

  # Without FID: the same state and per-step metrics, so FID drew neither data nor keys of training.
  config.training.fid_every_steps = 0
  plain = str(tmp_path / 'plain')
  train.train_and_evaluate(config, plain)
  assert read_metrics(plain) == [{k: v for k, v in r.items() if k != 'fid'} for r in records]
  assert_states_equal(restore(plain, config), restore(straight, config))
