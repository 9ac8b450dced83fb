"""Benchmark and memory-planning tool: `python -m sd_jax.bench --config=configs/X.py[:args] [--config.KEY=V]`.

Modes:

  --mode=train   compiles and times the shared loop's own train step (sd_jax/train.py `train_step`, built by
                 `train.setup` and jitted with the loop's shardings and donation) on synthetic batches of the right
                 shapes. For ldm configs the batch is precomputed latents + text contexts (`LatentUNetTask`), so
                 only the U-Net runs, as in a training run that serves precomputed latents. --profile_dir=DIR
                 then profiles --steps more steps (jax.profiler) and prints where a step's time went, per op.
  --mode=sample  times the jitted sampling loop (sd_jax/diffusion/samplers.py with the config's sampler settings,
                 `config_from_training`; classifier-free guidance when the U-Net has cross-attention) plus the VAE
                 decode, at each of --sample_batch_sizes.
  --mode=pipeline --model_dir=DIR
                 times text-to-image as a user runs it: `generate.TextToImage` from an sd_jax or diffusers model
                 directory, --prompts to float images (tokenizer, text tower, DDIM with guidance, VAE decode), at
                 each of --sample_batch_sizes; the first call (tracing, compiling) is reported as compile time.
                 As `python -m sd_jax.sample` does, a CPU-only machine gets one JAX device per core
                 (JAX_NUM_CPU_DEVICES=1 for one) and a batch runs data-parallel where the devices divide it.
  --baseline=eager,compile
                 then times diffusers/PyTorch on the same work (sd_jax/baseline.py), eager and/or torch.compile:
                 in train mode (ldm configs) the same U-Net with the same initial weights and batch; in pipeline
                 mode StableDiffusionPipeline (DDIM, η 0) on the same weights, prompts, steps, guidance and size.
                 Reported as diffusers median / sd_jax median (above 1: sd_jax is faster) and appended to
                 BENCHMARKS.md as a table of its own.
  --aot          compiles the train step for meshes of fake CPU devices without running it (one subprocess per
                 mesh, XLA_FLAGS=--xla_force_host_platform_device_count=N) and reports per-device memory, FLOPs
                 and collective bytes.
                 --aot_tpu=v5e:2x4,...: for TPU topologies instead, with libtpu's TPU compiler on this host
                 (jax.experimental.topologies; `pip install 'jax[tpu]'`), no TPU needed.
  --suite=gpu    every GPU row of BENCHMARKS.md's targets in one command (GPU_SUITE below: SD 1.5 train steps at
                 512² and 256² over batch sizes with the levers, sampling at batch 1 and 16, the diffusers ratios),
                 in order of importance until --suite_budget_s (8 min); rows to BENCHMARKS.md, every point's
                 result to --suite_json. --suite_tiny runs the same points at test sizes on any machine.

What is reported, and how:

  step time      median over --steps calls after --warmup calls, each ended by jax.block_until_ready.
  model FLOPs    analytic (sd_jax/flops.py: convolutions, dense layers, attention; training = 3 × forward) and
                 XLA's `compiled.cost_analysis()["flops"]` (every op, per device, × devices), side by side.
  MFU            analytic FLOPs per second / (devices × the device's dense bf16 peak, PEAKS below).
  memory         the device's `memory_stats()["peak_bytes_in_use"]` where the backend has it (GPU, TPU), and the
                 compiled program's own estimate: arguments + outputs − donated aliases + temporaries.
  collectives    from the compiled (SPMD-partitioned) HLO text: every all-reduce, all-gather, reduce-scatter,
                 all-to-all and collective-permute with its operand and result sizes. "traffic" estimates the
                 bytes each device sends with ring algorithms over a group of g devices:
                 all-reduce 2(g−1)/g · size, all-gather / reduce-scatter / all-to-all (g−1)/g · full size,
                 collective-permute · size.

Each train / sample measurement appends a row to BENCHMARKS.md (--benchmarks; "" to skip) with the device, JAX
version, config and the command that produced it. --aot appends a table of its own.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from sd_jax import config_lib
from sd_jax import flops as flops_lib
from sd_jax import parallel
from sd_jax import train as train_lib
from sd_jax.diffusion import losses
from sd_jax.diffusion import samplers
from sd_jax.diffusion import schedules
from sd_jax.models import layers
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.trainers import base

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# Dense bf16 peak (TFLOP/s) and memory per chip, matched against `device.device_kind` in this order (the first
# pattern contained in the kind wins). NVIDIA: SXM parts (an H100 PCIe is 756 TFLOP/s: pass --peak_tflops);
# Google: the Cloud TPU system-architecture pages (v5e "TPU v5 lite", v6e "TPU v6 lite" as JAX names them).
PEAKS: tuple[tuple[str, str, float, float], ...] = (
    # (pattern in device_kind, name, TFLOP/s, memory GiB)
    ("H200", "H200", 989.0, 141.0),
    ("H100", "H100", 989.0, 80.0),
    ("A100", "A100", 312.0, 80.0),
    ("TPU v4", "TPU v4", 275.0, 32.0),
    ("TPU v5 lite", "TPU v5e", 197.0, 16.0),
    ("TPU v5e", "TPU v5e", 197.0, 16.0),
    ("TPU v5p", "TPU v5p", 459.0, 95.0),
    ("TPU v5", "TPU v5p", 459.0, 95.0),
    ("TPU v6 lite", "TPU v6e", 918.0, 32.0),
    ("TPU v6e", "TPU v6e", 918.0, 32.0),
)
# Chips the AOT tables check a per-device footprint against (GiB of device memory).
FIT_TARGETS = (("v5e", 16.0), ("v5p", 95.0))

MEASURED_HEADER = ("| date | mode | device | JAX | config | mesh | batch | compile s | median ms | images/s | "
                   "analytic TFLOP | XLA TFLOP | MFU | peak mem GiB | est. mem GiB | command |")
BASELINE_HEADER = ("| date | mode | device | JAX | torch | config | batch | sd_jax ms | diffusers eager ms | "
                   "eager / sd_jax | diffusers torch.compile ms | compile / sd_jax | command |")
AOT_HEADER = ("| devices | mesh | batch/dev | params GiB | opt state GiB | EMA GiB | temporaries GiB | total GiB | "
              + " | ".join(f"fits {name} ({gib:g} GiB)" for name, gib in FIT_TARGETS)
              + " | TFLOP/step (XLA, all devices) | collective buffers GiB | est. traffic GiB/dev | collectives | "
              "compile s |")


def peak_for(device_kind: str) -> tuple[str, float | None]:
  """(name, dense bf16 TFLOP/s) of a device kind; (kind, None) when it is not in PEAKS (e.g. CPU)."""
  for pattern, name, tflops, _ in PEAKS:
    if pattern.lower() in device_kind.lower():
      return name, tflops
  return device_kind, None


# ---------------------------------------------------------------------------------------------------------------
# The U-Net task on precomputed latents


class LatentUNetTask(base.Task):
  """The ldm trainer's U-Net step on precomputed batches, without the frozen VAE and text tower.

  Batch: {"latent_mean", "latent_logvar": [B, h, w, c], "context": [B, L, D]} (sd_jax/data/precomputed.py's
  layout). The loss is the ldm trainer's own, sd_jax/diffusion/losses.py `latent_diffusion_loss` (per example, from
  its own key: a posterior sample scaled by the VAE config's scaling and shift factors; with probability
  ldm.caption_dropout the empty prompt's context, a frozen input like the ldm trainer's encoded empty prompt; t, ε
  with offset noise; the U-Net with dropout when config.model.dropout > 0; min-SNR weighting), so the U-Net step
  costs what a precomputed ldm run's does.

  With `bench.lora_rank` > 0 it is a LoRA fine-tune's step instead (sd_jax/trainers/finetune.py with
  finetune.unet="lora"): the U-Net is a frozen network (sharded like the params, never in the optimizer or EMA) and
  only rank-r adapters on `bench.lora_targets` train, which is what the AOT plan compares with full fine-tuning.
  """

  def __init__(self, config):
    super().__init__(config)
    bench = config.get("bench", {})
    self.lora_rank = int(bench.get("lora_rank", 0))
    fields = config.model.to_dict()
    derived = ("in_channels", "out_channels", "cross_attention_dim", "sample_size")
    missing = [k for k in derived if fields.get(k) is None]
    if missing:
      raise ValueError(f"config.model.{missing[0]} is None: the bench has no frozen networks to take it from. Set "
                       f"{', '.join('--config.model.' + k for k in missing)} (SD 1.5: 4, 4, 768, 64).")
    self.model = unet_lib.create_unet(fields)
    if not self.model.has_cross_attention:
      raise ValueError("config.model has no cross-attention block: the latent U-Net task attends to a text context.")
    self.schedule = schedules.schedule_from_config(config.diffusion)
    self.context_length = config.dataset.max_text_len
    self.context_dim = self.model.example_inputs(1, 1)["encoder_hidden_states"].shape[-1]
    size = self.model.sample_size
    self.latent_hw = (size, size) if isinstance(size, int) else tuple(size)
    # The latent scaling of the VAE the latents would come from: (z - shift_factor) · scaling_factor.
    self.vae = vae_lib.create_vae(_vae_name(config))
    self.caption_dropout = config.ldm.caption_dropout if "ldm" in config else 0.0

  def _unet_init(self, rng):
    return self.model.init(rng, **self.model.example_inputs(1, self.context_length))["params"]

  @property
  def lora_spec(self):
    from sd_jax import lora as lora_lib  # pylint: disable=import-outside-toplevel
    targets = self.config.bench.get("lora_targets", "attention")
    return lora_lib.LoraSpec(rank=self.lora_rank, targets=lora_lib.UNET_TARGETS[targets])

  def init_params(self, rng):
    if not self.lora_rank:
      return self._unet_init(rng)
    from sd_jax import lora as lora_lib  # pylint: disable=import-outside-toplevel
    base = nn.meta.unbox(jax.eval_shape(self._unet_init, jax.random.PRNGKey(0)))
    return lora_lib.init(rng, base, self.lora_spec)

  def frozen_abstract(self):
    frozen = {"empty_context": jax.ShapeDtypeStruct((1, self.context_length, self.context_dim), jnp.float32)}
    if self.lora_rank:
      frozen["unet"] = jax.eval_shape(self._unet_init, jax.random.PRNGKey(0))
    return frozen

  def load_frozen(self):
    # Any fixed [1, L, D] array: the encoded empty prompt in a real run.
    rng = np.random.default_rng(0)
    frozen = {"empty_context": rng.standard_normal((1, self.context_length, self.context_dim)).astype(np.float32)}
    if self.lora_rank:  # random weights of the base's shapes: timing and memory do not depend on the values
      frozen["unet"] = random_params(self.model, self.model.example_inputs(1, self.context_length), seed=0)
    return frozen

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    latent = (batch_size, *self.latent_hw, self.model.in_channels)
    return {"latent_mean": jax.ShapeDtypeStruct(latent, jnp.float32),
            "latent_logvar": jax.ShapeDtypeStruct(latent, jnp.float32),
            "context": jax.ShapeDtypeStruct((batch_size, self.context_length, self.context_dim), jnp.float32)}

  def loss(self, params, frozen, batch, keys, step=None):
    d = self.config.diffusion
    posterior = vae_lib.DiagonalGaussian(mean=batch["latent_mean"], logvar=batch["latent_logvar"])

    def unet(x_t, t, context, dropout_key):
      unet_params = frozen["unet"] if self.lora_rank else params
      if self.model.dropout > 0:
        return self.model.apply({"params": unet_params}, x_t, t, context, train=True, rngs={"dropout": dropout_key})
      return self.model.apply({"params": unet_params}, x_t, t, context)

    def model_fn(x_t, t, context, dropout_key):
      if not self.lora_rank:
        return unet(x_t, t, context, dropout_key)
      from sd_jax import lora as lora_lib  # pylint: disable=import-outside-toplevel
      with lora_lib.applied(params, self.lora_spec.scale):
        return unet(x_t, t, context, dropout_key)

    per_example, metrics = losses.latent_diffusion_loss(
        model_fn, self.schedule, posterior, batch["context"], frozen["empty_context"], keys,
        scale_latents=self.vae.scale_latents, caption_dropout=self.caption_dropout,
        prediction_type=d.prediction_type, min_snr_gamma=d.min_snr_gamma, offset_noise_strength=d.offset_noise)
    return jnp.mean(per_example), metrics


def _vae_name(config) -> str:
  return config.bench.vae if "bench" in config and "vae" in config.bench else "sd"


# ---------------------------------------------------------------------------------------------------------------
# Setup and the step


def resolve_task_kind(config, task_kind: str) -> str:
  """auto → latent_unet for ldm configs (precomputed latents; no frozen networks), else the config's trainer."""
  if task_kind not in ("auto", "trainer", "latent_unet"):
    raise ValueError(f"--task={task_kind!r}: use auto, trainer or latent_unet.")
  if task_kind == "auto":
    return "latent_unet" if config.trainer == "ldm" else "trainer"
  return task_kind


def make_setup(config, task_kind: str = "auto", devices=None) -> train_lib.Setup:
  """train.setup(config) with the config's trainer, or with a LatentUNetTask in its place."""
  if config.parallelism != "jit":
    raise ValueError(f"config.parallelism={config.parallelism!r}: the bench times the jit step; set "
                     "--config.parallelism=jit.")
  if resolve_task_kind(config, task_kind) == "trainer":
    return train_lib.setup(config, devices)
  return train_lib.setup(config, devices, task=LatentUNetTask(config))


jit_train_step = train_lib.jit_train_step  # the loop's own jitted step (shardings, donation)


def batch_spec(exp: train_lib.Setup) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch: the task's own `batch_spec`, else what sd_jax/data/input_pipeline.py yields."""
  config, task, b = exp.config, exp.task, exp.config.batch_size
  if isinstance(task, LatentUNetTask):
    return task.batch_spec(b)
  ds = config.dataset
  spec = {"image": jax.ShapeDtypeStruct((b, ds.resolution, ds.resolution, 3), jnp.float32)}
  if ds.label_key:
    spec["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
  if ds.tokenizer and (ds.text_key or ds.label_key):
    spec["tokens"] = jax.ShapeDtypeStruct((b, ds.max_text_len), jnp.int32)
  return spec


def synthetic_batch(spec: dict[str, jax.ShapeDtypeStruct], sharding, seed: int = 0) -> dict[str, jax.Array]:
  """Random global arrays of the spec's shapes with the batch sharding (floats ~ U[-1, 1], ids in [0, 32)); each
  process draws its own rows, as the input pipeline does."""
  rng = np.random.default_rng([seed, jax.process_index()])
  host = {}
  for key, s in spec.items():
    shape = (s.shape[0] // jax.process_count(), *s.shape[1:])
    if jnp.issubdtype(s.dtype, jnp.integer):
      high = 2 if key == "label" else 32  # valid for every class count / vocabulary in the repo's configs
      host[key] = rng.integers(0, high, shape).astype(s.dtype)
    else:
      host[key] = rng.uniform(-1.0, 1.0, shape).astype(s.dtype)
  return parallel.host_batch_to_global(host, sharding)


def _abstract_frozen(exp: train_lib.Setup):
  if exp.frozen_shardings is None:
    return None
  abstract = nn.meta.unbox(exp.task.frozen_abstract())
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      exp.frozen_shardings)


def analytic_train_flops(exp: train_lib.Setup) -> flops_lib.FlopCount | None:
  """Model FLOPs of one step of the trained U-Net (None for trainers without a U-Net, e.g. vae / clip)."""
  model = getattr(exp.task, "model", None)
  if not isinstance(model, unet_lib.UNet2DConditionModel):
    return None
  spec = batch_spec(exp)
  if "latent_mean" in spec:
    _, h, w, _ = spec["latent_mean"].shape
  elif "image" in spec and exp.config.trainer == "ddpm":
    _, h, w, _ = spec["image"].shape
  else:  # the ldm trainer on images: the U-Net sees the VAE's latents
    size = model.sample_size
    h, w = (size, size) if isinstance(size, int) else size
  length = exp.config.dataset.max_text_len
  return flops_lib.unet_train_step_flops(model, exp.config.batch_size, h, w, length)


# ---------------------------------------------------------------------------------------------------------------
# Compiled-program analysis


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, per device (XLA cost analysis), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  value = (cost or {}).get("flops")
  return float(value) if value is not None and value >= 0 else None


def memory_estimate(compiled) -> dict[str, float] | None:
  """Bytes per device from the compiled memory analysis; `total` = arguments + outputs − aliased + temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  out = {k: float(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp",
                                                                      "generated_code")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def tree_bytes_per_device(abstract_tree) -> float:
  """Bytes that one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  total = 0.0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_OP_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")


def shape_bytes(text: str) -> float:
  """Total bytes of every array type (`f32[8,320]{1,0}`) written in `text`; a tuple type sums its elements."""
  total = 0.0
  for dtype, dims in _SHAPE_RE.findall(text):
    itemsize = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if itemsize is None:
      raise ValueError(f"unknown HLO element type {dtype!r} in {text!r}")
    total += itemsize * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(line: str, num_devices: int) -> int:
  """Devices per replica group of a collective: `{{0,1},{2,3}}` → 2, iota `[2,4]<=[8]` → 4,
  `mesh['axis_0'=4,'axis_1'=2] {'axis_0'}` → 4, none or `{}` → all."""
  match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if match:
    return int(match.group(2))
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if match:
    sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", match.group(1))}
    axes = re.findall(r"'([^']+)'", match.group(2))
    return math.prod(sizes[a] for a in axes) if axes else num_devices
  match = re.search(r"replica_groups=\{(\{[^}]*\})", line)
  if match:
    return len([x for x in match.group(1).strip("{}").split(",") if x.strip()])
  return num_devices


_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+[\w\-]+\(")


def _balanced(text: str, start: int) -> str:
  """The text inside the parenthesis that opens at text[start - 1]."""
  depth = 1
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i]
  return text[start:]


def collective_stats(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
  """Per collective kind: count, operand bytes, result bytes and estimated per-device traffic, from HLO text.

  Operand types are read where the text writes them inline (`all-reduce(f32[8]{0} %x)`), else from the
  instruction that defines each operand (compiled modules print `all-reduce(%x)`). Synchronous ops and the
  `-start` halves of async pairs are counted (`-done` only completes them); the result of an async all-gather /
  collective-permute start is a tuple that repeats its operands, which is subtracted. Collectives inside loop
  bodies are counted once.
  """
  lines = hlo_text.splitlines()
  types = {}
  for line in lines:
    match = _DEF_RE.match(line)
    if match:
      types[match.group(1)] = match.group(2)
  stats = {kind: {"count": 0, "operand_bytes": 0.0, "result_bytes": 0.0, "traffic_bytes": 0.0}
           for kind in COLLECTIVES}
  for line in lines:
    match = _OP_RE.search(line)
    if match is None or " = " not in line[:match.start() + 1]:
      continue
    kind, suffix = match.group(1), match.group(2)
    if suffix == "-done":
      continue
    result_text = line[line.index(" = ") + 3:match.start() + 1]
    operands = _balanced(line, match.end())
    if _SHAPE_RE.search(operands):
      operand_bytes = shape_bytes(operands)
    else:
      names = re.findall(r"%([\w.\-]+)", operands)
      unknown = [n for n in names if n not in types]
      if unknown:
        raise ValueError(f"HLO operand(s) {unknown} of a {kind} are defined nowhere in the module text.")
      operand_bytes = sum(shape_bytes(types[n]) for n in names)
    result_bytes = shape_bytes(result_text)
    if suffix == "-start" and kind in ("all-gather", "collective-permute"):
      result_bytes = max(result_bytes - operand_bytes, 0.0)
    g = _group_size(line, num_devices)
    fraction = (g - 1) / g if g > 1 else 0.0
    traffic = {"all-reduce": 2 * fraction * operand_bytes,
               "all-gather": fraction * result_bytes,
               "reduce-scatter": fraction * operand_bytes,
               "all-to-all": fraction * operand_bytes,
               "collective-permute": operand_bytes}[kind]
    s = stats[kind]
    s["count"] += 1
    s["operand_bytes"] += operand_bytes
    s["result_bytes"] += result_bytes
    s["traffic_bytes"] += traffic
  return stats


# ---------------------------------------------------------------------------------------------------------------
# Train mode


@dataclasses.dataclass
class Measurement:
  """One benchmark result: what a BENCHMARKS.md row holds."""
  mode: str
  device: str
  num_devices: int
  mesh: str
  batch: int
  compile_s: float
  median_s: float
  images_per_s: float
  analytic_flops: float | None   # per step / per sample, all devices
  xla_flops: float | None        # per step / per sample, all devices
  mfu: float | None
  peak_memory_bytes: float | None
  estimated_memory_bytes: float | None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _device_summary() -> tuple[str, str, float | None]:
  device = jax.devices()[0]
  name, peak = peak_for(device.device_kind)
  if device.platform == "cpu":  # CPUs differ twice over in speed: name the model, vector extensions and clock
    from sd_jax import machine
    return f"cpu:{machine.cpu_description()}", name, peak
  return f"{device.platform}:{device.device_kind}", name, peak


def _peak_memory() -> float | None:
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not implemented on every backend
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(float(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _mfu(flops_per_call: float | None, seconds: float, num_devices: int, peak_tflops: float | None) -> float | None:
  if not flops_per_call or not peak_tflops or seconds <= 0:
    return None
  return flops_per_call / seconds / (num_devices * peak_tflops * 1e12)


def _timed(fn, steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` calls after `warmup` untimed ones; `fn` returns what to block on."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def _perfetto_events(trace_dir) -> list[dict[str, Any]]:
  """The events of the newest Perfetto trace `jax.profiler.trace(trace_dir, create_perfetto_trace=True)` wrote."""
  import gzip  # pylint: disable=import-outside-toplevel
  traces = sorted(Path(trace_dir).glob("**/perfetto_trace.json.gz"))
  if not traces:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: the profiler wrote no trace.")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)
  return events["traceEvents"] if isinstance(events, dict) else events


def profile_ops(trace_dir, calls: int, top: int = 30) -> list[dict[str, Any]]:
  """Where the time of `calls` profiled calls went, from the Perfetto trace `jax.profiler.trace(trace_dir,
  create_perfetto_trace=True)` wrote: per event name (XLA's ops and fusions, collectives, the runtime's own spans;
  Python frames left out), milliseconds per call summed over devices and threads, and occurrences per call, the
  `top` largest first."""
  events = _perfetto_events(trace_dir)
  total: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith("$"):  # "$file.py:N fn": the Python tracer's frames
      total[e["name"]] += e.get("dur", 0.0)
      count[e["name"]] += 1
  return [{"name": name, "ms_per_call": us / 1e3 / calls, "per_call": count[name] / calls}
          for name, us in total.most_common(top)]


# Collectives in a CPU trace: a thread inside one is waiting for the other devices, not computing.
_COLLECTIVE_EVENTS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "Rendezvous")
# The runtime's own spans around ops (the executor's, the thread pool's), not work.
_RUNTIME_SPANS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ")


def _covered_us(intervals: list[tuple[float, float]]) -> float:
  """Microseconds covered by the union of [start, end) intervals."""
  covered, end = 0.0, -math.inf
  for a, b in sorted(intervals):
    if b > end:
      covered += b - max(a, end)
      end = b
  return covered


def profile_threads(trace_dir, calls: int) -> list[dict[str, Any]]:
  """How busy XLA's CPU worker threads were over `calls` profiled calls (the Perfetto trace of `profile_ops`):
  per thread of XLA's intra-op pool ("XLAEigen"), milliseconds per call inside XLA's ops and fusions, and inside
  collectives (waiting there for the other devices; ops within one count there), each the union of its events'
  intervals; and, the same in every row, the milliseconds per call during which the program ran on any of them
  (its executor's spans). A program running T ms on n threads leaves n·T minus the busy and waiting times idle."""
  events = _perfetto_events(trace_dir)
  names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "thread_name"}
  ops: dict[Any, list] = collections.defaultdict(list)
  waits: dict[Any, list] = collections.defaultdict(list)
  running = []  # the executor's spans on any worker thread: while the program runs
  for e in events:
    thread = (e.get("pid"), e.get("tid"))
    if e.get("ph") != "X" or "XLAEigen" not in names.get(thread, "") or e["name"].startswith("$"):
      continue
    span = (e["ts"], e["ts"] + e.get("dur", 0.0))
    if e["name"].startswith("ThunkExecutor::Execute"):
      running.append(span)
    if not e["name"].startswith(_RUNTIME_SPANS):
      (waits if e["name"].startswith(_COLLECTIVE_EVENTS) else ops)[thread].append(span)
  threads = sorted(set(ops) | set(waits), key=lambda t: names[t])
  running_ms = _covered_us(running) / 1e3 / calls
  out = []
  for t in threads:
    waiting = _covered_us(waits[t])
    busy = _covered_us(ops[t] + waits[t]) - waiting  # ops inside a collective's span count as waiting
    out.append({"thread": names[t], "running_ms_per_call": running_ms, "busy_ms_per_call": busy / 1e3 / calls,
                "collective_ms_per_call": waiting / 1e3 / calls})
  return out


def bench_train(config, *, steps: int = 10, warmup: int = 2, task_kind: str = "auto", devices=None,
                peak_tflops: float | None = None, baselines: Sequence[str] = (),
                profile_dir: str | None = None) -> Measurement:
  """Compiles and times the shared train step on a synthetic batch; then, for each of `baselines` (eager,
  compile), the same U-Net with the same initial weights and batch in diffusers/PyTorch (sd_jax/baseline.py), in
  extra["baselines"] with its ratio to sd_jax's median. With `profile_dir`, `steps` more steps run under
  `jax.profiler.trace` (TensorBoard and Perfetto files there) after the timed ones, and extra["profile"] and
  extra["threads"] hold `profile_ops` and `profile_threads` of them."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} / --warmup={warmup}: time at least 1 step after >= 0 warm-up steps.")
  exp = make_setup(config, task_kind, devices)
  if baselines and not (isinstance(exp.task, LatentUNetTask) and not exp.task.lora_rank):
    raise ValueError("--baseline compares the U-Net step on precomputed latents: use an ldm config with --task=auto "
                     "or latent_unet, and no bench.lora_rank.")
  num_devices = exp.mesh.devices.size
  batch = synthetic_batch(batch_spec(exp), exp.batch_sharding, seed=config.seed)
  frozen = exp.load_frozen()
  state = exp.init_fn(jax.random.PRNGKey(config.seed))
  # The baseline starts from the same weights and batch (fetched now: the timed steps donate `state`).
  initial = (jax.device_get(state.params), jax.device_get(batch)) if baselines else None
  step_fn = jit_train_step(exp)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0

  holder = {"state": state}
  metrics_seen = []

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, frozen)
    metrics_seen.append(metrics["loss"])
    return holder["state"], metrics

  times = _timed(one_step, steps, warmup)
  profile = threads = None
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(steps):
        one_step()
      jax.block_until_ready(holder["state"])
    profile = profile_ops(profile_dir, steps)
    threads = profile_threads(profile_dir, steps)
  loss = float(metrics_seen[-1])
  if not math.isfinite(loss):
    raise FloatingPointError(f"the benchmarked step produced loss={loss}; the timing would be meaningless.")
  median = statistics.median(times)
  device, device_name, table_peak = _device_summary()
  peak = peak_tflops or table_peak
  analytic = analytic_train_flops(exp)
  per_device_xla = xla_flops(compiled)
  xla_total = per_device_xla * num_devices if per_device_xla is not None else None
  analytic_total = analytic.total if analytic is not None else None
  memory = memory_estimate(compiled)
  extra = {"loss": loss, "times_s": times, "analytic_breakdown": analytic.as_dict() if analytic else None,
           "memory_analysis": memory}
  if profile is not None:
    extra["profile"], extra["threads"] = profile, threads
  if baselines:
    del holder, compiled, step_fn  # free sd_jax's buffers before PyTorch allocates its own
    extra["baselines"] = _train_baselines(exp, *initial, baselines, median, steps=steps, warmup=warmup)
  return Measurement(
      mode="train", device=device_name if table_peak else device, num_devices=num_devices,
      mesh=_mesh_text(exp.mesh), batch=config.batch_size, compile_s=compile_s, median_s=median,
      images_per_s=config.batch_size / median, analytic_flops=analytic_total, xla_flops=xla_total,
      mfu=_mfu(analytic_total or xla_total, median, num_devices, peak),
      peak_memory_bytes=_peak_memory(), estimated_memory_bytes=memory["total"] if memory else None,
      extra=extra)


def _train_baselines(exp: train_lib.Setup, params, batch, modes: Sequence[str], jax_median_s: float, *,
                     steps: int, warmup: int) -> dict[str, dict[str, Any]]:
  """The diffusers U-Net's forward + backward + AdamW on `batch` from `params`, per mode: its median and first
  call, and ratio = its median / sd_jax's (above 1: sd_jax is faster)."""
  from sd_jax import baseline  # pylint: disable=import-outside-toplevel
  task, optim = exp.task, exp.config.optim
  # On a GPU, diffusers runs there too, with bf16 autocast where sd_jax computes in bf16 (float32 weights both).
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype = jnp.dtype(task.model.dtype)
  device_kw = dict(device="cuda", autocast_dtype=dtype.name if dtype != jnp.float32 else None) if on_gpu else {}
  out = {}
  for mode in modes:
    net = baseline.torch_unet(task.model, params)  # fresh weights per mode: each starts where sd_jax started
    timing = baseline.time_unet_train_step(
        net, latents=batch["latent_mean"], context=batch["context"],
        alphas_cumprod=np.asarray(task.schedule.alphas_cumprod), mode=mode, steps=steps, warmup=max(warmup, 1),
        lr=float(optim.lr), weight_decay=float(optim.get("weight_decay", 0.0)), seed=exp.config.seed, **device_kw)
    out[mode] = {"median_s": timing.median_s, "first_call_s": timing.first_call_s, "times_s": timing.times_s,
                 "threads": timing.threads, "loss": timing.extra["loss"], "ratio": timing.median_s / jax_median_s}
    del net
  return out


def _mesh_text(mesh) -> str:
  return "×".join(f"{name}{size}" for name, size in mesh.shape.items() if size > 1) or "1 device"


# ---------------------------------------------------------------------------------------------------------------
# Sample mode


def random_params(module: nn.Module, inputs: dict[str, Any], seed: int = 0):
  """N(0, 0.02²) params of the module's shapes and dtypes, drawn on the host: timing does not depend on the
  values, and this skips compiling `init` (minutes for SD 1.5 on a CPU)."""
  abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(seed), **inputs)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02, a.dtype), abstract)


def bench_sample(config, *, batch_sizes: Sequence[int] = (1, 16), num_steps: int | None = None, steps: int = 3,
                 warmup: int = 1, vae_name: str | None = None, peak_tflops: float | None = None
                 ) -> list[Measurement]:
  """Times sampling (the config's sampler settings, samplers.config_from_training; + guidance and VAE decode for a
  text-conditioned latent U-Net) on one device."""
  s = config.get("sample", ml_collections.ConfigDict())
  num_steps = num_steps or s.get("num_steps", 50)
  model = unet_lib.create_unet(config.model.to_dict())
  guided = model.has_cross_attention
  sampler_config = samplers.config_from_training(config.diffusion, s, sampler=s.get("sampler", "ddim"))
  size = model.sample_size or 64
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  context_length = config.dataset.max_text_len
  vae = None
  if guided:  # a latent model: decode with the VAE
    vae = vae_lib.create_vae(vae_name or _vae_name(config), dtype=config.model.get("dtype", "float32"))
    if vae.latent_channels != model.out_channels:
      raise ValueError(f"--vae={vae_name or _vae_name(config)} has {vae.latent_channels} latent channels but the "
                       f"U-Net outputs {model.out_channels}; pick a matching VAE config.")
  unet_inputs = model.example_inputs(1, context_length)
  unet_params = random_params(model, unet_inputs, config.seed)
  vae_params = random_params(vae, vae.example_inputs(), config.seed) if vae is not None else None
  context_dim = unet_inputs["encoder_hidden_states"].shape[-1] if guided else 0
  guidance_scale = s.get("guidance_scale", 7.5) if guided else 1.0

  def draw(unet_params, vae_params, context, uncond, seed_key, batch: int):
    noise, step_keys = samplers.image_noise(seed_key, jnp.arange(batch), (h, w, model.out_channels))
    if guided:
      model_fn = lambda x, t, c: model.apply({"params": unet_params}, x, t, c)  # noqa: E731
    else:
      model_fn = lambda x, t, c: model.apply({"params": unet_params}, x, t)  # noqa: E731
    latents = samplers.sample(model_fn, noise, config=sampler_config, num_steps=num_steps, context=context,
                              uncond_context=uncond, guidance_scale=guidance_scale, rng=step_keys)
    if vae is None:
      return latents
    return vae.apply({"params": vae_params}, vae.unscale_latents(latents), method="decode")

  device, device_name, table_peak = _device_summary()
  peak = peak_tflops or table_peak
  seed_key = jax.random.PRNGKey(config.seed)
  results = []
  for batch in batch_sizes:
    host_rng = np.random.default_rng(batch)
    context = jnp.asarray(host_rng.standard_normal((batch, context_length, context_dim)), jnp.float32) if guided \
        else None
    uncond = jnp.asarray(host_rng.standard_normal((1, context_length, context_dim)), jnp.float32) if guided else None
    fn = jax.jit(functools.partial(draw, batch=batch))
    t0 = time.perf_counter()
    compiled = fn.lower(unet_params, vae_params, context, uncond, seed_key).compile()
    compile_s = time.perf_counter() - t0
    times = _timed(lambda: compiled(unet_params, vae_params, context, uncond, seed_key), steps, warmup)
    median = statistics.median(times)
    analytic = flops_lib.ddim_sample_flops(model, batch, num_steps, h, w, context_length, guidance=guided, vae=vae)
    memory = memory_estimate(compiled)
    results.append(Measurement(
        mode=(f"sample ({num_steps} {sampler_config.sampler.upper()} steps{', CFG' if guided else ''}"
              f"{' + VAE decode' if vae else ''})"),
        device=device_name if table_peak else device, num_devices=1, mesh="1 device", batch=batch,
        compile_s=compile_s, median_s=median, images_per_s=batch / median, analytic_flops=analytic.total,
        xla_flops=xla_flops(compiled), mfu=_mfu(analytic.total, median, 1, peak), peak_memory_bytes=_peak_memory(),
        estimated_memory_bytes=memory["total"] if memory else None, extra={"times_s": times}))
  return results


# ---------------------------------------------------------------------------------------------------------------
# Pipeline mode: prompts to images from a model directory, beside diffusers' StableDiffusionPipeline


def pipeline_mesh(pipe, batch: int) -> tuple[int, str]:
  """(devices, mesh description) a `generate.TextToImage` runs a batch of `batch` on: data-parallel over all its
  devices where their count divides the batch, else one device."""
  mesh = pipe._mesh(batch)  # pylint: disable=protected-access
  return (1, "1 device") if mesh is None else (mesh.size, _mesh_text(mesh))


def bench_pipeline(model_dir, *, prompts: Sequence[str], batch_sizes: Sequence[int] = (1,), num_steps: int = 50,
                   guidance: float = 7.5, steps: int = 3, warmup: int = 1, baselines: Sequence[str] = (),
                   peak_tflops: float | None = None, devices: Sequence[Any] | None = None) -> list[Measurement]:
  """Times text-to-image end to end, as a user calls it: `generate.TextToImage.generate` from `model_dir` (an sd_jax
  or diffusers model directory), tokenizing, the text tower, `num_steps` DDIM steps with classifier-free guidance and
  the VAE decode, to float images on the host. Like `python -m sd_jax.sample`, a batch runs data-parallel over
  `devices` (default: every local device) where their count divides it, else on the first (`pipeline_mesh`). The
  first call (tracing and compiling) is compile_s.
  For each of `baselines` (eager, compile): diffusers' StableDiffusionPipeline (DDIM, η 0) on the same weights in
  diffusers' layout (exported to a temporary directory when `model_dir` is sd_jax's), the same prompts, steps,
  guidance and size, in extra["baselines"] with ratio = its median / sd_jax's (above 1: sd_jax is faster)."""
  import tempfile  # pylint: disable=import-outside-toplevel

  from sd_jax import generate  # pylint: disable=import-outside-toplevel
  from sd_jax.weights import model_dir as model_dir_lib  # pylint: disable=import-outside-toplevel
  if not prompts:
    raise ValueError("--prompts is empty: give at least one prompt.")
  source = Path(model_dir)
  resolved = model_dir_lib.resolve_model(str(source), what="--model_dir")
  pipe = generate.TextToImage.from_model_dir(resolved)
  if devices is not None:
    pipe.devices = list(devices)
  device, device_name, table_peak = _device_summary()
  peak = peak_tflops or table_peak
  exported = None
  results = []
  try:
    for batch in batch_sizes:
      texts = [prompts[i % len(prompts)] for i in range(batch)]

      def call(texts=texts):
        return pipe.generate(texts, steps=num_steps, guidance=guidance, seed=0, sampler="ddim", output_type="np")

      t0 = time.perf_counter()
      images = call()
      first_s = time.perf_counter() - t0
      times = _timed(call, steps, max(warmup - 1, 0))
      median = statistics.median(times)
      h, w = images.shape[1:3]
      analytic = flops_lib.ddim_sample_flops(pipe.unet, batch, num_steps, h // pipe.latent_factor,
                                             w // pipe.latent_factor, pipe.text.config.max_position_embeddings,
                                             guidance=guidance != 1.0, vae=pipe.vae).total
      extra: dict[str, Any] = {"times_s": times, "images_shape": list(images.shape), "model_dir": str(source)}
      if baselines:
        from sd_jax import baseline  # pylint: disable=import-outside-toplevel
        if exported is None:
          if (source / "model_index.json").exists():  # already diffusers' layout
            exported = source
          else:
            exported = Path(tempfile.mkdtemp(prefix="sd_jax_bench_diffusers_"))
            model_dir_lib.export_diffusers(resolved, exported / "model")
            exported = exported / "model"
        extra["baselines"] = {}
        for mode in baselines:
          timing = baseline.time_pipeline(exported, texts, steps=num_steps, guidance=guidance, height=h, width=w,
                                          mode=mode, repeats=steps, warmup=max(warmup, 1))
          extra["baselines"][mode] = {"median_s": timing.median_s, "first_call_s": timing.first_call_s,
                                      "times_s": timing.times_s, "threads": timing.threads,
                                      "images_shape": timing.extra["images_shape"],
                                      "ratio": timing.median_s / median}
      num_devices, mesh = pipeline_mesh(pipe, batch)
      results.append(Measurement(
          mode=f"pipeline ({num_steps} DDIM steps, CFG {guidance:g}, text + VAE decode)",
          device=device_name if table_peak else device, num_devices=num_devices, mesh=mesh, batch=batch,
          compile_s=first_s, median_s=median, images_per_s=batch / median, analytic_flops=analytic, xla_flops=None,
          mfu=_mfu(analytic, median, num_devices, peak), peak_memory_bytes=_peak_memory(), estimated_memory_bytes=None,
          extra=extra))
  finally:
    if exported is not None and exported != source:
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(exported.parent, ignore_errors=True)
  return results


# ---------------------------------------------------------------------------------------------------------------
# --suite=gpu: every GPU row of BENCHMARKS.md's targets in one invocation


@dataclasses.dataclass(frozen=True)
class SuitePoint:
  """One measurement of a suite: the SD 1.5 config (configs/sd15_ldm.py:`arg`) with `overrides`."""
  name: str
  mode: str                                   # "train" | "sample"
  arg: str = ""                               # sd15_ldm args, e.g. "res=256"
  overrides: tuple[tuple[str, Any], ...] = ()  # dotted config keys
  sample_batch_sizes: tuple[int, ...] = ()
  baselines: tuple[str, ...] = ()


# In order of importance: a point starts only while the budget lasts. 512²: the first level attends over 4,096
# tokens; bf16 activations and matmuls, float32 GroupNorm/LayerNorm statistics and weights (the config's default).
GPU_SUITE = (
    SuitePoint("train 512² b16, XLA attention", "train", "", (("batch_size", 16),)),
    SuitePoint("train 512² b16, cuDNN attention, + diffusers eager", "train", "",
               (("batch_size", 16), ("model.attention_impl", "cudnn")), baselines=("eager",)),
    SuitePoint("train 512² b32, cuDNN attention", "train", "",
               (("batch_size", 32), ("model.attention_impl", "cudnn"))),
    SuitePoint("train 512² b64, cuDNN attention, remat dots_saveable", "train", "",
               (("batch_size", 64), ("model.attention_impl", "cudnn"), ("model.remat_policy", "dots_saveable"))),
    SuitePoint("train 256² b64, cuDNN attention", "train", "res=256",
               (("batch_size", 64), ("model.attention_impl", "cudnn"))),
    SuitePoint("sample 512², 50 DDIM steps + guidance + VAE decode, b1 and b16", "sample", "",
               (("model.attention_impl", "cudnn"),), sample_batch_sizes=(1, 16)),
    SuitePoint("train 512² b16, cuDNN attention, + diffusers torch.compile", "train", "",
               (("batch_size", 16), ("model.attention_impl", "cudnn")), baselines=("compile",)),
)

# --suite_tiny: the same points at test sizes, for a CPU (tests/test_bench.py): the runlocal U-Net with one level,
# the configs' args (res) dropped, train batches / 2, sampling batches / 8, 2 DDIM steps, and XLA attention where
# the point asks for cuDNN (a GPU kernel).
_TINY_OVERRIDES = (("model.block_out_channels", (32,)), ("model.down_block_types", ("CrossAttnDownBlock2D",)),
                   ("model.up_block_types", ("CrossAttnUpBlock2D",)))


def suite_config(point: SuitePoint, tiny: bool = False):
  """The point's config, locked as the command line leaves it."""
  config = config_lib.load_config_file(REPO / "configs" / "sd15_ldm.py", "runlocal" if tiny else point.arg or None)
  config.lock()
  for key, value in (*point.overrides, *(_TINY_OVERRIDES if tiny else ())):
    if tiny and key == "batch_size":
      value = max(1, value // 2)  # 16 -> 8: the runlocal config's own batch
    if tiny and key == "model.attention_impl" and value == "cudnn":
      value = "xla"
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def point_command(point: SuitePoint, steps: int, warmup: int) -> str:
  """The single-point command that measures what this suite point measures."""
  config = "configs/sd15_ldm.py" + (f":{point.arg}" if point.arg else "")
  if point.mode == "sample":  # a sampling call is 50 U-Net steps: fewer calls (run_suite)
    steps, warmup = max(1, steps // 2), 1
  flags = [f"--config={config}", *(f"--config.{k}={v}" for k, v in point.overrides), f"--mode={point.mode}",
           f"--steps={steps}", f"--warmup={warmup}"]
  if point.sample_batch_sizes:
    flags.append("--sample_batch_sizes=" + ",".join(map(str, point.sample_batch_sizes)))
  if point.baselines:
    flags.append("--baseline=" + ",".join(point.baselines))
  return "python -m sd_jax.bench " + shlex.join(flags)


def run_suite(points: Sequence[SuitePoint] = GPU_SUITE, *, budget_s: float = 480.0, tiny: bool = False,
              steps: int = 5, warmup: int = 2, sample_steps: int = 50, benchmarks: str | Path | None = None,
              json_path: str | Path | None = None, command: str = "python -m sd_jax.bench --suite=gpu",
              peak_tflops: float | None = None, log=print) -> list[dict[str, Any]]:
  """Measures each point in order on this process's first device until `budget_s` has passed (the points left are
  reported as skipped); a point that fails (e.g. out of memory at a batch size) is reported and the suite goes on.
  Appends the rows to `benchmarks` (the measured and the diffusers tables) at the end, and writes every result to
  `json_path` after each point, so that a run stopped from outside (a lease's time limit) keeps the points it
  finished. Returns one dict per point: name, command, status ("measured" | "failed" | "skipped"), and the
  measurements."""
  start = time.perf_counter()
  results = []
  rows, compared = [], []

  def write_json():
    if json_path:
      Path(json_path).write_text(json.dumps({
          "command": command, "device": _device_summary()[0], "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "budget_s": budget_s, "wall_s": time.perf_counter() - start,
          "points": results}, indent=1, default=float) + "\n")

  for point in points:
    write_json()
    cmd = point_command(point, steps, warmup)
    entry = {"name": point.name, "command": cmd, "status": "skipped", "measurements": []}
    results.append(entry)
    elapsed = time.perf_counter() - start
    if elapsed > budget_s:
      entry["error"] = f"the suite's budget ({budget_s:.0f} s) was spent after {elapsed:.0f} s"
      log(f"[suite] skipped: {point.name} ({entry['error']})")
      continue
    log(f"[suite] {point.name}  ({elapsed:.0f} s into the suite)")
    config_name = cmd.split("--config=")[1].split()[0] + (" (tiny)" if tiny else "")
    try:
      config = suite_config(point, tiny)
      if point.mode == "train":
        ms = [bench_train(config, steps=steps, warmup=warmup, devices=jax.devices()[:1], peak_tflops=peak_tflops,
                          baselines=point.baselines)]
      else:
        batch_sizes = tuple(max(1, b // 8) for b in point.sample_batch_sizes) if tiny else point.sample_batch_sizes
        ms = bench_sample(config, batch_sizes=batch_sizes, num_steps=2 if tiny else sample_steps,
                          steps=max(1, steps // 2), warmup=1, peak_tflops=peak_tflops)  # as point_command says
    except Exception as e:  # noqa: BLE001 - one point's failure (memory, a missing kernel) is that point's row
      entry.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
      log(f"[suite] failed: {point.name}: {entry['error']}")
      continue
    entry["status"] = "measured"
    for m in ms:
      entry["measurements"].append({**dataclasses.asdict(m), "extra": {
          k: v for k, v in m.extra.items() if k in ("loss", "baselines", "memory_analysis")}})
      rows.append(measurement_row(m, config_name=config_name, command=cmd))
      log(rows[-1])
      if (row := baseline_row(m, config_name=config_name, command=cmd)) is not None:
        compared.append(row)
        log(row)
  write_json()
  if benchmarks:
    not_measured = [f"{r['name']}: {r['status']} ({r['error']})" for r in results if r["status"] != "measured"]
    preamble = (f"`{command}`, {datetime.date.today().isoformat()}, {time.perf_counter() - start:.0f} s"
                + ("; not measured: " + "; ".join(not_measured) if not_measured else ""))
    if rows:
      append_rows(benchmarks, MEASURED_HEADER, rows, preamble)
    if compared:
      append_rows(benchmarks, BASELINE_HEADER, compared, preamble)
  return results


# ---------------------------------------------------------------------------------------------------------------
# AOT planning


def topology_devices(topology: str) -> int:
  """Devices in a TPU topology name such as v5e:2x4 or v5p:2x2x2 (one JAX device per chip): the product of its
  dimensions."""
  match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", topology)
  if not match:
    raise ValueError(f"--aot_tpu entry {topology!r}: use a TPU topology name, e.g. v5e:2x4 or v5p:2x2x2.")
  return math.prod(int(d) for d in match.group(2).split("x"))


def tpu_topology(topology: str):
  """The devices of a TPU topology for compiling without one (JAX's AOT: jax.experimental.topologies), through
  libtpu's compiler; a clear error when libtpu is not installed."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise RuntimeError("--aot_tpu compiles with the TPU compiler from libtpu, which is not installed: `pip install "
                       "'jax[tpu]'` (or the libtpu version jax pins) in this environment.") from e
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def parse_mesh(name: str, num_devices: int) -> dict[str, int]:
  """'data' / 'fsdp': every device on that axis; 'fsdpK' / 'dataK': K on that axis, the rest on the other."""
  match = re.fullmatch(r"(data|fsdp)(\d*)", name)
  if not match:
    raise ValueError(f"--aot_meshes entry {name!r}: use data, fsdp, dataK or fsdpK (e.g. fsdp8).")
  axis, size = match.group(1), int(match.group(2) or num_devices)
  if num_devices % size:
    raise ValueError(f"--aot_meshes entry {name!r}: {size} does not divide {num_devices} devices.")
  other = "fsdp" if axis == "data" else "data"
  return {axis: size, other: num_devices // size, "tensor": 1}


def aot_compile(config, task_kind: str = "auto", compile: bool = True, devices=None) -> dict[str, Any]:
  """Lowers and compiles the train step for `devices` (default this process's: fake CPU devices in --aot; a TPU
  topology's with --aot_tpu) without running it; returns per-device memory, FLOPs and collectives. compile=False:
  only the state's per-device bytes (from the shardings; seconds instead of minutes)."""
  exp = make_setup(config, task_kind, devices)
  num_devices = exp.mesh.devices.size
  spec = batch_spec(exp)
  abstract_batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=exp.batch_sharding) for k, s in spec.items()}
  compiled, compile_s = None, None
  if compile:
    t0 = time.perf_counter()
    with layers.cpu_attention_block_bytes(0):  # plan for an accelerator's attention, not the CPU's blocks
      lowered = jit_train_step(exp).lower(exp.abstract_state, abstract_batch, _abstract_frozen(exp))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  state = exp.abstract_state
  analytic = analytic_train_flops(exp)
  per_device_xla = xla_flops(compiled) if compiled is not None else None
  return {
      "num_devices": num_devices,
      "mesh": {k: int(v) for k, v in exp.mesh.shape.items()},
      "batch_size": config.batch_size,
      "per_device_batch": config.batch_size / num_devices,
      "params_bytes": tree_bytes_per_device(state.params),
      "opt_state_bytes": tree_bytes_per_device(state.opt_state),
      "ema_bytes": tree_bytes_per_device(state.ema_params) if state.ema_params is not None else 0.0,
      "total_params_bytes": sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                                for x in jax.tree.leaves(state.params)),
      "memory": memory_estimate(compiled) if compiled is not None else None,
      "xla_flops_per_device": per_device_xla,
      "analytic_flops": analytic.total if analytic is not None else None,
      "collectives": collective_stats(compiled.as_text(), num_devices) if compiled is not None else None,
      "compile_s": compile_s,
      "jax": jax.__version__,
  }


def _point_env(num_devices: int, tpu: str = "") -> dict[str, str]:
  env = dict(os.environ)
  if tpu:  # the TPU compiler, from this CPU host: one host CPU device is all the process needs
    num_devices = 1
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: points may compile side by side
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  # The program is never run: skip LLVM's optimisations (buffer assignment, hence the memory analysis, and the
  # HLO passes are unaffected; the compile is several times faster).
  extra = [f"--xla_force_host_platform_device_count={num_devices}", "--xla_backend_optimization_level=0",
           "--xla_llvm_disable_expensive_passes=true"]
  env["XLA_FLAGS"] = " ".join(flags + extra)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_aot_point(config_args: Sequence[str], num_devices: int, mesh: str, per_device_batch: int, *,
                  task_kind: str = "auto", timeout_s: float = 900.0, compile: bool = True,
                  tpu: str = "") -> dict[str, Any]:
  """One AOT compile in a subprocess with `num_devices` fake CPU devices, or for the TPU topology `tpu` (e.g.
  v5e:2x4) with libtpu's compiler; {"error": ...} on failure/timeout."""
  cmd = [sys.executable, "-m", "sd_jax.bench", *config_args, "--aot_worker", f"--aot_devices={num_devices}",
         f"--aot_meshes={mesh}", f"--aot_per_device_batch={per_device_batch}", f"--task={task_kind}",
         f"--aot_compile={compile}", f"--aot_tpu={tpu}"]
  point = {"num_devices": num_devices, "mesh_name": mesh, "per_device_batch": per_device_batch}
  if tpu:
    point["tpu"] = tpu
  t0 = time.perf_counter()
  try:
    result = subprocess.run(cmd, cwd=REPO, env=_point_env(num_devices, tpu), capture_output=True, text=True,
                            timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**point, "error": f"compile did not finish in {timeout_s:.0f} s (--aot_timeout)"}
  for line in result.stdout.splitlines():
    if line.startswith("AOT_RESULT "):
      return {**point, **json.loads(line[len("AOT_RESULT "):]), "wall_s": time.perf_counter() - t0}
  tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
  return {**point, "error": " / ".join(tail) or f"exit code {result.returncode}"}


def aot_worker(config, num_devices: int, mesh_name: str, per_device_batch: int, task_kind: str,
               compile: bool = True, tpu: str = "") -> dict[str, Any]:
  """Body of one --aot subprocess: set the mesh and global batch, compile, report."""
  devices = None
  if tpu:
    devices = tpu_topology(tpu)
    if len(devices) != num_devices:
      raise RuntimeError(f"TPU topology {tpu} has {len(devices)} devices, expected {num_devices}.")
  elif jax.device_count() != num_devices:
    raise RuntimeError(f"the AOT worker sees {jax.device_count()} devices, expected {num_devices}: run it through "
                       "--aot (which sets XLA_FLAGS=--xla_force_host_platform_device_count).")
  mesh = parse_mesh(mesh_name, num_devices)
  with _unlocked(config):
    for axis, size in mesh.items():
      config.mesh[axis] = size
    config.batch_size = per_device_batch * num_devices
  return aot_compile(config, task_kind, compile, devices)


@contextlib.contextmanager
def _unlocked(config):
  if hasattr(config, "unlocked"):
    with config.unlocked():
      yield
  else:
    yield


def aot_row(r: dict[str, Any]) -> str:
  """A markdown row of AOT_HEADER for one point."""
  mesh = r.get("mesh_name", "") + (f" on {r['tpu']}" if r.get("tpu") else "")
  if "error" in r:
    cells = [str(r["num_devices"]), mesh, str(r["per_device_batch"]), f"failed: {r['error']}"] + [""] * 11
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
  state_cells = [str(r["num_devices"]), mesh, f"{r['per_device_batch']:g}", f"{r['params_bytes'] / GIB:.3f}",
                 f"{r['opt_state_bytes'] / GIB:.3f}", f"{r['ema_bytes'] / GIB:.3f}"]
  if r.get("memory") is None:  # --noaot_compile: the state only
    return "| " + " | ".join(state_cells + ["not compiled"] + [""] * 8) + " |"
  m = r["memory"]
  total = m["total"]
  fits = ["yes" if total <= gib * GIB else "no" for _, gib in FIT_TARGETS]
  coll = r["collectives"]
  buffers = sum(max(s["operand_bytes"], s["result_bytes"]) for s in coll.values())
  traffic = sum(s["traffic_bytes"] for s in coll.values())
  kinds = ", ".join(f"{int(s['count'])}× {k}" for k, s in coll.items() if s["count"])
  flops = r["xla_flops_per_device"] * r["num_devices"] / 1e12 if r["xla_flops_per_device"] else float("nan")
  cells = [*state_cells, f"{m['temp'] / GIB:.2f}", f"{total / GIB:.2f}", *fits, f"{flops:.1f}",
           f"{buffers / GIB:.2f}", f"{traffic / GIB:.2f}", kinds or "none", f"{r['compile_s']:.0f}"]
  return "| " + " | ".join(cells) + " |"


def run_aot(config_args: Sequence[str], devices: Sequence[int], meshes: Sequence[str],
            per_device_batches: Sequence[int], *, task_kind: str = "auto", timeout_s: float = 900.0,
            compile: bool = True, log=print, tpus: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Every (device count, mesh, per-device batch) point, each in its own subprocess. A fixed-size mesh (fsdp64)
  is skipped for device counts it does not divide. `tpus`: TPU topologies (v5e:2x4, ...) in place of `devices`,
  compiled by libtpu's compiler."""
  results = []
  targets = [(topology_devices(t), t) for t in tpus] if tpus else [(n, "") for n in devices]
  for n, tpu in targets:
    for mesh in meshes:
      try:
        parse_mesh(mesh, n)
      except ValueError as e:
        if re.fullmatch(r"(data|fsdp)", mesh):
          raise
        log(f"skipped: {e}")
        continue
      for b in per_device_batches:
        r = run_aot_point(config_args, n, mesh, b, task_kind=task_kind, timeout_s=timeout_s, compile=compile,
                          tpu=tpu)
        log(aot_row(r))
        results.append(r)
  return results


# ---------------------------------------------------------------------------------------------------------------
# BENCHMARKS.md


def _fmt(value, spec: str, scale: float = 1.0, missing: str = "n/a") -> str:
  return missing if value is None else format(value / scale, spec)


def measurement_row(m: Measurement, *, config_name: str, command: str, jax_version: str | None = None,
                    date: str | None = None) -> str:
  """A markdown row of MEASURED_HEADER."""
  cells = [date or datetime.date.today().isoformat(), m.mode, f"{m.device} ×{m.num_devices}",
           jax_version or jax.__version__, config_name, m.mesh, str(m.batch), f"{m.compile_s:.1f}",
           f"{m.median_s * 1e3:.1f}", f"{m.images_per_s:.2f}", _fmt(m.analytic_flops, ".4g", 1e12),
           _fmt(m.xla_flops, ".4g", 1e12), _fmt(m.mfu, ".1%"),
           _fmt(m.peak_memory_bytes, ".2f", GIB, "n/a (backend has no memory_stats)"),
           _fmt(m.estimated_memory_bytes, ".2f", GIB), f"`{command}`"]
  return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def baseline_row(m: Measurement, *, config_name: str, command: str, date: str | None = None) -> str | None:
  """A markdown row of BASELINE_HEADER for a measurement with baselines (None without): sd_jax's median and each
  diffusers median with its ratio (diffusers / sd_jax: above 1, sd_jax is faster)."""
  baselines = m.extra.get("baselines")
  if not baselines:
    return None
  import torch  # pylint: disable=import-outside-toplevel  (there: the baselines ran)
  cells = [date or datetime.date.today().isoformat(), m.mode, f"{m.device} ×{m.num_devices}", jax.__version__,
           torch.__version__, config_name, str(m.batch), f"{m.median_s * 1e3:.1f}"]
  for mode in ("eager", "compile"):
    b = baselines.get(mode)
    cells += [f"{b['median_s'] * 1e3:.1f}", f"{b['ratio']:.2f}"] if b else ["not run", ""]
  cells.append(f"`{command}`")
  return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def append_rows(path, header: str, rows: Sequence[str], preamble: str = "") -> None:
  """Appends rows to the table at the end of `path` if it has `header`; otherwise starts a new table there."""
  path = Path(path)
  text = path.read_text() if path.exists() else ""
  lines = text.rstrip("\n").splitlines()
  block = []
  for line in reversed(lines):
    if not line.startswith("|"):
      break
    block.insert(0, line)
  out = text.rstrip("\n")
  if not (block and block[0] == header):
    separator = "|" + "---|" * (header.count("|") - 1)
    out += ("\n\n" if out else "") + (preamble + "\n\n" if preamble else "") + header + "\n" + separator
  path.write_text(out + "\n" + "\n".join(rows) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/X.py[:args]).", lock_config=True)
  flags.DEFINE_enum("mode", "train", ["train", "sample", "pipeline"], "What to time.")
  flags.DEFINE_bool("aot", False, "Compile the train step for meshes of fake CPU devices instead of timing.")
  flags.DEFINE_enum("task", "auto", ["auto", "trainer", "latent_unet"],
                    "auto: ldm configs → the U-Net on precomputed latents (no VAE / text tower); others → "
                    "their trainer. trainer: always the config's trainer (ldm then needs ldm.vae_from/text_from).")
  flags.DEFINE_integer("steps", 10, "Timed calls (median reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling.")
  flags.DEFINE_list("baseline", [], "Also time diffusers/PyTorch: the same U-Net, weights and batch (train mode, "
                    "ldm configs), or StableDiffusionPipeline on the same model (pipeline mode): eager, compile "
                    "(torch.compile), or both; reported as diffusers time / sd_jax time. Needs the [test] extras "
                    "(torch, diffusers).")
  flags.DEFINE_string("model_dir", None, "Pipeline mode: an sd_jax or diffusers model directory (U-Net, VAE, text "
                      "tower, tokenizer, scheduler).")
  flags.DEFINE_list("prompts", ["a red square", "a blue circle"], "Pipeline mode: the prompts, cycled to each "
                    "batch size.")
  flags.DEFINE_float("guidance", 7.5, "Pipeline mode: classifier-free guidance scale.")
  flags.DEFINE_string("profile_dir", "", "Train mode: after the timed steps, profile --steps more with "
                      "jax.profiler (TensorBoard and Perfetto traces in this directory) and print where a step's time "
                      "went, per XLA op, collective and runtime span.")
  flags.DEFINE_float("peak_tflops", None, "Device peak TFLOP/s for MFU, overriding the PEAKS table.")
  flags.DEFINE_string("benchmarks", str(REPO / "BENCHMARKS.md"), "File the rows are appended to; '' = none.")
  flags.DEFINE_list("sample_batch_sizes", ["1", "16"], "Sample and pipeline modes: batch sizes.")
  flags.DEFINE_integer("sample_steps", None, "Sample and pipeline modes: DDIM steps (default: sample mode "
                       "config.sample.num_steps or 50; pipeline mode 50).")
  flags.DEFINE_string("vae", None, "Sample mode: VAE config name (default config.bench.vae, else 'sd').")
  flags.DEFINE_list("aot_devices", ["8", "64", "256"], "AOT: fake device counts.")
  flags.DEFINE_list("aot_meshes", ["data", "fsdp"], "AOT: data | fsdp (all devices on that axis) | fsdpK | dataK.")
  flags.DEFINE_list("aot_per_device_batch", ["1", "8"], "AOT: examples per device.")
  flags.DEFINE_float("aot_timeout", 1800.0, "AOT: seconds allowed per compile.")
  flags.DEFINE_bool("aot_compile", True, "AOT: compile the step; --noaot_compile reports the state bytes only.")
  flags.DEFINE_string("aot_json", "", "AOT: also write every point's full result as JSON lines to this file.")
  flags.DEFINE_list("aot_tpu", [], "AOT: TPU topologies (e.g. v5e:2x4,v5p:2x2x2) to compile for with libtpu's "
                    "compiler on this host, in place of --aot_devices (needs libtpu: pip install 'jax[tpu]').")
  flags.DEFINE_bool("aot_worker", False, "Internal: one AOT compile in this process.")
  flags.DEFINE_enum("suite", None, ["gpu"], "Run a whole suite instead of one measurement. gpu: every GPU row of "
                    "BENCHMARKS.md's targets on one GPU (SD 1.5 train steps at 512² and 256² over batch sizes and "
                    "levers, sampling at batch 1 and 16, the diffusers ratios), in order until --suite_budget_s.")
  flags.DEFINE_float("suite_budget_s", 480.0, "Suite: no point starts after this many seconds.")
  flags.DEFINE_string("suite_json", "gpu_suite.json", "Suite: every point's result (or why it was not measured) as "
                      "JSON; '' = none.")
  flags.DEFINE_bool("suite_tiny", False, "Suite: the same points at test sizes (a CPU check of the command).")
  return flags.FLAGS


def _config_name(argv: Sequence[str]) -> str:
  return " ".join(a[len("--config="):] if a.startswith("--config=") else a[2:] for a in argv
                  if a.startswith("--config"))


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  config = FLAGS.config
  config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
  command = "python -m sd_jax.bench " + shlex.join(sys.argv[1:])
  if FLAGS.suite:
    if config_args or FLAGS.aot:
      raise ValueError("--suite=gpu builds its own configs (configs/sd15_ldm.py): drop --config and --aot.")
    results = run_suite(GPU_SUITE, budget_s=FLAGS.suite_budget_s, tiny=FLAGS.suite_tiny,
                        steps=FLAGS.steps if FLAGS["steps"].present else 5, warmup=FLAGS.warmup,
                        sample_steps=FLAGS.sample_steps or 50, benchmarks=FLAGS.benchmarks or None,
                        json_path=FLAGS.suite_json or None, command=command, peak_tflops=FLAGS.peak_tflops)
    counts = collections.Counter(r["status"] for r in results)
    print(f"[suite] {dict(counts)}" + (f"; rows appended to {FLAGS.benchmarks}" if FLAGS.benchmarks else ""))
    return
  if FLAGS.aot_worker:
    result = aot_worker(config, int(FLAGS.aot_devices[0]), FLAGS.aot_meshes[0], int(FLAGS.aot_per_device_batch[0]),
                        FLAGS.task, FLAGS.aot_compile, FLAGS.aot_tpu[0] if FLAGS.aot_tpu else "")
    print("AOT_RESULT " + json.dumps(result))
    return
  if FLAGS.aot:
    print(AOT_HEADER)
    print("|" + "---|" * (AOT_HEADER.count("|") - 1))
    results = run_aot(config_args, [int(n) for n in FLAGS.aot_devices], FLAGS.aot_meshes,
                      [int(b) for b in FLAGS.aot_per_device_batch], task_kind=FLAGS.task,
                      timeout_s=FLAGS.aot_timeout, compile=FLAGS.aot_compile, tpus=FLAGS.aot_tpu)
    if FLAGS.aot_json:
      Path(FLAGS.aot_json).write_text("".join(json.dumps(r) + "\n" for r in results))
    if FLAGS.benchmarks:
      target = "fake CPU devices"
      if FLAGS.aot_tpu:
        from importlib import metadata  # pylint: disable=import-outside-toplevel
        target = f"TPU compiler (libtpu {metadata.version('libtpu')})"
      preamble = f"AOT plan, {datetime.date.today().isoformat()}, JAX {jax.__version__}, {target}: `{command}`"
      append_rows(FLAGS.benchmarks, AOT_HEADER, [aot_row(r) for r in results], preamble)
    return
  from sd_jax import baseline  # pylint: disable=import-outside-toplevel  (imports torch only when asked)
  baselines = baseline.parse_modes(FLAGS.baseline)
  if FLAGS.mode == "pipeline":
    if not FLAGS.model_dir:
      raise ValueError("--mode=pipeline times a model directory: pass --model_dir=DIR (sd_jax's or diffusers' "
                       "layout; e.g. a run's WORKDIR/export).")
    if config_args:
      raise ValueError("--mode=pipeline reads everything from --model_dir: drop --config.")
    config_args = [f"--model_dir={FLAGS.model_dir}"]
    from sd_jax import machine  # pylint: disable=import-outside-toplevel
    machine.use_every_core()  # as `python -m sd_jax.sample`: one JAX device per core on a CPU-only machine
    measurements = bench_pipeline(FLAGS.model_dir, prompts=FLAGS.prompts,
                                  batch_sizes=[int(b) for b in FLAGS.sample_batch_sizes],
                                  num_steps=FLAGS.sample_steps or 50, guidance=FLAGS.guidance, steps=FLAGS.steps,
                                  warmup=FLAGS.warmup, baselines=baselines, peak_tflops=FLAGS.peak_tflops)
  elif config is None:
    raise ValueError("--config=configs/X.py is required for --mode=train and --mode=sample.")
  elif FLAGS.mode == "train":
    measurements = [bench_train(config, steps=FLAGS.steps, warmup=FLAGS.warmup, task_kind=FLAGS.task,
                                peak_tflops=FLAGS.peak_tflops, baselines=baselines,
                                profile_dir=FLAGS.profile_dir or None)]
    if FLAGS.profile_dir:
      print(f"where a step's time went ({FLAGS.steps} profiled steps; ms per step summed over devices and threads, "
            f"occurrences per step; trace in {FLAGS.profile_dir}):")
      for op in measurements[0].extra["profile"]:
        print(f"  {op['ms_per_call']:10.2f} ms  {op['per_call']:8.1f}×  {op['name'][:100]}")
      threads = measurements[0].extra["threads"]
      print(f"XLA's worker threads, ms per profiled step in ops / waiting in collectives, of the "
            f"{threads[0]['running_ms_per_call']:.1f} ms the step ran:" if threads else "no XLA worker threads traced")
      for t in threads:
        print(f"  {t['busy_ms_per_call']:10.2f} / {t['collective_ms_per_call']:.2f}  {t['thread']}")
  else:
    if baselines:
      raise ValueError("--baseline is for --mode=train and --mode=pipeline (the text-to-image comparison).")
    measurements = bench_sample(config, batch_sizes=[int(b) for b in FLAGS.sample_batch_sizes],
                                num_steps=FLAGS.sample_steps, steps=FLAGS.steps, warmup=FLAGS.warmup,
                                vae_name=FLAGS.vae, peak_tflops=FLAGS.peak_tflops)
  rows = [measurement_row(m, config_name=_config_name(config_args), command=command) for m in measurements]
  print(MEASURED_HEADER)
  print("\n".join(rows))
  for m in measurements:
    shown = {k: v for k, v in m.extra.items() if k not in ("times_s", "profile")}
    print(json.dumps({"mode": m.mode, "batch": m.batch, **shown}, default=float))
  compared = [r for m in measurements
              if (r := baseline_row(m, config_name=_config_name(config_args), command=command)) is not None]
  if compared:
    print(BASELINE_HEADER)
    print("\n".join(compared))
  if FLAGS.benchmarks:
    append_rows(FLAGS.benchmarks, MEASURED_HEADER, rows,
                "Measured rows (appended by `python -m sd_jax.bench`; device, JAX version and command in each row).")
    if compared:
      append_rows(FLAGS.benchmarks, BASELINE_HEADER, compared,
                  "sd_jax and diffusers/PyTorch side by side (appended by `python -m sd_jax.bench --baseline=...`; "
                  "ratio = diffusers time / sd_jax time, above 1: sd_jax is faster).")


if __name__ == "__main__":
  from sd_jax import machine as _machine
  _machine.reexec_with_hugepage_malloc()  # large CPU buffers in huge pages (sd_jax/machine.py)
  from sd_jax import cli
  _define_flags()  # only here: importing sd_jax.bench (tests, trainer registration) defines no flags
  cli.run_app(main)  # app.run(main), with the --help and error format of every sd_jax command
