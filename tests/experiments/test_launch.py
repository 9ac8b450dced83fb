"""Real runs of tiny sweeps: local launch (interrupted run resumed, finished runs skipped, evaluations on the best
runs, report) and a 2-process run started the way srun starts it (SLURM_PROCID / SLURM_NTASKS / node list).

The runs vary only the seed and log every step with a constant learning rate: the train step is the program
tests/test_multiprocess.py compiles too, so JAX's persistent compilation cache (tests/conftest.py) serves it.
"""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from experiments import report as report_lib
from experiments import launchers
from experiments import sweep as sw
from sd_jax import metrics
from sd_jax.data import shapes
from tests import helpers

TOTAL = 6
# An evaluation that needs no model: the run's last training loss, at two "settings", on the best seed's group.
SWEEP_FILE = f"""
from experiments.sweep import *

SWEEP = Sweep(
    config="configs/shapes_ddpm.py", arg="runlocal",
    fixed={{"total_steps": {TOTAL}, "save_every_steps": 3, "log_every_steps": 1, "eval_every_steps": -1,
           "optim.schedule": "constant"}},
    runs=seeds(2),
    evals=[Eval("last", command=("{{python}} -c 'import json, sys; "
                                 "row = json.loads(open(sys.argv[1] + \\"/metrics.jsonl\\").readlines()[-1]); "
                                 "json.dump(dict(last_loss=row[\\"loss\\"] * {{scale}}), open(sys.argv[2], \\"w\\"))' "
                                 "{{workdir}} {{out}}"),
                grid=grid("scale", [1, 2]), select=Best("loss", "min"))],
)
"""


def _env(devices: int, data_dir: str) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": helpers.xla_flags(devices), "JAX_PLATFORMS": "cpu", "SD_JAX_DATA_DIR": data_dir}


def _sweep(*args, env, monkeypatch):
  """`python -m experiments.sweep ARGS` in this process; the runs it starts get `env`."""
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = launchers.main([str(a) for a in args])
  return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_local_launch_resumes_skips_evaluates_and_reports(data_dir, tmp_path, monkeypatch):
  shapes.build(data_dir, config="r32_tiny")
  env = _env(1, data_dir)  # one device: 8 fake ones make each step several times slower on 2 cores
  sweep_file = tmp_path / "seeds.py"
  sweep_file.write_text(textwrap.dedent(SWEEP_FILE))
  out = tmp_path / "runs"
  result = _sweep(sweep_file, "--out", out, env=env, monkeypatch=monkeypatch)  # expand only
  assert result.returncode == 0, result.stderr
  assert sorted(p.name for p in out.iterdir()) == ["seed=0", "seed=1", "sweep.json"]

  # Interrupt seed=0 the way a preemption does (SIGTERM: the loop saves the step it is at and exits).
  proc = subprocess.Popen(["bash", str(out / "seed=0" / "command.sh")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 300
  while not helpers.losses(out / "seed=0"):
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    assert time.time() < deadline, "training did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  status, step = sw.run_status(str(out / "seed=0"), TOTAL)
  assert status == "partial" and 1 <= step < TOTAL, (status, step)

  # The sweep resumes seed=0, starts seed=1 (2 at a time), then evaluates the best group.
  result = _sweep(sweep_file, "--out", out, "--launch", "local", "--parallel", "2", env=env,
                  monkeypatch=monkeypatch)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert f"resume   seed=0 from checkpoint {step}/{TOTAL}" in result.stdout
  log = (out / "seed=0" / "log.txt").read_text()
  assert f"Resuming from {out / 'seed=0' / 'checkpoints'} step {step}" in log
  for seed in (0, 1):
    assert sw.run_status(str(out / f"seed={seed}"), TOTAL) == ("done", TOTAL)
    assert sorted(helpers.losses(out / f"seed={seed}")) == list(range(1, TOTAL + 1))  # each step logged once
  # The best group (runs that differ only in their seed form one group) is both seeds: each is evaluated at both
  # settings. (Which group is best is tested in test_sweep.py.)
  final = {s: helpers.losses(out / f"seed={s}")[TOTAL] for s in (0, 1)}
  for seed in (0, 1):
    for scale in (1, 2):
      result_file = out / f"seed={seed}" / "eval" / f"last_scale={scale}.json"
      assert json.loads(result_file.read_text()) == {"last_loss": final[seed] * scale}

  # Rerunning skips everything: nothing is started.
  t0 = time.time()
  result = _sweep(sweep_file, "--out", out, "--launch", "local", env=env, monkeypatch=monkeypatch)
  assert result.returncode == 0, result.stderr
  actions = [line.split()[0] for line in result.stdout.splitlines()[1:]]
  assert actions == ["skip"] * 6, result.stdout  # 2 runs, 4 evaluations
  assert time.time() - t0 < 60

  # Report: one row per run with final and best loss; the evaluation table; PNGs.
  assert report_lib.main([str(out)]) == 0
  rows = list(csv_rows(out / "report" / "runs.csv"))
  assert [r["run"] for r in rows] == ["seed=0", "seed=1"]
  for r in rows:
    losses = helpers.losses(out / r["run"])
    assert float(r["loss"]) == losses[TOTAL] and float(r["loss_best"]) == min(losses.values())
    assert r["status"] == "done" and int(r["step"]) == TOTAL
  evals = list(csv_rows(out / "report" / "eval_last.csv"))
  assert [(e["run"], float(e["scale"]), float(e["last_loss"])) for e in evals] == [
      (f"seed={s}", k, k * final[s]) for s in (0, 1) for k in (1.0, 2.0)]
  for png in ("loss_curves.png", "eval_last_last_loss_vs_scale.png"):
    assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def csv_rows(path):
  import csv
  with open(path) as f:
    yield from csv.DictReader(f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_slurm_task_script_runs_two_processes(data_dir, tmp_path, monkeypatch):
  """The generated srun task script, started twice with the environment srun gives each task (SLURM_PROCID,
  SLURM_NTASKS, the node list): one 2-process run over 4 CPU devices (gloo collectives), each process reading its own
  data shard, equals the same run in one process on one device. This is the suite's only real multi-process run
  (they are slow on a small machine); tests/test_multiprocess.py checks that the explicit --coordinator_address /
  --num_processes / --process_id flags reach the same jax.distributed set-up."""
  shapes.build(data_dir, config="r32_tiny")
  sweep_file = tmp_path / "seeds.py"
  sweep_file.write_text(textwrap.dedent(SWEEP_FILE).replace("seeds(2)", "seeds([0])"))
  out = tmp_path / "runs"
  result = _sweep(sweep_file, "--out", out, "--launch", "slurm", "--nodes", "2", "--gpus_per_node", "0",
                  "--python", sys.executable, env=_env(2, data_dir), monkeypatch=monkeypatch)
  assert result.returncode == 0, result.stderr
  workdir = out / "seed=0"
  sbatch = (workdir / "slurm.sbatch").read_text()
  assert sbatch.rstrip().endswith(f"srun --kill-on-bad-exit=1 bash {workdir / 'command.sh'}")
  slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "SD_JAX_COORDINATOR_PORT": str(_free_port())}
  procs = [subprocess.Popen(["bash", str(workdir / "command.sh")], env={**_env(2, data_dir), **slurm,
                                                                        "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for i, output in enumerate(outputs):
    (tmp_path / f"task{i}.log").write_text(output)
  for p, output in zip(procs, outputs):
    assert p.returncode == 0, output[-5000:]
  assert "process 0 of 2, 2 local / 4 global devices" in outputs[0]
  assert "process 1 of 2, 2 local / 4 global devices" in outputs[1]
  assert sw.run_status(str(workdir), TOTAL) == ("done", TOTAL)
  two = helpers.losses(workdir)
  assert sorted(two) == list(range(1, TOTAL + 1))
  assert len([r for r in metrics.read_metrics(workdir) if "loss" in r]) == TOTAL  # host 0 alone wrote them
  assert np.isfinite(list(two.values())).all()
  # Both processes took part in every checkpoint.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, TOTAL]

  # The same run in one process on one device (the unsharded computation; its programs are tests/test_train.py's
  # reference run's, compiled already): the same losses.
  import jax
  from sd_jax import train
  single = helpers.load_config(seed=0, total_steps=TOTAL, save_every_steps=3, log_every_steps=1, eval_every_steps=-1,
                               **{"optim.schedule": "constant", "mesh.data": 1})
  train.train_and_evaluate(single, str(tmp_path / "one"), devices=jax.devices()[:1])
  one = helpers.losses(tmp_path / "one")
  assert sorted(one) == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
