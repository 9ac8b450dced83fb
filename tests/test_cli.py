"""Every `python -m sd_jax.*` command: absl flags, --help prints a usage text (exit 0), a bad flag `error: ...`.

The programs run as subprocesses, all at once (module fixture `programs`), so that the whole file takes about as
long as its slowest start-up; the in-process `main(argv)` of the commands built on sd_jax/cli.py and the helper
itself are tested directly.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from absl import flags

from sd_jax import cli
from tests import helpers

# Each command module with flags its usage text must name.
COMMANDS = {
    "sd_jax.sample": ("--workdir", "--pretrained", "--prompt", "--prompts_file", "--sampler", "--strength", "--out"),
    "sd_jax.evaluate": ("--workdir", "--pretrained", "--metrics", "--num_samples", "--dataset", "--inception_weights"),
    "sd_jax.stages": ("--preset", "--workdir", "--stage_override", "--cpu_devices"),
    "sd_jax.machine": ("--seconds",),
    "sd_jax.eval.shapes_eval": ("--out", "--resolution", "--steps", "--overwrite"),
    "sd_jax.main": ("--config", "--workdir", "--coordinator_address", "--slurm"),
    "sd_jax.convert": ("--from_diffusers", "--from_single_file", "--to_diffusers", "--out"),
    "sd_jax.bench": ("--config", "--mode", "--aot", "--sample_batch_sizes"),
}
# A command line with a flag value that does not parse, the exit status and what stderr says. The absl apps
# Every command exits 1 on a bad flag.
BAD_FLAGS = {
    "sd_jax.sample": (["--workdir", "W", "--prompt", "a", "--out", "O", "--steps", "many"], 1, "flag --steps=many"),
    "sd_jax.evaluate": (["--workdir", "W", "--metrics", "fd_clip", "--sampler", "plms"], 1, "invalid choice: 'plms'"),
    "sd_jax.stages": (["--workdir", "W", "--preset", "huge"], 1, "invalid choice: 'huge'"),
    "sd_jax.machine": (["--seconds", "long"], 1, "flag --seconds=long"),
    "sd_jax.eval.shapes_eval": (["--out", "O", "--resolution", "big"], 1, "flag --resolution=big"),
    "sd_jax.main": (["--workdir=W", "--num_processes=two"], 1, "flag --num_processes=two"),
    "sd_jax.convert": (["--from_diffusers=D", "--out=O", "--image_size=big"], 1, "flag --image_size=big"),
    "sd_jax.bench": (["--mode=fast"], 1, "flag --mode=fast"),
}

# The ones run as programs: the absl apps, and two that start quickly (the others' main(argv) runs in-process,
# below; each of them spends seconds importing JAX before it reads a flag).
BAD_FLAGS_RUN = ("sd_jax.main", "sd_jax.convert", "sd_jax.bench", "sd_jax.stages", "sd_jax.machine")


def _docstring(module: str) -> str:
  """The module's docstring, read from its source (importing sd_jax.main would define its global flags)."""
  path = helpers.REPO / (module.replace(".", "/") + ".py")
  return ast.get_docstring(ast.parse(path.read_text()), clean=False)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
  """{(module, "help" | "bad"): CompletedProcess}: `python -m MODULE --help` and, for BAD_FLAGS_RUN, MODULE with
  BAD_FLAGS, all run in parallel (most start-ups import JAX: in turn they would take several times as long)."""
  cwd = tmp_path_factory.mktemp("cli")  # a bad command must not get as far as writing, but if it did: here
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(helpers.REPO)}
  runs = {(m, "help"): ["--help"] for m in COMMANDS}
  runs.update({(m, "bad"): BAD_FLAGS[m][0] for m in BAD_FLAGS_RUN})
  started = {}
  for (module, kind), argv in runs.items():
    started[module, kind] = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  results = {}
  for key, process in started.items():
    stdout, stderr = process.communicate(timeout=300)
    results[key] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
  return results


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_the_usage_text(programs, module):
  result = programs[module, "help"]
  assert result.returncode == 0, result.stderr[-3000:]
  doc = _docstring(module)
  assert result.stdout.startswith(doc.strip("\n").splitlines()[0]), result.stdout[:500]
  assert doc.strip() in result.stdout and "\nflags:\n" in result.stdout
  for flag in COMMANDS[module]:
    assert f"  {flag}: " in result.stdout or f"  --[no]{flag[2:]}: " in result.stdout, (flag, result.stdout)


@pytest.mark.parametrize("module", BAD_FLAGS_RUN)
def test_a_bad_flag_is_an_error(programs, module):
  result = programs[module, "bad"]
  _, code, message = BAD_FLAGS[module]
  assert result.returncode == code, result.stderr[-3000:]
  assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# In-process: the commands on sd_jax/cli.py build their flags per call, so main(argv) runs any number of times in
# one process, beside sd_jax.main's global flags.

IN_PROCESS = ("sd_jax.sample", "sd_jax.evaluate", "sd_jax.stages", "sd_jax.machine", "sd_jax.eval.shapes_eval")


@pytest.mark.parametrize("module", IN_PROCESS)
def test_main_in_process_any_number_of_times(module, capsys, tmp_path, monkeypatch):
  import importlib
  import sd_jax.main  # noqa: F401  (defines --workdir, --config, ... on the global FLAGS)
  command = importlib.import_module(module)
  monkeypatch.chdir(tmp_path)
  for _ in range(2):
    with pytest.raises(SystemExit) as e:
      command.main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {flag}: " in out or f"  --[no]{flag[2:]}: " in out for flag in COMMANDS[module]), out
    argv, code, message = BAD_FLAGS[module]
    with pytest.raises(SystemExit) as e:
      command.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
  assert flags.FLAGS["workdir"].help.startswith("Directory for checkpoints")  # the global flag is untouched


def test_stage_override_is_checked(tmp_path, capsys):
  from sd_jax import stages
  with pytest.raises(SystemExit) as e:
    stages.main(["--workdir", str(tmp_path), "--stage_override", "gan:--config.total_steps=1"])
  assert e.value.code == 1 and "--stage_override='gan:--config.total_steps=1'" in capsys.readouterr().err


def test_machine_prints_its_description(capsys):
  from sd_jax import machine
  assert machine.main(["--seconds", "0.05"]) == 0
  out = capsys.readouterr().out
  assert "cpu: " in out and "reference_conv_gflops: " in out
  with pytest.raises(SystemExit) as e:
    machine.main(["--seconds", "0"])
  assert e.value.code == 1 and "--seconds=0.0: must be > 0." in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The helper.


def _command() -> cli.Command:
  cmd = cli.Command("python -m demo", "A demo command.\n\nIt has flags.")
  flags.DEFINE_string("workdir", None, "A run.", flag_values=cmd.flags)
  flags.DEFINE_string("pretrained", None, "A model.", flag_values=cmd.flags)
  flags.DEFINE_multi_string("prompt", None, "Prompts.", flag_values=cmd.flags)
  flags.DEFINE_float("guidance", 7.5, "Guidance.", flag_values=cmd.flags)
  flags.DEFINE_string("out", None, "Output.", flag_values=cmd.flags)
  cli.DEFINE_choice("sampler", "ddim", ("ddim", "euler"), "Sampler.", flag_values=cmd.flags)
  cmd.require("out")
  cmd.one_of("workdir", "pretrained", required=True)
  cmd.several_values("prompt")
  return cmd


@pytest.mark.parametrize("argv, prompts", [
    (["--prompt", "a red circle", "a blue square"], ["a red circle", "a blue square"]),   # argparse's nargs="+"
    (["--prompt", "a", "--prompt", "b"], ["a", "b"]),                                      # absl's repeated flag
    (["--prompt=a", "--prompt", "b", "c", "--guidance", "-1"], ["a", "b", "c"]),
    (["--prompt", "-1", "x=y"], ["-1", "x=y"]),                                            # values, not flags
    ([], None),
])
def test_several_values_after_one_flag(argv, prompts):
  fv = _command().parse(["--workdir", "W", "--out", "O", *argv])
  assert fv.prompt == prompts and fv.workdir == "W"


@pytest.mark.parametrize("argv, message", [
    (["--workdir", "W"], "--out is required"),
    (["--workdir", "W", "--out", ""], "--out is required"),
    (["--out", "O"], "one of the arguments --workdir --pretrained is required"),
    (["--workdir", "W", "--pretrained", "M", "--out", "O"], "--pretrained: not allowed with argument --workdir"),
    (["--workdir", "W", "--out", "O", "--prompt"], "argument --prompt: expected at least one argument"),
    (["--workdir", "W", "--out", "O", "--prompt", "--guidance", "1"], "argument --prompt: expected at least one"),
    (["--workdir", "W", "--out", "O", "extra"], "unrecognized arguments: extra"),
    (["--workdir", "W", "--out", "O", "--guidnce", "1"], "Unknown command line flag 'guidnce'"),
    (["--workdir", "W", "--out", "O", "--sampler", "plms"], "invalid choice: 'plms' (choose from 'ddim', 'euler')"),
])
def test_bad_command_lines(argv, message, capsys):
  cmd = _command()
  with pytest.raises(SystemExit) as e:
    cmd.parse(argv)
  assert e.value.code == cli.USAGE_ERROR == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and "python -m demo --help" in err


def test_help(capsys):
  for argv in (["--help"], ["--workdir", "W", "-h"]):
    with pytest.raises(SystemExit) as e:
      _command().parse(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("A demo command.\n\nIt has flags.\n\nflags:\n")
    assert "  --sampler: <ddim|euler>: Sampler." in out and "  --workdir: A run." in out
  # After `--` a "--help" is an argument, not a request for help.
  with pytest.raises(SystemExit) as e:
    _command().parse(["--workdir", "W", "--out", "O", "--", "--help"])
  assert e.value.code == 1 and "unrecognized arguments: --help" in capsys.readouterr().err
