"""Trainers, chosen by `config.trainer`: each module defines `Task(config)`, a subclass of `base.Task`, the one
typed interface the shared loop (sd_jax/train.py) talks to (sd_jax/trainers/base.py documents it).

  vae    the KL autoencoder (reconstruction + KL, optional LPIPS and patch discriminator)
  clip   CLIP text and image towers trained contrastively (softmax or sigmoid loss; LiT with a locked image tower)
  ldm    the cross-attention U-Net on a frozen VAE's latents, conditioned on a (frozen or tuned) text tower
  ddpm   the U-Net in pixel space, unconditional or class-conditional
  finetune  a Stable Diffusion model on one's own images: LoRA, DreamBooth, textual inversion, full fine-tuning
  dpo       a Stable Diffusion model on preference pairs (Diffusion-DPO, or KTO on single favourites), LoRA or full
"""

import importlib

TRAINERS = {
    "clip": "sd_jax.trainers.clip",
    "ddpm": "sd_jax.trainers.ddpm",
    "dpo": "sd_jax.trainers.dpo",
    "finetune": "sd_jax.trainers.finetune",
    "ldm": "sd_jax.trainers.ldm",
    "vae": "sd_jax.trainers.vae",
}


def get(name: str):
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r} is not a trainer. Valid trainers: {', '.join(sorted(TRAINERS))}.")
  return importlib.import_module(TRAINERS[name])
