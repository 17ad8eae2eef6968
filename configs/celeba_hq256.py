"""CelebA-HQ 256x256 (Ho et al. 2020): 114M-parameter U-Net, lr 2e-5, batch 64.

TFDS's `celeb_a_hq/256` needs the manually prepared CelebA-HQ files in
`data.manual_dir` (TFDS documents how to make them).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeb_a_hq/256'
  config.data.image_size = 256
  config.data.eval_split = 'train'  # CelebA-HQ has no test split in TFDS.
  config.data.shuffle_buffer = 10_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  config.optim.learning_rate = 2e-5
  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  config.training.num_sample_images = 16
  config.sampling.batch_size = 32
  config.eval.batch_size = 32
  return config
