"""Shared by the reliability and multi-process tests: data, subprocess trainers, state checks.

Children are run with the test session's persistent compilation cache (read
from `jax.config.jax_compilation_cache_dir`, passed as
DDPM_JAX_COMPILATION_CACHE), so a program compiled once is loaded afterwards.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import jax
import numpy as np

from configs import tiny
from ddpm_jax import checkpointing
from ddpm_jax import inference
from ddpm_jax import input_pipeline
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import train
from ddpm_jax.datasets import fashion_mnist_idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'tests', 'train_subprocess.py')
MAIN = os.path.join(REPO, 'main.py')
# A subprocess trainer of the tiny config takes ~30 s on a loaded 2-core machine.
TIMEOUT_S = 400


def write_fake_fashion_mnist(directory, num_train=64, num_test=16, seed=0):
  """Small IDX files with smooth, learnable 28x28 images (blobs of two sizes)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:28, :28]

  def images(n):
    cy, cx = rng.uniform(8, 20, (2, n))
    radius = rng.choice([4.0, 8.0], n)
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    return (255 * np.exp(-d2 / (2 * radius[:, None, None] ** 2))).astype(np.uint8)

  os.makedirs(directory, exist_ok=True)
  for split, n in (('train', num_train), ('t10k', num_test)):
    fashion_mnist_idx.write_idx_gz(
      os.path.join(directory, f'{split}-images-idx3-ubyte.gz'), images(n)
    )
    fashion_mnist_idx.write_idx_gz(
      os.path.join(directory, f'{split}-labels-idx1-ubyte.gz'),
      rng.integers(0, 10, n).astype(np.uint8),
    )


def make_data(root: str):
  """Fake Fashion-MNIST IDX files, prepared into TFDS once: (manual_dir, data_dir)."""
  dirs = os.path.join(root, 'idx'), os.path.join(root, 'tfds')
  write_fake_fashion_mnist(dirs[0])
  # Prepared here, so that processes started together never prepare it at once.
  input_pipeline.dataset_info(tiny_config(dirs))
  return dirs


def tiny_config(data_dirs, **training):
  """configs/tiny.py on the fake data, with `training` fields overridden."""
  config = tiny.get_config()
  config.data.manual_dir, config.data.data_dir = data_dirs
  for key, value in training.items():
    config.training[key] = value
  return config


# The fake data's classes: the overrides that make the tiny config class-conditional.
NUM_CLASSES = 10
CONDITIONAL_FLAGS = [f'--config.model.num_classes={NUM_CLASSES}']


def conditional(config):
  """`config` made class-conditional, as CONDITIONAL_FLAGS make it on the command line."""
  config.model.num_classes = NUM_CLASSES
  return config


def config_flags(data_dirs, **training) -> list[str]:
  """The command-line flags that make main.py build `tiny_config(data_dirs, **training)`."""
  flags = [
    '--config=configs/tiny.py',
    f'--config.data.manual_dir={data_dirs[0]}',
    f'--config.data.data_dir={data_dirs[1]}',
  ]
  return flags + [f'--config.training.{key}={value}' for key, value in training.items()]


def child_env(**extra: str) -> dict[str, str]:
  """The environment of a child trainer, with `extra` added.

  Children get as many CPU devices as this session (conftest forces 4): the
  same device count and XLA flags (the session's $XLA_FLAGS) make the same
  compiled programs, so a child loads from the shared cache what the session
  compiled, and the other way round.
  """
  env = {k: v for k, v in os.environ.items() if not k.startswith(('DDPM_TEST_', 'JAX_'))}
  env.update(
    JAX_PLATFORMS='cpu',
    TF_CPP_MIN_LOG_LEVEL='2',
    JAX_NUM_CPU_DEVICES=str(jax.device_count()),
    DDPM_JAX_COMPILATION_CACHE=jax.config.jax_compilation_cache_dir or '',
  )
  env.update(extra)
  return env


def start_trainer(
  workdir: str,
  flags: Sequence[str],
  *,
  env: dict[str, str] | None = None,
  script: str = LAUNCHER,
  log_path: str | None = None,
) -> subprocess.Popen:
  """Starts `script` (main.py's flags) on `workdir`; output to `log_path` or a pipe."""
  cmd = [sys.executable, script, f'--workdir={workdir}', *flags]
  if log_path is None:
    return subprocess.Popen(
      cmd,
      cwd=REPO,
      env=env or child_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
  with open(log_path, 'w') as log:  # The child keeps its own copy of the file.
    return subprocess.Popen(
      cmd, cwd=REPO, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, log_path: str | None = None):
  """Waits for a trainer: (return code, its output)."""
  try:
    output, _ = process.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate()
  if log_path:
    with open(log_path) as f:
      output = f.read()
  return process.returncode, output


def run_trainer(workdir: str, flags: Sequence[str], **kwargs):
  """Runs a trainer to its end: (return code, output)."""
  return finish(start_trainer(workdir, flags, **kwargs))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def restore(workdir: str, config, step: int | None = None, devices=None):
  """The train state of a workdir's checkpoint, replicated over `devices` (default: all)."""
  model, _, image_shape = inference.build_model_and_diffusion(config)
  mesh = sharding_lib.make_mesh(devices)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    state, _ = ckpt.restore(
      checkpointing.abstract_train_state(model, config, image_shape, mesh), step
    )
  finally:
    ckpt.close()
  return state


def committed_steps(workdir: str) -> list[int]:
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    return list(ckpt.all_steps())
  finally:
    ckpt.close()


def assert_states_equal(a, b) -> None:
  """Bit for bit: step, parameters, EMA, optimizer state, non-finite counter."""
  np.testing.assert_array_equal(jax.device_get(a.step), jax.device_get(b.step))
  np.testing.assert_array_equal(
    jax.device_get(a.nonfinite_in_a_row), jax.device_get(b.nonfinite_in_a_row)
  )
  for part in ('params', 'ema_params', 'opt_state'):
    jax.tree.map(
      np.testing.assert_array_equal,
      jax.device_get(getattr(a, part)),
      jax.device_get(getattr(b, part)),
    )


def assert_states_close(a, b, *, atol: float) -> None:
  """Equal steps and counters; parameters, EMA and optimizer state within `atol`."""
  np.testing.assert_array_equal(jax.device_get(a.step), jax.device_get(b.step))
  np.testing.assert_array_equal(
    jax.device_get(a.nonfinite_in_a_row), jax.device_get(b.nonfinite_in_a_row)
  )
  for part in ('params', 'ema_params', 'opt_state'):
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol),
      jax.device_get(getattr(a, part)),
      jax.device_get(getattr(b, part)),
    )


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def as_two_processes(make_train_iterator):
  """One process's stand-in for `make_train_iterator` that yields two processes' global batch.

  Process 0's examples fill the first half of the batch axis, as in
  jax.make_array_from_process_local_data over a mesh of both processes.
  """

  def make(config, *, start_step=0, process_index=None, process_count=None):
    del process_index, process_count
    streams = [
      make_train_iterator(config, start_step=start_step, process_index=p, process_count=2)
      for p in range(2)
    ]
    while True:
      batches = [next(s) for s in streams]
      yield {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

  return make


def preempt_at(step, make_train_iterator):
  """`make_train_iterator` that sends this process SIGTERM when the batch of `step` is drawn."""

  def make(config, *, start_step=0, **kwargs):
    for index, batch in enumerate(make_train_iterator(config, start_step=start_step, **kwargs)):
      if start_step + index == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  return make
