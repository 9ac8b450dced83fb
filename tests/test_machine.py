"""sd_jax.machine: the CPU description and the reference convolution that sit beside every demo wall time."""

import pytest

from sd_jax import machine

_CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC
cpu MHz		: 2445.404
flags		: fpu sse4_2 avx fma avx2 bmi2

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: some other CPU
"""


def test_cpu_description_from_cpuinfo(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(_CPUINFO)
  text = machine.cpu_description(str(path))
  # The first processor's fields; avx and sse4_2 are implied by avx2 and not repeated.
  assert text.startswith("AMD EPYC (family 25 model 1, Zen 3), avx2 fma, 2445 MHz, ")
  assert text.endswith(" cores") and "other" not in text
  path.write_text(_CPUINFO.replace("model\t\t: 1\n", "model\t\t: 17\n", 1).replace("avx2", "avx2 avx512f"))
  assert machine.cpu_description(str(path)).startswith("AMD EPYC (family 25 model 17, Zen 4), avx512f avx2 fma")


def test_cpu_description_without_cpuinfo(tmp_path):
  text = machine.cpu_description(str(tmp_path / "missing"))
  assert text and text.endswith(" cores")


def test_reference_gflops_counts_the_convolutions(monkeypatch):
  """The rate is the FLOPs of ten 3x3 convolutions over the median round time: with a clock that advances 1 s per
  reading, each round lasts 1 s, so the rate is exactly the FLOPs of one round."""
  ticks = iter(range(10_000))
  monkeypatch.setattr(machine.time, "perf_counter", lambda: float(next(ticks)))
  rate = machine.reference_gflops(seconds=0.0, batch=2, size=4, channels=8)
  assert rate == pytest.approx(10 * 2 * 2 * 4 * 4 * 8 * 8 * 9 / 1e9)


def test_describe_runs_on_this_machine():
  described = machine.describe(seconds=0.05)
  assert described["device"].startswith("cpu:") and described["reference_conv_gflops"] > 0


def test_requested_cpu_devices_reads_both_settings():
  assert machine.requested_cpu_devices({}) is None
  assert machine.requested_cpu_devices({"XLA_FLAGS": "--xla_backend_optimization_level=0"}) is None
  flags = {"XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"}
  assert machine.requested_cpu_devices(flags) == 8
  # JAX_NUM_CPU_DEVICES overrides the XLA flag in JAX, so it is the one reported.
  assert machine.requested_cpu_devices({**flags, "JAX_NUM_CPU_DEVICES": "2"}) == 2


@pytest.mark.parametrize("batch_sizes, cores, expected", [
    ((16, 64, 32), 2, 2),     # the demo's stages on 2 cores
    ((16, 64, 32), 1, 1),
    ((16, 64, 32), 3, 2),     # 3 does not divide 16
    ((16, 64, 32), 64, 8),    # at most MAX_AUTO_CPU_DEVICES
    ((12, 18), 8, 6),
    ((7,), 4, 1),
    ((), 4, 4),
])
def test_auto_cpu_devices_divides_every_batch(batch_sizes, cores, expected):
  n = machine.auto_cpu_devices(batch_sizes, cores=cores)
  assert n == expected and all(b % n == 0 for b in batch_sizes)
  assert machine.usable_cores() >= 1


def _env_without_a_device_count(**extra):
  import os
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_a_command_run_directly_gets_one_cpu_device_per_core(tmp_path):
  """`use_every_core` before JAX starts: the auto count; with a count already asked for: left alone. And
  `python -m sd_jax.main` run directly trains on that many devices (here it stops at once: total_steps=0)."""
  import subprocess
  import sys

  from tests import helpers
  code = "from sd_jax import machine; n = machine.use_every_core([6]); import jax; print(n, jax.device_count())"
  want = machine.auto_cpu_devices([6])
  for extra, expected in (({}, f"{want} {want}"), ({"JAX_NUM_CPU_DEVICES": "3"}, "None 3")):
    result = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=_env_without_a_device_count(**extra),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == expected, result.stderr[-2000:]
  batch = helpers.load_config("shapes_ddpm", "runlocal").batch_size
  want = machine.auto_cpu_devices([batch])
  result = helpers.run_main([f"--config={helpers.REPO}/configs/shapes_ddpm.py:runlocal", f"--workdir={tmp_path}",
                             "--config.total_steps=0"], env=_env_without_a_device_count(), timeout=120)
  assert f"{want} local / {want} global devices" in result.stderr, result.stderr[-2000:]


def test_hugepage_malloc_env_adds_the_tunable_once(tmp_path):
  madvise, never = tmp_path / "madvise", tmp_path / "never"
  madvise.write_text("always [madvise] never\n")
  never.write_text("always madvise [never]\n")
  if machine.hugepage_malloc_env({}, str(madvise)) is None:
    pytest.skip("not Linux with glibc")
  assert machine.hugepage_malloc_env({"A": "1"}, str(madvise)) == {"A": "1", "GLIBC_TUNABLES": machine.HUGEPAGE_MALLOC}
  assert machine.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, str(madvise)) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + machine.HUGEPAGE_MALLOC}
  assert machine.hugepage_malloc_env({"GLIBC_TUNABLES": machine.HUGEPAGE_MALLOC}, str(madvise)) is None  # set already
  assert machine.hugepage_malloc_env({}, str(never)) is None  # transparent huge pages off
  assert machine.hugepage_malloc_env({}, str(tmp_path / "missing")) is None
  assert machine.hugepage_malloc_env({"SD_JAX_HUGEPAGE_MALLOC": "0"}, str(madvise)) is None  # the opt-out


def test_a_command_restarts_itself_with_the_hugepage_malloc():
  """reexec_with_hugepage_malloc: the same command line again, in the same process, with the tunable set."""
  import os
  import subprocess
  import sys

  from tests import helpers
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if machine.hugepage_malloc_env(env) is None:
    pytest.skip("no huge-page malloc here (not glibc, or transparent huge pages off)")
  code = ("import os, sys; pid = os.getpid(); from sd_jax import machine; print(os.environ.get('GLIBC_TUNABLES'), "
          "sys.argv[1:], flush=True); machine.reexec_with_hugepage_malloc()")
  result = subprocess.run([sys.executable, "-c", code, "x"], cwd=helpers.REPO, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.stdout.splitlines() == ["None ['x']", f"{machine.HUGEPAGE_MALLOC} ['x']"], result.stderr[-2000:]
  result = subprocess.run([sys.executable, "-c", code, "x"], cwd=helpers.REPO,
                          env={**env, "SD_JAX_HUGEPAGE_MALLOC": "0"}, capture_output=True, text=True, timeout=120)
  assert result.stdout.splitlines() == ["None ['x']"]
