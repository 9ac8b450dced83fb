"""Latent diffusion on the procedural shapes dataset: a text-conditioned U-Net on the latents of a shapes VAE,
conditioned on a shapes CLIP text tower (the third stage after configs/shapes_vae.py and configs/shapes_clip.py).

  python -m sd_jax.main --config=configs/shapes_vae.py --workdir=workdirs/shapes_vae      # stage 1
  python -m sd_jax.main --config=configs/shapes_clip.py --workdir=workdirs/shapes_clip    # stage 2
  python -m sd_jax.main --config=configs/shapes_ldm.py --workdir=workdirs/shapes_ldm      # this file
  python -m sd_jax.main --config=configs/shapes_ldm.py:demo --workdir=workdirs/ldm_demo   # after the stages' :demo runs
  python -m sd_jax.main --config=configs/shapes_ldm.py:runlocal --workdir=/tmp/ldm_local  # after their :runlocal runs

Args (after the colon): runlocal, demo (size presets; each reads the VAE and CLIP runs of the same preset, see the
commands above), vae_from, text_from (sd_jax model directories that replace those defaults: a run's WORKDIR/export,
or `python -m sd_jax.convert --from_diffusers DIR --out OUT`, e.g. to fine-tune Stable Diffusion itself).
The same paths are the keys `ldm.vae_from` / `ldm.text_from`: `--config.ldm.text_from=DIR` works too.

The batches' tokenizer is the text tower's own: `dataset.tokenizer` is tied to `ldm.text_from` + "/tokenizer" (a
FieldReference), so changing text_from changes both; the trainer checks they match and fails otherwise.

Any key can be overridden with --config.KEY=VALUE, e.g. --config.diffusion.prediction_type=v_prediction
--config.diffusion.zero_terminal_snr=True --config.sample.timestep_spacing=trailing --config.mesh.fsdp=2.
"""

import ml_collections

from sd_jax import config_lib
from sd_jax.models import unet as unet_lib

# The VAE / CLIP workdirs of each preset (their configs' documented commands); WORKDIR/export is the model dir.
_STAGES = {
    "default": ("workdirs/shapes_vae/export", "workdirs/shapes_clip/export"),
    "demo": ("workdirs/vae_demo/export", "workdirs/clip_demo/export"),
    "runlocal": ("/tmp/vae_local/export", "/tmp/clip_local/export"),
}


def _derive_from_frozen(model: ml_collections.ConfigDict) -> None:
  """None (typed, so --config.model.KEY=V still works): the trainer takes these from the frozen networks."""
  for key in ("in_channels", "out_channels", "cross_attention_dim", "sample_size"):
    model[key] = ml_collections.FieldReference(None, field_type=int)  # VAE latent channels / size; text width


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, demo=False, vae_from="", text_from="")
  preset = "runlocal" if arg.runlocal else "demo" if arg.demo else "default"
  c = config_lib.base_config()
  c.trainer = "ldm"
  # Sized for the quality bar on a 2-core CPU (README: python -m sd_jax.stages --preset=full): 5,000 steps of 32
  # (8×8×4 latents, 160k examples seen) with one resnet per U-Net level (layers_per_block below), 17.6 GFLOP
  # per step with precomputed latents (XLA cost analysis, text tower included). Measured end to end (RESULTS.md,
  # "The full presets", run of 2026-11-23): held-out test accuracy 0.960 in 55.6 minutes for all three stages.
  c.batch_size = 32
  c.total_steps = 5_000
  c.log_every_steps = 50
  c.eval_every_steps = 2_500   # each evaluation samples 2 × shapes_eval_prompts images (about 33 s on 2 cores)
  c.sample_every_steps = 1_000
  c.save_every_steps = 500
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.ema_decay = 0.999           # warmed up (config.ema_warmup): the EMA forgets the init within a short run

  vae_from, text_from = _STAGES[preset]
  c.ldm = ml_collections.ConfigDict(dict(
      vae_from=arg.vae_from or vae_from,  # sd_jax model dir with vae/ (frozen)
      # sd_jax model dir with text_encoder/ and tokenizer/ (a reference: dataset.tokenizer follows it)
      text_from=ml_collections.FieldReference(arg.text_from or text_from, field_type=str),
      # Fine-tune the text tower with the U-Net (it then lives in the trained params; precomputed latents still
      # work: the stored tokens are re-encoded). On: on the full shapes run, held-out accuracy at step 2,000 of 4,000
      # was 0.63 against 0.41 with the frozen tower (RESULTS.md).
      train_text_encoder=True,
      clip_skip=0,              # context from layer N - clip_skip (final-normed); 0 = the last layer
      caption_dropout=0.1,      # probability of the empty prompt, for classifier-free guidance
      frozen_dtype="float32",   # compute dtype of the frozen VAE and text tower
      # Encode the data once into this directory and train from it (reused by later runs with the same VAE, text
      # tower and data); "" = encode every batch on the fly. dataset.precomputed_dir follows it.
      precompute_dir=ml_collections.FieldReference("", field_type=str),
      precompute_dtype="float32",  # storage dtype of precomputed latents / contexts
  ))

  c.dataset.name = "shapes"
  c.dataset.resolution = 32
  c.dataset.shapes_config = "r32"
  c.dataset.text_key = "caption"
  c.dataset.random_flip = False  # captions say left/right: flips would contradict them
  c.dataset.tokenizer = c.ldm.get_ref("text_from") + "/tokenizer"  # always the text tower's own
  c.dataset.precomputed_dir = c.ldm.get_ref("precompute_dir")
  c.dataset.max_text_len = 32    # the shapes CLIP's max_position_embeddings (captions are <= 17 tokens)

  # A U-Net for 8x8x4 latents. The fields the frozen networks decide are None: the trainer fills them in.
  c.model = ml_collections.ConfigDict(unet_lib.unet_config(
      "tiny", block_out_channels=(64, 128, 128),
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      # One resnet (+ transformer) per level: 1.5× the steps per second of 2 on a 2-core CPU, and about as good per step
      # on the shapes run (in-training accuracy 0.50 against 0.48 at step 2,000; RESULTS.md, "What the full presets were
      # chosen from").
      layers_per_block=1, attention_head_dim=4, norm_num_groups=32))
  _derive_from_frozen(c.model)

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="scaled_linear",  # linear | scaled_linear | cosine (Stable Diffusion: scaled_linear)
      num_train_timesteps=1000,
      beta_start=0.00085,
      beta_end=0.012,
      prediction_type="v_prediction",  # epsilon | v_prediction (v: the objective ablation's fastest learner)
      # 0 = off; 5 is the paper's value. On: measured on the full shapes run (with lr 1e-3 against 5e-4), the
      # shapes accuracy of step 1000 without it was reached by step 500 (RESULTS.md).
      min_snr_gamma=5.0,
      offset_noise=0.0,         # per-channel offset added to the noise (0.1 is common)
      zero_terminal_snr=False,  # rescale to ᾱ_{T-1} = 0 (needs v_prediction; sample with timestep_spacing=trailing)
      # Multiply the SNR at every t (before zero_terminal_snr); 1 = off. On the full shapes run both 0.5 and 16
      # (with zero_terminal_snr) scored below 1 (RESULTS.md).
      snr_shift=1.0,
  ))
  c.sample = ml_collections.ConfigDict(dict(
      prompts=(),               # sample-grid prompts; () = the first num_prompts captions of the held-out split
      num_prompts=8,
      images_per_prompt=2,
      sampler="ddim",           # the grids' update rule (sd_jax/diffusion/samplers.py SAMPLER_NAMES); the export's
                                # scheduler_config.json names it, so `python -m sd_jax.sample` defaults to the same
      num_steps=25,             # sampler steps
      guidance_scale=4.0,       # classifier-free guidance s: uncond + s (cond - uncond)
      eta=0.0,                  # DDIM η; 0 = deterministic
      timestep_spacing="trailing",  # leading | trailing | linspace
      steps_offset=1,           # added to "leading" timesteps (SD's scheduler: 1; diffusers warns otherwise)
      set_alpha_to_one=True,    # ᾱ after the last step: 1, or ᾱ_0 (SD's scheduler: False)
      tile_size=96,             # pixels per image in the grid (nearest-neighbour upscaling)
      # A shapes evaluator directory (python -m sd_jax.eval.shapes_eval --out DIR): at every evaluation, images
      # drawn for the first shapes_eval_prompts captions of the eval and compositional splits are checked for the
      # colour and kind of every shape named (eval_shapes_acc_*). "" = off.
      shapes_evaluator="",
      shapes_eval_prompts=64,   # 0 = no shapes accuracy during training
  ))

  if arg.runlocal:
    # The settings the tiny tests were written for: a frozen text tower and epsilon-prediction.
    c.ldm.train_text_encoder = False
    c.diffusion.prediction_type = "epsilon"
  if arg.demo:
    # Minutes on a 2-core CPU: a two-level U-Net and a short run, trained on precomputed latents (sd_jax.stages sets
    # ldm.precompute_dir): 147 images/s at batch 32 against 101 at batch 16 encoding every batch (RESULTS.md, "What the
    # demo preset was chosen from"). One evaluation (the loss), at the end. Cross-attention only in the 8x8 down block:
    # the up path's 8x8 transformers took 31 % of a step, and without them a step is 1.45x cheaper, which buys the steps
    # that matter: held-out test accuracy rises sharply between 1,600 and 2,800 steps (RESULTS.md, demo preset choice:
    # 0.22 at 1,600 steps with the old up path, 0.705 at 2,800 without it).
    c.model.block_out_channels = (64, 128)
    c.model.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "UpBlock2D")
    c.model.layers_per_block = 1
    c.batch_size = 32
    c.total_steps = 2_600
    c.log_every_steps = 100
    c.eval_every_steps = 2_600
    c.sample_every_steps = 2_600
    c.save_every_steps = 1_300
    c.sample.shapes_eval_prompts = 0  # sd_jax.stages scores 100 held-out prompts per split right after this stage
    c.optim.lr = 2e-3            # at 1,700 × 32 with clip_skip 1: held-out test 0.28 and 0.21 (2 seeds), 0.18 at 1e-3
    c.optim.warmup_steps = 100
    # The demo CLIP (200 steps) has learned colours but not kinds (zero-shot kind accuracy at chance), and its last
    # layer carries little of the kind words: reading the layer below doubled held-out test accuracy at 1,900 × 32 steps
    # (0.13 -> 0.24; a random text tower: 0.14; the full CLIP's last layer: 0.26; RESULTS.md, "What the demo preset was
    # chosen from").
    c.ldm.clip_skip = 1
    c.ema_decay = 0.995
    c.sample.num_steps = 25
  if arg.runlocal:
    # One level (cross-attention down, mid and up blocks): the smallest U-Net that still exercises every
    # conditioning path, because compiling dominates a runlocal run.
    c.model = ml_collections.ConfigDict(unet_lib.unet_config(
        "tiny", block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",)))
    _derive_from_frozen(c.model)
    c.batch_size = 8
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 6
    c.eval_batches = 1
    c.sample_every_steps = 6
    c.save_every_steps = 3
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-3
    c.ema_decay = 0.9
    c.dataset.shapes_config = "r32_tiny"
    c.dataset.resolution = 16   # the tiny 32x32 shapes, resized: compiles and runs in seconds
    c.dataset.max_text_len = 16  # fits test-sized text towers (16 positions) too
    c.sample.num_prompts = 2
    c.sample.num_steps = 4
    c.sample.tile_size = 32
  return c
