"""Sample quality against model calls: every sampler on one trained model, one seed, one judge.

    python benchmarks/sampler_quality.py --config=configs/fashion_mnist.py \
        --workdir=runs/fashion_mnist [--num_samples=2000] [--rows=ddpm1000,ddim50,...]

For each row (a sampler and its number of steps) this draws `num_samples`
images from the workdir's EMA parameters with the config's seed (a
'distilled' row: from the student of --mode=distill that takes its steps). A
class-conditional model draws the configured classes in turn at the
configured guidance scale, as `--mode=eval` does; each guided call is two
network evaluations, a student's one. Every sampler starts from the same
noise (the same key), so the rows differ only in how they integrate. Each is judged by the Frechet distance in the config's
sample-quality features (the domain classifier's for Fashion-MNIST) against
the eval split, with its spread: the standard deviation of the distance over
bootstrap resamples of the samples. The real-data floor is the distance of as
many real training images under the same judge.

Wall time is the sampling alone, summed over batches (compilation is timed
apart), with the load average beside it: times taken on a shared machine say
so. Each batch is written to OUT/<row>/ as soon as it is done, so an
interrupted run resumes where it stopped. Writes OUT/results.json,
OUT/table.md and the plot OUT/fd_vs_model_calls.png (OUT defaults to
WORKDIR/sampler_quality).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import run as bench_run  # noqa: E402
from ddpm_jax import evaluate  # noqa: E402
from ddpm_jax import files  # noqa: E402
from ddpm_jax import images as images_lib  # noqa: E402
from ddpm_jax import inference  # noqa: E402
from ddpm_jax import input_pipeline  # noqa: E402
from ddpm_jax import runtime  # noqa: E402
from ddpm_jax import streams  # noqa: E402
from ddpm_jax.metrics import frechet  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  sampler: str
  num_steps: int
  order: int = 2
  # EDM's churn (S_churn, S_min, S_max, S_noise); None = its deterministic sampler.
  churn: tuple[float, float, float, float] | None = None

  @property
  def label(self) -> str:
    family = {
      'ddpm': 'ancestral',
      'respaced': 'ancestral, respaced',
      'ddim': 'DDIM',
      'dpm_solver': f'DPM-Solver++ ({self.order})',
      'unipc': f'UniPC ({self.order})',
      'edm': "EDM's Heun" + (', churn' if self.churn else ''),
      'distilled': 'distilled student',
    }[self.sampler]
    return family

  @property
  def model_calls(self) -> int:
    # Heun's N steps make 2N - 1 calls (Euler on the last); every other row one per step
    # (UniPC's corrector reuses the next step's model output).
    return 2 * self.num_steps - 1 if self.sampler == 'edm' else self.num_steps


ROWS = [Row('ddpm1000', 'ddpm', 1000)]
ROWS += [Row(f'respaced{k}', 'respaced', k) for k in (20, 50, 100)]
ROWS += [Row(f'ddim{k}', 'ddim', k) for k in (10, 20, 50)]
ROWS += [Row(f'dpm{o}_{k}', 'dpm_solver', k, o) for o in (2, 3) for k in (5, 10, 20)]
ROWS += [Row(f'unipc{k}', 'unipc', k, 2) for k in (5, 10, 20)]
# EDM's Heun at 9, 19 and 35 calls, deterministic and with the churn EDM's Table 5 gives VP
# models on CIFAR-10 (S_churn 30, S_min 0.01, S_max 1, S_noise 1.007).
ROWS += [Row(f'edm{2 * n - 1}', 'edm', n) for n in (5, 10, 18)]
ROWS += [
  Row(f'edm{2 * n - 1}_churn', 'edm', n, churn=(30.0, 0.01, 1.0, 1.007)) for n in (5, 10, 18)
]
# Few calls, beside the students of --mode=distill (the default's teacher is DDIM on 16 levels).
ROWS += [Row(f'ddim{k}', 'ddim', k) for k in (4, 8, 16)]
ROWS += [Row(f'dpm2_{k}', 'dpm_solver', k, 2) for k in (4, 8)]
ROWS += [Row(f'distilled{k}', 'distilled', k) for k in (1, 2, 4, 8)]
ROW_BY_NAME = {r.name: r for r in ROWS}


def _row_config(config, row: Row):
  config = config.copy_and_resolve_references()
  config.sampling.sampler = row.sampler
  config.sampling.num_steps = row.num_steps
  config.sampling.solver_order = row.order
  if row.churn:
    smp = config.sampling
    smp.edm_S_churn, smp.edm_S_min, smp.edm_S_max, smp.edm_S_noise = row.churn
  return config


def draw(
  config, im: inference.InferenceModel, workdir: str, row: Row, num_samples: int, out_dir: str
):
  """(uint8 samples [N, H, W, C], sampling seconds, compile seconds, mean load) of a row.

  Batch i uses fold_in(sample key, i), as `--mode=sample` does, and stores its
  own wall time and load, so a resumed row still reports the time it took.
  """
  config = _row_config(config, row)
  params = im.ema_params
  if row.sampler == 'distilled':  # The student of this many steps (--mode=distill).
    params = inference.load_inference_model(config, workdir).sampling_params
  batch_size = config.sampling.batch_size
  num_batches = -(-num_samples // batch_size)
  sample_fn = inference.make_sample_fn(
    im.model,
    im.diffusion,
    config,
    (batch_size,) + im.image_shape,
    sampler=row.sampler,
    num_steps=row.num_steps,
    mesh=im.mesh,
  )
  base_key = streams.key(config.seed, streams.Stream.SAMPLE)
  compiled = {}
  conditional = bool(config.model.num_classes)
  if conditional:  # As `--mode=sample` and `--mode=eval` draw them: the classes in turn.
    labels = inference.class_labels(config, num_batches * batch_size)

  def compute(index, _):
    key = jax.random.fold_in(base_key, index)
    args = (params, key)
    if conditional:
      batch_labels = labels[index * batch_size : (index + 1) * batch_size]
      args += sample_fn.checked(batch_labels, config.sampling.guidance_scale)
    if 'fn' not in compiled:
      start = time.perf_counter()
      compiled['fn'] = sample_fn.lower(*args).compile()
      compiled['seconds'] = time.perf_counter() - start
    start = time.perf_counter()
    images = jax.block_until_ready(compiled['fn'](*args))
    seconds = time.perf_counter() - start
    return {
      'images': images_lib.to_uint8(np.asarray(images)),
      'seconds': np.float64(seconds),
      'load': np.float64(os.getloadavg()[0]),
    }

  parts = files.resumable_batches(
    out_dir, range(num_batches), num_batches, compute, what=f'{row.name}: sampled'
  )
  samples = np.concatenate([p['images'] for p in parts])[:num_samples]
  seconds = float(sum(p['seconds'] for p in parts))
  load = float(np.mean([p['load'] for p in parts]))
  return samples, seconds, compiled.get('seconds'), load


def fd_with_spread(features, ref_mu, ref_sigma, *, num_resamples: int, seed: int):
  """The Frechet distance of `features` to (ref_mu, ref_sigma) and its bootstrap std."""
  mu, sigma = frechet.feature_statistics(features)
  fd = float(frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma))
  rs = np.random.default_rng(seed)
  boot = []
  for _ in range(num_resamples):
    pick = rs.integers(0, len(features), len(features))
    b_mu, b_sigma = frechet.feature_statistics(features[pick])
    boot.append(float(frechet.frechet_distance(b_mu, b_sigma, ref_mu, ref_sigma)))
  return fd, float(np.std(boot, ddof=1))


def plot(results: dict, path: str) -> None:
  """FD against model calls, one line per sampler family, with the floor and ancestral."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  families: dict[str, list] = {}
  for r in results['rows']:
    families.setdefault(r['label'], []).append(r)
  for label, rows in families.items():
    if label == 'ancestral':
      # One point at T calls; a band across the plot is the level the solvers aim for.
      (r,) = rows
      ax.axhspan(r['fd'] - r['fd_spread'], r['fd'] + r['fd_spread'], color='k', alpha=0.12)
      ax.axhline(r['fd'], color='k', lw=1, label=f'ancestral, {r["model_calls"]} calls')
      continue
    rows = sorted(rows, key=lambda r: r['model_calls'])
    calls = [r['model_calls'] for r in rows]
    fds = [r['fd'] for r in rows]
    errs = [r['fd_spread'] for r in rows]
    ax.errorbar(calls, fds, yerr=errs, marker='o', capsize=3, label=label)
  floor = results['real_data_floor']['fd']
  ax.axhline(floor, color='gray', ls=':', label=f'real images ({floor:.2f})')
  ax.set_xscale('log')
  ax.set_ylim(bottom=0)
  short = (
    'FD, domain features'
    if results['features'].get('comparable_with_inception_fid') is False
    else 'FID'
  )
  ax.set(
    xlabel='model calls per sample',
    ylabel=f'{short} vs {results["reference_split"]} (N = {results["num_samples"]})',
  )
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  fig.tight_layout()
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format='png'))
  plt.close(fig)


def table(results: dict) -> str:
  lines = [
    f'| sampler | model calls | network evaluations | {results["metric"]} '
    '| spread (bootstrap std) | sampling wall time | load average |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in results['rows']:
    lines.append(
      f'| {r["label"]} | {r["model_calls"]} | {r.get("network_evaluations", r["model_calls"])} '
      f'| {r["fd"]:.2f} | {r["fd_spread"]:.2f} '
      f'| {r["sampling_seconds"]:.0f} s | {r["load_average"]:.1f} |'
    )
  floor = results['real_data_floor']
  lines.append(
    f'| real training images | - | - | {floor["fd"]:.2f} | {floor["fd_spread"]:.2f} | - | - |'
  )
  return '\n'.join(lines) + '\n'


def run(config, workdir: str, rows: list[str], num_samples: int, resamples: int, out: str) -> dict:
  """Runs the named rows on the workdir's newest checkpoint; returns (and writes) the results."""
  files.makedirs(out)
  im = inference.load_inference_model(config, workdir)
  eval_dir = os.path.join(files.absolute(workdir), 'eval')
  files.makedirs(eval_dir)
  metric, extractor, meta = evaluate.feature_extractor(config, im, eval_dir)
  split = config.data.eval_split
  ref_mu, ref_sigma = evaluate.reference_statistics(
    config, split, extractor, eval_dir, meta['features_id']
  )
  real = input_pipeline.load_split_as_uint8(config, config.data.train_split, limit=num_samples)
  floor, floor_spread = fd_with_spread(
    extractor(real)[0], ref_mu, ref_sigma, num_resamples=resamples, seed=config.seed
  )
  results = dict(
    date=datetime.date.today().isoformat(),
    machine=bench_run.machine(),
    jax=jax.__version__,
    devices=[str(d) for d in jax.devices()],
    workdir_step=im.step,
    metric=metric,
    features=meta,
    reference_split=split,
    num_samples=num_samples,
    seed=config.seed,
    batch_size=config.sampling.batch_size,
    # A guided call evaluates the network twice (one batch of 2B); unconditional: once.
    guidance_scale=config.sampling.guidance_scale if config.model.num_classes else None,
    class_labels=str(config.sampling.class_labels) if config.model.num_classes else None,
    network_evaluations_per_call=2 if config.model.num_classes else 1,
    spread=f'standard deviation over {resamples} bootstrap resamples of the samples',
    real_data_floor=dict(fd=floor, fd_spread=floor_spread, split=config.data.train_split),
    rows=[],
  )
  guided = bool(config.model.num_classes)
  for name in rows:
    row = ROW_BY_NAME[name]
    samples, seconds, compile_seconds, load = draw(
      config, im, workdir, row, num_samples, os.path.join(out, name)
    )
    fd, spread = fd_with_spread(
      extractor(samples)[0], ref_mu, ref_sigma, num_resamples=resamples, seed=config.seed
    )
    calls = im.diffusion.num_timesteps if row.sampler == 'ddpm' else row.model_calls
    results['rows'].append(
      dict(
        name=name,
        label=row.label,
        sampler=row.sampler,
        num_steps=row.num_steps,
        order=row.order,
        model_calls=calls,
        # A guided call is two network evaluations; a distilled student's has its guidance built in.
        network_evaluations=calls * (2 if guided and row.sampler != 'distilled' else 1),
        fd=fd,
        fd_spread=spread,
        sampling_seconds=seconds,
        compile_seconds=compile_seconds,
        load_average=load,
      )
    )
    print(f'{name}: {metric} {fd:.2f} +- {spread:.2f}, sampling {seconds:.0f} s (load {load:.1f})')
    files.write_json(os.path.join(out, 'results.json'), results)
  files.write_text(os.path.join(out, 'table.md'), table(results))
  plot(results, os.path.join(out, 'fd_vs_model_calls.png'))
  return results


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  unknown = [n for n in _ROWS.value if n not in ROW_BY_NAME]
  if unknown:
    raise app.UsageError(f'Unknown rows {unknown}; valid: {", ".join(ROW_BY_NAME)}.')
  config, workdir, num_samples = _CONFIG.value, _WORKDIR.value, _NUM_SAMPLES.value
  out = _OUT.value or os.path.join(workdir, 'sampler_quality')
  runtime.setup(workdir)
  results = run(config, workdir, _ROWS.value, num_samples, _RESAMPLES.value, out)
  print(table(results))
  return 0


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file(
    'config', None, "The trained run's config file (configs/*.py).", lock_config=True
  )
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (--mode=train).')
  _NUM_SAMPLES = flags.DEFINE_integer('num_samples', 2000, 'Samples per row.', lower_bound=2)
  _ROWS = flags.DEFINE_list(
    'rows', list(ROW_BY_NAME), f'Rows to run, of: {", ".join(ROW_BY_NAME)}.'
  )
  _RESAMPLES = flags.DEFINE_integer('resamples', 50, 'Bootstrap resamples.', lower_bound=2)
  _OUT = flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/sampler_quality).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
