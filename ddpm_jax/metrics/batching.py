"""Fixed-size, optionally sharded batching for feature extractors.

Feature extraction runs a jitted network over thousands of images. Padding
the last batch keeps one compiled shape, and a mesh with a 'data' axis lets
the same code spread batches over several devices (variables replicated).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import jax
import numpy as np

__all__ = ['batched_apply', 'place_replicated']


def batched_apply(
  fn: Callable[[jax.Array], Sequence[jax.Array]],
  images: np.ndarray,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
) -> list[np.ndarray]:
  """Applies `fn` to fixed-size batches of `images`, returns NumPy outputs.

  The last batch is padded to `batch_size` by repeating its final image, so
  a jitted `fn` compiles once; padded rows are dropped from the outputs.

  Args:
    fn: maps a [B, ...] batch to a tuple of [B, ...] arrays.
    images: [N, ...] inputs.
    batch_size: B; with a mesh it is rounded up to a multiple of the size of
      its 'data' axis.
    mesh: optional mesh with a 'data' axis; batches are then sharded over it
      (the variables closed over by `fn` stay replicated).

  Returns:
    The outputs of `fn`, each concatenated to [N, ...].
  """
  images = np.asarray(images)
  n = images.shape[0]
  if n == 0:
    raise ValueError('no images')
  sharding = None
  if mesh is not None:
    # Round up so every device gets the same number of rows.
    shards = mesh.shape['data']
    batch_size = -(-batch_size // shards) * shards
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  outputs: list[list[np.ndarray]] = []
  pending = None  # (device outputs, valid rows) of the previous batch

  def collect(item):
    result, valid = item
    if not outputs:
      outputs.extend([] for _ in result)
    for acc, r in zip(outputs, result):
      acc.append(np.asarray(r)[:valid])

  for start in range(0, n, batch_size):
    batch = images[start : start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size:
      pad = np.repeat(batch[-1:], batch_size - valid, axis=0)
      batch = np.concatenate([batch, pad], axis=0)
    batch = jax.device_put(batch, sharding) if sharding else batch
    current = (fn(batch), valid)
    # Fetch the previous batch only after dispatching this one, so the device
    # computes while the host copies.
    if pending is not None:
      collect(pending)
    pending = current
  collect(pending)
  return [np.concatenate(acc, axis=0) for acc in outputs]


def place_replicated(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
  """Puts a pytree on the default device, or replicated over `mesh`."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
