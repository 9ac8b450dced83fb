"""The feedback loop closed on CPU: a stand-in rater votes in the rating gallery, Diffusion-DPO trains on the votes,
and held-out shapes accuracy is compared before and after.

  python -m experiments.feedback_loop --base workdirs/demo/ldm --out runs/feedback     # after README's first command

No person can rate here, so the shapes evaluator stands in for one: it knows whether an image shows what its prompt
names. The script

1. writes --num_prompts distinct captions of the dataset's `train` split to OUT/prompts.txt;
2. starts the gallery as a user would, `python -m sd_jax.feedback serve --model BASE --prompts OUT/prompts.txt
   --db OUT/feedback.sqlite --images_per_prompt N --token ...` (its worker draws the images in the background);
3. rates through the same HTTP API the page uses (GET /api/pair, GET /images/ID.png, POST /api/vote), as rater
   "shapes-evaluator": the image that matches its prompt (every named colour and shape detected) wins; if both or
   neither match, the one with more of the prompt's named shapes detected wins; otherwise "tie" (both match) or
   "both_bad". It rates until every pair of images of every prompt is rated, then stops the server;
4. exports the votes (`python -m sd_jax.feedback export`) and trains with the ordinary command,
   `python -m sd_jax.main --config=configs/dpo.py:method=M,demo,base=BASE,prefs=OUT/feedback.sqlite
   --workdir=OUT/runs/NAME` (+ --extra flags);
5. draws --seeds images for each of the first --num_eval_prompts captions of `test` and `compositional` with the base
   and with the trained model (DDIM --steps, guidance --guidance; the same seeds) and scores them with the shapes
   evaluator: accuracy before and after, the gain and its standard error (paired over prompts: each prompt's mean
   over its seeds, after minus before); the same for the first --num_eval_prompts rated prompts ("rated": does
   the model improve where it was trained, whatever it does on new prompts);
6. writes RESULTS/results.json and RESULTS/table.md, keeping the runs of earlier invocations on the same votes (other
   --extra settings under another --name). Each stage is cached in OUT (the votes in the database, the run in its
   workdir, scores in OUT/scores), so a rerun continues.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import finetune_concept

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "experiments" / "results" / "feedback_loop"
RATER = "shapes-evaluator"
SPLITS = ("test", "compositional")
RATED = "rated"  # the rated `train` prompts themselves, drawn again with the held-out seeds: where DPO trained


# ----------------------------------------------------------------------------------------------------------------
# The stand-in rater


def choose(prompt: str, images: Sequence[np.ndarray], evaluator) -> str:
  """The stand-in's vote on two images of `prompt`: "a", "b", "tie" or "both_bad" (module docstring)."""
  result = evaluator.score(np.stack(images), [prompt, prompt])
  match = [bool(m) for m in result.matches]
  found = [sum(pair in detected for pair in named) for named, detected in zip(result.named, result.detected,
                                                                               strict=True)]
  if match[0] != match[1]:
    return "a" if match[0] else "b"
  if found[0] != found[1]:
    return "a" if found[0] > found[1] else "b"
  return "tie" if match[0] else "both_bad"


class Gallery:
  """The HTTP API of a running `sd_jax.feedback serve` (only the standard library: what any client could use)."""

  def __init__(self, url: str, token: str):
    self.url, self.token = url.rstrip("/"), token

  def _request(self, path: str, body: dict[str, Any] | None = None) -> bytes:
    request = urllib.request.Request(
        self.url + path, data=None if body is None else json.dumps(body).encode(),
        headers={"x-token": self.token, **({"content-type": "application/json"} if body is not None else {})})
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.read()

  def get(self, path: str) -> dict[str, Any]:
    return json.loads(self._request(path))

  def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
    return json.loads(self._request(path, body))

  def image(self, url: str) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(self._request(url))) as image:
      return np.asarray(image.convert("RGB"))

  def alive(self) -> bool:
    try:
      self.get("/api/progress")
      return True
    except (urllib.error.URLError, ConnectionError, OSError):
      return False


def rate_all(gallery: Gallery, evaluator, server: subprocess.Popen, *, poll_s: float = 2.0) -> dict[str, int]:
  """Rates every pair the gallery offers until its worker has drawn every image and no pair is left."""
  counts = {c: 0 for c in ("a", "b", "tie", "both_bad")}
  last = time.time()
  while True:
    if server.poll() is not None:
      raise SystemExit(f"the gallery server exited ({server.returncode}) while rating; see its log.")
    pair = gallery.get(f"/api/pair?rater={RATER}")
    if pair["done"]:
      if pair["queued"] == 0:
        return counts
      time.sleep(poll_s)  # the worker is still drawing
      continue
    images = [gallery.image(pair[k]["url"]) for k in ("a", "b")]
    choice = choose(pair["prompt"], images, evaluator)
    gallery.post("/api/vote", {"image_a": pair["a"]["id"], "image_b": pair["b"]["id"], "choice": choice,
                               "rater": RATER})
    counts[choice] += 1
    if time.time() - last > 30:
      progress = gallery.get(f"/api/progress?rater={RATER}")
      print(f"  rated {sum(counts.values())} pairs {counts}; progress {progress}", flush=True)
      last = time.time()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def collect_votes(base: Path, out: Path, prompts: Sequence[str], evaluator, env: dict[str, str], *,
                  images_per_prompt: int, steps: int, guidance: float) -> dict[str, Any]:
  """Steps 2-3 of the module docstring; returns the vote counts and times (cached in OUT/votes.json)."""
  cache = out / "votes.json"
  key = {"prompts": list(prompts), "images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance}
  if cache.exists() and json.loads(cache.read_text())["key"] == key:
    return json.loads(cache.read_text())["votes"]
  (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
  token, port = secrets.token_urlsafe(16), _free_port()
  command = [sys.executable, "-m", "sd_jax.feedback", "serve", f"--model={base}", f"--prompts={out / 'prompts.txt'}",
             f"--db={out / 'feedback.sqlite'}", f"--images_per_prompt={images_per_prompt}", f"--steps={steps}",
             f"--guidance={guidance}", f"--port={port}", f"--token={token}"]
  print(f"\n=== {shlex.join(command[1:])}", flush=True)
  wall, cpu = time.time(), finetune_concept._children_cpu()  # noqa: SLF001 - the same accounting
  log = open(out / "serve.log", "a")  # noqa: SIM115 - open while the server runs
  server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
  gallery = Gallery(f"http://127.0.0.1:{port}", token)
  try:
    deadline = time.time() + 600
    while not gallery.alive():
      if server.poll() is not None or time.time() > deadline:
        raise SystemExit(f"the gallery server did not start; see {out / 'serve.log'}")
      time.sleep(1)
    rater_start = time.process_time()
    counts = rate_all(gallery, evaluator, server)
    progress = gallery.get(f"/api/progress?rater={RATER}")
  finally:
    server.terminate()
    server.wait(timeout=60)
    log.close()
  votes = {"counts": counts, "progress": progress, "wall_seconds": round(time.time() - wall, 1),
           "server_cpu_seconds": round(finetune_concept._children_cpu() - cpu, 1),  # noqa: SLF001
           "rater_cpu_seconds": round(time.process_time() - rater_start, 1), "command": shlex.join(command[1:])}
  cache.write_text(json.dumps({"key": key, "votes": votes}, indent=2))
  return votes


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def score(pipe, prompts: dict[str, list[str]], evaluator, *, seeds: Sequence[int], steps: int, guidance: float
          ) -> dict[str, Any]:
  """{split: {"matches": [prompt][seed] 0/1, "accuracy": ...}} of `pipe`'s images of each split's prompts."""
  out: dict[str, Any] = {}
  start = time.time()
  for split, split_prompts in prompts.items():
    matches = []
    for seed in seeds:
      images = pipe.generate(split_prompts, steps=steps, guidance=guidance, seed=seed, batch_size=64)
      matches.append(np.asarray(evaluator.score(images, split_prompts).matches, float))
    matches = np.stack(matches, axis=1)  # [prompts, seeds]
    out[split] = {"accuracy": float(matches.mean()), "matches": matches.astype(int).tolist()}
  out["sample_seconds"] = round(time.time() - start, 1)
  return out


def gain(before: list[list[int]], after: list[list[int]]) -> dict[str, float]:
  """Accuracy after − before, with its standard error paired over prompts (each prompt's mean over its seeds)."""
  b, a = np.asarray(before, float).mean(axis=1), np.asarray(after, float).mean(axis=1)
  d = a - b
  return {"before": float(b.mean()), "after": float(a.mean()), "gain": float(d.mean()),
          "se": float(d.std(ddof=1) / np.sqrt(len(d))), "num_prompts": len(d)}


def markdown(results: dict[str, Any]) -> str:
  s, v = results["settings"], results["votes"]
  counts = v["counts"]
  lines = [
      "# Closing the feedback loop: a stand-in rater, Diffusion-DPO, held-out accuracy", "",
      f"{s['num_prompts']} `train` prompts × {s['images_per_prompt']} images drawn by the gallery; "
      f"{sum(counts.values())} votes by the stand-in rater ({counts['a'] + counts['b']} preferences, "
      f"{counts['tie']} ties, {counts['both_bad']} both bad) in {v['wall_seconds']:.0f} s "
      f"(server CPU {v['server_cpu_seconds']:.0f} s, rater CPU {v['rater_cpu_seconds']:.0f} s).", "",
      f"Held-out: the first {s['num_eval_prompts']} prompts of each split × seeds {s['seeds']}; DDIM {s['steps']} "
      f"steps, guidance {s['guidance']}. Gain = after − before, ± its standard error paired over prompts.", "",
      "| model | training wall / CPU | test: before → after | gain ± SE | compositional: before → after | gain ± SE "
      "| rated prompts: before → after | gain ± SE |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, run in results["runs"].items():
    row = [name, f"{run['train']['wall_seconds']:.0f} s / {run['train']['cpu_seconds']:.0f} s"]
    for split in (*SPLITS, RATED):
      g = run["gain"].get(split)
      row += [f"{g['before']:.3f} → {g['after']:.3f}", f"{g['gain']:+.3f} ± {g['se']:.3f}"] if g else ["–", "–"]
    lines.append("| " + " | ".join(row) + " |")
  commands = list(dict.fromkeys(run.get("command", results["command"]) for run in results["runs"].values()))
  lines += ["", "Commands:", "", *[f"    {c}" for c in commands]]
  return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="The shapes model: README's first command's WORKDIR/ldm (a workdir).")
  p.add_argument("--out", required=True, help="Working directory: the database, the runs, cached scores.")
  p.add_argument("--results", default=str(DEFAULT_RESULTS), help="Where results.json and table.md go.")
  p.add_argument("--num_prompts", type=int, default=256, help="Distinct `train` prompts the gallery draws.")
  p.add_argument("--images_per_prompt", type=int, default=4, help="Images per prompt (all pairs are rated).")
  p.add_argument("--methods", default="lora", help="Comma-separated dpo methods: lora, full.")
  p.add_argument("--extra", action="append", default=[], help="An extra flag for every training command, e.g. "
                 "--extra=--config.dpo.beta=1000 (repeatable).")
  p.add_argument("--name", default="", help="A suffix of the run names (for runs with other --extra flags).")
  p.add_argument("--num_eval_prompts", type=int, default=250, help="Held-out prompts per split (>= 200).")
  p.add_argument("--seeds", default="0,1", help="Comma-separated seeds of the held-out images.")
  p.add_argument("--steps", type=int, default=25, help="DDIM steps (the gallery's and the evaluation's).")
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--evaluator_dir", default=None, help="The shapes evaluator (default: its cache; trained if absent).")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not methods or any(m not in ("lora", "full") for m in methods):
    raise SystemExit(f"error: --methods={args.methods!r}: use lora and/or full.")
  if args.images_per_prompt < 2:
    raise SystemExit("error: --images_per_prompt must be at least 2 (the rater compares pairs).")
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  base = Path(args.base).expanduser().resolve()
  out, results_dir = Path(args.out).expanduser().resolve(), Path(args.results).expanduser().resolve()
  out.mkdir(parents=True, exist_ok=True)
  results_dir.mkdir(parents=True, exist_ok=True)

  from sd_jax import machine
  env = dict(os.environ)
  if machine.requested_cpu_devices() is None:  # as sd_jax.stages: one CPU device per core, here and in children
    env["JAX_NUM_CPU_DEVICES"] = str(machine.auto_cpu_devices([8, 64]))
    import jax
    jax.config.update("jax_num_cpu_devices", int(env["JAX_NUM_CPU_DEVICES"]))
  from sd_jax import generate, stages
  from sd_jax.eval import shapes_eval

  dataset = json.loads((base / "config.json").read_text())["dataset"]
  dataset["precomputed_dir"] = ""
  train_prompts = list(dict.fromkeys(stages.heldout_prompts(dataset, "train", 8 * args.num_prompts)))
  if len(train_prompts) < args.num_prompts:
    raise SystemExit(f"error: the train split has {len(train_prompts)} distinct captions in its first "
                     f"{8 * args.num_prompts}; lower --num_prompts.")
  train_prompts = train_prompts[:args.num_prompts]
  heldout = {split: stages.heldout_prompts(dataset, split, args.num_eval_prompts) for split in SPLITS}
  heldout[RATED] = train_prompts[:args.num_eval_prompts]
  evaluator, _ = stages.load_or_train_evaluator(args.evaluator_dir or shapes_eval.default_evaluator_dir())

  votes = collect_votes(base, out, train_prompts, evaluator, env, images_per_prompt=args.images_per_prompt,
                        steps=args.steps, guidance=args.guidance)
  print(f"votes: {votes['counts']}", flush=True)
  parquet = out / "prefs.parquet"
  subprocess.run([sys.executable, "-m", "sd_jax.feedback", "export", f"--db={out / 'feedback.sqlite'}",
                  f"--out={parquet}"], cwd=REPO, env=env, check=True)

  settings = {k: getattr(args, k) for k in ("num_prompts", "images_per_prompt", "num_eval_prompts", "steps",
                                            "guidance", "extra")}
  settings["seeds"] = seeds
  settings["scored"] = list(heldout)
  (out / "scores").mkdir(exist_ok=True)

  def scores_of(name: str, workdir: Path, fingerprint: Any) -> dict[str, Any]:
    cache = out / "scores" / f"{name}.json"
    scoring = {k: v for k, v in settings.items() if k != "extra"}  # a run's own flags are in its fingerprint
    key = json.dumps([scoring, fingerprint], sort_keys=True)
    if cache.exists() and json.loads(cache.read_text())["key"] == key:
      return json.loads(cache.read_text())["scores"]
    print(f"\n=== scoring {name}", flush=True)
    result = score(generate.TextToImage.from_workdir(workdir), heldout, evaluator, seeds=seeds, steps=args.steps,
                   guidance=args.guidance)
    cache.write_text(json.dumps({"key": key, "scores": result}))
    return result

  before = scores_of("base", base, None)
  runs: dict[str, Any] = {}
  for method in methods:
    name = f"dpo_{method}{args.name}"
    workdir = out / "runs" / name
    arg = f"method={method},demo,base={base},prefs={out / 'feedback.sqlite'}"
    command = [sys.executable, "-m", "sd_jax.main", f"--config={REPO / 'configs' / 'dpo.py'}:{arg}",
               f"--workdir={workdir}", *args.extra]
    timing = finetune_concept.run_finetune(command, workdir, env)
    after = scores_of(name, workdir, timing)
    from sd_jax import metrics
    logged = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    runs[name] = {"train": timing, "gain": {split: gain(before[split]["matches"], after[split]["matches"])
                                            for split in (*SPLITS, RATED)},
                  "first_logged": logged[0] if logged else None, "last_logged": logged[-1] if logged else None}
    print(f"{name}: " + ", ".join(f"{split} {g['before']:.3f} -> {g['after']:.3f} ({g['gain']:+.3f} ± {g['se']:.3f})"
                                  for split, g in runs[name]["gain"].items()), flush=True)

  command = "python -m experiments.feedback_loop " + shlex.join(sys.argv[1:] if argv is None else list(argv))
  for run in runs.values():
    run["command"] = command
  previous = results_dir / "results.json"
  if previous.exists():  # runs of earlier invocations on the same votes and settings (other --extra / --name)
    earlier = json.loads(previous.read_text())
    same = {k: v for k, v in earlier.get("settings", {}).items() if k != "extra"} == {
        k: v for k, v in settings.items() if k != "extra"} and earlier.get("votes") == votes
    runs = {**(earlier.get("runs", {}) if same else {}), **runs}
  results = {"settings": settings, "base": str(base), "machine": machine.describe(), "votes": votes,
             "command": command, "runs": runs}
  (results_dir / "results.json").write_text(json.dumps(results, indent=2))
  (results_dir / "table.md").write_text(markdown(results))
  print("\n" + markdown(results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
