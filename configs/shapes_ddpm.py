"""Pixel-space DDPM on the procedural shapes dataset: the small real model that proves the training loop.

  python -m sd_jax.main --config=configs/shapes_ddpm.py --workdir=workdirs/shapes_ddpm
  python -m sd_jax.main --config=configs/shapes_ddpm.py:runlocal --workdir=/tmp/ddpm_local   # seconds on a CPU
  python -m sd_jax.main --config=configs/shapes_ddpm.py:demo --workdir=workdirs/ddpm_demo     # minutes on a CPU

Args (after the colon): runlocal, demo (size presets), model (a U-Net preset of sd_jax.models.unet), res (32|64).
Any key can be overridden with --config.KEY=VALUE, e.g. --config.optim.lr=3e-4 --config.mesh.fsdp=2.
"""

import ml_collections

from sd_jax import config_lib
from sd_jax.models import unet as unet_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, demo=False, model="ddpm_small", res=32)
  c = config_lib.base_config()
  c.trainer = "ddpm"
  c.batch_size = 64
  c.total_steps = 20_000
  c.log_every_steps = 100
  c.eval_every_steps = 2_000
  c.sample_every_steps = 2_000
  c.save_every_steps = 2_000
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 500
  c.ema_decay = 0.999

  c.dataset.name = "shapes"
  c.dataset.resolution = arg.res
  c.dataset.shapes_config = f"r{arg.res}"
  c.dataset.text_key = ""
  c.dataset.random_flip = False  # captions say left/right: flips would contradict them

  c.model = ml_collections.ConfigDict(unet_lib.unet_config("tiny_uncond" if arg.runlocal else arg.model))
  c.model.sample_size = arg.res

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",        # linear | scaled_linear | cosine
      num_train_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      prediction_type="epsilon",  # epsilon | v_prediction
      min_snr_gamma=0.0,        # 0 = off; 5 is the paper's value
      offset_noise=0.0,
      zero_terminal_snr=False,
  ))
  # Sample grids: diffusers' DDPMScheduler (ancestral, β̃ variance) with "leading" spacing from t = T - T/n, the
  # predicted x0 clipped to the data range [-1, 1].
  c.sample = ml_collections.ConfigDict(dict(num_images=16, num_steps=250, sampler="ddpm", timestep_spacing="leading",
                                            steps_offset=0, clip_sample=True))

  if arg.demo:
    # A few minutes on a 2-core CPU: a lighter U-Net (one resnet per level) and a short run.
    c.model.layers_per_block = 1
    c.batch_size = 16
    c.total_steps = 800
    c.log_every_steps = 50
    c.eval_every_steps = 400
    c.sample_every_steps = 800
    c.save_every_steps = 400
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.ema_decay = 0.995
    c.sample.num_steps = 100
  if arg.runlocal:
    c.batch_size = 8
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 6
    c.eval_batches = 1
    c.sample_every_steps = -1
    c.save_every_steps = 3
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-3
    c.ema_decay = 0.9
    c.dataset.shapes_config = f"r{arg.res}_tiny"
    c.dataset.resolution = 16  # the tiny 32x32 shapes, resized: compiles and runs in seconds
    c.model.sample_size = 16
    c.sample.num_images = 4
    c.sample.num_steps = 10
  return c
