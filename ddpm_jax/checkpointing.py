"""Checkpoints through Orbax, wrapped in one place.

Everything the project knows about Orbax lives in this file, so a future API
change touches only it. A checkpoint holds two items: 'state' (the train
state with EMA parameters and the step, saved with `StandardSave`) and
'config' (the experiment config as JSON, to check a resumed run against).

Orbax commits a step atomically: it writes into a temporary folder and
renames it when complete, so a crash mid-write leaves no folder that
`latest_step()` would take. Saves are asynchronous; `wait()` blocks until the
last one is committed and `close()` is called before exit.
"""

import json
import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored (and no fall-back was possible)."""


class Checkpointer:
  """Saves and restores train states in `directory/<step>/`."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True, read_only: bool = False):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: where the step folders live; made absolute.
      max_to_keep: how many of the latest committed steps to keep (None: all).
      async_save: write in a background thread while training continues.
      read_only: never create, delete or write anything (sampling, eval).
    """
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        # Leftover temporary folders of an interrupted save are removed at start.
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'config'))

  def all_steps(self) -> Sequence[int]:
    """Committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, config_json: str, *, force: bool = True) -> bool:
    """Starts saving `state` at `step`; returns whether a save was started.

    Errors of a previous asynchronous save surface here (or in `wait`).
    """
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config_json)),
        ),
        force=force,
    )

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Tuple[Any, int]:
    """Restores the state of `step` (default: newest), with fall-back.

    If the requested (or newest) step cannot be read, the error is logged
    naming the step and the next older committed step is tried; the caller
    never silently gets a fresh state when checkpoints exist.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (from
        `jax.eval_shape`), giving the structure, dtypes and placement.
      step: a specific step, or None for the newest that can be read.

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
        restored = self._manager.restore(
            candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored['state'], candidate
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types here (missing files, bad metadata, shape
        # mismatch, tensorstore errors); all mean "this step is unusable".
        logging.error('Checkpoint at step %d in %s cannot be restored: %s: %s',
                      candidate, self.directory, type(e).__name__, e)
        errors.append(f'step {candidate}: {type(e).__name__}: {e}')
    raise CheckpointError(f'No checkpoint in {self.directory} could be restored:\n' +
                          '\n'.join(errors))

  def restore_config(self, step: Optional[int] = None) -> Dict[str, Any]:
    """The config JSON saved with `step` (default: newest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No committed checkpoint in {self.directory}.')
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored['config']

  def wait(self) -> None:
    """Blocks until every started save is committed; raises its errors."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got a preemption notice (multi-host)."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()
