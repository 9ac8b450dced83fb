"""The Inception-v3 network of FID (Heusel et al. 2017), in Flax Linen, with pytorch-fid's weights.

FID compares the statistics of 2048-d "pool3" features of one specific network: the TensorFlow Inception-v3 graph
`inception-2015-12-05` that TTUR's original FID code used. pytorch-fid ported that graph to PyTorch as
`fid_inception_v3()` (torchvision's Inception3 with the Mixed blocks swapped for FIDInceptionA/C/E_1/E_2) and
its weights as `pt_inception-2015-12-05-6726825d.pth`. This module is that network, layer for layer, so that the
same weights give the same features (and FIDs comparable with pytorch-fid's):

  input [N, H, W, 3] in [0, 1] -> bilinear resize to 299×299 (align_corners=False, no antialiasing, as
  F.interpolate) -> 2x - 1 -> stem: Conv2d_1a_3x3 (stride 2), Conv2d_2a_3x3, Conv2d_2b_3x3, max-pool 3/2,
  Conv2d_3b_1x1, Conv2d_4a_3x3, max-pool 3/2 -> Mixed_5b..5d (A) -> Mixed_6a (B) -> Mixed_6b..6e (C) ->
  Mixed_7a (D) -> Mixed_7b (E, avg-pool branch) -> Mixed_7c (E, max-pool branch) -> global average -> [N, 2048].

Every conv is torchvision's BasicConv2d: conv without bias -> BatchNorm (running statistics, eps 0.001) -> ReLU.
What makes the FID variant differ from torchvision's ImageNet Inception: the 3×3 average pools of the A, C and E
branches do not count the zero padding (TensorFlow's `AVG` pool; count_include_pad=False), and Mixed_7c's pool
branch is a 3×3 max pool (a quirk of the 2015 graph). Features of an image batch do not depend on each other
(BatchNorm uses its stored statistics), so batches can be padded and split freely.

    model, variables = load_inception("pt_inception-2015-12-05-6726825d.pth")   # nothing is downloaded
    features = jax.jit(model.apply)(variables, images)                        # [N, 2048], images in [0, 1]

Params mirror torchvision's module names (`Mixed_6b/branch7x7_2/conv/kernel`, `.../bn/{scale,bias}`; running
statistics in the `batch_stats` collection as `.../bn/{mean,var}`), so `inception_from_torch` is a rename plus the
conv layout change. The weights file: https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
pt_inception-2015-12-05-6726825d.pth (the name's 6726825d is the start of its SHA-256, checked on load).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sd_jax.weights import common

Array = jax.Array
INPUT_SIZE = 299  # the network's input side; pytorch-fid resizes every image to it
FEATURE_DIM = 2048  # pool3 width
BN_EPS = 1e-3  # torchvision BasicConv2d
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
# Keys of the file that are not part of the feature network: the 1008-way logits layer and BatchNorm counters.
_IGNORED = (re.compile(r"^fc\."), re.compile(r"\.num_batches_tracked$"))


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (running statistics) -> ReLU."""

  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0  # symmetric zero padding per spatial axis, as torch's Conv2d(padding=)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  precision: Any = "highest"  # matmul/conv precision (float32 convs on TPU/GPU are not exact by default)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  """3×3 stride-1 average pool over the unpadded window (TensorFlow's AVG; torch count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Shared fields of the Mixed blocks; `conv(...)` builds a named BasicConv2d with them."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = "highest"

  def conv(self, name: str, features: int, kernel_size, strides=1, padding=0) -> BasicConv2d:
    return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype, param_dtype=self.param_dtype,
                       precision=self.precision, name=name)


class InceptionA(_Block):
  """FIDInceptionA (Mixed_5b..5d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool(no pad count)→1×1."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    branch1x1 = self.conv("branch1x1", 64, 1)(x)
    branch5x5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
    branch3x3dbl = self.conv("branch3x3dbl_1", 64, 1)(x)
    branch3x3dbl = self.conv("branch3x3dbl_2", 96, 3, padding=1)(branch3x3dbl)
    branch3x3dbl = self.conv("branch3x3dbl_3", 96, 3, padding=1)(branch3x3dbl)
    branch_pool = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(_Block):
  """InceptionB (Mixed_6a), grid 35 -> 17: 3×3/2 | 1×1→3×3→3×3/2 | max-pool 3/2."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    branch3x3 = self.conv("branch3x3", 384, 3, strides=2)(x)
    branch3x3dbl = self.conv("branch3x3dbl_1", 64, 1)(x)
    branch3x3dbl = self.conv("branch3x3dbl_2", 96, 3, padding=1)(branch3x3dbl)
    branch3x3dbl = self.conv("branch3x3dbl_3", 96, 3, strides=2)(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(_Block):
  """FIDInceptionC (Mixed_6b..6e): factorized 7×7 convs (1×7 and 7×1), avg-pool branch without pad count."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    branch1x1 = self.conv("branch1x1", 192, 1)(x)
    branch7x7 = self.conv("branch7x7_1", c7, 1)(x)
    branch7x7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(branch7x7)
    branch7x7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(branch7x7)
    branch7x7dbl = self.conv("branch7x7dbl_1", c7, 1)(x)
    branch7x7dbl = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(branch7x7dbl)
    branch7x7dbl = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(branch7x7dbl)
    branch7x7dbl = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(branch7x7dbl)
    branch7x7dbl = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(branch7x7dbl)
    branch_pool = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(_Block):
  """InceptionD (Mixed_7a), grid 17 -> 8: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool 3/2."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    branch3x3 = self.conv("branch3x3_2", 320, 3, strides=2)(self.conv("branch3x3_1", 192, 1)(x))
    branch7x7x3 = self.conv("branch7x7x3_1", 192, 1)(x)
    branch7x7x3 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(branch7x7x3)
    branch7x7x3 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(branch7x7x3)
    branch7x7x3 = self.conv("branch7x7x3_4", 192, 3, strides=2)(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(_Block):
  """FIDInceptionE_1 (pool="avg", Mixed_7b) / FIDInceptionE_2 (pool="max", Mixed_7c): expanded 1×3 + 3×1 pairs."""

  pool: str = "avg"  # "avg": 3×3 average without pad count; "max": 3×3 max pool (padding never wins a max)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    branch1x1 = self.conv("branch1x1", 320, 1)(x)
    branch3x3 = self.conv("branch3x3_1", 384, 1)(x)
    branch3x3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(branch3x3),
                                 self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(branch3x3)], axis=-1)
    branch3x3dbl = self.conv("branch3x3dbl_1", 448, 1)(x)
    branch3x3dbl = self.conv("branch3x3dbl_2", 384, 3, padding=1)(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(branch3x3dbl),
                                    self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(branch3x3dbl)],
                                   axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    branch_pool = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


def resize_bilinear(images: Array, size: tuple[int, int]) -> Array:
  """[N, H, W, C] -> [N, *size, C], as torch's F.interpolate(mode="bilinear", align_corners=False): half-pixel
  sample positions, a 2-tap triangle filter and no antialiasing when shrinking."""
  images = jnp.asarray(images)
  shape = (images.shape[0], *size, images.shape[-1])
  if images.shape == shape:
    return images
  return jax.image.resize(images, shape, method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's `InceptionV3(output_blocks=[3])` with `fid_inception_v3()` blocks: images [N, H, W, 3] in
  [0, 1] -> pool3 features [N, 2048] (float32). Apply with {"params", "batch_stats"} (see load_inception)."""

  resize_input: bool = True  # bilinear resize to 299×299 first (pytorch-fid's default)
  normalize_input: bool = True  # map [0, 1] to the [-1, 1] the network was trained on
  dtype: Any = jnp.float32  # compute dtype; keep float32 for FIDs comparable with other implementations
  param_dtype: Any = jnp.float32
  precision: Any = "highest"

  @nn.compact
  def __call__(self, images: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected RGB images [N, H, W, 3], got shape {x.shape}")
    if self.resize_input:
      x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    if self.normalize_input:
      x = 2.0 * x - 1.0
    x = x.astype(self.dtype)
    conv = lambda name, *args, **kwargs: BasicConv2d(*args, **kwargs, **kw, name=name)  # noqa: E731
    x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)  # [N, 149, 149, 32]
    x = conv("Conv2d_2a_3x3", 32, 3)(x)  # [N, 147, 147, 32]
    x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)  # [N, 147, 147, 64]
    x = _max_pool_3x3_stride2(x)  # [N, 73, 73, 64]
    x = conv("Conv2d_3b_1x1", 80, 1)(x)
    x = conv("Conv2d_4a_3x3", 192, 3)(x)  # [N, 71, 71, 192]
    x = _max_pool_3x3_stride2(x)  # [N, 35, 35, 192]
    x = InceptionA(pool_features=32, **kw, name="Mixed_5b")(x)  # [N, 35, 35, 256]
    x = InceptionA(pool_features=64, **kw, name="Mixed_5c")(x)  # 288
    x = InceptionA(pool_features=64, **kw, name="Mixed_5d")(x)  # 288
    x = InceptionB(**kw, name="Mixed_6a")(x)  # [N, 17, 17, 768]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, **kw, name=name)(x)
    x = InceptionD(**kw, name="Mixed_7a")(x)  # [N, 8, 8, 1280]
    x = InceptionE(pool="avg", **kw, name="Mixed_7b")(x)  # [N, 8, 8, 2048]
    x = InceptionE(pool="max", **kw, name="Mixed_7c")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # adaptive average pool to 1×1 -> [N, 2048]

  def example_inputs(self, batch_size: int = 1) -> dict[str, Array]:
    return {"images": jnp.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)}


# ----------------------------------------------------------------------------------------------------------------
# Weights


def abstract_variables(model: FIDInceptionV3 | None = None) -> dict[str, Any]:
  """{"params", "batch_stats"} as ShapeDtypeStructs, without compute."""
  model = model or FIDInceptionV3()
  return jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs()))


def torch_key_to_flax(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """One tensor of the pytorch-fid state dict -> (variables path, array in Flax layout); None = not used.

  `X.conv.weight` -> params/X/conv/kernel (HWIO); `X.bn.{weight,bias}` -> params/X/bn/{scale,bias};
  `X.bn.running_{mean,var}` -> batch_stats/X/bn/{mean,var}; `fc.*` and `num_batches_tracked` are dropped.
  """
  if any(p.search(key) for p in _IGNORED):
    return None
  base, _, leaf = key.rpartition(".")
  path = base.replace(".", "/")
  if base.endswith(".conv") and leaf == "weight" and np.ndim(value) == 4:
    return f"params/{path}/kernel", common.conv_to_flax(value)
  if base.endswith(".bn"):
    renamed = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
               "running_var": ("batch_stats", "var")}.get(leaf)
    if renamed:
      return f"{renamed[0]}/{path}/{renamed[1]}", value
  return f"params/{key.replace('.', '/')}", value  # no rule: kept by name so that the key check reports it


def inception_from_torch(state_dict: Mapping[str, Any], model: FIDInceptionV3 | None = None) -> dict[str, Any]:
  """{"params", "batch_stats"} for FIDInceptionV3 from pytorch-fid's state dict (torchvision Inception3 names).

  Raises common.WeightsMismatchError naming every missing, unexpected or mis-shaped key, and a ValueError for
  torchvision's ImageNet Inception (`inception_v3_google`: it has AuxLogits and 1000 classes), whose key names
  match but whose network and weights are not FID's.
  """
  state = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
  fc = state.get("fc.weight")
  if any(k.startswith("AuxLogits.") for k in state) or (fc is not None and fc.shape[0] == 1000):
    raise ValueError("these are torchvision's ImageNet Inception-v3 weights (AuxLogits / 1000 classes), not the "
                     f"FID Inception: use pytorch-fid's {WEIGHTS_FILE} ({WEIGHTS_URL}).")
  converted = {}
  for key, value in state.items():
    item = torch_key_to_flax(key, value)
    if item is not None:
      converted[item[0]] = item[1]
  expected = nn.unbox(abstract_variables(model))
  return common.check_params(expected, converted, what="FID Inception weights")


def _check_hash(path: epath.Path) -> None:
  """torch.hub's convention: a file named `name-<hex>.ext` has a SHA-256 that starts with <hex>."""
  match = re.search(r"-([0-9a-f]{8,64})\.[^.]+$", path.name)
  if not match:
    return
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if not digest.startswith(match.group(1)):
    raise ValueError(f"{path}: SHA-256 {digest[:16]}... does not start with {match.group(1)} as its name says; the "
                     f"file is damaged or not pytorch-fid's {WEIGHTS_FILE} (re-download it from {WEIGHTS_URL}).")


def read_state_dict(path) -> dict[str, np.ndarray]:
  """The tensors of the Inception weights file: pytorch-fid's .pth (read with torch.load(weights_only=True),
  which unpickles tensors only) or a .safetensors copy of it."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"FID Inception weights not found at {path}. sd_jax downloads nothing: fetch pytorch-fid's {WEIGHTS_FILE} "
        f"once ({WEIGHTS_URL}) and pass its path, or use a CLIP feature extractor (reported as fd_<name>, not "
        "FID).")
  if path.name.endswith(".safetensors"):
    return common.load_state_dict(path)
  _check_hash(path)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (pip install torch), or convert it to .safetensors once "
                      "elsewhere") from e
  with path.open("rb") as f:
    state = torch.load(f, map_location="cpu", weights_only=True)
  state = state.get("state_dict", state)
  return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy") and v.is_floating_point()}


def load_inception(path, *, dtype: Any = jnp.float32, precision: Any = "highest", resize_input: bool = True
                   ) -> tuple[FIDInceptionV3, dict[str, Any]]:
  """(module, {"params", "batch_stats"}) from pytorch-fid's weights file at `path` (nothing is downloaded).

  Raises FileNotFoundError when the file is missing, ValueError when its SHA-256 does not match its name (for a
  file named like `pt_inception-2015-12-05-6726825d.pth`) and WeightsMismatchError when its keys do not fit.
  """
  model = FIDInceptionV3(resize_input=resize_input, dtype=jnp.dtype(dtype), precision=precision)
  return model, inception_from_torch(read_state_dict(path), model)
