"""The denoising loss, its min-SNR weighting, and the random draws a diffusion training step needs.

Shapes: samples are [B, H, W, C] (channels last), timesteps int32 [B].
"""

import jax
import jax.numpy as jnp

from sd_jax.diffusion import schedules
from sd_jax.diffusion.schedules import NoiseSchedule


def prediction_target(schedule: NoiseSchedule, x0, noise, t, prediction_type: str = "epsilon"):
  """What the network regresses: ε ("epsilon"), v ("v_prediction") or x0 ("sample")."""
  schedules.check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return schedules.get_velocity(schedule, x0, noise, t)
  return x0


def min_snr_weights(schedule: NoiseSchedule, t, gamma, prediction_type: str = "epsilon"):
  """Per-example min-SNR-γ loss weights (Hang et al. 2023), float32 [B].

  As in diffusers' train_text_to_image.py: epsilon → min(SNR, γ) / SNR; v_prediction → min(SNR, γ) / (SNR + 1);
  sample → min(SNR, γ). γ <= 0 turns the weighting off (all ones). Where SNR = 0 (the last step of a
  zero-terminal-SNR schedule) the epsilon weight is its limit, 1, instead of 0/0.
  """
  schedules.check_prediction_type(prediction_type)
  snr = schedules.snr(schedule, t)
  gamma = jnp.asarray(gamma, jnp.float32)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    weights = jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  elif prediction_type == "v_prediction":
    weights = clipped / (snr + 1.0)
  else:
    weights = clipped
  return jnp.where(gamma > 0, weights, jnp.ones_like(weights))


def diffusion_loss(model_output,
                   x0,
                   noise,
                   t,
                   schedule: NoiseSchedule,
                   *,
                   prediction_type: str = "epsilon",
                   min_snr_gamma: float = 0.0,
                   reduce: bool = True):
  """Mean-squared error of the model output against its target, optionally min-SNR-γ weighted.

  Args:
    model_output: the network's prediction at (x_t, t), [B, ...].
    x0: clean samples, [B, ...].
    noise: the ε used to make x_t, [B, ...].
    t: timesteps, int [B].
    schedule: the noise schedule x_t was made with.
    prediction_type: "epsilon", "v_prediction" or "sample".
    min_snr_gamma: γ of min-SNR weighting; 0 turns it off (plain MSE). SD recipes use 5.
    reduce: return the batch mean (a scalar) when True, else the weighted per-example losses [B].

  Returns:
    mean over the batch of weight_b · mean((model_output_b - target_b)²), computed in float32 — the same
    reduction as diffusers' training scripts (a plain mean of the weighted terms, not normalised by the weights).
  """
  target = prediction_target(schedule, x0, noise, t, prediction_type)
  sq_err = jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32))
  per_example = jnp.mean(sq_err, axis=tuple(range(1, sq_err.ndim)))  # [B]
  # A concrete 0 skips the weights entirely, so plain MSE stays bit-exact; a traced γ goes through the weights.
  if not (isinstance(min_snr_gamma, (int, float)) and min_snr_gamma <= 0):
    per_example = per_example * min_snr_weights(schedule, t, min_snr_gamma, prediction_type)
  return jnp.mean(per_example) if reduce else per_example


def offset_noise(rng, shape, strength=0.0, dtype=jnp.float32):
  """Gaussian noise plus a per-example, per-channel constant offset (Guttenberg 2023, "offset noise").

  ε = z + strength · o with z ~ N(0, I) of `shape` [B, H, W, C] and o ~ N(0, I) of shape [B, 1, 1, C]. z is the
  same for every strength given the same rng, so an ablation over strength changes only the offset; strength 0
  returns z.
  """
  noise_rng, offset_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, shape, dtype)
  if isinstance(strength, (int, float)) and strength == 0:
    return noise
  offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
  offset = jax.random.normal(offset_rng, offset_shape, dtype)
  return noise + jnp.asarray(strength, dtype) * offset


def sample_timesteps(rng, batch: int, num_train_timesteps: int):
  """Training timesteps t ~ U{0, ..., T-1}, int32 [batch]."""
  return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
