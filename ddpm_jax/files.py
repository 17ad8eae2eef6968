"""Paths, files written whole, and batch loops that survive a restart.

Every path the trainer, sampler and evaluator read or write goes through
here or through `etils.epath` (the path type of Orbax and TFDS): a local
path, or an object-storage URL such as `gs://bucket/run`, which etils serves
through `tf.io.gfile`. `absolute` makes a local path absolute and leaves a
URL alone (`os.path.abspath` would make `gs://b/run` a local folder `gs:`).

A reader (or a restarted run) never sees half a file: a local file is
written under a temporary name and renamed into place; an object is
uploaded whole, and Cloud Storage shows it only once complete. Appends,
which objects do not have, are composed on the server (`append_text`). The
batch loop writes each finished batch as its own file at once and skips the
ones a previous, interrupted run already wrote, so a long job resumes where
it stopped and ends with the same result. On object storage an exclusive
lease (`ObjectLease`) stands in for an flock. docs/reliability.md has what
replaces rename, append and flock there.
"""

import io
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any
from collections.abc import Callable, Iterable

import jax
import numpy as np
from etils import epath

from ddpm_jax import errors
from ddpm_jax import sharding as sharding_lib

PathLike = str | os.PathLike
StorageError = errors.StorageError
# A composite object holds at most 1024 components (Cloud Storage's limit);
# past this many, an append rewrites the object whole, which resets the count.
_MAX_COMPONENTS = 1000


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
  """Creates the folder and its parents (object storage: a placeholder, after `check_storage`)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
  """The whole file (or object)."""
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  """The whole file (or object), as text."""
  return as_path(path).read_text()


def _gcs_location(path: PathLike) -> tuple[str, str]:
  """(bucket, object name) of a gs:// URL; ValueError for another scheme."""
  url = absolute(path)
  if not url.startswith('gs://'):
    raise ValueError(
      f'{url}: object storage other than Google Cloud Storage (gs://) is not supported.'
    )
  bucket, _, name = url[len('gs://') :].partition('/')
  return bucket, name


def gcs_client():
  """A google-cloud-storage client (default credentials, or $STORAGE_EMULATOR_HOST)."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  if os.environ.get('STORAGE_EMULATOR_HOST'):
    # An emulator has no credentials and no projects.
    return storage.Client(project='emulated')
  return storage.Client()


def gcs_blob(path: PathLike, client=None):
  """The `google.cloud.storage.Blob` of a gs:// URL (a lock, or an append target)."""
  bucket, name = _gcs_location(path)
  return (client or gcs_client()).bucket(bucket).blob(name)


def check_storage(path: PathLike) -> None:
  """Fails at once, naming the bucket, when `path`'s bucket is missing or not ours.

  A local path passes. Against a missing bucket, `tf.io.gfile.makedirs`
  would retry without end; one listing answers at once.

  Raises:
    errors.StorageError: the bucket does not exist, or this machine may not list it.
    ValueError: a URL scheme other than gs://.
  """
  if not is_url(path):
    return
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top

  bucket, name = _gcs_location(path)
  try:
    next(iter(gcs_client().list_blobs(bucket, prefix=name, max_results=1)), None)
  except exceptions.NotFound:
    raise errors.StorageError(
      f'The bucket gs://{bucket} (of {absolute(path)}) does not exist: create it '
      f'(gcloud storage buckets create gs://{bucket}) or fix the path.'
    ) from None
  except exceptions.Forbidden as e:
    raise errors.StorageError(
      f'No permission on the bucket gs://{bucket} (of {absolute(path)}): {e.message}. '
      "Grant this machine's service account roles/storage.objectAdmin on it."
    ) from None
  except auth_exceptions.DefaultCredentialsError as e:
    raise errors.StorageError(
      f'No Google Cloud credentials to reach gs://{bucket}: {e}. On a TPU or GCE VM they come '
      'from the metadata server; elsewhere run `gcloud auth application-default login`.'
    ) from None


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
  """Adds `text` at the end of the file (created if missing).

  Locally an append. An object cannot be appended to: `text` is uploaded as
  a part and composed onto the object on the server, which replaces the
  object in one step, so a reader sees it before or after, never between.
  Every request carries a generation precondition, which makes it safe for
  the client to retry through a storage outage: a retried compose cannot
  append twice.
  """
  if not is_url(path):
    path = absolute(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as f:
      f.write(text)
    return
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

  data = text.encode()
  target = gcs_blob(path)
  try:
    target.reload()
  except exceptions.NotFound:
    target.upload_from_string(data, if_generation_match=0)
    return
  generation, size = target.generation, target.size
  if (target.component_count or 0) >= _MAX_COMPONENTS:
    old = target.download_as_bytes(if_generation_match=generation)
    target.upload_from_string(old + data, if_generation_match=generation)
    return
  part = target.bucket.blob(f'{target.name}.part-{uuid.uuid4().hex}')
  part.upload_from_string(data, if_generation_match=0)
  try:
    target.compose([target, part], if_generation_match=generation)
  except exceptions.PreconditionFailed:
    # A retry of a compose that had succeeded: the object already ends with the part.
    now = target.bucket.get_blob(target.name)
    if now is None or now.size != size + len(data):
      raise
  finally:
    part.delete()


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


class LeaseHeld(Exception):
  """Another holder renews the lease (its message says who)."""


class ObjectLease:
  """An exclusive lease on object storage, in place of an flock.

  The lease is an object created only if absent (a generation precondition,
  `if_generation_match=0`), so of two processes starting at once exactly one
  gets it. A background thread renews it every `seconds / 4`, each time only
  if it is still the generation this holder wrote. A holder that dies
  (SIGKILL, a lost VM) leaves the object behind; a newcomer that sees no
  renewal for `seconds` takes it over, again with a precondition, so only
  one newcomer can. Use as a context manager; leaving it deletes the object.
  """

  def __init__(self, url: PathLike, *, seconds: float):
    """Acquires the lease, waiting up to `seconds` for a silent holder to expire.

    Raises:
      LeaseHeld: the lease is renewed by someone else.
      StorageError: via `check_storage` where the bucket is unusable.
    """
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    self.url = absolute(url)
    self.seconds = float(seconds)
    self._exceptions = exceptions
    self._blob = gcs_blob(self.url)
    self._id = uuid.uuid4().hex
    self._record = json.dumps(
      {
        'host': os.uname().nodename,
        'pid': os.getpid(),
        'lease_seconds': self.seconds,
        'id': self._id,
      }
    )
    self._lost: str | None = None
    self._stop = None
    self._thread = None
    self.generation = self._acquire()

  def _acquire(self) -> int:
    blob, exceptions = self._blob, self._exceptions
    watched = None  # (generation, deadline): a holder seen, and when its lease runs out.
    while True:
      try:
        blob.upload_from_string(self._record, if_generation_match=0)
        return blob.generation
      except exceptions.PreconditionFailed:
        pass
      current = self._current()
      if current is None:
        time.sleep(0.1)
        continue  # Released in between: try to create it again.
      generation = current.generation
      if watched is None:
        holder, lease = self._holder()
        logging.warning(
          '%s is held by %s; waiting up to %.0f s to see whether it is renewed '
          '(a crashed trainer leaves it behind).',
          self.url,
          holder,
          lease,
        )
        watched = (generation, time.time() + lease, holder, lease)
      elif generation != watched[0]:
        raise LeaseHeld(f'{self.url} is renewed by {watched[2]}')
      elif time.time() >= watched[1]:
        try:
          blob.upload_from_string(self._record, if_generation_match=generation)
        except exceptions.PreconditionFailed:
          raise LeaseHeld(f'{self.url} was taken over by another process just now') from None
        logging.warning('Took over %s: it had not been renewed for %.0f s.', self.url, watched[3])
        return blob.generation
      time.sleep(min(1.0, watched[3] / 8))

  def _current(self):
    """The lease object as it is now (None when absent).

    A fresh Blob each time: a Blob that has read a generation asks for that
    generation again, which is gone once the holder renews.
    """
    return self._blob.bucket.get_blob(self._blob.name)

  def _holder(self) -> tuple[str, float]:
    """(the holder's record, its lease in seconds, at least ours)."""
    try:
      holder = self._blob.bucket.blob(self._blob.name).download_as_text()
      lease = float(json.loads(holder).get('lease_seconds', 0))
    except Exception:  # pylint: disable=broad-except
      return 'an unknown holder', self.seconds
    return holder, max(self.seconds, lease)

  def __enter__(self):
    import threading  # pylint: disable=g-import-not-at-top

    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, name='ddpm_jax lease', daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    try:
      self._blob.delete(if_generation_match=self.generation)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not release %s: %s: %s', self.url, type(e).__name__, e)

  def _renew(self):
    while not self._stop.wait(self.seconds / 4):
      try:
        self._blob.upload_from_string(self._record, if_generation_match=self.generation)
        self.generation = self._blob.generation
      except self._exceptions.PreconditionFailed:
        if self._still_ours():
          continue  # A retried renewal whose first attempt had gone through.
        self._lost = (
          f'the lease {self.url} was taken over by another process (it had not been renewed '
          f'for {self.seconds:.0f} s)'
        )
        logging.error('Lost %s.', self.url)
        return
      except Exception as e:  # pylint: disable=broad-except
        # Unreachable storage: keep trying; the lease lasts `seconds`.
        logging.warning('Renewing %s failed (%s: %s); retrying.', self.url, type(e).__name__, e)

  def _still_ours(self) -> bool:
    try:
      current = self._current()
      generation = current.generation
      record = json.loads(current.download_as_text(if_generation_match=generation))
    except Exception:  # pylint: disable=broad-except
      return False
    if record.get('id') != self._id:
      return False
    self.generation = generation
    return True

  def check(self) -> None:
    """Raises errors.TrainingError if the lease was lost to another process."""
    if self._lost:
      raise errors.TrainingError(f'Stopped: {self._lost}.')
