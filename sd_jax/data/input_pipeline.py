"""Input pipeline: grain iterators of per-host, device-ready batches.

  it = pipeline.create_iterator(config.dataset, split="train",
                                global_batch_size=256, seed=config.seed)
  batch = next(it)   # {"image": float32 [B, H, W, 3] in [-1, 1],
                     #  "label": int32 [B]          (if dataset.label_key),
                     #  "tokens": int32 [B, L]      (if dataset.tokenizer)}
  state = it.get_state()          # JSON-serializable; it.set_state(state) resumes

B = global_batch_size // process_count. Only numeric arrays are in a batch, so it
can go straight to devices; captions (for logging or prompts) come from
`dataset_info(config.dataset, split).captions(i)`.

## `config.dataset` keys (an ml_collections ConfigDict; `default_config()`)

  name = "shapes"           "shapes" (sd_jax.data.shapes, built on first use),
                            "folder" (images + metadata.jsonl, see folder.py) or
                            "tfds" (any TFDS builder, see tfds_name).
  data_dir = ""             TFDS data dir; "" -> $SD_JAX_DATA_DIR, else
                            ~/.cache/sd_jax/tensorflow_datasets.
  resolution = 32           output images are resolution x resolution.
  train_split = "train"     split names, used by callers as `split=`; TFDS slice
  eval_split = "test"       syntax ("train[:90%]") works for shapes / tfds.
  shapes_config = "r32"     shapes builder config: a name ("r32", "r64"), a
                            derived name "r32-train64-test16-comp8-seed3" (any
                            subset of the suffixes; tiny test builds from the
                            command line), a `shapes.ShapesConfig`, or a dict of
                            `shapes.make_config` arguments.
  tfds_name = ""            name="tfds": e.g. "cifar10", "coco_captions",
                            optionally "name/config:version".
  image_key = "image"       feature path of the image ("a.b" for nested).
  text_key = "caption"      feature path of the caption ("captions.text" for
                            coco_captions: a list -> the first caption for eval,
                            a seeded random one for training); "" for none.
  label_key = ""            feature path of an integer class label ("label" for
                            cifar10); "" for none. Adds "label" to batches.
  caption_template = "a photo of a {}"
                            if text_key is "" and label_key is set, captions are
                            this template filled with the label's class name
                            (ClassLabel names from the builder; "_" -> " ").
  folder = ""               name="folder": the image folder.
  preferences = ""          name="preferences": a feedback database or a Pick-a-Pic
                            parquet file (data/preferences.py); batches carry
                            "image" (preferred) and "image_l"
  preferences_test = 0      preferences: the last N pairs are the test split
  skip_corrupt = True       folder: skip unreadable images (counted and logged);
                            False -> error naming the file.
  crop = "center"           "center" | "random" (after resizing the short side
                            to resolution; random only when train=True).
  random_flip = False       horizontal flip with probability 1/2 (train only).
  tokenizer = ""            "" -> no tokens; else a CLIP tokenizer directory
                            (vocab.json + merges.txt, see tokenizer.py).
  max_text_len = 77         token sequence length.
  precomputed_dir = ""      a directory of precomputed VAE posteriors and text
                            contexts (sd_jax/data/precomputed.py, written by
                            the ldm trainer's `ldm.precompute_dir`): batches
                            are read from it instead of the images, in the same
                            order ({"latent_mean", "latent_logvar", "context"}).
  num_workers = 0           grain worker processes (0 = in the main process).
  prefetch = 2              batches assembled ahead by threads; 0 = synchronous.

## Order, sharding and determinism

Training: the example stream is a seeded global shuffle of the split, repeated
forever with a different (still seeded) shuffle each epoch; augmentation draws
from a generator seeded by (seed, position in that stream). So the stream does
not depend on the number of hosts or workers.

Global batch s is stream positions [s*G, (s+1)*G) (G = global batch size).
Host p of P gets the p-th contiguous block of B = G/P rows of it, so
concatenating hosts 0..P-1 (host 0's rows first) gives exactly the 1-process
batch s — what `jax.make_array_from_process_local_data` assembles along a
data-sharded batch axis whose devices are ordered by process index.
Evaluation (train=False) reads the split once in order, without augmentation,
with the same block layout; the last partial global batch is kept unless
drop_remainder=True, or padded to full size with pad_remainder=True (adds
"mask": bool [B], False on padding rows; use this for multi-host evaluation,
where every host must run the same number of steps).

Exact resume: the iterator state is the number of examples of the global stream
consumed, {"examples_seen": n, "global_batch_size": G} — the same on every host
and independent of num_workers / prefetch / process count.
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` (orbax) write
it as one JSON file per process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from sd_jax.data import batching
from sd_jax.data import folder as folder_lib
from sd_jax.data import precomputed
from sd_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

DATASET_NAMES = ("shapes", "folder", "tfds", "preferences")
CROP_MODES = ("center", "random")

_DEFAULTS = dict(
    name="shapes",
    data_dir="",
    resolution=32,
    train_split="train",
    eval_split="test",
    shapes_config="r32",
    tfds_name="",
    image_key="image",
    text_key="caption",
    label_key="",
    caption_template="a photo of a {}",
    folder="",
    preferences="",
    preferences_test=0,
    skip_corrupt=True,
    crop="center",
    random_flip=False,
    tokenizer="",
    max_text_len=77,
    precomputed_dir="",
    num_workers=0,
    prefetch=2,
)


def default_config() -> ml_collections.ConfigDict:
  """`config.dataset` with every key at its default (see the module docstring)."""
  return ml_collections.ConfigDict(dict(_DEFAULTS))


def default_data_dir() -> str:
  """$SD_JAX_DATA_DIR, else ~/.cache/sd_jax/tensorflow_datasets (expanded)."""
  return os.path.expanduser(
      os.environ.get("SD_JAX_DATA_DIR", "~/.cache/sd_jax/tensorflow_datasets"))


def _resolve_config(dataset_config) -> ml_collections.ConfigDict:
  """Dataset config with defaults filled in and values checked."""
  given = (dataset_config.to_dict() if hasattr(dataset_config, "to_dict")
           else dict(dataset_config))
  unknown = sorted(set(given) - set(_DEFAULTS))
  if unknown:
    log.warning("config.dataset has keys the input pipeline does not use: %s "
                "(known keys: %s)", unknown, sorted(_DEFAULTS))
  cfg = {**_DEFAULTS, **given}
  if cfg["name"] not in DATASET_NAMES:
    raise ValueError(f"unknown dataset.name {cfg['name']!r}; valid names: "
                     f"{list(DATASET_NAMES)}")
  if cfg["crop"] not in CROP_MODES:
    raise ValueError(f"unknown dataset.crop {cfg['crop']!r}; valid values: "
                     f"{list(CROP_MODES)}")
  if int(cfg["resolution"]) <= 0:
    raise ValueError(f"dataset.resolution must be positive, got "
                     f"{cfg['resolution']}")
  if cfg["name"] == "tfds" and not cfg["tfds_name"]:
    raise ValueError('dataset.name="tfds" needs dataset.tfds_name (e.g. '
                     '"cifar10" or "coco_captions")')
  if cfg["name"] == "folder" and not cfg["folder"]:
    raise ValueError('dataset.name="folder" needs dataset.folder (a directory '
                     "with images and metadata.jsonl)")
  if cfg["name"] == "preferences" and not cfg["preferences"]:
    raise ValueError('dataset.name="preferences" needs dataset.preferences (a feedback database from `python -m '
                     'sd_jax.feedback serve`, or a Pick-a-Pic-layout parquet file)')
  if cfg["tokenizer"] and not (cfg["text_key"] or cfg["label_key"]):
    raise ValueError("dataset.tokenizer is set but there is no caption source: "
                     "set dataset.text_key, or dataset.label_key with "
                     "dataset.caption_template")
  return ml_collections.ConfigDict(cfg)


def validate_config(dataset_config) -> None:
  """Checks `config.dataset` values without opening any data (runs before anything compiles)."""
  _resolve_config(dataset_config)


# ----------------------------------------------------------------------------
# Sources: random-access examples plus what is known about their features.


@dataclasses.dataclass
class _Source:
  data: Sequence[Any]  # len() and [i] -> raw example (nested dict)
  description: str  # names the dataset in error messages
  feature_keys: list[str]  # dotted feature paths
  label_names: list[str] | None  # class names of label_key, if a ClassLabel
  fast_caption: Callable[[int], str] | None = None  # caption without decoding


def _feature_paths(features, prefix: str = "") -> list[str]:
  """Dotted paths of a TFDS FeaturesDict (Sequence(dict) paths pass through)."""
  paths = []
  if isinstance(features, tfds.features.FeaturesDict):
    for key, feature in features.items():
      path = f"{prefix}{key}"
      paths.append(path)
      paths += _feature_paths(feature, path + ".")
  elif isinstance(features, tfds.features.Sequence):
    paths += _feature_paths(features.feature, prefix)
  return paths


def _feature_at(features, path: str):
  """The TFDS feature object at dotted `path`."""
  feature = features
  for part in path.split("."):
    while isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    feature = feature[part]
  return feature


def _split_base_names(split: str) -> list[str]:
  """"train[:10%]+test" -> ["train", "test"] (TFDS split syntax)."""
  return [part.split("[")[0].strip() for part in split.split("+")]


def _builder_source(builder, split: str, cfg, description: str) -> _Source:
  """Random-access source for `split` of a prepared TFDS builder."""
  available = list(builder.info.splits.keys())
  # Mocked builders (tfds.testing.mock_data USE_CODE) know no splits.
  if available:
    for base in _split_base_names(split):
      if base not in available:
        raise ValueError(f"unknown split {split!r} for {description}; available "
                         f"splits: {sorted(available)}")
  try:
    data = builder.as_data_source(split)
  except NotImplementedError as e:
    raise ValueError(
        f"{description} at {builder.data_dir} is not stored in a random-access "
        "format; prepare it with file_format='array_record' (or convert it: "
        "`tfds convert_format --dataset_dir=... --out_file_format="
        f"array_record`): {e}") from e
  features = builder.info.features
  label_names = None
  if cfg.label_key:
    paths = _feature_paths(features)
    if cfg.label_key in paths:
      label = _feature_at(features, cfg.label_key)
      if isinstance(label, tfds.features.ClassLabel):
        label_names = list(label.names)
  return _Source(data=data, description=description,
                 feature_keys=_feature_paths(features), label_names=label_names)


def _needs_download(builder) -> bool:
  """Whether preparing `builder` would download (TFDS catalog / manual data)."""
  return (type(builder).__module__.startswith("tensorflow_datasets.")
          or bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)))


def _prepare(builder, description: str) -> None:
  """Generates a builder that needs no download; refuses to download."""
  if builder.is_prepared():
    return
  how = (f"prepare it beforehand on a machine with network access, e.g. "
         f"`tfds build {builder.name} --data_dir={builder.data_dir_root} "
         "--file_format=array_record`, and point dataset.data_dir there")
  if _needs_download(builder):
    raise FileNotFoundError(
        f"{description} is not prepared in {builder.data_dir} and would need a "
        f"download; nothing is downloaded at run time: {how}")
  log.info("preparing %s in %s", description, builder.data_dir)
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except
    if builder.is_prepared():  # another process finished it concurrently
      return
    raise RuntimeError(f"could not prepare {description} in {builder.data_dir} "
                       f"({type(e).__name__}: {e}); if it needs downloading, "
                       f"{how}") from e


def _tfds_builder(name: str, data_dir: str):
  """`tfds.builder`, falling back to the prepared files when the builder's code
  cannot run without TensorFlow (e.g. coco_captions)."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except ImportError as code_error:
    try:
      return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except Exception as files_error:  # pylint: disable=broad-except
      raise FileNotFoundError(
          f"TFDS dataset {name!r}: its builder code needs a missing module "
          f"({code_error}), and no prepared copy was found in {data_dir} "
          f"({files_error}). Prepare it into dataset.data_dir on a machine with "
          "TensorFlow, with file_format=array_record.") from code_error
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown TFDS dataset {name!r} (dataset.tfds_name): "
                     f"{e}") from e


_SHAPES_NAME_FIELDS = {"train": "num_train", "test": "num_test",
                       "comp": "num_compositional", "seed": "seed"}


def _parse_shapes_name(name: str) -> dict[str, int] | None:
  """"r32-train64-test16" -> make_config kwargs (shapes.make_config's naming)."""
  parts = name.split("-")
  if not re.fullmatch(r"r\d+", parts[0]):
    return None
  kwargs = {"resolution": int(parts[0][1:])}
  for part in parts[1:]:
    m = re.fullmatch(r"(train|test|comp|seed)(\d+)", part)
    if not m:
      return None
    kwargs[_SHAPES_NAME_FIELDS[m.group(1)]] = int(m.group(2))
  return kwargs


def _shapes_builder(shapes_config, data_dir: str):
  """The `shapes` builder for dataset.shapes_config.

  Accepts a stock config name ("r32", "r64"), a derived name in
  `shapes.make_config`'s scheme ("r32-train64-test16-comp8-seed3": any subset
  of the suffixes, so it can be set from the command line), a
  `shapes.ShapesConfig`, or a dict of `shapes.make_config` arguments.
  """
  # Imported here: it registers the builder, and only name="shapes" needs it.
  from sd_jax.data import shapes  # pylint: disable=g-import-not-at-top
  config = shapes_config
  stock = shapes.Shapes.builder_configs
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if isinstance(config, str) and config not in stock:
    kwargs = _parse_shapes_name(config)
    if kwargs is None:
      raise ValueError(
          f"unknown dataset.shapes_config {config!r}; use a named config "
          f"{sorted(stock)}, a derived name like 'r32-train64-test16-comp8-seed3'"
          ", a shapes.ShapesConfig, or a dict of shapes.make_config arguments")
    config = kwargs
  if isinstance(config, dict):
    config = shapes.make_config(**config)
  if not isinstance(config, str) and config.name in stock:
    config = config.name  # TFDS refuses a custom config named like a stock one
  return shapes.Shapes(config=config, data_dir=data_dir)


def _open_source(cfg, split: str) -> _Source:
  """The configured dataset's `split` as a `_Source`."""
  data_dir = cfg.data_dir or default_data_dir()
  if cfg.name == "folder":
    src = folder_lib.ImageFolderSource(cfg.folder, split,
                                       skip_corrupt=cfg.skip_corrupt)
    return _Source(data=src, description=f"image folder {cfg.folder!r}",
                   feature_keys=["image", "caption", *src.int_fields], label_names=None,
                   fast_caption=src.caption)
  if cfg.name == "preferences":
    from sd_jax.data import preferences as preferences_lib  # pylint: disable=import-outside-toplevel
    src = preferences_lib.PreferenceSource(cfg.preferences, split, num_test=int(cfg.preferences_test))
    return _Source(data=src, description=f"preference pairs {cfg.preferences!r}",
                   feature_keys=["image", "image_l", "caption"], label_names=None, fast_caption=src.caption)
  if cfg.name == "shapes":
    builder = _shapes_builder(cfg.shapes_config, data_dir)
    description = f"shapes/{builder.builder_config.name}"
  else:
    builder = _tfds_builder(cfg.tfds_name, data_dir)
    description = f"TFDS dataset {cfg.tfds_name!r}"
  _prepare(builder, description)
  return _builder_source(builder, split, cfg, description)


# ----------------------------------------------------------------------------
# Per-example processing.


def _lookup(example, path: str):
  for part in path.split("."):
    example = example[part]
  return example


def _to_str(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def _pick_caption(value, rng: np.random.Generator | None) -> str:
  """A caption from a str/bytes value or a list of them (first, or rng's pick)."""
  if isinstance(value, (str, bytes, np.str_, np.bytes_)):
    return _to_str(value)
  items = list(np.asarray(value, dtype=object).reshape(-1))
  if not items:
    return ""
  return _to_str(items[0 if rng is None else int(rng.integers(len(items)))])


def _to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] from grayscale [H, W] / [H, W, 1], RGB or RGBA."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an image [H, W, 1|3|4], got shape {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    return folder_lib.pil_to_rgb(Image.fromarray(image, "RGBA"))
  return image


def resize_and_crop(image: np.ndarray, resolution: int, *, random_crop: bool = False,
                    flip: bool = False,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [resolution, resolution, 3].

  The short side is resized to `resolution` (PIL bicubic, antialiased when
  downscaling), then a square is cropped: centred, or at a uniformly random
  offset from `rng` when `random_crop`; `flip` mirrors it horizontally.
  """
  h, w = image.shape[:2]
  if min(h, w) != resolution:
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(
        size, Image.Resampling.BICUBIC))
    h, w = image.shape[:2]
  if random_crop:
    top = int(rng.integers(h - resolution + 1))
    left = int(rng.integers(w - resolution + 1))
  else:
    top, left = (h - resolution) // 2, (w - resolution) // 2
  image = image[top:top + resolution, left:left + resolution]
  if flip:
    image = image[:, ::-1]
  return image


class _Preprocess:
  """Raw example -> {"image", ["label"], ["tokens"]} (picklable for workers)."""

  def __init__(self, cfg, label_names: list[str] | None, train: bool,
               tokenizer: tokenizer_lib.ClipTokenizer | None):
    self.resolution = int(cfg.resolution)
    self.image_key = cfg.image_key
    self.text_key = cfg.text_key
    self.label_key = cfg.label_key
    self.template = cfg.caption_template
    self.label_names = label_names
    self.random_crop = train and cfg.crop == "random"
    self.random_flip = train and bool(cfg.random_flip)
    self.tokenizer = tokenizer

  def caption(self, example, rng: np.random.Generator | None = None) -> str:
    """The example's caption (eval: deterministic; train: may use rng)."""
    if self.text_key:
      return _pick_caption(_lookup(example, self.text_key), rng)
    if self.label_key:
      label = int(_lookup(example, self.label_key))
      name = self.label_names[label] if self.label_names else str(label)
      return self.template.format(name.replace("_", " "))
    return ""

  def __call__(self, example, rng: np.random.Generator | None = None) -> dict:
    image = _to_rgb(_lookup(example, self.image_key))
    flip = self.random_flip and bool(rng.random() < 0.5)
    state = rng.bit_generator.state if rng is not None else None
    image = resize_and_crop(image, self.resolution, random_crop=self.random_crop,
                            flip=flip, rng=rng)
    out = {"image": image.astype(np.float32) / 127.5 - 1.0}
    if "image_l" in example:  # a preference pair's other image: the same crop and flip
      if rng is not None:
        rng.bit_generator.state = state
      other = resize_and_crop(_to_rgb(example["image_l"]), self.resolution,
                              random_crop=self.random_crop, flip=flip, rng=rng)
      out["image_l"] = other.astype(np.float32) / 127.5 - 1.0
    if self.label_key:
      out["label"] = np.int32(_lookup(example, self.label_key))
    if self.tokenizer is not None:
      out["tokens"] = self.tokenizer([self.caption(example, rng)])[0]
    return out


def _check_keys(cfg, source: _Source) -> None:
  for option in ("image_key", "text_key", "label_key"):
    key = cfg[option]
    if key and key not in source.feature_keys:
      raise ValueError(
          f"dataset.{option}={key!r} is not a feature of {source.description}; "
          f"available feature keys: {source.feature_keys}")


# ----------------------------------------------------------------------------
# Public API.

def create_dataset(dataset_config, *, split: str, global_batch_size: int,
                   seed: int, train: bool = True, process_index: int | None = None,
                   process_count: int | None = None,
                   drop_remainder: bool | None = None,
                   pad_remainder: bool = False) -> grain.MapDataset:
  """This host's batches as a `grain.MapDataset` (random access by batch index).

  Same arguments as `create_iterator`; batch s is `dataset[s]`.
  """
  cfg = _resolve_config(dataset_config)
  process_index, process_count = batching.process_index_count(process_index,
                                                       process_count)
  if global_batch_size <= 0:
    raise ValueError(f"global batch size must be positive, got "
                     f"{global_batch_size}")
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the process "
        f"count {process_count}; use a batch size that is a multiple of "
        f"{process_count}")
  if train and pad_remainder:
    raise ValueError("pad_remainder is for evaluation (train=False); training "
                     "batches are always full")
  if drop_remainder is None:
    drop_remainder = train
  local_batch = global_batch_size // process_count

  source = _open_source(cfg, split)
  _check_keys(cfg, source)
  if len(source.data) == 0:
    raise ValueError(f"split {split!r} of {source.description} is empty")
  tokenizer = (tokenizer_lib.load_clip_tokenizer(cfg.tokenizer,
                                                 max_length=cfg.max_text_len)
               if cfg.tokenizer else None)
  if cfg.label_key and not cfg.text_key and source.label_names is None:
    log.warning("%s: %r is not a ClassLabel; captions will use the label "
                "number", source.description, cfg.label_key)
  preprocess = _Preprocess(cfg, source.label_names, train, tokenizer)

  ds = grain.MapDataset.source(source.data)
  if train:
    shuffle_seed, augment_seed = batching.shuffle_and_augment_seeds(seed)
    # Shuffle before repeat: every epoch is a full permutation, reshuffled per
    # epoch (grain folds the epoch into the seed).
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.random_map(preprocess, seed=augment_seed)
  else:
    ds = ds.map(preprocess)
  ds = batching.HostBlocks(ds, process_index=process_index, process_count=process_count,
                   local_batch=local_batch, pad=pad_remainder)
  return ds.batch(local_batch, drop_remainder=drop_remainder)


def create_iterator(dataset_config, *, split: str, global_batch_size: int,
                    seed: int, train: bool = True,
                    process_index: int | None = None,
                    process_count: int | None = None,
                    drop_remainder: bool | None = None,
                    pad_remainder: bool = False) -> batching.BatchIterator:
  """Iterator over this host's batches of `split` (see the module docstring).

  Args:
    dataset_config: `config.dataset` (keys in the module docstring; missing
      keys take their defaults).
    split: split name, e.g. `dataset_config.train_split`.
    global_batch_size: examples per step over all hosts.
    seed: shuffling and augmentation seed (train only).
    train: True: shuffled, repeated forever, augmented, full batches.
      False: one pass in order, no augmentation.
    process_index, process_count: this host and the host count; default
      `jax.process_index()` / `jax.process_count()`.
    drop_remainder: drop a final partial batch; default True for training,
      False for evaluation.
    pad_remainder: evaluation only: pad the last global batch to full size and
      add "mask": bool [B] (False on padding rows), so every host yields the same
      number of equal-sized batches.

  Returns:
    A `BatchIterator` (a `grain.DatasetIterator`) of dicts of numpy arrays
    ("image" float32 [B, res, res, 3] in [-1, 1]; "label" int32 [B]; "tokens"
    int32 [B, L]; "mask" bool [B]), with JSON-serializable `get_state()` /
    `set_state()` (works with grain.checkpoint.CheckpointSave/Restore). Call
    `close()` when done if num_workers > 0.

  Raises:
    ValueError / FileNotFoundError: bad config, split, feature key or data.
  """
  cfg = _resolve_config(dataset_config)
  if cfg.precomputed_dir:
    if pad_remainder:
      raise ValueError("dataset.precomputed_dir: precomputed splits are read without padding (pad_remainder)")
    return precomputed.create_iterator(
        cfg.precomputed_dir, split=split, global_batch_size=global_batch_size, seed=seed, train=train,
        process_index=process_index, process_count=process_count, drop_remainder=drop_remainder,
        prefetch=int(cfg.prefetch))
  ds = create_dataset(cfg, split=split, global_batch_size=global_batch_size,
                      seed=seed, train=train, process_index=process_index,
                      process_count=process_count,
                      drop_remainder=drop_remainder, pad_remainder=pad_remainder)
  return batching.BatchIterator(ds, global_batch_size=global_batch_size,
                       prefetch=int(cfg.prefetch),
                       num_workers=int(cfg.num_workers))

@dataclasses.dataclass
class DatasetInfo:
  """What callers need to know about a split without iterating it.

  Attributes:
    num_examples: examples in the split (after skipping corrupt images).
    captions: index -> caption text (as the pipeline sees it in evaluation: the
      first caption of a list, or the class-name template).
    label_names: class names of `dataset.label_key` (None if no label key or not
      a ClassLabel).
    feature_keys: dotted feature paths of the source.
  """
  num_examples: int
  captions: Callable[[int], str]
  label_names: list[str] | None
  feature_keys: list[str]


def dataset_info(dataset_config, split: str) -> DatasetInfo:
  """Size, captions and class names of `split` of the configured dataset."""
  cfg = _resolve_config(dataset_config)
  source = _open_source(cfg, split)
  _check_keys(cfg, source)
  preprocess = _Preprocess(cfg, source.label_names, train=False, tokenizer=None)
  if source.fast_caption is not None and cfg.text_key == "caption":
    captions = source.fast_caption
  else:
    data = source.data
    captions = lambda i: preprocess.caption(data[i])  # noqa: E731
  return DatasetInfo(num_examples=len(source.data), captions=captions,
                     label_names=source.label_names,
                     feature_keys=list(source.feature_keys))
