"""The probability-flow ODE's bits/dim beside the discrete bound's, on the same test images.

    python benchmarks/ode_vs_bound.py --config=configs/fashion_mnist.py \
        --workdir=runs/fashion_mnist [--n=256] [--num_steps=64 | --solver=rk45] [--json=OUT.json]
    python benchmarks/ode_vs_bound.py --smoke   # a fresh tiny model, seconds

Loads the workdir's EMA parameters as --mode=eval does
(`inference.load_inference_model`), takes the first --n images of the eval
split (with their labels for a class-conditional model: both numbers are then
-log p(x | y)), and computes on each image:

  * the discrete bound (`likelihood.calc_bpd_loop`, all T terms), and
  * the ODE's bits/dim (`ode_likelihood.bpd` of `edm.denoiser_from_diffusion`
    over the process's sigma range and prior, Heun with --num_steps steps or
    --solver=rk45 at rtol = atol = 1e-5, Hutchinson's estimate with one
    Rademacher probe, dequantised),

with the same keys as `--mode=eval` (fold_in of the BPD stream by batch).
Prints one JSON line: the means and standard errors, their paired difference,
the wall time of each (compilation apart), the CPU and the load average;
--json also writes it. docs/likelihood.md says what each number bounds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import run as bench_run  # noqa: E402
from ddpm_jax import edm  # noqa: E402
from ddpm_jax import files  # noqa: E402
from ddpm_jax import inference  # noqa: E402
from ddpm_jax import input_pipeline  # noqa: E402
from ddpm_jax import likelihood  # noqa: E402
from ddpm_jax import ode_likelihood  # noqa: E402
from ddpm_jax import runtime  # noqa: E402
from ddpm_jax import streams  # noqa: E402


def _smoke_model():
  """configs/tiny.py's U-Net at 8x8, class-conditional, random parameters, T = 10, random pixels."""
  from configs import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.data.image_size = 8
  config.model.attn_resolutions = (4,)
  config.model.num_classes = 10
  config.diffusion.num_timesteps = 10
  model, d, image_shape = inference.build_model_and_diffusion(config)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(4,) + image_shape).astype(np.uint8)
  labels = rng.integers(0, 10, size=4).astype(np.int32)
  x, t = jnp.zeros((1,) + image_shape), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t, t)
  # NumPy draws of the parameters' shapes: compiling flax's initialisers takes
  # 20 s on 2 cores (threefry over rank-4 kernels), the smoke run seconds.
  params = jax.tree.map(
    lambda leaf: (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), shapes['params']
  )
  return config, model, d, params, 0, pixels, labels


def _trained_model(config, workdir: str, n: int):
  """The workdir's EMA parameters and the first n eval images (uint8), with labels."""
  if config.diffusion.get('kind', 'ddpm') != 'ddpm':
    raise app.UsageError('ode_vs_bound compares with the discrete bound: a DDPM-trained model.')
  im = inference.load_inference_model(config, workdir)
  split = config.data.eval_split
  if inference.num_classes_of(im.model):
    pixels, labels = input_pipeline.load_split_as_uint8(config, split, limit=n, with_labels=True)
  else:
    pixels = input_pipeline.load_split_as_uint8(config, split, limit=n)
    labels = np.zeros(len(pixels))  # Never reaches an unconditional model.
  return config, im.model, im.diffusion, im.ema_params, im.step, pixels, labels.astype(np.int32)


def _mean_stderr(values: np.ndarray) -> tuple[float, float]:
  spread = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
  return float(np.mean(values)), spread


def measure(
  config, model, d, params, pixels, labels, *, solver: str, num_steps: int, batch_size: int
) -> dict:
  """Both bits/dim of every image, batch by batch; returns per-image arrays and timings."""
  conditional = inference.num_classes_of(model) > 0
  model_fn = inference.make_model_fn(model, params)
  options = inference.model_output_options(config)

  def bound(x, key, y):
    fn = (lambda x_t, t: model_fn(x_t, t, y)) if conditional else model_fn
    out = likelihood.calc_bpd_loop(d, fn, x, key, **options)
    return dict(bpd=out['total_bpd'], prior_bpd=out['prior_bpd'], L0_bpd=out['terms_bpd'][:, 0])

  denoiser = edm.denoiser_from_diffusion(
    d,
    model_fn,
    model_mean_type=options['model_mean_type'],
    model_var_type=options['model_var_type'],
  )
  settings = ode_likelihood.diffusion_settings(d)

  def ode(x, key, y):
    args = (y,) if conditional else ()
    run = functools.partial(
      ode_likelihood.bpd, solver=solver, num_steps=num_steps, num_probes=1, **settings
    )
    out = run(denoiser, x, key, *args)
    nfe = jnp.full(x.shape[:1], out['nfe'])  # Per image, so batches concatenate.
    return dict(bpd=out['bpd'], prior_bpd=out['prior_bpd'], flow_bpd=out['flow_bpd'], nfe=nfe)

  n = len(pixels)
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  # The last batch is padded with copies of its last image (one compiled shape).
  pad = num_batches * batch_size - n
  images = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)]) / 127.5 - 1.0
  images = images.astype(np.float32)
  labels = np.concatenate([labels, np.repeat(labels[-1:], pad, axis=0)])
  base_key = streams.key(config.seed, streams.Stream.BPD)
  ode_key = jax.random.fold_in(base_key, 1)  # The ODE's draws, apart from the bound's.
  results, timings = {}, {}
  for name, fn, key in (('bound', bound, base_key), ('ode', ode, ode_key)):
    first = (images[:batch_size], jax.random.fold_in(key, 0), labels[:batch_size])
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*first).compile()
    timings[f'{name}_compile_s'] = time.perf_counter() - start
    parts, start = [], time.perf_counter()
    for index in range(num_batches):
      batch = slice(index * batch_size, (index + 1) * batch_size)
      out = compiled(images[batch], jax.random.fold_in(key, index), labels[batch])
      parts.append(jax.device_get(out))
    timings[f'{name}_wall_s'] = time.perf_counter() - start
    results[name] = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
  return dict(results=results, timings=timings)


def report(measured: dict, meta: dict) -> dict:
  """The JSON line: means with standard errors, the paired difference, timings, the machine."""
  bound, ode = measured['results']['bound'], measured['results']['ode']
  line = dict(meta)
  for name, parts in (('bound', bound), ('ode', ode)):
    mean, stderr = _mean_stderr(parts['bpd'])
    line[name] = dict(bpd=mean, bpd_stderr=stderr)
    line[name].update({k: float(np.mean(v)) for k, v in parts.items() if k != 'bpd'})
    line[name]['wall_s'] = measured['timings'][f'{name}_wall_s']
    line[name]['compile_s'] = measured['timings'][f'{name}_compile_s']
  line['ode']['denoiser_calls_per_image'] = line['ode'].pop('nfe')
  difference, difference_stderr = _mean_stderr(ode['bpd'] - bound['bpd'])
  line['ode_minus_bound'] = dict(bpd=difference, bpd_stderr=difference_stderr)
  line['load_average_1m'] = os.getloadavg()[0]
  return line


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _SMOKE.value:
    config, model, d, params, step, pixels, labels = _smoke_model()
    num_steps, source = 2, 'smoke: a tiny model with random parameters on random pixels'
  else:
    if _CONFIG.value is None or _WORKDIR.value is None:
      raise app.UsageError('--config and --workdir are required (or --smoke).')
    runtime.setup(_WORKDIR.value)
    config, model, d, params, step, pixels, labels = _trained_model(
      _CONFIG.value, _WORKDIR.value, _N.value
    )
    num_steps, source = _NUM_STEPS.value, _WORKDIR.value
  batch_size = _BATCH.value or config.eval.batch_size
  solver = _SOLVER.value
  measured = measure(
    config,
    model,
    d,
    params,
    pixels,
    labels,
    solver=solver,
    num_steps=num_steps,
    batch_size=batch_size,
  )
  sigma_min, sigma_max = edm.process_sigma_range(d)
  conditional = inference.num_classes_of(model) > 0
  meta = dict(
    source=source,
    step=step,
    dataset=config.data.dataset,
    split=config.data.eval_split,
    num_images=len(pixels),
    conditioned_on="the images' labels: -log p(x | y)" if conditional else 'nothing: -log p(x)',
    num_timesteps=d.num_timesteps,
    ode_settings=dict(
      solver=solver,
      num_steps=num_steps if solver == 'heun' else None,
      rtol_atol=1e-5 if solver == 'rk45' else None,
      divergence='hutchinson',
      num_probes=1,
      dequantize=True,
      sigma_min=sigma_min,
      sigma_max=sigma_max,
      prior_std=math.sqrt(1 + sigma_max**2),
    ),
    batch_size=batch_size,
    machine=bench_run.machine(),
    jax=jax.__version__,
    devices=f'{jax.device_count()} x {jax.devices()[0].platform}',
  )
  line = report(measured, meta)
  text = json.dumps(line)
  print(text)
  if _JSON.value:
    files.write_text(_JSON.value, text + '\n')
  return 0


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file(
    'config', None, "The trained run's config file (configs/*.py).", lock_config=True
  )
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (--mode=train).')
  _N = flags.DEFINE_integer('n', 256, 'The first N images of the eval split.', lower_bound=1)
  _NUM_STEPS = flags.DEFINE_integer('num_steps', 64, "The ODE's Heun steps.", lower_bound=1)
  _SOLVER = flags.DEFINE_enum('solver', 'heun', list(ode_likelihood.SOLVERS), "The ODE's solver.")
  _BATCH = flags.DEFINE_integer('batch_size', None, 'Images per call (default eval.batch_size).')
  _JSON = flags.DEFINE_string('json', None, 'Also write the JSON line to this file.')
  _SMOKE = flags.DEFINE_bool('smoke', False, 'A tiny model with random parameters, seconds.')
  app.run(main)
