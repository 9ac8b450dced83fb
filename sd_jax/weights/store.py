"""The sd_jax model directory: where imported or converted weights live.

  OUT/
    sd_jax_model.json        which components are present, and where they came from
    unet/config.json         the sd_jax module's fields (e.g. UNet2DConditionModel)
    unet/params/             orbax checkpoint of {"params": ...}
    vae/...  text_encoder/...  (same layout)
    tokenizer/               copied as-is (vocab.json, merges.txt, ...)
    scheduler/               copied as-is (scheduler_config.json)

A component directory works as `config.init_from` (params only) for fine-tuning, because its `params/` is an
orbax checkpoint with a `params` subtree, like a training checkpoint's `state/`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

INDEX_FILE = "sd_jax_model.json"


def _path(directory) -> epath.Path:
  """Absolute local paths (orbax requires them); URLs are kept."""
  directory = str(directory)
  return epath.Path(directory if "://" in directory else os.path.abspath(os.path.expanduser(directory)))


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if hasattr(value, "dtype") and not isinstance(value, np.ndarray):  # jnp dtypes
    return str(np.dtype(value))
  if isinstance(value, type) or "dtype" in type(value).__name__.lower():
    return str(np.dtype(value))
  return value


def remove_tree(path) -> None:
  """Deletes a directory tree, local or on an object store (gs://...)."""
  epath.Path(path).rmtree()


def copy_tree(src, dst) -> None:
  """Copies a directory tree file by file through etils.epath, so either side may be local or gs://..."""
  src, dst = epath.Path(src), epath.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      copy_tree(child, dst / child.name)
    else:
      child.copy(dst / child.name, overwrite=True)


def save_component(out_dir, name: str, config_fields: dict[str, Any], params: Any, *, overwrite: bool = False) -> None:
  """Writes `out_dir/name/{config.json,params/}`. Refuses to replace an existing component unless `overwrite`."""
  component = _path(out_dir) / name
  if (component / "params").exists():
    if not overwrite:
      raise FileExistsError(f"{component} already holds weights; choose another --out or remove it first.")
    remove_tree(component / "params")
  component.mkdir(parents=True, exist_ok=True)
  (component / "config.json").write_text(json.dumps(_jsonable(dict(config_fields)), indent=2, sort_keys=True))
  ocp.PyTreeCheckpointer().save(str(component / "params"), {"params": jax.tree.map(np.asarray, params)})


def load_component(model_dir, name: str, *, shardings: Any = None) -> tuple[dict[str, Any], Any]:
  """(config fields, params) of a component; params on `shardings` if given, else host numpy arrays."""
  component = _path(model_dir) / name
  if not (component / "config.json").exists():
    present = sorted(p.name for p in epath.Path(model_dir).iterdir()) if epath.Path(model_dir).exists() else []
    raise FileNotFoundError(f"{component} is not an sd_jax model component (no config.json). "
                            f"{model_dir} holds: {present}")
  config_fields = json.loads((component / "config.json").read_text())
  checkpointer = ocp.PyTreeCheckpointer()
  if shardings is None:
    metadata = checkpointer.metadata(str(component / "params")).item_metadata
    metadata = getattr(metadata, "tree", metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  else:
    restore_args = {"params": jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)}
  restored = checkpointer.restore(str(component / "params"), args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return config_fields, restored["params"]


def write_index(out_dir, components: dict[str, str], source: str, text_clip_skip: int | None = None) -> None:
  """`components`: name -> module kind (e.g. {"unet": "UNet2DConditionModel"}). `text_clip_skip`: the text tower
  layer the U-Net was trained on (0 = the last; k = layer N - k, final-normed), read back by `read_clip_skip`."""
  path = epath.Path(out_dir) / INDEX_FILE
  index = json.loads(path.read_text()) if path.exists() else {"components": {}}
  index["components"].update(components)
  index["source"] = source
  if text_clip_skip is not None:
    index["text_clip_skip"] = int(text_clip_skip)
  path.write_text(json.dumps(index, indent=2, sort_keys=True))


def read_clip_skip(model_dir) -> int:
  """The text layer the model directory's U-Net was trained on (0 = the last; see `write_index`)."""
  return int(read_index(model_dir).get("text_clip_skip", 0))


def read_index(model_dir) -> dict[str, Any]:
  path = epath.Path(model_dir) / INDEX_FILE
  if not path.exists():
    raise FileNotFoundError(f"{model_dir} is not an sd_jax model directory (no {INDEX_FILE}); "
                            "create one with `python -m sd_jax.convert --from_diffusers DIR --out OUT`.")
  return json.loads(path.read_text())
