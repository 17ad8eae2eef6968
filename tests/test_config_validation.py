"""Config checks: every problem listed with the valid choices, before any work."""

import json

import pytest

from configs import tiny
from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import errors


def _problems(**overrides):
  config = tiny.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split('__')
    config[section][field] = value
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(config)
  return str(err.value)


def test_the_defaults_are_valid():
  config_validation.validate(tiny.get_config())


@pytest.mark.parametrize('sampler', ['ddpm', 'respaced', 'ddim', 'dpm_solver', 'unipc'])
def test_every_sampler_is_accepted(sampler):
  config = tiny.get_config()
  config.sampling.sampler = sampler
  config.sampling.grid_sampler = sampler
  config_validation.validate(config)


def test_bad_choices_name_the_valid_ones_all_at_once():
  message = _problems(
    sampling__sampler='euler',
    sampling__solver_order=4,
    model__layers='bogus',
    sampling__ddim_skip='log',
  )
  assert (
    "sampling.sampler: Unknown sampler 'euler'; valid choices: ddpm, respaced, ddim, "
    'dpm_solver, unipc.' in message
  )
  assert 'sampling.solver_order=4 is not one of: 1, 2, 3.' in message
  assert "model.layers='bogus' is not one of: auto, reference, fast." in message
  assert "sampling.ddim_skip='log' is not one of: uniform, quad." in message


def test_solver_steps_must_fit_the_process():
  message = _problems(sampling__sampler='unipc', sampling__num_steps=0)
  assert "Sampler 'unipc' needs 1 <= num_steps <= 100, got 0." in message


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
