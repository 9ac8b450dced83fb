"""The samplers against diffusers' schedulers (PyTorch, CPU), driven the way diffusers' SD pipelines drive them.

The reference loop is StableDiffusionPipeline's: x_T · init_noise_sigma, [uncond; cond] in one call, scale_model_input,
guidance and `rescale_noise_cfg`, `scheduler.step`; img2img takes `StableDiffusionImg2ImgPipeline.get_timesteps` and
`scheduler.add_noise` from diffusers itself. The model is a fixed random nonlinear function of (x, t, context), written
once for JAX and once for torch, and in a few cases a tiny random `UNet2DConditionModel` imported into our U-Net. The
stochastic samplers get the same per-step noise on both sides: our `step_noise` draws are fed to diffusers through
`variance_noise` (DDIM) or a patched `randn_tensor` (DDPM, Euler-a).
"""

import dataclasses
import json
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from sd_jax.diffusion import samplers  # noqa: E402
from sd_jax.diffusion import schedules  # noqa: E402
from sd_jax.diffusion.samplers import SamplerConfig  # noqa: E402

T = 1000
SHAPE = (2, 4, 4, 3)  # [B, H, W, C]
CONTEXT_SHAPE = (2, 5, 6)  # [B, L, D]
TOL = 1e-4
# Unoptimised XLA compiles these loops several times faster on CPU (threefry in a scan: ~4x); the arithmetic is the
# same, and the tolerance covers any difference in float32 rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SCHEDULER_CLASSES = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
}


# ---------------------------------------------------------------------------------------------------------------
# The reference: diffusers' scheduler loop.


def diffusers_scheduler(config: SamplerConfig):
  """The diffusers scheduler that `config` describes."""
  kwargs = dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                beta_start=config.beta_start, beta_end=config.beta_end, prediction_type=config.prediction_type,
                timestep_spacing=config.timestep_spacing, steps_offset=config.steps_offset,
                rescale_betas_zero_snr=config.rescale_betas_zero_snr,
                trained_betas=None if config.trained_betas is None else list(config.trained_betas))
  name = config.base_sampler
  if name in ("ddpm", "ddim"):
    kwargs.update(clip_sample=config.clip_sample, clip_sample_range=config.clip_sample_range)
  if name == "ddim":
    kwargs.update(set_alpha_to_one=config.set_alpha_to_one)
  if name in ("dpmpp_2m", "euler"):
    kwargs.update(use_karras_sigmas=config.karras)
  if name == "dpmpp_2m":
    kwargs.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
  return SCHEDULER_CLASSES[name](**kwargs)


def reference_sample(config, num_steps, torch_model, noise, *, context, uncond_context=None, guidance_scale=1.0,
                     guidance_rescale=0.0, step_noise=None, init_latents=None, strength=1.0, monkeypatch=None):
  """Final sample of diffusers' pipeline loop (numpy [B, ...]); step_noise [steps, B, ...] for stochastic samplers."""
  scheduler = diffusers_scheduler(config)
  scheduler.set_timesteps(num_steps)
  noise = torch.from_numpy(np.asarray(noise))
  if init_latents is None:
    timesteps = scheduler.timesteps
    x = noise * scheduler.init_noise_sigma
  else:
    pipe = types.SimpleNamespace(scheduler=scheduler)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, num_steps, strength, "cpu")
    x = scheduler.add_noise(torch.from_numpy(np.asarray(init_latents)), noise, timesteps[:1].repeat(noise.shape[0]))

  current = [0]
  if step_noise is not None and monkeypatch is not None:
    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
      z = torch.from_numpy(np.asarray(step_noise[current[0]]))
      assert tuple(shape) == tuple(z.shape)
      return z
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", fake_randn)

  context = torch.from_numpy(np.asarray(context))
  do_guidance = uncond_context is not None and guidance_scale > 1
  if do_guidance:
    uncond = torch.from_numpy(np.broadcast_to(np.asarray(uncond_context), context.shape).copy())
    context = torch.cat([uncond, context])
  for i, t in enumerate(timesteps):
    current[0] = i
    model_input = torch.cat([x] * 2) if do_guidance else x
    model_input = scheduler.scale_model_input(model_input, t)
    with torch.no_grad():
      out = torch_model(model_input, t, context)
    if do_guidance:
      out_uncond, out_cond = out.chunk(2)
      out = out_uncond + guidance_scale * (out_cond - out_uncond)
      if guidance_rescale > 0:
        out = rescale_noise_cfg(out, out_cond, guidance_rescale=guidance_rescale)
    kwargs = {}
    if config.base_sampler == "ddim":
      kwargs["eta"] = config.eta
      if config.eta > 0:
        kwargs["variance_noise"] = torch.from_numpy(np.asarray(step_noise[i]))
    x = scheduler.step(out, t, x, **kwargs).prev_sample
  return x.numpy()


# ---------------------------------------------------------------------------------------------------------------
# The model: a fixed random function of (x, t, context), NHWC on both sides.


@functools.cache
def random_model(seed=0):
  """(jax_fn, torch_fn): x @ W + tanh(x @ Wh + context·Wc + sin(t ω)·Wt), numpy weights shared."""
  rng = np.random.default_rng(seed)
  c, d, f = SHAPE[-1], CONTEXT_SHAPE[-1], 4
  w = (0.5 * np.eye(c) + 0.1 * rng.standard_normal((c, c))).astype(np.float32)
  wh = (0.3 * rng.standard_normal((c, c))).astype(np.float32)
  wc = (0.5 * rng.standard_normal((d, c))).astype(np.float32)
  freqs = (3.0 * rng.standard_normal(f)).astype(np.float32)
  wt = (0.5 * rng.standard_normal((f, c))).astype(np.float32)

  def jax_fn(x, t, context):
    t = jnp.asarray(t, jnp.float32).reshape(-1, 1) / T
    bias = context.mean(axis=1) @ wc + jnp.sin(t * freqs) @ wt  # [B, C]
    return x @ w + jnp.tanh(x @ wh + bias[:, None, None, :])

  tw, twh, twc, tfreqs, twt = map(torch.from_numpy, (w, wh, wc, freqs, wt))

  def torch_fn(x, t, context):
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1) / T
    bias = context.mean(dim=1) @ twc + torch.sin(t * tfreqs) @ twt
    return x @ tw + torch.tanh(x @ twh + bias[:, None, None, :])

  return jax_fn, torch_fn


def inputs(seed=0, shape=SHAPE, context_shape=CONTEXT_SHAPE):
  rng = np.random.default_rng(seed)
  draw = lambda s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  return dict(noise=draw(shape), context=draw(context_shape), uncond_context=draw((1,) + context_shape[1:]),
              init_latents=draw(shape))


def jax_sample(config, num_steps, jax_model, noise, *, context, uncond_context=None, guidance_scale=1.0,
               guidance_rescale=0.0, rng=None, init_latents=None, strength=1.0):
  fn = functools.partial(samplers.sample, jax_model, config=config, num_steps=num_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, strength=strength)
  run = jax.jit(lambda noise, context, uncond, rng, init: fn(noise, context=context, uncond_context=uncond, rng=rng,
                                                             init_latents=init),
                compiler_options=FAST_COMPILE)
  return np.asarray(run(noise, context, uncond_context, rng, init_latents))


def step_noise_for(config, num_steps, key, shape=SHAPE, strength=None):
  """The z of every step run, [steps, B, ...], as `sample` draws them."""
  steps = num_steps if strength is None else num_steps - samplers.img2img_start(num_steps, strength)
  return np.array(_all_step_noise(key, jnp.arange(steps), tuple(shape)))  # writable, for torch.from_numpy


_all_step_noise = jax.jit(jax.vmap(samplers.step_noise, in_axes=(None, 0, None)), static_argnums=2,
                          compiler_options=FAST_COMPILE)


def assert_close(got, want):
  assert np.all(np.isfinite(want)), "the reference diverged; the case is not a useful test"
  diff = np.max(np.abs(got - want))
  assert np.std(want) > 1e-2
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=f"max |diff| = {diff:.2e}")


# ---------------------------------------------------------------------------------------------------------------
# Parity with the random function.

COSINE = dict(beta_schedule="squaredcos_cap_v2")
LINEAR = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
V = dict(prediction_type="v_prediction")
ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                steps_offset=0)
# An SNR-shifted table (configs' diffusion.snr_shift), as the ldm export writes it.
SHIFTED = dict(trained_betas=tuple(float(b) for b in schedules.shifted_betas("scaled_linear", 1000, 0.00085, 0.012,
                                                                            snr_shift=16.0)))
CFG = dict(guidance_scale=5.0)  # with the negative prompt's context
CFG_RESCALE = dict(guidance_scale=7.5, guidance_rescale=0.7)

# (id, SamplerConfig fields, num_steps, guidance kwargs)
CASES = [
    ("ddpm-leading-cfg", dict(sampler="ddpm"), 10, CFG),
    ("ddpm-trailing-v", dict(sampler="ddpm", timestep_spacing="trailing", steps_offset=0, **V), 12, {}),
    ("ddpm-linspace-clip-linear", dict(sampler="ddpm", timestep_spacing="linspace", clip_sample=True, **LINEAR), 8,
     CFG_RESCALE),
    ("ddpm-zero-snr", dict(sampler="ddpm", **ZERO_SNR), 10, CFG),
    ("ddim-leading-cfg-rescale", dict(sampler="ddim"), 15, CFG_RESCALE),
    ("ddim-trailing-v-eta-cosine", dict(sampler="ddim", eta=0.5, timestep_spacing="trailing", steps_offset=0, **V,
                                        **COSINE), 12, CFG),
    ("ddim-shifted-zero-snr", dict(sampler="ddim", set_alpha_to_one=True, **SHIFTED, **ZERO_SNR), 25, CFG),
    ("ddim-linspace-eta1-alpha1", dict(sampler="ddim", eta=1.0, timestep_spacing="linspace", set_alpha_to_one=True),
     10, {}),
    ("dpmpp_2m-leading-cfg", dict(sampler="dpmpp_2m"), 20, CFG),
    ("dpmpp_2m-linspace-v-cosine", dict(sampler="dpmpp_2m", timestep_spacing="linspace", steps_offset=0, **V,
                                        **COSINE), 10, {}),
    ("dpmpp_2m-trailing-karras", dict(sampler="dpmpp_2m", use_karras_sigmas=True, timestep_spacing="trailing",
                                      steps_offset=0), 12, CFG_RESCALE),
    ("dpmpp_2m_karras-v-long", dict(sampler="dpmpp_2m_karras", **V), 25, CFG),
    ("dpmpp_2m-karras-linear", dict(sampler="dpmpp_2m", use_karras_sigmas=True, **LINEAR), 10, {}),
    ("dpmpp_2m-zero-snr", dict(sampler="dpmpp_2m", **ZERO_SNR), 10, CFG),
    ("euler-leading-cfg", dict(sampler="euler"), 15, CFG),
    ("euler-linspace-v", dict(sampler="euler", timestep_spacing="linspace", steps_offset=0, **V), 10, CFG_RESCALE),
    ("euler-trailing-karras", dict(sampler="euler", use_karras_sigmas=True, timestep_spacing="trailing",
                                   steps_offset=0), 12, CFG),
    ("euler_karras-v-linear", dict(sampler="euler_karras", **V, **LINEAR), 10, {}),
    ("euler-zero-snr", dict(sampler="euler", **ZERO_SNR), 10, {}),
    ("euler-shifted", dict(sampler="euler", **SHIFTED, **V), 10, CFG),
    ("euler_a-leading-cfg", dict(sampler="euler_a"), 12, CFG),
    ("euler_a-trailing-v", dict(sampler="euler_a", timestep_spacing="trailing", steps_offset=0, **V), 10,
     CFG_RESCALE),
    ("euler_a-linspace-cosine-v", dict(sampler="euler_a", timestep_spacing="linspace", steps_offset=0, **COSINE, **V),
     10, {}),
    ("euler_a-zero-snr", dict(sampler="euler_a", **ZERO_SNR), 10, CFG),
]


@pytest.mark.parametrize("fields,num_steps,guidance", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_txt2img_matches_diffusers(fields, num_steps, guidance, monkeypatch):
  config = SamplerConfig(**fields)
  jax_model, torch_model = random_model()
  data = inputs(seed=num_steps)
  uncond = data["uncond_context"] if guidance else None
  key = jax.random.PRNGKey(num_steps)
  z = step_noise_for(config, num_steps, key) if config.stochastic else None
  want = reference_sample(config, num_steps, torch_model, data["noise"], context=data["context"],
                          uncond_context=uncond, step_noise=z, monkeypatch=monkeypatch, **guidance)
  got = jax_sample(config, num_steps, jax_model, data["noise"], context=data["context"], uncond_context=uncond,
                   rng=key if config.stochastic else None, **guidance)
  assert_close(got, want)


IMG2IMG_CASES = [
    ("ddpm", dict(sampler="ddpm"), 10, 0.6),
    ("ddim", dict(sampler="ddim"), 20, 0.75),
    ("ddim-eta-full-strength", dict(sampler="ddim", eta=0.3), 10, 1.0),
    ("dpmpp_2m", dict(sampler="dpmpp_2m"), 20, 0.5),
    ("dpmpp_2m_karras-v", dict(sampler="dpmpp_2m_karras", **V), 12, 0.7),
    ("euler", dict(sampler="euler"), 10, 0.35),
    ("euler-karras-full-strength", dict(sampler="euler", use_karras_sigmas=True), 10, 1.0),
    ("euler_a-v", dict(sampler="euler_a", **V), 15, 0.6),
]


@pytest.mark.parametrize("fields,num_steps,strength", [c[1:] for c in IMG2IMG_CASES], ids=[c[0] for c in IMG2IMG_CASES])
def test_img2img_matches_diffusers(fields, num_steps, strength, monkeypatch):
  config = SamplerConfig(**fields)
  jax_model, torch_model = random_model(seed=1)
  data = inputs(seed=100 + num_steps)
  key = jax.random.PRNGKey(7)
  z = step_noise_for(config, num_steps, key, strength=strength) if config.stochastic else None
  want = reference_sample(config, num_steps, torch_model, data["noise"], context=data["context"],
                          uncond_context=data["uncond_context"], guidance_scale=4.0, step_noise=z,
                          init_latents=data["init_latents"], strength=strength, monkeypatch=monkeypatch)
  got = jax_sample(config, num_steps, jax_model, data["noise"], context=data["context"],
                   uncond_context=data["uncond_context"], guidance_scale=4.0, rng=key,
                   init_latents=data["init_latents"], strength=strength)
  assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Parity with a tiny random diffusers U-Net imported into ours.

# One level (the compile time of the U-Net inside the loop dominates this file), cross-attention included.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,),
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 layers_per_block=1, attention_head_dim=2, cross_attention_dim=12, norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny_unet():
  """(jax_fn, torch_fn) of one random UNet2DConditionModel: NHWC in JAX, NCHW inside torch_fn (NHWC at its edges)."""
  from sd_jax.models.unet import create_unet, unet_config_from_diffusers
  from sd_jax.weights import unet as unet_weights

  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**TINY_UNET)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
  model.eval()
  module = create_unet(unet_config_from_diffusers(dict(model.config)))
  params = unet_weights.unet_from_diffusers_state_dict(
      {k: v.detach().numpy() for k, v in model.state_dict().items()}, module)
  params = jax.tree.map(jnp.asarray, params)

  def jax_fn(x, t, context):
    return module.apply({"params": params}, x, t, context)

  def torch_fn(x, t, context):
    out = model(x.permute(0, 3, 1, 2), t, encoder_hidden_states=context).sample
    return out.permute(0, 2, 3, 1)

  return jax_fn, torch_fn


UNET_CASES = [
    ("dpmpp_2m_karras-cfg-rescale", dict(sampler="dpmpp_2m_karras"), 8, None),
    ("euler_a-v-img2img", dict(sampler="euler_a", **V), 8, 0.75),
]


@pytest.mark.parametrize("fields,num_steps,strength", [c[1:] for c in UNET_CASES], ids=[c[0] for c in UNET_CASES])
def test_tiny_unet_matches_diffusers(tiny_unet, fields, num_steps, strength, monkeypatch):
  config = SamplerConfig(**fields)
  jax_model, torch_model = tiny_unet
  data = inputs(seed=3, shape=(2, 8, 8, 4), context_shape=(2, 5, TINY_UNET["cross_attention_dim"]))
  init = data["init_latents"] if strength is not None else None
  key = jax.random.PRNGKey(3)
  z = step_noise_for(config, num_steps, key, (2, 8, 8, 4), strength) if config.stochastic else None
  guidance = dict(guidance_scale=3.0, guidance_rescale=0.5)
  want = reference_sample(config, num_steps, torch_model, data["noise"], context=data["context"],
                          uncond_context=data["uncond_context"], step_noise=z, init_latents=init,
                          strength=strength or 1.0, monkeypatch=monkeypatch, **guidance)
  got = jax_sample(config, num_steps, jax_model, data["noise"], context=data["context"],
                   uncond_context=data["uncond_context"], rng=key, init_latents=init, strength=strength or 1.0,
                   **guidance)
  assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Sharding, schedules, guidance, configs, errors.


def test_sharded_over_the_batch_equals_unsharded():
  """Batch sharded over 8 devices (stochastic sampler, guidance): the same numbers as one device."""
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.asarray(devices), ("data",))
  jax_model, _ = random_model()
  shape, context_shape = (8,) + SHAPE[1:], (8,) + CONTEXT_SHAPE[1:]
  data = inputs(seed=5, shape=shape, context_shape=context_shape)
  config = SamplerConfig(sampler="euler_a")
  key = jax.random.PRNGKey(0)
  run = jax.jit(lambda noise, context, uncond, rng: samplers.sample(
      jax_model, noise, config=config, num_steps=6, context=context, uncond_context=uncond, guidance_scale=5.0,
      guidance_rescale=0.5, rng=rng), compiler_options=FAST_COMPILE)
  batch = NamedSharding(mesh, P("data"))
  sharded = run(jax.device_put(data["noise"], batch), jax.device_put(data["context"], batch),
                jax.device_put(data["uncond_context"], NamedSharding(mesh, P())), key)
  unsharded = run(data["noise"], data["context"], data["uncond_context"], key)
  assert len(sharded.sharding.device_set) == 8
  # Differently partitioned programs may fuse differently: float32 rounding, not different noise (that would be O(1)).
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", samplers.SAMPLER_NAMES)
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50])
def test_timesteps_match_diffusers(sampler, spacing, offset, num_steps):
  config = SamplerConfig(sampler=sampler, timestep_spacing=spacing, steps_offset=offset)
  scheduler = diffusers_scheduler(config)
  scheduler.set_timesteps(num_steps)
  want = scheduler.timesteps.numpy().astype(np.float32)
  got = samplers.inference_timesteps(config, num_steps)
  if sampler == "euler_karras":
    # Fractional timesteps interpolated in log σ: torch's float32 sqrt (in σ = sqrt((1-ᾱ)/ᾱ)) is not correctly
    # rounded on every CPU build, which can move them by an ulp.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  else:
    np.testing.assert_array_equal(got, want)


def test_guidance_scale_of_one_is_one_conditional_call_and_rescale_matches_diffusers():
  calls = []

  def model_fn(x, t, context):
    calls.append(x.shape[0])
    return x * context.mean(axis=(1, 2))[:, None, None, None] + t[:, None, None, None] / T

  data = inputs(seed=9)
  x, t = jnp.asarray(data["noise"]), jnp.full((SHAPE[0],), 500.0)
  context, uncond = jnp.asarray(data["context"]), jnp.asarray(data["uncond_context"])
  np.testing.assert_array_equal(samplers.guided_model_fn(model_fn, context, uncond, 1.0)(x, t), model_fn(x, t, context))
  assert calls == [2, 2]
  got = samplers.guided_model_fn(model_fn, context, uncond, 6.0, 0.3)(x, t)
  assert calls[-1] == 4
  cond, unc = model_fn(x, t, context), model_fn(x, t, jnp.broadcast_to(uncond, context.shape))
  guided = unc + 6.0 * (cond - unc)
  want = rescale_noise_cfg(torch.from_numpy(np.array(guided)), torch.from_numpy(np.array(cond)), 0.3)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


def test_compiled_once_for_new_inputs_and_traced_guidance_scale():
  """New noise, prompts, rng and guidance scale reuse the compiled loop; a traced scale equals the static one."""
  traces = []
  jax_model, _ = random_model()

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(noise, context, uncond, scale):
    traces.append(1)
    return samplers.sample(jax_model, noise, config=SamplerConfig(sampler="ddim"), num_steps=4, context=context,
                           uncond_context=uncond, guidance_scale=scale)

  first, second = inputs(seed=1), inputs(seed=2)
  out1 = run(first["noise"], first["context"], first["uncond_context"], 3.0)
  out2 = run(second["noise"], second["context"], second["uncond_context"], 5.0)
  assert len(traces) == 1
  assert not np.allclose(out1, out2)
  static = jax.jit(lambda noise, context, uncond: samplers.sample(
      jax_model, noise, config=SamplerConfig(sampler="ddim"), num_steps=4, context=context, uncond_context=uncond,
      guidance_scale=5.0), compiler_options=FAST_COMPILE)
  np.testing.assert_allclose(out2, static(second["noise"], second["context"], second["uncond_context"]),
                             rtol=1e-6, atol=1e-6)


def test_config_from_diffusers():
  sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None, "clip_sample": False}
  assert samplers.config_from_diffusers(sd15) == SamplerConfig(sampler="dpmpp_2m")
  sd21 = {"_class_name": "DDIMScheduler", **diffusers.DDIMScheduler(
      prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True).config}
  config = samplers.config_from_diffusers(sd21)
  assert (config.sampler, config.prediction_type, config.timestep_spacing, config.rescale_betas_zero_snr,
          config.beta_schedule) == ("ddim", "v_prediction", "trailing", True, "linear")
  euler = samplers.config_from_diffusers({"_class_name": "EulerDiscreteScheduler",
                                          **diffusers.EulerDiscreteScheduler(use_karras_sigmas=True).config})
  assert euler.sampler == "euler" and euler.karras
  assert samplers.config_from_diffusers(dataclasses.asdict(euler), sampler="ddim").karras is False
  diffusion = {"schedule": "cosine", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
               "prediction_type": "v_prediction", "zero_terminal_snr": True, "min_snr_gamma": 5.0}
  trained = samplers.config_from_training(diffusion, sampler="euler_a")
  assert (trained.sampler, trained.beta_schedule, trained.prediction_type, trained.rescale_betas_zero_snr,
          trained.timestep_spacing) == ("euler_a", "cosine", "v_prediction", True, "trailing")
  assert samplers.inference_timesteps(trained, 10)[0] == 999
  # A custom β table (trained_betas; diffusers writes null when unset) is read as a tuple, hashable for jit.
  shifted = samplers.config_from_diffusers({**sd15, "trained_betas": list(SHIFTED["trained_betas"])})
  assert shifted.trained_betas == SHIFTED["trained_betas"]
  assert shifted == samplers.config_from_training({**diffusion, "schedule": "scaled_linear", "beta_start": 0.00085,
                                                   "beta_end": 0.012, "prediction_type": "epsilon",
                                                   "zero_terminal_snr": False, "snr_shift": 16.0}, sampler="dpmpp_2m")
  hash(shifted)
  # A training config's sample block sets the sampler and its settings (over the zero-SNR defaults), and the
  # scheduler_config.json an export writes reads back to the same settings.
  sample = {"sampler": "ddim", "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
            "eta": 0.5, "num_steps": 25, "guidance_scale": 4.0}
  grid = samplers.config_from_training(diffusion, sample)
  assert (grid.sampler, grid.timestep_spacing, grid.steps_offset, grid.set_alpha_to_one, grid.eta) == (
      "ddim", "leading", 1, False, 0.5)
  def canonical(config):  # "cosine" is diffusers' "squaredcos_cap_v2"
    return dataclasses.replace(config, beta_schedule={"cosine": "squaredcos_cap_v2"}.get(config.beta_schedule,
                                                                                          config.beta_schedule))

  for config in (grid, trained, shifted):
    written = json.loads(json.dumps(samplers.to_diffusers_config(config)))
    assert canonical(samplers.config_from_diffusers(written, eta=config.eta)) == canonical(config)
  karras = samplers.config_from_training(diffusion, {**sample, "eta": 0.0}, sampler="dpmpp_2m_karras")
  read = samplers.config_from_diffusers(json.loads(json.dumps(samplers.to_diffusers_config(karras))))
  assert (read.base_sampler, read.karras, read.timestep_spacing) == ("dpmpp_2m", True, "leading")
  with pytest.raises(TypeError, match="sampler="):
    samplers.config_from_training(diffusion, "euler_a")


def test_bad_settings_fail_clearly():
  jax_model, _ = random_model()
  noise = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="sampler='heun'"):
    samplers.sample(jax_model, noise, config=SamplerConfig(sampler="heun"), num_steps=5)
  with pytest.raises(ValueError, match="Karras sigmas exist only for"):
    samplers.inference_timesteps(SamplerConfig(sampler="ddim", use_karras_sigmas=True), 5)
  with pytest.raises(ValueError, match="eta is a DDIM setting"):
    samplers.inference_timesteps(SamplerConfig(sampler="euler", eta=0.5), 5)
  with pytest.raises(ValueError, match="pass rng"):
    samplers.sample(jax_model, noise, config=SamplerConfig(sampler="euler_a"), num_steps=5)
  with pytest.raises(ValueError, match="runs no step"):
    samplers.sample(jax_model, noise, config=SamplerConfig(sampler="euler"), num_steps=5, init_latents=noise,
                    strength=0.1)
  with pytest.raises(ValueError, match="trained_betas has 3 values but num_train_timesteps=1000"):
    samplers.config_from_diffusers({"trained_betas": [0.1, 0.2, 0.3]})
  with pytest.raises(ValueError, match=r"every β must be in \(0, 1\)"):
    samplers.inference_timesteps(SamplerConfig(num_train_timesteps=2, trained_betas=(0.5, 1.0)), 1)
  with pytest.raises(ValueError, match="timestep_spacing='middle'"):
    samplers.inference_timesteps(SamplerConfig(timestep_spacing="middle"), 5)
  with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
    samplers.inference_timesteps(SamplerConfig(sampler="ddim", rescale_betas_zero_snr=True, steps_offset=0,
                                               timestep_spacing="trailing"), 5)


def test_image_noise_is_keyed_per_image():
  """Image i of a seed draws the same initial noise and step noise whichever batch it is drawn in."""
  shape = (2, 2, 3)
  noise, keys = samplers.image_noise(3, jnp.arange(4), shape)
  later, later_keys = samplers.image_noise(jax.random.PRNGKey(3), jnp.arange(2, 6), shape)
  assert noise.shape == (4, *shape) and keys.shape == (4, 2)
  np.testing.assert_array_equal(noise[2:], later[:2])
  np.testing.assert_array_equal(samplers.step_noise(keys, 7, (4, *shape))[2:],
                                samplers.step_noise(later_keys, 7, (4, *shape))[:2])
  assert not np.allclose(noise[0], noise[1])
  assert not np.allclose(noise, samplers.image_noise(4, jnp.arange(4), shape)[0])
  # A stochastic sampler on per-image keys: an image does not depend on the rest of its batch.
  config = SamplerConfig(sampler="euler_a")
  model_fn = lambda x, t, c: 0.1 * x  # noqa: E731
  whole = samplers.sample(model_fn, noise, config=config, num_steps=4, rng=keys)
  part = samplers.sample(model_fn, later[:2], config=config, num_steps=4, rng=later_keys[:2])
  np.testing.assert_allclose(whole[2:], part, rtol=1e-6, atol=1e-6)
  assert not np.allclose(whole[:2], samplers.sample(model_fn, noise[:2], config=config, num_steps=4, rng=keys[2:]))
