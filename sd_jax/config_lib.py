"""Config helpers shared by every file in `configs/`.

A config file defines `get_config(arg=None)` and returns an `ml_collections.ConfigDict`. The string after the
colon in `--config=configs/X.py:model=tiny,runlocal=True` arrives as `arg`; `parse_arg` turns it into typed
values using the defaults the config file declares, and rejects keys it does not know.

`base_config()` holds the keys every trainer understands, with their defaults in one place; an experiment file
overrides a handful of them.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path
from typing import Any

import ml_collections

# Keys every trainer understands (see the foundation issue); validated in `validate`.
COMMON_KEYS = ("trainer", "seed", "batch_size", "total_steps", "log_every_steps", "save_every_steps", "keep",
               "mesh", "parallelism", "init_from", "dataset")


def _convert(key: str, value: str, default: Any) -> Any:
  """Converts the string `value` to the type of `default`."""
  if isinstance(default, bool):
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"config arg {key}={value!r}: expected a boolean (True/False).")
  if isinstance(default, int):
    try:
      return int(value)
    except ValueError:
      raise ValueError(f"config arg {key}={value!r}: expected an integer.") from None
  if isinstance(default, float):
    try:
      return float(value)
    except ValueError:
      raise ValueError(f"config arg {key}={value!r}: expected a number.") from None
  if isinstance(default, (tuple, list)):
    parsed = ast.literal_eval(value) if value.startswith(("(", "[")) else tuple(value.split("+"))
    return tuple(parsed)
  return value


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2=v2' into a locked ConfigDict typed after `defaults`.

  A bare key (`runlocal`) means `runlocal=True`. Unknown keys fail with the list of valid ones.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if arg:
    for item in arg.split(","):
      item = item.strip()
      if not item:
        continue
      key, sep, value = item.partition("=")
      key = key.strip()
      if key not in defaults:
        raise ValueError(f"Unknown config arg {key!r}. Valid args: {', '.join(sorted(defaults))}.")
      if not sep:
        value = "True"
      result[key] = _convert(key, value.strip(), defaults[key])
  result.lock()
  return result


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`, as `--config=PATH:ARG` builds it (unlocked)."""
  path = Path(path)
  spec = importlib.util.spec_from_file_location(f"_sd_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all trainers. Config files start from this and override."""
  c = ml_collections.ConfigDict()
  c.trainer = ""                # which module in sd_jax/trainers/ runs: ddpm | ...
  c.seed = 0                    # model init, per-step randomness (fold_in(step)) and data order
  c.batch_size = 64             # global batch over all hosts and devices
  c.total_steps = 10_000
  c.log_every_steps = 50        # metrics.jsonl / TensorBoard / console
  c.eval_every_steps = 1_000    # held-out loss and trainer-specific evaluation; 0 = only at the end; -1 = never
  c.eval_batches = 8            # held-out batches averaged per evaluation (-1 = the whole split)
  c.sample_every_steps = 1_000  # sample grid with the EMA params; 0 = only at the end; -1 = never
  c.save_every_steps = 1_000
  c.keep = 3                    # checkpoints kept (orbax max_to_keep)
  c.strict_restore = False      # a damaged newest checkpoint: False = move it aside, resume from the one before;
                                # True = stop and say which files are damaged
  c.async_checkpointing = True
  c.parallelism = "jit"         # "jit" (sharded by the mesh below) or "pmap" (data parallel)

  # Device mesh. -1 takes up the remaining devices; the product must equal the device count.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis name -> mesh axes. Models name axes; this maps them onto the mesh. A dimension that a mesh
  # axis does not divide is replicated (see parallel.py).
  # "batch" lists fsdp before data on purpose: with ("data", "fsdp") and all three mesh axes > 1, XLA (JAX 0.10,
  # Shardy and GSPMD alike) miscompiles the gradient of convolutions whose kernels are sharded over fsdp and
  # tensor; tests/test_parallel.py holds the minimal reproduction.
  c.logical_axis_rules = (
      ("batch", ("fsdp", "data")),
      ("embed", "fsdp"),
      ("conv_in", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("conv_out", "tensor"),
      ("vocab", "tensor"),
      ("norm", None),
      ("conv_h", None),
      ("conv_w", None),
      ("height", None),
      ("width", None),
      ("channels", None),
      ("length", None),
  )

  c.init_from = ""              # params only, from another workdir or a checkpoint directory
  c.init_allow_partial = False  # if True, missing/unexpected keys in init_from are reported, not fatal

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"        # adamw | adam | sgd
  c.optim.lr = 1e-4             # peak learning rate
  c.optim.schedule = "cosine"   # cosine | constant (both after linear warmup)
  c.optim.warmup_steps = 100
  c.optim.end_lr_factor = 0.0   # cosine decays to lr * end_lr_factor
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0  # 0 = no clipping
  c.optim.grad_accum_steps = 1  # optimizer update every k steps (optax.MultiSteps)

  c.ema_decay = 0.9999          # 0 = no EMA params
  c.ema_start_step = 0          # EMA copies the params exactly until this step
  # Warm the decay up as min(ema_decay, (1 + k) / (10 + k)), k = steps since ema_start_step (diffusers' EMAModel),
  # so the EMA forgets the initial weights within a short run; False = the constant ema_decay from the start.
  c.ema_warmup = True

  c.dataset = ml_collections.ConfigDict(dict(
      name="shapes",            # shapes | folder | tfds
      data_dir="",              # TFDS data dir; "" -> $SD_JAX_DATA_DIR or ~/.cache/sd_jax/tensorflow_datasets
      resolution=32,
      train_split="train",
      eval_split="test",
      shapes_config="r32",      # shapes builder config
      tfds_name="",             # name="tfds": e.g. "cifar10"
      image_key="image",
      text_key="caption",       # "" if the dataset has no text
      label_key="",             # integer class label feature, "" if none
      caption_template="a photo of a {}",
      folder="",                # name="folder": images + metadata.jsonl
      skip_corrupt=True,        # folder: skip (and count) unreadable images instead of failing
      crop="center",            # center | random
      random_flip=False,
      tokenizer="",             # directory with a CLIP tokenizer; "" = no tokens in the batch
      max_text_len=77,
      num_workers=0,            # grain worker processes
      prefetch=2,
  ))
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that need no devices. Raises ValueError naming the key and what to change."""
  missing = [k for k in COMMON_KEYS if k not in config]
  if missing:
    raise ValueError(f"config is missing keys {missing}; start config files from sd_jax.config_lib.base_config().")
  for key, value in _numbers(config):
    if not math.isfinite(value):
      raise ValueError(f"config.{key}={value}: must be a finite number.")
  if config.batch_size <= 0:
    raise ValueError(f"config.batch_size={config.batch_size}: must be a positive (global) batch size.")
  if config.total_steps < 0:
    raise ValueError(f"config.total_steps={config.total_steps}: must be >= 0.")
  for key in ("log_every_steps", "save_every_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]}: must be a positive number of steps.")
  if config.keep < 1:
    raise ValueError(f"config.keep={config.keep}: keep at least 1 checkpoint.")
  if config.parallelism not in ("jit", "pmap"):
    raise ValueError(f"config.parallelism={config.parallelism!r}: use 'jit' or 'pmap'.")
  optim = config.optim
  if not optim.lr > 0:
    raise ValueError(f"config.optim.lr={optim.lr}: the learning rate must be positive.")
  if optim.warmup_steps < 0:
    raise ValueError(f"config.optim.warmup_steps={optim.warmup_steps}: must be >= 0.")
  if optim.grad_accum_steps < 1:
    raise ValueError(f"config.optim.grad_accum_steps={optim.grad_accum_steps}: must be >= 1.")
  if optim.grad_clip_norm < 0:
    raise ValueError(f"config.optim.grad_clip_norm={optim.grad_clip_norm}: must be >= 0 (0 disables).")
  for key in ("b1", "b2"):
    if key in optim and not 0.0 <= optim[key] < 1.0:
      raise ValueError(f"config.optim.{key}={optim[key]}: must be in [0, 1).")
  if "eps" in optim and not optim.eps > 0:
    raise ValueError(f"config.optim.eps={optim.eps}: must be > 0.")
  if optim.get("weight_decay", 0.0) < 0:
    raise ValueError(f"config.optim.weight_decay={optim.weight_decay}: must be >= 0.")
  if "diffusion" in config:
    d = config.diffusion
    for key in ("beta_start", "beta_end"):
      if not 0.0 < d[key] < 1.0:
        raise ValueError(f"config.diffusion.{key}={d[key]}: must be in (0, 1).")
    if d.get("min_snr_gamma", 0.0) < 0 or d.get("offset_noise", 0.0) < 0:
      raise ValueError(f"config.diffusion.min_snr_gamma={d.get('min_snr_gamma')} / offset_noise="
                       f"{d.get('offset_noise')}: must be >= 0 (0 turns each off).")
    if not d.get("snr_shift", 1.0) > 0:
      raise ValueError(f"config.diffusion.snr_shift={d.snr_shift}: must be > 0 (1 = off).")
  if "sample" in config:
    for key in ("guidance_scale", "eta"):
      if config.sample.get(key, 0.0) < 0:
        raise ValueError(f"config.sample.{key}={config.sample[key]}: must be >= 0.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay={config.ema_decay}: must be in [0, 1) (0 disables EMA).")
  for axis, size in config.mesh.items():
    if axis not in ("data", "fsdp", "tensor"):
      raise ValueError(f"config.mesh has unknown axis {axis!r}; mesh axes are data, fsdp, tensor.")
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: use a positive size or -1 (fill the remaining devices).")


def _numbers(config, prefix: str = ""):
  """(dotted key, value) of every float in a config, nested blocks and tuples included."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _numbers(value, f"{name}.")
    elif isinstance(value, float):
      yield name, value
    elif isinstance(value, (tuple, list)):
      yield from ((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))
