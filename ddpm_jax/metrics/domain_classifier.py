"""A small domain classifier whose features stand in for Inception's.

Inception-v3 features mean little for 28x28 / 32x32 grayscale data such as
Fashion-MNIST (the project's embedded default), and its weights may not be on
the machine at all. This module trains a small CNN on the dataset's own
labelled train split and uses its penultimate layer (256-d) as the feature
space for a Frechet distance. The number it gives is labelled
"FD (domain classifier features)": it ranks models trained on the same data
and tracks progress, but it is NOT comparable with Inception FID nor across
datasets or classifier weights.

Network (NHWC, inputs mapped to [-1, 1] from uint8), every convolution 3x3
with a ReLU: 32 -> 64 stride 2 -> 64 -> 128 stride 2 -> 128, flattened
(7x7x128 at 28x28 input) -> dense 256 (features, taken before the ReLU) ->
ReLU -> dense num_classes (logits); its Fashion-MNIST test accuracy is in
experiments/default_recipe.md, and every eval JSON records the one it measured.

Training: AdamW (lr 1e-3 cosine-decayed to 0, weight decay 1e-4), batch 128,
softmax cross-entropy, optional random flips, epochs shuffled with a NumPy generator seeded by
`seed`, so a run is reproducible on the same platform. A trained classifier
is cached as msgpack under a key derived from the data and the settings, so
evaluations reuse it instead of retraining.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax import files
from ddpm_jax.metrics.batching import batched_apply, place_replicated

__all__ = [
  'FD_LABEL',
  'DomainClassifier',
  'DomainFeatureExtractor',
  'load_or_train_domain_classifier',
  'train_domain_classifier',
]

FD_LABEL = 'Frechet distance (domain classifier features; NOT comparable with Inception FID)'
# Part of the cache key: bump when the network or training recipe changes.
_CACHE_VERSION = 3

Params = Mapping[str, Any]


class DomainClassifier(nn.Module):
  """Small CNN classifier; returns penultimate features and logits."""

  num_classes: int
  # (channels, stride) of each 3x3 convolution.
  convs: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))
  feature_dim: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Runs the classifier.

    Args:
      x: [N, H, W, C] float images in [-1, 1]; H, W >= 16.

    Returns:
      (features [N, feature_dim], logits [N, num_classes]).
    """
    # Strided convolutions rather than max pooling: XLA:CPU's max-pool
    # gradient is slow, and the strides learn their own downsampling.
    for i, (ch, stride) in enumerate(self.convs):
      x = nn.relu(nn.Conv(ch, (3, 3), strides=stride, padding='SAME', name=f'conv{i}')(x))
    # Flattened whole, so the features keep where things are in the image.
    x = x.reshape(x.shape[0], -1)
    # Features are taken before the ReLU: with ReLU many units are zero for
    # every input, which makes the feature covariance singular and wastes
    # dimensions.
    features = nn.Dense(self.feature_dim, name='penultimate')(x)
    logits = nn.Dense(self.num_classes, name='head')(nn.relu(features))
    return features, logits


def _to_unit_range(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 127.5 - 1.0


def _num_classes(params: Params) -> int:
  return int(params['head']['kernel'].shape[-1])


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _forward(params: Params, images: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  return DomainClassifier(num_classes).apply({'params': params}, _to_unit_range(images))


def _optimizer() -> optax.GradientTransformation:
  # AdamW without its learning rate: the host passes the scheduled rate into
  # each step, so one compiled step serves every `steps` setting.
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4))


@functools.partial(jax.jit, static_argnames=('num_classes',), donate_argnums=(0, 1))
def _train_step(
  params: Params,
  opt_state: optax.OptState,
  images: jax.Array,
  labels: jax.Array,
  learning_rate: jax.Array,
  *,
  num_classes: int,
) -> tuple[Params, optax.OptState, jax.Array]:
  """One AdamW step on softmax cross-entropy."""

  def loss_fn(p):
    _, logits = DomainClassifier(num_classes).apply({'params': p}, _to_unit_range(images))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _optimizer().update(grads, opt_state, params)
  updates = jax.tree.map(lambda u: -learning_rate * u, updates)
  return optax.apply_updates(params, updates), opt_state, loss


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}')
  return images


def _flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Flips a random half of the images left to right."""
  flip = rng.random(len(images)) < 0.5
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def train_domain_classifier(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  steps: int = 2000,
  batch_size: int = 128,
  seed: int = 0,
  learning_rate: float = 1e-3,
  random_flip: bool = False,
  num_classes: int | None = None,
  eval_images: np.ndarray | None = None,
  eval_labels: np.ndarray | None = None,
) -> tuple[Params, float | None]:
  """Trains `DomainClassifier` on labelled uint8 images.

  Args:
    images: [N, H, W, C] uint8 training images.
    labels: [N] integer labels in [0, num_classes).
    steps: optimiser steps (2000 at batch 128 is about 4 epochs of
      Fashion-MNIST).
    batch_size: examples per step (must be <= N).
    seed: seeds the initialisation and the shuffling.
    learning_rate: peak AdamW learning rate (cosine-decayed to 0).
    random_flip: flip a random half of each batch left to right (for data
      whose classes keep under a mirror; `eval.domain_classifier_random_flip`).
    num_classes: defaults to max(labels) + 1.
    eval_images: optional [M, H, W, C] uint8 held-out images.
    eval_labels: optional [M] labels for `eval_images`.

  Returns:
    (params, accuracy): the trained parameters and the accuracy on the
    held-out split (None when no split was given).
  """
  images = _check_images(images)
  labels = np.asarray(labels).astype(np.int32)
  if labels.shape != images.shape[:1]:
    raise ValueError(f'labels shape {labels.shape} does not match {images.shape[0]} images')
  n = images.shape[0]
  if not 0 < batch_size <= n:
    raise ValueError(f'batch_size must be in [1, {n}], got {batch_size}')
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  params = DomainClassifier(num_classes).init(
    jax.random.key(seed), jnp.zeros((1,) + images.shape[1:], jnp.float32)
  )['params']
  opt_state = _optimizer().init(params)
  # Cosine decay to 0 (optax.cosine_decay_schedule), computed on the host so
  # the loop never waits on the device for a scalar.
  rates = (learning_rate * 0.5 * (1.0 + np.cos(np.pi * np.arange(steps) / steps))).astype(
    np.float32
  )

  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  pos = 0
  for step in range(steps):
    if pos + batch_size > n:  # new epoch; drop the ragged remainder
      order = rng.permutation(n)
      pos = 0
    idx = order[pos : pos + batch_size]
    pos += batch_size
    batch = _flip(images[idx], rng) if random_flip else images[idx]
    params, opt_state, loss = _train_step(
      params,
      opt_state,
      batch,
      labels[idx],
      rates[step],
      num_classes=num_classes,
    )
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f'domain classifier loss is {float(loss)}')

  accuracy = None
  if eval_images is not None:
    if eval_labels is None:
      raise ValueError('eval_images given without eval_labels')
    _, logits = DomainFeatureExtractor(params)(eval_images)
    accuracy = float(np.mean(logits.argmax(-1) == np.asarray(eval_labels)))
  return params, accuracy


def _cache_key(images: np.ndarray, labels: np.ndarray, settings: Mapping[str, Any]) -> str:
  digest = hashlib.sha256()
  digest.update(
    json.dumps(
      {'version': _CACHE_VERSION, 'shape': images.shape, **settings}, sort_keys=True
    ).encode()
  )
  digest.update(np.ascontiguousarray(images).tobytes())
  digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
  return digest.hexdigest()[:20]


def load_or_train_domain_classifier(
  cache_dir: str | os.PathLike,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  steps: int = 2000,
  batch_size: int = 128,
  seed: int = 0,
  learning_rate: float = 1e-3,
  random_flip: bool = False,
  eval_images: np.ndarray | None = None,
  eval_labels: np.ndarray | None = None,
) -> tuple[Params, dict[str, Any]]:
  """Returns a cached classifier for this data and settings, training once.

  Args:
    cache_dir: directory for `domain_classifier_<key>.msgpack` files; the key
      hashes the training images, labels and settings, so changed data or
      settings train a new classifier.
    images: [N, H, W, C] uint8 training images.
    labels: [N] integer labels.
    steps: see `train_domain_classifier`.
    batch_size: see `train_domain_classifier`.
    seed: see `train_domain_classifier`.
    learning_rate: see `train_domain_classifier`.
    random_flip: see `train_domain_classifier`.
    eval_images: optional held-out images for the reported accuracy (used
      only when training).
    eval_labels: labels of `eval_images`.

  Returns:
    (params, info) where info has 'path', 'cached' (loaded rather than
    trained), 'accuracy' (held-out accuracy at training time or None),
    'train_seconds' and 'image_shape' ([H, W, C]).
  """
  images = _check_images(images)
  labels = np.asarray(labels)
  settings = {
    'steps': steps,
    'batch_size': batch_size,
    'seed': seed,
    'learning_rate': learning_rate,
    'random_flip': random_flip,
  }
  path = os.path.join(
    files.absolute(cache_dir), f'domain_classifier_{_cache_key(images, labels, settings)}.msgpack'
  )
  if files.exists(path):
    blob = flax.serialization.msgpack_restore(files.read_bytes(path))
    meta = json.loads(blob['meta'])
    return blob['params'], {**meta, 'path': path, 'cached': True}

  start = time.perf_counter()
  params, accuracy = train_domain_classifier(
    images,
    labels,
    steps=steps,
    batch_size=batch_size,
    seed=seed,
    learning_rate=learning_rate,
    random_flip=random_flip,
    eval_images=eval_images,
    eval_labels=eval_labels,
  )
  meta = {
    'accuracy': accuracy,
    'train_seconds': time.perf_counter() - start,
    'image_shape': list(images.shape[1:]),
    **settings,
  }
  blob = flax.serialization.msgpack_serialize(
    {'params': jax.tree.map(np.asarray, params), 'meta': json.dumps(meta)}
  )
  # Written whole, so a concurrent reader never sees half a file; every
  # process trained the same classifier, and the chief owns the cache.
  if jax.process_index() == 0:
    files.write_bytes(path, blob)
  return params, {**meta, 'path': path, 'cached': False}


class DomainFeatureExtractor:
  """Penultimate features (and logits) of a trained `DomainClassifier`."""

  def __init__(self, params: Params, batch_size: int = 256, mesh: jax.sharding.Mesh | None = None):
    """Creates the extractor.

    Args:
      params: parameters from `train_domain_classifier` or
        `load_or_train_domain_classifier`.
      batch_size: images per jitted call (the last batch is padded).
      mesh: optional mesh with a 'data' axis to shard batches over.
    """
    self.num_classes = _num_classes(params)
    self.in_channels = int(params['conv0']['kernel'].shape[2])
    self.params = place_replicated(params, mesh)
    self.batch_size = batch_size
    self.mesh = mesh

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Computes features and logits.

    Args:
      images: [N, H, W, C] uint8 images at the classifier's training
        resolution and channel count.

    Returns:
      (features [N, 256], logits [N, num_classes]) as float32 NumPy arrays.
    """
    images = _check_images(images)
    if images.shape[-1] != self.in_channels:
      raise ValueError(f'classifier expects {self.in_channels} channels, got {images.shape[-1]}')
    fn = functools.partial(_forward, self.params, num_classes=self.num_classes)
    features, logits = batched_apply(fn, images, self.batch_size, self.mesh)
    return features, logits

  def features(self, images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N, 256] penultimate features."""
    return self(images)[0]
