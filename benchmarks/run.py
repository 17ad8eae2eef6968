"""The ddpm-jax benchmark suite: side by side with diffusers + PyTorch, and the machine's limit.

    scripts/setup.sh --peers     # once: the pinned peers of requirements-peers.txt
    python benchmarks/run.py [--quick] [--out FILE.json] [--batch 8] [--dtype bfloat16]
                             [--rows pair,peak,...]

writes every number to a JSON file (default benchmarks/results.json) and
prints the headline ratios. Rows (`--rows` names the tasks behind them):

  1. training step of the CIFAR-10 U-Net (35.7M): ddpm-jax's real
     `train_steps` (Adam, clipping, EMA) vs diffusers `UNet2DModel` + torch
     (fused Adam, clipping, EMA), images/s, ratio, peak memory [pair, scaling];
  2. the forward pass (the sampling workload), images/s, ratio [pair, scaling];
  3. achieved FLOP/s of 1 and 2 (XLA's count of the network as defined, the
     U-Net built with the reference layers) over the fastest matmul or 3x3
     convolution either framework reaches in the same run [pair, peak];
  4. the scan-compiled 1000-step sampler vs 1000 bare forward passes, and a
     16-image sampling run with the Fashion-MNIST default's U-Net vs
     diffusers' DDPMPipeline with the identical network [sampling];
  5. bits/dim evaluation (all T terms) throughput vs the forward pass [bpd];
  6. compile time of the training step and the sampler, cold and with a warm
     persistent compilation cache, each in a fresh process [compile];
  7. input pipeline images/s vs the default training step's [pipeline, fashion_train];
  8. images/s and peak memory against batch size; sampling time against the
     number of steps [scaling, steps].

Speed is compared as ratios measured side by side: the two frameworks share
one worker process and take turns (medians of several repeats after
warm-up), so the machine's drift hits both alike. Each task of a full run
gets a fresh worker process (benchmarks/workloads.py) with the environment
main.py trains in (XLA flags, huge-page malloc). The suite reads the platform
and runs unchanged on CPU, GPU and TPU (PyTorch on CUDA where it has it).
`--quick` runs every row with tiny sizes in about a minute (a test runs it).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)

FULL = dict(
  quick=False,
  batch=8,
  repeats=7,
  warmup=3,
  num_timesteps=1000,
  sample_batch=16,
  sample_steps=1000,
  sample_repeats=3,
  bpd_batch=16,
  scaling_batches=[1, 2, 4, 8, 16],
  scaling_repeats=3,
  step_counts=[10, 100, 1000],
  pipeline_batches=100,
)
QUICK = dict(
  quick=True,
  batch=2,
  repeats=2,
  warmup=1,
  num_timesteps=10,
  sample_batch=2,
  sample_steps=10,
  sample_repeats=1,
  bpd_batch=2,
  scaling_batches=[2],
  scaling_repeats=1,
  step_counts=[2, 10],
  pipeline_batches=5,
)
# The smoke run times nothing that matters: compile fast.
QUICK_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
ROWS = (
  'pair',
  'peak',
  'sampling',
  'bpd',
  'fashion_train',
  'scaling',
  'steps',
  'pipeline',
  'compile',
)


def versions() -> dict[str, str]:
  """The versions measured; exits with a hint when the peers are not installed."""
  try:
    return {
      name: importlib.metadata.version(name)
      for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'diffusers')
    }
  except importlib.metadata.PackageNotFoundError as e:
    sys.exit(f'{e.name} is missing: install the peers with scripts/setup.sh --peers')


def worker_environment(quick: bool) -> dict[str, str]:
  """main.py's process environment (huge-page malloc where it helps) for both frameworks."""
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONWARNINGS='ignore')
  env = runtime.environment_with_huge_pages(env) or env
  if quick:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + QUICK_XLA_FLAGS).strip()
  return env


def run_worker(tasks: list[str], spec: dict[str, Any]) -> dict[str, Any]:
  """Runs tasks in a fresh worker process: {'info': ..., 'results': {task: result}}."""
  with tempfile.TemporaryDirectory(prefix='ddpm_bench_') as tmp:
    path = os.path.join(tmp, 'result.json')
    cmd = [
      sys.executable,
      os.path.join(BENCH_DIR, 'workloads.py'),
      '--tasks',
      ','.join(tasks),
      '--spec',
      json.dumps(spec),
      '--result',
      path,
    ]
    print(f'[{datetime.datetime.now():%H:%M:%S}] {",".join(tasks)}', flush=True)
    proc = subprocess.run(
      cmd,
      cwd=ROOT,
      env=worker_environment(spec['quick']),
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      check=False,
    )
    if proc.returncode or not os.path.exists(path):
      error = dict(error=f'worker exited with {proc.returncode}', traceback=proc.stdout[-3000:])
      return dict(info={}, results={t: error for t in tasks})
    with open(path) as f:
      return json.load(f)


def derive(raw: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
  """The report's rows from the tasks' results."""
  rows: dict[str, Any] = {}
  pair, peak = raw.get('pair', {}), raw.get('peak', {})
  at_batch = {r['batch']: r for r in raw.get('scaling', {}).get('rows', [])}.get(spec['batch'], {})
  limit = peak.get('limit_flops_per_s')
  flops = dict(
    limit_flops_per_s=limit,
    limit_kernel=peak.get('best_kernel'),
    kernels_flops_per_s=peak.get('flops_per_s'),
  )
  for name, kind in (('train_step', 'train'), ('forward', 'forward')):
    p = pair.get(kind)
    if not p:
      rows[name] = dict(error=pair.get('error', 'not run'))
      continue
    rows[name] = dict(
      batch=spec['batch'],
      ratio=p['ratio'],
      jax_images_per_s=p['jax_images_per_s'],
      torch_images_per_s=p['torch_images_per_s'],
      jax_median_s=p['timing']['jax']['median_s'],
      torch_median_s=p['timing']['torch']['median_s'],
      jax_peak_rss_mib=at_batch.get(f'jax_{kind}', {}).get('memory', {}).get('workload_mib'),
      torch_peak_rss_mib=at_batch.get(f'torch_{kind}', {}).get('memory', {}).get('workload_mib'),
      jax_xla_memory_mib=at_batch.get(f'jax_{kind}', {}).get('xla_memory_mib'),
      # Both frameworks' FLOP/s count the network as defined (as model-FLOPs
      # utilisation does); ddpm-jax's own program executes a different count.
      flops_per_image=p['model_flops_per_image'],
      executed_flops_per_image=p['jax_flops_per_image'],
    )
    for fw in ('jax', 'torch') if limit else ():
      flops[f'{name}_{fw}_flops_per_s'] = p['model_flops_per_image'] * p[f'{fw}_images_per_s']
      flops[f'{name}_{fw}_fraction'] = flops[f'{name}_{fw}_flops_per_s'] / limit
  rows['flops'] = flops
  for name in ('sampling', 'bpd', 'compile', 'scaling', 'steps'):
    rows[name] = raw.get(name, {})
  pipe, consumer = raw.get('pipeline', {}), raw.get('fashion_train', {})
  rows['input_pipeline'] = dict(
    pipeline_images_per_s=pipe.get('images_per_s'),
    first_batch_s=pipe.get('first_batch_s'),
    train_step_images_per_s=consumer.get('images_per_s'),
    batch=pipe.get('batch'),
    ratio=(
      pipe['images_per_s'] / consumer['images_per_s']
      if pipe.get('images_per_s') and consumer.get('images_per_s')
      else None
    ),
  )
  return rows


def headline(rows: dict[str, Any]) -> dict[str, float | None]:
  """The numbers a reader compares between runs: ratios, fractions, seconds."""

  def get(*keys):
    d = rows
    for k in keys:
      d = d.get(k, {}) if isinstance(d, dict) else {}
    return d if isinstance(d, (int, float)) else None

  return {
    'train_step ddpm-jax / diffusers': get('train_step', 'ratio'),
    'forward ddpm-jax / diffusers': get('forward', 'ratio'),
    'train_step FLOP/s / limit, ddpm-jax': get('flops', 'train_step_jax_fraction'),
    'train_step FLOP/s / limit, diffusers': get('flops', 'train_step_torch_fraction'),
    'forward FLOP/s / limit, ddpm-jax': get('flops', 'forward_jax_fraction'),
    'forward FLOP/s / limit, diffusers': get('flops', 'forward_torch_fraction'),
    'sampler chain overhead over bare forwards': get('sampling', 'chain_overhead'),
    'sampling speed-up over DDPMPipeline': get('sampling', 'speedup_vs_diffusers'),
    'bits/dim throughput / forward': get('bpd', 'fraction_of_forward'),
    'compile train step, cold (s)': get('compile', 'cold', 'train', 'total_s'),
    'compile train step, warm cache (s)': get('compile', 'warm', 'train', 'total_s'),
    'input pipeline / training consumption': get('input_pipeline', 'ratio'),
  }


def machine() -> str:
  model = os.uname().machine
  try:
    with open('/proc/cpuinfo') as f:
      model = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), model)
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} CPUs'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='every row with tiny sizes (smoke)')
  parser.add_argument('--out', default=os.path.join(BENCH_DIR, 'results.json'), help='JSON output')
  parser.add_argument('--batch', type=int, help='batch of rows 1-3 (default 8)')
  parser.add_argument('--repeats', type=int, help='timed repeats per number (default 7)')
  parser.add_argument('--sample-steps', type=int, help='steps of row 4 (default 1000)')
  parser.add_argument(
    '--dtype',
    choices=('float32', 'bfloat16'),
    default='float32',
    help="compute dtype of both U-Nets (model.dtype; the peer's autocast)",
  )
  parser.add_argument('--scaling-batches', help='comma-separated batch sizes of row 8')
  parser.add_argument('--rows', default=','.join(ROWS), help='comma-separated subset of tasks')
  args = parser.parse_args(argv)
  wanted = args.rows.split(',')
  if set(wanted) - set(ROWS):
    parser.error(f'unknown rows {sorted(set(wanted) - set(ROWS))}; valid: {", ".join(ROWS)}')
  spec = dict(QUICK if args.quick else FULL, dtype=args.dtype)
  for key, value in (
    ('batch', args.batch),
    ('repeats', args.repeats),
    ('sample_steps', args.sample_steps),
  ):
    if value is not None:
      spec[key] = value
  if args.scaling_batches:
    spec['scaling_batches'] = [int(b) for b in args.scaling_batches.split(',')]
  meta = dict(
    machine=machine(),
    versions=versions(),
    python=sys.version.split()[0],
    argv=sys.argv[1:] if argv is None else argv,
    glibc_tunables=worker_environment(False).get('GLIBC_TUNABLES', ''),
    started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat('T', 'seconds'),
    loadavg_1m_start=os.getloadavg()[0],
    memory_method='peak RSS (VmHWM, reset after compile + warm-up) minus the RSS '
    'before the workload was built, in-process after malloc_trim; '
    'xla_memory_mib is XLA memory_analysis of the compiled program',
  )

  raw: dict[str, Any] = {}
  info: dict[str, Any] = {}
  cache = tempfile.mkdtemp(prefix='ddpm_bench_cache_')
  try:
    tasks = [t for t in ROWS if t in wanted and t != 'compile']
    groups = [[t] for t in tasks]
    if args.quick and tasks:
      groups = [tasks]  # The smoke run's numbers do not matter, its start-ups do.
    for group in groups:
      out = run_worker(group, dict(spec, cache_dir=cache))
      raw.update(out['results'])
      info.update(out['info'])
      with open(args.out, 'w') as f:  # What is measured so far survives an interruption.
        json.dump(dict(partial=True, settings=spec, raw=raw), f, indent=1, default=float)
    if 'compile' in wanted:
      compile_cache = tempfile.mkdtemp(prefix='ddpm_bench_compile_cache_', dir=cache)
      raw['compile'] = {
        run: run_worker(['compile'], dict(spec, cache_dir=compile_cache))['results']['compile']
        for run in ('cold', 'warm')
      }
  finally:
    shutil.rmtree(cache, ignore_errors=True)

  meta.update(
    backend=info.get('backend'),
    info=info,
    loadavg_1m_end=os.getloadavg()[0],
    finished_utc=datetime.datetime.now(datetime.timezone.utc).isoformat('T', 'seconds'),
  )
  rows = derive(raw, spec)
  numbers = headline(rows)
  for name, value in numbers.items():
    print(f'{name:45s} {"n/a" if value is None else f"{value:.3f}"}')
  for name, result in raw.items():
    for r in result.values() if name == 'compile' else [result]:
      if 'error' in r:
        print(f'ERROR in {name}: {r["error"]}\n{r.get("traceback", "")}')
  with open(args.out, 'w') as f:
    json.dump(
      dict(meta=meta, settings=spec, rows=rows, headline=numbers, raw=raw),
      f,
      indent=1,
      default=float,
    )
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
