"""Learn from people's favourites: a rating gallery over a preference store, and its export.

  python -m sd_jax.feedback serve --model workdirs/demo/ldm --prompts prompts.txt --db feedback.sqlite
  python -m sd_jax.feedback serve --model models/sd15 --lora my.safetensors --prompts p.txt --db f.sqlite \\
      --host 0.0.0.0 --token SECRET        # on a lab network: every request carries the token
  python -m sd_jax.feedback export --db feedback.sqlite --out prefs.parquet

serve: starts a local web server (FastAPI on uvicorn, sd_jax/feedback/server.py) and prints its URL; a background
worker draws --images_per_prompt images for every prompt of --prompts (one per line) with the model (anything
`python -m sd_jax.sample` takes: a workdir, a model directory, a diffusers directory or a single file, plus
--lora/--embedding) and records them in --db (SQLite; images in a folder beside it). People compare two images of a
prompt (or mark favourites in the gallery); every vote is a row of --db. It binds 127.0.0.1 unless --host is given,
and then --token is required.

export: the votes as a Pick-a-Pic-layout parquet file (caption, jpg_0, jpg_1, label_0 = 1 / 0 / 0.5 for ties),
which the dpo trainer reads as it reads the database (configs/dpo.py).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from sd_jax import cli

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _serve_command() -> cli.Command:
  cmd = cli.Command("python -m sd_jax.feedback serve", __doc__)
  fv = cmd.flags
  flags.DEFINE_string("model", None, "The model to draw with: a training workdir, an sd_jax model directory, a "
                      "diffusers directory or a single .safetensors file.", flag_values=fv)
  flags.DEFINE_multi_string("lora", [], "A LoRA file to apply, FILE or FILE:SCALE (repeatable).", flag_values=fv)
  flags.DEFINE_multi_string("embedding", [], "A textual-inversion file (repeatable).", flag_values=fv)
  flags.DEFINE_string("prompts", None, "A text file with one prompt per line.", flag_values=fv)
  flags.DEFINE_string("db", None, "The SQLite preference store (created if new; images in DB_images/ beside it).",
                      flag_values=fv)
  flags.DEFINE_integer("images_per_prompt", 4, "Images drawn per prompt (images 0..N-1 of the prompt's seed).",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Base seed: each prompt's seed is this plus a hash of the prompt, as the image "
                       "records say.", flag_values=fv)
  flags.DEFINE_integer("steps", 25, "Sampler steps.", flag_values=fv)
  flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale.", flag_values=fv)
  flags.DEFINE_string("sampler", "ddim", "Sampler (sd_jax/diffusion/samplers.py).", flag_values=fv)
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind (anything but localhost needs --token).", flag_values=fv)
  flags.DEFINE_integer("port", 8000, "Port.", flag_values=fv)
  flags.DEFINE_string("token", None, "A secret every request must carry (required with --host).", flag_values=fv)
  flags.DEFINE_string("title", "sd_jax ratings", "The page's title.", flag_values=fv)
  cmd.require("model", "prompts", "db")
  return cmd


def _export_command() -> cli.Command:
  cmd = cli.Command("python -m sd_jax.feedback export", __doc__)
  flags.DEFINE_string("db", None, "The SQLite preference store.", flag_values=cmd.flags)
  flags.DEFINE_string("out", None, "The parquet file to write.", flag_values=cmd.flags)
  flags.DEFINE_bool("ties", True, "Also export ties (label_0 = 0.5).", flag_values=cmd.flags)
  cmd.require("db", "out")
  return cmd


def serve(argv: Sequence[str]) -> int:
  cmd = _serve_command()
  args = cmd.parse(argv)
  if args.host not in LOCAL_HOSTS and not args.token:
    cmd.error(f"--host={args.host} shares the gallery beyond this machine: give --token SECRET too (every request "
              "must carry it).")
  if args.images_per_prompt < 2:
    cmd.error(f"--images_per_prompt={args.images_per_prompt}: comparisons need at least 2 images per prompt.")
  import os  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(args.prompts):
    cmd.error(f"--prompts {args.prompts} does not exist.")
  prompts = [line.strip() for line in open(args.prompts, encoding="utf-8") if line.strip()]
  if not prompts:
    cmd.error(f"--prompts {args.prompts} has no prompts (one per line).")
  from sd_jax import generate  # pylint: disable=import-outside-toplevel
  from sd_jax.feedback import server, store as store_lib, worker as worker_lib  # pylint: disable=import-outside-toplevel
  from sd_jax.weights import model_dir as model_dir_lib  # pylint: disable=import-outside-toplevel
  try:
    store = store_lib.FeedbackStore(args.db)
    model = str(args.model)
    if os.path.exists(os.path.join(model, "export", generate.FINETUNE_SUMMARY)):  # a LoRA / embedding fine-tune
      pipe = generate.TextToImage.from_workdir(model)
    else:
      pipe = generate.TextToImage.from_model_dir(model_dir_lib.resolve_model(model, what="--model"))
    for item in args.lora:
      path, scale = cli.parse_lora_flag(item)
      pipe.with_lora(path, scale)
    for path in args.embedding:
      pipe.with_embeddings(path)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  model_id = store.add_model(os.path.abspath(model), worker_lib.weights_hash(pipe))
  work = worker_lib.Worker(store, pipe, model_id, prompts, images_per_prompt=args.images_per_prompt, seed=args.seed,
                           settings={"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler})
  work.start()
  app = server.create_app(store, token=args.token, title=args.title, queued=lambda: work.queued)
  import uvicorn  # pylint: disable=import-outside-toplevel
  url = f"http://{args.host}:{args.port}/" + (f"?token={args.token}" if args.token else "")
  print(f"serving {len(prompts)} prompt(s) of {args.prompts} from {model} at {url}", flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  return 0


def export(argv: Sequence[str]) -> int:
  cmd = _export_command()
  args = cmd.parse(argv)
  import os  # pylint: disable=import-outside-toplevel
  from sd_jax.feedback import store as store_lib  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(args.db):
    cmd.error(f"--db {args.db} does not exist.")
  rows = store_lib.export_parquet(store_lib.FeedbackStore(args.db), args.out, include_ties=args.ties)
  print(f"wrote {rows} preference pair(s) to {args.out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"serve": serve, "export": export}
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
    sys.stdout.write(__doc__ if not argv or argv[0] in ("-h", "--help") else "")
    if argv and argv[0] not in ("-h", "--help"):
      print(f"error: unknown command {argv[0]!r}: use serve or export.", file=sys.stderr)
      return 1
    return 0
  return commands[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
