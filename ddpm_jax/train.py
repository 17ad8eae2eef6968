"""The training loop: `train_and_evaluate(config, workdir)`.

Reads the whole story top to bottom: check the config, take the workdir,
restore or create the state, then loop: assemble a global batch from each
process's slice, run `steps_per_call` jitted steps, and at their intervals log,
draw a sample grid from the EMA parameters and checkpoint. Re-running with
the same workdir resumes from the newest committed checkpoint; data order and
randomness depend only on (seed, step), so a resumed run continues exactly as
an uninterrupted one would, bit for bit.

The workdir is a local folder or a gs:// URL (docs/tpu_vm.md). What happens
on a bad config, a second trainer, preemption, a crash, an unreadable or
failing checkpoint, non-finite steps and object storage is in
docs/reliability.md, with the test that proves each.

Per-step metrics go to `workdir/metrics.jsonl` (one JSON object per step:
step, loss, grad_norm, learning_rate, finite, and fid at FID steps), written
at log steps; on resume the lines after the restored step are dropped, so the
file always describes the history of the checkpointed state.

With `training.fid_every_steps` > 0, Inception FID of
`training.fid_num_samples` EMA samples (the configured sampler, on the FID
key stream) against `eval.fid_reference_split`'s cached statistics goes to
TensorBoard and metrics.jsonl, with its cost in seconds to TensorBoard and the
log. It reads only the EMA parameters and its own key, so a run with FID ends
in the same state, bit for bit, as one without.
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import signal
import time
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import errors
from ddpm_jax import files
from ddpm_jax import gcs
from ddpm_jax import images as images_lib
from ddpm_jax import inception_fid
from ddpm_jax import inference
from ddpm_jax import input_pipeline
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import streams
from ddpm_jax import throughput as throughput_lib
from ddpm_jax import train_state as train_state_lib

METRICS_FILE = 'metrics.jsonl'
TrainingError = errors.TrainingError


# Seconds a trainer on object storage may go without renewing its lease on
# the workdir before another one may take over (the restart after a crash
# waits this long); it renews every quarter of that.
LEASE_SECONDS_ENV = 'DDPM_JAX_LEASE_SECONDS'
DEFAULT_LEASE_SECONDS = 60.0


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on the workdir; a second trainer is refused.

  Locally the lock is an flock, so it goes away with the process however
  that ends. On object storage it is a lease (`gcs.Lease`): an
  object created only if absent and renewed by a heartbeat; a crashed
  trainer's lease is taken over once it has not been renewed for
  $DDPM_JAX_LEASE_SECONDS (default 60).

  Yields:
    A callable that raises TrainingError if the lock was lost (object storage
    only: the lease went unrenewed long enough for another trainer to take it).
  """
  path = os.path.join(workdir, '.train.lock')
  if files.is_url(workdir):
    seconds = float(os.environ.get(LEASE_SECONDS_ENV, DEFAULT_LEASE_SECONDS))
    try:
      lease = gcs.Lease(path, seconds=seconds)
    except gcs.LeaseHeld as e:
      raise TrainingError(
        f'{workdir} is in use by another trainer ({e}); stop it first or use another --workdir.'
      ) from None
    with lease:
      yield lease.check
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise TrainingError(
        f'{workdir} is in use by another trainer (it holds {path}); '
        'stop it first or use another --workdir.'
      ) from None
    try:
      yield lambda: None
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _Preemption:
  """Tells the loop when to checkpoint and stop because the job is being preempted.

  A single process catches SIGTERM itself. With several processes, JAX's
  preemption service owns SIGTERM (a Python handler would take the signal
  from it), and Orbax's sync point answers True on every process at the
  same step, so they all save the same checkpoint.
  """

  def __init__(self, ckpt: checkpointing.Checkpointer):
    self._ckpt = ckpt
    self._single_process = jax.process_count() == 1
    self._requested = False
    self._previous = None

  def __enter__(self):
    if self._single_process:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # Not the main thread (e.g. a test runner thread).
        self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):
    del frame
    logging.warning('Received signal %d: saving a checkpoint, then exiting.', signum)
    self._requested = True

  def reached(self, call_id: int) -> bool:
    """Whether to save and stop now.

    Args:
      call_id: the same on every process, and one more at each call (once
        per loop iteration).
    """
    if self._single_process:
      return self._requested
    return self._ckpt.reached_preemption(call_id)


class _MetricsLog:
  """Per-step metrics as JSON lines, kept consistent with the checkpointed state."""

  def __init__(self, path: str, enabled: bool):
    self.path = path
    self._enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after `step` (replayed after a resume) and torn lines."""
    if not self._enabled or not files.exists(self.path):
      return
    kept = []
    for line in files.read_text(self.path).splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # The last line of a killed run may be half written.
      if record['step'] <= step:
        kept.append(json.dumps(record))
    files.write_text(self.path, ''.join(line + '\n' for line in kept))

  def append(
    self,
    first_step: int,
    per_step: dict[str, np.ndarray],
    extra: dict[int, dict[str, float]] | None = None,
  ) -> None:
    """Writes one record per step: `first_step`, first_step + 1, ...; `extra[step]` joins its own."""
    if not self._enabled:
      return
    names = sorted(per_step)
    count = len(per_step[names[0]])
    lines = []
    for i in range(count):
      record = {'step': first_step + i}
      record.update({name: float(per_step[name][i]) for name in names})
      record.update((extra or {}).get(first_step + i, {}))
      lines.append(json.dumps(record) + '\n')
    # One append (on object storage, one server-side compose) per log step.
    files.append_text(self.path, ''.join(lines))


class _TrainingFID:
  """Inception FID of EMA samples during training, apart from the training randomness.

  Samples come from the configured sampler (`sampling.sampler`, `num_steps`;
  a class-conditional model's with `sampling.class_labels` at
  `sampling.guidance_scale`) in batches of at most `sampling.batch_size`,
  batch i with fold_in(FID stream key, i): the same key at every FID step, as
  the grids'. Every process samples its shard and gets all samples back; each
  measures them on its own devices. The Inception weights and the reference
  statistics are loaded (or computed and cached) at the first call.
  """

  def __init__(self, config, model, d, image_shape, mesh):
    self._config = config
    self._num_samples = config.training.fid_num_samples
    self._batch = min(config.sampling.batch_size, self._num_samples)
    self._num_batches = -(-self._num_samples // self._batch)
    self._sample_fn = inference.make_sample_fn(
      model,
      d,
      config,
      (self._batch,) + image_shape,
      sampler=config.sampling.sampler,
      num_steps=config.sampling.num_steps,
      mesh=mesh,
    )
    self._labels = None
    if config.model.num_classes > 0:
      self._labels = inference.class_labels(config, self._num_batches * self._batch)
    self._key = streams.key(config.seed, streams.Stream.FID)
    self._measure = None

  def __call__(self, step: int, ema_params) -> dict[str, float]:
    """{'fid', 'fid_sampling_seconds', 'fid_features_seconds'} of the EMA parameters at `step`."""
    if self._measure is None:
      start = time.time()
      self._measure = inception_fid.InceptionFID(self._config)
      logging.info(
        'FID: Inception weights and reference statistics (%s, %s images) ready in %.1f s.',
        self._measure.reference['fid_reference_split'],
        self._measure.reference['fid_reference_count'],
        time.time() - start,
      )
    start = time.time()
    batches = []
    for i in range(self._num_batches):
      key = jax.random.fold_in(self._key, i)
      if self._labels is None:
        images = self._sample_fn(ema_params, key)
      else:
        labels = self._labels[i * self._batch : (i + 1) * self._batch]
        images = self._sample_fn(ema_params, key, labels, self._config.sampling.guidance_scale)
      # Every process takes part in the gather and gets every sample.
      batches.append(images_lib.to_uint8(sharding_lib.gather_to_hosts(images, f'fid_{step}')))
    samples = np.concatenate(batches)[: self._num_samples]
    sampled = time.time()
    value = self._measure(samples)['fid']
    return {
      'fid': value,
      'fid_sampling_seconds': sampled - start,
      'fid_features_seconds': time.time() - sampled,
    }


@jax.jit
def _all_finite(trees) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def save_checkpoint(
  ckpt: checkpointing.Checkpointer, step: int, state: Any, config_json: str
) -> None:
  """Starts an (asynchronous) save of `state`, refusing one with NaN or Inf values.

  Raises:
    TrainingError: the state holds a non-finite value.
    checkpointing.CheckpointError: this or the previous save failed.
  """
  if not bool(_all_finite((state.params, state.opt_state, state.ema_params))):
    latest = ckpt.latest_step()
    raise TrainingError(
      f'The state at step {step} holds NaN or Inf values, so it was not checkpointed ('
      + (
        'no checkpoint was written'
        if latest is None
        else f'the newest checkpoint, step {latest}, is finite'
      )
      + '). Lower the learning rate or check the data.'
    )
  ckpt.save(step, state, config_json)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, devices: Sequence[jax.Device] | None = None
) -> dict[str, float]:
  """Trains (or resumes training) until `config.training.num_train_steps`.

  Args:
    config: the experiment config (see configs/default.py).
    workdir: checkpoints, TensorBoard logs, metrics.jsonl and sample grids go
      here; a local folder or a gs:// URL.
    devices: the devices to train on (default: every device of every process).

  Returns:
    The metrics of the last log step, as floats (empty if nothing ran).

  Raises:
    config_validation.ConfigError: the config cannot work (nothing was done).
    TrainingError: the workdir is in use, its checkpoint has another model
      or process, or training diverged.
    gcs.StorageError: the workdir's bucket is missing or forbidden.
    checkpointing.CheckpointError: no checkpoint could be restored, or a
      save failed.
  """
  mesh = sharding_lib.make_mesh(devices)
  config_validation.validate(config, num_devices=mesh.devices.size)
  return run(config, workdir, mesh, _training_job)


@dataclasses.dataclass
class Job:
  """What the loop runs: training itself, or a student's distillation (ddpm_jax/distill.py).

  Attributes:
    state: the state to continue from (restored, or fresh at step 0).
    start_step: its step.
    steps_fn: the pure `steps_fn(state, batches, seed_key) -> (state, metrics)` of
      `train_state.train_steps`' contract; the loop jits it over the mesh.
    grid_fn: `grid_fn(state) -> images [N, H, W, C]` in [-1, 1], the EMA's samples for a
      sample grid (the same key every time); None: no grids.
    grid_labels: the grid's class labels [N] (one row per class), or None.
    throughput: images/s, FLOP/s and MFU of a step.
    fid: Inception FID during training, or None.
    after_step: called with (step, state) after each call of `steps_fn`, before that step's
      checkpoint; returns True to checkpoint that step whatever the interval (the end of a
      distillation round, whose student it has saved).
  """

  state: Any
  start_step: int
  steps_fn: Callable[..., Any]
  grid_fn: Callable[[Any], jax.Array] | None = None
  grid_labels: np.ndarray | None = None
  throughput: Any = None
  fid: Any = None
  after_step: Callable[[int, Any], bool] | None = None


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: Any,
  make_job: Callable[..., Job],
) -> dict[str, float]:
  """Takes the workdir and runs `make_job`'s job until `config.training.num_train_steps`.

  The loop's promises hold for every job: one trainer per workdir, a committed
  checkpoint on SIGTERM, a resume that continues bit for bit, metrics.jsonl
  consistent with the checkpointed state.

  Args:
    config: a validated config; its `training` block sets the steps, batch and intervals.
    workdir: local folder or gs:// URL; checkpoints go to its `checkpoints/`.
    mesh: the data mesh.
    make_job: `make_job(config, workdir, mesh, ckpt, is_chief) -> Job`, called once the
      workdir is locked.
  """
  workdir = files.absolute(workdir)
  # A missing or forbidden bucket fails here, naming it, before any work.
  gcs.check_bucket(workdir)
  is_chief = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    check_lock = lambda: None
    if is_chief:  # The other processes share the chief's workdir.
      check_lock = stack.enter_context(workdir_lock(workdir))
    ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=config.training.keep_checkpoints
    )
    stack.callback(ckpt.close)
    preemption = stack.enter_context(_Preemption(ckpt))
    job = make_job(config, workdir, mesh, ckpt, is_chief)
    return _loop(config, workdir, mesh, ckpt, preemption, is_chief, check_lock, job)


def restore(config, workdir, mesh, ckpt, abstract, check_config=None):
  """The newest readable checkpoint's (state, step); None when there is no checkpoint.

  Args:
    abstract: the state's shapes, dtypes and shardings (`jax.eval_shape`).
    check_config: refuses a checkpoint made with another config (default:
      `checkpointing.check_resume_compatible`).
  """
  if not ckpt.all_steps():
    return None
  check_config = check_config or functools.partial(
    checkpointing.check_resume_compatible, config=config, workdir=workdir
  )
  state, step = ckpt.restore(abstract, check_config=check_config)
  # Newer steps failed to restore; out of the way, or saving them again would fail.
  ckpt.set_aside([s for s in ckpt.all_steps() if s > step])
  if int(state.step) != step:
    raise TrainingError(f'Checkpoint {step} holds a state at step {int(state.step)}.')
  logging.info('Resumed from step %d in %s.', step, ckpt.directory)
  return state, step


def start_state(create, mesh, key, config, workdir, is_chief):
  """A fresh state at step 0 from `create(key)`, jitted onto the mesh; writes config.json."""

  def typed(key):
    state = create(key)
    # A restored step is a strongly typed int32. The same type here makes a
    # fresh and a resumed run the same program: one compile, one cache entry.
    return state.replace(step=jnp.asarray(state.step, jnp.int32))

  state = jax.jit(typed, out_shardings=sharding_lib.replicated(mesh))(key)
  if is_chief:
    files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort())
  return state, 0


def _training_job(config, workdir, mesh, ckpt, is_chief) -> Job:
  """Training a model from scratch or from the workdir's newest checkpoint."""
  tc = config.training
  model, d, image_shape = inference.build_model_and_diffusion(config)
  # Cheap checks first: reading a checkpoint refuses another model before the
  # dataset is prepared and anything is compiled.
  abstract = checkpointing.abstract_train_state(model, config, image_shape, mesh)
  restored = restore(config, workdir, mesh, ckpt, abstract)
  # Prepares the dataset if needed and checks it against the config (channels, sizes).
  input_pipeline.dataset_info(config)
  state, start_step = restored or start_state(
    functools.partial(train_state_lib.create_train_state, model, config, image_shape=image_shape),
    mesh,
    streams.key(config.seed, streams.Stream.INIT),
    config,
    workdir,
    is_chief,
  )
  job = Job(
    state=state,
    start_step=start_step,
    steps_fn=functools.partial(train_state_lib.train_steps, diffusion=d, config=config),
    throughput=throughput_lib.for_training(
      config,
      image_shape,
      model.out_ch,
      device_kind=mesh.devices.flat[0].device_kind,
      num_devices=mesh.devices.size,
    ),
  )
  if config.model.num_classes > 0:
    # The configured classes in turn (every class unless set), so the grids show each improving.
    job.grid_labels = inference.class_labels(config, tc.num_sample_images)
  if tc.sample_every_steps > 0:
    sample_fn = inference.make_sample_fn(
      model,
      d,
      config,
      (tc.num_sample_images,) + image_shape,
      sampler=config.sampling.grid_sampler,
      num_steps=config.sampling.grid_num_steps,
      mesh=mesh,
    )
    # The same key every time, so successive grids show the same samples improving.
    grid_key = streams.key(config.seed, streams.Stream.GRID)
    if job.grid_labels is None:
      job.grid_fn = lambda state: sample_fn(state.ema_params, grid_key)
    else:
      job.grid_fn = lambda state: sample_fn(
        state.ema_params, grid_key, job.grid_labels, config.sampling.guidance_scale
      )
  if tc.fid_every_steps > 0:
    job.fid = _TrainingFID(config, model, d, image_shape, mesh)
  return job


def _loop(config, workdir, mesh, ckpt, preemption, is_chief, check_lock, job) -> dict[str, float]:
  tc = config.training
  config_json = config.to_json_best_effort()
  state, start_step = job.state, job.start_step
  k = tc.steps_per_call
  seed_key = jax.random.key(config.seed)
  # From the state itself: its static parts (apply_fn, tx) must match exactly.
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  train_fn = jax.jit(
    job.steps_fn,
    in_shardings=(
      state_sharding,
      sharding_lib.batch_sharded(mesh, 1),
      sharding_lib.replicated(mesh),
    ),
    out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
    donate_argnums=0,
  )
  fid = job.fid

  data = input_pipeline.make_train_iterator(
    config,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  metrics_log = _MetricsLog(os.path.join(workdir, METRICS_FILE), enabled=is_chief)
  metrics_log.truncate_after(start_step)
  if start_step == 0:
    writer.write_hparams(_flatten(json.loads(config_json)))

  throughput = job.throughput
  last_step = tc.num_train_steps
  step = start_step
  pending: list[dict[str, jax.Array]] = []  # Per-step metrics, on device until a log step.
  fid_records: dict[int, dict[str, float]] = {}  # FID by step, until the step's record is written.
  last_metrics: dict[str, float] = {}
  timer = (step, time.time())
  logging.info(
    'Training %s from step %d to %d on %d device(s), global batch %d.',
    config.data.dataset,
    step,
    last_step,
    mesh.devices.size,
    tc.batch_size,
  )
  try:
    while step < last_step:
      batch = sharding_lib.host_to_global(_stack_batches(data, k), mesh, leading_axes=1)
      if step == start_step:  # The call below reuses this compilation.
        train_fn.lower(state, batch, seed_key).compile()
        # The first gradient all-reduce waits for every process, compiled or not.
        sharding_lib.wait_for_all_processes('first_train_step')
      state, metrics = train_fn(state, batch, seed_key)
      pending.append(metrics)
      step += k
      # step // k counts calls, the consecutive ids the multi-process sync point needs.
      preempted = preemption.reached(step // k)
      must_save = job.after_step(step, state) if job.after_step is not None else False

      if fid is not None and _is_due(step, tc.fid_every_steps, last_step):
        measured = fid(step, state.ema_params)
        fid_records[step] = {'fid': measured['fid']}
        writer.write_scalars(step, measured)
        logging.info(
          'step %d  FID %.4g of %d samples (sampling %.1f s, features %.1f s)',
          step,
          measured['fid'],
          tc.fid_num_samples,
          measured['fid_sampling_seconds'],
          measured['fid_features_seconds'],
        )
        # Measuring is not training: its time stays out of steps/s.
        seconds = measured['fid_sampling_seconds'] + measured['fid_features_seconds']
        timer = (timer[0], timer[1] + seconds)

      if _is_due(step, tc.log_every_steps, last_step) or preempted:
        last_metrics = _log(
          step, last_step, pending, state, timer, writer, metrics_log, tc, throughput, fid_records
        )
        pending, timer, fid_records = [], (step, time.time()), {}
        ckpt.poll()  # A failed background save stops the run here, not a save later.
        check_lock()

      if job.grid_fn is not None and _is_due(step, tc.sample_every_steps, last_step):
        samples = job.grid_fn(state)
        # Every process takes part in the gather; only the chief writes.
        samples = images_lib.to_uint8(sharding_lib.gather_to_hosts(samples, f'grid_{step}'))
        if job.grid_labels is None:
          grid = images_lib.make_grid(samples)
        else:  # One row per class.
          grid = images_lib.class_grid(samples, job.grid_labels, max_columns=len(samples))
        if is_chief:
          images_lib.save_png(
            grid,
            os.path.join(workdir, 'samples', f'step_{step:08d}.png'),
            upscale=images_lib.readable_upscale(config.data.image_size),
          )
        writer.write_images(step, {'samples': grid[None]})

      if _is_due(step, tc.checkpoint_every_steps, last_step) or preempted or must_save:
        save_checkpoint(ckpt, step, state, config_json)
      if preempted:
        ckpt.wait()
        logging.warning(
          'Preempted: committed the checkpoint of step %d; run the same command to resume.', step
        )
        break
    ckpt.wait()
  finally:
    writer.flush()
    writer.close()
  return last_metrics


def _log(
  step, last_step, pending, state, timer, writer, metrics_log, tc, throughput, extra
) -> dict[str, float]:
  """Writes the per-step metrics since the last log step (with `extra`'s); stops a diverged run."""
  # One transfer for everything since the last log step.
  per_call, nonfinite_in_a_row = jax.device_get((pending, state.nonfinite_in_a_row))
  per_step = {name: np.concatenate([m[name] for m in per_call]) for name in per_call[0]}
  count = len(per_step['loss'])
  metrics_log.append(step - count + 1, per_step, extra)
  finite = per_step['finite'] > 0
  # Means over the applied steps: a skipped step's NaN would hide the others.
  metrics = {
    name: float(np.mean(values[finite])) if finite.any() else float('nan')
    for name, values in per_step.items()
    if name != 'finite'
  }
  timer_step, timer_time = timer
  steps_per_sec = (step - timer_step) / max(time.time() - timer_time, 1e-9)
  metrics['steps_per_sec'] = steps_per_sec
  metrics['skipped_steps'] = float(count - finite.sum())
  metrics.update(throughput.metrics(steps_per_sec))
  writer.write_scalars(step, metrics)
  eta = (last_step - step) / max(steps_per_sec, 1e-9)
  rates = f'{metrics["images_per_sec"]:.1f} images/s'
  if 'tflops_per_device' in metrics:
    rates += f'  {metrics["tflops_per_device"]:.3g} TFLOP/s/device'
  if 'mfu' in metrics:
    rates += f'  MFU {100 * metrics["mfu"]:.1f}%'
  logging.info(
    'step %d/%d (%.1f%%)  loss %.5f  grad_norm %.3f  %.2f steps/s  %s  ETA %s',
    step,
    last_step,
    100.0 * step / last_step,
    metrics['loss'],
    metrics['grad_norm'],
    steps_per_sec,
    rates,
    _format_seconds(eta),
  )
  if int(nonfinite_in_a_row) >= tc.max_consecutive_nonfinite:
    raise TrainingError(
      f'{int(nonfinite_in_a_row)} training steps in a row had a non-finite loss or gradient '
      f'(stopped at step {step}; limit training.max_consecutive_nonfinite='
      f'{tc.max_consecutive_nonfinite}). They were skipped, and the checkpoints hold finite '
      'values; lower the learning rate or check the data.'
    )
  return metrics


def _stack_batches(iterator, k: int) -> dict[str, np.ndarray]:
  batches = [next(iterator) for _ in range(k)]
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def _is_due(step: int, every: int, last_step: int) -> bool:
  return every > 0 and (step % every == 0 or step == last_step)


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return flat


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}'
