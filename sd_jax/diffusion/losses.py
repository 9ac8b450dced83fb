"""The denoising loss, its min-SNR weighting, the random draws a diffusion training step needs, and the latent-
diffusion loss the ldm trainer and the bench share.

Shapes: samples are [B, H, W, C] (channels last), timesteps int32 [B].
"""

from collections.abc import Callable, Sequence

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


# ---------------------------------------------------------------------------------------------------------------
# Latent diffusion: one training example's random draws and loss (the ldm trainer's step and the bench's)

# The per-example random draws of a latent-diffusion step, in the order each example's key is split.
LATENT_DRAWS = ("latent", "caption_drop", "timestep", "noise", "dropout")


def example_draws(keys, names: Sequence[str] = LATENT_DRAWS) -> dict[str, jax.Array]:
  """Each example's key [B, 2] split into one key per named draw: {name: [B, 2]}."""
  split = jax.vmap(lambda k: jax.random.split(k, len(names)))(keys)  # [B, len(names), 2]
  return {name: split[:, i] for i, name in enumerate(names)}


def caption_drop_mask(keys, rate) -> jax.Array:
  """bool [B]: the examples whose caption a step replaces by the empty prompt (probability `rate` each, from each
  example's "caption_drop" draw)."""
  return jax.vmap(lambda k: jax.random.uniform(k) < rate)(example_draws(keys)["caption_drop"])


def latent_diffusion_loss(model_fn: Callable, schedule: NoiseSchedule, posterior, context, empty_context, keys, *,
                          scale_latents: Callable, caption_dropout, prediction_type: str, min_snr_gamma=0.0,
                          offset_noise_strength=0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example losses [B] and batch metrics of latent diffusion (Rombach et al. 2022), each example from its key.

      z ~ posterior (the VAE's q(z | image))            latents = scale_latents(z)
      with probability caption_dropout: context ← the empty prompt's (what classifier-free guidance needs)
      t ~ U{0..T-1}, ε (+ offset noise)                 x_t = sqrt(ᾱ_t) latents + sqrt(1 - ᾱ_t) ε
      loss = (min-SNR-γ weighted) MSE of model_fn(x_t, t, context, dropout_key) against ε, v or x0

  Args:
    model_fn: (x_t [B, h, w, c], t int32 [B], context [B, L, D], dropout_key [2]) -> the U-Net's output.
    schedule: the training noise schedule.
    posterior: a batch of diagonal Gaussians with `.sample(key)` (models.vae.DiagonalGaussian), [B, h, w, c].
    context: the captions' text context [B, L, D]; empty_context the empty prompt's, [1, L, D].
    keys: one PRNG key per example [B, 2] (so the draws do not depend on how the batch is split over devices).
    scale_latents: the VAE's z -> unit-variance latents ((z - shift_factor) · scaling_factor).
    caption_dropout: the probability of the empty prompt (may be traced).
    prediction_type, min_snr_gamma: see `diffusion_loss`; offset_noise_strength: see `offset_noise`.
  """
  draws = example_draws(keys)
  z = jax.vmap(lambda p, k: p.sample(k))(posterior, draws["latent"])  # one posterior sample per example
  latents = scale_latents(z)                                           # [B, h, w, c]
  drop = caption_drop_mask(keys, caption_dropout)
  context = jnp.where(drop[:, None, None], empty_context.astype(context.dtype), context)
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(draws["timestep"])
  noise = jax.vmap(lambda k: offset_noise(k, (1,) + latents.shape[1:], offset_noise_strength)[0])(draws["noise"])
  x_t = schedules.add_noise(schedule, latents, noise, t)
  model_output = model_fn(x_t, t, context, draws["dropout"][0])
  per_example = diffusion_loss(model_output, latents, noise, t, schedule, prediction_type=prediction_type,
                               min_snr_gamma=min_snr_gamma, reduce=False)
  # latents_std ≈ 1 when the VAE's scaling_factor is right (SD measured 0.18215 this way).
  metrics = {"latents_std": jnp.std(latents), "caption_dropout_rate": jnp.mean(drop.astype(jnp.float32))}
  return per_example, metrics
