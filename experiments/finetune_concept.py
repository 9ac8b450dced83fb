"""Fine-tuning the shapes model on a concept it has never seen: a new kind of shape, under a rare token.

  python -m experiments.finetune_concept --base workdirs/demo/ldm --out runs/concept     # after README's first command
  python -m experiments.finetune_concept --base B --out O --methods dreambooth_lora --prior no --num_images 10

The concept is a kind the shapes renderer draws but the dataset never uses (`shapes.NOVEL_KINDS`, default "heart"),
named in captions by a rare token (default "zq": two characters no caption of the dataset holds, so the base's
tokenizer splits it into byte tokens the text tower never trained on). The script

1. writes the concept folder OUT/concept: --num_images rendered scenes (`shapes.novel_scenes`, seed 0) of one heart
   in a random colour, size and position, 30 % of them beside a second, ordinary shape in a relation; captions in the
   dataset's wording with the token for the kind ("a red zq", "a small blue zq above a green square"), in
   metadata.jsonl. Hearts are drawn in every colour but --heldout_colors, so the prompts can test colours the concept
   was never shown in;
2. runs each fine-tune as the ordinary training command, one per --methods × --prior:
     python -m sd_jax.main --config=configs/finetune.py:method=M,demo,base=BASE,data=OUT/concept[,prior=True] \\
         --config.finetune.class_prompt="a shape" --workdir=OUT/runs/NAME
   (DreamBooth-LoRA trains U-Net adapters, full trains the whole U-Net; the text tower stays frozen in both. Each
   image keeps its own caption, so colours and relations stay in the prompt. A finished run is not rerun.);
3. scores the base and every fine-tune (DDIM --steps, guidance --guidance, seed --seed, one image a prompt):
   * concept prompts: --num_prompts new captions with the token (half one-shape over all 7 colours, half two-shape
     with a second shape of another colour, none a training caption), checked by the concept evaluator (the shapes
     evaluator extended to the new kind: `shapes_eval.ConceptClassifier`, trained once on renderer ground truth
     into --concept_evaluator_dir): the heart in the named colour; for two-shape prompts also the other shape and
     the relation (`shapes_eval.check_relations`, by where the two colours are);
   * the old held-out prompts: the first --num_old_prompts captions of `test` and `compositional`, as sd_jax.stages
     scores them, by the concept evaluator (which would catch a heart drawn for "circle") and by the standard one;
     and how often a heart shows up in those images at all;
4. writes RESULTS/results.json, RESULTS/table.md, RESULTS/concept_data.png and a labelled grid of samples per model
   (RESULTS/grid_NAME.png). Scores are cached in OUT/scores/, so a rerun only scores what is new.

Times are those of the whole training command (startup, compilation, and with prior preservation the drawing of the
class images by the base model included), wall and CPU (user + system, all threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sd_jax.data import shapes

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dreambooth_lora", "full", "lora", "dreambooth")
DEFAULT_RESULTS = REPO / "experiments" / "results" / "finetune_concept"
CONCEPT_SEED = 0  # shapes.novel_scenes seed of the training images
PROMPT_SEEDS = (1, 2)  # of the one-shape and of the two-shape concept prompts
LORA_FILE = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Data and prompts


def concept_examples(kind: str, word: str, num_images: int, colors: Sequence[str], seed: int = CONCEPT_SEED,
                     two_shape_fraction: float = 0.3) -> list[tuple[shapes.SceneSpec, str]]:
  """(scene, caption) of the concept's training images: the novel `kind` in `colors`, captioned with `word`."""
  specs = shapes.novel_scenes(num_images, kind, seed=seed, two_shape_fraction=two_shape_fraction, colors=colors)
  rng = np.random.default_rng([seed, shapes.NOVEL_STREAM, 1])  # the wording, as the dataset varies it
  return [(spec, shapes.concept_caption(spec, word, rng)) for spec in specs]


def write_concept_folder(folder: Path, examples: Sequence[tuple[shapes.SceneSpec, str]], resolution: int) -> None:
  """An image folder the fine-tune trainer reads: 00000.png, ... and metadata.jsonl {"file_name", "text"}."""
  from sd_jax import images as images_lib
  folder.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, (spec, caption) in enumerate(examples):
    name = f"{i:05d}.png"
    images_lib.save_png(shapes.render(spec, resolution), folder / name)
    lines.append(json.dumps({"file_name": name, "text": caption}))
  (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@dataclasses.dataclass(frozen=True)
class ConceptPrompt:
  """One prompt naming the new concept, with the scene it asks for."""
  prompt: str
  spec: shapes.SceneSpec
  seen_color: bool  # the concept's colour in this prompt occurs in its training images

  @property
  def two_shapes(self) -> bool:
    return len(self.spec.shapes) == 2


def concept_prompts(kind: str, word: str, count: int, train_colors: Sequence[str],
                    exclude: Sequence[str] = ()) -> list[ConceptPrompt]:
  """`count` prompts with `word`: half one shape (the kind in every colour in turn, random sizes and wording), half
  two shapes of different colours in a relation (the kind first or second, the other shape from the dataset's train
  pairs). A two-shape prompt that states the scene of a caption of `exclude` (the training captions), up to wording
  and sizes, is skipped: each is a new colour/kind/relation combination. (One-shape prompts in the training colours
  cannot all be new: there are 7 colours; what is new there is the image, and in `heldout` colours, the colour.)
  Deterministic."""
  excluded = {_canonical(c) for c in exclude}
  one, two = count // 2 + count % 2, count // 2
  out: list[ConceptPrompt] = []
  for seed, wanted, fraction in ((PROMPT_SEEDS[0], one, 0.0), (PROMPT_SEEDS[1], two, 1.0)):
    rng = np.random.default_rng([seed, shapes.NOVEL_STREAM, 1])
    made, batch = 0, 0
    while made < wanted:
      specs = shapes.novel_scenes(4 * wanted + 8, kind, seed=1000 * seed + batch, two_shape_fraction=fraction)
      batch += 1
      for spec in specs:
        if made == wanted:
          break
        if fraction == 0.0:  # every colour in turn, so each is asked for about as often
          spec = dataclasses.replace(spec, shapes=(dataclasses.replace(
              spec.shapes[0], color=shapes.COLORS[made % len(shapes.COLORS)]),))
        elif spec.shapes[0].color == spec.shapes[1].color:
          continue  # the relation is checked by colour: two colours needed
        prompt = shapes.concept_caption(spec, word, rng, kinds=(kind,))
        if fraction and _canonical(prompt) in excluded:
          continue
        color = next(s.color for s in spec.shapes if s.kind == kind)
        out.append(ConceptPrompt(prompt, spec, color in train_colors))
        made += 1
  return out


_FILLERS = ("there is ", "an image of ", " on a black background", " is ", " small", " large", "to the ")


def _canonical(caption: str) -> str:
  """A caption without its wording variations (fillers, sizes): two captions of one scene compare equal."""
  text = f" {caption.lower()} "
  for filler in _FILLERS:
    text = text.replace(filler, " ")
  return " ".join(text.replace(" under ", " below ").split())


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning


def run_name(method: str, prior: bool) -> str:
  return f"{method}_prior" if prior else method


def finetune_command(method: str, prior: bool, base: str, data: str, workdir: str, class_prompt: str,
                     extra: Sequence[str] = ()) -> list[str]:
  """The ordinary training command of one fine-tune (what a user would type)."""
  arg = f"method={method},demo,base={base},data={data}" + (",prior=True" if prior else "")
  command = [sys.executable, "-m", "sd_jax.main", f"--config={REPO / 'configs' / 'finetune.py'}:{arg}",
             f"--workdir={workdir}"]
  if prior:
    command.append(f"--config.finetune.class_prompt={class_prompt}")
  return command + list(extra)


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_finetune(command: list[str], workdir: Path, env: dict[str, str]) -> dict[str, Any]:
  """Runs one fine-tune to completion (unless it finished before) and returns its timing and files.

  OUT/runs/NAME/finetune_time.json keeps the timing of the run that finished it; its log goes to OUT/runs/NAME.log.
  """
  timing_file = workdir / "finetune_time.json"
  export = workdir / "export" / "finetune.json"
  if not (export.exists() and timing_file.exists()):
    print(f"\n=== {shlex.join(command)}", flush=True)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.time(), _children_cpu()
    with open(f"{workdir}.log", "a") as log:
      process = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if process.returncode:
      raise SystemExit(f"fine-tune failed (exit {process.returncode}); see {workdir}.log. Rerun: it resumes.")
    timing = {"wall_seconds": round(time.time() - wall, 1), "cpu_seconds": round(_children_cpu() - cpu, 1),
              "command": shlex.join(command[1:])}
    timing_file.write_text(json.dumps(timing, indent=2))
  timing = json.loads(timing_file.read_text())
  summary = json.loads(export.read_text())
  files = {k: (workdir / "export" / v).stat().st_size for k, v in summary["files"].items() if v != "."}
  if summary["files"].get("model") == ".":  # a full fine-tune: the U-Net weights it exports
    files["model_unet"] = sum(p.stat().st_size for p in (workdir / "export" / "unet").rglob("*") if p.is_file())
  return {**timing, "bytes": files, "step": summary.get("step")}


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def concept_metrics(prompts: Sequence[ConceptPrompt], result, relations, kind: str) -> dict[str, Any]:
  """Concept accuracies from the concept evaluator's `ScoreResult` and `check_relations`' `RelationResult`.

  one_shape / two_shape: the named pairs are all detected (two shapes: and their relation holds); `*_seen` /
  `*_unseen`: prompts whose concept colour is / is not in the training images; two_shape_pairs and
  two_shape_relation: the two halves of the two-shape check; kind_shown: a `kind` of any colour is detected;
  colour_right: a `kind` of the named colour is (the prompt's concept pair).
  """
  def mean(mask) -> float | None:
    mask = np.asarray(mask, bool)
    return None if not mask.size else float(np.mean(mask))

  one = np.array([not p.two_shapes for p in prompts], bool)
  seen = np.array([p.seen_color for p in prompts], bool)
  pairs_ok = np.asarray(result.matches, bool)
  relation_ok = np.asarray(relations.holds, bool) | ~np.asarray(relations.checked, bool)
  full = pairs_ok & np.where(one, True, relation_ok)
  concept_pair = [next(pair for pair in named if pair[1] == kind) for named in result.named]
  kind_shown = np.array([any(k == kind for _, k in d) for d in result.detected], bool)
  colour_right = np.array([pair in d for pair, d in zip(concept_pair, result.detected, strict=True)], bool)
  return {
      "num_prompts": len(prompts), "num_one_shape": int(one.sum()), "num_two_shapes": int((~one).sum()),
      "accuracy": mean(full),
      "one_shape": mean(full[one]), "one_shape_seen": mean(full[one & seen]),
      "one_shape_unseen": mean(full[one & ~seen]),
      "two_shape": mean(full[~one]), "two_shape_pairs": mean(pairs_ok[~one]),
      "two_shape_relation": mean(np.asarray(relations.holds)[~one & np.asarray(relations.checked)]),
      "kind_shown": mean(kind_shown), "colour_right": mean(colour_right),
  }


def old_metrics(result, standard, kind: str) -> dict[str, Any]:
  """Held-out accuracy by the concept evaluator (`result`) and the standard one (`standard`), and how often the
  concept kind shows up where the prompt names none."""
  return {"accuracy": float(result.accuracy), "num_prompts": len(result.matches), **result.breakdown(),
          "standard_accuracy": float(standard.accuracy),
          "kind_leak": float(np.mean([any(k == kind for _, k in d) for d in result.detected]))}


def score_model(pipe, concept: Sequence[ConceptPrompt], old: dict[str, list[str]], concept_eval, standard_eval,
                *, word: str, kind: str, steps: int, guidance: float, seed: int, batch_size: int = 64
                ) -> dict[str, Any]:
  """Draws one image per prompt with `pipe` (a `generate.TextToImage`) and scores it (module docstring)."""
  from sd_jax.eval import shapes_eval
  aliases = {word: kind}
  out: dict[str, Any] = {}
  start = time.time()
  prompts = [p.prompt for p in concept]
  images = pipe.generate(prompts, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)
  result = concept_eval.score(images, prompts, aliases=aliases)
  relations = shapes_eval.check_relations(images, prompts, kinds=concept_eval.kinds, aliases=aliases,
                                          resolution=concept_eval.resolution)
  out["concept"] = concept_metrics(concept, result, relations, kind)
  for split, split_prompts in old.items():
    images = pipe.generate(split_prompts, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)
    out[split] = old_metrics(concept_eval.score(images, split_prompts), standard_eval.score(images, split_prompts),
                             kind)
  out["sample_seconds"] = round(time.time() - start, 1)
  return out


def grid_prompts(concept: Sequence[ConceptPrompt], old: dict[str, list[str]], per_kind: int = 3,
                 per_split: int = 2) -> list[str]:
  """The grid's prompts: one-shape concept prompts (an unseen colour among them), two-shape ones, old ones."""
  ones = [p for p in concept if not p.two_shapes]
  picks = [p for p in ones if p.seen_color][:per_kind - 1] + [p for p in ones if not p.seen_color][:1]
  picks += [p for p in concept if p.two_shapes][:per_kind]
  return [p.prompt for p in picks] + [q for prompts in old.values() for q in prompts[:per_split]]


def draw_grid(pipe, prompts: Sequence[str], path: Path, *, steps: int, guidance: float, seed: int, label: str,
              images_per_prompt: int = 2) -> None:
  from sd_jax import images as images_lib
  images = pipe.generate(list(prompts), num_images=images_per_prompt, steps=steps, guidance=guidance, seed=seed)
  images = images.reshape(len(prompts), images_per_prompt, *images.shape[1:])
  images_lib.save_png(images_lib.labeled_grid(images, [f"[{label}] {p}" for p in prompts], tile=64), path)


# ----------------------------------------------------------------------------------------------------------------
# Report


def _f(v, digits: int = 2) -> str:
  return "–" if v is None else f"{v:.{digits}f}"


def _size(n: int | None) -> str:
  if n is None:
    return "–"
  return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 1024:.1f} KiB"


def markdown(results: dict[str, Any]) -> str:
  """The table of results.json: one row per model, the base first."""
  s = results["settings"]
  lines = [
      f"# Fine-tuning a new concept: \"{s['word']}\" = {s['kind']} ({s['num_images']} images)", "",
      "| model | fine-tune wall / CPU | adapter file | concept: all | one shape (seen / unseen colours) | two shapes "
      "(pairs / relation) | concept kind shown | old `test` (Δ) | old `compositional` (Δ) | standard evaluator "
      "test / comp. | concept kind in old samples |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  base = results["models"]["base"]
  for name, m in results["models"].items():
    c, t, k = m["concept"], m["test"], m["compositional"]
    ft = m.get("finetune")
    times = "–" if ft is None else f"{ft['wall_seconds']:.0f} s / {ft['cpu_seconds']:.0f} s"
    adapter = "–" if ft is None else _size(ft["bytes"].get("diffusers_lora"))
    if ft is not None and "model_unet" in ft["bytes"]:
      adapter = f"none (U-Net {_size(ft['bytes']['model_unet'])})"

    def delta(split: str, m=m) -> str:
      return "" if name == "base" else f" ({m[split]['accuracy'] - base[split]['accuracy']:+.2f})"

    lines.append(
        f"| {name} | {times} | {adapter} | {_f(c['accuracy'])} | {_f(c['one_shape'])} ({_f(c['one_shape_seen'])} / "
        f"{_f(c['one_shape_unseen'])}) | {_f(c['two_shape'])} ({_f(c['two_shape_pairs'])} / "
        f"{_f(c['two_shape_relation'])}) | {_f(c['kind_shown'])} | {_f(t['accuracy'])}{delta('test')} | "
        f"{_f(k['accuracy'])}{delta('compositional')} | {_f(t['standard_accuracy'])} / "
        f"{_f(k['standard_accuracy'])} | {_f((t['kind_leak'] + k['kind_leak']) / 2)} |")
  ev = results.get("concept_evaluator", {})
  lines += ["", f"{s['num_prompts']} concept prompts (half one shape, half two), {s['num_old_prompts']} old prompts "
            f"per split; DDIM {s['steps']} steps, guidance {s['guidance']}, seed {s['seed']}, one image a prompt. "
            f"Concept colours never in the training images: {', '.join(s['heldout_colors']) or 'none'}. Prior "
            f"preservation: class prompt \"{s['class_prompt']}\"."]
  if ev:
    lines += ["", "Concept evaluator's own accuracy on rendered images (r32): " + ", ".join(
        f"{k} {_f(v, 3)}" for k, v in ev.items())]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="The shapes model: README's first command's WORKDIR/ldm (a workdir).")
  p.add_argument("--out", required=True, help="Working directory: concept folder, fine-tune runs, cached scores.")
  p.add_argument("--results", default=str(DEFAULT_RESULTS), help="Where results.json, table.md and grids go.")
  p.add_argument("--kind", default=shapes.NOVEL_KINDS[0], choices=shapes.NOVEL_KINDS, help="The new shape.")
  p.add_argument("--word", default="zq", help="The rare token that names it in captions.")
  p.add_argument("--num_images", type=int, default=20, help="Concept training images.")
  p.add_argument("--heldout_colors", default="cyan,white", help="Colours the concept is never shown in.")
  p.add_argument("--methods", default="dreambooth_lora,full", help=f"Comma-separated, of {', '.join(METHODS)}.")
  p.add_argument("--prior", default="both", choices=("both", "yes", "no"), help="Prior preservation runs.")
  p.add_argument("--class_prompt", default="a shape", help="The prior's class prompt.")
  p.add_argument("--extra", action="append", default=[], help="An extra flag for every fine-tune command, e.g. "
                 "--extra=--config.total_steps=300 (repeatable).")
  p.add_argument("--num_prompts", type=int, default=100, help="Concept prompts.")
  p.add_argument("--num_old_prompts", type=int, default=100, help="Old held-out prompts per split.")
  p.add_argument("--steps", type=int, default=25, help="DDIM steps.")
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--concept_evaluator_dir", default=None,
                 help="Concept evaluator (trained there if absent); default beside the shapes evaluator's cache.")
  p.add_argument("--evaluator_dir", default=None, help="The standard shapes evaluator (default: its cache).")
  p.add_argument("--no_grids", action="store_true", help="Skip the sample grids.")
  return p


def load_or_train_concept_evaluator(directory: str, kind: str):
  """The concept evaluator (dataset kinds + `kind`) from `directory`, trained there first if absent."""
  from sd_jax.eval import shapes_eval
  path = Path(directory)
  if not (path / shapes_eval.REPORT_FILE).exists():
    print(f"\n=== training the concept evaluator into {path} (once)", flush=True)
    report = shapes_eval.train_evaluator(str(path), model=shapes_eval.ConceptClassifier(
        kinds=shapes.KINDS + (kind,)), overwrite=True)
    print(report.summary(), flush=True)
  evaluator = shapes_eval.load_evaluator(str(path))
  if kind not in evaluator.kinds:
    raise SystemExit(f"--concept_evaluator_dir={directory} knows kinds {evaluator.kinds}, not {kind!r}.")
  return evaluator, json.loads((path / shapes_eval.REPORT_FILE).read_text())


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not methods or any(m not in METHODS for m in methods):
    raise SystemExit(f"error: --methods={args.methods!r}: use some of {', '.join(METHODS)}.")
  heldout = [c.strip() for c in args.heldout_colors.split(",") if c.strip()]
  if any(c not in shapes.COLORS for c in heldout) or len(heldout) >= len(shapes.COLORS):
    raise SystemExit(f"error: --heldout_colors={args.heldout_colors!r}: some (not all) of {shapes.COLORS}.")
  priors = {"both": (False, True), "yes": (True,), "no": (False,)}[args.prior]
  base = Path(args.base).expanduser().resolve()
  out, results_dir = Path(args.out).expanduser().resolve(), Path(args.results).expanduser().resolve()
  results_dir.mkdir(parents=True, exist_ok=True)

  # Before JAX starts, as sd_jax.stages does: one CPU device per core (the fine-tunes' processes inherit it).
  from sd_jax import machine
  env = dict(os.environ)
  if machine.requested_cpu_devices() is None:
    env["JAX_NUM_CPU_DEVICES"] = str(machine.auto_cpu_devices([8, 64]))
    import jax
    jax.config.update("jax_num_cpu_devices", int(env["JAX_NUM_CPU_DEVICES"]))
  from sd_jax import generate, stages
  from sd_jax import images as images_lib
  from sd_jax.eval import shapes_eval

  train_colors = [c for c in shapes.COLORS if c not in heldout]
  examples = concept_examples(args.kind, args.word, args.num_images, train_colors)
  data = out / "concept"
  write_concept_folder(data, examples, resolution=32)
  images = np.stack([shapes.render(spec, 32) for spec, _ in examples])[:, None]
  images_lib.save_png(images_lib.labeled_grid(images, [c for _, c in examples], tile=64),
                      results_dir / "concept_data.png")
  concept = concept_prompts(args.kind, args.word, args.num_prompts, train_colors, exclude=[c for _, c in examples])
  dataset = json.loads((base / "config.json").read_text())["dataset"]
  dataset["precomputed_dir"] = ""
  old = {split: stages.heldout_prompts(dataset, split, args.num_old_prompts) for split in stages.HELDOUT_SPLITS}

  concept_dir = args.concept_evaluator_dir or os.path.join(
      os.path.dirname(shapes_eval.default_evaluator_dir()), f"shapes_evaluator_{args.kind}")
  concept_eval, concept_report = load_or_train_concept_evaluator(concept_dir, args.kind)
  standard_eval, _ = stages.load_or_train_evaluator(args.evaluator_dir or shapes_eval.default_evaluator_dir())

  runs = {}
  for method in methods:
    for prior in priors:
      name = run_name(method, prior)
      workdir = out / "runs" / name
      command = finetune_command(method, prior, str(base), str(data), str(workdir), args.class_prompt, args.extra)
      runs[name] = (workdir, run_finetune(command, workdir, env))

  settings = {k: getattr(args, k) for k in ("kind", "word", "num_images", "class_prompt", "num_prompts",
                                            "num_old_prompts", "steps", "guidance", "seed", "extra")}
  settings["heldout_colors"] = heldout
  models: dict[str, Any] = {}
  (out / "scores").mkdir(parents=True, exist_ok=True)
  for name, workdir in [("base", base), *[(n, w) for n, (w, _) in runs.items()]]:
    cache = out / "scores" / f"{name}.json"
    key = json.dumps([settings, runs[name][1] if name in runs else None], sort_keys=True)
    cached = json.loads(cache.read_text()) if cache.exists() else None
    pipe = None
    if cached is None or cached.get("key") != key:
      print(f"\n=== scoring {name}", flush=True)
      pipe = generate.TextToImage.from_workdir(workdir)
      scores = score_model(pipe, concept, old, concept_eval, standard_eval, word=args.word, kind=args.kind,
                           steps=args.steps, guidance=args.guidance, seed=args.seed)
      cache.write_text(json.dumps({"key": key, "scores": scores}, indent=2))
      cached = {"scores": scores}
    models[name] = dict(cached["scores"])
    if name in runs:
      models[name]["finetune"] = runs[name][1]
    grid = results_dir / f"grid_{name}.png"
    if not args.no_grids and (pipe is not None or not grid.exists()):
      pipe = pipe or generate.TextToImage.from_workdir(workdir)
      draw_grid(pipe, grid_prompts(concept, old), grid, steps=args.steps, guidance=args.guidance,
                seed=args.seed + 1, label=name)
    c = models[name]["concept"]
    print(f"{name}: concept {c['accuracy']:.3f} (one shape {c['one_shape']:.3f}, two {c['two_shape']:.3f}); "
          f"old test {models[name]['test']['accuracy']:.3f}, compositional "
          f"{models[name]['compositional']['accuracy']:.3f}", flush=True)

  ev = {f"{split} prompt": concept_report["real"]["r32"][split]["prompt_accuracy"]
        for split in ("test", "compositional", f"novel_{args.kind}")}
  ev[f"novel_{args.kind} relation"] = concept_report["real"]["r32"][f"novel_{args.kind}"].get("relation_accuracy")
  results = {"settings": settings, "base": str(base), "concept_evaluator": ev, "machine": machine.describe(),
             "concept_prompts": [p.prompt for p in concept], "concept_captions": [c for _, c in examples],
             "command": "python -m experiments.finetune_concept " + shlex.join(
                 sys.argv[1:] if argv is None else list(argv)),
             "models": models}
  (results_dir / "results.json").write_text(json.dumps(results, indent=2))
  (results_dir / "table.md").write_text(markdown(results))
  print("\n" + markdown(results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
