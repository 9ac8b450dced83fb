"""LoRA adapters for any Flax model built from `nn.Dense` / `nn.Conv` (the U-Net, the CLIP text tower).

A LoRA is params of its own: `{module_path: {"down": ..., "up": ...}}`, keyed by the '/'-joined path of the
adapted module in the model's params tree (`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q`). The
base params are never modified; the model modules are not changed either: `applied` intercepts the adapted
modules' calls (`flax.linen.intercept_methods`), so the same function serves training, sampling and export.

    spec = LoraSpec(rank=4, targets=UNET_TARGETS["attention"])
    adapters = lora.init(rng, unet_params, spec)                 # up = 0: the model is unchanged at step 0
    with lora.applied(adapters, spec.scale):                      # inside the traced function
      noise_pred = unet.apply({"params": unet_params}, latents, t, context)
    merged = lora.merge(unet_params, adapters, spec.scale)       # the same model as one params tree

Every adapted module computes `base(x) + scale * up(down(dropout(x)))` (PEFT's order). Layouts:
  Dense (kernel [in, out]):            down [in, r],          up [r, out]
  Conv  (kernel [kh, kw, in, out]):    down [kh, kw, in, r]   (same strides / padding / dilation as the base),
                                       up [1, 1, r, out]      (a 1x1 conv)
Adapters are float32; the low-rank product is computed in the base module's output dtype.

Paths are relative to the module that `apply` is called on: adapters made from a U-Net's params apply to that
U-Net's `apply`, not to a module that holds the U-Net under another name. Files: sd_jax/weights/lora.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from flax import traverse_util

Adapters = dict[str, dict[str, Any]]  # module path -> {"down": array, "up": array}

_ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")
_TRANSFORMER = _ATTENTION + ("proj_in", "proj_out", "ff/net_0/proj", "ff/net_2")
# Target presets: module names (suffixes of module paths) of sd_jax.models.unet / sd_jax.models.clip.
UNET_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": _ATTENTION,  # diffusers' train_dreambooth_lora.py
    "transformer": _TRANSFORMER,
    "resnet": _TRANSFORMER + ("conv1", "conv2", "conv_shortcut"),
}
TEXT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What to adapt and how: `rank` r, `alpha` (None = r; the output is scaled by `scale` = alpha / r), dropout
  on the adapter's input (training only), and `targets`, module names matched as '/'-separated suffixes of module
  paths (UNET_TARGETS[...], TEXT_TARGETS, or your own such as ("attn2/to_k", "attn2/to_v"))."""

  rank: int = 4
  alpha: float | None = None
  dropout: float = 0.0
  targets: tuple[str, ...] = UNET_TARGETS["attention"]

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
    if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                                       and self.alpha > 0):
      raise ValueError(f"LoRA alpha must be a finite number > 0 (or None for alpha = rank), got {self.alpha!r}")
    if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
    if isinstance(self.targets, str):
      raise ValueError(f"LoRA targets must be a tuple of module names, got the string {self.targets!r}; "
                       f"write ({self.targets!r},) or use a preset: UNET_TARGETS {sorted(UNET_TARGETS)}, TEXT_TARGETS")
    targets = tuple(self.targets)
    if not targets or not all(isinstance(t, str) and t.strip("/") for t in targets):
      raise ValueError(f"LoRA targets must be a non-empty tuple of module names, got {self.targets!r}")
    object.__setattr__(self, "targets", targets)

  @property
  def scale(self) -> float:
    """alpha / rank: the factor on the adapter's output."""
    return (self.rank if self.alpha is None else self.alpha) / self.rank


# ---------------------------------------------------------------------------------------------------------------
# Params


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  params = nn.unbox(params)
  if set(params) == {"params"}:  # a whole variables dict
    params = params["params"]
  return params


def kernels(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{module path: kernel shape} of every module with a 2-D (Dense) or 4-D (Conv) `kernel` (arrays, abstract
  ShapeDtypeStructs or boxed params; a `{"params": ...}` variables dict is unwrapped)."""
  flat = traverse_util.flatten_dict(_unwrap(params), sep="/")
  out = {}
  for key, value in flat.items():
    module, _, leaf = key.rpartition("/")
    if leaf == "kernel" and len(value.shape) in (2, 4):
      out[module] = tuple(value.shape)
  return out


def _matches(path: str, target: str) -> bool:
  parts, suffix = path.split("/"), target.strip("/").split("/")
  return parts[-len(suffix):] == suffix


def find_targets(params: Mapping[str, Any], targets: Sequence[str]) -> list[str]:
  """The module paths (sorted) whose module has a Dense or Conv kernel and whose path ends with one of `targets`
  ('/'-separated suffix match: "to_q", "ff/net_2", "attn2/to_k"). Raises ValueError naming the targets that match
  nothing."""
  if isinstance(targets, str):
    targets = (targets,)
  shapes = kernels(params)
  found, unmatched = set(), []
  for target in targets:
    hits = [p for p in shapes if _matches(p, target)]
    if not hits:
      unmatched.append(target)
    found.update(hits)
  if unmatched:
    examples = sorted(shapes)[:8]
    raise ValueError(f"LoRA targets {unmatched} match no Dense/Conv module of this model (module paths look like "
                     f"{examples}{' ...' if len(shapes) > 8 else ''})")
  return sorted(found)


def adapter_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(down shape, up shape) for a base kernel: Dense [in, out] -> [in, r], [r, out]; Conv [kh, kw, in, out] ->
  [kh, kw, in, r], [1, 1, r, out]."""
  if len(kernel_shape) == 2:
    d_in, d_out = kernel_shape
    return (d_in, rank), (rank, d_out)
  if len(kernel_shape) == 4:
    kh, kw, d_in, d_out = kernel_shape
    return (kh, kw, d_in, rank), (1, 1, rank, d_out)
  raise ValueError(f"LoRA needs a Dense (2-D) or Conv (4-D) kernel, got shape {tuple(kernel_shape)}")


def rank_of(adapter: Mapping[str, Any]) -> int:
  """The rank r of one module's adapter (the last axis of `down`)."""
  return int(adapter["down"].shape[-1])


def check(params: Mapping[str, Any], adapters: Mapping[str, Mapping[str, Any]], *, what: str = "LoRA") -> None:
  """Raises ValueError naming every adapter whose module is not in `params` (or has no Dense/Conv kernel) and
  every adapter whose down/up shapes do not fit its module's kernel."""
  shapes = kernels(params)
  missing, misshaped = [], []
  for path, adapter in adapters.items():
    if set(adapter) != {"down", "up"}:
      misshaped.append(f"{path}: has {sorted(adapter)}, expected down and up")
      continue
    if path not in shapes:
      missing.append(path)
      continue
    want = adapter_shapes(shapes[path], rank_of(adapter))
    got = (tuple(adapter["down"].shape), tuple(adapter["up"].shape))
    if got != want:
      misshaped.append(f"{path}: kernel {shapes[path]} needs down {want[0]} and up {want[1]}, got down {got[0]} "
                       f"and up {got[1]}")
  if missing or misshaped:
    lines = [f"{what} does not fit this model:"]
    if missing:
      lines.append(f"  modules missing from the model ({len(missing)}):")
      lines.extend(f"    {p}" for p in sorted(missing)[:40])
    if misshaped:
      lines.append(f"  wrong shapes ({len(misshaped)}):")
      lines.extend(f"    {m}" for m in sorted(misshaped)[:40])
    raise ValueError("\n".join(lines))


def init(rng: jax.Array, params: Mapping[str, Any], spec: LoraSpec) -> Adapters:
  """Fresh adapters for every module of `params` that `spec.targets` selects (float32).

  down ~ N(0, (1/r)^2) (PEFT's init_lora_weights="gaussian", as diffusers' train_dreambooth_lora.py), up = 0, so
  the adapted model equals the base model until the first update. Jittable (shapes come from `params`, which may
  be abstract).
  """
  paths = find_targets(params, spec.targets)
  shapes = kernels(params)
  pairs = tuple(adapter_shapes(shapes[p], spec.rank) for p in paths)
  # One draw for all modules, cut into the down kernels in a separate program: compiled together, XLA fuses the
  # generator into every piece, which makes init slow to compile.
  flat = jax.random.normal(rng, (sum(math.prod(down) for down, _ in pairs),), jnp.float32)
  downs, ups = _cut(flat, pairs, spec.rank)
  return {p: {"down": d, "up": u} for p, d, u in zip(paths, downs, ups)}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _cut(flat: jax.Array, pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...], rank: int):
  """(downs: `flat` / rank cut into the down shapes, ups: zeros) for ((down shape, up shape), ...)."""
  offsets = list(itertools.accumulate(math.prod(down) for down, _ in pairs))[:-1]
  pieces = jnp.split(flat / rank, offsets) if pairs else []
  downs = [piece.reshape(down) for piece, (down, _) in zip(pieces, pairs)]
  return downs, [jnp.zeros(up, jnp.float32) for _, up in pairs]


def abstract(params: Mapping[str, Any], spec: LoraSpec) -> Adapters:
  """What `init` returns, as ShapeDtypeStructs (for sharded init with jax.eval_shape / out_shardings)."""
  shapes = kernels(params)
  out = {}
  for path in find_targets(params, spec.targets):
    down_shape, up_shape = adapter_shapes(shapes[path], spec.rank)
    out[path] = {"down": jax.ShapeDtypeStruct(down_shape, jnp.float32),
                 "up": jax.ShapeDtypeStruct(up_shape, jnp.float32)}
  return out


def num_params(adapters: Mapping[str, Mapping[str, Any]]) -> int:
  """Total number of adapter weights."""
  return sum(math.prod(a["down"].shape) + math.prod(a["up"].shape) for a in adapters.values())


# ---------------------------------------------------------------------------------------------------------------
# Applying and merging


def delta_kernel(adapter: Mapping[str, Any]) -> jax.Array:
  """The adapter as one kernel of the base module's shape (unscaled): Dense down @ up [in, out]; Conv the k x k
  down conv followed by the 1x1 up conv, [kh, kw, in, out]."""
  down, up = adapter["down"], adapter["up"]
  if down.ndim == 2:
    return jnp.matmul(down, up, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("hwir,ro->hwio", down, up[0, 0], precision=jax.lax.Precision.HIGHEST)


def _low_rank(module: nn.Module, adapter: Mapping[str, Any], x: jax.Array, dtype) -> jax.Array:
  """up(down(x)) for a Dense or Conv `module`, computed in `dtype`."""
  down, up = adapter["down"].astype(dtype), adapter["up"].astype(dtype)
  x = x.astype(dtype)
  precision = getattr(module, "precision", None)
  if isinstance(module, nn.Conv):
    # The base conv's own geometry (kernel size, strides, padding, dilation) with r output channels.
    conv = module.clone(parent=None, name=None, features=down.shape[-1], use_bias=False, dtype=dtype,
                        param_dtype=dtype)
    h = conv.apply({"params": {"kernel": down}}, x)
    return jnp.matmul(h, up[0, 0], precision=precision)
  return jnp.matmul(jnp.matmul(x, down, precision=precision), up, precision=precision)


@contextlib.contextmanager
def applied(adapters: Mapping[str, Mapping[str, Any]], scale: float | jax.Array = 1.0, *, dropout: float = 0.0,
            rng: jax.Array | None = None) -> Iterator[None]:
  """Within this context every call of an adapted module (its path is a key of `adapters`) returns
  `base(x) + scale * up(down(dropout(x)))`.

  The interception happens while tracing: use the context inside the jitted function, around `model.apply(...)`
  (a function jitted outside it and cached is not re-traced, so it runs without the adapters). It works under
  jit, grad, nn.remat and with sharded params. Contexts nest: each adds its own adapters (several LoRAs at once).
  `scale` may be a traced value. `dropout` > 0 needs `rng` (each module derives its own key from it and its path).
  Logs a warning when modules ran in the context but none of them was adapted (adapters made for another model,
  or a model applied under another root than the params the adapters were made from).
  """
  if not 0 <= dropout < 1:
    raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
  if dropout > 0 and rng is None:
    raise ValueError("LoRA dropout > 0 needs an rng")
  seen: list[str] = []  # paths of the Dense/Conv modules called (at most a few kept, for the warning)
  hits = 0

  def interceptor(next_fun, args, kwargs, context):
    nonlocal hits
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
      return out
    path = "/".join(module.path)
    adapter = adapters.get(path)
    if adapter is None:
      if path and len(seen) < 3:  # (the unbound down conv of _low_rank has no path)
        seen.append(path)
      return out
    hits += 1
    x = args[0] if args else kwargs["inputs"]
    if dropout > 0:
      key = jax.random.fold_in(rng, zlib.crc32(path.encode()))
      keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    delta = _low_rank(module, adapter, x, out.dtype)
    return out + (jnp.asarray(scale, out.dtype) * delta).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield
  if adapters and seen and not hits:
    logging.warning("lora.applied: none of the %d adapters (paths like %s) matched a module called in this "
                    "context (paths like %s): no LoRA was applied", len(adapters), next(iter(adapters)), seen)


def merge(params: Mapping[str, Any], adapters: Mapping[str, Mapping[str, Any]],
          scale: float | jax.Array = 1.0) -> dict[str, Any]:
  """A new params tree in which each adapted kernel is `kernel + scale * delta_kernel(adapter)` (in the kernel's
  dtype); everything else is shared with `params`. Pure and jittable; the result applied without adapters equals
  `applied(adapters, scale)` to float rounding. Boxed (logically partitioned) params keep their boxes, a
  `{"params": ...}` variables dict its wrapper. Raises ValueError when the adapters do not fit."""
  if set(params) == {"params"}:
    return {"params": merge(params["params"], adapters, scale)}
  check(params, adapters)
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  new_kernels = _merged_kernels({p: flat[f"{p}/kernel"] for p in adapters}, dict(adapters), scale)

  def visit(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for name, value in tree.items():
      path = f"{prefix}/{name}" if prefix else name
      if isinstance(value, Mapping):
        out[name] = visit(value, path)
      elif name == "kernel" and prefix in adapters:
        new = new_kernels[prefix]
        out[name] = value.replace_boxed(new) if isinstance(value, nn.meta.AxisMetadata) else new
      else:
        out[name] = value
    return out

  return visit(params, "")


@jax.jit
def _merged_kernels(kernels_by_path, adapters, scale):
  return {p: (k + scale * delta_kernel(adapters[p])).astype(k.dtype) for p, k in kernels_by_path.items()}
