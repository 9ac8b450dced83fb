"""Train a text-to-image model on people's preferences: Diffusion-DPO (sd_jax/trainers/dpo.py).

  python -m sd_jax.main --config=configs/dpo.py:base=MODEL,prefs=feedback.sqlite --workdir=workdirs/dpo_lora
  python -m sd_jax.main --config=configs/dpo.py:method=full,base=MODEL,prefs=prefs.parquet --workdir=workdirs/dpo

MODEL is anything the fine-tune trainer takes (an sd_jax model directory, a training workdir, a diffusers directory,
an original single .safetensors file). PREFS is the SQLite database of `python -m sd_jax.feedback serve` or a
Pick-a-Pic-layout parquet file (`python -m sd_jax.feedback export`, or a public preference set copied locally).
The result exports as every fine-tune does: `python -m sd_jax.sample --pretrained MODEL --lora
WORKDIR/export/pytorch_lora_weights.safetensors` (LoRA) or `--pretrained WORKDIR/export` (full); the gallery serves
either next (`python -m sd_jax.feedback serve --model ...`).

Args (after the colon): method (lora | full), loss (dpo | kto), base, prefs, demo (the shapes model of README's first
command on a 2-core CPU), runlocal (test sizes).
Recipes: LoRA as diffusers' examples/research_projects/diffusion_dpo (rank 8, β 2500, lr 1e-5); full as the paper's
SD 1.5 run (β 5000, lr 1e-8 per example of the batch: 2.048e-5 at its batch of 2048).
"""

import ml_collections

from pathlib import Path

from sd_jax import config_lib

METHODS = ("lora", "full")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="lora", loss="dpo", base="", prefs="", runlocal=False, demo=False)
  if arg.method not in METHODS:
    raise ValueError(f"config arg method={arg.method!r}: use one of {', '.join(METHODS)}.")
  c = config_lib.load_config_file(Path(__file__).with_name("finetune.py"),
                                  f"method={arg.method},base={arg.base},runlocal={arg.runlocal},demo={arg.demo}")
  c.trainer = "dpo"
  c.dpo = ml_collections.ConfigDict(dict(
      loss=arg.loss,            # dpo (pairs) | kto (each image alone: desirable or undesirable)
      beta=2500.0 if arg.method == "lora" else 5000.0,
  ))
  f = c.finetune
  f.data = ""                   # the pairs come from dataset.preferences
  f.lora.rank = 8
  c.dataset.name = "preferences"
  c.dataset.folder = ""
  c.dataset.preferences = arg.prefs
  c.dataset.preferences_test = 0   # > 0: the last N pairs are held out and scored (loss, implicit accuracy)
  c.dataset.crop = "center"
  c.dataset.random_flip = False
  c.batch_size = 8
  c.total_steps = 1000
  c.ema_decay = 0.0
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.lr = 1e-5 if arg.method == "lora" else 1e-8 * c.batch_size
  c.log_every_steps = 10
  c.eval_every_steps = -1
  c.sample_every_steps = 250
  c.save_every_steps = 250
  if arg.demo:
    # The 32×32 shapes model of README's first command (python -m sd_jax.stages) on a 2-core CPU: a weak KL
    # constraint (β 100) and 600 steps at lr 1e-3 moved held-out accuracy where β 2500 at lr 1e-4 (the SD recipes
    # scaled) did not (RESULTS.md, "Learning from a stand-in rater's votes").
    c.batch_size = 16
    c.total_steps = 600
    c.dpo.beta = 100.0
    c.optim.lr = 1e-3 if arg.method == "lora" else 1e-5
    c.sample_every_steps = c.total_steps
    c.save_every_steps = 100
  if arg.runlocal:
    c.batch_size = 2
    c.total_steps = 6
    c.log_every_steps = 1
    c.sample_every_steps = -1
    c.save_every_steps = 3
    c.optim.lr = 1e-3 if arg.method == "lora" else 1e-4
    c.dpo.beta = 500.0
  return c
