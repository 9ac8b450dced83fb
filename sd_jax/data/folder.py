"""Image folders with `metadata.jsonl` captions, as a random-access data source.

Layout (the convention of other diffusion tooling):

  my_images/
    metadata.jsonl      {"file_name": "a.png", "text": "a red circle"}
    a.png               {"file_name": "sub/b.jpg", "text": "...", "split": "test"}
    sub/b.jpg

`file_name` is relative to the folder (subdirectories allowed, or an absolute path); `text` is the
caption; an integer field that every line has (e.g. `"prior": 0`) is a feature too (`dataset.label_key`). Splits:
  * a line's optional `"split"` field names its split; lines without one are
    `train` (so a plain folder is all `train`);
  * if the folder has no top-level metadata.jsonl, each subfolder with its own
    metadata.jsonl is a split (the `train/`, `test/` layout of HF imagefolder).
`text` may be left out of every line (unconditional data: captions are ""), but
not out of only some lines (that is usually a typo in the key).

Every image of the split is checked once at construction (PIL `open` + `verify`,
in a thread pool, with progress logged for large folders), so the length — and
hence shuffling — is fixed before training starts. An unreadable image is
skipped with a WARNING naming it (`skip_corrupt=True`) or raises (`False`).
`verify` cannot catch every damaged file (e.g. a truncated JPEG body); such a
file fails when decoded, and then — with `skip_corrupt=True` — the next readable
example in index order is returned instead (deterministic, logged).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

METADATA_FILE = "metadata.jsonl"
DEFAULT_SPLIT = "train"
_LOG_EVERY = 10_000  # validation progress is logged every this many images
_VERIFY_THREADS = 16  # file opening is I/O bound (network file systems)

log = logging.getLogger(__name__)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3] of a PIL image in any mode; transparency composited on white."""
  if img.mode != "RGB":
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and
                                             "transparency" in img.info):
      rgba = img.convert("RGBA")
      img = Image.new("RGB", rgba.size, (255, 255, 255))
      img.paste(rgba, mask=rgba.getchannel("A"))
    else:
      img = img.convert("RGB")
  return np.asarray(img, dtype=np.uint8)


def load_rgb(path: str) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 3] (grayscale/palette/RGBA -> RGB)."""
  with Image.open(path) as img:
    img.load()
    return pil_to_rgb(img)


def _check_image(path: str) -> str | None:
  """None if `path` opens and verifies as an image, else the reason."""
  try:
    with Image.open(path) as img:
      img.verify()
    return None
  except Exception as e:  # pylint: disable=broad-except  # any failure = corrupt
    return f"{type(e).__name__}: {e}"


def _read_metadata(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, record) for every non-blank line of a metadata.jsonl."""
  records = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}, line {lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}): "
                         f"{raw.strip()[:200]!r}. Save the file as UTF-8.") from e
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg}): "
                         f"{line.strip()[:200]!r}") from e
      if not isinstance(record, dict) or "file_name" not in record:
        raise ValueError(f"{path}, line {lineno}: expected a JSON object with a "
                         f"'file_name' field, got {line.strip()[:200]!r}")
      records.append((lineno, record))
  return records


def available_splits(folder: str) -> list[str]:
  """Split names of `folder` (see the module docstring), sorted."""
  top = os.path.join(folder, METADATA_FILE)
  if os.path.exists(top):
    return sorted({str(r.get("split", DEFAULT_SPLIT))
                   for _, r in _read_metadata(top)})
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder!r} does not exist")
  subdirs = sorted(d for d in os.listdir(folder)
                   if os.path.exists(os.path.join(folder, d, METADATA_FILE)))
  if not subdirs:
    raise FileNotFoundError(
        f"{top} not found: an image folder needs a metadata.jsonl with lines "
        '{"file_name": "...", "text": "..."} (or split subfolders, each with '
        "its own metadata.jsonl)")
  return subdirs


class ImageFolderSource:
  """Random access to one split of an image folder.

  `source[i]` is {"image": uint8 [H, W, 3], "caption": str}; `len(source)` counts
  the readable images. Picklable (for grain worker processes).

  Attributes:
    folder: the split's root (file names are relative to it).
    split: split name.
    file_names: kept file names, in metadata order.
    skipped: (file_name, reason) of images dropped as unreadable.
  """

  def __init__(self, folder: str, split: str = DEFAULT_SPLIT, *,
               skip_corrupt: bool = True):
    """Reads the metadata of `split` and validates its images.

    Args:
      folder: directory with metadata.jsonl (or split subfolders).
      split: which split; see `available_splits`.
      skip_corrupt: drop unreadable images (logged) instead of raising.

    Raises:
      FileNotFoundError: no metadata.jsonl, or a listed file does not exist.
      ValueError: malformed metadata line, unknown split, corrupt image with
        skip_corrupt=False, or no readable images.
    """
    self.split = split
    self.skip_corrupt = skip_corrupt
    splits = available_splits(folder)
    if split not in splits:
      raise ValueError(f"unknown split {split!r} for image folder {folder!r}; "
                       f"available splits: {splits}")
    top = os.path.join(folder, METADATA_FILE)
    if os.path.exists(top):
      root, metadata_path = folder, top
      records = [(n, r) for n, r in _read_metadata(top)
                 if str(r.get("split", DEFAULT_SPLIT)) == split]
    else:
      root = os.path.join(folder, split)
      metadata_path = os.path.join(root, METADATA_FILE)
      records = _read_metadata(metadata_path)
    self.folder = root

    with_text = [("text" in r) for _, r in records]
    if any(with_text) and not all(with_text):
      lineno = records[with_text.index(False)][0]
      raise ValueError(f"{metadata_path}, line {lineno}: no 'text' field, while "
                       "other lines have one (leave 'text' out of every line "
                       "for caption-free data)")
    for lineno, r in records:
      if not os.path.isfile(os.path.join(root, r["file_name"])):
        raise FileNotFoundError(
            f"{metadata_path}, line {lineno}: file_name {r['file_name']!r} not "
            f"found (looked for {os.path.join(root, r['file_name'])})")

    reasons = self._validate([os.path.join(root, r["file_name"])
                              for _, r in records])
    # Integer fields every line has (e.g. the fine-tune trainer's "prior" flag) are features too.
    extra = set.intersection(*(set(r) for _, r in records)) - {"file_name", "text", "split"} if records else set()
    self.int_fields: list[str] = sorted(k for k in extra if all(
        isinstance(r[k], int) and not isinstance(r[k], bool) for _, r in records))
    self.file_names: list[str] = []
    self._captions: list[str] = []
    self._ints: list[dict[str, int]] = []
    self.skipped: list[tuple[str, str]] = []
    for (lineno, r), reason in zip(records, reasons):
      if reason is None:
        self.file_names.append(r["file_name"])
        self._captions.append(str(r.get("text", "")))
        self._ints.append({k: int(r[k]) for k in self.int_fields})
      elif skip_corrupt:
        self.skipped.append((r["file_name"], reason))
      else:
        raise ValueError(
            f"corrupt or unreadable image {os.path.join(root, r['file_name'])} "
            f"({metadata_path}, line {lineno}): {reason}. Set "
            "dataset.skip_corrupt=True to skip such images.")
    if self.skipped:
      shown = ", ".join(f"{name} ({why})" for name, why in self.skipped[:20])
      more = "" if len(self.skipped) <= 20 else f" and {len(self.skipped) - 20} more"
      log.warning("%s [%s]: skipped %d unreadable image(s) of %d: %s%s",
                  root, split, len(self.skipped), len(records), shown, more)
    if not self.file_names:
      raise ValueError(f"image folder {root!r} split {split!r} has no readable "
                       f"images ({len(records)} listed in {metadata_path})")

  def _validate(self, paths: list[str]) -> list[str | None]:
    """Reason each image is unreadable (None if fine), checked in parallel."""
    reasons: list[str | None] = [None] * len(paths)
    if len(paths) >= _LOG_EVERY:
      log.info("validating %d images in %s", len(paths), self.folder)
    with concurrent.futures.ThreadPoolExecutor(_VERIFY_THREADS) as pool:
      for i, reason in enumerate(pool.map(_check_image, paths)):
        reasons[i] = reason
        if (i + 1) % _LOG_EVERY == 0:
          log.info("validated %d / %d images in %s", i + 1, len(paths),
                   self.folder)
    return reasons

  def __len__(self) -> int:
    return len(self.file_names)

  def caption(self, index: int) -> str:
    """Caption of example `index` (no image decoding)."""
    return self._captions[index]

  def __getitem__(self, index: int) -> dict[str, Any]:
    """{"image": uint8 [H, W, 3], "caption": str, and each of `int_fields`} of example `index`."""
    n = len(self.file_names)
    index = int(index) % n
    for attempt in range(n):
      i = (index + attempt) % n
      path = os.path.join(self.folder, self.file_names[i])
      try:
        return {"image": load_rgb(path), "caption": self._captions[i], **self._ints[i]}
      except Exception as e:  # pylint: disable=broad-except  # decode failures
        if not self.skip_corrupt:
          raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}. "
                           "Set dataset.skip_corrupt=True to skip such "
                           "images.") from e
        log.warning("cannot decode image %s (%s: %s); using example %d instead",
                    path, type(e).__name__, e, (i + 1) % n)
    raise ValueError(f"no image of {self.folder!r} split {self.split!r} decodes")

  def __repr__(self) -> str:
    return (f"ImageFolderSource({self.folder!r}, split={self.split!r}, "
            f"len={len(self)}, skipped={len(self.skipped)})")
