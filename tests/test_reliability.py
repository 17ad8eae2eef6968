"""Faults injected into the real trainer: kills, preemption, broken checkpoints, bad input.

Subprocess tests run main.py, or tests/train_subprocess.py (main.py plus an
injected fault), and share runs between their assertions; in-process tests
call `train.train_and_evaluate`. Both train on the session's four CPU devices
(the tiny config's batch of 8 split four ways) unless a test says otherwise.
"""

import errno
import logging
import os
import re
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

import trainer_harness as th
from ddpm_jax import checkpointing
from ddpm_jax import inference
from ddpm_jax import input_pipeline
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import train

SIGKILLED = -signal.SIGKILL
# Seven steps, checkpoints at 4 and at the end, metrics of every step logged.
CHAIN = dict(num_train_steps=7, checkpoint_every_steps=4, log_every_steps=1, sample_every_steps=0)


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
  return th.make_data(str(tmp_path_factory.mktemp('data')))


def _truncate_files(directory):
  """Empties every file under `directory`: a checkpoint whose data is lost."""
  for root, _, files in os.walk(directory):
    for name in files:
      open(os.path.join(root, name), 'w').close()


def _snapshot(directory):
  """Every file under `directory` (but the lock) with its size and modification time."""
  found = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name != '.train.lock':
        stat = os.stat(os.path.join(root, name))
        found[os.path.relpath(os.path.join(root, name), directory)] = (
          stat.st_size,
          stat.st_mtime_ns,
        )
  return found


@pytest.fixture(scope='module')
def chain(data_dirs, tmp_path_factory):
  """An uninterrupted run, and a command interrupted three ways, then finished.

  The model is class-conditional, so the labels and their dropout (functions of
  the seed and the step) are resumed too; tests/test_gcs.py kills and resumes
  an unconditional run.

  The uninterrupted run is in-process (the same compiled program as the
  children's, from the shared cache); the others are runs of one command:
  1. 'preempted': SIGTERM while the batch of step 1 is drawn.
  2. 'killed_in_commit': SIGKILL inside the commit (rename) of checkpoint 4.
  3. 'killed': SIGKILL while the batch of step 3 is drawn, after step 3 was logged.
  4. 'finished': no fault, with a decoy temporary folder of a later step (9).
  """
  root = tmp_path_factory.mktemp('chain')
  flags = th.config_flags(data_dirs, **CHAIN) + th.CONDITIONAL_FLAGS
  reference, workdir = str(root / 'reference'), str(root / 'interrupted')
  checkpoints = os.path.join(workdir, 'checkpoints')
  config = th.conditional(th.tiny_config(data_dirs, **CHAIN))
  train.train_and_evaluate(config, reference)
  result = {}
  faults = (
    ('preempted', dict(DDPM_TEST_SIGNAL_AT_STEP=f'{int(signal.SIGTERM)}:1')),
    ('killed_in_commit', dict(DDPM_TEST_KILL_AT_COMMIT='4')),
    ('killed', dict(DDPM_TEST_SIGNAL_AT_STEP=f'{int(signal.SIGKILL)}:3')),
    ('finished', {}),
  )
  listings, metrics = {}, {}
  for name, env in faults:
    if name == 'finished':
      decoy = os.path.join(checkpoints, '9.orbax-checkpoint-tmp', 'state')
      os.makedirs(decoy)
      with open(os.path.join(decoy, '_METADATA'), 'w') as f:
        f.write('{"half": ')
    result[name] = th.run_trainer(workdir, flags, env=th.child_env(**env))
    listings[name] = sorted(os.listdir(checkpoints))
    metrics[name] = th.read_metrics(workdir)
  return types.SimpleNamespace(
    reference=reference,
    workdir=workdir,
    result=result,
    listings=listings,
    metrics=metrics,
    config=config,
  )


def test_sigterm_commits_the_current_step_and_exits_zero(chain):
  code, output = chain.result['preempted']
  assert code == 0, output[-5000:]
  # Step 2 is no periodic checkpoint step: it was saved because of the signal.
  assert 'Preempted: committed the checkpoint of step 2' in output
  assert chain.listings['preempted'] == ['2']
  assert 'Resumed from step 2' in chain.result['killed_in_commit'][1]


def test_a_crash_during_a_commit_is_never_taken_for_a_checkpoint(chain):
  code, output = chain.result['killed_in_commit']
  assert code == SIGKILLED, output[-5000:]
  # Complete files, marked successful, but not renamed: not a committed step.
  assert chain.listings['killed_in_commit'] == ['2', '4.orbax-checkpoint-tmp']
  # The restart resumes from the last committed step and removes the leftover.
  assert 'Resumed from step 2' in chain.result['killed'][1]
  assert chain.listings['killed'] == ['2']
  # A leftover of a later step is neither restored nor kept.
  code, output = chain.result['finished']
  assert code == 0, output[-5000:]
  assert 'Resumed from step 2' in output
  assert chain.listings['finished'] == ['2', '4', '7']


def test_a_killed_run_restarted_equals_an_uninterrupted_one_bit_for_bit(chain):
  assert chain.result['killed'][0] == SIGKILLED
  # The killed runs had logged steps beyond their checkpoint (2); restarts replaced them.
  assert max(r['step'] for r in chain.metrics['killed_in_commit']) >= 4
  assert [r['step'] for r in chain.metrics['killed']] == [1, 2, 3]
  final = th.restore(chain.workdir, chain.config)
  reference = th.restore(chain.reference, chain.config)
  assert int(final.step) == 7
  th.assert_states_equal(final, reference)
  # Every step's loss, gradient norm and learning rate, exactly once, bit for bit.
  losses = th.read_metrics(chain.workdir)
  assert [r['step'] for r in losses] == list(range(1, 8))
  assert losses == th.read_metrics(chain.reference)


@pytest.fixture(scope='module')
def cli(chain, data_dirs, tmp_path_factory):
  """main.py with bad input, each case started at once: name -> (code, output, workdir, before)."""
  root = tmp_path_factory.mktemp('cli')
  # A data dir of its own shows whether a failing run got as far as preparing data.
  unprepared = (data_dirs[0], str(root / 'tfds_unprepared'))
  fresh = th.config_flags(unprepared, num_train_steps=2, sample_every_steps=0)
  resume = th.config_flags(data_dirs, **dict(CHAIN, num_train_steps=9)) + th.CONDITIONAL_FLAGS
  cases = {
    'typo': fresh + ['--config.training.batch_szie=8'],
    'wrong_type': fresh + ['--config.training.batch_size=eight'],
    'bad_values': fresh
    + [
      '--config.data.dataset=fashion_mnst',
      '--config.diffusion.beta_schedule=linaer',
      '--config.sampling.sampler=ddpn',
      '--config.training.batch_size=6',
      '--config.data.image_size=17',
    ],
    'other_model': resume + ['--config.model.ch=64'],
  }
  runs = {}
  for name, flags in cases.items():
    workdir = str(root / name)
    if name == 'other_model':
      shutil.copytree(chain.reference, workdir)
    before = _snapshot(workdir)
    runs[name] = (th.start_trainer(workdir, flags, script=th.MAIN), workdir, before)
  results = {}
  for name, (process, workdir, before) in runs.items():
    code, output = th.finish(process)
    results[name] = types.SimpleNamespace(
      code=code, output=output, workdir=workdir, before=before, unprepared=unprepared[1]
    )
  return results


def test_cli_typo_in_an_override_fails_before_anything(cli):
  run = cli['typo']
  assert run.code != 0
  assert 'Did you mean "batch_size" instead of "batch_szie"?' in run.output
  assert not os.path.exists(run.workdir)


def test_cli_override_of_the_wrong_type_fails_before_anything(cli):
  run = cli['wrong_type']
  assert run.code != 0
  assert '--config.training.batch_size=eight: invalid literal for int()' in run.output
  assert not os.path.exists(run.workdir)


def test_cli_invalid_values_are_all_listed_before_any_work(cli):
  run = cli['bad_values']
  assert run.code != 0
  for problem in (
    "diffusion.beta_schedule='linaer' is not one of",
    "sampling.sampler: Unknown sampler 'ddpn'",
    'training.batch_size=6 does not divide by the 4 devices',
    'data.image_size=17 does not divide by 2',
    "data.dataset: Unknown TFDS dataset 'fashion_mnst'",
  ):
    assert problem in run.output, run.output[-5000:]
  # Nothing was written to the workdir and no dataset was prepared.
  assert os.listdir(run.workdir) == []
  assert not os.path.exists(os.path.join(run.unprepared, 'fashion_mnist_local'))


def test_cli_resuming_with_another_model_is_refused_and_changes_nothing(cli):
  run = cli['other_model']
  assert run.code != 0
  assert 'model.ch: checkpoint has 32, config has 64' in run.output, run.output[-5000:]
  assert _snapshot(run.workdir) == run.before


def test_unreadable_checkpoints_fall_back_to_an_older_one_or_stop(data_dirs, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  config = th.tiny_config(
    data_dirs, num_train_steps=4, checkpoint_every_steps=2, log_every_steps=2, sample_every_steps=0
  )
  train.train_and_evaluate(config, workdir)
  original = th.restore(workdir, config, step=4)
  _truncate_files(os.path.join(workdir, 'checkpoints', '4', 'state'))
  config.training.num_train_steps = 6
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  assert re.search(r'The checkpoint of step 4 in \S+ cannot be restored', caplog.text)
  assert 'Resumed from step 2' in caplog.text
  # The unreadable folder is kept aside; step 4 was trained again, to the same state.
  moved = [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if '.unreadable-' in n]
  assert [n.split('.')[0] for n in moved] == ['4']
  assert th.committed_steps(workdir) == [2, 4, 6]
  th.assert_states_equal(th.restore(workdir, config, step=4), original)

  # With none readable: an error naming each step; nothing moved, overwritten or started.
  for step, item in ((6, 'config'), (4, 'state'), (2, 'state')):
    _truncate_files(os.path.join(workdir, 'checkpoints', str(step), item))
  before = _snapshot(workdir)
  config.training.num_train_steps = 8
  with pytest.raises(
    checkpointing.CheckpointError,
    match=(r'No checkpoint in \S+ could be restored:\s+step 6: .*\s+step 4: .*\s+step 2: '),
  ):
    train.train_and_evaluate(config, workdir)
  assert _snapshot(workdir) == before


@pytest.mark.parametrize('fault', ['disk_full', 'read_only'])
def test_a_failing_save_stops_the_run_and_keeps_the_previous_checkpoint(
  data_dirs, tmp_path, monkeypatch, fault
):
  if fault == 'disk_full':  # Fails while committing (in the background).
    method, error = 'finalize', OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  else:  # Fails creating the step's folder.
    method, error = 'create', PermissionError(errno.EACCES, os.strerror(errno.EACCES))
  original = getattr(atomicity.AtomicRenameTemporaryPath, method)

  async def failing_at_step_4(self):
    if self.get_final().name == '4':
      raise error
    return await original(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, method, failing_at_step_4)
  workdir = str(tmp_path / 'run')
  # Keeping one checkpoint: the old one must survive the failed new one.
  config = th.tiny_config(
    data_dirs,
    num_train_steps=8,
    checkpoint_every_steps=2,
    log_every_steps=1,
    keep_checkpoints=1,
    sample_every_steps=0,
  )
  with pytest.raises(
    checkpointing.CheckpointError, match=f'checkpoint of step 4 .*{os.strerror(error.errno)}'
  ):
    train.train_and_evaluate(config, workdir)
  assert th.committed_steps(workdir) == [2]
  assert int(th.restore(workdir, config).step) == 2
  # The run stopped: the steps after the failure were not all trained.
  assert th.read_metrics(workdir)[-1]['step'] < 8


def test_nonfinite_steps_are_skipped_then_stop_the_run(data_dirs, tmp_path, monkeypatch):
  make_train_iterator = input_pipeline.make_train_iterator

  def nan_from_step_3(config, *, start_step=0, **kwargs):
    batches = make_train_iterator(config, start_step=start_step, **kwargs)
    for step, batch in enumerate(batches, start=start_step):
      yield {'image': np.full_like(batch['image'], np.nan)} if step >= 3 else batch

  monkeypatch.setattr(input_pipeline, 'make_train_iterator', nan_from_step_3)
  workdir = str(tmp_path / 'run')
  config = th.tiny_config(
    data_dirs,
    num_train_steps=10,
    checkpoint_every_steps=1,
    log_every_steps=1,
    keep_checkpoints=3,
    max_consecutive_nonfinite=3,
    sample_every_steps=0,
  )
  with pytest.raises(train.TrainingError, match='3 training steps in a row had a non-finite'):
    train.train_and_evaluate(config, workdir)
  assert [r['finite'] for r in th.read_metrics(workdir)] == [1, 1, 1, 0, 0, 0]
  # Stopped at step 6 before saving it; the skipped steps changed nothing but counters.
  assert th.committed_steps(workdir) == [3, 4, 5]
  states = [th.restore(workdir, config, step=s) for s in (3, 4, 5)]
  assert [int(s.nonfinite_in_a_row) for s in states] == [0, 1, 2]
  for state in states:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    for part in ('params', 'ema_params', 'opt_state'):
      jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(getattr(state, part)),
        jax.device_get(getattr(states[0], part)),
      )


@pytest.mark.parametrize(
  'part, value', [('params', np.nan), ('ema_params', np.inf), ('opt_state', np.nan)]
)
def test_a_state_with_nonfinite_values_is_never_checkpointed(data_dirs, tmp_path, part, value):
  config = th.tiny_config(data_dirs)
  model, _, image_shape = inference.build_model_and_diffusion(config)
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  abstract = checkpointing.abstract_train_state(model, config, image_shape, mesh)
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  # One element of one (floating-point) leaf.
  leaves, treedef = jax.tree.flatten(getattr(state, part))
  i = max(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating))
  leaves[i] = leaves[i].reshape(-1).at[0].set(value).reshape(leaves[i].shape)
  poisoned = state.replace(**{part: jax.tree.unflatten(treedef, leaves)})
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  try:
    with pytest.raises(train.TrainingError, match='state at step 5 holds NaN or Inf'):
      train.save_checkpoint(ckpt, 5, poisoned, config.to_json_best_effort())
    ckpt.wait()
    assert ckpt.all_steps() == []
    train.save_checkpoint(ckpt, 5, state, config.to_json_best_effort())  # The finite one.
    ckpt.wait()
    assert ckpt.all_steps() == [5]
  finally:
    ckpt.close()


def test_a_checkpoint_moves_between_device_counts(data_dirs, tmp_path):
  one, four = jax.devices()[:1], jax.devices()[:4]
  config = th.tiny_config(
    data_dirs, num_train_steps=2, checkpoint_every_steps=2, log_every_steps=2, sample_every_steps=0
  )
  four_devices = str(tmp_path / 'four')
  train.train_and_evaluate(config, four_devices, devices=four)
  saved_on_four = th.restore(four_devices, config, devices=four)

  # A 4-device checkpoint restored onto 1 device: the same values, placed there.
  on_one = th.restore(four_devices, config, devices=one)
  th.assert_states_equal(on_one, saved_on_four)
  one_sharding = NamedSharding(sharding_lib.make_mesh(one), P())
  assert all(x.sharding == one_sharding for x in jax.tree.leaves(on_one))

  # Saved from that 1-device placement, then resumed by the trainer on 4 devices:
  # it continues exactly as the run that never left 4 devices.
  one_device = str(tmp_path / 'one')
  ckpt = checkpointing.Checkpointer(os.path.join(one_device, 'checkpoints'))
  try:
    ckpt.save(2, on_one, config.to_json_best_effort())
    ckpt.wait()
  finally:
    ckpt.close()
  config.training.num_train_steps = 4
  for workdir in (four_devices, one_device):
    train.train_and_evaluate(config, workdir, devices=four)
  resumed = th.restore(one_device, config, devices=four)
  four_sharding = NamedSharding(sharding_lib.make_mesh(four), P())
  assert all(x.sharding == four_sharding for x in jax.tree.leaves(resumed))
  assert int(resumed.step) == 4
  th.assert_states_equal(resumed, th.restore(four_devices, config, devices=four))


def test_a_second_trainer_on_a_workdir_in_use_is_refused(data_dirs, tmp_path):
  workdir = str(tmp_path / 'run')
  config = th.tiny_config(data_dirs, sample_every_steps=0)
  with train.workdir_lock(workdir):  # What a running trainer holds.
    with pytest.raises(train.TrainingError, match=r'in use by another trainer'):
      train.train_and_evaluate(config, workdir)
  assert os.listdir(workdir) == ['.train.lock']
