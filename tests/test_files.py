"""ddpm_jax.files on local paths, and the part of ddpm_jax.gcs that needs no server.

Paths stay apart from URLs, files are written whole, appends append; a local
path needs no bucket check, and a bucket is listed once per process.
"""

import os

import numpy as np

from ddpm_jax import files
from ddpm_jax import gcs


def test_a_url_is_never_made_a_local_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.absolute('gs://bucket/run/') == 'gs://bucket/run'
  assert str(files.as_path('gs://bucket/run')) == 'gs://bucket/run'
  assert files.is_url('gs://bucket/run') and not files.is_url('runs/x')
  assert files.absolute('runs/x') == os.path.join(str(tmp_path), 'runs', 'x')
  assert not os.path.exists(tmp_path / 'gs:')


def test_local_writes_are_whole_and_appends_append(tmp_path):
  path = tmp_path / 'a' / 'b.jsonl'
  files.append_text(path, 'one\n')
  files.append_text(path, 'two\n')
  assert files.read_text(path) == 'one\ntwo\n'
  files.write_json(tmp_path / 'c' / 'd.json', {'x': 1})
  assert files.read_text(tmp_path / 'c' / 'd.json') == '{\n  "x": 1\n}'
  files.save_npz(tmp_path / 'e.npz', images=np.arange(3))
  np.testing.assert_array_equal(files.load_npz(tmp_path / 'e.npz')['images'], np.arange(3))
  # Nothing but the files themselves is left behind.
  assert sorted(os.listdir(tmp_path)) == ['a', 'c', 'e.npz']


def test_a_local_path_needs_no_storage_check(tmp_path):
  gcs.check_bucket(tmp_path / 'anything')  # Returns without a network call.


def test_a_bucket_is_listed_once_per_process(monkeypatch):
  listed = []

  class Client:
    def list_blobs(self, bucket, prefix, max_results):
      listed.append((bucket, prefix))
      return iter(())

  monkeypatch.setattr(gcs, '_client', Client)
  monkeypatch.setattr(gcs, '_usable_buckets', set())
  # main.py's start-up, then train_and_evaluate (or the model load), on one workdir.
  gcs.check_bucket('gs://bucket/run/')
  gcs.check_bucket('gs://bucket/run')
  gcs.check_bucket('gs://other/run')
  assert listed == [('bucket', 'run'), ('other', 'run')]
