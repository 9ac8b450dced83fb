"""Diffusion loss, min-SNR-γ weights, offset noise and timestep draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.diffusion import losses
from sd_jax.diffusion import schedules


def _toy_schedule():
  """Three steps with ᾱ = 0.9, 0.5, 0.2, i.e. SNR = 9, 1, 0.25."""
  alphas_cumprod = np.array([0.9, 0.5, 0.2])
  alphas = alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
  return schedules.schedule_from_betas(1 - alphas)


T3 = jnp.array([0, 1, 2], jnp.int32)


def test_toy_schedule_snr():
  np.testing.assert_allclose(schedules.snr(_toy_schedule(), T3), [9.0, 1.0, 0.25], rtol=1e-5)


@pytest.mark.parametrize("prediction_type,expected", [
    ("epsilon", [5 / 9, 1.0, 1.0]),  # min(SNR, γ) / SNR
    ("v_prediction", [5 / 10, 1 / 2, 0.25 / 1.25]),  # min(SNR, γ) / (SNR + 1)
    ("sample", [5.0, 1.0, 0.25]),  # min(SNR, γ)
])
def test_min_snr_weights_hand_computed(prediction_type, expected):
  weights = losses.min_snr_weights(_toy_schedule(), T3, 5.0, prediction_type)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  # γ = 0 turns weighting off.
  np.testing.assert_array_equal(losses.min_snr_weights(_toy_schedule(), T3, 0.0, prediction_type), [1, 1, 1])


def test_min_snr_weights_on_sd_schedule():
  s = schedules.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
  t = jnp.array([0, 100, 400, 999])
  ab = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = ab / (1 - ab)
  np.testing.assert_allclose(losses.min_snr_weights(s, t, 5.0, "epsilon"), np.minimum(snr, 5) / snr, rtol=1e-4)
  np.testing.assert_allclose(losses.min_snr_weights(s, t, 5.0, "v_prediction"), np.minimum(snr, 5) / (snr + 1),
                             rtol=1e-4)


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
  s = schedules.make_schedule("linear", rescale_zero_terminal_snr=True)
  t = jnp.array([0, 999])
  np.testing.assert_allclose(losses.min_snr_weights(s, t, 5.0, "epsilon")[1], 1.0)  # lim SNR→0 of min(SNR,γ)/SNR
  np.testing.assert_allclose(losses.min_snr_weights(s, t, 5.0, "v_prediction")[1], 0.0)


def _batch(shape=(3, 4, 4, 2)):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
  return x0, jax.random.normal(k2, shape), jax.random.normal(k3, shape)


def test_gamma_zero_is_plain_mse():
  s = _toy_schedule()
  x0, noise, model_output = _batch()
  loss = losses.diffusion_loss(model_output, x0, noise, T3, s)
  np.testing.assert_allclose(loss, jnp.mean((model_output - noise)**2), rtol=1e-6)
  per_example = losses.diffusion_loss(model_output, x0, noise, T3, s, reduce=False)
  assert per_example.shape == (3,)
  np.testing.assert_allclose(per_example, jnp.mean((model_output - noise)**2, axis=(1, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_weighted_loss_hand_computed(prediction_type):
  s = _toy_schedule()
  x0, noise, model_output = _batch()
  target = {"epsilon": noise, "v_prediction": schedules.get_velocity(s, x0, noise, T3), "sample": x0}[prediction_type]
  mse = np.mean((np.asarray(model_output, np.float64) - np.asarray(target, np.float64))**2, axis=(1, 2, 3))
  snr = np.array([9.0, 1.0, 0.25])
  weights = {"epsilon": np.minimum(snr, 5) / snr, "v_prediction": np.minimum(snr, 5) / (snr + 1),
             "sample": np.minimum(snr, 5)}[prediction_type]
  per_example = losses.diffusion_loss(model_output, x0, noise, T3, s, prediction_type=prediction_type,
                                      min_snr_gamma=5.0, reduce=False)
  np.testing.assert_allclose(per_example, weights * mse, rtol=1e-5)
  loss = losses.diffusion_loss(model_output, x0, noise, T3, s, prediction_type=prediction_type, min_snr_gamma=5.0)
  np.testing.assert_allclose(loss, np.mean(weights * mse), rtol=1e-5)  # a plain mean of the weighted terms


def test_v_target_and_perfect_prediction():
  s = schedules.make_schedule("linear")
  x0, noise, _ = _batch()
  t = jnp.array([10, 500, 990])
  v = schedules.get_velocity(s, x0, noise, t)
  np.testing.assert_array_equal(losses.prediction_target(s, x0, noise, t, "v_prediction"), v)
  assert float(losses.diffusion_loss(v, x0, noise, t, s, prediction_type="v_prediction", min_snr_gamma=5.0)) == 0.0
  with pytest.raises(ValueError):
    losses.diffusion_loss(v, x0, noise, t, s, prediction_type="x0")


def test_loss_under_jit_with_traced_gamma_and_bf16():
  s = _toy_schedule()
  x0, noise, model_output = _batch()
  concrete = losses.diffusion_loss(model_output, x0, noise, T3, s, min_snr_gamma=5.0)
  traced = jax.jit(lambda g: losses.diffusion_loss(model_output, x0, noise, T3, s, min_snr_gamma=g))
  np.testing.assert_allclose(traced(5.0), concrete, rtol=1e-6)
  np.testing.assert_allclose(traced(0.0), losses.diffusion_loss(model_output, x0, noise, T3, s), rtol=1e-6)
  loss_bf16 = losses.diffusion_loss(model_output.astype(jnp.bfloat16), x0, noise, T3, s)
  assert loss_bf16.dtype == jnp.float32
  np.testing.assert_allclose(loss_bf16, losses.diffusion_loss(model_output, x0, noise, T3, s), rtol=1e-2)


def test_offset_noise():
  rng = jax.random.PRNGKey(3)
  shape = (64, 8, 8, 4)
  plain = losses.offset_noise(rng, shape, 0.0)
  assert plain.shape == shape and plain.dtype == jnp.float32
  np.testing.assert_array_equal(plain, losses.offset_noise(rng, shape))
  offset = np.asarray(losses.offset_noise(rng, shape, 0.1) - plain) / 0.1
  # The offset is one N(0,1) draw per example and channel, constant over H and W.
  np.testing.assert_allclose(offset, np.broadcast_to(offset[:, :1, :1, :], shape), atol=1e-5)
  per_channel = offset[:, 0, 0, :]
  assert abs(per_channel.std() - 1.0) < 0.15 and np.unique(per_channel.round(5)).size == per_channel.size
  # Marginal variance 1 + strength².
  strong = losses.offset_noise(jax.random.PRNGKey(4), shape, 1.0)
  assert abs(float(jnp.var(strong)) - 2.0) < 0.3  # 256 offsets: standard error 0.09
  assert abs(float(jnp.var(plain)) - 1.0) < 0.05


def test_sample_timesteps():
  t = losses.sample_timesteps(jax.random.PRNGKey(0), 20_000, 1000)
  assert t.shape == (20_000,) and t.dtype == jnp.int32
  assert int(t.min()) == 0 and int(t.max()) == 999
  assert abs(float(t.mean()) - 499.5) < 10
  np.testing.assert_array_equal(t, losses.sample_timesteps(jax.random.PRNGKey(0), 20_000, 1000))
