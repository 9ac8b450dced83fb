"""Preference pairs as a random-access data source: the votes of a feedback database (sd_jax/feedback/store.py) or a
Pick-a-Pic-layout parquet file (caption, jpg_0, jpg_1, label_0), ordered winner first.

`dataset.name="preferences"`, `dataset.preferences=PATH`. Each example is {"image": the preferred image, "image_l":
the other one, "caption": str} (uint8 [H, W, 3] each); ties (label_0 = 0.5) and "both bad" votes carry no
preference and are left out. Splits: `train` is every pair; `test` the last `dataset.preferences_test` pairs of the
file (held out from `train`; 0 = none, and `test` is then `train`).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from sd_jax.data import folder as folder_lib


def _decode(data: bytes, what: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as image:
      return folder_lib.pil_to_rgb(image)
  except Exception as e:  # noqa: BLE001 - any decoding failure names the pair
    raise ValueError(f"{what}: not a readable image ({type(e).__name__}: {e})") from e


class PreferenceSource:
  """The ordered pairs of one split of a preference file."""

  def __init__(self, path: str, split: str, *, num_test: int = 0):
    from sd_jax.feedback import store as store_lib  # pylint: disable=import-outside-toplevel
    try:
      pairs = store_lib.read_pairs(path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"dataset.preferences={path} does not exist.") from e
    ordered = [(caption, (a, b) if label > 0.5 else (b, a)) for caption, a, b, label in pairs if label != 0.5]
    if not ordered:
      raise ValueError(f"dataset.preferences={path} holds no preference (every vote is a tie or 'both bad', or "
                       "there are none yet).")
    if split not in ("train", "test"):
      raise ValueError(f"unknown split {split!r} of preferences {path}: use train or test.")
    if num_test and split == "train":
      ordered = ordered[:-num_test] if num_test < len(ordered) else []
    elif num_test:
      ordered = ordered[-num_test:]
    if not ordered:
      raise ValueError(f"dataset.preferences={path}: split {split!r} is empty (dataset.preferences_test={num_test} "
                       f"of {len(pairs)} pairs).")
    self.path = path
    self._pairs = ordered

  def __len__(self) -> int:
    return len(self._pairs)

  def caption(self, index: int) -> str:
    return self._pairs[index][0]

  def __getitem__(self, index: int) -> dict[str, Any]:
    caption, (winner, loser) = self._pairs[int(index) % len(self._pairs)]
    return {"image": _decode(winner, f"{self.path}, pair {index}"),
            "image_l": _decode(loser, f"{self.path}, pair {index}"), "caption": caption}
