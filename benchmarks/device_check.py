"""One GPU's check of ddpm-jax against diffusers + PyTorch (`torch.compile`), in a few minutes.

    python benchmarks/device_check.py --out device_check.json [--dtypes bfloat16,float32]
    python benchmarks/device_check.py --smoke --out smoke.json    # CPU, tiny sizes, seconds

For each compute dtype (default bfloat16, then float32), on the paper's
CIFAR-10 U-Net (35.7M parameters) at the paper's batch 128:

  train_<dtype>     ddpm-jax's real training step (`train_state.train_steps`)
                    vs diffusers' `UNet2DModel`, the same network, under
                    `torch.compile` (fused Adam, clipping, EMA);
  forward_<dtype>   the evaluation forward pass, likewise;
  sampling_<dtype>  20-call DPM-Solver++ (order 2): ddpm-jax's compiled
                    `sampling.dpm_solver_sample_loop` vs the diffusers loop of
                    `DPMSolverMultistepScheduler` over the compiled peer.

Each row gives images/s of both, their ratio (above 1: ddpm-jax faster) and
each one's MFU: model FLOPs from `ddpm_jax.throughput` (the same count for
both frameworks) over the device's dense bf16 peak (`throughput.PEAK_TFLOPS`,
or --peak-tflops). The two frameworks share the process and take turns
(benchmarks/common.py). Everything goes to one JSON file (rewritten after
every row, so an interrupted run keeps what it measured) and a table to
stdout. `--smoke` runs every row with a one-level 8x8 U-Net at batch 2 on
whatever device there is, PyTorch uncompiled (`--torch-compile eager` adds
the compiler's tracing, not its code generation): a test runs it. Needs JAX,
flax, optax, ml_collections, PyTorch and diffusers; not TensorFlow.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import run  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import workloads  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

FULL = dict(
  smoke=False,
  batch=128,
  sample_steps=20,
  repeats=7,
  warmup=2,
  min_seconds=0.25,
  torch_compile_backend='inductor',
)
SMOKE = dict(
  smoke=True,
  batch=2,
  sample_steps=3,
  repeats=2,
  warmup=1,
  min_seconds=0.0,
  torch_compile_backend=None,
)
KINDS = ('train', 'forward', 'sampling')
DTYPES = ('bfloat16', 'float32')


def _torch_compiled(workload, spec: dict[str, Any]):
  """The PyTorch workload with its U-Net under `torch.compile` (parameters shared)."""
  if spec['torch_compile_backend']:
    torch = workloads._torch()  # pylint: disable=protected-access
    workload.model = torch.compile(workload.model, backend=spec['torch_compile_backend'])
  return workload


class JaxSampler:
  """ddpm-jax's DPM-Solver++ chain over a `JaxForward`'s U-Net and parameters, one compiled call."""

  def __init__(self, fwd: workloads.JaxForward, steps: int):
    import jax  # pylint: disable=g-import-not-at-top
    from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top

    def chain(params, key):
      model_fn = lambda x, t: fwd.model.apply({'params': params}, x, t, train=False)
      return sampling.dpm_solver_sample_loop(
        fwd.d, model_fn, fwd.x.shape, key, num_steps=steps, order=2
      )

    self.params, self.key = fwd.params, jax.random.key(0)
    self.compiled = jax.jit(chain).lower(self.params, self.key).compile()

  def __call__(self) -> None:
    self.compiled(self.params, self.key).block_until_ready()


class TorchSampler:
  """The diffusers loop of `DPMSolverMultistepScheduler` (order 2) over a `TorchForward`'s U-Net.

  The U-Net takes the forward row's input tensors (shapes, strides, kinds),
  so its compiled forward pass is reused rather than compiled again.
  """

  def __init__(self, fwd: workloads.TorchForward, d: Any, steps: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from diffusers import DPMSolverMultistepScheduler  # pylint: disable=g-import-not-at-top

    self.fwd, self.steps = fwd, steps
    # The U-Net's inputs: tensors made outside inference mode, like the forward row's,
    # so that its compiled graph's guards hold (an inference tensor fails them).
    self.x_in, self.t_in = fwd.x.clone(), fwd.t.clone()
    self.scheduler = DPMSolverMultistepScheduler(
      num_train_timesteps=d.num_timesteps,
      trained_betas=np.asarray(d.betas),
      algorithm_type='dpmsolver++',
      solver_order=2,
      prediction_type='epsilon',
    )

  def __call__(self) -> None:
    torch, fwd = workloads._torch(), self.fwd  # pylint: disable=protected-access
    device = fwd.x.device
    self.scheduler.set_timesteps(self.steps, device=device)
    x = torch.randn(fwd.x.shape, device=device)
    with torch.inference_mode(), fwd.autocast():
      for t in self.scheduler.timesteps:
        self.x_in.copy_(x)
        self.t_in.fill_(t)
        eps = fwd.model(self.x_in, self.t_in).sample.float()
        x = self.scheduler.step(eps, t, x).prev_sample
    workloads._torch_sync()  # pylint: disable=protected-access


def measure(kind: str, dtype: str, spec: dict[str, Any], flops: dict[str, float], peak, forwards):
  """One row: both frameworks' images/s, their ratio and MFU, and the timings.

  `forwards` keeps each dtype's forward workloads (compiled once) for its sampling row.
  """
  config = workloads.experiment_config('cifar10', dict(quick=spec['smoke'], dtype=dtype))
  batch = int(spec['batch'])
  if kind == 'train':
    jax_w = workloads.JaxTrain(config, batch)
    torch_w = _torch_compiled(workloads.TorchTrain(config, batch), spec)
  else:
    if dtype not in forwards:
      forwards[dtype] = (
        workloads.JaxForward(config, batch),
        _torch_compiled(workloads.TorchForward(config, batch), spec),
      )
    jax_w, torch_w = jax_fwd, torch_fwd = forwards[dtype]
    if kind == 'sampling':
      jax_w = JaxSampler(jax_fwd, spec['sample_steps'])
      torch_w = TorchSampler(torch_fwd, jax_fwd.d, spec['sample_steps'])
  timing = common.time_interleaved(
    {'jax': jax_w, 'torch': torch_w},
    repeats=spec['repeats'],
    warmup=spec['warmup'],
    min_seconds=spec['min_seconds'],
  )
  row: dict[str, Any] = dict(batch=batch, dtype=dtype)
  if kind == 'sampling':
    row['model_calls'] = spec['sample_steps']
  flops_per_image = flops[kind]
  for fw in ('jax', 'torch'):
    images_per_s = batch / timing[fw]['median_s']
    row[f'{fw}_images_per_s'] = images_per_s
    row[f'{fw}_tflops_per_s'] = images_per_s * flops_per_image / 1e12
    row[f'{fw}_mfu'] = row[f'{fw}_tflops_per_s'] / peak if peak else None
  row['ratio'] = row['jax_images_per_s'] / row['torch_images_per_s']
  row['timing'] = timing
  return row


def table(rows: dict[str, dict[str, Any]]) -> str:
  """The rows as a fixed-width table: images/s, ratio, MFU."""

  def mfu(value, width):
    return 'n/a'.rjust(width) if value is None else f'{value:{width}.1%}'

  lines = [
    f'{"row":18s} {"ddpm-jax img/s":>15s} {"diffusers img/s":>16s} {"ratio":>7s} '
    f'{"MFU jax":>8s} {"MFU torch":>9s}'
  ]
  for name, row in rows.items():
    if 'error' in row:
      lines.append(f'{name:18s} ERROR {row["error"]}')
      continue
    lines.append(
      f'{name:18s} {row["jax_images_per_s"]:15.1f} {row["torch_images_per_s"]:16.1f} '
      f'{row["ratio"]:7.2f} {mfu(row["jax_mfu"], 8)} {mfu(row["torch_mfu"], 9)}'
    )
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='the JSON report')
  parser.add_argument('--smoke', action='store_true', help='every row, tiny sizes (a test)')
  parser.add_argument('--dtypes', default=','.join(DTYPES), help='comma-separated, run in order')
  parser.add_argument('--rows', default=','.join(KINDS), help='comma-separated subset of KINDS')
  parser.add_argument('--batch', type=int, help='images a call (default 128; smoke 2)')
  parser.add_argument('--peak-tflops', type=float, default=0.0, help='default: from the table')
  parser.add_argument(
    '--torch-compile',
    choices=('inductor', 'eager', 'none'),
    help="torch.compile's backend for the peer (default inductor; smoke none)",
  )
  args = parser.parse_args(argv)
  dtypes, kinds = args.dtypes.split(','), args.rows.split(',')
  if set(dtypes) - set(DTYPES) or set(kinds) - set(KINDS):
    parser.error(f'--dtypes from {DTYPES}, --rows from {KINDS}')
  spec = dict(SMOKE if args.smoke else FULL, dtypes=dtypes, rows=kinds)
  if args.batch:
    spec['batch'] = args.batch
  if args.torch_compile:
    spec['torch_compile_backend'] = None if args.torch_compile == 'none' else args.torch_compile

  # JAX must not take most of the GPU's memory before PyTorch has its share.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if args.smoke:  # Nothing timed matters: compile fast.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + run.QUICK_XLA_FLAGS).strip()
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_xla_flags()  # main.py's XLA:CPU flags, before JAX makes its backend.
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import throughput  # pylint: disable=g-import-not-at-top

  cache = os.environ.get(runtime.COMPILATION_CACHE_ENV)
  if cache:  # Where the machine keeps one, a rerun skips XLA's autotuning.
    jax.config.update('jax_compilation_cache_dir', cache)
  device_kind = jax.devices()[0].device_kind
  peak = throughput.device_peak_tflops(device_kind, args.peak_tflops)
  config = workloads.experiment_config('cifar10', dict(quick=args.smoke))
  shape = workloads.image_shape(config)
  forward = throughput.forward_flops_per_image(config.model, shape)
  flops = dict(
    forward=forward,
    train=throughput.train_flops_per_image(config.model, shape),
    sampling=spec['sample_steps'] * forward,
  )
  meta = dict(
    machine=run.machine(),
    versions=run.versions(),
    python=sys.version.split()[0],
    argv=sys.argv[1:] if argv is None else argv,
    started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat('T', 'seconds'),
    info=workloads._info(with_torch=True),  # pylint: disable=protected-access
    peak_tflops=peak,
    peak_note='dense bf16 peak of one device; float32 rows are measured against it too',
    model_flops_per_image=flops,
    model=dict(
      image_shape=list(shape),
      ch=config.model.ch,
      ch_mult=list(config.model.ch_mult),
      num_res_blocks=config.model.num_res_blocks,
      attn_resolutions=list(config.model.attn_resolutions),
    ),
  )
  rows: dict[str, dict[str, Any]] = {}
  t0 = time.perf_counter()
  for dtype in dtypes:
    forwards: dict[str, Any] = {}
    for kind in kinds:
      name = f'{kind}_{dtype}'
      print(f'[{time.perf_counter() - t0:6.1f} s] {name}', flush=True)
      start = time.perf_counter()
      try:
        rows[name] = measure(kind, dtype, spec, flops, peak, forwards)
      except Exception as e:  # pylint: disable=broad-except  # The other rows go on.
        rows[name] = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
      rows[name]['row_wall_s'] = time.perf_counter() - start
      common.release_free_memory()
      meta['wall_s'] = time.perf_counter() - t0
      with open(args.out, 'w') as f:
        json.dump(dict(meta=meta, settings=spec, rows=rows), f, indent=1, default=float)
  print(table(rows))
  print(f'{meta["wall_s"]:.0f} s; wrote {args.out}')
  failed = [name for name, row in rows.items() if 'error' in row]
  for name in failed:
    print(f'ERROR in {name}:\n{rows[name]["traceback"]}')
  bad = [
    name
    for name, row in rows.items()
    if name not in failed and not (math.isfinite(row['ratio']) and row['ratio'] > 0)
  ]
  return 1 if failed or bad else 0


if __name__ == '__main__':
  sys.exit(main())
