"""An sd_jax model directory with random weights in Stable Diffusion 1.5's shapes, for timing (BENCHMARKS.md).

  python -m experiments.random_model --out=/tmp/sd15_random [--resolution=256] [--seed=0]
  python -m sd_jax.bench --mode=pipeline --model_dir=/tmp/sd15_random --baseline=eager

--unet / --vae / --text name other presets (sd_jax/models: unet.UNET_CONFIGS, vae.VAE_CONFIGS, clip.CLIP_CONFIGS),
e.g. --unet=sd21_base --text=openclip_vit_h14_text for SD 2.1's shapes, or the tiny ones for tests.

Writes the three networks of SD 1.5 with random weights: the U-Net (859.5 M parameters; `sample_size` =
resolution / 8, which sets the generated image size), the KL VAE (83.7 M) and the CLIP ViT-L/14 text tower
(123.1 M, with CLIP's 49,408-row token table), plus a DDIM scheduler config as SD 1.5's, and a CLIP-style BPE
tokenizer trained on a few captions (sd_jax/data/tokenizer.py; its ids are a subset of the table's rows, so the
networks compute exactly what SD 1.5's would on the same ids). Nothing is downloaded. The timings these weights
give are those of the real model: no op depends on the values. An existing --out is never overwritten.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "The model directory to write (must not exist).")
flags.DEFINE_integer("resolution", 512, "Image size the U-Net's sample_size is set for (a multiple of 64).")
flags.DEFINE_integer("seed", 0, "PRNG seed of the random weights.")
flags.DEFINE_string("unet", "sd15", "U-Net preset (sd_jax.models.unet.UNET_CONFIGS).")
flags.DEFINE_string("vae", "sd", "VAE preset (sd_jax.models.vae.VAE_CONFIGS).")
flags.DEFINE_string("text", "openai_vit_l14_text", "Text tower preset (sd_jax.models.clip.CLIP_CONFIGS).")

CAPTIONS = ["a photo of a red circle", "a blue square on a white background", "a green triangle next to a cat",
            "an astronaut riding a horse", "a painting of a city at night"]


def write_random_model(out, resolution: int = 512, seed: int = 0, *, unet: str = "sd15", vae: str = "sd",
                       text: str = "openai_vit_l14_text") -> Path:
  """Writes the model directory (see the module docstring) and returns its path."""
  import flax.linen as nn
  import jax

  from sd_jax.data import tokenizer as tokenizer_lib
  from sd_jax.models import clip as clip_lib
  from sd_jax.models import unet as unet_lib
  from sd_jax.models import vae as vae_lib
  from sd_jax.weights import store

  out = Path(out)
  if out.exists():
    raise FileExistsError(f"{out} exists; choose a new --out (nothing was overwritten).")
  unet_module = unet_lib.create_unet(unet_lib.unet_config(unet))
  vae_module = vae_lib.create_vae(vae)
  text_config = clip_lib.clip_config(text).text
  factor = 2 ** (len(vae_module.block_out_channels) - 1)  # the VAE's downsampling
  multiple = factor * 2 ** (len(unet_module.block_out_channels) - 1)
  if resolution % multiple:
    raise ValueError(f"--resolution={resolution}: use a multiple of {multiple} (the VAE's factor {factor} × the "
                     "U-Net's downsamplings).")
  tmp = out.with_name(out.name + ".partial")
  if tmp.exists():
    store.remove_tree(tmp)
  tok = tokenizer_lib.train_tokenizer(CAPTIONS * 8, str(tmp / "tokenizer"), vocab_size=1024,
                                      max_length=text_config.max_position_embeddings)
  unet_module = unet_module.clone(sample_size=resolution // factor)
  vae_module = vae_module.clone(sample_size=resolution)
  text_module = clip_lib.create_clip_text_model(  # the preset's token table (49,408 rows for CLIP's)
      text_config, vocab_size=max(text_config.vocab_size, tok.vocab_size), bos_token_id=tok.bos_id,
      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  context = text_config.max_position_embeddings
  components = (
      ("unet", unet_module, unet_lib.unet_config_to_diffusers(unet_module), unet_module.example_inputs(1, context)),
      ("vae", vae_module, vae_lib.vae_config_to_diffusers(vae_module), vae_module.example_inputs()),
      ("text_encoder", text_module, clip_lib.clip_config_to_transformers(text_module.config),
       text_module.example_inputs()))
  for i, (name, module, config, inputs) in enumerate(components):
    params = jax.jit(lambda key, inputs, module=module: module.init(key, **inputs))(
        jax.random.PRNGKey(seed + i), inputs)
    params = nn.meta.unbox(params["params"])
    store.save_component(tmp, name, config, params)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"{name}: {count / 1e6:.1f} M parameters", flush=True)
    del params
  (tmp / "scheduler").mkdir()
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({  # SD 1.x's
      "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
      "clip_sample": False}, indent=2))
  store.write_index(tmp, {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"},
                    source=f"random weights: U-Net {unet}, VAE {vae}, text {text} (experiments/random_model.py, "
                           f"seed {seed})")
  os.replace(tmp, out)
  return out


def main(argv):
  del argv
  if not FLAGS.out:
    print("--out=DIR is required: the model directory to write.", file=sys.stderr)
    return 1
  try:
    path = write_random_model(FLAGS.out, FLAGS.resolution, FLAGS.seed, unet=FLAGS.unet, vae=FLAGS.vae,
                              text=FLAGS.text)
  except (FileExistsError, ValueError) as e:
    print(e, file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  app.run(main)
