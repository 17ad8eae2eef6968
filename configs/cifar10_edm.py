"""CIFAR-10 32x32 trained the EDM way (Karras et al. 2022) on the paper's U-Net (configs/cifar10.py).

EDM's CIFAR-10 recipe as NVlabs/edm's train.py sets it (`--arch=ddpmpp`,
`--precond=edm`, the defaults): preconditioning with sigma_data 0.5,
ln(sigma) ~ N(-1.2, 1.2^2), batch 512, Adam lr 1e-3 ramped up linearly over
10M images, EMA half-life 0.5M images with its ramp-up (half-life <= 5% of
the images seen), dropout 0.13, 200M training images (390,625 steps), no
gradient clipping; sampled by 18 Heun steps (35 model calls) from sigma 80
to 0.002 with rho 7. docs/edm.md says how to train and sample it.

The network is this project's 35.7M-parameter DDPM U-Net, not EDM's DDPM++
(`SongUNet` in NVlabs/edm's training/networks.py), which differs in:
  * size: 55.73M parameters (counted from that file, unconditional);
  * levels: 128 x (2, 2, 2), three levels of 256 channels (32, 16, 8) with 4
    residual blocks each, against our 128 x (1, 2, 2, 2), four levels with 2;
  * resampling: residual blocks that resample with a 2x2 box filter and a
    1x1 projected skip, against our strided conv and nearest-neighbour
    upsampling with a conv (the FIR filter [1, 3, 3, 1] is NCSN++'s, not DDPM++'s);
  * every residual and attention sum scaled by 1/sqrt(2) (ours: unscaled);
  * the same noise input otherwise: c_noise = ln(sigma) / 4 into a sinusoidal
    embedding of 128 channels with our timestep embedding's frequencies and
    order, then a two-layer MLP to 512; attention at 16x16 and in the middle;
  * class labels (conditional runs): a linear map of the one-hot label (times
    sqrt(classes)), with no label dropout in EDM's training; ours a learned
    embedding with a null class, dropped for 10% of the examples;
  * augmentation: EDM's non-leaking pipeline (probability 0.12: flips,
    translations, scalings, rotations, with the 9 augmentation parameters fed
    to the network) and no dataset x-flips; we have dataset x-flips only;
  * the loss: EDM sums over pixels, we average (a constant 1/3072 scale).
"""

from configs import default

_BATCH = 512


def get_config():
  config = default.get_config()
  config.model.dropout = 0.13
  config.data.random_flip = True  # Our only augmentation (EDM's pipeline includes x-flips).
  config.diffusion.kind = 'edm'

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 10_000_000 // _BATCH  # EDM's ramp over 10M images.
  config.optim.grad_clip = 0.0  # EDM does not clip; non-finite steps are skipped.
  config.optim.ema_halflife_images = 500_000.0
  config.optim.ema_warmup = True  # EDM's ramp-up of the half-life.

  config.training.batch_size = _BATCH
  config.training.num_train_steps = 200_000_000 // _BATCH  # 200M images.
  config.training.checkpoint_every_steps = 2_000
  config.training.sample_every_steps = 10_000

  config.sampling.sampler = 'edm'
  config.sampling.num_steps = 18  # Heun steps: 35 model calls.
  config.sampling.grid_sampler = 'edm'
  config.sampling.grid_num_steps = 18
  return config
