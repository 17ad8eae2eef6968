"""The trainer, sampler and evaluator with `--workdir=gs://...`, against a storage server.

A real Cloud Storage API server (fake-gcs-server, tests/gcs_harness.py) runs
on localhost in a network namespace of its own, and main.py runs inside it
through all three clients (TensorFlow's GCS filesystem, tensorstore,
google-cloud-storage). The test process reads the objects straight from the
server's filesystem root, where each object is a plain file (checkpoints are
restored from there as local folders). One server serves the module, and the
runs are shared between the assertions:

  * 'missing' and 'forbidden': a bucket that does not exist, and one that
    answers 403, on an unprepared data dir;
  * 'killed': SIGKILL as soon as checkpoint 4's first object appears on the
    server, i.e. in the middle of its upload;
  * 'resumed': the same command again; it pauses after step 3 while a second
    trainer is refused, then the server is unreachable for a few seconds
    from the moment checkpoint 4 is being uploaded again;
  * 'sample', 'eval': --mode=sample and --mode=eval on the same workdir;
  * two processes (JAX's distributed runtime) whose only shared storage is
    the server: each has its own copy of the data.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.parse

import numpy as np
import pytest

import gcs_harness as gh
import trainer_harness as th
from ddpm_jax import input_pipeline
from ddpm_jax import train

_UNAVAILABLE = gh.unavailable_reason()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f'GCS server: {_UNAVAILABLE}')

WORKDIR = f'gs://{gh.BUCKET}/run'
# Six steps, a checkpoint every two, every step's metrics, a sample grid at the end.
STEPS = dict(num_train_steps=6, checkpoint_every_steps=2, log_every_steps=1, sample_every_steps=6)
# A crashed trainer's lease on the workdir is taken over after this many seconds.
LEASE_S = 4
OUTAGE_S = 5


def _files_under(directory):
  return sorted(
    os.path.relpath(os.path.join(root, name), directory)
    for root, _, names in os.walk(directory)
    for name in names
  )


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  gcs = gh.GcsServer(str(tmp_path_factory.mktemp('gcs'))).start()
  yield gcs
  gcs.stop()


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
  return th.make_data(str(tmp_path_factory.mktemp('data')))


def _start(server, workdir, flags, log_path, script=th.LAUNCHER, **env):
  """A trainer (main.py's flags) inside the server's network namespace, output to `log_path`."""
  cmd = server.command([sys.executable, script, f'--workdir={workdir}', *flags])
  environment = th.child_env(**{**server.env(), 'DDPM_JAX_LEASE_SECONDS': str(LEASE_S), **env})
  with open(log_path, 'w') as log:
    return subprocess.Popen(
      cmd, cwd=th.REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(condition, process, what, timeout=th.TIMEOUT_S):
  deadline = time.time() + timeout
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f'the trainer ended ({process.returncode}) before {what}')
    if time.time() > deadline:
      raise AssertionError(f'no {what} within {timeout} s')
    time.sleep(0.02)


@pytest.fixture(scope='module')
def runs(server, data_dirs, tmp_path_factory):
  root = tmp_path_factory.mktemp('gcs_runs')
  flags = th.config_flags(data_dirs, **STEPS)
  logs = {name: str(root / f'{name}.log') for name in ('killed', 'second', 'resumed')}
  times = {}

  # Bad buckets, on a data dir of their own: a failing run must not prepare it.
  unprepared = (data_dirs[0], str(root / 'tfds_unprepared'))
  bad = {}
  for name, bucket in (('missing', 'no-such-bucket'), ('forbidden', 'forbidden-bucket')):
    log = str(root / f'{name}.log')
    bad[name] = (
      _start(server, f'gs://{bucket}/run', th.config_flags(unprepared, **STEPS), log, th.MAIN),
      log,
      time.time(),
    )

  # The uninterrupted run, in process on a local disk.
  config = th.tiny_config(data_dirs, **STEPS)
  reference = str(root / 'reference')
  train.train_and_evaluate(config, reference)

  results = {}
  for name, (process, log, start) in bad.items():
    results[name] = th.finish(process, log)
    times[name] = os.path.getmtime(log) - start  # Its last output: when it stopped.

  # SIGKILL in the middle of checkpoint 4's upload.
  checkpoint_4 = server.path(f'{WORKDIR}/checkpoints/4')
  start = time.time()
  killed = _start(server, WORKDIR, flags, logs['killed'])
  _wait_for(lambda: _files_under(checkpoint_4) if os.path.isdir(checkpoint_4) else False,
            killed, 'checkpoint 4')  # fmt: skip
  killed.send_signal(signal.SIGKILL)
  results['killed'] = th.finish(killed, logs['killed'])
  times['killed'] = time.time() - start
  uploaded_at_kill = _files_under(checkpoint_4)

  # The same command: it waits out the dead trainer's lease, resumes, then pauses at step 3.
  go_on = str(root / 'go_on')
  start = time.time()
  resumed = _start(
    server, WORKDIR, flags, logs['resumed'], DDPM_TEST_WAIT_AT_STEP=f'3:{go_on}',
    GCS_RETRY_CONFIG_MAX_RETRIES='6',  # TF's own default is 10; the server is down for 5 s.
  )  # fmt: skip
  lock = server.path(f'{WORKDIR}/.train.lock')

  def lease_taken():
    with open(logs['resumed']) as f:
      return 'Took over' in f.read() and os.path.exists(lock)

  _wait_for(lease_taken, resumed, 'the lease taken over')
  second = _start(server, WORKDIR, flags, logs['second'], th.MAIN)
  results['second'] = th.finish(second, logs['second'])
  assert resumed.poll() is None, 'the resumed trainer ended while paused'
  # Unreachable storage as soon as checkpoint 4 is being uploaded again.
  released = time.time()
  open(go_on, 'w').close()

  def uploading_again():
    return any(
      os.path.getmtime(os.path.join(checkpoint_4, name)) > released
      for name in _files_under(checkpoint_4)
    )

  _wait_for(uploading_again, resumed, 'checkpoint 4 uploading again')
  server.set_down(True)
  time.sleep(OUTAGE_S)
  server.set_down(False)
  outage_while_running = resumed.poll() is None
  results['resumed'] = th.finish(resumed, logs['resumed'])
  times['resumed'] = time.time() - start

  for mode in ('sample', 'eval'):
    log = str(root / f'{mode}.log')
    start = time.time()
    results[mode] = th.finish(
      _start(server, WORKDIR, th.config_flags(data_dirs) + [f'--mode={mode}'], log, th.MAIN), log
    )
    times[mode] = time.time() - start
  print('GCS run wall times (s):', {k: round(v, 1) for k, v in times.items()})
  return types.SimpleNamespace(
    config=config,
    reference=reference,
    results=results,
    uploaded_at_kill=uploaded_at_kill,
    outage_while_running=outage_while_running,
    dropped=server.dropped(),
    workdir=server.path(WORKDIR),
    unprepared=unprepared[1],
  )


def test_a_missing_or_forbidden_bucket_fails_at_once_naming_it(runs):
  for name, bucket in (('missing', 'no-such-bucket'), ('forbidden', 'forbidden-bucket')):
    code, output = runs.results[name]
    assert code != 0, output[-5000:]
    assert 'StorageError' in output, output[-5000:]
    assert f'gs://{bucket}' in output
    assert ('does not exist' if name == 'missing' else 'No permission') in output
    # Before any data was prepared or anything compiled.
    assert 'Training fashion_mnist_local' not in output
  assert not os.path.exists(runs.unprepared)
  assert not os.path.exists(os.path.join(th.REPO, 'gs:'))


def test_sigkill_mid_upload_resumes_from_the_last_committed_step(runs):
  code, output = runs.results['killed']
  assert code == -signal.SIGKILL, output[-5000:]
  # Killed with part of checkpoint 4 uploaded and its commit marker missing.
  assert runs.uploaded_at_kill
  assert 'commit_success.txt' not in runs.uploaded_at_kill
  code, output = runs.results['resumed']
  assert code == 0, output[-5000:]
  assert 'Resumed from step 2' in output
  assert f'Took over {WORKDIR}/.train.lock' in output
  assert th.committed_steps(runs.workdir) == [2, 4, 6]
  for step in (2, 4, 6):
    assert os.path.isfile(
      os.path.join(runs.workdir, 'checkpoints', str(step), 'commit_success.txt')
    )


def test_the_restarted_run_equals_an_uninterrupted_one_bit_for_bit(runs):
  final = th.restore(runs.workdir, runs.config)
  assert int(final.step) == 6
  th.assert_states_equal(final, th.restore(runs.reference, runs.config))
  # metrics.jsonl, appended by composing objects and cut back on resume: every step once.
  metrics = th.read_metrics(runs.workdir)
  assert [r['step'] for r in metrics] == list(range(1, 7))
  assert metrics == th.read_metrics(runs.reference)
  # Every other object is there too, written whole.
  assert json.load(open(os.path.join(runs.workdir, 'config.json')))['seed'] == runs.config.seed
  assert os.path.isfile(os.path.join(runs.workdir, 'samples', 'step_00000006.png'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(runs.workdir))


def test_a_second_trainer_on_a_gs_workdir_in_use_is_refused(runs):
  code, output = runs.results['second']
  assert code != 0, output[-5000:]
  assert 'is in use by another trainer' in output
  assert 'Training fashion_mnist_local' not in output


def test_storage_unreachable_for_seconds_mid_run_loses_no_step(runs):
  # The outage hit checkpoint 4's upload...
  assert any('checkpoints/4/' in urllib.parse.unquote(r) for r in runs.dropped), runs.dropped
  # ...and the trainer lived through it and finished (the test above: all six
  # steps once, bit for bit): the clients retried.
  assert runs.outage_while_running
  code, output = runs.results['resumed']
  assert code == 0, output[-5000:]


def test_throughput_is_in_the_progress_line(runs):
  _, output = runs.results['resumed']
  assert 'images/s' in output and 'TFLOP/s/device' in output
  # No peak is known for a CPU: MFU is left out, with the reason.
  assert 'MFU is left out' in output and 'MFU ' not in output.replace('MFU is left out', '')


def test_sample_and_eval_on_gs(runs):
  for mode in ('sample', 'eval'):
    code, output = runs.results[mode]
    assert code == 0, output[-5000:]
  samples = os.path.join(runs.workdir, 'samples')
  npz = [name for name in os.listdir(samples) if name.endswith('.npz')]
  assert len(npz) == 1, os.listdir(samples)
  with np.load(os.path.join(samples, npz[0])) as data:
    assert data['images'].shape == (runs.config.sampling.num_samples, 16, 16, 1)
  assert os.path.isfile(os.path.join(samples, npz[0][: -len('.npz')] + '.png'))
  with open(os.path.join(runs.workdir, 'eval', 'step_6.json')) as f:
    results = json.load(f)
  assert np.isfinite(results['bpd']['total_bpd'])
  assert np.isfinite(results['sample_quality']['fd_vs_train'])
  assert os.path.isfile(os.path.join(runs.workdir, 'eval', 'rate_distortion_step_6.png'))


# ---------------------------------------------------------------------------
# Two processes without a shared disk.

TWO = dict(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=1, sample_every_steps=4)


def _as_two_processes(make_train_iterator):
  """One process's stand-in for `make_train_iterator` that yields two processes' global batch."""

  def make(config, *, start_step=0, process_index=None, process_count=None):
    del process_index, process_count
    streams = [
      make_train_iterator(config, start_step=start_step, process_index=p, process_count=2)
      for p in range(2)
    ]
    while True:
      yield {'image': np.concatenate([next(s)['image'] for s in streams])}

  return make


@pytest.fixture(scope='module')
def two(server, data_dirs, tmp_path_factory):
  root = tmp_path_factory.mktemp('gcs_two')
  workdir = f'gs://{gh.BUCKET}/two'
  port = th.free_port()  # In the server's namespace every port is free.
  processes = []
  for process_id in range(2):
    # Each process has its own copy of the data, as each host has its own disk.
    own = str(root / f'host{process_id}')
    shutil.copytree(os.path.dirname(data_dirs[0]), own)
    own_dirs = (os.path.join(own, 'idx'), os.path.join(own, 'tfds'))
    log = str(root / f'process_{process_id}.log')
    process = _start(
      server, workdir, th.config_flags(own_dirs, **TWO), log, th.MAIN,
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(process_id), JAX_NUM_CPU_DEVICES='2',
    )  # fmt: skip
    processes.append((process, log))
  config = th.tiny_config(data_dirs, **TWO)
  reference = str(root / 'reference')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      input_pipeline, 'make_train_iterator', _as_two_processes(input_pipeline.make_train_iterator)
    )
    train.train_and_evaluate(config, reference)
  results = [th.finish(p, log) for p, log in processes]
  return types.SimpleNamespace(
    config=config, reference=reference, results=results, workdir=server.path(workdir)
  )


def test_two_processes_share_only_the_bucket(two):
  for process_id, (code, output) in enumerate(two.results):
    assert code == 0, output[-5000:]
    assert f'process {process_id} of 2, 2 local / 4 global devices' in output
  assert th.committed_steps(two.workdir) == [2, 4]
  # The chief alone wrote the logs, the config and the samples: one of each.
  assert [r['step'] for r in th.read_metrics(two.workdir)] == [1, 2, 3, 4]
  assert len([n for n in os.listdir(two.workdir) if n.startswith('events.out.tfevents')]) == 1
  assert os.listdir(os.path.join(two.workdir, 'samples')) == ['step_00000004.png']
  # The same training as one process on the same global batches (gloo's sums: float32 rounding).
  th.assert_states_close(
    th.restore(two.workdir, two.config), th.restore(two.reference, two.config), atol=1e-4
  )
