"""Runs main.py with an injected fault; the trainer that tests/test_reliability.py kills.

    python tests/train_subprocess.py --config=configs/tiny.py --workdir=DIR [overrides]

takes main.py's flags. Faults come from the environment (all optional):

  DDPM_TEST_SIGNAL_AT_STEP=SIG:STEP  sends signal SIG (9 = SIGKILL, 15 = SIGTERM)
      to this process when the batch of global step STEP is drawn, i.e. with
      the steps before it dispatched and possibly still running.
  DDPM_TEST_SIGNAL_PROCESS=I  only process I of a multi-process run does so.
  DDPM_TEST_WAIT_AT_STEP=STEP:PATH  when the batch of global step STEP is
      drawn, waits until the file PATH exists (a test orchestrates faults
      around a trainer paused at a known step).
  DDPM_TEST_LATE_PROCESS=I:SECONDS  process I of a multi-process run sleeps
      SECONDS before drawing its first batch: a partner that reaches the first
      training step late, as a slower machine's would.
  DDPM_TEST_KILL_AT_COMMIT=STEP  SIGKILL while checkpoint STEP is committed:
      its files are complete and marked successful inside the temporary
      folder, but the rename that commits it has not happened.
"""

import os
import signal
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from absl import app  # noqa: E402

import main  # noqa: E402  (defines the flags)


def _at_step(at_step: int, action) -> None:
  """Wraps the training iterator so that drawing batch `at_step` calls `action()`."""
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  make_train_iterator = input_pipeline.make_train_iterator

  def wrapped(config, *, start_step=0, **kwargs):
    batches = make_train_iterator(config, start_step=start_step, **kwargs)

    def generate():
      for step, batch in enumerate(batches, start=start_step):
        if step == at_step:
          action()
        yield batch

    return generate()

  input_pipeline.make_train_iterator = wrapped


def _signal_at_step(sig: int, at_step: int) -> None:
  _at_step(at_step, lambda: os.kill(os.getpid(), sig))


def _wait_at_step(at_step: int, path: str) -> None:
  def wait():
    while not os.path.exists(path):
      time.sleep(0.05)

  _at_step(at_step, wait)


def _kill_at_commit(at_step: int) -> None:
  """SIGKILL between the last file of checkpoint `at_step` and its commit (a rename)."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize_or_die(self):
    if self.get_final().name == str(at_step):
      # Everything but the rename: the most complete folder a crash can leave.
      (self.get() / atomicity.COMMIT_SUCCESS_FILE).write_text('written before the crash')
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


def _install_faults() -> None:
  env = os.environ
  process = env.get('DDPM_TEST_SIGNAL_PROCESS')
  if 'DDPM_TEST_SIGNAL_AT_STEP' in env and process in (None, env.get('JAX_PROCESS_ID', '0')):
    sig, step = env['DDPM_TEST_SIGNAL_AT_STEP'].split(':')
    _signal_at_step(int(sig), int(step))
  if 'DDPM_TEST_WAIT_AT_STEP' in env:
    step, path = env['DDPM_TEST_WAIT_AT_STEP'].split(':', 1)
    _wait_at_step(int(step), path)
  if 'DDPM_TEST_LATE_PROCESS' in env:
    late, seconds = env['DDPM_TEST_LATE_PROCESS'].split(':')
    if late == env.get('JAX_PROCESS_ID', '0'):
      _at_step(0, lambda: time.sleep(float(seconds)))
  if 'DDPM_TEST_KILL_AT_COMMIT' in env:
    _kill_at_commit(int(env['DDPM_TEST_KILL_AT_COMMIT']))


if __name__ == '__main__':
  _install_faults()
  app.run(main.main)
