"""Which machine a run is on, so that wall times can be compared across machines.

Two 2-core CPUs can differ twice over in what they do per second (RESULTS.md: the demo U-Net's train step took
150 ms on one and 280-350 ms on another, an AVX2-only AMD Zen 3 at 2.45 GHz). A wall time alone says little; with
`cpu_description()` (model, family, vector extensions, clock) and `reference_gflops()` (a fixed float32 3×3
convolution, the demo U-Net's most common op, timed for about a second) beside it, it can be compared.

  python -m sd_jax.machine      # prints both
"""

from __future__ import annotations

import os
import platform
import statistics
import time

# Vector extensions worth naming (XLA's CPU kernels use the widest the CPU has).
_ISA = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma", "avx", "sse4_2", "asimd", "sve")
# (vendor, family) -> the microarchitecture of AMD's families (family 25 is Zen 3 and Zen 4: the model decides).
_AMD = {23: "Zen/Zen 2", 26: "Zen 5"}


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
  fields: dict[str, str] = {}
  try:
    with open(path) as f:
      for line in f:
        if not line.strip():
          if fields:
            break
          continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


def _amd_microarchitecture(family: int, model: int) -> str | None:
  if family == 25:
    return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
  return _AMD.get(family)


def cpu_description(path: str = "/proc/cpuinfo") -> str:
  """E.g. "AMD EPYC (family 25 model 1, Zen 3), avx2 fma, 2445 MHz, 2 cores"."""
  info = _cpuinfo(path)
  name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
  details = []
  if "cpu family" in info and "model" in info:
    try:
      family, model = int(info["cpu family"]), int(info["model"])
    except ValueError:
      family = model = -1
    arch = _amd_microarchitecture(family, model) if "AMD" in info.get("vendor_id", "") + name else None
    details.append(f"family {family} model {model}" + (f", {arch}" if arch else ""))
  parts = [f"{name} ({details[0]})" if details else name]
  flags = set((info.get("flags") or info.get("Features") or "").split())
  isa = [f for f in _ISA if f in flags]
  if isa:
    # Name the widest family once: avx512f implies the AVX2 tier, avx2 implies avx.
    widest = [f for f in isa if not (f == "avx" and "avx2" in isa) and not (f == "sse4_2" and "avx" in isa)]
    parts.append(" ".join(widest))
  if info.get("cpu MHz"):
    parts.append(f"{float(info['cpu MHz']):.0f} MHz")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  parts.append(f"{cores} cores")
  return ", ".join(parts)


def reference_gflops(seconds: float = 1.0, *, batch: int = 32, size: int = 8, channels: int = 64) -> float:
  """GFLOP/s of a float32 3×3 'SAME' convolution ([batch, size, size, channels] → channels, NHWC) on the default
  device, timed for about `seconds` after compiling: the median of rounds of 10 calls."""
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels), jnp.float32) / (3 * channels ** 0.5)

  @jax.jit
  def ten(x, w):
    for _ in range(10):  # chained, so nothing can be skipped; scaled to keep the values finite
      x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return x

  ten(x, w).block_until_ready()
  rounds, start = [], time.perf_counter()
  while time.perf_counter() - start < seconds or len(rounds) < 3:
    t = time.perf_counter()
    ten(x, w).block_until_ready()
    rounds.append(time.perf_counter() - t)
  flops = 10 * 2 * batch * size * size * channels * channels * 9
  return flops / statistics.median(rounds) / 1e9


def describe(seconds: float = 1.0) -> dict[str, object]:
  """cpu_description() and reference_gflops(), with the JAX device they ran on."""
  import jax
  device = jax.devices()[0]
  return {"cpu": cpu_description(), "device": f"{device.platform}:{device.device_kind}",
          "reference_conv_gflops": round(reference_gflops(seconds), 1)}


if __name__ == "__main__":
  for key, value in describe().items():
    print(f"{key}: {value}")
