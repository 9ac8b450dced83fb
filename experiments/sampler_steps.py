"""Sampler × number of steps on a trained text-to-image run: one `python -m sd_jax.evaluate` per cell, one table.

  python -m experiments.sampler_steps --workdir runs/full/ldm --out experiments/results/sampler_steps
  python -m experiments.sampler_steps --workdir W --samplers ddim,euler_a --steps 10,20 --num_samples 64 --out OUT

Every cell draws the same prompts (the first --num_samples captions of --split) from the same seed, so the cells
differ only in the sampler and its step count. Each cell's JSON is written by sd_jax.evaluate itself (into
OUT/cells/, and a row in WORKDIR/metrics.jsonl); this script gathers them into OUT/table.md, OUT/table.csv and
OUT/results.json. A cell whose JSON already exists is not recomputed, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Sequence

from sd_jax import evaluate
from sd_jax.diffusion import samplers as samplers_lib

DEFAULT_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a")
DEFAULT_STEPS = (10, 20, 50)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="A trained ldm run (sd_jax.evaluate --workdir).")
  p.add_argument("--out", required=True, help="Directory for the table and the cells' JSON results.")
  p.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS),
                 help=f"Comma-separated, from {', '.join(samplers_lib.SAMPLER_NAMES)}.")
  p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="Comma-separated step counts.")
  p.add_argument("--metrics", default="shapes_accuracy,fd_clip", help="sd_jax.evaluate --metrics.")
  p.add_argument("--num_samples", type=int, default=200)
  p.add_argument("--split", default="", help="Prompt split (default: the run's eval split).")
  p.add_argument("--guidance", type=float, default=None, help="Default: sd_jax.evaluate's (the run's own).")
  p.add_argument("--seed", type=int, default=0)
  return p


def _csv_list(text: str, name: str) -> list[str]:
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise SystemExit(f"error: --{name} is empty.")
  return items


def cell_argv(args, sampler: str, steps: int, out: str) -> list[str]:
  argv = ["--workdir", args.workdir, "--metrics", args.metrics, "--num_samples", str(args.num_samples),
          "--sampler", sampler, "--steps", str(steps), "--seed", str(args.seed), "--out", out]
  if args.split:
    argv += ["--split", args.split]
  if args.guidance is not None:
    argv += ["--guidance", str(args.guidance)]
  return argv


def table_rows(results: dict, samplers: Sequence[str], steps: Sequence[int], metrics: Sequence[str]) -> list[dict]:
  rows = []
  for sampler in samplers:
    for k in steps:
      r = results[f"{sampler}_{k}"]
      row = {"sampler": sampler, "steps": k}
      row.update({m: r.get(m) for m in metrics})
      row["seconds"] = r.get("timing", {}).get("sample_seconds")
      rows.append(row)
  return rows


def markdown(rows: list[dict], metrics: Sequence[str], steps: Sequence[int]) -> str:
  """One table per metric: samplers down, step counts across."""
  parts = []
  for m in [*metrics, "seconds"]:
    title = "sampling seconds (all prompts, compile included)" if m == "seconds" else m
    lines = [f"**{title}**", "", "| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |",
             "|---|" + "---|" * len(steps)]
    by_sampler: dict[str, dict[int, object]] = {}
    for row in rows:
      by_sampler.setdefault(row["sampler"], {})[row["steps"]] = row[m]
    for sampler, cells in by_sampler.items():
      fmt = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
      lines.append(f"| {sampler} | " + " | ".join(fmt(cells.get(k)) for k in steps) + " |")
    parts.append("\n".join(lines))
  return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  samplers = _csv_list(args.samplers, "samplers")
  unknown = [s for s in samplers if s not in samplers_lib.SAMPLER_NAMES]
  if unknown:
    raise SystemExit(f"error: unknown sampler(s) {unknown}; choose from {', '.join(samplers_lib.SAMPLER_NAMES)}.")
  try:
    steps = [int(s) for s in _csv_list(args.steps, "steps")]
  except ValueError as e:
    raise SystemExit(f"error: --steps={args.steps!r}: give comma-separated integers, e.g. 10,20,50.") from e
  metrics = list(evaluate.parse_metrics(args.metrics))
  cells_dir = os.path.join(args.out, "cells")
  os.makedirs(cells_dir, exist_ok=True)
  results = {}
  for sampler in samplers:
    for k in steps:
      out = os.path.join(cells_dir, f"{sampler}_{k}.json")
      if not os.path.exists(out):
        print(f"=== {sampler}, {k} steps", flush=True)
        start = time.time()
        evaluate.main(cell_argv(args, sampler, k, out))
        print(f"    {time.time() - start:.0f} s", flush=True)
      with open(out) as f:
        results[f"{sampler}_{k}"] = json.load(f)
  rows = table_rows(results, samplers, steps, metrics)
  first = next(iter(results.values()))["settings"]
  header = (f"# Sampler × steps: {args.workdir}\n\n{args.num_samples} prompts of split "
            f"{first.get('split')!r}, seed {args.seed}, guidance {first.get('guidance')}; metrics {', '.join(metrics)}."
            f"\n\n  python -m experiments.sampler_steps {' '.join(sys.argv[1:] if argv is None else argv)}\n\n")
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(header + markdown(rows, metrics, steps))
  with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"rows": rows, "workdir": args.workdir}, f, indent=2)
  print(header + markdown(rows, metrics, steps))
  return 0


if __name__ == "__main__":
  sys.exit(main())
