"""A small jitted DDIM sampler (Song et al. 2021) with classifier-free guidance, for training-time sample grids.

Each step is diffusers' `DDIMScheduler.step`, written out operation for operation: predict x0 (and ε) from the model
output, optionally clip x0, then

    x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z,    σ = η sqrt((1 - ᾱ_prev)/(1 - ᾱ_t) (1 - ᾱ_t/ᾱ_prev)).

η = 0 is deterministic DDIM; η = 1 is DDPM-like ancestral sampling. As in diffusers, the step always moves from t to
t - T // n (n = number of inference steps), whatever the spacing, and past the end ᾱ_prev is 1 (`set_alpha_to_one`)
or ᾱ_0. The whole chain is one `lax.fori_loop`. Call it inside `jax.jit` with the network parameters as arguments
of the jitted function (not baked into `model_fn` as constants):

    @jax.jit
    def draw(params, context, uncond_context, rng):
      model_fn = lambda x, t, c: unet.apply({"params": params}, x, t, c)
      guided = classifier_free_guidance(model_fn, context, uncond_context, guidance_scale=7.5)
      return ddim_sample(guided, schedule, rng, (8, 64, 64, 4), num_inference_steps=50)

The full sampler suite (DDPM, DPM-Solver++ 2M, Euler, Euler-a, guidance rescale, img2img, one `sample` entry point)
is sd_jax/diffusion/samplers.py, which runs its DDIM steps through `ddim_step` and `ddim_timesteps` from here.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.diffusion import schedules
from sd_jax.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t [B, ...], t int32 [B]) -> output [B, ...]
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


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


def classifier_free_guidance(model_fn: Callable, context, uncond_context, guidance_scale) -> ModelFn:
  """(x_t, t) -> uncond + s · (cond − uncond), with one batched network call on [uncond; cond].

  Args:
    model_fn: (x_t [B, ...], t [B], context [B, L, D]) -> output [B, ...].
    context: the prompts' context, [B, L, D].
    uncond_context: the empty prompt's context, [B, L, D] or [1, L, D] (broadcast).
    guidance_scale: s; 1 gives the conditional output (the network still runs on both halves).
  """
  uncond_context = jnp.broadcast_to(uncond_context, context.shape).astype(context.dtype)

  def guided(x_t, t):
    out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                   jnp.concatenate([uncond_context, context]))
    uncond, cond = jnp.split(out.astype(jnp.float32), 2)
    return uncond + guidance_scale * (cond - uncond)

  return guided


def ddim_sample(model_fn: ModelFn,
                schedule: NoiseSchedule,
                rng,
                shape: Sequence[int],
                *,
                num_inference_steps: int = 50,
                eta: float = 0.0,
                prediction_type: str = "epsilon",
                timestep_spacing: str = "leading",
                steps_offset: int = 0,
                set_alpha_to_one: bool = True,
                clip_sample: bool = False,
                clip_sample_range: float = 1.0,
                initial_noise: Optional[jnp.ndarray] = None,
                return_trajectory: bool = False):
  """Draws samples with DDIM from pure noise.

  Args:
    model_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...] (wrap it with classifier_free_guidance for CFG).
    schedule: the training noise schedule.
    rng: PRNG key, split into the key of x_T and that of the per-step noise (step i: fold_in(step_key, i)).
    shape: sample shape [B, H, W, C] (static).
    num_inference_steps: n (static).
    eta: η; 0 = deterministic.
    prediction_type: "epsilon", "v_prediction" or "sample" (static). With a zero-terminal-SNR schedule the first
      "trailing" step has ᾱ = 0, where only v_prediction (or sample) defines x0.
    timestep_spacing: "leading", "trailing" or "linspace" (static; see ddim_timesteps).
    steps_offset: added to "leading" timesteps (SD's scheduler uses 1).
    set_alpha_to_one: ᾱ past the last step is 1 (True, diffusers' default) or ᾱ_0 (SD's scheduler config).
    clip_sample: clip x̂0 (only for pixel-space models whose data is in ±clip_sample_range).
    clip_sample_range: see clip_sample.
    initial_noise: optional x_T of `shape` (e.g. to feed a reference the same draw); drawn from rng when None.
    return_trajectory: also return x after every step, [n, B, ...] (for tests and visualisation).

  Returns:
    x_0 float32 [B, ...] (and the trajectory when asked).
  """
  shape = tuple(shape)
  T = schedule.num_train_timesteps
  timesteps = ddim_timesteps(T, num_inference_steps, timestep_spacing, steps_offset)
  prev_timesteps = timesteps - T // num_inference_steps  # diffusers' rule, whatever the spacing
  final_alpha_cumprod = jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]
  init_rng, step_rng = jax.random.split(rng)
  if initial_noise is None:
    initial_noise = jax.random.normal(init_rng, shape, jnp.float32)
  timesteps, prev_timesteps = jnp.asarray(timesteps), jnp.asarray(prev_timesteps)

  def step(i, x_t):
    t = timesteps[i]
    model_output = model_fn(x_t, jnp.full((shape[0],), t, jnp.int32))
    noise = None
    if not (isinstance(eta, (int, float)) and eta == 0):
      noise = jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float32)
    x_prev, _ = ddim_step(schedule, model_output, t, prev_timesteps[i], x_t, noise, eta=eta,
                          prediction_type=prediction_type, clip_sample=clip_sample,
                          clip_sample_range=clip_sample_range, final_alpha_cumprod=final_alpha_cumprod)
    return x_prev

  x_T = jnp.asarray(initial_noise, jnp.float32)
  if return_trajectory:
    def scan_body(x_t, i):
      x_prev = step(i, x_t)
      return x_prev, x_prev
    x_0, trajectory = jax.lax.scan(scan_body, x_T, jnp.arange(num_inference_steps))
    return x_0, trajectory
  return jax.lax.fori_loop(0, num_inference_steps, step, x_T)
