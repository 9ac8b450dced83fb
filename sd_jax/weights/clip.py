"""CLIP weights: transformers state dicts and Stable Diffusion single-file text encoders <-> sd_jax.models.clip.

transformers names map onto the Flax trees by a rename (`encoder.layers.3.mlp.fc1.weight` ->
`encoder/layers_3/mlp/fc1/kernel`) plus the layouts of sd_jax.weights.common; embeddings' `weight` is Flax
`embedding`, `class_embedding` / `logit_scale` / `logit_bias` keep their names. Non-persistent `position_ids`
buffers (present in older files) are ignored.

Which state dict feeds which module:
  CLIPTextModel                   `text_model.*` (hub files, transformers v4) or the same keys without the prefix
                                  (transformers v5 save_pretrained)            -> CLIPTextTransformer
  CLIPTextModelWithProjection     `text_model.*`, `text_projection.weight`      -> CLIPTextModelWithProjection
  CLIPVisionModelWithProjection   `vision_model.*`, `visual_projection.weight`  -> CLIPVisionModelWithProjection
  CLIPModel                       all of these + `logit_scale`                  -> CLIPModel
  SD 1.x single file              `cond_stage_model.transformer.` + CLIPTextModel keys
  SD 2.x single file              `cond_stage_model.model.` + OpenCLIP keys (fused in_proj q/k/v), see
                                  clip_text_from_open_clip

Every importer checks the result against the model's abstract params and raises WeightsMismatchError listing
all missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from sd_jax.models import clip as clip_lib
from sd_jax.weights import common
from sd_jax.weights import store

CLIP_COMPONENT = "clip"  # the two-tower CLIP in an sd_jax model directory (a CLIP run's WORKDIR/export/clip)
_IGNORED_BUFFERS = ("position_ids",)
_RAW_LEAVES = ("class_embedding", "logit_scale", "logit_bias")  # nn.Parameter tensors without a `.weight`
_EMBEDDINGS = ("token_embedding", "position_embedding")


# ---------------------------------------------------------------------------------------------------------------
# Key maps


def torch_key_to_flax(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One transformers CLIP tensor -> (Flax param path, array in Flax layout)."""
  key = re.sub(r"(^|\.)layers\.(\d+)\.", r"\1layers_\2.", key)
  base, _, leaf = key.rpartition(".")
  name = base.rpartition(".")[2]
  if leaf in _RAW_LEAVES:
    return key.replace(".", "/"), value
  if name in _EMBEDDINGS and leaf == "weight":
    return f"{base.replace('.', '/')}/embedding", value
  try:
    return common.torch_param_to_flax(key, value)
  except ValueError:
    return key.replace(".", "/"), value  # no rule: kept by name so that the key check reports it


def flax_path_to_torch(path: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of torch_key_to_flax."""
  key = re.sub(r"(^|/)layers_(\d+)/", r"\1layers.\2/", path)
  base, _, leaf = key.rpartition("/")
  base = base.replace("/", ".")
  if leaf in _RAW_LEAVES:
    return key.replace("/", "."), value
  if leaf == "embedding":
    return f"{base}.weight", value
  if leaf == "kernel":
    return f"{base}.weight", common.conv_to_torch(value) if value.ndim == 4 else common.linear_to_torch(value)
  if leaf == "scale":
    return f"{base}.weight", value
  if leaf == "bias":
    return f"{base}.bias", value
  raise ValueError(f"no PyTorch name for param {path} with shape {np.shape(value)}")


def _to_numpy(tree: Any) -> dict[str, np.ndarray]:
  flat = common.flatten(nn.unbox(tree))
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def _abstract_params(model: nn.Module) -> dict[str, Any]:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs()))
  return nn.unbox(shapes["params"])


def _import(state_dict: Mapping[str, np.ndarray], model: nn.Module, what: str) -> dict[str, Any]:
  state = common.only_keys(state_dict, _IGNORED_BUFFERS)
  flat = dict(torch_key_to_flax(k, np.asarray(v)) for k, v in state.items())
  return common.check_params(_abstract_params(model), flat, what=what)


def _export(params: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for path, value in _to_numpy(params).items():
    key, tensor = flax_path_to_torch(path, value)
    out[prefix + key] = np.array(tensor, order="C")  # (ascontiguousarray would make logit_scale 1-D)
  return out


def _sub_state(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """The keys under `prefix` (stripped) when there are any, else the whole dict (unprefixed layout)."""
  if any(k.startswith(prefix) for k in state_dict):
    return common.strip_prefix(state_dict, prefix)
  return dict(state_dict)


def _model(config: Any, create, **kwargs) -> nn.Module:
  """`config` may already be a module (used as is: its dtype/param_dtype decide the params' dtype)."""
  return config if isinstance(config, nn.Module) else create(config, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# transformers state dicts


def clip_text_from_transformers(state_dict: Mapping[str, np.ndarray], config: Any = "openai_vit_l14_text"
                                ) -> dict[str, Any]:
  """CLIPTextTransformer params from a transformers CLIPTextModel state dict.

  Reads the `text_model.*` keys when there are any (hub files, and CLIPTextModelWithProjection / CLIPModel
  dicts, whose other keys are then left alone), else expects the unprefixed transformers v5 layout.
  `config`: anything create_clip_text_model accepts, or a CLIPTextTransformer module.
  """
  model = _model(config, clip_lib.create_clip_text_model)
  return _import(_sub_state(state_dict, "text_model."), model, what="CLIP text weights")


def clip_text_to_transformers(params: Any, *, prefix: str = "text_model.") -> dict[str, np.ndarray]:
  """transformers CLIPTextModel state dict from CLIPTextTransformer params.

  The default `text_model.` prefix is the layout of hub files (Stable Diffusion's text_encoder/), which
  transformers v4 and v5 `from_pretrained` both read; `prefix=""` gives v5's own `state_dict()` keys.
  """
  return _export(params, prefix)


def clip_text_with_projection_from_transformers(state_dict: Mapping[str, np.ndarray],
                                                config: Any = "openai_vit_l14_text") -> dict[str, Any]:
  """CLIPTextModelWithProjection params from its transformers state dict (`text_model.*`, `text_projection`)."""
  model = _model(config, clip_lib.create_clip_text_model, with_projection=True)
  return _import(state_dict, model, what="CLIP text-with-projection weights")


def clip_text_with_projection_to_transformers(params: Any) -> dict[str, np.ndarray]:
  return _export(params)


def clip_vision_from_transformers(state_dict: Mapping[str, np.ndarray], config: Any = "openai_vit_l14"
                                  ) -> dict[str, Any]:
  """CLIPVisionModelWithProjection params from its transformers state dict (`vision_model.*`,
  `visual_projection.weight`)."""
  model = _model(config, clip_lib.create_clip_vision_model, with_projection=True)
  return _import(state_dict, model, what="CLIP vision weights")


def clip_vision_to_transformers(params: Any) -> dict[str, np.ndarray]:
  return _export(params)


def clip_from_transformers(state_dict: Mapping[str, np.ndarray], config: Any = "openai_vit_l14") -> dict[str, Any]:
  """CLIPModel params from a transformers CLIPModel state dict (both towers, projections, logit_scale)."""
  model = _model(config, clip_lib.create_clip_model)
  return _import(state_dict, model, what="CLIP weights")


def clip_to_transformers(params: Any) -> dict[str, np.ndarray]:
  """transformers CLIPModel state dict (a `logit_bias` param, if any, is written as `logit_bias`, which
  transformers' CLIPModel does not have)."""
  return _export(params)


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion single files


def clip_text_from_ldm(state_dict: Mapping[str, np.ndarray], config: Any = "openai_vit_l14_text", *,
                       prefix: str = "cond_stage_model.transformer.") -> dict[str, Any]:
  """CLIPTextTransformer params from an SD 1.x single-file checkpoint: `prefix` + CLIPTextModel keys (as
  diffusers' convert_ldm_clip_checkpoint; SDXL's first encoder uses `conditioner.embedders.0.transformer.`).
  Keys outside `prefix` (U-Net, VAE) are ignored."""
  sub = common.strip_prefix(state_dict, prefix)
  if not sub:
    raise common.WeightsMismatchError(f"no keys start with {prefix!r}: not an SD 1.x single-file text encoder")
  return clip_text_from_transformers(sub, config)


def _open_clip_key(key: str) -> str | None:
  """OpenCLIP text key (prefix removed) -> transformers CLIPTextModel key (no `text_model.`); None = skip."""
  fixed = {
      "token_embedding.weight": "embeddings.token_embedding.weight",
      "positional_embedding": "embeddings.position_embedding.weight",
      "ln_final.weight": "final_layer_norm.weight",
      "ln_final.bias": "final_layer_norm.bias",
  }
  if key in fixed:
    return fixed[key]
  if not key.startswith("transformer."):
    return None  # text_projection, logit_scale, visual.*: not part of the tower (diffusers drops them too)
  key = key[len("transformer."):]
  for old, new in (("resblocks.", "encoder.layers."), (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."),
                   (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."), (".attn.", ".self_attn.")):
    key = key.replace(old, new)
  return key


def open_clip_to_transformers(state_dict: Mapping[str, np.ndarray], num_hidden_layers: int, *,
                              prefix: str = "cond_stage_model.model.",
                              with_projection: bool = False) -> dict[str, np.ndarray]:
  """OpenCLIP text-tower tensors under `prefix` -> transformers CLIPTextModel keys (no `text_model.` prefix),
  following diffusers' convert_open_clip_checkpoint: the fused `attn.in_proj_{weight,bias}` split in three
  (q, k, v), `text_projection` (used as x @ P) transposed into `text_projection.weight` when `with_projection`
  (else dropped, as for SD 2), `logit_scale` dropped, and the block after the last one used dropped (SD 2 runs
  23 of OpenCLIP ViT-H's 24 blocks; diffusers ignores `resblocks.23`). Any other block past the configured
  depth is kept, so that the key check reports it."""
  out: dict[str, np.ndarray] = {}
  for full_key, value in state_dict.items():
    if not full_key.startswith(prefix):
      continue
    key = full_key[len(prefix):]
    value = np.asarray(value)
    if key == "text_projection":
      if with_projection:
        out["text_projection.weight"] = np.ascontiguousarray(value.T)
      continue
    match = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    if match and int(match.group(1)) == num_hidden_layers:
      continue
    new = _open_clip_key(key)
    if new is None:
      continue
    if new.endswith((".in_proj_weight", ".in_proj_bias")):
      base, _, leaf = new.rpartition(".")
      suffix = "weight" if leaf == "in_proj_weight" else "bias"
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
        out[f"{base}.{name}.{suffix}"] = np.ascontiguousarray(part)
    else:
      out[new] = value
  if not out:
    raise common.WeightsMismatchError(f"no OpenCLIP text keys start with {prefix!r}: not an SD 2.x single file")
  return out


def clip_text_from_open_clip(state_dict: Mapping[str, np.ndarray], config: Any = "openclip_vit_h14_text", *,
                             prefix: str = "cond_stage_model.model.", with_projection: bool = False
                             ) -> dict[str, Any]:
  """Text-tower params from an SD 2.x single-file checkpoint (OpenCLIP layout under `prefix`).

  Gives CLIPTextTransformer params, or with `with_projection` CLIPTextModelWithProjection params whose
  text_projection kernel is OpenCLIP's `text_projection` matrix P (x @ P; set the config's projection_dim to
  P's width). SDXL's second encoder is `prefix="conditioner.embedders.1.model."`.
  """
  create = lambda c: clip_lib.create_clip_text_model(c, with_projection=with_projection)  # noqa: E731
  model = _model(config, create)
  converted = open_clip_to_transformers(state_dict, model.config.num_hidden_layers, prefix=prefix,
                                        with_projection=with_projection)
  if with_projection:
    converted = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in converted.items()}
  return _import(converted, model, what="OpenCLIP text weights")


# ---------------------------------------------------------------------------------------------------------------
# Directories


def load_clip_text_from_transformers_dir(directory, *, allow_pickle: bool = False,
                                         with_projection: bool | None = None, **model_kwargs: Any
                                         ) -> tuple[nn.Module, dict[str, Any]]:
  """(module, params) from a transformers CLIPTextModel[WithProjection] directory (config.json +
  model.safetensors), e.g. a diffusers checkpoint's `text_encoder/`.

  with_projection: None = CLIPTextModelWithProjection when config.json's architectures say so.
  model_kwargs: compute options for create_clip_text_model (dtype, param_dtype, attention_impl, remat_policy).
  """
  directory = epath.Path(directory)
  config_json = json.loads((directory / "config.json").read_text())
  config = clip_lib.clip_config_from_transformers(config_json)
  if config.text is None:
    raise ValueError(f"{directory}/config.json is not a CLIP text model config "
                     f"(model_type {config_json.get('model_type')!r})")
  if with_projection is None:
    with_projection = "CLIPTextModelWithProjection" in (config_json.get("architectures") or [])
  model = clip_lib.create_clip_text_model(config, with_projection=with_projection, **model_kwargs)
  state = common.load_state_dict(common.find_weights(directory, "model", allow_pickle=allow_pickle),
                                 allow_pickle=allow_pickle)
  if with_projection:
    if not any(k.startswith("text_model.") for k in state):  # transformers v5 unprefixed layout
      state = {k if k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}
    return model, clip_text_with_projection_from_transformers(state, model)
  return model, clip_text_from_transformers(state, model)


# ----------------------------------------------------------------------------------------------------------------
# The two-tower CLIP of an sd_jax model directory


def clip_component_config(config: clip_lib.CLIPConfig) -> dict[str, Any]:
  """transformers' CLIPConfig dict, plus `logit_bias_init_value` (a SigLIP head, which transformers' CLIP lacks)."""
  fields = clip_lib.clip_config_to_transformers(dataclasses.replace(config, logit_bias_init_value=None))
  fields["logit_bias_init_value"] = config.logit_bias_init_value
  return fields


def load_exported_clip(model_dir, **module_kwargs) -> tuple[clip_lib.CLIPModel, Any]:
  """(CLIPModel, params) of the `clip/` component of a CLIP run's export (for CLIP score, retrieval, LiT)."""
  fields, params = store.load_component(model_dir, CLIP_COMPONENT)
  config = dataclasses.replace(clip_lib.clip_config_from_transformers(fields),
                               logit_bias_init_value=fields.get("logit_bias_init_value"))
  return clip_lib.create_clip_model(config, **module_kwargs), params
