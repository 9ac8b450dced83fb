"""Shared test helpers: tiny configs, metric reading, subprocess runs of the entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str = "shapes_ddpm", arg: str = "runlocal", **overrides):
  """configs/<name>.py:get_config(arg) with dotted-key overrides ("optim.lr": 1e-3)."""
  from sd_jax import config_lib
  config = config_lib.load_config_file(REPO / "configs" / f"{name}.py", arg)
  config.lock()  # as the command line does (config_flags lock_config=True)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def losses(workdir) -> dict[int, float]:
  from sd_jax import metrics
  return {row["step"]: row["loss"] for row in metrics.read_metrics(workdir) if "loss" in row}


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS for a subprocess with `num_devices` CPU devices, keeping this process's other flags (conftest.py)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([f"--xla_force_host_platform_device_count={num_devices}", *flags])


def run_main(args: list[str], *, env: dict[str, str] | None = None, timeout: int = 300,
             check: bool = False) -> subprocess.CompletedProcess:
  """Runs `python -m sd_jax.main ARGS` in a fresh process (its own device count from env XLA_FLAGS)."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  result = subprocess.run([sys.executable, "-m", "sd_jax.main", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"sd_jax.main failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
  return result


def randomize_torch(model, seed: int):
  """A torch module with every parameter non-zero (diffusers zero-initialises some output layers), norms near 1."""
  import torch  # pylint: disable=import-outside-toplevel
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator) * 0.05
      p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)
  return model.eval()


def public_config(config: dict) -> dict:
  """A diffusers config without its private `_...` keys."""
  return {k: v for k, v in config.items() if not k.startswith("_")}
