"""CLIP text and image towers in Flax Linen, weight-compatible with transformers' PyTorch CLIP models.

Parameter trees mirror the transformers module trees with `.N` indices written `_N`, so checkpoints map by a
key rename plus a layout transpose (sd_jax/weights/clip.py):

  CLIPTextTransformer           = transformers `CLIPTextModel` (the text tower Stable Diffusion conditions on):
    embeddings/{token_embedding, position_embedding}/embedding,
    encoder/layers_N/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1, fc2}, layer_norm2}, final_layer_norm
  CLIPTextModelWithProjection   = text_model/... + text_projection (no bias)
  CLIPVisionTransformer         = transformers `CLIPVisionModel`: embeddings/{patch_embedding (conv, no bias),
                                  class_embedding, position_embedding}, pre_layrnorm, encoder, post_layernorm
  CLIPVisionModelWithProjection = vision_model/... + visual_projection (no bias)
  CLIPModel                     = text_model, vision_model, text_projection, visual_projection, logit_scale
                                  (+ logit_bias for a sigmoid loss)

Images are NHWC. Architecture settings live in small frozen dataclasses whose field names and defaults are
transformers' `CLIPTextConfig` / `CLIPVisionConfig` / `CLIPConfig` (so a config.json that omits defaults reads
the same); compute switches (dtype, param_dtype, attention implementation, remat policy) are module fields.

    text_encoder = create_clip_text_model("openai_vit_l14_text", dtype="bfloat16")
    params = text_encoder.init(rng, **text_encoder.example_inputs())["params"]
    context = text_encoder.apply({"params": params}, tokens).last_hidden_state        # [B, 77, 768]
    context = text_encoder.apply({"params": params}, tokens, clip_skip=1, method="encode")  # diffusers clip_skip
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models import layers
from sd_jax.models.layers import CONV_AXES, TOKEN_AXES, Array, Dtype

# transformers `hidden_act` names -> sd_jax.models.layers.activation names.
_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",  # exact erf GELU, as torch
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}
# transformers' CLIPTextModel pools at argmax(input_ids) when eos_token_id is this legacy value (configs written
# before transformers PR #24773, e.g. Stable Diffusion's text_encoder/config.json), else at the first eos.
LEGACY_EOS_TOKEN_ID = 2


# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text tower settings; names and defaults are transformers' `CLIPTextConfig`."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512  # text_projection width of CLIPTextModelWithProjection (unused by the tower)
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # see _ACTIVATIONS
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0  # only 0 is supported (as in every released CLIP)
  initializer_range: float = 0.02
  initializer_factor: float = 1.0
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407  # pooling position; LEGACY_EOS_TOKEN_ID (2) = argmax of the ids


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Image tower settings; names and defaults are transformers' `CLIPVisionConfig`."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512  # visual_projection width of CLIPVisionModelWithProjection
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers plus the joint-embedding settings (transformers' `CLIPConfig`); a tower may be None."""

  text: CLIPTextConfig | None = None
  vision: CLIPVisionConfig | None = None
  projection_dim: int = 512  # joint embedding width of CLIPModel
  logit_scale_init_value: float = 2.6592  # log(1 / 0.07)
  logit_bias_init_value: float | None = None  # set (e.g. -10.0) to add a learned logit bias for a sigmoid loss


def _check_tower(cfg: CLIPTextConfig | CLIPVisionConfig) -> None:
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                     f"{cfg.num_attention_heads}")
  if cfg.hidden_act not in _ACTIVATIONS:
    raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
  if cfg.attention_dropout:
    raise NotImplementedError(f"attention_dropout={cfg.attention_dropout}: only 0 is supported")
  if isinstance(cfg, CLIPTextConfig) and not isinstance(cfg.eos_token_id, int):
    raise NotImplementedError(f"eos_token_id must be one int, got {cfg.eos_token_id!r}")
  if isinstance(cfg, CLIPVisionConfig) and cfg.image_size % cfg.patch_size:
    raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")


# SD 1.x text tower = OpenAI CLIP ViT-L/14 text encoder (runwayml/stable-diffusion-v1-5 text_encoder/config.json,
# whose eos_token_id is the legacy 2: pooling at argmax of the ids).
_OPENAI_L14_TEXT = CLIPTextConfig(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
    eos_token_id=LEGACY_EOS_TOKEN_ID)
# SD 2.x text tower = OpenCLIP ViT-H/14 text encoder cut to 23 of its 24 blocks: SD 2 conditions on the
# penultimate block followed by ln_final, which is exactly the last_hidden_state of this 23-layer tower
# (stabilityai/stable-diffusion-2-1 text_encoder/config.json). That file says projection_dim 512, which
# CLIPTextModel never uses; 1024 is the real OpenCLIP ViT-H/14 text_projection width.
_OPENCLIP_H14_TEXT = CLIPTextConfig(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=1024, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", bos_token_id=0,
    eos_token_id=LEGACY_EOS_TOKEN_ID)
_OPENAI_L14_VISION = CLIPVisionConfig(
    hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act="quick_gelu")

CLIP_CONFIGS: dict[str, CLIPConfig] = {
    # Stable Diffusion 1.x text encoder: 123,060,480 params.
    "openai_vit_l14_text": CLIPConfig(text=_OPENAI_L14_TEXT, projection_dim=768),
    # Stable Diffusion 2.x text encoder (23 layers, gelu).
    "openclip_vit_h14_text": CLIPConfig(text=_OPENCLIP_H14_TEXT, projection_dim=1024),
    # openai/clip-vit-large-patch14, both towers (for CLIP score, retrieval, contrastive training).
    "openai_vit_l14": CLIPConfig(text=_OPENAI_L14_TEXT, vision=_OPENAI_L14_VISION, projection_dim=768),
    # Test-sized two-tower model: 2 layers, width 32, 16 tokens, 32x32 images in 8x8 patches.
    "tiny": CLIPConfig(
        text=CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, projection_dim=24,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                            bos_token_id=126, eos_token_id=127, pad_token_id=127),
        vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=24),
}


def clip_config(name: str) -> CLIPConfig:
  """A named CLIPConfig (see CLIP_CONFIGS)."""
  if name not in CLIP_CONFIGS:
    raise ValueError(f"unknown CLIP config {name!r}; known: {sorted(CLIP_CONFIGS)}")
  return CLIP_CONFIGS[name]


def _replace(cfg, overrides: Mapping[str, Any], what: str):
  """dataclasses.replace with a readable error for unknown keys; lists become tuples."""
  fields = {f.name for f in dataclasses.fields(cfg)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown {what} config keys {unknown}; valid keys: {sorted(fields)}")
  return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def _as_mapping(value: Any) -> dict[str, Any]:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _is_transformers_json(config: Any) -> bool:
  return isinstance(config, Mapping) and "model_type" in config


def _tower_config(config: Any, kind: str) -> CLIPTextConfig | CLIPVisionConfig:
  """A tower config from a name, a CLIPConfig, a tower config, a transformers config dict (it has a
  `model_type`) or a mapping of tower fields."""
  cls = CLIPTextConfig if kind == "text" else CLIPVisionConfig
  if isinstance(config, str):
    config = clip_config(config)
  elif _is_transformers_json(config):
    config = clip_config_from_transformers(config)
  if isinstance(config, CLIPConfig):
    config = getattr(config, kind)
    if config is None:
      raise ValueError(f"this CLIP config has no {kind} tower")
  if isinstance(config, cls):
    return config
  if isinstance(config, (CLIPTextConfig, CLIPVisionConfig)):
    raise TypeError(f"expected a {cls.__name__}, got a {type(config).__name__}")
  return _replace(cls(), _as_mapping(config), kind)


def _full_config(config: Any) -> CLIPConfig:
  if isinstance(config, str):
    return clip_config(config)
  if isinstance(config, CLIPConfig):
    return config
  if _is_transformers_json(config):
    return clip_config_from_transformers(config)
  d = _as_mapping(config)
  text, vision = d.pop("text", None), d.pop("vision", None)
  return _replace(CLIPConfig(text=_tower_config(text, "text") if text is not None else None,
                             vision=_tower_config(vision, "vision") if vision is not None else None), d, "CLIP")


def _tower_from_transformers(d: Mapping[str, Any], cls):
  names = {f.name for f in dataclasses.fields(cls)}
  values = {k: v for k, v in d.items() if k in names}
  if "image_size" in values and not isinstance(values["image_size"], int):
    size = tuple(values["image_size"])
    if len(set(size)) != 1:
      raise NotImplementedError(f"non-square image_size {size} is not supported")
    values["image_size"] = size[0]
  if "patch_size" in values and not isinstance(values["patch_size"], int):
    values["patch_size"] = tuple(values["patch_size"])[0]
  if isinstance(values.get("eos_token_id"), list) and len(values["eos_token_id"]) == 1:
    values["eos_token_id"] = values["eos_token_id"][0]
  cfg = cls(**values)
  _check_tower(cfg)
  return cfg


def clip_config_from_transformers(config_json: Mapping[str, Any]) -> CLIPConfig:
  """CLIPConfig from a transformers config.json dict: `clip_text_model` (CLIPTextModel[WithProjection]),
  `clip_vision_model` (CLIPVisionModel[WithProjection]) or `clip` (CLIPModel). Keys transformers leaves out
  (defaults) take transformers' defaults; keys without a field here (architectures, dtype, ...) are ignored;
  unsupported values raise."""
  d = dict(config_json)
  model_type = d.get("model_type")
  if model_type is None:  # guess from the keys
    model_type = "clip" if "text_config" in d or "vision_config" in d else (
        "clip_vision_model" if "patch_size" in d else "clip_text_model")
  if model_type == "clip_text_model":
    return CLIPConfig(text=_tower_from_transformers(d, CLIPTextConfig),
                      projection_dim=d.get("projection_dim", CLIPTextConfig.projection_dim))
  if model_type == "clip_vision_model":
    return CLIPConfig(vision=_tower_from_transformers(d, CLIPVisionConfig),
                      projection_dim=d.get("projection_dim", CLIPVisionConfig.projection_dim))
  if model_type == "clip":
    return CLIPConfig(text=_tower_from_transformers(d.get("text_config") or {}, CLIPTextConfig),
                      vision=_tower_from_transformers(d.get("vision_config") or {}, CLIPVisionConfig),
                      projection_dim=d.get("projection_dim", CLIPConfig.projection_dim),
                      logit_scale_init_value=d.get("logit_scale_init_value", CLIPConfig.logit_scale_init_value))
  raise NotImplementedError(f"model_type {model_type!r} is not a CLIP config (clip, clip_text_model, "
                            "clip_vision_model)")


def clip_config_to_transformers(config: CLIPConfig | CLIPTextConfig | CLIPVisionConfig) -> dict[str, Any]:
  """The transformers config dict for `config` (CLIPConfig with both towers -> model_type "clip")."""
  if isinstance(config, CLIPTextConfig):
    return {"model_type": "clip_text_model", **dataclasses.asdict(config)}
  if isinstance(config, CLIPVisionConfig):
    return {"model_type": "clip_vision_model", **dataclasses.asdict(config)}
  if config.text is not None and config.vision is not None:
    if config.logit_bias_init_value is not None:
      raise NotImplementedError("transformers' CLIPModel has no logit_bias")
    return {"model_type": "clip", "text_config": dataclasses.asdict(config.text),
            "vision_config": dataclasses.asdict(config.vision), "projection_dim": config.projection_dim,
            "logit_scale_init_value": config.logit_scale_init_value}
  return clip_config_to_transformers(config.text if config.text is not None else config.vision)


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@flax.struct.dataclass
class CLIPTextOutput:
  """Text tower outputs, as transformers' BaseModelOutputWithPooling / CLIPTextModelOutput."""

  last_hidden_state: Array  # [B, L, D] after final_layer_norm
  pooler_output: Array  # [B, D] last_hidden_state at the eos token
  hidden_states: tuple[Array, ...] | None = None  # embeddings output + each layer's output (layers + 1)
  text_embeds: Array | None = None  # [B, P] text_projection(pooler_output) (with-projection models)


@flax.struct.dataclass
class CLIPVisionOutput:
  """Image tower outputs, as transformers' BaseModelOutputWithPooling / CLIPVisionModelOutput."""

  last_hidden_state: Array  # [B, 1 + patches, D] encoder output (no post_layernorm)
  pooler_output: Array  # [B, D] post_layernorm(class token)
  hidden_states: tuple[Array, ...] | None = None  # pre_layrnorm output + each layer's output
  image_embeds: Array | None = None  # [B, P] visual_projection(pooler_output) (with-projection models)


@flax.struct.dataclass
class CLIPOutput:
  """CLIPModel outputs, as transformers' CLIPOutput (embeddings L2-normalized)."""

  logits_per_image: Array  # [B_image, B_text]
  logits_per_text: Array  # [B_text, B_image]
  text_embeds: Array  # [B_text, P], unit norm
  image_embeds: Array  # [B_image, P], unit norm
  text_model_output: CLIPTextOutput
  vision_model_output: CLIPVisionOutput


# ----------------------------------------------------------------------------------------------------------------
# Shared transformer blocks


def _normal(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with `q_proj`, `k_proj`, `v_proj`, `out_proj` (all with bias)."""

  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = "xla"  # jax.nn.dot_product_attention implementation

  def setup(self):
    cfg = self.config
    width = cfg.hidden_size
    # transformers' CLIP init (scaled by depth for the residual-branch inputs).
    in_std = width**-0.5 * (2 * cfg.num_hidden_layers) ** -0.5 * cfg.initializer_factor
    out_std = width**-0.5 * cfg.initializer_factor
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.q_proj = layers.dense(width, ("embed", "heads"), name="q_proj", kernel_init=nn.initializers.normal(in_std),
                               **kw)
    self.k_proj = layers.dense(width, ("embed", "heads"), name="k_proj", kernel_init=nn.initializers.normal(in_std),
                               **kw)
    self.v_proj = layers.dense(width, ("embed", "heads"), name="v_proj", kernel_init=nn.initializers.normal(in_std),
                               **kw)
    self.out_proj = layers.dense(width, ("heads", "embed"), name="out_proj",
                                 kernel_init=nn.initializers.normal(out_std), **kw)

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """x [B, L, D]; mask boolean, broadcastable to [B, H, L, L], True = attend."""
    batch, length, width = x.shape
    heads = self.config.num_attention_heads
    q, k, v = (p(x).reshape(batch, length, heads, width // heads) for p in (self.q_proj, self.k_proj, self.v_proj))
    out = layers.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    return self.out_proj(out.reshape(batch, length, width))


class CLIPMLP(nn.Module):
  """`fc1` -> activation -> `fc2`."""

  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    fc1_std = (2 * cfg.hidden_size) ** -0.5 * cfg.initializer_factor
    fc2_std = cfg.hidden_size**-0.5 * (2 * cfg.num_hidden_layers) ** -0.5 * cfg.initializer_factor
    x = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", kernel_init=nn.initializers.normal(fc1_std),
                     **kw)(x)
    x = layers.activation(_ACTIVATIONS[cfg.hidden_act])(x)
    return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", kernel_init=nn.initializers.normal(fc2_std),
                        **kw)(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = "xla"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.config.layer_norm_eps
    h = layers.layer_norm(name="layer_norm1", epsilon=eps, **kw)(x)
    x = x + CLIPAttention(self.config, attention_impl=self.attention_impl, name="self_attn", **kw)(h, mask)
    h = layers.layer_norm(name="layer_norm2", epsilon=eps, **kw)(x)
    x = x + CLIPMLP(self.config, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, TOKEN_AXES)


class CLIPEncoder(nn.Module):
  """`layers_0 ... layers_{N-1}`; can stop early (`num_layers`) for clip-skip style conditioning."""

  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = "xla"
  remat_policy: str = "none"  # layers.REMAT_POLICIES key, applied per layer

  def setup(self):
    layer_cls = layers.remat(CLIPEncoderLayer, self.remat_policy)
    self.layers = [layer_cls(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                             attention_impl=self.attention_impl)
                   for _ in range(self.config.num_hidden_layers)]

  def __call__(self, x: Array, mask: Array | None = None,
               num_layers: int | None = None) -> tuple[Array, tuple[Array, ...]]:
    """Runs the first `num_layers` (default all) layers; returns (output, (input, out_1, ..., out_n))."""
    n = self.config.num_hidden_layers if num_layers is None else num_layers
    if not 0 <= n <= self.config.num_hidden_layers:
      raise ValueError(f"num_layers {n} outside [0, {self.config.num_hidden_layers}]")
    states = [x]
    for layer in self.layers[:n]:
      x = layer(x, mask)
      states.append(x)
    return x, tuple(states)


class _ComputeFields(nn.Module):
  """Compute switches shared by the towers (not part of any checkpoint)."""

  dtype: Dtype = jnp.float32  # activations / matmul dtype
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = "xla"  # "xla" | "cudnn" | None (JAX chooses): jax.nn.dot_product_attention
  remat_policy: str = "none"  # "none" | "full" | "dots_saveable" | ... (layers.REMAT_POLICIES)

  def _kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _encoder(self, cfg) -> CLIPEncoder:
    return CLIPEncoder(cfg, attention_impl=self.attention_impl, remat_policy=self.remat_policy, name="encoder",
                       **self._kw())


# ----------------------------------------------------------------------------------------------------------------
# Text tower


class CLIPTextEmbeddings(nn.Module):
  """Token + learned absolute position embeddings."""

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} > max_position_embeddings {cfg.max_position_embeddings}")
    std = 0.02 * cfg.initializer_factor
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_normal(std, ("vocab", "embed")),
                      name="token_embedding", **kw)(input_ids)
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=_normal(std, ("length", "embed")),
                         name="position_embedding", **kw)(jnp.arange(length))
    return tokens + positions[None]


def pool_eos(last_hidden_state: Array, input_ids: Array, eos_token_id: int) -> Array:
  """[B, L, D] -> [B, D] at the eos position, as transformers' CLIPTextModel: argmax of the ids for the legacy
  eos_token_id 2 (the eos id is the largest in CLIP's vocabulary), else the first occurrence of eos_token_id."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    index = jnp.argmax(input_ids, axis=-1)
  else:
    index = jnp.argmax(input_ids == eos_token_id, axis=-1)
  return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


def text_attention_mask(length: int, attention_mask: Array | None = None) -> Array:
  """Causal [1, 1, L, L] boolean mask, combined with an optional [B, L] padding mask (1 = token) on the keys."""
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, None, :]
  return mask


class CLIPTextTransformer(_ComputeFields):
  """transformers `CLIPTextModel`: the text tower that Stable Diffusion conditions on.

  Call: `(input_ids [B, L] int, attention_mask [B, L] | None, output_hidden_states=False) -> CLIPTextOutput`.
  `encode` gives the U-Net context the way diffusers' `encode_prompt` does, including `clip_skip`.
  """

  config: CLIPTextConfig = CLIPTextConfig()

  def setup(self):
    _check_tower(self.config)
    self.embeddings = CLIPTextEmbeddings(self.config, **self._kw())
    self.encoder = self._encoder(self.config)
    self.final_layer_norm = layers.layer_norm(name="final_layer_norm", epsilon=self.config.layer_norm_eps,
                                              **self._kw())

  def _run(self, input_ids: Array, attention_mask: Array | None, num_layers: int | None):
    input_ids = jnp.asarray(input_ids)
    hidden = nn.with_logical_constraint(self.embeddings(input_ids), TOKEN_AXES)
    mask = text_attention_mask(input_ids.shape[-1], attention_mask)
    return self.encoder(hidden, mask, num_layers)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
               output_hidden_states: bool = False) -> CLIPTextOutput:
    hidden, states = self._run(input_ids, attention_mask, None)
    last = self.final_layer_norm(hidden)
    return CLIPTextOutput(
        last_hidden_state=last,
        pooler_output=pool_eos(last, jnp.asarray(input_ids), self.config.eos_token_id),
        hidden_states=states if output_hidden_states else None,
    )

  def encode(self, input_ids: Array, attention_mask: Array | None = None, *, clip_skip: int | None = None) -> Array:
    """[B, L, D] prompt embeddings as diffusers' `encode_prompt`: last_hidden_state, or with `clip_skip` = k
    final_layer_norm(hidden_states[-(k + 1)]), the output of layer N - k put through the final LayerNorm. Only
    the layers needed are run. (SD 2.x needs no clip_skip: its 23-layer tower already ends at OpenCLIP's
    penultimate block.)"""
    skip = clip_skip or 0
    hidden, _ = self._run(input_ids, attention_mask, self.config.num_hidden_layers - skip)
    return self.final_layer_norm(hidden)

  def example_inputs(self, batch_size: int = 1) -> dict[str, Array]:
    """Zero inputs of the configured shapes (for `init` / `jax.eval_shape`)."""
    return {"input_ids": jnp.zeros((batch_size, self.config.max_position_embeddings), jnp.int32)}


class CLIPTextModelWithProjection(_ComputeFields):
  """transformers `CLIPTextModelWithProjection`: `text_model` + `text_projection` -> text_embeds."""

  config: CLIPTextConfig = CLIPTextConfig()

  def setup(self):
    self.text_model = CLIPTextTransformer(config=self.config, attention_impl=self.attention_impl,
                                          remat_policy=self.remat_policy, **self._kw())
    std = self.config.hidden_size**-0.5 * self.config.initializer_factor
    self.text_projection = layers.dense(self.config.projection_dim, ("embed", "mlp"), name="text_projection",
                                        use_bias=False, kernel_init=nn.initializers.normal(std), **self._kw())

  def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
               output_hidden_states: bool = False) -> CLIPTextOutput:
    out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
    return out.replace(text_embeds=self.text_projection(out.pooler_output))

  def encode(self, input_ids: Array, attention_mask: Array | None = None, *, clip_skip: int | None = None) -> Array:
    return self.text_model.encode(input_ids, attention_mask, clip_skip=clip_skip)

  def example_inputs(self, batch_size: int = 1) -> dict[str, Array]:
    return {"input_ids": jnp.zeros((batch_size, self.config.max_position_embeddings), jnp.int32)}


# ----------------------------------------------------------------------------------------------------------------
# Image tower


class CLIPVisionEmbeddings(nn.Module):
  """Patchify (conv, no bias), prepend the class embedding, add learned position embeddings."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    cfg = self.config
    batch, height, width, _ = pixel_values.shape
    if (height, width) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"input image size ({height}*{width}) doesn't match model ({cfg.image_size}*{cfg.image_size})")
    std = cfg.initializer_range * cfg.initializer_factor
    patches = nn.Conv(
        cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
        padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=_normal(std, CONV_AXES), name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    patches = patches.reshape(batch, -1, cfg.hidden_size)  # row-major grid, as torch's flatten(2)
    class_embedding = self.param("class_embedding",
                                 _normal(cfg.hidden_size**-0.5 * cfg.initializer_factor, ("embed",)),
                                 (cfg.hidden_size,), self.param_dtype)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
    num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
    positions = nn.Embed(num_positions, cfg.hidden_size, embedding_init=_normal(std, ("length", "embed")),
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         name="position_embedding")(jnp.arange(num_positions))
    return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(_ComputeFields):
  """transformers `CLIPVisionModel`. Call: `(pixel_values [B, H, W, C], output_hidden_states=False)
  -> CLIPVisionOutput`; pixel values normalized as the CLIP image processor does."""

  config: CLIPVisionConfig = CLIPVisionConfig()

  def setup(self):
    _check_tower(self.config)
    eps = self.config.layer_norm_eps
    self.embeddings = CLIPVisionEmbeddings(self.config, **self._kw())
    self.pre_layrnorm = layers.layer_norm(name="pre_layrnorm", epsilon=eps, **self._kw())  # transformers' spelling
    self.encoder = self._encoder(self.config)
    self.post_layernorm = layers.layer_norm(name="post_layernorm", epsilon=eps, **self._kw())

  def __call__(self, pixel_values: Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
    hidden = self.pre_layrnorm(self.embeddings(jnp.asarray(pixel_values)))
    hidden, states = self.encoder(nn.with_logical_constraint(hidden, TOKEN_AXES))
    return CLIPVisionOutput(
        last_hidden_state=hidden,
        pooler_output=self.post_layernorm(hidden[:, 0]),
        hidden_states=states if output_hidden_states else None,
    )

  def example_inputs(self, batch_size: int = 1) -> dict[str, Array]:
    size, channels = self.config.image_size, self.config.num_channels
    return {"pixel_values": jnp.zeros((batch_size, size, size, channels), jnp.float32)}


class CLIPVisionModelWithProjection(_ComputeFields):
  """transformers `CLIPVisionModelWithProjection`: `vision_model` + `visual_projection` -> image_embeds."""

  config: CLIPVisionConfig = CLIPVisionConfig()

  def setup(self):
    self.vision_model = CLIPVisionTransformer(config=self.config, attention_impl=self.attention_impl,
                                              remat_policy=self.remat_policy, **self._kw())
    std = self.config.hidden_size**-0.5 * self.config.initializer_factor
    self.visual_projection = layers.dense(self.config.projection_dim, ("embed", "mlp"), name="visual_projection",
                                          use_bias=False, kernel_init=nn.initializers.normal(std), **self._kw())

  def __call__(self, pixel_values: Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
    out = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
    return out.replace(image_embeds=self.visual_projection(out.pooler_output))

  def example_inputs(self, batch_size: int = 1) -> dict[str, Array]:
    size, channels = self.config.image_size, self.config.num_channels
    return {"pixel_values": jnp.zeros((batch_size, size, size, channels), jnp.float32)}


# ----------------------------------------------------------------------------------------------------------------
# Two towers


def _l2_normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(_ComputeFields):
  """transformers `CLIPModel` (+ an optional `logit_bias` for a sigmoid loss).

  Call: `(input_ids [B_t, L], pixel_values [B_i, H, W, C], attention_mask=None) -> CLIPOutput` with
  logits = exp(logit_scale) * cos(text, image) (+ logit_bias), in float32. `get_text_features` /
  `get_image_features` give the unnormalized projected embeddings.
  """

  config: CLIPConfig = CLIP_CONFIGS["openai_vit_l14"]

  def setup(self):
    cfg = self.config
    if cfg.text is None or cfg.vision is None:
      raise ValueError("CLIPModel needs both a text and a vision config")
    towers = dict(attention_impl=self.attention_impl, remat_policy=self.remat_policy, **self._kw())
    self.text_model = CLIPTextTransformer(config=cfg.text, **towers)
    self.vision_model = CLIPVisionTransformer(config=cfg.vision, **towers)
    self.text_projection = layers.dense(
        cfg.projection_dim, ("embed", "mlp"), name="text_projection", use_bias=False,
        kernel_init=nn.initializers.normal(cfg.text.hidden_size**-0.5 * cfg.text.initializer_factor), **self._kw())
    self.visual_projection = layers.dense(
        cfg.projection_dim, ("embed", "mlp"), name="visual_projection", use_bias=False,
        kernel_init=nn.initializers.normal(cfg.vision.hidden_size**-0.5 * cfg.vision.initializer_factor),
        **self._kw())
    scalar = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())  # noqa: E731
    self.logit_scale = self.param("logit_scale", scalar(cfg.logit_scale_init_value), (), self.param_dtype)
    if cfg.logit_bias_init_value is not None:
      self.logit_bias = self.param("logit_bias", scalar(cfg.logit_bias_init_value), (), self.param_dtype)

  def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
    """[B, P] text_projection(pooled text), not normalized."""
    return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

  def get_image_features(self, pixel_values: Array) -> Array:
    """[B, P] visual_projection(pooled image), not normalized."""
    return self.visual_projection(self.vision_model(pixel_values).pooler_output)

  def __call__(self, input_ids: Array, pixel_values: Array, attention_mask: Array | None = None, *,
               output_hidden_states: bool = False) -> CLIPOutput:
    text_out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
    vision_out = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
    text_embeds = _l2_normalize(self.text_projection(text_out.pooler_output))
    image_embeds = _l2_normalize(self.visual_projection(vision_out.pooler_output))
    logits_per_text = text_embeds @ image_embeds.T * jnp.exp(self.logit_scale.astype(jnp.float32))
    if self.config.logit_bias_init_value is not None:
      logits_per_text = logits_per_text + self.logit_bias.astype(jnp.float32)
    return CLIPOutput(
        logits_per_image=logits_per_text.T,
        logits_per_text=logits_per_text,
        text_embeds=text_embeds,
        image_embeds=image_embeds,
        text_model_output=text_out,
        vision_model_output=vision_out,
    )

  def example_inputs(self, batch_size: int = 1) -> dict[str, Array]:
    text, vision = self.config.text, self.config.vision
    return {
        "input_ids": jnp.zeros((batch_size, text.max_position_embeddings), jnp.int32),
        "pixel_values": jnp.zeros((batch_size, vision.image_size, vision.image_size, vision.num_channels),
                                  jnp.float32),
    }


# ----------------------------------------------------------------------------------------------------------------
# Construction


_COMPUTE_KEYS = ("dtype", "param_dtype", "attention_impl", "remat_policy")


def _compute_kwargs(dtype, param_dtype, attention_impl, remat_policy) -> dict[str, Any]:
  if remat_policy != "none" and remat_policy not in layers.REMAT_POLICIES:
    raise ValueError(f"remat_policy must be 'none' or one of {sorted(layers.REMAT_POLICIES)}, got {remat_policy!r}")
  if attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {layers.ATTENTION_IMPLEMENTATIONS}, got {attention_impl!r}")
  return dict(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), attention_impl=attention_impl,
              remat_policy=remat_policy)


def create_clip_text_model(config: Any = "openai_vit_l14_text", *, with_projection: bool = False,
                           dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, attention_impl: str | None = "xla",
                           remat_policy: str = "none", **overrides: Any
                           ) -> CLIPTextTransformer | CLIPTextModelWithProjection:
  """The text tower (transformers CLIPTextModel, or CLIPTextModelWithProjection with `with_projection`).

  `config`: a CLIP_CONFIGS name, a CLIPConfig, a CLIPTextConfig, a transformers config.json dict (recognized by
  its `model_type`) or a mapping of CLIPTextConfig fields (dict or ml_collections.ConfigDict); `overrides` are
  CLIPTextConfig fields on top. dtype strings are accepted.
  """
  cfg = _replace(_tower_config(config, "text"), overrides, "CLIP text")
  _check_tower(cfg)
  cls = CLIPTextModelWithProjection if with_projection else CLIPTextTransformer
  return cls(config=cfg, **_compute_kwargs(dtype, param_dtype, attention_impl, remat_policy))


def create_clip_vision_model(config: Any = "openai_vit_l14", *, with_projection: bool = True,
                             dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                             attention_impl: str | None = "xla", remat_policy: str = "none", **overrides: Any
                             ) -> CLIPVisionTransformer | CLIPVisionModelWithProjection:
  """The image tower (transformers CLIPVisionModelWithProjection, or CLIPVisionModel without projection);
  `config` and `overrides` as in create_clip_text_model, with CLIPVisionConfig fields."""
  cfg = _replace(_tower_config(config, "vision"), overrides, "CLIP vision")
  _check_tower(cfg)
  cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionTransformer
  return cls(config=cfg, **_compute_kwargs(dtype, param_dtype, attention_impl, remat_policy))


def create_clip_model(config: Any = "openai_vit_l14", *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                      attention_impl: str | None = "xla", remat_policy: str = "none", **overrides: Any) -> CLIPModel:
  """The two-tower CLIPModel from a name, a CLIPConfig or a mapping {text: {...}, vision: {...}, projection_dim,
  ...}; `overrides` are top-level CLIPConfig fields (`text=`/`vision=` take a tower config or a mapping)."""
  cfg = _full_config(config)
  for kind in ("text", "vision"):
    if kind in overrides and not isinstance(overrides[kind], (CLIPTextConfig, CLIPVisionConfig)):
      overrides[kind] = _replace(getattr(cfg, kind) or (CLIPTextConfig() if kind == "text" else CLIPVisionConfig()),
                                 _as_mapping(overrides[kind]), f"CLIP {kind}")
  cfg = _replace(cfg, overrides, "CLIP")
  if cfg.text is None or cfg.vision is None:
    raise ValueError("create_clip_model needs a config with both towers; use create_clip_text_model / "
                     "create_clip_vision_model for one")
  _check_tower(cfg.text)
  _check_tower(cfg.vision)
  return CLIPModel(config=cfg, **_compute_kwargs(dtype, param_dtype, attention_impl, remat_policy))
