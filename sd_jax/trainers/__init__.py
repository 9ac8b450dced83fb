"""Trainers, chosen by `config.trainer`.

Each trainer module defines `Task(config)` with one small interface the shared loop in `sd_jax/train.py` uses:

  init_params(rng) -> params            logically-boxed Flax params (for eval_shape and sharded init)
  loss(params, batch, keys) -> (loss, metrics)
                                        pure; `keys` holds one PRNG key per example [B, 2] so that the noise
                                        drawn does not depend on how the batch is split over devices
  eval_metrics(params, batch, keys) -> metrics   (optional) per-batch held-out metrics, averaged by the loop
  on_eval(step, state, ctx)              (optional) host-side evaluation: sample grids, images, extra metrics
"""

import importlib

TRAINERS = {
    "ddpm": "sd_jax.trainers.ddpm",
}


def get(name: str):
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r} is not a trainer. Valid trainers: {', '.join(sorted(TRAINERS))}.")
  return importlib.import_module(TRAINERS[name])
