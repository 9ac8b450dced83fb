"""KL autoencoder (the Stable Diffusion VAE) on the procedural shapes dataset: 32×32 images → 8×8×4 latents.

  python -m sd_jax.main --config=configs/shapes_vae.py --workdir=workdirs/shapes_vae
  python -m sd_jax.main --config=configs/shapes_vae.py:runlocal --workdir=/tmp/vae_local   # seconds on a CPU
  python -m sd_jax.main --config=configs/shapes_vae.py:demo --workdir=workdirs/vae_demo     # minutes on a CPU

The run ends by writing WORKDIR/export/vae with the measured latent scaling factor; the latent-diffusion trainer
loads it with `sd_jax.weights.model_dir.load_model(WORKDIR/export, components=("vae",))`.

Args (after the colon): runlocal, demo (size presets), model (a preset of sd_jax.models.vae.vae_config), cpu
(default True: the preset's layout at half width with one resnet per level, 1.2 instead of 6.6 GFLOP per 32×32
image, so that the default run fits in about 12 minutes on 2 CPU cores; cpu=False keeps the preset as it is), gan
(turn the PatchGAN discriminator on, from step 0).

Adversarial fine-tuning with a delayed start (LDM's disc_start), as a second stage from a finished run:

  python -m sd_jax.main --config=configs/shapes_vae.py:gan --workdir=workdirs/shapes_vae_gan \
      --config.init_from=workdirs/shapes_vae --config.init_allow_partial=True

Perceptual loss: --config.losses.perceptual_path=lpips_vgg.safetensors (your LPIPS-VGG weights; see
sd_jax/models/lpips.py for the layout; nothing is downloaded).
Any key can be overridden with --config.KEY=VALUE, e.g. --config.losses.kl_weight=1e-5 --config.mesh.fsdp=2.
"""

import ml_collections

from sd_jax import config_lib
from sd_jax.models import vae as vae_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, demo=False, model="f4_small", cpu=True, gan=False)
  c = config_lib.base_config()
  c.trainer = "vae"
  c.batch_size = 32
  # 1,000 steps with L1 + 10·L2 (losses below): 33.9 dB on `test` (RESULTS.md, "The full presets", run of 2026-11-23),
  # where L1 alone had 29.6 dB at 1,000 steps and 31.0 dB at 1,500. The steps saved go to the LDM stage of
  # `sd_jax.stages --preset=full`.
  c.total_steps = 1_000
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.eval_batches = -1           # PSNR over the whole `test` split (1,000 images)
  c.sample_every_steps = 500
  c.save_every_steps = 500
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.end_lr_factor = 0.02
  c.ema_decay = 0.995

  c.dataset.name = "shapes"
  c.dataset.resolution = 32
  c.dataset.shapes_config = "r32"
  c.dataset.text_key = ""       # images only
  c.dataset.random_flip = True  # no captions to contradict

  c.model = ml_collections.ConfigDict(vae_lib.vae_config("tiny" if arg.runlocal else arg.model))
  c.model.mid_block_add_attention = True  # self-attention between the mid-block resnets
  c.model.dtype = "float32"               # compute dtype ("bfloat16" on accelerators)
  c.model.remat_policy = "none"           # sd_jax.models.layers.REMAT_POLICIES
  if arg.cpu and not arg.runlocal:
    c.model.block_out_channels = tuple(ch // 2 for ch in c.model.block_out_channels)
    c.model.layers_per_block = 1
    c.model.norm_num_groups //= 2

  c.losses = ml_collections.ConfigDict(dict(
      l1_weight=1.0,            # mean |x - x̂| (LDM: L1)
      # mean (x - x̂)². PSNR is an L2 measure: adding 10·L2 to L1 lifted `test` PSNR at 1,000 steps from 29.6 to 33.9
      # dB, and the demo's at 400 × 16 steps from 20.6 to 27.7 dB (RESULTS.md, "What the full presets were chosen
      # from"). runlocal: L1 alone.
      l2_weight=10.0,
      kl_weight=1e-6,           # on the KL summed over the latent / pixels per image: SD kl-f8's meaning
      perceptual_weight=1.0,    # LPIPS, used only with perceptual_path
      perceptual_path="",       # LPIPS-VGG safetensors file; "" = no perceptual loss
      disc_weight=0.0,          # PatchGAN generator weight; 0 = no discriminator (SD kl-f8: 0.5)
      disc_factor=1.0,          # scales both GAN terms once on
      disc_start=0,             # step the GAN terms turn on (LDM: disc_start)
      disc_adaptive=True,       # λ = ‖∇ nll‖ / ‖∇ g‖ at the decoder's last layer
      adaptive_weight_eps=1e-4,
      adaptive_weight_max=1e4,
  ))
  c.disc = ml_collections.ConfigDict(dict(
      channels=64,              # first conv width
      num_layers=3,             # stride-2 convs: 32×32 images → 2×2 logits
      max_channel_mult=8,
      norm="batch",             # batch | group | none
      norm_num_groups=32,
      negative_slope=0.2,
      init_std=0.02,
  ))
  c.sample = ml_collections.ConfigDict(dict(num_images=8))   # reconstruction grid: originals over reconstructions
  c.export = ml_collections.ConfigDict(dict(
      enabled=True,             # write WORKDIR/export/vae at the end of training
      scale_batches=16,         # training batches (in order) for the latent scaling factor; -1 = all
  ))

  if arg.gan:
    # LDM's autoencoder GAN setting: Adam betas (0.5, 0.9), discriminator weight 0.5, hinge loss.
    c.losses.disc_weight = 0.5
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.lr = 2e-4
  if arg.runlocal:
    c.losses.l2_weight = 0.0
  if arg.demo:
    # A few minutes on a 2-core CPU: a short run at a smaller batch.
    c.batch_size = 16
    c.total_steps = 400
    c.log_every_steps = 50
    c.eval_every_steps = 400
    c.eval_batches = 16
    c.sample_every_steps = 400
    c.save_every_steps = 200
    c.optim.warmup_steps = 50
    c.ema_decay = 0.99
    c.export.scale_batches = 8
  if arg.runlocal:
    c.batch_size = 8
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 6
    c.eval_batches = 1
    c.sample_every_steps = 6
    c.save_every_steps = 3
    c.optim.warmup_steps = 2
    c.ema_decay = 0.9
    c.dataset.shapes_config = "r32_tiny"
    c.dataset.resolution = 16   # the tiny 32x32 shapes, resized: compiles and runs in seconds
    c.model.sample_size = 16
    c.disc.channels = 16
    c.disc.num_layers = 2       # 16×16 images → 2×2 logits
    c.disc.norm_num_groups = 8
    c.sample.num_images = 4
    c.export.scale_batches = 2
  return c
