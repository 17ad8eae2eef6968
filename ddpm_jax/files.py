"""Paths, files written whole, and batch loops that survive a restart.

Every path the trainer, sampler and evaluator read or write goes through
here or through `etils.epath` (the path type of Orbax and TFDS): a local
path, or an object-storage URL such as `gs://bucket/run`, which etils serves
through `tf.io.gfile`. `absolute` makes a local path absolute and leaves a
URL alone (`os.path.abspath` would make `gs://b/run` a local folder `gs:`).

A reader (or a restarted run) never sees half a file: a local file is
written under a temporary name and renamed into place; an object is
uploaded whole, and Cloud Storage shows it only once complete. An append to
an object, which object storage does not have, is composed on the server by
ddpm_jax/gcs.py (with the bucket check and the workdir's lease). The batch
loop writes each finished batch as its own file at once and skips the ones
a previous, interrupted run already wrote, so a long job resumes where it
stopped and ends with the same result.
"""

import io
import json
import logging
import os
import tempfile
import time
from typing import Any
from collections.abc import Callable, Iterable

import jax
import numpy as np
from etils import epath

from ddpm_jax import gcs
from ddpm_jax import sharding as sharding_lib

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """Whether `path` names object storage (`gs://...`) rather than a local file."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> str:
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path.rstrip('/') if is_url(path) else os.path.abspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`absolute(path)` as an `epath.Path`."""
  return epath.Path(absolute(path))


def exists(path: PathLike) -> bool:
  """Whether the file (or folder, or object prefix) exists."""
  return as_path(path).exists()


def makedirs(path: PathLike) -> None:
  """Creates the folder and its parents (object storage: a placeholder; check the bucket first)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
  """The whole file (or object)."""
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  """The whole file (or object), as text."""
  return as_path(path).read_text()


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)`, then puts the file at `path` whole; makes the folder.

  Locally, tmp_path is next to `path` and is renamed to it. On object
  storage, tmp_path is a local temporary file, uploaded as one object.
  The temporary name keeps `path`'s extension, for writers that pick the
  format from it (NumPy, matplotlib, PIL).
  """
  path = absolute(path)
  root, ext = os.path.splitext(path)
  if is_url(path):
    with tempfile.TemporaryDirectory(prefix='ddpm_jax_') as directory:
      tmp = os.path.join(directory, f'part{ext}')
      write(tmp)
      with open(tmp, 'rb') as f:
        data = f.read()
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{root}.tmp{ext}'
  write(tmp)
  os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` to `path` whole."""

  write_bytes(path, text.encode())


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` whole."""
  if is_url(path):
    as_path(path).write_bytes(data)  # One upload: the object appears whole or not at all.
    return

  def write(tmp):
    with open(tmp, 'wb') as f:
      f.write(data)

  atomic_write(path, write)


def write_json(path: PathLike, value: Any) -> None:
  """Writes `value` as indented JSON to `path` whole."""
  write_text(path, json.dumps(value, indent=2))


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
  """np.savez to `path` whole."""
  atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """Every array of an .npz file, by name."""
  with np.load(io.BytesIO(read_bytes(path))) as data:
    return {name: data[name] for name in data.files}


def append_text(path: PathLike, text: str) -> None:
  """Adds `text` at the end of the file (created if missing); an object, by `gcs.append_text`."""
  if is_url(path):
    gcs.append_text(absolute(path), text)
    return
  path = absolute(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    f.write(text)


def resumable_batches(
  out_dir: PathLike,
  inputs: Iterable[Any],
  num_batches: int,
  compute: Callable[[int, Any], dict[str, np.ndarray]],
  *,
  what: str,
  summary: Callable[[dict[str, np.ndarray]], str] | None = None,
) -> list[dict[str, np.ndarray]]:
  """Computes `num_batches` batches, each saved at once as `out_dir/batch_<index>.npz`.

  Every process runs the loop (`compute` may gather across processes); the
  chief writes. A batch whose file exists is skipped without calling
  `compute`, so its result is never redone and never changes.

  Args:
    out_dir: the batches' folder (created).
    inputs: one input per batch (e.g. range(num_batches), or a dataset);
      consumed in order, also for skipped batches.
    num_batches: how many batches to make; `inputs` may be longer.
    compute: (index, input) -> dict of host arrays, the same on every process.
    what: what a batch is, for the progress log ('samples', 'bits/dim').
    summary: optional one-line summary of a finished batch for the log.

  Returns:
    The `num_batches` batches, in order, as loaded from their files.
  """
  out_dir = absolute(out_dir)
  makedirs(out_dir)
  is_chief = jax.process_index() == 0
  paths = [os.path.join(out_dir, f'batch_{index:05d}.npz') for index in range(num_batches)]
  start, done_now = time.time(), 0
  for index, item in zip(range(num_batches), inputs):
    if exists(paths[index]):
      continue  # Finished before an interruption: never redone.
    arrays = compute(index, item)
    if is_chief:
      save_npz(paths[index], **arrays)
    done_now += 1
    rate = done_now / (time.time() - start)
    logging.info(
      '%s batch %d/%d%s (%.2f batches/s, ETA %.0f s).',
      what,
      index + 1,
      num_batches,
      f': {summary(arrays)}' if summary else '',
      rate,
      (num_batches - index - 1) / max(rate, 1e-9),
    )
  sharding_lib.wait_for_all_processes('batches_written')
  return [load_npz(path) for path in paths]
