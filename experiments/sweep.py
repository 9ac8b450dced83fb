"""Ablation sweeps: define the runs once in a Python file, expand them into workdirs and commands, launch anywhere.

  python -m experiments.sweep experiments/X.py --out RUNS                       # expand: RUNS/<run>/command.sh
  python -m experiments.sweep experiments/X.py --out RUNS --dry_run             # print the commands only
  python -m experiments.sweep experiments/X.py --out RUNS --launch local [--parallel N]
  python -m experiments.sweep experiments/X.py --out gs://B/RUNS --launch tpu --tpu NAME --zone Z [--execute]
  python -m experiments.sweep experiments/X.py --out RUNS --launch slurm --nodes 2 --gpus_per_node 8 [--execute]
  python -m experiments.report RUNS                                             # table + plots

A sweep file defines `SWEEP = Sweep(config=..., arg=..., fixed=..., runs=..., name=..., evals=...)`. `runs` is a list
of override dicts (dotted config keys -> values) built from four primitives that compose like algebra on lists:

  grid(k, [a, b])          [{k: a}, {k: b}]                                     one key, several values
  product(A, B)            {**x, **y} for x in A for y in B                     |A| * |B| runs (cartesian)
  zipped(A, B)             {**A[i], **B[i]}                                     |A| = |B| runs (paired)
  chain(A, B)              A + B                                                alternatives side by side
  seeds(n) / seeds([..])   grid("seed", ...)                                    repeats, averaged by the report
  named("name", {k: v})    one run with its own name

Each run's config is `fixed` then the run's dict applied on top of `get_config(arg)` of the base config file. The
expansion loads that config and applies every run's overrides before anything is written or launched, so an unknown
key, a wrongly typed value, an empty grid or two runs with the same name fail at once, naming the problem.

Every run gets a workdir `OUT/<run name>` holding `command.sh` (the exact `python -m sd_jax.main ...` command), and
`OUT/sweep.json` records the sweep (base config, the varied settings of each run, commands, evaluations). The training
loop resumes from a workdir's own checkpoints, so rerunning a sweep is safe: a run whose latest complete checkpoint is
at `total_steps` is finished and skipped, an interrupted one is rerun with the same command and resumes exactly.

Evaluations (`Eval`) run after training, on every run or on the best group of runs (the settings whose mean of a
final metric over seeds is best): a command template filled per run and per evaluation setting, which writes one
JSON object of metrics to `{out}`; `experiments.report` puts them in their own table and plots.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from etils import epath

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "sweep.json"
COMMAND_FILE = "command.sh"
NAME_KEY = "_name"          # reserved key of a run dict: the run's explicit name (see `named`)
EVAL_DIR = "eval"           # evaluation results: OUT/<run>/eval/<eval name>[_<settings>].json

Overrides = dict[str, Any]


class SweepError(ValueError):
  """A sweep file that cannot run: the message names the file, the run and the key."""


# ---------------------------------------------------------------------------------------------------------------
# Building blocks of a sweep file


def grid(key: str, values: Iterable[Any]) -> list[Overrides]:
  """One run per value of config key `key` (dotted, e.g. "optim.lr")."""
  values = list(values)
  if not values:
    raise SweepError(f"grid({key!r}, []) is empty: give it at least one value.")
  return [{key: v} for v in values]


def seeds(values: int | Iterable[int]) -> list[Overrides]:
  """`seeds(3)` = seeds 0, 1, 2; `seeds([1, 7])` = those seeds. The report averages over them."""
  return grid("seed", range(values) if isinstance(values, int) else values)


def _merge(a: Overrides, b: Overrides, how: str) -> Overrides:
  both = sorted(set(a) & set(b))
  if both:
    raise SweepError(f"{how}: the key(s) {both} are set by both sides; each key may come from one side only.")
  return {**a, **b}


def product(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Every combination (cartesian product) of the given lists of runs."""
  for s in sweeps:
    if not s:
      raise SweepError("product() of an empty list of runs: every factor needs at least one run.")
  runs: list[Overrides] = [{}]
  for s in sweeps:
    runs = [_merge(x, y, "product") for x in runs for y in s]
  return runs


def zipped(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Pairs runs up position by position (like Python's zip); the lists must have the same length."""
  lengths = [len(s) for s in sweeps]
  if not sweeps or min(lengths) == 0:
    raise SweepError("zipped() of an empty list of runs.")
  if len(set(lengths)) != 1:
    raise SweepError(f"zipped() lists of different lengths {lengths}: zipped pairs runs up one to one.")
  runs = []
  for parts in zip(*sweeps):
    merged: Overrides = {}
    for p in parts:
      merged = _merge(merged, p, "zipped")
    runs.append(merged)
  return runs


def chain(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """The runs of each list one after the other (alternative sub-sweeps in one sweep)."""
  return [dict(r) for s in sweeps for r in s]


def named(name: str, overrides: Overrides | None = None) -> list[Overrides]:
  """A single run with an explicit name (and its own overrides): `chain(named("baseline"), named("big", {...}))`."""
  return [{NAME_KEY: name, **(overrides or {})}]


@dataclasses.dataclass(frozen=True)
class Best:
  """Selects the group of runs (same settings, any seed) with the best mean of a final metric over its seeds."""
  metric: str                  # a metrics.jsonl key, e.g. "eval_loss" (its value at the last step that logged it),
  mode: str = "min"            # min | max
  eval: str = ""               # or a key of the JSON written by this earlier Eval (one with a single setting)


@dataclasses.dataclass(frozen=True)
class Eval:
  """A command run after training, once per selected run and per setting of `grid`.

  `command` is a template: `{workdir}` (the run's workdir), `{out}` (where the command must write its JSON object of
  metrics), `{python}`, `{run}` and every key of the `grid` entry (e.g. `{guidance_scale}`).
  """
  name: str
  command: str
  grid: Sequence[Overrides] = ({},)
  select: str | Best = "all"   # "all" runs, or Best(...)


@dataclasses.dataclass
class Sweep:
  """What a sweep file defines as `SWEEP`."""
  config: str                  # the base config file, relative to the repository root (configs/X.py)
  arg: str = ""                # its args (the text after the colon: "runlocal", "demo", "model=tiny,res=64")
  fixed: Overrides = dataclasses.field(default_factory=dict)  # overrides shared by every run
  runs: Sequence[Overrides] = ({},)                          # one dict of overrides per run
  # Run names: None = "key=value" of the varied settings; a format string over the settings' last key components
  # ("{prediction_type}_snr{min_snr_gamma}_s{seed}"); or a callable settings -> name.
  name: str | Callable[[Overrides], str] | None = None
  evals: Sequence[Eval] = ()
  description: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Expansion


@dataclasses.dataclass
class Run:
  name: str
  settings: Overrides          # the run's own overrides (what the sweep varies): the report's columns
  overrides: Overrides         # fixed + settings: what is passed to the command line
  total_steps: int
  workdir: str
  command: list[str]


def load_sweep_file(path: str | os.PathLike) -> Sweep:
  """Imports a sweep file and returns its SWEEP (errors in it are reported with the file name)."""
  path = Path(path)
  if not path.is_file():
    raise SweepError(f"sweep file {str(path)!r} does not exist.")
  spec = importlib.util.spec_from_file_location(f"sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SweepError as e:
    raise SweepError(f"{path}: {e}") from None
  sweep = getattr(module, "SWEEP", None)
  if not isinstance(sweep, Sweep):
    raise SweepError(f"{path} defines no SWEEP = experiments.sweep.Sweep(...).")
  if not sweep.runs:
    raise SweepError(f"{path}: SWEEP.runs is empty; a sweep needs at least one run.")
  return sweep


def config_path(config: str) -> Path:
  path = Path(config)
  return path if path.is_absolute() else REPO / path


def load_base_config(config: str, arg: str = ""):
  """get_config(arg) of a config file, locked as the command line locks it."""
  path = config_path(config)
  if not path.is_file():
    raise SweepError(f"SWEEP.config={config!r}: no such file (paths are relative to {REPO}).")
  from sd_jax import config_lib
  try:
    cfg = config_lib.load_config_file(path, arg)
  except ValueError as e:
    raise SweepError(f"SWEEP.arg={arg!r} for {config}: {e}") from None
  cfg.lock()
  return cfg


def _all_keys(cfg, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, dict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def apply_overrides(cfg, overrides: Overrides, where: str):
  """Sets dotted keys on a locked ConfigDict, as `--config.KEY=VALUE` would. Fails naming the key."""
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    try:
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, AttributeError):
      close = difflib.get_close_matches(key, _all_keys(cfg), n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise SweepError(f"{where}: unknown config key {key!r}.{hint}") from None
    except TypeError as e:
      raise SweepError(f"{where}: config key {key!r} cannot take {value!r}: {e}") from None
  return cfg


def format_value(value: Any) -> str:
  """A value as `--config.KEY=` text that ml_collections' config_flags parses back to the same value."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def _leaf(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=+,-]", "-", text)


def _short(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "-".join(_short(v) for v in value)
  return str(value)


def run_name(settings: Overrides, spec: str | Callable | None, varied: Sequence[str]) -> str:
  if NAME_KEY in settings:
    return str(settings[NAME_KEY])
  values = {k: v for k, v in settings.items() if k != NAME_KEY}
  if callable(spec):
    return _safe(str(spec(values)))
  if isinstance(spec, str):
    fields: dict[str, Any] = {}
    for k, v in values.items():
      fields[k.replace(".", "__")] = _short(v)
      fields.setdefault(_leaf(k), _short(v))
    try:
      return _safe(spec.format(**fields))
    except KeyError as e:
      raise SweepError(f"SWEEP.name={spec!r} uses {e} which is not a setting of run {values}.") from None
  keys = [k for k in values if k in varied] or list(values)
  leaves = [_leaf(k) for k in keys]
  labels = [_leaf(k) if leaves.count(_leaf(k)) == 1 else k for k in keys]
  return _safe(",".join(f"{label}={_short(values[k])}" for label, k in zip(labels, keys))) or "run"


def varied_keys(runs: Sequence[Overrides]) -> list[str]:
  """Keys whose value differs between runs (in first-seen order)."""
  order: list[str] = []
  for r in runs:
    order.extend(k for k in r if k != NAME_KEY and k not in order)
  return [k for k in order if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in runs}) > 1]


def join_path(root: str, name: str) -> str:
  return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(os.path.abspath(root), name)


def main_command(sweep: Sweep, workdir: str, overrides: Overrides, python: str,
                 extra_flags: Sequence[str] = ()) -> list[str]:
  config = f"{sweep.config}:{sweep.arg}" if sweep.arg else sweep.config
  return [python, "-m", "sd_jax.main", f"--config={config}", f"--workdir={workdir}",
          *[f"--config.{k}={format_value(v)}" for k, v in overrides.items()], *extra_flags]


def expand(sweep: Sweep, out: str, *, python: str = "python", extra_flags: Sequence[str] = (),
           where: str = "sweep") -> list[Run]:
  """The sweep's runs, each validated against the base config. Raises SweepError before anything runs."""
  from sd_jax import config_lib
  base = load_base_config(sweep.config, sweep.arg)
  apply_overrides(base, sweep.fixed, f"{where}: SWEEP.fixed")
  for i, r in enumerate(sweep.runs):
    if not isinstance(r, dict):
      raise SweepError(f"{where}: run {i} is {r!r}, not a dict of config overrides (build runs with grid/product).")
  varied = varied_keys(sweep.runs)
  runs: list[Run] = []
  for i, settings in enumerate(sweep.runs):
    name = run_name(settings, sweep.name, varied)
    values = {k: v for k, v in settings.items() if k != NAME_KEY}
    cfg = apply_overrides(load_base_config(sweep.config, sweep.arg), {**sweep.fixed, **values},
                          f"{where}: run {i} ({name})")
    try:
      config_lib.validate(cfg)
    except ValueError as e:
      raise SweepError(f"{where}: run {i} ({name}): {e}") from None
    overrides = {**sweep.fixed, **values}
    workdir = join_path(out, name)
    runs.append(Run(name=name, settings=values, overrides=overrides, total_steps=int(cfg.total_steps),
                    workdir=workdir, command=main_command(sweep, workdir, overrides, python, extra_flags)))
  names = [r.name for r in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f"{where}: duplicate run names {dupes}: two runs would share a workdir. Vary a setting, give "
                     "SWEEP.name a format that tells them apart, or use named().")
  eval_names = [e.name for e in sweep.evals]
  for i, e in enumerate(sweep.evals):
    if eval_names.count(e.name) > 1:
      raise SweepError(f"{where}: two evaluations are named {e.name!r}.")
    if not e.grid:
      raise SweepError(f"{where}: Eval {e.name!r} has an empty grid.")
    if isinstance(e.select, Best) and e.select.eval:
      earlier = [x for x in sweep.evals[:i] if x.name == e.select.eval]
      if not earlier or len(earlier[0].grid) != 1:
        raise SweepError(f"{where}: Eval {e.name!r} selects by Best(eval={e.select.eval!r}), which must name an "
                         "earlier Eval with a single setting.")
    if isinstance(e.select, str) and e.select != "all":
      raise SweepError(f"{where}: Eval {e.name!r} select={e.select!r}: use 'all' or Best(metric, mode).")
    if isinstance(e.select, Best) and e.select.mode not in ("min", "max"):
      raise SweepError(f"{where}: Eval {e.name!r}: Best.mode={e.select.mode!r}; use 'min' or 'max'.")
  return runs


# ---------------------------------------------------------------------------------------------------------------
# Run state: read from the workdir alone, so it works for gs:// workdirs and for runs launched elsewhere.


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the workdir's complete checkpoints (orbax renames a step's directory into place when it is complete;
  on object stores, where it cannot rename, it writes commit_success.txt last)."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  remote = "://" in str(workdir)
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (not remote or (p / "commit_success.txt").exists()))


def run_status(workdir: str, total_steps: int) -> tuple[str, int | None]:
  """("done" | "partial" | "new", latest checkpoint step)."""
  steps = checkpoint_steps(workdir)
  if not steps:
    return "new", None
  return ("done" if steps[-1] >= total_steps else "partial"), steps[-1]


def shell_script(lines: Sequence[str], header: Sequence[str] = ()) -> str:
  return "\n".join(["#!/usr/bin/env bash", *[f"# {h}" for h in header], "set -euo pipefail", *lines, ""])


def command_text(command: Sequence[str]) -> str:
  """A command line, one flag per line."""
  first = next((i for i, c in enumerate(command) if c.startswith("--")), len(command))
  head = " ".join(shlex.quote(c) for c in command[:first])
  return " \\\n    ".join([head, *[shlex.quote(c) for c in command[first:]]])


def write_text(path: str, text: str) -> None:
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(text)


RUN_FILE = "run.json"        # the run's identity (config, arg, overrides): guards a workdir against another run


def run_identity(sweep: Sweep, run: Run) -> dict[str, Any]:
  return {"config": sweep.config, "arg": sweep.arg,
          "overrides": {k: format_value(v) for k, v in sorted(run.overrides.items())}}


def check_unchanged(sweep: Sweep, run: Run) -> None:
  """A workdir written for different settings would be resumed with the new ones (another experiment's
  checkpoints): refuse, naming what changed."""
  path = epath.Path(run.workdir) / RUN_FILE
  if not path.exists():
    return
  saved, now = json.loads(path.read_text()), run_identity(sweep, run)
  if saved != now:
    changes = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in ("config", "arg") if saved.get(k) != now.get(k)]
    keys = sorted(set(saved.get("overrides", {})) | set(now["overrides"]))
    changes += [f"config.{k}: {saved.get('overrides', {}).get(k)} -> {now['overrides'].get(k)}" for k in keys
                if saved.get("overrides", {}).get(k) != now["overrides"].get(k)]
    raise SweepError(f"run {run.name!r}: its workdir {run.workdir} was written for other settings "
                     f"({'; '.join(changes)}), and rerunning would resume those checkpoints with the new ones. Use "
                     f"another --out, or delete {run.workdir} to start the run again.")


def write_run_files(sweep: Sweep, run: Run, script: str) -> None:
  write_text(join_path(run.workdir, COMMAND_FILE), script)
  write_text(join_path(run.workdir, RUN_FILE), json.dumps(run_identity(sweep, run), indent=2) + "\n")


def manifest(sweep: Sweep, sweep_file: str, runs: Sequence[Run], launcher: str) -> dict[str, Any]:
  return {
      "sweep_file": str(sweep_file),
      "description": sweep.description,
      "config": sweep.config,
      "arg": sweep.arg,
      "fixed": sweep.fixed,
      "varied": varied_keys([r.settings for r in runs]),
      "launcher": launcher,
      "created": time.strftime("%Y-%m-%d %H:%M:%S"),
      "runs": [{"name": r.name, "settings": r.settings, "workdir": r.workdir, "total_steps": r.total_steps,
                "command": r.command} for r in runs],
      "evals": [{"name": e.name, "command": e.command, "grid": list(e.grid),
                 "select": dataclasses.asdict(e.select) if isinstance(e.select, Best) else e.select,
                 "outputs": [{"run": r.name, "settings": dict(g), "out": eval_output(r.workdir, e.name, g)}
                             for r in runs for g in e.grid]}
                for e in sweep.evals],
  }


def write_manifest(out: str, data: dict[str, Any]) -> None:
  write_text(join_path(out, MANIFEST), json.dumps(data, indent=2, default=str) + "\n")


def read_manifest(out: str) -> dict[str, Any]:
  path = epath.Path(join_path(out, MANIFEST))
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {out} is not a sweep output directory.")
  return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Evaluations


@dataclasses.dataclass
class EvalJob:
  eval_name: str
  run: str
  settings: Overrides
  out: str
  command: str


def eval_output(workdir: str, eval_name: str, setting: Overrides) -> str:
  """OUT/<run>/eval/<eval name>[_<key>=<value>...].json"""
  suffix = "_".join(f"{_leaf(k)}={_short(v)}" for k, v in setting.items())
  return join_path(join_path(workdir, EVAL_DIR), _safe(f"{eval_name}_{suffix}" if suffix else eval_name) + ".json")


def read_json(path: str) -> dict[str, Any] | None:
  p = epath.Path(path)
  return json.loads(p.read_text()) if p.exists() else None


def final_metric(workdir: str, metric: str) -> float | None:
  """The metric's value at the last step that logged it (metrics.jsonl)."""
  from sd_jax import metrics as metrics_lib
  value = None
  for row in metrics_lib.read_metrics(workdir):
    if isinstance(row.get(metric), (int, float)):
      value = float(row[metric])
  return value


def _selection_value(run: Run, best: Best, sweep: Sweep) -> float | None:
  if not best.eval:
    return final_metric(run.workdir, best.metric)
  source = next(e for e in sweep.evals if e.name == best.eval)
  result = read_json(eval_output(run.workdir, source.name, dict(source.grid[0])))
  value = None if result is None else result.get(best.metric)
  return float(value) if isinstance(value, (int, float)) else None


def group_key(settings: Overrides) -> str:
  """Runs that differ only in their seed form one group."""
  return json.dumps({k: v for k, v in settings.items() if k != "seed"}, sort_keys=True, default=str)


def select_runs(runs: Sequence[Run], select: str | Best, sweep: Sweep) -> list[Run] | None:
  """The runs an evaluation applies to; None while a run is unfinished or lacks the metric (cannot choose yet)."""
  if select == "all":
    return list(runs)
  groups: dict[str, list[float]] = {}
  for r in runs:
    value = _selection_value(r, select, sweep)
    if value is None or not math.isfinite(value) or run_status(r.workdir, r.total_steps)[0] != "done":
      return None
    groups.setdefault(group_key(r.settings), []).append(value)
  sign = 1.0 if select.mode == "min" else -1.0
  best = min(groups, key=lambda g: sign * sum(groups[g]) / len(groups[g]))
  return [r for r in runs if group_key(r.settings) == best]


def eval_jobs(sweep: Sweep, e: Eval, runs: Sequence[Run], python: str) -> list[EvalJob] | str:
  """The commands of evaluation `e`, or a message saying what it waits for."""
  selected = select_runs(runs, e.select, sweep)
  if selected is None:
    source = f"eval {e.select.eval!r}" if e.select.eval else "metrics.jsonl"
    return (f"eval {e.name!r} waits until every run has finished and has {e.select.metric!r} in its {source}; "
            "rerun the sweep then.")
  jobs = []
  for r in selected:
    if run_status(r.workdir, r.total_steps)[0] != "done":
      continue
    for setting in e.grid:
      out = eval_output(r.workdir, e.name, setting)
      fields = {_leaf(k): v for k, v in setting.items()}
      try:
        command = e.command.format(workdir=r.workdir, out=out, python=python, run=r.name, **fields)
      except KeyError as err:
        raise SweepError(f"Eval {e.name!r}: its command uses {err}, which is neither a grid key nor one of "
                         "workdir, out, python, run.") from None
      jobs.append(EvalJob(e.name, r.name, dict(setting), out, command))
  return jobs


if __name__ == "__main__":
  # `python -m experiments.sweep` runs this file as __main__, a module of its own: the command line lives in
  # experiments/launchers.py (which uses this module's library, as the sweep files do), so nothing here imports
  # the launchers and the two modules do not import each other.
  from experiments import launchers
  sys.exit(launchers.main())
