"""The gallery's background worker: draws the images to rate through the one generation path (sd_jax/generate.py)
and records them in the preference store, while the server answers requests.

For each prompt it draws `images_per_prompt` images in one call, writes them as PNGs in the store's images folder and
records each with its seed, index and sampler settings. Each prompt has its own seed, `prompt_seed(seed, prompt)`
(image i of it: samplers.image_noise; `python -m sd_jax.sample --seed S --num_images N` draws the same images): with
one seed for all prompts, image i of every prompt would start from the same noise, and a rater's preferences would
partly be preferences between those few noises, which a model trained on them learns. Images already recorded are
skipped, so a restarted server draws only what is missing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from sd_jax import images as images_lib
from sd_jax.feedback import store as store_lib

log = logging.getLogger(__name__)


def weights_hash(pipe) -> str:
  """sha256 (first 16 hex digits) over the parameters a TextToImage draws with (LoRAs and embeddings included)."""
  import jax  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  for name, tree in (("unet", pipe.unet_params), ("vae", pipe.vae_params), ("text_encoder", pipe.text_params)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      leaf = np.ascontiguousarray(np.asarray(leaf))
      digest.update(f"{name}{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
      digest.update(leaf.tobytes())
  return digest.hexdigest()[:16]


def prompt_seed(seed: int, prompt: str) -> int:
  """The seed of `prompt`'s images: `seed` offset by a hash of the prompt (stable across runs and prompt files)."""
  return (int(seed) + int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)) % (2**31)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "prompt"


class Worker(threading.Thread):
  """Draws the images of `prompts` into `store` (a daemon thread; `queued` says how many are left)."""

  def __init__(self, store: store_lib.FeedbackStore, pipe, model_id: int, prompts: Sequence[str], *,
               images_per_prompt: int = 4, seed: int = 0, settings: dict[str, Any] | None = None):
    super().__init__(name="sd_jax_feedback_worker", daemon=True)
    self.store, self.pipe, self.model_id = store, pipe, model_id
    self.prompts = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    self.images_per_prompt, self.seed = int(images_per_prompt), int(seed)
    self.settings = dict(settings or {})  # generate()'s keyword arguments: steps, guidance, sampler, ...
    self.error: BaseException | None = None
    self._lock = threading.Lock()
    self._left = sum(self._missing(p) != [] for p in self.prompts) * self.images_per_prompt

  def _record_settings(self, index: int) -> dict[str, Any]:
    return {**self.settings, "index": index}

  def _missing(self, prompt: str) -> list[int]:
    return [i for i in range(self.images_per_prompt)
            if not self.store.has_image(prompt, self.model_id, prompt_seed(self.seed, prompt),
                                        self._record_settings(i))]

  @property
  def queued(self) -> int:
    with self._lock:
      return self._left

  def run(self) -> None:
    try:
      for prompt in self.prompts:
        missing = self._missing(prompt)
        if not missing:
          continue
        seed = prompt_seed(self.seed, prompt)
        images = self.pipe.generate([prompt], num_images=self.images_per_prompt, seed=seed, **self.settings)
        for i in missing:
          tag = hashlib.sha1(prompt.encode()).hexdigest()[:8]  # prompts with the same slug get different files
          file = f"m{self.model_id}_{_slug(prompt)}_{tag}_s{seed}_{i}.png"
          images_lib.save_png(images[i], self.store.image_path(file))
          self.store.add_image(prompt, self.model_id, seed, self._record_settings(i), file)
          with self._lock:
            self._left = max(self._left - 1, 0)
        log.info("drew %d image(s) of %r", len(missing), prompt)
    except BaseException as e:  # noqa: BLE001 - kept for the server to report
      self.error = e
      log.exception("the image worker stopped")
      with self._lock:
        self._left = 0
