"""Trainers, chosen by `config.trainer`.

Each trainer module defines `Task(config)` with one small interface the shared loop in `sd_jax/train.py` uses:

  init_params(rng) -> params            logically-boxed Flax params (for eval_shape and sharded init)
  loss(params, frozen, batch, keys) -> (loss, metrics)
                                        pure; `keys` holds one PRNG key per example [B, 2] so that the noise
                                        drawn does not depend on how the batch is split over devices; `frozen`
                                        is the task's frozen networks (None if it has none)
  eval_metrics(params, frozen, batch, keys) -> metrics
                                        (optional) per-batch held-out metrics, averaged by the loop
  on_eval(step, state, ctx)             (optional) host-side evaluation: sample grids, images, extra metrics;
                                        ctx.frozen, ctx.workdir, ctx.writer, ctx.mesh, ctx.eval_iterator_fn
  frozen_abstract() -> boxed tree       (optional) logically-boxed shapes of networks that are used but not
  load_frozen() -> numpy tree           trained (a latent-diffusion run's VAE and text tower): the loop shards
                                        them once, passes them to every step, and never saves them
  export(host_state, ctx)               (optional) at the end of training, with the state as numpy arrays on
                                        every process: write the finished model to ctx.workdir/"export" as an
                                        sd_jax model directory (sd_jax/weights/store.py) for the next stage
"""

import importlib

TRAINERS = {
    "clip": "sd_jax.trainers.clip",
    "ddpm": "sd_jax.trainers.ddpm",
    "ldm": "sd_jax.trainers.ldm",
    "vae": "sd_jax.trainers.vae",
}


def get(name: str):
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r} is not a trainer. Valid trainers: {', '.join(sorted(TRAINERS))}.")
  return importlib.import_module(TRAINERS[name])
