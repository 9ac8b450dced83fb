"""The interface between the shared training loop (sd_jax/train.py) and a trainer.

A trainer is a subclass of `Task`, chosen by `config.trainer` (sd_jax/trainers/__init__.py). It says what is
trained (`init_params`), what is minimised (`loss`) and what it does with a finished model (`export`); everything
else has a default that does nothing, so a trainer overrides only what it has. The loop owns the rest: the mesh and
sharded state, the data iterators, the optimizer and EMA, checkpoints and resume, logging, when to evaluate, when a
sample grid is due and where it is written.

Conventions:
  * `params` are the trained parameters (a Flax tree); `frozen` the networks used but not trained (the VAE and text
    tower of a latent-diffusion run, the locked image tower of LiT), sharded once by the loop, passed to every
    step and never saved; None when the task has none.
  * `keys` is one PRNG key per example of the global batch, [B, 2]: a task draws each example's randomness from
    its own key, so the losses do not depend on how the batch is split over devices.
  * Host-side hooks (`on_eval`, `sample_grid`, `export`) get a `Context` (what the loop knows of the run) and the
    parameters to evaluate: the EMA parameters when the run keeps them, else the trained ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from etils import epath

Params = Any  # a Flax parameter tree (arrays, or logically boxed arrays from `init_params`)
Metrics = dict[str, jax.Array]


@dataclasses.dataclass
class Context:
  """What a task's host-side hooks may use of the run."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  writer: Any                                   # sd_jax.metrics.MetricWriter (host 0 writes, others no-op)
  eval_iterator_fn: Callable[[], Iterator]      # a fresh iterator over the held-out split, in order
  frozen: Any = None                            # the task's frozen networks (sharded), or None
  batch_sharding: jax.sharding.Sharding | None = None  # how a global batch is laid out on the mesh


class Task:
  """Base class of the trainers; see the module docstring. Subclasses set `config` in their constructor."""

  # The TensorBoard tag of the grid that `sample_grid` draws.
  grid_tag: ClassVar[str] = "samples"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # -- what is trained -------------------------------------------------------------------------------------------

  def init_params(self, rng: jax.Array) -> Params:
    """Freshly initialised, logically boxed params (the loop shards them from their axis names)."""
    raise NotImplementedError(f"{type(self).__name__} must define init_params.")

  def loss(self, params: Params, frozen: Any, batch: dict[str, jax.Array], keys: jax.Array,
           step: jax.Array | None) -> tuple[jax.Array, Metrics]:
    """(scalar loss, metrics) of one global batch; pure and jittable. `step` is the number of steps taken (a traced
    int32; None outside training, e.g. in `eval_metrics`)."""
    raise NotImplementedError(f"{type(self).__name__} must define loss.")

  def initial_params(self, params: Params, shardings: Any) -> Params | None:
    """The params a fresh run starts from instead of `init_params`' values (the same tree; e.g. a fine-tune's base
    weights restored straight onto `shardings`, never through the jitted init as constants). Default: None, keep
    `init_params`' values. The loop then starts the optimizer state and the EMA from them."""
    del params, shardings
    return None

  def eval_metrics(self, params: Params, frozen: Any, batch: dict[str, jax.Array], keys: jax.Array) -> Metrics:
    """Metrics of one held-out batch, averaged over the eval split by the loop (logged as eval_<name>). Default:
    the training loss."""
    loss, _ = self.loss(params, frozen, batch, keys, None)
    return {"loss": loss}

  # -- data and frozen networks ------------------------------------------------------------------------------------

  def dataset_config(self) -> ml_collections.ConfigDict:
    """The dataset the loop reads (and records in config.json), asked after `prepare_data`. Default: config.dataset.
    A task that completes it (e.g. the clip trainer's own tokenizer) returns a completed copy; it never writes into
    the config."""
    return self.config.dataset

  def prepare_data(self, workdir: epath.Path) -> None:
    """Runs once, in a workdir this run holds, before the data iterators are made and config.json is written: may
    write derived data there (the fine-tune trainer's dataset and class images) or elsewhere (the ldm trainer's
    precomputed latents)."""

  def frozen_abstract(self) -> Any | None:
    """Logically boxed shapes of the frozen networks (None: the task has none)."""
    return None

  def load_frozen(self) -> Any | None:
    """The frozen networks as host arrays, in the layout of `frozen_abstract`."""
    return None

  # -- host-side hooks -----------------------------------------------------------------------------------------------

  def on_eval(self, step: int, params: Params, ctx: Context) -> dict[str, float]:
    """Evaluation beyond the per-batch metrics (retrieval, sample quality, ...): {name: value} to log."""
    del step, params, ctx
    return {}

  def sample_grid(self, params: Params, ctx: Context) -> np.ndarray | None:
    """One uint8 image [H, W, 3] that shows what the model does (samples, reconstructions), or None. The loop calls
    it every config.sample_every_steps steps and writes WORKDIR/samples/step_<N>.png and TensorBoard `grid_tag`."""
    del params, ctx
    return None

  def export(self, host_state: Any, ctx: Context) -> None:
    """At the end of training, with the train state as host arrays on every process: write the finished model to
    WORKDIR/export. Called again by a rerun of a finished run whose export is missing."""
    del host_state, ctx
