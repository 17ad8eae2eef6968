"""Tests of the FID / KID / IS statistics and of the domain classifier."""

import itertools
import os
from unittest import mock

import jax
import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.metrics import domain_classifier as dc
from ddpm_jax.metrics import frechet

METHODS = ('sqrtm', 'eigh')


def _random_spd(dim, rng, rank=None):
  a = rng.normal(size=(dim, rank or dim))
  return a @ a.T / (rank or dim) + (0.0 if rank else 0.1) * np.eye(dim)


# ----------------------------------------------------------------- FID ------


def test_feature_statistics_float64_unbiased():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(50, 4)).astype(np.float32)
  mu, sigma = frechet.feature_statistics(feats)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  centred = feats.astype(np.float64) - feats.astype(np.float64).mean(0)
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
  with pytest.raises(ValueError):
    frechet.feature_statistics(feats[:1])


@pytest.mark.parametrize('method', METHODS)
def test_fid_of_identical_statistics_is_zero(method):
  rng = np.random.default_rng(1)
  mu, sigma = frechet.feature_statistics(rng.normal(size=(400, 16)))
  assert abs(frechet.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9


@pytest.mark.parametrize('method', METHODS)
def test_fid_diagonal_closed_form(method):
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  # For diagonal covariances the trace term is sum (sqrt(v1) - sqrt(v2))^2.
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), method=method)
  np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize('method', METHODS)
def test_fid_scaled_covariance_closed_form(method):
  # S2 = c^2 S1 (non-diagonal): (S1 S2)^{1/2} = c S1, so FD = (1 - c)^2 Tr S1.
  rng = np.random.default_rng(3)
  s1 = _random_spd(8, rng)
  mu = rng.normal(size=8)
  got = frechet.frechet_distance(mu, s1, mu, 2.5**2 * s1, method=method)
  np.testing.assert_allclose(got, 1.5**2 * np.trace(s1), rtol=1e-9)


@pytest.mark.parametrize('method', METHODS)
def test_fid_symmetric(method):
  rng = np.random.default_rng(4)
  a = (rng.normal(size=10), _random_spd(10, rng))
  b = (rng.normal(size=10), _random_spd(10, rng))
  ab = frechet.frechet_distance(*a, *b, method=method)
  ba = frechet.frechet_distance(*b, *a, method=method)
  assert ab > 0.1
  np.testing.assert_allclose(ab, ba, rtol=1e-10)


@pytest.mark.parametrize('method', METHODS)
def test_fid_translation_gives_squared_shift(method):
  rng = np.random.default_rng(5)
  sigma = _random_spd(12, rng)
  mu = rng.normal(size=12)
  d = rng.normal(size=12)
  got = frechet.frechet_distance(mu, sigma, mu + d, sigma, method=method)
  np.testing.assert_allclose(got, d @ d, rtol=1e-8)


def test_fid_methods_agree_on_sample_statistics():
  rng = np.random.default_rng(6)
  f1 = rng.normal(size=(300, 20))
  f2 = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) * 0.5 + 1.0
  got = [frechet.frechet_distance_from_features(f1, f2, method=m) for m in METHODS]
  np.testing.assert_allclose(got[0], got[1], rtol=1e-9)


@pytest.mark.parametrize('method', METHODS)
def test_fid_singular_covariances(method):
  # Fewer samples than dimensions gives rank-deficient covariances, as with
  # 2048-d Inception features of a few hundred samples. The square root of
  # the ~1e-16 eigenvalues costs precision (~1e-8 relative here) but the
  # distance of a set to itself must still be ~0, and the two methods agree.
  rng = np.random.default_rng(7)
  mu, sigma = frechet.feature_statistics(rng.normal(size=(10, 64)))
  mu2, sigma2 = frechet.feature_statistics(rng.normal(size=(10, 64)))
  assert np.linalg.matrix_rank(sigma) == 9
  got = frechet.frechet_distance(mu, sigma, mu, sigma, method=method)
  assert abs(got) < 1e-6 * np.trace(sigma)
  other = [frechet.frechet_distance(mu, sigma, mu2, sigma2, method=m) for m in METHODS]
  np.testing.assert_allclose(other[0], other[1], rtol=1e-6)


def test_fid_non_finite_sqrtm_falls_back_to_ridge():
  var1, var2, eps = np.array([1.0, 4.0]), np.array([9.0, 0.25]), 1e-3
  real_sqrtm = scipy.linalg.sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

  with mock.patch.object(scipy.linalg, 'sqrtm', flaky_sqrtm):
    with pytest.warns(RuntimeWarning, match='not finite'):
      got = frechet.frechet_distance(
        np.zeros(2), np.diag(var1), np.zeros(2), np.diag(var2), eps=eps
      )
  assert len(calls) == 2
  want = np.sum(var1 + var2) - 2 * np.sum(np.sqrt((var1 + eps) * (var2 + eps)))
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_fid_rejects_large_imaginary_part():
  # A "covariance" with a negative eigenvalue makes S1 S2 have one, whose
  # square root is imaginary: not round-off, so it must not be hidden.
  with pytest.raises(ValueError, match='imaginary'):
    frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


def test_fid_drops_tiny_imaginary_part():
  s = np.diag([4.0, 1.0])
  with mock.patch.object(scipy.linalg, 'sqrtm', lambda a: np.sqrt(a) + 1e-9j * np.eye(2)):
    got = frechet.frechet_distance(np.zeros(2), s, np.zeros(2), s)
  assert isinstance(got, float)
  np.testing.assert_allclose(got, 0.0, atol=1e-12)


def test_statistics_file_roundtrip(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = rng.normal(size=5), _random_spd(5, rng)
  frechet.save_statistics(tmp_path / 'ref.npz', mu, sigma)
  mu2, sigma2 = frechet.load_statistics(tmp_path / 'ref.npz')
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)


# ----------------------------------------------------------------- KID ------


def test_kid_estimator_matches_brute_force():
  rng = np.random.default_rng(9)
  x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3
  k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
  m = 5
  xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
  yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  want = (xx + yy) / (m * (m - 1)) - 2 * xy / m**2
  # One subset of the full size is a permutation of all samples: the
  # estimate is the same for every draw.
  mean, std = frechet.kernel_inception_distance(x, y, num_subsets=3, subset_size=m)
  np.testing.assert_allclose(mean, want, rtol=1e-12)
  assert std < 1e-12


def test_kid_same_distribution_near_zero_shifted_positive():
  rng = np.random.default_rng(10)
  a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
  shifted = rng.normal(size=(1000, 16)) + 0.5
  same, same_std = frechet.kernel_inception_distance(a, b, 20, 200, rng=0)
  diff, _ = frechet.kernel_inception_distance(a, shifted, 20, 200, rng=0)
  assert abs(same) < 3 * same_std
  assert diff > 20 * max(abs(same), same_std)
  # Reproducible for a given seed.
  assert frechet.kernel_inception_distance(a, b, 20, 200, rng=0) == (same, same_std)


# ------------------------------------------------------------------ IS ------


def test_inception_score_uniform_is_one():
  probs = np.full((40, 7), 1 / 7)
  mean, std = frechet.inception_score(probs, num_splits=4, from_logits=False)
  np.testing.assert_allclose(mean, 1.0, rtol=1e-12)
  assert std < 1e-12
  mean, _ = frechet.inception_score(np.zeros((40, 7)), num_splits=4)
  np.testing.assert_allclose(mean, 1.0, rtol=1e-12)


def test_inception_score_even_one_hot_is_num_classes():
  k, splits = 7, 5
  labels = np.arange(k * splits) % k  # every split holds each class once
  probs = np.eye(k)[labels]
  mean, std = frechet.inception_score(probs, num_splits=splits, from_logits=False)
  np.testing.assert_allclose(mean, k, rtol=1e-12)
  assert std < 1e-12
  # Confident logits approach the same bound.
  mean, _ = frechet.inception_score(60.0 * probs, num_splits=splits)
  np.testing.assert_allclose(mean, k, rtol=1e-9)


def test_inception_score_two_class_hand_value():
  probs = np.array([[0.9, 0.1], [0.1, 0.9]] * 3)
  want = np.exp(0.9 * np.log(1.8) + 0.1 * np.log(0.2))
  mean, std = frechet.inception_score(probs, num_splits=3, from_logits=False)
  np.testing.assert_allclose(mean, want, rtol=1e-12)
  assert std < 1e-12
  mean, _ = frechet.inception_score(np.log(probs), num_splits=3)
  np.testing.assert_allclose(mean, want, rtol=1e-12)


# ---------------------------------------------------- domain classifier ------


def _synthetic(n, seed):
  """Three separable 16x16 classes: horizontal, vertical, diagonal stripes."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:16, 0:16]
  labels = rng.integers(0, 3, n)
  phase = rng.integers(0, 4, n)[:, None, None]
  coord = np.stack([yy, xx, xx + yy])[labels] + phase
  images = 60.0 + 140.0 * (coord // 2 % 2) + rng.normal(0, 25, (n, 16, 16))
  return np.clip(images, 0, 255).astype(np.uint8)[..., None], labels


def test_domain_classifier_parameter_count():
  shapes = jax.eval_shape(
    dc.DomainClassifier(10).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32),
  )
  count = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))
  assert count == 1_885_642  # the number quoted in the module docstring
  feats, logits = jax.eval_shape(
    lambda v, x: dc.DomainClassifier(10).apply(v, x),
    shapes,
    jax.ShapeDtypeStruct((3, 28, 28, 1), np.float32),
  )
  assert feats.shape == (3, 256) and logits.shape == (3, 10)


@pytest.fixture(scope='module')
def synthetic_classifier(tmp_path_factory):
  train_x, train_y = _synthetic(600, seed=0)
  test_x, test_y = _synthetic(300, seed=1)
  cache = tmp_path_factory.mktemp('dc_cache')
  params, info = dc.load_or_train_domain_classifier(
    cache, train_x, train_y, steps=60, batch_size=32, seed=3, eval_images=test_x, eval_labels=test_y
  )
  return dict(
    params=params, info=info, cache=cache, train=(train_x, train_y), test=(test_x, test_y)
  )


def test_domain_classifier_learns_separable_data(synthetic_classifier):
  info = synthetic_classifier['info']
  assert not info['cached']
  assert info['accuracy'] >= 0.95


def test_domain_fd_small_within_data_large_to_noise(synthetic_classifier):
  ext = dc.DomainFeatureExtractor(synthetic_classifier['params'])
  test_x, _ = synthetic_classifier['test']
  feats = ext.features(test_x)
  noise = np.random.default_rng(2).integers(0, 256, test_x.shape, dtype=np.uint8)
  within = frechet.frechet_distance_from_features(feats[:150], feats[150:], method='eigh')
  to_noise = frechet.frechet_distance_from_features(feats, ext.features(noise), method='eigh')
  assert to_noise > 20 * within


def test_domain_classifier_cache_and_determinism(synthetic_classifier, tmp_path):
  train_x, train_y = synthetic_classifier['train']
  kwargs = dict(steps=60, batch_size=32, seed=3)
  cached, info = dc.load_or_train_domain_classifier(
    synthetic_classifier['cache'], train_x, train_y, **kwargs
  )
  assert info['cached']
  assert info['path'] == synthetic_classifier['info']['path']
  assert os.path.getsize(info['path']) < 4_000_000  # 0.8M float32 parameters at 16x16
  # A fresh run with the same seed, in another directory, is bit-identical.
  retrained, info2 = dc.load_or_train_domain_classifier(tmp_path, train_x, train_y, **kwargs)
  assert not info2['cached']
  for a, b, c in zip(
    jax.tree.leaves(synthetic_classifier['params']),
    jax.tree.leaves(cached),
    jax.tree.leaves(retrained),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  # Other settings get another cache entry.
  _, info3 = dc.load_or_train_domain_classifier(
    synthetic_classifier['cache'], train_x, train_y, steps=5, batch_size=32, seed=3
  )
  assert not info3['cached'] and info3['path'] != info['path']
  # Flipped training batches are another setting, and another classifier.
  flipped, info4 = dc.load_or_train_domain_classifier(
    synthetic_classifier['cache'], train_x, train_y, random_flip=True, **kwargs
  )
  assert not info4['cached'] and info4['path'] not in (info['path'], info3['path'])
  assert info4['random_flip'] and not info['random_flip']
  assert not np.array_equal(flipped['penultimate']['kernel'], cached['penultimate']['kernel'])


def test_domain_features_padding_and_mesh(synthetic_classifier):
  params = synthetic_classifier['params']
  test_x, _ = synthetic_classifier['test']
  images = test_x[:10]
  whole_f, whole_l = dc.DomainFeatureExtractor(params, batch_size=16)(images)
  # 10 images in batches of 4: the last batch is padded; rows must not mix.
  f4, l4 = dc.DomainFeatureExtractor(params, batch_size=4)(images)
  np.testing.assert_allclose(f4, whole_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l4, whole_l, rtol=1e-5, atol=1e-5)
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  # batch_size 6 is rounded up to 8, two rows per device.
  fm, lm = dc.DomainFeatureExtractor(params, batch_size=6, mesh=mesh)(images)
  assert fm.shape == (10, 256)
  np.testing.assert_allclose(fm, whole_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lm, whole_l, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='channels'):
    dc.DomainFeatureExtractor(params)(np.zeros((2, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    dc.DomainFeatureExtractor(params)(np.zeros((2, 16, 16, 1), np.float32))
