"""Tests for sd_jax.models.clip: configs and parameter counts, logical axes, precision, remat, sharding.

Numerical parity with transformers' PyTorch CLIP lives in tests/weights/test_clip_weights.py.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sd_jax import config_lib, parallel
from sd_jax.models import clip as clip_lib

# layers.py's vocabulary, plus "length" for the position-embedding tables (a rule maps it: replicated).
LOGICAL_AXES = {"conv_h", "conv_w", "conv_in", "conv_out", "embed", "heads", "mlp", "norm", "vocab", "length"}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def param_shapes(model):
  """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the params, without compute."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs()))["params"]


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))


@functools.cache
def init_params(model):
  return jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), **model.example_inputs(2))["params"]),
                 compiler_options=FAST_COMPILE)()


def tiny_inputs(batch=2):
  text, vision = clip_lib.clip_config("tiny").text, clip_lib.clip_config("tiny").vision
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 120, (batch, text.max_position_embeddings))
  ids[:, 0] = text.bos_token_id
  ids[:, 6:] = text.eos_token_id
  images = rng.standard_normal((batch, vision.image_size, vision.image_size, 3))
  return jnp.asarray(ids, jnp.int32), jnp.asarray(images, jnp.float32)


def apply(model, params, *args, method=None, **kwargs):
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method, **kwargs), compiler_options=FAST_COMPILE)
  return fn(params, *args)


# ----------------------------------------------------------------------------------------------------------------
# Configs and sizes


def test_sd1_text_tower_param_count():
  model = clip_lib.create_clip_text_model("openai_vit_l14_text")
  assert isinstance(model, clip_lib.CLIPTextTransformer)
  assert count(param_shapes(model)) == 123_060_480


def test_other_param_counts():
  # SD 2.x text encoder (23 OpenCLIP ViT-H/14 blocks) and the full openai/clip-vit-large-patch14 CLIPModel.
  assert count(param_shapes(clip_lib.create_clip_text_model("openclip_vit_h14_text"))) == 340_387_840
  assert count(param_shapes(clip_lib.create_clip_model("openai_vit_l14"))) == 427_616_513


@pytest.mark.parametrize("name", sorted(clip_lib.CLIP_CONFIGS))
def test_every_param_has_logical_axes(name):
  config = clip_lib.clip_config(name)
  model = clip_lib.create_clip_model(config) if config.vision else clip_lib.create_clip_text_model(
      config, with_projection=True)
  leaves = jax.tree_util.tree_leaves(param_shapes(model), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= LOGICAL_AXES, leaf


def test_sharding_specs_from_config_rules():
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = parallel.logical_to_sharding(param_shapes(clip_lib.create_clip_model("openai_vit_l14")), mesh,
                                           config_lib.base_config().logical_axis_rules)
  text = shardings["text_model"]
  assert text["embeddings"]["token_embedding"]["embedding"].spec == P("tensor", "fsdp")
  assert text["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert text["encoder"]["layers_0"]["self_attn"]["out_proj"]["kernel"].spec == P("tensor", "fsdp")
  assert shardings["vision_model"]["embeddings"]["position_embedding"]["embedding"].spec == P(None, "fsdp")
  assert shardings["logit_scale"].spec == P()


def test_config_from_transformers_json():
  # runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 text_encoder/config.json (abridged).
  sd15 = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
          "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "vocab_size": 49408,
          "max_position_embeddings": 77, "dropout": 0.0, "torch_dtype": "float32"}
  assert clip_lib.clip_config_from_transformers(sd15).text == clip_lib.clip_config("openai_vit_l14_text").text
  sd21 = dict(sd15, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
              num_hidden_layers=23, projection_dim=512)
  expected = dataclasses.replace(clip_lib.clip_config("openclip_vit_h14_text").text, projection_dim=512)
  assert clip_lib.clip_config_from_transformers(sd21).text == expected
  # A CLIPModel config: omitted keys take transformers' defaults; the round trip is exact.
  full = clip_lib.clip_config("openai_vit_l14")
  as_json = clip_lib.clip_config_to_transformers(full)
  assert as_json["model_type"] == "clip"
  assert clip_lib.clip_config_from_transformers(as_json) == full
  defaults = clip_lib.clip_config_from_transformers({"model_type": "clip", "text_config": {}, "vision_config": {}})
  assert defaults.vision.patch_size == 32 and defaults.text.hidden_size == 512 and defaults.text.projection_dim == 512


def test_bad_configs_fail_early():
  with pytest.raises(ValueError, match="unknown CLIP config"):
    clip_lib.clip_config("vit_z")
  with pytest.raises(ValueError, match="num_layer"):
    clip_lib.create_clip_text_model("tiny", num_layer=3)
  with pytest.raises(ValueError, match="hidden_act"):
    clip_lib.create_clip_text_model("tiny", hidden_act="swiglu")
  with pytest.raises(ValueError, match="remat_policy"):
    clip_lib.create_clip_text_model("tiny", remat_policy="sometimes")
  with pytest.raises(ValueError, match="no vision tower"):
    clip_lib.create_clip_vision_model("openai_vit_l14_text")
  model = clip_lib.create_clip_vision_model("tiny")
  with pytest.raises(ValueError, match="image size"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3))))


# ----------------------------------------------------------------------------------------------------------------
# Behaviour


@pytest.fixture(scope="module")
def tiny():
  """Tiny CLIPModel, its float32 params and outputs (shared to save compiles)."""
  model = clip_lib.create_clip_model("tiny", logit_bias_init_value=-10.0)
  params = init_params(model)
  ids, images = tiny_inputs()
  return model, params, ids, images, apply(model, params, ids, images, output_hidden_states=True)


def test_clip_model_outputs(tiny):
  model, params, ids, images, out = tiny
  assert out.logits_per_image.shape == (2, 2) and out.logits_per_text.shape == (2, 2)
  np.testing.assert_allclose(np.linalg.norm(out.text_embeds, axis=-1), 1.0, rtol=1e-5)
  cos = np.asarray(out.image_embeds) @ np.asarray(out.text_embeds).T
  expected = cos * np.exp(float(params["logit_scale"])) + float(params["logit_bias"])
  np.testing.assert_allclose(out.logits_per_image, expected, rtol=1e-5, atol=1e-5)
  assert len(out.text_model_output.hidden_states) == 3 and len(out.vision_model_output.hidden_states) == 3
  # Pooling at the first eos (the tiny config's eos id is a real id, not the legacy 2).
  np.testing.assert_array_equal(out.text_model_output.pooler_output, out.text_model_output.last_hidden_state[:, 6])
  features = apply(model, params, ids, method="get_text_features")
  np.testing.assert_allclose(features / np.linalg.norm(features, axis=-1, keepdims=True), out.text_embeds,
                             rtol=1e-5, atol=1e-6)


def test_text_tower_params_are_the_clip_model_text_model(tiny):
  """The SD text tower (CLIPTextTransformer) runs on CLIPModel's `text_model` subtree unchanged; `encode`
  without clip_skip is last_hidden_state, and with clip_skip stops early."""
  model, params, ids, _, out = tiny
  tower = clip_lib.create_clip_text_model(model.config)
  np.testing.assert_allclose(apply(tower, params["text_model"], ids, method="encode"),
                             out.text_model_output.last_hidden_state, rtol=1e-6, atol=1e-6)
  skipped = apply(tower, params["text_model"], ids, method="encode", clip_skip=1)
  assert np.abs(np.asarray(skipped) - np.asarray(out.text_model_output.last_hidden_state)).max() > 1e-3


def test_causal_text_and_padding_mask(tiny):
  model, params, ids, _, out = tiny
  tower = clip_lib.create_clip_text_model(model.config)
  changed = ids.at[:, 8].set(3)  # a later token cannot change earlier positions
  hidden = apply(tower, params["text_model"], changed).last_hidden_state
  np.testing.assert_allclose(hidden[:, :8], out.text_model_output.last_hidden_state[:, :8], rtol=1e-6, atol=1e-6)
  mask = jnp.broadcast_to(jnp.arange(ids.shape[1]) < 7, ids.shape).astype(jnp.int32)  # bos + 5 tokens + eos
  masked = apply(tower, params["text_model"], ids, mask).last_hidden_state
  np.testing.assert_allclose(masked[:, :7], out.text_model_output.last_hidden_state[:, :7], rtol=1e-6, atol=1e-6)


def test_bf16_compute_with_fp32_params(tiny):
  _, params, ids, images, ref = tiny
  model = clip_lib.create_clip_model("tiny", logit_bias_init_value=-10.0, dtype="bfloat16")
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(param_shapes(model)))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out = apply(model, params, ids, images)
  assert out.text_model_output.last_hidden_state.dtype == jnp.bfloat16
  assert out.logits_per_image.dtype == jnp.float32  # normalized and scaled in float32
  for got, want in ((out.text_embeds, ref.text_embeds), (out.image_embeds, ref.image_embeds)):
    assert np.abs(np.asarray(got, np.float32) - np.asarray(want)).max() < 0.05
  # bf16 params too (param_dtype), e.g. a frozen text encoder kept in bf16.
  tower = clip_lib.create_clip_text_model("tiny", dtype="bfloat16", param_dtype="bfloat16")
  half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params["text_model"])
  assert np.isfinite(np.asarray(apply(tower, half, ids).last_hidden_state, np.float32)).all()


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_matches_plain(tiny, policy):
  _, params, ids, _, _ = tiny
  plain = clip_lib.create_clip_text_model("tiny")
  remat = clip_lib.create_clip_text_model("tiny", remat_policy=policy)
  assert jax.tree_util.tree_structure(nn.unbox(param_shapes(remat))) == jax.tree_util.tree_structure(
      params["text_model"])

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, ids).pooler_output ** 2)

  grads = [jax.jit(jax.grad(functools.partial(loss, m)), compiler_options=FAST_COMPILE)(params["text_model"])
           for m in (plain, remat)]
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
