"""The embedded default's recipe sweep: every variant gets the same wall clock and the same judge.

    python experiments/default_sweep.py --out=runs/default_sweep --budget_minutes=5 \
        [--variants=today,lr2e-3,...] [--num_samples=1000] [--curve_minutes=2.5,5,10]

A variant is configs/fashion_mnist.py with a few fields overridden (VARIANTS
below; 'today' is the recipe the default had until December 2026, 'default'
is the config file as it is). Each is trained by the project's own trainer
(main.py in a subprocess, so the clock includes start-up and compilation, as
a user's run does) with a checkpoint every `--checkpoint_every` steps and no
sample grids. When the budget is spent the trainer gets SIGTERM and, as on a
preemption, commits a checkpoint of the step it reached.

The judge draws `--num_samples` samples from the EMA parameters with the
variant's own sampler and the config's seed (a class-conditional variant
draws every class in turn, so equal shares), and reports:
  - the Frechet distance in the domain classifier's features against the
    test split, with its spread (std over bootstrap resamples);
  - the share of each class under the domain classifier, and the fraction of
    samples it labels with confidence >= 0.9 (real test images: the floor row);
  - for a conditional variant, the fraction it labels as the class asked for.
With `--curve_minutes` the judge also runs on the newest checkpoint at each of
those training minutes (the time-to-quality curve). Everything is resumable:
a finished training or judgement is read back, not redone.

Writes OUT/results.json, OUT/table.md and OUT/time_to_quality.png.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import types
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import run as bench_run  # noqa: E402
from benchmarks import sampler_quality  # noqa: E402
from configs import fashion_mnist  # noqa: E402
from ddpm_jax import evaluate  # noqa: E402
from ddpm_jax import files  # noqa: E402
from ddpm_jax import inference  # noqa: E402
from ddpm_jax import input_pipeline  # noqa: E402
from ddpm_jax import runtime  # noqa: E402
from ddpm_jax import sharding as sharding_lib  # noqa: E402

# configs/fashion_mnist.py as it was until December 2026, field by field, so the
# 'today' variant stays reproducible whatever the config file becomes.
TODAY = {
  'data.random_flip': True,
  'model.ch': 32,
  'model.ch_mult': (1, 2, 2),
  'model.num_res_blocks': 1,
  'model.attn_resolutions': (7,),
  'model.dropout': 0.0,
  'model.num_classes': 0,
  'diffusion.beta_schedule': 'linear',
  'diffusion.model_mean_type': 'eps',
  'diffusion.min_snr_gamma': 0.0,
  'optim.learning_rate': 1e-3,
  'optim.warmup_steps': 100,
  'optim.ema_decay': 0.999,
  'optim.ema_warmup': True,
  'training.batch_size': 64,
  'training.num_train_steps': 1000,
  'training.log_every_steps': 50,
  'training.checkpoint_every_steps': 250,
  'training.sample_every_steps': 500,
  'training.num_sample_images': 64,
  'sampling.sampler': 'ddim',
  'sampling.num_steps': 50,
  'sampling.num_samples': 1000,
  'sampling.batch_size': 200,
  'sampling.grid_sampler': 'respaced',
  'sampling.grid_num_steps': 50,
  'sampling.guidance_scale': None,
  'sampling.class_labels': None,
}


@dataclasses.dataclass(frozen=True)
class Variant:
  description: str
  overrides: dict
  # Another variant whose training this one reuses; it may differ only in sampling.*.
  trained_as: str | None = None
  # Train as the config says (its steps and sample grids, as the README's command does),
  # stopping early only if the budget runs out; otherwise train until the budget runs out.
  as_configured: bool = False


# The sweep judges training variants with 50 respaced ancestral steps, the best 50-call sampler
# on a partly trained model (docs/samplers.md); 'today' keeps today's DDIM-50.
_TODAY_RESPACED = {**TODAY, 'sampling.sampler': 'respaced'}

# The second round's base: configs/fashion_mnist.py as it was then, before it dropped random flips
# and lowered the guidance scale.
_RECIPE = {'data.random_flip': True, 'sampling.guidance_scale': 3.0}

# The EDM variant: EDM's published settings (the `edm` block's defaults: sigma_data 0.5, ln sigma ~
# N(-1.2, 1.2^2), sampling range [0.002, 80] with rho 7) in place of DDPM's process and loss; the
# DDPM-only fields go back to the values EDM accepts. 10 Heun steps are 19 calls, against the
# default's 20 solver calls.
_EDM = {
  'diffusion.kind': 'edm',
  'diffusion.model_mean_type': 'eps',
  'diffusion.min_snr_gamma': 0.0,
  'sampling.sampler': 'edm',
  'sampling.num_steps': 10,
  'sampling.grid_sampler': 'edm',
  'sampling.grid_num_steps': 10,
}
# EDM's stochastic sampler with the churn it tuned for its own CIFAR-10 models (Table 5's VP row).
_EDM_CHURN = {
  'sampling.edm_S_churn': 30.0,
  'sampling.edm_S_min': 0.01,
  'sampling.edm_S_max': 1.0,
  'sampling.edm_S_noise': 1.007,
}

# One change at a time from today's recipe, then their combinations.
VARIANTS = {
  'today': Variant('the default until December 2026 (DDIM 50)', TODAY, 'today_respaced50'),
  'today_respaced50': Variant("today's, sampled with 50 respaced steps", _TODAY_RESPACED),
  'lr2e-3': Variant('learning rate 2e-3', {**_TODAY_RESPACED, 'optim.learning_rate': 2e-3}),
  'batch32': Variant('batch 32', {**_TODAY_RESPACED, 'training.batch_size': 32}),
  'cosine': Variant('cosine schedule', {**_TODAY_RESPACED, 'diffusion.beta_schedule': 'cosine'}),
  'v_minsnr5': Variant(
    'v-prediction, min-SNR-5 weighting',
    {**_TODAY_RESPACED, 'diffusion.model_mean_type': 'v', 'diffusion.min_snr_gamma': 5.0},
  ),
  'conditional': Variant(
    'class-conditional (10% null labels), guidance 1',
    {**_TODAY_RESPACED, 'model.num_classes': 10, 'sampling.class_labels': 'all'},
  ),
  'conditional_g2': Variant(
    'class-conditional, guidance 2',
    {
      **_TODAY_RESPACED,
      'model.num_classes': 10,
      'sampling.class_labels': 'all',
      'sampling.guidance_scale': 2.0,
    },
    'conditional',
  ),
  # The 15-minute comparison: both recipes as configured, with grids, as the README runs them.
  'today_as_configured': Variant(
    "today's default as configured: 1000 steps, DDIM 50", TODAY, as_configured=True
  ),
  'default': Variant('configs/fashion_mnist.py as it is', {}, as_configured=True),
  'default_g1.5': Variant(
    'the default at guidance 1.5', {'sampling.guidance_scale': 1.5}, 'default'
  ),
  'default_g3': Variant('the default at guidance 3', {'sampling.guidance_scale': 3.0}, 'default'),
  'default_g4': Variant('the default at guidance 4', {'sampling.guidance_scale': 4.0}, 'default'),
  'default_unipc20': Variant('the default with UniPC 20', {'sampling.sampler': 'unipc'}, 'default'),
  'default_ddim50': Variant('the default with DDIM 50', {'sampling.sampler': 'ddim'}, 'default'),
  'default_respaced50': Variant(
    'the default with 50 respaced ancestral steps',
    {'sampling.sampler': 'respaced', 'sampling.num_steps': 50},
    'default',
  ),
  # Second round, December 2026: one change at a time from the default's recipe as it was then
  # (with random flips), each trained for the budget (not for the config's steps).
  'recipe': Variant('configs/fashion_mnist.py with flips, trained for the budget', _RECIPE),
  'recipe_lr4e-3': Variant('learning rate 4e-3', {**_RECIPE, 'optim.learning_rate': 4e-3}),
  'recipe_batch32': Variant('batch 32', {**_RECIPE, 'training.batch_size': 32}),
  # Fashion-MNIST is not mirror-symmetric: its shoes all point the same way.
  'recipe_noflip': Variant('no random flips', {**_RECIPE, 'data.random_flip': False}),
  # Decays over the 547 steps that recipe reached in 5 minutes (Intel Xeon, 3 December 2026).
  'recipe_decay': Variant(
    'cosine learning-rate decay to 10% at step 550',
    {**_RECIPE, 'optim.decay_steps': 550, 'optim.final_lr_fraction': 0.1},
  ),
  'recipe_g2': Variant('guidance scale 2', {**_RECIPE, 'sampling.guidance_scale': 2.0}, 'recipe'),
  # Third round, December 2026: EDM's recipe (Karras et al. 2022) on the default's network, data,
  # steps, classes and guidance, against the default as configured. Its step costs what a DDPM
  # step does (the same U-Net), so equal steps are equal wall clock; both are timed.
  'edm': Variant(
    "EDM: preconditioning, log-normal sigma, EDM's loss; Heun, 10 steps (19 calls)",
    _EDM,
    as_configured=True,
  ),
  'edm_heun18': Variant(
    'the EDM variant with 18 Heun steps (35 calls)', {**_EDM, 'sampling.num_steps': 18}, 'edm'
  ),
  'edm_churn': Variant(
    "the EDM variant with EDM's stochastic sampler (churn 30 of its VP settings), 10 steps",
    {**_EDM, **_EDM_CHURN},
    'edm',
  ),
}


def _check_variants() -> None:
  for name, variant in VARIANTS.items():
    if variant.trained_as is None:
      continue
    base = VARIANTS[variant.trained_as]
    if base.trained_as is not None:
      raise ValueError(f'{name}: {variant.trained_as!r} reuses a training itself.')
    differ = {
      k
      for k in set(variant.overrides) | set(base.overrides)
      if variant.overrides.get(k) != base.overrides.get(k)
    }
    if any(not k.startswith('sampling.') for k in differ):
      raise ValueError(f'{name} differs from {variant.trained_as!r} in training: {sorted(differ)}')


_check_variants()

CONFIDENT = 0.9  # The confidence at which a sample counts as clearly one class.


def variant_config(name: str):
  """configs/fashion_mnist.py with the variant's overrides."""
  config = fashion_mnist.get_config()
  config.update_from_flattened_dict(dict(VARIANTS[name].overrides))
  return config


def _config_file(name: str, path: str) -> None:
  """A config file that rebuilds the variant, for the trainer's --config flag."""
  text = (
    f'"""Sweep variant {name!r}: {VARIANTS[name].description}."""\n\n'
    'from math import inf  # repr() writes an infinite field (sampling.edm_S_max) as inf\n\n'
    'from configs import fashion_mnist\n\n\n'
    'def get_config():\n'
    '  config = fashion_mnist.get_config()\n'
    f'  config.update_from_flattened_dict({dict(VARIANTS[name].overrides)!r})\n'
    '  return config\n'
  )
  files.write_text(path, text)


_STEP_LINE = re.compile(r'step (\d+)/\d+ \(')


def train(name: str, out: str, budget_seconds: float, checkpoint_every: int) -> dict:
  """Trains a variant for `budget_seconds` of wall clock; returns what it reached.

  Returns:
    {'steps': last committed step, 'seconds': wall clock to the SIGTERM,
     'log': [[seconds since launch, step], ...] at each log step}.
  """
  done_path = os.path.join(out, 'trained.json')
  if files.exists(done_path):
    return json.loads(files.read_text(done_path))
  config_path = os.path.join(out, 'config.py')
  _config_file(name, config_path)
  workdir = os.path.join(out, 'train')
  command = [
    sys.executable,
    os.path.join(ROOT, 'main.py'),
    f'--config={config_path}',
    f'--workdir={workdir}',
    f'--config.training.log_every_steps={checkpoint_every}',
    f'--config.training.checkpoint_every_steps={checkpoint_every}',
    '--config.training.keep_checkpoints=100000',
  ]
  if not VARIANTS[name].as_configured:
    command += [
      '--config.training.num_train_steps=100000000',
      '--config.training.sample_every_steps=0',
    ]
  if files.exists(workdir):
    raise RuntimeError(f'{workdir} holds an unfinished run: remove it to train {name!r} again.')
  log = []
  start = time.monotonic()
  with open(os.path.join(out, 'train.log'), 'w') as log_file:
    process = subprocess.Popen(
      command, cwd=ROOT, stdout=log_file, stderr=subprocess.PIPE, text=True, bufsize=1
    )

    def follow():  # Stamps each log step with the wall clock since the launch.
      for line in process.stderr:
        log_file.write(line)
        match = _STEP_LINE.search(line)
        if match:
          log.append([time.monotonic() - start, int(match.group(1))])

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    stopped_at = None
    while process.poll() is None:
      # Never before the first log step, so every run has a step to judge.
      if stopped_at is None and log and time.monotonic() - start >= budget_seconds:
        stopped_at = time.monotonic() - start
        process.send_signal(signal.SIGTERM)
      time.sleep(0.1)
    reader.join()
  if stopped_at is None and VARIANTS[name].as_configured:
    stopped_at = time.monotonic() - start  # Finished its steps within the budget.
  if process.returncode != 0 or stopped_at is None:
    raise RuntimeError(
      f'Training {name!r} failed (exit {process.returncode}); see {out}/train.log.'
    )
  steps = max(s for s in _committed_steps(workdir))
  result = {'steps': steps, 'seconds': stopped_at, 'log': log, 'command': command[1:]}
  files.write_json(done_path, result)
  return result


def _committed_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def step_at_minute(trained: dict, minutes: float) -> int | None:
  """The newest checkpointed step whose log line came within `minutes` of the launch."""
  logged = {step: seconds for seconds, step in trained['log']}
  steps = [s for s in trained['checkpoints'] if s in logged and logged[s] <= 60 * minutes]
  return max(steps) if steps else None


class Judge:
  """Samples a checkpoint and measures it against the test split in domain features."""

  def __init__(self, out: str, resamples: int):
    # The classifier and the reference statistics depend only on the data and
    # eval.* settings, which every variant shares.
    self.config = config = variant_config('today')
    self.resamples = resamples
    self.eval_dir = os.path.join(out, 'eval')
    files.makedirs(self.eval_dir)
    self.split = config.data.eval_split
    mesh = sharding_lib.make_mesh()
    self.metric, self.extractor, self.features_meta = evaluate.feature_extractor(
      config, types.SimpleNamespace(mesh=mesh), self.eval_dir
    )
    self.ref_mu, self.ref_sigma = evaluate.reference_statistics(
      config, self.split, self.extractor, self.eval_dir, self.features_meta['features_id']
    )

  def real(self, num_samples: int) -> dict:
    """The floor: FD of as many train images (independent of the reference), and how the
    classifier labels as many test images."""
    floor = self.classify(self._split(self.config.data.train_split)[:num_samples])
    labelled = self.classify(self._split(self.split)[:num_samples])
    return {
      'fd': floor['fd'],
      'fd_spread': floor['fd_spread'],
      'fd_images': self.config.data.train_split,
      'class_shares': labelled['class_shares'],
      'confident_fraction': labelled['confident_fraction'],
      'labelled_images': self.split,
      'num_samples': num_samples,
    }

  @functools.cache
  def _split(self, split: str) -> np.ndarray:
    return input_pipeline.load_split_as_uint8(self.config, split)

  def classify(self, samples: np.ndarray) -> dict:
    features, logits = self.extractor(samples)
    fd, spread = sampler_quality.fd_with_spread(
      features, self.ref_mu, self.ref_sigma, num_resamples=self.resamples, seed=0
    )
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    predicted = probs.argmax(-1)
    shares = np.bincount(predicted, minlength=probs.shape[-1]) / len(predicted)
    return {
      'fd': fd,
      'fd_spread': spread,
      'class_shares': [round(float(s), 4) for s in shares],
      'confident_fraction': float(np.mean(probs.max(-1) >= CONFIDENT)),
      'predicted': predicted,
    }

  def __call__(self, name: str, workdir: str, step: int, num_samples: int, out_dir: str) -> dict:
    path = os.path.join(out_dir, 'judged.json')
    if files.exists(path):
      return json.loads(files.read_text(path))
    config = variant_config(name)
    im = inference.load_inference_model(config, workdir, step)
    start = time.perf_counter()
    samples = inference.generate_samples(config, im, num_samples, out_dir)
    seconds = time.perf_counter() - start
    result = self.classify(samples)
    predicted = result.pop('predicted')
    if config.model.num_classes:
      asked = inference.class_labels(config, num_samples)
      result['class_accuracy'] = float(np.mean(predicted == asked))
    result.update(step=step, sampling_seconds=seconds, num_samples=num_samples)
    files.write_json(path, result)
    return result


def table(results: dict) -> str:
  lines = [
    f'{results["metric"]}, against the test split; seed 0 ({results["machine"]}, '
    f'{results["date"]}). Minutes: training wall clock, start-up included.',
    '',
    '| variant | what changes | steps | minutes | N | FD | confident | class shares (min / max) |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for real in results['real']:
    lines.append(
      f'| real images | FD: train split; labels: test split | | | {real["num_samples"]} | '
      f'{real["fd"]:.1f} ± {real["fd_spread"]:.1f} | {real["confident_fraction"]:.2f} | '
      f'{min(real["class_shares"]):.2f} / {max(real["class_shares"]):.2f} |'
    )
  for name, row in results['variants'].items():
    final = row['final']
    lines.append(
      f'| {name} | {row["description"]} | {row["steps"]} | {row["train_seconds"] / 60:.1f} | '
      f'{final["num_samples"]} | {final["fd"]:.1f} ± {final["fd_spread"]:.1f} | '
      f'{final["confident_fraction"]:.2f} | '
      f'{min(final["class_shares"]):.2f} / {max(final["class_shares"]):.2f} |'
    )
  return '\n'.join(lines) + '\n'


def plot(results: dict, path: str) -> None:
  """FD against training minutes, one line per variant with a curve."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, row in results['variants'].items():
    curve = row.get('curve')
    if not curve:
      continue
    minutes = [p['minutes'] for p in curve]
    ax.errorbar(
      minutes,
      [p['fd'] for p in curve],
      yerr=[p['fd_spread'] for p in curve],
      marker='o',
      capsize=3,
      label=f'{name}: {row["description"]}',
    )
  floor = [r for r in results['real'] if r['num_samples'] == results['curve_num_samples']]
  ax.axhline(floor[0]['fd'], color='gray', linestyle=':', label='real images')
  ax.set(
    xlabel='training wall clock (minutes, 2 CPU cores)',
    ylabel='Frechet distance (domain features)',
    yscale='log',
    title=f'Time to quality, N = {results["curve_num_samples"]} samples per point',
  )
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(
  out: str,
  names: list[str],
  budget_minutes: float,
  num_samples: int,
  resamples: int,
  curve_minutes: list[float],
  checkpoint_every: int,
  curve_num_samples: int | None = None,
) -> dict:
  curve_num_samples = curve_num_samples or num_samples
  files.makedirs(out)
  results_path = os.path.join(out, 'results.json')
  results = json.loads(files.read_text(results_path)) if files.exists(results_path) else {}
  results.update(
    date=datetime.date.today().isoformat(),
    machine=bench_run.machine(),
    jax=jax.__version__,
    budget_minutes=budget_minutes,
    num_samples=num_samples,
    curve_num_samples=curve_num_samples,
    spread=f'standard deviation over {resamples} bootstrap resamples of the samples',
  )
  results.setdefault('variants', {})
  judge = Judge(out, resamples)
  results.update(
    metric=judge.metric,
    features=judge.features_meta,
    real=[judge.real(n) for n in sorted({num_samples, curve_num_samples})],
  )
  for name in names:
    variant_dir = os.path.join(out, name)
    files.makedirs(variant_dir)
    trained_as = VARIANTS[name].trained_as or name
    train_dir = os.path.join(out, trained_as)
    files.makedirs(train_dir)
    trained = train(trained_as, train_dir, 60 * budget_minutes, checkpoint_every)
    workdir = os.path.join(train_dir, 'train')
    trained['checkpoints'] = _committed_steps(workdir)
    final = judge(name, workdir, trained['steps'], num_samples, os.path.join(variant_dir, 'final'))
    row = {
      'description': VARIANTS[name].description,
      'overrides': {
        k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[name].overrides.items()
      },
      'steps': trained['steps'],
      'train_seconds': trained['seconds'],
      'final': final,
    }
    curve = []
    # Along the way only for the trainings themselves; a sampling variant is judged at the end.
    for minutes in curve_minutes if VARIANTS[name].trained_as is None else []:
      step = step_at_minute(trained, minutes)
      if step is None or minutes > trained['seconds'] / 60:
        continue
      point = judge(
        name, workdir, step, curve_num_samples, os.path.join(variant_dir, f'minute_{minutes:g}')
      )
      curve.append({'minutes': minutes, **point})
    if curve:
      if curve_num_samples == num_samples:
        curve.append({'minutes': trained['seconds'] / 60, **final})
      else:
        end = judge(
          name, workdir, trained['steps'], curve_num_samples, os.path.join(variant_dir, 'end')
        )
        curve.append({'minutes': trained['seconds'] / 60, **end})
      row['curve'] = curve
    results['variants'][name] = row
    print(
      f'{name}: {trained["steps"]} steps in {trained["seconds"] / 60:.1f} min, FD '
      f'{final["fd"]:.1f} +- {final["fd_spread"]:.1f}, confident {final["confident_fraction"]:.2f}',
      flush=True,
    )
    files.write_json(results_path, results)
  files.write_text(os.path.join(out, 'table.md'), table(results))
  plot(results, os.path.join(out, 'time_to_quality.png'))
  return results


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  unknown = [n for n in _VARIANTS.value if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f'Unknown variants {unknown}; valid: {", ".join(VARIANTS)}.')
  runtime.setup(_OUT.value)
  results = run(
    _OUT.value,
    _VARIANTS.value,
    _BUDGET.value,
    _NUM_SAMPLES.value,
    _RESAMPLES.value,
    [float(m) for m in _CURVE.value],
    _CHECKPOINT_EVERY.value,
    _CURVE_NUM_SAMPLES.value,
  )
  print(table(results))
  return 0


if __name__ == '__main__':
  _OUT = flags.DEFINE_string('out', 'runs/default_sweep', 'Output folder.')
  _VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), 'Variants to run, in order.')
  _BUDGET = flags.DEFINE_float('budget_minutes', 5.0, 'Wall clock per variant.', lower_bound=0.5)
  _NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Samples judged.', lower_bound=20)
  _RESAMPLES = flags.DEFINE_integer('resamples', 50, 'Bootstrap resamples.', lower_bound=2)
  _CURVE = flags.DEFINE_list('curve_minutes', [], 'Training minutes to judge along the way.')
  _CURVE_NUM_SAMPLES = flags.DEFINE_integer(
    'curve_num_samples', None, 'Samples judged at each curve point (default --num_samples).'
  )
  _CHECKPOINT_EVERY = flags.DEFINE_integer(
    'checkpoint_every', 50, 'Checkpoint interval in steps.', lower_bound=1
  )
  app.run(main)
