"""Pixel-space diffusion (Ho et al. 2020) with the Stable Diffusion U-Net: unconditional or class-conditional.

The model predicts epsilon or v from x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with a uniformly sampled t; the loss is
the (optionally min-SNR-weighted) MSE. Evaluation: held-out loss, and a grid of samples drawn with the EMA params by
sd_jax/diffusion/samplers.py (the sampler settings of config.sample, by default diffusers' DDPMScheduler).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sd_jax import images as images_lib
from sd_jax.diffusion import losses
from sd_jax.diffusion import samplers
from sd_jax.diffusion import schedules
from sd_jax.models import unet as unet_lib
from sd_jax.trainers import base


class Task(base.Task):
  """The ddpm trainer's model, loss and evaluation (the interface: sd_jax/trainers/base.py)."""

  def __init__(self, config):
    super().__init__(config)
    self.model = unet_lib.create_unet(config.model)
    self.schedule = schedules.schedule_from_config(config.diffusion)
    self.sampler_config = samplers.config_from_training(config.diffusion, config.sample,
                                                        sampler=config.sample.get("sampler", "ddpm"))
    self.resolution = config.dataset.resolution
    self.class_conditional = bool(config.model.get("num_class_embeds"))
    self._sample_fn = None  # the jitted sample-grid function, compiled at the first evaluation

  def _labels(self, batch):
    return batch["label"] if self.class_conditional else None

  def init_params(self, rng):
    x = jnp.zeros((1, self.resolution, self.resolution, self.config.model.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32) if self.class_conditional else None
    return self.model.init(rng, x, t, class_labels=labels)["params"]

  def _per_example(self, params, batch, keys):
    d = self.config.diffusion
    x0 = batch["image"]                                                 # [B, H, W, C] in [-1, 1]
    t_keys, n_keys = jax.vmap(lambda k: jax.random.split(k), out_axes=1)(keys)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, d.num_train_timesteps))(t_keys)
    noise = jax.vmap(lambda k: losses.offset_noise(k, (1,) + x0.shape[1:], d.offset_noise)[0])(n_keys)
    x_t = schedules.add_noise(self.schedule, x0, noise, t)
    model_output = self.model.apply({"params": params}, x_t, t, class_labels=self._labels(batch))
    return losses.diffusion_loss(model_output, x0, noise, t, self.schedule, prediction_type=d.prediction_type,
                                 min_snr_gamma=d.min_snr_gamma, reduce=False)

  def loss(self, params, frozen, batch, keys, step=None):
    del frozen  # pixel-space: no frozen networks
    per_example = self._per_example(params, batch, keys)
    return jnp.mean(per_example), {}

  def eval_metrics(self, params, frozen, batch, keys):
    del frozen
    return {"loss": jnp.mean(self._per_example(params, batch, keys))}

  def sample(self, params, seed, num_images: int, labels=None, num_steps: int | None = None):
    """Images in [-1, 1], [N, H, W, C]: images 0..N-1 of `seed` (samplers.image_noise), drawn with config.sample's
    sampler settings. Call inside jax.jit (pass the seed as PRNGKey(seed) there)."""
    shape = (self.resolution, self.resolution, self.config.model.out_channels)
    noise, step_keys = samplers.image_noise(seed, jnp.arange(num_images), shape)

    def model_fn(x_t, t, context):
      del context  # pixel-space: unconditional or class-conditional
      return self.model.apply({"params": params}, x_t, t, class_labels=labels)

    return samplers.sample(model_fn, noise, config=self.sampler_config,
                           num_steps=num_steps or self.config.sample.num_steps, rng=step_keys)

  def sample_grid(self, params, ctx):
    """config.sample.num_images samples (class-conditional: the classes in turn), seed config.seed."""
    n = self.config.sample.num_images
    labels = (jnp.arange(n) % self.config.model.num_class_embeds) if self.class_conditional else None
    if self._sample_fn is None:
      self._sample_fn = jax.jit(lambda p, key: self.sample(p, key, n, labels))
    images = np.asarray(jax.device_get(self._sample_fn(params, jax.random.PRNGKey(self.config.seed))))
    return images_lib.make_grid(images_lib.to_uint8(images))

  def export(self, host_state, ctx):
    """WORKDIR/export/unet: the EMA U-Net as an sd_jax model component (diffusers UNet2DModel config), ready for
    `python -m sd_jax.convert --to_diffusers WORKDIR/export --out DIR`."""
    from sd_jax.weights import store
    params = host_state.ema_params if host_state.ema_params is not None else host_state.params
    out = epath.Path(ctx.workdir) / "export"
    store.save_component(out, "unet", unet_lib.unet_config_to_diffusers(self.config.model.to_dict()), params,
                         overwrite=True)
    if jax.process_index() == 0:
      store.write_index(out, {"unet": "UNet2DModel"}, source=str(ctx.workdir))

