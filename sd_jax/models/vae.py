"""KL autoencoder (the Stable Diffusion VAE) in Flax Linen, weight-compatible with diffusers' `AutoencoderKL`.

The parameter tree mirrors diffusers' module tree with `.N` indices written `_N`:

    encoder/conv_in, encoder/down_blocks_{i}/resnets_{j}, encoder/down_blocks_{i}/downsamplers_0/conv,
    encoder/mid_block/{resnets_0, attentions_0, resnets_1}, encoder/conv_norm_out, encoder/conv_out,
    quant_conv, post_quant_conv,
    decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/resnets_{j} (layers_per_block + 1 of them),
    decoder/up_blocks_{i}/upsamplers_0/conv, decoder/conv_norm_out, decoder/conv_out.

The module has three entry points (hence `setup`), all NHWC:

    vae = create_vae("sd", dtype="bfloat16")
    params = vae.init(rng, **vae.example_inputs())["params"]
    posterior = vae.apply({"params": params}, images, method=vae.encode)      # DiagonalGaussian
    latents = vae.scale_latents(posterior.sample(rng))                        # what the U-Net is trained on
    images = vae.apply({"params": params}, vae.unscale_latents(latents), method=vae.decode)
    reconstruction, posterior = vae.apply({"params": params}, images)         # __call__: encode then decode

Images are in [-1, 1]; 4-channel latents are `2 ** (len(block_out_channels) - 1)` times smaller per side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models import layers
from sd_jax.models.layers import (
    Array,
    Attention,
    Downsample2D,
    Dtype,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    activation,
    conv,
    remat,
)

# diffusers' Encoder/Decoder hard-code this epsilon for every GroupNorm (resnets, mid attention, conv_norm_out).
VAE_NORM_EPS = 1e-6
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)


# ----------------------------------------------------------------------------------------------------------------
# Posterior


@flax.struct.dataclass
class DiagonalGaussian:
  """diffusers' `DiagonalGaussianDistribution` on NHWC latents; a pytree, so it can leave a jitted function.

  Always float32: the VAE may compute in bfloat16, but exp(logvar) and the KL sum are where low precision hurts.
  """

  mean: Array  # [B, h, w, latent_channels]
  logvar: Array  # same shape, clipped to [-30, 20] as diffusers

  @classmethod
  def from_moments(cls, moments: Array) -> DiagonalGaussian:
    """Splits the encoder's [B, h, w, 2 * latent_channels] output into (mean, logvar) along channels."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: Array) -> Array:
    """mean + std * N(0, 1) (reparameterised, so gradients flow to mean and logvar)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self, other: DiagonalGaussian | None = None) -> Array:
    """KL(self || other) summed over (h, w, c): [B]. `other` None means the standard normal prior."""
    axes = tuple(range(1, self.mean.ndim))
    if other is None:
      return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
    return 0.5 * jnp.sum(
        jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
        axis=axes,
    )

  def nll(self, sample: Array) -> Array:
    """Negative log-likelihood of `sample` summed over (h, w, c): [B]."""
    axes = tuple(range(1, self.mean.ndim))
    log_two_pi = jnp.log(2.0 * jnp.pi)
    return 0.5 * jnp.sum(log_two_pi + self.logvar + jnp.square(sample - self.mean) / self.var, axis=axes)


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class _VAEBlock(nn.Module):
  """Fields and the resnet factory shared by the encoder/decoder blocks."""

  out_channels: int = 128
  num_layers: int = 2
  norm_num_groups: int = 32
  act_fn: str = "silu"
  attention_impl: str | None = "xla"
  splash_min_seq_len: int = layers.SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _resnet(self, name: str, out_channels: int | None = None) -> nn.Module:
    cls = remat(ResnetBlock2D, self.remat_policy, static_argnums=(3,))  # (self, x, temb, deterministic)
    return cls(
        out_channels=out_channels or self.out_channels,
        groups=self.norm_num_groups,
        eps=VAE_NORM_EPS,
        non_linearity=self.act_fn,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )


class DownEncoderBlock(_VAEBlock):
  """diffusers DownEncoderBlock2D: `num_layers` resnets, then (unless last) the stride-2 conv with the
  asymmetric (right, bottom) pad. Params: resnets_{j}, downsamplers_0/conv."""

  add_downsample: bool = True

  @nn.compact
  def __call__(self, h: Array) -> Array:
    for j in range(self.num_layers):
      h = self._resnet(f"resnets_{j}")(h, None, True)
    if self.add_downsample:
      h = Downsample2D(
          self.out_channels, padding=0, dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0"
      )(h)
    return h


class UpDecoderBlock(_VAEBlock):
  """diffusers UpDecoderBlock2D: `num_layers` resnets, then (unless last) nearest ×2 and a 3×3 conv.
  Params: resnets_{j}, upsamplers_0/conv."""

  add_upsample: bool = True

  @nn.compact
  def __call__(self, h: Array) -> Array:
    for j in range(self.num_layers):
      h = self._resnet(f"resnets_{j}")(h, None, True)
    if self.add_upsample:
      h = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(h)
    return h


class VAEMidBlock(_VAEBlock):
  """diffusers UNetMidBlock2D as the VAE builds it (no time embedding): resnets_0, attentions_0 (one head over
  all channels, own GroupNorm, residual), resnets_1. `add_attention=False` drops attentions_0."""

  add_attention: bool = True

  @nn.compact
  def __call__(self, h: Array) -> Array:
    channels = h.shape[-1]
    h = self._resnet("resnets_0", channels)(h, None, True)
    if self.add_attention:
      attn_cls = remat(Attention, self.remat_policy, static_argnums=(4,))  # (self, x, ctx, mask, deterministic)
      h = attn_cls(
          heads=1,
          dim_head=channels,
          bias=True,
          norm_num_groups=self.norm_num_groups,
          eps=VAE_NORM_EPS,
          residual_connection=True,
          attention_impl=self.attention_impl,
          splash_min_seq_len=self.splash_min_seq_len,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="attentions_0",
      )(h, None, None, True)
    return self._resnet("resnets_1", channels)(h, None, True)


class Encoder(nn.Module):
  """diffusers vae.Encoder with double_z: images [B, H, W, in] → moments [B, h, w, 2 * latent_channels]."""

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = "silu"
  mid_block_add_attention: bool = True
  attention_impl: str | None = "xla"
  splash_min_seq_len: int = layers.SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_kw = dict(
        norm_num_groups=self.norm_num_groups,
        act_fn=self.act_fn,
        attention_impl=self.attention_impl,
        splash_min_seq_len=self.splash_min_seq_len,
        remat_policy=self.remat_policy,
        **kw,
    )
    n = len(self.block_out_channels)
    h = conv(self.block_out_channels[0], 3, name="conv_in", **kw)(x)
    for i, channels in enumerate(self.block_out_channels):
      h = DownEncoderBlock(
          out_channels=channels,
          num_layers=self.layers_per_block,
          add_downsample=i < n - 1,
          name=f"down_blocks_{i}",
          **block_kw,
      )(h)
    h = VAEMidBlock(
        out_channels=self.block_out_channels[-1],
        add_attention=self.mid_block_add_attention,
        name="mid_block",
        **block_kw,
    )(h)
    h = GroupNorm(self.norm_num_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(h)
    h = activation(self.act_fn)(h)
    return conv(2 * self.latent_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
  """diffusers vae.Decoder (group norm): latents [B, h, w, latent] → images [B, H, W, out_channels]."""

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2  # the decoder's up blocks have one more resnet each
  out_channels: int = 3
  norm_num_groups: int = 32
  act_fn: str = "silu"
  mid_block_add_attention: bool = True
  attention_impl: str | None = "xla"
  splash_min_seq_len: int = layers.SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_kw = dict(
        norm_num_groups=self.norm_num_groups,
        act_fn=self.act_fn,
        attention_impl=self.attention_impl,
        splash_min_seq_len=self.splash_min_seq_len,
        remat_policy=self.remat_policy,
        **kw,
    )
    n = len(self.block_out_channels)
    h = conv(self.block_out_channels[-1], 3, name="conv_in", **kw)(z)
    h = VAEMidBlock(
        out_channels=self.block_out_channels[-1],
        add_attention=self.mid_block_add_attention,
        name="mid_block",
        **block_kw,
    )(h)
    for i, channels in enumerate(reversed(self.block_out_channels)):
      h = UpDecoderBlock(
          out_channels=channels,
          num_layers=self.layers_per_block + 1,
          add_upsample=i < n - 1,
          name=f"up_blocks_{i}",
          **block_kw,
      )(h)
    h = GroupNorm(self.norm_num_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(h)
    h = activation(self.act_fn)(h)
    return conv(self.out_channels, 3, name="conv_out", **kw)(h)


# ----------------------------------------------------------------------------------------------------------------
# Model


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder of latent diffusion, NHWC. Field names and meanings follow diffusers'
  `AutoencoderKL` config (defaults: the kl-f8 VAE of SD 1.x/2.x); the last block of fields are JAX-side switches.

  Entry points: `encode(images) -> DiagonalGaussian`, `decode(latents) -> images` (in `dtype`),
  `__call__(images, sample_posterior=False, rng=None) -> (reconstruction, posterior)`.
  `scale_latents` / `unscale_latents` apply `scaling_factor` / `shift_factor` and need no params.
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2  # resnets per encoder block; decoder blocks have one more
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, int] = 512  # image size the VAE was trained at (informative; example_inputs)
  scaling_factor: float = 0.18215  # latents fed to the diffusion model are (z - shift_factor) * scaling_factor
  shift_factor: float | None = None  # None = 0 (SD 1.x/2.x); SD3/Flux VAEs set it
  latents_mean: tuple[float, ...] | None = None  # per-channel statistics some VAEs ship (informative only)
  latents_std: tuple[float, ...] | None = None
  mid_block_add_attention: bool = True  # self-attention between the two mid-block resnets
  use_quant_conv: bool = True  # 1×1 conv on the moments after the encoder
  use_post_quant_conv: bool = True  # 1×1 conv on the latents before the decoder
  # JAX-side switches (not part of the diffusers config).
  dtype: Dtype = jnp.float32  # compute / activation dtype; the posterior is always float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = "xla"  # "xla" | "cudnn" | "splash" | None (auto): layers.dot_product_attention
  splash_min_seq_len: int = layers.SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  remat_policy: str = "none"  # "none" | "full" | "dots_saveable" | ... (layers.REMAT_POLICIES), per resnet/attention

  def validate(self) -> None:
    """Raises ValueError on a config this implementation cannot build."""
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
          f"down_block_types {self.down_block_types}, up_block_types {self.up_block_types} and "
          f"block_out_channels {self.block_out_channels} must have the same length"
      )
    bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
    bad += [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
    if bad:
      raise ValueError(f"unsupported VAE block types {bad}; supported: {DOWN_BLOCK_TYPES + UP_BLOCK_TYPES}")
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups "
                         f"{self.norm_num_groups}")
    activation(self.act_fn)  # raises on an unknown name

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for SD's kl-f8)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def example_inputs(self, batch_size: int = 1) -> dict[str, Array]:
    """Zero images of the configured size (for `init` / `jax.eval_shape`)."""
    size = self.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return dict(x=jnp.zeros((batch_size, height, width, self.in_channels), jnp.float32))

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(
        block_out_channels=self.block_out_channels,
        layers_per_block=self.layers_per_block,
        norm_num_groups=self.norm_num_groups,
        act_fn=self.act_fn,
        mid_block_add_attention=self.mid_block_add_attention,
        attention_impl=self.attention_impl,
        splash_min_seq_len=self.splash_min_seq_len,
        remat_policy=self.remat_policy,
        **kw,
    )
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(self.latent_channels, 1, name="post_quant_conv", **kw)

  def encode(self, x: Array) -> DiagonalGaussian:
    """Images [B, H, W, in_channels] in [-1, 1] → posterior over latents [B, H/f, W/f, latent_channels]."""
    moments = self.encoder(x.astype(self.dtype))
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: Array) -> Array:
    """Latents [B, h, w, latent_channels] (unscaled) → images [B, h*f, w*f, out_channels] in `dtype`."""
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(
      self, x: Array, sample_posterior: bool = False, rng: Array | None = None
  ) -> tuple[Array, DiagonalGaussian]:
    """Reconstruction of `x` from the posterior's mode, or from a sample (needs `rng`)."""
    if sample_posterior and rng is None:
      raise ValueError("sample_posterior=True needs an rng")
    posterior = self.encode(x)
    z = posterior.sample(rng) if sample_posterior else posterior.mode()
    return self.decode(z), posterior

  # -- latent scaling (no params) -------------------------------------------------------------------------------

  def scale_latents(self, z: Array) -> Array:
    """VAE latents → the unit-variance latents the diffusion model sees."""
    return (z - (self.shift_factor or 0.0)) * self.scaling_factor

  def unscale_latents(self, latents: Array) -> Array:
    """Inverse of `scale_latents`, before `decode`."""
    return latents / self.scaling_factor + (self.shift_factor or 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Configs

_SD = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # kl-f8 of SD 1.x / 2.x (runwayml/stable-diffusion-v1-5 vae/config.json): 83,653,863 params.
    "sd": _SD,
    # Small f4 VAE for 32×32 images → 8×8×4 latents. scaling_factor 1.0 is a placeholder: after training, set it
    # to 1 / std of the latents (as 0.18215 was measured for kl-f8).
    "f4_small": dict(
        _SD,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=1.0,
    ),
    # Test-sized: 2 levels (f2), one resnet per encoder block, mid-block attention kept.
    "tiny": dict(
        _SD,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=1.0,
    ),
}

_FIELDS = frozenset(f for f in AutoencoderKL.__dataclass_fields__ if f not in ("parent", "name"))


def _check_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
  return layers.check_module_fields(cfg, _FIELDS, "VAE")


def vae_config(name: str, **overrides: Any) -> dict[str, Any]:
  """A fresh dict of AutoencoderKL fields for a named config, with `overrides` applied."""
  if name not in VAE_CONFIGS:
    raise ValueError(f"unknown VAE config {name!r}; known: {sorted(VAE_CONFIGS)}")
  return _check_fields({**VAE_CONFIGS[name], **overrides})


def create_vae(config: str | Mapping[str, Any] = "sd", **overrides: Any) -> AutoencoderKL:
  """Build the VAE from a config name or a mapping of fields (dict or ml_collections.ConfigDict), with
  `overrides` on top. Unknown keys raise; lists become tuples; dtype strings become dtypes."""
  if isinstance(config, str):
    cfg = vae_config(config)
  else:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  model = AutoencoderKL(**_check_fields({**cfg, **overrides}))
  model.validate()  # fail on an inconsistent config now rather than at init
  return model


# diffusers AutoencoderKL.__init__ defaults: a config.json written by an older diffusers lacks the newer keys, and
# a missing key means diffusers' default, not ours.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
# Keys of a diffusers config.json that carry no structure here. force_upcast tells fp16 pipelines to run the VAE
# in float32; here the caller picks `dtype`.
_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast"}


def vae_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
  """Fields for AutoencoderKL from a diffusers `AutoencoderKL` config.json dict.

  Raises NotImplementedError for other autoencoder classes and for options this implementation lacks.
  """
  d = dict(diffusers_config)
  class_name = d.get("_class_name", "AutoencoderKL")
  if class_name != "AutoencoderKL":
    raise NotImplementedError(f"{class_name} is not supported by sd_jax's VAE (AutoencoderKL only)")
  cfg = dict(_DIFFUSERS_DEFAULTS)
  unsupported = []
  for key, value in d.items():
    if key in _DIFFUSERS_IGNORED:
      continue
    if key in _DIFFUSERS_DEFAULTS:
      cfg[key] = value
    else:
      unsupported.append(f"{key}={value!r}")
  if unsupported:
    raise NotImplementedError(f"diffusers config options not supported by sd_jax's VAE: {unsupported}")
  return _check_fields(cfg)


def vae_config_to_diffusers(model: AutoencoderKL) -> dict[str, Any]:
  """diffusers config.json dict for `model` (JAX-side switches dropped)."""
  keys = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
          "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
          "shift_factor", "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv",
          "mid_block_add_attention")
  config: dict[str, Any] = {"_class_name": "AutoencoderKL"}
  for key in keys:
    value = getattr(model, key)
    config[key] = list(value) if isinstance(value, tuple) else value
  return config
