"""Fine-tune a Stable Diffusion model on one's own images (sd_jax/trainers/finetune.py): one preset per method.

  python -m sd_jax.main --config=configs/finetune.py:method=lora,base=MODEL,data=PHOTOS \\
      --config.finetune.instance_prompt="a photo of sks dog" --workdir=workdirs/ft_lora
  python -m sd_jax.main --config=configs/finetune.py:method=dreambooth,prior=True,base=MODEL,data=PHOTOS \\
      --config.finetune.instance_prompt="a photo of sks dog" --config.finetune.class_prompt="a photo of a dog" \\
      --workdir=workdirs/ft_dreambooth
  python -m sd_jax.main --config=configs/finetune.py:method=textual_inversion,base=MODEL,data=PHOTOS \\
      --config.finetune.instance_prompt="a photo of <sks-concept>" --workdir=workdirs/ft_ti

MODEL is an sd_jax model directory, a training workdir (e.g. the demo's workdirs/demo/ldm), a diffusers directory or
an original single .safetensors file (converted once, cached). PHOTOS is a folder of images with metadata.jsonl
captions, or a bare folder of images captioned by finetune.instance_prompt. The results (WORKDIR/export) load with
`python -m sd_jax.sample --pretrained MODEL --lora WORKDIR/export/pytorch_lora_weights.safetensors` (LoRA),
`--embedding WORKDIR/export/learned_embeds.safetensors` (textual inversion), or `--pretrained WORKDIR/export` (full).

Args (after the colon): method, base, data, prior (DreamBooth's prior preservation), demo (minutes on a CPU: the
sizes for fine-tuning the shapes model that README's first command trains), runlocal (test sizes).
Methods (the recipes of diffusers' examples for SD 1.x at 512², which the shapes models' sizes scale down):
  lora               U-Net LoRA (rank 4, alpha 4, to_q/k/v/out) on captioned images; lr 1e-4, 500 steps
  dreambooth         the whole U-Net on an instance prompt (+ prior preservation); lr 5e-6, 400 steps (800 with prior)
  dreambooth_lora    DreamBooth with a U-Net LoRA; lr 1e-4, 500 steps
  textual_inversion  one new token (finetune.new_tokens), only its embedding row trains; lr 5e-4, 3000 steps
  full               the whole U-Net on captioned images, with EMA; lr 1e-5 (at scale: --config.mesh.fsdp=N)
Any key can be overridden with --config.KEY=VALUE (finetune.lora.rank, finetune.text_encoder=lora, ...).
"""

import ml_collections

from sd_jax import config_lib

METHODS = ("lora", "dreambooth", "dreambooth_lora", "textual_inversion", "full")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="lora", base="", data="", prior=False, runlocal=False, demo=False)
  if arg.method not in METHODS:
    raise ValueError(f"config arg method={arg.method!r}: use one of {', '.join(METHODS)}.")
  c = config_lib.base_config()
  c.trainer = "finetune"
  c.finetune = ml_collections.ConfigDict(dict(
      base=arg.base,            # the model to fine-tune (module docstring); never modified
      data=arg.data,            # a folder of images: metadata.jsonl captions, or instance_prompt for every image
      allow_pickle=False,       # also read pickle-based base weights (.ckpt / .bin): only for files you trust
      unet="lora",              # lora | full | frozen
      text_encoder="frozen",    # frozen | lora | full
      new_tokens=(),            # textual inversion: new tokens (lowercase words such as "<sks-concept>")
      initializer="",           # a word whose embedding the new tokens start from ("" = the table's mean)
      instance_prompt="",       # DreamBooth: every image's caption, e.g. "a photo of sks dog"
      prior_preservation=arg.prior,
      class_prompt="",          # e.g. "a photo of a dog": what the class images show
      num_class_images=200,     # drawn once by the base model into WORKDIR/finetune_data/class_images
      prior_loss_weight=1.0,    # λ of loss = instance + λ · prior
      class_steps=25,           # sampler steps, guidance, seed and batch of the class images
      class_guidance=7.5,
      class_seed=0,
      class_batch_size=8,
      caption_dropout=0.0,      # probability of training on the empty prompt instead of the caption
      min_snr_gamma=0.0,        # min-SNR-γ loss weighting (0 = off)
      offset_noise=0.0,
      resolution=0,             # training images are resized and cropped to this; 0 = the base's native size
      frozen_dtype="float32",   # compute dtype of the networks (bfloat16 on accelerators)
      lora=ml_collections.ConfigDict(dict(
          rank=4,
          alpha=0.0,            # 0 = rank (scale 1), as diffusers' examples
          dropout=0.0,
          unet_targets="attention",  # attention (to_q/k/v/out) | transformer (+ proj_in/out, ff) | resnet (+ convs)
      )),
  ))
  c.dataset.name = "folder"
  c.dataset.folder = c.finetune.get_ref("data")  # what setup() checks; the trainer reads its own copy
  c.dataset.resolution = 512    # replaced by the trainer with finetune.resolution (what the tests and setup see)
  c.dataset.crop = "random"
  c.dataset.random_flip = True
  c.dataset.text_key = "caption"
  c.dataset.label_key = "prior"
  c.batch_size = 1
  c.total_steps = 500
  c.log_every_steps = 10
  c.eval_every_steps = -1       # the images are the training set: the sample grids show progress
  c.sample_every_steps = 100
  c.save_every_steps = 100
  c.keep = 2
  c.ema_decay = 0.0
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 1e-2
  c.optim.grad_clip_norm = 1.0
  c.sample = ml_collections.ConfigDict(dict(
      prompts=(),               # () = the instance prompt / the new tokens / the class prompt
      images_per_prompt=4,
      sampler="ddim",
      num_steps=25,
      guidance_scale=7.5,
      tile_size=128,
  ))

  f = c.finetune
  if arg.method == "dreambooth":
    f.unet = "full"
    c.optim.lr = 5e-6
    c.total_steps = 800 if arg.prior else 400
  elif arg.method == "dreambooth_lora":
    f.unet = "lora"
  elif arg.method == "textual_inversion":
    f.unet = "frozen"
    f.new_tokens = ("<sks-concept>",)
    c.optim.lr = 5e-4
    c.total_steps = 3000
    c.optim.weight_decay = 0.0
  elif arg.method == "full":
    f.unet = "full"
    c.optim.lr = 1e-5
    c.ema_decay = 0.9999
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100

  if arg.demo:
    # The 32×32 shapes model of README's first command on a 2-core CPU: larger batches of its tiny images, fewer
    # steps and class images, fewer sampling steps.
    c.batch_size = 8
    c.total_steps = {"textual_inversion": 400}.get(arg.method, 200)
    c.optim.lr = {"lora": 1e-3, "dreambooth_lora": 1e-3, "textual_inversion": 5e-3}.get(arg.method, 1e-4)
    c.sample_every_steps = c.total_steps
    c.save_every_steps = 100
    f.num_class_images = 64
    f.class_guidance = 4.0
    c.sample.num_steps = 25
    c.sample.guidance_scale = 4.0
    c.sample.images_per_prompt = 4
    c.sample.tile_size = 64
    c.dataset.random_flip = False  # shapes captions say left/right: a flipped image would contradict its caption
  if arg.runlocal:
    c.optim.schedule = "constant"  # a run stopped early and resumed follows the same learning rates
    c.optim.warmup_steps = 0
    c.batch_size = 2
    c.total_steps = 6
    c.log_every_steps = 1
    c.sample_every_steps = -1
    c.save_every_steps = 3
    c.optim.lr = 1e-3 if f.unet != "full" else 1e-4
    c.ema_decay = 0.9 if c.ema_decay else 0.0
    f.num_class_images = 4
    f.class_steps = 2
    f.class_batch_size = 2
    c.sample.images_per_prompt = 1
    c.sample.num_steps = 2
    c.sample.tile_size = 32
  return c
