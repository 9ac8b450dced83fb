"""Text-to-image and image-to-image with a trained or imported Stable Diffusion: `python -m sd_jax.sample`.

  python -m sd_jax.sample --workdir workdirs/shapes_ldm --prompt "a red circle" "a blue square" --num_images 4 \\
      --steps 25 --sampler dpmpp_2m --guidance 4 --out /tmp/samples
  python -m sd_jax.sample --pretrained sd15 --prompts_file prompts.txt --negative_prompt "blurry" --out /tmp/s
  python -m sd_jax.sample --pretrained sd15 --prompt "a watercolour fox" --init_image fox.png --strength 0.6 \\
      --out /tmp/img2img
  python -m sd_jax.sample --pretrained stable-diffusion-v1-5 --lora my_dog.safetensors:0.8 \\
      --embedding learned_embeds.safetensors --prompt "a photo of sks dog" --out /tmp/dog

--workdir takes a finished ldm run (its WORKDIR/export: the EMA U-Net with the VAE and text tower it was trained
with) or a fine-tune run (its base with its LoRA and embeddings); --pretrained an sd_jax model directory, a diffusers
directory or an original single .safetensors file (the last two converted once into a cache, ~/.cache/sd_jax/
converted). --lora FILE[:SCALE] (diffusers, PEFT or kohya files; repeatable) and --embedding FILE (textual inversion,
diffusers or A1111) apply adapters to any base. The command writes OUT/0000_<prompt>.png, ... (num_images per
prompt, prompt-major), OUT/grid.png (the images under their prompts) and OUT/settings.json (every setting, the
resolved scheduler and the file names).

The library behind it is sd_jax/generate.py (`TextToImage`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from typing import Sequence

import numpy as np
from absl import flags
from etils import epath

from sd_jax import cli
from sd_jax import generate
from sd_jax import images as images_lib
from sd_jax.weights import model_dir as model_dir_lib

SAMPLER_NAMES = generate.SAMPLER_NAMES
DEFAULT_SAMPLER = generate.DEFAULT_SAMPLER
DEFAULT_STRENGTH = generate.DEFAULT_STRENGTH


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------


class CommandError(Exception):
  """A problem with the command's inputs: printed as `error: ...`, exit status 1."""


def _command() -> cli.Command:
  """The command's flags, on a FlagValues of its own (sd_jax/cli.py: one per call)."""
  cmd = cli.Command("python -m sd_jax.sample", __doc__)
  fv = cmd.flags
  flags.DEFINE_string("workdir", None, "A finished ldm or fine-tune run: samples its export/ (the EMA U-Net with its "
                      "VAE and text tower; a fine-tune's base with its LoRA and embeddings).", flag_values=fv)
  flags.DEFINE_string("pretrained", None, "A model: an sd_jax model directory, a diffusers directory or an original "
                      "single .safetensors file (the last two converted once, into a cache).", flag_values=fv)
  flags.DEFINE_multi_string("lora", [], "A LoRA file to apply, FILE or FILE:SCALE (diffusers, PEFT or kohya layout; "
                            "repeatable: several add up).", flag_values=fv)
  flags.DEFINE_multi_string("embedding", [], "A textual-inversion file whose tokens the prompts may use (diffusers' "
                            "learned_embeds.safetensors or A1111's; repeatable).", flag_values=fv)
  flags.DEFINE_bool("allow_pickle", False, "Also read pickle-based .ckpt / .bin / .pt files (they can run code: only "
                    "files you trust).", flag_values=fv)
  flags.DEFINE_multi_string("prompt", None, "One or more prompts: --prompt A B, or --prompt A --prompt B",
                            flag_values=fv)
  flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line (blank lines are skipped).",
                      flag_values=fv)
  flags.DEFINE_string("negative_prompt", "", "What guidance steers away from.", flag_values=fv)
  flags.DEFINE_integer("num_images", 1, "Images per prompt.", flag_values=fv)
  flags.DEFINE_integer("steps", 50, "Sampler steps.", flag_values=fv)
  cli.DEFINE_choice("sampler", DEFAULT_SAMPLER, SAMPLER_NAMES, "The update rule; the schedule (spacing, prediction "
                    "type) comes from the model's scheduler config.", flag_values=fv)
  flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale.", flag_values=fv)
  flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale φ in [0, 1], Lin et al. 2023 (0 = off).",
                     flag_values=fv)
  flags.DEFINE_float("eta", 0.0, "DDIM η (ddim only).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  flags.DEFINE_integer("height", None, "Image height in pixels (default: the model's, or the init image's).",
                       flag_values=fv)
  flags.DEFINE_integer("width", None, "Image width in pixels (default: the model's, or the init image's).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Images per compiled call (default: all at once).", flag_values=fv)
  flags.DEFINE_string("init_image", None, "img2img: the image to start from (resized to --height/--width when they "
                      "are given).", flag_values=fv)
  flags.DEFINE_float("strength", None, f"img2img: fraction of the schedule run, in (0, 1] (default: "
                     f"{DEFAULT_STRENGTH}).", flag_values=fv)
  cli.DEFINE_choice("dtype", "float32", ("float32", "bfloat16", "float16"), "Compute dtype of the networks.",
                    flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (created; files are overwritten).", flag_values=fv)
  cmd.one_of("workdir", "pretrained", required=True)
  cmd.several_values("prompt")
  cmd.one_of("prompt", "prompts_file", required=True)
  cmd.require("out")
  return cmd


def _check_flags(args, cmd: cli.Command) -> None:
  """Exits via `cmd.error` (status 1) on flag values the command cannot use."""
  positive = {"--num_images": args.num_images, "--steps": args.steps, "--batch_size": args.batch_size,
              "--height": args.height, "--width": args.width}
  for flag, value in positive.items():
    if value is not None and value < 1:
      cmd.error(f"{flag}={value}: must be >= 1.")
  if args.strength is not None:
    if args.init_image is None:
      cmd.error("--strength is an img2img setting: give --init_image too.")
    if not 0.0 < args.strength <= 1.0:
      cmd.error(f"--strength={args.strength}: must be in (0, 1] (the fraction of the schedule run).")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    cmd.error(f"--guidance_rescale={args.guidance_rescale}: must be in [0, 1].")
  if args.eta < 0 or (args.eta != 0 and args.sampler != "ddim"):
    cmd.error(f"--eta={args.eta} with --sampler={args.sampler}: η is DDIM's noise level, >= 0 and only for "
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
    model_dir = model_dir_lib.resolve_model(args.pretrained, what="--pretrained", allow_pickle=args.allow_pickle)
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
  """The command (argv: its flags, without the program name; default sys.argv[1:]). Returns 0; exits 1 on bad
  flags, 1 on bad inputs (a missing model, an empty prompts file, ...)."""
  cmd = _command()
  args = cmd.parse(argv)
  _check_flags(args, cmd)
  try:
    prompts = _read_prompts(args)
    pipe = _load_pipeline(args)
    for item in args.lora:
      path, scale = cli.parse_lora_flag(item)
      pipe.with_lora(path, scale, allow_pickle=args.allow_pickle)
    for path in args.embedding:
      pipe.with_embeddings(path, allow_pickle=args.allow_pickle)
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
  except (CommandError, ValueError, FileNotFoundError, FloatingPointError) as e:
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
      "model": str(args.workdir or args.pretrained), "lora": list(args.lora), "embedding": list(args.embedding),
      "prompts": prompts, "negative_prompt": args.negative_prompt,
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
  from sd_jax import machine
  machine.reexec_with_hugepage_malloc()  # large CPU buffers in huge pages (sd_jax/machine.py)
  machine.use_every_core()  # a CPU-only machine: one JAX device per core (sd_jax/machine.py)
  sys.exit(main())
