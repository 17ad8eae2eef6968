"""Data parallelism: one `Mesh` with a 'data' axis over every device of every host.

The train state is replicated and the batch is split along its first axis;
`jax.jit` inserts the gradient all-reduce. The same code runs on one CPU, on
8 TPU cores, or on a multi-host pod: only the mesh differs.
"""

import itertools
from typing import Any
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost as orbax_multihost

DATA_AXIS = 'data'
# How long a process waits at a barrier for the slowest one (start-up, compiling).
BARRIER_TIMEOUT_S = 1800
# Every process passes the same barriers in the same order, so their counts agree.
_barrier_count = itertools.count()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Split along the batch axis, after `leading_axes` unsharded axes.

  `leading_axes=1` is for a stack of batches [K, B, ...] consumed by a
  multi-step call.
  """
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over devices and hosts."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
      f'The global batch size {global_batch_size} does not divide by the number of '
      f'devices {num_devices}; choose a multiple of {num_devices}.'
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f'The global batch size {global_batch_size} does not divide by the '
      f'number of processes {jax.process_count()}.'
    )


def host_to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh, leading_axes: int = 0) -> Any:
  """Assembles each host's slice of the batch into one global sharded array.

  Args:
    local_batch: this process's examples, each array [..., B / num_processes, ...]
      with the batch axis after `leading_axes` axes.
    mesh: the data mesh.
    leading_axes: unsharded axes before the batch axis.

  Returns:
    The same mapping with global `jax.Array`s sharded over 'data'.
  """
  sharding = batch_sharded(mesh, leading_axes)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), dict(local_batch)
  )


def wait_for_all_processes(name: str) -> None:
  """Blocks until every process reaches this barrier; a no-op with one process.

  The barrier goes through JAX's coordination service, not a device
  collective: CPU collectives (gloo) wait only 30 s for a late partner, while
  processes drift further apart than that when one starts up or compiles more
  slowly.
  """
  if jax.process_count() > 1:
    key = f'ddpm_jax_{name}_{next(_barrier_count)}'
    orbax_multihost.get_barrier_sync_fn()(key=key, timeout_ms=BARRIER_TIMEOUT_S * 1000)


def gather_to_hosts(tree: Any, name: str) -> Any:
  """Every process gets the whole of each (batch-sharded) array, as numpy.

  Meets the other processes at a barrier first (see `wait_for_all_processes`).
  """
  wait_for_all_processes(name)
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
