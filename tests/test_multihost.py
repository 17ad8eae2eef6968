"""Two processes on this machine train as one, through JAX's distributed runtime.

Each process runs tests/train_subprocess.py (main.py) with
JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=2 and its
JAX_PROCESS_ID, on two CPU devices, exchanging gradients through gloo, and
reads its own half of the data (the input pipeline splits by process). They
must reach the state that one process reaches on four devices with the same
global batches, and both must stop at the same step when only one of them is
sent a preemption notice (SIGTERM, caught by JAX's preemption service).
"""

import re
import signal
import time
import types

import numpy as np
import pytest

import trainer_harness as th
from ddpm_jax import input_pipeline
from ddpm_jax import train

# Long enough that the preemption notice always arrives first (it takes a few
# steps to reach both processes); the run stops there.
STEPS = dict(num_train_steps=40, checkpoint_every_steps=40, log_every_steps=1, sample_every_steps=0)
# How long the other process may run on once one has failed (it would wait
# for its partner until the distributed runtime's heartbeat timeout).
_GRACE_S = 30


def _launch_two(workdir, flags, log_prefix, **fault):
  """Runs both processes to their end: [(return code, output)] by process id."""
  port = th.free_port()
  processes = []
  for process_id in range(2):
    env = th.child_env(
      JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
      JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(process_id),
      JAX_NUM_CPU_DEVICES='2',
      **fault,
    )
    log = f'{log_prefix}_{process_id}.log'
    processes.append((th.start_trainer(workdir, flags, env=env, log_path=log), log))
  deadline = time.time() + th.TIMEOUT_S
  while time.time() < deadline and any(p.poll() is None for p, _ in processes):
    if any(p.poll() not in (None, 0) for p, _ in processes):
      deadline = min(deadline, time.time() + _GRACE_S)
    time.sleep(0.5)
  return [th.finish(p, log) for p, log in processes]  # Kills what still runs.


def _preempted_step(results):
  steps = set()
  for code, output in results:
    assert code == 0, output[-5000:]
    steps.update(re.findall(r'Preempted: committed the checkpoint of step (\d+)', output))
  assert len(steps) == 1, steps
  return int(steps.pop())


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two processes' run, preempted at some step; then one process's run to that step."""
  root = tmp_path_factory.mktemp('multihost')
  data_dirs = th.make_data(str(root / 'data'))
  # Process 1 reaches the first step 40 s late, longer than the CPU collectives
  # wait for a partner (30 s), and gets SIGTERM while drawing the batch of step
  # 2; process 0 gets nothing.
  workdir = str(root / 'two_processes')
  results = _launch_two(
    workdir,
    th.config_flags(data_dirs, **STEPS),
    str(root / 'process'),
    DDPM_TEST_SIGNAL_AT_STEP=f'{int(signal.SIGTERM)}:2',
    DDPM_TEST_SIGNAL_PROCESS='1',
    DDPM_TEST_LATE_PROCESS='1:40',
  )
  step = _preempted_step(results)
  reference = str(root / 'one_process')
  config = th.tiny_config(
    data_dirs, **dict(STEPS, num_train_steps=step, checkpoint_every_steps=step)
  )
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      input_pipeline, 'make_train_iterator', th.as_two_processes(input_pipeline.make_train_iterator)
    )
    train.train_and_evaluate(config, reference)
  return types.SimpleNamespace(
    config=config, reference=reference, workdir=workdir, results=results, step=step
  )


def test_both_processes_join_one_run(runs):
  for process_id, (code, output) in enumerate(runs.results):
    assert code == 0, output[-5000:]
    assert f'process {process_id} of 2, 2 local / 4 global devices' in output


def test_a_preemption_notice_to_one_process_checkpoints_the_same_step_on_both(runs):
  # Both processes logged the same step, and it is the only checkpoint.
  assert 2 < runs.step < STEPS['num_train_steps']
  assert th.committed_steps(runs.workdir) == [runs.step]


def test_two_processes_train_to_the_one_process_state(runs):
  step = runs.step
  # The same sums in another order (gloo across processes, then within
  # them): every step's loss and gradient norm agree to float32 rounding...
  two, one = th.read_metrics(runs.workdir), th.read_metrics(runs.reference)
  assert [r['step'] for r in two] == [r['step'] for r in one] == list(range(1, step + 1))
  for name in ('loss', 'grad_norm', 'learning_rate', 'finite'):
    np.testing.assert_allclose([r[name] for r in two], [r[name] for r in one], rtol=1e-5)
  # ...and the parameters, which move by about the learning rate (1e-3) a
  # step, to 2.5% of that a step (Adam's first steps are sign-like, so a
  # gradient near zero may flip a parameter's step).
  th.assert_states_close(
    th.restore(runs.workdir, runs.config),
    th.restore(runs.reference, runs.config),
    atol=2.5e-5 * step,
  )
