"""Evaluate a text-to-image model on a dataset split: `python -m sd_jax.evaluate`.

  python -m sd_jax.evaluate --workdir workdirs/full/ldm --metrics fd_clip,clip_score,shapes_accuracy \\
      --num_samples 1000 --sampler dpmpp_2m --steps 20
  python -m sd_jax.evaluate --workdir workdirs/full/ldm --metrics shapes_accuracy --split compositional \\
      --num_samples 1000 --sampler ddim --steps 50
  python -m sd_jax.evaluate --workdir W --metrics fid,kid --inception_weights pt_inception-2015-12-05-6726825d.pth \\
      --num_samples 5000 --sampler euler_a --steps 30
  python -m sd_jax.evaluate --pretrained MODEL_DIR --dataset name=tfds --dataset tfds_name=coco_captions \\
      --dataset text_key=captions.text --split validation --metrics clip_score --clip CLIP_EXPORT --out r.json

What it does:
  1. Prompts: the captions of the first N = --num_samples examples of --split (the dataset of the ldm run's
     config.json, with --dataset KEY=VALUE overrides; for --pretrained the --dataset keys alone), or the first N
     lines of --prompts_file. Every prompt gets one image.
  2. Images: `sd_jax.generate.TextToImage.generate` with --sampler / --steps / --guidance / --seed, --batch_size images
     per compiled call (image i's noise from fold_in(PRNGKey(seed), i), as `python -m sd_jax.sample`: the same
     flags give the same images), at the model's resolution (the U-Net's sample_size × the VAE's factor).
  3. Metrics (--metrics, comma-separated):
       fid, kid         Fréchet / kernel (KID) distance of Inception-v3 pool features (sd_jax/eval/fid.py) between
                        the generated images and the first M = --num_reference (default N) real images of the same
                        split, resized to the model's resolution. Needs pytorch-fid's weights file
                        (--inception_weights); without it they are an error, never silently replaced.
       fd_clip, kd_clip the same two distances on the projected image embedding of a CLIP image tower (--clip):
                        a different metric on a different scale from FID, hence its own name.
       clip_score       mean over pairs of 100 · max(cos(image embedding, prompt embedding), 0) with that CLIP
                        (sd_jax/eval/clip_score.py).
       shapes_accuracy  the fraction of images showing every shape their prompt names, colour and kind (the shapes
                        evaluator, sd_jax/eval/shapes_eval.py; shapes captions only).
     Reference statistics are cached in --stats_cache, keyed by dataset (its name, config and data dir), split,
     resolution, M and the feature network's weights (a hash of them), so later evaluations read them instead of
     the data.
  4. Output: a JSON object (--out; default WORKDIR/eval/<metrics>_<sampler>_<steps>.json, with _<split> added for
     a split other than the run's eval split) holding every metric at the top level (with kid_std / kd_clip_std),
     "settings" (every flag, resolved), "reference" (cache file per feature space, and whether it was read) and
     "timing". With --workdir it also appends a row to WORKDIR/metrics.jsonl and TensorBoard at the run's final
     step: eval_fid, eval_kid, eval_fd_clip, eval_kd_clip, eval_clip_score (suffixed _<split> for a split other
     than the run's eval split), eval_shapes_acc_<split> (the key the ldm trainer logs), and eval_settings (a
     string describing the sampler, steps, guidance, number of samples and split).

The CLIP (--clip): an sd_jax CLIP export (a CLIP run's WORKDIR/export, with its clip/ and tokenizer/); by default,
for a workdir whose text tower came from such an export (config ldm.text_from, e.g. the shapes pipeline's
WORKDIR/../clip/export), that one. Its images are normalized as sd_jax's CLIP trainer trains (--clip_normalization
sd_jax); use openai for imported OpenAI / OpenCLIP weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags
from etils import epath

from sd_jax import cli
from sd_jax.data import input_pipeline
from sd_jax.diffusion import samplers

FD_METRICS = {"fid": "inception", "fd_clip": "clip"}  # Fréchet distances: metric -> feature space
KD_METRICS = {"kid": "inception", "kd_clip": "clip"}  # kernel distances (KID): metric -> feature space
METRICS = ("fid", "kid", "fd_clip", "kd_clip", "clip_score", "shapes_accuracy")
CLIP_NORMALIZATIONS = ("sd_jax", "openai")
RESULT_FORMAT = 1  # bump when the JSON layout changes meaning


class CommandError(Exception):
  """A problem with the command's inputs: printed as `error: ...`, exit status 1."""


# ----------------------------------------------------------------------------------------------------------------
# The run, its dataset and prompts


@dataclasses.dataclass
class RunInfo:
  """What an ldm workdir says about itself (config.json, metrics.jsonl)."""
  workdir: epath.Path
  config: dict[str, Any]  # config.json ({} if absent)
  final_step: int  # the last training step logged (config total_steps if nothing was logged)

  @property
  def dataset(self) -> dict[str, Any] | None:
    return dict(self.config["dataset"]) if "dataset" in self.config else None

  def text_from(self) -> epath.Path | None:
    """The run's ldm.text_from, resolved (absolute, or relative to the current or the repository directory)."""
    text_from = self.config.get("ldm", {}).get("text_from")
    if not text_from:
      return None
    path = epath.Path(os.path.expanduser(text_from))
    if path.exists() or path.is_absolute():
      return path
    repo = epath.Path(__file__).parent.parent
    return repo / path if (repo / path).exists() else path


def read_run(workdir) -> RunInfo:
  """The ldm run at `workdir`: its config.json and the last step it logged."""
  from sd_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  workdir = epath.Path(workdir)
  if not workdir.is_dir():
    raise CommandError(f"--workdir {workdir} does not exist.")
  config_file = workdir / "config.json"
  config = json.loads(config_file.read_text()) if config_file.exists() else {}
  if config and config.get("trainer") not in (None, "ldm"):
    raise CommandError(f"--workdir {workdir} is a {config['trainer']!r} run; evaluation draws images with an ldm "
                       "run's export (WORKDIR/export), or pass --pretrained MODEL_DIR.")
  steps = [int(r["step"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r and "step" in r]
  final_step = max(steps) if steps else int(config.get("total_steps", 0))
  return RunInfo(workdir=workdir, config=config, final_step=final_step)


def _parse_value(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise CommandError(f"--dataset {key}={text}: expected true or false.")
    return text.lower() in ("true", "1")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise CommandError(f"--dataset {key}={text}: expected an integer.") from None
  return text


def dataset_config(base: Mapping[str, Any] | None, overrides: Sequence[str]) -> dict[str, Any]:
  """`base` (a run's config.dataset, else the input pipeline's defaults) with KEY=VALUE overrides, set up for
  reading real images and captions in order: no tokens, no precomputed latents."""
  defaults = input_pipeline.default_config().to_dict()
  dataset = {**defaults, **dict(base or {})}
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise CommandError(f"--dataset {item!r}: use KEY=VALUE with KEY one of {sorted(defaults)} (sd_jax/data/"
                         "pipeline.py documents them).")
    dataset[key] = _parse_value(key, value, defaults[key])
  dataset["tokenizer"] = ""  # captions are read as text; images are all the metrics need
  dataset["precomputed_dir"] = ""
  try:
    input_pipeline.validate_config(dataset)
  except ValueError as e:
    raise CommandError(f"--dataset: {e}") from e
  return dataset


def dataset_cache_key(dataset: Mapping[str, Any]) -> str:
  """Names the images of a dataset config in the reference-statistics cache: its name, the config that picks the
  images (shapes config / TFDS name / folder, feature key, crop, data dir) and a hash of those settings."""
  which = {"shapes": dataset.get("shapes_config"), "tfds": dataset.get("tfds_name"),
           "folder": os.path.basename(os.path.normpath(str(dataset.get("folder") or "")))}.get(dataset["name"], "")
  picked = {k: dataset.get(k) for k in ("name", "shapes_config", "tfds_name", "folder", "image_key", "crop",
                                         "skip_corrupt")}
  picked["data_dir"] = os.path.abspath(os.path.expanduser(dataset.get("data_dir") or
                                                          input_pipeline.default_data_dir()))
  digest = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:10]
  return f"{dataset['name']}_{which}_{digest}" if which else f"{dataset['name']}_{digest}"


def split_prompts(dataset: Mapping[str, Any], split: str, count: int) -> list[str]:
  """The captions of the first `count` examples of `split` (an error if it has fewer)."""
  info = _split_info(dataset, split)
  if count > info.num_examples:
    raise CommandError(f"--num_samples={count}, but split {split!r} has only {info.num_examples} examples (one "
                       f"prompt per example): use --num_samples {info.num_examples} or less.")
  return [info.captions(i) for i in range(count)]


def _split_info(dataset: Mapping[str, Any], split: str) -> input_pipeline.DatasetInfo:
  try:
    return input_pipeline.dataset_info(dataset, split)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CommandError(f"--split {split}: cannot read it from dataset {dataset['name']!r}: {e}") from e


def file_prompts(path, count: int) -> list[str]:
  """The first `count` non-blank lines of a prompts file."""
  path = epath.Path(path)
  if not path.is_file():
    raise CommandError(f"--prompts_file {path} does not exist.")
  prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if len(prompts) < count:
    raise CommandError(f"--prompts_file {path} has {len(prompts)} prompts but --num_samples={count}; one image is "
                       "drawn per prompt.")
  return prompts[:count]


def real_image_batches(dataset: Mapping[str, Any], split: str, batch_size: int, *, total: int | None = None,
                       label: str = "real images") -> Iterator[np.ndarray]:
  """float32 [B, H, W, 3] in [-1, 1] batches of `split`, in order, at dataset["resolution"], with a progress line
  per batch. Opens the data only when iterated."""
  it = input_pipeline.create_iterator(dataset, split=split, global_batch_size=batch_size, seed=0, train=False,
                                     process_index=0, process_count=1)
  seen, start = 0, time.time()
  try:
    for b, batch in enumerate(it):
      images = batch["image"]
      seen += len(images)
      shown = min(seen, total) if total else seen
      print(f"  {label}: batch {b + 1}, {shown}{f'/{total}' if total else ''} images ({time.time() - start:.0f} s)",
            flush=True)
      yield images
  finally:
    it.close()


def real_images(dataset: Mapping[str, Any], split: str, count: int, batch_size: int = 64) -> np.ndarray:
  """uint8 [count, H, W, 3]: the first `count` images of `split` (what the reference statistics are of)."""
  from sd_jax import images as images_lib  # pylint: disable=import-outside-toplevel
  out, have = [], 0
  for batch in real_image_batches(dataset, split, batch_size, total=count):
    out.append(images_lib.to_uint8(batch[:count - have]))
    have += len(out[-1])
    if have >= count:
      break
  if have < count:
    raise CommandError(f"split {split!r} has only {have} images; asked for {count}.")
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------------------
# Scorers


def parse_metrics(text: str) -> tuple[str, ...]:
  names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
  unknown = [m for m in names if m not in METRICS]
  if unknown or not names:
    raise ValueError(f"--metrics={text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; use a "
                     f"comma-separated subset of {', '.join(METRICS)}.")
  return names


def feature_spaces(metrics: Sequence[str]) -> dict[str, bool]:
  """{feature space ("inception" / "clip"): whether its features must be kept (a kernel distance is asked)}."""
  spaces: dict[str, bool] = {}
  for m in metrics:
    if m in FD_METRICS:
      spaces.setdefault(FD_METRICS[m], False)
    if m in KD_METRICS:
      spaces[KD_METRICS[m]] = True
  return spaces


def _tree_fingerprint(tree: Any) -> str:
  """sha256 over the leaves (path, dtype, shape, bytes) of a parameter tree."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _file_fingerprint(path) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


@dataclasses.dataclass
class Scorers:
  """The networks the asked metrics need, loaded once."""
  metrics: tuple[str, ...]
  extractors: dict[str, Any] = dataclasses.field(default_factory=dict)  # feature space -> fid.FeatureExtractor
  # feature space -> its weights (a hash; with the CLIP's normalization): names its cache subdirectory
  fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
  keep_features: dict[str, bool] = dataclasses.field(default_factory=dict)  # feature space -> KID asked
  clip: tuple[Any, Any] | None = None  # (CLIPModel, params)
  clip_tokenizer: Any = None
  clip_normalization: str = "sd_jax"
  shapes_evaluator: Any = None


def load_clip(clip_dir) -> tuple[Any, Any, Any]:
  """(CLIPModel, params, tokenizer) of an sd_jax CLIP export (clip/ and tokenizer/)."""
  from sd_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from sd_jax.weights import clip as clip_weights  # pylint: disable=import-outside-toplevel
  clip_dir = epath.Path(clip_dir)
  if not (clip_dir / clip_weights.CLIP_COMPONENT / "config.json").exists():
    hint = (f" It looks like a training workdir: use {clip_dir / 'export'}."
            if (clip_dir / "export" / clip_weights.CLIP_COMPONENT).exists() else "")
    raise CommandError(f"--clip {clip_dir} holds no two-tower CLIP ({clip_weights.CLIP_COMPONENT}/config.json): "
                       f"pass a CLIP run's WORKDIR/export (config clip.export_clip=True).{hint}")
  if not (clip_dir / "tokenizer" / "vocab.json").exists():
    raise CommandError(f"--clip {clip_dir} has no tokenizer/vocab.json: the CLIP's own tokenizer is needed for "
                       "clip_score.")
  model, params = clip_weights.load_exported_clip(clip_dir)
  tokenizer = tokenizer_lib.load_clip_tokenizer(str(clip_dir / "tokenizer"),
                                                max_length=model.config.text.max_position_embeddings)
  return model, params, tokenizer


def build_scorers(metrics: Sequence[str], *, inception_weights=None, clip_dir=None,
                  clip_normalization: str = "sd_jax", shapes_evaluator_dir=None, batch_size: int = 50) -> Scorers:
  """Loads what `metrics` need: the Inception (fid, kid), a CLIP (fd_clip, kd_clip, clip_score), the shapes
  evaluator (shapes_accuracy). Raises CommandError naming the missing flag."""
  from sd_jax.eval import fid as fid_lib  # pylint: disable=import-outside-toplevel
  metrics = tuple(metrics)
  scorers = Scorers(metrics=metrics, clip_normalization=clip_normalization)
  spaces = feature_spaces(metrics)
  if "inception" in spaces:
    if not inception_weights:
      asked = [m for m in metrics if FD_METRICS.get(m) == "inception" or KD_METRICS.get(m) == "inception"]
      raise CommandError(f"--metrics {','.join(asked)} needs the Inception weights of FID: pass "
                         "--inception_weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth), or ask for "
                         "fd_clip / kd_clip instead (the same distances on CLIP image features, reported under their "
                         "own names, never as FID).")
    try:
      scorers.extractors["inception"] = fid_lib.inception_extractor(inception_weights, batch_size=batch_size)
    except (FileNotFoundError, ValueError) as e:
      raise CommandError(f"--inception_weights {inception_weights}: {e}") from e
    scorers.fingerprints["inception"] = _file_fingerprint(inception_weights)[:16]
  if "clip" in spaces or "clip_score" in metrics:
    if not clip_dir:
      asked = [m for m in metrics if m in ("fd_clip", "kd_clip", "clip_score")]
      raise CommandError(f"--metrics {','.join(asked)} needs a CLIP: pass --clip DIR (an sd_jax CLIP export, a CLIP "
                         "run's WORKDIR/export).")
    model, params, tokenizer = load_clip(clip_dir)
    scorers.clip, scorers.clip_tokenizer = (model, params), tokenizer
    if "clip" in spaces:
      scorers.extractors["clip"] = fid_lib.clip_extractor(model, params, name="clip", normalization=clip_normalization,
                                                         batch_size=batch_size)
      scorers.fingerprints["clip"] = f"{clip_normalization}-{_tree_fingerprint(params)[:16]}"
  scorers.keep_features = dict(spaces)
  if "shapes_accuracy" in metrics:
    from sd_jax.eval import shapes_eval  # pylint: disable=import-outside-toplevel
    if not shapes_evaluator_dir or not (epath.Path(shapes_evaluator_dir) / shapes_eval.COMPONENT).exists():
      where = f" ({shapes_evaluator_dir} holds none)" if shapes_evaluator_dir else ""
      raise CommandError(f"--metrics shapes_accuracy needs a shapes evaluator{where}: train one once with "
                         "`python -m sd_jax.eval.shapes_eval --out DIR` and pass --shapes_evaluator DIR.")
    scorers.shapes_evaluator = shapes_eval.load_evaluator(str(shapes_evaluator_dir))
  return scorers


def check_prompts(scorers: Scorers, prompts: Sequence[str]) -> None:
  """Fails before any sampling if the shapes evaluator cannot check a prompt."""
  if scorers.shapes_evaluator is None:
    return
  from sd_jax.eval import shapes_eval  # pylint: disable=import-outside-toplevel
  for i, prompt in enumerate(prompts):
    try:
      shapes_eval.prompt_pairs(prompt)
    except ValueError as e:
      raise CommandError(f"--metrics shapes_accuracy: prompt {i} cannot be checked ({e}). It needs shapes "
                         "captions (the shapes dataset).") from e


@dataclasses.dataclass
class Reference:
  """Reference statistics of one feature space."""
  stats: Any  # fid.FeatureStats
  cache_file: str
  cached: bool  # read from the cache (no data was read)


def reference_statistics(scorers: Scorers, dataset: Mapping[str, Any], split: str, *, num_images: int,
                         resolution: int, stats_cache, batch_size: int) -> dict[str, Reference]:
  """Feature statistics of the first `num_images` real images of `split` at `resolution`, per feature space;
  read from `stats_cache` when there (see the module docstring for the key), else computed and written there."""
  from sd_jax.eval import fid as fid_lib  # pylint: disable=import-outside-toplevel
  dataset = {**dataset, "resolution": int(resolution)}
  key = dataset_cache_key(dataset)
  out = {}
  for space, extractor in scorers.extractors.items():
    cache_dir = epath.Path(stats_cache) / f"{space}-{scorers.fingerprints[space]}"
    read = []

    def batches(extractor=extractor, read=read):
      read.append(True)
      yield from real_image_batches(dataset, split, batch_size, total=num_images,
                                    label=f"reference {extractor.name} features")

    try:
      stats = fid_lib.reference_statistics(extractor, batches(), cache_dir=cache_dir, dataset=key, split=split,
                                           resolution=resolution, num_images=num_images,
                                           keep_features=scorers.keep_features[space])
    except ValueError as e:
      raise CommandError(f"reference images of split {split!r}: {e} (--num_reference={num_images})") from e
    path = fid_lib.cache_path(cache_dir, dataset=key, split=split, resolution=resolution, extractor=extractor,
                              num_images=num_images)
    print(f"reference {extractor.name} statistics of {stats.num_images} images "
          f"{'written to' if read else 'read from'} {path}", flush=True)
    out[space] = Reference(stats=stats, cache_file=str(path), cached=not read)
  return out


def score_images(images: np.ndarray, prompts: Sequence[str], scorers: Scorers, references: Mapping[str, Reference],
                 *, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                 details: dict[str, Any] | None = None) -> dict[str, float]:
  """{metric: value} of images [N, H, W, 3] (uint8, or float in [-1, 1]) drawn for `prompts`, for every metric of
  `scorers` (plus <kernel distance>_std). With `details`, also stores there what is not one number per metric:
  "shapes_breakdown" (ScoreResult.breakdown) when shapes_accuracy is scored."""
  from sd_jax.eval import clip_score as clip_score_lib  # pylint: disable=import-outside-toplevel
  from sd_jax.eval import fid as fid_lib  # pylint: disable=import-outside-toplevel
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
  results: dict[str, float] = {}
  for space, extractor in scorers.extractors.items():
    generated = fid_lib.FeatureStats.from_features(extractor(images), keep_features=scorers.keep_features[space])
    distances = fid_lib.distance_metrics(extractor, generated, references[space].stats,
                                         kid=scorers.keep_features[space], kid_subsets=kid_subsets,
                                         kid_subset_size=kid_subset_size, seed=seed)
    for metric in scorers.metrics:
      if FD_METRICS.get(metric) == space:
        results[metric] = distances[extractor.fd_metric]
      if KD_METRICS.get(metric) == space:
        results[metric] = distances[extractor.kd_metric]
        results[f"{metric}_std"] = distances[f"{extractor.kd_metric}_std"]
  if "clip_score" in scorers.metrics:
    model, params = scorers.clip
    results["clip_score"] = clip_score_lib.clip_score(model, params, images, list(prompts),
                                                      tokenizer=scorers.clip_tokenizer,
                                                      normalization=scorers.clip_normalization).score
  if "shapes_accuracy" in scorers.metrics:
    shapes = scorers.shapes_evaluator.score(images, list(prompts))
    results["shapes_accuracy"] = float(shapes.accuracy)
    if details is not None:  # where the misses are: one- vs two-shape prompts, colour / kind recall
      details["shapes_breakdown"] = shapes.breakdown()
  return {m: float(v) for m, v in results.items()}


def metric_row(results: Mapping[str, float], *, split: str, eval_split: str) -> dict[str, float]:
  """metrics.jsonl keys: eval_<metric> (+ _<split> off the run's eval split); eval_shapes_acc_<split>."""
  suffix = "" if split == eval_split else f"_{split}"
  row = {}
  for metric, value in results.items():
    if metric.endswith("_std"):
      continue
    row[f"eval_shapes_acc_{split}" if metric == "shapes_accuracy" else f"eval_{metric}{suffix}"] = value
  return row


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def generate(pipe, prompts: Sequence[str], *, sampler: str, steps: int, guidance: float, seed: int, batch_size: int,
             eta: float = 0.0) -> np.ndarray:
  """uint8 [N, H, W, 3]: one image per prompt, with a progress bar per batch."""
  return pipe.generate(list(prompts), num_images=1, steps=steps, guidance=guidance, seed=seed,
                       batch_size=batch_size, sampler=sampler, eta=eta, progress=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _command() -> cli.Command:
  """The command's flags, on a FlagValues of its own (sd_jax/cli.py: one per call)."""
  cmd = cli.Command("python -m sd_jax.evaluate", __doc__)
  fv = cmd.flags
  flags.DEFINE_string("workdir", None, "A finished ldm run: samples its export/; its config.json gives the dataset.",
                      flag_values=fv)
  flags.DEFINE_string("pretrained", None, "A model: an sd_jax model directory, a diffusers directory or a single "
                      ".safetensors file (converted once, into a cache); give --dataset and/or --prompts_file.",
                      flag_values=fv)
  flags.DEFINE_string("metrics", None, f"Comma-separated subset of {', '.join(METRICS)}.", flag_values=fv)
  flags.DEFINE_integer("num_samples", 1000, "Images drawn, one per prompt.", flag_values=fv)
  cli.DEFINE_choice("sampler", "ddim", samplers.SAMPLER_NAMES, "The sampler.", flag_values=fv)
  flags.DEFINE_integer("steps", 50, "Sampler steps.", flag_values=fv)
  flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the run's sample.guidance_scale, "
                     "else 7.5).", flag_values=fv)
  flags.DEFINE_float("eta", 0.0, "DDIM η (ddim only).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Images per compiled sampling call and per feature batch.", flag_values=fv)
  flags.DEFINE_string("split", None, "Dataset split of the prompts and reference images (default: the dataset's "
                      "eval_split, test); e.g. compositional (shapes pairs never seen in training).", flag_values=fv)
  flags.DEFINE_multi_string("dataset", [], "KEY=VALUE: a config.dataset key (sd_jax/data/input_pipeline.py), on top "
                            "of the run's dataset; with --pretrained the dataset itself, e.g. --dataset name=shapes "
                            "--dataset shapes_config=r32", flag_values=fv)
  flags.DEFINE_string("prompts_file", None, "Prompts, one per line, instead of the split's captions.", flag_values=fv)
  flags.DEFINE_integer("num_reference", None, "Real images of the split in the reference statistics (default: "
                       "--num_samples).", flag_values=fv)
  flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth: needed for "
                      "fid and kid.", flag_values=fv)
  flags.DEFINE_string("clip", None, "An sd_jax CLIP export (clip/, tokenizer/) for fd_clip, kd_clip and clip_score "
                      "(default: the run's ldm.text_from when it is one).", flag_values=fv)
  cli.DEFINE_choice("clip_normalization", "sd_jax", CLIP_NORMALIZATIONS, "Image normalization of the CLIP: sd_jax "
                    "(trained here) or openai (imported).", flag_values=fv)
  flags.DEFINE_string("shapes_evaluator", None, "Shapes evaluator (python -m sd_jax.eval.shapes_eval --out DIR) for "
                      "shapes_accuracy (default: the run's sample.shapes_evaluator, else the shared one beside the "
                      "dataset if it exists).", flag_values=fv)
  flags.DEFINE_string("stats_cache", None, "Reference statistics cache (default: ~/.cache/sd_jax/fid_stats, beside "
                      "the datasets).", flag_values=fv)
  flags.DEFINE_integer("kid_subsets", 100, "KID: number of subsets.", flag_values=fv)
  flags.DEFINE_integer("kid_subset_size", 1000, "KID: subset size.", flag_values=fv)
  flags.DEFINE_string("out", None, "The JSON result (default: WORKDIR/eval/<metrics>_<sampler>_<steps>.json, or "
                      "MODEL_DIR/eval/... for --pretrained).", flag_values=fv)
  cli.DEFINE_choice("dtype", "float32", ("float32", "bfloat16", "float16"), "Parameter dtype of the model.",
                    flag_values=fv)
  cmd.one_of("workdir", "pretrained", required=True)
  cmd.require("metrics")
  return cmd


def _check_flags(args, cmd: cli.Command) -> tuple[str, ...]:
  """The metrics --metrics names; exits via `cmd.error` (status 1) on flag values the command cannot use."""
  try:
    metrics = parse_metrics(args.metrics)
  except ValueError as e:
    cmd.error(str(e))
  for flag in ("num_samples", "steps", "batch_size", "num_reference", "kid_subsets"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      cmd.error(f"--{flag}={value}: must be >= 1.")
  if args.kid_subset_size < 2:
    cmd.error(f"--kid_subset_size={args.kid_subset_size}: must be >= 2.")
  if any(m in FD_METRICS or m in KD_METRICS for m in metrics) and args.num_samples < 2:
    cmd.error(f"--num_samples={args.num_samples}: a Fréchet / kernel distance needs at least 2 images.")
  inception = [m for m in metrics if FD_METRICS.get(m) == "inception" or KD_METRICS.get(m) == "inception"]
  if inception and not args.inception_weights:
    cmd.error(f"--metrics {','.join(inception)}: FID and KID need the Inception weights: pass --inception_weights "
              "PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth), or ask for fd_clip / kd_clip instead "
              "(the same distances on CLIP image features, reported under their own names, never as FID).")
  if args.pretrained and not args.dataset and not args.prompts_file:
    cmd.error("--pretrained: say where the prompts come from: --dataset KEY=VALUE (e.g. --dataset name=shapes) "
              "and/or --prompts_file FILE.")
  if args.eta < 0 or (args.eta != 0 and args.sampler != "ddim"):
    cmd.error(f"--eta={args.eta} with --sampler={args.sampler}: η is DDIM's noise level, >= 0 and only for "
              "--sampler=ddim.")
  return metrics


def default_out(base, metrics: Sequence[str], sampler: str, steps: int, split: str, eval_split: str) -> epath.Path:
  name = f"{'-'.join(metrics)}_{sampler}_{steps}" + ("" if split == eval_split else f"_{split}")
  return epath.Path(base) / "eval" / f"{name}.json"


def _default_clip(run: RunInfo | None) -> str | None:
  if run is None:
    return None
  text_from = run.text_from()
  if text_from is not None and (text_from / "clip" / "config.json").exists():
    return str(text_from)
  return None


def _default_shapes_evaluator(run: RunInfo | None) -> str | None:
  from sd_jax.eval import shapes_eval  # pylint: disable=import-outside-toplevel
  configured = (run.config.get("sample", {}).get("shapes_evaluator") if run is not None else None) or None
  if configured:
    return configured
  shared = shapes_eval.default_evaluator_dir()
  return shared if os.path.isdir(shared) else None


def run_evaluation(args, metrics: tuple[str, ...], argv: Sequence[str]) -> dict[str, Any]:
  """Everything after the flags are checked; returns the JSON result (also written to disk). `args`: the parsed
  flags (`_command().parse(argv)`, read as attributes named after the flags); `argv`: the command line, recorded."""
  from sd_jax import generate as generate_lib  # pylint: disable=import-outside-toplevel
  start = time.time()
  run = read_run(args.workdir) if args.workdir else None
  base_dataset = run.dataset if run is not None else None
  if run is not None and base_dataset is None and not args.dataset and not args.prompts_file:
    raise CommandError(f"--workdir {args.workdir} has no config.json naming its dataset: give --dataset KEY=VALUE "
                       "and/or --prompts_file.")
  has_dataset = base_dataset is not None or bool(args.dataset)
  dataset = dataset_config(base_dataset, args.dataset) if has_dataset else None
  eval_split = (dataset or {}).get("eval_split", "test")
  split = args.split or eval_split
  needs_references = bool(feature_spaces(metrics))
  if needs_references and dataset is None:
    raise CommandError(f"--metrics {','.join(metrics)}: the Fréchet / kernel distances compare with real images: "
                       "give the dataset with --dataset KEY=VALUE.")

  # Everything that can fail is checked before the model draws anything.
  clip_dir = args.clip or _default_clip(run)
  shapes_dir = args.shapes_evaluator or (_default_shapes_evaluator(run) if "shapes_accuracy" in metrics else None)
  num_reference = args.num_reference or args.num_samples
  feature_batch = min(args.batch_size, max(args.num_samples, num_reference))
  scorers = build_scorers(metrics, inception_weights=args.inception_weights, clip_dir=clip_dir,
                          clip_normalization=args.clip_normalization, shapes_evaluator_dir=shapes_dir,
                          batch_size=feature_batch)
  if args.prompts_file:
    prompts = file_prompts(args.prompts_file, args.num_samples)
  else:
    prompts = split_prompts(dataset, split, args.num_samples)
  check_prompts(scorers, prompts)
  if needs_references:
    available = _split_info(dataset, split).num_examples
    if num_reference > available:
      raise CommandError(f"--num_reference={num_reference} (default: --num_samples), but split {split!r} has only "
                         f"{available} images: lower it.")
  try:
    from sd_jax.weights import model_dir as model_dir_lib  # pylint: disable=import-outside-toplevel
    pipe = (generate_lib.TextToImage.from_workdir(args.workdir, dtype=args.dtype) if args.workdir
            else generate_lib.TextToImage.from_model_dir(model_dir_lib.resolve_model(args.pretrained,
                                                                                    what="--pretrained"),
                                                         dtype=args.dtype))
  except (FileNotFoundError, ValueError) as e:
    raise CommandError(f"{'--workdir' if args.workdir else '--pretrained'}: {e}") from e
  resolution = pipe.default_size()
  guidance = args.guidance
  if guidance is None:
    guidance = float(run.config.get("sample", {}).get("guidance_scale", 7.5)) if run is not None else 7.5

  references: dict[str, Reference] = {}
  if needs_references:
    print(f"=== reference statistics: first {num_reference} images of {split!r} at {resolution}×{resolution}",
          flush=True)
    references = reference_statistics(scorers, dataset, split, num_images=num_reference, resolution=resolution,
                                      stats_cache=args.stats_cache or default_stats_cache(),
                                      batch_size=feature_batch)
  print(f"=== sampling {len(prompts)} images: {args.sampler}, {args.steps} steps, guidance {guidance}, seed "
        f"{args.seed}, {args.batch_size} per batch", flush=True)
  sample_start = time.time()
  images = generate(pipe, prompts, sampler=args.sampler, steps=args.steps, guidance=guidance, seed=args.seed,
                    batch_size=min(args.batch_size, len(prompts)), eta=args.eta)
  sample_seconds = time.time() - sample_start
  print(f"=== scoring {', '.join(metrics)}", flush=True)
  score_start = time.time()
  result_extra: dict[str, Any] = {}
  results = score_images(images, prompts, scorers, references, kid_subsets=args.kid_subsets,
                         kid_subset_size=args.kid_subset_size, seed=args.seed, details=result_extra)

  base = args.workdir or args.pretrained
  out = epath.Path(args.out) if args.out else default_out(base, metrics, args.sampler, args.steps, split, eval_split)
  settings = {
      "workdir": args.workdir, "pretrained": args.pretrained, "step": run.final_step if run is not None else None,
      "metrics": list(metrics), "num_samples": args.num_samples, "sampler": args.sampler, "steps": args.steps,
      "guidance": guidance, "eta": args.eta, "seed": args.seed, "batch_size": args.batch_size, "split": split,
      "dataset": dataset, "prompts_file": args.prompts_file, "resolution": int(images.shape[1]),
      "num_reference": num_reference if needs_references else None, "inception_weights": args.inception_weights,
      "clip": clip_dir if scorers.clip is not None else None,
      "clip_normalization": args.clip_normalization if scorers.clip is not None else None,
      "shapes_evaluator": shapes_dir if scorers.shapes_evaluator is not None else None,
      "stats_cache": str(args.stats_cache or default_stats_cache()) if needs_references else None,
      "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size, "dtype": args.dtype,
      "command": shlex.join(["python", "-m", "sd_jax.evaluate", *argv]),
  }
  result = {
      **results, **result_extra, "format": RESULT_FORMAT, "settings": settings,
      "reference": {space: {"cache_file": r.cache_file, "cached": r.cached, "num_images": r.stats.num_images}
                    for space, r in references.items()},
      "timing": {"sample_seconds": round(sample_seconds, 2), "score_seconds": round(time.time() - score_start, 2),
                 "total_seconds": round(time.time() - start, 2)},
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, sort_keys=True))

  summary = ", ".join(f"{m} {v:.4g}" for m, v in results.items())
  if result_extra:
    summary += " (" + ", ".join(f"{k} {v:.3g}" for k, v in result_extra["shapes_breakdown"].items()) + ")"
  print(f"{summary}\nwrote {out}", flush=True)
  if run is not None:
    from sd_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
    row = metric_row(results, split=split, eval_split=eval_split)
    row["eval_settings"] = (f"{args.sampler} {args.steps} steps, guidance {guidance:g}, {args.num_samples} samples "
                            f"of {split}, seed {args.seed}")
    writer = metrics_lib.MetricWriter(run.workdir, enabled=jax.process_index() == 0)
    writer.write(run.final_step, row)
    writer.close()
    print(f"appended {sorted(k for k in row if k != 'eval_settings')} at step {run.final_step} to "
          f"{run.workdir / metrics_lib.METRICS_FILE}", flush=True)
  return result


def default_stats_cache() -> str:
  """~/.cache/sd_jax/fid_stats (beside the datasets: $SD_JAX_DATA_DIR/../fid_stats when that is set)."""
  return os.path.join(os.path.dirname(os.path.normpath(input_pipeline.default_data_dir())), "fid_stats")


def main(argv: Sequence[str] | None = None) -> int:
  """The command (argv: its flags, without the program name; default sys.argv[1:]). Returns 0; exits 1 on bad
  flags, 1 on bad inputs (a missing run, a split too small, ...)."""
  cmd = _command()
  argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
  args = cmd.parse(argv)
  metrics = _check_flags(args, cmd)
  try:
    run_evaluation(args, metrics, argv)
  except (CommandError, ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from e
  return 0


if __name__ == "__main__":
  from sd_jax import machine
  machine.reexec_with_hugepage_malloc()  # large CPU buffers in huge pages (sd_jax/machine.py)
  machine.use_every_core()  # a CPU-only machine: one JAX device per core (sd_jax/machine.py)
  sys.exit(main())
