"""The same networks in diffusers/PyTorch, timed the way `sd_jax.bench` times sd_jax: the baselines of its ratios.

What a researcher would run instead of sd_jax is diffusers on PyTorch. `python -m sd_jax.bench --baseline=eager`
(or `compile`, or `eager,compile`) builds diffusers' `UNet2DConditionModel` from the very config and weights the
sd_jax measurement used (sd_jax/weights/unet.py's key map), times it in the same process right after sd_jax, and
reports `ratio = diffusers time / sd_jax time` (above 1: sd_jax is faster):

  train step   forward + backward + AdamW on the U-Net at the same batch, latent size, context and dtype as
               the bench's `LatentUNetTask` step (x_t from the same DDPM schedule, ε-MSE loss). sd_jax's step also
               does what its loop does every step (EMA, gradient clipping, min-SNR weights, caption dropout): the
               ratio is of the step a user runs in each codebase.
  pipeline     text to image from a model directory: diffusers' `StableDiffusionPipeline` (its DDIM scheduler,
               steps, guidance, size; text encoding and VAE decode included) against sd_jax's
               `generate.TextToImage.generate` on the same directory (exported with `export_diffusers`).

PyTorch runs eagerly with diffusers' default attention (`scaled_dot_product_attention`, SDPA); `compile` wraps the
U-Net in `torch.compile` (its first call, which compiles, is reported apart). torch and diffusers are the `[test]`
extras: sd_jax itself never imports them, and this module imports them only when a baseline is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

MODES = ("eager", "compile")


def _torch():
  try:
    import diffusers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"--baseline needs torch and diffusers ({e.name} is missing): install them with "
                      "`pip install -c constraints.txt -e \".[test]\"`, or leave --baseline out.") from e
  return torch


def parse_modes(text: str | Sequence[str]) -> list[str]:
  """'eager,compile' → ['eager', 'compile']; '' or 'none' → []."""
  items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
  if items in ([], ["none"]):
    return []
  unknown = [m for m in items if m not in MODES]
  if unknown:
    raise ValueError(f"--baseline={','.join(items)}: unknown {unknown}; use eager, compile, eager,compile or none.")
  return list(dict.fromkeys(items))


@dataclasses.dataclass
class Timing:
  """One baseline measurement: the median of the timed calls, and the first call (compiling, for `compile`)."""
  mode: str
  median_s: float
  first_call_s: float
  times_s: list[float]
  threads: int
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _timed(fn: Callable[[], Any], steps: int, warmup: int) -> tuple[float, list[float]]:
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, times


def torch_unet(module, params: Mapping[str, Any]):
  """diffusers' UNet2DConditionModel with `module`'s config and `params` (float32, train mode)."""
  torch = _torch()
  import diffusers  # pylint: disable=import-outside-toplevel

  from sd_jax.models import unet as unet_lib  # pylint: disable=import-outside-toplevel
  from sd_jax.weights import unet as unet_weights  # pylint: disable=import-outside-toplevel
  config = {k: v for k, v in unet_lib.unet_config_to_diffusers(module).items() if not k.startswith("_")}
  net = diffusers.UNet2DConditionModel.from_config(config)
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
           unet_weights.unet_to_diffusers_state_dict(params).items()}
  net.load_state_dict(state, strict=True)
  return net.float().train()


def time_unet_train_step(net, *, latents: np.ndarray, context: np.ndarray, alphas_cumprod: np.ndarray,
                         mode: str = "eager", steps: int = 5, warmup: int = 1, lr: float = 1e-4,
                         weight_decay: float = 1e-2, seed: int = 0, device: str = "cpu",
                         autocast_dtype: str | None = None) -> Timing:
  """Forward + backward + AdamW of `net` on one batch (fresh t and ε each step), as a diffusers training script
  runs it; `mode="compile"` wraps the U-Net in torch.compile. `device` "cuda": on the GPU, with float32 weights
  and `autocast_dtype` ("bfloat16") activations, as diffusers' scripts run `--mixed_precision=bf16`."""
  torch = _torch()
  generator = torch.Generator(device=device).manual_seed(seed)
  x0 = torch.from_numpy(np.asarray(latents, np.float32).transpose(0, 3, 1, 2).copy()).to(device)  # NHWC -> NCHW
  ctx = torch.from_numpy(np.array(context, np.float32)).to(device)  # a writable copy
  abar = torch.from_numpy(np.array(alphas_cumprod, np.float32)).to(device)
  net = net.to(device)
  model = torch.compile(net) if mode == "compile" else net
  autocast = (torch.autocast(device_type=device, dtype=getattr(torch, autocast_dtype)) if autocast_dtype
              else contextlib.nullcontext())
  optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
  losses = []

  def step():
    t = torch.randint(0, len(abar), (x0.shape[0],), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with autocast:
      prediction = model(x_t, t, ctx).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))

  first, times = _timed(step, steps, warmup)
  if not all(np.isfinite(losses)):
    raise FloatingPointError(f"the diffusers baseline step produced losses {losses}; its timing would be "
                             "meaningless.")
  return Timing(mode, statistics.median(times), first, times, torch.get_num_threads(), {"loss": losses[-1]})


def time_pipeline(diffusers_dir, prompts: Sequence[str], *, steps: int, guidance: float, height: int, width: int,
                  mode: str = "eager", repeats: int = 3, warmup: int = 1, seed: int = 0) -> Timing:
  """Seconds of diffusers' StableDiffusionPipeline (DDIM, eta 0) from `diffusers_dir`: prompts to decoded images."""
  torch = _torch()
  import diffusers  # pylint: disable=import-outside-toplevel
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(diffusers_dir), safety_checker=None,
                                                           feature_extractor=None, requires_safety_checker=False)
  pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  if mode == "compile":
    pipe.unet = torch.compile(pipe.unet)
  shapes = []

  def call():
    with torch.inference_mode():
      out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                 generator=torch.Generator().manual_seed(seed), output_type="np")
    shapes.append(out.images.shape)

  first, times = _timed(call, repeats, warmup)
  return Timing(mode, statistics.median(times), first, times, torch.get_num_threads(),
                {"images_shape": list(shapes[-1])})
