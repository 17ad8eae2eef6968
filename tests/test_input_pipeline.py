"""Tests of the input pipeline on a tiny prepared `fashion_mnist_local`.

Every image tells which example it is and whether it was flipped: train image
i is filled with the value 10 * (i + 1) except for its leftmost column, which
is 255 (so after padding 28 -> 32 that marker sits in column 2, or in column
29 when the image was flipped). Test image j is filled with 10 * j + 5.
"""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from ddpm_jax import input_pipeline
from ddpm_jax.datasets import fashion_mnist_idx as fm

NUM_TRAIN, NUM_TEST = 20, 8
MARKER = 255


def _train_images():
  images = np.repeat(10 * np.arange(1, NUM_TRAIN + 1, dtype=np.uint8), 28 * 28).reshape(
    NUM_TRAIN, 28, 28
  )
  images[:, :, 0] = MARKER
  return images


def _test_images():
  return np.repeat(10 * np.arange(NUM_TEST, dtype=np.uint8) + 5, 28 * 28).reshape(NUM_TEST, 28, 28)


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  """(idx_dir, data_dir) with the tiny dataset prepared into data_dir."""
  idx_dir = tmp_path_factory.mktemp('idx')
  for split, images in (('train', _train_images()), ('test', _test_images())):
    images_name, labels_name = fm.IDX_FILES[split]
    fm.write_idx_gz(os.path.join(idx_dir, images_name), images)
    fm.write_idx_gz(
      os.path.join(idx_dir, labels_name), (np.arange(len(images)) % 10).astype(np.uint8)
    )
  data_dir = tmp_path_factory.mktemp('tfds')
  input_pipeline.get_builder(_config(idx_dir, data_dir).data)  # prepares
  return idx_dir, data_dir


def _config(idx_dir, data_dir, *, batch_size=4, seed=0, **data_overrides):
  data = dict(
    dataset='fashion_mnist_local',
    data_dir=str(data_dir),
    manual_dir=str(idx_dir),
    train_split='train',
    eval_split='test',
    image_size=32,
    num_channels=1,
    resize_method='pad',
    random_flip=True,
    shuffle_buffer=60_000,
  )
  data.update(data_overrides)
  return ml_collections.ConfigDict(dict(seed=seed, training=dict(batch_size=batch_size), data=data))


@pytest.fixture
def make_config(dirs):
  return lambda **kwargs: _config(*dirs, **kwargs)


def _to_uint8(images):
  return np.round((images + 1.0) * 127.5).astype(np.int64)


def _train_ids(batch):
  """Indices of the train examples in a padded batch [B, 32, 32, 1]."""
  return _to_uint8(batch['image'][:, 16, 16, 0]) // 10 - 1


def _flipped(batch):
  """Whether each padded train image in the batch was flipped."""
  pixels = _to_uint8(batch['image'][:, 16, :, 0])
  left, right = pixels[:, 2] == MARKER, pixels[:, 29] == MARKER
  assert np.all(left ^ right)
  return right


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_preprocess_pads_with_black_and_keeps_pixels_exact():
  data = ml_collections.ConfigDict(dict(image_size=32, num_channels=1, resize_method='pad'))
  image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), np.uint8)
  out = input_pipeline.preprocess_image(image, data).numpy()
  assert out.shape == (32, 32, 1) and out.dtype == np.float32
  expected = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  np.testing.assert_array_equal(out[2:30, 2:30], expected)
  border = np.ones((32, 32, 1), bool)
  border[2:30, 2:30] = False
  np.testing.assert_array_equal(out[border], -1.0)


def test_resize_and_center_crop():
  data = ml_collections.ConfigDict(dict(image_size=32, num_channels=3, resize_method='resize'))
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)
  # Resizing to the size an image already has changes nothing.
  np.testing.assert_array_equal(input_pipeline.resize_image(image, data).numpy(), image)
  data.resize_method = 'center_crop'
  tall = np.random.default_rng(2).integers(0, 256, (40, 32, 3), np.uint8)
  np.testing.assert_array_equal(input_pipeline.resize_image(tall, data).numpy(), tall[4:36])
  # Cropping 64x48 to its central 48x48 square and shrinking it to 32x32
  # keeps a two-colour split: the crop drops the 8 columns on each side.
  wide = np.zeros((48, 64, 3), np.uint8)
  wide[:, 8:32] = 200
  wide[:, 32:56] = 100
  out = input_pipeline.resize_image(wide, data).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, :15], 200)
  np.testing.assert_array_equal(out[:, 17:], 100)


def test_pad_refuses_images_larger_than_the_target():
  data = ml_collections.ConfigDict(dict(image_size=16, num_channels=1, resize_method='pad'))
  with pytest.raises(tf.errors.InvalidArgumentError, match='larger than'):
    input_pipeline.resize_image(np.zeros((28, 28, 1), np.uint8), data)


def test_unknown_names_are_rejected_with_the_valid_choices(make_config):
  with pytest.raises(ValueError, match='pad, resize, center_crop'):
    input_pipeline.make_train_iterator(make_config(resize_method='crop'))
  with pytest.raises(ValueError, match='cifar10, fashion_mnist_local'):
    input_pipeline.dataset_info(make_config(dataset='fashion_mnist_nope'))


def test_dataset_info(make_config):
  info = input_pipeline.dataset_info(make_config())
  assert info.name == 'fashion_mnist_local/1.0.0'
  assert dict(info.num_examples) == {'train': NUM_TRAIN, 'test': NUM_TEST}
  assert info.source_shape == (28, 28, 1)
  assert info.image_shape == (32, 32, 1)
  with pytest.raises(ValueError, match='but .* has 1-channel images'):
    input_pipeline.dataset_info(make_config(num_channels=3))
  with pytest.raises(ValueError, match='cannot fit 28x28'):
    input_pipeline.dataset_info(make_config(image_size=16))
  with pytest.raises(ValueError, match="Split 'validation' not in"):
    input_pipeline.dataset_info(make_config(eval_split='validation'))


def test_train_batches_are_padded_images_in_unit_range(make_config):
  batch = next(input_pipeline.make_train_iterator(make_config()))
  assert set(batch) == {'image'}
  images = batch['image']
  assert images.shape == (4, 32, 32, 1) and images.dtype == np.float32
  assert images.min() == -1.0 and images.max() == 1.0
  np.testing.assert_array_equal(images[:, :2], -1.0)
  np.testing.assert_array_equal(images[:, :, 30:], -1.0)
  ids = _train_ids(batch)
  for image, i, flipped in zip(images, ids, _flipped(batch)):
    expected = np.full((28, 28), 10 * (i + 1), np.float32)
    expected[:, 27 if flipped else 0] = MARKER
    np.testing.assert_array_equal(image[2:30, 2:30, 0], expected / np.float32(127.5) - 1)


def test_each_epoch_is_a_new_permutation(make_config):
  batches = _take(input_pipeline.make_train_iterator(make_config()), 15)
  ids = np.concatenate([_train_ids(b) for b in batches]).reshape(3, NUM_TRAIN)
  for epoch in ids:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_TRAIN))
  assert not np.array_equal(ids[0], ids[1])
  assert not np.array_equal(ids[0], np.arange(NUM_TRAIN))


def test_epoch_drops_its_last_partial_batch(make_config):
  # 20 examples, batches of 6: 3 batches per epoch, 18 distinct examples.
  iterator = input_pipeline.make_train_iterator(make_config(batch_size=6))
  batches = _take(iterator, 6)
  ids = np.concatenate([_train_ids(b) for b in batches]).reshape(2, 18)
  for epoch in ids:
    assert len(set(epoch)) == 18


def test_resuming_at_a_step_reproduces_the_uninterrupted_stream(make_config):
  config = make_config()
  fresh = _take(input_pipeline.make_train_iterator(config), 12)
  # 5 steps per epoch: step 3 is inside epoch 0, 5 begins epoch 1, 7 is
  # inside it; the resumed streams run across the next epoch boundary.
  for start_step in (3, 5, 7):
    resumed = _take(
      input_pipeline.make_train_iterator(config, start_step=start_step), 12 - start_step
    )
    for expected, got in zip(fresh[start_step:], resumed):
      np.testing.assert_array_equal(got['image'], expected['image'])


def test_seed_sets_the_order(make_config):
  def first_epoch(seed):
    iterator = input_pipeline.make_train_iterator(make_config(seed=seed))
    return np.concatenate([_train_ids(b) for b in _take(iterator, 5)])

  np.testing.assert_array_equal(first_epoch(0), first_epoch(0))
  assert not np.array_equal(first_epoch(0), first_epoch(1))


def test_flips_about_half_the_time_and_vary_across_epochs(make_config):
  batches = _take(input_pipeline.make_train_iterator(make_config()), 50)
  ids = np.concatenate([_train_ids(b) for b in batches])
  flipped = np.concatenate([_flipped(b) for b in batches])
  assert 0.35 < flipped.mean() < 0.65
  # Over 10 epochs each example is shown both ways, not a fixed orientation.
  per_example = [flipped[ids == i] for i in range(NUM_TRAIN)]
  assert sum(0 < f.mean() < 1 for f in per_example) >= NUM_TRAIN - 2
  unflipped = _take(input_pipeline.make_train_iterator(make_config(random_flip=False)), 10)
  assert not np.concatenate([_flipped(b) for b in unflipped]).any()


def test_processes_read_disjoint_shards_that_cover_the_data(make_config):
  config = make_config(batch_size=4)
  epoch_ids = []
  for process_index in range(2):
    iterator = input_pipeline.make_train_iterator(
      config, process_index=process_index, process_count=2
    )
    batches = _take(iterator, 5)  # 10 examples per process, 2 per batch
    assert batches[0]['image'].shape == (2, 32, 32, 1)
    epoch_ids.append(set(np.concatenate([_train_ids(b) for b in batches])))
  assert len(epoch_ids[0]) == len(epoch_ids[1]) == NUM_TRAIN // 2
  assert not epoch_ids[0] & epoch_ids[1]
  assert epoch_ids[0] | epoch_ids[1] == set(range(NUM_TRAIN))
  with pytest.raises(ValueError, match='multiple of the process count 2'):
    input_pipeline.make_train_iterator(make_config(batch_size=5), process_index=0, process_count=2)


@pytest.mark.parametrize(
  'process_count, batch_size, batches_per_process',
  [(1, 3, 3), (3, 3, 3), (2, 6, 2)],
)
def test_eval_counts_every_example_once(
  make_config, process_count, batch_size, batches_per_process
):
  config = make_config()
  seen = []
  for process_index in range(process_count):
    dataset = input_pipeline.make_eval_dataset(
      config, batch_size=batch_size, process_index=process_index, process_count=process_count
    )
    batches = list(dataset)
    assert len(dataset) == len(batches) == batches_per_process
    for first, again in zip(batches, dataset):  # a fixed order
      np.testing.assert_array_equal(first['image'], again['image'])
    for batch in batches:
      assert batch['image'].shape == (batch_size // process_count, 32, 32, 1)
      assert batch['mask'].dtype == bool
      values = _to_uint8(batch['image'][:, 16, 16, 0])
      seen.extend(values[batch['mask']])
      # Padding is zeros and no flips happen in evaluation.
      np.testing.assert_array_equal(batch['image'][~batch['mask']], 0.0)
  assert sorted(seen) == list(10 * np.arange(NUM_TEST) + 5)


def test_load_split_as_uint8_is_at_model_resolution(make_config):
  config = make_config()
  images = input_pipeline.load_split_as_uint8(config, 'train')
  assert images.shape == (NUM_TRAIN, 32, 32, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[:, :2], 0)
  written = _train_images()
  order = images[:, 16, 16, 0] // 10 - 1
  np.testing.assert_array_equal(np.sort(order), np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(images[:, 2:30, 2:30, 0], written[order])
  assert input_pipeline.load_split_as_uint8(config, 'test', limit=5).shape == (5, 32, 32, 1)


def _conditional(config, num_classes=10):
  config.model = ml_collections.ConfigDict(dict(num_classes=num_classes))
  return config


def test_labels_travel_with_their_images_in_order_and_on_resume(make_config):
  # Train example i has label i % 10 (see `dirs`).
  plain = _take(input_pipeline.make_train_iterator(make_config()), 12)
  config = _conditional(make_config())
  labelled = _take(input_pipeline.make_train_iterator(config), 12)
  for expected, batch in zip(plain, labelled):
    assert set(batch) == {'image', 'label'} and batch['label'].dtype == np.int32
    # The same images in the same order as an unconditional run's...
    np.testing.assert_array_equal(batch['image'], expected['image'])
    # ...each with its own label, across epochs (5 steps each).
    np.testing.assert_array_equal(batch['label'], _train_ids(batch) % 10)
  resumed = _take(input_pipeline.make_train_iterator(config, start_step=7), 5)
  for expected, got in zip(labelled[7:], resumed):
    np.testing.assert_array_equal(got['label'], expected['label'])
    np.testing.assert_array_equal(got['image'], expected['image'])
  for process_index in range(2):
    iterator = input_pipeline.make_train_iterator(
      config, process_index=process_index, process_count=2
    )
    for batch in _take(iterator, 6):
      assert batch['label'].shape == (2,)
      np.testing.assert_array_equal(batch['label'], _train_ids(batch) % 10)


def test_eval_batches_carry_labels_for_a_conditional_model(make_config):
  dataset = input_pipeline.make_eval_dataset(_conditional(make_config()), batch_size=3)
  for batch in dataset:
    ids = (_to_uint8(batch['image'][:, 16, 16, 0]) - 5) // 10  # Test image j: 10 j + 5.
    np.testing.assert_array_equal(batch['label'][batch['mask']], ids[batch['mask']] % 10)
    np.testing.assert_array_equal(batch['label'][~batch['mask']], 0)


def test_conditional_model_needs_the_dataset_classes(make_config):
  input_pipeline.dataset_info(_conditional(make_config()))
  with pytest.raises(ValueError, match='model.num_classes is 7 but .* has 10 classes'):
    input_pipeline.dataset_info(_conditional(make_config(), num_classes=7))
