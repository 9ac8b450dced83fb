"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, as taming-transformers and latent diffusion use it), NHWC.

    disc = NLayerDiscriminator(channels=64, num_layers=3)
    params = disc.init(rng, images)["params"]
    logits = disc.apply({"params": params}, images)      # [B, h, w, 1]: one real/fake logit per image patch

The stack is a 4×4 stride-2 conv with LeakyReLU, `num_layers - 1` more stride-2 convs (width doubling, capped at
8× `channels`) each followed by a norm and LeakyReLU, one stride-1 conv of the same kind, and a 4×4 stride-1 conv
to one channel. Every conv pads by 1, so a side of length n leaves the stack with n / 2**num_layers - 2 logits.

Norms: taming/LDM use BatchNorm in training mode. Here "batch" normalizes with the statistics of the batch the
module is applied to (no running averages: the discriminator is only used during training, and the training loop
keeps no mutable state outside the params). Under `jit` that is the global batch whatever the mesh; under `pmap`
each device's slice. "group" (per example) and "none" are the alternatives.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models.layers import CONV_AXES, Array, Dtype, GroupNorm

NORMS = ("batch", "group", "none")


class BatchStatNorm(nn.Module):
  """BatchNorm2d in training mode without running statistics: mean/variance over (batch, height, width)."""

  epsilon: float = 1e-5  # torch.nn.BatchNorm2d's default
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    # taming's weights_init draws the BatchNorm scale from N(1, 0.02); a plain 1 is as good and deterministic.
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (channels,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (channels,),
                      self.param_dtype)
    h = x.astype(jnp.float32)
    mean = h.mean(axis=(0, 1, 2))
    var = jnp.square(h - mean).mean(axis=(0, 1, 2))  # biased, as BatchNorm normalizes with
    y = (h - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN: images [B, H, W, C] in [-1, 1] → real/fake logits [B, H / 2**num_layers - 2, ..., 1].

  Params: conv_0 .. conv_{num_layers}, norm_1 .. norm_{num_layers} (unless norm="none"), conv_out.
  """

  channels: int = 64  # width of the first conv (pix2pix's ndf)
  num_layers: int = 3  # stride-2 convs in the stack (pix2pix's n_layers)
  max_channel_mult: int = 8  # width stops doubling at this multiple of `channels`
  norm: str = "batch"  # "batch" | "group" | "none" (see the module docstring)
  norm_num_groups: int = 32  # for norm="group"
  negative_slope: float = 0.2  # LeakyReLU
  init_std: float = 0.02  # conv kernels ~ N(0, init_std), as taming's weights_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def output_size(self, size: int) -> int:
    """Side of the logits map for an input side of `size` (each 4×4 conv with pad 1: stride 2 halves it,
    stride 1 takes one off)."""
    for _ in range(self.num_layers):
      size = (size + 2 - 4) // 2 + 1
    return size - 2

  def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> nn.Conv:
    return nn.Conv(
        features, kernel_size=(4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.init_std), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), name=name)

  def _norm(self, name: str):
    if self.norm == "batch":
      return BatchStatNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.norm == "group":
      return GroupNorm(self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return lambda h: h

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.norm not in NORMS:
      raise ValueError(f"NLayerDiscriminator norm={self.norm!r}; use one of {NORMS}.")
    h = self._conv(self.channels, 2, True, "conv_0")(x.astype(self.dtype))
    h = nn.leaky_relu(h, self.negative_slope)
    for n in range(1, self.num_layers + 1):
      mult = min(2**n, self.max_channel_mult)
      stride = 2 if n < self.num_layers else 1  # the last conv of the stack keeps the resolution
      # A bias is redundant right before a norm (pix2pix drops it for BatchNorm).
      h = self._conv(self.channels * mult, stride, self.norm == "none", f"conv_{n}")(h)
      h = self._norm(f"norm_{n}")(h)
      h = nn.leaky_relu(h, self.negative_slope)
    return self._conv(1, 1, True, "conv_out")(h).astype(jnp.float32)
