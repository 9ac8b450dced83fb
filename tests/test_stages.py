"""sd_jax.stages: the batch sizes it reads from the stage configs and the CPU device count it picks from them."""

import pytest

from sd_jax import machine, stages


def test_stage_batch_sizes_come_from_the_configs(tmp_path):
  sizes = {s: stages.stage_batch_size(s, "demo", tmp_path) for s in stages.STAGES}
  assert sizes == {"vae": 16, "clip": 64, "ldm": 32}
  assert stages.stage_batch_size("vae", "full", tmp_path) == 32
  # A --stage_override of the batch size wins (the last one, as on a command line).
  assert stages.stage_batch_size("ldm", "demo", tmp_path, ["--config.batch_size=24", "--config.batch_size=12"]) == 12


def test_choose_cpu_devices(tmp_path, monkeypatch):
  overrides = {s: [] for s in stages.STAGES}
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert stages.choose_cpu_devices(None, "demo", tmp_path, overrides) is None   # the environment's count is kept
  assert stages.choose_cpu_devices(3, "demo", tmp_path, overrides) == 3         # --cpu_devices wins
  with pytest.raises(SystemExit, match="--cpu_devices=0"):
    stages.choose_cpu_devices(0, "demo", tmp_path, overrides)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(machine, "usable_cores", lambda: 2)
  assert stages.choose_cpu_devices(None, "demo", tmp_path, overrides) == 2
  # A batch size that one device per core would not divide lowers the count.
  overrides["clip"] = ["--config.batch_size=63"]
  assert stages.choose_cpu_devices(None, "demo", tmp_path, overrides) == 1
