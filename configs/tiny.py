"""A seconds-long config for tests and smoke runs: a 2-level U-Net at 16x16.

Uses the Fashion-MNIST builder; tests point `data.manual_dir` at small IDX
files they write themselves and `data.data_dir` at a temporary TFDS dir.
"""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.data.image_size = 16
  config.data.resize_method = 'resize'
  config.data.shuffle_buffer = 64
  config.data.random_flip = True  # Keeps the flip path (and its resumable RNG) under test.
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.1
  # Unconditional and the paper's objective; tests that need classes or other
  # objectives set them.
  config.model.num_classes = 0
  config.diffusion.beta_schedule = 'linear'
  config.diffusion.model_mean_type = 'eps'
  config.diffusion.min_snr_gamma = 0.0
  config.diffusion.num_timesteps = 100
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2
  config.training.batch_size = 8
  config.training.num_train_steps = 6
  config.training.log_every_steps = 2
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 6
  config.training.num_sample_images = 4
  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 5
  config.sampling.guidance_scale = None
  config.sampling.class_labels = None
  config.sampling.grid_num_steps = 5
  config.sampling.num_samples = 8
  config.sampling.batch_size = 4
  config.eval.batch_size = 4
  config.eval.num_bpd_examples = 4
  config.eval.num_fid_samples = 8
  config.eval.domain_classifier_steps = 20
  config.eval.inception_fid = False  # The Inception costs seconds per few images on 2 cores.
  config.training.fid_num_samples = 8
  config.sampling.figures = False
  return config
