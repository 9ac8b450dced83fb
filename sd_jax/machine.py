"""Which machine a run is on, so that wall times can be compared across machines.

Two 2-core CPUs can differ twice over in what they do per second (RESULTS.md: the demo U-Net's train step took
150 ms on one and 280-350 ms on another, an AVX2-only AMD Zen 3 at 2.45 GHz). A wall time alone says little; with
`cpu_description()` (model, family, vector extensions, clock) and `reference_gflops()` (a fixed float32 3×3
convolution, the demo U-Net's most common op, timed for about a second) beside it, it can be compared.

  python -m sd_jax.machine [--seconds 1.0]     # prints both

It also chooses how many JAX CPU devices a CPU run should have (`auto_cpu_devices`): XLA runs each CPU device's
program on its own thread, and on 2 cores two data-parallel replicas of half the batch each keep both cores busier
than one program does (RESULTS.md, "One JAX CPU device per core", 2026-11-23: the demo VAE's train step 694 → 348
ms, the demo U-Net's 280-350 → 210-225 ms; 4 devices were no faster than 2).
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence

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
  parts.append(f"{usable_cores()} cores")
  return ", ".join(parts)


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


# The most CPU devices `auto_cpu_devices` picks: the count the tests run (8 fake devices); more is unmeasured.
MAX_AUTO_CPU_DEVICES = 8


def requested_cpu_devices(environ=os.environ) -> int | None:
  """The CPU device count the environment already asks JAX for: JAX_NUM_CPU_DEVICES (which wins) or XLA_FLAGS's
  --xla_force_host_platform_device_count; None when neither is set."""
  if environ.get("JAX_NUM_CPU_DEVICES", "").strip():
    return int(environ["JAX_NUM_CPU_DEVICES"])
  match = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
  return int(match.group(1)) if match else None


def auto_cpu_devices(batch_sizes, cores: int | None = None) -> int:
  """One CPU device per core, at most MAX_AUTO_CPU_DEVICES, and a count that divides every batch size (so that a
  data-parallel mesh over all of them is valid): the largest such count, at least 1."""
  cores = usable_cores() if cores is None else cores
  common = 0
  for size in batch_sizes:
    common = math.gcd(common, int(size))
  limit = max(1, min(cores, MAX_AUTO_CPU_DEVICES))
  return max(n for n in range(1, limit + 1) if common % n == 0)


# glibc's malloc backs the large blocks it maps (XLA's CPU buffers of a few MB and up) with transparent huge pages
# when asked to: otherwise every fresh output buffer is faulted in 4 KiB at a time and zeroed by the kernel. On the
# 2-core CPU of BENCHMARKS.md, "sd_jax beside diffusers/PyTorch": a 268 MB elementwise op 121 -> 35 ms, the 33.8 M
# U-Net's train step 5.2 -> 3.0 s, the demo U-Net's 192 -> 163 ms.
HUGEPAGE_MALLOC = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugepage_malloc_env(environ=os.environ, thp_file: str = _THP_ENABLED) -> dict[str, str] | None:
  """`environ` with HUGEPAGE_MALLOC added to GLIBC_TUNABLES, or None where there is nothing to do: not Linux with
  glibc, transparent huge pages off ("[never]") or unknown, the tunable set already, or SD_JAX_HUGEPAGE_MALLOC=0."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return None
  if environ.get("SD_JAX_HUGEPAGE_MALLOC", "1") == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in tunables:
    return None
  try:
    with open(thp_file) as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGEPAGE_MALLOC) if t)}


def reexec_with_hugepage_malloc() -> None:
  """At the start of a command: glibc reads its tunables only when a process starts, so restart this one (same pid,
  same command line) with HUGEPAGE_MALLOC, unless `hugepage_malloc_env` says there is nothing to do. The stages'
  processes inherit it."""
  env = hugepage_malloc_env()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def use_every_core(batch_sizes: Sequence[int] = ()) -> int | None:
  """Before JAX starts, in a command run directly: one JAX CPU device per core (`auto_cpu_devices` of the batch
  sizes), as `sd_jax.stages` arranges for its stages, so a CPU-only machine's every core trains and samples (XLA runs
  each CPU device's program on one thread pool; one device leaves most of the machine idle). Returns the count set,
  or None where it leaves JAX as it is: the environment already asks for a count (JAX_NUM_CPU_DEVICES, XLA_FLAGS'
  --xla_force_host_platform_device_count), or JAX's backends have started. An accelerator's runs are unaffected
  (the count is the CPU backend's only)."""
  import jax
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if requested_cpu_devices() is not None or xla_bridge.backends_are_initialized():
    return None
  count = auto_cpu_devices(batch_sizes)
  jax.config.update("jax_num_cpu_devices", count)
  return count


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
  """cpu_description() and reference_gflops() (on the first device), with the JAX device kind and count."""
  import jax
  device = jax.devices()[0]
  return {"cpu": cpu_description(), "device": f"{device.platform}:{device.device_kind}",
          "device_count": jax.device_count(), "reference_conv_gflops": round(reference_gflops(seconds), 1)}


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sd_jax.machine`: prints `describe()`, one `key: value` line each (argv: its flags, without the
  program name; default sys.argv[1:]). Exits 2 on bad flags."""
  from absl import flags
  from sd_jax import cli
  cmd = cli.Command("python -m sd_jax.machine", __doc__)
  flags.DEFINE_float("seconds", 1.0, "How long the reference convolution is timed, after compiling.",
                     flag_values=cmd.flags)
  args = cmd.parse(argv)
  if not args.seconds > 0:
    cmd.error(f"--seconds={args.seconds}: must be > 0.")
  for key, value in describe(args.seconds).items():
    print(f"{key}: {value}")
  return 0


if __name__ == "__main__":
  reexec_with_hugepage_malloc()
  sys.exit(main())
