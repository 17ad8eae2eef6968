"""--mode=sample and --mode=eval on a tiny trained model: outputs, determinism, resume."""

import functools
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpointing
from ddpm_jax import edm
from ddpm_jax import evaluate
from ddpm_jax import images as images_lib
from ddpm_jax import inception_fid
from ddpm_jax import inference
from ddpm_jax import ode_likelihood
from ddpm_jax import sample
from ddpm_jax import sampling
from ddpm_jax import train
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import frechet
from trainer_harness import tiny_config as make_config
from trainer_harness import write_fake_fashion_mnist


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with a 2-step tiny checkpoint, and its config."""
  root = tmp_path_factory.mktemp('sample_eval')
  write_fake_fashion_mnist(str(root / 'idx'))
  config = make_config(
    (str(root / 'idx'), str(root / 'tfds')), num_train_steps=2, sample_every_steps=0
  )
  workdir = str(root / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _copy_workdir(workdir, tmp_path):
  """A private copy, so tests that write samples do not see each other's files."""
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('samples', 'eval', '.train.lock'))
  return copy


def test_sample_writes_uint8_npz_and_grid_deterministically(trained, tmp_path):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  path = sample.sample_and_save(config, workdir)
  images = np.load(path)['images']
  assert images.shape == (config.sampling.num_samples, 16, 16, 1)
  assert images.dtype == np.uint8 and images.std() > 0
  # The grid is the samples enlarged by pixel repetition to a readable size (16 px -> 112).
  grid = np.asarray(Image.open(path.replace('.npz', '.png')))
  cols = int(np.ceil(np.sqrt(len(images))))
  rows = -(-len(images) // cols)
  assert grid.shape == (7 * (rows * 18 + 2), 7 * (cols * 18 + 2))
  np.testing.assert_array_equal(grid[14 : 14 + 112 : 7, 14 : 14 + 112 : 7], images[0, ..., 0])

  # Resume: one finished batch is kept as it is, a missing one is redone,
  # and the result is the same as the uninterrupted run.
  batch_dir = path[: -len('.npz')]
  kept = os.path.join(batch_dir, 'batch_00000.npz')
  kept_mtime = os.stat(kept).st_mtime_ns
  os.remove(os.path.join(batch_dir, 'batch_00001.npz'))
  os.remove(path)
  again = np.load(sample.sample_and_save(config, workdir))['images']
  np.testing.assert_array_equal(images, again)
  assert os.stat(kept).st_mtime_ns == kept_mtime

  # Another seed gives other samples.
  config = config.copy_and_resolve_references()
  config.seed = 1
  other = np.load(sample.sample_and_save(config, workdir))['images']
  assert not np.array_equal(images, other)


@pytest.mark.parametrize('sampler', ['dpm_solver', 'unipc'])
def test_sample_with_an_ode_solver(trained, tmp_path, sampler):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.sampling.sampler = sampler
  config.sampling.solver_order = 3
  config.sampling.num_samples = 4
  path = sample.sample_and_save(config, workdir)
  assert os.path.basename(path).startswith(f'{sampler}5_order3_step')
  images = np.load(path)['images']
  assert images.shape == (4, 16, 16, 1) and images.std() > 0
  # Another layer set computes the same samples from the same checkpoint.
  config.model.layers = 'reference'
  again = np.load(sample.sample_and_save(config, _copy_workdir(workdir, tmp_path / 'ref')))
  assert np.abs(again['images'].astype(int) - images.astype(int)).max() <= 1


def test_sample_a_ddpm_model_with_edms_heun_sampler(trained, tmp_path):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.sampling.sampler = 'edm'
  config.sampling.num_samples = 4
  path = sample.sample_and_save(config, workdir)
  # The tag names the configured range; the model's T = 100 process cuts its top to sigma_99.
  assert os.path.basename(path).startswith('edm5_sigma0.002-80_rho7_step')
  images = np.load(path)['images']
  assert images.shape == (4, 16, 16, 1) and images.std() > 0


def test_sample_figures(trained, tmp_path):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.sampling.figures = True
  config.sampling.num_samples = 4
  path = sample.sample_and_save(config, workdir)
  assert os.path.exists(path.replace('.npz', '_progressive.png'))
  assert os.path.exists(path.replace('.npz', '_interpolation.png'))


def test_eval_reports_bound_and_quality_and_resumes(trained, tmp_path):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  # The judge's augmentation is its own, whatever the diffusion model trained with.
  config.eval.domain_classifier_random_flip = not config.data.random_flip
  results = evaluate.evaluate(config, workdir)
  bpd = results['bpd']
  assert bpd['num_examples'] == config.eval.num_bpd_examples
  for key in ('total_bpd', 'prior_bpd', 'sum_Lt_bpd', 'L0_bpd'):
    assert np.isfinite(bpd[key]), key
  np.testing.assert_allclose(
    bpd['total_bpd'], bpd['prior_bpd'] + bpd['sum_Lt_bpd'] + bpd['L0_bpd'], rtol=1e-5
  )
  # An untrained model is far from the data: several bits per dimension.
  assert 1.0 < bpd['total_bpd'] < 20.0
  assert os.path.exists(bpd['rate_distortion_png'])
  quality = results['sample_quality']
  assert quality['comparable_with_inception_fid'] is False
  assert quality['classifier_random_flip'] is config.eval.domain_classifier_random_flip
  assert quality['fd_vs_train'] > 0 and np.isfinite(quality['kid_vs_train'])
  saved = json.load(open(os.path.join(workdir, 'eval', f'step_{results["step"]}.json')))
  assert saved['bpd']['total_bpd'] == bpd['total_bpd']

  # A restart reuses the finished batches and gives the same numbers.
  batch_dir = os.path.join(workdir, 'eval', f'bpd_step_{results["step"]}_seed{config.seed}')
  first = os.path.join(batch_dir, 'batch_00000.npz')
  mtime = os.stat(first).st_mtime_ns
  again = evaluate.evaluate(config, workdir)
  assert again['bpd'] == bpd
  assert again['sample_quality']['fd_vs_train'] == quality['fd_vs_train']
  assert os.stat(first).st_mtime_ns == mtime

  # A classifier trained with other settings gets its own reference statistics.
  config.eval.domain_classifier_random_flip = not config.eval.domain_classifier_random_flip
  other = evaluate.evaluate(config, workdir)['sample_quality']
  assert other['features_id'] != quality['features_id']
  means = [
    np.load(os.path.join(workdir, 'eval', f'reference_{q["features_id"]}_test.npz'))['mu']
    for q in (quality, other)
  ]
  assert not np.allclose(*means)


def test_eval_sets_the_ode_likelihood_beside_the_bound_and_resumes(trained, tmp_path, monkeypatch):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.eval.ode_bpd = True
  config.eval.ode_solver, config.eval.ode_num_steps = 'heun', 4
  # Sample quality is tested above; here only the likelihoods.
  monkeypatch.setattr(evaluate, 'evaluate_sample_quality', lambda *args: {})
  results = evaluate.evaluate(config, workdir)
  ode, bound = results['ode_bpd'], results['bpd']
  assert ode['num_examples'] == bound['num_examples'] == config.eval.num_bpd_examples
  # The prior's and the flow's parts, plus the bins' offset log2(255 / 2).
  parts = ode['prior_bpd'] + ode['flow_bpd'] + ode_likelihood.OFFSET_BITS
  np.testing.assert_allclose(ode['bpd'], parts, rtol=1e-5)
  assert ode['nfe'] == 2 * 4 and ode['solver'] == 'heun' and ode['num_steps'] == 4
  # The ODE runs over the process's own levels, from the bound's N(0, I) at x_T.
  lowest, highest = edm.process_sigma_range(inference.build_model_and_diffusion(config)[1])
  assert (ode['sigma_min'], ode['sigma_max']) == pytest.approx((lowest, highest))
  assert 1.0 < ode['bpd'] < 30.0
  # A restart reuses the finished batches; other steps are another integration, not those.
  assert evaluate.evaluate(config, workdir)['ode_bpd'] == ode
  config.eval.ode_num_steps = 2
  coarser = evaluate.evaluate(config, workdir)['ode_bpd']
  assert coarser['nfe'] == 2 * 2 and coarser['bpd'] != ode['bpd']


def test_grids_are_enlarged_to_a_readable_size():
  assert [images_lib.readable_upscale(n) for n in (16, 28, 32, 64, 256)] == [7, 4, 4, 2, 1]


def test_class_grid_puts_one_class_on_each_row():
  # Labels in turn, as class_labels('all') gives them: 0, 1, 2, 0, 1, 2, 0, 1.
  labels = np.arange(8) % 3
  images = (labels * 80 + 1).astype(np.uint8).reshape(8, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
  grid = images_lib.class_grid(images, labels, max_columns=8)
  # Two images per row (the rarest class has two), 2 px tiles with 2 px padding.
  assert grid.shape == (3 * 4 + 2, 2 * 4 + 2, 1)
  for row, cls in enumerate(range(3)):
    top = 2 + row * 4
    assert (grid[top : top + 2, 2:4] == cls * 80 + 1).all()
    assert (grid[top : top + 2, 6:8] == cls * 80 + 1).all()


def test_rate_distortion_is_cumulative():
  terms = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
  prior = np.array([0.5, 0.5])
  mse = np.full((2, 3), (10 / 127.5) ** 2)
  rate, distortion = evaluate.rate_distortion(terms, prior, mse)
  np.testing.assert_allclose(rate, [6.5, 5.5, 3.5])
  np.testing.assert_allclose(distortion, [10.0, 10.0, 10.0])


def test_no_checkpoint_is_a_clear_error(trained, tmp_path):
  config, _ = trained
  with pytest.raises(checkpointing.CheckpointError, match='train first'):
    sample.sample_and_save(config, str(tmp_path / 'empty'))
  assert not os.path.exists(tmp_path / 'empty' / 'samples')


def test_mismatched_model_config_is_refused(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.model.num_res_blocks = 2
  with pytest.raises(train.TrainingError, match='model.num_res_blocks'):
    sample.sample_and_save(config, workdir)


def test_missing_inception_weights_is_a_clear_error(trained, tmp_path):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.eval.feature_extractor = 'inception'
  config.eval.inception_weights = str(tmp_path / 'missing.pth')
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    evaluate.evaluate_sample_quality(
      config, inference.load_inference_model(config, workdir), workdir
    )


def test_eval_reports_inception_fid_with_its_reference_and_caches_the_statistics(
  trained, tmp_path, monkeypatch
):
  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  cache = tmp_path / 'fid_cache'
  monkeypatch.setenv(fid.CACHE_ENV, str(cache))
  # sqrtm of a 2048 x 2048 product takes a minute on 2 cores; eigh gives the same value.
  exact = frechet.frechet_distance
  monkeypatch.setattr(frechet, 'frechet_distance', functools.partial(exact, method='eigh'))
  # Fashion-MNIST's shape: the domain FD, and Inception FID beside it.
  config.eval.inception_fid = True
  config.eval.fid_reference_split = 'test'
  config.eval.fid_reference_count = 12
  results = evaluate.evaluate(config, workdir)
  saved = json.load(open(os.path.join(workdir, 'eval', f'step_{results["step"]}.json')))
  quality = saved['sample_quality']
  assert quality['comparable_with_inception_fid'] is False and quality['fd_vs_test'] > 0
  assert 0 < quality['fid'] < float('inf')
  assert quality['fid_protocol_id'] == fid.PROTOCOL_ID
  assert quality['fid_weights'] == fid.PROTOCOL['weights'] == quality['fid_protocol']['weights']
  assert (quality['fid_reference_split'], quality['fid_reference_count']) == ('test', 12)
  assert quality['fid_num_samples'] == quality['num_samples'] == config.eval.num_fid_samples
  assert quality['inception_score'] is None and 'pool3' in quality['inception_score_reason']
  stats = fid.statistics_path('fashion_mnist_local-resize', 'test', 16, 12, str(cache))
  mtime = os.stat(stats).st_mtime_ns

  # Inception as the metric: the same samples and cached statistics give the same FID, and KID.
  config.eval.feature_extractor = 'inception'
  im = inference.load_inference_model(config, workdir)
  again = evaluate.evaluate_sample_quality(config, im, workdir)
  assert again['metric'] == 'FID' and again['fid'] == quality['fid']
  assert np.isfinite(again['kid_vs_test']) and again['inception_score'] is None
  assert os.stat(stats).st_mtime_ns == mtime
  # The cache holds the converted weights and the one reference file.
  assert sorted(os.listdir(cache)) == sorted(
    [os.path.basename(stats), f'inception_{fid.PROTOCOL_ID}.npz']
  )

  # More reference images than the split has: the message names the field.
  config.eval.fid_reference_count = 100
  with pytest.raises(ValueError, match='eval.fid_reference_count=100, but .* has 16 images'):
    inception_fid.InceptionFID(config)


def test_sampler_quality_benchmark_runs_pairs_and_resumes(trained, tmp_path):
  """benchmarks/sampler_quality.py on the tiny model: every row judged, and a rerun redoes nothing."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import sampler_quality  # pylint: disable=g-import-not-at-top

  config, workdir = trained
  workdir = _copy_workdir(workdir, tmp_path)
  out = str(tmp_path / 'quality')
  rows = ['ddim10', 'dpm2_5', 'unipc5']
  results = sampler_quality.run(config, workdir, rows, 8, 5, out)
  assert [r['name'] for r in results['rows']] == rows
  assert [r['model_calls'] for r in results['rows']] == [10, 5, 5]
  for r in results['rows'] + [results['real_data_floor']]:
    assert np.isfinite(r['fd']) and r['fd'] > 0 and r['fd_spread'] >= 0
  assert all(r['sampling_seconds'] > 0 for r in results['rows'])
  for name in ('results.json', 'table.md', 'fd_vs_model_calls.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert json.load(open(os.path.join(out, 'results.json')))['rows'] == results['rows']
  # The rows match what --mode=sample draws with the same sampler and seed.
  ddim = np.load(os.path.join(out, 'ddim10', 'batch_00000.npz'))['images']
  config = config.copy_and_resolve_references()
  config.sampling.sampler, config.sampling.num_steps = 'ddim', 10
  im = inference.load_inference_model(config, workdir)
  np.testing.assert_array_equal(
    ddim, inference.generate_samples(config, im, len(ddim), str(tmp_path / 'direct'))
  )
  # A rerun reads every finished batch back and recompiles nothing.
  mtime = os.stat(os.path.join(out, 'dpm2_5', 'batch_00000.npz')).st_mtime_ns
  again = sampler_quality.run(config, workdir, rows[1:2], 8, 5, out)
  assert again['rows'][0]['fd'] == results['rows'][1]['fd']
  assert again['rows'][0]['compile_seconds'] is None
  assert os.stat(os.path.join(out, 'dpm2_5', 'batch_00000.npz')).st_mtime_ns == mtime


@pytest.fixture(scope='module')
def trained_conditional(tmp_path_factory):
  """A workdir with a 2-step class-conditional tiny checkpoint, and its config."""
  root = tmp_path_factory.mktemp('sample_eval_conditional')
  write_fake_fashion_mnist(str(root / 'idx'))
  config = make_config(
    (str(root / 'idx'), str(root / 'tfds')), num_train_steps=2, sample_every_steps=2
  )
  config.model.num_classes = 10
  config.sampling.class_labels = 'all'
  config.sampling.guidance_scale = 2.0
  config.sampling.num_samples = 20
  workdir = str(root / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_conditional_sample_writes_labels_and_a_grid_per_class(trained_conditional, tmp_path):
  config, workdir = trained_conditional
  assert os.path.exists(os.path.join(workdir, 'samples', 'step_00000002.png'))  # Training grid.
  workdir = _copy_workdir(workdir, tmp_path)
  path = sample.sample_and_save(config, workdir)
  assert '_guidance2_classes-all_' in os.path.basename(path)
  saved = np.load(path)
  assert saved['images'].shape == (20, 16, 16, 1)
  np.testing.assert_array_equal(saved['labels'], np.arange(20) % 10)  # Every class in turn.
  grid = np.asarray(Image.open(path.replace('.npz', '_classes.png')))
  # One row per class (10), two samples each; tiles of 16 + 2 padding, upscaled 7x (to 112).
  assert grid.shape == (7 * (10 * 18 + 2), 7 * (2 * 18 + 2))


def test_the_sampler_guides_with_the_scale_it_is_given(trained_conditional):
  config, workdir = trained_conditional
  im = inference.load_inference_model(config, workdir)
  rng = np.random.default_rng(0)
  # Perturbed, so the class embedding and every branch move the output.
  params = jax.tree.map(
    lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), im.ema_params
  )
  shape = (4,) + im.image_shape
  sample_fn = inference.make_sample_fn(
    im.model, im.diffusion, config, shape, sampler='ddim', num_steps=5, mesh=im.mesh
  )
  labels, key = np.array([1, 7, 3, 3], np.int32), jax.random.key(3)
  guided = sampling.guided_model_fn(
    inference.make_model_fn(im.model, params), labels, 3.0, null_label=10
  )
  direct = jax.jit(
    lambda k: sampling.ddim_sample_loop(im.diffusion, guided, shape, k, num_steps=5, eta=0.0)
  )(key)
  np.testing.assert_allclose(sample_fn(params, key, labels, 3.0), direct, atol=1e-5)
  assert np.abs(np.asarray(sample_fn(params, key, labels, 0.0)) - np.asarray(direct)).max() > 1e-2
  with pytest.raises(ValueError, match=r'classes in \[0, 10\)'):
    sample_fn(params, key, np.array([1, 7, 3, 10], np.int32), 3.0)
  with pytest.raises(ValueError, match='guidance_scale must be a finite number >= 0'):
    sample_fn(params, key, labels, -1.0)


def test_sampler_quality_samples_a_conditional_model_as_mode_sample_does(
  trained_conditional, tmp_path
):
  """Guided rows: the classes in turn at the configured scale, the draws of --mode=sample."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import sampler_quality  # pylint: disable=g-import-not-at-top

  config, workdir = trained_conditional
  workdir = _copy_workdir(workdir, tmp_path)
  out = str(tmp_path / 'quality')
  results = sampler_quality.run(config, workdir, ['edm9'], 10, 5, out)
  (row,) = results['rows']
  assert row['model_calls'] == 9 and row['compile_seconds'] > 0
  assert results['guidance_scale'] == 2.0 and results['network_evaluations_per_call'] == 2
  drawn = np.load(os.path.join(out, 'edm9', 'batch_00000.npz'))['images']
  config = config.copy_and_resolve_references()
  config.sampling.sampler, config.sampling.num_steps = 'edm', 5
  im = inference.load_inference_model(config, workdir)
  np.testing.assert_array_equal(
    drawn, inference.generate_samples(config, im, len(drawn), str(tmp_path / 'direct'))
  )


def test_a_conditional_checkpoint_sampled_with_an_unconditional_config_is_a_clear_error(
  trained_conditional,
):
  config, workdir = trained_conditional
  config = config.copy_and_resolve_references()
  # The unconditional config of the same network: refused, saying what the checkpoint needs.
  config.model.num_classes = 0
  config.sampling.guidance_scale = config.sampling.class_labels = None
  with pytest.raises(
    train.TrainingError, match=r'class-conditional \(10 classes\): use its config'
  ):
    sample.sample_and_save(config, workdir)


def test_conditional_eval_sweeps_guidance_scales(trained_conditional, tmp_path):
  config, workdir = trained_conditional
  workdir = _copy_workdir(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.eval.guidance_scales = (0.0, 2.0)
  results = evaluate.evaluate(config, workdir)
  assert results['bpd']['conditioned_on'].endswith('-log p(x | y)')
  assert np.isfinite(results['bpd']['total_bpd'])
  sweep = results['guidance_sweep']
  assert [row['guidance_scale'] for row in sweep['rows']] == [0.0, 2.0]
  for row in sweep['rows']:
    assert row['fd_vs_train'] > 0 and np.isfinite(row['fd_vs_test'])
    # A fraction of the 8 samples.
    assert 0.0 <= row['class_accuracy'] <= 1.0 and (8 * row['class_accuracy']).is_integer()
  assert os.path.exists(sweep['plot_png'])
  saved = json.load(open(os.path.join(workdir, 'eval', f'step_{results["step"]}.json')))
  assert saved['guidance_sweep']['rows'] == sweep['rows']
