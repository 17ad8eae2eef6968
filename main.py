"""ddpm-jax entry point: train, sample, evaluate or distil a diffusion model.

    python main.py --config=configs/fashion_mnist.py --workdir=runs/fmnist
    python main.py --config=configs/cifar10.py --workdir=DIR --mode=sample
    python main.py --config=configs/cifar10.py --workdir=DIR --mode=eval
    python main.py --config=configs/cifar10.py --workdir=DIR --mode=distill

Config fields can be overridden on the command line, e.g.
`--config.training.batch_size=64`; the config is locked, so a misspelt field
is an error rather than a silently ignored flag.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ('train', 'sample', 'eval', 'distill')

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (configs/*.py).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported after flag parsing, so `--help` answers without starting JAX or TF.
  # pylint: disable=g-import-not-at-top
  from ddpm_jax import runtime

  runtime.setup(_WORKDIR.value)  # May re-execute this process once (huge pages).
  config = _CONFIG.value
  logging.info('Config:\n%s', config)
  if _MODE.value == 'train':
    from ddpm_jax import train

    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == 'sample':
    from ddpm_jax import sample

    sample.sample_and_save(config, _WORKDIR.value)
  elif _MODE.value == 'eval':
    from ddpm_jax import evaluate

    evaluate.evaluate(config, _WORKDIR.value)
  else:
    from ddpm_jax import distill

    distill.distill(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
