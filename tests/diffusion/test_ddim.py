"""DDIM (sd_jax/diffusion/samplers.py, sampler="ddim") against diffusers' DDIMScheduler (PyTorch, CPU), and
classifier-free guidance.

The "model" is a fixed random linear function of x and t, so both implementations see exactly the same network and
any difference is the scheduler's arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from sd_jax.diffusion import samplers
from sd_jax.diffusion import schedules

T = 1000
SHAPE = (2, 4, 4, 3)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _linear_model(seed=0):
  """x [B, H, W, C], t [B] -> x @ W + b · t / T: numpy weights for both frameworks."""
  rng = np.random.default_rng(seed)
  w = (0.5 * np.eye(SHAPE[-1]) + 0.1 * rng.standard_normal((SHAPE[-1], SHAPE[-1]))).astype(np.float32)
  b = rng.standard_normal(SHAPE[-1]).astype(np.float32)

  def jax_fn(x, t):
    return x @ w + b * (t.astype(jnp.float32) / T)[:, None, None, None]

  def torch_fn(x, t):
    return x @ torch.from_numpy(w) + torch.from_numpy(b) * (float(t) / T)

  return jax_fn, torch_fn


def _diffusers(num_steps, *, prediction_type, spacing, steps_offset=0, set_alpha_to_one=True, zero_snr=False,
               schedule=SD):
  scheduler = DDIMScheduler(num_train_timesteps=T, clip_sample=False, prediction_type=prediction_type,
                            timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                            rescale_betas_zero_snr=zero_snr, **schedule)
  scheduler.set_timesteps(num_steps)
  return scheduler


def _ddim(model_fn, x_T, num_steps, *, rng=None, **fields):
  """samplers.sample with DDIM on the SD schedule (SamplerConfig `fields` on top), from x_T."""
  config = samplers.SamplerConfig(sampler="ddim", **SD, **fields)
  return samplers.sample(lambda x, t, c: model_fn(x, t), jnp.asarray(x_T), config=config, num_steps=num_steps,
                         rng=rng)


def _schedule(zero_snr=False, schedule=SD):
  return schedules.make_schedule(schedule["beta_schedule"], T, beta_start=schedule.get("beta_start", 1e-4),
                                 beta_end=schedule.get("beta_end", 0.02), rescale_zero_terminal_snr=zero_snr)


@pytest.mark.parametrize("n", [1, 7, 10, 50, 333])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timesteps_match_diffusers(n, spacing, offset):
  scheduler = _diffusers(n, prediction_type="epsilon", spacing=spacing, steps_offset=offset)
  np.testing.assert_array_equal(samplers.ddim_timesteps(T, n, spacing, offset), scheduler.timesteps.numpy())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,offset,alpha_one", [("leading", 0, True), ("leading", 1, False),
                                                      ("trailing", 0, True)])
def test_deterministic_sample_matches_diffusers(prediction_type, spacing, offset, alpha_one):
  num_steps = 20
  jax_model, torch_model = _linear_model()
  x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)

  scheduler = _diffusers(num_steps, prediction_type=prediction_type, spacing=spacing, steps_offset=offset,
                         set_alpha_to_one=alpha_one)
  x = torch.from_numpy(x_T)
  for t in scheduler.timesteps:
    x = scheduler.step(torch_model(x, t), t, x, eta=0.0).prev_sample

  sample = jax.jit(lambda x: _ddim(jax_model, x, num_steps, prediction_type=prediction_type, timestep_spacing=spacing,
                                   steps_offset=offset, set_alpha_to_one=alpha_one))
  got = sample(x_T)
  np.testing.assert_allclose(np.asarray(got), x.numpy(), rtol=1e-4, atol=1e-4)


def test_zero_terminal_snr_v_prediction_trailing_matches_diffusers():
  """The recipe of Lin et al. 2023: ᾱ_{T-1} = 0 at the first trailing step, where only v defines x0."""
  num_steps = 10
  jax_model, torch_model = _linear_model(seed=3)
  x_T = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
  scheduler = _diffusers(num_steps, prediction_type="v_prediction", spacing="trailing", zero_snr=True)
  x = torch.from_numpy(x_T)
  for t in scheduler.timesteps:
    x = scheduler.step(torch_model(x, t), t, x, eta=0.0).prev_sample
  got = _ddim(jax_model, x_T, num_steps, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
              set_alpha_to_one=True, rescale_betas_zero_snr=True)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(np.asarray(got), x.numpy(), rtol=1e-4, atol=1e-4)


def test_stochastic_step_matches_diffusers_with_the_same_noise():
  """η > 0: each step adds σ_t z; with diffusers' variance_noise = z the steps agree."""
  num_steps, eta = 10, 0.7
  jax_model, torch_model = _linear_model(seed=4)
  rng = np.random.default_rng(5)
  schedule = _schedule()
  scheduler = _diffusers(num_steps, prediction_type="epsilon", spacing="leading", steps_offset=1,
                         set_alpha_to_one=False)
  x_ref = rng.standard_normal(SHAPE).astype(np.float32)
  x = jnp.asarray(x_ref)
  x_ref = torch.from_numpy(x_ref)
  for t in scheduler.timesteps:
    z = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = scheduler.step(torch_model(x_ref, t), t, x_ref, eta=eta, variance_noise=torch.from_numpy(z)).prev_sample
    t_jax = jnp.full((SHAPE[0],), int(t), jnp.int32)
    x, _ = samplers.ddim_step(schedule, jax_model(x, t_jax), int(t), int(t) - T // num_steps, x, jnp.asarray(z),
                          eta=eta, final_alpha_cumprod=schedule.alphas_cumprod[0])
  np.testing.assert_allclose(np.asarray(x), x_ref.numpy(), rtol=1e-4, atol=1e-4)


def test_stochastic_sampling_depends_on_the_key_and_eta():
  jax_model, _ = _linear_model()
  def draw(key, eta):
    return _ddim(jax_model, jnp.ones(SHAPE), 5, rng=key, eta=eta)

  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  np.testing.assert_array_equal(draw(k1, 0.0), draw(k2, 0.0))  # η = 0: x_T fixes the result
  assert not np.allclose(draw(k1, 1.0), draw(k2, 1.0))
  np.testing.assert_array_equal(draw(k1, 1.0), draw(k1, 1.0))


def test_classifier_free_guidance_combines_uncond_and_cond():
  calls = []

  def model_fn(x, t, context):
    calls.append(x.shape[0])
    return x * context.mean(axis=(1, 2))[:, None, None, None] + t[:, None, None, None]

  x = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)
  t = jnp.array([10, 10], jnp.int32)
  context = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 8)), jnp.float32)
  uncond = jnp.asarray(np.random.default_rng(2).standard_normal((1, 5, 8)), jnp.float32)
  scale = 4.5
  got = samplers.guided_model_fn(model_fn, context, uncond, scale)(x, t)
  assert calls == [4]  # one network call on [uncond; cond]
  cond = model_fn(x, t, context)
  unc = model_fn(x, t, jnp.broadcast_to(uncond, context.shape))
  np.testing.assert_allclose(got, unc + scale * (cond - unc), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(samplers.guided_model_fn(model_fn, context, uncond, 1.0)(x, t), cond, rtol=1e-6)


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match="timestep spacing 'middle'"):
    samplers.ddim_timesteps(T, 10, "middle")
  with pytest.raises(ValueError, match="num_inference_steps=0"):
    samplers.ddim_timesteps(T, 0)
  with pytest.raises(ValueError, match="past 999"):
    samplers.ddim_timesteps(T, 1, "leading", steps_offset=1000)
