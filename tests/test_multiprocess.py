"""The real entry point: its multi-process flags, and SIGTERM preemption of a run in a separate process."""

import os
import signal
import subprocess
import sys
import time

import pytest

from sd_jax import train
from sd_jax.data import shapes
from tests import helpers

CONFIG = f"--config={helpers.REPO}/configs/shapes_ddpm.py:runlocal"
COMMON = ["--config.log_every_steps=1", "--config.eval_every_steps=-1", "--config.optim.schedule=constant"]


def _env(num_devices: int, data_dir: str) -> dict[str, str]:
  return {"XLA_FLAGS": helpers.xla_flags(num_devices), "JAX_PLATFORMS": "cpu", "SD_JAX_DATA_DIR": data_dir}


def test_explicit_process_flags_start_jax_distributed(monkeypatch):
  """--coordinator_address / --num_processes / --process_id reach jax.distributed (through initialize_distributed,
  which also turns on gloo). A real 2-process run (gloo collectives, its losses equal to 1 process x 4 devices) is
  tests/experiments/test_launch.py::test_slurm_task_script_runs_two_processes: the --slurm path ends in the same
  call, and one such run is all a small machine can afford."""
  from absl import logging as absl_logging
  from absl.testing import flagsaver
  from sd_jax import main as sd_main

  calls = []

  class Started(Exception):
    pass

  def initialize(*args):
    calls.append(args)
    raise Started  # stop before training

  monkeypatch.setattr(sd_main, "initialize_distributed", initialize)
  handler = absl_logging.get_absl_handler()
  filters = list(handler.filters)
  try:
    with flagsaver.flagsaver():
      sd_main.FLAGS([sys.argv[0], CONFIG, "--workdir=unused", "--coordinator_address=127.0.0.1:1234",
                     "--num_processes=2", "--process_id=1"])
      with pytest.raises(Started):
        sd_main.main([sys.argv[0]])
  finally:
    handler.filters[:] = filters
  assert calls == [("127.0.0.1:1234", 2, 1, False)]


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
