"""Sample-quality statistics on feature vectors: FID, KID and Inception Score.

Everything here runs on the host in NumPy/SciPy float64. The expensive part
of an evaluation is the feature extraction (see `inception.py` and
`domain_classifier.py`); the statistics below are O(N D^2 + D^3) once per
evaluation, where float64 matters more than speed.

Definitions follow the papers and the reference code bases:
- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule"):
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), covariances with ddof=1,
  the matrix square root by `scipy.linalg.sqrtm` as in TTUR and pytorch-fid.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with
  the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over random
  subsets (defaults 100 subsets of 1000, as in the paper's code).
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), computed per split
  of the predictions (10 splits by default) and reported as mean and std.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import scipy.linalg
import scipy.special

from ddpm_jax import files

__all__ = [
  'feature_statistics',
  'frechet_distance',
  'frechet_distance_from_features',
  'kernel_inception_distance',
  'inception_score',
  'save_statistics',
  'load_statistics',
]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a set of feature vectors, in float64.

  Args:
    features: [N, D] features, N >= 2.

  Returns:
    (mu [D], sigma [D, D]): the mean and the unbiased (ddof=1) covariance,
    the same estimator as TTUR and pytorch-fid.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f'features must be [N, D], got shape {features.shape}')
  if features.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors for a covariance, got {features.shape[0]}')
  mu = features.mean(axis=0)
  sigma = np.cov(features, rowvar=False)
  return mu, np.atleast_2d(sigma)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """Tr((S1 S2)^{1/2}) by the Schur-based `sqrtm`, as the standard FID code."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # Near-singular products (fewer samples than dimensions) can make sqrtm
    # return inf/nan; the standard code then retries with a small ridge.
    warnings.warn(
      'frechet_distance: sqrtm of the covariance product is not finite; '
      f'adding {eps:g} * I to both covariances.',
      RuntimeWarning,
      stacklevel=3,
    )
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Round-off gives the square root of a (theoretically PSD-similar)
    # product tiny imaginary parts; large ones mean the inputs are not
    # covariances.
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > 1e-3:
      raise ValueError(
        f'frechet_distance: imaginary component {max_imag:g} in the '
        'square root of the covariance product; are both inputs '
        'symmetric positive semi-definite?'
      )
    covmean = covmean.real
  return float(np.trace(covmean))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix (negative round-off clipped)."""
  vals, vecs = np.linalg.eigh(matrix)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr((S1 S2)^{1/2}) via the symmetric S1^{1/2} S2 S1^{1/2}.

  S1 S2 is similar to S1^{1/2} S2 S1^{1/2}, which is symmetric PSD, so its
  eigenvalues are real and non-negative and no complex arithmetic is needed.
  """
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  middle = 0.5 * (middle + middle.T)
  vals = np.linalg.eigvalsh(middle)
  return float(np.sum(np.sqrt(np.clip(vals, 0.0, None))))


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  *,
  eps: float = 1e-6,
  method: str = 'sqrtm',
) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1: [D] mean of the first Gaussian.
    sigma1: [D, D] covariance of the first Gaussian.
    mu2: [D] mean of the second Gaussian.
    sigma2: [D, D] covariance of the second Gaussian.
    eps: ridge added to both covariances when `sqrtm` returns non-finite
      values (the standard code's fallback, with a RuntimeWarning).
    method: "sqrtm" (default; `scipy.linalg.sqrtm` of S1 S2, as TTUR and
      pytorch-fid, so numbers are comparable with published ones) or "eigh"
      (eigen-decomposition of S1^{1/2} S2 S1^{1/2}; never complex and robust
      for singular covariances, equal up to round-off).

  Returns:
    ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}),
    as a Python float.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f'mean shapes differ: {mu1.shape} vs {mu2.shape}')
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f'covariance shapes {sigma1.shape}, {sigma2.shape} do not match mean shape {mu1.shape}'
    )
  if method == 'sqrtm':
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == 'eigh':
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"unknown method {method!r}; valid: 'sqrtm', 'eigh'")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray, **kwargs) -> float:
  """Frechet distance between the Gaussians fitted to two feature sets.

  Args:
    features1: [N1, D] features.
    features2: [N2, D] features.
    **kwargs: passed to `frechet_distance` (eps, method).

  Returns:
    The Frechet distance as a Python float.
  """
  mu1, sigma1 = feature_statistics(features1)
  mu2, sigma2 = feature_statistics(features2)
  return frechet_distance(mu1, sigma1, mu2, sigma2, **kwargs)


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3 for equal-size sets."""
  m = x.shape[0]
  dim = x.shape[1]
  k_xx = (x @ x.T / dim + 1.0) ** 3
  k_yy = (y @ y.T / dim + 1.0) ** 3
  k_xy = (x @ y.T / dim + 1.0) ** 3
  # The unbiased estimator drops the k(x_i, x_i) terms of the within-set sums.
  sum_xx = k_xx.sum() - np.trace(k_xx)
  sum_yy = k_yy.sum() - np.trace(k_yy)
  return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / m**2)


def kernel_inception_distance(
  features1: np.ndarray,
  features2: np.ndarray,
  num_subsets: int = 100,
  subset_size: int = 1000,
  rng: np.random.Generator | int | None = 0,
) -> tuple[float, float]:
  """Kernel Inception Distance (cubic polynomial kernel, unbiased MMD^2).

  Args:
    features1: [N1, D] features of the first set.
    features2: [N2, D] features of the second set.
    num_subsets: number of random subset pairs to average over.
    subset_size: samples per subset; capped at min(N1, N2). Each subset is
      drawn without replacement within its set.
    rng: a NumPy Generator or a seed, for reproducible subsets.

  Returns:
    (mean, std) of the per-subset MMD^2 estimates. The estimator is unbiased,
    so for equal distributions the mean is close to 0 and can be negative.
  """
  x = np.asarray(features1, dtype=np.float64)
  y = np.asarray(features2, dtype=np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'features must be [N, D] with equal D, got {x.shape} and {y.shape}')
  m = min(subset_size, x.shape[0], y.shape[0])
  if m < 2:
    raise ValueError(f'need subsets of at least 2 samples, got {m}')
  if num_subsets < 1:
    raise ValueError(f'num_subsets must be >= 1, got {num_subsets}')
  gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  estimates = np.empty(num_subsets, dtype=np.float64)
  for i in range(num_subsets):
    xs = x[gen.choice(x.shape[0], m, replace=False)]
    ys = y[gen.choice(y.shape[0], m, replace=False)]
    estimates[i] = _polynomial_mmd2_unbiased(xs, ys)
  return float(estimates.mean()), float(estimates.std())


def inception_score(
  predictions: np.ndarray, num_splits: int = 10, *, from_logits: bool = True
) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))) over splits.

  Args:
    predictions: [N, K] class logits (from_logits=True; softmax over all K,
      the 1008 outputs of the 2015 Inception graph for the standard IS) or
      class probabilities whose rows sum to 1 (from_logits=False).
    num_splits: the predictions are cut into this many contiguous parts of
      near-equal size; p(y) is the mean prediction within each part.
    from_logits: whether `predictions` are logits or probabilities.

  Returns:
    (mean, std) of the per-split scores. 1 means every prediction equals the
    marginal; K is the maximum (confident, evenly spread predictions).
  """
  preds = np.asarray(predictions, dtype=np.float64)
  if preds.ndim != 2:
    raise ValueError(f'predictions must be [N, K], got shape {preds.shape}')
  n = preds.shape[0]
  if not 1 <= num_splits <= n:
    raise ValueError(f'num_splits must be in [1, N={n}], got {num_splits}')
  if from_logits:
    log_p = scipy.special.log_softmax(preds, axis=1)
    probs = np.exp(log_p)
  else:
    if np.any(preds < 0) or not np.allclose(preds.sum(axis=1), 1.0, atol=1e-6):
      raise ValueError('probabilities must be non-negative rows summing to 1')
    probs = preds
  scores = np.empty(num_splits, dtype=np.float64)
  for i in range(num_splits):
    part = probs[i * n // num_splits : (i + 1) * n // num_splits]
    marginal = part.mean(axis=0, keepdims=True)
    # xlogy gives 0 * log 0 = 0, so exact one-hot probabilities are fine.
    kl = (scipy.special.xlogy(part, part) - scipy.special.xlogy(part, marginal)).sum(axis=1)
    scores[i] = np.exp(kl.mean())
  return float(scores.mean()), float(scores.std())


def save_statistics(
  path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, n: int | None = None
) -> None:
  """Saves reference statistics as an .npz with keys 'mu' and 'sigma' (and 'n').

  The layout is the one pytorch-fid and NVlabs/edm read and write, so
  statistics files can be exchanged with them (when computed with the same
  network and resizing); they ignore the extra 'n'.

  Args:
    path: destination file.
    mu: [D] mean.
    sigma: [D, D] covariance.
    n: the number of feature vectors behind them, stored when given.
  """
  arrays = dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
  if n is not None:
    arrays['n'] = np.asarray(n, np.int64)
  files.save_npz(path, **arrays)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Loads statistics written by `save_statistics` (or by pytorch-fid).

  Args:
    path: an .npz file with arrays 'mu' [D] and 'sigma' [D, D].

  Returns:
    (mu, sigma) in float64.
  """
  data = files.load_npz(path)
  return (np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64))
