"""Training objectives: L_simple, the bound term, and improved DDPM's hybrid.

`training_losses` draws x_t from q(x_t | x_0), calls the denoiser once and
returns one loss per example, so any weighting or averaging is the caller's.
"""

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import likelihood

Array = jax.Array

LOSS_TYPES = ('mse', 'kl', 'hybrid')


def _mean_flat(x: Array) -> Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def min_snr_weight(
  d: diffusion_lib.Diffusion, t: Array, gamma: float, model_mean_type: str
) -> Array:
  """Min-SNR-gamma loss weights [B] (Hang et al. 2023) for the MSE objective.

  The weight min(SNR_t, gamma) applies to the x0 error; expressed for the
  target the model predicts it becomes min(SNR, gamma)/SNR for eps,
  min(SNR, gamma) for x0 and min(SNR, gamma)/(SNR + 1) for v.
  """
  snr = jnp.square(
    jnp.take(d.sqrt_alphas_cumprod, t) / jnp.take(d.sqrt_one_minus_alphas_cumprod, t)
  )
  clipped = jnp.minimum(snr, gamma)
  if model_mean_type == 'eps':
    return clipped / snr
  if model_mean_type == 'x0':
    return clipped
  if model_mean_type == 'v':
    return clipped / (snr + 1.0)
  raise ValueError(
    f'min-SNR weighting is defined for eps, x0 and v targets, not {model_mean_type!r}.'
  )


def training_losses(
  d: diffusion_lib.Diffusion,
  model_fn: diffusion_lib.ModelFn,
  x0: Array,
  t: Array,
  noise: Array,
  *,
  loss_type: str = 'mse',
  model_mean_type: str = 'eps',
  model_var_type: str = 'fixedlarge',
  vlb_weight: float = 0.001,
  min_snr_gamma: float | None = None,
) -> Array:
  """Per-example training losses at timesteps t.

  Args:
    d: the process.
    model_fn: `model_fn(x_t, t) -> output`, called once with the timesteps
      mapped through `d.timestep_map`.
    x0: clean data [B, ..., C] in [-1, 1].
    t: int timesteps [B], usually uniform over [0, T).
    noise: standard normal, shape of x0.
    loss_type: 'mse' (L_simple: mean over pixels of the squared error of the
      predicted target), 'kl' (the variational-bound term L_{t-1} in bits/dim,
      the discretized decoder's NLL at t = 0), or 'hybrid' (improved DDPM:
      mse + vlb_weight * T * L_t, where L_t is the bound term with the
      gradient stopped through the mean, so it trains only the variance).
    model_mean_type: one of `MODEL_MEAN_TYPES`.
    model_var_type: one of `MODEL_VAR_TYPES`.
    vlb_weight: lambda of the hybrid loss (0.001 in improved DDPM).
    min_snr_gamma: if set, weights the MSE term by min-SNR-gamma.

  Returns:
    Losses [B].
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'Unknown loss_type {loss_type!r}; valid choices: {", ".join(LOSS_TYPES)}.')
  diffusion_lib.check_model_options(model_mean_type, model_var_type)
  x_t = diffusion_lib.q_sample(d, x0, t, noise)
  model_output = model_fn(x_t, jnp.take(d.timestep_map, t))
  mean_out, var_out = diffusion_lib.split_model_output(model_output, x_t, model_var_type)

  def vb_term(output):
    return likelihood.vb_terms_bpd(
      d,
      output,
      x0,
      x_t,
      t,
      clip_denoised=False,
      model_mean_type=model_mean_type,
      model_var_type=model_var_type,
    )['output']

  if loss_type == 'kl':
    return vb_term(model_output)

  target = {
    'eps': lambda: noise,
    'x0': lambda: x0,
    'v': lambda: diffusion_lib.v_target(d, x0, t, noise),
    'xprev': lambda: diffusion_lib.q_posterior(d, x0, x_t, t)[0],
  }[model_mean_type]()
  mse = _mean_flat(jnp.square(target - mean_out))
  if min_snr_gamma is not None:
    mse = mse * min_snr_weight(d, t, min_snr_gamma, model_mean_type)
  if loss_type == 'mse':
    return mse
  if var_out is None:
    raise ValueError(
      "loss_type='hybrid' trains the variance and needs a learned "
      "model_var_type ('learned' or 'learned_range')."
    )
  frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
  return mse + vlb_weight * d.num_timesteps * vb_term(frozen)
