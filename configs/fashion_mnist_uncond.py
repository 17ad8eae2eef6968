"""The embedded default without classes: unconditional Fashion-MNIST.

configs/fashion_mnist.py's U-Net, diffusion and training recipe with no class
embedding and no guidance, for what needs an unconditional model (such as
benchmarks/sampler_quality.py, which compares samplers on one).
"""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.model.num_classes = 0
  config.training.num_sample_images = 64
  config.sampling.guidance_scale = None
  config.sampling.class_labels = None
  return config
