"""Config checks: every problem listed with the valid choices, before any work."""

import json

import pytest

from configs import tiny
from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import errors
from ddpm_jax import sampler_table


def _problems(**overrides):
  config = tiny.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split('__')
    config[section][field] = value
  return _problems_of(config)


def _problems_of(config):
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(config)
  return str(err.value)


def test_the_defaults_are_valid():
  config_validation.validate(tiny.get_config())


@pytest.mark.parametrize('sampler', sorted(sampler_table.SAMPLERS))
def test_every_sampler_is_accepted(sampler):
  config = tiny.get_config()
  config.sampling.sampler = sampler
  if sampler == 'distilled':  # A student's steps; training's grids have no student.
    config.sampling.num_steps = config.distill.teacher_steps // 2
  else:
    config.sampling.grid_sampler = sampler
  config_validation.validate(config)


def test_the_distilled_sampler_needs_a_students_steps_and_no_guidance_sweep():
  config = tiny.get_config()
  config.sampling.sampler = config.sampling.grid_sampler = 'distilled'
  config.sampling.num_steps = 3
  config.model.num_classes = 10
  config.eval.guidance_scales = (1.0, 2.0)
  message = _problems_of(config)
  assert "sampling.grid_sampler='distilled' samples a student" in message
  assert (
    "sampling.num_steps=3 is not a student's step count with distill.teacher_steps=16" in message
  )
  assert 'eval.guidance_scales sweeps the guidance scale' in message
  config = tiny.get_config()
  config.sampling.sampler, config.sampling.num_steps = 'distilled', 16
  assert 'the students take from 8 down to distill.num_steps=1 steps' in _problems_of(config)


def test_distill_problems_name_each_field():
  config = tiny.get_config()
  config.distill.update(teacher_steps=12, num_steps=4, steps_per_round=0, warmup_steps=5)
  config.distill.ema_decay = 1.0
  problems = '\n'.join(config_validation.distill_problems(config, num_devices=3))
  assert 'distill.teacher_steps=12 and distill.num_steps=4' in problems
  assert 'distill.steps_per_round must be > 0, got 0' in problems
  assert 'distill.batch_size=64 does not divide by the 3 devices' in problems
  assert 'distill.ema_decay must be in [0, 1), got 1.0' in problems
  assert config_validation.distill_problems(tiny.get_config()) == []


def test_bad_choices_name_the_valid_ones_all_at_once():
  message = _problems(
    sampling__sampler='euler',
    sampling__solver_order=4,
    model__layers='bogus',
    sampling__ddim_skip='log',
    sampling__pc_snr=-1.0,
  )
  assert (
    "sampling.sampler: Unknown sampler 'euler'; valid choices: ddpm (all T ancestral steps "
    '(the paper)); respaced (K ancestral steps of a respaced process); ddim (K DDIM steps); '
    'pc (T ancestral steps, each after Langevin corrector steps); dpm_solver (K steps of '
    "DPM-Solver++); unipc (K steps of UniPC); edm (N Heun steps of EDM's sampler, 2N - 1 model "
    'calls); distilled (N DDIM steps of the student distilled to take them (--mode=distill), N '
    'model calls).' in message
  )
  assert (
    'sampling.solver_order, sampling.dynamic_threshold, sampling.solver_final_sigma: '
    'order must be one of (1, 2, 3), got 4.' in message
  )
  assert "model.layers='bogus' is not one of: auto, reference, fast." in message
  assert (
    "sampling.ddim_eta, sampling.ddim_skip: Unknown skip 'log'; valid choices: uniform, quad."
    in message
  )
  assert 'sampling.pc_corrector_steps, sampling.pc_snr: snr must be a finite number >= 0' in message


def _edm_config(**overrides):
  """The tiny config as an EDM model (every sampler 'edm'), with `section__field` overrides."""
  config = tiny.get_config()
  config.diffusion.kind = 'edm'
  config.sampling.sampler = config.sampling.grid_sampler = 'edm'
  for dotted, value in overrides.items():
    section, field = dotted.split('__')
    config[section][field] = value
  return config


def test_an_edm_model_validates_and_takes_heun_steps_beyond_T():
  config_validation.validate(_edm_config(sampling__num_steps=500))


def test_an_unknown_kind_names_the_valid_ones():
  assert "diffusion.kind='vp' is not one of: ddpm, edm." in _problems(diffusion__kind='vp')


def test_edm_refuses_ddpm_only_settings_naming_each_field():
  config = _edm_config(
    diffusion__loss_type='hybrid',
    diffusion__model_var_type='learned_range',
    diffusion__min_snr_gamma=5.0,
    diffusion__model_mean_type='v',
  )
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(config)
  message = str(err.value)
  why = "diffusion.kind='edm' trains EDM's preconditioned denoiser with its own loss"
  assert f"diffusion.loss_type='hybrid' is a DDPM objective; {why}: leave it at 'mse'." in message
  assert f"diffusion.model_mean_type='v' is a DDPM output; {why}: leave it at 'eps'." in message
  assert f"diffusion.min_snr_gamma=5.0 is DDPM's loss weighting; {why}" in message
  assert "diffusion.model_var_type='learned_range' learns DDPM's reverse variances" in message


def test_an_edm_model_takes_only_the_edm_sampler():
  config = _edm_config(sampling__sampler='dpm_solver', sampling__grid_sampler='respaced')
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(config)
  for field, name in (('sampler', 'dpm_solver'), ('grid_sampler', 'respaced')):
    assert (
      f"sampling.{field}: Sampler {name!r} does not sample a diffusion.kind='edm' model; the "
      'samplers that do: edm, distilled.' in str(err.value)
    )


def test_edm_fields_are_checked():
  message = _problems(
    edm__sigma_min=80.0,
    edm__sigma_data=0.0,
    sampling__edm_S_churn=-1.0,
    optim__ema_halflife_images=-5.0,
  )
  assert 'edm.sigma_data must be > 0, got 0.0.' in message
  assert 'edm.sigma_min=80.0 must be < edm.sigma_max=80.0 (the noise range).' in message
  assert 'sampling.edm_S_churn, sampling.edm_S_min, sampling.edm_S_max, sampling.edm_S_noise: ' in (
    message
  )
  assert 'optim.ema_halflife_images must be >= 0 (0: use optim.ema_decay), got -5.0.' in message


def test_solver_options_without_a_reason_are_refused():
  message = _problems(sampling__dynamic_threshold=1.5, sampling__sampler='unipc')
  assert 'dynamic_threshold must be a quantile in (0, 1], got 1.5.' in message
  assert "Unknown final_sigma 'max'" in _problems(sampling__solver_final_sigma='max')


def test_solver_steps_must_fit_the_process():
  message = _problems(sampling__sampler='unipc', sampling__num_steps=0)
  assert "Sampler 'unipc' needs 1 <= num_steps <= 100, got 0." in message


def test_the_learning_rate_decay_must_end_after_the_warm_up():
  message = _problems(optim__warmup_steps=100, optim__decay_steps=100, optim__final_lr_fraction=2)
  assert 'optim.decay_steps=100 must exceed optim.warmup_steps=100' in message
  assert 'optim.final_lr_fraction must be in [0, 1], got 2.' in message


def test_fid_fields_are_checked_naming_them():
  message = _problems(
    training__fid_every_steps=-1, eval__fid_reference_count=-5, eval__fid_reference_split=''
  )
  assert 'training.fid_every_steps must be >= 0 (0: never), got -1.' in message
  assert 'eval.fid_reference_count must be >= 0 (0: the whole split), got -5.' in message
  assert 'eval.fid_reference_split must name a split' in message
  message = _problems(
    training__steps_per_call=2, training__fid_every_steps=3, training__fid_num_samples=1
  )
  assert 'training.fid_every_steps=3 must be a multiple of training.steps_per_call=2.' in message
  assert 'training.fid_num_samples must be >= 2 (FID needs a covariance), got 1.' in message
  config = tiny.get_config()
  config.training.fid_every_steps, config.training.fid_num_samples = 2, 6
  with pytest.raises(config_validation.ConfigError, match='fid_num_samples=6 does not divide'):
    config_validation.validate(config, num_devices=4)
  config.training.fid_every_steps = 0  # Off: the sample count is not read.
  config_validation.validate(config, num_devices=4)


def test_errors_are_one_family_under_every_name():
  assert config_validation.ConfigError is errors.ConfigError
  assert checkpointing.CheckpointError is errors.CheckpointError


def test_resume_check_ignores_the_layer_set_but_not_the_network():
  config = tiny.get_config()
  saved = json.loads(config.to_json_best_effort())
  saved['model']['layers'] = 'reference'
  checkpointing.check_resume_compatible(saved, config, 'DIR')  # Same parameters: fine.
  del saved['model']['layers']  # A checkpoint from before the field existed.
  checkpointing.check_resume_compatible(saved, config, 'DIR')
  saved['model']['ch'] = 64
  with pytest.raises(errors.TrainingError, match='model.ch: checkpoint has 64, config has 32'):
    checkpointing.check_resume_compatible(saved, config, 'DIR')


def test_resume_check_holds_an_edm_model_to_its_sigma_data_only():
  config = tiny.get_config()
  config.diffusion.kind = 'edm'
  saved = json.loads(config.to_json_best_effort())
  saved['edm']['P_mean'], saved['edm']['sigma_max'] = 0.0, 40.0  # The draw and the range may move.
  checkpointing.check_resume_compatible(saved, config, 'DIR')
  saved['edm']['sigma_data'] = 1.0
  with pytest.raises(errors.TrainingError, match='edm.sigma_data: checkpoint has 1.0, config has'):
    checkpointing.check_resume_compatible(saved, config, 'DIR')
  saved['diffusion']['kind'] = 'ddpm'
  with pytest.raises(errors.TrainingError, match="diffusion.kind: checkpoint has 'ddpm'"):
    checkpointing.check_resume_compatible(saved, config, 'DIR')


def test_guidance_and_labels_on_an_unconditional_model_are_config_errors():
  message = _problems(
    sampling__guidance_scale=3.0, sampling__class_labels='all', eval__guidance_scales=(1.0,)
  )
  for name in (
    'sampling.guidance_scale=3.0',
    "sampling.class_labels='all'",
    'eval.guidance_scales',
  ):
    assert f'{name}' in message
  assert message.count('needs a class-conditional model, but model.num_classes=0') == 3


def test_conditional_fields_are_checked():
  message = _problems(
    model__num_classes=10,
    model__class_dropout=1.5,
    sampling__guidance_scale=-1.0,
    sampling__class_labels='0,12',
    eval__guidance_scales=(0.0, float('nan')),
  )
  assert 'model.class_dropout must be in [0, 1], got 1.5.' in message
  assert 'sampling.guidance_scale: guidance_scale must be a finite number >= 0' in message
  assert 'eval.guidance_scales: guidance_scale must be a finite number >= 0' in message
  assert 'sampling.class_labels: class labels [12] are not classes in [0, 10).' in message
  assert 'num_classes must be >= 0' in _problems(model__num_classes=-1)


def test_validation_resolves_a_conditional_models_unset_scale_and_labels_once():
  config = tiny.get_config()
  config.model.num_classes = 10
  config_validation.validate(config)
  assert (config.sampling.guidance_scale, config.sampling.class_labels) == (1.0, 'all')
  config.sampling.guidance_scale, config.sampling.class_labels = 2.5, '3, 5'
  config_validation.validate(config)  # Set values stay as they are.
  assert (config.sampling.guidance_scale, config.sampling.class_labels) == (2.5, '3, 5')
  plain = tiny.get_config()
  config_validation.validate(plain)  # An unconditional model gets nothing.
  assert (plain.sampling.guidance_scale, plain.sampling.class_labels) == (None, None)
  config.sampling.class_labels = ' '
  with pytest.raises(config_validation.ConfigError, match="use 'all' or class indices"):
    config_validation.validate(config)


def test_the_default_and_its_unconditional_twin_differ_only_in_conditioning():
  from configs import fashion_mnist, fashion_mnist_uncond  # pylint: disable=g-import-not-at-top

  cond, plain = fashion_mnist.get_config(), fashion_mnist_uncond.get_config()
  config_validation.validate(cond)
  config_validation.validate(plain)
  assert cond.model.num_classes == 10 and cond.sampling.class_labels == 'all'
  assert plain.model.num_classes == 0 and plain.sampling.guidance_scale is None
  for section in ('data', 'diffusion', 'optim'):
    assert cond[section].to_dict() == plain[section].to_dict()
  # The grid: one row of 8 per class, or 8 x 8 without classes.
  assert (cond.training.num_sample_images, plain.training.num_sample_images) == (80, 64)


def test_checkpoints_from_before_conditioning_resume_and_conditional_ones_need_their_config():
  config = tiny.get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved['model']['num_classes'], saved['model']['class_dropout']  # An older checkpoint.
  checkpointing.check_resume_compatible(saved, config, 'DIR')
  saved['model']['num_classes'] = 10  # A conditional checkpoint, the unconditional config.
  with pytest.raises(
    errors.TrainingError, match=r'class-conditional \(10 classes\): use its config'
  ):
    checkpointing.check_resume_compatible(saved, config, 'DIR')
