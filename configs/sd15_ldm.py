"""Latent diffusion with the Stable Diffusion 1.5 U-Net: 64×64×4 latents of 512² images, 77×768 CLIP-L contexts.

The U-Net is exactly SD 1.5's (block_out_channels 320/640/1280/1280, 8 heads, cross_attention_dim 768,
layers_per_block 2; 859,520,964 params), computing in bfloat16 with float32 params, AdamW state and EMA, as the
published SD training runs did. It is the configuration the benchmark and memory-planning tables in BENCHMARKS.md
are about:

  python -m sd_jax.bench --config=configs/sd15_ldm.py --mode=train --config.batch_size=32       # on one GPU/TPU
  python -m sd_jax.bench --config=configs/sd15_ldm.py:res=256 --mode=train --config.batch_size=128
  python -m sd_jax.bench --config=configs/sd15_ldm.py --mode=sample                              # 50 DDIM steps + VAE
  python -m sd_jax.bench --config=configs/sd15_ldm.py --aot --aot_devices=8,64 --aot_meshes=data,fsdp

The bench feeds the U-Net step precomputed latents (VAE posterior mean / log-variance) and text contexts, so no VAE
or text tower runs (sd_jax/bench.py, `LatentUNetTask`). Training for real goes through the ldm trainer
(sd_jax/trainers/ldm.py), which needs the frozen networks, e.g. Stable Diffusion's own converted with
`python -m sd_jax.convert --from_diffusers DIR --out SD15`:

  python -m sd_jax.main --config=configs/sd15_ldm.py:vae_from=SD15,text_from=SD15 --workdir=workdirs/sd15 \
      --config.dataset.folder=DATA_DIR

Args (after the colon): res (512 | 256: image size; latents are res/8), demo (the SD 1.5 U-Net at 256², batch 32,
1,000 steps: a short fine-tune), runlocal (a test-sized U-Net with the same block layout, for CPU tests of the
tooling), folder (the training images, default data/sd15), vae_from,
text_from (sd_jax model directories for the ldm trainer). Any key can be overridden with --config.KEY=VALUE,
e.g. --config.model.remat_policy=dots_saveable --config.model.attention_impl=cudnn --config.mesh.fsdp=8.
On TPU, --config.model.attention_impl=splash runs the Pallas splash (flash) attention kernel wherever a layer attends
over at least --config.model.splash_min_seq_len tokens (4096: the first level at 512²).
"""

import ml_collections

from sd_jax import config_lib
from sd_jax.models import unet as unet_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, res=512, runlocal=False, demo=False, folder="data/sd15",
                              vae_from="", text_from="")
  res = 256 if arg.demo else arg.res
  if res % 64:
    raise ValueError(f"config arg res={res}: use a multiple of 64 (latents res/8 must halve three times).")
  c = config_lib.base_config()
  c.trainer = "ldm"
  c.batch_size = 256            # global; SD 1.5 trained at 2048 (256 per 8-GPU node with grad accumulation)
  c.total_steps = 200_000
  c.log_every_steps = 100
  c.eval_every_steps = 5_000
  c.sample_every_steps = 5_000
  c.save_every_steps = 5_000
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10_000
  c.optim.schedule = "constant"
  c.optim.weight_decay = 1e-2
  c.optim.grad_clip_norm = 1.0
  c.ema_decay = 0.9999

  c.ldm = ml_collections.ConfigDict(dict(
      vae_from=arg.vae_from,    # sd_jax model dir with vae/ (frozen); the bench does not read it
      text_from=ml_collections.FieldReference(arg.text_from, field_type=str),  # with text_encoder/, tokenizer/
      train_text_encoder=False,
      clip_skip=0,
      caption_dropout=0.1,      # the empty prompt's context instead, for classifier-free guidance
      frozen_dtype="bfloat16",
      precompute_dir="",
      precompute_dtype="bfloat16",
  ))

  c.dataset.name = "folder"
  c.dataset.folder = arg.folder  # images + metadata.jsonl (sd_jax/data/folder.py); the bench reads no data
  c.dataset.resolution = res
  c.dataset.text_key = "caption"
  c.dataset.tokenizer = c.ldm.get_ref("text_from") + "/tokenizer"
  c.dataset.max_text_len = 77   # CLIP-L context length

  # The SD 1.5 U-Net; bf16 activations and matmuls, float32 params (and so float32 AdamW moments and EMA).
  c.model = ml_collections.ConfigDict(unet_lib.unet_config(
      "sd15", sample_size=res // 8, attention_impl="xla", splash_min_seq_len=4096, remat_policy="none"))
  c.model.dtype = "bfloat16"    # ConfigDicts hold dtype names, not numpy dtypes
  c.model.param_dtype = "float32"

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="scaled_linear",
      num_train_timesteps=1000,
      beta_start=0.00085,
      beta_end=0.012,
      prediction_type="epsilon",
      min_snr_gamma=0.0,
      offset_noise=0.0,
      zero_terminal_snr=False,
  ))
  # Stable Diffusion's scheduler (runwayml/stable-diffusion-v1-5 scheduler_config.json) for sample grids and the bench.
  c.sample = ml_collections.ConfigDict(dict(
      prompts=(), num_prompts=8, images_per_prompt=2,
      sampler="ddim",
      num_steps=50,
      guidance_scale=7.5,
      eta=0.0,
      timestep_spacing="leading",
      steps_offset=1,
      set_alpha_to_one=False,
      tile_size=256,
  ))
  # What sd_jax/bench.py needs beyond the trainer's keys.
  c.bench = ml_collections.ConfigDict(dict(
      vae="sd",                 # VAE config (sd_jax.models.vae.VAE_CONFIGS) decoded in --mode=sample; its
                                # scaling_factor scales the synthetic latents in --mode=train
      lora_rank=0,              # > 0: the step of a LoRA fine-tune (frozen U-Net, rank-r adapters) instead
      lora_targets="attention",  # sd_jax.lora.UNET_TARGETS
  ))

  if arg.demo:
    c.batch_size = 32
    c.total_steps = 1_000
    c.optim.warmup_steps = 100
    c.eval_every_steps = c.sample_every_steps = c.save_every_steps = 500
  if arg.runlocal:
    # Test-sized: the same block layout (3 cross-attention levels, a plain one, cross-attention mid block), tiny
    # widths and a short context, so the CPU tests of the bench compile in seconds.
    c.model = ml_collections.ConfigDict(unet_lib.unet_config(
        "sd15", sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=32, norm_num_groups=8, attention_impl="xla", splash_min_seq_len=4096,
        remat_policy="none"))
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.dataset.resolution = 16   # with the test-sized VAE (f2): 8×8 latents
    c.dataset.max_text_len = 8
    c.bench.vae = "tiny"
    c.batch_size = 8
    c.total_steps = 6
    c.optim.warmup_steps = 2
    c.sample.num_steps = 4
  return c
