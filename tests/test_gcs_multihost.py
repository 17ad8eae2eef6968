"""Two processes whose only shared storage is a Cloud Storage server, on `--workdir=gs://...`.

Both run main.py through JAX's distributed runtime inside the server's
network namespace (tests/gcs_harness.py), each with its own copy of the data
(as each host of a TPU slice has its own disk). Both are killed while
checkpoint 4 is being uploaded (the slice lost), then restarted with the
same command: they must resume from the last committed step and reach the
state one process reaches on the same global batches, and only the chief
may write the logs, the config and the samples.
"""

import os
import shutil
import signal
import time
import types

import pytest

import gcs_harness as gh
import trainer_harness as th
from ddpm_jax import input_pipeline
from ddpm_jax import train

pytestmark = gh.skip_unless_available()
# The harness's module fixtures: this module's own server and fake data.
server, data_dirs = gh.server, gh.data_dirs


TWO = dict(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=1, sample_every_steps=4)


def _launch(server, workdir, data_dirs, root, name):
  """Both processes of one run, started: [(process, log path)] by process id."""
  port = th.free_port()  # In the server's namespace every port is free.
  processes = []
  for process_id in range(2):
    own = data_dirs[process_id]
    log = str(root / f'{name}_{process_id}.log')
    process = gh.start_trainer(
      server, workdir, th.config_flags(own, **TWO), log, th.MAIN,
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(process_id), JAX_NUM_CPU_DEVICES='2',
    )  # fmt: skip
    processes.append((process, log))
  return processes


@pytest.fixture(scope='module')
def two(server, data_dirs, tmp_path_factory):
  """Two processes killed mid-upload of checkpoint 4, then restarted; one process's reference."""
  root = tmp_path_factory.mktemp('gcs_two')
  workdir = f'gs://{gh.BUCKET}/two'
  own_dirs = []
  for process_id in range(2):
    # Each process has its own copy of the data, as each host has its own disk.
    own = str(root / f'host{process_id}')
    shutil.copytree(os.path.dirname(data_dirs[0]), own)
    own_dirs.append((os.path.join(own, 'idx'), os.path.join(own, 'tfds')))
  killed = _launch(server, workdir, own_dirs, root, 'killed')
  # The whole slice is lost while checkpoint 4 is being uploaded.
  checkpoint_4 = server.path(f'{workdir}/checkpoints/4')
  deadline = time.time() + th.TIMEOUT_S
  while not gh.files_under(checkpoint_4) and time.time() < deadline:
    if any(p.poll() is not None for p, _ in killed):
      break
    time.sleep(0.02)
  chief_pids = {str(killed[0][0].pid)}
  for process, _ in killed:
    process.send_signal(signal.SIGKILL)
  uploaded_at_kill = gh.files_under(checkpoint_4)
  killed = [th.finish(p, log) for p, log in killed]
  restarted = _launch(server, workdir, own_dirs, root, 'restarted')
  chief_pids.add(str(restarted[0][0].pid))
  config = th.tiny_config(data_dirs, **TWO)
  reference = str(root / 'reference')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      input_pipeline, 'make_train_iterator', th.as_two_processes(input_pipeline.make_train_iterator)
    )
    train.train_and_evaluate(config, reference)
  restarted = [th.finish(p, log) for p, log in restarted]
  return types.SimpleNamespace(
    config=config,
    reference=reference,
    killed=killed,
    restarted=restarted,
    uploaded_at_kill=uploaded_at_kill,
    chief_pids=chief_pids,
    workdir=server.path(workdir),
  )


def test_two_processes_share_only_the_bucket(two):
  # Both processes were killed with checkpoint 4 part-uploaded, uncommitted.
  for code, output in two.killed:
    assert code == -signal.SIGKILL, output[-5000:]
  assert two.uploaded_at_kill and 'commit_success.txt' not in two.uploaded_at_kill
  # Both restarted from the last committed step, and finished.
  for process_id, (code, output) in enumerate(two.restarted):
    assert code == 0, output[-5000:]
    assert f'process {process_id} of 2, 2 local / 4 global devices' in output
    assert 'Resumed from step 2' in output
  assert th.committed_steps(two.workdir) == [2, 4]
  # The chief alone wrote the logs, the config and the samples.
  assert [r['step'] for r in th.read_metrics(two.workdir)] == [1, 2, 3, 4]
  events = [n for n in os.listdir(two.workdir) if n.startswith('events.out.tfevents')]
  # Event files are named ...<host>.<pid>.<n>.v2: only the chiefs' pids.
  assert events and all(name.split('.')[-3] in two.chief_pids for name in events), events
  assert os.listdir(os.path.join(two.workdir, 'samples')) == ['step_00000004.png']
  # The same training as one process on the same global batches (gloo's sums: float32 rounding).
  th.assert_states_close(
    th.restore(two.workdir, two.config), th.restore(two.reference, two.config), atol=1e-4
  )
