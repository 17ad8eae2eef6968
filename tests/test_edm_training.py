"""diffusion.kind='edm' in the trainer and the samplers: the loss, the EMA half-life, resume, 'edm'.

The step is checked against EDM's objective written out by hand, the 'edm'
sampler (through `inference`, guided) against `edm.sample` on the hand-built
guided denoiser, and the real trainer, preempted in-process and killed in a subprocess,
against an uninterrupted run, bit for bit, as the DDPM trainer is in
tests/test_reliability.py.
"""

import contextlib
import logging
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trainer_harness as th
from configs import cifar10_edm
from configs import tiny
from ddpm_jax import config_validation
from ddpm_jax import edm
from ddpm_jax import evaluate
from ddpm_jax import inference
from ddpm_jax import input_pipeline
from ddpm_jax import sample
from ddpm_jax import streams
from ddpm_jax import train
from ddpm_jax import train_state as ts

NUM_CLASSES = 10
EDM_FLAGS = [
  '--config.diffusion.kind=edm',
  '--config.sampling.sampler=edm',
  '--config.sampling.grid_sampler=edm',
  '--config.optim.ema_halflife_images=64',
]


# A one-level 8x8 U-Net: its training step compiles in a third of the tiny config's time.
MICRO_FLAGS = [
  '--config.data.image_size=8',
  '--config.model.ch_mult=(1,)',
  '--config.model.attn_resolutions=()',
]


def _as_edm(config):
  """`config` as an EDM model on the one-level U-Net, as EDM_FLAGS and MICRO_FLAGS make it."""
  config.diffusion.kind = 'edm'
  config.sampling.sampler = config.sampling.grid_sampler = 'edm'
  config.optim.ema_halflife_images = 64.0
  config.data.image_size = 8
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  return config


def _micro_config(kind):
  """The conditional one-level U-Net of MICRO_FLAGS, of `kind`, sampled by 'edm' in 2 steps."""
  config = _as_edm(tiny.get_config())
  config.model.num_classes = NUM_CLASSES
  config.diffusion.kind = kind
  config.sampling.num_steps = 2
  config_validation.validate(config)
  return config


def _perturbed_params(model, config, image_shape):
  """Initial parameters plus noise, so every branch (and the class embedding) moves the output."""
  params = ts.create_train_state(model, config, jax.random.key(0), image_shape).params
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)


def test_the_cifar10_edm_config_validates_on_the_papers_network():
  config = cifar10_edm.get_config()
  config_validation.validate(config)
  model, _, image_shape = inference.build_model_and_diffusion(config)
  state = jax.eval_shape(
    lambda key: ts.create_train_state(model, config, key, image_shape), jax.random.key(0)
  )
  assert sum(leaf.size for leaf in jax.tree.leaves(state.params)) == 35_746_307
  assert config.optim.warmup_steps == 19_531 and config.training.num_train_steps == 390_625
  # 18 Heun steps: 35 model calls.
  assert (config.sampling.sampler, config.sampling.num_steps) == ('edm', 18)


def test_the_ema_half_life_is_edms():
  optim = tiny.get_config().optim
  optim.ema_halflife_images = 500_000.0
  optim.ema_warmup = False
  step = jnp.asarray(100, jnp.int32)
  np.testing.assert_allclose(ts.ema_decay_at(step, optim, 512), 0.5 ** (512 / 500_000), rtol=1e-6)
  # EDM's ramp-up: the half-life is at most 5% of the images seen, so the first step copies.
  optim.ema_warmup = True
  assert float(ts.ema_decay_at(jnp.asarray(0), optim, 512)) == 0.0
  np.testing.assert_allclose(ts.ema_decay_at(step, optim, 512), 0.5 ** (1 / 5), rtol=1e-6)
  with pytest.raises(ValueError, match='needs the global batch size'):
    ts.ema_decay_at(step, optim)


def test_an_edm_step_minimises_edms_loss_at_log_normal_sigma():
  config = _micro_config('edm')
  model, d, image_shape = inference.build_model_and_diffusion(config)
  state = ts.create_train_state(model, config, jax.random.key(0), image_shape)
  state = state.replace(params=_perturbed_params(model, config, image_shape))
  data = np.random.default_rng(1)
  batch = {
    'image': jnp.asarray(data.uniform(-1, 1, (4,) + image_shape), jnp.float32),
    'label': jnp.asarray([0, 3, 3, 9], jnp.int32),
  }
  rng = jax.random.key(5)
  step = jax.jit(lambda s, r: ts.train_step(s, batch, r, diffusion=d, config=config))
  _, metrics = step(state, rng)

  # EDM's loss written as the network's regression target (Karras et al. 2022, Eq. 8).
  level_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(level_rng, (4,)))[:, None, None, None]
  noise = jax.random.normal(noise_rng, batch['image'].shape)
  label_rng = jax.random.fold_in(rng, int(streams.Stream.LABEL_DROPOUT))
  labels = ts.drop_labels(batch['label'], label_rng, config.model.class_dropout, NUM_CLASSES)
  x = batch['image'] + sigma * noise
  total = sigma**2 + 0.25
  c_in, c_skip, c_out = 1 / jnp.sqrt(total), 0.25 / total, sigma * 0.5 / jnp.sqrt(total)
  F = jax.jit(
    lambda params: model.apply(
      {'params': params},
      c_in * x,
      jnp.log(sigma[:, 0, 0, 0]) / 4,
      labels,
      train=True,
      rngs={'dropout': dropout_rng},
    )
  )(state.params)
  expected = jnp.mean(jnp.square(F - (batch['image'] - c_skip * x) / c_out))
  np.testing.assert_allclose(metrics['loss'], expected, rtol=2e-5)

  # The same sigma, noise and dropout every step: the loss falls.
  losses = []
  for _ in range(6):
    state, metrics = step(state, rng)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize('kind', ['ddpm', 'edm'])
def test_the_edm_sampler_guides_either_kind_of_model_through_inference(kind):
  config = _micro_config(kind)
  model, d, image_shape = inference.build_model_and_diffusion(config)
  params = _perturbed_params(model, config, image_shape)
  shape, key, scale = (2,) + image_shape, jax.random.key(3), 3.0
  labels = np.array([1, 7], np.int32)
  got = jax.jit(
    lambda p: inference.sample(
      model,
      p,
      d,
      config,
      shape,
      key,
      sampler='edm',
      num_steps=2,
      labels=labels,
      guidance_scale=scale,
    )
  )(params)

  def network(y):
    return lambda x, t: model.apply({'params': params}, x, t, jnp.asarray(y), train=False)

  null = np.full(2, NUM_CLASSES, np.int32)
  if kind == 'edm':
    cond, uncond = (edm.precondition(network(y), sigma_data=0.5) for y in (labels, null))
    sigma_min, sigma_max = 0.002, 80.0
  else:
    cond, uncond = (edm.denoiser_from_diffusion(d, network(y)) for y in (labels, null))
    # The process's own levels, sqrt((1 - a_t) / a_t), bound EDM's default range.
    levels = np.sqrt(1 / np.asarray(d.alphas_cumprod, np.float64) - 1)
    sigma_min, sigma_max = max(0.002, levels[0]), min(80.0, levels[-1])
    assert sigma_max < 80.0

  def guided(x, sigma):
    u = uncond(x, sigma)
    return u + scale * (cond(x, sigma) - u)

  want = jax.jit(
    lambda: edm.sample(
      guided, shape, key, num_steps=2, sigma_min=sigma_min, sigma_max=sigma_max, rho=7.0
    )
  )()
  # float32 round-off at the samples' scale (the guided batch is one doubled call, not two).
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  assert np.abs(np.asarray(got)).max() > 0


# ---------------------------------------------------------------------------
# The real trainer, interrupted.

# Four steps, a checkpoint at the end, every step logged.
CHAIN = dict(num_train_steps=4, checkpoint_every_steps=4, log_every_steps=1, sample_every_steps=0)


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """A class-conditional EDM run, uninterrupted; and one preempted, then killed, then finished.

  The preemption is in-process (the trainer's own SIGTERM handler), the kill a subprocess of
  tests/train_subprocess.py, as in tests/test_reliability.py.
  """
  root = tmp_path_factory.mktemp('edm_chain')
  data_dirs = th.make_data(str(root / 'data'))
  config = _as_edm(th.conditional(th.tiny_config(data_dirs, **CHAIN)))
  reference, workdir = str(root / 'reference'), str(root / 'interrupted')
  train.train_and_evaluate(config, reference)
  with pytest.MonkeyPatch.context() as patch, _log_records() as records:
    patch.setattr(
      input_pipeline, 'make_train_iterator', th.preempt_at(1, input_pipeline.make_train_iterator)
    )
    train.train_and_evaluate(config, workdir)
  preempted = (th.committed_steps(workdir), '\n'.join(records))
  flags = th.config_flags(data_dirs, **CHAIN) + th.CONDITIONAL_FLAGS + EDM_FLAGS + MICRO_FLAGS
  env = th.child_env(DDPM_TEST_SIGNAL_AT_STEP=f'{int(signal.SIGKILL)}:3')
  killed = th.run_trainer(workdir, flags, env=env)
  return config, reference, workdir, preempted, killed


@contextlib.contextmanager
def _log_records():
  """The messages logged (at INFO and up) inside the block."""
  records = []
  handler = logging.Handler(logging.INFO)
  handler.emit = lambda record: records.append(record.getMessage())
  root = logging.getLogger()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    yield records
  finally:
    root.removeHandler(handler)
    root.setLevel(level)


def test_sigterm_commits_an_edm_run_at_the_current_step(chain):
  _, _, _, (steps, log), killed = chain
  # Step 2 is no periodic checkpoint step: it was saved because of the signal.
  assert 'Preempted: committed the checkpoint of step 2' in log
  assert steps == [2]
  assert 'Resumed from step 2' in killed[1]


def test_a_killed_edm_run_restarted_equals_an_uninterrupted_one_bit_for_bit(chain, caplog):
  config, reference, workdir, _, (code, output) = chain
  assert code == -signal.SIGKILL, output[-5000:]
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  assert re.search(r'Resumed from step 2', caplog.text)
  th.assert_states_equal(th.restore(workdir, config), th.restore(reference, config))
  assert th.read_metrics(workdir) == th.read_metrics(reference)

  # --mode=sample on the EDM checkpoint: 'edm' with guidance, no DDPM figures.
  config = config.copy_and_resolve_references()
  config.sampling.num_samples = config.sampling.batch_size = 4
  config.sampling.figures = True
  path = sample.sample_and_save(config, workdir)
  assert os.path.basename(path).startswith('edm5_sigma0.002-80_rho7_guidance1_classes-all_step4')
  assert np.load(path)['images'].shape == (4, 8, 8, 1)
  assert not os.path.exists(path.replace('.npz', '_progressive.png'))

  # --mode=eval: no discrete bound, the ODE's bits/dim over [edm.sigma_min, edm.sigma_max].
  config.eval.ode_solver, config.eval.ode_num_steps = 'heun', 3
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluate, 'evaluate_sample_quality', lambda *args: {})
    patch.setattr(evaluate, 'evaluate_guidance_sweep', lambda *args: {})
    results = evaluate.evaluate(config, workdir)
  assert 'bpd' not in results
  ode = results['ode_bpd']
  assert ode['num_examples'] == config.eval.num_bpd_examples and ode['nfe'] == 6
  assert (ode['sigma_min'], ode['sigma_max']) == (config.edm.sigma_min, config.edm.sigma_max)
  assert np.isfinite(ode['bpd']) and ode['conditioned_on'].endswith('-log p(x | y)')
