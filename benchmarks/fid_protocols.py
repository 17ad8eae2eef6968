"""Inception FID of real images against real images under several protocols, and its cost.

    python benchmarks/fid_protocols.py [--n 1000,2000,5000] [--variants_n 1000]
                                       [--out runs/fid_protocols] [--json FILE.json]

Both sets are Fashion-MNIST (Debian's package, configs/fashion_mnist.py): the
first n images of the train split against the first n of the test split, so
every FID here is the floor a perfect model would reach. Rows:

  - the pinned protocol (`ddpm_jax.metrics.fid`) at each n, to show how the
    estimate falls with n (FID is biased upwards at finite n);
  - at `--variants_n`, the same images through the classic deviations: the
    x / 127.5 - 1 scaling (pytorch-fid's), bilinear resize with
    align_corners=True, and TF1's legacy ResizeBilinear without half-pixel
    centres (the resize inside the 2015 graph that TTUR's code feeds), both
    sets through the deviation, and only the test set through it against the
    pinned protocol's train set (statistics of one protocol against samples
    of another);
  - the anti-aliased resize, compared on features only: these images are
    upsampled (28 -> 299), where anti-aliasing changes nothing.

Features are computed in chunks written to OUT as they finish, so an
interrupted run resumes. The time per 1000 images is measured apart, at the
end: the pinned protocol's feature extraction of `--timing_images` test
images (compilation excluded), with the load average beside it, as this runs
on a shared machine. Writes the JSON summary to --json (default
OUT/results.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ddpm_jax import runtime  # noqa: E402

runtime.configure_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from ddpm_jax import files  # noqa: E402
from ddpm_jax import input_pipeline  # noqa: E402
from ddpm_jax.metrics import fid  # noqa: E402
from ddpm_jax.metrics import frechet  # noqa: E402
from ddpm_jax.metrics import inception  # noqa: E402

CHUNK = 500
SIZE = inception.INCEPTION_SIZE


def _resize_with(images: jax.Array, scale: jax.Array, translation: jax.Array) -> jax.Array:
  # An edge row and column past the end: TF1 clamps samples beyond the last pixel to it.
  padded = jnp.pad(images, ((0, 0), (0, 1), (0, 1), (0, 0)), mode='edge')
  shape = (images.shape[0], SIZE, SIZE, images.shape[-1])
  return jax.image.scale_and_translate(
    padded, shape, (1, 2), scale, translation, method='linear', antialias=False
  )


def _to_rgb_float(images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32)
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _scale_127(images):
  x = _to_rgb_float(images)
  return jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), 'bilinear', antialias=False) / 127.5 - 1


def _align_corners(images):
  x = _to_rgb_float(images)
  # Output i samples input i (in - 1) / (out - 1): scale (out - 1) / (in - 1), centres aligned.
  scale = jnp.array([(SIZE - 1) / (x.shape[1] - 1), (SIZE - 1) / (x.shape[2] - 1)])
  return (_resize_with(x, scale, 0.5 * (1 - scale)) - 128) / 128


def _tf1_legacy(images):
  x = _to_rgb_float(images)
  # Output i samples input i * in / out (no half-pixel offset), clamped at the last pixel.
  scale = jnp.array([SIZE / x.shape[1], SIZE / x.shape[2]])
  return (_resize_with(x, scale, 0.5 * (1 - scale)) - 128) / 128


def _antialiased(images):
  x = _to_rgb_float(images)
  return (jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), 'bilinear', antialias=True) - 128) / 128


VARIANTS = {
  'scale x/127.5-1 (pytorch-fid)': _scale_127,
  'bilinear align_corners=True': _align_corners,
  'TF1 ResizeBilinear, no half-pixel centres (TTUR)': _tf1_legacy,
}


def _features(out_dir, images, compute, what):
  """compute(uint8 chunk) -> features, over chunks saved as they finish."""
  chunks = range(0, len(images), CHUNK)
  batches = files.resumable_batches(
    out_dir,
    (images[i : i + CHUNK] for i in chunks),
    len(chunks),
    lambda _, chunk: {'features': compute(chunk)},
    what=what,
  )
  return np.concatenate([b['features'] for b in batches])


def _fid(a, b):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # sqrtm's accuracy warnings at small n
    return frechet.frechet_distance_from_features(a, b)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--n', default='1000,2000,5000', help='set sizes of the pinned protocol')
  parser.add_argument('--variants_n', type=int, default=1000, help='set size of the variants')
  parser.add_argument('--out', default=os.path.join(ROOT, 'runs', 'fid_protocols'))
  parser.add_argument('--json', default=None, help='summary file (default OUT/results.json)')
  parser.add_argument('--batch_size', type=int, default=50)
  parser.add_argument('--timing_images', type=int, default=1000, help='images timed at the end')
  args = parser.parse_args(argv)
  sizes = sorted(int(n) for n in args.n.split(','))
  n_max = max(sizes + [args.variants_n])
  config = fashion_mnist.get_config()
  sets = {
    split: input_pipeline.load_split_as_uint8(config, f'{split}[:{n_max}]')
    for split in ('train', 'test')
  }
  extractor = fid.inception_extractor(batch_size=args.batch_size)
  start = time.perf_counter()
  fid.compute_features(sets['train'][: args.batch_size], extractor)  # compiles
  compile_s = time.perf_counter() - start
  pinned = {
    split: _features(
      os.path.join(args.out, f'pinned_{split}'),
      images,
      lambda chunk: fid.compute_features(chunk, extractor),
      f'pinned {split}',
    )
    for split, images in sets.items()
  }
  rows = []
  for n in sizes:
    rows.append(dict(protocol='pinned', n=n, fid=_fid(pinned['train'][:n], pinned['test'][:n])))
    print(json.dumps(rows[-1]), flush=True)

  network = jax.jit(
    lambda variables, x: inception.FIDInceptionV3(with_logits=False).apply(variables, x)[0]
  )
  variables = jax.device_put(fid.load_inception_variables())

  def run_variant(preprocess):
    prep = jax.jit(preprocess)

    def compute(chunk):
      parts = [
        np.asarray(network(variables, prep(chunk[i : i + args.batch_size])))
        for i in range(0, len(chunk), args.batch_size)
      ]
      return np.concatenate(parts)

    return compute

  nv = args.variants_n
  for name, preprocess in VARIANTS.items():
    slug = ''.join(c if c.isalnum() else '_' for c in name)[:40]
    feats = {
      split: _features(
        os.path.join(args.out, f'{slug}_{split}'),
        sets[split][:nv],
        run_variant(preprocess),
        f'{name} {split}',
      )
      for split in sets
    }
    value = _fid(feats['train'], feats['test'])
    # The usual accident: reference statistics from one protocol, samples through another.
    mixed = _fid(pinned['train'][:nv], feats['test'])
    shift = float(np.abs(feats['test'] - pinned['test'][:nv]).max() / np.abs(pinned['test']).max())
    rows.append(
      dict(protocol=name, n=nv, fid=value, fid_against_pinned_train=mixed, max_feature_change=shift)
    )
    print(json.dumps(rows[-1]), flush=True)
  # Anti-aliasing acts only when downsampling: on these upsampled images, features only.
  probe = sets['test'][: args.batch_size]
  anti = run_variant(_antialiased)(probe)
  rows.append(
    dict(
      protocol='antialiased bilinear',
      n=len(probe),
      fid=None,
      max_feature_change=float(
        np.abs(anti - pinned['test'][: len(probe)]).max() / np.abs(pinned['test']).max()
      ),
    )
  )
  print(json.dumps(rows[-1]), flush=True)
  timed = sets['test'][: args.timing_images]
  load_before = os.getloadavg()
  start = time.perf_counter()
  fid.compute_features(timed, extractor)
  seconds = time.perf_counter() - start
  load_after = os.getloadavg()
  summary = dict(
    date=datetime.date.today().isoformat(),
    data='Fashion-MNIST (Debian package) 28x28 gray: train[:n] against test[:n]',
    protocol=fid.PROTOCOL,
    machine=f'{_cpu_model()}, {os.cpu_count()} CPUs',
    devices=f'{jax.device_count()} x {jax.devices()[0].platform}',
    batch_size=args.batch_size,
    compile_s=round(compile_s, 1),
    seconds_per_1000_images=round(1000 * seconds / len(timed), 1),
    images_timed=len(timed),
    load_average_before=[round(x, 2) for x in load_before],
    load_average_after=[round(x, 2) for x in load_after],
    rows=rows,
  )
  path = args.json or os.path.join(args.out, 'results.json')
  files.write_json(path, summary)
  print(json.dumps(summary, indent=2))
  return 0


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), '?')
  except OSError:
    return '?'


if __name__ == '__main__':
  sys.exit(main())
