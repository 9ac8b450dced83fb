"""Precomputed VAE posteriors and text contexts: written once, then read as a grain source.

Encoding every training image with the frozen VAE and every caption with the frozen text tower at every step
costs more than the U-Net step on small models; latent-diffusion recipes encode the data once. What is stored is the
posterior, not one sample of it, so training still draws z ~ q(z | image) with fresh noise at every step:

  DIR/<split>/
    latent_mean.npy     [N, h, w, c]  VAE posterior mean
    latent_logvar.npy   [N, h, w, c]  its log-variance (the std as DiagonalGaussian keeps it: sampling is the
                                      same arithmetic as from the live encoder)
    context.npy         [N, L, D]     text tower output, the U-Net's context
    tokens.npy          [N, L] int32  the tokenized captions, so that a run that fine-tunes the text tower
                                      (ldm.train_text_encoder) encodes them itself and still reads the latents
    captions.json       the N captions (decoded from the tokens), for sample prompts and inspection
    meta.json           what produced the files (`fingerprint`) and their shapes; written last, into a temporary
                        directory renamed into place, so a split directory that exists is complete

Example i of a split is example i of the source split read in evaluation order (no augmentation), so a training
run that reads it with the same seed visits the examples in the same order as one that reads the images
(`create_dataset` shuffles exactly as sd_jax/data/input_pipeline.py does).

Plain .npy files are memory-mapped: random access for grain, no per-record (de)serialisation, and readable with
NumPy alone. (array_record would be the choice for object stores, where memory maps do not work.)

    precomputed.write_split(DIR, "train", batches, encode_fn, fingerprint=...)   # once
    it = precomputed.create_iterator(DIR, split="train", global_batch_size=256, seed=0)
    batch = next(it)   # {"latent_mean", "latent_logvar", "context"} float32 and "tokens" int32, this host's rows
"""

from __future__ import annotations

import json
import shutil
from typing import Any, Callable, Iterable

import grain
import numpy as np
from etils import epath

from sd_jax.data import batching

ARRAYS = ("latent_mean", "latent_logvar", "context")
TOKENS = "tokens"  # int32, copied from the input batches (absent from splits written before it was stored)
META_FILE = "meta.json"
CAPTIONS_FILE = "captions.json"


def split_dir(directory, split: str) -> epath.Path:
  return epath.Path(directory) / split


def read_meta(directory, split: str) -> dict[str, Any] | None:
  """The split's meta.json, or None if the split has not been (completely) written."""
  path = split_dir(directory, split) / META_FILE
  return json.loads(path.read_text()) if path.exists() else None


def check_fingerprint(directory, split: str, fingerprint: dict[str, Any]) -> bool:
  """True if the split exists and was made from `fingerprint`; False if absent. Raises if made from another."""
  meta = read_meta(directory, split)
  if meta is None:
    return False
  stored = meta["fingerprint"]
  if stored != fingerprint:
    changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
    details = ", ".join(f"{k}: stored {stored.get(k)!r} vs now {fingerprint.get(k)!r}" for k in changed)
    raise ValueError(f"{split_dir(directory, split)} holds precomputed data made with a different setup ({details}). "
                     "Choose another directory, or delete it to recompute.")
  return True


def write_split(directory, split: str, batches: Iterable[dict[str, np.ndarray]],
                encode_fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], *, num_examples: int,
                fingerprint: dict[str, Any], captions_fn: Callable[[np.ndarray], list[str]] | None = None,
                dtype: str = "float32") -> None:
  """Encodes `batches` (the split in order, {"image", "tokens"}) into DIR/<split>/.

  Args:
    directory: the precompute directory (created if needed).
    split: split name (a subdirectory).
    batches: the split's batches in evaluation order; the last one may be partial.
    encode_fn: batch -> {"latent_mean", "latent_logvar", "context"} arrays with a leading batch axis. The
      batches' "tokens" are stored as they are (int32).
    num_examples: examples in the split (the files are preallocated).
    fingerprint: JSON-able description of what produced the data, checked when the data is reused.
    captions_fn: tokens [B, L] -> B captions to store (None: no captions.json).
    dtype: storage dtype ("float32" or "float16"); batches are read back as float32.
  """
  final = split_dir(directory, split)
  tmp = epath.Path(str(final) + ".tmp")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  files: dict[str, np.ndarray] = {}
  captions: list[str] = []
  start = 0
  for batch in batches:
    encoded = {k: np.asarray(v) for k, v in encode_fn(batch).items()}
    n = len(encoded[ARRAYS[0]])
    if not files:
      files = {k: np.lib.format.open_memmap(str(tmp / f"{k}.npy"), mode="w+", dtype=dtype,
                                            shape=(num_examples, *encoded[k].shape[1:])) for k in ARRAYS}
      if TOKENS in batch:
        files[TOKENS] = np.lib.format.open_memmap(str(tmp / f"{TOKENS}.npy"), mode="w+", dtype=np.int32,
                                                  shape=(num_examples, *np.shape(batch[TOKENS])[1:]))
    if start + n > num_examples:
      raise ValueError(f"split {split!r} yielded more than num_examples={num_examples} examples.")
    for k in ARRAYS:
      files[k][start:start + n] = encoded[k]
    if TOKENS in files:
      files[TOKENS][start:start + n] = np.asarray(batch[TOKENS])
    if captions_fn is not None:
      captions.extend(captions_fn(np.asarray(batch["tokens"])))
    start += n
  if start != num_examples:
    raise ValueError(f"split {split!r} yielded {start} examples, expected {num_examples}.")
  shapes = {k: list(v.shape) for k, v in files.items()}
  for v in files.values():
    v.flush()
  del files
  if captions_fn is not None:
    (tmp / CAPTIONS_FILE).write_text(json.dumps(captions))
  meta = {"num_examples": num_examples, "dtype": dtype, "shapes": shapes, "fingerprint": fingerprint}
  (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
  if final.exists():
    shutil.rmtree(final)
  tmp.rename(final)


class PrecomputedSource:
  """Random access to one split: [i] -> {"latent_mean", "latent_logvar", "context"} float32 and, where the split
  stores them, "tokens" int32 (a grain source).

  The memory maps are opened lazily, so the source pickles cheaply into grain worker processes.
  """

  def __init__(self, directory, split: str):
    self.path = split_dir(directory, split)
    self.meta = read_meta(directory, split)
    if self.meta is None:
      raise FileNotFoundError(f"{self.path} holds no precomputed split (no {META_FILE}); write it first "
                              "(sd_jax.precompute.precompute).")
    self._arrays: dict[str, np.ndarray] | None = None

  def __len__(self) -> int:
    return int(self.meta["num_examples"])

  @property
  def has_tokens(self) -> bool:
    return TOKENS in self.meta["shapes"]

  def _open(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      names = ARRAYS + ((TOKENS,) if self.has_tokens else ())
      self._arrays = {k: np.load(str(self.path / f"{k}.npy"), mmap_mode="r") for k in names}
    return self._arrays

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    arrays = self._open()
    return {k: np.asarray(v[index], np.int32 if k == TOKENS else np.float32) for k, v in arrays.items()}

  def captions(self) -> list[str]:
    path = self.path / CAPTIONS_FILE
    return json.loads(path.read_text()) if path.exists() else []

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}


def create_dataset(directory, *, split: str, global_batch_size: int, seed: int, train: bool = True,
                   process_index: int | None = None, process_count: int | None = None,
                   drop_remainder: bool | None = None) -> grain.MapDataset:
  """This host's batches of a precomputed split, ordered exactly as `input_pipeline.create_dataset` orders examples.

  Training: the same seeded shuffle, repeated forever; host p takes the p-th block of every global batch.
  """
  process_index, process_count = batching.process_index_count(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the process count {process_count}")
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(PrecomputedSource(directory, split))
  if train:
    # The image pipeline's shuffle seed (its first derived seed), so both orders agree.
    shuffle_seed, _ = batching.shuffle_and_augment_seeds(seed)
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
  # The pipeline's host layout (global batch s = stream positions [s*G, (s+1)*G), host p its p-th block).
  ds = batching.HostBlocks(ds, process_index=process_index, process_count=process_count, local_batch=local_batch,
                           pad=False)
  return ds.batch(local_batch, drop_remainder=train if drop_remainder is None else drop_remainder)


def create_iterator(directory, *, split: str, global_batch_size: int, seed: int, train: bool = True,
                    process_index: int | None = None, process_count: int | None = None,
                    drop_remainder: bool | None = None, prefetch: int = 2) -> batching.BatchIterator:
  """`create_dataset` as the checkpointable `batching.BatchIterator` (same state format, so resume works).
  `input_pipeline.create_iterator` returns this when `dataset.precomputed_dir` is set."""
  ds = create_dataset(directory, split=split, global_batch_size=global_batch_size, seed=seed, train=train,
                      process_index=process_index, process_count=process_count, drop_remainder=drop_remainder)
  return batching.BatchIterator(ds, global_batch_size=global_batch_size, prefetch=prefetch)
