"""Text-to-image and image-to-image with a trained or imported Stable Diffusion: `python -m sd_jax.sample`.

  python -m sd_jax.sample --workdir workdirs/shapes_ldm --prompt "a red circle" "a blue square" --num_images 4 \\
      --steps 25 --sampler dpmpp_2m --guidance 4 --out /tmp/samples
  python -m sd_jax.sample --pretrained sd15 --prompts_file prompts.txt --negative_prompt "blurry" --out /tmp/s
  python -m sd_jax.sample --pretrained sd15 --prompt "a watercolour fox" --init_image fox.png --strength 0.6 \\
      --out /tmp/img2img

--workdir takes a finished ldm run (its WORKDIR/export: the EMA U-Net with the VAE and text tower it was trained
with); --pretrained an sd_jax model directory (`python -m sd_jax.convert --from_diffusers DIR --out OUT`). The
command writes OUT/0000_<prompt>.png, ... (num_images per prompt, prompt-major), OUT/grid.png (the images under
their prompts) and OUT/settings.json (every setting, the resolved scheduler and the file names).

The library behind it is `Pipeline`:

  pipe = Pipeline.from_model_dir("workdirs/shapes_ldm/export")      # or Pipeline.from_workdir("workdirs/shapes_ldm")
  images = pipe.generate(["a red circle"], num_images=2, steps=25, guidance=4.0, seed=0)   # uint8 [2, H, W, 3]

Sampling (sd_jax/diffusion/samplers.py, each sampler matching its diffusers scheduler) runs as one jitted function
per (batch size, image size, sampler settings): prompt encoding, the whole denoising loop with classifier-free
guidance, and the VAE decode. With c the prompt's text context and c' the negative prompt's ("" by default) the
guided model output is

    ô = o(x, t, c') + s · (o(x, t, c) − o(x, t, c')),                     s = `guidance`

optionally rescaled toward the conditional output's per-image standard deviation (`guidance_rescale` φ, Lin et al.
2023): ô ← φ · ô · std(o(c)) / std(ô) + (1 − φ) · ô. The sampler, its timestep spacing, steps_offset,
set_alpha_to_one and the prediction type come from the model's scheduler/scheduler_config.json (as diffusers'
`Scheduler.from_config` reads it); `sampler` only picks the update rule (ddim, ddpm, dpmpp_2m[_karras],
euler[_karras], euler_a).

img2img (SDEdit, Meng et al. 2022; diffusers' StableDiffusionImg2ImgPipeline): the init image is encoded to
z0 = scaling_factor · (μ_φ(x) − shift), the mean of the VAE posterior q(z|x). (diffusers draws a sample of the
posterior instead; the mean is the deterministic choice, and for SD's VAE the posterior's standard deviation is
small next to the noise added below.) Of the `steps`-step schedule only the last k = int(steps · strength) steps
run, from z = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t) ε at the first of them (σ-parameterised samplers: z0 + σ_t ε):
strength 1 keeps the image only through that noisy start, small strengths stay close to it.

Randomness: batch b (of `batch_size` images) uses key_b = fold_in(PRNGKey(seed), b), split into the key of its
initial noise ε ~ N(0, I) (x_T, or the noise added to the init latents) and the key of the per-step noise of the
stochastic samplers (DDIM with η > 0, DDPM, Euler-a). So a seed and a batch size give the same images every time.
When the batch divides the number of local devices it runs sharded over them (the batch on a "data" mesh axis,
parameters replicated); the noise does not depend on the sharding, the images agree with a one-device run to float
rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sd_jax import images as images_lib
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.diffusion import samplers
from sd_jax.weights import model_dir as model_dir_lib
from sd_jax.weights import store

SAMPLER_NAMES = samplers.SAMPLER_NAMES
DEFAULT_SAMPLER = "ddim"
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
OUTPUT_TYPES = ("uint8", "np")


def initial_noise_keys(seed: int, batch_index: int) -> tuple[jax.Array, jax.Array]:
  """(key of batch `batch_index`'s initial noise, key of its per-step noise), from fold_in(PRNGKey(seed), b).

  The split is the one ddim.ddim_sample makes of its rng, so DDIM draws the same x_T as the trainer's sample grids.
  """
  noise_key, step_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), batch_index))
  return noise_key, step_key


def _as_float_images(images, what: str) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] images [N, H, W, 3] (or one [H, W, 3]) -> float32 [N, H, W, 3] in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{what}: expected RGB images [H, W, 3] or [N, H, W, 3], got shape {images.shape}.")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{what}: dtype {images.dtype}; use uint8 in [0, 255] or floats in [-1, 1].")
  if images.size and (images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3):
    raise ValueError(f"{what}: float images must be in [-1, 1] (got [{images.min():.3g}, {images.max():.3g}]); "
                     "pass uint8 for [0, 255] images.")
  return images.astype(np.float32)


class Pipeline:
  """U-Net + VAE + text tower + tokenizer + scheduler config; `generate` draws images for prompts."""

  def __init__(self, components: dict[str, tuple[Any, Any]], tokenizer,
               scheduler_config: Mapping[str, Any] | None = None, clip_skip: int = 0):
    self.unet, self.unet_params = components["unet"]
    self.vae, self.vae_params = components["vae"]
    self.text, self.text_params = components["text_encoder"]
    self.tokenizer = tokenizer
    self.clip_skip = int(clip_skip)  # the text layer the U-Net was trained on (0 = the last)
    self.scheduler_config: dict[str, Any] = dict(scheduler_config or {})
    self.sampler_config(DEFAULT_SAMPLER)  # a clear error now if the scheduler config is not one we can run
    # Batches that divide len(devices) run sharded over them (set to jax.local_devices()[:1] to stay on one).
    self.devices: list = list(jax.local_devices()) if jax.process_count() == 1 else list(jax.local_devices())[:1]
    self.num_traces = 0  # how many times a sampling function was traced (compiled); for tests and logs
    self._compiled: dict[tuple, Any] = {}
    self._placed: dict[Any, tuple] = {}

  @classmethod
  def from_model_dir(cls, model_dir, *, dtype: str = "float32") -> "Pipeline":
    """An sd_jax model directory with unet/, vae/, text_encoder/, tokenizer/ (and scheduler/)."""
    model_dir = epath.Path(model_dir)
    index = store.read_index(model_dir)  # a clear error if it is not a model directory
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in index["components"]]
    if missing:
      raise FileNotFoundError(f"{model_dir} has no {missing}: text-to-image needs a U-Net, a VAE and a text tower "
                              f"(it holds {sorted(index['components'])}).")
    if not (model_dir / "tokenizer" / "vocab.json").exists():
      raise FileNotFoundError(f"{model_dir}/tokenizer/vocab.json is missing: the text tower's tokenizer must be "
                              "stored with the model.")
    components = model_dir_lib.load_model(model_dir, ("unet", "vae", "text_encoder"), dtype=dtype)
    text = components["text_encoder"][0]
    tokenizer = tokenizer_lib.load_clip_tokenizer(str(model_dir / "tokenizer"),
                                                  max_length=text.config.max_position_embeddings)
    scheduler_file = model_dir / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}
    return cls(components, tokenizer, scheduler_config, clip_skip=store.read_clip_skip(model_dir))

  @classmethod
  def from_workdir(cls, workdir, **kwargs) -> "Pipeline":
    """A finished ldm run: its WORKDIR/export (the EMA U-Net with the VAE and text tower it was trained with)."""
    workdir = epath.Path(workdir)
    if not workdir.exists():
      raise FileNotFoundError(f"--workdir {workdir} does not exist.")
    export = workdir / "export"
    if not (export / store.INDEX_FILE).exists():
      raise FileNotFoundError(f"{workdir} has no export/ (written when an ldm run finishes). Finish the run by "
                              "rerunning its training command (it resumes), or point at a model directory.")
    return cls.from_model_dir(export, **kwargs)

  # -------------------------------------------------------------------------------------------------------------

  @property
  def latent_factor(self) -> int:
    return self.vae.downsample_factor

  def check_size(self, height: int, width: int) -> tuple[int, int]:
    """(latent height, latent width); a size the VAE and U-Net cannot take is an error naming a valid one."""
    multiple = self.latent_factor * 2 ** (len(self.unet.block_out_channels) - 1)
    for name, value in (("height", height), ("width", width)):
      if value <= 0 or value % multiple:
        valid = max(multiple, round(value / multiple) * multiple)
        raise ValueError(f"--{name}={value}: must be a positive multiple of {multiple} (the VAE's factor "
                         f"{self.latent_factor} × the U-Net's downsampling); e.g. {valid}.")
    return height // self.latent_factor, width // self.latent_factor

  def default_size(self) -> int:
    return int(self.unet.sample_size) * self.latent_factor

  def sampler_config(self, sampler: str = DEFAULT_SAMPLER, eta: float = 0.0) -> samplers.SamplerConfig:
    """The model's scheduler config (schedule, spacing, prediction type) run with `sampler`'s update rule."""
    if sampler not in SAMPLER_NAMES:
      raise ValueError(f"--sampler={sampler!r}: use one of {', '.join(SAMPLER_NAMES)}.")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
      raise ValueError(f"--eta={eta} with --sampler={sampler}: η is DDIM's noise level, >= 0 and only for ddim.")
    return samplers.config_from_diffusers(self.scheduler_config, sampler=sampler, eta=float(eta))

  def encode_text(self, text_params, tokens):
    return self.text.apply({"params": text_params}, tokens, clip_skip=self.clip_skip or None, method="encode")

  def _mesh(self, batch: int) -> jax.sharding.Mesh | None:
    if len(self.devices) > 1 and batch % len(self.devices) == 0:
      return jax.sharding.Mesh(np.asarray(self.devices), ("data",))
    return None

  def _params(self, mesh):
    """The three parameter trees, replicated over `mesh` (placed once per mesh)."""
    params = (self.unet_params, self.vae_params, self.text_params)
    if mesh is None:
      return params
    key = tuple(d.id for d in mesh.devices.flat)
    if key not in self._placed:
      self._placed[key] = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return self._placed[key]

  def _sample_fn(self, batch: int, latent_hw: tuple[int, int], steps: int, config: samplers.SamplerConfig,
                 guidance: float, guidance_rescale: float, img2img: bool, strength: float):
    mesh = self._mesh(batch)
    key = (batch, latent_hw, steps, config, float(guidance), float(guidance_rescale), img2img,
           float(strength) if img2img else None, mesh is not None)
    if key in self._compiled:
      return self._compiled[key], mesh
    shape = (batch, *latent_hw, self.vae.latent_channels)

    def run(unet_params, vae_params, text_params, tokens, uncond_tokens, noise_key, step_key, init_images):
      self.num_traces += 1
      context = self.encode_text(text_params, tokens)
      uncond = self.encode_text(text_params, uncond_tokens)
      noise = jax.random.normal(noise_key, shape, jnp.float32)
      init_latents = None
      if init_images is not None:
        posterior = self.vae.apply({"params": vae_params}, init_images, method="encode")
        init_latents = self.vae.scale_latents(posterior.mean.astype(jnp.float32))
      model_fn = lambda x, t, c: self.unet.apply({"params": unet_params}, x, t, c)  # noqa: E731
      # s == 1 is the conditional output alone (one network call, as diffusers); any other s, including s < 1
      # (s = 0: unconditional samples), runs the guided pair: a jnp scale keeps samplers.sample from skipping it.
      scale = float(guidance) if guidance >= 1 else jnp.float32(guidance)
      latents = samplers.sample(model_fn, noise, config=config, num_steps=steps, context=context,
                                uncond_context=uncond, guidance_scale=scale,
                                guidance_rescale=float(guidance_rescale), rng=step_key, init_latents=init_latents,
                                strength=float(strength) if img2img else 1.0)
      images = self.vae.apply({"params": vae_params}, self.vae.unscale_latents(latents), method="decode")
      return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    if mesh is None:
      fn = jax.jit(run)
    else:
      P = jax.sharding.PartitionSpec  # noqa: N806
      replicated, data = jax.sharding.NamedSharding(mesh, P()), jax.sharding.NamedSharding(mesh, P("data"))
      fn = jax.jit(run, in_shardings=(replicated, replicated, replicated, data, data, replicated, replicated,
                                      data if img2img else None), out_shardings=data)
    self._compiled[key] = fn
    return fn, mesh

  def _init_images(self, init_image, num_prompts: int, num_images: int) -> np.ndarray:
    """float32 [num_prompts * num_images, H, W, 3]: one image for every prompt, or one per prompt."""
    images = _as_float_images(init_image, "--init_image")
    if len(images) == 1:
      return np.broadcast_to(images, (num_prompts * num_images, *images.shape[1:]))
    if len(images) != num_prompts:
      raise ValueError(f"--init_image: {len(images)} images for {num_prompts} prompts; give one image, or one per "
                       "prompt.")
    return np.repeat(images, num_images, axis=0)

  def generate(self, prompts: Sequence[str], *, negative_prompt: str | Sequence[str] = "", num_images: int = 1,
               steps: int = 50, guidance: float = 7.5, seed: int = 0, height: int | None = None,
               width: int | None = None, eta: float = 0.0, batch_size: int | None = None,
               sampler: str = DEFAULT_SAMPLER, guidance_rescale: float = 0.0, init_image=None,
               strength: float = DEFAULT_STRENGTH, progress: bool = False, output_type: str = "uint8"
               ) -> np.ndarray:
    """[len(prompts) * num_images, H, W, 3]: num_images images per prompt, prompt-major.

    Args:
      prompts: the texts.
      negative_prompt: one for all prompts, or one per prompt: the context c' guidance pushes away from.
      num_images: images per prompt.
      steps: length of the sampler's schedule (img2img runs the last int(steps · strength) of them).
      guidance: classifier-free guidance scale s. Exactly 1: the conditional output alone (one network call, as
        diffusers); s < 1 interpolates toward the negative prompt's output (0: unconditional samples).
      seed: batch b's noise comes from fold_in(PRNGKey(seed), b); a seed and a batch size fix the images.
      height, width: pixels (default: the U-Net's sample_size × the VAE's factor, or the init image's size).
      eta: DDIM's η (0 = deterministic); only with sampler="ddim".
      batch_size: images per jitted call (default: all at once); the last batch is padded to this size.
      sampler: one of SAMPLER_NAMES; the schedule comes from the model's scheduler config.
      guidance_rescale: φ in [0, 1] (0 = off).
      init_image: img2img: uint8 [0, 255] or float [-1, 1] RGB, [H, W, 3] (for every prompt) or
        [len(prompts), H, W, 3] (one per prompt); its size is the output size.
      strength: img2img: the fraction of the schedule to run, in (0, 1].
      progress: show a progress bar over the batches.
      output_type: "uint8" (default) or "np" (float32 in [0, 1], as diffusers' output_type="np").
    """
    if not prompts:
      raise ValueError("no prompts given.")
    if isinstance(prompts, str):
      prompts = [prompts]
    if num_images < 1:
      raise ValueError(f"--num_images={num_images}: must be >= 1.")
    if steps < 1:
      raise ValueError(f"--steps={steps}: must be >= 1.")
    if not 0.0 <= guidance_rescale <= 1.0:
      raise ValueError(f"--guidance_rescale={guidance_rescale}: must be in [0, 1].")
    if output_type not in OUTPUT_TYPES:
      raise ValueError(f"output_type={output_type!r}: use one of {OUTPUT_TYPES}.")
    config = self.sampler_config(sampler, eta)
    img2img = init_image is not None
    init = None
    if img2img:
      if not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength={strength}: must be in (0, 1] (the fraction of the schedule run).")
      if int(steps * strength) < 1:
        raise ValueError(f"--strength={strength} with --steps={steps} runs no step (int(steps × strength) = 0); "
                         "raise --strength or --steps.")
      init = self._init_images(init_image, len(prompts), num_images)
      h, w = init.shape[1:3]
      if (height or h, width or w) != (h, w):
        raise ValueError(f"--init_image is {w}×{h} but --height={height} --width={width} were asked for; resize the "
                         "image (the command line does) or leave height and width unset.")
      height, width = h, w
    height = height or self.default_size()
    width = width or self.default_size()
    latent_hw = self.check_size(height, width)
    prompts = [p for p in prompts for _ in range(num_images)]
    negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                 else [n for n in negative_prompt for _ in range(num_images)])
    if len(negatives) != len(prompts):
      raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts) // num_images} prompts.")
    batch_size = batch_size or len(prompts)
    if batch_size < 1:
      raise ValueError(f"--batch_size={batch_size}: must be >= 1.")
    num_batches = math.ceil(len(prompts) / batch_size)
    fn, mesh = self._sample_fn(batch_size, latent_hw, steps, config, guidance, guidance_rescale, img2img, strength)
    params = self._params(mesh)
    bar = None
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=num_batches, unit="batch", desc=f"{config.sampler} {steps} steps, {batch_size}/batch")
    out = []
    for b in range(num_batches):
      start = b * batch_size
      chunk, neg = prompts[start:start + batch_size], negatives[start:start + batch_size]
      real = len(chunk)
      pad = batch_size - real
      chunk, neg = chunk + [chunk[-1]] * pad, neg + [neg[-1]] * pad  # static shape
      images_in = None
      if img2img:
        images_in = init[start:start + batch_size]
        images_in = np.concatenate([images_in, np.repeat(images_in[-1:], pad, axis=0)]) if pad else images_in
      images = fn(*params, self.tokenizer(chunk), self.tokenizer(neg), *initial_noise_keys(seed, b), images_in)
      images = np.asarray(jax.device_get(images))[:real]
      out.append(images_lib.to_uint8(images) if output_type == "uint8" else (images + 1.0) / 2.0)
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------


class CommandError(Exception):
  """A problem with the command's inputs: printed as `error: ...`, exit status 1."""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m sd_jax.sample",
      description="Text-to-image (and img2img) with a trained sd_jax workdir or an sd_jax model directory. Writes "
      "OUT/NNNN_<prompt>.png per image, OUT/grid.png (images under their prompts) and OUT/settings.json.")
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--workdir", metavar="DIR",
                     help="A finished ldm run: samples its export/ (EMA U-Net, VAE, text tower).")
  model.add_argument("--pretrained", metavar="MODEL_DIR",
                     help="An sd_jax model directory (from `python -m sd_jax.convert --from_diffusers DIR --out "
                     "MODEL_DIR`).")
  text = p.add_mutually_exclusive_group(required=True)
  text.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT", help="One or more prompts.")
  text.add_argument("--prompts_file", metavar="FILE",
                    help="A text file with one prompt per line (blank lines are skipped).")
  p.add_argument("--negative_prompt", default="", metavar="TEXT",
                 help="What guidance steers away from (default: \"\").")
  p.add_argument("--num_images", type=int, default=1, metavar="N", help="Images per prompt (default: %(default)s).")
  p.add_argument("--steps", type=int, default=50, metavar="K", help="Sampler steps (default: %(default)s).")
  p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES, metavar="S",
                 help=f"{', '.join(SAMPLER_NAMES)}: the update rule; the schedule (spacing, prediction type) comes "
                 "from the model's scheduler config (default: %(default)s).")
  p.add_argument("--guidance", type=float, default=7.5, metavar="G",
                 help="Classifier-free guidance scale (default: %(default)s).")
  p.add_argument("--guidance_rescale", type=float, default=0.0, metavar="PHI",
                 help="Guidance rescale φ in [0, 1], Lin et al. 2023 (default: %(default)s = off).")
  p.add_argument("--eta", type=float, default=0.0, help="DDIM η (ddim only; default: %(default)s).")
  p.add_argument("--seed", type=int, default=0, metavar="N", help="Random seed (default: %(default)s).")
  p.add_argument("--height", type=int, metavar="PX",
                 help="Image height in pixels (default: the model's, or the init image's).")
  p.add_argument("--width", type=int, metavar="PX",
                 help="Image width in pixels (default: the model's, or the init image's).")
  p.add_argument("--batch_size", type=int, metavar="N", help="Images per compiled call (default: all at once).")
  p.add_argument("--init_image", metavar="PATH",
                 help="img2img: the image to start from (resized to --height/--width when they are given).")
  p.add_argument("--strength", type=float, metavar="S",
                 help=f"img2img: fraction of the schedule run, in (0, 1] (default: {DEFAULT_STRENGTH}).")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="Compute dtype of the networks (default: %(default)s).")
  p.add_argument("--out", required=True, metavar="DIR", help="Output directory (created; files are overwritten).")
  return p


def _check_flags(args, parser: argparse.ArgumentParser) -> None:
  positive = {"--num_images": args.num_images, "--steps": args.steps, "--batch_size": args.batch_size,
              "--height": args.height, "--width": args.width}
  for flag, value in positive.items():
    if value is not None and value < 1:
      parser.error(f"{flag}={value}: must be >= 1.")
  if args.strength is not None:
    if args.init_image is None:
      parser.error("--strength is an img2img setting: give --init_image too.")
    if not 0.0 < args.strength <= 1.0:
      parser.error(f"--strength={args.strength}: must be in (0, 1] (the fraction of the schedule run).")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    parser.error(f"--guidance_rescale={args.guidance_rescale}: must be in [0, 1].")
  if args.eta < 0 or (args.eta != 0 and args.sampler != "ddim"):
    parser.error(f"--eta={args.eta} with --sampler={args.sampler}: η is DDIM's noise level, >= 0 and only for "
                 "--sampler=ddim.")


def _read_prompts(args) -> list[str]:
  if args.prompt is not None:
    prompts = list(args.prompt)
    if not any(p.strip() for p in prompts):
      raise CommandError("--prompt: every prompt is empty.")
    return prompts
  path = epath.Path(args.prompts_file)
  if not path.is_file():
    raise CommandError(f"--prompts_file {path} does not exist.")
  prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise CommandError(f"--prompts_file {path} has no prompts (one prompt per line; blank lines are skipped).")
  return prompts


def _load_pipeline(args) -> Pipeline:
  try:
    if args.workdir is not None:
      return Pipeline.from_workdir(args.workdir, dtype=args.dtype)
    model_dir = epath.Path(args.pretrained)
    if not model_dir.is_dir():
      raise CommandError(f"--pretrained {model_dir} does not exist (or is not a directory).")
    if not (model_dir / store.INDEX_FILE).exists() and (model_dir / "model_index.json").exists():
      raise CommandError(f"--pretrained {model_dir} is a diffusers directory, not an sd_jax model directory. Convert "
                         f"it once with `python -m sd_jax.convert --from_diffusers {model_dir} --out MODEL_DIR`, "
                         "then pass --pretrained MODEL_DIR.")
    return Pipeline.from_model_dir(model_dir, dtype=args.dtype)
  except (FileNotFoundError, ValueError) as e:
    flag = "--workdir" if args.workdir is not None else "--pretrained"
    message = str(e)
    raise CommandError(message if message.startswith(flag) else f"{flag}: {message}") from e


def _load_init_image(args, pipe: Pipeline) -> tuple[np.ndarray, int, int]:
  """uint8 [H, W, 3], resized to --height × --width when given; (image, height, width)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path = epath.Path(args.init_image)
  if not path.is_file():
    raise CommandError(f"--init_image {path} does not exist.")
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except OSError as e:
    raise CommandError(f"--init_image {path}: not an image PIL can read ({e}).") from e
  width, height = args.width or image.width, args.height or image.height
  if (width, height) != (image.width, image.height):
    image = image.resize((width, height), Image.Resampling.LANCZOS)
  try:
    pipe.check_size(height, width)
  except ValueError as e:
    if args.height is None or args.width is None:
      raise CommandError(f"--init_image {path} is {image.width}×{image.height}: {e} Pass --height and --width to "
                         "resize it.") from e
    raise
  return np.asarray(image), height, width


def slug(text: str, max_chars: int = 48) -> str:
  """A file-name-safe version of a prompt: lowercase ASCII letters and digits joined by "_"."""
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_chars].rstrip("_") or "image"


def _grid(images: np.ndarray, prompts: Sequence[str], num_images: int) -> np.ndarray:
  """The labelled grid (ldm.labeled_grid): one cell per prompt with its images, non-square images letterboxed."""
  from sd_jax.trainers import ldm  # pylint: disable=import-outside-toplevel
  n, h, w, _ = images.shape
  side = max(h, w)
  if h != w:  # labeled_grid draws square tiles: pad with white rather than stretch
    square = np.full((n, side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[:, top:top + h, left:left + w] = images
    images = square
  columns = math.ceil(math.sqrt(len(prompts)))
  tile = int(min(max(side, 64), max(64, 4096 // (columns * num_images))))  # at most ~4096 pixels wide
  return ldm.labeled_grid(images.reshape(len(prompts), num_images, side, side, 3), prompts, tile=tile)


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  _check_flags(args, parser)
  try:
    prompts = _read_prompts(args)
    pipe = _load_pipeline(args)
    config = pipe.sampler_config(args.sampler, args.eta)
    init_image, height, width = None, args.height, args.width
    if args.init_image is not None:
      init_image, height, width = _load_init_image(args, pipe)
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    start = time.time()
    images = pipe.generate(prompts, negative_prompt=args.negative_prompt, num_images=args.num_images,
                           steps=args.steps, guidance=args.guidance, seed=args.seed, height=height, width=width,
                           eta=args.eta, batch_size=args.batch_size, sampler=args.sampler,
                           guidance_rescale=args.guidance_rescale, init_image=init_image, strength=strength,
                           progress=True)
    seconds = time.time() - start
  except (CommandError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from e

  out = epath.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = []
  for i, image in enumerate(images):
    names.append(f"{i:04d}_{slug(prompts[i // args.num_images])}.png")
    images_lib.save_png(image, out / names[-1])
  images_lib.save_png(_grid(images, prompts, args.num_images), out / "grid.png")
  settings = {
      "model": str(args.workdir or args.pretrained), "prompts": prompts, "negative_prompt": args.negative_prompt,
      "num_images": args.num_images, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
      "guidance_rescale": args.guidance_rescale, "eta": args.eta, "seed": args.seed,
      "height": int(images.shape[1]), "width": int(images.shape[2]), "batch_size": args.batch_size,
      "init_image": args.init_image, "strength": strength if args.init_image is not None else None,
      "dtype": args.dtype, "scheduler": dataclasses.asdict(config), "seconds": round(seconds, 2), "images": names,
  }
  (out / "settings.json").write_text(json.dumps(settings, indent=2))
  print(f"wrote {len(names)} images, grid.png and settings.json to {out} ({seconds:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
