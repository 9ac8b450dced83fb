"""U-Net weights: diffusers directories and state dicts, and original LDM single-file checkpoints.

Three layouts map onto `sd_jax.models.unet.UNet2DConditionModel` params:

* diffusers `UNet2DConditionModel` (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`) and
  `UNet2DModel` (pixel-space DDPM: `down_blocks.1.attentions.0.group_norm`, `to_q/to_k/to_v/to_out.0` with
  biases, or the pre-0.15 names `query/key/value/proj_attn`). Every `.N` index becomes a `_N` suffix
  (`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel`, `to_out_0`, `ff/net_0/proj`).
* original LDM single files (`model.diffusion_model.input_blocks.N.M...`, `middle_block`, `output_blocks`,
  `time_embed.0/2`, `out.0/2`, `label_emb`), renamed exactly as diffusers' `convert_ldm_unet_checkpoint` does.

    module, params = load_unet_from_diffusers_dir("sd15/unet")               # config.json + safetensors
    params = unet_from_ldm_state_dict(load_state_dict("v1-5.safetensors"), unet_config("sd15"))
    state = unet_to_diffusers_state_dict(params)                              # exact inverse, PyTorch layouts

The exporters also take abstract params (`jax.eval_shape` output) and then return ShapeDtypeStructs, so key sets
and shapes can be checked at full size without memory.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from sd_jax.models.unet import (
    DOWN_BLOCK_ATTENTION,
    UP_BLOCK_ATTENTION,
    UNet2DConditionModel,
    create_unet,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from sd_jax.weights import common

DIFFUSERS_STEM = "diffusion_pytorch_model"
LDM_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema."

# PyTorch ModuleList / Sequential attributes whose children `.N` are Flax submodules `name_N`. Other names with a
# numeric suffix (`linear_1`, `conv1`) are plain names in both frameworks.
_INDEXED = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers",
     "to_out", "net"}
)
# diffusers < 0.15 AttentionBlock names in UNet2DModel checkpoints (`google/ddpm-*`), as diffusers renames them.
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Transformer2DModel projections: a 1x1 conv (SD 1.x) or a Linear (SD 2.x, use_linear_projection).
_PROJ = re.compile(r"\.attentions\.\d+\.proj_(in|out)\.weight$")

Config = Mapping[str, Any] | UNet2DConditionModel


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


def _as_module(config: Config) -> UNet2DConditionModel:
  return config if isinstance(config, UNet2DConditionModel) else create_unet(config)


@functools.lru_cache(maxsize=16)
def _abstract_params(module: UNet2DConditionModel) -> dict[str, Any]:
  """The model's param tree as ShapeDtypeStructs (no compute; cached per config)."""
  shapes = jax.eval_shape(functools.partial(module.init, jax.random.key(0)), **module.example_inputs())
  return nn.unbox(shapes["params"])


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  params = nn.unbox(params)
  if set(params) == {"params"}:  # a whole variables dict
    params = params["params"]
  return params


def _transpose(value, perm: tuple[int, ...], fn):
  """`fn(value)` for arrays; the permuted ShapeDtypeStruct for abstract values."""
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(value.shape[p] for p in perm), value.dtype)
  return fn(np.asarray(value))


def _torch_to_path(module_key: str) -> str:
  """`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`."""
  parts: list[str] = []
  for part in module_key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return "/".join(parts)


def _path_to_torch(module_path: str) -> str:
  """`down_blocks_0/resnets_1/conv1` -> `down_blocks.0.resnets.1.conv1` (only ModuleList names are split)."""
  parts = []
  for part in module_path.split("/"):
    name, _, index = part.rpartition("_")
    parts.append(f"{name}.{index}" if name in _INDEXED and index.isdigit() else part)
  return ".".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# diffusers layout


def unet_from_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], config_fields: Config) -> dict[str, Any]:
  """sd_jax U-Net params from a diffusers `UNet2DConditionModel` / `UNet2DModel` state dict.

  Args:
    state_dict: PyTorch names -> arrays (numpy or anything `np.asarray` takes), e.g. from common.load_state_dict.
    config_fields: the sd_jax model config (a dict of fields as from `unet_config_from_diffusers`, or the module).

  Returns:
    Nested params (numpy, the model's param_dtype) for `module.apply({"params": params}, ...)`.

  Raises:
    common.WeightsMismatchError listing every missing, unexpected and mis-shaped key.
  """
  module = _as_module(config_fields)
  flat = {}
  for key, value in state_dict.items():
    key = _LEGACY_ATTENTION.sub(lambda m: f"{m.group(1)}{_LEGACY_NAMES[m.group(2)]}.", key)
    value = np.asarray(value)
    if _PROJ.search(key):
      # Same map either way; accept both forms and store the one this config uses.
      if module.use_linear_projection and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
      elif not module.use_linear_projection and value.ndim == 2:
        value = value[:, :, None, None]
    module_key, _, leaf = key.rpartition(".")
    if key == "class_embedding.weight" and value.ndim == 2:
      leaf = "embedding"  # nn.Embedding table: [num_classes, dim] in both frameworks
    else:
      try:
        flax_path, value = common.torch_param_to_flax(key, value)
        leaf = flax_path.rpartition("/")[2]
      except ValueError:
        pass  # no layout rule: kept under its own name, so check_params reports it as unexpected
    flat[f"{_torch_to_path(module_key)}/{leaf}"] = value
  return common.check_params(_abstract_params(module), flat, what="U-Net weights (diffusers layout)")


def unet_to_diffusers_state_dict(params: Mapping[str, Any]) -> dict[str, Any]:
  """The exact inverse of `unet_from_diffusers_state_dict`: diffusers names and PyTorch layouts (numpy).

  Conv kernels go back to OIHW, Dense kernels to [out, in]; proj_in/out keep whichever form the model has.
  Abstract params (ShapeDtypeStructs) give ShapeDtypeStructs of the PyTorch shapes.
  """
  out = {}
  for path, value in common.flatten(_unwrap(params)).items():
    module_path, _, leaf = path.rpartition("/")
    ndim = len(value.shape)
    if leaf == "kernel" and ndim == 4:
      value = _transpose(value, (3, 2, 0, 1), common.conv_to_torch)
    elif leaf == "kernel" and ndim == 2:
      value = _transpose(value, (1, 0), common.linear_to_torch)
    elif leaf not in ("scale", "bias", "embedding"):
      raise ValueError(f"no PyTorch name for parameter {path} with shape {tuple(value.shape)}")
    elif not isinstance(value, jax.ShapeDtypeStruct):
      value = np.asarray(value)
    out[f"{_path_to_torch(module_path)}.{'bias' if leaf == 'bias' else 'weight'}"] = value
  return out


def load_unet_from_diffusers_dir(directory, *, variant: str | None = None, allow_pickle: bool = False,
                                 **overrides: Any) -> tuple[UNet2DConditionModel, dict[str, Any]]:
  """(module, params) from a diffusers U-Net directory: config.json + diffusion_pytorch_model[.variant].safetensors
  (or its sharded index).

  `overrides` are sd_jax-side fields (dtype="bfloat16", remat_policy=..., attention_impl=...). Pickle `.bin` files
  are refused unless allow_pickle. Raises common.WeightsMismatchError when the weights do not fit the config.
  """
  directory = epath.Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist (expected a diffusers U-Net directory).")
  module = create_unet(unet_config_from_diffusers(json.loads(config_path.read_text())), **overrides)
  weights = common.find_weights(directory, DIFFUSERS_STEM, variant=variant, allow_pickle=allow_pickle)
  state_dict = common.load_state_dict(weights, allow_pickle=allow_pickle)
  return module, unet_from_diffusers_state_dict(state_dict, module)


def save_unet_to_diffusers_dir(directory, config_fields: Config, params: Mapping[str, Any]) -> None:
  """Writes config.json and diffusion_pytorch_model.safetensors (float32) that diffusers' from_pretrained reads."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(unet_config_to_diffusers(config_fields), indent=2) + "\n")
  state = {k: np.asarray(v, np.float32) for k, v in unet_to_diffusers_state_dict(params).items()}
  common.save_state_dict(state, directory / f"{DIFFUSERS_STEM}.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Original LDM single-file layout

# ResBlock (ldm) -> ResnetBlock2D (diffusers) submodules, as diffusers' update_unet_resnet_ldm_to_diffusers.
_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _ldm_module_map(module: UNet2DConditionModel) -> tuple[dict[str, str], dict[str, str]]:
  """(modules, subtrees): diffusers module name -> LDM module name for leaf modules (whose `.weight`/`.bias`
  follow), and for attention subtrees whose inner names are the same in both layouts."""
  settings = module.block_settings()
  n = len(module.block_out_channels)
  self_blocks = [t for t in module.down_block_types if DOWN_BLOCK_ATTENTION[t] == "self"]
  self_blocks += [t for t in module.up_block_types if UP_BLOCK_ATTENTION[t] == "self"]
  if self_blocks or module.mid_block_type == "UNetMidBlock2D":
    raise NotImplementedError("LDM single-file layout: only cross-attention U-Nets (Stable Diffusion) are supported")
  if module.class_embed_type not in (None, "timestep"):
    raise NotImplementedError(f"LDM single-file layout: class_embed_type {module.class_embed_type!r}")
  modules = {
      "conv_in": "input_blocks.0.0",
      "time_embedding.linear_1": "time_embed.0",
      "time_embedding.linear_2": "time_embed.2",
      "conv_norm_out": "out.0",
      "conv_out": "out.2",
  }
  if module.class_embed_type == "timestep":
    modules.update({"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"})
  elif module.num_class_embeds is not None:
    modules["class_embedding"] = "label_emb"
  subtrees = {}

  def resnet(diffusers_name, ldm_name):
    for diffusers_part, ldm_part in _LDM_RESNET.items():
      modules[f"{diffusers_name}.{diffusers_part}"] = f"{ldm_name}.{ldm_part}"

  layers = settings["layers"]
  index = 1  # input_blocks.0 is conv_in
  for b in range(n):
    for j in range(layers[b]):
      resnet(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0")
      subtrees[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{index}.1"
      index += 1
    if b < n - 1:
      modules[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
      index += 1
  resnet("mid_block.resnets.0", "middle_block.0")
  subtrees["mid_block.attentions.0"] = "middle_block.1"
  resnet("mid_block.resnets.1", "middle_block.2")
  index = 0
  for b, block_type in enumerate(module.up_block_types):
    for j in range(layers[n - 1 - b] + 1):
      resnet(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0")
      subtrees[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{index}.1"
      index += 1
    if b < n - 1:
      # The upsampler follows the last resnet (and its attention, when the block has one).
      slot = 2 if UP_BLOCK_ATTENTION[block_type] else 1
      modules[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{slot}.conv"
  return modules, subtrees


def _rename(key: str, modules: Mapping[str, str], subtrees: Mapping[str, str]) -> str | None:
  module_name, _, leaf = key.rpartition(".")
  if module_name in modules:
    return f"{modules[module_name]}.{leaf}"
  parts = key.split(".")
  for length in (4, 3):  # `down_blocks.0.attentions.1` / `mid_block.attentions.0`
    head = ".".join(parts[:length])
    if head in subtrees:
      return ".".join([subtrees[head], *parts[length:]])
  return None


def unet_to_ldm_state_dict(params: Mapping[str, Any], config_fields: Config, *,
                           prefix: str = LDM_PREFIX) -> dict[str, Any]:
  """Original LDM single-file names (`model.diffusion_model.input_blocks.1.1.proj_in.weight`, ...) and PyTorch
  layouts; the inverse of `unet_from_ldm_state_dict` and of diffusers' `convert_ldm_unet_checkpoint`."""
  modules, subtrees = _ldm_module_map(_as_module(config_fields))
  out = {}
  for key, value in unet_to_diffusers_state_dict(params).items():
    ldm_key = _rename(key, modules, subtrees)
    if ldm_key is None:
      raise ValueError(f"no LDM name for {key}")
    out[prefix + ldm_key] = value
  return out


def unet_from_ldm_state_dict(state_dict: Mapping[str, np.ndarray], config_fields: Config, *,
                             prefix: str = LDM_PREFIX, use_ema: bool = False) -> dict[str, Any]:
  """sd_jax U-Net params from an original single-file checkpoint (SD 1.x / 2.x `*.safetensors`).

  Only keys under `prefix` are read (the VAE and text encoder live beside it); a dict with no key under `prefix`
  is taken as the U-Net's keys with the prefix already stripped. `use_ema` reads the EMA copy
  (`model_ema.diffusion_modelinput_blocks00weight`, dots removed) as diffusers' `extract_ema` does. Raises
  common.WeightsMismatchError on keys that do not fit `config_fields` (the LDM names of unknown keys are listed).
  """
  module = _as_module(config_fields)
  modules, subtrees = _ldm_module_map(module)
  to_diffusers_module = {v: k for k, v in modules.items()}
  to_diffusers_subtree = {v: k for k, v in subtrees.items()}
  if use_ema:
    # The EMA keys lose their dots, so they can only be found from the names the model expects.
    expected = unet_to_ldm_state_dict(_abstract_params(module), module, prefix=prefix)
    flat_names = {LDM_EMA_PREFIX + "".join(k.split(".")[1:]): k for k in expected}
    state_dict = {flat_names[k]: v for k, v in state_dict.items() if k in flat_names}
    if not state_dict:
      raise common.WeightsMismatchError(f"no EMA weights ({LDM_EMA_PREFIX}*) in this checkpoint.")
  if any(k.startswith(prefix) for k in state_dict):
    unet_state = common.strip_prefix(state_dict, prefix)
  else:
    unet_state = dict(state_dict)  # the caller already took the U-Net's keys out of the file
  if not unet_state:
    raise common.WeightsMismatchError(f"no U-Net weights under {prefix!r} in this checkpoint.")
  converted, unknown = {}, []
  for key, value in unet_state.items():
    module_name, _, leaf = key.rpartition(".")
    if module_name in to_diffusers_module:
      converted[f"{to_diffusers_module[module_name]}.{leaf}"] = value
      continue
    # Attention subtrees: `input_blocks.1.1...` / `middle_block.1...` (the first 3 or 2 name parts).
    parts = key.split(".")
    for length in (3, 2):
      head = ".".join(parts[:length])
      if head in to_diffusers_subtree:
        converted[".".join([to_diffusers_subtree[head], *parts[length:]])] = value
        break
    else:
      unknown.append(prefix + key)
  if unknown:
    raise common.WeightsMismatchError(
        f"U-Net weights (LDM layout) do not match the model: {len(unknown)} keys have no place in it:\n"
        + "\n".join(f"    {k}" for k in sorted(unknown)[:40])
    )
  return unet_from_diffusers_state_dict(converted, module)
