"""Checkpoints through Orbax, wrapped in one place, and what restoring needs.

Everything the project knows about Orbax lives in this file, so a future API
change touches only it. A checkpoint holds two items: 'state' (the train
state with EMA parameters and the step, saved with `StandardSave`) and
'config' (the experiment config as JSON, to check a resumed run against).
A state is restored onto `abstract_train_state`'s shapes and shardings, after
`check_resume_compatible` has compared the saved config with the current one.

Commits are atomic: on a local disk Orbax writes `<step>.orbax-checkpoint-tmp`
and renames it; on gs:// (no renames) it writes `<step>/` in place and
commits it by writing `<step>/commit_success.txt` last, and a step without
that marker is not a step. An unreadable newest step falls back to the next older one, and a
failing save names its step and leaves older steps intact; docs/reliability.md
has the whole story and the tests that prove it.
"""

import contextlib
import functools
import json
import logging
import os
import time
from typing import Any
from collections.abc import Callable, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp

from ddpm_jax import errors
from ddpm_jax import files
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import train_state as train_state_lib

CheckpointError = errors.CheckpointError

# Sections that must match between a checkpoint and the config resuming it:
# a different network or process would silently train something else.
_MUST_MATCH_ON_RESUME = ('model', 'diffusion')
# Fields of those sections that may differ: every layer set computes the same
# function with the same parameters.
_MAY_DIFFER_ON_RESUME = ('model.layers',)
# Fields added after checkpoints were written: one without the field was made with this value.
_ADDED_FIELDS = {'model.num_classes': 0, 'model.class_dropout': 0.1, 'diffusion.kind': 'ddpm'}


def abstract_train_state(model, config: ml_collections.ConfigDict, image_shape, mesh) -> Any:
  """Shapes, dtypes and (replicated) shardings of the state, without allocating it."""
  abstract = jax.eval_shape(
    functools.partial(train_state_lib.create_train_state, model, config, image_shape=image_shape),
    jax.random.key(0),
  )
  replicated = sharding_lib.replicated(mesh)
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
  )


def check_resume_compatible(
  saved_config: dict[str, Any],
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  sections: Sequence[str] = _MUST_MATCH_ON_RESUME,
) -> None:
  """Raises TrainingError if the checkpoint was made with another model or process.

  Args:
    saved_config: the checkpoint's config.
    config: the config resuming (or sampling) it.
    workdir: named in the message.
    sections: the config blocks that must match (a distillation adds its own).
  """
  current = json.loads(config.to_json_best_effort())
  differences = []
  for section in sections:
    saved, now = saved_config.get(section, {}), current.get(section, {})
    for key in sorted(set(saved) | set(now)):
      name = f'{section}.{key}'
      saved_value = saved.get(key, _ADDED_FIELDS.get(name))
      now_value = now.get(key, _ADDED_FIELDS.get(name))
      if name not in _MAY_DIFFER_ON_RESUME and saved_value != now_value:
        differences.append(f'{name}: checkpoint has {saved_value!r}, config has {now_value!r}')
  # An EDM network's output is read through sigma_data's preconditioning; its other edm.*
  # fields are the training draw and the sampler's range, which a run may change.
  saved_kind = saved_config.get('diffusion', {}).get('kind', 'ddpm')
  if saved_kind == 'edm' and current['diffusion'].get('kind') == 'edm':
    saved_sd, now_sd = saved_config['edm']['sigma_data'], current['edm']['sigma_data']
    if saved_sd != now_sd:
      differences.append(f'edm.sigma_data: checkpoint has {saved_sd!r}, config has {now_sd!r}')
  saved_classes = saved_config.get('model', {}).get('num_classes', 0)
  if saved_classes and not current['model'].get('num_classes'):
    differences.append(
      f'the checkpoint is class-conditional ({saved_classes} classes): use its config, with '
      "sampling.class_labels ('all' or indices such as '0,3,7') to sample it"
    )
  if differences:
    raise errors.TrainingError(
      f'The checkpoint in {workdir} was made with a different configuration:\n  '
      + '\n  '.join(differences)
      + '\nUse a new --workdir, or the original config.'
    )


class Checkpointer:
  """Saves and restores train states in `directory/<step>/`."""

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    read_only: bool = False,
  ):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: where the step folders live, local (made absolute) or gs://.
      max_to_keep: how many of the latest committed steps to keep (None: all).
      async_save: write in a background thread while training continues.
      read_only: never create, delete or write anything (sampling, eval).
    """
    self.directory = files.absolute(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
      # Leftover temporary folders of an interrupted save are removed at start.
      cleanup_tmp_directories=not read_only,
      # The step folder is made before save() returns: a read-only or full
      # disk fails there, at once, rather than leaving background writers
      # waiting (20 minutes) for a folder that never comes.
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=('state', 'config')
    )
    # The step of the newest save started, so a failure surfacing later can name it.
    self._saving_step: int | None = None
    # The newest step known to be committed, for error messages when storage is unreachable.
    self._committed_step: int | None = self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    """Committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, config_json: str, *, force: bool = True) -> bool:
    """Starts saving `state` at `step`; returns whether a save was started.

    Waits for the previous save first, so its errors surface here.

    Raises:
      CheckpointError: this or the previous save failed.
    """
    self.wait()
    with self._failures_named(step):
      started = self._manager.save(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(json.loads(config_json)),
        ),
        force=force,
      )
      if started:
        self._saving_step = int(step)
      return started

  def poll(self) -> None:
    """Raises CheckpointError if a background save has failed; never blocks on one."""
    if self._saving_step is not None and not self._manager.is_saving_in_progress():
      self.wait()  # Returns at once: the save has finished, maybe with an error.

  def wait(self) -> None:
    """Blocks until every started save is committed.

    Raises:
      CheckpointError: a save failed.
    """
    if self._saving_step is None:
      return
    with self._failures_named(self._saving_step):
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    self._committed_step, self._saving_step = self._saving_step, None

  def restore(
    self,
    abstract_state: Any,
    step: int | None = None,
    *,
    check_config: Callable[[dict[str, Any]], None] | None = None,
  ) -> tuple[Any, int]:
    """Restores the state of `step` (default: newest), with fall-back.

    If the requested (or newest) step cannot be read, the error is logged
    naming the step and the next older committed step is tried; the caller
    never silently gets a fresh state when checkpoints exist.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (from
        `jax.eval_shape`), giving the structure, dtypes and placement; the
        saved arrays are resharded onto it (any device count).
      step: a specific step, or None for the newest that can be read.
      check_config: called with each readable step's saved config before its
        state is restored; what it raises propagates (no fall-back), e.g. a
        refusal to resume with another model.

    Returns:
      (state, step).

    Raises:
      CheckpointError: no committed checkpoint could be restored.
    """
    candidates = [step] if step is not None else list(reversed(self.all_steps()))
    if not candidates:
      raise CheckpointError(f'No committed checkpoint in {self.directory}.')
    errors = []
    for candidate in candidates:
      try:
        saved_config = self.restore_config(candidate)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(self._log_unreadable(candidate, e))
        continue
      if check_config is not None:
        check_config(saved_config)
      try:
        restored = self._manager.restore(
          candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored['state'], candidate
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types here (missing files, bad metadata, shape
        # mismatch, tensorstore errors); all mean "this step is unusable".
        errors.append(self._log_unreadable(candidate, e))
    raise CheckpointError(
      f'No checkpoint in {self.directory} could be restored:\n  ' + '\n  '.join(errors)
    )

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config JSON saved with `step` (default: newest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No committed checkpoint in {self.directory}.')
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored['config']

  def set_aside(self, steps: Sequence[int]) -> None:
    """Renames unreadable committed steps so they are neither restored nor overwritten.

    Called by every process; process 0 renames, then all of them continue.
    """
    if not steps:
      return
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for step in steps:
        source = os.path.join(self.directory, str(step))
        target = f'{source}.unreadable-{stamp}'
        files.as_path(source).rename(target)
        logging.error('Moved the unreadable checkpoint of step %d to %s.', step, target)
    sharding_lib.wait_for_all_processes('checkpoint_set_aside')
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same `step` once any got a preemption notice.

    Multi-process runs only (JAX's preemption service, which listens for
    SIGTERM); always False in a single process. Every process must call it
    at every step with the same, consecutive step numbers.
    """
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources.

    Errors of a pending save are logged, not raised: `close` runs on the way
    out of a failure too, and must not hide that first error. Call `wait`
    where a failed save must stop the program.
    """
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error(
        'Closing the checkpoints in %s: a save failed: %s: %s', self.directory, type(e).__name__, e
      )

  def _log_unreadable(self, step: int, error: Exception) -> str:
    message = f'step {step}: {type(error).__name__}: {error}'
    logging.error(
      'The checkpoint of step %d in %s cannot be restored (%s: %s).',
      step,
      self.directory,
      type(error).__name__,
      error,
    )
    return message

  @contextlib.contextmanager
  def _failures_named(self, step: int):
    """Turns an Orbax save failure into a CheckpointError naming the step."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and the file system raise many types (OSError, ValueError, ...).
      committed = (
        'no step is committed yet'
        if self._committed_step is None
        else f'the newest committed step is {self._committed_step}'
      )
      raise CheckpointError(
        f'Saving the checkpoint of step {step} to {self.directory} failed: '
        f'{type(e).__name__}: {e}. Older committed steps are intact ({committed}); '
        'run the same command to resume from there.'
      ) from e
