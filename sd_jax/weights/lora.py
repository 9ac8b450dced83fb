"""LoRA and textual-inversion files of the PyTorch ecosystem <-> sd_jax adapters (sd_jax/lora.py).

LoRA files (all safetensors; pickles only with allow_pickle):

  diffusers / PEFT  `pytorch_lora_weights.safetensors`, what `StableDiffusionPipeline.save_lora_weights` writes:
                    `unet.<module>.lora_A.weight` [r, in] (conv [r, in, kh, kw]) and `.lora_B.weight` [out, r]
                    (conv [out, r, 1, 1]); `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`.
                    The scale is alpha / r from the file's `lora_adapter_metadata` (PEFT LoraConfig fields, with
                    rank_pattern / alpha_pattern / use_rslora) when it has one, else 1 (diffusers' convention).
  older diffusers   `<module>.lora.down.weight` / `.lora.up.weight`, `...attn1.processor.to_q_lora.down.weight`,
                    `...self_attn.q_proj.lora_linear_layer.down.weight`, with or without the `unet.` prefix.
  kohya             `lora_unet_<diffusers module, '.' -> '_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`
                    (scale = alpha / r; no alpha means alpha = r), `lora_te_text_model_encoder_layers_0_...`; also
                    the LDM-named SD 1.x/2.x variant (`lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`,
                    `middle_block`, `output_blocks`), mapped with sd_jax.weights.unet's LDM module map.

`load` folds every module's scale into "up", so loaded adapters apply with scale 1.0 (a user's FILE:SCALE is
the `scale` of lora.applied / lora.merge). Module names are mapped against the base model's params and every
adapter is checked against its kernel: keys or shapes that do not fit raise WeightsMismatchError (a ValueError)
naming the modules.

Textual-inversion embeddings: diffusers' `learned_embeds.safetensors` ({token: [n, dim]}), A1111's `.pt`
({"string_to_param": {"*": [n, dim]}, "name": ...}, a pickle) and the single-tensor safetensors A1111 reads
(`{"emb_params": [n, dim]}` from kohya's trainer and converters); in A1111 the token is the file's name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from sd_jax import lora as lora_lib
from sd_jax.models.unet import UNet2DConditionModel
from sd_jax.weights import clip as clip_weights
from sd_jax.weights import common
from sd_jax.weights import unet as unet_weights

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_PICKLE_FILE = "pytorch_lora_weights.bin"
EMBEDDINGS_FILE = "learned_embeds.safetensors"  # diffusers' textual_inversion example
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (JSON of prefixed LoraConfig fields)
COMPONENTS = ("unet", "text_encoder")

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_KOHYA_LEAVES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# Keys of LoRA variants that are not a plain down/up pair (DoRA, LoHa, LoKr, LoCon's CP middle, biases).
_UNSUPPORTED = re.compile(r"(lora_magnitude_vector|dora_scale|hada_|lokr_|lora_mid|\.diff(_b)?$|lora_B\.bias$)")
# diffusers key forms (after the `unet.` / `text_encoder.` prefix): module name + role.
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)(\.default)?\.weight$")
_OLD = re.compile(r"^(?P<module>.+)\.lora(_linear_layer)?\.(?P<role>down|up)\.weight$")
_PROCESSOR = re.compile(
    r"^(?P<head>.+?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up"}
_PROCESSOR_MODULES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


# ---------------------------------------------------------------------------------------------------------------
# Module names: sd_jax module paths <-> the PyTorch module names LoRA files use


def _canonical_text_name(name: str) -> str:
  """A transformers CLIP text module name as LoRA files write it: under `text_model.` (transformers v5 dropped
  that level from CLIPTextModel, so PEFT there saves `encoder.layers...`)."""
  return name if name.startswith(("text_model.", "text_projection")) else f"text_model.{name}"


def _text_name(path: str) -> str:
  """Text-tower module path (CLIPTextTransformer or CLIPTextModelWithProjection params) -> its name in files."""
  return _canonical_text_name(
      clip_weights.flax_path_to_torch(f"{path}/kernel", np.zeros((1, 1)))[0].removesuffix(".weight"))


def _module_name(component: str, path: str) -> str:
  return unet_weights._path_to_torch(path) if component == "unet" else _text_name(path)


def _infer_unet(params: Mapping[str, Any]) -> UNet2DConditionModel | None:
  """A U-Net module with the block structure of `params` (enough for the LDM module map; heads and widths do
  not change module names), or None when the tree is not a U-Net."""
  tree = lora_lib._unwrap(params)
  kinds = {None: ("DownBlock2D", "UpBlock2D"), "cross": ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"),
           "self": ("AttnDownBlock2D", "AttnUpBlock2D")}

  def attention(block):
    if "attentions_0" not in block:
      return None
    return "cross" if "transformer_blocks_0" in block["attentions_0"] else "self"

  try:
    n = sum(1 for k in tree if k.startswith("down_blocks_"))
    down = [tree[f"down_blocks_{i}"] for i in range(n)]
    up = [tree[f"up_blocks_{i}"] for i in range(n)]
    mid = tree.get("mid_block")
    mid_type = None if mid is None else (
        "UNetMidBlock2DCrossAttn" if attention(mid) == "cross" else "UNetMidBlock2D")
    fields = dict(
        down_block_types=tuple(kinds[attention(b)][0] for b in down),
        up_block_types=tuple(kinds[attention(b)][1] for b in up),
        mid_block_type=mid_type,
        block_out_channels=tuple(b["resnets_0"]["conv2"]["kernel"].shape[-1] for b in down),
        layers_per_block=tuple(sum(1 for k in b if k.startswith("resnets_")) for b in down),
        attention_head_dim=1,
        cross_attention_dim=1,
    )
    if "class_embedding" in tree:
      if "linear_1" in tree["class_embedding"]:
        fields["class_embed_type"] = "timestep"
      else:
        fields["num_class_embeds"] = tree["class_embedding"]["embedding"].shape[0]
    module = UNet2DConditionModel(**fields)
    module.block_settings()
    return module
  except (KeyError, ValueError, AttributeError):
    return None


def _names(component: str, params: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
  """(PyTorch module name -> path, kohya name (after `lora_unet_` / `lora_te_`) -> path) for every Dense/Conv
  module of the base; U-Net kohya names include the LDM-named variant when the U-Net has that layout."""
  names, kohya = {}, {}
  ldm = None
  if component == "unet":
    module = _infer_unet(params)
    if module is not None:
      try:
        ldm = unet_weights._ldm_module_map(module)
      except NotImplementedError:  # a self-attention (pixel-space) U-Net: no LDM names
        pass
  for path in lora_lib.kernels(params):
    name = _module_name(component, path)
    names[name] = path
    kohya[name.replace(".", "_")] = path
    if ldm is not None:
      ldm_key = unet_weights._rename(f"{name}.weight", *ldm)
      if ldm_key is not None:
        kohya[ldm_key.removesuffix(".weight").replace(".", "_")] = path
  return names, kohya


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _lora_file(path, allow_pickle: bool) -> epath.Path:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist.")
  if not path.is_dir():
    return path
  for name in (DIFFUSERS_FILE, DIFFUSERS_PICKLE_FILE):
    if (path / name).exists():
      if name.endswith(".bin") and not allow_pickle:
        raise ValueError(common.pickle_refusal(path / name))
      return path / name
  candidates = sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))
  if len(candidates) == 1:
    return path / candidates[0]
  raise FileNotFoundError(f"no {DIFFUSERS_FILE} in {path} (safetensors files there: {candidates}); pass the file.")


def _file_metadata(path: epath.Path) -> dict[str, str]:
  if not path.name.endswith(".safetensors"):
    return {}
  from safetensors import safe_open
  with safe_open(str(path), framework="np") as f:
    return dict(f.metadata() or {})


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
  """{component: LoraConfig fields} from diffusers' `lora_adapter_metadata` (keys `unet.r`, `unet.lora_alpha`...)."""
  raw = metadata.get(METADATA_KEY)
  if not raw:
    return {}
  fields = json.loads(raw)
  configs: dict[str, dict[str, Any]] = {}
  for key, value in fields.items():
    component, _, field = key.partition(".")
    configs.setdefault(component, {})[field] = value
  return configs


def _pattern_value(patterns: Mapping[str, Any], names: tuple[str, ...], default: Any) -> Any:
  """PEFT's get_pattern_key: a pattern matches a module name when the name ends with it after a '.'."""
  for key, value in (patterns or {}).items():
    if any(re.match(rf"(.*\.)?({key})$", n) for n in names):
      return value
  return default


def _peft_scale(config: Mapping[str, Any], name: str) -> float:
  """alpha / r (alpha / sqrt(r) with use_rslora) of module `name` under a PEFT LoraConfig (its defaults: r = 8,
  lora_alpha = 8)."""
  names = (name, name.removeprefix("text_model."))
  r = _pattern_value(config.get("rank_pattern"), names, config.get("r", 8))
  alpha = _pattern_value(config.get("alpha_pattern"), names, config.get("lora_alpha", 8))
  return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _component_of(name: str) -> str:
  """Component of an unprefixed diffusers module name."""
  return "text_encoder" if name.startswith(("text_model.", "encoder.layers.", "text_projection")) else "unet"


def _parse(state: Mapping[str, np.ndarray], where: str) -> tuple[dict[str, dict[str, dict[str, Any]]], str]:
  """{component: {module name: {"down", "up", "alpha"}}} and the form ("kohya" | "diffusers"). Module names are
  PyTorch names (diffusers form) or kohya names (without `lora_unet_` / `lora_te_`)."""
  unsupported = sorted(k for k in state if _UNSUPPORTED.search(k))
  if unsupported:
    raise ValueError(f"{where}: not a plain LoRA (DoRA / LoHa / LoKr / LoCon-CP / bias keys are not supported): "
                     f"{unsupported[:8]}")
  modules: dict[str, dict[str, dict[str, Any]]] = {}
  unknown, forms = [], set()
  for key, value in state.items():
    kohya_prefix = next((p for p in _KOHYA_PREFIXES if key.startswith(p)), None)
    if key.startswith("lora_te2_") or key.startswith("text_encoder_2."):
      raise ValueError(f"{where}: has keys for a second text encoder ({key}): an SDXL LoRA, which this model "
                       "(SD 1.x/2.x) cannot use")
    if kohya_prefix is not None:
      name, _, leaf = key[len(kohya_prefix):].partition(".")
      if leaf not in _KOHYA_LEAVES:
        unknown.append(key)
        continue
      forms.add("kohya")
      modules.setdefault(_KOHYA_PREFIXES[kohya_prefix], {}).setdefault(name, {})[_KOHYA_LEAVES[leaf]] = value
      continue
    component, rest = None, key
    for prefix in COMPONENTS:
      if key.startswith(prefix + "."):
        component, rest = prefix, key[len(prefix) + 1:]
    match = _PEFT.match(rest) or _OLD.match(rest)
    if match:
      name, role = match["module"], _ROLES[match["role"]]
    elif match := _PROCESSOR.match(rest):
      component = component or _component_of(match["head"])
      name = f"{match['head']}.{_PROCESSOR_MODULES[component][match['proj']]}"
      role = _ROLES[match["role"]]
    elif match := _ALPHA.match(rest):
      name, role = match["module"], "alpha"
    else:
      unknown.append(key)
      continue
    forms.add("diffusers")
    component = component or _component_of(name)
    if component == "text_encoder":
      name = _canonical_text_name(name)
    modules.setdefault(component, {}).setdefault(name, {})[role] = value
  if not forms:
    raise ValueError(f"{where}: not a LoRA file: none of its {len(state)} keys is a LoRA weight "
                     f"(lora_A/lora_B, lora.down/lora.up or kohya lora_down/lora_up); keys look like "
                     f"{sorted(state)[:5]}")
  if unknown:
    raise ValueError(f"{where}: {len(unknown)} keys are not LoRA weights: {sorted(unknown)[:20]}")
  if len(forms) > 1:
    raise ValueError(f"{where}: mixes kohya (lora_unet_/lora_te_) and diffusers keys; not a file any tool writes")
  return modules, forms.pop()


def _to_flax(down: np.ndarray, up: np.ndarray, kernel_shape: tuple[int, ...] | None
             ) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch layouts (down [r, in] / [r, in, kh, kw], up [out, r] / [out, r, 1, 1]) -> sd_jax layouts; a 1x1
  conv LoRA fits a Dense base and vice versa (SD 1.x proj_in/out are 1x1 convs, SD 2.x Linear layers)."""
  down = common.conv_to_flax(down) if down.ndim == 4 else down.T
  up = common.conv_to_flax(up) if up.ndim == 4 else up.T
  if kernel_shape is not None and len(kernel_shape) == 4 and kernel_shape[:2] == (1, 1) and down.ndim == 2:
    down, up = down[None, None], up[None, None]
  elif kernel_shape is not None and len(kernel_shape) == 2 and down.ndim == 4 and down.shape[:2] == (1, 1):
    down, up = down[0, 0], up[0, 0]
  return np.ascontiguousarray(down, np.float32), np.ascontiguousarray(up, np.float32)


def load(path, unet_params: Mapping[str, Any] | None, text_params: Mapping[str, Any] | None = None, *,
         allow_pickle: bool = False) -> dict[str, lora_lib.Adapters]:
  """Adapters from a LoRA file (any form in the module docstring) for the given base params.

  Args:
    path: a LoRA file, or a directory holding pytorch_lora_weights.safetensors (diffusers' save_lora_weights).
    unet_params: the base U-Net's params (arrays or abstract); module names are resolved against them.
    text_params: the base text tower's params (CLIPTextTransformer or CLIPTextModelWithProjection); needed when
      the file has text-encoder weights.
    allow_pickle: read `.bin` / `.pt` / `.ckpt` pickles (they can run code; only for files you trust).

  Returns:
    {"unet": adapters, "text_encoder": adapters (only when the file has some)}, numpy float32, each module's
    alpha / rank scale folded into "up": apply with `lora.applied(adapters, scale)` where `scale` is the user's
    multiplier (1.0 = the file as its trainer meant it).

  Raises:
    ValueError: not a LoRA file, an unsupported variant (DoRA, LoHa, LoKr, SDXL), a pickle without allow_pickle.
    common.WeightsMismatchError (a ValueError): modules absent from the base, or shapes that do not fit it.
  """
  file = _lora_file(path, allow_pickle)
  state = common.load_state_dict(file, allow_pickle=allow_pickle)
  modules, form = _parse(state, str(file))
  configs = _peft_configs(_file_metadata(file)) if form == "diffusers" else {}
  bases = {"unet": unet_params, "text_encoder": text_params}
  out: dict[str, lora_lib.Adapters] = {"unet": {}}
  problems: list[str] = []
  for component, entries in modules.items():
    base = bases[component]
    if base is None:
      raise ValueError(f"{file} has {component} LoRA weights ({len(entries)} modules); pass the base "
                       f"{component}'s params to load it")
    config = configs.get(component, {})
    if config.get("use_dora"):
      raise ValueError(f"{file}: a DoRA adapter (use_dora in its metadata) is not supported")
    names, kohya = _names(component, base)
    lookup = kohya if form == "kohya" else names
    shapes = lora_lib.kernels(base)
    adapters = {}
    for name, entry in sorted(entries.items()):
      if "down" not in entry or "up" not in entry:
        problems.append(f"{component} {name}: has only {sorted(entry)} (down and up are both needed)")
        continue
      module_path = lookup.get(name)
      if module_path is None:
        problems.append(f"{component} {name}: no such Dense/Conv module in the base model")
        continue
      down, up = np.asarray(entry["down"]), np.asarray(entry["up"])
      rank = down.shape[0]
      if "alpha" in entry:
        alpha = float(np.asarray(entry["alpha"]).reshape(()))
        scale = (alpha or rank) / rank  # kohya: alpha 0 (or none) means alpha = rank
      elif config:
        scale = _peft_scale(config, name)
      else:
        scale = 1.0  # diffusers' convention without metadata: lora_alpha = r
      down, up = _to_flax(down, up, shapes.get(module_path))
      adapters[module_path] = {"down": down, "up": up * np.float32(scale)}
    try:
      lora_lib.check(base, adapters, what=f"{component} LoRA")
    except ValueError as e:
      problems.append(str(e))
    out[component] = adapters
  if problems:
    raise common.WeightsMismatchError(f"{file} does not fit the base model:\n" + "\n".join(problems[:60]))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _torch_pair(adapter: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """sd_jax (down, up) -> PyTorch (down [r, in] / [r, in, kh, kw], up [out, r] / [out, r, 1, 1]), float32."""
  down, up = (np.asarray(adapter[k], np.float32) for k in ("down", "up"))
  down = common.conv_to_torch(down) if down.ndim == 4 else down.T
  up = common.conv_to_torch(up) if up.ndim == 4 else up.T
  return np.ascontiguousarray(down), np.ascontiguousarray(up)


def _components(adapters: Mapping[str, lora_lib.Adapters]) -> dict[str, lora_lib.Adapters]:
  unknown = sorted(set(adapters) - set(COMPONENTS))
  if unknown:
    raise ValueError(f"adapters must be keyed by {COMPONENTS}, got {unknown}")
  components = {c: adapters[c] for c in COMPONENTS if adapters.get(c)}
  if not components:
    raise ValueError("no adapters to save")
  return components


def save_diffusers(path, adapters: Mapping[str, lora_lib.Adapters], scale: float = 1.0) -> epath.Path:
  """Writes the PEFT-form file that diffusers' `StableDiffusionPipeline.save_lora_weights` writes and
  `load_lora_weights` reads: `unet.<module>.lora_A.weight` [r, in] (conv [r, in, kh, kw]), `.lora_B.weight`
  [out, r] (conv [out, r, 1, 1]), `text_encoder.text_model.<module>...`, float32.

  diffusers takes lora_alpha = r for a file without adapter metadata, so `scale` (the alpha / rank the adapters
  were trained with, times any user multiplier) is folded into lora_B: the file applies exactly `scale` x up(down)
  with diffusers' default scale 1.0, and needs no metadata (which other tools, e.g. ComfyUI, ignore anyway).

  Args:
    path: a directory (pytorch_lora_weights.safetensors is written in it) or a `.safetensors` file path.
    adapters: {"unet": adapters, "text_encoder": adapters (optional)}, as sd_jax.lora.init / load make them.
    scale: the factor the adapters are applied with.

  Returns:
    The file written.
  """
  path = epath.Path(path)
  file = path if path.name.endswith(".safetensors") else path / DIFFUSERS_FILE
  tensors = {}
  for component, component_adapters in _components(adapters).items():
    for module_path, adapter in sorted(component_adapters.items()):
      down, up = _torch_pair(adapter)
      name = f"{component}.{_module_name(component, module_path)}"
      tensors[f"{name}.lora_A.weight"] = down
      tensors[f"{name}.lora_B.weight"] = up * np.float32(scale)
  common.save_state_dict(tensors, file)
  return file


def save_kohya(path, adapters: Mapping[str, lora_lib.Adapters], spec: lora_lib.LoraSpec | float) -> epath.Path:
  """Writes a kohya-ss (sd-scripts `networks.lora`) file, the form A1111 / ComfyUI / diffusers all read:
  `lora_unet_<diffusers module name, '.' -> '_'>.lora_down.weight` [r, in] (conv [r, in, kh, kw]),
  `.lora_up.weight` [out, r] (conv [out, r, 1, 1]), `.alpha` (a 0-d tensor), and `lora_te_text_model_encoder_...`
  for the text tower. The adapters are written as they are and alpha = scale * r, so that the readers' alpha / r
  is the scale.

  Args:
    path: the `.safetensors` file to write.
    adapters: {"unet": adapters, "text_encoder": adapters (optional)}.
    spec: the LoraSpec the adapters were trained with (its `scale`), or a scale (1.0 for loaded adapters).

  Returns:
    The file written.
  """
  path = epath.Path(path)
  if not path.name.endswith(".safetensors"):
    raise ValueError(f"{path}: a kohya LoRA file is a single .safetensors file; give its name")
  scale = spec.scale if isinstance(spec, lora_lib.LoraSpec) else float(spec)
  prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
  tensors, ranks = {}, set()
  for component, component_adapters in _components(adapters).items():
    for module_path, adapter in sorted(component_adapters.items()):
      down, up = _torch_pair(adapter)
      rank = down.shape[0]
      ranks.add(rank)
      name = prefixes[component] + _module_name(component, module_path).replace(".", "_")
      tensors[f"{name}.lora_down.weight"] = down
      tensors[f"{name}.lora_up.weight"] = up
      tensors[f"{name}.alpha"] = np.asarray(scale * rank, np.float32)
  metadata = {"format": "pt", "ss_network_module": "networks.lora"}
  if len(ranks) == 1:  # what sd-scripts records; tools show it
    rank = ranks.pop()
    metadata.update(ss_network_dim=str(rank), ss_network_alpha=str(scale * rank))
  common.save_state_dict(tensors, path, metadata=metadata)
  return path


# ---------------------------------------------------------------------------------------------------------------
# Textual-inversion embeddings


def save_embeddings(path, embeddings: Mapping[str, Any]) -> epath.Path:
  """Writes diffusers' textual-inversion file: safetensors `{token: [n_vectors, dim]}` (float32).

  `path`: a directory (learned_embeds.safetensors is written in it) or a `.safetensors` file. diffusers'
  load_textual_inversion and A1111 read one token per file (A1111 names it after the file): save several tokens
  to several files for them.
  """
  if not embeddings:
    raise ValueError("no embeddings to save")
  tensors = {}
  for token, vectors in embeddings.items():
    if not isinstance(token, str) or not token.strip():
      raise ValueError(f"embedding tokens must be non-empty strings, got {token!r}")
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 1:
      vectors = vectors[None]
    if vectors.ndim != 2 or 0 in vectors.shape:
      raise ValueError(f"embedding {token!r} must be [n_vectors, dim], got shape {vectors.shape}")
    tensors[token] = vectors
  path = epath.Path(path)
  file = path if path.name.endswith(".safetensors") else path / EMBEDDINGS_FILE
  common.save_state_dict(tensors, file)
  return file


def _load_pickle(path: epath.Path) -> Any:
  import torch  # only for trusted pickle files, by explicit request
  return torch.load(str(path), map_location="cpu", weights_only=True)


def _as_matrix(value: Any, what: str) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor (pickles)
    value = value.detach().float().numpy()
  array = np.asarray(value, np.float32)
  if array.ndim == 1:
    array = array[None]
  if array.ndim != 2 or 0 in array.shape:
    raise ValueError(f"{what}: an embedding must be [n_vectors, dim], got shape {array.shape}")
  return array


def load_embeddings(path, *, allow_pickle: bool = False, token: str | None = None) -> dict[str, np.ndarray]:
  """{token: float32 [n_vectors, dim]} from a textual-inversion file.

  Reads diffusers' `{token: tensor}` (safetensors, or a `.bin` pickle), A1111's `.pt` pickle
  (`string_to_param["*"]`) and single-tensor safetensors with `emb_params` (kohya's trainer, A1111 converters).
  The A1111 forms carry no usable token: it is the file's name, as in A1111 (`EasyNegative.safetensors` ->
  "EasyNegative"). `token` renames a single-token file's token. A directory means its learned_embeds.safetensors.
  Pickles (.pt/.bin) are read only with allow_pickle.
  """
  path = epath.Path(path)
  if path.is_dir():
    path = path / EMBEDDINGS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist.")
  stem = path.name.rpartition(".")[0] or path.name
  if path.name.endswith(".safetensors"):
    data: Any = common.load_state_dict(path)
  elif path.name.endswith(common.PICKLE_SUFFIXES):
    if not allow_pickle:
      raise ValueError(common.pickle_refusal(path))
    data = _load_pickle(path)
  else:
    raise ValueError(f"{path}: unknown embedding format (expected .safetensors, or .pt/.bin with allow_pickle)")
  if not isinstance(data, Mapping) or not data:
    raise ValueError(f"{path}: not a textual-inversion embedding file (expected a dict of tensors)")
  if "string_to_param" in data:  # A1111 .pt
    params = data["string_to_param"]
    params = getattr(params, "_parameters", params)  # old files pickle a ParameterDict
    if len(params) != 1:
      raise ValueError(f"{path}: A1111 embedding with {len(params)} terms; expected one")
    embeddings = {stem: _as_matrix(next(iter(params.values())), str(path))}
  elif set(data) in ({"emb_params"}, {"string_to_param.*"}):
    embeddings = {stem: _as_matrix(next(iter(data.values())), str(path))}
  elif {"clip_l", "clip_g"} <= set(data):
    raise ValueError(f"{path}: an SDXL embedding (clip_l + clip_g); this model has one SD 1.x/2.x text tower")
  else:
    embeddings = {str(k): _as_matrix(v, f"{path} [{k}]") for k, v in data.items()}
  if token is not None:
    if len(embeddings) != 1:
      raise ValueError(f"{path} holds {len(embeddings)} tokens {sorted(embeddings)}; token= renames only one")
    embeddings = {token: next(iter(embeddings.values()))}
  return embeddings
