"""Text-to-image and image-to-image with a trained or imported Stable Diffusion: `python -m sd_jax.sample`.

  python -m sd_jax.sample --workdir workdirs/shapes_ldm --prompt "a red circle" "a blue square" --num_images 4 \\
      --steps 25 --sampler dpmpp_2m --guidance 4 --out /tmp/samples
  python -m sd_jax.sample --pretrained sd15 --prompts_file prompts.txt --negative_prompt "blurry" --out /tmp/s
  python -m sd_jax.sample --pretrained sd15 --prompt "a watercolour fox" --init_image fox.png --strength 0.6 \\
      --out /tmp/img2img

--workdir takes a finished ldm run (its WORKDIR/export: the EMA U-Net with the VAE and text tower it was trained
with); --pretrained an sd_jax model directory (`python -m sd_jax.convert --from_diffusers DIR --out OUT`). The
command writes OUT/0000_<prompt>.png, ... (num_images per prompt, prompt-major), OUT/grid.png (the images under
their prompts) and OUT/settings.json (every setting, the resolved scheduler and the file names).

The library behind it is sd_jax/generate.py (`TextToImage`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from typing import Sequence

import numpy as np
from etils import epath

from sd_jax import generate
from sd_jax import images as images_lib
from sd_jax.weights import store

SAMPLER_NAMES = generate.SAMPLER_NAMES
DEFAULT_SAMPLER = generate.DEFAULT_SAMPLER
DEFAULT_STRENGTH = generate.DEFAULT_STRENGTH


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------


class CommandError(Exception):
  """A problem with the command's inputs: printed as `error: ...`, exit status 1."""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m sd_jax.sample",
      description="Text-to-image (and img2img) with a trained sd_jax workdir or an sd_jax model directory. Writes "
      "OUT/NNNN_<prompt>.png per image, OUT/grid.png (images under their prompts) and OUT/settings.json.")
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--workdir", metavar="DIR",
                     help="A finished ldm run: samples its export/ (EMA U-Net, VAE, text tower).")
  model.add_argument("--pretrained", metavar="MODEL_DIR",
                     help="An sd_jax model directory (from `python -m sd_jax.convert --from_diffusers DIR --out "
                     "MODEL_DIR`).")
  text = p.add_mutually_exclusive_group(required=True)
  text.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT", help="One or more prompts.")
  text.add_argument("--prompts_file", metavar="FILE",
                    help="A text file with one prompt per line (blank lines are skipped).")
  p.add_argument("--negative_prompt", default="", metavar="TEXT",
                 help="What guidance steers away from (default: \"\").")
  p.add_argument("--num_images", type=int, default=1, metavar="N", help="Images per prompt (default: %(default)s).")
  p.add_argument("--steps", type=int, default=50, metavar="K", help="Sampler steps (default: %(default)s).")
  p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES, metavar="S",
                 help=f"{', '.join(SAMPLER_NAMES)}: the update rule; the schedule (spacing, prediction type) comes "
                 "from the model's scheduler config (default: %(default)s).")
  p.add_argument("--guidance", type=float, default=7.5, metavar="G",
                 help="Classifier-free guidance scale (default: %(default)s).")
  p.add_argument("--guidance_rescale", type=float, default=0.0, metavar="PHI",
                 help="Guidance rescale φ in [0, 1], Lin et al. 2023 (default: %(default)s = off).")
  p.add_argument("--eta", type=float, default=0.0, help="DDIM η (ddim only; default: %(default)s).")
  p.add_argument("--seed", type=int, default=0, metavar="N", help="Random seed (default: %(default)s).")
  p.add_argument("--height", type=int, metavar="PX",
                 help="Image height in pixels (default: the model's, or the init image's).")
  p.add_argument("--width", type=int, metavar="PX",
                 help="Image width in pixels (default: the model's, or the init image's).")
  p.add_argument("--batch_size", type=int, metavar="N", help="Images per compiled call (default: all at once).")
  p.add_argument("--init_image", metavar="PATH",
                 help="img2img: the image to start from (resized to --height/--width when they are given).")
  p.add_argument("--strength", type=float, metavar="S",
                 help=f"img2img: fraction of the schedule run, in (0, 1] (default: {DEFAULT_STRENGTH}).")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="Compute dtype of the networks (default: %(default)s).")
  p.add_argument("--out", required=True, metavar="DIR", help="Output directory (created; files are overwritten).")
  return p


def _check_flags(args, parser: argparse.ArgumentParser) -> None:
  positive = {"--num_images": args.num_images, "--steps": args.steps, "--batch_size": args.batch_size,
              "--height": args.height, "--width": args.width}
  for flag, value in positive.items():
    if value is not None and value < 1:
      parser.error(f"{flag}={value}: must be >= 1.")
  if args.strength is not None:
    if args.init_image is None:
      parser.error("--strength is an img2img setting: give --init_image too.")
    if not 0.0 < args.strength <= 1.0:
      parser.error(f"--strength={args.strength}: must be in (0, 1] (the fraction of the schedule run).")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    parser.error(f"--guidance_rescale={args.guidance_rescale}: must be in [0, 1].")
  if args.eta < 0 or (args.eta != 0 and args.sampler != "ddim"):
    parser.error(f"--eta={args.eta} with --sampler={args.sampler}: η is DDIM's noise level, >= 0 and only for "
                 "--sampler=ddim.")


def _read_prompts(args) -> list[str]:
  if args.prompt is not None:
    prompts = list(args.prompt)
    if not any(p.strip() for p in prompts):
      raise CommandError("--prompt: every prompt is empty.")
    return prompts
  path = epath.Path(args.prompts_file)
  if not path.is_file():
    raise CommandError(f"--prompts_file {path} does not exist.")
  prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise CommandError(f"--prompts_file {path} has no prompts (one prompt per line; blank lines are skipped).")
  return prompts


def _load_pipeline(args) -> generate.TextToImage:
  try:
    if args.workdir is not None:
      return generate.TextToImage.from_workdir(args.workdir, dtype=args.dtype)
    model_dir = epath.Path(args.pretrained)
    if not model_dir.is_dir():
      raise CommandError(f"--pretrained {model_dir} does not exist (or is not a directory).")
    if not (model_dir / store.INDEX_FILE).exists() and (model_dir / "model_index.json").exists():
      raise CommandError(f"--pretrained {model_dir} is a diffusers directory, not an sd_jax model directory. Convert "
                         f"it once with `python -m sd_jax.convert --from_diffusers {model_dir} --out MODEL_DIR`, "
                         "then pass --pretrained MODEL_DIR.")
    return generate.TextToImage.from_model_dir(model_dir, dtype=args.dtype)
  except (FileNotFoundError, ValueError) as e:
    flag = "--workdir" if args.workdir is not None else "--pretrained"
    message = str(e)
    raise CommandError(message if message.startswith(flag) else f"{flag}: {message}") from e


def _load_init_image(args, pipe: generate.TextToImage) -> tuple[np.ndarray, int, int]:
  """uint8 [H, W, 3], resized to --height × --width when given; (image, height, width)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path = epath.Path(args.init_image)
  if not path.is_file():
    raise CommandError(f"--init_image {path} does not exist.")
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except OSError as e:
    raise CommandError(f"--init_image {path}: not an image PIL can read ({e}).") from e
  width, height = args.width or image.width, args.height or image.height
  if (width, height) != (image.width, image.height):
    image = image.resize((width, height), Image.Resampling.LANCZOS)
  try:
    pipe.check_size(height, width)
  except ValueError as e:
    if args.height is None or args.width is None:
      raise CommandError(f"--init_image {path} is {image.width}×{image.height}: {e} Pass --height and --width to "
                         "resize it.") from e
    raise
  return np.asarray(image), height, width


def slug(text: str, max_chars: int = 48) -> str:
  """A file-name-safe version of a prompt: lowercase ASCII letters and digits joined by "_"."""
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_chars].rstrip("_") or "image"


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  _check_flags(args, parser)
  try:
    prompts = _read_prompts(args)
    pipe = _load_pipeline(args)
    config = pipe.sampler_config(args.sampler, args.eta)
    init_image, height, width = None, args.height, args.width
    if args.init_image is not None:
      init_image, height, width = _load_init_image(args, pipe)
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    start = time.time()
    images = pipe.generate(prompts, negative_prompt=args.negative_prompt, num_images=args.num_images,
                           steps=args.steps, guidance=args.guidance, seed=args.seed, height=height, width=width,
                           eta=args.eta, batch_size=args.batch_size, sampler=args.sampler,
                           guidance_rescale=args.guidance_rescale, init_image=init_image, strength=strength,
                           progress=True)
    seconds = time.time() - start
  except (CommandError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from e

  out = epath.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = []
  for i, image in enumerate(images):
    names.append(f"{i:04d}_{slug(prompts[i // args.num_images])}.png")
    images_lib.save_png(image, out / names[-1])
  images_lib.save_png(images_lib.prompt_grid(images, prompts, args.num_images), out / "grid.png")
  settings = {
      "model": str(args.workdir or args.pretrained), "prompts": prompts, "negative_prompt": args.negative_prompt,
      "num_images": args.num_images, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
      "guidance_rescale": args.guidance_rescale, "eta": args.eta, "seed": args.seed,
      "height": int(images.shape[1]), "width": int(images.shape[2]), "batch_size": args.batch_size,
      "init_image": args.init_image, "strength": strength if args.init_image is not None else None,
      "dtype": args.dtype, "scheduler": dataclasses.asdict(config), "seconds": round(seconds, 2), "images": names,
  }
  (out / "settings.json").write_text(json.dumps(settings, indent=2))
  print(f"wrote {len(names)} images, grid.png and settings.json to {out} ({seconds:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
