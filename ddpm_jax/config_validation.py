"""Cross-field checks of an experiment config, run before any expensive work.

Type errors and typos in overrides are already caught by ml_collections
(configs are locked); this catches values that are well typed but cannot
work together, and says which choices are valid.
"""

import ml_collections

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import distillation
from ddpm_jax import errors
from ddpm_jax import guidance
from ddpm_jax import input_pipeline
from ddpm_jax import losses
from ddpm_jax import metrics
from ddpm_jax import models
from ddpm_jax import ode_likelihood
from ddpm_jax import sampler_table
from ddpm_jax import schedules
from ddpm_jax.models import layers

ConfigError = errors.ConfigError


def _choice(problems: list[str], name: str, value, choices) -> None:
  if value not in choices:
    problems.append(f'{name}={value!r} is not one of: {", ".join(map(str, choices))}.')


def _positive(problems: list[str], name: str, value) -> None:
  if not value > 0:
    problems.append(f'{name} must be > 0, got {value!r}.')


def _check_conditioning(problems: list[str], config: ml_collections.ConfigDict) -> None:
  """Class-conditional fields: on an unconditional model none may be set."""
  num_classes, smp = config.model.get('num_classes', 0), config.sampling
  scales = tuple(config.eval.get('guidance_scales', ()))
  if num_classes < 0:
    problems.append(f'model.num_classes must be >= 0 (0: unconditional), got {num_classes}.')
    return
  if num_classes == 0:
    for name, value in (
      ('sampling.guidance_scale', smp.guidance_scale),
      ('sampling.class_labels', smp.class_labels),
      ('eval.guidance_scales', scales or None),
    ):
      if value is not None:
        problems.append(
          f'{name}={value!r} needs a class-conditional model, but model.num_classes=0 '
          '(unconditional); set model.num_classes to the number of classes, or leave '
          f'{name} unset.'
        )
    return
  if not 0.0 <= config.model.class_dropout <= 1.0:
    problems.append(f'model.class_dropout must be in [0, 1], got {config.model.class_dropout}.')
  for name, values in (
    ('sampling.guidance_scale', () if smp.guidance_scale is None else (smp.guidance_scale,)),
    ('eval.guidance_scales', scales),
  ):
    for value in values:
      try:
        guidance.check_guidance_scale(value)
      except ValueError as e:
        problems.append(f'{name}: {e}')
  if smp.class_labels is not None:
    try:
      guidance.parse_class_labels(smp.class_labels, num_classes)
    except ValueError as e:
      problems.append(f'sampling.class_labels: {e}')


def _check_edm(problems: list[str], config: ml_collections.ConfigDict) -> None:
  """The `edm` block, and a kind='edm' model's DDPM-only settings, which it cannot use."""
  dc, edm = config.diffusion, config.edm
  for name in ('sigma_data', 'P_std', 'sigma_min', 'sigma_max', 'rho'):
    _positive(problems, f'edm.{name}', edm[name])
  if 0 < edm.sigma_min and not edm.sigma_min < edm.sigma_max:
    problems.append(
      f'edm.sigma_min={edm.sigma_min} must be < edm.sigma_max={edm.sigma_max} (the noise range).'
    )
  if dc.kind != 'edm':
    return
  why = "diffusion.kind='edm' trains EDM's preconditioned denoiser with its own loss"
  defaults = (
    ('loss_type', 'mse', 'a DDPM objective'),
    ('model_mean_type', 'eps', 'a DDPM output'),
    ('min_snr_gamma', 0.0, "DDPM's loss weighting"),
  )
  for field, default, what in defaults:
    if dc[field] != default:
      problems.append(f'diffusion.{field}={dc[field]!r} is {what}; {why}: leave it at {default!r}.')
  if dc.model_var_type in ('learned', 'learned_range'):
    problems.append(
      f"diffusion.model_var_type={dc.model_var_type!r} learns DDPM's reverse variances; {why} "
      "and samples by an ODE: use 'fixedlarge'."
    )


def _check_distilled_sampling(problems: list[str], config: ml_collections.ConfigDict) -> None:
  """The 'distilled' sampler: a student's step count, and no guidance other than its own."""
  smp = config.sampling
  if smp.grid_sampler == 'distilled':
    problems.append(
      "sampling.grid_sampler='distilled' samples a student, which training does not have yet; "
      "the grids of --mode=distill come from each round's student."
    )
  if smp.sampler != 'distilled' or 'distill' not in config:
    return
  teacher_steps = config.distill.teacher_steps
  try:
    distillation.num_rounds(teacher_steps, smp.num_steps)
  except ValueError:
    problems.append(
      f"sampling.num_steps={smp.num_steps} is not a student's step count with "
      f'distill.teacher_steps={teacher_steps}: a student takes teacher_steps / 2^k steps '
      f'(k >= 1), down to distill.num_steps={config.distill.num_steps}.'
    )
  else:
    if not config.distill.num_steps <= smp.num_steps < teacher_steps:
      problems.append(
        f'sampling.num_steps={smp.num_steps}: the students take from '
        f'{teacher_steps // 2} down to distill.num_steps={config.distill.num_steps} steps.'
      )
  if tuple(config.eval.get('guidance_scales', ())):
    problems.append(
      "eval.guidance_scales sweeps the guidance scale, which a 'distilled' student has built in "
      '(the teacher was guided at sampling.guidance_scale): leave it empty.'
    )


def distill_problems(config: ml_collections.ConfigDict, num_devices: int = 1) -> list[str]:
  """What keeps `--mode=distill` from running the config's `distill` block, one line each."""
  problems: list[str] = []
  dc = config.distill
  try:
    distillation.num_rounds(dc.teacher_steps, dc.num_steps)
  except ValueError as e:
    problems.append(
      f'distill.teacher_steps={dc.teacher_steps} and distill.num_steps={dc.num_steps}: {e} '
      '(each round halves the steps).'
    )
  if config.diffusion.get('kind', 'ddpm') == 'ddpm':
    if dc.teacher_steps > config.diffusion.num_timesteps:
      problems.append(
        f"distill.teacher_steps={dc.teacher_steps} exceeds the process's "
        f'{config.diffusion.num_timesteps} timesteps (the DDIM teacher steps through them).'
      )
    if config.diffusion.model_mean_type == 'xprev':
      problems.append(
        "diffusion.model_mean_type='xprev' predicts one ancestral step, not x_0: a DDIM "
        'teacher needs an eps, x0 or v model.'
      )
  for name in ('steps_per_round', 'batch_size', 'learning_rate', 'log_every_steps'):
    _positive(problems, f'distill.{name}', dc[name])
  _positive(problems, 'distill.checkpoint_every_steps', dc.checkpoint_every_steps)
  if dc.batch_size > 0 and dc.batch_size % num_devices:
    problems.append(
      f'distill.batch_size={dc.batch_size} does not divide by the {num_devices} devices.'
    )
  if not 0 <= dc.warmup_steps < dc.steps_per_round:
    problems.append(
      f'distill.warmup_steps={dc.warmup_steps} must be in [0, distill.steps_per_round='
      f'{dc.steps_per_round}) (each round warms up, then decays).'
    )
  if not 0.0 <= dc.ema_decay < 1.0:
    problems.append(f'distill.ema_decay must be in [0, 1), got {dc.ema_decay}.')
  k = config.training.steps_per_call
  for name in ('steps_per_round', 'log_every_steps', 'checkpoint_every_steps'):
    if k > 0 and dc[name] > 0 and dc[name] % k:
      problems.append(
        f'distill.{name}={dc[name]} must be a multiple of training.steps_per_call={k}.'
      )
  if config.model.get('num_classes', 0) and config.sampling.guidance_scale is None:
    problems.append(
      'sampling.guidance_scale is unset: a class-conditional teacher is distilled guided at '
      'that scale.'
    )
  return problems


def _check_fid(problems: list[str], config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Inception FID's fields: in training (training.fid_*) and in evaluation (eval.*)."""
  training, ec = config.training, config.eval
  if training.fid_every_steps < 0:
    problems.append(
      f'training.fid_every_steps must be >= 0 (0: never), got {training.fid_every_steps}.'
    )
  if training.fid_every_steps > 0:
    n = training.fid_num_samples
    if n < 2:
      problems.append(f'training.fid_num_samples must be >= 2 (FID needs a covariance), got {n}.')
    elif n % num_devices:
      problems.append(
        f'training.fid_num_samples={n} does not divide by the {num_devices} devices; use a '
        f'multiple of {num_devices}.'
      )
  if ec.fid_reference_count < 0:
    problems.append(
      f'eval.fid_reference_count must be >= 0 (0: the whole split), got {ec.fid_reference_count}.'
    )
  if not ec.fid_reference_split:
    problems.append("eval.fid_reference_split must name a split, e.g. 'train'.")


def _check_ode(problems: list[str], config: ml_collections.ConfigDict) -> None:
  """The probability-flow ODE likelihood's fields (eval.ode_*)."""
  ec = config.eval
  _choice(problems, 'eval.ode_solver', ec.ode_solver, ode_likelihood.SOLVERS)
  _choice(problems, 'eval.ode_divergence', ec.ode_divergence, ode_likelihood.DIVERGENCES)
  for name in ('ode_num_steps', 'ode_num_probes', 'ode_tolerance'):
    _positive(problems, f'eval.{name}', ec[name])


def _resolve_conditioning(config: ml_collections.ConfigDict) -> None:
  """Fills a class-conditional model's unset sampling fields, so every reader gets one value."""
  if config.model.get('num_classes', 0) > 0:
    smp = config.sampling
    if smp.guidance_scale is None:
      smp.guidance_scale = 1.0  # The plain conditional model.
    if smp.class_labels is None:
      smp.class_labels = 'all'


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError listing every problem of `config`; resolves its defaults if fine.

  A valid class-conditional config gets its unset `sampling.guidance_scale`
  (1: the conditional model, unguided) and `sampling.class_labels` ('all')
  filled in, here and nowhere else.

  Args:
    config: the experiment config; changed only by that resolution.
    num_devices: devices the global batch will be split over.
  """
  problems: list[str] = []
  data, model, dc = config.data, config.model, config.diffusion
  optim, training, smp = config.optim, config.training, config.sampling

  try:
    # Finds the builder without preparing it: an unknown name fails in
    # milliseconds, before any data is read.
    input_pipeline.get_builder(data, prepare=False)
  except ValueError as e:
    problems.append(f'data.dataset: {e}')
  _choice(problems, 'data.resize_method', data.resize_method, input_pipeline.RESIZE_METHODS)
  _choice(problems, 'data.num_channels', data.num_channels, (1, 3))
  _positive(problems, 'data.image_size', data.image_size)

  _choice(problems, 'model.layers', model.get('layers', 'auto'), layers.LAYER_CHOICES)
  _choice(problems, 'model.dtype', model.dtype, tuple(models.DTYPES))
  _positive(problems, 'model.ch', model.ch)
  _positive(problems, 'model.num_res_blocks', model.num_res_blocks)
  if not 0.0 <= model.dropout < 1.0:
    problems.append(f'model.dropout must be in [0, 1), got {model.dropout}.')
  if not model.ch_mult:
    problems.append('model.ch_mult must name at least one level.')
  else:
    for mult in model.ch_mult:
      if (model.ch * mult) % layers.NUM_GROUPS:
        problems.append(
          f'model.ch * ch_mult = {model.ch * mult} channels do not divide into '
          f'the {layers.NUM_GROUPS} GroupNorm groups; use multiples of '
          f'{layers.NUM_GROUPS}.'
        )
        break
    factor = 2 ** (len(model.ch_mult) - 1)
    if data.image_size % factor:
      problems.append(
        f'data.image_size={data.image_size} does not divide by {factor}, which '
        f'the {len(model.ch_mult)}-level U-Net (model.ch_mult={tuple(model.ch_mult)}) '
        'needs for its downsampling; change one of them.'
      )
    resolutions = [data.image_size // 2**i for i in range(len(model.ch_mult))]
    for r in model.attn_resolutions:
      if r not in resolutions:
        problems.append(
          f'model.attn_resolutions has {r}, but the U-Net only has the resolutions {resolutions}.'
        )

  kind = dc.get('kind', 'ddpm')
  _choice(problems, 'diffusion.kind', kind, sampler_table.KINDS)
  if kind in sampler_table.KINDS:
    _check_edm(problems, config)
  _choice(problems, 'diffusion.beta_schedule', dc.beta_schedule, schedules.BETA_SCHEDULES)
  _choice(problems, 'diffusion.model_mean_type', dc.model_mean_type, diffusion_lib.MODEL_MEAN_TYPES)
  _choice(problems, 'diffusion.model_var_type', dc.model_var_type, diffusion_lib.MODEL_VAR_TYPES)
  _choice(problems, 'diffusion.loss_type', dc.loss_type, losses.LOSS_TYPES)
  _positive(problems, 'diffusion.num_timesteps', dc.num_timesteps)
  if dc.loss_type == 'hybrid' and dc.model_var_type not in ('learned', 'learned_range'):
    problems.append(
      "diffusion.loss_type='hybrid' needs model_var_type 'learned' or "
      f"'learned_range', got {dc.model_var_type!r}."
    )
  if dc.beta_schedule in schedules.RANGE_SCHEDULES and not (0 < dc.beta_start <= dc.beta_end < 1):
    problems.append(
      'diffusion.beta_start/beta_end must satisfy 0 < start <= end < 1, got '
      f'{dc.beta_start}, {dc.beta_end}.'
    )

  _positive(problems, 'optim.learning_rate', optim.learning_rate)
  if optim.decay_steps and optim.decay_steps <= max(optim.warmup_steps, 0):
    problems.append(
      f'optim.decay_steps={optim.decay_steps} must exceed optim.warmup_steps={optim.warmup_steps} '
      '(the decay starts when the warm-up ends), or be 0 for a constant rate.'
    )
  if not 0.0 <= optim.final_lr_fraction <= 1.0:
    problems.append(f'optim.final_lr_fraction must be in [0, 1], got {optim.final_lr_fraction}.')
  if not 0.0 <= optim.ema_decay < 1.0:
    problems.append(f'optim.ema_decay must be in [0, 1), got {optim.ema_decay}.')
  if not optim.get('ema_halflife_images', 0.0) >= 0:
    problems.append(
      f'optim.ema_halflife_images must be >= 0 (0: use optim.ema_decay), got '
      f'{optim.ema_halflife_images}.'
    )

  _positive(problems, 'training.batch_size', training.batch_size)
  if training.batch_size > 0 and training.batch_size % num_devices:
    problems.append(
      f'training.batch_size={training.batch_size} does not divide by the '
      f'{num_devices} devices; use a multiple of {num_devices}.'
    )
  _positive(problems, 'training.num_train_steps', training.num_train_steps)
  _positive(problems, 'training.steps_per_call', training.steps_per_call)
  _positive(problems, 'training.log_every_steps', training.log_every_steps)
  _positive(problems, 'training.checkpoint_every_steps', training.checkpoint_every_steps)
  for name in (
    'log_every_steps',
    'checkpoint_every_steps',
    'sample_every_steps',
    'fid_every_steps',
  ):
    every = training[name]
    if every > 0 and training.steps_per_call > 0 and every % training.steps_per_call:
      problems.append(
        f'training.{name}={every} must be a multiple of '
        f'training.steps_per_call={training.steps_per_call}.'
      )
  if training.sample_every_steps > 0 and training.num_sample_images % num_devices:
    problems.append(
      f'training.num_sample_images={training.num_sample_images} does not divide '
      f'by the {num_devices} devices.'
    )
  _check_fid(problems, config, num_devices)

  for sampler_field, steps_field in (('sampler', 'num_steps'), ('grid_sampler', 'grid_num_steps')):
    try:
      sampler_table.check(
        smp[sampler_field],
        smp[steps_field],
        dc.num_timesteps,
        kind if kind in sampler_table.KINDS else 'ddpm',
      )
    except ValueError as e:
      problems.append(f'sampling.{sampler_field}: {e}')
  problems.extend(sampler_table.field_problems(smp))
  if smp.batch_size % num_devices:
    problems.append(
      f'sampling.batch_size={smp.batch_size} does not divide by the {num_devices} devices.'
    )
  _choice(
    problems, 'eval.feature_extractor', config.eval.feature_extractor, metrics.FEATURE_EXTRACTORS
  )
  _check_conditioning(problems, config)
  _check_ode(problems, config)
  _check_distilled_sampling(problems, config)

  if problems:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))
  _resolve_conditioning(config)
