"""Text-to-image and image-to-image with a Stable Diffusion model: the one generation path of sd_jax.

`python -m sd_jax.sample`, `python -m sd_jax.evaluate`, `sd_jax.stages`, the experiments and the ldm trainer's sample
grids all draw their images here, so a seed gives the same image in every tool.

Use:

  pipe = TextToImage.from_model_dir("workdirs/shapes_ldm/export")   # or TextToImage.from_workdir("workdirs/shapes_ldm")
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

Randomness: image i of a call (prompt-major) uses key_i = fold_in(PRNGKey(seed), i) (samplers.image_noise), split
into the key of its initial noise ε ~ N(0, I) (x_T, or the noise added to the init latents) and the key of its
per-step noise in the stochastic samplers (DDIM with η > 0, DDPM, Euler-a). So a seed gives the same images every
time, whatever the batch size, and the same image as the trainer's sample grids and every other tool. When the batch
divides the number of local devices it runs sharded over them (the batch on a "data" mesh axis, parameters
replicated); the noise does not depend on the sharding, the images agree with a one-device run to float rounding.
"""

from __future__ import annotations

import json
import math
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
FINETUNE_SUMMARY = "finetune.json"  # in a fine-tune run's export/: its base and files (sd_jax/trainers/finetune.py)
OUTPUT_TYPES = ("uint8", "np")


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


class TextToImage:
  """U-Net + VAE + text tower + tokenizer + scheduler config; `generate` draws images for prompts.

  Built from a model directory (`from_model_dir`, `from_workdir`), or by a trainer from its own networks with
  `params=None` in `components` and `mesh` = the training mesh: `generate(..., params=...)` then draws with the
  parameters of the moment (sharded as training holds them), and every process gets the images.
  """

  def __init__(self, components: dict[str, tuple[Any, Any]], tokenizer,
               scheduler_config: Mapping[str, Any] | None = None, clip_skip: int = 0, *,
               mesh: jax.sharding.Mesh | None = None):
    self.unet, self.unet_params = components["unet"]
    self.vae, self.vae_params = components["vae"]
    self.text, self.text_params = components["text_encoder"]
    self.tokenizer = tokenizer
    self.clip_skip = int(clip_skip)  # the text layer the U-Net was trained on (0 = the last)
    self.scheduler_config: dict[str, Any] = dict(scheduler_config or {})
    self.sampler_config(DEFAULT_SAMPLER)  # a clear error now if the scheduler config is not one we can run
    self.mesh = mesh  # a training mesh: the parameters passed to `generate` live there
    # Otherwise batches that divide len(devices) run sharded over them (jax.local_devices()[:1] stays on one).
    self.devices: list = list(jax.local_devices()) if jax.process_count() == 1 else list(jax.local_devices())[:1]
    self.num_traces = 0  # how many times a sampling function was traced (compiled); for tests and logs
    self._compiled: dict[tuple, Any] = {}
    self._placed: dict[Any, tuple] = {}
    self._expansions: dict[str, str] = {}  # multi-vector textual-inversion token -> its tokens (with_embeddings)

  @classmethod
  def from_model_dir(cls, model_dir, *, dtype: str = "float32") -> "TextToImage":
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
  def from_workdir(cls, workdir, **kwargs) -> "TextToImage":
    """A finished ldm run: its WORKDIR/export (the EMA U-Net with the VAE and text tower it was trained with)."""
    workdir = epath.Path(workdir)
    if not workdir.exists():
      raise FileNotFoundError(f"--workdir {workdir} does not exist.")
    export = workdir / "export"
    summary = export / FINETUNE_SUMMARY
    if summary.exists() and not (export / store.INDEX_FILE).exists():  # a LoRA / textual-inversion fine-tune
      info = json.loads(summary.read_text())
      pipe = cls.from_model_dir(info["base_dir"], **kwargs)
      files = info["files"]
      if "diffusers_lora" in files:
        pipe.with_lora(export / files["diffusers_lora"])
      if "embeddings" in files:
        pipe.with_embeddings(export / files["embeddings"])
      return pipe
    if not (export / store.INDEX_FILE).exists():
      raise FileNotFoundError(f"{workdir} has no export/ (written when a run finishes). Finish the run by "
                              "rerunning its training command (it resumes), or point at a model directory.")
    return cls.from_model_dir(export, **kwargs)

  # -- adapters ----------------------------------------------------------------------------------------------------

  def with_lora(self, path, scale: float = 1.0, *, allow_pickle: bool = False) -> "TextToImage":
    """Merges a LoRA file (diffusers/PEFT, older diffusers or kohya layout: sd_jax/weights/lora.py) into this
    model's U-Net (and text tower) at `scale` × the file's own alpha / rank. Several LoRAs add up. Returns self."""
    from sd_jax import lora as lora_lib  # pylint: disable=import-outside-toplevel
    from sd_jax.weights import lora as lora_weights  # pylint: disable=import-outside-toplevel
    if not math.isfinite(scale):
      raise ValueError(f"LoRA scale {scale}: must be a finite number.")
    adapters = lora_weights.load(path, self.unet_params, self.text_params, allow_pickle=allow_pickle)
    self.unet_params = jax.device_get(jax.jit(lora_lib.merge)(self.unet_params, adapters["unet"], scale))
    if "text_encoder" in adapters:
      self.text_params = jax.device_get(jax.jit(lora_lib.merge)(self.text_params, adapters["text_encoder"], scale))
    self._placed.clear()
    return self

  def with_embeddings(self, path, *, allow_pickle: bool = False) -> "TextToImage":
    """Adds the tokens of a textual-inversion file (diffusers' {token: tensor}, or A1111's, whose token is the file
    name) to the tokenizer and their rows to the text tower's embedding table (weights/model_dir.py
    `add_embeddings`: a token of n > 1 vectors is written once in a prompt). Returns self."""
    from sd_jax.weights import lora as lora_weights  # pylint: disable=import-outside-toplevel
    embeddings = lora_weights.load_embeddings(path, allow_pickle=allow_pickle)
    try:
      self.text, self.text_params, expansions = model_dir_lib.add_embeddings(self.tokenizer, self.text,
                                                                             self.text_params, embeddings)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
    self._expansions.update(expansions)
    self._placed.clear()
    self._compiled.clear()
    return self

  def _expand(self, prompts: Sequence[str]) -> list[str]:
    """Multi-vector textual-inversion tokens written once in a prompt stand for all their vectors' tokens."""
    if not self._expansions:
      return list(prompts)
    out = []
    for prompt in prompts:
      words = prompt.split(" ")
      out.append(" ".join(self._expansions.get(w.lower(), w) for w in words))
    return out

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
    if self.mesh is not None:
      return self.mesh
    if len(self.devices) > 1 and batch % len(self.devices) == 0:
      return jax.sharding.Mesh(np.asarray(self.devices), ("data",))
    return None

  def _params(self, mesh, params: Mapping[str, Any] | None):
    """The three parameter trees: `params` as given ({"unet", "vae", "text_encoder"}), else the model's own,
    replicated over `mesh` (placed once per mesh)."""
    if params is not None:
      return params["unet"], params["vae"], params["text_encoder"]
    params = (self.unet_params, self.vae_params, self.text_params)
    if any(p is None for p in params):
      raise ValueError("this TextToImage was built without parameters: pass generate(..., params=...).")
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

    def run(unet_params, vae_params, text_params, tokens, uncond_tokens, seed_key, indices, init_images):
      self.num_traces += 1
      context = self.encode_text(text_params, tokens)
      uncond = self.encode_text(text_params, uncond_tokens)
      noise, step_keys = samplers.image_noise(seed_key, indices, shape[1:])
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
                                guidance_rescale=float(guidance_rescale), rng=step_keys, init_latents=init_latents,
                                strength=float(strength) if img2img else 1.0)
      images = self.vae.apply({"params": vae_params}, self.vae.unscale_latents(latents), method="decode")
      return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    if mesh is None:
      fn = jax.jit(run)
    elif mesh is self.mesh:  # a trainer's: its parameters keep their shardings; every process reads the images
      fn = jax.jit(run, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    else:
      P = jax.sharding.PartitionSpec  # noqa: N806
      replicated, data = jax.sharding.NamedSharding(mesh, P()), jax.sharding.NamedSharding(mesh, P("data"))
      fn = jax.jit(run, in_shardings=(replicated, replicated, replicated, data, data, replicated, data,
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
               strength: float = DEFAULT_STRENGTH, progress: bool = False, output_type: str = "uint8",
               params: Mapping[str, Any] | None = None, first_index: int = 0) -> np.ndarray:
    """[len(prompts) * num_images, H, W, 3]: num_images images per prompt, prompt-major.

    Args:
      prompts: the texts.
      negative_prompt: one for all prompts, or one per prompt: the context c' guidance pushes away from.
      num_images: images per prompt.
      steps: length of the sampler's schedule (img2img runs the last int(steps · strength) of them).
      guidance: classifier-free guidance scale s. Exactly 1: the conditional output alone (one network call, as
        diffusers); s < 1 interpolates toward the negative prompt's output (0: unconditional samples).
      seed: image i (prompt-major) draws its noise from fold_in(PRNGKey(seed), i) (samplers.image_noise): a seed
        fixes the images, whatever batch_size and sharding.
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
      params: {"unet", "vae", "text_encoder"} parameter trees to draw with instead of the model's own (a trainer's
        parameters of the moment).
      first_index: the index of the first image of this call among all the images of `seed` (image k of the call is
        image first_index + k): draws the rest of a set of images that was interrupted, the same as one call would.
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
    if not (math.isfinite(guidance) and guidance >= 0):
      raise ValueError(f"--guidance={guidance}: must be a finite number >= 0 (1 = no guidance).")
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
    params = self._params(mesh, params)
    seed_key = jax.random.PRNGKey(seed)
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
      # Image k of the call is image first_index + k of the seed; padding rows get the indices past the end.
      indices = np.arange(first_index + start, first_index + start + batch_size, dtype=np.int32)
      images = fn(*params, self.tokenizer(self._expand(chunk)), self.tokenizer(self._expand(neg)), seed_key, indices,
                  images_in)
      images = np.asarray(jax.device_get(images))[:real]
      bad = np.flatnonzero(~np.isfinite(images.reshape(real, -1)).all(axis=1))
      if bad.size:
        i = int(bad[0])
        raise FloatingPointError(
            f"the sampler produced NaN/Inf for prompt {chunk[i]!r} (image {first_index + start + i} of seed "
            f"{seed}; "
            f"{bad.size} of this batch's {real} images): the model's weights or the settings ({config.sampler}, "
            f"{steps} steps, guidance {guidance}) give non-finite latents. No image was written.")
      out.append(images_lib.to_uint8(images) if output_type == "uint8" else (images + 1.0) / 2.0)
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    return np.concatenate(out)
