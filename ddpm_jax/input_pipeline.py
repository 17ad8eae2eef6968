"""Input pipeline: TFDS images -> float32 batches in [-1, 1].

Every dataset (CIFAR-10, the local Fashion-MNIST builder, CelebA-HQ, LSUN) is
read through TFDS and the same code, driven by the data config `config.data`:

  dataset         TFDS name, e.g. 'cifar10', 'fashion_mnist_local',
                  'celeb_a_hq/256', 'lsun/bedroom'.
  data_dir        TFDS data directory (None: TFDS's default).
  manual_dir      TFDS manual directory (None: the builder's default).
  train_split     split to train on, e.g. 'train' (sub-splits work too).
  eval_split      split to evaluate on, e.g. 'test'.
  image_size      output height = width.
  num_channels    channels of the dataset's images (checked, not converted).
  resize_method   'pad' (centre on a black canvas: Fashion-MNIST 28 -> 32),
                  'resize' (bilinear, aspect ratio not kept) or
                  'center_crop' (largest central square, then resize: LSUN).
  random_flip     random horizontal flips in training.
  shuffle_buffer  shuffle buffer in examples; at least the split size gives
                  an exact permutation per epoch.

Class-conditional configs (`config.model.num_classes` > 0) also get each
example's TFDS 'label' (int32) beside its image, in every batch: the label
travels with its image through the shuffle, so labels are sharded and
ordered exactly like the images.

Pixels map to [-1, 1] by x / 127.5 - 1 without dequantization, as in DDPM.
Geometric resizing rounds back to uint8 first, so model inputs always lie on
the 256-level grid that the discretized decoder's likelihood assumes.

Training stream. `make_train_iterator` yields per-process batches forever.
The batch of global step s is a deterministic function of (config.seed, s,
process index): epoch e of process p is the process's shard permuted by a
shuffle seeded from (seed, p, e), each epoch drops its last partial batch,
and flips are stateless, seeded from (seed, p, e) and the example's position
in the epoch. So an iterator created with `start_step=s` yields exactly what
an iterator created with `start_step=0` yields after s batches: a run resumed
after preemption sees the data an uninterrupted run would have seen.

Sharding. Each of the `process_count` processes reads its own
`tfds.split_for_jax_process` slice and yields `global_batch / process_count`
examples per step, ready for `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import ddpm_jax.datasets  # noqa: F401  (registers 'fashion_mnist_local')

RESIZE_METHODS = ('pad', 'resize', 'center_crop')
# Datasets that this project has configurations for; any TFDS dataset with an
# 'image' feature works, this list only makes error messages helpful.
KNOWN_DATASETS = (
  'cifar10',
  'fashion_mnist_local',
  'celeb_a_hq/256',
  'lsun/bedroom',
  'lsun/church_outdoor',
  'lsun/cat',
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a data config will produce, known before any training work.

  Attributes:
    name: TFDS name with config and version, e.g. 'cifar10/3.0.2'.
    num_examples: examples in the train and eval splits of the config, keyed
      by the split strings of the config.
    source_shape: (H, W, C) of the stored images; H and W are None where they
      vary (LSUN).
    image_shape: (image_size, image_size, num_channels) of the model inputs.
  """

  name: str
  num_examples: Mapping[str, int]
  source_shape: tuple[int | None, int | None, int]
  image_shape: tuple[int, int, int]


# ---------------------------------------------------------------------------
# Builder and config checks.
# ---------------------------------------------------------------------------


def uses_labels(config: ml_collections.ConfigDict) -> bool:
  """Whether batches carry class labels: the model is class-conditional."""
  return config.get('model', {}).get('num_classes', 0) > 0


def _check_resize_method(data_config: ml_collections.ConfigDict) -> None:
  if data_config.resize_method not in RESIZE_METHODS:
    raise ValueError(
      f'Unknown data.resize_method {data_config.resize_method!r}; valid '
      f'choices: {", ".join(RESIZE_METHODS)}.'
    )


def get_builder(
  data_config: ml_collections.ConfigDict, *, prepare: bool = True
) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder of `data_config.dataset`, prepared by default.

  Preparation happens once per data directory; later calls only check that
  the prepared files exist. For 'fashion_mnist_local' it converts the local
  IDX files (seconds); datasets that need a download fail
  here when offline unless they were prepared before. In a multi-process run,
  prepare once before launching rather than from every process at once.

  Args:
    data_config: `config.data`; uses `dataset`, `data_dir`, `manual_dir`.
    prepare: run `download_and_prepare` (a no-op when already prepared).

  Returns:
    The builder, ready for `as_dataset` when `prepare` is True.

  Raises:
    ValueError: when TFDS has no dataset of that name.
  """
  try:
    builder = tfds.builder(data_config.dataset, data_dir=data_config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f'Unknown TFDS dataset {data_config.dataset!r}; datasets with configs '
      f'in this project: {", ".join(KNOWN_DATASETS)} (any TFDS dataset with '
      f"an 'image' feature works). TFDS said: {e}"
    ) from e
  if prepare:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=data_config.manual_dir)
    )
  return builder


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Checks `config.data` against its dataset and describes what it yields.

  Prepares the dataset if needed (see `get_builder`).

  Args:
    config: experiment config; uses `config.data`.

  Returns:
    Split sizes and source and output image shapes.

  Raises:
    ValueError: for an unknown dataset, resize method or split, a dataset
      without an 'image' feature, a channel count other than
      `data.num_channels`, images larger than `data.image_size` with
      resize_method 'pad', or, for a class-conditional model, a dataset
      without a 'label' class feature of `model.num_classes` classes.
  """
  data = config.data
  _check_resize_method(data)
  builder = get_builder(data)
  features = builder.info.features
  if 'image' not in features:
    raise ValueError(
      f"Dataset {data.dataset!r} has no 'image' feature (features: {', '.join(features)})."
    )
  height, width, channels = features['image'].shape
  if channels != data.num_channels:
    raise ValueError(
      f'data.num_channels is {data.num_channels} but {data.dataset!r} has '
      f'{channels}-channel images.'
    )
  if data.resize_method == 'pad' and any(
    side is not None and side > data.image_size for side in (height, width)
  ):
    raise ValueError(
      f"resize_method 'pad' cannot fit {height}x{width} images into "
      f"data.image_size {data.image_size}; use 'resize' or 'center_crop'."
    )
  if uses_labels(config):
    num_classes = config.model.num_classes
    label = features['label'] if 'label' in features else None
    if not isinstance(label, tfds.features.ClassLabel):
      raise ValueError(
        f'model.num_classes={num_classes} needs a class-labelled dataset, but '
        f"{data.dataset!r} has no 'label' class feature (features: {', '.join(features)}); "
        'set model.num_classes=0 to train an unconditional model.'
      )
    if label.num_classes != num_classes:
      raise ValueError(
        f'model.num_classes is {num_classes} but {data.dataset!r} has {label.num_classes} classes.'
      )
  num_examples = {}
  for split in (data.train_split, data.eval_split):
    try:
      num_examples[split] = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(
        f'Split {split!r} not in {data.dataset!r} (splits: {", ".join(builder.info.splits)}): {e}'
      ) from e
  return DatasetInfo(
    name=builder.info.full_name,
    num_examples=num_examples,
    source_shape=(height, width, channels),
    image_shape=(data.image_size, data.image_size, data.num_channels),
  )


# ---------------------------------------------------------------------------
# Per-image preprocessing (inside tf.data).
# ---------------------------------------------------------------------------


def resize_image(image: tf.Tensor, data_config: ml_collections.ConfigDict) -> tf.Tensor:
  """Brings one uint8 image to the model's size, staying in uint8.

  Args:
    image: uint8 [H, W, C].
    data_config: `config.data`; uses `image_size`, `num_channels`,
      `resize_method`.

  Returns:
    uint8 [image_size, image_size, num_channels].
  """
  _check_resize_method(data_config)
  size = data_config.image_size
  image = tf.convert_to_tensor(image)
  if data_config.resize_method == 'pad':
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    # resize_with_crop_or_pad would silently crop larger images.
    with tf.control_dependencies(
      [
        tf.debugging.assert_less_equal(
          tf.maximum(height, width),
          size,
          message="resize_method 'pad' got an image larger than image_size",
        )
      ]
    ):
      # Zero padding is black, i.e. -1 after scaling.
      image = tf.image.resize_with_crop_or_pad(image, size, size)
  else:
    if data_config.resize_method == 'center_crop':
      height, width = tf.shape(image)[0], tf.shape(image)[1]
      side = tf.minimum(height, width)
      image = tf.image.crop_to_bounding_box(
        image, (height - side) // 2, (width - side) // 2, side, side
      )
    resized = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
    # Rounding keeps the data on the 8-bit grid, and makes resizing an image
    # that already has the target size an exact identity.
    image = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
  return tf.ensure_shape(image, (size, size, data_config.num_channels))


def _to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """uint8 -> float32 in [-1, 1] by x / 127.5 - 1 (no dequantization)."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def preprocess_image(image: tf.Tensor, data_config: ml_collections.ConfigDict) -> tf.Tensor:
  """Resizes one uint8 image and scales it to [-1, 1] (no flip).

  Args:
    image: uint8 [H, W, C] (tf.Tensor or array).
    data_config: `config.data`.

  Returns:
    float32 tf.Tensor [image_size, image_size, num_channels] in [-1, 1].
  """
  return _to_unit_range(resize_image(image, data_config))


# ---------------------------------------------------------------------------
# Processes and batch sizes.
# ---------------------------------------------------------------------------


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  return process_index, process_count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Examples each process contributes to a global batch.

  Args:
    global_batch_size: batch size across all processes.
    process_count: number of processes.

  Returns:
    global_batch_size // process_count.

  Raises:
    ValueError: when the division is not exact.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'Global batch size {global_batch_size} must be a positive multiple '
      f'of the process count {process_count}.'
    )
  return global_batch_size // process_count


def _deterministic_options() -> tf.data.Options:
  options = tf.data.Options()
  # Parallel maps must keep element order; the resume guarantee rests on it.
  options.deterministic = True
  return options


# ---------------------------------------------------------------------------
# Training stream.
# ---------------------------------------------------------------------------


def _epoch_seeds(seed: int, process_index: int, epoch: int) -> tuple[int, int]:
  """(shuffle seed, flip seed) of one epoch of one process."""
  shuffle_seed, flip_seed = np.random.SeedSequence([seed, process_index, epoch]).generate_state(2)
  return int(shuffle_seed), int(flip_seed)


def _train_epoch(
  builder: tfds.core.DatasetBuilder,
  split: str,
  data_config: ml_collections.ConfigDict,
  *,
  num_examples: int,
  local_batch: int,
  seeds: tuple[int, int],
  skip_batches: int,
  labels: bool = False,
) -> tf.data.Dataset:
  """One epoch of one process's shard: shuffled, flipped, batched (with labels if `labels`)."""
  shuffle_seed, flip_seed = seeds
  image_feature = builder.info.features['image']
  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,  # a fixed file order; the shuffle below is seeded
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(try_autocache=False, options=_deterministic_options()),
  )
  # Shuffle and skip the encoded bytes: the buffer stays small and skipped
  # examples are never decoded.
  if labels:
    # Shuffled as one element with its image: the permutation is the image-only one.
    ds = ds.map(lambda example: (example['image'], tf.cast(example['label'], tf.int32)))
  else:
    ds = ds.map(lambda example: example['image'])
  # An op-level seed makes the order fixed (TF pairs it with its default
  # global seed unless a program calls tf.random.set_seed, which this
  # project does not).
  ds = ds.shuffle(
    min(data_config.shuffle_buffer, num_examples), seed=shuffle_seed, reshuffle_each_iteration=False
  )
  ds = ds.enumerate()  # position in the epoch, which seeds the flip
  ds = ds.skip(skip_batches * local_batch)

  def prepare(position: tf.Tensor, element) -> dict[str, tf.Tensor]:
    encoded, label = element if labels else (element, None)
    image = resize_image(image_feature.decode_example(encoded), data_config)
    if data_config.random_flip:
      image = tf.image.stateless_random_flip_left_right(
        image, seed=tf.stack([tf.constant(flip_seed, tf.int64), position])
      )
    out = {'image': _to_unit_range(image)}
    if labels:
      out['label'] = label
    return out

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_deterministic_options())


def make_train_iterator(
  config: ml_collections.ConfigDict,
  *,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of this process, starting at `start_step`.

  Each epoch every example of the process's shard is used at most once (the
  last partial batch of an epoch is dropped, different examples each epoch).
  Pipelines are rebuilt at epoch boundaries, which costs a shuffle-buffer
  fill; resuming mid-epoch reads (without decoding) the skipped examples.

  Args:
    config: experiment config; uses `config.data`, `config.seed` and
      `config.training.batch_size` (the GLOBAL batch size).
    start_step: global step of the first batch to yield.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    Iterator of {'image': float32 [local_batch, image_size, image_size,
    num_channels] in [-1, 1]}, local_batch = global batch / process_count,
    plus 'label' int32 [local_batch] for a class-conditional model.
    Batch k of it is the batch of global step start_step + k.

  Raises:
    ValueError: for an invalid data config, a global batch not divisible by
      the process count, a shard smaller than one batch, or start_step < 0.
  """
  data = config.data
  _check_resize_method(data)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  process_index, process_count = _process_layout(process_index, process_count)
  local_batch = local_batch_size(config.training.batch_size, process_count)
  builder = get_builder(data)
  split = tfds.split_for_jax_process(
    data.train_split, process_index=process_index, process_count=process_count
  )
  num_examples = builder.info.splits[split].num_examples
  steps_per_epoch = num_examples // local_batch
  if steps_per_epoch == 0:
    raise ValueError(
      f'Process {process_index} holds {num_examples} examples of '
      f'{data.train_split!r}, fewer than its batch of {local_batch}.'
    )
  first_epoch, first_skip = divmod(start_step, steps_per_epoch)

  def batches() -> Iterator[dict[str, np.ndarray]]:
    epoch, skip = first_epoch, first_skip
    while True:
      ds = _train_epoch(
        builder,
        split,
        data,
        num_examples=num_examples,
        local_batch=local_batch,
        seeds=_epoch_seeds(config.seed, process_index, epoch),
        skip_batches=skip,
        labels=uses_labels(config),
      )
      yield from ds.as_numpy_iterator()
      epoch, skip = epoch + 1, 0

  # The checks above run now, not at the first next().
  return batches()


# ---------------------------------------------------------------------------
# Evaluation and reference data.
# ---------------------------------------------------------------------------


def make_eval_dataset(
  config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  split: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterable[dict[str, np.ndarray]]:
  """Evaluation batches of this process in a fixed order (no shuffle, flip).

  Each process reads its `tfds.split_for_jax_process` slice. Every process
  yields the same number of batches (a multi-process jitted step needs all
  of them at every step), padding the tail with masked-out examples, so
  summing over `mask` counts every example of the split exactly once.

  Args:
    config: experiment config; uses `config.data`.
    batch_size: GLOBAL batch size, a multiple of the process count.
    split: split to read (default `config.data.eval_split`).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    Re-iterable with `len()` (the number of batches) of
    {'image': float32 [local_batch, image_size, image_size, num_channels] in
    [-1, 1] (padding examples are zeros), 'mask': bool [local_batch], True
    for real examples}, plus 'label' int32 [local_batch] (padding: 0) for a
    class-conditional model.
  """
  data = config.data
  _check_resize_method(data)
  split = data.eval_split if split is None else split
  process_index, process_count = _process_layout(process_index, process_count)
  local_batch = local_batch_size(batch_size, process_count)
  builder = get_builder(data)
  total = builder.info.splits[split].num_examples
  process_split = tfds.split_for_jax_process(
    split, process_index=process_index, process_count=process_count
  )
  num_local = builder.info.splits[process_split].num_examples
  # Processes hold ceil or floor of total / process_count examples; the
  # number of batches follows the largest shard.
  num_batches = math.ceil(math.ceil(total / process_count) / local_batch)

  ds = builder.as_dataset(
    split=process_split,
    shuffle_files=False,
    read_config=tfds.ReadConfig(options=_deterministic_options()),
  )
  labels = uses_labels(config)

  def prepare(example):
    out = {'image': preprocess_image(example['image'], data), 'mask': tf.constant(True)}
    if labels:
      out['label'] = tf.cast(example['label'], tf.int32)
    return out

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  image_shape = (data.image_size, data.image_size, data.num_channels)
  pad = {'image': tf.zeros(image_shape, tf.float32), 'mask': tf.constant(False)}
  if labels:
    pad['label'] = tf.constant(0, tf.int32)
  padding = tf.data.Dataset.from_tensors(pad).repeat(num_batches * local_batch - num_local)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_deterministic_options())
  return tfds.as_numpy(ds)


def load_split_as_uint8(
  config: ml_collections.ConfigDict, split: str, limit: int | None = None, with_labels: bool = False
):
  """Loads a split at the model's resolution as uint8, e.g. for FID statistics.

  Images go through the same resizing as model inputs, without flips, in
  TFDS order, unsharded (all of it on this process).

  Args:
    config: experiment config; uses `config.data`.
    split: TFDS split string, e.g. 'train' or 'test[:1000]'.
    limit: at most this many images (None: all).
    with_labels: also return the split's 'label' feature.

  Returns:
    uint8 [N, image_size, image_size, num_channels], or (that, int labels
    [N]) with `with_labels`.
  """
  data = config.data
  builder = get_builder(data)
  ds = builder.as_dataset(
    split=split, shuffle_files=False, read_config=tfds.ReadConfig(options=_deterministic_options())
  )
  if limit is not None:
    ds = ds.take(limit)
  # Unlabelled datasets (CelebA-HQ, LSUN) get a dummy label, never returned.
  ds = ds.map(
    lambda example: (resize_image(example['image'], data), example['label'] if with_labels else 0),
    num_parallel_calls=tf.data.AUTOTUNE,
  ).batch(1024)
  batches = list(ds.as_numpy_iterator())
  if batches:
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
  else:
    images = np.zeros((0, data.image_size, data.image_size, data.num_channels), np.uint8)
    labels = np.zeros((0,), np.int64)
  return (images, labels) if with_labels else images
