"""TFDS builder `fashion_mnist_local`: Fashion-MNIST from local IDX files.

TFDS's stock `fashion_mnist` builder downloads the four IDX files and checks
them against registered checksums. Neither works offline with Debian's
`dataset-fashion-mnist` package: nothing can be downloaded, and Debian
recompressed the `.gz` files, so their checksums differ even though the
decompressed bytes are the original ones. This builder reads the IDX files
from a local directory instead, validates them, and writes an ordinary TFDS
dataset, so afterwards Fashion-MNIST is read exactly like CIFAR-10:

    import ddpm_jax.datasets  # registers the builder
    builder = tfds.builder('fashion_mnist_local', data_dir=...)
    builder.download_and_prepare()  # once: converts the IDX files
    ds = builder.as_dataset(split='train')

Where the IDX files are looked for, first match wins:
  1. the builder keyword argument `idx_dir` (`tfds.builder(..., idx_dir=...)`);
  2. TFDS's manual directory, when it exists and is not empty: the
     `manual_dir` of `tfds.download.DownloadConfig`, or by default
     `<data_dir>/downloads/manual`;
  3. /usr/share/datasets/fashion-mnist, where `sudo apt-get install
     dataset-fashion-mnist` puts them.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte
big-endian magic number `0x00 0x00 <dtype code> <number of dimensions>` (dtype
code 0x08 is unsigned byte), one big-endian uint32 per dimension, then the
values in C order. Fashion-MNIST's images are (N, 28, 28) and its labels (N,)
with values 0..9 (Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
INSTALL_COMMAND = 'sudo apt-get install dataset-fashion-mnist'

IMAGE_SIZE = 28
NUM_CLASSES = 10
# Label order of the Fashion-MNIST paper (and of TFDS's stock builder).
CLASS_NAMES = (
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
)

# Split name -> (images file, labels file), the upstream file names that
# Debian keeps.
IDX_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}

_UBYTE_DTYPE_CODE = 0x08


def read_idx_gz(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads a gzipped unsigned-byte IDX file.

  Args:
    path: a `.gz` file holding one IDX array of dtype code 0x08 (uint8).

  Returns:
    uint8 array with the shape stored in the file's header.

  Raises:
    ValueError: when the file is not gzip, its magic number is not that of an
      unsigned-byte IDX file, or its length disagrees with its header.
  """
  try:
    with gzip.open(path, 'rb') as f:
      raw = f.read()
  except gzip.BadGzipFile as e:
    raise ValueError(f'{path}: not a gzip file ({e}).') from e
  if len(raw) < 4 or raw[:2] != b'\x00\x00' or raw[2] != _UBYTE_DTYPE_CODE:
    raise ValueError(
      f'{path}: bad IDX magic number 0x{raw[:4].hex()}; expected '
      f'0x0000{_UBYTE_DTYPE_CODE:02x}NN (unsigned bytes, NN dimensions). '
      'The file is corrupt or not an IDX file.'
    )
  ndim = raw[3]
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise ValueError(f'{path}: truncated IDX header ({len(raw)} bytes).')
  shape = struct.unpack(f'>{ndim}I', raw[4:header_len])
  values = np.frombuffer(raw, dtype=np.uint8, offset=header_len)
  if values.size != int(np.prod(shape)):
    raise ValueError(
      f'{path}: header says shape {shape} ({int(np.prod(shape))} values) '
      f'but the file holds {values.size} values.'
    )
  return values.reshape(shape)


def write_idx_gz(path: str | os.PathLike[str], array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (the inverse of `read_idx_gz`).

  Used to build small Fashion-MNIST-shaped test fixtures.

  Args:
    path: destination `.gz` file.
    array: uint8 array of any rank up to 255, e.g. images (N, 28, 28) or
      labels (N,).
  """
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'IDX writer supports uint8 only, got {array.dtype}.')
  header = bytes([0, 0, _UBYTE_DTYPE_CODE, array.ndim])
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array).tobytes())


def load_idx_split(idx_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates one Fashion-MNIST split from a directory.

  Args:
    idx_dir: directory holding the IDX `.gz` files named in `IDX_FILES`.
    split: 'train' or 'test'.

  Returns:
    (images, labels): uint8 arrays of shapes (N, 28, 28) and (N,).

  Raises:
    ValueError: when a file is malformed, the shapes are not Fashion-MNIST's,
      image and label counts differ, or a label is not in 0..9.
  """
  images_name, labels_name = IDX_FILES[split]
  images_path = os.path.join(idx_dir, images_name)
  labels_path = os.path.join(idx_dir, labels_name)
  images = read_idx_gz(images_path)
  labels = read_idx_gz(labels_path)
  if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(
      f'{images_path}: expected images of shape (N, {IMAGE_SIZE}, '
      f'{IMAGE_SIZE}), got {images.shape}.'
    )
  if labels.ndim != 1:
    raise ValueError(f'{labels_path}: expected labels of shape (N,), got {labels.shape}.')
  if len(images) != len(labels):
    raise ValueError(
      f'{split}: {len(images)} images ({images_path}) but {len(labels)} labels ({labels_path}).'
    )
  if labels.size and labels.max() >= NUM_CLASSES:
    raise ValueError(f'{labels_path}: label {labels.max()} outside 0..{NUM_CLASSES - 1}.')
  return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (60,000 train / 10,000 test, 28x28x1) from IDX files."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': "Reads the IDX files of Debian's package."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Install the IDX files with `{INSTALL_COMMAND}` (they go to
  {DEFAULT_IDX_DIR}), or put the four files
  {', '.join(n for names in IDX_FILES.values() for n in names)}
  into the manual directory.
  """

  def __init__(self, *, idx_dir: str | os.PathLike[str] | None = None, **kwargs):
    """Creates the builder.

    Args:
      idx_dir: directory with the four IDX `.gz` files; overrides TFDS's
        manual directory and the Debian default (see the module docstring).
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, ...).
    """
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'Fashion-MNIST: 28x28 grayscale images of 10 kinds of clothing, read from local IDX files.'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
          'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _find_idx_dir(self, dl_manager: tfds.download.DownloadManager) -> str:
    """Returns the directory to read from, in the order of the module doc."""
    if self._idx_dir is not None:
      directory = os.fspath(self._idx_dir)
    else:
      try:
        # Raises AssertionError when the manual directory is absent or empty;
        # a manual directory that holds the wrong files is an error below,
        # not a reason to fall back.
        directory = os.fspath(dl_manager.manual_dir)
      except AssertionError:
        directory = DEFAULT_IDX_DIR
    missing = [
      name
      for names in IDX_FILES.values()
      for name in names
      if not os.path.isfile(os.path.join(directory, name))
    ]
    if missing:
      raise FileNotFoundError(
        f'Fashion-MNIST IDX files not found: searched {directory}, missing '
        f'{", ".join(missing)}. Install them with `{INSTALL_COMMAND}` '
        f'(puts them in {DEFAULT_IDX_DIR}), or pass the directory holding '
        'them as tfds.download.DownloadConfig(manual_dir=...) or as the '
        'builder argument idx_dir=... .'
      )
    return directory

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    idx_dir = self._find_idx_dir(dl_manager)
    # Both splits are read (and validated) before TFDS writes anything, so a
    # bad file fails fast instead of after the train split was written.
    arrays = {split: load_idx_split(idx_dir, split) for split in IDX_FILES}
    return {
      split: self._generate_examples(images, labels) for split, (images, labels) in arrays.items()
    }

  def _generate_examples(
    self, images: np.ndarray, labels: np.ndarray
  ) -> Iterator[tuple[int, dict]]:
    # The key is the index in the IDX file; TFDS sorts by a hash of the key,
    # which gives a fixed (file-independent) order on disk.
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image[:, :, None], 'label': int(label)}
