"""A small ancestral DDPM sampler (Ho et al. 2020) for drawing sample grids during training.

Each step is diffusers' `DDPMScheduler.step` with variance_type="fixed_small" (posterior variance β̃), written out
operation for operation: predict x0, optionally clip it, take the posterior mean μ̃(x_t, x0), then
x_prev = μ̃ + σ·z with z ~ N(0, I), and no noise when t = 0. `ddpm_step` takes z as an argument so a parity test can
feed the same draws to both implementations.

The full loop is a `lax.fori_loop`, so the whole chain is one XLA loop. Call it inside `jax.jit`, passing the
network parameters as arguments of the jitted function (not baked into `model_fn` as constants):

    @jax.jit
    def draw(params, rng):
      return ddpm_sample(lambda x, t: unet.apply(params, x, t, context), schedule, rng, (8, 32, 32, 4))
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.diffusion import schedules
from sd_jax.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t [B, ...], t int32 [B]) -> output [B, ...]


def ddpm_timesteps(num_train_timesteps: int,
                   num_inference_steps: Optional[int] = None,
                   steps_offset: int = 0) -> np.ndarray:
  """Descending timesteps with diffusers' "leading" spacing (DDPMScheduler's default), int32 [n].

  None (or T) gives every step T-1, ..., 0; otherwise (arange(n) * (T // n))[::-1] + steps_offset.
  """
  if num_inference_steps is None:
    num_inference_steps = num_train_timesteps
  if not 1 <= num_inference_steps <= num_train_timesteps:
    raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {num_train_timesteps}].")
  step_ratio = num_train_timesteps // num_inference_steps
  timesteps = (np.arange(num_inference_steps) * step_ratio)[::-1] + steps_offset
  if timesteps[0] >= num_train_timesteps:
    raise ValueError(f"steps_offset={steps_offset} puts the first timestep past {num_train_timesteps - 1}.")
  return timesteps.astype(np.int32)


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """The timestep each step moves to: the next entry of `timesteps`, and -1 (i.e. ᾱ = 1) after the last."""
  timesteps = np.asarray(timesteps, np.int32)
  return np.concatenate([timesteps[1:], np.array([-1], np.int32)])


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


def ddpm_sample(model_fn: ModelFn,
                schedule: NoiseSchedule,
                rng,
                shape: Sequence[int],
                *,
                num_inference_steps: Optional[int] = None,
                prediction_type: str = "epsilon",
                clip_sample: bool = True,
                clip_sample_range: float = 1.0,
                steps_offset: int = 0,
                initial_noise=None):
  """Draws samples by ancestral DDPM sampling from pure noise.

  Args:
    model_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...].
    schedule: the training noise schedule.
    rng: PRNG key. Split into the key of x_T and the key of the per-step noise; step i draws its z from
      fold_in(step_key, i), so results do not depend on the number of devices or on batching elsewhere.
    shape: sample shape [B, H, W, C] (static).
    num_inference_steps: None for all T steps, else a "leading"-spaced subset of that many steps.
    prediction_type: "epsilon", "v_prediction" or "sample" (static).
    clip_sample: clip predicted x0 to ±clip_sample_range at each step (diffusers' DDPM default True; static).
    clip_sample_range: see clip_sample.
    steps_offset: added to every inference timestep (diffusers' `steps_offset`).
    initial_noise: optional x_T of `shape` (e.g. to feed the same draw to a reference); drawn from rng when None.

  Returns:
    x_0, float32 [B, ...].
  """
  shape = tuple(shape)
  timesteps = ddpm_timesteps(schedule.num_train_timesteps, num_inference_steps, steps_offset)
  prev_timesteps = previous_timesteps(timesteps)
  init_rng, step_rng = jax.random.split(rng)
  if initial_noise is None:
    initial_noise = jax.random.normal(init_rng, shape, jnp.float32)
  timesteps, prev_timesteps = jnp.asarray(timesteps), jnp.asarray(prev_timesteps)

  def body(i, x_t):
    t = timesteps[i]
    model_output = model_fn(x_t, jnp.full((shape[0],), t, jnp.int32))
    noise = jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float32)
    x_prev, _ = ddpm_step(schedule, model_output, t, prev_timesteps[i], x_t, noise,
                          prediction_type=prediction_type, clip_sample=clip_sample,
                          clip_sample_range=clip_sample_range)
    return x_prev

  return jax.lax.fori_loop(0, timesteps.shape[0], body, jnp.asarray(initial_noise, jnp.float32))
