"""The benchmark workloads: ddpm-jax next to diffusers + PyTorch, one task at a time.

Each task builds its models, warms them up, measures them and returns a
JSON-serialisable dict. `benchmarks/run.py` runs tasks in worker processes:

  python benchmarks/workloads.py --tasks pair,peak --spec '{...}' --result out.json

Where a task compares the two frameworks, both live in the same process and
their timed calls take turns. The peer is the same network:
`diffusers_unet_kwargs` writes the diffusers `UNet2DModel` config that
computes the ddpm-jax U-Net's function (the layout of the public
google/ddpm-cifar10-32 weights); a test checks it against ddpm-jax's own
diffusers-config reader.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any
from collections.abc import Callable, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, 'tests'), os.path.dirname(os.path.abspath(__file__))):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

Spec = Mapping[str, Any]
Result = dict[str, Any]
# Row 8's workloads, each built alone at every batch size.
SCALING_WORKLOADS = ('jax_forward', 'torch_forward', 'jax_train', 'torch_train')


def experiment_config(name: str, spec: Spec):
  """configs/<name>.py, unconditional, in the run's dtype; --quick: one 8x8 level with attention."""
  config = importlib.import_module(f'configs.{name}').get_config()
  # The unconditional U-Net, which the peers build too (a class embedding adds one lookup).
  config.model.num_classes = 0
  config.sampling.guidance_scale = config.sampling.class_labels = None
  if spec['quick']:  # Every kind of layer, little to compile.
    config.data.image_size, config.model.ch, config.model.ch_mult = 8, 32, (1,)
    config.model.num_res_blocks, config.model.attn_resolutions = 1, (8,)
    config.training.batch_size = 2
  if 'num_timesteps' in spec:
    config.diffusion.num_timesteps = int(spec['num_timesteps'])
  config.model.dtype = spec.get('dtype', 'float32')
  return config


def image_shape(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def model_and_diffusion(config):
  """(U-Net, diffusion, image shape) of `config`, as `inference.build_model_and_diffusion` builds them.

  Built here from the models and the schedule alone: `inference` imports the
  input pipeline and with it TensorFlow, which a GPU machine's Python may lack.
  """
  from ddpm_jax import diffusion  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet_from_config  # pylint: disable=g-import-not-at-top

  shape = image_shape(config)
  learned_variance = config.diffusion.model_var_type in ('learned', 'learned_range')
  model = unet_from_config(config.model, out_channels=shape[-1] * (2 if learned_variance else 1))
  dc = config.diffusion
  d = diffusion.make_diffusion(dc.beta_schedule, dc.num_timesteps, dc.beta_start, dc.beta_end)
  return model, d, shape


def diffusers_unet_kwargs(
  model_config, image_size: int, in_channels: int, out_channels: int
) -> dict[str, Any]:
  """The `diffusers.UNet2DModel` keyword arguments of the network of `model_config`.

  Raises:
    ValueError: for a config diffusers cannot express (no resampling convs).
  """
  from ddpm_jax.models import layers  # pylint: disable=g-import-not-at-top

  if not model_config.resamp_with_conv:
    raise ValueError('diffusers UNet2DModel always resamples with convolutions')
  ch = int(model_config.ch)
  mults = [int(m) for m in model_config.ch_mult]
  attn = {int(r) for r in model_config.attn_resolutions}
  has_attn = [image_size // 2**level in attn for level in range(len(mults))]
  return dict(
    sample_size=image_size,
    in_channels=in_channels,
    out_channels=out_channels,
    block_out_channels=tuple(ch * m for m in mults),
    layers_per_block=int(model_config.num_res_blocks),
    down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in has_attn),
    up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(has_attn)),
    # The DDPM settings: sines first, t + 1 in the embedding's frequency
    # shift, TF-style stride-2 padding, single-head attention.
    norm_eps=layers.NORM_EPS,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    attention_head_dim=None,
    norm_num_groups=layers.NUM_GROUPS,
    act_fn='silu',
    dropout=float(model_config.dropout),
    # A class-conditional U-Net: its classes and the null label, added to the time embedding.
    num_class_embeds=int(model_config.num_classes) + 1 if model_config.num_classes else None,
  )


# ---------------------------------------------------------------------------
# The ddpm-jax side.


def _compile(fn, *args) -> tuple[Any, dict[str, float], dict[str, Any]]:
  """(compiled program, its compile times, XLA's FLOP count and memory) of jitted `fn(*args)`.

  FLOPs come from the lowered (not yet optimised) program: the same count on
  every backend, where a GPU's compiled program hides its convolutions inside
  library calls that the compiled cost analysis does not count.
  """
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  times = dict(trace_lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
  cost: dict[str, Any] = dict(flops=float(lowered.cost_analysis()['flops']))
  try:
    mem = compiled.memory_analysis()
    cost['xla_memory_mib'] = {
      name: round(getattr(mem, name + '_size_in_bytes') / common.MIB, 1)
      for name in ('argument', 'output', 'temp', 'alias')
    }
  except Exception as e:  # pylint: disable=broad-except  # Not every backend has it.
    cost['memory_error'] = repr(e)
  return compiled, times, cost


def _flops(program: Callable[..., Any], model, layers, *args) -> float:
  """XLA's FLOP count of `program(model, *args)` with the U-Net built from `layers`.

  By default the reference layers: the network as defined, which is what
  PyTorch runs. The fast CPU layers execute a different count (the upsampling
  convolution at the input resolution does fewer multiply-adds; the matmul
  input gradient also computes the taps that fall on the padding), so the
  FLOP/s of both frameworks use this count, as model-FLOPs utilisation does.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import layers as layer_sets  # pylint: disable=g-import-not-at-top

  model = model.clone(layers=layer_sets.REFERENCE if layers is None else layers)
  return float(jax.jit(functools.partial(program, model)).lower(*args).cost_analysis()['flops'])


class JaxTrain:
  """The real training step (train_state.train_steps: Adam, clipping, EMA, skip)."""

  def __init__(self, config, batch: int, seed: int = 0):
    import jax  # pylint: disable=g-import-not-at-top
    from ddpm_jax import train_state as ts  # pylint: disable=g-import-not-at-top

    config = config.copy_and_resolve_references()
    config.training.batch_size = batch
    self.model, d, shape = model_and_diffusion(config)
    self.state = jax.jit(
      functools.partial(ts.create_train_state, self.model, config, image_shape=shape)
    )(jax.random.key(seed))
    self.batches = {
      'image': jax.random.uniform(jax.random.key(seed + 1), (1, batch) + shape, minval=-1, maxval=1)
    }
    self.key = jax.random.key(seed + 2)
    self._program = lambda model, state, *args: ts.train_steps(
      state.replace(apply_fn=model.apply), *args, diffusion=d, config=config
    )
    self.compiled, self.compile_s, self.cost = _compile(
      jax.jit(functools.partial(self._program, self.model), donate_argnums=0),
      self.state,
      self.batches,
      self.key,
    )

  def flops(self, layers=None) -> float:
    return _flops(self._program, self.model, layers, self.state, self.batches, self.key)

  def __call__(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    self.state, metrics = self.compiled(self.state, self.batches, self.key)
    jax.block_until_ready((self.state, metrics))


class JaxForward:
  """One evaluation forward pass of the U-Net (the sampling workload)."""

  def __init__(self, config, batch: int, seed: int = 0):
    import jax  # pylint: disable=g-import-not-at-top

    self.model, self.d, shape = model_and_diffusion(config)
    self.x = jax.random.normal(jax.random.key(seed + 1), (batch,) + shape)
    self.t = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, self.d.num_timesteps)
    self.params = jax.jit(functools.partial(self.model.init, train=False))(
      jax.random.key(seed), self.x, self.t
    )['params']
    self._program = lambda model, p, x, t: model.apply({'params': p}, x, t, train=False)
    self.compiled, self.compile_s, self.cost = _compile(
      jax.jit(functools.partial(self._program, self.model)), self.params, self.x, self.t
    )

  def flops(self, layers=None) -> float:
    return _flops(self._program, self.model, layers, self.params, self.x, self.t)

  def __call__(self) -> None:
    self.compiled(self.params, self.x, self.t).block_until_ready()


def _sampler(model, d, params, shape: tuple[int, ...], steps: int):
  """`_compile` of the sampler `(params, key) -> images`: all T steps, or respaced to `steps`."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import inference  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top

  if steps == d.num_timesteps:
    chain = lambda p, key: sampling.p_sample_loop(d, inference.make_model_fn(model, p), shape, key)
  else:
    chain = lambda p, key: sampling.respaced_sample_loop(
      d, inference.make_model_fn(model, p), shape, key, num_steps=steps
    )
  return _compile(jax.jit(chain), params, jax.random.key(0))


# ---------------------------------------------------------------------------
# The diffusers + PyTorch side: CUDA when this PyTorch has it, else the CPU.


@functools.lru_cache(maxsize=None)
def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  from torch_peers import import_torchvision  # pylint: disable=g-import-not-at-top

  import_torchvision()  # diffusers imports torchvision; see tests/torch_peers.py.
  return torch


def _device():
  return _torch().device('cuda' if _torch().cuda.is_available() else 'cpu')


def _torch_sync() -> None:
  if _torch().cuda.is_available():
    _torch().cuda.synchronize()


def _torch_autocast(config):
  """The peer's counterpart of `model.dtype`: bfloat16 autocast (float32 parameters)."""
  return _torch().autocast(
    _device().type, dtype=_torch().bfloat16, enabled=config.model.dtype == 'bfloat16'
  )


def build_torch_unet(config, seed: int = 0):
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top

  _torch().manual_seed(seed)
  size, _, channels = image_shape(config)
  return UNet2DModel(**diffusers_unet_kwargs(config.model, size, channels, channels)).to(_device())


class TorchTrain:
  """The same step in PyTorch: eps-MSE on q(x_t|x_0), fused Adam, clipping, EMA."""

  def __init__(self, config, batch: int, seed: int = 0):
    import numpy as np  # pylint: disable=g-import-not-at-top

    torch = _torch()
    from torch.optim import swa_utils  # pylint: disable=g-import-not-at-top

    self.model, optim, dif = build_torch_unet(config, seed).train(), config.optim, config.diffusion
    self.opt = torch.optim.Adam(
      self.model.parameters(),
      lr=optim.learning_rate,
      eps=optim.eps,
      betas=(optim.beta1, optim.beta2),
      fused=True,
    )
    self.ema = swa_utils.AveragedModel(
      self.model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(optim.ema_decay)
    )
    betas = np.linspace(dif.beta_start, dif.beta_end, dif.num_timesteps, dtype=np.float64)
    self.acp = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32, device=_device())
    size, _, channels = image_shape(config)
    gen = torch.Generator().manual_seed(seed + 1)
    self.x = (torch.rand((batch, channels, size, size), generator=gen) * 2 - 1).to(_device())
    self.grad_clip = optim.grad_clip
    self.autocast = functools.partial(_torch_autocast, config)

  def __call__(self) -> None:
    torch, x0 = _torch(), self.x
    t = torch.randint(0, len(self.acp), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    a = self.acp[t].view(-1, 1, 1, 1)
    with self.autocast():
      eps = self.model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
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
    self.model = build_torch_unet(config, seed).eval()
    size, _, channels = image_shape(config)
    gen = torch.Generator().manual_seed(seed + 1)
    self.x = torch.randn((batch, channels, size, size), generator=gen).to(_device())
    self.t = torch.randint(0, config.diffusion.num_timesteps, (batch,), generator=gen).to(_device())
    self.autocast = functools.partial(_torch_autocast, config)

  def __call__(self) -> None:
    with _torch().inference_mode(), self.autocast():
      self.model(self.x, self.t)
    _torch_sync()


def _info(with_torch: bool) -> dict[str, Any]:
  """The worker's devices and frameworks, for the report's meta."""
  import jax  # pylint: disable=g-import-not-at-top

  info = dict(
    backend=jax.default_backend(),
    device_kind=jax.devices()[0].device_kind,
    num_devices=jax.device_count(),
    jax_version=jax.__version__,
    jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
    xla_flags=os.environ.get('XLA_FLAGS', ''),
  )
  if with_torch:
    torch = _torch()
    import diffusers  # pylint: disable=g-import-not-at-top

    info.update(
      torch_version=torch.__version__,
      diffusers_version=diffusers.__version__,
      torch_threads=torch.get_num_threads(),
      torch_device=str(_device()),
    )
    if torch.cuda.is_available():  # float32 on a GPU may run its matrix units in TF32.
      info.update(
        torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        torch_gpu=torch.cuda.get_device_name(),
      )
  return info


# ---------------------------------------------------------------------------
# Tasks.


def _timed(fns: Mapping[str, Callable[[], Any]], spec: Spec, repeats: int = 0) -> Result:
  return common.time_interleaved(fns, repeats=repeats or spec['repeats'], warmup=spec['warmup'])


def task_pair(spec: Spec) -> Result:
  """Rows 1-3: CIFAR-10 U-Net training step and forward pass, ddpm-jax vs diffusers."""
  import jax  # pylint: disable=g-import-not-at-top

  config, batch = experiment_config('cifar10', spec), int(spec['batch'])
  out: Result = dict(batch=batch)
  for name, jax_cls, torch_cls in (
    ('train', JaxTrain, TorchTrain),
    ('forward', JaxForward, TorchForward),
  ):
    jax_w, torch_w = jax_cls(config, batch), torch_cls(config, batch)
    timing = _timed({'jax': jax_w, 'torch': torch_w}, spec)
    rates = {fw: batch / timing[fw]['median_s'] for fw in timing}
    out[name] = dict(
      timing=timing,
      jax_cost=jax_w.cost,
      jax_compile=jax_w.compile_s,
      jax_images_per_s=rates['jax'],
      torch_images_per_s=rates['torch'],
      ratio=rates['jax'] / rates['torch'],
      jax_flops_per_image=jax_w.cost['flops'] / batch,
      model_flops_per_image=jax_w.flops() / batch,
    )
    if name == 'train':
      out['model'] = dict(
        image_shape=list(image_shape(config)),
        ch=config.model.ch,
        ch_mult=list(config.model.ch_mult),
        num_res_blocks=config.model.num_res_blocks,
        attn_resolutions=list(config.model.attn_resolutions),
        num_params=sum(p.size for p in jax.tree.leaves(jax_w.state.params)),
      )
    del jax_w, torch_w
    common.release_free_memory()
  return out


def task_peak(spec: Spec) -> Result:
  """Row 3's limit: the fastest matmul and convolution on this machine (run's dtype)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  torch = _torch()
  bf16 = spec.get('dtype', 'float32') == 'bfloat16'
  jdt, tdt = (jnp.bfloat16, torch.bfloat16) if bf16 else (jnp.float32, torch.float32)
  sizes = (256,) if spec['quick'] else (1024, 2048, 4096)
  if not spec['quick'] and jax.default_backend() != 'cpu':
    sizes += (8192,)  # An accelerator needs large products to reach its rate.
  # Convolutions of the CIFAR U-Net's shapes (3x3, stride 1, 'SAME').
  convs = [(2, 8, 32)] if spec['quick'] else [(8, 32, 128), (8, 16, 256), (8, 32, 256)]
  kernels: dict[str, Callable[[], Any]] = {}
  flops: dict[str, float] = {}

  def add(name, n_flops, jax_fn, jax_args, torch_fn, torch_args):
    jax_fn = jax.jit(jax_fn).lower(*jax_args).compile()
    kernels[f'jax_{name}'] = lambda: jax_fn(*jax_args).block_until_ready()
    kernels[f'torch_{name}'] = lambda: (torch_fn(*torch_args), _torch_sync())
    flops[f'jax_{name}'] = flops[f'torch_{name}'] = n_flops

  def randn(key, shape, torch_shape):
    return (
      jax.random.normal(jax.random.key(key), shape, jdt),
      torch.randn(*torch_shape, device=_device(), dtype=tdt),
    )

  for n in sizes:
    (a, ta), (b, tb) = randn(0, (n, n), (n, n)), randn(1, (n, n), (n, n))
    add(f'dot_{n}', 2.0 * n**3, jnp.dot, (a, b), torch.mm, (ta, tb))
  for batch, size, ch in convs:
    x, tx = randn(2, (batch, size, size, ch), (batch, ch, size, size))
    w, tw = randn(3, (3, 3, ch, ch), (ch, ch, 3, 3))
    add(
      f'conv_{batch}x{size}x{size}x{ch}',
      2.0 * batch * size * size * ch * ch * 9,
      functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(1, 1),
        padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      ),
      (x, w),
      functools.partial(torch.nn.functional.conv2d, padding=1),
      (tx, tw),
    )
  with torch.inference_mode():
    timing = common.time_interleaved(
      kernels,
      repeats=spec['repeats'] + 2,
      warmup=spec['warmup'] + 1,
      min_seconds=0.0 if spec['quick'] else 0.2,
    )
  rates = {name: flops[name] / timing[name]['median_s'] for name in kernels}
  best = max(rates, key=rates.get)
  return dict(flops_per_s=rates, best_kernel=best, limit_flops_per_s=rates[best], timing=timing)


def _time_against_bare_forwards(
  fwd: JaxForward, long_runs: Mapping[str, Callable[[], Any]], *, forwards: int, spec: Spec
) -> tuple[Result, Result]:
  """Times runs of `forwards` forward passes each (a chain, the bound) against bare ones.

  The bare forward passes (samples of up to 250 calls) take turns with the
  long runs, so that the machine's drift over the minutes the long runs take
  enters both sides alike. Returns the long runs' timings and the bare
  forward pass's, per call.
  """
  calls = min(forwards, 250)

  def run_bare():
    for _ in range(calls):
      fwd()

  for _ in range(spec['warmup'] + 2):
    fwd()
  # The long runs are compiled ahead of time: no warm-up call.
  timing = common.time_interleaved(
    dict(long_runs, bare=run_bare), repeats=spec['sample_repeats'], warmup=0
  )
  bare = timing.pop('bare')
  return timing, dict(
    common.summarize([t / calls for t in bare['times_s']]), calls_per_sample=calls
  )


def task_sampling(spec: Spec) -> Result:
  """Row 4: the scan-compiled chain vs T bare forwards; 16 images vs DDPMPipeline."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusers import DDPMPipeline, DDPMScheduler  # pylint: disable=g-import-not-at-top

  config = experiment_config('fashion_mnist', spec)
  batch, steps = int(spec['sample_batch']), int(spec['sample_steps'])
  fwd = JaxForward(config, batch)
  chain, chain_compile, _ = _sampler(fwd.model, fwd.d, fwd.params, fwd.x.shape, steps)
  scheduler = DDPMScheduler(
    num_train_timesteps=fwd.d.num_timesteps,
    beta_start=config.diffusion.beta_start,
    beta_end=config.diffusion.beta_end,
    beta_schedule='linear',
    variance_type='fixed_large',
    clip_sample=True,
    prediction_type='epsilon',
  )
  pipe = DDPMPipeline(unet=build_torch_unet(config).eval(), scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)

  def run_pipe():
    with _torch_autocast(config):
      return pipe(
        batch_size=batch,
        generator=_torch().Generator().manual_seed(0),
        num_inference_steps=steps,
        output_type='np',
      )

  full, forward = _time_against_bare_forwards(
    fwd,
    {'jax': lambda: np.asarray(chain(fwd.params, jax.random.key(0))), 'diffusers': run_pipe},
    forwards=steps,
    spec=spec,
  )
  bare_total, chain_s = forward['median_s'] * steps, full['jax']['median_s']
  return dict(
    batch=batch,
    steps=steps,
    num_timesteps=fwd.d.num_timesteps,
    model=dict(
      image_shape=list(image_shape(config)),
      ch=config.model.ch,
      ch_mult=list(config.model.ch_mult),
      attn_resolutions=list(config.model.attn_resolutions),
    ),
    forward_s=forward['median_s'],
    bare_forwards_s=bare_total,
    chain_s=chain_s,
    chain_compile_s=sum(chain_compile.values()),
    chain_overhead=chain_s / bare_total - 1.0,
    diffusers_s=full['diffusers']['median_s'],
    speedup_vs_diffusers=full['diffusers']['median_s'] / chain_s,
    timing=dict(bare={'forward': forward}, full=full),
  )


def task_bpd(spec: Spec) -> Result:
  """Row 5: the full variational bound (all T terms) vs the bare forward pass."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import inference  # pylint: disable=g-import-not-at-top
  from ddpm_jax import likelihood  # pylint: disable=g-import-not-at-top

  config, batch = experiment_config('fashion_mnist', spec), int(spec['bpd_batch'])
  fwd = JaxForward(config, batch)
  x0 = jnp.round(jax.random.uniform(jax.random.key(5), fwd.x.shape, maxval=255)) / 127.5 - 1.0
  bpd, _, _ = _compile(
    jax.jit(
      lambda p, x0, key: likelihood.calc_bpd_loop(
        fwd.d, inference.make_model_fn(fwd.model, p), x0, key
      )
    ),
    fwd.params,
    x0,
    jax.random.key(0),
  )
  num_t = fwd.d.num_timesteps
  loop, forward = _time_against_bare_forwards(
    fwd,
    {'bpd': lambda: jax.block_until_ready(bpd(fwd.params, x0, jax.random.key(0)))},
    forwards=num_t,
    spec=spec,
  )
  fwd_ips, bpd_ips = batch / forward['median_s'], batch / loop['bpd']['median_s']
  return dict(
    batch=batch,
    num_timesteps=num_t,
    bpd_images_per_s=bpd_ips,
    forward_images_per_s=fwd_ips,
    # Each image goes through T forward passes.
    fraction_of_forward=bpd_ips * num_t / fwd_ips,
    timing=dict(bare={'forward': forward}, loop=loop),
  )


def task_fashion_train(spec: Spec) -> Result:
  """Row 7's consumer: the embedded default's training step at its own batch."""
  config = experiment_config('fashion_mnist', spec)
  batch = int(config.training.batch_size)
  timing = _timed({'jax': JaxTrain(config, batch)}, spec)
  return dict(batch=batch, images_per_s=batch / timing['jax']['median_s'], timing=timing)


def task_compile(spec: Spec) -> Result:
  """Row 6: compile the CIFAR-10 training step and sampler (on the worker's cache dir)."""
  from ddpm_jax import inference  # pylint: disable=g-import-not-at-top

  files_before = len(os.listdir(spec['cache_dir']))
  config, batch = experiment_config('cifar10', spec), int(spec['batch'])
  train = JaxTrain(config, batch)
  model, d, shape = inference.build_model_and_diffusion(config)
  _, sampler, _ = _sampler(model, d, train.state.ema_params, (batch,) + shape, d.num_timesteps)
  return dict(
    batch=batch,
    cache_files_before=files_before,
    train=dict(train.compile_s, total_s=sum(train.compile_s.values())),
    sampler=dict(sampler, total_s=sum(sampler.values())),
  )


def task_pipeline(spec: Spec) -> Result:
  """Row 7: input_pipeline.make_train_iterator on Fashion-MNIST, images/s."""
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top

  config = fashion_mnist.get_config()
  if not spec['quick']:
    return _pipeline(config, spec)
  # The smoke run must not depend on the real data being installed.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.datasets import fashion_mnist_idx as fm  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory(prefix='ddpm_bench_data_') as root:
    config.data.manual_dir = os.path.join(root, 'idx')
    config.data.data_dir = os.path.join(root, 'tfds')
    config.data.shuffle_buffer = 256
    os.makedirs(config.data.manual_dir)
    rng = np.random.default_rng(0)
    for split, n in (('train', 512), ('test', 64)):
      images, labels = (os.path.join(config.data.manual_dir, f) for f in fm.IDX_FILES[split])
      fm.write_idx_gz(images, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
      fm.write_idx_gz(labels, (np.arange(n) % 10).astype(np.uint8))
    return _pipeline(config, spec)


def _pipeline(config, spec: Spec) -> Result:
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  batches = input_pipeline.make_train_iterator(config, process_index=0, process_count=1)
  next(batches)
  first_batch_s = time.perf_counter() - t0
  per_sample = int(spec['pipeline_batches'])

  def run():
    for _ in range(per_sample):
      next(batches)

  run()  # Warm-up: AUTOTUNE settles.
  times = common.time_interleaved({'run': run}, repeats=spec['repeats'], warmup=0)['run']
  timing = common.summarize([t / per_sample for t in times['times_s']])
  batch = int(config.training.batch_size)
  return dict(
    batch=batch,
    dataset=config.data.dataset,
    first_batch_s=first_batch_s,
    batches_per_sample=per_sample,
    images_per_s=batch / timing['median_s'],
    timing=timing,
  )


def _device_peak_mib(framework: str) -> float | None:
  """Peak accelerator memory so far; None on the CPU, where RSS says it all."""
  if framework == 'torch':
    cuda = _torch().cuda
    return cuda.max_memory_allocated() / common.MIB if cuda.is_available() else None
  import jax  # pylint: disable=g-import-not-at-top

  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  # JAX keeps one peak for the process's lifetime: an upper bound.
  return stats['peak_bytes_in_use'] / common.MIB if stats else None


def task_scaling(spec: Spec) -> Result:
  """Row 8: images/s and peak memory against batch size, each workload built alone."""
  config = experiment_config('cifar10', spec)
  classes = dict(
    zip(SCALING_WORKLOADS, (JaxForward, TorchForward, JaxTrain, TorchTrain), strict=True)
  )
  rows: list[Result] = []
  for batch in spec['scaling_batches']:
    row: Result = dict(batch=batch)
    for name, cls in classes.items():
      mem = common.PeakMemory()
      fn = cls(config, batch)
      timing = _timed({'w': fn}, spec, repeats=spec['scaling_repeats'])['w']
      if name.startswith('torch') and _torch().cuda.is_available():
        _torch().cuda.reset_peak_memory_stats()
      with mem:
        fn()
      row[name] = dict(
        images_per_s=batch / timing['median_s'],
        median_s=timing['median_s'],
        memory=mem.result,
        device_peak_mib=_device_peak_mib(name.split('_')[0]),
        xla_memory_mib=getattr(fn, 'cost', {}).get('xla_memory_mib'),
      )
      del fn
      common.release_free_memory()
    rows.append(row)
  return dict(rows=rows)


def task_steps(spec: Spec) -> Result:
  """Row 8: sampling time against the number of steps (Fashion-MNIST U-Net)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  config, batch = experiment_config('fashion_mnist', spec), int(spec['sample_batch'])
  fwd = JaxForward(config, batch)
  rows = []
  for steps in spec['step_counts']:
    chain = _sampler(fwd.model, fwd.d, fwd.params, fwd.x.shape, steps)[0]
    seconds = common.time_interleaved(
      {'chain': lambda chain=chain: np.asarray(chain(fwd.params, jax.random.key(0)))},
      repeats=spec['sample_repeats'],
      warmup=0,
    )['chain']['median_s']
    rows.append(dict(steps=steps, seconds=seconds, ms_per_step=1e3 * seconds / steps))
  return dict(batch=batch, rows=rows)


TASKS: dict[str, Callable[[Spec], Result]] = dict(
  pair=task_pair,
  peak=task_peak,
  sampling=task_sampling,
  bpd=task_bpd,
  fashion_train=task_fashion_train,
  scaling=task_scaling,
  steps=task_steps,
  compile=task_compile,
  pipeline=task_pipeline,
)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tasks', required=True, help='comma-separated: ' + ','.join(TASKS))
  parser.add_argument('--spec', required=True, help='JSON settings (see run.py)')
  parser.add_argument('--result', required=True, help='where to write the JSON result')
  args = parser.parse_args(argv)
  names, spec = args.tasks.split(','), json.loads(args.spec)
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_xla_flags()  # main.py's XLA:CPU flags, before JAX makes its backend.
  import jax  # pylint: disable=g-import-not-at-top

  if spec.get('cache_dir'):
    # A program compiled by one worker loads in the next instead of compiling again.
    jax.config.update('jax_compilation_cache_dir', spec['cache_dir'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  info = _info(with_torch=bool({'pair', 'peak', 'sampling', 'scaling'} & set(names)))
  results: dict[str, Result] = {}
  for name in names:
    t0 = time.perf_counter()
    try:
      results[name] = TASKS[name](spec)
    except Exception as e:  # pylint: disable=broad-except  # The other tasks go on.
      results[name] = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
    results[name]['task_wall_s'] = time.perf_counter() - t0
    common.release_free_memory()
  with open(args.result, 'w') as f:
    json.dump(dict(info=info, results=results), f, default=float)


if __name__ == '__main__':
  main(sys.argv[1:])
