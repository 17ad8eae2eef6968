"""Dataset builders of ddpm-jax; importing this package registers them.

`fashion_mnist_local` (see `fashion_mnist_idx`) reads Fashion-MNIST from the
IDX files of Debian's `dataset-fashion-mnist` package.
"""

from ddpm_jax.datasets import fashion_mnist_idx
from ddpm_jax.datasets.fashion_mnist_idx import FashionMnistLocal

__all__ = ['FashionMnistLocal', 'fashion_mnist_idx']
