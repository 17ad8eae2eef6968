"""Timing and peak memory, shared by the benchmark workloads (framework-agnostic).

A workload is a zero-argument callable that blocks until its result is ready
(`jax.block_until_ready` on the JAX side; PyTorch on the CPU is synchronous).
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from typing import Any
from collections.abc import Callable, Mapping

MIB = 1024.0 * 1024.0


def summarize(times: list[float]) -> dict[str, Any]:
  """Median (the number reported), min, max of per-call seconds."""
  return dict(
    median_s=statistics.median(times),
    min_s=min(times),
    max_s=max(times),
    repeats=len(times),
    times_s=[round(t, 6) for t in times],
  )


def time_interleaved(
  fns: Mapping[str, Callable[[], object]],
  *,
  repeats: int,
  warmup: int = 1,
  min_seconds: float = 0.0,
) -> dict[str, dict[str, Any]]:
  """Times several workloads in turns (a, b, a, b, ...), each after its warm-up.

  Taking turns spreads any drift of the machine's speed evenly over the
  workloads compared, so their ratio holds even where their times move.

  Args:
    fns: name -> blocking zero-argument callable.
    repeats: timed samples per workload (the median is reported).
    warmup: untimed calls per workload first (compilation, allocator warm-up);
      0 suits long programs compiled ahead of time.
    min_seconds: a workload faster than this is called several times per
      sample (calibrated on the last warm-up call).

  Returns:
    name -> `summarize` of seconds per call, plus 'calls_per_sample'.
  """
  if min_seconds and not warmup:
    raise ValueError('min_seconds needs a warm-up call to calibrate on')
  inner = {}
  for name, fn in fns.items():
    elapsed = 0.0
    for _ in range(warmup):
      t0 = time.perf_counter()
      fn()
      elapsed = time.perf_counter() - t0
    inner[name] = max(1, math.ceil(min_seconds / max(elapsed, 1e-9))) if min_seconds else 1
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(inner[name]):
        fn()
      times[name].append((time.perf_counter() - t0) / inner[name])
  return {name: dict(summarize(times[name]), calls_per_sample=inner[name]) for name in fns}


def _status_mib(field: str) -> float | None:
  """A memory field of /proc/self/status in MiB (None off Linux)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def release_free_memory() -> None:
  """Collects garbage and returns free heap pages to the kernel (glibc only)."""
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


class PeakMemory:
  """Peak resident memory of a workload, over the resident memory before it was built.

  `mem = PeakMemory()` before building the model records the baseline; after
  compiling and warming up, `with mem: run()` resets Linux's high-water mark
  (`/proc/self/clear_refs`) and reads it back. `result['workload_mib']` is
  then the peak minus the baseline: parameters, optimizer state, activations
  and runtime buffers, without compilation's memory. Free heap is handed back
  first, so memory that an earlier workload freed and this one reuses counts.
  """

  def __init__(self):
    release_free_memory()
    self.baseline = _status_mib('VmRSS')
    self.result: dict[str, Any] = {}

  def __enter__(self) -> PeakMemory:
    release_free_memory()
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
      self._reset = True
    except OSError:  # The mark may then date from compilation: an upper bound.
      self._reset = False
    return self

  def __exit__(self, *exc) -> None:
    peak = _status_mib('VmHWM')
    known = peak is not None and self.baseline is not None
    self.result = dict(
      baseline_rss_mib=self.baseline and round(self.baseline, 1),
      peak_rss_mib=peak and round(peak, 1),
      workload_mib=round(peak - self.baseline, 1) if known else None,
      peak_reset=self._reset,
    )
