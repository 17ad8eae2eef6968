"""Cloud Storage for a workdir in a bucket (a TPU VM's): a check, appends, a lease.

A gs:// workdir is written through `tf.io.gfile` and tensorstore like a
local one (ddpm_jax/files.py), but object storage has no rename, no append
and no flock. Whole uploads replace the rename; this module holds the rest,
through google-cloud-storage:

  * `check_bucket`: one listing that names a missing or forbidden bucket at
    once, where `tf.io.gfile` would retry without end;
  * `append_text`: an append composed on the server, with generation
    preconditions so a retried request cannot append twice;
  * `Lease`: an exclusive lease (an object created only if absent, renewed
    by a heartbeat) in place of the trainer's flock on the workdir.

docs/reliability.md has the details and the tests that prove each.
"""

import json
import logging
import os
import threading
import time
import uuid

from ddpm_jax import errors

StorageError = errors.StorageError
# A composite object holds at most 1024 components (Cloud Storage's limit);
# past this many, an append rewrites the object whole, which resets the count.
_MAX_COMPONENTS = 1000
# Every entry point checks its workdir (main.py's start-up, training, the
# model load for sampling): a bucket found usable is not listed again.
_usable_buckets: set[str] = set()


def _location(url: str) -> tuple[str, str]:
  """(bucket, object name) of a gs:// URL; ValueError for another scheme."""
  url = url.rstrip('/')
  if not url.startswith('gs://'):
    raise ValueError(
      f'{url}: object storage other than Google Cloud Storage (gs://) is not supported.'
    )
  bucket, _, name = url[len('gs://') :].partition('/')
  return bucket, name


def _client():
  """A google-cloud-storage client (default credentials, or $STORAGE_EMULATOR_HOST)."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  if os.environ.get('STORAGE_EMULATOR_HOST'):
    # An emulator has no credentials and no projects.
    return storage.Client(project='emulated')
  return storage.Client()


def _blob(url: str):
  """The `google.cloud.storage.Blob` of a gs:// URL."""
  bucket, name = _location(url)
  return _client().bucket(bucket).blob(name)


def check_bucket(path: str | os.PathLike) -> None:
  """Fails at once, naming the bucket, when `path`'s bucket is missing or not ours.

  A local path passes: it has no bucket. A bucket is listed once per
  process; later calls on it return at once.

  Raises:
    errors.StorageError: the bucket does not exist, or this machine may not list it.
    ValueError: a URL scheme other than gs://.
  """
  url = os.fspath(path)
  if '://' not in url:
    return
  bucket, name = _location(url)
  if bucket in _usable_buckets:
    return
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top

  try:
    next(iter(_client().list_blobs(bucket, prefix=name, max_results=1)), None)
  except exceptions.NotFound:
    raise StorageError(
      f'The bucket gs://{bucket} (of {url}) does not exist: create it '
      f'(gcloud storage buckets create gs://{bucket}) or fix the path.'
    ) from None
  except exceptions.Forbidden as e:
    raise StorageError(
      f'No permission on the bucket gs://{bucket} (of {url}): {e.message}. '
      "Grant this machine's service account roles/storage.objectAdmin on it."
    ) from None
  except auth_exceptions.DefaultCredentialsError as e:
    raise StorageError(
      f'No Google Cloud credentials to reach gs://{bucket}: {e}. On a TPU or GCE VM they come '
      'from the metadata server; elsewhere run `gcloud auth application-default login`.'
    ) from None
  _usable_buckets.add(bucket)


def append_text(url: str, text: str) -> None:
  """Adds `text` at the end of the object at gs:// `url` (created if missing).

  An object cannot be appended to: `text` is uploaded as a part and
  composed onto the object on the server, which replaces the object in one
  step, so a reader sees it before or after, never between. Every request
  carries a generation precondition, which makes it safe for the client to
  retry through a storage outage: a retried compose cannot append twice.
  """
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

  data = text.encode()
  target = _blob(url)
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


class LeaseHeld(Exception):
  """Another holder renews the lease (its message says who)."""


class Lease:
  """An exclusive lease on an object, in place of an flock.

  The lease is an object created only if absent (a generation precondition,
  `if_generation_match=0`), so of two processes starting at once exactly one
  gets it. A background thread renews it every `seconds / 4`, each time only
  if it is still the generation this holder wrote. A holder that dies
  (SIGKILL, a lost VM) leaves the object behind; a newcomer that sees no
  renewal for `seconds` takes it over, again with a precondition, so only
  one newcomer can. Use as a context manager; leaving it deletes the object.
  """

  def __init__(self, url: str, *, seconds: float):
    """Acquires the lease at gs:// `url`, waiting up to `seconds` for a silent holder to expire.

    Raises:
      LeaseHeld: the lease is renewed by someone else.
    """
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    self.url = url.rstrip('/')
    self.seconds = float(seconds)
    self._exceptions = exceptions
    self._blob = _blob(self.url)
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
