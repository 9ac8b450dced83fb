"""The KL autoencoder (Stable Diffusion's VAE) trainer: reconstruction + KL, optional LPIPS and PatchGAN.

The objective is latent diffusion's `LPIPSWithDiscriminator` (Rombach et al. 2022; taming-transformers), with x the
images in [-1, 1], x̂ the decoding of a posterior *sample* z ~ q(z|x) (one PRNG key per example), D the
discriminator and N = H·W·C the pixels of an image (all `config.losses.*`):

  nll  = l1_weight · mean|x - x̂| + l2_weight · mean (x - x̂)² + perceptual_weight · mean LPIPS(x, x̂)
  gen  = nll + kl_weight · mean_B KL(q(z|x) ‖ N(0, I)) / N + λ · disc_weight · f · (-mean D(x̂))
  disc = f · ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))                      (hinge)
  loss = gen + disc

* Scale: LDM sums the reconstruction loss over pixels; here it is a per-pixel mean, and the KL is divided by N so
  that `kl_weight` keeps LDM's meaning (SD's kl-f8 used 1e-6): `gen` is LDM's generator objective divided by N.
  LDM's learned output log-variance is left out (its nll is rec / exp(logvar) + logvar with logvar ≈ 0).
* λ, the adaptive weight, balances the GAN gradient against the reconstruction gradient at the decoder's last
  layer (`decoder/conv_out/kernel`): ‖∇ nll‖ / (‖∇ g‖ + adaptive_weight_eps), clipped to [0, adaptive_weight_max]
  and held constant (stop_gradient). `disc_adaptive=False` uses λ = 1.
* f = disc_factor once the discriminator is on (step ≥ disc_start), else 0.

**One params tree, one optimizer, one scalar.** The shared loop (sd_jax/train.py) differentiates one loss with
respect to one params tree, {"vae": ..., "disc": ...}. `gen` sees the discriminator only through
`stop_gradient(params["disc"])` and `disc` sees the reconstruction only through `stop_gradient(x̂)`, so the
gradient of `loss` is ∇_vae gen for the autoencoder and ∇_disc disc for the discriminator: the two players'
updates of an alternating GAN step, computed in one pass and applied by the one optimizer (same learning rate,
betas and gradient clipping for both; LDM also uses one Adam setting for both). The logged `loss` is their sum;
`nll`, `kl`, `g_loss` and `d_loss` are logged apart.

**disc_start.** The loop (sd_jax/train.py) passes the step to `Task.loss`; the GAN terms are multiplied by
f = 0 before `losses.disc_start` and by `losses.disc_factor` from then on (LDM's `disc_start`), inside the one
compiled step.

Evaluation: `eval_psnr`, `eval_l1`, `eval_l2` and `eval_kl` on the held-out split from the posterior *mode*, and a
grid of originals (top row) over reconstructions in WORKDIR/samples/ and TensorBoard. At the end of training,
`export` measures the latent scaling factor (1 / std of posterior-mode latents over training images) and writes
the autoencoder with it to WORKDIR/export/vae (sd_jax/weights/store.py), which
`sd_jax.weights.model_dir.load_model(WORKDIR/export, components=("vae",))` reads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from sd_jax import images as images_lib
from sd_jax import parallel
from sd_jax.data import input_pipeline
from sd_jax.models import discriminator as disc_lib
from sd_jax.models import lpips as lpips_lib
from sd_jax.models import vae as vae_lib
from sd_jax.trainers import base
from sd_jax.weights import store

EXPORT_DIR = "export"  # WORKDIR/export: the sd_jax model directory the next stage loads


# ---------------------------------------------------------------------------------------------------------------
# Loss pieces


def psnr(images: jax.Array, reference: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image, [B]: 10 log10(data_range² / MSE). Images in [-1, 1] have a
  data range of 2 (the same PSNR as on [0, 1] images with range 1)."""
  mse = jnp.mean(jnp.square(images.astype(jnp.float32) - reference.astype(jnp.float32)),
                 axis=tuple(range(1, images.ndim)))
  return 10.0 * jnp.log10(data_range**2 / mse)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """The discriminator's hinge loss: ½ (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def _last_layer(vae_params):
  """The decoder's last layer, where the adaptive GAN weight compares gradients."""
  return vae_params["decoder"]["conv_out"]["kernel"]


def _with_last_layer(vae_params, kernel):
  """`vae_params` with the decoder's last kernel replaced (a shallow copy; nothing else is touched)."""
  decoder = dict(vae_params["decoder"])
  decoder["conv_out"] = {**decoder["conv_out"], "kernel": kernel}
  return {**vae_params, "decoder": decoder}


def _frobenius(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


# ---------------------------------------------------------------------------------------------------------------
# The task


class Task(base.Task):
  """The vae trainer's model, loss, evaluation and export (the interface: sd_jax/trainers/base.py)."""

  grid_tag = "reconstructions"

  def __init__(self, config):
    super().__init__(config)
    self.losses = config.losses
    self.model = vae_lib.create_vae(config.model)
    self.resolution = config.dataset.resolution
    self.num_pixels = self.resolution * self.resolution * self.model.in_channels
    self.gan = self.losses.disc_weight > 0
    self.disc = disc_lib.NLayerDiscriminator(**config.disc.to_dict()) if self.gan else None
    self.perceptual = bool(self.losses.perceptual_path) and self.losses.perceptual_weight > 0
    self.lpips = lpips_lib.LPIPS() if self.perceptual else None
    self._validate()
    self._recon_fn = None  # jitted reconstruction for the grid, compiled at the first evaluation

  def _validate(self) -> None:
    """Fails on a config that cannot train, naming the key, before anything is compiled."""
    c = self.losses
    for key in ("l1_weight", "l2_weight", "kl_weight", "perceptual_weight", "disc_weight", "disc_factor"):
      if c[key] < 0:
        raise ValueError(f"config.losses.{key}={c[key]}: loss weights must be >= 0.")
    if not (c.l1_weight > 0 or c.l2_weight > 0 or self.perceptual):
      raise ValueError("config.losses: no reconstruction term; set l1_weight or l2_weight > 0 (or perceptual_path "
                       "with perceptual_weight > 0).")
    if c.disc_start < 0:
      raise ValueError(f"config.losses.disc_start={c.disc_start}: must be >= 0.")
    factor = self.model.downsample_factor
    if self.resolution % factor:
      raise ValueError(f"config.dataset.resolution={self.resolution} is not divisible by the VAE's downsampling "
                       f"factor {factor} (len(config.model.block_out_channels)={len(self.model.block_out_channels)}).")
    if self.gan:
      if self.config.disc.norm not in disc_lib.NORMS:
        raise ValueError(f"config.disc.norm={self.config.disc.norm!r}: use one of {disc_lib.NORMS}.")
      if self.disc.output_size(self.resolution) < 1:
        raise ValueError(f"config.disc.num_layers={self.disc.num_layers} leaves no logits for "
                         f"{self.resolution}x{self.resolution} images; lower it.")
    if self.perceptual and not epath.Path(c.perceptual_path).exists():
      raise FileNotFoundError(f"config.losses.perceptual_path={c.perceptual_path!r} does not exist. It must be an "
                              "LPIPS-VGG safetensors file you provide (sd_jax/models/lpips.py says how to write one); "
                              "nothing is downloaded. Set it to '' to train without the perceptual loss.")

  # -- params and frozen networks ---------------------------------------------------------------------------------

  def init_params(self, rng):
    vae_rng, disc_rng = jax.random.split(rng)
    x = jnp.zeros((1, self.resolution, self.resolution, self.model.in_channels), jnp.float32)
    params = {"vae": self.model.init(vae_rng, x)["params"]}
    if self.gan:
      params["disc"] = self.disc.init(disc_rng, x)["params"]
    return params

  def frozen_abstract(self):
    """The LPIPS network when the perceptual loss is on (sharded once, never trained or saved), else nothing."""
    return {"lpips": lpips_lib.abstract_params(self.lpips)} if self.perceptual else {}

  def load_frozen(self):
    return {"lpips": lpips_lib.load_lpips_params(self.losses.perceptual_path, self.lpips)} if self.perceptual else {}

  # -- the objective ---------------------------------------------------------------------------------------------

  def _nll(self, recon, x, frozen):
    """The reconstruction objective (a scalar) and its parts."""
    c = self.losses
    diff = recon - x
    parts = {"rec_l1": jnp.mean(jnp.abs(diff)), "rec_l2": jnp.mean(jnp.square(diff))}
    nll = c.l1_weight * parts["rec_l1"] + c.l2_weight * parts["rec_l2"]
    if self.perceptual:
      parts["perceptual"] = jnp.mean(self.lpips.apply({"params": frozen["lpips"]}, x, recon))
      nll = nll + c.perceptual_weight * parts["perceptual"]
    return nll, parts

  def _gan_factor(self, step):
    """f: disc_factor once the discriminator is on."""
    c = self.losses
    if step is None:
      if c.disc_start > 0:
        raise ValueError(f"config.losses.disc_start={c.disc_start}: Task.loss needs the training step (the loop "
                         "in sd_jax/train.py passes it); call loss(..., step=step).")
      return jnp.float32(c.disc_factor)
    return jnp.where(step >= c.disc_start, c.disc_factor, 0.0).astype(jnp.float32)

  def objectives(self, params, frozen, batch, keys, step=None):
    """(gen, disc, metrics): the autoencoder's and the discriminator's objectives (module docstring).

    The gradient of `gen` reaches only params["vae"] and that of `disc` only params["disc"].
    """
    c = self.losses
    x = batch["image"].astype(jnp.float32)                                 # [B, H, W, C] in [-1, 1]
    vae_params = params["vae"]
    posterior = self.model.apply({"params": vae_params}, x, method=self.model.encode)
    # One key per example: the noise does not depend on how the batch is split over devices.
    noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], posterior.mean.dtype))(keys)
    z = posterior.mean + posterior.std * noise                             # [B, h, w, latent_channels]

    def decode(kernel):
      params_ = _with_last_layer(vae_params, kernel)
      return self.model.apply({"params": params_}, z, method=self.model.decode).astype(jnp.float32)

    if self.gan:
      # The same forward pass, also linearized in the last kernel: the adaptive weight's two gradients there are
      # this vjp applied to ∂nll/∂x̂ and ∂g/∂x̂ (only the last conv is differentiated again).
      recon, last_layer_vjp = jax.vjp(decode, _last_layer(vae_params))
    else:
      recon = decode(_last_layer(vae_params))

    nll, metrics = self._nll(recon, x, frozen)
    kl = jnp.mean(posterior.kl())  # KL summed over the latent, averaged over the batch (as LDM logs it)
    gen = nll + c.kl_weight * kl / self.num_pixels
    metrics.update(nll=nll, kl=kl)
    if not self.gan:
      return gen, jnp.zeros((), jnp.float32), metrics

    factor = self._gan_factor(step)
    frozen_disc = jax.lax.stop_gradient(params["disc"])  # the generator term must not train the discriminator

    def g_loss_fn(images):
      return -jnp.mean(self.disc.apply({"params": frozen_disc}, images))

    g_loss = g_loss_fn(recon)
    if c.disc_adaptive:
      held = jax.lax.stop_gradient(recon)
      nll_grad = last_layer_vjp(jax.grad(lambda r: self._nll(r, x, frozen)[0])(held))[0]
      g_grad = last_layer_vjp(jax.grad(g_loss_fn)(held))[0]
      adaptive = jnp.clip(_frobenius(nll_grad) / (_frobenius(g_grad) + c.adaptive_weight_eps),
                          0.0, c.adaptive_weight_max)
      adaptive = jax.lax.stop_gradient(adaptive)
    else:
      adaptive = jnp.float32(1.0)
    d_weight = adaptive * c.disc_weight
    gen = gen + d_weight * factor * g_loss

    # The discriminator sees the reconstruction as a constant: its loss must not train the autoencoder.
    logits_real = self.disc.apply({"params": params["disc"]}, x)
    logits_fake = self.disc.apply({"params": params["disc"]}, jax.lax.stop_gradient(recon))
    d_loss = hinge_d_loss(logits_real, logits_fake)
    metrics.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight, gan_factor=factor,
                   logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
    return gen, factor * d_loss, metrics

  def loss(self, params, frozen, batch, keys, step=None):
    """gen + disc: one scalar whose gradient is each network's own objective's (module docstring)."""
    gen, disc, metrics = self.objectives(params, frozen, batch, keys, step)
    return gen + disc, metrics

  # -- evaluation ------------------------------------------------------------------------------------------------

  def reconstruct(self, vae_params, images):
    """Decoding of the posterior mode, clipped to [-1, 1] (the image one would look at), and the posterior."""
    recon, posterior = self.model.apply({"params": vae_params}, images)
    return jnp.clip(recon.astype(jnp.float32), -1.0, 1.0), posterior

  def eval_metrics(self, params, frozen, batch, keys):
    """Held-out PSNR (dB), L1 and L2 of the posterior-mode reconstruction, and the KL (summed over the latent)."""
    del frozen, keys  # the mode is deterministic
    x = batch["image"].astype(jnp.float32)
    recon, posterior = self.reconstruct(params["vae"], x)
    return {"psnr": jnp.mean(psnr(recon, x)), "l1": jnp.mean(jnp.abs(recon - x)),
            "l2": jnp.mean(jnp.square(recon - x)), "kl": jnp.mean(posterior.kl())}

  def sample_grid(self, params, ctx):
    """Originals of the first held-out batch (top row) over their reconstructions."""
    params = params["vae"]
    iterator = ctx.eval_iterator_fn()
    try:
      batch = parallel.host_batch_to_global(next(iterator), ctx.batch_sharding)
    finally:
      iterator.close()
    n = min(self.config.sample.num_images, batch["image"].shape[0])
    if self._recon_fn is None:
      # Replicated output: every process can read the first n images, wherever they live.
      self._recon_fn = jax.jit(lambda p, x: (x[:n], self.reconstruct(p, x)[0][:n]),
                               out_shardings=NamedSharding(ctx.mesh, P()))
    originals, recon = jax.device_get(self._recon_fn(params, batch["image"]))
    return images_lib.make_grid(images_lib.to_uint8(np.concatenate([originals, recon])), columns=n)

  # -- export ----------------------------------------------------------------------------------------------------

  def latent_stats(self, vae_params, ctx) -> dict[str, float]:
    """Mean and std of posterior-mode latents over `config.export.scale_batches` training batches (in order,
    without augmentation), and the scaling factor 1 / std that makes them unit-variance for the diffusion model."""
    config = self.config
    sharding = ctx.batch_sharding
    replicated = NamedSharding(ctx.mesh, P())
    vae_params = jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda index: np.asarray(x)[index]),
        vae_params)

    @functools.partial(jax.jit, out_shardings=replicated)
    def moments(p, images):
      z = self.model.apply({"params": p}, images, method=self.model.encode).mode()
      return jnp.sum(z), jnp.sum(jnp.square(z)), z.size

    iterator = input_pipeline.create_iterator(config.dataset, split=config.dataset.train_split,
                                        global_batch_size=config.batch_size, seed=config.seed, train=False,
                                        drop_remainder=True)
    total, total_sq, count = 0.0, 0.0, 0
    try:
      for i, local_batch in enumerate(iterator):
        if i >= config.export.scale_batches > 0:
          break
        images = parallel.host_batch_to_global(local_batch, sharding)["image"]
        s, sq, n = jax.device_get(moments(vae_params, images))
        total, total_sq, count = total + float(s), total_sq + float(sq), count + int(n)
    finally:
      iterator.close()
    if not count:
      raise ValueError(f"config.dataset.train_split={config.dataset.train_split!r} has fewer than "
                       f"config.batch_size={config.batch_size} examples: no latents to measure the scaling factor.")
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    return {"latent_mean": mean, "latent_std": std, "scaling_factor": 1.0 / std}

  def export(self, host_state, ctx):
    """WORKDIR/export/vae: the autoencoder (EMA params if any), with the measured scaling factor in its config."""
    if not self.config.export.enabled:
      return
    params = (host_state.ema_params if host_state.ema_params is not None else host_state.params)["vae"]
    stats = self.latent_stats(params, ctx)
    step = int(np.asarray(host_state.step))
    logging.info("Latents (posterior mode) over %s training images: mean %.4f, std %.4f -> scaling_factor %.5f.",
                 self.config.export.scale_batches * self.config.batch_size if self.config.export.scale_batches > 0
                 else "all", stats["latent_mean"], stats["latent_std"], stats["scaling_factor"])
    ctx.writer.write(step, {f"export_{k}": v for k, v in stats.items()})
    module = self.model.clone(scaling_factor=stats["scaling_factor"])
    out = epath.Path(ctx.workdir) / EXPORT_DIR
    # Every process takes part in the orbax save; re-exporting the run's own directory replaces it.
    store.save_component(out, "vae", vae_lib.vae_config_to_diffusers(module), params, overwrite=True)
    if jax.process_index() == 0:
      store.write_index(out, {"vae": "AutoencoderKL"}, source=str(ctx.workdir))
    logging.info("Exported the autoencoder to %s (load with sd_jax.weights.model_dir.load_model).", out)
