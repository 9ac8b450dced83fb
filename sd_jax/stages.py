"""Stable Diffusion from scratch on the shapes dataset: VAE → CLIP → latent diffusion, then a held-out evaluation.

  python -m sd_jax.stages --preset=demo --workdir=workdirs/demo     # README's first command (minutes on a CPU)
  python -m sd_jax.stages --preset=full --workdir=workdirs/full     # the quality bar (about an hour on 2 cores)
  python -m sd_jax.stages --preset=demo --folder=my_images --workdir=workdirs/mine   # your own captioned images

With --folder the three stages train on an image folder (metadata.jsonl captions and a `test` split) instead, and
the run ends with a labelled grid of samples for captions of its test split (no evaluator knows what such images
show).

Each stage is the ordinary training command, run as its own process and printed before it runs:

  python -m sd_jax.main --config=configs/shapes_vae.py:PRESET  --workdir=WORKDIR/vae
  python -m sd_jax.main --config=configs/shapes_clip.py:PRESET --workdir=WORKDIR/clip
  python -m sd_jax.main \
      --config=configs/shapes_ldm.py:PRESET,vae_from=WORKDIR/vae/export,text_from=WORKDIR/clip/export \
      --workdir=WORKDIR/ldm

so rerunning the same command resumes an interrupted stage and skips finished ones (a run at total_steps does no
work). Then the finished model (WORKDIR/ldm/export) draws one image for each of the first `--num_prompts` captions
of the `test` split (compositions seen in training) and of the `compositional` split (colour × kind pairs never seen
in training), with DDIM and classifier-free guidance, and the shapes evaluator (sd_jax/eval/shapes_eval.py: a
classifier trained on the renderer's ground truth, not on any model here) checks that every shape the prompt names
is there, colour and kind. It writes

  WORKDIR/samples_heldout.png   labelled grid: the first prompts of each split, two images each
  WORKDIR/summary.json          accuracies, the other stages' final metrics, wall and CPU time per stage
  WORKDIR/summary.md            the same as a short table

The evaluator is trained first, once (about 2 minutes on 2 cores), and cached in --evaluator_dir (default: beside
the shapes dataset, ~/.cache/sd_jax/shapes_evaluator, or $SD_JAX_DATA_DIR/../shapes_evaluator); the ldm stage also
uses it to report the accuracy of its samples at every evaluation (eval_shapes_acc_test / _compositional), unless
its config turns that off (sample.shapes_eval_prompts = 0, as the demo's does).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
STAGES = ("vae", "clip", "ldm")
PRESETS = ("demo", "full", "runlocal")
HELDOUT_SPLITS = ("test", "compositional")


def _config_arg(preset: str) -> str:
  return "" if preset == "full" else preset


def stage_command(stage: str, preset: str, workdir: Path, overrides: Sequence[str] = ()) -> list[str]:
  """The training command of one stage (what a user would type)."""
  arg = _config_arg(preset)
  if stage == "ldm":
    extra = f"vae_from={workdir / 'vae' / 'export'},text_from={workdir / 'clip' / 'export'}"
    arg = f"{arg},{extra}" if arg else extra
  config = REPO / "configs" / f"shapes_{stage}.py"
  if not config.exists():
    raise FileNotFoundError(f"{config} is missing: run from a checkout of the repository (pip install -e .).")
  spec = f"{config}:{arg}" if arg else str(config)
  return [sys.executable, "-m", "sd_jax.main", f"--config={spec}", f"--workdir={workdir / stage}", *overrides]


def stage_batch_size(stage: str, preset: str, workdir: Path, overrides: Sequence[str] = ()) -> int:
  """The global batch size a stage's command trains with: its config's, or a --config.batch_size override's."""
  from sd_jax import config_lib
  for flag in reversed(list(overrides)):
    if flag.startswith("--config.batch_size="):
      return int(flag.partition("=")[2])
  spec = stage_command(stage, preset, workdir)[3].removeprefix("--config=")
  path, _, arg = spec.partition(":")
  return int(config_lib.load_config_file(path, arg).batch_size)


def choose_cpu_devices(requested: int | None, preset: str, workdir: Path,
                       overrides: dict[str, list[str]]) -> int | None:
  """The JAX_NUM_CPU_DEVICES the stages run with: `requested` (--cpu_devices) if given; else None (leave it) when
  the environment already sets a count; else one per core that divides every stage's batch size."""
  from sd_jax import machine
  if requested is not None:
    if requested < 1:
      raise SystemExit(f"--cpu_devices={requested}: use a positive count (or leave it out to pick one per core).")
    return requested
  if machine.requested_cpu_devices() is not None:
    return None
  return machine.auto_cpu_devices([stage_batch_size(s, preset, workdir, overrides[s]) for s in STAGES])


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_stage(stage: str, preset: str, workdir: Path, overrides: Sequence[str] = ()) -> dict[str, float]:
  """Runs one stage to completion (resuming if interrupted); its output goes to the console and WORKDIR/logs/."""
  command = stage_command(stage, preset, workdir, overrides)
  print(f"\n=== stage {stage}: {shlex.join(command)}", flush=True)
  (workdir / "logs").mkdir(parents=True, exist_ok=True)
  wall, cpu = time.time(), _cpu_seconds()
  with open(workdir / "logs" / f"{stage}.log", "a") as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
      log.write(line)
      log.flush()  # the log is readable while the stage runs
      sys.stdout.write(line)
    process.wait()
  if process.returncode:
    raise SystemExit(f"stage {stage} failed (exit {process.returncode}); see {workdir / 'logs' / f'{stage}.log'}. "
                     "Fix the cause and rerun the same command: finished stages are skipped, this one resumes.")
  return {"wall_seconds": round(time.time() - wall, 1), "cpu_seconds": round(_cpu_seconds() - cpu, 1)}


def load_or_train_evaluator(directory: str, *, steps: int | None = None):
  """The shapes evaluator from `directory`, trained there first if absent (its report.json says how good it is)."""
  from sd_jax.eval import shapes_eval
  path = Path(directory)
  if not (path / "report.json").exists():
    print(f"\n=== training the shapes evaluator into {path} (once)", flush=True)
    kwargs = {"steps": steps} if steps else {}
    report = shapes_eval.train_evaluator(str(path), overwrite=True, **kwargs)
    print(report.summary(), flush=True)
  return shapes_eval.load_evaluator(str(path)), json.loads((path / "report.json").read_text())


def heldout_prompts(dataset: dict[str, Any], split: str, count: int) -> list[str]:
  from sd_jax.data import input_pipeline
  info = input_pipeline.dataset_info(dataset, split)
  return [info.captions(i) for i in range(min(count, info.num_examples))]


def evaluate_model(model_dir, dataset: dict[str, Any], evaluator, *, num_prompts: int, steps: int, guidance: float,
                   seed: int, batch_size: int = 64, grid_prompts: int = 8, grid_path: Path | None = None
                   ) -> dict[str, Any]:
  """Shapes accuracy of generated images on the first `num_prompts` captions of each held-out split."""
  import numpy as np
  from sd_jax import images as images_lib
  from sd_jax import generate
  pipe = generate.TextToImage.from_model_dir(model_dir)
  results: dict[str, Any] = {}
  grid_images, grid_labels = [], []
  for split in HELDOUT_SPLITS:
    prompts = heldout_prompts(dataset, split, num_prompts)
    start = time.time()
    images = pipe.generate(prompts, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)
    seconds = time.time() - start
    score = evaluator.score(images, prompts)
    results[split] = {"accuracy": float(score.accuracy), "num_prompts": len(prompts), "sample_seconds":
                      round(seconds, 1), **score.breakdown()}
    print(f"{split}: {score.accuracy:.3f} of {len(prompts)} generated images show every shape their prompt names "
          f"(colour and kind)", flush=True)
    k = min(grid_prompts, len(prompts))
    pairs = pipe.generate(prompts[:k], num_images=2, steps=steps, guidance=guidance, seed=seed + 1)
    grid_images.append(pairs.reshape(k, 2, *pairs.shape[1:]))
    grid_labels += [f"[{split}] {p}" for p in prompts[:k]]
  if grid_path is not None:
    grid = images_lib.labeled_grid(np.concatenate(grid_images), grid_labels, tile=64)
    images_lib.save_png(grid, grid_path)
  return results


def folder_splits(folder: str) -> list[str]:
  from sd_jax.data import folder as folder_lib
  return folder_lib.available_splits(folder)


def heldout_grid(model_dir, dataset: dict[str, Any], *, num_prompts: int, steps: int, guidance: float, seed: int,
                 grid_path: Path, images_per_prompt: int = 2) -> list[str]:
  """A labelled grid of samples for the first `num_prompts` captions of the test split (a folder has no evaluator
  of what its images show); returns the prompts."""
  from sd_jax import generate
  from sd_jax import images as images_lib
  prompts = heldout_prompts(dataset, "test", num_prompts)
  pipe = generate.TextToImage.from_model_dir(model_dir)
  images = pipe.generate(prompts, num_images=images_per_prompt, steps=steps, guidance=guidance, seed=seed,
                         batch_size=min(64, len(prompts) * images_per_prompt))
  images_lib.save_png(images_lib.prompt_grid(images, prompts, images_per_prompt), grid_path)
  return prompts


def _final_metrics(workdir: Path) -> dict[str, float]:
  from sd_jax import metrics
  last: dict[str, float] = {}
  for row in metrics.read_metrics(workdir):
    last.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
  return last


def write_summary(workdir: Path, summary: dict[str, Any]) -> None:
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
  data = f"folder {summary['folder']}" if summary.get("folder") else "shapes"
  lines = [f"# {data}, {summary['preset']}: VAE → CLIP → LDM", "", "| stage | key metrics | wall | CPU |",
           "|---|---|---|---|"]
  picks = {"vae": ("eval_psnr", "eval_l1"), "clip": ("eval_zeroshot_acc", "eval_t2i_r1", "eval_t2i_r5",
                                                      "eval_compositional_zeroshot_acc"),
           "ldm": ("loss", "eval_loss", "eval_shapes_acc_test", "eval_shapes_acc_compositional")}
  for stage in STAGES:
    final = summary["stages"].get(stage, {}).get("final", {})
    shown = ", ".join(f"{k} {final[k]:.4g}" for k in picks[stage] if k in final)
    times = summary["stages"].get(stage, {}).get("time", {})
    lines.append(f"| {stage} | {shown} | {times.get('wall_seconds', '-')} s | {times.get('cpu_seconds', '-')} s |")
  if summary["heldout"]:
    lines += ["", "| held-out split | shapes accuracy (colour and kind of every named shape) | prompts | one-shape "
              "prompts | two-shape prompts | shapes found (colour+kind / colour / kind) |", "|---|---|---|---|---|---|"]

  def fmt(r, key):
    return f"{r[key]:.3f}" if isinstance(r.get(key), float) and r[key] == r[key] else "-"
  if summary.get("grid_prompts"):
    lines += ["", f"Samples for the first {len(summary['grid_prompts'])} captions of the test split: "
              "samples_heldout.png."]
  for split, r in summary["heldout"].items():
    lines.append(f"| {split} | {r['accuracy']:.3f} | {r['num_prompts']} | {fmt(r, 'accuracy_one_shape')} | "
                 f"{fmt(r, 'accuracy_two_shapes')} | {fmt(r, 'shape_recall')} / {fmt(r, 'colour_recall')} / "
                 f"{fmt(r, 'kind_recall')} |")
  ev = summary.get("evaluator", {})
  if ev:
    lines += ["", f"Evaluator's own accuracy on real images: test {ev.get('test')}, compositional "
              f"{ev.get('compositional')}."]
  lines += ["", f"Sampling: DDIM {summary['sampling']['steps']} steps, guidance {summary['sampling']['guidance']}. "
            f"Total wall time {summary['total_wall_seconds']} s."]
  if summary.get("machine"):
    m = summary["machine"]
    lines += ["", f"Machine: {m['cpu']}; JAX device {m['device']} ×{m.get('device_count', 1)}; "
              "a fixed 3×3 convolution (python -m sd_jax.machine) "
              f"runs at {m['reference_conv_gflops']} GFLOP/s."]
  (workdir / "summary.md").write_text("\n".join(lines) + "\n")


def _command():
  """The command's flags, on a FlagValues of its own (sd_jax/cli.py: one per call)."""
  from absl import flags
  from sd_jax import cli
  cmd = cli.Command("python -m sd_jax.stages", __doc__)
  fv = cmd.flags
  cli.DEFINE_choice("preset", "demo", PRESETS, "config variant of every stage", flag_values=fv)
  flags.DEFINE_string("workdir", None, "holds vae/, clip/, ldm/ and the summary", flag_values=fv)
  flags.DEFINE_string("evaluator_dir", None, "shapes evaluator cache (trained here if absent)", flag_values=fv)
  flags.DEFINE_integer("evaluator_steps", None, "evaluator training steps (default 1500)", flag_values=fv)
  flags.DEFINE_integer("num_prompts", None, "held-out prompts per split (default: 100 demo, 500 full, 8 runlocal)",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 25, "DDIM steps", flag_values=fv)
  flags.DEFINE_float("guidance", 4.0, "classifier-free guidance scale", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the held-out sampling", flag_values=fv)
  flags.DEFINE_integer("cpu_devices", None, "JAX CPU devices (data-parallel replicas) on a machine without an "
                       "accelerator; default: one per core, at most 8, dividing every stage's batch size, unless "
                       "JAX_NUM_CPU_DEVICES or XLA_FLAGS already sets a count. Ignored where JAX has an accelerator.",
                       flag_values=fv)
  flags.DEFINE_multi_string("stage_override", [], "STAGE:--config.KEY=VALUE: an extra flag for one stage's command, "
                            "e.g. ldm:--config.total_steps=100", flag_values=fv)
  flags.DEFINE_string("folder", None, "Train on this image folder (metadata.jsonl captions, with a 'test' split: "
                      "lines with \"split\": \"test\", or a test/ subfolder) instead of the shapes data; the run ends "
                      "with a labelled grid of samples for captions of the test split.", flag_values=fv)
  cmd.require("workdir")
  return cmd


def main(argv: Sequence[str] | None = None) -> int:
  """The command (argv: its flags, without the program name; default sys.argv[1:]). Returns 0; exits 1 on bad
  flags, with a message when a stage fails."""
  cmd = _command()
  args = cmd.parse(argv)

  workdir = Path(args.workdir).expanduser().resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  overrides: dict[str, list[str]] = {s: [] for s in STAGES}
  for item in args.stage_override:
    stage, _, flag = item.partition(":")
    if stage not in STAGES or not flag.startswith("--"):
      cmd.error(f"--stage_override={item!r}: use STAGE:--config.KEY=VALUE with STAGE one of {STAGES}.")
    overrides[stage].append(flag)
  num_prompts = args.num_prompts or {"demo": 100, "full": 500, "runlocal": 8}[args.preset]
  folder = None
  if args.folder:
    folder = str(Path(args.folder).expanduser().resolve())
    try:
      splits = folder_splits(folder)
    except (FileNotFoundError, ValueError) as e:
      cmd.error(f"--folder={args.folder}: {e}")
    if "test" not in splits:
      cmd.error(f"--folder={args.folder} has no 'test' split (it has {splits}): add \"split\": \"test\" to the "
                "metadata.jsonl lines of the images to hold out (a few percent), or put them in a test/ subfolder "
                "with its own metadata.jsonl.")
    for stage in STAGES:  # before the user's own overrides, which win
      overrides[stage][:0] = ["--config.dataset.name=folder", f"--config.dataset.folder={folder}"]

  start = time.time()
  # Before JAX starts (here and in the stages' processes, which inherit it): on 2 cores, two data-parallel CPU
  # devices train the demo VAE twice as fast as one (sd_jax/machine.py). An accelerator's runs are unaffected.
  cpu_devices = choose_cpu_devices(args.cpu_devices, args.preset, workdir, overrides)
  if cpu_devices is not None:
    import jax  # imported already (the configs import it); its backend is not started yet
    os.environ["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)  # the stages' processes
    jax.config.update("jax_num_cpu_devices", cpu_devices)  # this one: the evaluator and the held-out sampling
  from sd_jax import machine
  # The wall times below depend on the machine: say which, and how fast it is on a fixed convolution.
  summary: dict[str, Any] = {"preset": args.preset, "stages": {}, "commands": {}, "machine": machine.describe(),
                             "folder": folder}
  print("machine: " + "; ".join(f"{k} {v}" for k, v in summary["machine"].items()), flush=True)
  evaluator = None
  if folder is None:  # the shapes evaluator checks what the samples show; an image folder has none
    from sd_jax.eval import shapes_eval
    evaluator_dir = args.evaluator_dir or shapes_eval.default_evaluator_dir()
    evaluator, report = load_or_train_evaluator(evaluator_dir, steps=args.evaluator_steps)
    summary["evaluator"] = {split: report["real"]["r32"][split]["prompt_accuracy"] for split in HELDOUT_SPLITS}
    # The ldm run reports the shapes accuracy of its samples at every evaluation (eval_shapes_acc_*), unless its
    # config has sample.shapes_eval_prompts = 0 (the demo: the held-out evaluation below follows right after).
    overrides["ldm"].insert(0, f"--config.sample.shapes_evaluator={evaluator_dir}")
  if args.preset != "runlocal":  # the VAE posteriors and text contexts are encoded once, before the U-Net trains
    overrides["ldm"].insert(0, f"--config.ldm.precompute_dir={workdir / 'ldm_latents'}")
  for stage in STAGES:
    timing = run_stage(stage, args.preset, workdir, overrides[stage])
    summary["commands"][stage] = shlex.join(stage_command(stage, args.preset, workdir, overrides[stage])[1:])
    summary["stages"][stage] = {"time": timing, "final": _final_metrics(workdir / stage)}

  dataset = json.loads((workdir / "ldm" / "config.json").read_text())["dataset"]
  dataset["precomputed_dir"] = ""
  eval_start = time.time()
  if evaluator is None:
    print(f"\n=== samples for the first {num_prompts} captions of the test split", flush=True)
    summary["heldout"] = {}
    summary["grid_prompts"] = heldout_grid(workdir / "ldm" / "export", dataset, num_prompts=num_prompts,
                                           steps=args.steps, guidance=args.guidance, seed=args.seed,
                                           grid_path=workdir / "samples_heldout.png")
  else:
    print(f"\n=== held-out evaluation: {num_prompts} prompts per split", flush=True)
    summary["heldout"] = evaluate_model(workdir / "ldm" / "export", dataset, evaluator, num_prompts=num_prompts,
                                        steps=args.steps, guidance=args.guidance, seed=args.seed,
                                        grid_path=workdir / "samples_heldout.png")
  summary["sampling"] = {"sampler": "ddim", "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                         "eval_wall_seconds": round(time.time() - eval_start, 1)}
  summary["total_wall_seconds"] = round(time.time() - start, 1)
  write_summary(workdir, summary)
  print(f"\n{(workdir / 'summary.md').read_text()}\nSamples: {workdir / 'samples_heldout.png'}", flush=True)
  return 0


if __name__ == "__main__":
  from sd_jax import machine as _machine
  _machine.reexec_with_hugepage_malloc()  # large CPU buffers in huge pages (sd_jax/machine.py)
  sys.exit(main())
