"""Tests of the `fashion_mnist_local` TFDS builder on small IDX files.

The fixtures are tiny Fashion-MNIST-shaped IDX files (20 train and 8 test
images) written into a temporary directory, so preparing is fast and every
stored image and label is known.
"""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

# Importing the package registers `fashion_mnist_local` with TFDS.
from ddpm_jax.datasets import fashion_mnist_idx as fm

NUM_TRAIN, NUM_TEST = 20, 8


def _write_split_files(directory, split, images, labels):
  images_name, labels_name = fm.IDX_FILES[split]
  fm.write_idx_gz(os.path.join(directory, images_name), images)
  fm.write_idx_gz(os.path.join(directory, labels_name), labels)


def _make_arrays(seed, n):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
  return images, labels


@pytest.fixture(scope='module')
def idx_data(tmp_path_factory):
  """Directory with valid tiny IDX files and the arrays they hold."""
  directory = tmp_path_factory.mktemp('idx')
  arrays = {'train': _make_arrays(0, NUM_TRAIN), 'test': _make_arrays(1, NUM_TEST)}
  for split, (images, labels) in arrays.items():
    _write_split_files(directory, split, images, labels)
  return directory, arrays


@pytest.fixture(scope='module')
def prepared(idx_data, tmp_path_factory):
  """The builder prepared from the tiny files through TFDS's manual_dir."""
  directory, arrays = idx_data
  builder = tfds.builder('fashion_mnist_local', data_dir=tmp_path_factory.mktemp('tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=directory))
  return builder, arrays


def _assert_split_matches(builder, split, images, labels):
  loaded = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  assert loaded['image'].shape == (len(images), 28, 28, 1)
  assert loaded['image'].dtype == np.uint8
  # TFDS stores examples in hashed-key order: match them up by content.
  by_bytes = {image.tobytes(): label for image, label in zip(images, labels)}
  assert len(by_bytes) == len(images)
  seen = set()
  for image, label in zip(loaded['image'], loaded['label']):
    key = image[:, :, 0].tobytes()
    assert key in by_bytes
    assert label == by_bytes[key]
    seen.add(key)
  assert seen == set(by_bytes)


def test_idx_writer_produces_the_idx_layout(tmp_path):
  path = tmp_path / 'labels.gz'
  fm.write_idx_gz(path, np.array([3, 1, 4], np.uint8))
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  # Magic 0x00000801: unsigned bytes, one dimension; then the size 3.
  assert raw == b'\x00\x00\x08\x01' + struct.pack('>I', 3) + bytes([3, 1, 4])
  images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
  fm.write_idx_gz(tmp_path / 'images.gz', images.astype(np.uint8))
  np.testing.assert_array_equal(fm.read_idx_gz(tmp_path / 'images.gz'), images)


def test_prepared_splits_hold_exactly_the_written_examples(prepared):
  builder, arrays = prepared
  assert builder.info.splits['train'].num_examples == NUM_TRAIN
  assert builder.info.splits['test'].num_examples == NUM_TEST
  for split, (images, labels) in arrays.items():
    _assert_split_matches(builder, split, images, labels)


def test_features_are_fashion_mnist(prepared):
  builder, _ = prepared
  features = builder.info.features
  assert features['image'].shape == (28, 28, 1)
  assert features['label'].num_classes == 10
  assert features['label'].names[0] == 'T-shirt/top'
  assert features['label'].names[9] == 'Ankle boot'
  assert builder.info.full_name == 'fashion_mnist_local/1.0.0'


def test_prepared_dataset_reloads_without_the_idx_files(prepared):
  builder, arrays = prepared
  # A fresh builder on the same data_dir reads the prepared TFRecords; the
  # IDX location is not needed any more.
  reloaded = tfds.builder('fashion_mnist_local', data_dir=builder.data_dir_root)
  reloaded.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir='/nonexistent')
  )
  _assert_split_matches(reloaded, 'test', *arrays['test'])


def test_idx_dir_argument_overrides_manual_dir(idx_data, tmp_path):
  directory, arrays = idx_data
  decoy = tmp_path / 'decoy'
  decoy.mkdir()
  (decoy / 'README').write_text('not the IDX files')
  builder = tfds.builder('fashion_mnist_local', data_dir=tmp_path / 'tfds', idx_dir=directory)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=decoy))
  _assert_split_matches(builder, 'train', *arrays['train'])


def test_missing_files_say_how_to_install_them(idx_data, tmp_path):
  _, arrays = idx_data
  partial = tmp_path / 'partial'
  partial.mkdir()
  _write_split_files(partial, 'train', *arrays['train'])  # no test files
  builder = tfds.builder('fashion_mnist_local', data_dir=tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=partial))
  message = str(error.value)
  assert 'apt-get install dataset-fashion-mnist' in message
  assert str(partial) in message
  assert 'missing t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz.' in message


def test_missing_idx_dir_names_the_searched_path(tmp_path):
  missing = tmp_path / 'nowhere'
  builder = tfds.builder('fashion_mnist_local', data_dir=tmp_path / 'tfds', idx_dir=missing)
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as error:
    builder.download_and_prepare()
  assert f'searched {missing}' in str(error.value)


def test_corrupted_magic_number_is_rejected(idx_data, tmp_path):
  _, arrays = idx_data
  bad = tmp_path / 'bad'
  bad.mkdir()
  for split, (images, labels) in arrays.items():
    _write_split_files(bad, split, images, labels)
  path = bad / fm.IDX_FILES['test'][0]
  with gzip.open(path, 'rb') as f:
    raw = bytearray(f.read())
  raw[2] = 0x0D  # dtype code of float32 instead of unsigned byte
  with gzip.open(path, 'wb') as f:
    f.write(bytes(raw))
  with pytest.raises(ValueError, match='bad IDX magic number 0x00000d03'):
    fm.read_idx_gz(path)
  builder = tfds.builder('fashion_mnist_local', data_dir=tmp_path / 'tfds')
  with pytest.raises(ValueError, match='t10k-images-idx3-ubyte.gz: bad IDX magic'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=bad))


@pytest.mark.parametrize(
  'images, labels, message',
  [
    (
      np.zeros((3, 28, 27), np.uint8),
      np.zeros(3, np.uint8),
      r'expected images of shape \(N, 28, 28\)',
    ),
    (np.zeros((3, 28, 28), np.uint8), np.zeros(4, np.uint8), '3 images .* but 4 labels'),
    (np.zeros((3, 28, 28), np.uint8), np.array([0, 10, 1], np.uint8), 'label 10 outside 0..9'),
  ],
)
def test_malformed_splits_are_rejected(tmp_path, images, labels, message):
  _write_split_files(tmp_path, 'train', images, labels)
  with pytest.raises(ValueError, match=message):
    fm.load_idx_split(tmp_path, 'train')


def test_truncated_data_is_rejected(tmp_path):
  path = tmp_path / 'short.gz'
  with gzip.open(path, 'wb') as f:
    f.write(b'\x00\x00\x08\x01' + struct.pack('>I', 5) + bytes(3))
  with pytest.raises(ValueError, match='holds 3 values'):
    fm.read_idx_gz(path)
