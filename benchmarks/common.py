"""Measurement helpers shared by the benchmark workers: timing, machine load, memory.

Everything here is framework-agnostic: a workload is a zero-argument callable
that blocks until its result is ready (`jax.block_until_ready` on the JAX
side; PyTorch on CPU is synchronous).

Machine load is measured, not assumed: `LoadMonitor` reads `/proc/stat` and
this process's CPU time around a measurement, so the busy CPU time of *other*
processes (other jobs sharing the machine) is known for every number, next to
the 1-minute load average that `uptime` shows (which includes this process).

Peak memory is the resident set size (RSS) high-water mark of this process
while a workload runs: Linux's `VmHWM` is reset (`/proc/self/clear_refs`,
value 5) after compilation and warm-up and read back afterwards; freed heap
memory is first handed back to the kernel (`malloc_trim`), so memory freed by
an earlier workload in the same process and reused by this one still counts.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional

MIB = 1024.0 * 1024.0
# Shortest block whose foreign load is estimated (see LoadMonitor).
MIN_LOAD_WINDOW_S = 0.5


# ---------------------------------------------------------------------------
# Machine load.


def _proc_stat_busy() -> Optional[float]:
  """Seconds of busy CPU time summed over all cores since boot (None off Linux)."""
  try:
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  # user nice system idle iowait irq softirq steal [guest guest_nice]; guest
  # time is already inside user and nice.
  busy = sum(fields[:3]) + sum(fields[5:8])
  return busy / os.sysconf('SC_CLK_TCK')


def _own_cpu() -> float:
  """CPU seconds used by every thread of this process so far."""
  t = os.times()
  return t.user + t.system


def loadavg_1m() -> Optional[float]:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def foreign_cpu_cores(seconds: float = 1.0) -> Optional[float]:
  """Cores kept busy by other processes over the next `seconds` (this one idle)."""
  busy0, own0, t0 = _proc_stat_busy(), _own_cpu(), time.perf_counter()
  time.sleep(seconds)
  busy1, own1, t1 = _proc_stat_busy(), _own_cpu(), time.perf_counter()
  if busy0 is None or busy1 is None:
    return None
  return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


class LoadMonitor:
  """Context manager: how busy the machine was while the block ran.

  After the block, `result` holds `loadavg_1m_start` / `loadavg_1m_end` (what
  `uptime` shows; this process counts too), `own_cpu_cores` (this process's
  CPU time / wall time) and `foreign_cpu_cores` (everybody else's; None for
  blocks shorter than MIN_LOAD_WINDOW_S, where clock ticks are too coarse).
  """

  def __enter__(self) -> 'LoadMonitor':
    self._load0 = loadavg_1m()
    self._busy0, self._own0 = _proc_stat_busy(), _own_cpu()
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    wall = max(time.perf_counter() - self._t0, 1e-9)
    busy1, own1 = _proc_stat_busy(), _own_cpu()
    own = (own1 - self._own0) / wall
    foreign = None
    # /proc/stat counts in clock ticks (10 ms): too coarse for short blocks.
    if self._busy0 is not None and busy1 is not None and wall >= MIN_LOAD_WINDOW_S:
      foreign = max(0.0, (busy1 - self._busy0) / wall - own)
    self.result = dict(loadavg_1m_start=self._load0, loadavg_1m_end=loadavg_1m(),
                       own_cpu_cores=round(own, 3),
                       foreign_cpu_cores=None if foreign is None else round(foreign, 3),
                       wall_s=round(wall, 3))


def merge_loads(loads: List[Mapping[str, Optional[float]]]) -> Dict[str, Optional[float]]:
  """The worst (highest) load over several measurements of one row."""
  out: Dict[str, Optional[float]] = {}
  for key in ('loadavg_1m_start', 'loadavg_1m_end', 'own_cpu_cores', 'foreign_cpu_cores'):
    values = [l[key] for l in loads if l.get(key) is not None]
    out[key] = max(values) if values else None
  return out


# ---------------------------------------------------------------------------
# Timing.


def summarize(times: List[float]) -> Dict[str, float]:
  """Median (the number reported), min, max of per-call seconds."""
  return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
              repeats=len(times), times_s=[round(t, 6) for t in times])


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                     min_seconds: float = 0.0) -> Dict[str, Dict[str, object]]:
  """Times several workloads in turns (a, b, a, b, ...), each after warm-up.

  Taking turns spreads any change in machine load evenly over the
  workloads being compared. A workload faster than `min_seconds` is called
  several times per sample, so every sample lasts at least that long.

  Args:
    fns: name -> blocking zero-argument callable.
    repeats: timed samples per workload (the median is reported).
    warmup: untimed calls per workload first (compilation, allocator warm-up);
      0 suits long calls of programs compiled ahead of time.
    min_seconds: minimum duration of one timed sample.

  Returns:
    name -> `summarize` of seconds per call, plus 'calls_per_sample' and 'load'.
  """
  inner = {}
  for name, fn in fns.items():
    elapsed = 0.0
    for _ in range(warmup):
      t0 = time.perf_counter()
      fn()
      elapsed = time.perf_counter() - t0
    if min_seconds and not warmup:
      raise ValueError('min_seconds needs a warm-up call to calibrate on')
    inner[name] = max(1, math.ceil(min_seconds / max(elapsed, 1e-9))) if min_seconds else 1
  times: Dict[str, List[float]] = {name: [] for name in fns}
  with LoadMonitor() as load:
    for _ in range(repeats):
      for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(inner[name]):
          fn()
        times[name].append((time.perf_counter() - t0) / inner[name])
  return {name: dict(summarize(times[name]), calls_per_sample=inner[name], load=load.result)
          for name in fns}


# ---------------------------------------------------------------------------
# Memory.


def _status_kib(field: str) -> Optional[int]:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_mib() -> Optional[float]:
  kib = _status_kib('VmRSS')
  return None if kib is None else kib / 1024.0


def release_free_memory() -> None:
  """Collects garbage and returns free heap pages to the kernel (glibc only)."""
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


class PeakMemory:
  """Peak RSS of a workload, over the RSS before the workload was built.

  Usage: `mem = PeakMemory()` before building the model (records the
  baseline), build / compile / warm up, then `with mem.measure(): run()`.
  `result` then holds `baseline_rss_mib`, `peak_rss_mib` (high-water mark
  during the measured block) and `workload_mib` = peak - baseline: the
  parameters, optimizer state, activations and runtime buffers of this
  workload (compilation memory excluded, since the mark is reset after it).
  """

  def __init__(self):
    release_free_memory()
    self.baseline = rss_mib()
    self.result: Dict[str, Optional[float]] = {}

  def measure(self) -> 'PeakMemory':
    return self

  def __enter__(self) -> 'PeakMemory':
    release_free_memory()
    self._reset_ok = True
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    except OSError:
      # Without the reset the mark may date from compilation: still an
      # upper bound, flagged in the result.
      self._reset_ok = False
    return self

  def __exit__(self, *exc) -> None:
    hwm = _status_kib('VmHWM')
    peak = None if hwm is None else hwm / 1024.0
    self.result = dict(
        baseline_rss_mib=None if self.baseline is None else round(self.baseline, 1),
        peak_rss_mib=None if peak is None else round(peak, 1),
        workload_mib=(None if peak is None or self.baseline is None
                      else round(peak - self.baseline, 1)),
        peak_reset=self._reset_ok)
