"""CIFAR-10 32x32, exactly the paper's setting (Ho et al. 2020, Appendix B).

35.7M-parameter U-Net, batch 128, Adam lr 2e-4 with 5000 warm-up steps, EMA
0.9999, dropout 0.1, random flips, 800k steps, L_simple, linear betas.
"""

from configs import default


def get_config():
  return default.get_config()
