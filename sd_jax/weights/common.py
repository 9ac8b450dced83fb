"""What every weight converter shares: reading/writing safetensors, layout changes, key diffs.

Converters (unet.py, vae.py, clip.py, ...) map PyTorch names to sd_jax param paths. Param paths are '/'-joined
Flax names (`down_blocks_0/resnets_0/conv1/kernel`); PyTorch names are '.'-joined
(`down_blocks.0.resnets.0.conv1.weight`).

Layouts: PyTorch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]; linear weight [out, in] -> kernel
[in, out]; norm weight -> scale; embedding weight -> embedding.

Only safetensors are read by default: .bin/.ckpt/.pt files are pickles, and unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import numpy as np
from etils import epath

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class WeightsMismatchError(ValueError):
  """Converted weights do not fit the model: the message lists every missing, unexpected and mis-shaped key."""


# ---------------------------------------------------------------------------------------------------------------
# Files


def pickle_refusal(path) -> str:
  return (f"{path} is a pickle-based PyTorch file; loading it can run arbitrary code, so sd_jax reads safetensors "
          "only. Convert it once in an environment you trust, e.g.\n"
          "  python -c \"import torch, safetensors.torch as st; sd = torch.load('IN', map_location='cpu', "
          "weights_only=True); sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous() for k, v in "
          "sd.items() if hasattr(v, 'contiguous')}, 'OUT.safetensors')\"\n"
          "or pass --allow_pickle (allow_pickle=True) for a file you trust.")


def find_weights(directory, stem: str, *, variant: str | None = None, allow_pickle: bool = False) -> epath.Path:
  """The weights file of a diffusers/transformers component directory.

  Looks for `{stem}[.{variant}].safetensors`, then a sharded `{stem}[.{variant}].safetensors.index.json`, then
  (only with allow_pickle) `.bin`. `stem` is `diffusion_pytorch_model` (diffusers) or `model` (transformers).
  """
  directory = epath.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is not a directory.")
  names = [f"{stem}.{variant}" if variant else stem]
  if variant is None:
    names.append(f"{stem}.fp16")  # fp16-only uploads
  for name in names:
    for candidate in (directory / f"{name}.safetensors", directory / f"{name}.safetensors.index.json"):
      if candidate.exists():
        return candidate
  for name in names:
    for suffix in (".bin", ".bin.index.json"):
      candidate = directory / f"{name}{suffix}"
      if candidate.exists():
        if not allow_pickle:
          raise ValueError(pickle_refusal(candidate))
        return candidate
  present = sorted(p.name for p in directory.iterdir())
  raise FileNotFoundError(f"no {stem}*.safetensors in {directory} (found: {present}).")


def load_state_dict(path, *, allow_pickle: bool = False, dtype=np.float32) -> dict[str, np.ndarray]:
  """Reads a safetensors file or a sharded `*.safetensors.index.json` into numpy arrays (cast to `dtype`)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist.")
  name = path.name
  if name.endswith(".index.json"):
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    out: dict[str, np.ndarray] = {}
    for shard in shards:
      out.update(load_state_dict(path.parent / shard, allow_pickle=allow_pickle, dtype=dtype))
    missing = sorted(set(index["weight_map"]) - set(out))
    if missing:
      raise ValueError(f"{path}: tensors listed in the index but absent from the shards: {missing[:20]}")
    return out
  if name.endswith(".safetensors"):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      try:
        arrays = load_file(str(path))
      except (TypeError, ValueError):
        arrays = _load_safetensors_via_torch(path)  # bfloat16 tensors have no numpy dtype
    except SafetensorError as e:  # truncated or not a safetensors file at all
      raise ValueError(f"{path} is not a readable safetensors file ({e}; {path.stat().length} bytes): it may be "
                       "truncated (an interrupted download or copy). Copy it again.") from e
    return {k: np.asarray(v, dtype=dtype) if dtype is not None else v for k, v in arrays.items()}
  if name.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise ValueError(pickle_refusal(path))
    import torch  # only for trusted pickle files, by explicit request
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy().astype(dtype) for k, v in state.items() if hasattr(v, "numpy")}
  raise ValueError(f"{path}: unknown weights format (expected .safetensors or .safetensors.index.json).")


def _load_safetensors_via_torch(path) -> dict[str, np.ndarray]:
  try:
    from safetensors.torch import load_file
  except ImportError as e:
    raise ValueError(f"{path} holds bfloat16 tensors; reading them needs torch (pip install torch).") from e
  return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def save_state_dict(tensors: Mapping[str, np.ndarray], path, *, metadata: dict[str, str] | None = None) -> None:
  from safetensors.numpy import save_file
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  # np.asarray(order="C"), not ascontiguousarray: the latter turns 0-d tensors (logit_scale) into shape (1,).
  save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def conv_to_flax(w: np.ndarray) -> np.ndarray:
  """PyTorch [O, I, kh, kw] -> Flax [kh, kw, I, O]."""
  return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
  return np.transpose(k, (3, 2, 0, 1))


def linear_to_flax(w: np.ndarray) -> np.ndarray:
  """PyTorch [out, in] -> Flax [in, out]."""
  return np.transpose(w)


def linear_to_torch(k: np.ndarray) -> np.ndarray:
  return np.transpose(k)


def torch_param_to_flax(torch_key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Generic rename + layout for one tensor, by its suffix and rank (conv vs linear vs norm/bias).

  `foo.weight` of rank 4 -> `foo/kernel` (HWIO); rank 2 -> `foo/kernel` (transposed); rank 1 -> `foo/scale`
  (norms); `foo.bias` -> `foo/bias`. Embeddings and other special cases are handled by the caller.
  """
  base, _, leaf = torch_key.rpartition(".")
  path = base.replace(".", "/")
  if leaf == "bias":
    return f"{path}/bias", value
  if leaf == "weight":
    if value.ndim == 4:
      return f"{path}/kernel", conv_to_flax(value)
    if value.ndim == 2:
      return f"{path}/kernel", linear_to_flax(value)
    if value.ndim == 1:
      return f"{path}/scale", value
  raise ValueError(f"cannot convert {torch_key} with shape {value.shape}: no rule for it.")


# ---------------------------------------------------------------------------------------------------------------
# Trees and diffs


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def diff_report(expected: Mapping[str, Any], got: Mapping[str, Any], *, what: str, limit: int = 40) -> str:
  """'' when `got` has exactly the keys and shapes of `expected` (flat dicts of arrays or ShapeDtypeStructs)."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  misshaped = sorted(f"{k}: model {tuple(expected[k].shape)} vs weights {tuple(np.shape(got[k]))}"
                     for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(np.shape(got[k])))
  if not (missing or unexpected or misshaped):
    return ""
  lines = [f"{what} do not match the model:"]
  for title, keys in (("missing from the weights", missing), ("unexpected in the weights", unexpected),
                      ("wrong shape", misshaped)):
    if keys:
      lines.append(f"  {title} ({len(keys)}):")
      lines.extend(f"    {k}" for k in keys[:limit])
      if len(keys) > limit:
        lines.append(f"    ... and {len(keys) - limit} more")
  return "\n".join(lines)


def check_params(expected_abstract: Mapping[str, Any], converted_flat: Mapping[str, np.ndarray], *,
                 what: str) -> dict[str, Any]:
  """Nested params from converted flat weights, or WeightsMismatchError naming every bad key."""
  expected = flatten(expected_abstract)
  report = diff_report(expected, converted_flat, what=what)
  if report:
    raise WeightsMismatchError(report)
  return unflatten({k: np.asarray(v, dtype=expected[k].dtype) for k, v in converted_flat.items()})


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def only_keys(state: Mapping[str, np.ndarray], ignore: Iterable[str]) -> dict[str, np.ndarray]:
  """Drops buffers that carry no learned weights (e.g. `position_ids`)."""
  ignore = tuple(ignore)
  return {k: v for k, v in state.items() if not k.endswith(ignore)}
