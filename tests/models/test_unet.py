"""Tests for sd_jax.models.unet and the shared layers it uses.

Parameters are filled from NumPy instead of `model.init`: compiling JAX's PRNG for a few hundred parameter shapes
takes ~15 s on a 2-core CPU, while the structure (what these tests need) comes from `jax.eval_shape(model.init)`.
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

from sd_jax.models import layers
from sd_jax.models.unet import DownBlock, UNet2DConditionModel, create_unet, unet_config, unet_config_from_diffusers

LOGICAL_AXES = {"conv_h", "conv_w", "conv_in", "conv_out", "embed", "heads", "mlp", "norm", "vocab"}


def param_shapes(model, inputs):
  """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the model's params, without compute."""
  return jax.eval_shape(functools.partial(model.init, jax.random.key(0)), **inputs)["params"]


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))


def numpy_params(model, inputs, seed=0):
  """Random params of the right structure: kernels ~ N(0, 1/fan_in), norms near identity, small biases."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(leaf.shape)
    elif name == "embedding":
      value = rng.standard_normal(leaf.shape)
    else:  # kernel
      value = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(param_shapes(model, inputs)))


def make_inputs(model, batch=2, size=8, context_length=5, seed=1):
  rng = np.random.default_rng(seed)
  inputs = model.example_inputs(batch_size=batch, context_length=context_length)
  inputs["sample"] = jnp.asarray(rng.standard_normal((batch, size, size, model.in_channels)), jnp.float32)
  inputs["timesteps"] = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  if "encoder_hidden_states" in inputs:
    inputs["encoder_hidden_states"] = jnp.asarray(
        rng.standard_normal(inputs["encoder_hidden_states"].shape), jnp.float32
    )
  if "class_labels" in inputs:
    inputs["class_labels"] = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)
  return inputs


# Unoptimised XLA code compiles ~3x faster on CPU; these tests are compile-bound, not run-bound.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_call(fn, *args):
  return jax.jit(fn, compiler_options=FAST_COMPILE)(*args)


@functools.cache
def jitted_apply(model, train=False):
  """One jitted forward per (config, train) so that equal models in different tests share the compile."""

  def apply(variables, inputs, rngs):
    return model.apply(variables, **inputs, train=train, rngs=rngs)

  return jax.jit(apply, compiler_options=FAST_COMPILE)


def run(model, params, inputs, train=False, rngs=None):
  return jitted_apply(model, train)({"params": params}, inputs, rngs)


# ----------------------------------------------------------------------------------------------------------------
# Forward shapes


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tiny", {}),
        ("tiny_uncond", {}),
        ("tiny", {"num_class_embeds": 10}),
        ("tiny_uncond", {"class_embed_type": "timestep"}),
        # SD 2.x style: Dense proj_in/out, per-block head counts, float32 attention.
        ("tiny", {"use_linear_projection": True, "attention_head_dim": (2, 4), "upcast_attention": True}),
        ("tiny", {"transformer_layers_per_block": 2, "only_cross_attention": (True, False)}),
    ],
)
def test_forward_shape(name, overrides):
  model = create_unet(name, **overrides)
  inputs = make_inputs(model)
  params = numpy_params(model, inputs)
  out = run(model, params, inputs)
  assert out.shape == inputs["sample"].shape[:3] + (model.out_channels,)
  assert out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_unconditional_takes_no_context_and_conditional_requires_one():
  model = create_unet("tiny_uncond")
  assert "encoder_hidden_states" not in model.example_inputs()
  cond = create_unet("tiny")
  inputs = make_inputs(cond)
  inputs.pop("encoder_hidden_states")
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    param_shapes(cond, inputs)


def test_size_not_multiple_of_downsampling_factor():
  # 9 -> 5 on the way down; the upsampler then resizes 5 -> 9 to match the skip (diffusers' upsample_size).
  model = create_unet("tiny")
  inputs = make_inputs(model, size=9)
  params = numpy_params(model, inputs)
  assert run(model, params, inputs).shape == (2, 9, 9, 4)


def test_scalar_timestep_broadcasts():
  model = create_unet("tiny_uncond")
  inputs = make_inputs(model)
  params = numpy_params(model, inputs)
  per_example = run(model, params, dict(inputs, timesteps=jnp.full((2,), 7, jnp.int32)))
  scalar = run(model, params, dict(inputs, timesteps=jnp.int32(7)))
  np.testing.assert_allclose(np.asarray(scalar), np.asarray(per_example), rtol=1e-6, atol=1e-6)


def test_class_labels_change_output():
  model = create_unet("tiny_uncond", num_class_embeds=10)
  inputs = make_inputs(model)
  params = numpy_params(model, inputs)
  a = run(model, params, dict(inputs, class_labels=jnp.array([1, 2])))
  b = run(model, params, dict(inputs, class_labels=jnp.array([3, 4])))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_dropout_only_in_training():
  model = create_unet("tiny_uncond", dropout=0.5)
  inputs = make_inputs(model)
  params = numpy_params(model, inputs)
  eval_out = run(model, params, inputs)
  train_out = run(model, params, inputs, train=True, rngs={"dropout": jax.random.key(0)})
  assert np.abs(np.asarray(eval_out) - np.asarray(train_out)).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Precision, remat, jit


@pytest.fixture(scope="module")
def tiny():
  """The tiny conditional model, its inputs, params and fp32 reference output (shared to save compiles)."""
  model = create_unet("tiny")
  inputs = make_inputs(model)
  params = numpy_params(model, inputs)
  return model, inputs, params, np.asarray(run(model, params, inputs))


def test_bf16_compute_with_fp32_params(tiny):
  _, inputs, params, ref = tiny
  model = create_unet("tiny", dtype="bfloat16")
  # Same tree; params stay float32 (param_dtype) while compute runs in bfloat16.
  assert jax.tree_util.tree_structure(numpy_params(model, inputs)) == jax.tree_util.tree_structure(params)
  param_dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(param_shapes(model, inputs)))}
  assert param_dtypes == {jnp.dtype(jnp.float32)}
  out = run(model, params, inputs)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
  assert err < 0.1, err


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_forward_matches_plain(tiny, policy):
  _, inputs, params, ref = tiny
  model = create_unet("tiny", remat_policy=policy)
  assert jax.tree_util.tree_structure(numpy_params(model, inputs)) == jax.tree_util.tree_structure(params)
  np.testing.assert_allclose(np.asarray(run(model, params, inputs)), ref, rtol=1e-5, atol=1e-5)


def down_block_case(attn_kind, batch, size, context_length):
  """A one-layer down block (ResNet + transformer, 2 heads of 8) and random inputs for it: its keyword arguments,
  the hidden states [batch, size, size, 16], the time embedding, and the context (None for self-attention only)."""
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((batch, size, size, 16)), jnp.float32)
  temb = jnp.asarray(rng.standard_normal((batch, 32)), jnp.float32)
  context = (jnp.asarray(rng.standard_normal((batch, context_length, 8)), jnp.float32) if attn_kind == "cross"
             else None)
  block_kw = dict(out_channels=16, num_layers=1, attn_kind=attn_kind, num_attention_heads=2, attention_head_dim=8,
                  cross_attention_dim=8, norm_num_groups=4, add_downsample=False)
  return block_kw, h, temb, context


@pytest.mark.parametrize("attn_kind,policy", [("cross", "dots_saveable"), ("self", "full")])
def test_remat_gradients_match_plain(attn_kind, policy):
  """Remat only changes the backward pass: compare gradients on one down block (resnet + attention remat)."""
  block_kw, h, temb, context = down_block_case(attn_kind, batch=1, size=4, context_length=3)
  plain = DownBlock(**block_kw)
  params = numpy_params_for(plain, h, temb, context)

  def loss(block, p):
    out, _ = block.apply({"params": p}, h, temb, context)
    return jnp.mean(out**2)

  grads = jit_call(jax.grad(functools.partial(loss, plain)), params)
  grads_r = jit_call(jax.grad(functools.partial(loss, DownBlock(**block_kw, remat_policy=policy))), params)
  for g, g_r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)


def test_forward_under_logical_axis_rules(tiny):
  """Activation constraints and param names resolve under a mesh with trainer-style rules."""
  model, inputs, params, ref = tiny
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  unsharded = sorted(LOGICAL_AXES) + ["height", "width", "channels", "length"]
  rules = [("batch", "data")] + [(name, None) for name in unsharded]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jax.jit(model.apply).lower({"params": params}, **inputs)
    assert "sharding_constraint" in lowered.as_text()  # the with_logical_constraint calls took effect
    out = lowered.compile(FAST_COMPILE)({"params": params}, **inputs)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# True SD shapes (eval_shape only)


def test_sd15_param_count_and_names():
  model = create_unet("sd15")
  shapes = param_shapes(model, model.example_inputs())
  assert count(shapes) == 859_520_964  # diffusers `unet.num_parameters()` for SD 1.5
  flat = flax.traverse_util.flatten_dict(nn.unbox(shapes), sep=".")
  assert len(flat) == 686  # diffusers state_dict entries
  expected = {
      "conv_in.kernel": (3, 3, 4, 320),
      "time_embedding.linear_1.kernel": (320, 1280),
      "time_embedding.linear_2.kernel": (1280, 1280),
      "down_blocks_0.resnets_0.norm1.scale": (320,),
      "down_blocks_0.resnets_0.conv1.kernel": (3, 3, 320, 320),
      "down_blocks_0.resnets_0.time_emb_proj.kernel": (1280, 320),
      "down_blocks_0.resnets_0.norm2.bias": (320,),
      "down_blocks_0.resnets_0.conv2.bias": (320,),
      "down_blocks_1.resnets_0.conv_shortcut.kernel": (1, 1, 320, 640),
      "down_blocks_0.attentions_0.norm.scale": (320,),
      "down_blocks_0.attentions_0.proj_in.kernel": (1, 1, 320, 320),
      "down_blocks_0.attentions_0.transformer_blocks_0.norm1.scale": (320,),
      "down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q.kernel": (320, 320),
      "down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_k.kernel": (320, 320),
      "down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_v.kernel": (320, 320),
      "down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_out_0.bias": (320,),
      "down_blocks_0.attentions_0.transformer_blocks_0.norm2.bias": (320,),
      "down_blocks_0.attentions_0.transformer_blocks_0.attn2.to_k.kernel": (768, 320),
      "down_blocks_0.attentions_0.transformer_blocks_0.norm3.scale": (320,),
      "down_blocks_0.attentions_0.transformer_blocks_0.ff.net_0.proj.kernel": (320, 2560),
      "down_blocks_0.attentions_0.transformer_blocks_0.ff.net_2.kernel": (1280, 320),
      "down_blocks_0.attentions_0.proj_out.kernel": (1, 1, 320, 320),
      "down_blocks_0.downsamplers_0.conv.kernel": (3, 3, 320, 320),
      "mid_block.resnets_0.conv1.kernel": (3, 3, 1280, 1280),
      "mid_block.attentions_0.transformer_blocks_0.attn2.to_v.kernel": (768, 1280),
      "mid_block.resnets_1.conv2.kernel": (3, 3, 1280, 1280),
      "up_blocks_0.resnets_2.conv1.kernel": (3, 3, 2560, 1280),
      "up_blocks_0.upsamplers_0.conv.kernel": (3, 3, 1280, 1280),
      "up_blocks_3.resnets_0.conv_shortcut.kernel": (1, 1, 960, 320),
      "up_blocks_3.attentions_2.proj_out.bias": (320,),
      "conv_norm_out.scale": (320,),
      "conv_out.kernel": (3, 3, 320, 4),
  }
  assert {k: flat[k].shape for k in expected if k in flat} == expected
  assert "up_blocks_3.upsamplers_0.conv.kernel" not in flat
  assert "down_blocks_3.downsamplers_0.conv.kernel" not in flat
  assert "down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q.bias" not in flat  # no qkv bias


def test_sd21_param_count():
  model = create_unet("sd21_base")
  shapes = param_shapes(model, model.example_inputs())
  # 865,910,724: SD 2.x U-Net size as pinned by independent diffusers-layout ports (same for 2.1 base and -v).
  assert count(shapes) == 865_910_724
  flat = flax.traverse_util.flatten_dict(nn.unbox(shapes), sep=".")
  assert flat["down_blocks_0.attentions_0.proj_in.kernel"].shape == (320, 320)  # linear projection
  assert flat["down_blocks_0.attentions_0.transformer_blocks_0.attn2.to_k.kernel"].shape == (1024, 320)


def test_ddpm_cifar_is_ho_et_al_size():
  model = create_unet("ddpm_cifar")
  shapes = param_shapes(model, model.example_inputs())
  assert round(count(shapes) / 1e5) == 357  # Ho et al. CIFAR-10 model: 35.7M
  flat = flax.traverse_util.flatten_dict(nn.unbox(shapes), sep=".")
  assert flat["down_blocks_1.attentions_0.group_norm.scale"].shape == (256,)
  assert flat["mid_block.attentions_0.to_q.bias"].shape == (256,)
  assert flat["up_blocks_2.attentions_2.to_out_0.kernel"].shape == (256, 256)


def test_every_param_has_logical_axes():
  model = create_unet("sd15", num_class_embeds=10)
  shapes = param_shapes(model, model.example_inputs())
  specs = nn.get_partition_spec(shapes)
  flat_specs = flax.traverse_util.flatten_dict(specs, sep=".")
  flat_shapes = flax.traverse_util.flatten_dict(nn.unbox(shapes), sep=".")
  assert flat_specs.keys() == flat_shapes.keys()
  for key, spec in flat_specs.items():
    assert isinstance(spec, jax.sharding.PartitionSpec), key
    assert len(spec) == len(flat_shapes[key].shape), key
    assert set(spec) <= LOGICAL_AXES, (key, spec)
  assert flat_specs["class_embedding.embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert flat_specs["conv_in.kernel"] == jax.sharding.PartitionSpec("conv_h", "conv_w", "conv_in", "conv_out")
  attn = "down_blocks_0.attentions_0.transformer_blocks_0.attn1"
  assert flat_specs[f"{attn}.to_q.kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  assert flat_specs[f"{attn}.to_out_0.kernel"] == jax.sharding.PartitionSpec("heads", "embed")
  assert flat_specs[f"{attn}.to_out_0.bias"] == jax.sharding.PartitionSpec("embed")


# ----------------------------------------------------------------------------------------------------------------
# Configs


def test_config_overrides_and_validation():
  cfg = ml_collections.ConfigDict(unet_config("tiny"))
  cfg.block_out_channels = [32, 64]  # lists, as from a command line / JSON
  model = create_unet(cfg, dtype="bfloat16", remat_policy="full")
  assert model.block_out_channels == (32, 64)
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
  assert UNet2DConditionModel(**unet_config("sd15")) == create_unet("sd15")
  with pytest.raises(ValueError, match="unknown U-Net config keys"):
    create_unet("tiny", attention_heads=4)
  with pytest.raises(ValueError, match="unknown U-Net config"):
    unet_config("sd99")
  with pytest.raises(ValueError, match="heads"):
    create_unet("tiny", attention_head_dim=3)  # 32 channels do not split into 3 heads
  with pytest.raises(ValueError, match="cross_attention_dim"):
    create_unet("tiny", cross_attention_dim=None)
  with pytest.raises(ValueError, match="same length"):
    create_unet("tiny", block_out_channels=(32, 64, 64))


def test_from_diffusers_config():
  sd15_json = {  # stable-diffusion-v1-5 unet/config.json
      "_class_name": "UNet2DConditionModel",
      "_diffusers_version": "0.6.0",
      "act_fn": "silu",
      "attention_head_dim": 8,
      "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": False,
      "cross_attention_dim": 768,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1,
      "flip_sin_to_cos": True,
      "freq_shift": 0,
      "in_channels": 4,
      "layers_per_block": 2,
      "mid_block_scale_factor": 1,
      "norm_eps": 1e-05,
      "norm_num_groups": 32,
      "out_channels": 4,
      "sample_size": 64,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  }
  assert create_unet(unet_config_from_diffusers(sd15_json)) == create_unet("sd15")
  with pytest.raises(NotImplementedError, match="addition_embed_type"):
    unet_config_from_diffusers(dict(sd15_json, addition_embed_type="text_time"))
  ddpm_json = {  # google/ddpm-cifar10-32 (UNet2DModel)
      "_class_name": "UNet2DModel",
      "act_fn": "silu",
      "attention_head_dim": None,
      "block_out_channels": [128, 256, 256, 256],
      "center_input_sample": False,
      "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
      "downsample_padding": 0,
      "flip_sin_to_cos": False,
      "freq_shift": 1,
      "in_channels": 3,
      "layers_per_block": 2,
      "mid_block_scale_factor": 1,
      "norm_eps": 1e-06,
      "norm_num_groups": 32,
      "out_channels": 3,
      "sample_size": 32,
      "time_embedding_type": "positional",
      "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
  }
  assert create_unet(unet_config_from_diffusers(ddpm_json)) == create_unet("ddpm_cifar", dropout=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Layer numerics against direct NumPy transcriptions of the diffusers/PyTorch formulas


def diffusers_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, max_period=10000):
  half_dim = dim // 2
  exponent = -math.log(max_period) * np.arange(0, half_dim, dtype=np.float32)
  exponent = exponent / (half_dim - downscale_freq_shift)
  emb = np.exp(exponent)
  emb = timesteps[:, None].astype(np.float32) * emb[None, :]
  emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = np.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
  if dim % 2 == 1:
    emb = np.pad(emb, ((0, 0), (0, 1)))
  return emb


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 320), (False, 1, 128), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
  t = np.array([0, 1, 17, 500, 999], np.int64)
  got = layers.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  np.testing.assert_allclose(np.asarray(got), diffusers_timestep_embedding(t, dim, flip, shift), atol=2e-4)
  assert got.shape == (5, dim)


def reference_attention(q, k, v, mask=None):  # [B, L, H, D]
  logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", weights, v)


def test_dot_product_attention_xla():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, 4, 3, 8)).astype(np.float32) for _ in range(2))
  mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)[:, None, None, :]
  got = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
  half = layers.dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)), upcast=True)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), reference_attention(q, k, v), atol=5e-2)
  with pytest.raises(ValueError, match="implementation"):
    layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation="flash")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_xla_attention_is_jax_nn_s_forward_and_gradients(dtype):
  """sd_jax's "xla" path (heads before sequences, layers._attention_xla) computes what
  jax.nn.dot_product_attention(implementation="xla") does: self-attention, and cross-attention with a padding mask
  (a fully masked query row included), outputs and the gradients of q, k and v."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 9, 3, 8)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), dtype) for _ in range(2))
  mask = jnp.asarray(np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)[:, None, None, :])
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
  for args, m in (((q, q, q), None), ((q, k, v), mask)):
    def ours(q, k, v, m=m):
      return layers.dot_product_attention(q, k, v, mask=m, scale=0.3)

    def jaxs(q, k, v, m=m):
      return jax.nn.dot_product_attention(q, k, v, mask=m, scale=0.3, implementation="xla")
    cotangent = jnp.asarray(rng.standard_normal(q.shape), dtype)
    for fn in (ours, jaxs):
      fn.out, fn.vjp = jax.vjp(fn, *args)
    assert ours.out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(ours.out, np.float32), np.asarray(jaxs.out, np.float32), **tol)
    for name, g, ref in zip("qkv", ours.vjp(cotangent), jaxs.vjp(cotangent)):
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), **tol, err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_query_chunked_xla_attention_is_jax_nn_s_forward_and_gradients(dtype):
  """`query_chunk` rows at a time (layers._attention_query_chunks: the blocks' probabilities rebuilt in the backward
  pass from the saved log-sum-exp) computes what jax.nn.dot_product_attention(implementation="xla") does, for
  self-attention and for T != S, outputs and the gradients of q, k and v; and it is taken only where it applies (no
  mask, the query rows a whole number of blocks)."""
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((2, 32, 3, 8)) * 2, dtype)
  k, v = (jnp.asarray(rng.standard_normal((2, 24, 3, 8)) * 2, dtype) for _ in range(2))
  # of the largest |value|: float32 rounding (the logits reach ±30 here), two bfloat16 steps
  tol = 2e-5 if dtype == "float32" else 1.5e-2

  def close(got, ref, **kwargs):
    ref = np.asarray(ref, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=tol * np.abs(ref).max(), **kwargs)

  def ours(q, k, v):
    return layers._attention_xla(q, k, v, scale=0.3, query_chunk=8)

  def jaxs(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=0.3, implementation="xla")
  for args in ((q, q, q), (q, k, v)):
    cotangent = jnp.asarray(rng.standard_normal(q.shape), dtype)
    for fn in (ours, jaxs):
      fn.out, fn.vjp = jax.vjp(fn, *args)
    assert ours.out.dtype == jnp.dtype(dtype)
    close(ours.out, jaxs.out)
    for name, g, ref in zip("qkv", ours.vjp(cotangent), jaxs.vjp(cotangent)):
      close(g, ref, err_msg=f"d{name}")

  def blocked(fn, *args):
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))
  mask = jnp.ones((2, 1, 1, 24), bool)
  assert blocked(ours, q, k, v)
  assert not blocked(lambda q, k, v: layers._attention_xla(q, k, v, mask=mask, query_chunk=8), q, k, v)
  assert not blocked(lambda q, k, v: layers._attention_xla(q[:, :30], k, v, query_chunk=8), q, k, v)
  assert not blocked(lambda q, k, v: layers._attention_xla(q, k, v, query_chunk=32), q, k, v)


def test_cpu_query_chunk_picks_blocks_within_the_byte_budget():
  mib = 1 << 20
  assert layers.cpu_query_chunk(8, 8, 1024, 1024, 8, 8 * mib) == 32  # 256 KiB of logits per row
  assert layers.cpu_query_chunk(2, 8, 4096, 77, 40, 8 * mib) == 1024  # cross-attention to 77 tokens: 19 MiB whole
  assert layers.cpu_query_chunk(2, 8, 4096, 4096, 40, 8 * mib) == 32
  assert layers.cpu_query_chunk(1, 1, 64, 64, 8, 8 * mib) == 0  # the whole logits fit
  assert layers.cpu_query_chunk(1, 1, 4096, 4096, 512, 8 * mib) == 0  # the VAE's one wide head: whole
  assert layers.cpu_query_chunk(32, 8, 4096, 4096, 40, 8 * mib) == 16  # never fewer than 16 rows
  assert layers.cpu_query_chunk(8, 8, 1000, 1000, 8, 8 * mib) == 125
  assert layers.cpu_query_chunk(8, 8, 1001, 1001, 8) == 0  # rows that do not halve
  assert layers.cpu_query_chunk(8, 8, 1024, 1024, 8) == 32  # the default budget, 8 MiB
  with layers.cpu_attention_block_bytes(0):
    assert layers.cpu_query_chunk(8, 8, 1024, 1024, 8) == 0


@pytest.mark.parametrize("attn_kind", ["self", "cross"])
def test_attention_in_blocks_of_queries_gives_a_block_s_outputs_and_gradients(attn_kind):
  """A down block (ResNet + transformer) with the CPU's attention in blocks of 16 query rows computes what it computes
  with the whole logits: outputs and parameter gradients; the blocked program is the one with the loops."""
  block_kw, h, temb, context = down_block_case(attn_kind, batch=2, size=8, context_length=48)
  block = DownBlock(**block_kw)
  params = numpy_params_for(block, h, temb, context)

  def loss(p):
    out, _ = block.apply({"params": p}, h, temb, context)
    return jnp.mean(out**2), out

  results, programs = [], []
  for max_bytes in (0, 4096):  # 64 queries over 64 (self) or 48 (cross) keys: 16 rows are 16 or 12 KiB
    with layers.cpu_attention_block_bytes(max_bytes):
      assert layers.cpu_query_chunk(2, 2, 64, 64, 8) == (16 if max_bytes else 0)
      fn = jax.jit(jax.grad(loss, has_aux=True), compiler_options=FAST_COMPILE)
      programs.append(fn.lower(params).as_text())
      results.append(fn(params))
  assert "while" not in programs[0] and "while" in programs[1]
  for got, ref in zip(jax.tree_util.tree_leaves(results[1]), jax.tree_util.tree_leaves(results[0])):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_group_norm_matches_torch_formula():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32) * 3 + 1
  module = layers.GroupNorm(num_groups=4, epsilon=1e-6)
  variables = {"params": {"scale": np.linspace(0.5, 1.5, 16, dtype=np.float32), "bias": np.ones(16, np.float32)}}
  got = module.apply(variables, jnp.asarray(x))
  g = x.reshape(2, 5, 3, 4, 4)
  ref = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)
  ref = ref.reshape(x.shape) * variables["params"]["scale"] + 1
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  got_bf16 = layers.GroupNorm(4, 1e-6, dtype=jnp.bfloat16).apply(variables, jnp.asarray(x, jnp.bfloat16))
  assert got_bf16.dtype == jnp.bfloat16


def test_self_attention_block_matches_reference():
  """diffusers Attention with group_norm + residual (the AttnDownBlock2D / UNetMidBlock2D form)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
  module = layers.Attention(heads=2, dim_head=8, bias=True, norm_num_groups=4, eps=1e-6, residual_connection=True)
  params = numpy_params_for(module, jnp.asarray(x))
  got = module.apply({"params": params}, jnp.asarray(x))
  p = jax.tree_util.tree_map(np.asarray, params)
  h = x.reshape(2, 16, 16)
  g = h.reshape(2, 16, 4, 4)
  h = ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)).reshape(2, 16, 16)
  h = h * p["group_norm"]["scale"] + p["group_norm"]["bias"]
  q, k, v = (
      (h @ p[n]["kernel"] + p[n]["bias"]).reshape(2, 16, 2, 8) for n in ("to_q", "to_k", "to_v")
  )
  out = reference_attention(q, k, v).reshape(2, 16, 16) @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
  np.testing.assert_allclose(np.asarray(got), out.reshape(x.shape) + x, rtol=1e-4, atol=1e-4)


def numpy_params_for(module, *args):
  rng = np.random.default_rng(1)
  shapes = nn.unbox(jax.eval_shape(functools.partial(module.init, jax.random.key(0)), *args)["params"])
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, s.dtype), shapes)


def test_geglu_feed_forward_matches_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 8)).astype(np.float32)
  module = layers.FeedForward()
  params = numpy_params_for(module, jnp.asarray(x))
  got = module.apply({"params": params}, jnp.asarray(x))
  p = jax.tree_util.tree_map(np.asarray, params)
  hidden, gate = np.split(x @ p["net_0"]["proj"]["kernel"] + p["net_0"]["proj"]["bias"], 2, axis=-1)
  erf = np.vectorize(math.erf)
  ref = (hidden * 0.5 * gate * (1 + erf(gate / math.sqrt(2)))) @ p["net_2"]["kernel"] + p["net_2"]["bias"]
  assert p["net_0"]["proj"]["kernel"].shape == (8, 64)  # GEGLU: 2 * (4 * dim)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_resample_layers():
  x = jnp.arange(2 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 3, 4)
  up = layers.nearest_resize(x, (6, 6))
  np.testing.assert_array_equal(np.asarray(up[:, ::2, ::2]), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(up[:, 1::2, 1::2]), np.asarray(x))
  # torch F.interpolate(size=5, mode="nearest") from 3 picks rows floor(i * 3 / 5) = 0, 0, 1, 1, 2.
  resized = layers.nearest_resize(x, (5, 5))
  np.testing.assert_array_equal(np.asarray(resized[0, :, 0, 0]), np.asarray(x[0, [0, 0, 1, 1, 2], 0, 0]))
  for padding, size in ((1, 5), (0, 4)):  # (9 + 2 - 3) // 2 + 1 and, padded right/bottom, (9 + 1 - 3) // 2 + 1
    down = layers.Downsample2D(8, padding=padding)
    shapes = jax.eval_shape(functools.partial(down.init, jax.random.key(0)), jnp.zeros((1, 9, 9, 4)))
    assert nn.unbox(shapes["params"]["conv"]["kernel"]).shape == (3, 3, 4, 8)
    assert jax.eval_shape(down.apply, shapes, jnp.zeros((1, 9, 9, 4))).shape == (1, size, size, 8)
