"""AutoencoderKL weights: diffusers and original-LDM state dicts ⇄ sd_jax params.

diffusers names map onto sd_jax param paths by writing `.N` as `_N` plus the layout changes of
`common.torch_param_to_flax` (`encoder.down_blocks.0.resnets.1.conv1.weight` → `encoder/down_blocks_0/resnets_1/
conv1/kernel`, HWIO). Two older diffusers spellings of the mid-block attention are accepted on import:
`query/key/value/proj_attn` (diffusers < 0.15) and q/k/v/out weights stored as 1×1 convs [C, C, 1, 1]. Export
always writes current names with linear [C, C] weights.

Original LDM checkpoints (`first_stage_model.*` inside an SD single file, or a standalone VAE file with bare keys)
use the CompVis names: `encoder.down.N.block.M.{norm1,conv1,norm2,conv2,nin_shortcut}`, `encoder.down.N.downsample`,
`{encoder,decoder}.mid.{block_1,attn_1,block_2}` (attention `norm,q,k,v,proj_out` as 1×1 convs),
`{encoder,decoder}.norm_out`, and `decoder.up.N` numbered from the lowest resolution, i.e. in the reverse order of
diffusers' `up_blocks`. They go through the diffusers names here.

Every import checks the converted tree against the model's parameter shapes and raises
`common.WeightsMismatchError` listing each missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from sd_jax.models.vae import AutoencoderKL, create_vae, vae_config_from_diffusers, vae_config_to_diffusers
from sd_jax.weights import common

DIFFUSERS_WEIGHTS_STEM = "diffusion_pytorch_model"
# Where the VAE sits inside single-file checkpoints (the same list as diffusers' LDM_VAE_KEYS).
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")

# Mid-block attention names of diffusers < 0.15 (its `AttentionBlock`), by the current names.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_RE = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_ATTENTION_WEIGHT_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_INDEX_RE = re.compile(r"\.(\d+)(?=\.)")  # "down_blocks.0.resnets" -> "down_blocks_0.resnets"
_FLAX_INDEX_RE = re.compile(r"^(.+)_(\d+)$")  # path segment "down_blocks_0" -> "down_blocks.0"


def _as_model(config: AutoencoderKL | str | Mapping[str, Any]) -> AutoencoderKL:
  return config if isinstance(config, AutoencoderKL) else create_vae(config)


def abstract_params(model: AutoencoderKL) -> dict[str, Any]:
  """The model's params as (unboxed) ShapeDtypeStructs, without allocating or computing anything."""
  variables = jax.eval_shape(model.init, jax.random.key(0), **model.example_inputs(batch_size=1))
  return nn.unbox(variables)["params"]


def _to_numpy(value: Any) -> np.ndarray:
  """numpy view of a numpy/jax array or a torch tensor (fp16/bf16 torch tensors come back as float32)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


# ---------------------------------------------------------------------------------------------------------------
# diffusers


def _diffusers_key_to_flax(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One diffusers tensor → (sd_jax param path, array in Flax layout)."""
  key = _LEGACY_ATTENTION_RE.sub(lambda m: f"{m.group(1)}{_LEGACY_ATTENTION[m.group(2)]}.", key)
  if _ATTENTION_WEIGHT_RE.search(key) and value.ndim > 2:
    # Attention projections saved as 1×1 convs ([C, C, 1, 1], or [C, C, 1] for proj_attn): the same linear map.
    value = value.reshape(value.shape[:2])
  flat_key = _INDEX_RE.sub(r"_\1", key)
  try:
    return common.torch_param_to_flax(flat_key, value)
  except ValueError:
    # No layout rule (an odd leaf name or rank): keep it under its own name so the key diff reports it.
    return flat_key.replace(".", "/"), value


def vae_from_diffusers_state_dict(
    state_dict: Mapping[str, Any], config: AutoencoderKL | str | Mapping[str, Any]
) -> dict[str, Any]:
  """Params for `config` (a model, config name or field mapping) from a diffusers AutoencoderKL state dict.

  Values may be numpy arrays or torch tensors; params are cast to the model's `param_dtype`.
  Raises WeightsMismatchError (naming the keys) when the weights do not fit the model.
  """
  return _import_diffusers(state_dict, abstract_params(_as_model(config)), what="diffusers VAE weights")


def _import_diffusers(state_dict: Mapping[str, Any], expected: Mapping[str, Any], *, what: str) -> dict[str, Any]:
  converted = {}
  for key, value in state_dict.items():
    path, array = _diffusers_key_to_flax(key, _to_numpy(value))
    if path in converted:
      raise common.WeightsMismatchError(f"{what}: two tensors map to {path} (one is {key})")
    converted[path] = array
  return common.check_params(expected, converted, what=what)


def _flax_path_to_diffusers_key(path: str, ndim: int) -> str:
  """sd_jax param path (and its rank) → diffusers key."""
  *modules, leaf = path.split("/")
  names = []
  for segment in modules:
    m = _FLAX_INDEX_RE.match(segment)
    names.append(f"{m.group(1)}.{m.group(2)}" if m else segment)
  base = ".".join(names)
  if (leaf == "kernel" and ndim in (2, 4)) or leaf == "scale":
    return f"{base}.weight"
  if leaf == "bias":
    return f"{base}.bias"
  raise ValueError(f"cannot export param {path} of rank {ndim}: no rule for it")


def _flax_to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith("/kernel"):
    return common.conv_to_torch(value) if value.ndim == 4 else common.linear_to_torch(value)
  return value


def vae_to_diffusers_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """diffusers AutoencoderKL state dict (current names, PyTorch layouts, numpy arrays in the params' dtype);
  `AutoencoderKL.load_state_dict(..., strict=True)` accepts it. Boxed (logically partitioned) params are fine."""
  flat = common.flatten(nn.unbox(dict(params)))
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    out[_flax_path_to_diffusers_key(path, value.ndim)] = np.ascontiguousarray(_flax_to_torch_layout(path, value))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Original LDM (CompVis) names

_LDM_ATTENTION_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_LDM_ATTENTION_WEIGHT_RE = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def diffusers_key_to_ldm(key: str, num_blocks: int) -> str:
  """diffusers AutoencoderKL key → original LDM key (without `first_stage_model.`); unknown keys unchanged.

  `num_blocks` (len(block_out_channels)) is needed because LDM numbers the decoder's levels bottom-up.
  """
  def up_level(m: re.Match) -> str:
    return str(num_blocks - 1 - int(m.group(1)))

  rules = (
      (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m.group(1)}.norm_out."),
      (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.",
       lambda m: f"encoder.down.{m.group(1)}.block.{m.group(2)}."),
      (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m.group(1)}.downsample."),
      (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{up_level(m)}.block.{m.group(2)}."),
      (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up_level(m)}.upsample."),
      (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
       lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}."),
      (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
       lambda m: f"{m.group(1)}.mid.attn_1.{_LDM_ATTENTION_LEAVES[m.group(2)]}."),
  )
  for pattern, replace in rules:
    new_key, count = re.subn(pattern, replace, key)
    if count:
      key = new_key
      break
  if ".block." in key or ".mid.block_" in key:
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
  return key


def _ldm_vae_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The VAE's tensors of a single-file checkpoint (prefix stripped) or of a standalone LDM VAE file."""
  for prefix in LDM_VAE_PREFIXES:
    if any(k.startswith(prefix) for k in state_dict):
      return common.strip_prefix(state_dict, prefix)
  # A standalone VAE file; training checkpoints also hold the discriminator and logvar of the loss.
  return {k: v for k, v in state_dict.items() if not k.startswith("loss.")}


def vae_from_ldm_state_dict(
    state_dict: Mapping[str, Any], config: AutoencoderKL | str | Mapping[str, Any]
) -> dict[str, Any]:
  """Params from an original LDM state dict: a full SD single file (keys under `first_stage_model.`; other
  components are ignored) or a standalone VAE with bare `encoder.* / decoder.*` keys.
  Raises WeightsMismatchError (naming the keys) when the weights do not fit the model."""
  model = _as_model(config)
  expected = abstract_params(model)
  diffusers_keys = [_flax_path_to_diffusers_key(path, len(shape.shape))
                    for path, shape in common.flatten(expected).items()]
  to_diffusers = {diffusers_key_to_ldm(k, len(model.block_out_channels)): k for k in diffusers_keys}
  # Unknown LDM keys keep their name, so the key diff shows them as unexpected.
  renamed = {to_diffusers.get(k, k): v for k, v in _ldm_vae_state(state_dict).items()}
  return _import_diffusers(renamed, expected, what="LDM VAE weights (compared under diffusers names)")


def vae_to_ldm_state_dict(params: Mapping[str, Any], prefix: str = "first_stage_model.") -> dict[str, np.ndarray]:
  """Original LDM state dict (as inside an SD single-file checkpoint; `prefix=""` for a standalone VAE file),
  attention projections as 1×1 convs like the CompVis code stores them."""
  diffusers_state = vae_to_diffusers_state_dict(params)
  num_blocks = len({k.split(".")[2] for k in diffusers_state if k.startswith("decoder.up_blocks.")})
  out = {}
  for key, value in diffusers_state.items():
    ldm_key = diffusers_key_to_ldm(key, num_blocks)
    if _LDM_ATTENTION_WEIGHT_RE.search(ldm_key):
      value = value[:, :, None, None]
    out[prefix + ldm_key] = value
  return out


# ---------------------------------------------------------------------------------------------------------------
# Directories


def load_vae_from_diffusers_dir(
    directory, *, variant: str | None = None, allow_pickle: bool = False, **overrides: Any
) -> tuple[AutoencoderKL, dict[str, Any]]:
  """(module, params) from a diffusers AutoencoderKL directory (`config.json` + safetensors, sharded or not,
  `variant` e.g. "fp16"). `overrides` are module fields such as dtype="bfloat16" or remat_policy.
  Pickled `.bin` weights are refused unless `allow_pickle`."""
  directory = epath.Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist (expected a diffusers AutoencoderKL directory).")
  model = create_vae(vae_config_from_diffusers(json.loads(config_path.read_text())), **overrides)
  weights = common.find_weights(directory, DIFFUSERS_WEIGHTS_STEM, variant=variant, allow_pickle=allow_pickle)
  state_dict = common.load_state_dict(weights, allow_pickle=allow_pickle)
  return model, vae_from_diffusers_state_dict(state_dict, model)


def save_vae_to_diffusers_dir(directory, model: AutoencoderKL, params: Mapping[str, Any]) -> None:
  """Writes `config.json` and `diffusion_pytorch_model.safetensors` (float32 unless the params are otherwise)
  that diffusers' `AutoencoderKL.from_pretrained(directory)` loads."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(vae_config_to_diffusers(model), indent=2))
  common.save_state_dict(vae_to_diffusers_state_dict(params), directory / f"{DIFFUSERS_WEIGHTS_STEM}.safetensors")
