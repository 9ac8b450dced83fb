"""Launchers for expanded sweeps: here (local), on a Cloud TPU VM pod (tpu) and on a SLURM GPU cluster (slurm).

Every launcher runs the same `python -m sd_jax.main --config=... --workdir=RUNS/<run> ...` command of a run; they
differ in how the processes of one run are started and find each other:

  local   one process per run on this machine (all its devices), `--parallel N` runs at a time. Ctrl-C sends
          SIGTERM to the runs, which save a checkpoint of the step they are at and stop (rerun to resume).
  tpu     every host of the pod runs the same command (`gcloud compute tpus tpu-vm ssh NAME --worker=all`) with
          `--jax_distributed`: `jax.distributed.initialize()` finds the coordinator and the process ids from the
          TPU metadata. The workdir must be shared storage (gs://...): checkpoints (orbax), metrics and config go
          through etils epath / TensorBoard's GCS writer, which every host reaches.
  slurm   one sbatch script per run; `srun` starts one task per node (or per GPU), each runs the run's command.sh
          with `--slurm`: sd_jax.main takes the coordinator (first host of the node list), the process id
          (SLURM_PROCID) and the process count (SLURM_NTASKS) from SLURM's environment.

Finished runs (latest complete checkpoint at total_steps) are skipped by all three; unfinished ones resume.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from experiments import sweep as sweep_lib
from experiments.sweep import Run, Sweep, SweepError

# Flags each launcher adds to the training command.
MAIN_FLAGS = {"tpu": ("--jax_distributed",), "slurm": ("--slurm",)}
LOG_FILE = "log.txt"


def _q(text: str) -> str:
  return shlex.quote(text)


def _env_lines(env: dict[str, str]) -> list[str]:
  return [f"export {k}={_q(v)}" for k, v in env.items()]


def _is_remote(path: str) -> bool:
  return "://" in path


def scripts_dir(args, sweep_file: str) -> str:
  if args.scripts_dir:
    return args.scripts_dir
  if _is_remote(args.out):
    return os.path.join("sweep_scripts", os.path.splitext(os.path.basename(sweep_file))[0])
  return args.out


def status_line(run: Run) -> str:
  status, step = sweep_lib.run_status(run.workdir, run.total_steps)
  where = f" (checkpoint {step}/{run.total_steps})" if step is not None else ""
  return f"{status:8s}{where:24s} {run.name}"


# ---------------------------------------------------------------------------------------------------------------
# local


def local_script(run: Run, sweep_file: str, env: dict[str, str]) -> str:
  return sweep_lib.shell_script(
      [f"cd {_q(str(sweep_lib.REPO))}", *_env_lines(env), "exec " + sweep_lib.command_text(run.command)],
      header=[f"Run {run.name!r} of {sweep_file}, written by experiments.sweep.",
              "Rerunning it resumes from the workdir's latest checkpoint."])


def _log_path(run: Run, sweep_name: str, name: str = LOG_FILE) -> str:
  """RUNS/<run>/log.txt; for gs:// workdirs a local file under the temp dir."""
  if _is_remote(run.workdir):
    directory = os.path.join(tempfile.gettempdir(), "sd_jax_sweeps", sweep_name, run.name)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name)
  return os.path.join(run.workdir, name)


def _exists(path: str) -> bool:
  return sweep_lib.epath.Path(path).exists()


def _tail(path: str, lines: int = 25) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


class _Pool:
  """Runs shell commands, at most `parallel` at a time, each with its output appended to a log file."""

  def __init__(self, parallel: int):
    self.parallel = max(1, parallel)
    self.running: list[tuple[str, subprocess.Popen, str, object]] = []
    self.failed: list[str] = []

  def start(self, label: str, command: list[str], log: str, on_done=None) -> None:
    while len(self.running) >= self.parallel:
      self._reap(block=True)
    f = open(log, "a")
    f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(_q, command))}\n")
    f.flush()
    # A session of its own: Ctrl-C in this terminal reaches the sweep, which stops the runs with SIGTERM (they
    # save a checkpoint first) instead of a SIGINT that would kill them mid-step.
    proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=sweep_lib.REPO, start_new_session=True)
    f.close()
    print(f"started  {label} (pid {proc.pid}, log {log})", flush=True)
    self.running.append((label, proc, log, on_done))

  def _reap(self, block: bool) -> None:
    while True:
      for item in list(self.running):
        label, proc, log, on_done = item
        if proc.poll() is not None:
          self.running.remove(item)
          if proc.returncode != 0:
            self.failed.append(label)
            print(f"FAILED   {label} (exit {proc.returncode}); the end of {log}:\n{_tail(log)}", flush=True)
          elif on_done is not None:
            on_done()
          return
      if not block or not self.running:
        return
      time.sleep(0.2)

  def wait(self) -> None:
    while self.running:
      self._reap(block=True)

  def terminate(self) -> None:
    for label, proc, _, _ in self.running:
      if proc.poll() is None:
        print(f"stopping {label}: SIGTERM (it saves a checkpoint, then exits)", flush=True)
        proc.send_signal(signal.SIGTERM)
    for _, proc, _, _ in self.running:
      try:
        proc.wait(timeout=300)
      except subprocess.TimeoutExpired:
        proc.kill()


def launch_local(runs: Sequence[Run], sweep: Sweep, sweep_file: str, parallel: int, python: str,
                 evals: bool = True, all_runs: Sequence[Run] | None = None) -> int:
  """Runs the unfinished `runs` (resuming partial ones), then the evaluations whose runs are finished (chosen among
  `all_runs`, the whole sweep, when an evaluation selects the best group)."""
  all_runs = list(runs) if all_runs is None else list(all_runs)
  sweep_name = os.path.splitext(os.path.basename(sweep_file))[0]
  pool = _Pool(parallel)
  try:
    for run in runs:
      status, step = sweep_lib.run_status(run.workdir, run.total_steps)
      if status == "done":
        print(f"skip     {run.name}: finished (checkpoint {step} = total_steps)", flush=True)
        continue
      if status == "partial":
        print(f"resume   {run.name} from checkpoint {step}/{run.total_steps}", flush=True)

      def report(run=run):
        status, step = sweep_lib.run_status(run.workdir, run.total_steps)
        if status == "done":
          print(f"finished {run.name}", flush=True)
        else:  # exited cleanly before the end: preempted (SIGTERM); rerun the sweep to resume
          print(f"stopped  {run.name} at checkpoint {step}/{run.total_steps}; rerun the sweep to resume", flush=True)

      script = sweep_lib.join_path(run.workdir, sweep_lib.COMMAND_FILE)
      command = (["bash", "-c", sweep_lib.epath.Path(script).read_text()] if _is_remote(script) else ["bash", script])
      pool.start(run.name, command, _log_path(run, sweep_name), on_done=report)
    pool.wait()
    unfinished = [r.name for r in runs if sweep_lib.run_status(r.workdir, r.total_steps)[0] != "done"]
    for e in sweep.evals if evals else ():
      jobs = sweep_lib.eval_jobs(sweep, e, all_runs, python)  # after the previous evaluation: may select by it
      if isinstance(jobs, list):
        jobs = [j for j in jobs if j.run in {r.name for r in runs}]
      if isinstance(jobs, str):
        print(jobs, flush=True)
        continue
      for job in jobs:
        if _exists(job.out):
          print(f"skip     eval {job.eval_name} {job.settings} of {job.run}: {job.out} exists", flush=True)
          continue
        run = next(r for r in all_runs if r.name == job.run)
        label = f"eval {job.eval_name} {job.settings} of {job.run}"
        sweep_lib.epath.Path(job.out).parent.mkdir(parents=True, exist_ok=True)
        pool.start(label, ["bash", "-c", job.command], _log_path(run, sweep_name, "eval_log.txt"))
      pool.wait()
      missing = [j.out for j in jobs if not _exists(j.out)]
      if missing and not pool.failed:
        print(f"eval {e.name!r}: the command exited cleanly but did not write {missing[:3]}", flush=True)
        pool.failed.append(f"eval {e.name}")
  except KeyboardInterrupt:
    pool.terminate()
    print("interrupted: rerun the same sweep command to resume.", flush=True)
    return 130
  if pool.failed:
    print(f"{len(pool.failed)} failed: {pool.failed}", flush=True)
    return 1
  if unfinished:
    print(f"unfinished: {unfinished}", flush=True)
    return 1
  return 0


# ---------------------------------------------------------------------------------------------------------------
# tpu


def tpu_host_command(run: Run, repo_dir: str, env: dict[str, str], setup: str | None) -> str:
  """What every host of the pod runs for `run` (the same text on every host)."""
  parts = [f"cd {repo_dir}", *_env_lines(env)]
  if setup:
    parts.append(setup)
  parts.append("exec " + " ".join(_q(c) for c in run.command))
  return " && ".join(parts)


def gcloud_ssh(args, command: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return [*cmd, "--worker=all", f"--command={command}"]


def _git(*argv: str) -> str:
  try:
    return subprocess.run(["git", "-C", str(sweep_lib.REPO), *argv], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def tpu_install_command(args) -> str:
  """The one-off environment set-up on every host: the code at this checkout's commit, sd_jax and jax[tpu]."""
  repo_url = args.repo_url or _git("remote", "get-url", "origin")
  commit = _git("rev-parse", "HEAD")
  repo = args.repo_dir
  if repo_url:
    fetch = [f"([ -d {repo}/.git ] || git clone -q {_q(repo_url)} {repo})", f"cd {repo}", "git fetch -q origin"]
  else:
    fetch = [f"([ -d {repo} ] || (echo 'no code in {repo}: pass --repo_url, or copy it to every host with "
             f"gcloud compute tpus tpu-vm scp --recurse --worker=all' >&2; exit 1))", f"cd {repo}"]
  if commit and repo_url:
    fetch.append(f"git checkout -q {commit}")
  install = "python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]' gcsfs google-cloud-storage"
  return " && ".join([*fetch, install])


def tpu_script(args, runs: Sequence[Run], sweep_file: str, env: dict[str, str]) -> str:
  install = tpu_install_command(args)
  lines = ["", "# 1. Environment on every host (idempotent): the code, sd_jax, jax[tpu], GCS clients.",
           " ".join(_q(c) for c in gcloud_ssh(args, install)), "",
           "# 2. The runs, one after the other, each on the whole pod (every host runs the same command; "
           "jax.distributed", "#    finds its peers). Rerunning this script resumes unfinished runs.", ""]
  for i, run in enumerate(runs):
    lines.append(f"# {i + 1}/{len(runs)}: {run.name}")
    lines.append(" ".join(_q(c) for c in gcloud_ssh(args, tpu_host_command(run, args.repo_dir, env, args.setup))))
  return sweep_lib.shell_script(lines, header=[
      f"Sweep {sweep_file} on TPU VM {args.tpu} ({args.zone}), written by experiments.sweep --launch tpu.",
      "Run it from a machine with gcloud, or use --execute (which also skips finished runs)."])


def launch_tpu(args, runs: Sequence[Run], sweep_file: str, env: dict[str, str]) -> int:
  if not args.tpu or not args.zone:
    raise SweepError("--launch tpu needs --tpu NAME and --zone ZONE.")
  for run in runs:
    if not _is_remote(run.workdir):
      print(f"warning: {run.workdir} is a local path; on a pod every host needs the same workdir: use --out "
            "gs://BUCKET/PATH.", file=sys.stderr)
      break
  script = tpu_script(args, runs, sweep_file, env)
  path = sweep_lib.join_path(scripts_dir(args, sweep_file), "tpu_launch.sh")
  sweep_lib.write_text(path, script)
  print(f"wrote {path}", flush=True)
  if not args.execute:
    print(f"run it with: bash {path}   (or add --execute)")
    return 0
  if subprocess.run(gcloud_ssh(args, tpu_install_command(args))).returncode:
    return 1
  for run in runs:
    status, step = sweep_lib.run_status(run.workdir, run.total_steps)
    if status == "done":
      print(f"skip     {run.name}: finished", flush=True)
      continue
    print(f"{'resume' if status == 'partial' else 'start':8s} {run.name}", flush=True)
    if subprocess.run(gcloud_ssh(args, tpu_host_command(run, args.repo_dir, env, args.setup))).returncode:
      print(f"FAILED   {run.name}", flush=True)
      return 1
  return 0


# ---------------------------------------------------------------------------------------------------------------
# slurm


def slurm_task_script(run: Run, sweep_file: str, per_gpu: bool) -> str:
  """What each srun task runs: the run's command with --slurm (sd_jax.main reads SLURM_PROCID / SLURM_NTASKS)."""
  lines = [f"cd {_q(str(sweep_lib.REPO))}"]
  if per_gpu:
    lines.append('export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"  # one GPU per process')
  lines.append("exec " + sweep_lib.command_text(run.command))
  return sweep_lib.shell_script(lines, header=[
      f"Run {run.name!r} of {sweep_file}: one srun task (see slurm.sbatch), written by experiments.sweep.",
      "Rerunning it resumes from the workdir's latest checkpoint."])


def sbatch_script(args, run: Run, sweep_file: str, env: dict[str, str], log_dir: str) -> str:
  per_gpu = args.process_per == "gpu"
  sweep_name = os.path.splitext(os.path.basename(sweep_file))[0]
  sb = [f"--job-name={sweep_name}.{run.name}", f"--nodes={args.nodes}",
        f"--ntasks-per-node={args.gpus_per_node if per_gpu else 1}"]
  if args.gpus_per_node:
    sb.append(f"--gpus-per-node={args.gpus_per_node}")
  if args.cpus_per_task:
    sb.append(f"--cpus-per-task={args.cpus_per_task}")
  sb += [f"--time={args.time}", f"--output={log_dir}/slurm-%j.out", "--open-mode=append",
         "--signal=TERM@300"]  # 5 min before the time limit every task gets SIGTERM: it saves and exits
  if args.partition:
    sb.append(f"--partition={args.partition}")
  if args.account:
    sb.append(f"--account={args.account}")
  sb += args.sbatch_arg
  task = sweep_lib.join_path(run.workdir, sweep_lib.COMMAND_FILE)
  body = [f"cd {_q(str(sweep_lib.REPO))}", *_env_lines(env)]
  if args.setup:
    body.append(args.setup)
  if args.port:
    body.append(f"export SD_JAX_COORDINATOR_PORT={args.port}")
  body += ['echo "job $SLURM_JOB_ID: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST"',
           f"srun --kill-on-bad-exit=1 bash {_q(task)}"]
  header = [f"Run {run.name!r} of {sweep_file}, written by experiments.sweep --launch slurm. Submit: sbatch THIS_FILE.",
            f"{args.nodes} node(s), one process per {args.process_per}; sd_jax.main --slurm finds the coordinator "
            "(first host of the node list) and its process id (SLURM_PROCID of SLURM_NTASKS)."]
  # The #SBATCH lines must come before the first command.
  # No `set -u`: environment set-up scripts (conda, modules) often read unset variables.
  return "\n".join(["#!/usr/bin/env bash", *[f"#SBATCH {s}" for s in sb], *[f"# {h}" for h in header],
                    "set -eo pipefail", *body, ""])


def launch_slurm(args, sweep: Sweep, runs: Sequence[Run], sweep_file: str, env: dict[str, str]) -> int:
  if args.nodes < 1 or args.gpus_per_node < 0 or (args.process_per == "gpu" and args.gpus_per_node < 1):
    raise SweepError("--launch slurm: --nodes must be >= 1, and --process_per gpu needs --gpus_per_node >= 1.")
  for run in runs:
    log_dir = run.workdir if not _is_remote(run.workdir) else scripts_dir(args, sweep_file)
    path = sweep_lib.join_path(scripts_dir(args, sweep_file) if _is_remote(run.workdir) else run.workdir,
                               f"{run.name}.sbatch" if _is_remote(run.workdir) else "slurm.sbatch")
    sweep_lib.write_text(path, sbatch_script(args, run, sweep_file, env, log_dir))
    status, _ = sweep_lib.run_status(run.workdir, run.total_steps)
    if status == "done":
      print(f"skip     {run.name}: finished", flush=True)
      continue
    if args.execute:
      result = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
      if result.returncode:
        print(f"FAILED   sbatch {path}: {result.stderr.strip()}", flush=True)
        return 1
      print(f"submitted {run.name}: job {result.stdout.strip()}", flush=True)
    else:
      print(f"sbatch {path}", flush=True)
  return 0


# ---------------------------------------------------------------------------------------------------------------


def task_script(args, run: Run, sweep_file: str, env: dict[str, str]) -> str:
  if args.launch == "slurm":
    return slurm_task_script(run, sweep_file, args.process_per == "gpu")
  if args.launch == "tpu":
    return sweep_lib.shell_script(
        ["exec " + sweep_lib.command_text(run.command)],
        header=[f"Run {run.name!r} of {sweep_file}: what every TPU host runs (see tpu_launch.sh)."])
  return local_script(run, sweep_file, env)


def launch(args: argparse.Namespace, sweep: Sweep, runs: Sequence[Run], selected: Sequence[Run], *,
           env: dict[str, str], python: str) -> int:
  """Writes the run files and the manifest (all runs), then launches the `selected` runs (--only)."""
  sweep_file = args.sweep_file
  if args.dry_run:
    for run in selected:
      print(f"# {run.name}")
      if args.launch == "tpu":
        print(" ".join(_q(c) for c in gcloud_ssh(args, tpu_host_command(run, args.repo_dir, env, args.setup))))
      else:
        print(" ".join(_q(c) for c in run.command))
    for e in sweep.evals:
      which = "every run" if e.select == "all" else f"the best runs by {e.select.mode} {e.select.metric}"
      print(f"# after training, eval {e.name!r} on {which}, for each of {list(e.grid)}:\n#   {e.command}")
    return 0
  for run in runs:
    sweep_lib.check_unchanged(sweep, run)
  for run in runs:
    sweep_lib.write_run_files(sweep, run, task_script(args, run, sweep_file, env))
  sweep_lib.write_manifest(args.out, sweep_lib.manifest(sweep, sweep_file, runs, args.launch))
  print(f"{len(runs)} run(s) in {args.out}", flush=True)
  if args.launch == "none":
    for run in runs:
      print(status_line(run))
    return 0
  if args.launch == "local":
    return launch_local(selected, sweep, sweep_file, args.parallel, python, evals=not args.no_evals, all_runs=runs)
  if args.launch == "tpu":
    return launch_tpu(args, selected, sweep_file, env)
  return launch_slurm(args, sweep, selected, sweep_file, env)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=sweep_lib.__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sweep_file", help="experiments/X.py defining SWEEP")
  p.add_argument("--out", required=True, help="root of the run workdirs (a local path or gs://...)")
  p.add_argument("--launch", choices=("none", "local", "tpu", "slurm"), default="none",
                 help="none: only write the run files; local: run here; tpu / slurm: write (and --execute) scripts")
  p.add_argument("--dry_run", action="store_true", help="print the commands; write and run nothing")
  p.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
  p.add_argument("--python", default=None,
                 help="interpreter in the commands (default: this one; tpu: python3; slurm: python)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the training processes (repeatable; tpu and slurm scripts)")
  p.add_argument("--setup", default=None, help="shell commands run before training on each host / node")
  local = p.add_argument_group("local")
  local.add_argument("--parallel", type=int, default=1, help="runs at a time")
  local.add_argument("--no_evals", action="store_true", help="train only; skip the sweep's evaluations")
  cloud = p.add_argument_group("tpu and slurm")
  cloud.add_argument("--execute", action="store_true", help="run the written gcloud / sbatch commands")
  cloud.add_argument("--scripts_dir", default="",
                     help="where launch scripts go (default: --out, or ./sweep_scripts/<sweep> for gs:// outputs)")
  tpu = p.add_argument_group("tpu")
  tpu.add_argument("--tpu", default="", help="TPU VM name")
  tpu.add_argument("--zone", default="", help="its zone")
  tpu.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  tpu.add_argument("--repo_dir", default="~/sd_jax", help="checkout on every TPU host")
  tpu.add_argument("--repo_url", default="", help="git URL cloned into --repo_dir by the set-up step")
  slurm = p.add_argument_group("slurm")
  slurm.add_argument("--nodes", type=int, default=1)
  slurm.add_argument("--gpus_per_node", type=int, default=8)
  slurm.add_argument("--process_per", choices=("node", "gpu"), default="node",
                     help="one process per node (sees all its GPUs) or per GPU")
  slurm.add_argument("--partition", default="")
  slurm.add_argument("--account", default="")
  slurm.add_argument("--time", default="24:00:00")
  slurm.add_argument("--cpus_per_task", type=int, default=0)
  slurm.add_argument("--port", type=int, default=0, help="coordinator port (default: derived from the job id)")
  slurm.add_argument("--sbatch_arg", action="append", default=[], help="extra #SBATCH line, e.g. --qos=high")
  return p.parse_args(argv)


def parse_env(items: Sequence[str]) -> dict[str, str]:
  env = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise SweepError(f"--env {item!r}: use KEY=VALUE.")
    env[key] = value
  return env


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m experiments.sweep` (the module docstring of experiments/sweep.py)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    sweep = sweep_lib.load_sweep_file(args.sweep_file)
    # The interpreter in the commands: this one here; the hosts' own elsewhere (TPU VM images have python3).
    python = args.python or {"tpu": "python3", "slurm": "python"}.get(args.launch, sys.executable)
    extra = MAIN_FLAGS.get(args.launch, ())
    runs = sweep_lib.expand(sweep, args.out, python=python, extra_flags=extra, where=args.sweep_file)
    if args.only:
      keep = [n.strip() for n in args.only.split(",") if n.strip()]
      unknown = sorted(set(keep) - {r.name for r in runs})
      if unknown:
        raise SweepError(f"--only names unknown runs {unknown}; runs are {[r.name for r in runs]}.")
      selected = [r for r in runs if r.name in keep]
    else:
      selected = runs
    env = parse_env(args.env)
    return launch(args, sweep, runs, selected, env=env, python=python)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
