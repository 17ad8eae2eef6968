"""The embedded default: Fashion-MNIST, sized to train on 2 CPU cores.

The real Fashion-MNIST from Debian's `dataset-fashion-mnist` package, through
the project's TFDS builder `fashion_mnist_local`, at its native 28x28 (the
3-level U-Net goes 28 -> 14 -> 7). The U-Net keeps the paper's design (res
blocks, attention at the lowest resolution, timestep embedding) at width 32
and one res block per level: 1.1M parameters, about 0.6 s per step of 64
images on 2 CPU cores (benchmarks/, row 7). The optimisation is tuned for a
short run: a higher learning rate, a short warm-up and an EMA with warm-up
(see README for what it reaches).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'fashion_mnist_local'
  config.data.image_size = 28
  config.data.num_channels = 1
  config.data.resize_method = 'pad'
  config.data.random_flip = True
  config.data.shuffle_buffer = 60_000

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.999
  config.optim.ema_warmup = True

  config.training.batch_size = 64
  config.training.num_train_steps = 1000
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 250
  config.training.sample_every_steps = 500
  config.training.num_sample_images = 64

  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 50
  config.sampling.num_samples = 1000
  config.sampling.batch_size = 200
  # Sized for 2 CPU cores: the bound costs T = 1000 forward passes per image.
  config.eval.batch_size = 50
  config.eval.num_bpd_examples = 50
  config.eval.num_fid_samples = 1000
  config.eval.feature_extractor = 'domain'
  config.eval.domain_classifier_steps = 1000
  return config
