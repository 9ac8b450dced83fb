"""Jitted samplers that match diffusers' schedulers step for step: DDPM, DDIM, DPM-Solver++ 2M, Euler, Euler-a.

The only denoising loop of sd_jax: text-to-image (sd_jax/generate.py, behind `python -m sd_jax.sample`, evaluate,
stages and the ldm trainer's sample grids), the pixel-space ddpm trainer's grids and the bench all call `sample`.
A training config's sampler settings come from `config_from_training`, an exported model's from
`config_from_diffusers`; `to_diffusers_config` writes the scheduler_config.json an export carries.

One entry point, `sample(model_fn, noise, config=SamplerConfig(...), num_steps=...)`, runs the whole chain as one
`lax.scan`. Everything that depends only on the configuration (timesteps, σ tables, per-step coefficients) is built
on the host in NumPy, the way diffusers builds it, and enters the loop as constants; the loop itself is the per-step
tensor arithmetic of the matching diffusers `step`, in the same order of operations, so a float32 run agrees with
diffusers' float32 PyTorch loop to ~1e-6 per step.

Notation: ᾱ_t is the training schedule's cumulative product (schedules.py), σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) the noise
level of the "variance exploding" view x = x0 + σ ε (Karras et al. 2022), which is x_t / sqrt(ᾱ_t).

- ddpm (Ho et al. 2020; diffusers `DDPMScheduler`, fixed_small variance): the posterior mean μ̃(x_t, x̂0) plus
  sqrt(β̃) z, stepping to the next inference timestep (ddpm_step).
- ddim (Song et al. 2021; `DDIMScheduler`): x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev - s²) ε̂ + s z with
  s = η sqrt((1 - ᾱ_prev)/(1 - ᾱ_t) (1 - ᾱ_t/ᾱ_prev)), prev = t - T // n (ddim_step).
- dpmpp_2m (Lu et al. 2022, DPM-Solver++(2M); `DPMSolverMultistepScheduler`, solver_order=2, midpoint): with
  α = 1/sqrt(σ² + 1), s = σ α, λ = log α - log s and h = λ_next - λ_cur,
      x_next = (s_next/s_cur) x - α_next (e^{-h} - 1) (D0 + ½ D1),
      D0 = x̂0_cur,  D1 = (x̂0_cur - x̂0_prev) h / h_prev,
  first order (D1 = 0) on the first step taken and on the last (σ_next = 0). `use_karras_sigmas` spaces σ as
  Karras et al. (ρ = 7) and rounds the model's timesteps.
- euler (Karras et al. 2022, Alg. 2 without churn; `EulerDiscreteScheduler`): the model sees x / sqrt(σ² + 1);
  x_next = x + (x - x̂0)/σ · (σ_next - σ). Timesteps may be fractional (linspace spacing, Karras σ).
- euler_a (`EulerAncestralDiscreteScheduler`): σ_up = sqrt(σ_next² (σ² - σ_next²) / σ²),
  σ_down = sqrt(σ_next² - σ_up²); x_next = x + (x - x̂0)/σ · (σ_down - σ) + σ_up z.

The Euler samplers start from noise · init_noise_sigma (σ_max, or sqrt(σ_max² + 1) for "leading" spacing, as in
diffusers). With `rescale_betas_zero_snr` the σ-based samplers set ᾱ_{T-1} = 2⁻²⁴ (diffusers does the same, so
σ_max is finite); DDPM and DDIM keep ᾱ_{T-1} = 0, which only v_prediction (or sample) can start from.

Classifier-free guidance (Ho & Salimans 2022): ô = o(∅') + s (o(c) - o(∅')), where ∅' is the negative prompt's
context (the empty prompt's when there is none), with one network call on the batch [∅'; c] as diffusers'
pipelines do; guidance rescale (Lin et al. 2023, §3.4) blends ô with ô · std(o(c)) / std(ô) by φ.

img2img (SDEdit; diffusers' `StableDiffusionImg2ImgPipeline`): of the n-step schedule, the last
k = min(int(n · strength), n) steps are run, starting from the scheduler's `add_noise` of the init latents at the
first of them.

Randomness: `noise` (x_T, or the noise added to the init latents) is an argument. The stochastic samplers draw
step i's z from `step_noise(rng, i, shape)` = normal(fold_in(rng, i)), i counting the steps run; with one key per
image (rng [B, 2]) each image draws its own z from its own key. Tools key each image by its seed and its index among
the images drawn (`image_noise`), so a seed gives the same image whatever the batch size, the sharding or the tool.
Typical use, with the network parameters as arguments of the jitted function:

    @functools.partial(jax.jit, static_argnames=("num_steps",))
    def draw(params, noise, context, uncond_context, rng, num_steps):
      model_fn = lambda x, t, c: unet.apply({"params": params}, x, t, c)
      return samplers.sample(model_fn, noise, config=SamplerConfig(sampler="dpmpp_2m"), num_steps=num_steps,
                             context=context, uncond_context=uncond_context, guidance_scale=7.5, rng=rng)

Inputs sharded along the batch (NamedSharding(mesh, P("data"))) give a batch-sharded loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.diffusion import schedules
from sd_jax.diffusion.schedules import NoiseSchedule

# model_fn(x [B, ...], t float32 [B], context [B, L, D] | None) -> output [B, ...] (ε, v or x0).
ModelFn = Callable[[jnp.ndarray, jnp.ndarray, "jnp.ndarray | None"], jnp.ndarray]

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_a")
KARRAS_SAMPLERS = ("dpmpp_2m", "euler")  # those diffusers offers use_karras_sigmas for
# "<sampler>_karras" is accepted as a name for <sampler> with use_karras_sigmas=True.
SAMPLER_NAMES = SAMPLERS + tuple(f"{name}_karras" for name in KARRAS_SAMPLERS)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24  # ᾱ_{T-1} of the σ-based schedulers under rescale_betas_zero_snr


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Scheduler settings, named as diffusers' scheduler configs name them. Defaults: Stable Diffusion 1.x/2.x.

  Hashable (static under jit). `config_from_diffusers` reads a diffusers scheduler_config.json.
  """

  sampler: str = "dpmpp_2m"  # one of SAMPLER_NAMES
  num_train_timesteps: int = 1000  # T
  beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2 (alias cosine)
  beta_start: float = 0.00085  # β_0 of the linear schedules
  beta_end: float = 0.012  # β_{T-1} of the linear schedules
  trained_betas: tuple[float, ...] | None = None  # a β table of length T; replaces beta_schedule/start/end
  rescale_betas_zero_snr: bool = False  # Lin et al. 2023: ᾱ_{T-1} = 0 (pair with v_prediction, trailing)
  prediction_type: str = "epsilon"  # what the model predicts: epsilon | v_prediction | sample
  timestep_spacing: str = "leading"  # leading | trailing | linspace
  steps_offset: int = 1  # added to "leading" timesteps (SD's configs: 1)
  use_karras_sigmas: bool = False  # dpmpp_2m, euler: Karras et al. (2022) σ spacing
  eta: float = 0.0  # ddim: η (0 = deterministic, 1 = DDPM-like)
  set_alpha_to_one: bool = False  # ddim: ᾱ past the last step is 1 (True) or ᾱ_0 (SD's configs: False)
  clip_sample: bool = False  # ddpm, ddim: clip x̂0 to ±clip_sample_range (pixel models only)
  clip_sample_range: float = 1.0

  @property
  def base_sampler(self) -> str:
    """The sampler without a "_karras" suffix."""
    return self.sampler.removesuffix("_karras")

  @property
  def karras(self) -> bool:
    return self.use_karras_sigmas or self.sampler.endswith("_karras")

  @property
  def stochastic(self) -> bool:
    """Whether the sampler adds fresh noise at each step (and so needs `rng`)."""
    return self.base_sampler in ("ddpm", "euler_a") or (self.base_sampler == "ddim" and self.eta != 0)


def check_config(config: SamplerConfig) -> None:
  """Raises ValueError naming the field to change when `config` is not something this module can run."""
  if config.sampler not in SAMPLER_NAMES:
    raise ValueError(f"sampler={config.sampler!r}: use one of {', '.join(SAMPLER_NAMES)}.")
  if config.timestep_spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"timestep_spacing={config.timestep_spacing!r}: use one of {', '.join(TIMESTEP_SPACINGS)}.")
  if config.beta_schedule not in schedules.SCHEDULE_KINDS:
    raise ValueError(f"beta_schedule={config.beta_schedule!r}: use one of {', '.join(schedules.SCHEDULE_KINDS)}.")
  schedules.check_prediction_type(config.prediction_type)
  if config.karras and config.base_sampler not in KARRAS_SAMPLERS:
    raise ValueError(f"use_karras_sigmas=True with sampler={config.sampler!r}: Karras sigmas exist only for "
                     f"{', '.join(KARRAS_SAMPLERS)} (as in diffusers).")
  if config.eta < 0:
    raise ValueError(f"eta={config.eta}: must be >= 0.")
  if config.eta != 0 and config.base_sampler != "ddim":
    raise ValueError(f"eta={config.eta} with sampler={config.sampler!r}: eta is a DDIM setting; set eta=0 or "
                     "sampler='ddim'.")
  if config.num_train_timesteps < 2:
    raise ValueError(f"num_train_timesteps={config.num_train_timesteps}: must be >= 2.")
  if config.trained_betas is not None:
    betas = np.asarray(config.trained_betas, dtype=np.float64)
    if betas.shape != (config.num_train_timesteps,):
      raise ValueError(f"trained_betas has {betas.size} values but num_train_timesteps={config.num_train_timesteps}:"
                       " they must match.")
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError("trained_betas: every β must be in (0, 1).")


_SCHEDULER_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
}


def config_from_diffusers(scheduler_config: Mapping[str, Any], sampler: str | None = None,
                          **overrides: Any) -> SamplerConfig:
  """A SamplerConfig from a diffusers scheduler config dict (scheduler/scheduler_config.json).

  The schedule, prediction type and spacing are read; solver settings of the scheduler class (algorithm_type,
  solver_order, ...) are not: each sampler here is the one its name says (dpmpp_2m = DPM-Solver++(2M), midpoint).

  Args:
    scheduler_config: the dict; keys SamplerConfig does not have (skip_prk_steps, ...) are ignored.
    sampler: the sampler to run with this schedule; None takes it from `_class_name` (DDIMScheduler -> "ddim", ...),
      and "dpmpp_2m" for other classes (e.g. SD 1.x's PNDMScheduler).
    overrides: SamplerConfig fields to set after reading (e.g. use_karras_sigmas=True).
  """
  if scheduler_config.get("thresholding"):
    raise ValueError("scheduler_config.thresholding=True (dynamic thresholding) is not supported.")
  if sampler is None:
    sampler = _SCHEDULER_CLASSES.get(scheduler_config.get("_class_name", ""), "dpmpp_2m")
  fields = {f.name for f in dataclasses.fields(SamplerConfig)}
  kwargs = {k: v for k, v in scheduler_config.items() if k in fields and v is not None and k != "sampler"}
  if "trained_betas" in kwargs:  # a JSON list; hashable as a tuple (SamplerConfig is a static jit argument)
    kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
  if sampler.removesuffix("_karras") not in KARRAS_SAMPLERS:
    kwargs.pop("use_karras_sigmas", None)  # e.g. a DPM-Solver config reused for DDIM
  config = SamplerConfig(sampler=sampler, **{**kwargs, **overrides})
  check_config(config)
  return config


def config_from_training(diffusion_config: Mapping[str, Any], sample_config: Mapping[str, Any] | None = None, *,
                         sampler: str | None = None, **overrides: Any) -> SamplerConfig:
  """The SamplerConfig of a model trained here, from its config's `diffusion` block and (optionally) its `sample`
  block: the one place where a training config becomes sampler settings (sample grids, the export's
  scheduler_config.json, the bench).

  From `diffusion`: schedule, num_train_timesteps, beta_start, beta_end, prediction_type, zero_terminal_snr and
  snr_shift (a shifted schedule becomes trained_betas, as the export writes it). A zero-SNR model gets
  timestep_spacing="trailing" and steps_offset=0 (Lin et al. 2023) unless the sample block or `overrides` says
  otherwise. From `sample` (keys it has): sampler, timestep_spacing, steps_offset, set_alpha_to_one, eta,
  clip_sample. `sampler` (else the sample block's, else "dpmpp_2m") and `overrides` come last.
  """
  if isinstance(sample_config, str):
    raise TypeError(f"config_from_training(diffusion, {sample_config!r}): the second argument is the config's sample "
                    f"block; pass the sampler as sampler={sample_config!r}.")
  d, s = diffusion_config, sample_config or {}
  fields = dict(beta_schedule=d["schedule"], num_train_timesteps=int(d["num_train_timesteps"]),
                beta_start=float(d["beta_start"]), beta_end=float(d["beta_end"]),
                prediction_type=d["prediction_type"], rescale_betas_zero_snr=bool(d.get("zero_terminal_snr", False)))
  if fields["rescale_betas_zero_snr"]:
    fields.update(timestep_spacing="trailing", steps_offset=0)
  snr_shift = float(d.get("snr_shift", 1.0))
  if snr_shift != 1.0:
    fields["trained_betas"] = tuple(float(b) for b in schedules.shifted_betas(
        d["schedule"], int(d["num_train_timesteps"]), float(d["beta_start"]), float(d["beta_end"]), snr_shift))
  for key, kind in (("sampler", str), ("timestep_spacing", str), ("steps_offset", int), ("set_alpha_to_one", bool),
                    ("eta", float), ("clip_sample", bool)):
    if key in s and s[key] is not None:
      fields[key] = kind(s[key])
  fields.setdefault("sampler", "dpmpp_2m")
  if sampler is not None:
    fields["sampler"] = sampler
  config = SamplerConfig(**{**fields, **overrides})
  check_config(config)
  return config


_CLASS_NAMES = {sampler: name for name, sampler in _SCHEDULER_CLASSES.items()}


def to_diffusers_config(config: SamplerConfig) -> dict[str, Any]:
  """The diffusers scheduler_config.json dict of `config` (what an export writes; `config_from_diffusers` reads it
  back to the same settings)."""
  check_config(config)
  out = {"_class_name": _CLASS_NAMES[config.base_sampler], "num_train_timesteps": config.num_train_timesteps,
         "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(config.beta_schedule, config.beta_schedule),
         "beta_start": config.beta_start, "beta_end": config.beta_end, "prediction_type": config.prediction_type,
         "rescale_betas_zero_snr": config.rescale_betas_zero_snr, "timestep_spacing": config.timestep_spacing,
         "steps_offset": config.steps_offset, "set_alpha_to_one": config.set_alpha_to_one,
         "clip_sample": config.clip_sample}
  if config.clip_sample:
    out["clip_sample_range"] = config.clip_sample_range
  if config.karras:
    out["use_karras_sigmas"] = True
  if config.trained_betas is not None:  # diffusers has no SNR shift: the shifted table itself
    out["trained_betas"] = [float(b) for b in config.trained_betas]
  return out


# ----------------------------------------------------------------------------------------------------------------
# Timesteps of the DDPM and DDIM schedulers.
# ----------------------------------------------------------------------------------------------------------------


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
  """Descending inference timesteps, int32 [n], as diffusers' `DDIMScheduler.set_timesteps`.

  leading:  (arange(n) * (T // n))[::-1] + steps_offset       (SD 1.x/2.x: steps_offset = 1)
  trailing: round(arange(T, 0, -T / n)) - 1                   (starts at T - 1; Lin et al. 2023, Table 2)
  linspace: round(linspace(0, T - 1, n))[::-1]
  """
  if not 1 <= num_inference_steps <= num_train_timesteps:
    raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {num_train_timesteps}].")
  n, T = num_inference_steps, num_train_timesteps
  if spacing == "leading":
    timesteps = (np.arange(n) * (T // n)).round()[::-1] + steps_offset
  elif spacing == "trailing":
    timesteps = np.round(np.arange(T, 0, -T / n)) - 1
  elif spacing == "linspace":
    timesteps = np.linspace(0, T - 1, n).round()[::-1]
  else:
    raise ValueError(f"timestep spacing {spacing!r}: use one of {', '.join(TIMESTEP_SPACINGS)}.")
  timesteps = timesteps.astype(np.int32)
  if timesteps.max() >= T:
    raise ValueError(f"steps_offset={steps_offset} puts the first timestep past {T - 1}.")
  return timesteps


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """The timestep each step moves to: the next entry of `timesteps`, and -1 (i.e. ᾱ = 1) after the last."""
  timesteps = np.asarray(timesteps, np.int32)
  return np.concatenate([timesteps[1:], np.array([-1], np.int32)])


# ----------------------------------------------------------------------------------------------------------------
# Host-side plans: timesteps and per-step coefficients, built in NumPy as diffusers builds them.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the loop needs for an n-step run; every per-step array has n rows (step k of the full schedule)."""

  timesteps: np.ndarray  # float32 [n]: the t the model sees
  per_step: dict  # name -> [n] array, sliced for img2img and scanned over
  init_noise_sigma: np.float32  # txt2img: x_T = noise · init_noise_sigma
  add_noise_signal: np.ndarray  # float32 [n]: img2img starting at step k: x = signal[k] x0 + noise_scale[k] ε
  add_noise_scale: np.ndarray  # float32 [n]


def noise_schedule(config: SamplerConfig) -> NoiseSchedule:
  """The training noise schedule `config` describes (its β table: from beta_schedule, or trained_betas; with
  rescale_betas_zero_snr), as diffusers builds it for the scheduler."""
  if config.trained_betas is not None:  # as diffusers: the table, then the zero-SNR rescaling if asked for
    betas = np.asarray(config.trained_betas, dtype=np.float32)
    if config.rescale_betas_zero_snr:
      betas = schedules.rescale_zero_terminal_snr(betas)
    return schedules.schedule_from_betas(betas)
  return schedules.make_schedule(config.beta_schedule, config.num_train_timesteps, beta_start=config.beta_start,
                                 beta_end=config.beta_end, rescale_zero_terminal_snr=config.rescale_betas_zero_snr)


def _train_sigmas(config: SamplerConfig, schedule: NoiseSchedule) -> np.ndarray:
  """σ_t = sqrt((1 - ᾱ_t)/ᾱ_t), float32 [T], as diffusers' σ-based schedulers compute it (zero-SNR fix included)."""
  alphas_cumprod = np.array(schedule.alphas_cumprod, np.float32)
  if config.rescale_betas_zero_snr:
    alphas_cumprod[-1] = _ZERO_SNR_ALPHA_CUMPROD
  return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def _karras_sigmas(in_sigmas: np.ndarray, n: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022) eq. (5): n σ from in_sigmas[0] (max) down to in_sigmas[-1] (min), evenly in σ^(1/ρ)."""
  sigma_min, sigma_max = in_sigmas[-1].item(), in_sigmas[0].item()
  ramp = np.linspace(0, 1, n)
  min_inv_rho, max_inv_rho = sigma_min**(1 / rho), sigma_max**(1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho))**rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """The fractional training timestep of each σ: linear interpolation in log σ (diffusers' `_sigma_to_t`)."""
  log_sigma = np.log(np.maximum(sigmas, 1e-10))
  dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, n]
  low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return (1 - w) * low_idx + w * high_idx


def _spaced_timesteps(config: SamplerConfig, n: int, *, dpm: bool = False) -> np.ndarray:
  """Descending timesteps (float64 [n]) of the Euler schedulers (dpm=False) or DPMSolverMultistep (dpm=True)."""
  T, spacing = config.num_train_timesteps, config.timestep_spacing
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"timestep_spacing={spacing!r}: use one of {', '.join(TIMESTEP_SPACINGS)}.")
  if dpm:  # DPM-Solver spaces n + 1 points and drops the last (t = 0 is where σ = 0 is reached).
    if spacing == "linspace":
      timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
      timesteps = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    else:
      timesteps = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
  else:
    if spacing == "linspace":
      timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    elif spacing == "leading":
      timesteps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + np.float32(config.steps_offset)
    else:
      timesteps = np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1)
  return timesteps.copy()


def _check_timesteps(config: SamplerConfig, timesteps: np.ndarray, n: int) -> None:
  if len(timesteps) != n:
    raise ValueError(f"timestep_spacing={config.timestep_spacing!r} gives {len(timesteps)} timesteps for "
                     f"num_steps={n} (a rounding edge case of diffusers' formula); choose another num_steps.")
  if timesteps.max() > config.num_train_timesteps - 1:
    raise ValueError(f"steps_offset={config.steps_offset} puts a timestep past {config.num_train_timesteps - 1}.")


def _plan_ddpm_ddim(config: SamplerConfig, schedule: NoiseSchedule, n: int) -> _Plan:
  T = config.num_train_timesteps
  timesteps = ddim_timesteps(T, n, config.timestep_spacing, config.steps_offset)
  if config.base_sampler == "ddim":
    prev = timesteps - T // n  # diffusers' DDIM rule, whatever the spacing
  else:
    prev = previous_timesteps(timesteps)  # diffusers' DDPM: the next timestep of the list
  alphas_cumprod = np.asarray(schedule.alphas_cumprod)
  if config.prediction_type == "epsilon" and np.any(alphas_cumprod[timesteps] == 0):
    raise ValueError(f"prediction_type='epsilon' with a zero-SNR timestep (ᾱ_{timesteps.max()} = 0, from "
                     "rescale_betas_zero_snr=True): x0 is undefined there. Use prediction_type='v_prediction', "
                     "or timestep_spacing='leading' with steps_offset >= 1.")
  return _Plan(
      timesteps=timesteps.astype(np.float32),
      per_step={"t": timesteps.astype(np.int32), "prev_t": prev.astype(np.int32)},
      init_noise_sigma=np.float32(1.0),
      add_noise_signal=np.asarray(schedule.sqrt_alphas_cumprod)[timesteps],
      add_noise_scale=np.asarray(schedule.sqrt_one_minus_alphas_cumprod)[timesteps],
  )


def _plan_euler(config: SamplerConfig, schedule: NoiseSchedule, n: int) -> _Plan:
  train_sigmas = _train_sigmas(config, schedule)
  timesteps = _spaced_timesteps(config, n)
  _check_timesteps(config, timesteps, n)
  sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
  if config.karras:
    sigmas = _karras_sigmas(sigmas, n)
    timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # [n + 1]
  sigma_max = sigmas.max()
  init = sigma_max if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(sigma_max**2 + np.float32(1))
  sigma, sigma_next = sigmas[:-1], sigmas[1:]
  per_step = {"sigma": sigma, "sigma_next": sigma_next}
  if config.base_sampler == "euler_a":
    sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    per_step["sigma_up"] = sigma_up
    per_step["sigma_down"] = np.sqrt(np.maximum(sigma_next**2 - sigma_up**2, np.float32(0)))
  return _Plan(timesteps=timesteps.astype(np.float32), per_step=per_step, init_noise_sigma=np.float32(init),
               add_noise_signal=np.ones(n, np.float32), add_noise_scale=sigma)


def _plan_dpmpp_2m(config: SamplerConfig, schedule: NoiseSchedule, n: int) -> _Plan:
  train_sigmas = _train_sigmas(config, schedule)
  timesteps = _spaced_timesteps(config, n, dpm=True)
  if config.karras:
    sigmas = _karras_sigmas(np.flip(train_sigmas).copy(), n)
    timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
    if config.beta_schedule not in ("squaredcos_cap_v2", "cosine"):
      timesteps = timesteps.round()
    timesteps = timesteps.astype(np.int64)
  else:
    _check_timesteps(config, timesteps, n)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # [n + 1], σ = 0 after the last step

  # Float32 scalar arithmetic, as diffusers does it on 0-d tensors; σ_next = 0 gives λ = inf, e^{-h} = 0.
  with np.errstate(divide="ignore"):
    alpha = np.float32(1.0) / np.sqrt(sigmas**2 + np.float32(1.0))  # α of the VP view
    sigma_vp = sigmas * alpha
    lam = np.log(alpha) - np.log(sigma_vp)
  lam_cur, lam_next = lam[:-1], lam[1:]
  lam_prev = np.concatenate([lam[:1], lam[:-2]])  # row 0 is unused (first order there)
  h = lam_next - lam_cur
  with np.errstate(divide="ignore", invalid="ignore"):
    inv_r0 = np.float32(1.0) / ((lam_cur - lam_prev) / h)
    coef_x0 = alpha[1:] * (np.exp(-h) - np.float32(1.0))
    per_step = {
        "alpha": alpha[:-1],  # converts the model output to x̂0 at the current σ
        "sigma_vp": sigma_vp[:-1],
        "coef_x": sigma_vp[1:] / sigma_vp[:-1],
        "coef_x0": coef_x0,
        "half_coef_x0": np.float32(0.5) * coef_x0,
        # 1/r0 for the second-order term; 0 on first-order steps (the first step taken is set in `sample`).
        "inv_r0": np.where(np.arange(n) < n - 1, inv_r0, np.float32(0.0)).astype(np.float32),
    }
  return _Plan(timesteps=timesteps.astype(np.float32), per_step=per_step, init_noise_sigma=np.float32(1.0),
               add_noise_signal=alpha[:-1], add_noise_scale=sigma_vp[:-1])


_PLANNERS = {"ddpm": _plan_ddpm_ddim, "ddim": _plan_ddpm_ddim, "dpmpp_2m": _plan_dpmpp_2m, "euler": _plan_euler,
             "euler_a": _plan_euler}


@functools.lru_cache(maxsize=64)
def _plan(config: SamplerConfig, num_steps: int) -> tuple[_Plan, NoiseSchedule]:
  check_config(config)
  if not 1 <= num_steps <= config.num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {config.num_train_timesteps}].")
  with jax.ensure_compile_time_eval():
    schedule = noise_schedule(config)
  return _PLANNERS[config.base_sampler](config, schedule, num_steps), schedule


def inference_timesteps(config: SamplerConfig, num_steps: int) -> np.ndarray:
  """The timesteps the model sees, float32 [num_steps], in order (diffusers' `scheduler.timesteps`)."""
  return _plan(config, num_steps)[0].timesteps.copy()


def img2img_start(num_steps: int, strength: float) -> int:
  """Index of the first step run for img2img (diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps`).

  The last min(int(num_steps · strength), num_steps) steps are run; strength 1 runs them all (from the noised init
  latents at the first timestep), strength 0 none.
  """
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength={strength}: must be in [0, 1].")
  init_timestep = min(int(num_steps * strength), num_steps)
  return max(num_steps - init_timestep, 0)


def step_noise(rng, step: int, shape) -> jnp.ndarray:
  """z of step `step` (counting the steps run, from 0) of the stochastic samplers: N(0, I), float32 `shape`.

  `rng` is one key (uint32 [2]: z = normal(fold_in(rng, step), shape)) or one key per image (uint32 [B, 2]: image b
  draws its own z from fold_in(rng[b], step), so it does not depend on the other images of the batch)."""
  rng = jnp.asarray(rng)
  if rng.ndim == 2:
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, step), tuple(shape)[1:], jnp.float32))(rng)
  return jax.random.normal(jax.random.fold_in(rng, step), tuple(shape), jnp.float32)


def image_noise(seed, indices, shape) -> tuple[jax.Array, jax.Array]:
  """How every tool keys the randomness of an image: (initial noise float32 [N, *shape], step keys uint32 [N, 2]).

  Image number i of a seed (its index among all the images a command draws for that seed, prompt-major) takes
  key_i = fold_in(PRNGKey(seed), i), split into the key of its initial noise (x_T, or the noise added to img2img's
  init latents) and the key of its per-step noise (`step_noise` with rng = the step keys). So a seed gives the same
  image in `python -m sd_jax.sample`, evaluate, stages and the trainers' grids, whatever the batch size or sharding.

  Args:
    seed: an int, or the key PRNGKey(seed) (pass the key inside jit, so the seed is not a compile-time constant).
    indices: int [N], the images' indices.
    shape: one image's noise shape, e.g. (h, w, c) latents.
  """
  base = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed

  def one(index):
    noise_key, step_key = jax.random.split(jax.random.fold_in(base, index))
    return jax.random.normal(noise_key, tuple(shape), jnp.float32), step_key

  return jax.vmap(one)(jnp.asarray(indices, jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# Guidance.
# ----------------------------------------------------------------------------------------------------------------


def rescale_guidance(guided, cond, guidance_rescale):
  """Lin et al. 2023 §3.4 (diffusers' `rescale_noise_cfg`): φ · guided · std(cond)/std(guided) + (1 - φ) · guided.

  std is per example over all non-batch axes, unbiased (ddof=1) as torch's `std`.
  """
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
  std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
  rescaled = guided * (std_cond / std_guided)
  return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _is_static(value, target) -> bool:
  return isinstance(value, (int, float)) and value == target


def guided_model_fn(model_fn: ModelFn, context=None, uncond_context=None, guidance_scale=1.0,
                    guidance_rescale=0.0) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """(x [B, ...], t [B]) -> the model output, with classifier-free guidance when it applies.

  Args:
    model_fn: (x, t, context) -> output.
    context: the prompts' context [B, L, D], or None (unconditional model).
    uncond_context: the negative prompts' (or empty prompt's) context, [B, L, D] or [1, L, D]; None = no guidance.
    guidance_scale: s. As in diffusers, a Python number <= 1 means no guidance (one conditional call); a traced
      value always runs the guided pair.
    guidance_rescale: φ in [0, 1] (0 = off; a Python 0 skips the computation).
  """
  do_guidance = uncond_context is not None and not (isinstance(guidance_scale, (int, float)) and guidance_scale <= 1)
  if uncond_context is not None and context is None:
    raise ValueError("uncond_context is given but context is None: classifier-free guidance needs both.")
  if not do_guidance:
    return lambda x, t: model_fn(x, t, context).astype(jnp.float32)
  uncond_context = jnp.broadcast_to(uncond_context, context.shape).astype(context.dtype)
  pair_context = jnp.concatenate([uncond_context, context])  # [2B, L, D], uncond first as in diffusers

  def guided(x, t):
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), pair_context)
    uncond, cond = jnp.split(out.astype(jnp.float32), 2)
    result = uncond + guidance_scale * (cond - uncond)
    if not _is_static(guidance_rescale, 0):
      result = rescale_guidance(result, cond, guidance_rescale)
    return result

  return guided


# ----------------------------------------------------------------------------------------------------------------
# Steps (jnp): the tensor arithmetic of each diffusers `step`, in its order of operations.
# ----------------------------------------------------------------------------------------------------------------


def ddim_step(schedule: NoiseSchedule,
              model_output,
              t,
              prev_t,
              x_t,
              noise=None,
              *,
              eta: float = 0.0,
              prediction_type: str = "epsilon",
              clip_sample: bool = False,
              clip_sample_range: float = 1.0,
              final_alpha_cumprod=1.0):
  """One DDIM step x_t → x_prev, as diffusers' `DDIMScheduler.step` (use_clipped_model_output=False).

  Args:
    schedule: the training noise schedule.
    model_output: ε̂, v̂ or x̂0 at (x_t, t), [B, ...].
    t: current timestep, a scalar int (traced is fine).
    prev_t: the timestep stepped to; < 0 means past the end (ᾱ_prev = final_alpha_cumprod).
    x_t: current sample, [B, ...].
    noise: z ~ N(0, I) of x_t's shape, used when eta > 0 (may be None when eta is 0).
    eta: η of the DDIM paper (0 = deterministic).
    prediction_type: "epsilon", "v_prediction" or "sample" (static).
    clip_sample: clip x̂0 to ±clip_sample_range (diffusers' default is True; latents want False).
    clip_sample_range: see clip_sample.
    final_alpha_cumprod: ᾱ past the last step: 1 (diffusers' set_alpha_to_one=True) or ᾱ_0 (SD's scheduler).

  Returns:
    (x_prev, pred_x0), both float32 [B, ...].
  """
  schedules.check_prediction_type(prediction_type)
  x_t = x_t.astype(jnp.float32)
  model_output = model_output.astype(jnp.float32)
  one = jnp.float32(1.0)

  alpha_prod_t = schedule.alphas_cumprod[t]
  alpha_prod_t_prev = jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)],
                                jnp.asarray(final_alpha_cumprod, jnp.float32))
  beta_prod_t = one - alpha_prod_t
  beta_prod_t_prev = one - alpha_prod_t_prev

  if prediction_type == "epsilon":
    pred_x0 = (x_t - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
    pred_eps = model_output
  elif prediction_type == "v_prediction":
    pred_x0 = jnp.sqrt(alpha_prod_t) * x_t - jnp.sqrt(beta_prod_t) * model_output
    pred_eps = jnp.sqrt(alpha_prod_t) * model_output + jnp.sqrt(beta_prod_t) * x_t
  else:
    pred_x0 = model_output
    pred_eps = (x_t - jnp.sqrt(alpha_prod_t) * pred_x0) / jnp.sqrt(beta_prod_t)
  if clip_sample:
    pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)

  # σ_t(η), eq. (16) of the DDIM paper.
  variance = (beta_prod_t_prev / beta_prod_t) * (one - alpha_prod_t / alpha_prod_t_prev)
  std_dev_t = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(one - alpha_prod_t_prev - std_dev_t**2) * pred_eps
  x_prev = jnp.sqrt(alpha_prod_t_prev) * pred_x0 + direction
  if not (isinstance(eta, (int, float)) and eta == 0):
    x_prev = x_prev + std_dev_t * noise.astype(jnp.float32)
  return x_prev, pred_x0


def ddpm_step(schedule: NoiseSchedule,
              model_output,
              t,
              prev_t,
              x_t,
              noise,
              *,
              prediction_type: str = "epsilon",
              clip_sample: bool = True,
              clip_sample_range: float = 1.0):
  """One ancestral step x_t → x_prev, as diffusers' `DDPMScheduler.step` (fixed_small variance).

  Args:
    schedule: the training noise schedule.
    model_output: ε̂, v̂ or x̂0 at (x_t, t), [B, ...].
    t: current timestep, a scalar int (traced is fine).
    prev_t: the timestep stepped to; < 0 means "past the end" (ᾱ_prev = 1).
    x_t: current sample, [B, ...].
    noise: z ~ N(0, I) of x_t's shape; ignored when t = 0.
    prediction_type: "epsilon", "v_prediction" or "sample".
    clip_sample: clip the predicted x0 to [-clip_sample_range, clip_sample_range] (diffusers' DDPM default).
    clip_sample_range: see clip_sample.

  Returns:
    (x_prev, pred_x0), both float32 [B, ...].
  """
  schedules.check_prediction_type(prediction_type)
  x_t = x_t.astype(jnp.float32)
  model_output = model_output.astype(jnp.float32)
  one = jnp.float32(1.0)

  alpha_prod_t = schedule.alphas_cumprod[t]
  alpha_prod_t_prev = jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], one)
  beta_prod_t = one - alpha_prod_t
  beta_prod_t_prev = one - alpha_prod_t_prev
  # With strided timesteps a step spans several training steps: these are the α, β of that jump.
  current_alpha_t = alpha_prod_t / alpha_prod_t_prev
  current_beta_t = one - current_alpha_t

  if prediction_type == "epsilon":
    pred_x0 = (x_t - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
  elif prediction_type == "v_prediction":
    pred_x0 = jnp.sqrt(alpha_prod_t) * x_t - jnp.sqrt(beta_prod_t) * model_output
  else:
    pred_x0 = model_output
  if clip_sample:
    pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)

  # Posterior mean μ̃(x_t, x0), eq. (7) of Ho et al.
  pred_x0_coeff = jnp.sqrt(alpha_prod_t_prev) * current_beta_t / beta_prod_t
  current_sample_coeff = jnp.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
  mean = pred_x0_coeff * pred_x0 + current_sample_coeff * x_t

  # Posterior variance β̃ ("fixed_small"), clamped as diffusers does before its square root.
  variance = jnp.maximum(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20)
  sigma = jnp.where(t > 0, jnp.sqrt(variance), 0.0)
  x_prev = mean + sigma * noise.astype(jnp.float32)
  return x_prev, pred_x0


def _sigma_x0(prediction_type: str, model_output, x, sigma):
  """x̂0 in the σ (variance-exploding) parameterisation of the Euler schedulers."""
  if prediction_type == "epsilon":
    return x - sigma * model_output
  if prediction_type == "v_prediction":
    return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + (x / (sigma**2 + 1))
  return model_output


def _step(config: SamplerConfig, schedule: NoiseSchedule, final_alpha_cumprod, coefs, x, model_output, z, prev_x0):
  """One step of config's sampler: (x_next, x̂0 of this step)."""
  name = config.base_sampler
  if name == "ddim":
    return ddim_step(schedule, model_output, coefs["t"], coefs["prev_t"], x, z, eta=config.eta,
                     prediction_type=config.prediction_type, clip_sample=config.clip_sample,
                     clip_sample_range=config.clip_sample_range, final_alpha_cumprod=final_alpha_cumprod)
  if name == "ddpm":
    return ddpm_step(schedule, model_output, coefs["t"], coefs["prev_t"], x, z,
                     prediction_type=config.prediction_type, clip_sample=config.clip_sample,
                     clip_sample_range=config.clip_sample_range)
  if name in ("euler", "euler_a"):
    sigma = coefs["sigma"]
    pred_x0 = _sigma_x0(config.prediction_type, model_output, x, sigma)
    derivative = (x - pred_x0) / sigma
    if name == "euler":
      return x + derivative * (coefs["sigma_next"] - sigma), pred_x0
    x_next = x + derivative * (coefs["sigma_down"] - sigma)
    return x_next + z * coefs["sigma_up"], pred_x0
  # dpmpp_2m: data-prediction (x̂0) multistep update.
  if config.prediction_type == "epsilon":
    pred_x0 = (x - coefs["sigma_vp"] * model_output) / coefs["alpha"]
  elif config.prediction_type == "v_prediction":
    pred_x0 = coefs["alpha"] * x - coefs["sigma_vp"] * model_output
  else:
    pred_x0 = model_output
  d1 = coefs["inv_r0"] * (pred_x0 - prev_x0)  # exactly 0 on first-order steps
  x_next = coefs["coef_x"] * x - coefs["coef_x0"] * pred_x0 - coefs["half_coef_x0"] * d1
  return x_next, pred_x0


def sample(model_fn: ModelFn,
           noise,
           *,
           config: SamplerConfig = SamplerConfig(),
           num_steps: int,
           context=None,
           uncond_context=None,
           guidance_scale=1.0,
           guidance_rescale=0.0,
           rng=None,
           init_latents=None,
           strength: float = 1.0,
           return_trajectory: bool = False):
  """Runs config.sampler for num_steps steps (fewer for img2img) as one lax.scan; call it inside jax.jit.

  Args:
    model_fn: (x [B, ...], t float32 [B], context) -> ε̂ / v̂ / x̂0 (config.prediction_type) [B, ...].
    noise: unit Gaussian [B, ...]: x_T (scaled by the sampler's init_noise_sigma), or for img2img the noise added
      to init_latents.
    config: the scheduler settings (static).
    num_steps: n, the length of the full schedule (static).
    context: [B, L, D] conditioning passed to model_fn, or None.
    uncond_context: negative-prompt (or empty-prompt) context [B or 1, L, D] for classifier-free guidance, or None.
    guidance_scale: s of classifier-free guidance (see guided_model_fn).
    guidance_rescale: φ of guidance rescale (0 = off).
    rng: key of the per-step noise, one [2] or one per image [B, 2] (see `step_noise`); required by the stochastic
      samplers (ddpm, euler_a, ddim with eta > 0).
    init_latents: img2img: the clean latents [B, ...] to start from (None = txt2img).
    strength: img2img: how much of the schedule to run (static; see img2img_start).
    return_trajectory: also return x after every step run, [steps run, B, ...].

  Returns:
    The final sample, float32 [B, ...] (and the trajectory when asked).
  """
  plan, schedule = _plan(config, num_steps)
  if config.stochastic and rng is None:
    raise ValueError(f"sampler={config.sampler!r} (eta={config.eta}) adds noise at each step: pass rng.")
  start = 0
  noise = jnp.asarray(noise, jnp.float32)
  if init_latents is None:
    x = noise * plan.init_noise_sigma
  else:
    start = img2img_start(num_steps, strength)
    if start >= num_steps:
      raise ValueError(f"strength={strength} with num_steps={num_steps} runs no step (int(num_steps * strength) = "
                       "0): raise strength or num_steps.")
    init_latents = jnp.asarray(init_latents, jnp.float32)
    if init_latents.shape != noise.shape:
      raise ValueError(f"init_latents shape {init_latents.shape} != noise shape {noise.shape}.")
    x = plan.add_noise_signal[start] * init_latents + plan.add_noise_scale[start] * noise

  per_step = {k: v[start:] for k, v in plan.per_step.items()}
  if config.base_sampler == "dpmpp_2m":
    per_step["inv_r0"] = per_step["inv_r0"].copy()
    per_step["inv_r0"][0] = 0.0  # the first step taken is first order (no previous x̂0)
  xs = {"i": np.arange(num_steps - start, dtype=np.int32), "t": plan.timesteps[start:],
        "coefs": per_step}
  final_alpha_cumprod = (jnp.float32(1.0) if config.set_alpha_to_one else schedule.alphas_cumprod[0])
  guided = guided_model_fn(model_fn, context, uncond_context, guidance_scale, guidance_rescale)
  batch = noise.shape[0]

  def body(carry, step):
    x, prev_x0 = carry
    model_input = x
    if config.base_sampler in ("euler", "euler_a"):
      model_input = x / jnp.sqrt(step["coefs"]["sigma"]**2 + 1)  # scale_model_input
    model_output = guided(model_input, jnp.full((batch,), step["t"], jnp.float32))
    z = step_noise(rng, step["i"], x.shape) if config.stochastic else None
    x_next, pred_x0 = _step(config, schedule, final_alpha_cumprod, step["coefs"], x, model_output, z, prev_x0)
    return (x_next, pred_x0), (x_next if return_trajectory else None)

  (x, _), trajectory = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
  return (x, trajectory) if return_trajectory else x
