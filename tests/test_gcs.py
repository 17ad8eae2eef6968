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
  * 'distill', 'sample_distilled': --mode=distill on it, then --mode=sample of its student.

Two processes that share only the server: tests/test_gcs_multihost.py.
"""

import json
import os
import signal
import time
import types
import urllib.parse

import numpy as np
import pytest

import gcs_harness as gh
import trainer_harness as th
from ddpm_jax import train

pytestmark = gh.skip_unless_available()
# The harness's module fixtures: this module's own server and fake data.
server, data_dirs = gh.server, gh.data_dirs

WORKDIR = f'gs://{gh.BUCKET}/run'
# Six steps, a checkpoint every two, every step's metrics, a sample grid at the end.
STEPS = dict(num_train_steps=6, checkpoint_every_steps=2, log_every_steps=1, sample_every_steps=6)
OUTAGE_S = 5
DISTILL_FLAGS = [
  '--config.distill.teacher_steps=4',
  '--config.distill.num_steps=2',
  '--config.distill.steps_per_round=2',
  '--config.distill.batch_size=8',
  '--config.distill.warmup_steps=0',
  '--config.distill.log_every_steps=1',
  '--config.distill.checkpoint_every_steps=2',
]
DISTILLED_SAMPLER = ['--config.sampling.sampler=distilled', '--config.sampling.num_steps=2']


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
      gh.start_trainer(
        server, f'gs://{bucket}/run', th.config_flags(unprepared, **STEPS), log, th.MAIN
      ),
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
  killed = gh.start_trainer(server, WORKDIR, flags, logs['killed'])
  _wait_for(lambda: gh.files_under(checkpoint_4) if os.path.isdir(checkpoint_4) else False,
            killed, 'checkpoint 4')  # fmt: skip
  killed.send_signal(signal.SIGKILL)
  results['killed'] = th.finish(killed, logs['killed'])
  times['killed'] = time.time() - start
  uploaded_at_kill = gh.files_under(checkpoint_4)

  # The same command: it waits out the dead trainer's lease, resumes, then pauses at step 3.
  go_on = str(root / 'go_on')
  start = time.time()
  resumed = gh.start_trainer(
    server, WORKDIR, flags, logs['resumed'], DDPM_TEST_WAIT_AT_STEP=f'3:{go_on}',
    GCS_RETRY_CONFIG_MAX_RETRIES='6',  # TF's own default is 10; the server is down for 5 s.
  )  # fmt: skip
  lock = server.path(f'{WORKDIR}/.train.lock')

  def lease_taken():
    with open(logs['resumed']) as f:
      return 'Took over' in f.read() and os.path.exists(lock)

  _wait_for(lease_taken, resumed, 'the lease taken over')
  second = gh.start_trainer(server, WORKDIR, flags, logs['second'], th.MAIN)
  results['second'] = th.finish(second, logs['second'])
  assert resumed.poll() is None, 'the resumed trainer ended while paused'
  # Unreachable storage as soon as checkpoint 4 is being uploaded again.
  released = time.time()
  open(go_on, 'w').close()

  def uploading_again():
    return any(
      os.path.getmtime(os.path.join(checkpoint_4, name)) > released
      for name in gh.files_under(checkpoint_4)
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
      gh.start_trainer(
        server, WORKDIR, th.config_flags(data_dirs) + [f'--mode={mode}'], log, th.MAIN
      ),
      log,
    )
    times[mode] = time.time() - start

  # --mode=distill on the trained gs:// workdir (one round: a 2-step student of a 4-step
  # teacher), then --mode=sample of that student.
  for mode, extra in (('distill', []), ('sample_distilled', DISTILLED_SAMPLER)):
    log = str(root / f'{mode}.log')
    start = time.time()
    results[mode] = th.finish(
      gh.start_trainer(
        server,
        WORKDIR,
        th.config_flags(data_dirs) + DISTILL_FLAGS + extra + [f'--mode={mode.split("_")[0]}'],
        log,
        th.MAIN,
      ),
      log,
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


def _a_missing_or_forbidden_bucket_fails_at_once_naming_it(runs):
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


def _sigkill_mid_upload_resumes_from_the_last_committed_step(runs):
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


def _the_restarted_run_equals_an_uninterrupted_one_bit_for_bit(runs):
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


def _a_second_trainer_on_a_gs_workdir_in_use_is_refused(runs):
  code, output = runs.results['second']
  assert code != 0, output[-5000:]
  assert 'is in use by another trainer' in output
  assert 'Training fashion_mnist_local' not in output


def _storage_unreachable_for_seconds_mid_run_loses_no_step(runs):
  # The outage hit checkpoint 4's upload...
  assert any('checkpoints/4/' in urllib.parse.unquote(r) for r in runs.dropped), runs.dropped
  # ...and the trainer lived through it and finished (the test above: all six
  # steps once, bit for bit): the clients retried.
  assert runs.outage_while_running
  code, output = runs.results['resumed']
  assert code == 0, output[-5000:]


def _throughput_is_in_the_progress_line(runs):
  _, output = runs.results['resumed']
  assert 'images/s' in output and 'TFLOP/s/device' in output
  # No peak is known for a CPU: MFU is left out, with the reason.
  assert 'MFU is left out' in output and 'MFU ' not in output.replace('MFU is left out', '')


def _sample_and_eval_on_gs(runs):
  for mode in ('sample', 'eval'):
    code, output = runs.results[mode]
    assert code == 0, output[-5000:]
  samples = os.path.join(runs.workdir, 'samples')
  npz = [
    name
    for name in os.listdir(samples)
    if name.endswith('.npz') and not name.startswith('distilled')
  ]
  assert len(npz) == 1, os.listdir(samples)
  with np.load(os.path.join(samples, npz[0])) as data:
    assert data['images'].shape == (runs.config.sampling.num_samples, 16, 16, 1)
  assert os.path.isfile(os.path.join(samples, npz[0][: -len('.npz')] + '.png'))
  with open(os.path.join(runs.workdir, 'eval', 'step_6.json')) as f:
    results = json.load(f)
  assert np.isfinite(results['bpd']['total_bpd'])
  assert np.isfinite(results['sample_quality']['fd_vs_train'])
  assert os.path.isfile(os.path.join(runs.workdir, 'eval', 'rate_distortion_step_6.png'))


def _distill_and_sample_the_student_on_gs(runs):
  for mode in ('distill', 'sample_distilled'):
    code, output = runs.results[mode]
    assert code == 0, output[-5000:]
  distilled = os.path.join(runs.workdir, 'distill')
  assert 'commit_success.txt' in os.listdir(os.path.join(distilled, 'students', '2'))
  assert [r['step'] for r in th.read_metrics(distilled)] == [1, 2]
  samples = os.path.join(runs.workdir, 'samples')
  npz = [
    n for n in os.listdir(samples) if n.startswith('distilled2_teacher4') and n.endswith('.npz')
  ]
  assert len(npz) == 1, os.listdir(samples)


def test_main_py_on_a_gs_workdir(runs):
  """Every check reads the same runs: one test, so that no two pytest-xdist workers redo them."""
  _a_missing_or_forbidden_bucket_fails_at_once_naming_it(runs)
  _sigkill_mid_upload_resumes_from_the_last_committed_step(runs)
  _the_restarted_run_equals_an_uninterrupted_one_bit_for_bit(runs)
  _a_second_trainer_on_a_gs_workdir_in_use_is_refused(runs)
  _storage_unreachable_for_seconds_mid_run_loses_no_step(runs)
  _throughput_is_in_the_progress_line(runs)
  _sample_and_eval_on_gs(runs)
  _distill_and_sample_the_student_on_gs(runs)
