"""Sweep reports: one row per run, the varied settings as columns, final and best metrics; plots over settings.

  python -m experiments.report RUNS [--out RUNS/report] [--metrics loss,eval_loss] [--maximize my_score]

Reads RUNS/sweep.json (written by experiments.sweep), each run's metrics.jsonl and its evaluation JSONs
(RUNS/<run>/eval/*.json), and writes into --out:

  report.md            the tables below, with the sweep's base config and the command that reproduces it
  runs.csv             one row per run: settings, status, `<metric>` (final: its value at the last step that logged
                       it) and `<metric>_best` (min, or max for accuracy-like metrics), single-setting evaluations
                       as `<eval>.<key>`
  groups.csv           runs that differ only in their seed, as one row: mean and standard deviation (ddof=0 over the
                       n seeds, reported with n) of every final metric
  eval_<name>.csv      evaluations with several settings (e.g. guidance 1..9): one row per run and setting
  loss_curves.png      training loss (and held-out loss when logged) against step, one line per run
  <metric>_vs_<key>.png  each final metric against each varied setting: one series per combination of the other
                       settings, the mean over seeds with error bars spanning ±1 standard deviation, seeds as dots
  eval_<name>_<metric>_vs_<key>.png  the same for evaluations with several settings

Metrics whose name contains accuracy, acc, score, psnr, ssim, recall, precision or auc are "higher is better"
(their best is the max, --maximize adds names); every other metric's best is its min.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from typing import Any, Sequence

import numpy as np

from experiments import sweep as sweep_lib
from sd_jax import metrics as metrics_lib

# Logged every step but not results.
BOOKKEEPING = ("step", "learning_rate", "steps_per_sec", "eta_sec", "loss_mean", "grad_norm")
HIGHER_IS_BETTER = ("accuracy", "acc", "score", "psnr", "ssim", "recall", "precision", "auc")


def higher_is_better(metric: str, extra: Sequence[str] = ()) -> bool:
  tokens = re.split(r"[._\-/]", metric.lower())
  return metric in extra or any(word in tokens for word in HIGHER_IS_BETTER)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_names(rows_by_run: dict[str, list[dict[str, Any]]]) -> list[str]:
  """loss first, then every other numeric key, in first-seen order."""
  names: list[str] = []
  for rows in rows_by_run.values():
    for row in rows:
      names.extend(k for k, v in row.items() if _is_number(v) and k not in BOOKKEEPING and k not in names)
  return sorted(names, key=lambda k: (k != "loss", names.index(k)))


def final_and_best(rows: Sequence[dict[str, Any]], metric: str, maximize: bool) -> tuple[float | None, float | None]:
  values = [float(r[metric]) for r in rows if _is_number(r.get(metric))]
  finite = [v for v in values if math.isfinite(v)]
  if not values:
    return None, None
  return values[-1], ((max(finite) if maximize else min(finite)) if finite else None)


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "(" + ", ".join(_fmt(x) for x in v) + ")"
  return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  for row in rows:
    writer.writerow(["" if v is None else (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for v in row])
  sweep_lib.write_text(path, buffer.getvalue())


def _label(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def _value_text(v: Any) -> str:
  return _fmt(v) if not isinstance(v, str) else v


class Report:
  """Everything read from a sweep directory."""

  def __init__(self, runs_dir: str, metrics: Sequence[str] = (), maximize: Sequence[str] = ()):
    self.runs_dir = runs_dir
    self.manifest = sweep_lib.read_manifest(runs_dir)
    self.maximize = tuple(maximize)
    self.runs = self.manifest["runs"]
    self.rows = {r["name"]: metrics_lib.read_metrics(r["workdir"]) for r in self.runs}
    self.varied = [k for k in self.manifest.get("varied", []) if k != "seed"]
    self.has_seeds = any("seed" in r["settings"] for r in self.runs)
    self.metrics = list(metrics) or metric_names(self.rows)
    self.status = {r["name"]: sweep_lib.run_status(r["workdir"], r["total_steps"]) for r in self.runs}
    # Evaluation results: {eval name: [(run name, settings, {metric: value})]}
    self.evals: dict[str, list[tuple[str, dict, dict]]] = {}
    for e in self.manifest.get("evals", []):
      found = []
      for o in e.get("outputs", []):
        result = sweep_lib.read_json(o["out"])
        if result is not None:
          found.append((o["run"], o["settings"], {k: v for k, v in result.items() if _is_number(v)}))
      self.evals[e["name"]] = found
    self.single_evals = [e["name"] for e in self.manifest.get("evals", []) if len(e["grid"]) == 1]
    self.multi_evals = [e for e in self.manifest.get("evals", []) if len(e["grid"]) > 1]

  def finished_runs(self) -> list[dict]:
    return [r for r in self.runs if self.status[r["name"]][0] == "done"]

  def is_max(self, metric: str) -> bool:
    return higher_is_better(metric, self.maximize)

  # -- tables ---------------------------------------------------------------------------------------------------

  def single_eval_columns(self) -> list[str]:
    cols: list[str] = []
    for name in self.single_evals:
      for _, _, values in self.evals[name]:
        cols.extend(f"{name}.{k}" for k in values if f"{name}.{k}" not in cols)
    return cols

  def run_table(self) -> tuple[list[str], list[list[Any]]]:
    setting_cols = self.varied + (["seed"] if self.has_seeds else [])
    eval_cols = self.single_eval_columns()
    header = ["run", *[_label(k) for k in setting_cols], "status", "step"]
    for m in self.metrics:
      header += [m, f"{m}_best"]
    header += eval_cols
    table = []
    for r in self.runs:
      status, step = self.status[r["name"]]
      row: list[Any] = [r["name"], *[r["settings"].get(k) for k in setting_cols], status, step]
      for m in self.metrics:
        row += list(final_and_best(self.rows[r["name"]], m, self.is_max(m)))
      for col in eval_cols:
        name, key = col.split(".", 1)
        row.append(next((v.get(key) for run, _, v in self.evals[name] if run == r["name"]), None))
      table.append(row)
    return header, table

  def final_values(self, run_name: str) -> dict[str, float]:
    values = {}
    for m in self.metrics:
      final, _ = final_and_best(self.rows[run_name], m, self.is_max(m))
      if final is not None:
        values[m] = final
    for name in self.single_evals:
      for run, _, v in self.evals[name]:
        if run == run_name:
          values.update({f"{name}.{k}": x for k, x in v.items()})
    return values

  def groups(self) -> list[tuple[dict, list[str]]]:
    """(settings without the seed, names of its finished runs), in first-seen order. Unfinished runs are left out:
    their last values are not comparable with finished ones."""
    out: dict[str, tuple[dict, list[str]]] = {}
    for r in self.finished_runs():
      key = sweep_lib.group_key(r["settings"])
      out.setdefault(key, ({k: v for k, v in r["settings"].items() if k != "seed"}, []))[1].append(r["name"])
    return list(out.values())

  def group_table(self) -> tuple[list[str], list[list[Any]]]:
    columns = self.metrics + self.single_eval_columns()
    header = [*[_label(k) for k in self.varied], "n"]
    for c in columns:
      header += [f"{c}_mean", f"{c}_std"]
    table = []
    for settings, names in self.groups():
      finals = [self.final_values(n) for n in names]
      row: list[Any] = [settings.get(k) for k in self.varied]
      row.append(len(names))
      for c in columns:
        values = [f[c] for f in finals if c in f]
        row += [float(np.mean(values)), float(np.std(values))] if values else [None, None]
      table.append(row)
    return header, table

  def eval_table(self, e: dict) -> tuple[list[str], list[list[Any]]]:
    keys = list(dict.fromkeys(k for g in e["grid"] for k in g))
    found = self.evals[e["name"]]
    metrics = list(dict.fromkeys(k for _, _, v in found for k in v if k not in keys))
    by_name = {r["name"]: r for r in self.runs}
    setting_cols = self.varied + (["seed"] if self.has_seeds else [])
    header = ["run", *[_label(k) for k in setting_cols], *[_label(k) for k in keys], *metrics]
    table = [[run, *[by_name[run]["settings"].get(k) for k in setting_cols], *[s.get(k) for k in keys],
              *[v.get(m) for m in metrics]] for run, s, v in found]
    return header, table

  # -- plots ----------------------------------------------------------------------------------------------------

  def plot_loss_curves(self, path: str) -> None:
    import matplotlib.pyplot as plt
    panels = [m for m in ("loss", "eval_loss") if any(m in row for rows in self.rows.values() for row in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    group_index = {sweep_lib.group_key(r["settings"]): i for i, r in enumerate(
        {sweep_lib.group_key(r["settings"]): r for r in self.runs}.values())}
    for ax, metric in zip(axes[0], panels):
      for r in self.runs:
        points = [(row["step"], row[metric]) for row in self.rows[r["name"]] if _is_number(row.get(metric))]
        if not points:
          continue
        steps, values = zip(*points)
        color = colors[group_index[sweep_lib.group_key(r["settings"])] % len(colors)]
        style = ["-", "--", ":", "-."][int(r["settings"].get("seed", 0)) % 4] if self.has_seeds else "-"
        ax.plot(steps, values, style, color=color, label=r["name"], marker="o" if len(steps) < 20 else None,
                markersize=3)
      ax.set_xlabel("step")
      ax.set_ylabel(metric)
      ax.set_title(f"{metric} per run")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)

  def plot_metric_vs_setting(self, path: str, metric: str, key: str,
                             points: Sequence[tuple[dict, float]], title: str = "") -> None:
    """points: (settings, value). x = settings[key]; one series per combination of the other varied settings
    (seed excluded); mean over the seeds with ±1 std error bars, every seed as a dot."""
    import matplotlib.pyplot as plt
    xs = list(dict.fromkeys(json.dumps(s.get(key), default=str) for s, _ in points))
    numeric = all(_is_number(json.loads(x)) for x in xs)
    if numeric:
      xs.sort(key=lambda x: json.loads(x))
    others = [k for k in {k for s, _ in points for k in s} if k not in (key, "seed")]
    others.sort()
    series: dict[str, dict[str, list[float]]] = {}
    for s, v in points:
      label = ", ".join(f"{_label(k)}={_value_text(s.get(k))}" for k in others) or "all runs"
      series.setdefault(label, {}).setdefault(json.dumps(s.get(key), default=str), []).append(v)
    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(series)
    for i, (label, by_x) in enumerate(series.items()):
      pos = [(json.loads(x) if numeric else xs.index(x)) for x in xs if x in by_x]
      offset = 0.0 if numeric else (i - (n - 1) / 2) * 0.08  # side by side on a categorical axis
      means = [float(np.mean(by_x[x])) for x in xs if x in by_x]
      stds = [float(np.std(by_x[x])) for x in xs if x in by_x]
      line = ax.errorbar([p + offset for p in pos], means, yerr=stds, marker="o", capsize=4, label=label)
      for p, x in zip(pos, [x for x in xs if x in by_x]):
        ax.scatter([p + offset] * len(by_x[x]), by_x[x], s=12, alpha=0.5, color=line[0].get_color())
    if not numeric:
      ax.set_xticks(range(len(xs)), [_value_text(json.loads(x)) for x in xs])
    ax.set_xlabel(_label(key))
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {_label(key)} (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)

  # -- everything -----------------------------------------------------------------------------------------------

  def write(self, out: str) -> list[str]:
    written: list[str] = []

    def path(name: str) -> str:
      p = sweep_lib.join_path(out, name)
      written.append(p)
      return p

    header, table = self.run_table()
    write_csv(path("runs.csv"), header, table)
    g_header, g_table = self.group_table()
    write_csv(path("groups.csv"), g_header, g_table)
    m = self.manifest
    config = f"{m['config']}:{m['arg']}" if m.get("arg") else m["config"]
    lines = [f"# Sweep {os.path.basename(m['sweep_file'])}", ""]
    if m.get("description"):
      lines += [m["description"], ""]
    lines += [f"Base config `{config}`; fixed overrides `{json.dumps(m.get('fixed', {}))}`; varied: "
              f"{', '.join(f'`{k}`' for k in m.get('varied', [])) or 'nothing'}.", "",
              "Reproduce:", "", "```",
              f"python -m experiments.sweep {m['sweep_file']} --out {self.runs_dir} --launch local",
              f"python -m experiments.report {self.runs_dir}", "```", "",
              "## Runs", "", "Final = the value at the last step that logged it; best = min (max for accuracies).",
              "", markdown_table(header, table), ""]
    if self.has_seeds:
      lines += ["## Over seeds", "", "Mean and standard deviation of the final values over each group's n finished "
                "seeds (unfinished runs are left out here and in the plots against settings).",
                "", markdown_table(g_header, g_table), ""]
    for e in self.multi_evals:
      e_header, e_table = self.eval_table(e)
      write_csv(path(f"eval_{e['name']}.csv"), e_header, e_table)
      lines += [f"## Evaluation {e['name']}", "", f"`{e['command']}`", "", markdown_table(e_header, e_table), ""]
    images = []
    if any(self.rows.values()):
      self.plot_loss_curves(path("loss_curves.png"))
      images.append("loss_curves.png")
    by_name = {r["name"]: r for r in self.finished_runs()}
    for metric in self.metrics + self.single_eval_columns():
      points = [(by_name[n]["settings"], v[metric]) for n in by_name for v in [self.final_values(n)] if metric in v]
      for key in self.varied:
        if points:
          name = f"{metric}_vs_{_label(key)}.png".replace("/", "_")
          self.plot_metric_vs_setting(path(name), metric, key, points)
          images.append(name)
    by_name = {r["name"]: r for r in self.runs}
    for e in self.multi_evals:
      keys = list(dict.fromkeys(k for g in e["grid"] for k in g))
      found = self.evals[e["name"]]
      for metric in dict.fromkeys(k for _, _, v in found for k in v if k not in keys):
        for key in keys:
          points = [({**by_name[run]["settings"], **s}, v[metric]) for run, s, v in found if metric in v]
          if points:
            name = f"eval_{e['name']}_{metric}_vs_{_label(key)}.png"
            self.plot_metric_vs_setting(path(name), metric, key, points,
                                        title=f"{e['name']}: {metric} vs {_label(key)} (mean ± std over seeds)")
            images.append(name)
    if images:
      lines += ["## Plots", ""] + [f"![{i}]({i})" for i in images] + [""]
    sweep_lib.write_text(path("report.md"), "\n".join(lines))
    return written


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  p = sweep_lib.epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
  import matplotlib
  matplotlib.use("Agg")
  p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
  p.add_argument("runs", help="a sweep's --out directory (holds sweep.json)")
  p.add_argument("--out", default="", help="where to write (default: RUNS/report)")
  p.add_argument("--metrics", default="", help="comma-separated metrics.jsonl keys (default: all but bookkeeping)")
  p.add_argument("--maximize", default="", help="comma-separated metrics whose best is their max")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    report = Report(args.runs, [m for m in args.metrics.split(",") if m],
                    [m for m in args.maximize.split(",") if m])
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = args.out or sweep_lib.join_path(args.runs, "report")
  written = report.write(out)
  print("\n".join(["wrote:", *written]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
