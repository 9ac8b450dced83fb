"""Weights in and out of sd_jax.

  python -m sd_jax.convert --from_diffusers DIR --out OUT [--variant fp16] [--allow_pickle]
  python -m sd_jax.convert --from_single_file v1-5-pruned-emaonly.safetensors --out OUT
  python -m sd_jax.convert --from_single_file v2-1_768-ema-pruned.safetensors --out OUT \\
      --image_size 768 --prediction_type v_prediction
  python -m sd_jax.convert --to_diffusers OUT --out DIFFUSERS_DIR
  python -m sd_jax.convert --base MODEL --merge_lora my_dog.safetensors:0.8 [--embedding learned_embeds.safetensors] \\
      --out MERGED        # a LoRA (and new tokens) merged into a copy of MODEL (any of the forms above)

OUT is an sd_jax model directory (see sd_jax/weights/store.py): load it in Python with
`sd_jax.weights.model_dir.load_model(OUT)`, or fine-tune its U-Net with `--config.init_from=OUT/unet`.
Only safetensors are read unless --allow_pickle is given (pickle files can run code when loaded).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("from_diffusers", None, "A diffusers Stable Diffusion directory to import.")
flags.DEFINE_string("from_single_file", None, "An original single-file SD 1.x/2.x checkpoint to import.")
flags.DEFINE_string("to_diffusers", None, "An sd_jax model directory to export in the diffusers layout.")
flags.DEFINE_string("base", None, "With --merge_lora / --embedding: the model they are merged into (an sd_jax model "
                    "directory, a training workdir, a diffusers directory or a single file; not modified).")
flags.DEFINE_multi_string("merge_lora", [], "A LoRA file to merge, FILE or FILE:SCALE (repeatable).")
flags.DEFINE_multi_string("embedding", [], "A textual-inversion file whose tokens are added (repeatable).")
flags.DEFINE_string("out", None, "Output directory (must not already hold a model).")
flags.DEFINE_string("variant", None, "diffusers weight variant to read, e.g. fp16.")
flags.DEFINE_bool("allow_pickle", False, "Also read pickle-based .bin/.ckpt files. Only for files you trust.")
flags.DEFINE_integer("image_size", None, "Single file, SD 2.x: 512 (base) or 768 (v-prediction model).")
flags.DEFINE_enum("prediction_type", None, ["epsilon", "v_prediction"], "Single file: the model's objective.")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sources = [f for f in ("from_diffusers", "from_single_file", "to_diffusers", "base") if FLAGS[f].value]
  if len(sources) != 1:
    raise app.UsageError("Give exactly one of --from_diffusers, --from_single_file, --to_diffusers, --base (with "
                         "--merge_lora / --embedding).")
  if FLAGS.base and not (FLAGS.merge_lora or FLAGS.embedding):
    raise app.UsageError("--base: give the --merge_lora FILE[:SCALE] and/or --embedding FILE to merge into it.")
  import os  # pylint: disable=import-outside-toplevel
  from sd_jax.weights import model_dir as model_dir_lib
  from sd_jax.weights import store  # pylint: disable=import-outside-toplevel
  created = not os.path.exists(FLAGS.out)  # a failed conversion removes the --out it created, and only that
  try:
    if FLAGS.from_diffusers:
      done = model_dir_lib.import_diffusers(FLAGS.from_diffusers, FLAGS.out, variant=FLAGS.variant,
                                       allow_pickle=FLAGS.allow_pickle)
    elif FLAGS.from_single_file:
      done = model_dir_lib.import_single_file(FLAGS.from_single_file, FLAGS.out, image_size=FLAGS.image_size,
                                         prediction_type=FLAGS.prediction_type, allow_pickle=FLAGS.allow_pickle)
    elif FLAGS.to_diffusers:
      done = model_dir_lib.export_diffusers(FLAGS.to_diffusers, FLAGS.out)
    else:
      from sd_jax import cli  # pylint: disable=import-outside-toplevel
      done = model_dir_lib.merge_adapters(FLAGS.base, FLAGS.out, loras=[cli.parse_lora_flag(f) for f in
                                                                         FLAGS.merge_lora],
                                          embeddings=FLAGS.embedding, allow_pickle=FLAGS.allow_pickle)
  except BaseException as e:
    if created and os.path.exists(FLAGS.out):
      store.remove_tree(FLAGS.out)
    if not isinstance(e, (ValueError, FileNotFoundError, FileExistsError, KeyError, NotImplementedError)):
      raise
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {', '.join(done)} to {FLAGS.out}")


if __name__ == "__main__":
  from sd_jax import cli
  cli.run_app(main)  # app.run(main), with the --help and error format of every sd_jax command
