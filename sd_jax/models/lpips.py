"""LPIPS perceptual distance (Zhang et al. 2018) on VGG16 features, as the LDM autoencoder loss uses it, NHWC.

    lpips = LPIPS()
    params = load_lpips_params("lpips_vgg.safetensors")          # the user's file; nothing is downloaded
    distance = lpips.apply({"params": params}, images_a, images_b)   # [B], images in [-1, 1]

Inputs are shifted and scaled like LPIPS' ScalingLayer, run through torchvision's VGG16 `features`, and compared at
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3: each feature map is normalized to unit length over channels, the
squared difference is weighted per channel by a learned non-negative 1×1 conv (`lin0` .. `lin4`), averaged over
space, and summed over the five layers.

## The weights file

One safetensors file holding the VGG16 convs and the five linear layers, in PyTorch layout, under either naming:

  features.{i}.weight / .bias           torchvision `vgg16().features` (i = 0, 2, 5, 7, 10, ..., 28)
  net.slice{k}.{i}.weight / .bias       the same tensors as LPIPS / taming-transformers name them
  lin{k}.model.1.weight [1, C, 1, 1]    LPIPS' linear layers (`lin{k}.model.0.weight` without dropout)

`scaling_layer.*` buffers (the constants SHIFT and SCALE below) are ignored; `lins.{k}.model.1.weight`, which the
`lpips` package's state dict holds next to `lin{k}` (the same tensors), is read as `lin{k}`. A file from the
`lpips` package (pip install lpips; weights you already have) is written with:

  python -c "import lpips, safetensors.torch as st; m = lpips.LPIPS(net='vgg', pretrained=True); \
st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'lpips_vgg.safetensors')"
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.layers import CONV_AXES, Array, Dtype
from sd_jax.weights import common

# VGG16 `features`: (torchvision index, output channels) of each 3×3 conv, by stage; a 2×2 max-pool separates the
# stages. LPIPS taps the ReLU after the last conv of every stage.
VGG16_STAGES = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
# LPIPS' ScalingLayer: inputs in [-1, 1] → roughly ImageNet-normalized, per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# normalize_tensor's epsilon, added under the square root (eps**2) so the gradient at a zero feature vector is 0,
# not NaN.
NORM_EPS = 1e-10


class LPIPS(nn.Module):
  """LPIPS-VGG distance between two image batches [B, H, W, 3] in [-1, 1] → [B] (float32).

  Params: features_{i}/{kernel,bias} (i: torchvision VGG16 indices), lin{k}/kernel [1, 1, C, 1].
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features: int, kernel_size: int, use_bias: bool, name: str) -> nn.Conv:
    pad = (kernel_size - 1) // 2
    return nn.Conv(
        features, kernel_size=(kernel_size, kernel_size), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), name=name)

  def _features(self, x: Array) -> list[Array]:
    """The five tapped VGG16 feature maps of images in [-1, 1]."""
    h = (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    h = h.astype(self.dtype)
    taps = []
    for s, stage in enumerate(VGG16_STAGES):
      if s:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for index, channels in stage:
        h = nn.relu(self._conv(channels, 3, True, f"features_{index}")(h))
      taps.append(h)
    return taps

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    batch = x.shape[0]
    # One pass over both batches: half the VGG launches.
    taps = self._features(jnp.concatenate([x, y], axis=0))
    distance = jnp.zeros((batch,), jnp.float32)
    for k, tap in enumerate(taps):
      tap = tap.astype(jnp.float32)
      tap = tap * jax.lax.rsqrt(jnp.sum(jnp.square(tap), axis=-1, keepdims=True) + NORM_EPS**2)
      diff = jnp.square(tap[:batch] - tap[batch:])
      weighted = self._conv(1, 1, False, f"lin{k}")(diff.astype(self.dtype)).astype(jnp.float32)
      distance = distance + weighted.mean(axis=(1, 2, 3))
    return distance


def abstract_params(model: LPIPS | None = None) -> Any:
  """The (logically boxed) parameter shapes, without computing anything."""
  model = model or LPIPS()
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, x)["params"]


_SLICE_RE = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")
_LIN_RE = re.compile(r"^(?:lin(\d+)|lins\.(\d+))\.model\.[01]\.weight$")


def _flax_name(key: str) -> str | None:
  """PyTorch key → the torch-style key that maps 1:1 onto our params; None for tensors LPIPS does not need."""
  if key.startswith("scaling_layer."):
    return None  # the constants SHIFT and SCALE
  m = _SLICE_RE.match(key)
  if m:
    return f"features.{m.group(1)}.{m.group(2)}"
  m = _LIN_RE.match(key)
  if m:  # the lpips package holds each linear layer twice, as lin{k} and lins.{k}: the same tensor
    return f"lin{m.group(1) or m.group(2)}.weight"
  return key


def load_lpips_params(path, model: LPIPS | None = None) -> dict[str, Any]:
  """Params for `model` from a safetensors file (see the module docstring for the accepted names).

  Raises FileNotFoundError when the file is missing and common.WeightsMismatchError naming every missing,
  unexpected and mis-shaped tensor when it does not hold LPIPS-VGG weights.
  """
  state = common.load_state_dict(path)
  converted = {}
  for key, value in state.items():
    name = _flax_name(key)
    if name is None:
      continue
    try:
      flat_path, array = common.torch_param_to_flax(name, np.asarray(value))
    except ValueError:
      flat_path, array = name.replace(".", "/"), value  # no layout rule: reported as unexpected below
    # torchvision's "features.0" is our "features_0" (Flax names cannot hold a dot).
    flat_path = re.sub(r"^features/(\d+)/", r"features_\1/", flat_path)
    converted[flat_path] = array
  expected = nn.meta.unbox(abstract_params(model))
  return common.check_params(expected, converted, what=f"LPIPS-VGG weights in {path}")
