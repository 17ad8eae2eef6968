"""Classifier-free guidance (Ho & Salimans 2022) and the class labels it is given.

`guided_model_fn` turns a class-conditional network `model_fn(x_t, t, y)`
into a plain `model_fn(x_t, t)`, so every sampler of `sampling` and
`solvers` draws guided samples unchanged. `parse_class_labels` reads the
`sampling.class_labels` strings a config names.
"""

import math
import numbers
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import chain
from ddpm_jax import diffusion as diffusion_lib

Array = jax.Array


def check_guidance_scale(scale: Any) -> Any:
  """A finite number >= 0 as a float, or a traced scalar (whose value the caller checks).

  Raises:
    ValueError: for anything else, naming what the scale means.
  """
  if isinstance(scale, jax.core.Tracer):
    if jnp.shape(scale) != ():
      raise ValueError(f'guidance_scale must be a scalar, got shape {jnp.shape(scale)}.')
    return scale
  if isinstance(scale, (np.ndarray, jax.Array)) and np.shape(scale) == ():
    scale = scale.item()
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
    raise ValueError(f'guidance_scale must be a number >= 0, got {scale!r}.')
  if not math.isfinite(scale) or scale < 0:
    raise ValueError(
      f'guidance_scale must be a finite number >= 0 (0: unconditional, 1: conditional, '
      f'> 1: guided), got {scale!r}.'
    )
  return float(scale)


def check_labels(labels: Any, num_classes: int) -> Array:
  """Class labels [B] of ints in [0, num_classes); values are checked unless traced.

  Raises:
    ValueError: for labels that are not a 1-D integer array, or (when
      concrete) hold values outside [0, num_classes).
  """
  if not hasattr(labels, 'shape'):
    labels = np.asarray(labels)
  if len(labels.shape) != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f'labels must be a 1-D integer array [B], got dtype {labels.dtype} and shape '
      f'{tuple(labels.shape)}.'
    )
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
      raise ValueError(
        f'labels must be classes in [0, {num_classes}) (the null label {num_classes} is '
        f"guidance's own), got {sorted(set(bad.tolist()))[:10]}."
      )
  return jnp.asarray(labels, jnp.int32)


def parse_class_labels(spec: str, num_classes: int) -> tuple[int, ...]:
  """The classes a `sampling.class_labels` string names, in order.

  Args:
    spec: 'all' (every class, 0 .. num_classes - 1) or comma-separated class
      indices such as '3' or '0,3,7'.
    num_classes: the model's number of classes.

  Returns:
    The classes, e.g. (0, 3, 7).

  Raises:
    ValueError: for an empty spec, a non-integer entry or a class outside
      [0, num_classes).
  """
  spec = str(spec).strip()
  if spec == 'all':
    return tuple(range(num_classes))
  try:
    classes = tuple(int(part) for part in spec.split(','))
  except ValueError:
    classes = ()
  if not classes:
    raise ValueError(
      f"class labels {spec!r}: use 'all' or class indices separated by commas, e.g. '0,3,7'."
    )
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f'class labels {bad} are not classes in [0, {num_classes}).')
  return classes


def guided_model_fn(
  model_fn: Callable[[Array, Array, Array], Array],
  labels: Array,
  guidance_scale: float | Array,
  *,
  null_label: int,
  model_var_type: str = 'fixedlarge',
) -> chain.ModelFn:
  """Classifier-free guidance of a class-conditional model, as a `model_fn(x_t, t)`.

  g(x_t, t) = eps_u + s (eps_c - eps_u), with eps_c = model_fn(x_t, t, labels)
  and eps_u = model_fn(x_t, t, null), computed in ONE call of `model_fn` on
  the doubled batch ([x_t; x_t], [t; t], [labels; null]). s = 0 is the
  unconditional model, s = 1 the conditional one, s > 1 guides. This s is
  diffusers' `guidance_scale`; Ho & Salimans (2022) write the same rule as
  (1 + w) eps_c - w eps_u, so their w is s - 1. Weights summing to one make
  the rule the same for x0 and v predictions as for eps.

  With a learned variance (2C output channels) the first C (mean) channels
  are combined as above and the last C come from the conditional branch, as
  in GLIDE. Every sampler takes the result unchanged.

  Args:
    model_fn: `model_fn(x_t [N, ...], t int32 [N], y int32 [N]) -> [N, ..., C or 2C]`,
      the conditional network; y = `null_label` means "no class".
    labels: int classes [B] in [0, null_label), one per sample.
    guidance_scale: s >= 0, a Python number (or a traced scalar, whose value
      the caller checks).
    null_label: the null label (the model's num_classes), >= 1.
    model_var_type: one of `diffusion.MODEL_VAR_TYPES`; 'learned' and
      'learned_range' mean 2C output channels.

  Returns:
    `g(x_t [B, ...], t [B]) -> [B, ..., C or 2C]`.

  Raises:
    ValueError: for a negative or non-finite scale, labels that are not
      ints [B] in [0, null_label) (the batch size is checked when g is
      called), a bad null label or variance type.
  """
  if not chain.is_int(null_label) or null_label < 1:
    raise ValueError(f'null_label must be the number of classes (an int >= 1), got {null_label!r}.')
  diffusion_lib.check_model_options(model_var_type=model_var_type)
  scale = check_guidance_scale(guidance_scale)
  labels = check_labels(labels, int(null_label))
  learned = model_var_type in ('learned', 'learned_range')

  def guided(x_t: Array, t: Array) -> Array:
    batch = x_t.shape[0]
    if labels.shape != (batch,):
      raise ValueError(
        f'labels must have one class per sample, shape [B] = ({batch},), got {labels.shape}.'
      )
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    y = jnp.concatenate([labels, jnp.full((batch,), null_label, jnp.int32)])
    out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), y)
    cond, uncond = out[:batch], out[batch:]
    if learned:
      channels = cond.shape[-1] // 2
      mean_c, var_c = cond[..., :channels], cond[..., channels:]
      mean_u = uncond[..., :channels]
      return jnp.concatenate([mean_u + scale * (mean_c - mean_u), var_c], axis=-1)
    return uncond + scale * (cond - uncond)

  return guided
