"""Whole Stable Diffusion models in and out: diffusers directories and original-LDM single files.

  import_diffusers(DIR, OUT)        unet/ vae/ text_encoder/ tokenizer/ scheduler/  ->  an sd_jax model directory
  import_single_file(FILE, OUT)     v1-5-pruned-emaonly.safetensors-style file      ->  an sd_jax model directory
  export_diffusers(MODEL_DIR, OUT)  an sd_jax model directory                       ->  a diffusers directory

The sd_jax model directory (weights/store.py) keeps each component's module fields and params; per-network key
maps live in weights/unet.py, vae.py and clip.py, next to nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from sd_jax.weights import common
from sd_jax.weights import store

# Prefixes of the three networks in an original (CompVis / Stability) single-file checkpoint.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."     # SD 1.x: transformers CLIPTextModel keys
LDM_OPENCLIP_PREFIX = "cond_stage_model.model."       # SD 2.x: OpenCLIP text tower
_SD2_PROBE = LDM_UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"


def _copy_dir(src: epath.Path, dst: epath.Path) -> None:
  if dst.exists():
    store.remove_tree(dst)
  store.copy_tree(src, dst)


def _check_out(out) -> epath.Path:
  out = epath.Path(out)
  if (out / store.INDEX_FILE).exists():
    raise FileExistsError(f"{out} already holds an sd_jax model; choose a new --out (nothing was overwritten).")
  out.mkdir(parents=True, exist_ok=True)
  return out


# Per component: how to turn an sd_jax module into the diffusers/transformers config.json that the sd_jax model
# directory stores (so the file is the one users know), how to rebuild the module from it, and the key maps.
def _unet_codec():
  from sd_jax.models import unet as unet_models
  from sd_jax.weights import unet as unet_weights
  return dict(
      kind="UNet2DConditionModel",
      to_config=lambda module: unet_models.unet_config_to_diffusers(_module_fields(module)),
      build=lambda cfg, **kw: unet_models.create_unet(unet_models.unet_config_from_diffusers(cfg), **kw),
      load_dir=unet_weights.load_unet_from_diffusers_dir,
      to_state_dict=lambda module, params: unet_weights.unet_to_diffusers_state_dict(params),
      file="diffusion_pytorch_model.safetensors")


def _vae_codec():
  from sd_jax.models import vae as vae_models
  from sd_jax.weights import vae as vae_weights
  return dict(
      kind="AutoencoderKL",
      to_config=vae_models.vae_config_to_diffusers,
      build=lambda cfg, **kw: vae_models.create_vae(vae_models.vae_config_from_diffusers(cfg), **kw),
      load_dir=vae_weights.load_vae_from_diffusers_dir,
      to_state_dict=lambda module, params: vae_weights.vae_to_diffusers_state_dict(params),
      file="diffusion_pytorch_model.safetensors")


def _text_codec():
  from sd_jax.models import clip as clip_models
  from sd_jax.weights import clip as clip_weights
  return dict(
      kind="CLIPTextModel",
      to_config=lambda module: clip_models.clip_config_to_transformers(module.config),
      build=lambda cfg, **kw: clip_models.create_clip_text_model(clip_models.clip_config_from_transformers(cfg), **kw),
      load_dir=lambda d, variant=None, allow_pickle=False: clip_weights.load_clip_text_from_transformers_dir(
          d, allow_pickle=allow_pickle),
      to_state_dict=lambda module, params: clip_weights.clip_text_to_transformers(params),
      file="model.safetensors")


CODECS = {"unet": _unet_codec, "vae": _vae_codec, "text_encoder": _text_codec}


def _module_fields(module) -> dict[str, Any]:
  return {f: getattr(module, f) for f in module.__dataclass_fields__ if f not in ("parent", "name")}


def _save(out, name: str, module, params) -> None:
  codec = CODECS[name]()
  store.save_component(out, name, codec["to_config"](module), params)


def default_cache_dir() -> str:
  """Where converted models are kept: beside the datasets ($SD_JAX_DATA_DIR/../converted, else
  ~/.cache/sd_jax/converted)."""
  data_dir = os.environ.get("SD_JAX_DATA_DIR")
  root = os.path.dirname(os.path.normpath(data_dir)) if data_dir else os.path.expanduser("~/.cache/sd_jax")
  return os.path.join(root, "converted")


def _fingerprint(path: epath.Path) -> str:
  """Names a source by its absolute path, size and modification time (a changed file is converted again)."""
  digest = hashlib.sha256(str(path).encode())
  if "://" in str(path):  # an object store: its name only
    return digest.hexdigest()[:16]
  paths = [str(path)] if path.is_file() else sorted(
      os.path.join(root, name) for root, _, names in os.walk(str(path)) for name in names)
  for p in paths:
    stat = os.stat(p)
    digest.update(f"{os.path.relpath(p, str(path))}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  return digest.hexdigest()[:16]


def resolve_model(path, *, what: str = "the model", cache_dir: str | None = None, allow_pickle: bool = False,
                  **single_file_kwargs) -> epath.Path:
  """An sd_jax model directory for whatever a user points at: an sd_jax model directory (itself), a training
  workdir (its export/), a diffusers directory or an original single file (converted once, into `cache_dir`,
  default `default_cache_dir()`, and reused while the source is unchanged). Nothing of the source is modified.

  `what` names the flag or config key in errors (e.g. "--pretrained")."""
  p = epath.Path(path if "://" in str(path) else os.path.abspath(os.path.expanduser(str(path))))
  if not p.exists():
    raise FileNotFoundError(f"{what}={path} does not exist.")
  if (p / store.INDEX_FILE).exists():
    return p
  if (p / "export" / store.INDEX_FILE).exists():
    return p / "export"
  is_diffusers = p.is_dir() and (p / "model_index.json").exists()
  is_single_file = p.is_file() and p.name.endswith((".safetensors", *common.PICKLE_SUFFIXES))
  if not (is_diffusers or is_single_file):
    hint = " (a training workdir whose run has not finished: rerun its command to write export/)" if (
        p / "checkpoints").is_dir() else ""
    raise FileNotFoundError(f"{what}={path} is not a Stable Diffusion model{hint}: give an sd_jax model directory, a "
                            "training workdir, a diffusers directory (model_index.json) or a single .safetensors file.")
  out = epath.Path(cache_dir or default_cache_dir()) / f"{p.name.split('.')[0]}-{_fingerprint(p)}"
  if (out / store.INDEX_FILE).exists():
    return out
  tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
  if tmp.exists():
    store.remove_tree(tmp)
  logging.info("Converting %s into %s (once).", p, out)
  try:
    if is_diffusers:
      import_diffusers(p, tmp, allow_pickle=allow_pickle)
    else:
      import_single_file(p, tmp, allow_pickle=allow_pickle, **single_file_kwargs)
    try:
      tmp.rename(out)
    except OSError:  # another process converted it first
      store.remove_tree(tmp)
  except BaseException:
    if tmp.exists():
      store.remove_tree(tmp)
    raise
  return out


def load_model(model_dir, components=("unet", "vae", "text_encoder"), **module_kwargs) -> dict[str, tuple[Any, Any]]:
  """{name: (module, params)} for the components of an sd_jax model directory.

  `module_kwargs` (dtype, param_dtype, attention_impl, remat_policy) set how the modules compute.
  """
  index = store.read_index(model_dir)
  out = {}
  for name in components:
    if name not in index["components"]:
      raise KeyError(f"{model_dir} has no {name!r}; it holds {sorted(index['components'])}.")
    config, params = store.load_component(model_dir, name)
    out[name] = (CODECS[name]()["build"](config, **module_kwargs), params)
  return out


def import_diffusers(directory, out, *, variant: str | None = None, allow_pickle: bool = False) -> dict[str, str]:
  """Imports every network found in a diffusers Stable Diffusion directory. Returns {component: kind}."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is not a directory (expected a diffusers Stable Diffusion directory with "
                            "unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
  present = [name for name in CODECS if (directory / name / "config.json").exists()]
  if not present:
    raise FileNotFoundError(f"{directory} has none of unet/, vae/, text_encoder/ with a config.json.")
  out = _check_out(out)
  imported: dict[str, str] = {}
  for name in present:
    codec = CODECS[name]()
    module, params = codec["load_dir"](directory / name, variant=variant, allow_pickle=allow_pickle)
    store.save_component(out, name, codec["to_config"](module), params)
    imported[name] = codec["kind"]
    logging.info("Imported %s (%s, %d arrays).", name, codec["kind"], len(common.flatten(params)))
  for extra in ("tokenizer", "scheduler"):
    if (directory / extra).is_dir():
      _copy_dir(directory / extra, out / extra)
  store.write_index(out, imported, source=str(directory))
  return imported


def export_diffusers(model_dir, out) -> list[str]:
  """Writes an sd_jax model directory in the diffusers layout (safetensors + config.json per component)."""
  model_dir = epath.Path(model_dir)
  index = store.read_index(model_dir)
  out = epath.Path(out)
  if (out / "model_index.json").exists():
    raise FileExistsError(f"{out} already holds a diffusers model; choose a new --out (nothing was overwritten).")
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name in index["components"]:
    codec = CODECS[name]()
    config, params = store.load_component(model_dir, name)
    module = codec["build"](config)
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: np.asarray(v, np.float32) for k, v in codec["to_state_dict"](module, params).items()}
    common.save_state_dict(tensors, out / name / codec["file"])
    written.append(name)
  for extra in ("tokenizer", "scheduler"):
    if (model_dir / extra).is_dir():
      _copy_dir(model_dir / extra, out / extra)
  unet_class = json.loads((out / "unet" / "config.json").read_text())["_class_name"] if "unet" in written else ""
  classes = {"unet": ["diffusers", unet_class], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
  pipeline_class = "StableDiffusionPipeline" if "text_encoder" in written else "DDPMPipeline"
  model_index = {"_class_name": pipeline_class, "_diffusers_version": "0.30.0"}
  model_index.update({name: classes[name] for name in (*written, "tokenizer", "scheduler")
                      if (out / name).is_dir()})
  (out / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True))
  return written
def detect_single_file(state: dict[str, np.ndarray]) -> str:
  """'sd1' or 'sd2' from the tensors of an original single-file checkpoint."""
  if LDM_UNET_PREFIX + "input_blocks.0.0.weight" not in state:
    raise ValueError(f"not an original Stable Diffusion checkpoint: no '{LDM_UNET_PREFIX}*' U-Net tensors.")
  if _SD2_PROBE in state and state[_SD2_PROBE].shape[-1] == 1024:
    return "sd2"
  return "sd1"


def import_single_file(path, out, *, image_size: int | None = None, prediction_type: str | None = None,
                       allow_pickle: bool = False, unet_config: dict | None = None, vae_config: dict | None = None,
                       text_config: Any = None, family: str | None = None) -> dict[str, str]:
  """Imports an original single-file SD 1.x/2.x checkpoint (U-Net + VAE + text tower).

  The file does not say whether an SD 2.x model is the 512² epsilon or the 768² v-prediction one: pass
  `image_size=768, prediction_type="v_prediction"` for SD 2.x-768 (written into scheduler/scheduler_config.json).
  `unet_config` / `vae_config` / `text_config` replace the SD presets for checkpoints of other sizes, and
  `family` ("sd1" | "sd2") overrides the detection, which looks for SD 2's 1024-wide text context.
  """
  from sd_jax.models import clip as clip_models
  from sd_jax.models import unet as unet_models
  from sd_jax.models import vae as vae_models
  from sd_jax.weights import clip as clip_weights
  from sd_jax.weights import unet as unet_weights
  from sd_jax.weights import vae as vae_weights

  state = common.load_state_dict(path, allow_pickle=allow_pickle)
  detected = detect_single_file(state)
  family = family or detected
  if family not in ("sd1", "sd2"):
    raise ValueError(f"family={family!r}: use 'sd1' or 'sd2'.")
  out = _check_out(out)
  if family == "sd1":
    unet_fields = unet_config or unet_models.unet_config("sd15")
    text_fields = text_config or clip_models.clip_config("openai_vit_l14_text")
    text_params = clip_weights.clip_text_from_ldm(state, text_fields)
  else:
    unet_fields = unet_config or unet_models.unet_config("sd21_v" if (image_size or 512) >= 768 else "sd21_base")
    text_fields = text_config or clip_models.clip_config("openclip_vit_h14_text")
    text_params = clip_weights.clip_text_from_open_clip(state, text_fields)
  vae_fields = vae_config or vae_models.vae_config("sd")
  unet_params = unet_weights.unet_from_ldm_state_dict(common.strip_prefix(state, LDM_UNET_PREFIX), unet_fields)
  vae_params = vae_weights.vae_from_ldm_state_dict(common.strip_prefix(state, LDM_VAE_PREFIX), vae_fields)
  _save(out, "unet", unet_models.create_unet(unet_fields), unet_params)
  _save(out, "vae", vae_models.create_vae(vae_fields), vae_params)
  _save(out, "text_encoder", clip_models.create_clip_text_model(text_fields), text_params)
  scheduler = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
               "steps_offset": 1,
               "prediction_type": prediction_type or ("v_prediction" if (image_size or 512) >= 768 else "epsilon")}
  (out / "scheduler").mkdir(exist_ok=True)
  (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
  kinds = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
  store.write_index(out, kinds, source=str(path))
  return kinds


# ---------------------------------------------------------------------------------------------------------------
# Adapters: LoRA files merged into a model, textual-inversion tokens added to it.

_TOKEN_TABLE = ("embeddings", "token_embedding", "embedding")  # the CLIP text tower's token embedding table


def add_embeddings(tokenizer, text, text_params, embeddings: dict[str, Any]) -> tuple[Any, Any, dict[str, str]]:
  """Adds textual-inversion tokens: to `tokenizer` (in place) and as rows of the text tower's embedding table.

  `embeddings`: {token: [n_vectors, dim]} (sd_jax/weights/lora.py `load_embeddings`). A token of n > 1 vectors
  becomes n tokens (token, token_1, ...), which a prompt's `token` stands for, as diffusers does. Tokens are
  lowercased (prompts are). Returns (the text module with the larger vocabulary, its params, {token: its tokens}).
  """
  import dataclasses  # pylint: disable=import-outside-toplevel
  table = text_params
  for key in _TOKEN_TABLE:
    table = table[key]
  table = np.asarray(table)
  expansions = {}
  for token, rows in embeddings.items():
    rows = np.asarray(rows, table.dtype)
    rows = rows.reshape(-1, table.shape[1]) if rows.ndim == 1 and rows.size % table.shape[1] == 0 else rows
    if rows.ndim != 2 or rows.shape[1] != table.shape[1]:
      raise ValueError(f"the embedding of {token!r} has shape {rows.shape}, but the text tower's tokens are "
                       f"{table.shape[1]}-wide: it was made for another text encoder.")
    token = token.lower()
    names = [token] + [f"{token}_{i}" for i in range(1, len(rows))]
    ids = tokenizer.add_tokens(names)
    if ids != list(range(len(table), len(table) + len(ids))):
      raise ValueError(f"the tokenizer gives {token!r} the ids {ids}, but the text tower embeds {len(table)} tokens: "
                       "the model's tokenizer and text tower do not match.")
    table = np.concatenate([table, rows])
    if len(names) > 1:
      expansions[token] = " ".join(names)
  params = dict(text_params)
  node = params
  for key in _TOKEN_TABLE[:-1]:
    node[key] = dict(node[key])
    node = node[key]
  node[_TOKEN_TABLE[-1]] = table
  text = text.clone(config=dataclasses.replace(text.config, vocab_size=len(table)))
  return text, params, expansions


def merge_adapters(model, out, *, loras: list[tuple[str, float]] = (), embeddings: list[str] = (),
                   allow_pickle: bool = False) -> list[str]:
  """A new sd_jax model directory `out`: `model` (anything `resolve_model` takes) with LoRA files merged into its
  U-Net and text tower, each at its scale × the file's own alpha / rank, and textual-inversion tokens added to its
  tokenizer and text tower. `model` is not modified. Returns the components written."""
  import jax  # pylint: disable=import-outside-toplevel
  from sd_jax import lora as lora_lib  # pylint: disable=import-outside-toplevel
  from sd_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from sd_jax.weights import lora as lora_weights  # pylint: disable=import-outside-toplevel
  base = resolve_model(model, what="--base", allow_pickle=allow_pickle)
  index = store.read_index(base)
  if "unet" not in index["components"]:
    raise ValueError(f"--base {model}: {base} has no U-Net to merge a LoRA into.")
  out = _check_out(out)
  nets = load_model(base, [c for c in ("unet", "text_encoder") if c in index["components"]])
  unet, unet_params = nets["unet"]
  text, text_params = nets.get("text_encoder", (None, None))
  merge = jax.jit(lora_lib.merge)
  for path, scale in loras:
    adapters = lora_weights.load(path, unet_params, text_params, allow_pickle=allow_pickle)
    unet_params = jax.device_get(merge(unet_params, adapters["unet"], scale))
    if "text_encoder" in adapters:
      text_params = jax.device_get(merge(text_params, adapters["text_encoder"], scale))
  if (base / "tokenizer").is_dir():
    _copy_dir(base / "tokenizer", out / "tokenizer")
  if embeddings:
    if text is None or not (out / "tokenizer" / "vocab.json").exists():
      raise ValueError(f"--base {model}: textual-inversion embeddings need a text tower and its tokenizer.")
    tokenizer = tokenizer_lib.load_clip_tokenizer(str(out / "tokenizer"))
    for path in embeddings:
      text, text_params, expansions = add_embeddings(tokenizer, text, text_params,
                                                     lora_weights.load_embeddings(path, allow_pickle=allow_pickle))
      if expansions:
        logging.warning("%s: multi-vector tokens %s; write each token once in a prompt (sample expands it).", path,
                        sorted(expansions))
    tokenizer.save_added_tokens(str(out / "tokenizer"))
  _save(out, "unet", unet, unet_params)
  written = ["unet"]
  if text is not None:
    _save(out, "text_encoder", text, text_params)
    written.append("text_encoder")
  for name in ("vae", "scheduler"):
    if (base / name).is_dir():
      _copy_dir(base / name, out / name)
  written += ["vae"] if "vae" in index["components"] else []
  kinds = {name: index["components"][name] for name in written}
  store.write_index(out, kinds, source=f"{base} + LoRA {[p for p, _ in loras]} + embeddings {list(embeddings)}",
                    text_clip_skip=store.read_clip_skip(base))
  return written
