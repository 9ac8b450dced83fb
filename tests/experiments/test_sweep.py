"""Sweep expansion, validation of bad sweep files, dry runs and the generated TPU / SLURM scripts (no training)."""

import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import launchers
from experiments import sweep as sw
from sd_jax import main as sd_main
from tests import helpers

EXAMPLE = str(helpers.REPO / "experiments" / "example_ddpm.py")


def _sweep_file(tmp_path, body: str, name: str = "my_sweep.py") -> str:
  path = tmp_path / name
  path.write_text("from experiments.sweep import *\n" + textwrap.dedent(body))
  return str(path)


def _cli(*args):
  """`python -m experiments.sweep ARGS`, in this process (the dry-run test runs the real command)."""
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = launchers.main([str(a) for a in args])
  return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_grid_product_zip_chain_seeds():
  runs = sw.product(sw.grid("a", [1, 2]), sw.zipped(sw.grid("b", ["x", "y"]), sw.grid("c", [0.1, 0.2])), sw.seeds(2))
  assert len(runs) == 2 * 2 * 2
  assert runs[0] == {"a": 1, "b": "x", "c": 0.1, "seed": 0}
  assert runs[-1] == {"a": 2, "b": "y", "c": 0.2, "seed": 1}
  assert {(r["b"], r["c"]) for r in runs} == {("x", 0.1), ("y", 0.2)}  # zipped: paired, not crossed
  assert sw.seeds([3, 7]) == [{"seed": 3}, {"seed": 7}]
  both = sw.chain(sw.named("base"), sw.named("big", {"model.layers_per_block": 2}))
  assert both == [{"_name": "base"}, {"_name": "big", "model.layers_per_block": 2}]
  with pytest.raises(sw.SweepError, match="grid\\('a', \\[\\]\\) is empty"):
    sw.grid("a", [])
  with pytest.raises(sw.SweepError, match="different lengths \\[2, 3\\]"):
    sw.zipped(sw.grid("a", [1, 2]), sw.grid("b", [1, 2, 3]))
  with pytest.raises(sw.SweepError, match="\\['a'\\] are set by both"):
    sw.product(sw.grid("a", [1]), sw.grid("a", [2]))


def test_expand_validates_and_names_runs(tmp_path):
  sweep = sw.Sweep(config="configs/shapes_ddpm.py", arg="runlocal", fixed={"total_steps": 4},
                   runs=sw.product(sw.grid("diffusion.prediction_type", ["epsilon", "v_prediction"]),
                                   sw.grid("optim.lr", [1e-3, 3e-4]), sw.seeds(2)))
  runs = sw.expand(sweep, str(tmp_path), python="python")
  assert len(runs) == 8
  assert runs[0].name == "prediction_type=epsilon,lr=0.001,seed=0"
  assert runs[0].workdir == str(tmp_path / runs[0].name)
  assert runs[0].total_steps == 4
  assert runs[-1].settings == {"diffusion.prediction_type": "v_prediction", "optim.lr": 3e-4, "seed": 1}
  assert runs[0].command[:5] == ["python", "-m", "sd_jax.main", "--config=configs/shapes_ddpm.py:runlocal",
                                 f"--workdir={runs[0].workdir}"]
  assert "--config.total_steps=4" in runs[0].command and "--config.optim.lr=0.001" in runs[0].command
  # A name format over the settings' last key components.
  sweep.name = "{prediction_type}_lr{lr}_s{seed}"
  assert sw.expand(sweep, str(tmp_path))[-1].name == "v_prediction_lr0.0003_s1"


def test_generated_flags_parse_back_to_the_same_config(tmp_path):
  """The command line of a run, parsed by ml_collections' config_flags as sd_jax.main parses it, gives exactly the
  config the sweep validated (bools, floats, tuples, strings)."""
  overrides = {"ema_decay": 0.95, "optim.lr": 3e-4, "diffusion.zero_terminal_snr": True,
               "model.block_out_channels": (16, 32), "diffusion.schedule": "cosine", "seed": 3}
  sweep = sw.Sweep(config="configs/shapes_ddpm.py", arg="runlocal", runs=[overrides], name="r")
  run = sw.expand(sweep, str(tmp_path))[0]
  argv = ["sd_jax.main", *[a.replace("configs/", f"{helpers.REPO}/configs/", 1) for a in run.command
                            if a.startswith("--config")]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  expected = helpers.load_config("shapes_ddpm", "runlocal", **overrides)
  assert fv.config.to_dict() == expected.to_dict()


@pytest.mark.parametrize("body, message", [
    ("SWEEP = Sweep(config='configs/shapes_ddpm.py', arg='runlocal', runs=grid('optim.lrr', [1e-3]))",
     "unknown config key 'optim.lrr'. Did you mean optim.lr"),
    ("SWEEP = Sweep(config='configs/shapes_ddpm.py', arg='runlocal', runs=grid('optim.lr', []))",
     "grid\\('optim.lr', \\[\\]\\) is empty"),
    ("SWEEP = Sweep(config='configs/shapes_ddpm.py', arg='runlocal', runs=grid('seed', [1, 2]), name='same')",
     "duplicate run names \\['same'\\]"),
    ("SWEEP = Sweep(config='configs/shapes_ddpm.py', arg='runlocal', runs=grid('total_steps', ['many']))",
     "config key 'total_steps' cannot take 'many'"),
    ("SWEEP = Sweep(config='configs/shapes_ddpm.py', arg='runlocal', runs=grid('batch_size', [0]))",
     "config.batch_size=0"),
    ("SWEEP = Sweep(config='configs/shapes_ddpm.py', arg='runloca', runs=grid('seed', [1]))",
     "Unknown config arg 'runloca'"),
    ("SWEEP = Sweep(config='configs/nope.py', runs=grid('seed', [1]))", "configs/nope.py'?: no such file"),
    ("SWEEPS = 1", "defines no SWEEP"),
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, body, message):
  path = _sweep_file(tmp_path, body)
  result = _cli(path, "--out", str(tmp_path / "runs"), "--launch", "local")
  assert result.returncode == 2, result.stdout + result.stderr
  assert "error:" in result.stderr
  assert re.search(message, result.stderr), result.stderr
  assert not (tmp_path / "runs").exists()  # nothing written, nothing started


def test_dry_run_prints_commands_and_writes_nothing(tmp_path):
  result = subprocess.run([sys.executable, "-m", "experiments.sweep", EXAMPLE, "--out", str(tmp_path / "runs"),
                           "--dry_run", "--launch", "local"], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
  assert len(lines) == 2
  assert "--workdir=" + str(tmp_path / "runs" / "epsilon") in lines[0]
  assert lines[1].endswith("--config.diffusion.prediction_type=v_prediction")
  assert not (tmp_path / "runs").exists()


def test_expand_writes_commands_manifest_and_refuses_a_changed_run(tmp_path):
  out = tmp_path / "runs"
  result = _cli(EXAMPLE, "--out", str(out))
  assert result.returncode == 0, result.stderr
  manifest = json.loads((out / "sweep.json").read_text())
  assert [r["name"] for r in manifest["runs"]] == ["epsilon", "v_prediction"]
  assert manifest["varied"] == ["diffusion.prediction_type"]
  script = (out / "epsilon" / "command.sh").read_text()
  assert f"--workdir={out / 'epsilon'}" in script and "--config.diffusion.prediction_type=epsilon" in script
  assert "new" in result.stdout
  # Same settings, another launcher: fine. Other settings in the same workdirs: refused, naming the change.
  changed = _sweep_file(tmp_path, f"""
      exec(open({EXAMPLE!r}).read())
      SWEEP.fixed = dict(SWEEP.fixed, **{{"optim.lr": 0.5}})
      """, name="example_ddpm.py")
  result = _cli(changed, "--out", str(out))
  assert result.returncode == 2
  assert "written for other settings (config.optim.lr: None -> 0.5)" in result.stderr


def test_slurm_scripts(tmp_path):
  out = tmp_path / "runs"
  result = _cli(EXAMPLE, "--out", str(out), "--launch", "slurm", "--nodes", "2", "--gpus_per_node", "4",
                "--process_per", "gpu", "--partition", "gpu", "--account", "lab", "--time", "02:00:00",
                "--env", "SD_JAX_DATA_DIR=/data/tfds", "--setup", "source ~/venv/bin/activate", "--port", "12345")
  assert result.returncode == 0, result.stderr
  sbatch = (out / "epsilon" / "slurm.sbatch").read_text()
  lines = sbatch.splitlines()
  first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
  assert all(not line.startswith("#SBATCH") for line in lines[first_command:])  # all #SBATCH lines come first
  for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=lab",
                    "--time=02:00:00", "--signal=TERM@300", f"--output={out / 'epsilon'}/slurm-%j.out"):
    assert f"#SBATCH {directive}" in lines
  assert "export SD_JAX_DATA_DIR=/data/tfds" in lines and "source ~/venv/bin/activate" in lines
  assert "export SD_JAX_COORDINATOR_PORT=12345" in lines
  assert lines[-1] == f"srun --kill-on-bad-exit=1 bash {out / 'epsilon' / 'command.sh'}"
  task = (out / "epsilon" / "command.sh").read_text()
  assert 'export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"' in task
  assert "exec python -m sd_jax.main" in task and task.rstrip().endswith("--slurm")
  # One process per node: no GPU pinning, one task per node.
  result = _cli(EXAMPLE, "--out", str(tmp_path / "per_node"), "--launch", "slurm", "--nodes", "3")
  assert "#SBATCH --ntasks-per-node=1" in (tmp_path / "per_node" / "epsilon" / "slurm.sbatch").read_text()
  assert "CUDA_VISIBLE_DEVICES" not in (tmp_path / "per_node" / "epsilon" / "command.sh").read_text()


def test_tpu_script(tmp_path):
  scripts = tmp_path / "scripts"
  args = ["--launch", "tpu", "--tpu", "pod-1", "--zone", "us-central2-b", "--project", "proj",
          "--repo_url", "https://example.com/sd_jax.git", "--env", "SD_JAX_DATA_DIR=gs://bkt/tfds"]
  dry = _cli(EXAMPLE, "--out", "gs://bkt/sweeps/ex", *args, "--dry_run")
  assert dry.returncode == 0, dry.stderr
  ssh = [line for line in dry.stdout.splitlines() if line.startswith("gcloud")]
  assert len(ssh) == 2
  assert ssh[0].startswith("gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b --project=proj --worker=all "
                           "'--command=cd ~/sd_jax && export SD_JAX_DATA_DIR=gs://bkt/tfds && exec python3 -m "
                           "sd_jax.main --config=configs/shapes_ddpm.py:runlocal --workdir=gs://bkt/sweeps/ex/epsilon")
  assert ssh[0].endswith("--jax_distributed'")
  # The written script: set-up on every host, then one ssh per run; every host gets the same command.
  out = tmp_path / "runs"
  result = _cli(EXAMPLE, "--out", str(out), *args, "--scripts_dir", str(scripts))
  assert result.returncode == 0, result.stderr
  text = (scripts / "tpu_launch.sh").read_text()
  commands = [line for line in text.splitlines() if line.startswith("gcloud")]
  assert len(commands) == 3 and all("--worker=all" in c for c in commands)
  assert "git clone -q https://example.com/sd_jax.git ~/sd_jax" in commands[0]
  assert "pip install -q -e . '\"'\"'jax[tpu]'\"'\"'" in commands[0]
  assert f"--workdir={out / 'v_prediction'}" in commands[2]
  assert "local path" in result.stderr  # a local --out on a pod is warned about
  subprocess.run(["bash", "-n", str(scripts / "tpu_launch.sh")], check=True)  # valid shell


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[003-005,009],gpu1", "node003"),
    ("gpu-[12,14]", "gpu-12"), ("r[1-2]-n[07-08]", "r1-n07"), ("localhost", "localhost")])
def test_first_slurm_host(nodelist, host):
  assert sd_main.first_host(nodelist) == host


def test_slurm_settings():
  env = {"SLURM_JOB_NODELIST": "node[01-02]", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4100"}
  assert sd_main.slurm_settings(env) == (f"node01:{61440 + 4100 % 4096}", 8, 3)
  assert sd_main.slurm_settings(env, port=999) == ("node01:999", 8, 3)
  assert sd_main.slurm_settings({**env, "SLURM_STEP_NODELIST": "node02"}, 5)[0] == "node02:5"  # the step's nodes
  assert sd_main.slurm_settings({**env, "SLURM_NTASKS": "1"}) == (None, None, None)
  with pytest.raises(ValueError, match="SLURM_PROCID not set"):
    sd_main.slurm_settings({"SLURM_JOB_NODELIST": "a", "SLURM_NTASKS": "2"})


def test_best_selection_uses_seed_means(tmp_path):
  from sd_jax import metrics
  runs = []
  # Group a: seeds 0.5 and 0.1 (mean 0.3); group b: 0.2 and 0.25 (mean 0.225, best) although a has the best run.
  for name, setting, value in [("a0", "a", 0.5), ("a1", "a", 0.1), ("b0", "b", 0.2), ("b1", "b", 0.25)]:
    workdir = tmp_path / name
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    metrics.MetricWriter(workdir, enabled=True).write(5, {"eval_loss": value})
    runs.append(sw.Run(name, {"x": setting, "seed": int(name[1])}, {}, 5, str(workdir), []))
  best = sw.select_runs(runs, sw.Best("eval_loss", "min"), sw.Sweep(config=""))
  assert [r.name for r in best] == ["b0", "b1"]
  assert [r.name for r in sw.select_runs(runs, sw.Best("eval_loss", "max"), sw.Sweep(config=""))] == ["a0", "a1"]
  runs[0] = sw.Run("a0", {"x": "a", "seed": 0}, {}, 10, runs[0].workdir, [])  # unfinished: cannot choose yet
  assert sw.select_runs(runs, sw.Best("eval_loss"), sw.Sweep(config="")) is None


def test_committed_sweep_files_expand(tmp_path):
  ldm = sw.load_sweep_file(helpers.REPO / "experiments" / "ldm_objective.py")
  runs = sw.expand(ldm, str(tmp_path))
  assert [r.name for r in runs] == [f"{p}_snr{g}_s{s}" for p in ("epsilon", "v_prediction") for g in (0, 5)
                                    for s in (0, 1)]
  assert runs[-1].settings == {"diffusion.prediction_type": "v_prediction", "diffusion.min_snr_gamma": 5.0,
                               "seed": 1}
  assert ldm.fixed["ldm.train_text_encoder"] is False  # the frozen tower its committed results were measured with
  assert ldm.fixed["model.layers_per_block"] == 2  # and the U-Net depth
  guidance = ldm.evals[0]
  assert [g["guidance_scale"] for g in guidance.grid] == list(range(1, 10))
  assert guidance.select == sw.Best("eval_shapes_acc_test", "max")
  assert len(sw.expand(sw.load_sweep_file(EXAMPLE), str(tmp_path))) == 2


def test_evaluation_rebuilds_the_runs_config(tmp_path):
  """experiments.shapes_accuracy evaluates a run with the config it trained with (from its run.json), plus the
  evaluation's own sample settings."""
  from experiments import shapes_accuracy
  out = tmp_path / "runs"
  overrides = {"diffusion.prediction_type": "v_prediction", "ldm.text_from": "/stages/text",
               "model.block_out_channels": (16,), "seed": 4}
  path = _sweep_file(tmp_path, f"SWEEP = Sweep(config='configs/shapes_ldm.py', arg='runlocal', runs=[{overrides!r}], "
                               "name='r')")
  assert _cli(path, "--out", out).returncode == 0
  config = shapes_accuracy.run_config(str(out / "r"), {"sample.guidance_scale": 7.0})
  expected = helpers.load_config("shapes_ldm", "runlocal", **overrides, **{"sample.guidance_scale": 7.0})
  assert config.to_dict() == expected.to_dict()
  assert config.dataset.tokenizer == "/stages/text/tokenizer"  # the FieldReference follows ldm.text_from


def test_only_launches_some_runs_but_records_all(tmp_path):
  out = tmp_path / "runs"
  result = _cli(EXAMPLE, "--out", out, "--only", "v_prediction", "--dry_run")
  assert [line for line in result.stdout.splitlines() if line.startswith("# ")] == ["# v_prediction"]
  result = _cli(EXAMPLE, "--out", out, "--only", "v_prediction", "--launch", "slurm")
  assert result.returncode == 0, result.stderr
  assert [r["name"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ["epsilon", "v_prediction"]
  assert "sbatch" in result.stdout and "epsilon/slurm.sbatch" not in result.stdout
  result = _cli(EXAMPLE, "--out", out, "--only", "eps")
  assert result.returncode == 2 and "--only names unknown runs ['eps']" in result.stderr
