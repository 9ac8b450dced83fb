"""Held-out shapes accuracy of a finished ldm run at a chosen guidance scale: the evaluation step of a sweep.

  python -m experiments.shapes_accuracy --workdir RUNS/<run> --guidance_scale 7 --out RUNS/<run>/eval/g7.json \
      [--evaluator DIR] [--num_prompts 64] [--num_steps 50] [--seed 0]

The run's exact config is rebuilt from its RUNS/<run>/run.json (the config file, args and overrides the sweep ran
it with, parsed by ml_collections' config_flags as `sd_jax.main` parses them); --guidance_scale, --num_steps,
--num_prompts and --evaluator replace sample.guidance_scale, sample.num_steps, sample.shapes_eval_prompts and
sample.shapes_evaluator. The EMA params of the latest checkpoint are drawn with DDIM + classifier-free guidance for
the first N captions of the held-out `test` split and of the `compositional` split (colour-kind pairs never seen in
training), and the shapes evaluator (sd_jax/eval/shapes_eval.py) checks each image for every shape its caption
names: accuracy = matches / N per split (`ldm.Task.shapes_accuracy`, the metric the loop logs as
eval_shapes_acc_*). Writes one JSON object: {eval_shapes_acc_test, eval_shapes_acc_compositional, settings:
{guidance_scale, num_steps, num_prompts, step}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from etils import epath

from experiments import sweep as sweep_lib


def run_config(workdir: str, overrides: dict | None = None):
  """The config a sweep run trained with (from its run.json), with `overrides` (dotted keys) applied."""
  from absl import flags
  from ml_collections import config_flags
  path = epath.Path(workdir) / sweep_lib.RUN_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a run directory written by experiments.sweep.")
  run = json.loads(path.read_text())
  config = str(sweep_lib.config_path(run["config"]))
  argv = ["sd_jax.main", f"--config={config}:{run['arg']}" if run["arg"] else f"--config={config}",
          *[f"--config.{k}={v}" for k, v in run["overrides"].items()]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  cfg = values.config
  sweep_lib.apply_overrides(cfg, overrides or {}, f"{workdir}")
  return cfg


def evaluate(workdir: str, *, guidance_scale: float, num_steps: int = 0, num_prompts: int = 0, evaluator: str = "",
             seed: int | None = None) -> dict[str, float]:
  import flax.linen as nn
  import jax
  from sd_jax import checkpoint as ckpt_lib
  from sd_jax import train
  overrides = {"sample.guidance_scale": float(guidance_scale)}
  if num_steps:
    overrides["sample.num_steps"] = num_steps
  if num_prompts:
    overrides["sample.shapes_eval_prompts"] = num_prompts
  if evaluator:
    overrides["sample.shapes_evaluator"] = evaluator
  config = run_config(workdir, overrides)
  if config.trainer != "ldm" or not config.sample.get("shapes_evaluator"):
    raise ValueError(f"{workdir}: shapes accuracy needs an ldm run and a shapes evaluator (--evaluator DIR, from "
                     "`python -m sd_jax.eval.shapes_eval --out DIR`).")
  steps = sweep_lib.checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir} has no complete checkpoint.")
  exp = train.setup(config)
  subtree = "ema_params" if config.ema_decay > 0 else "params"
  params, _ = ckpt_lib.load_params(workdir, nn.meta.unbox(exp.boxed_params), exp.state_shardings.params,
                                   allow_partial=False, subtree=subtree)
  rng = jax.random.PRNGKey(config.seed + 1 if seed is None else seed)  # the loop's evaluation key by default
  results = exp.task.shapes_accuracy(params, exp.load_frozen(), rng, exp.mesh)
  # Metrics at the top level (what experiments.report tabulates); how they were measured under "settings".
  return {**results, "settings": {"guidance_scale": float(guidance_scale), "num_steps": int(config.sample.num_steps),
                                  "num_prompts": int(config.sample.shapes_eval_prompts), "step": steps[-1]}}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.shapes_accuracy", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="JSON file to write")
  p.add_argument("--guidance_scale", type=float, required=True)
  p.add_argument("--num_steps", type=int, default=0, help="DDIM steps (default: the run's sample.num_steps)")
  p.add_argument("--num_prompts", type=int, default=0, help="captions per split (default: sample.shapes_eval_prompts)")
  p.add_argument("--evaluator", default="", help="shapes evaluator dir (default: the run's sample.shapes_evaluator)")
  p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed + 1, as the loop)")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    results = evaluate(args.workdir, guidance_scale=args.guidance_scale, num_steps=args.num_steps,
                       num_prompts=args.num_prompts, evaluator=args.evaluator, seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sweep_lib.write_text(args.out, json.dumps(results, indent=2) + "\n")
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
