"""Files written whole, and batch loops that survive a restart.

A reader (or a restarted run) never sees half a file: every file is written
under a temporary name and renamed into place. The batch loop writes each
finished batch as its own file at once and skips the ones a previous,
interrupted run already wrote, so a long job resumes where it stopped and
ends with the same result.
"""

import json
import logging
import os
import time
from typing import Any
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)`, then renames tmp_path to `path`; makes the folder.

  The temporary name keeps `path`'s extension, for writers that pick the
  format from it (NumPy, matplotlib, PIL).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{ext}'
  write(tmp)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` whole."""

  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)

  atomic_write(path, write)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` whole."""

  def write(tmp):
    with open(tmp, 'wb') as f:
      f.write(data)

  atomic_write(path, write)


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON to `path` whole."""
  write_text(path, json.dumps(value, indent=2))


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """np.savez to `path` whole."""
  atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def resumable_batches(
  out_dir: str,
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
  os.makedirs(out_dir, exist_ok=True)
  is_chief = jax.process_index() == 0
  paths = [os.path.join(out_dir, f'batch_{index:05d}.npz') for index in range(num_batches)]
  start, done_now = time.time(), 0
  for index, item in zip(range(num_batches), inputs):
    if os.path.exists(paths[index]):
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
  multihost_utils.sync_global_devices(f'ddpm_jax batches written: {out_dir}')
  batches = []
  for path in paths:
    with np.load(path) as data:
      batches.append({name: data[name] for name in data.files})
  return batches
