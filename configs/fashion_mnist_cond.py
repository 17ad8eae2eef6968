"""The embedded default's class-conditional variant: Fashion-MNIST's 10 classes.

The U-Net of configs/fashion_mnist.py with a class embedding added to its
timestep embedding, trained with 10% of the labels dropped to the null
label, so one network is both the conditional and the unconditional model
that classifier-free guidance (Ho & Salimans 2022) combines. `--mode=sample`
draws every class in turn at guidance scale 3; `--mode=eval` measures the
Frechet distance and the domain classifier's class accuracy at each of
`eval.guidance_scales` (docs/guidance.md).
"""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.model.num_classes = 10
  config.model.class_dropout = 0.1
  config.sampling.guidance_scale = 3.0
  config.sampling.class_labels = 'all'
  config.eval.guidance_scales = (0.0, 1.0, 2.0, 3.0, 5.0)
  return config
