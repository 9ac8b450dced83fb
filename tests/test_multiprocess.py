"""Runs of the real entry point in separate processes: 2-process (gloo) training, and SIGTERM preemption."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from sd_jax import metrics
from sd_jax import train
from sd_jax.data import shapes
from tests import helpers

CONFIG = f"--config={helpers.REPO}/configs/shapes_ddpm.py:runlocal"
COMMON = ["--config.log_every_steps=1", "--config.eval_every_steps=-1", "--config.optim.schedule=constant"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int, data_dir: str) -> dict[str, str]:
  return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}", "JAX_PLATFORMS": "cpu",
          "SD_JAX_DATA_DIR": data_dir}


def test_two_processes_match_one_process_four_devices(data_dir, tmp_path):
  """2 processes x 2 CPU devices (gloo collectives), each reading its own data shard, equal 1 process x 4 devices."""
  shapes.build(data_dir, config="r32_tiny")  # build once, not concurrently from both processes
  steps = 4
  workdir = tmp_path / "two"
  port = _free_port()
  args = [CONFIG, f"--workdir={workdir}", f"--config.total_steps={steps}", "--config.save_every_steps=2", *COMMON,
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "sd_jax.main", *args, f"--process_id={i}"], cwd=helpers.REPO,
                            env={**os.environ, **_env(2, data_dir)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]
  assert "process 1 of 2" in outputs[1]

  single = helpers.load_config(total_steps=steps, save_every_steps=2, log_every_steps=1, eval_every_steps=-1,
                               **{"optim.schedule": "constant"})
  train.train_and_evaluate(single, str(tmp_path / "one"), devices=jax.devices()[:4])
  two, one = helpers.losses(workdir), helpers.losses(tmp_path / "one")
  assert sorted(two) == sorted(one) == list(range(1, steps + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
  # Host 0 alone wrote the metrics (no duplicated rows); both processes took part in the checkpoint.
  assert len([r for r in metrics.read_metrics(workdir) if "loss" in r]) == steps
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_sigterm_saves_current_step_and_resume_continues_exactly(data_dir, tmp_path):
  shapes.build(data_dir, config="r32_tiny")
  workdir = tmp_path / "preempted"
  args = [CONFIG, f"--workdir={workdir}", "--config.total_steps=100000", "--config.save_every_steps=100000",
          *COMMON]
  proc = subprocess.Popen([sys.executable, "-m", "sd_jax.main", *args], cwd=helpers.REPO,
                          env={**os.environ, **_env(8, data_dir)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while len(helpers.losses(workdir)) < 3:
    assert proc.poll() is None, proc.communicate()[0][-5000:]
    assert time.time() < deadline, "training did not start"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-5000:]
  assert "SIGTERM received" in out
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and saved[0] >= 3, saved
  preempted_at = saved[0]

  # Rerunning the same command resumes at the preemption step; run two more steps and compare with an
  # uninterrupted run of the same length (same device count: bitwise on CPU).
  total = preempted_at + 2
  result = helpers.run_main([a if not a.startswith("--config.total_steps") else f"--config.total_steps={total}"
                             for a in args], env=_env(8, data_dir), check=True)
  assert "Resuming from" in result.stderr and f"step {preempted_at}" in result.stderr
  reference = helpers.load_config(total_steps=total, save_every_steps=100000, log_every_steps=1,
                                  eval_every_steps=-1, **{"optim.schedule": "constant"})
  train.train_and_evaluate(reference, str(tmp_path / "uninterrupted"))
  assert helpers.losses(workdir) == helpers.losses(tmp_path / "uninterrupted")
