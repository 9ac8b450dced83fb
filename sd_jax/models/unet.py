"""Stable Diffusion U-Net in Flax Linen, weight-compatible with diffusers' `UNet2DConditionModel`.

The module's fields mirror the diffusers config names, and its parameter tree mirrors the diffusers module tree
with `.N` indices written `_N` (`down_blocks.0.resnets.1.conv1.weight` → `down_blocks_0/resnets_1/conv1/kernel`).
It also covers the pixel-space DDPM layout of diffusers' `UNet2DModel` (Down/AttnDown/AttnUp/Up blocks, the
self-attention `UNetMidBlock2D`, no cross-attention), so `google/ddpm-*` style weights map the same way.

Build a model from a named config plus overrides (the overrides are what an ml_collections config passes):

    model = create_unet("sd15", dtype="bfloat16", remat_policy="dots_saveable")
    params = model.init(rng, **model.example_inputs(batch_size=1))["params"]
    noise_pred = model.apply({"params": params}, sample, timesteps, context)   # NHWC in, NHWC out

`UNet2DConditionModel(**unet_config("sd15"))` is the same thing without the key/dtype validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models import layers
from sd_jax.models.layers import (
    Array,
    Attention,
    Downsample2D,
    Dtype,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    activation,
    conv,
    remat,
    timestep_embedding,
)

# diffusers block type → which attention the block carries: None, "cross" (Transformer2DModel, text context) or
# "self" (diffusers `Attention` with its own group_norm, as in the pixel-space DDPM).
DOWN_BLOCK_ATTENTION = {"DownBlock2D": None, "CrossAttnDownBlock2D": "cross", "AttnDownBlock2D": "self"}
UP_BLOCK_ATTENTION = {"UpBlock2D": None, "CrossAttnUpBlock2D": "cross", "AttnUpBlock2D": "self"}
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class _UNetBlock(nn.Module):
  """Fields and sub-layer factories shared by the down, mid and up blocks."""

  out_channels: int = 320
  num_layers: int = 1  # resnets (down, up) or (attention, resnet) pairs after the first resnet (mid)
  attn_kind: str | None = None  # None | "cross" (Transformer2DModel) | "self" (Attention with group_norm)
  num_attention_heads: int = 8  # "cross": heads; head width is out_channels // heads
  attention_head_dim: int | None = None  # "self": head width; None = one head over all channels
  transformer_layers: int = 1  # BasicTransformerBlocks per Transformer2DModel
  cross_attention_dim: int | None = None
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  resnet_time_scale_shift: str = "default"
  output_scale_factor: float = 1.0
  dropout: float = 0.0
  attention_impl: str | None = "xla"
  splash_min_seq_len: int = layers.SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _resnet(self, name: str) -> nn.Module:
    cls = remat(ResnetBlock2D, self.remat_policy, static_argnums=(3,))  # (self, x, temb, deterministic)
    return cls(
        out_channels=self.out_channels,
        groups=self.norm_num_groups,
        eps=self.norm_eps,
        dropout=self.dropout,
        time_embedding_norm=self.resnet_time_scale_shift,
        output_scale_factor=self.output_scale_factor,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )

  def _attend(self, index: int, h: Array, context, context_mask, deterministic: bool) -> Array:
    name = f"attentions_{index}"
    if self.attn_kind == "cross":
      return Transformer2DModel(
          num_attention_heads=self.num_attention_heads,
          attention_head_dim=self.out_channels // self.num_attention_heads,
          num_layers=self.transformer_layers,
          cross_attention_dim=self.cross_attention_dim,
          norm_num_groups=self.norm_num_groups,
          use_linear_projection=self.use_linear_projection,
          only_cross_attention=self.only_cross_attention,
          upcast_attention=self.upcast_attention,
          dropout=self.dropout,
          attention_impl=self.attention_impl,
          splash_min_seq_len=self.splash_min_seq_len,
          remat_policy=self.remat_policy,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=name,
      )(h, context, context_mask, deterministic)
    if self.attn_kind == "self":
      head_dim = self.attention_head_dim or self.out_channels
      cls = remat(Attention, self.remat_policy, static_argnums=(4,))  # (self, x, ctx, mask, deterministic)
      return cls(
          heads=self.out_channels // head_dim,
          dim_head=head_dim,
          bias=True,
          norm_num_groups=self.norm_num_groups,
          eps=self.norm_eps,
          residual_connection=True,
          rescale_output_factor=self.output_scale_factor,
          upcast_attention=self.upcast_attention,
          attention_impl=self.attention_impl,
          splash_min_seq_len=self.splash_min_seq_len,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=name,
      )(h, None, None, deterministic)
    return h


class DownBlock(_UNetBlock):
  """diffusers DownBlock2D / CrossAttnDownBlock2D / AttnDownBlock2D (by `attn_kind`).

  Params: resnets_{i}, attentions_{i}, downsamplers_0. Returns (h, skips) with one skip per resnet plus one
  after the downsampler, as diffusers' `output_states`.
  """

  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, h, temb, context=None, context_mask=None, deterministic=True):
    skips = []
    for i in range(self.num_layers):
      h = self._resnet(f"resnets_{i}")(h, temb, deterministic)
      h = self._attend(i, h, context, context_mask, deterministic)
      skips.append(h)
    if self.add_downsample:
      h = Downsample2D(
          self.out_channels,
          padding=self.downsample_padding,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="downsamplers_0",
      )(h)
      skips.append(h)
    return h, tuple(skips)


class MidBlock(_UNetBlock):
  """diffusers UNetMidBlock2DCrossAttn (attn_kind "cross") / UNetMidBlock2D (attn_kind "self" or None):
  resnets_0, then `num_layers` × (attentions_{i}, resnets_{i+1})."""

  @nn.compact
  def __call__(self, h, temb, context=None, context_mask=None, deterministic=True):
    h = self._resnet("resnets_0")(h, temb, deterministic)
    for i in range(self.num_layers):
      h = self._attend(i, h, context, context_mask, deterministic)
      h = self._resnet(f"resnets_{i + 1}")(h, temb, deterministic)
    return h


class UpBlock(_UNetBlock):
  """diffusers UpBlock2D / CrossAttnUpBlock2D / AttnUpBlock2D (by `attn_kind`).

  Each resnet takes concat([h, skip], channels) with skips consumed from the end, as diffusers does.
  Params: resnets_{i}, attentions_{i}, upsamplers_0.
  """

  add_upsample: bool = True

  @nn.compact
  def __call__(self, h, skips, temb, context=None, context_mask=None, deterministic=True, upsample_size=None):
    if len(skips) != self.num_layers:
      raise ValueError(f"up block needs {self.num_layers} skips, got {len(skips)}")
    for i in range(self.num_layers):
      h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
      h = self._resnet(f"resnets_{i}")(h, temb, deterministic)
      h = self._attend(i, h, context, context_mask, deterministic)
    if self.add_upsample:
      h = Upsample2D(
          self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0"
      )(h, upsample_size)
    return h


# ----------------------------------------------------------------------------------------------------------------
# Model


def _per_block(value: Any, n: int, name: str) -> tuple:
  """diffusers broadcasts scalar per-block settings to every block; sequences must have one entry per block."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries but there are {n} blocks: {value}")
    return tuple(value)
  return (value,) * n


class UNet2DConditionModel(nn.Module):
  """Conditional (or unconditional) U-Net, NHWC. Field names and defaults follow diffusers'
  `UNet2DConditionModel` config; the last block of fields are JAX-side switches.

  Call: `(sample [B,H,W,C], timesteps [B] or scalar, encoder_hidden_states [B,L,D] | None,
  class_labels [B] | None, encoder_attention_mask [B,L] bool | None, train=False) -> [B,H,W,out_channels]`
  in `dtype`. `train=True` enables dropout (needs a "dropout" rng when `dropout > 0`).
  """

  sample_size: int | tuple[int, int] | None = None  # latent/pixel size the model was trained at (informative)
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False  # sample -> 2 * sample - 1 first
  flip_sin_to_cos: bool = True  # timestep embedding: cosines first
  freq_shift: int = 0  # timestep embedding downscale_freq_shift
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D",
      "CrossAttnDownBlock2D",
      "CrossAttnDownBlock2D",
      "DownBlock2D",
  )
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # or "UNetMidBlock2D" (self-attention) or None
  mid_block_add_attention: bool = True  # UNetMidBlock2D only: diffusers UNet2DModel's `add_attention`
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  only_cross_attention: bool | tuple[bool, ...] = False  # per block: attn1 attends to the context
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks get one more)
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5  # resnets, self-attention group_norm and conv_norm_out
  cross_attention_dim: int | tuple[int, ...] | None = 1280  # context width; None = unconditional
  transformer_layers_per_block: int | tuple[int, ...] = 1
  # diffusers' naming quirk: for cross-attention blocks this is the number of heads unless num_attention_heads
  # is set (SD 1.x: 8; SD 2.x: (5, 10, 20, 20)); for "self" (AttnDown/AttnUp/UNetMidBlock2D) blocks it is the
  # head width, None meaning one head over all channels.
  attention_head_dim: int | tuple[int | None, ...] | None = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False  # Transformer2D proj_in/out as Dense instead of 1x1 conv (SD 2.x)
  class_embed_type: str | None = None  # None (nn.Embed when num_class_embeds is set) | "timestep"
  num_class_embeds: int | None = None
  upcast_attention: bool = False  # float32 attention (SD 2.1-v)
  resnet_time_scale_shift: str = "default"  # or "scale_shift"
  time_embedding_dim: int | None = None  # default 4 * block_out_channels[0]
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  # JAX-side switches (not part of the diffusers config).
  dtype: Dtype = jnp.float32  # compute / activation dtype
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = "xla"  # "xla" | "cudnn" | "splash" | None (auto): layers.dot_product_attention
  splash_min_seq_len: int = layers.SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  remat_policy: str = "none"  # "none" | "full" | "dots_saveable" | "nothing_saveable" | ... (layers.REMAT_POLICIES)

  # -- config resolution ---------------------------------------------------------------------------------------

  def block_settings(self) -> dict[str, tuple]:
    """Per-block settings after diffusers' broadcasting rules; raises on an inconsistent config."""
    n = len(self.down_block_types)
    if not (len(self.up_block_types) == len(self.block_out_channels) == n):
      raise ValueError(
          f"down_block_types {self.down_block_types}, up_block_types {self.up_block_types} and "
          f"block_out_channels {self.block_out_channels} must have the same length"
      )
    for kind, table in (("down", DOWN_BLOCK_ATTENTION), ("up", UP_BLOCK_ATTENTION)):
      for t in getattr(self, f"{kind}_block_types"):
        if t not in table:
          raise ValueError(f"unsupported {kind} block type {t!r}; supported: {sorted(table)}")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; supported: {MID_BLOCK_TYPES}")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"act_fn {self.act_fn!r}: only silu is supported")
    head_dims = _per_block(self.attention_head_dim, n, "attention_head_dim")
    # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (see the field comment).
    heads = _per_block(
        self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim,
        n,
        "num_attention_heads",
    )
    settings = dict(
        head_dims=head_dims,
        heads=heads,
        layers=_per_block(self.layers_per_block, n, "layers_per_block"),
        cross_dims=_per_block(self.cross_attention_dim, n, "cross_attention_dim"),
        transformer_layers=_per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block"),
        only_cross=_per_block(self.only_cross_attention, n, "only_cross_attention"),
    )
    cross_blocks = [
        i
        for i in range(n)
        if DOWN_BLOCK_ATTENTION[self.down_block_types[i]] == "cross"
        or UP_BLOCK_ATTENTION[self.up_block_types[n - 1 - i]] == "cross"
    ]
    if self.mid_block_type == "UNetMidBlock2DCrossAttn":
      cross_blocks.append(n - 1)
    for i in cross_blocks:
      if not settings["cross_dims"][i]:
        raise ValueError(f"block {i} has cross-attention but cross_attention_dim is {self.cross_attention_dim}")
      if not isinstance(heads[i], int) or self.block_out_channels[i] % heads[i]:
        raise ValueError(
            f"block {i}: {self.block_out_channels[i]} channels do not split into {heads[i]} heads "
            "(num_attention_heads, or attention_head_dim when that is unset)"
        )
    return settings

  @property
  def has_cross_attention(self) -> bool:
    return (
        any(DOWN_BLOCK_ATTENTION.get(t) == "cross" for t in self.down_block_types)
        or any(UP_BLOCK_ATTENTION.get(t) == "cross" for t in self.up_block_types)
        or self.mid_block_type == "UNetMidBlock2DCrossAttn"
    )

  def example_inputs(self, batch_size: int = 1, context_length: int = 77) -> dict[str, Array]:
    """Zero inputs of the configured shapes (for `init` / `jax.eval_shape`)."""
    size = self.sample_size or 64
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    inputs = dict(
        sample=jnp.zeros((batch_size, height, width, self.in_channels), jnp.float32),
        timesteps=jnp.zeros((batch_size,), jnp.int32),
    )
    if self.has_cross_attention:
      cross_dim = _per_block(self.cross_attention_dim, len(self.down_block_types), "cross_attention_dim")[0]
      inputs["encoder_hidden_states"] = jnp.zeros((batch_size, context_length, cross_dim), jnp.float32)
    if self.class_embed_type is not None or self.num_class_embeds is not None:
      inputs["class_labels"] = jnp.zeros((batch_size,), jnp.int32)
    return inputs

  # -- forward -------------------------------------------------------------------------------------------------

  @nn.compact
  def __call__(
      self,
      sample: Array,  # [B, H, W, in_channels]
      timesteps: Array,  # [B] or scalar
      encoder_hidden_states: Array | None = None,  # [B, L, cross_attention_dim]
      class_labels: Array | None = None,  # [B] int (or float timesteps for class_embed_type="timestep")
      encoder_attention_mask: Array | None = None,  # [B, L] bool, True = attend
      train: bool = False,
  ) -> Array:
    s = self.block_settings()
    n = len(self.block_out_channels)
    deterministic = not train
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.has_cross_attention and encoder_hidden_states is None:
      raise ValueError("this U-Net has cross-attention blocks: encoder_hidden_states is required")
    context = encoder_hidden_states
    batch = sample.shape[0]

    if self.center_input_sample:
      sample = 2 * sample - 1.0

    # 1. time (and class) embedding
    time_embed_dim = self.time_embedding_dim or 4 * self.block_out_channels[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = timestep_embedding(timesteps, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
    emb = TimestepEmbedding(time_embed_dim, act_fn=self.act_fn, name="time_embedding", **kw)(t_emb.astype(self.dtype))
    if self.class_embed_type is not None or self.num_class_embeds is not None:
      if class_labels is None:
        raise ValueError("class_labels are required for a class-conditional U-Net")
      if self.class_embed_type is None:
        class_emb = nn.Embed(
            self.num_class_embeds,
            time_embed_dim,
            # torch.nn.Embedding's default init, N(0, 1), as in diffusers.
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            name="class_embedding",
            **kw,
        )(class_labels)
      elif self.class_embed_type == "timestep":
        class_t = timestep_embedding(class_labels, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        class_emb = TimestepEmbedding(time_embed_dim, act_fn=self.act_fn, name="class_embedding", **kw)(
            class_t.astype(self.dtype)
        )
      else:
        raise ValueError(f"unsupported class_embed_type {self.class_embed_type!r} (None or 'timestep')")
      emb = emb + class_emb.astype(emb.dtype)

    # 2. down
    common = dict(
        use_linear_projection=self.use_linear_projection,
        upcast_attention=self.upcast_attention,
        norm_num_groups=self.norm_num_groups,
        norm_eps=self.norm_eps,
        resnet_time_scale_shift=self.resnet_time_scale_shift,
        dropout=self.dropout,
        attention_impl=self.attention_impl,
        splash_min_seq_len=self.splash_min_seq_len,
        remat_policy=self.remat_policy,
        **kw,
    )
    h = conv(self.block_out_channels[0], self.conv_in_kernel, name="conv_in", **kw)(sample)
    skips = [h]
    for i, block_type in enumerate(self.down_block_types):
      h, block_skips = DownBlock(
          out_channels=self.block_out_channels[i],
          num_layers=s["layers"][i],
          attn_kind=DOWN_BLOCK_ATTENTION[block_type],
          num_attention_heads=s["heads"][i],
          attention_head_dim=s["head_dims"][i],
          transformer_layers=s["transformer_layers"][i],
          cross_attention_dim=s["cross_dims"][i],
          only_cross_attention=s["only_cross"][i],
          add_downsample=i < n - 1,
          downsample_padding=self.downsample_padding,
          name=f"down_blocks_{i}",
          **common,
      )(h, emb, context, encoder_attention_mask, deterministic)
      skips.extend(block_skips)

    # 3. mid
    if self.mid_block_type is not None:
      cross = self.mid_block_type == "UNetMidBlock2DCrossAttn"
      h = MidBlock(
          out_channels=self.block_out_channels[-1],
          num_layers=1,
          attn_kind="cross" if cross else ("self" if self.mid_block_add_attention else None),
          num_attention_heads=s["heads"][-1],
          attention_head_dim=s["head_dims"][-1],
          transformer_layers=s["transformer_layers"][-1],
          cross_attention_dim=s["cross_dims"][-1],
          output_scale_factor=self.mid_block_scale_factor,
          name="mid_block",
          **common,
      )(h, emb, context, encoder_attention_mask, deterministic)

    # 4. up
    for i, block_type in enumerate(self.up_block_types):
      r = n - 1 - i  # the matching down block
      num_layers = s["layers"][r] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      is_final = i == n - 1
      h = UpBlock(
          out_channels=self.block_out_channels[r],
          num_layers=num_layers,
          attn_kind=UP_BLOCK_ATTENTION[block_type],
          num_attention_heads=s["heads"][r],
          # diffusers indexes attention_head_dim for up blocks without reversing it; kept for compatibility.
          attention_head_dim=s["head_dims"][i],
          transformer_layers=s["transformer_layers"][r],
          cross_attention_dim=s["cross_dims"][r],
          only_cross_attention=s["only_cross"][r],
          add_upsample=not is_final,
          name=f"up_blocks_{i}",
          **common,
      )(
          h,
          tuple(block_skips),
          emb,
          context,
          encoder_attention_mask,
          deterministic,
          # Upsample to the next skip's size: equals 2x unless H or W is not a multiple of 2**(n-1).
          None if is_final else tuple(skips[-1].shape[1:3]),
      )

    # 5. out
    h = GroupNorm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(h)
    h = activation(self.act_fn)(h)
    return conv(self.out_channels, self.conv_out_kernel, name="conv_out", **kw)(h)


# ----------------------------------------------------------------------------------------------------------------
# Configs

_SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,  # = 8 heads (diffusers naming)
    cross_attention_dim=768,
    use_linear_projection=False,
    upcast_attention=False,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
)

_SD21_BASE = dict(_SD15, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)

_TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,  # = 2 heads
    cross_attention_dim=32,
    norm_num_groups=8,
)

_TINY_UNCOND = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=16,  # head width in self-attention blocks
    cross_attention_dim=None,
    norm_num_groups=8,
)

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json): 859,520,964 params.
    "sd15": _SD15,
    # Stable Diffusion 2.1 base (512², epsilon) and 2.1 (768², v-prediction, float32 attention).
    "sd21_base": _SD21_BASE,
    "sd21_v": dict(_SD21_BASE, sample_size=96, upcast_attention=True),
    # Test-sized latent model: 2 levels, 2 heads, 32-wide context.
    "tiny": _TINY,
    # Test-sized pixel-space model without cross-attention.
    "tiny_uncond": _TINY_UNCOND,
    # Small pixel-space DDPM for 32×32 images.
    "ddpm_small": dict(
        _TINY_UNCOND,
        sample_size=32,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,  # one head over all channels
    ),
    # Ho et al. CIFAR-10 DDPM as laid out by diffusers' google/ddpm-cifar10-32 (UNet2DModel), ~35.7M params.
    "ddpm_cifar": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,
        cross_attention_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        dropout=0.1,
    ),
}

_FIELDS = frozenset(
    f for f in UNet2DConditionModel.__dataclass_fields__ if f not in ("parent", "name")
)


def unet_config(name: str, **overrides: Any) -> dict[str, Any]:
  """A fresh dict of UNet2DConditionModel fields for a named config, with `overrides` applied."""
  if name not in UNET_CONFIGS:
    raise ValueError(f"unknown U-Net config {name!r}; known: {sorted(UNET_CONFIGS)}")
  return _check_fields({**UNET_CONFIGS[name], **overrides})


def _check_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
  return layers.check_module_fields(cfg, _FIELDS, "U-Net")


def create_unet(config: str | Mapping[str, Any] = "sd15", **overrides: Any) -> UNet2DConditionModel:
  """Build the U-Net from a config name or a mapping of fields (dict or ml_collections.ConfigDict), with
  `overrides` on top. Unknown keys raise; lists become tuples; dtype strings become dtypes."""
  if isinstance(config, str):
    cfg = unet_config(config)
  else:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  model = UNet2DConditionModel(**_check_fields({**cfg, **overrides}))
  model.block_settings()  # fail on an inconsistent config now rather than at init
  return model


# Keys of a diffusers config.json that carry no structure here, and keys we accept only at these values.
_DIFFUSERS_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "num_train_timesteps",
    # Only read by options rejected below (SimpleCrossAttn mid block, addition / projection embeddings).
    "mid_block_only_cross_attention",
    "addition_embed_type_num_heads",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
}
_DIFFUSERS_DEFAULTS = {
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "class_embeddings_concat": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attn_norm_num_groups": None,
}


def unet_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
  """Fields for this module from a diffusers `UNet2DConditionModel` or `UNet2DModel` config.json dict.

  Raises NotImplementedError for options this implementation does not have (SDXL add-embeddings, dual
  cross-attention, fourier time embedding, ...), naming them.
  """
  d = dict(diffusers_config)
  is_unet2d = d.get("_class_name") == "UNet2DModel"
  cfg: dict[str, Any] = {}
  unsupported = []
  for key, value in d.items():
    if key in _DIFFUSERS_IGNORED or key.startswith("_"):  # diffusers metadata (`_use_default_values`, ...)
      continue
    if key == "add_attention":  # UNet2DModel
      cfg["mid_block_add_attention"] = value
    elif key in _FIELDS:
      cfg[key] = value
    elif key in _DIFFUSERS_DEFAULTS:
      default = _DIFFUSERS_DEFAULTS[key]
      if not (value == default or (value is None and key in ("downsample_type", "upsample_type"))):
        unsupported.append(f"{key}={value!r}")
    else:
      unsupported.append(f"{key}={value!r}")
  if is_unet2d:
    cfg.setdefault("attention_head_dim", 8)
    cfg["cross_attention_dim"] = None
    cfg["mid_block_type"] = "UNetMidBlock2D"
  elif d.get("mid_block_type") == "UNetMidBlock2D":
    # UNet2DConditionModel builds that mid block as a single resnet; not represented here.
    unsupported.append("mid_block_type='UNetMidBlock2D' in a UNet2DConditionModel")
  if unsupported:
    raise NotImplementedError(f"diffusers config options not supported by sd_jax's U-Net: {unsupported}")
  return _check_fields(cfg)


# sd_jax fields that are not diffusers config keys.
_JAX_ONLY = ("dtype", "param_dtype", "attention_impl", "splash_min_seq_len", "remat_policy", "mid_block_add_attention")
_UNET2D_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_dim", "freq_shift",
    "flip_sin_to_cos", "down_block_types", "mid_block_type", "up_block_types", "block_out_channels",
    "layers_per_block", "mid_block_scale_factor", "downsample_padding", "dropout", "act_fn", "attention_head_dim",
    "norm_num_groups", "norm_eps", "resnet_time_scale_shift", "class_embed_type", "num_class_embeds",
)


def unet_config_to_diffusers(config_fields: Mapping[str, Any] | UNet2DConditionModel) -> dict[str, Any]:
  """A diffusers config.json dict for an sd_jax U-Net config: `UNet2DModel` when the model has no
  cross-attention (the pixel-space layout), else `UNet2DConditionModel`. Inverse of unet_config_from_diffusers."""
  module = config_fields if isinstance(config_fields, UNet2DConditionModel) else create_unet(config_fields)
  fields = {f: getattr(module, f) for f in module.__dataclass_fields__ if f not in ("parent", "name", *_JAX_ONLY)}
  if not module.has_cross_attention:
    for key in ("layers_per_block", "attention_head_dim"):
      if isinstance(fields[key], tuple):
        raise ValueError(f"diffusers UNet2DModel takes one {key} for all blocks, got {fields[key]}")
    unsupported = {k: fields[k] for k in ("conv_in_kernel", "conv_out_kernel") if fields[k] != 3}
    if any(fields["only_cross_attention"] if isinstance(fields["only_cross_attention"], tuple)
           else (fields["only_cross_attention"],)):
      unsupported["only_cross_attention"] = fields["only_cross_attention"]
    if unsupported:
      raise ValueError(f"diffusers UNet2DModel has no equivalent for {unsupported}")
    config = {"_class_name": "UNet2DModel", **{k: fields[k] for k in _UNET2D_KEYS}}
    config["add_attention"] = module.mid_block_add_attention
  else:
    config = {"_class_name": "UNet2DConditionModel", **fields}
    # diffusers refuses num_attention_heads (its attention_head_dim means heads in cross-attention blocks).
    heads = config.pop("num_attention_heads")
    if heads is not None:
      config["attention_head_dim"] = heads
  return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
