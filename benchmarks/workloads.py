"""The benchmark workloads: ddpm-jax next to diffusers + PyTorch, one task at a time.

Each task builds its models, warms them up and measures them, and returns a
JSON-serialisable dict. `benchmarks/run.py` runs tasks in worker processes:

  python benchmarks/workloads.py --tasks pair,peak --spec '{...}' --result out.json

A worker imports only what its tasks need (JAX for every task but the
input pipeline's, PyTorch and diffusers for the peer, TensorFlow only for
the input pipeline), so frameworks do not share a process unless a task
compares them. Where a task compares the two frameworks, both models live in
the same process and their timed calls take turns, so that a change in the
machine's load hits both alike.

The peer is the same network: `diffusers_unet_kwargs` writes the diffusers
`UNet2DModel` config that computes the ddpm-jax U-Net's function (the layout
of the public google/ddpm-cifar10-32 weights); tests/test_benchmarks_smoke.py
checks it against ddpm-jax's own diffusers-config reader.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Mapping, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, 'tests'), os.path.dirname(os.path.abspath(__file__))):
  if _path not in sys.path:
    sys.path.insert(0, _path)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

Spec = Mapping[str, Any]
Result = Dict[str, Any]


# ---------------------------------------------------------------------------
# Configs and the matching diffusers network.


def cifar_config(spec: Spec):
  """configs/cifar10.py (the paper's 35.7M U-Net), or a tiny one for --quick."""
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config()
  if spec['quick']:
    _shrink_for_quick(config)
  config.model.dtype = spec.get('dtype', 'float32')
  return config


def _shrink_for_quick(config) -> None:
  """One 8x8 level with attention: every kind of layer, little to compile."""
  config.data.image_size = 8
  config.model.ch = 32
  config.model.ch_mult = (1,)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)


def fashion_config(spec: Spec):
  """configs/fashion_mnist.py (the embedded default), or a tiny one for --quick."""
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config()
  if spec['quick']:
    _shrink_for_quick(config)
    config.training.batch_size = 2
  config.diffusion.num_timesteps = int(spec['num_timesteps'])
  config.model.dtype = spec.get('dtype', 'float32')
  return config


def image_shape(config) -> tuple:
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def diffusers_unet_kwargs(model_config, image_size: int, in_channels: int,
                          out_channels: int) -> Dict[str, Any]:
  """The diffusers `UNet2DModel` arguments of the same network as a ddpm-jax config.

  Args:
    model_config: `config.model` of an experiment (ch, ch_mult,
      num_res_blocks, attn_resolutions, dropout, resamp_with_conv).
    image_size: side length of the square input.
    in_channels: input channels.
    out_channels: output channels.

  Returns:
    keyword arguments for `diffusers.UNet2DModel`.

  Raises:
    ValueError: for a config diffusers cannot express (no resampling convs).
  """
  if not model_config.resamp_with_conv:
    raise ValueError('diffusers UNet2DModel always resamples with convolutions')
  ch = int(model_config.ch)
  mults = [int(m) for m in model_config.ch_mult]
  attn = {int(r) for r in model_config.attn_resolutions}
  has_attn = [image_size // 2**level in attn for level in range(len(mults))]
  return dict(
      sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
      block_out_channels=tuple(ch * m for m in mults),
      layers_per_block=int(model_config.num_res_blocks),
      down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in has_attn),
      up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(has_attn)),
      # The DDPM settings: eps 1e-6, sines first, t + 1 in the embedding's
      # frequency shift, TF-style stride-2 padding, single-head attention.
      norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
      attention_head_dim=None, norm_num_groups=32, act_fn='silu',
      dropout=float(model_config.dropout))


# ---------------------------------------------------------------------------
# The ddpm-jax side.


def _jax_setup(spec: Spec):
  import jax  # pylint: disable=g-import-not-at-top
  if spec.get('jax_cache_dir'):
    # A run-wide persistent cache: a program compiled by one worker (e.g. the
    # CIFAR forward pass) loads in the next instead of compiling again.
    jax.config.update('jax_compilation_cache_dir', spec['jax_cache_dir'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return jax


def _jax_device_info() -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return dict(backend=jax.default_backend(), device_kind=device.device_kind,
              num_devices=jax.device_count(), jax_version=jax.__version__,
              jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
              xla_flags=os.environ.get('XLA_FLAGS', ''))


def _build_jax(config):
  """(model, diffusion, image_shape) of a config, as the trainer builds them."""
  from ddpm_jax import generate  # pylint: disable=g-import-not-at-top
  return generate.build_model_and_diffusion(config)


def _cost(lowered, compiled) -> Dict[str, Any]:
  """XLA's FLOP count and buffer sizes of a program.

  FLOPs come from the lowered (not yet optimised) program: the same count on
  every backend, where a GPU's compiled program hides its convolutions inside
  cuDNN calls that the compiled cost analysis does not count.
  """
  out: Dict[str, Any] = {}
  try:
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX: one dict per computation.
      cost = cost[0]
    out['flops'] = float(cost.get('flops', float('nan')))
    compiled_cost = compiled.cost_analysis()
    if isinstance(compiled_cost, (list, tuple)):
      compiled_cost = compiled_cost[0]
    out['compiled_flops'] = float(compiled_cost.get('flops', float('nan')))
    out['bytes_accessed'] = float(compiled_cost.get('bytes accessed', float('nan')))
  except Exception as e:  # pylint: disable=broad-except
    out['cost_error'] = repr(e)
  try:
    mem = compiled.memory_analysis()
    out['xla_memory_mib'] = {
        name: round(getattr(mem, name + '_size_in_bytes') / common.MIB, 1)
        for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  except Exception as e:  # pylint: disable=broad-except
    out['memory_error'] = repr(e)
  return out


def _textbook_upsample_conv(x, kernel, dtype=None):
  """conv3x3(upsample_nearest2x(x)): the upsampling layer as the network defines it."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
  dtype = dtype or x.dtype
  return jax.lax.conv_general_dilated(
      unet.upsample_nearest2x(x).astype(dtype), kernel.astype(dtype), (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _model_flops(lower: Callable[[], Any]) -> float:
  """FLOPs of the network as defined: XLA's count of a lowering with textbook layers.

  ddpm-jax computes each upsampling convolution at the input resolution
  (`unet.upsample2x_conv3x3`, 16 instead of 36 multiply-adds per pixel and
  channel pair), so its program executes fewer FLOPs than the network as
  written, which is what PyTorch runs; and on CPU the input gradient of its
  convolutions on small images is a matmul that also computes the taps
  falling on the zero padding (`unet._conv3x3_same`), which XLA's count of
  a convolution leaves out. FLOP/s against the machine's limit use these
  model FLOPs for both frameworks (as model-FLOPs utilisation does), so the
  row compares useful work per second. `lower` must build a fresh jit (a
  cached trace would keep the fast formulations). Only row 3 needs it: it
  costs one more trace and lowering.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
  fast_upsample, fast_conv = unet.upsample2x_conv3x3, unet._conv_general_dilated  # pylint: disable=protected-access
  unet.upsample2x_conv3x3 = _textbook_upsample_conv
  unet._conv_general_dilated = jax.lax.conv_general_dilated  # pylint: disable=protected-access
  try:
    cost = lower().cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float('nan')
  finally:
    unet.upsample2x_conv3x3, unet._conv_general_dilated = fast_upsample, fast_conv  # pylint: disable=protected-access
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


class JaxTrain:
  """The real training step (train_state.train_steps: Adam, clipping, EMA, skip)."""

  def __init__(self, config, batch: int, seed: int = 0):
    jax = _jax_setup({})
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from ddpm_jax import train_state as ts  # pylint: disable=g-import-not-at-top
    config = config.copy_and_resolve_references()
    config.training.batch_size = batch
    self.model, d, shape = _build_jax(config)
    self.state = jax.jit(functools.partial(ts.create_train_state, self.model, config,
                                           image_shape=shape))(jax.random.key(seed))
    x = jax.random.uniform(jax.random.key(seed + 1), (1, batch) + shape, jnp.float32, -1, 1)
    self.batches = {'image': x}
    self.key = jax.random.key(seed + 2)
    step = jax.jit(functools.partial(ts.train_steps, diffusion=d, config=config),
                   donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(self.state, self.batches, self.key)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    t2 = time.perf_counter()
    self.compile_s = dict(trace_lower_s=t1 - t0, compile_s=t2 - t1)
    self.cost = _cost(lowered, self.compiled)
    self._step_fn = functools.partial(ts.train_steps, diffusion=d, config=config)
    self.batch = batch

  def model_flops(self) -> float:
    """The step's FLOPs with the network as defined (see `_model_flops`)."""
    import jax  # pylint: disable=g-import-not-at-top
    return _model_flops(lambda: jax.jit(self._step_fn).lower(self.state, self.batches, self.key))

  def __call__(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    self.state, metrics = self.compiled(self.state, self.batches, self.key)
    jax.block_until_ready((self.state, metrics))


class JaxForward:
  """One evaluation forward pass of the U-Net (the sampling workload)."""

  def __init__(self, config, batch: int, seed: int = 0, params=None):
    jax = _jax_setup({})
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.model, self.d, shape = _build_jax(config)
    x = jax.random.normal(jax.random.key(seed + 1), (batch,) + shape, jnp.float32)
    t = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, self.d.num_timesteps)
    if params is None:
      params = jax.jit(lambda x, t: self.model.init(jax.random.key(seed), x, t, train=False))(
          x, t)['params']
    self.params, self.x, self.t = params, x, t
    fwd = jax.jit(lambda p, x, t: self.model.apply({'params': p}, x, t, train=False))
    t0 = time.perf_counter()
    lowered = fwd.lower(params, x, t)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = dict(trace_lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
    self.cost = _cost(lowered, self.compiled)
    self.batch = batch

  def model_flops(self) -> float:
    """The forward pass's FLOPs with the network as defined (see `_model_flops`)."""
    import jax  # pylint: disable=g-import-not-at-top
    return _model_flops(lambda: jax.jit(
        lambda p, x, t: self.model.apply({'params': p}, x, t, train=False)).lower(
            self.params, self.x, self.t))

  def model_fn(self, params):
    return lambda x, t: self.model.apply({'params': params}, x, t, train=False)

  def __call__(self) -> None:
    self.compiled(self.params, self.x, self.t).block_until_ready()


# ---------------------------------------------------------------------------
# The diffusers + PyTorch side.


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  from torch_peers import import_torchvision  # pylint: disable=g-import-not-at-top
  import_torchvision()  # diffusers imports torchvision; see tests/torch_peers.py.
  return torch


def _torch_device():
  """CUDA when this PyTorch build has it (a GPU machine), else the CPU."""
  torch = _torch()
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _torch_autocast(config):
  """The peer's counterpart of `model.dtype`: bfloat16 autocast (float32 parameters)."""
  torch = _torch()
  return torch.autocast(_torch_device().type, dtype=torch.bfloat16,
                        enabled=config.model.dtype == 'bfloat16')


def _torch_sync() -> None:
  """Waits for queued GPU work (PyTorch on CPU is synchronous already)."""
  torch = _torch()
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _torch_info() -> Dict[str, Any]:
  torch = _torch()
  import diffusers  # pylint: disable=g-import-not-at-top
  info = dict(torch_version=torch.__version__, diffusers_version=diffusers.__version__,
              torch_threads=torch.get_num_threads(), torch_device=str(_torch_device()))
  if torch.cuda.is_available():  # float32 on a GPU may run its matrix units in TF32.
    info.update(torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                torch_gpu=torch.cuda.get_device_name())
  return info


def build_torch_unet(config, seed: int = 0):
  torch = _torch()
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  size, _, channels = image_shape(config)
  model = UNet2DModel(**diffusers_unet_kwargs(config.model, size, channels, channels))
  return model.to(_torch_device())


def _alphas_cumprod(config):
  import numpy as np  # pylint: disable=g-import-not-at-top
  betas = np.linspace(config.diffusion.beta_start, config.diffusion.beta_end,
                      config.diffusion.num_timesteps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


class TorchTrain:
  """The same step in PyTorch: eps-MSE on q(x_t|x_0), Adam, clipping at 1, EMA."""

  def __init__(self, config, batch: int, seed: int = 0):
    torch = _torch()
    from torch.optim import swa_utils  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.model = build_torch_unet(config, seed).train()
    optim = config.optim
    kw = dict(lr=optim.learning_rate, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    try:
      # The fused CPU kernel is PyTorch's fastest Adam.
      self.opt = torch.optim.Adam(self.model.parameters(), fused=True, **kw)
      self.adam = 'fused'
    except (RuntimeError, TypeError):
      self.opt = torch.optim.Adam(self.model.parameters(), foreach=True, **kw)
      self.adam = 'foreach'
    self.ema = swa_utils.AveragedModel(
        self.model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(optim.ema_decay))
    device = _torch_device()
    self.acp = torch.tensor(_alphas_cumprod(config), dtype=torch.float32, device=device)
    size, _, channels = image_shape(config)
    gen = torch.Generator().manual_seed(seed + 1)
    self.x = (torch.rand((batch, channels, size, size), generator=gen) * 2 - 1).to(device)
    self.grad_clip = optim.grad_clip
    self.autocast = functools.partial(_torch_autocast, config)
    self.batch = batch

  def __call__(self) -> None:
    torch = self.torch
    x0 = self.x
    t = torch.randint(0, len(self.acp), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    a = self.acp[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with self.autocast():
      eps = self.model(x_t, t).sample
    loss = torch.nn.functional.mse_loss(eps.float(), noise)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.opt.step()
    self.ema.update_parameters(self.model)
    _torch_sync()


class TorchForward:
  """The peer's evaluation forward pass (eval mode, inference_mode)."""

  def __init__(self, config, batch: int, seed: int = 0):
    torch = _torch()
    self.torch = torch
    self.model = build_torch_unet(config, seed).eval()
    size, _, channels = image_shape(config)
    gen = torch.Generator().manual_seed(seed + 1)
    device = _torch_device()
    self.x = torch.randn((batch, channels, size, size), generator=gen).to(device)
    self.t = torch.randint(0, config.diffusion.num_timesteps, (batch,), generator=gen).to(device)
    self.autocast = functools.partial(_torch_autocast, config)
    self.batch = batch

  def __call__(self) -> None:
    with self.torch.inference_mode(), self.autocast():
      self.model(self.x, self.t)
    _torch_sync()


# ---------------------------------------------------------------------------
# Tasks.


def _rate(batch: int, timing: Mapping[str, Any]) -> float:
  return batch / timing['median_s']


def task_pair(spec: Spec) -> Result:
  """Rows 1-2: CIFAR-10 U-Net training step and forward, ddpm-jax vs diffusers."""
  config = cifar_config(spec)
  batch = int(spec['batch'])
  jax_train, torch_train = JaxTrain(config, batch), TorchTrain(config, batch)
  train = common.time_interleaved({'jax': jax_train, 'torch': torch_train},
                                  repeats=spec['repeats'], warmup=spec['warmup'],
                                  min_seconds=spec['min_seconds'])
  out = dict(batch=batch, model=_model_summary(config, jax_train), torch_adam=torch_train.adam,
             train=dict(timing=train, jax_cost=jax_train.cost, jax_compile=jax_train.compile_s,
                        model_flops=jax_train.model_flops()))
  del jax_train, torch_train
  common.release_free_memory()
  jax_fwd, torch_fwd = JaxForward(config, batch), TorchForward(config, batch)
  forward = common.time_interleaved({'jax': jax_fwd, 'torch': torch_fwd},
                                    repeats=spec['repeats'], warmup=spec['warmup'],
                                    min_seconds=spec['min_seconds'])
  out['forward'] = dict(timing=forward, jax_cost=jax_fwd.cost, jax_compile=jax_fwd.compile_s,
                        model_flops=jax_fwd.model_flops())
  for name, rows in (('train', train), ('forward', forward)):
    out[name]['jax_images_per_s'] = _rate(batch, rows['jax'])
    out[name]['torch_images_per_s'] = _rate(batch, rows['torch'])
    out[name]['ratio'] = out[name]['jax_images_per_s'] / out[name]['torch_images_per_s']
    out[name]['jax_flops_per_image'] = out[name]['jax_cost'].get('flops', float('nan')) / batch
    out[name]['model_flops_per_image'] = out[name]['model_flops'] / batch
  out['load'] = common.merge_loads([train['jax']['load'], forward['jax']['load']])
  return out


def _model_summary(config, jax_train: JaxTrain) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.tree.leaves(jax_train.state.params)
  return dict(image_shape=list(image_shape(config)), ch=config.model.ch,
              ch_mult=list(config.model.ch_mult),
              num_res_blocks=config.model.num_res_blocks,
              attn_resolutions=list(config.model.attn_resolutions),
              num_params=int(sum(p.size for p in params)))


def task_peak(spec: Spec) -> Result:
  """Row 3's limit: the fastest matmul and convolution on this machine (run's dtype)."""
  jax = _jax_setup(spec)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  torch = _torch()
  bf16 = spec.get('dtype', 'float32') == 'bfloat16'
  jdt, tdt = (jnp.bfloat16, torch.bfloat16) if bf16 else (jnp.float32, torch.float32)
  device = _torch_device()
  quick = spec['quick']
  kernels: Dict[str, Callable[[], None]] = {}
  flops: Dict[str, float] = {}
  sizes = (256,) if quick else (1024, 2048, 4096)
  if not quick and jax.default_backend() != 'cpu':
    sizes += (8192,)  # An accelerator needs large products to reach its rate.
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jdt)
    b = jax.random.normal(jax.random.key(1), (n, n), jdt)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    kernels[f'jax_dot_{n}'] = functools.partial(lambda f, a, b: f(a, b).block_until_ready(),
                                                dot, a, b)
    ta, tb = (torch.randn(n, n, device=device, dtype=tdt),
              torch.randn(n, n, device=device, dtype=tdt))
    kernels[f'torch_mm_{n}'] = functools.partial(
        lambda a, b: (torch.mm(a, b), _torch_sync()), ta, tb)
    flops[f'jax_dot_{n}'] = flops[f'torch_mm_{n}'] = 2.0 * n**3
  # Convolutions of the CIFAR U-Net's shapes (3x3, stride 1, 'SAME').
  conv_shapes = [(2, 8, 32)] if quick else [(8, 32, 128), (8, 16, 256), (8, 32, 256)]
  for batch, size, ch in conv_shapes:
    x = jax.random.normal(jax.random.key(2), (batch, size, size, ch), jdt)
    w = jax.random.normal(jax.random.key(3), (3, 3, ch, ch), jdt)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).lower(x, w).compile()
    name = f'{batch}x{size}x{size}x{ch}'
    kernels[f'jax_conv_{name}'] = functools.partial(
        lambda f, x, w: f(x, w).block_until_ready(), conv, x, w)
    tx = torch.randn(batch, ch, size, size, device=device, dtype=tdt)
    tw = torch.randn(ch, ch, 3, 3, device=device, dtype=tdt)
    kernels[f'torch_conv_{name}'] = functools.partial(
        lambda x, w: (torch.nn.functional.conv2d(x, w, padding=1), _torch_sync()), tx, tw)
    flops[f'jax_conv_{name}'] = flops[f'torch_conv_{name}'] = 2.0 * batch * size * size * ch * ch * 9
  with torch.inference_mode():
    timing = common.time_interleaved(kernels, repeats=spec['repeats'] + 2,
                                     warmup=spec['warmup'] + 1,
                                     min_seconds=spec['min_seconds'] or 0.2)
  rates = {name: flops[name] / timing[name]['median_s'] for name in kernels}
  best = max(rates, key=rates.get)
  return dict(flops_per_s=rates, best_kernel=best, limit_flops_per_s=rates[best],
              timing=timing, load=next(iter(timing.values()))['load'])


def _time_against_bare_forwards(fwd: 'JaxForward', long_runs: Mapping[str, Callable[[], Any]],
                                *, forwards: int, spec: Spec) -> Tuple[Result, Result]:
  """Times runs of `forwards` forward passes each (a chain, the bound) against bare ones.

  The bare forward passes are timed in turns with the long runs, a sample of
  up to 250 calls between them, so that the machine's drift over the
  minutes the long runs take enters both sides alike. Returns the long runs'
  timings and the bare forward pass's, per call.
  """
  calls = min(forwards, 250)
  def run_bare():
    for _ in range(calls):
      fwd()
  for _ in range(spec['warmup'] + 2):
    fwd()
  # Long runs, compiled ahead of time: no warm-up call.
  timing = common.time_interleaved(dict(long_runs, bare=run_bare),
                                   repeats=spec['sample_repeats'], warmup=0)
  bare = timing.pop('bare')
  per_call = dict(common.summarize([t / calls for t in bare['times_s']]),
                  calls_per_sample=calls, load=bare['load'])
  return timing, per_call


def task_sampling(spec: Spec) -> Result:
  """Row 4: the scan-compiled chain vs T bare forwards; 16 images vs DDPMPipeline."""
  jax = _jax_setup(spec)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  config = fashion_config(spec)
  batch, steps = int(spec['sample_batch']), int(spec['sample_steps'])
  fwd = JaxForward(config, batch)
  d, shape = fwd.d, (batch,) + image_shape(config)
  num_t = d.num_timesteps
  model_fn = fwd.model_fn
  if steps == num_t:
    chain = jax.jit(lambda p, key: sampling.p_sample_loop(d, model_fn(p), shape, key))
  else:
    chain = jax.jit(lambda p, key: sampling.respaced_sample_loop(
        d, model_fn(p), shape, key, num_steps=steps))
  t0 = time.perf_counter()
  chain = chain.lower(fwd.params, jax.random.key(0)).compile()
  chain_compile_s = time.perf_counter() - t0
  run_chain = lambda: np.asarray(chain(fwd.params, jax.random.key(0)))

  torch = _torch()
  from diffusers import DDPMPipeline, DDPMScheduler  # pylint: disable=g-import-not-at-top
  scheduler = DDPMScheduler(
      num_train_timesteps=num_t, beta_start=config.diffusion.beta_start,
      beta_end=config.diffusion.beta_end, beta_schedule='linear',
      variance_type='fixed_large', clip_sample=True, prediction_type='epsilon')
  pipe = DDPMPipeline(unet=build_torch_unet(config).eval(), scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  def run_pipe():
    with _torch_autocast(config):
      return pipe(batch_size=batch, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=steps, output_type='np')
  # The chain's overhead: against the same number of bare forward passes.
  full, forward = _time_against_bare_forwards(
      fwd, {'jax': run_chain, 'diffusers': run_pipe}, forwards=steps, spec=spec)
  bare_total = forward['median_s'] * steps
  chain_s = full['jax']['median_s']
  return dict(
      batch=batch, steps=steps, num_timesteps=num_t, model=dict(
          image_shape=list(image_shape(config)), ch=config.model.ch,
          ch_mult=list(config.model.ch_mult), attn_resolutions=list(config.model.attn_resolutions)),
      forward_s=forward['median_s'], bare_forwards_s=bare_total,
      chain_s=chain_s, chain_compile_s=chain_compile_s,
      chain_overhead=chain_s / bare_total - 1.0,
      diffusers_s=full['diffusers']['median_s'],
      speedup_vs_diffusers=full['diffusers']['median_s'] / chain_s,
      timing=dict(bare={'forward': forward}, full=full),
      load=common.merge_loads([forward['load'], full['jax']['load']]))


def task_bpd(spec: Spec) -> Result:
  """Row 5: the full variational bound (all T terms) vs the bare forward pass."""
  jax = _jax_setup(spec)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import likelihood  # pylint: disable=g-import-not-at-top
  config = fashion_config(spec)
  batch = int(spec['bpd_batch'])
  fwd = JaxForward(config, batch)
  d, model_fn = fwd.d, fwd.model_fn
  x0 = jnp.round(jax.random.uniform(jax.random.key(5), (batch,) + image_shape(config),
                                    minval=0, maxval=255)) / 127.5 - 1.0
  bpd = jax.jit(lambda p, x0, key: likelihood.calc_bpd_loop(d, model_fn(p), x0, key))
  bpd = bpd.lower(fwd.params, x0, jax.random.key(0)).compile()
  run_bpd = lambda: jax.block_until_ready(bpd(fwd.params, x0, jax.random.key(0)))
  num_t = d.num_timesteps
  loop, forward = _time_against_bare_forwards(fwd, {'bpd': run_bpd}, forwards=num_t, spec=spec)
  fwd_ips = batch / forward['median_s']
  bpd_ips = batch / loop['bpd']['median_s']
  return dict(batch=batch, num_timesteps=num_t, bpd_images_per_s=bpd_ips,
              forward_images_per_s=fwd_ips,
              # Each image goes through T forward passes.
              fraction_of_forward=bpd_ips * num_t / fwd_ips,
              timing=dict(bare={'forward': forward}, loop=loop),
              load=common.merge_loads([forward['load'], loop['bpd']['load']]))


def task_fashion_train(spec: Spec) -> Result:
  """Row 7's consumer: the embedded default's training step at its own batch."""
  _jax_setup(spec)
  config = fashion_config(spec)
  batch = int(config.training.batch_size)
  step = JaxTrain(config, batch)
  timing = common.time_interleaved({'jax': step}, repeats=spec['repeats'],
                                   warmup=spec['warmup'], min_seconds=spec['min_seconds'])
  return dict(batch=batch, images_per_s=_rate(batch, timing['jax']), timing=timing,
              load=timing['jax']['load'])


def task_compile(spec: Spec) -> Result:
  """Row 6: compile the CIFAR-10 train step and sampler (run twice on one cache dir)."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = spec['compile_cache_dir']
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  config = cifar_config(spec)
  batch = int(spec['batch'])
  files_before = len(os.listdir(cache)) if os.path.isdir(cache) else 0
  with common.LoadMonitor() as load:
    train = JaxTrain(config, batch)
    model, d, shape = _build_jax(config)
    chain = jax.jit(lambda p, key: sampling.p_sample_loop(
        d, lambda x, t: model.apply({'params': p}, x, t, train=False), (batch,) + shape, key))
    t0 = time.perf_counter()
    lowered = chain.lower(train.state.ema_params, jax.random.key(0))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
  return dict(batch=batch, cache_files_before=files_before,
              train=dict(train.compile_s, total_s=sum(train.compile_s.values())),
              sampler=dict(trace_lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0),
              load=load.result)


def _write_quick_fashion(root: str) -> tuple:
  """A small synthetic Fashion-MNIST (IDX files) under root: (idx_dir, tfds_dir)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.datasets import fashion_mnist_idx as fm  # pylint: disable=g-import-not-at-top
  idx_dir, data_dir = os.path.join(root, 'idx'), os.path.join(root, 'tfds')
  os.makedirs(idx_dir)
  rng = np.random.default_rng(0)
  for split, n in (('train', 512), ('test', 64)):
    images_name, labels_name = fm.IDX_FILES[split]
    fm.write_idx_gz(os.path.join(idx_dir, images_name),
                    rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    fm.write_idx_gz(os.path.join(idx_dir, labels_name), (np.arange(n) % 10).astype(np.uint8))
  return idx_dir, data_dir


def task_pipeline(spec: Spec) -> Result:
  """Row 7: input_pipeline.make_train_iterator on Fashion-MNIST, images/s."""
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config()
  if not spec['quick']:
    return _pipeline(config, spec)
  # The smoke run must not depend on the real data being installed.
  with tempfile.TemporaryDirectory(prefix='ddpm_bench_data_') as root:
    config.data.manual_dir, config.data.data_dir = _write_quick_fashion(root)
    config.data.shuffle_buffer = 256
    return _pipeline(config, spec)


def _pipeline(config, spec: Spec) -> Result:
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  batch = int(config.training.batch_size)
  t0 = time.perf_counter()
  batches = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
  next(batches)
  first_batch_s = time.perf_counter() - t0
  per_sample = int(spec['pipeline_batches'])
  for _ in range(per_sample):  # warm-up: AUTOTUNE settles
    next(batches)
  times = []
  with common.LoadMonitor() as load:
    for _ in range(spec['repeats']):
      t0 = time.perf_counter()
      for _ in range(per_sample):
        next(batches)
      times.append((time.perf_counter() - t0) / per_sample)
  timing = common.summarize(times)
  return dict(batch=batch, dataset=config.data.dataset, first_batch_s=first_batch_s,
              batches_per_sample=per_sample, images_per_s=batch / timing['median_s'],
              timing=timing, load=load.result)


def _device_peak_mib(framework: str, reset: bool = False):
  """Peak accelerator memory (GPU/TPU); None on the CPU, where RSS says it all."""
  if framework == 'torch':
    torch = _torch()
    if not torch.cuda.is_available():
      return None
    if reset:
      torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / common.MIB
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  # JAX keeps one peak for the process's lifetime: an upper bound here.
  return None if not stats else stats.get('peak_bytes_in_use', 0) / common.MIB


def _measure_one(name: str, build: Callable[[], Callable[[], None]], spec: Spec,
                 batch: int) -> Result:
  """Images/s and peak memory of one workload, built from scratch in this process."""
  framework = name.split('_')[0]
  mem = common.PeakMemory()
  fn = build()
  timing = common.time_interleaved({'w': fn}, repeats=spec['scaling_repeats'],
                                   warmup=spec['warmup'], min_seconds=spec['min_seconds'])['w']
  _device_peak_mib(framework, reset=True)
  with mem.measure():
    fn()
  out = dict(images_per_s=batch / timing['median_s'], median_s=timing['median_s'],
             memory=mem.result, device_peak_mib=_device_peak_mib(framework),
             load=timing['load'])
  if hasattr(fn, 'cost'):
    out['xla_memory_mib'] = fn.cost.get('xla_memory_mib')
  del fn
  common.release_free_memory()
  return out


def task_scaling(spec: Spec) -> Result:
  """Row 8: images/s and peak memory against batch size (CIFAR-10 U-Net)."""
  _jax_setup(spec)
  config = cifar_config(spec)
  builders = {
      'jax_forward': lambda b: JaxForward(config, b),
      'torch_forward': lambda b: TorchForward(config, b),
      'jax_train': lambda b: JaxTrain(config, b),
      'torch_train': lambda b: TorchTrain(config, b),
  }
  wanted = spec['scaling_workloads']
  rows: List[Result] = []
  for batch in spec['scaling_batches']:
    row: Result = dict(batch=batch)
    for name in wanted:
      row[name] = _measure_one(name, functools.partial(builders[name], batch), spec, batch)
    rows.append(row)
  loads = [r[n]['load'] for r in rows for n in wanted]
  return dict(rows=rows, load=common.merge_loads(loads))


def task_steps(spec: Spec) -> Result:
  """Row 8: sampling time against the number of steps (Fashion-MNIST U-Net)."""
  jax = _jax_setup(spec)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  config = fashion_config(spec)
  batch = int(spec['sample_batch'])
  fwd = JaxForward(config, batch)
  d, shape = fwd.d, (batch,) + image_shape(config)
  rows, loads = [], []
  for steps in spec['step_counts']:
    steps = min(int(steps), d.num_timesteps)
    chain = jax.jit(lambda p, key, steps=steps: sampling.respaced_sample_loop(
        d, fwd.model_fn(p), shape, key, num_steps=steps)).lower(
            fwd.params, jax.random.key(0)).compile()
    run = lambda chain=chain: np.asarray(chain(fwd.params, jax.random.key(0)))
    timing = common.time_interleaved({'chain': run}, repeats=spec['sample_repeats'],
                                     warmup=0)['chain']
    rows.append(dict(steps=steps, seconds=timing['median_s'],
                     ms_per_step=1e3 * timing['median_s'] / steps))
    loads.append(timing['load'])
  return dict(batch=batch, rows=rows, load=common.merge_loads(loads))


TASKS: Dict[str, Callable[[Spec], Result]] = {
    'pair': task_pair,
    'peak': task_peak,
    'sampling': task_sampling,
    'bpd': task_bpd,
    'fashion_train': task_fashion_train,
    'compile': task_compile,
    'pipeline': task_pipeline,
    'scaling': task_scaling,
    'steps': task_steps,
}
# Tasks that import JAX (all but the TensorFlow input pipeline's), and those
# that also need PyTorch and diffusers.
JAX_TASKS = frozenset(TASKS) - {'pipeline'}
TORCH_TASKS = frozenset({'pair', 'peak', 'sampling', 'scaling'})


def run_tasks(names: List[str], spec: Spec) -> Dict[str, Result]:
  """Runs tasks in this process; a failing task reports its error, the rest go on."""
  results: Dict[str, Result] = {}
  info: Dict[str, Any] = {}
  if any(n in JAX_TASKS for n in names):
    _jax_setup(spec)
    info.update(_jax_device_info())
  if any(n in TORCH_TASKS for n in names):
    info.update(_torch_info())
  for name in names:
    t0 = time.perf_counter()
    try:
      result = TASKS[name](spec)
    except Exception as e:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      result = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
    result['task_wall_s'] = time.perf_counter() - t0
    result['info'] = info
    results[name] = result
    common.release_free_memory()
  return results


def main(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tasks', required=True, help='comma-separated: ' + ','.join(TASKS))
  parser.add_argument('--spec', required=True, help='JSON settings (see run.py)')
  parser.add_argument('--result', required=True, help='where to write the JSON result')
  args = parser.parse_args(argv)
  names = args.tasks.split(',')
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    parser.error(f'unknown tasks {unknown}; valid: {", ".join(TASKS)}')
  # The XLA:CPU flags main.py trains with (before JAX makes its backend).
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_xla_flags()
  results = run_tasks(names, json.loads(args.spec))
  with open(args.result, 'w') as f:
    json.dump(results, f, default=float)


if __name__ == '__main__':
  main(sys.argv[1:])
