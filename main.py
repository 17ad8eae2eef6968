"""ddpm-jax entry point: train, sample or evaluate a DDPM.

    python main.py --config=configs/fashion_mnist.py --workdir=runs/fmnist
    python main.py --config=configs/cifar10.py --workdir=DIR --mode=sample
    python main.py --config=configs/cifar10.py --workdir=DIR --mode=eval

Config fields can be overridden on the command line, e.g.
`--config.training.batch_size=64`; the config is locked, so a misspelt field
is an error rather than a silently ignored flag.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF is only the input pipeline here.

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ('train', 'sample', 'eval')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Once, before JAX starts: malloc with transparent huge pages, which XLA:CPU's
  # per-step temporaries need to avoid re-faulting 4 KiB pages every step.
  from ddpm_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_huge_pages()
  # Imported after flag parsing so `--help` answers without starting JAX or TF.
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.initialize(_WORKDIR.value)
  config = _CONFIG.value
  logging.info('%s=%s', host_memory.TUNABLES_ENV, os.environ.get(host_memory.TUNABLES_ENV, ''))
  logging.info('Config:\n%s', config)
  if _MODE.value == 'train':
    from ddpm_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == 'sample':
    from ddpm_jax import sample  # pylint: disable=g-import-not-at-top
    sample.sample_and_save(config, _WORKDIR.value)
  else:
    from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
