"""In-process A/B of each CPU kernel on the CIFAR-10 U-Net's training step and forward pass.

Each kernel's variant is the 'fast' layer set (`ddpm_jax.models.layers.FAST`)
with just that kernel swapped for its reference layer, or, for the
optimizer, optax's chain in place of `kernels.adam.clipped_adam`. Every
variant is timed in pairs with the unchanged set, in alternating order
(ABBA...), after a warm-up call each (compiling is not timed), so drift of a
shared machine reaches both sides of a pair alike. Printed per variant: the
median and quartiles of (time without the kernel / time with it) over the
pairs, and the ratio of the fastest calls; a kernel's gain is that ratio - 1.

  .venv/bin/python benchmarks/kernel_ab.py [--repeats=21] [--batch=8]
"""

import dataclasses
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable

from absl import app
from absl import flags

# The repository root, for `ddpm_jax` and `configs` when run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import runtime  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

runtime.configure_xla_flags()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from configs import cifar10  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import diffusion as diffusion_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import train_state as ts  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.kernels import adam as adam_kernel  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.models import UNet, layers  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer('repeats', 21, 'Timed pairs per variant.')
flags.DEFINE_integer('batch', 8, 'Batch size.')
FLAGS = flags.FLAGS


def _seconds(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _compare(
  title: str, base: Callable[[], object], variants: dict[str, Callable[[], object]], repeats: int
) -> None:
  """Prints each variant's time relative to `base`, timed in alternating pairs."""
  print(f'\n{title}: time without the kernel / time with it')
  print(
    '| kernel swapped out | median ratio [quartiles] | ratio of fastest calls | with (s) |'
    ' without (s) |'
  )
  print('|---|---|---|---|---|')
  jax.block_until_ready(base())
  for name, fn in variants.items():
    jax.block_until_ready(fn())
    with_, without = [], []
    for r in range(repeats):
      if r % 2:
        without.append(_seconds(fn))
        with_.append(_seconds(base))
      else:
        with_.append(_seconds(base))
        without.append(_seconds(fn))
    ratios = np.array(without) / np.array(with_)
    low, mid, high = np.percentile(ratios, [25, 50, 75])
    print(
      f'| {name} | {mid:.3f} [{low:.3f}, {high:.3f}] | {min(without) / min(with_):.3f} |'
      f' {np.median(with_):.3f} | {np.median(without):.3f} |',
      flush=True,
    )


def main(argv):
  del argv
  cpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
  print(next((line for line in cpu.splitlines() if line.startswith('Model name')), 'CPU ?'))
  print(
    f'jax {jax.__version__}, backend {jax.default_backend()}, batch {FLAGS.batch}, '
    f'{FLAGS.repeats} pairs per variant'
  )

  config = cifar10.get_config()
  d = diffusion_lib.make_diffusion(
    config.diffusion.beta_schedule,
    config.diffusion.num_timesteps,
    config.diffusion.beta_start,
    config.diffusion.beta_end,
  )
  size = config.data.image_size
  images = jax.random.uniform(jax.random.key(1), (FLAGS.batch, size, size, 3), minval=-1.0)
  t = jnp.arange(FLAGS.batch, dtype=jnp.int32) * 100
  state = jax.jit(
    functools.partial(
      ts.create_train_state, UNet(layers=layers.FAST), config, image_shape=(size, size, 3)
    )
  )(jax.random.key(0))
  optim = config.optim
  optax_chain = optax.with_extra_args_support(
    adam_kernel.reference(
      ts.learning_rate_schedule(optim),
      b1=optim.beta1,
      b2=optim.beta2,
      eps=optim.eps,
      max_norm=optim.grad_clip,
    )
  )

  # The fast set with one kernel swapped out, for each field where it has one.
  models = {}
  for field in dataclasses.fields(layers.Layers):
    reference = getattr(layers.REFERENCE, field.name)
    if getattr(layers.FAST, field.name) is not reference:
      models[field.name] = UNet(layers=dataclasses.replace(layers.FAST, **{field.name: reference}))
  models['all layers'] = UNet(layers=layers.REFERENCE)

  forward = lambda m: functools.partial(
    jax.jit(functools.partial(m.apply, train=False)), {'params': state.params}, images, t
  )
  _compare(
    'forward pass',
    forward(UNet(layers=layers.FAST)),
    {name: forward(m) for name, m in models.items()},
    FLAGS.repeats,
  )

  step = jax.jit(functools.partial(ts.train_step, diffusion=d, config=config))
  train = lambda s: functools.partial(step, s, {'image': images}, jax.random.key(2))
  variants = {name: train(state.replace(apply_fn=m.apply)) for name, m in models.items()}
  variants['adam (optax chain)'] = train(state.replace(tx=optax_chain))
  _compare('training step', train(state), variants, FLAGS.repeats)


if __name__ == '__main__':
  app.run(main)
