"""Analytic FLOP counts of the U-Net and the VAE decoder, layer by layer, for MFU.

Only the matrix products are counted, which is the usual convention for model-FLOPs utilisation (MFU): what the
tensor cores / MXUs must do, not the elementwise work around it. One multiply-add is 2 FLOPs:

    conv    k×k, C_in → C_out, output H'×W'          2 · H' W' · k² C_in · C_out        per image
    dense   D_in → D_out on N tokens                 2 · N · D_in · D_out
    attention, T queries over S keys, inner width E  2 · T S E  (q kᵀ)  +  2 · T S E  (softmax · v)

Group norms, activations, the softmax itself and the residual adds are left out; they are O(H W C) against the
O(H W C²) of the convolutions (a few percent of XLA's count at Stable Diffusion widths, more on test-sized
models; sd_jax/bench.py reports both counts side by side). The walk below mirrors sd_jax/models/unet.py block by
block, including the skip concatenations (an up block's resnets see h + skip channels) and the stride-2 /
nearest-×2 resolution changes, so it is exact for the ops it counts: the tests check it against the dot/conv ops
of the traced jaxpr.

Training: forward + backward ≈ 3 × forward (the backward pass computes the gradients with respect to both the
activations and the weights, each as costly as the forward product). Sampling with classifier-free guidance runs the
U-Net on [uncond; cond], i.e. a batch of 2B, at every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sd_jax.models import unet as unet_lib

TRAIN_FORWARD_MULTIPLIER = 3  # forward + backward (activation and weight gradients)


@dataclasses.dataclass
class FlopCount:
  """FLOPs by kind of op. Add counts with `+`, scale with `*`."""
  conv: float = 0.0
  dense: float = 0.0
  attention: float = 0.0  # the two batched matmuls q kᵀ and softmax(·) v

  @property
  def total(self) -> float:
    return self.conv + self.dense + self.attention

  def __add__(self, other: FlopCount) -> FlopCount:
    return FlopCount(self.conv + other.conv, self.dense + other.dense, self.attention + other.attention)

  def __mul__(self, factor: float) -> FlopCount:
    return FlopCount(self.conv * factor, self.dense * factor, self.attention * factor)

  __rmul__ = __mul__

  def as_dict(self) -> dict[str, float]:
    return {"conv": self.conv, "dense": self.dense, "attention": self.attention, "total": self.total}


# ---------------------------------------------------------------------------------------------------------------
# Single ops


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int | None = None) -> int:
  """Output length of a convolution along one axis (PyTorch-style symmetric padding, default (k - 1) // 2)."""
  padding = (kernel - 1) // 2 if padding is None else padding
  return (size + 2 * padding - kernel) // stride + 1


def _taps(size: int, kernel: int, stride: int, padding: int) -> int:
  """Kernel taps that land inside the input, summed over the output positions along one axis."""
  out = conv_output_size(size, kernel, stride, padding)
  return sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - padding + k < size)


def conv_flops(height: int, width: int, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
               padding: int | None = None, batch: int = 1, count_padding: bool = True) -> FlopCount:
  """k×k convolution on a [batch, height, width, in_channels] input.

  count_padding: count every tap of every output position (2 · H'W' · k² · C_in · C_out, what the hardware runs on
  the zero-padded input; the MFU convention here), or only the taps inside the input (XLA's cost analysis does
  this: 84% of the first count for a 3×3 'same' conv on 8×8, 98% on 64×64).
  """
  padding = (kernel - 1) // 2 if padding is None else padding
  if count_padding:
    taps = conv_output_size(height, kernel, stride, padding) * conv_output_size(width, kernel, stride, padding) \
        * kernel * kernel
  else:
    taps = _taps(height, kernel, stride, padding) * _taps(width, kernel, stride, padding)
  return FlopCount(conv=2.0 * batch * taps * in_channels * out_channels)


def dense_flops(tokens: int, in_features: int, out_features: int) -> FlopCount:
  """Dense layer on `tokens` rows (batch × length)."""
  return FlopCount(dense=2.0 * tokens * in_features * out_features)


def attention_flops(batch: int, queries: int, keys: int, inner: int) -> FlopCount:
  """The two attention matmuls for all heads together (heads × head_dim = inner)."""
  return FlopCount(attention=4.0 * batch * queries * keys * inner)


def attention_layer_flops(batch: int, queries: int, query_dim: int, heads: int, head_dim: int,
                          keys: int | None = None, key_dim: int | None = None, out_dim: int | None = None
                          ) -> FlopCount:
  """sd_jax.models.layers.Attention: to_q, to_k, to_v, the attention itself, to_out_0.

  Self-attention when `keys` is None (keys = queries, key_dim = query_dim); cross-attention over `keys` context
  tokens of width `key_dim` otherwise.
  """
  inner = heads * head_dim
  keys = queries if keys is None else keys
  key_dim = query_dim if key_dim is None else key_dim
  return (dense_flops(batch * queries, query_dim, inner)          # to_q
          + 2 * dense_flops(batch * keys, key_dim, inner)          # to_k, to_v
          + attention_flops(batch, queries, keys, inner)
          + dense_flops(batch * queries, inner, out_dim or query_dim))  # to_out_0


# ---------------------------------------------------------------------------------------------------------------
# Blocks (mirroring sd_jax/models/layers.py)


def resnet_flops(batch: int, height: int, width: int, in_channels: int, out_channels: int,
                 temb_dim: int | None = None, scale_shift: bool = False, use_shortcut: bool | None = None,
                 count_padding: bool = True) -> FlopCount:
  """ResnetBlock2D: conv1 (3×3), time_emb_proj, conv2 (3×3), 1×1 conv_shortcut when the channels change."""
  flops = conv_flops(height, width, in_channels, out_channels, 3, batch=batch, count_padding=count_padding)
  if temb_dim is not None:
    flops += dense_flops(batch, temb_dim, out_channels * (2 if scale_shift else 1))
  flops += conv_flops(height, width, out_channels, out_channels, 3, batch=batch, count_padding=count_padding)
  if use_shortcut if use_shortcut is not None else in_channels != out_channels:
    flops += conv_flops(height, width, in_channels, out_channels, 1, batch=batch, count_padding=count_padding)
  return flops


def transformer_2d_flops(batch: int, height: int, width: int, channels: int, heads: int, head_dim: int,
                         num_layers: int, context_length: int, context_dim: int | None,
                         only_cross_attention: bool = False, linear_projection: bool = False,
                         ff_mult: int = 4) -> FlopCount:
  """Transformer2DModel: proj_in, `num_layers` BasicTransformerBlocks (attn1, attn2, GEGLU feed-forward), proj_out.

  A 1×1 conv and a Dense are the same product; proj_in/out are booked as conv or dense as the model builds them.
  """
  tokens = height * width
  inner = heads * head_dim
  project = (lambda i, o: dense_flops(batch * tokens, i, o)) if linear_projection else (
      lambda i, o: conv_flops(height, width, i, o, 1, batch=batch))
  flops = project(channels, inner)
  ff_inner = inner * ff_mult
  for _ in range(num_layers):
    if only_cross_attention:
      flops += attention_layer_flops(batch, tokens, inner, heads, head_dim, context_length, context_dim)
    else:
      flops += attention_layer_flops(batch, tokens, inner, heads, head_dim)
    if context_dim is not None:
      flops += attention_layer_flops(batch, tokens, inner, heads, head_dim, context_length, context_dim)
    flops += dense_flops(batch * tokens, inner, 2 * ff_inner)  # GEGLU proj: (hidden, gate)
    flops += dense_flops(batch * tokens, ff_inner, inner)      # net_2
  return flops + project(inner, channels)


# ---------------------------------------------------------------------------------------------------------------
# Models


def _unet(model_or_config: Any) -> unet_lib.UNet2DConditionModel:
  if isinstance(model_or_config, unet_lib.UNet2DConditionModel):
    return model_or_config
  return unet_lib.create_unet(model_or_config)


def unet_forward_flops(model_or_config: Any, batch: int, height: int | None = None, width: int | None = None,
                       context_length: int = 77, count_padding: bool = True) -> FlopCount:
  """One forward pass of sd_jax.models.unet.UNet2DConditionModel on [batch, height, width, in_channels] inputs
  (default: the model's sample_size) and a [batch, context_length, cross_attention_dim] context.
  count_padding: see conv_flops."""
  m = _unet(model_or_config)
  s = m.block_settings()
  n = len(m.block_out_channels)
  size = m.sample_size or 64
  default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
  h, w = height or default_h, width or default_w
  boc = m.block_out_channels
  temb_dim = m.time_embedding_dim or 4 * boc[0]
  scale_shift = m.resnet_time_scale_shift == "scale_shift"

  def resnet(res, cin, cout):
    return resnet_flops(batch, res[0], res[1], cin, cout, temb_dim, scale_shift, count_padding=count_padding)

  def attend(kind, res, channels, heads, head_dim, layers, cross_dim, only_cross):
    if kind == "cross":
      return transformer_2d_flops(batch, res[0], res[1], channels, heads, channels // heads, layers,
                                  context_length, cross_dim, only_cross, m.use_linear_projection)
    if kind == "self":
      head_dim = head_dim or channels
      return attention_layer_flops(batch, res[0] * res[1], channels, channels // head_dim, head_dim)
    return FlopCount()

  # Time (and class) embedding MLPs: one row per example.
  flops = dense_flops(batch, boc[0], temb_dim) + dense_flops(batch, temb_dim, temb_dim)
  if m.class_embed_type == "timestep":
    flops += dense_flops(batch, boc[0], temb_dim) + dense_flops(batch, temb_dim, temb_dim)

  res = (h, w)
  flops += conv_flops(h, w, m.in_channels, boc[0], m.conv_in_kernel, batch=batch, count_padding=count_padding)
  res = (conv_output_size(h, m.conv_in_kernel), conv_output_size(w, m.conv_in_kernel))
  skips = [(boc[0], res)]  # (channels, resolution) of every skip, as the model stacks them
  channels = boc[0]
  for i, block_type in enumerate(m.down_block_types):
    kind = unet_lib.DOWN_BLOCK_ATTENTION[block_type]
    for _ in range(s["layers"][i]):
      flops += resnet(res, channels, boc[i])
      channels = boc[i]
      flops += attend(kind, res, channels, s["heads"][i], s["head_dims"][i], s["transformer_layers"][i],
                      s["cross_dims"][i], s["only_cross"][i])
      skips.append((channels, res))
    if i < n - 1:
      pad = m.downsample_padding
      flops += conv_flops(res[0], res[1], channels, channels, 3, stride=2, padding=pad, batch=batch,
                          count_padding=count_padding)
      res = (conv_output_size(res[0], 3, 2, pad), conv_output_size(res[1], 3, 2, pad))
      skips.append((channels, res))

  if m.mid_block_type is not None:
    cross = m.mid_block_type == "UNetMidBlock2DCrossAttn"
    kind = "cross" if cross else ("self" if m.mid_block_add_attention else None)
    flops += resnet(res, channels, boc[-1])
    channels = boc[-1]
    flops += attend(kind, res, channels, s["heads"][-1], s["head_dims"][-1], s["transformer_layers"][-1],
                    s["cross_dims"][-1], False)
    flops += resnet(res, channels, channels)

  for i, block_type in enumerate(m.up_block_types):
    r = n - 1 - i
    kind = unet_lib.UP_BLOCK_ATTENTION[block_type]
    num_layers = s["layers"][r] + 1
    block_skips, skips = skips[-num_layers:], skips[:-num_layers]
    for j in range(num_layers):
      skip_channels, _ = block_skips[-1 - j]
      flops += resnet(res, channels + skip_channels, boc[r])
      channels = boc[r]
      # up blocks index head_dims without reversing (see unet.py): kept for the "self" kind.
      flops += attend(kind, res, channels, s["heads"][r], s["head_dims"][i], s["transformer_layers"][r],
                      s["cross_dims"][r], s["only_cross"][r])
    if i < n - 1:
      res = skips[-1][1]  # nearest-upsample to the next skip's size, then a 3×3 conv
      flops += conv_flops(res[0], res[1], channels, channels, 3, batch=batch, count_padding=count_padding)

  flops += conv_flops(res[0], res[1], channels, m.out_channels, m.conv_out_kernel, batch=batch,
                      count_padding=count_padding)
  return flops


def vae_decode_flops(vae, batch: int, latent_height: int, latent_width: int | None = None,
                     count_padding: bool = True) -> FlopCount:
  """sd_jax.models.vae.AutoencoderKL.decode on [batch, h, w, latent_channels] latents."""
  h, w = latent_height, latent_width or latent_height
  boc = vae.block_out_channels
  n = len(boc)
  flops = FlopCount()
  if vae.use_post_quant_conv:
    flops += conv_flops(h, w, vae.latent_channels, vae.latent_channels, 1, batch=batch)
  channels = boc[-1]
  flops += conv_flops(h, w, vae.latent_channels, channels, 3, batch=batch, count_padding=count_padding)
  flops += resnet_flops(batch, h, w, channels, channels, count_padding=count_padding)
  if vae.mid_block_add_attention:
    flops += attention_layer_flops(batch, h * w, channels, 1, channels)
  flops += resnet_flops(batch, h, w, channels, channels, count_padding=count_padding)
  for i, out_channels in enumerate(reversed(boc)):
    for _ in range(vae.layers_per_block + 1):
      flops += resnet_flops(batch, h, w, channels, out_channels, count_padding=count_padding)
      channels = out_channels
    if i < n - 1:
      h, w = 2 * h, 2 * w
      flops += conv_flops(h, w, channels, channels, 3, batch=batch, count_padding=count_padding)
  return flops + conv_flops(h, w, channels, vae.out_channels, 3, batch=batch, count_padding=count_padding)


def unet_train_step_flops(model_or_config: Any, batch: int, height: int | None = None, width: int | None = None,
                          context_length: int = 77) -> FlopCount:
  """Model FLOPs of one U-Net training step on a global batch: 3 × forward."""
  return TRAIN_FORWARD_MULTIPLIER * unet_forward_flops(model_or_config, batch, height, width, context_length)


def ddim_sample_flops(model_or_config: Any, batch: int, num_steps: int, height: int | None = None,
                      width: int | None = None, context_length: int = 77, guidance: bool = True,
                      vae=None) -> FlopCount:
  """Model FLOPs of drawing `batch` samples: num_steps U-Net calls (on 2·batch with guidance), then the VAE decode
  at the U-Net's output size when `vae` is given."""
  m = _unet(model_or_config)
  per_step = unet_forward_flops(m, (2 if guidance else 1) * batch, height, width, context_length)
  flops = num_steps * per_step
  if vae is not None:
    size = m.sample_size or 64
    h = height or (size if isinstance(size, int) else size[0])
    w = width or (size if isinstance(size, int) else size[1])
    flops += vae_decode_flops(vae, batch, h, w)
  return flops


# ---------------------------------------------------------------------------------------------------------------
# An independent count from a traced program (tests; a cross-check in the bench)


def jaxpr_matmul_flops(closed_jaxpr) -> FlopCount:
  """FLOPs of every dot_general and conv_general_dilated in a (closed) jaxpr, recursing into sub-jaxprs
  (pjit, remat, custom_vjp, ...): a scan's body counts once per iteration, and a cond (one branch runs, e.g. the
  per-platform attention of layers.dot_product_attention) as its costliest branch. A check on the analytic walk
  that knows nothing about the model's structure."""
  import numpy as np
  from jax.extend import core as jax_core

  def count(jaxpr) -> FlopCount:
    total = FlopCount()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        contracted = int(np.prod([lhs[d] for d in lhs_contract]))
        flops = 2.0 * float(np.prod(out)) * contracted
        # Attention matmuls have two activation operands with batch *and* head dims; weight products do not.
        if len(lhs_batch) >= 2:
          total += FlopCount(attention=flops)
        else:
          total += FlopCount(dense=flops)
      elif eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        dn = eqn.params["dimension_numbers"]
        rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
        kernel_elems = int(np.prod([rhs[d] for d in rhs_spec[2:]])) * rhs[rhs_spec[1]]
        total += FlopCount(conv=2.0 * float(np.prod(out)) * kernel_elems)
      elif eqn.primitive.name == "cond":
        total += max((count(branch.jaxpr) for branch in eqn.params["branches"]), key=lambda c: c.total)
        continue
      elif eqn.primitive.name == "scan":
        total += count(eqn.params["jaxpr"].jaxpr) * eqn.params["length"]
        continue
      for sub in _sub_jaxprs(eqn.params.values()):
        total += count(sub)
    return total

  def _sub_jaxprs(values):
    for value in values:
      if isinstance(value, jax_core.ClosedJaxpr):
        yield value.jaxpr
      elif isinstance(value, jax_core.Jaxpr):
        yield value
      elif isinstance(value, (tuple, list)):
        yield from _sub_jaxprs(value)

  return count(closed_jaxpr.jaxpr if hasattr(closed_jaxpr, "jaxpr") else closed_jaxpr)
