"""Precomputed latents: a latent-diffusion run's training and held-out splits encoded once by its frozen networks.

`precompute` writes VAE posteriors (mean, log-variance) and text contexts, with the captions' tokens, in
sd_jax/data/precomputed.py's layout; the input pipeline then serves them (`dataset.precomputed_dir`) in the order it
would serve the images. A split already there from the same networks and data is reused; one from others is an
error (its fingerprint says what it was made from). Each training step still draws its own posterior sample.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from sd_jax.data import input_pipeline
from sd_jax.data import precomputed as precomputed_lib
from sd_jax.frozen import FrozenNetworks


def fingerprint(config, nets: FrozenNetworks, split: str) -> dict[str, Any]:
  """What precomputed data depends on; a mismatch on reuse is an error."""
  ds = config.dataset
  keys = ("name", "shapes_config", "tfds_name", "folder", "image_key", "text_key", "label_key", "caption_template",
          "resolution", "crop", "max_text_len")
  fingerprint = {"vae_from": str(nets.vae_dir), "text_from": str(nets.text_dir), "clip_skip": nets.clip_skip,
                 "frozen_dtype": str(config.ldm.frozen_dtype), "split": split, **{k: ds[k] for k in keys}}
  return json.loads(json.dumps(fingerprint, default=str))


def precompute(config, out_dir: str | None = None, splits: Sequence[str] | None = None,
               nets: FrozenNetworks | None = None) -> epath.Path:
  """Encodes the training and held-out splits once: VAE posteriors (mean, log-variance) and text contexts, stored
  with the captions' tokens.

  Written to `out_dir` (default config.ldm.precompute_dir) in sd_jax/data/precomputed.py's layout; a split already
  there from the same networks and data is reused, one from others is an error. Runs on process 0's default device.
  """
  from jax.experimental import multihost_utils
  out = out_dir or config.ldm.precompute_dir
  if not out:
    raise ValueError("precompute needs an output directory: set config.ldm.precompute_dir or pass out_dir.")
  if config.dataset.crop == "random" or config.dataset.random_flip:
    raise ValueError("config.dataset.crop='random' / random_flip would be frozen into the precomputed latents; "
                     "precompute from centre crops without flips.")
  nets = nets or FrozenNetworks(config)
  encode = jax.jit(nets.encode)
  for split in splits or (config.dataset.train_split, config.dataset.eval_split):
    if precomputed_lib.check_fingerprint(out, split, fingerprint(config, nets, split)):
      if config.ldm.train_text_encoder and not precomputed_lib.PrecomputedSource(out, split).has_tokens:
        raise ValueError(f"{precomputed_lib.split_dir(out, split)} was written without the tokens that "
                         "config.ldm.train_text_encoder=True re-encodes (an older sd_jax). Delete it to recompute, "
                         "or choose another config.ldm.precompute_dir.")
      logging.info("Precomputed %s split found in %s; reusing it.", split, out)
      continue
    if jax.process_index() == 0:
      logging.info("Precomputing the %s split into %s.", split, out)
      info = input_pipeline.dataset_info(config.dataset, split)
      source = ml_collections.ConfigDict(config.dataset.to_dict())
      source.precomputed_dir = ""  # read the images themselves
      batches = input_pipeline.create_iterator(source, split=split, global_batch_size=config.batch_size,
                                              seed=config.seed, train=False, process_index=0, process_count=1)
      try:
        precomputed_lib.write_split(
            out, split, batches, lambda b: encode(nets.vae_params, nets.text_params, b),
            num_examples=info.num_examples, fingerprint=fingerprint(config, nets, split),
            captions_fn=lambda tokens: [nets.tokenizer.decode(t) for t in tokens], dtype=config.ldm.precompute_dtype)
      finally:
        batches.close()
    multihost_utils.sync_global_devices(f"ldm_precompute_{split}")
  return epath.Path(out)
