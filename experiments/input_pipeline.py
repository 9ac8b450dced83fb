"""How fast the input pipeline feeds an accelerator, per source and grain worker count (BENCHMARKS.md).

  python -m experiments.input_pipeline [--num_images=256] [--batch=32] [--workers=0,1,2] [--out=FILE.json]

Builds three sources in a temporary directory and reads training batches from each through sd_jax's own
iterators (sd_jax/data/input_pipeline.py, precomputed.py), as the trainers do:

  folder        JPEG files (768×576, quality 90: the size of a typical web image) with metadata.jsonl captions,
                decoded, resized to the short side, centre-cropped to 512² (and 256²), captions tokenized (a CLIP
                BPE tokenizer, sd_jax/data/tokenizer.py, trained on the captions: 1,024 merges, not CLIP's 49,408).
  tfds          the built-in shapes data at 512², stored by TFDS as array_record with PNG-encoded images (the
                format `name=shapes` / `name=tfds` read), decoded, tokenized.
  precomputed   VAE posteriors (64×64×4 mean and log-variance, float16) and CLIP-L contexts (77×768, float16) of
                512² images, as the ldm trainer's `ldm.precompute_dir` stores them (memory-mapped .npy).

For each, after two warm-up batches, the wall time of the next batches gives images/s, and the CPU time of the
process and its live grain workers over those batches (from /proc) per image gives the host cores one
accelerator needs at a given rate:
cores = images/s per accelerator × CPU-seconds per image. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from sd_jax.data import input_pipeline, precomputed, tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 256, "Images in the JPEG folder and the shapes split.")
flags.DEFINE_integer("batch", 32, "Global batch size (one process).")
flags.DEFINE_integer("batches", 16, "Timed batches after 2 warm-up batches.")
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker processes (dataset.num_workers) to try.")
flags.DEFINE_string("out", "", "Also write the results as JSON here.")

WORDS = ("red", "blue", "green", "large", "small", "circle", "square", "dog", "cat", "tree", "house", "under", "a",
         "photo", "of", "the", "sky", "beside", "painting", "bright")


def cpu_seconds() -> float:
  """CPU time of this process and of its live descendants (grain's workers), read from /proc while they run, so
  that their start-up (spawning, imports) before the timed window is not counted."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  total = own.ru_utime + own.ru_stime
  ticks = os.sysconf("SC_CLK_TCK")
  for pid in _descendants(os.getpid()):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    except (OSError, IndexError, ValueError):
      pass  # it ended
  return total


def _descendants(pid: int) -> list[int]:
  found, todo = [], [pid]
  while todo:
    parent = todo.pop()
    children = []
    for task in (os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []):
      try:  # each thread's children: a process started from any thread of the parent
        with open(f"/proc/{parent}/task/{task}/children") as f:
          children += [int(c) for c in f.read().split()]
      except OSError:
        pass
    found += children
    todo += children
  return found


def make_folder(path: str, n: int, seed: int = 0) -> list[str]:
  """n JPEGs of 768×576: smooth colour fields plus noise (a photo's entropy, roughly), and their captions."""
  rng = np.random.default_rng(seed)
  os.makedirs(path, exist_ok=True)
  yy, xx = np.mgrid[0:576, 0:768].astype(np.float32)
  captions = []
  with open(os.path.join(path, "metadata.jsonl"), "w") as meta:
    for i in range(n):
      f = rng.uniform(0.005, 0.03, (3, 2))
      phase = rng.uniform(0, 6.3, 3)
      image = np.stack([np.sin(xx * f[c, 0] + yy * f[c, 1] + phase[c]) for c in range(3)], -1) * 90 + 128
      image += rng.normal(0, 12, image.shape)
      Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(path, f"{i}.jpg"), quality=90)
      caption = " ".join(rng.choice(WORDS, rng.integers(4, 12)))
      captions.append(caption)
      meta.write(json.dumps({"file_name": f"{i}.jpg", "text": caption}) + "\n")
  return captions


def make_precomputed(path: str, n: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)

  def batches():
    for start in range(0, n, 64):
      b = min(64, n - start)
      yield {"image": np.zeros((b, 1), np.float32), "tokens": rng.integers(0, 49408, (b, 77)).astype(np.int32)}

  def encode(batch):
    b = len(batch["tokens"])
    return {"latent_mean": rng.standard_normal((b, 64, 64, 4), np.float32),
            "latent_logvar": rng.standard_normal((b, 64, 64, 4), np.float32),
            "context": rng.standard_normal((b, 77, 768), np.float32)}

  precomputed.write_split(path, "train", batches(), encode, num_examples=n, fingerprint={"bench": True},
                          dtype="float16")


def measure(make_iterator, batch: int, batches: int) -> dict[str, float]:
  it = make_iterator()
  try:
    for _ in range(2):
      next(it)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
      next(it)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
  finally:
    if hasattr(it, "close"):
      it.close()
  images = batch * batches
  return {"images_per_s": images / wall, "cpu_s_per_image": cpu / images, "wall_s": wall}


def main(argv):
  del argv
  results = []
  with tempfile.TemporaryDirectory(prefix="sd_jax_input_bench_") as tmp:
    t0 = time.perf_counter()
    captions = make_folder(os.path.join(tmp, "folder"), FLAGS.num_images)
    tok_dir = os.path.join(tmp, "tokenizer")
    tokenizer.train_tokenizer(captions * 4, tok_dir, vocab_size=1024)
    make_precomputed(os.path.join(tmp, "latents"), FLAGS.num_images)
    os.environ["SD_JAX_DATA_DIR"] = os.path.join(tmp, "tfds")
    shapes = input_pipeline.default_config()
    shapes.update(name="shapes", shapes_config=f"r512-train{FLAGS.num_images}-test16", resolution=512,
                  tokenizer=tok_dir, max_text_len=77)
    next(input_pipeline.create_iterator(shapes, split="train", global_batch_size=1, seed=0))  # builds the data
    print(f"sources built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def pipeline_iterator(cfg):
      return lambda: input_pipeline.create_iterator(cfg, split="train", global_batch_size=FLAGS.batch, seed=0)

    for workers in (int(w) for w in FLAGS.workers):
      for resolution in (512, 256):
        folder = input_pipeline.default_config()
        folder.update(name="folder", folder=os.path.join(tmp, "folder"), resolution=resolution, tokenizer=tok_dir,
                      max_text_len=77, num_workers=workers)
        results.append({"source": f"JPEG folder 768×576 → {resolution}²", "workers": workers,
                        **measure(pipeline_iterator(folder), FLAGS.batch, FLAGS.batches)})
        print(json.dumps(results[-1]), file=sys.stderr)
      tfds_cfg = shapes.copy_and_resolve_references()
      tfds_cfg.num_workers = workers
      results.append({"source": "TFDS array_record (shapes, PNG) 512²", "workers": workers,
                      **measure(pipeline_iterator(tfds_cfg), FLAGS.batch, FLAGS.batches)})
      print(json.dumps(results[-1]), file=sys.stderr)
    results.append({"source": "precomputed latents + contexts (float16)", "workers": 0, **measure(
        lambda: precomputed.create_iterator(os.path.join(tmp, "latents"), split="train",
                                            global_batch_size=FLAGS.batch, seed=0), FLAGS.batch, FLAGS.batches)})
    print(json.dumps(results[-1]), file=sys.stderr)

  print("| source | grain workers | images/s | CPU ms per image | host cores per accelerator at 140 / 185 img/s |")
  print("|---|---|---|---|---|")
  for r in results:
    cores = [rate * r["cpu_s_per_image"] for rate in (140, 185)]
    print(f"| {r['source']} | {r['workers']} | {r['images_per_s']:.0f} | {r['cpu_s_per_image'] * 1e3:.2f} | "
          f"{cores[0]:.1f} / {cores[1]:.1f} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
