"""The ddpm-jax benchmark suite: side by side with diffusers + PyTorch, and the machine's limit.

    python benchmarks/run.py [--quick] [--out FILE.json] [--batch 8]

prints a Markdown table and writes every number (with the machine load
during each measurement) to a JSON file. Rows:

  1. training step of the CIFAR-10 U-Net (35.7M, float32 or --dtype bfloat16): ddpm-jax's real
     `train_steps` (Adam, clipping, EMA) vs diffusers `UNet2DModel` + torch
     (Adam, clipping, EMA), images/s, ratio, peak memory;
  2. the forward pass (the sampling workload), images/s, ratio;
  3. achieved FLOP/s of 1 and 2 (XLA's FLOP count of the lowered programs)
     over the fastest matmul/convolution measured in the same run;
  4. the scan-compiled 1000-step sampler vs 1000 bare forward passes, and a
     16-image sampling run with the Fashion-MNIST default's U-Net vs
     diffusers' DDPMPipeline with the identical network;
  5. bits/dim evaluation (all T terms) throughput vs the forward pass;
  6. compile time of the training step and the sampler, cold and with a
     warm persistent compilation cache (fresh processes);
  7. input pipeline images/s vs the default training step's consumption;
  8. images/s and peak memory against batch size; sampling time against the
     number of steps.

Every number is the median of several timed repeats after warm-up; where two
implementations are compared they run in one process and take turns. Each
group of measurements runs in its own worker process (benchmarks/workloads.py)
and is repeated when other processes kept the machine busy meanwhile. The
suite runs unchanged on CPU, GPU and TPU (it reads `jax.default_backend()`).
PyTorch and diffusers are only needed here and in tests; when they are missing
the suite installs benchmarks/requirements.txt and starts again.
`--quick` runs every row with tiny sizes in well under a minute (CI).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, ROOT)
from ddpm_jax import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

WORKLOADS = os.path.join(BENCH_DIR, 'workloads.py')
REQUIREMENTS = os.path.join(BENCH_DIR, 'requirements.txt')
PEER_REQUIREMENTS = os.path.join(ROOT, 'requirements-peers.txt')


def _pinned_peers() -> Dict[str, str]:
  """torch's and diffusers' versions as requirements-peers.txt pins them.

  A different torch or diffusers would measure something else.
  """
  pins = {}
  with open(PEER_REQUIREMENTS) as f:
    for line in f:
      name, sep, version = line.split('#')[0].strip().partition('==')
      if sep and name in ('torch', 'diffusers'):
        pins[name] = version.strip()
  return pins
_REEXEC_ENV = 'DDPM_BENCH_PEERS_INSTALLED'

FULL = dict(
    quick=False, batch=8, repeats=7, warmup=3, min_seconds=0.0, num_timesteps=1000,
    sample_batch=16, sample_steps=1000, sample_repeats=3, bpd_batch=16,
    scaling_batches=[1, 2, 4, 8, 16],
    scaling_workloads=['jax_forward', 'torch_forward', 'jax_train', 'torch_train'],
    scaling_repeats=3, step_counts=[10, 100, 1000], pipeline_batches=100)
QUICK = dict(
    quick=True, batch=2, repeats=2, warmup=1, min_seconds=0.0, num_timesteps=10,
    sample_batch=2, sample_steps=10, sample_repeats=1, bpd_batch=2,
    scaling_batches=[2],
    scaling_workloads=['jax_forward', 'torch_forward', 'jax_train', 'torch_train'],
    scaling_repeats=1, step_counts=[2, 10], pipeline_batches=5)

QUICK_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'

# Worker processes of a full run, one measurement group each; --quick puts all
# in-process tasks into one worker to save start-up time.
GROUPS = [['pair'], ['peak'], ['sampling'], ['bpd'], ['fashion_train'], ['scaling'], ['steps']]
ALL_ROWS = ('pair', 'peak', 'sampling', 'bpd', 'fashion_train', 'scaling', 'steps', 'compile',
            'pipeline')


# ---------------------------------------------------------------------------
# Peers.


def _peer_problems() -> List[str]:
  problems = []
  for name, want in _pinned_peers().items():
    try:
      have = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      problems.append(f'{name} missing')
      continue
    if have.split('+')[0] != want:
      problems.append(f'{name} {have} (want {want})')
  return problems


def ensure_peers(pinned: bool = True) -> Dict[str, str]:
  """Installs the pinned peers if needed (then re-executes); returns their versions.

  With pinned=False (`--peers installed`, e.g. an accelerator machine with its
  own CUDA PyTorch and no package index) whatever is installed is used and its
  versions are recorded.
  """
  problems = _peer_problems() if pinned else []
  if problems:
    if os.environ.get(_REEXEC_ENV):
      sys.exit(f'benchmark peers still not right after installing: {problems}')
    print(f'Installing the benchmark peers ({"; ".join(problems)}) from {REQUIREMENTS}',
          flush=True)
    subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', '-r', REQUIREMENTS])
    os.environ[_REEXEC_ENV] = '1'
    os.execv(sys.executable, [sys.executable] + sys.argv)
  return {name: importlib.metadata.version(name) for name in
          ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'diffusers')}


# ---------------------------------------------------------------------------
# Workers.


def _foreign(results: Dict[str, Any]) -> float:
  """The most other processes kept busy during any measurement of these results."""
  values = [r.get('load', {}).get('foreign_cpu_cores') for r in results.values()]
  values = [v for v in values if v is not None]
  return max(values) if values else 0.0


def wait_for_quiet(max_foreign: float, max_wait_s: float) -> Optional[float]:
  """Waits (up to max_wait_s) until other processes use < max_foreign cores."""
  deadline = time.time() + max_wait_s
  while True:
    foreign = common.foreign_cpu_cores(1.0)
    if foreign is None or foreign < max_foreign or time.time() >= deadline:
      return foreign
    time.sleep(2.0)


def worker_environment() -> Dict[str, str]:
  """The workers' environment: both frameworks run as main.py runs training.

  That is, with malloc's transparent huge pages where the machine has them
  (ddpm_jax/host_memory.py). Both frameworks share each worker process, so
  they share the setting too.
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONWARNINGS='ignore')
  return host_memory.environment_with_huge_pages(env) or env


def run_worker(tasks: List[str], spec: Dict[str, Any], verbose: bool) -> Dict[str, Any]:
  """Runs tasks in a fresh worker process; returns {task: result}."""
  with tempfile.TemporaryDirectory(prefix='ddpm_bench_') as tmp:
    result_path = os.path.join(tmp, 'result.json')
    cmd = [sys.executable, WORKLOADS, '--tasks', ','.join(tasks), '--spec', json.dumps(spec),
           '--result', result_path]
    env = worker_environment()
    if spec['quick']:
      # The smoke run times nothing that matters: compile fast.
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + QUICK_XLA_FLAGS).strip()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True,
                          stdout=None if verbose else subprocess.PIPE,
                          stderr=subprocess.STDOUT if not verbose else None)
    if proc.returncode or not os.path.exists(result_path):
      tail = (proc.stdout or '')[-3000:]
      return {t: dict(error=f'worker exited with {proc.returncode}', output_tail=tail)
              for t in tasks}
    with open(result_path) as f:
      return json.load(f)


def run_group(tasks: List[str], spec: Dict[str, Any], args) -> Dict[str, Any]:
  """A worker run, repeated while the machine was busy with other work."""
  best, best_foreign, attempts = None, float('inf'), []
  for attempt in range(args.retries + 1):
    quiet = wait_for_quiet(args.max_foreign_load, args.quiet_wait) if args.quiet_wait else None
    t0 = time.time()
    print(f'[{datetime.datetime.now():%H:%M:%S}] {",".join(tasks)} '
          f'(attempt {attempt + 1}, other processes {quiet if quiet is None else round(quiet, 2)}'
          ' cores)', flush=True)
    results = run_worker(tasks, spec, args.verbose)
    foreign = _foreign(results)
    attempts.append(dict(foreign_cpu_cores=round(foreign, 3), wall_s=round(time.time() - t0, 1)))
    if foreign < best_foreign:
      best, best_foreign = results, foreign
    errors = [f'{t}: {r["error"]}' for t, r in results.items() if 'error' in r]
    for e in errors:
      print('  ERROR', e, flush=True)
    if errors or foreign <= args.max_foreign_load:
      break
    if attempt < args.retries:
      print(f'  other processes used {foreign:.2f} cores meanwhile: measuring again', flush=True)
  for r in best.values():
    r['attempts'] = attempts
  return best


def run_compile(spec: Dict[str, Any], args) -> Dict[str, Any]:
  """Row 6: the same compilation in two fresh processes sharing a new cache dir."""
  best, best_foreign = None, float('inf')
  for _ in range(args.retries + 1):
    cache = tempfile.mkdtemp(prefix='ddpm_bench_xla_cache_')
    try:
      cold = run_group(['compile'], dict(spec, compile_cache_dir=cache), _no_retry(args))
      warm = run_group(['compile'], dict(spec, compile_cache_dir=cache), _no_retry(args))
    finally:
      shutil.rmtree(cache, ignore_errors=True)
    result = dict(cold=cold['compile'], warm=warm['compile'])
    foreign = max(_foreign(cold), _foreign(warm))
    if foreign < best_foreign:
      best, best_foreign = result, foreign
    if 'error' in result['cold'] or 'error' in result['warm'] or foreign <= args.max_foreign_load:
      break
  return best


def _no_retry(args):
  return argparse.Namespace(**dict(vars(args), retries=0))


# ---------------------------------------------------------------------------
# Rows, targets and the table.


def _get(d: Any, *keys, default=None):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def _finite(value: Any, fallback: Any) -> Any:
  """`value` if it is a finite number, else `fallback`."""
  return value if isinstance(value, (int, float)) and math.isfinite(value) else fallback


def derive(raw: Dict[str, Any], spec: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Dict]]:
  """The report's rows and the targets from the workers' raw results."""
  rows: Dict[str, Any] = {}
  pair, peak = raw.get('pair', {}), raw.get('peak', {})
  scaling = {r['batch']: r for r in _get(raw, 'scaling', 'rows', default=[])}
  at_batch = scaling.get(spec['batch'], {})
  limit = peak.get('limit_flops_per_s')
  for name, kind in (('train_step', 'train'), ('forward', 'forward')):
    p = pair.get(kind)
    if not p:
      rows[name] = dict(error=pair.get('error', 'not run'))
      continue
    rows[name] = dict(
        batch=spec['batch'], jax_images_per_s=p['jax_images_per_s'],
        torch_images_per_s=p['torch_images_per_s'], ratio=p['ratio'],
        jax_median_s=p['timing']['jax']['median_s'],
        torch_median_s=p['timing']['torch']['median_s'],
        jax_peak_rss_mib=_get(at_batch, f'jax_{kind}', 'memory', 'workload_mib'),
        torch_peak_rss_mib=_get(at_batch, f'torch_{kind}', 'memory', 'workload_mib'),
        jax_xla_memory_mib=_get(at_batch, f'jax_{kind}', 'xla_memory_mib'),
        # Model FLOPs (the network as defined, as PyTorch runs it) where the
        # worker counted them; ddpm-jax's own program executes fewer.
        flops_per_image=_finite(p.get('model_flops_per_image'), p['jax_flops_per_image']),
        executed_flops_per_image=p['jax_flops_per_image'], load=p['timing']['jax']['load'])
  flops = dict(limit_flops_per_s=limit, limit_kernel=peak.get('best_kernel'),
               kernels_flops_per_s=peak.get('flops_per_s'), load=peak.get('load'))
  for name in ('train_step', 'forward'):
    r = rows[name]
    if limit and 'jax_images_per_s' in r:
      for fw in ('jax', 'torch'):
        achieved = r['flops_per_image'] * r[f'{fw}_images_per_s']
        flops[f'{name}_{fw}_flops_per_s'] = achieved
        flops[f'{name}_{fw}_fraction'] = achieved / limit
  rows['flops'] = flops
  rows['sampling'] = raw.get('sampling', {})
  rows['bpd'] = raw.get('bpd', {})
  rows['compile'] = raw.get('compile', {})
  pipe, consumer = raw.get('pipeline', {}), raw.get('fashion_train', {})
  rows['input_pipeline'] = dict(
      pipeline_images_per_s=pipe.get('images_per_s'), first_batch_s=pipe.get('first_batch_s'),
      train_step_images_per_s=consumer.get('images_per_s'), batch=pipe.get('batch'),
      ratio=(pipe['images_per_s'] / consumer['images_per_s']
             if pipe.get('images_per_s') and consumer.get('images_per_s') else None),
      load=common.merge_loads([l for l in (pipe.get('load'), consumer.get('load')) if l]),
      errors=[x['error'] for x in (pipe, consumer) if 'error' in x])
  rows['scaling'] = raw.get('scaling', {})
  rows['steps'] = raw.get('steps', {})

  def target(name, value, op, goal, note=''):
    met = None if value is None else (value > goal if op == '>' else
                                      value >= goal if op == '>=' else
                                      value < goal if op == '<' else value <= goal)
    return dict(name=name, value=value, target=f'{op} {goal}', met=met, note=note)

  s, c = rows['sampling'], rows['compile']
  targets = [
      target('training step ratio ddpm-jax / diffusers', _get(rows, 'train_step', 'ratio'), '>',
             1.0, 'aim 1.25'),
      target('forward ratio ddpm-jax / diffusers', _get(rows, 'forward', 'ratio'), '>', 1.0,
             'aim 1.25'),
      target('forward FLOP/s / matmul limit', flops.get('forward_jax_fraction'), '>=', 0.70),
      target('training step FLOP/s / matmul limit', flops.get('train_step_jax_fraction'), '>=',
             0.60),
      target('sampler chain overhead', s.get('chain_overhead'), '<', 0.03),
      target('16-image sampling speed-up vs DDPMPipeline', s.get('speedup_vs_diffusers'), '>=',
             2.0),
      target('bits/dim eval / forward throughput', _get(rows, 'bpd', 'fraction_of_forward'),
             '>=', 0.90),
      target('train step compile, cold (s)', _get(c, 'cold', 'train', 'total_s'), '<=', 30.0),
      target('train step compile, warm cache (s)', _get(c, 'warm', 'train', 'total_s'), '<=',
             5.0),
      target('input pipeline / training consumption', rows['input_pipeline']['ratio'], '>=',
             20.0),
  ]
  return rows, targets


def _f(x, fmt='.2f', unit=''):
  if x is None:
    return 'n/a'
  if isinstance(x, float) and x != x:
    return 'n/a'
  return f'{x:{fmt}}{unit}'


def _load(load: Optional[Dict]) -> str:
  if not load:
    return 'n/a'
  return (f'load {_f(load.get("loadavg_1m_end"), ".1f")}, others '
          f'{_f(load.get("foreign_cpu_cores"), ".2f")} cores')


def _mib(x) -> str:
  return _f(x, '.0f', ' MiB')


def make_table(rows: Dict[str, Any], targets: List[Dict], spec: Dict[str, Any],
               meta: Dict[str, Any]) -> str:
  """The Markdown report."""
  b = spec['batch']
  dt = {'float32': 'fp32', 'bfloat16': 'bf16'}[spec.get('dtype', 'float32')]
  lines = [
      f'Machine: {meta["machine"]}; backend {meta.get("backend", "?")}; '
      f'{"QUICK SMOKE RUN (tiny sizes, numbers meaningless)" if spec["quick"] else "full run"}.',
      '', '| # | measurement | ddpm-jax | diffusers + PyTorch | ddpm-jax / peer | machine load |',
      '|---|---|---|---|---|---|']
  for num, name, label in (('1', 'train_step', f'training step, CIFAR-10 U-Net, {dt}, batch {b}'),
                           ('2', 'forward', f'forward pass, same model, batch {b}')):
    r = rows[name]
    if 'error' in r:
      lines.append(f'| {num} | {label} | error: {r["error"]} | | | |')
      continue
    lines.append(
        f'| {num} | {label} | {_f(r["jax_images_per_s"])} img/s '
        f'({_f(r["jax_median_s"], ".3f")} s), peak {_mib(r["jax_peak_rss_mib"])} | '
        f'{_f(r["torch_images_per_s"])} img/s ({_f(r["torch_median_s"], ".3f")} s), '
        f'peak {_mib(r["torch_peak_rss_mib"])} | **{_f(r["ratio"])}x** | {_load(r["load"])} |')
  fl = rows['flops']
  if fl.get('limit_flops_per_s'):
    for name, label in (('train_step', 'training step'), ('forward', 'forward')):
      if f'{name}_jax_flops_per_s' not in fl:
        continue
      lines.append(
          f'| 3 | {label}: achieved model FLOP/s ({_f(rows[name]["flops_per_image"] / 1e9, ".1f")} '
          f'GFLOP/img, XLA count; ddpm-jax executes '
          f'{_f(rows[name]["executed_flops_per_image"] / 1e9, ".1f")}) | '
          f'{_f(fl[f"{name}_jax_flops_per_s"] / 1e9, ".0f")} GFLOP/s = '
          f'**{_f(100 * fl[f"{name}_jax_fraction"], ".0f")}%** of limit | '
          f'{_f(fl[f"{name}_torch_flops_per_s"] / 1e9, ".0f")} GFLOP/s = '
          f'{_f(100 * fl[f"{name}_torch_fraction"], ".0f")}% | | |')
    kernels = ', '.join(f'{k} {v / 1e9:.0f}' for k, v in sorted(
        fl['kernels_flops_per_s'].items(), key=lambda kv: -kv[1]))
    lines.append(f'| 3 | limit: fastest {dt} kernel, GFLOP/s | {kernels} | | | '
                 f'{_load(fl.get("load"))} |')
  s = rows['sampling']
  if 'chain_s' in s:
    lines.append(
        f'| 4 | sampler: {s["steps"]}-step scan chain vs {s["steps"]} x bare forward '
        f'(Fashion-MNIST U-Net, batch {s["batch"]}) | {_f(s["chain_s"])} s vs '
        f'{_f(s["bare_forwards_s"])} s: overhead **{_f(100 * s["chain_overhead"], ".1f")}%** | | | '
        f'{_load(s.get("load"))} |')
    lines.append(
        f'| 4 | sampling {s["batch"]} images, {s["steps"]} steps, Fashion-MNIST U-Net | '
        f'{_f(s["chain_s"])} s | DDPMPipeline {_f(s["diffusers_s"])} s | '
        f'**{_f(s["speedup_vs_diffusers"])}x** | |')
  else:
    lines.append(f'| 4 | sampling | error: {s.get("error", "not run")} | | | |')
  bp = rows['bpd']
  if 'bpd_images_per_s' in bp:
    lines.append(
        f'| 5 | bits/dim eval, all {bp["num_timesteps"]} terms, batch {bp["batch"]} | '
        f'{_f(bp["bpd_images_per_s"], ".3f")} img/s = **{_f(100 * bp["fraction_of_forward"], ".0f")}%**'
        f' of forward throughput ({_f(bp["forward_images_per_s"])} img/s / {bp["num_timesteps"]}) '
        f'| | | {_load(bp.get("load"))} |')
  else:
    lines.append(f'| 5 | bits/dim eval | error: {bp.get("error", "not run")} | | | |')
  c = rows['compile']
  if c and 'error' not in c.get('cold', {}) and 'error' not in c.get('warm', {}):
    for part in ('train', 'sampler'):
      label = 'train step' if part == 'train' else f'sampler ({spec["num_timesteps"]}-step chain)'
      lines.append(
          f'| 6 | compile CIFAR-10 {label}: cold / warm cache (trace+lower, compile) | '
          f'**{_f(c["cold"][part]["total_s"], ".1f")} s** ({_f(c["cold"][part]["trace_lower_s"], ".1f")}'
          f' + {_f(c["cold"][part]["compile_s"], ".1f")}) / **{_f(c["warm"][part]["total_s"], ".1f")} s**'
          f' ({_f(c["warm"][part]["trace_lower_s"], ".1f")} + {_f(c["warm"][part]["compile_s"], ".1f")})'
          f' | | | {_load(c["cold"].get("load"))} |')
  else:
    err = _get(c, 'cold', 'error') or _get(c, 'warm', 'error') or 'not run'
    lines.append(f'| 6 | compile | error: {err} | | | |')
  ip = rows['input_pipeline']
  if ip.get('ratio'):
    lines.append(
        f'| 7 | input pipeline (Fashion-MNIST, batch {ip["batch"]}) vs default train step | '
        f'{_f(ip["pipeline_images_per_s"], ".0f")} img/s vs {_f(ip["train_step_images_per_s"], ".1f")}'
        f' img/s consumed: **{_f(ip["ratio"], ".0f")}x** (first batch after '
        f'{_f(ip["first_batch_s"], ".1f")} s) | | | {_load(ip.get("load"))} |')
  else:
    lines.append(f'| 7 | input pipeline | error: {ip.get("errors") or "not run"} | | | |')

  sc = rows['scaling']
  if sc.get('rows'):
    work = spec['scaling_workloads']
    lines += ['', f'Row 8: cost against batch size, CIFAR-10 U-Net (images/s; peak RSS over the '
              'pre-build RSS while running)', '',
              '| batch | ' + ' | '.join(w.replace('_', ' ') for w in work) + ' |',
              '|---' * (len(work) + 1) + '|']
    for r in sc['rows']:
      cells = []
      for w in work:
        m = r.get(w, {})
        cells.append(f'{_f(m.get("images_per_s"))} img/s, {_mib(_get(m, "memory", "workload_mib"))}')
      lines.append(f'| {r["batch"]} | ' + ' | '.join(cells) + ' |')
    lines.append(f'\n({_load(sc.get("load"))})')
  st = rows['steps']
  if st.get('rows'):
    lines += ['', f'Row 8: sampling time against steps (Fashion-MNIST U-Net, batch {st["batch"]})',
              '', '| steps | seconds | ms / step |', '|---|---|---|']
    for r in st['rows']:
      lines.append(f'| {r["steps"]} | {_f(r["seconds"])} | {_f(r["ms_per_step"], ".1f")} |')
  lines += ['', 'Targets:', '', '| target | value | goal | met |', '|---|---|---|---|']
  for t in targets:
    met = 'n/a' if t['met'] is None else ('yes' if t['met'] else '**no**')
    lines.append(f'| {t["name"]} | {_f(t["value"], ".3f")} | {t["target"]} {t["note"]} | {met} |')
  return '\n'.join(lines)


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} CPUs'


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='seconds-long smoke of every row')
  parser.add_argument('--out', default=None, help='JSON output (default benchmarks/results.json)')
  parser.add_argument('--batch', type=int, default=None, help='batch of rows 1-3 (default 8)')
  parser.add_argument('--repeats', type=int, default=None, help='timed repeats per number')
  parser.add_argument('--sample-steps', type=int, default=None,
                      help='steps of the row-4 head-to-head sampling run (default 1000)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help="compute dtype of both U-Nets (model.dtype; the peer's autocast)")
  parser.add_argument('--scaling-batches', default=None,
                      help='comma-separated batch sizes of row 8 (default 1,2,4,8,16)')
  parser.add_argument('--peers', choices=('pinned', 'installed'), default='pinned',
                      help='install the pinned torch/diffusers, or use those installed')
  parser.add_argument('--rows', default=','.join(ALL_ROWS),
                      help='comma-separated subset of: ' + ','.join(ALL_ROWS))
  parser.add_argument('--max-foreign-load', type=float, default=0.5,
                      help='re-measure when other processes used more cores than this')
  parser.add_argument('--retries', type=int, default=None, help='re-measurements (default 2)')
  parser.add_argument('--quiet-wait', type=float, default=None,
                      help='seconds to wait for a quiet machine before each group')
  parser.add_argument('--verbose', action='store_true', help="show the workers' output")
  args = parser.parse_args(argv)

  versions = ensure_peers(pinned=args.peers == 'pinned')
  spec = dict(QUICK if args.quick else FULL, dtype=args.dtype)
  if args.scaling_batches:
    spec['scaling_batches'] = [int(b) for b in args.scaling_batches.split(',')]
  for key, value in (('batch', args.batch), ('repeats', args.repeats),
                     ('sample_steps', args.sample_steps)):
    if value is not None:
      spec[key] = value
  if args.retries is None:
    args.retries = 0 if args.quick else 2
  if args.quiet_wait is None:
    args.quiet_wait = 0 if args.quick else 120
  wanted = args.rows.split(',')
  unknown = sorted(set(wanted) - set(ALL_ROWS))
  if unknown:
    parser.error(f'unknown rows {unknown}; valid: {", ".join(ALL_ROWS)}')
  out = args.out or os.path.join(BENCH_DIR, 'results.json')

  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = common.loadavg_1m()
  run_cache = tempfile.mkdtemp(prefix='ddpm_bench_run_cache_')
  raw: Dict[str, Any] = {}
  try:
    run_spec = dict(spec, jax_cache_dir=run_cache)
    in_process = [t for g in GROUPS for t in g if t in wanted]
    jobs = []
    if args.quick:
      # One worker for the in-process rows, and the compile and input
      # pipeline rows in parallel with it: the smoke run's numbers do not
      # matter, its wall time does.
      if in_process:
        jobs.append(lambda: raw.update(run_group(in_process, run_spec, args)))
    else:
      for group in GROUPS:
        group = [t for t in group if t in wanted]
        if group:
          jobs.append(lambda group=group: raw.update(run_group(group, run_spec, args)))
    if 'compile' in wanted:
      jobs.append(lambda: raw.update(compile=run_compile(spec, args)))
    if 'pipeline' in wanted:
      jobs.append(lambda: raw.update(run_group(['pipeline'], spec, args)))
    if args.quick:
      with concurrent.futures.ThreadPoolExecutor(len(jobs) or 1) as pool:
        for future in [pool.submit(job) for job in jobs]:
          future.result()
    else:
      for job in jobs:
        job()
        # What is measured so far survives an interrupted run.
        with open(out, 'w') as f:
          json.dump(dict(partial=True, settings=spec, raw=raw), f, indent=1, default=float)
  finally:
    shutil.rmtree(run_cache, ignore_errors=True)

  info = next((r['info'] for r in raw.values() if isinstance(r, dict) and r.get('info')), {})
  meta = dict(machine=_machine(), backend=info.get('backend'), info=info, versions=versions,
              python=platform.python_version(), argv=sys.argv[1:],
              glibc_tunables=worker_environment().get(host_memory.TUNABLES_ENV, ''),
              started_utc=started.isoformat(timespec='seconds'),
              finished_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec='seconds'),
              loadavg_1m_start=load_start, loadavg_1m_end=common.loadavg_1m(),
              max_foreign_load=args.max_foreign_load,
              memory_method='peak RSS (VmHWM, reset after compile + warm-up) minus the RSS '
                            'before the workload was built, in-process after malloc_trim; '
                            'xla_memory_mib is XLA memory_analysis of the compiled program',
              load_method='loadavg_1m is /proc/loadavg (includes the benchmark itself); '
                          'foreign_cpu_cores is busy CPU time of all other processes during '
                          'the measurement, from /proc/stat minus own CPU time')
  rows, targets = derive(raw, spec)
  table = make_table(rows, targets, spec, meta)
  print(table)
  with open(out, 'w') as f:
    json.dump(dict(meta=meta, settings=spec, rows=rows, targets=targets, raw=raw, table=table),
              f, indent=1, default=float)
  print(f'\nwrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
