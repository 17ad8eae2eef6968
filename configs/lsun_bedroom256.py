"""LSUN bedroom 256x256 (Ho et al. 2020): 114M-parameter U-Net, lr 2e-5, batch 64.

Images are center-cropped and resized to 256x256. LSUN has only a small
validation split, used for evaluation. The paper's large bedroom model
(256M parameters, FID 4.90) used ch 256 instead of 128.
"""

from configs import celeba_hq256


def get_config():
  config = celeba_hq256.get_config()
  config.data.dataset = 'lsun/bedroom'
  config.data.resize_method = 'center_crop'
  config.data.eval_split = 'validation'
  return config
