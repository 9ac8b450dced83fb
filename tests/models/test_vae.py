"""Tests for sd_jax.models.vae (AutoencoderKL, DiagonalGaussian, configs).

Shapes come from `jax.eval_shape` (no compile); params for the runs are filled from NumPy rather than `model.init`
(compiling the PRNG for every param shape costs more than the forward pass on a 2-core CPU).
"""

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sd_jax.models.vae import (
    AutoencoderKL,
    DiagonalGaussian,
    VAEMidBlock,
    create_vae,
    vae_config,
    vae_config_from_diffusers,
)

LOGICAL_AXES = {"conv_h", "conv_w", "conv_in", "conv_out", "embed", "heads", "mlp", "norm"}
# Unoptimised XLA code compiles ~3x faster on CPU; these tests are compile-bound, not run-bound.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# runwayml/stable-diffusion-v1-5 vae/config.json (as written by diffusers 0.6.0: no scaling_factor key).
SD15_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def param_shapes(model, batch_size=1):
  """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the model's params."""
  return jax.eval_shape(functools.partial(model.init, jax.random.key(0)), **model.example_inputs(batch_size))["params"]


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))


def numpy_params(module, *args, seed=0):
  """Random params of `module`'s structure: kernels ~ N(0, 1/fan_in), norms near identity, small biases."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(functools.partial(module.init, jax.random.key(0)), *args)["params"])

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(leaf.shape)
    else:  # kernel
      value = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def images(batch, height, width, channels=3, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, channels)), jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Shapes (eval_shape only)


@pytest.mark.parametrize("name,size,factor", [("tiny", (16, 24), 2), ("f4_small", (32, 32), 4)])
def test_encode_decode_call_shapes(name, size, factor):
  model = create_vae(name)
  assert model.downsample_factor == factor
  variables = {"params": nn.unbox(param_shapes(model))}
  x = images(2, *size)
  latent_shape = (2, size[0] // factor, size[1] // factor, 4)

  posterior = jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, x)
  assert isinstance(posterior, DiagonalGaussian)
  assert posterior.mean.shape == posterior.logvar.shape == latent_shape
  assert posterior.mean.dtype == jnp.float32

  decoded = jax.eval_shape(functools.partial(model.apply, method=model.decode), variables, posterior.mean)
  assert decoded.shape == (2, *size, 3)

  reconstruction, posterior = jax.eval_shape(model.apply, variables, x)
  assert reconstruction.shape == (2, *size, 3) and posterior.mean.shape == latent_shape
  sampled, _ = jax.eval_shape(
      functools.partial(model.apply, sample_posterior=True), variables, x, rng=jax.random.key(0)
  )
  assert sampled.shape == (2, *size, 3)


def test_odd_sizes_follow_the_asymmetric_pad():
  """(right, bottom) zero pad then a 3x3 stride-2 conv without padding: 15 → 7, as diffusers' Downsample2D."""
  model = create_vae("tiny")
  variables = {"params": nn.unbox(param_shapes(model))}
  posterior = jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, images(1, 15, 17))
  assert posterior.mean.shape == (1, 7, 8, 4)


def test_sd_param_count_and_names():
  model = create_vae("sd")
  shapes = param_shapes(model)
  assert count(shapes) == 83_653_863  # diffusers AutoencoderKL (runwayml/stable-diffusion-v1-5 vae)
  flat = flax.traverse_util.flatten_dict(nn.unbox(shapes), sep="/")
  assert len(flat) == 248  # diffusers state_dict entries
  expected = {
      "encoder/conv_in/kernel": (3, 3, 3, 128),
      "encoder/down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 128, 256),
      "encoder/down_blocks_1/downsamplers_0/conv/kernel": (3, 3, 256, 256),
      "encoder/mid_block/attentions_0/group_norm/scale": (512,),
      "encoder/mid_block/attentions_0/to_q/kernel": (512, 512),
      "encoder/mid_block/attentions_0/to_out_0/bias": (512,),
      "encoder/conv_out/kernel": (3, 3, 512, 8),
      "quant_conv/kernel": (1, 1, 8, 8),
      "post_quant_conv/kernel": (1, 1, 4, 4),
      "decoder/conv_in/kernel": (3, 3, 4, 512),
      "decoder/up_blocks_0/resnets_2/conv2/kernel": (3, 3, 512, 512),
      "decoder/up_blocks_2/resnets_0/conv_shortcut/kernel": (1, 1, 512, 256),
      "decoder/up_blocks_2/upsamplers_0/conv/kernel": (3, 3, 256, 256),
      "decoder/conv_out/kernel": (3, 3, 128, 3),
  }
  for key, shape in expected.items():
    assert flat[key].shape == shape, key
  assert "decoder/up_blocks_3/upsamplers_0/conv/kernel" not in flat  # last level: no upsampler
  assert "encoder/down_blocks_3/downsamplers_0/conv/kernel" not in flat
  assert not any("time_emb_proj" in k for k in flat)  # no time embedding in the VAE


def test_without_attention_and_quant_convs():
  shapes = nn.unbox(param_shapes(create_vae("tiny", mid_block_add_attention=False, use_quant_conv=False,
                                            use_post_quant_conv=False)))
  assert "attentions_0" not in shapes["encoder"]["mid_block"]
  assert "quant_conv" not in shapes and "post_quant_conv" not in shapes


def test_every_param_has_logical_axes():
  shapes = param_shapes(create_vae("f4_small"))
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(shapes), sep="/")
  flat_shapes = flax.traverse_util.flatten_dict(nn.unbox(shapes), sep="/")
  assert specs.keys() == flat_shapes.keys()
  for key, spec in specs.items():
    assert isinstance(spec, jax.sharding.PartitionSpec), key
    assert len(spec) == len(flat_shapes[key].shape), key
    assert set(spec) <= LOGICAL_AXES, (key, spec)
  attn = "encoder/mid_block/attentions_0"
  assert specs[f"{attn}/to_q/kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  assert specs[f"{attn}/to_out_0/kernel"] == jax.sharding.PartitionSpec("heads", "embed")
  assert specs["quant_conv/kernel"] == jax.sharding.PartitionSpec("conv_h", "conv_w", "conv_in", "conv_out")


def test_activation_constraints_under_logical_axis_rules():
  """The resnets' `with_logical_constraint` calls resolve under a mesh with trainer-style rules (lowering only)."""
  model = create_vae("tiny")
  params = nn.unbox(param_shapes(model))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rules = [("batch", "data")] + [(name, None) for name in sorted(LOGICAL_AXES) + ["height", "width", "channels"]]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jax.jit(model.apply).lower({"params": params}, images(2, 8, 8))
  assert "sharding_constraint" in lowered.as_text()


# ----------------------------------------------------------------------------------------------------------------
# Posterior


def test_diagonal_gaussian_matches_diffusers_formulas():
  rng = np.random.default_rng(0)
  moments = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
  moments[0, 0, 0, 4] = 40.0  # logvar above the clip
  moments[1, 2, 4, 7] = -50.0  # and below
  other_moments = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
  sample = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
  key = jax.random.key(3)

  @jax.jit  # one compile instead of one per eager op
  def evaluate(moments, other_moments, sample):
    posterior = DiagonalGaussian.from_moments(moments)
    other = DiagonalGaussian.from_moments(other_moments)
    return dict(mean=posterior.mean, logvar=posterior.logvar, std=posterior.std, var=posterior.var,
                mode=posterior.mode(), sample=posterior.sample(key), sample_4=posterior.sample(jax.random.key(4)),
                kl=posterior.kl(), kl_other=posterior.kl(other), kl_self=other.kl(other), nll=other.nll(sample))

  got = jax.tree_util.tree_map(np.asarray, evaluate(moments, other_moments, sample))
  mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30.0, 20.0)
  np.testing.assert_array_equal(got["mean"], mean)
  np.testing.assert_array_equal(got["logvar"], logvar)
  np.testing.assert_allclose(got["std"], np.exp(0.5 * logvar), rtol=1e-6)
  np.testing.assert_allclose(got["var"], np.exp(logvar), rtol=1e-6)
  np.testing.assert_array_equal(got["mode"], mean)

  noise = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
  np.testing.assert_allclose(got["sample"], mean + np.exp(0.5 * logvar) * noise, rtol=1e-6, atol=1e-6)
  assert not np.allclose(got["sample_4"], got["sample"])

  kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(got["kl"], kl, rtol=1e-5)
  assert got["kl"].shape == (2,)
  o_mean, o_logvar = other_moments[..., :4], other_moments[..., 4:]
  kl_other = 0.5 * np.sum(
      (mean - o_mean) ** 2 / np.exp(o_logvar) + np.exp(logvar) / np.exp(o_logvar) - 1.0 - logvar + o_logvar,
      axis=(1, 2, 3),
  )
  np.testing.assert_allclose(got["kl_other"], kl_other, rtol=1e-5)
  np.testing.assert_allclose(got["kl_self"], 0.0, atol=1e-5)
  nll = 0.5 * np.sum(np.log(2 * np.pi) + o_logvar + (sample - o_mean) ** 2 / np.exp(o_logvar), axis=(1, 2, 3))
  np.testing.assert_allclose(got["nll"], nll, rtol=1e-5)


def test_posterior_is_a_pytree_through_jit():
  fn = jax.jit(lambda m: DiagonalGaussian.from_moments(m))
  posterior = fn(jnp.ones((1, 2, 2, 8)))
  assert isinstance(posterior, DiagonalGaussian) and posterior.mean.shape == (1, 2, 2, 4)


def test_latent_scaling_round_trip():
  z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 4)), jnp.float32)
  sd = create_vae("sd")
  np.testing.assert_allclose(sd.scale_latents(z), z * 0.18215, rtol=1e-6)
  shifted = create_vae("sd", scaling_factor=1.5305, shift_factor=0.0609)
  np.testing.assert_allclose(shifted.scale_latents(z), (z - 0.0609) * 1.5305, rtol=1e-6)
  np.testing.assert_allclose(shifted.unscale_latents(shifted.scale_latents(z)), z, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Runs (one tiny compile per dtype)


@functools.cache
def jitted_autoencode(model):
  """(reconstruction from a posterior sample, posterior, decode(posterior.sample(rng))) in one compile."""

  def autoencode(params, x, rng):
    reconstruction, posterior = model.apply({"params": params}, x, sample_posterior=True, rng=rng)
    decoded = model.apply({"params": params}, posterior.sample(rng), method=model.decode)
    return reconstruction, posterior, decoded

  return jax.jit(autoencode, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def tiny_run():
  model = create_vae("tiny")
  x = images(2, 16, 16)
  params = numpy_params(model, x)
  reconstruction, posterior, decoded = jitted_autoencode(model)(params, x, jax.random.key(0))
  return model, x, params, np.asarray(reconstruction), posterior, np.asarray(decoded)


def test_sampled_reconstruction_uses_the_posterior(tiny_run):
  model, x, params, reconstruction, posterior, decoded = tiny_run
  assert reconstruction.shape == x.shape and np.isfinite(reconstruction).all()
  assert np.isfinite(np.asarray(posterior.kl())).all()
  # __call__ with a sample equals decode(posterior.sample(rng)) with the same rng.
  np.testing.assert_allclose(decoded, reconstruction, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="rng"):
    model.apply({"params": params}, x, sample_posterior=True)


def test_bf16_compute_with_fp32_params(tiny_run):
  _, x, params, reference, _, _ = tiny_run
  model = create_vae("tiny", dtype="bfloat16")
  param_dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(nn.unbox(param_shapes(model)))}
  assert param_dtypes == {jnp.dtype(jnp.float32)}  # param_dtype stays float32
  reconstruction, posterior_bf16, _ = jitted_autoencode(model)(params, x, jax.random.key(0))
  assert reconstruction.dtype == jnp.bfloat16
  assert posterior_bf16.mean.dtype == posterior_bf16.logvar.dtype == jnp.float32  # posterior math in float32
  err = np.abs(np.asarray(reconstruction, np.float32) - reference).max() / np.abs(reference).max()
  assert err < 0.1, err


def test_remat_gradients_match_plain(policy="dots_saveable"):
  """Remat changes only the backward pass: gradients of a mid block (resnets + attention) are unchanged."""
  h = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 16)), jnp.float32)
  plain = VAEMidBlock(out_channels=16, norm_num_groups=4)
  params = numpy_params(plain, h)
  assert jax.tree_util.tree_structure(numpy_params(plain.clone(remat_policy=policy), h)) == (
      jax.tree_util.tree_structure(params)
  )

  def loss(block, p):
    return jnp.mean(block.apply({"params": p}, h) ** 2)

  grads = jax.jit(jax.grad(functools.partial(loss, plain)), compiler_options=FAST_COMPILE)(params)
  grads_remat = jax.jit(
      jax.grad(functools.partial(loss, plain.clone(remat_policy=policy))), compiler_options=FAST_COMPILE
  )(params)
  for g, g_r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat)):
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Configs


def test_config_overrides_and_validation():
  cfg = ml_collections.ConfigDict(vae_config("tiny"))
  cfg.block_out_channels = [32, 64]  # lists, as from a command line / JSON
  model = create_vae(cfg, dtype="bfloat16", remat_policy="full")
  assert model.block_out_channels == (32, 64)
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
  assert AutoencoderKL(**vae_config("sd")) == create_vae("sd") == AutoencoderKL()
  with pytest.raises(ValueError, match="unknown VAE config keys"):
    create_vae("tiny", latent_dim=4)
  with pytest.raises(ValueError, match="unknown VAE config"):
    vae_config("kl-f16")
  with pytest.raises(ValueError, match="same length"):
    create_vae("tiny", block_out_channels=(32, 64, 64))
  with pytest.raises(ValueError, match="norm_num_groups"):
    create_vae("tiny", norm_num_groups=12)
  with pytest.raises(ValueError, match="unsupported VAE block types"):
    create_vae("tiny", down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"))
  with pytest.raises(ValueError, match="activation"):
    create_vae("tiny", act_fn="swiglu")


def test_from_diffusers_config():
  cfg = vae_config_from_diffusers(SD15_VAE_CONFIG_JSON)
  assert create_vae(cfg) == create_vae("sd")
  # Keys a newer diffusers writes; force_upcast is a pipeline hint and is dropped.
  newer = dict(SD15_VAE_CONFIG_JSON, force_upcast=True, scaling_factor=0.13025, shift_factor=None,
               latents_mean=None, latents_std=None, use_quant_conv=True, use_post_quant_conv=True,
               mid_block_add_attention=True)
  assert create_vae(vae_config_from_diffusers(newer)) == create_vae("sd", scaling_factor=0.13025)
  # A missing key takes diffusers' default, not sd_jax's.
  sparse = {k: v for k, v in SD15_VAE_CONFIG_JSON.items() if k != "layers_per_block"}
  assert vae_config_from_diffusers(sparse)["layers_per_block"] == 1
  with pytest.raises(NotImplementedError, match="AutoencoderTiny"):
    vae_config_from_diffusers(dict(SD15_VAE_CONFIG_JSON, _class_name="AutoencoderTiny"))
  with pytest.raises(NotImplementedError, match="norm_type"):
    vae_config_from_diffusers(dict(SD15_VAE_CONFIG_JSON, norm_type="spatial"))
