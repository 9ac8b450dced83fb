"""Text-to-image with a trained or imported Stable Diffusion: the library behind `python -m sd_jax.sample`.

A `Pipeline` holds the U-Net, VAE, text tower, tokenizer and noise schedule of an sd_jax model directory (an ldm
run's WORKDIR/export, or `python -m sd_jax.convert --from_diffusers DIR --out OUT`):

  pipe = Pipeline.from_model_dir("workdirs/shapes_ldm/export")      # or Pipeline.from_workdir("workdirs/shapes_ldm")
  images = pipe.generate(["a red circle"], num_images=2, steps=25, guidance=4.0, seed=0)   # uint8 [2, H, W, 3]

Sampling is one jitted function per (batch size, image size, sampler settings): prompt encoding, the whole
denoising loop with classifier-free guidance (uncond + s · (cond − uncond), the unconditional context being the
negative prompt's, "" by default) and the VAE decode. It is compiled at the first call and reused for later
batches with the same settings. The same seed gives the same images.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sd_jax import images as images_lib
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.diffusion import ddim
from sd_jax.diffusion import schedules
from sd_jax.weights import pipeline as weights_pipeline
from sd_jax.weights import store

_BETA_SCHEDULES = {"squaredcos_cap_v2": "cosine"}


@dataclasses.dataclass
class SchedulerSettings:
  """The training noise schedule and the sampler's defaults, read from a diffusers scheduler_config.json."""
  num_train_timesteps: int = 1000
  beta_schedule: str = "scaled_linear"
  beta_start: float = 0.00085
  beta_end: float = 0.012
  prediction_type: str = "epsilon"
  rescale_betas_zero_snr: bool = False
  timestep_spacing: str = "leading"
  steps_offset: int = 1
  set_alpha_to_one: bool = False

  @classmethod
  def from_json(cls, path) -> "SchedulerSettings":
    fields = json.loads(epath.Path(path).read_text())
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in known})

  def schedule(self) -> schedules.NoiseSchedule:
    return schedules.make_schedule(_BETA_SCHEDULES.get(self.beta_schedule, self.beta_schedule),
                                   num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                                   beta_end=self.beta_end, rescale_zero_terminal_snr=self.rescale_betas_zero_snr)


class Pipeline:
  """U-Net + VAE + text tower + tokenizer + schedule; `generate` draws images for prompts."""

  def __init__(self, components: dict[str, tuple[Any, Any]], tokenizer, scheduler: SchedulerSettings):
    self.unet, self.unet_params = components["unet"]
    self.vae, self.vae_params = components["vae"]
    self.text, self.text_params = components["text_encoder"]
    self.tokenizer = tokenizer
    self.scheduler = scheduler
    self.schedule = scheduler.schedule()
    self._compiled: dict[tuple, Any] = {}

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
    components = weights_pipeline.load_model(model_dir, ("unet", "vae", "text_encoder"), dtype=dtype)
    text = components["text_encoder"][0]
    tokenizer = tokenizer_lib.load_clip_tokenizer(str(model_dir / "tokenizer"),
                                                  max_length=text.config.max_position_embeddings)
    scheduler_file = model_dir / "scheduler" / "scheduler_config.json"
    scheduler = SchedulerSettings.from_json(scheduler_file) if scheduler_file.exists() else SchedulerSettings()
    return cls(components, tokenizer, scheduler)

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

  def encode_text(self, text_params, tokens):
    return self.text.apply({"params": text_params}, tokens, method="encode")

  def _sample_fn(self, batch: int, latent_hw: tuple[int, int], steps: int, eta: float, guidance: float):
    key = (batch, latent_hw, steps, float(eta), float(guidance))
    if key not in self._compiled:
      s = self.scheduler
      shape = (batch, *latent_hw, self.vae.latent_channels)

      def run(unet_params, vae_params, text_params, tokens, uncond_tokens, rng):
        context = self.encode_text(text_params, tokens)
        uncond = self.encode_text(text_params, uncond_tokens)
        model_fn = lambda x, t, c: self.unet.apply({"params": unet_params}, x, t, c)  # noqa: E731
        guided = ddim.classifier_free_guidance(model_fn, context, uncond, guidance)
        latents = ddim.ddim_sample(guided, self.schedule, rng, shape, num_inference_steps=steps, eta=eta,
                                   prediction_type=s.prediction_type, timestep_spacing=s.timestep_spacing,
                                   steps_offset=s.steps_offset, set_alpha_to_one=s.set_alpha_to_one)
        images = self.vae.apply({"params": vae_params}, self.vae.unscale_latents(latents), method="decode")
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

      self._compiled[key] = jax.jit(run)
    return self._compiled[key]

  def generate(self, prompts: Sequence[str], *, negative_prompt: str | Sequence[str] = "", num_images: int = 1,
               steps: int = 50, guidance: float = 7.5, seed: int = 0, height: int | None = None,
               width: int | None = None, eta: float = 0.0, batch_size: int | None = None) -> np.ndarray:
    """uint8 [len(prompts) * num_images, H, W, 3]: num_images images per prompt, prompt-major.

    Images are drawn in batches of `batch_size` (default: all at once); image i's noise comes from
    fold_in(PRNGKey(seed), batch index), so a seed and a batch size give the same images every time.
    """
    if not prompts:
      raise ValueError("no prompts given.")
    height = height or self.default_size()
    width = width or self.default_size()
    latent_hw = self.check_size(height, width)
    prompts = [p for p in prompts for _ in range(num_images)]
    negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                 else [n for n in negative_prompt for _ in range(num_images)])
    if len(negatives) != len(prompts):
      raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts) // num_images} prompts.")
    batch_size = batch_size or len(prompts)
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
      chunk, neg = prompts[start:start + batch_size], negatives[start:start + batch_size]
      real = len(chunk)
      chunk, neg = chunk + [chunk[-1]] * (batch_size - real), neg + [neg[-1]] * (batch_size - real)  # static shape
      fn = self._sample_fn(batch_size, latent_hw, steps, eta, guidance)
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), b)
      images = fn(self.unet_params, self.vae_params, self.text_params, self.tokenizer(chunk), self.tokenizer(neg),
                  rng)
      out.append(images_lib.to_uint8(np.asarray(jax.device_get(images)))[:real])
    return np.concatenate(out)

