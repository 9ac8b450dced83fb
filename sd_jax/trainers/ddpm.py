"""Pixel-space diffusion (Ho et al. 2020) with the Stable Diffusion U-Net: unconditional or class-conditional.

The model predicts epsilon or v from x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with a uniformly sampled t; the loss is
the (optionally min-SNR-weighted) MSE. Evaluation: held-out loss, and a grid of samples drawn with the EMA params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sd_jax.diffusion import ddpm_sampler
from sd_jax.diffusion import losses
from sd_jax.diffusion import schedules
from sd_jax.models import unet as unet_lib
from sd_jax import images as images_lib
from sd_jax import train as train_lib


def make_schedule(diffusion_config) -> schedules.NoiseSchedule:
  return schedules.make_schedule(
      diffusion_config.schedule, num_train_timesteps=diffusion_config.num_train_timesteps,
      beta_start=diffusion_config.beta_start, beta_end=diffusion_config.beta_end,
      rescale_zero_terminal_snr=diffusion_config.zero_terminal_snr,
      snr_shift=float(diffusion_config.get("snr_shift", 1.0)))


class Task:
  """The ddpm trainer's model, loss and evaluation (see sd_jax/trainers/__init__.py for the interface)."""

  def __init__(self, config):
    self.config = config
    self.model = unet_lib.create_unet(config.model)
    self.schedule = make_schedule(config.diffusion)
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

  def loss(self, params, frozen, batch, keys):
    del frozen  # pixel-space: no frozen networks
    per_example = self._per_example(params, batch, keys)
    return jnp.mean(per_example), {}

  def eval_metrics(self, params, frozen, batch, keys):
    del frozen
    return {"loss": jnp.mean(self._per_example(params, batch, keys))}

  def sample(self, params, rng, num_images: int, labels=None, num_steps: int | None = None):
    """Images in [-1, 1], [N, H, W, C], with ancestral DDPM sampling."""
    d = self.config.diffusion
    shape = (num_images, self.resolution, self.resolution, self.config.model.out_channels)

    def model_fn(x_t, t):
      return self.model.apply({"params": params}, x_t, t, class_labels=labels)

    return ddpm_sampler.ddpm_sample(model_fn, self.schedule, rng, shape,
                                    num_inference_steps=num_steps or self.config.sample.num_steps,
                                    prediction_type=d.prediction_type, clip_sample=True)

  def on_eval(self, step, state, ctx):
    """Writes a sample grid with the EMA params to WORKDIR/samples/ and TensorBoard."""
    if not train_lib.due(step, self.config.sample_every_steps, step == self.config.total_steps):
      return {}
    params = state.ema_params if state.ema_params is not None else state.params
    n = self.config.sample.num_images
    labels = (jnp.arange(n) % self.config.model.num_class_embeds) if self.class_conditional else None
    if self._sample_fn is None:
      self._sample_fn = jax.jit(lambda p, r: self.sample(p, r, n, labels))
    images = np.asarray(jax.device_get(self._sample_fn(params, jax.random.PRNGKey(self.config.seed))))
    grid = images_lib.make_grid(images_lib.to_uint8(images))
    if jax.process_index() == 0:
      out = epath.Path(ctx.workdir) / "samples"
      out.mkdir(parents=True, exist_ok=True)
      images_lib.save_png(grid, out / f"step_{step:07d}.png")
      ctx.writer.write_image(step, "samples", grid)
    return {}

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

