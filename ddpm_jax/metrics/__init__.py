"""Sample-quality metrics: FID, KID and Inception Score, and their features.

- `frechet`: the statistics on feature vectors (host-side NumPy/SciPy,
  float64).
- `inception`: the FID Inception-v3 (TF graph 2015-12-05, pytorch-fid's FID
  variant) in Flax, with a loader for pytorch-fid's local weight file.
- `domain_classifier`: a small CNN trained on the dataset itself, whose
  features give a Frechet distance where Inception does not apply (e.g.
  Fashion-MNIST); such numbers are not comparable with Inception FID.

`inception` and `domain_classifier` import Flax; import them explicitly.
"""

# The feature extractors an evaluation config can name (`eval.feature_extractor`).
FEATURE_EXTRACTORS = ('inception', 'domain')

from ddpm_jax.metrics.frechet import feature_statistics
from ddpm_jax.metrics.frechet import frechet_distance
from ddpm_jax.metrics.frechet import frechet_distance_from_features
from ddpm_jax.metrics.frechet import inception_score
from ddpm_jax.metrics.frechet import kernel_inception_distance
from ddpm_jax.metrics.frechet import load_statistics
from ddpm_jax.metrics.frechet import save_statistics

__all__ = [
  'feature_statistics',
  'frechet_distance',
  'frechet_distance_from_features',
  'inception_score',
  'kernel_inception_distance',
  'load_statistics',
  'save_statistics',
]
