"""The shared training loop: mesh, sharded state, compile, loop, evaluation, sample grids, logging, checkpoints.

Trainers (sd_jax/trainers/) provide the model, the loss and their evaluation through one typed interface,
`trainers.base.Task`; everything else is here so that the VAE, CLIP, LDM and DDPM trainers cannot drift apart.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import linen as nn

from sd_jax import checkpoint as ckpt_lib
from sd_jax import config_lib
from sd_jax import metrics as metrics_lib
from sd_jax import parallel
from sd_jax import images as images_lib
from sd_jax import trainers
from sd_jax import workdir_lock
from sd_jax.data import input_pipeline
from sd_jax.models import layers
from sd_jax.trainers import base

EXPORT_DIR = "export"  # WORKDIR/export: the finished model (sd_jax/weights/store.py), written by `task.export`


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss. The last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: number of train steps taken
  params: Any
  opt_state: Any
  ema_params: Any        # None when config.ema_decay == 0
  rng: jax.Array         # raw uint32[2] base key; per-step keys are fold_in(rng, step)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay or constant. Counted in optimizer updates."""
  updates = max(1, math.ceil(total_steps / optim.grad_accum_steps))
  warmup = min(optim.warmup_steps, updates)
  decay_steps = max(updates, warmup + 1)  # optax needs a non-empty decay phase after warmup
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim.lr, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=decay_steps, end_value=optim.lr * optim.end_lr_factor)
  if optim.schedule == "constant":
    if not warmup:
      return optax.constant_schedule(optim.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)], [warmup])
  raise ValueError(f"config.optim.schedule={optim.schedule!r}: use 'cosine' or 'constant'.")


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  schedule = learning_rate_schedule(optim, total_steps)
  if optim.name == "adamw":
    core = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  elif optim.name == "adam":
    core = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  elif optim.name == "sgd":
    core = optax.sgd(schedule, momentum=optim.b1)
  else:
    raise ValueError(f"config.optim.name={optim.name!r}: use adamw, adam or sgd.")
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), core) if optim.grad_clip_norm else core
  if optim.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
  return tx, schedule


# ---------------------------------------------------------------------------------------------------------------
# The step: a pure function of (state, batch), jitted with shardings or pmapped.


def _example_keys(state: TrainState, global_batch: int) -> jax.Array:
  """One key per example of the global batch, so the randomness is independent of the device split."""
  return jax.random.split(jax.random.fold_in(state.rng, state.step), global_batch)


def ema_decay(step, config) -> jax.Array:
  """The EMA decay applied after `step`: 0 (copy the params) before config.ema_start_step, then config.ema_decay,
  warmed up as min(ema_decay, (1 + k) / (10 + k)) over the k steps since the start when config.ema_warmup."""
  k = jnp.asarray(step, jnp.float32) - config.ema_start_step
  decay = jnp.asarray(config.ema_decay, jnp.float32)
  if config.get("ema_warmup", False):
    decay = jnp.minimum(decay, (1.0 + k) / (10.0 + k))
  return jnp.where(k >= 0, decay, 0.0)


def _apply_update(state: TrainState, grads, loss, metrics, *, tx, schedule, config) -> tuple[TrainState, dict]:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    decay = ema_decay(state.step, config)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
  metrics = dict(metrics)
  metrics["loss"] = loss
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["learning_rate"] = schedule(state.step // config.optim.grad_accum_steps)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
  return new_state, metrics


def _per_device_kernels(batch_sharding):
  """While tracing the step: Pallas kernels (splash attention) run per device over the batch's mesh axes."""
  if batch_sharding is None:
    return contextlib.nullcontext()
  axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return layers.splash_mesh(batch_sharding.mesh, axes)


def train_step(state: TrainState, batch, frozen, *, task, tx, schedule, config, global_batch: int,
               key_sharding=None):
  keys = _example_keys(state, global_batch)
  if key_sharding is not None:
    keys = jax.lax.with_sharding_constraint(keys, key_sharding)
  loss_fn = functools.partial(task.loss, step=state.step)
  with _per_device_kernels(key_sharding):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, keys)
  return _apply_update(state, grads, loss, metrics, tx=tx, schedule=schedule, config=config)


def train_step_pmap(state: TrainState, batch, frozen, *, task, tx, schedule, config, global_batch: int, axis: str):
  """The same step, data-parallel under pmap: each device takes its slice of the global batch's keys."""
  local = jax.tree.leaves(batch)[0].shape[0]
  index = jax.lax.axis_index(axis)
  keys = jax.lax.dynamic_slice_in_dim(_example_keys(state, global_batch), index * local, local)
  loss_fn = functools.partial(task.loss, step=state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, keys)
  grads, loss, metrics = jax.lax.pmean((grads, loss, metrics), axis)
  return _apply_update(state, grads, loss, metrics, tx=tx, schedule=schedule, config=config)


def eval_step(params, frozen, batch, *, task, seed: int, batch_sharding=None):
  """The task's held-out metrics of one batch (a full batch, or the split's smaller last one), with fixed draws."""
  keys = jax.random.split(jax.random.PRNGKey(seed), jax.tree.leaves(batch)[0].shape[0])
  with _per_device_kernels(batch_sharding):
    return task.eval_metrics(params, frozen, batch, keys)


# ---------------------------------------------------------------------------------------------------------------
# Setup


def check_config_against_devices(config, mesh, process_count: int) -> None:
  """Checks that need the mesh; run before anything is compiled."""
  dp = parallel.data_parallel_size(mesh, config.logical_axis_rules)
  if config.parallelism == "pmap":
    dp = len(mesh.devices.flat)
  if config.batch_size % dp:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                     f"(mesh {dict(mesh.shape)}). Change config.batch_size to a multiple of {dp}.")
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {process_count} processes.")


Context = base.Context  # what a task's host-side hooks get (sd_jax/trainers/base.py)


def resolve_workdir(workdir) -> epath.Path:
  """Local paths become absolute (orbax requires it); URLs such as gs://bucket/run are kept as they are."""
  workdir = str(workdir)
  return epath.Path(workdir if "://" in workdir else os.path.abspath(os.path.expanduser(workdir)))


def prepare_workdir(workdir) -> epath.Path:
  """The run's workdir, created if missing; a path that is a file, or one that cannot be created or written, is a
  ValueError naming it."""
  workdir = resolve_workdir(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a directory: pass a directory (created if missing).")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be created ({e.strerror or e}): pass a directory you can write "
                     "to.") from e
  if "://" not in str(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir} is not writable: pass a directory you can write to.")
  return workdir


def _write_config(config, task: base.Task, workdir: epath.Path) -> None:
  """WORKDIR/config.json: the resolved config, with the dataset the task reads (e.g. the clip trainer's tokenizer)."""
  if jax.process_index() == 0:
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.dataset = ml_collections.ConfigDict(task.dataset_config().to_dict())
    (workdir / "config.json").write_text(resolved.to_json_best_effort(indent=2, sort_keys=True))


@dataclasses.dataclass
class Setup:
  """Everything about a run that does not touch data or checkpoints: model, optimizer, mesh, sharded state."""
  config: ml_collections.ConfigDict
  task: base.Task
  tx: Any
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: TrainState
  abstract_state: TrainState     # ShapeDtypeStructs carrying the shardings
  boxed_params: Any              # params with their logical axis names
  init_fn: Any                   # rng -> sharded TrainState, one jitted program
  frozen_shardings: Any = None   # shardings of the task's frozen networks (None if it has none)
  jitted: dict = dataclasses.field(default_factory=dict, repr=False)  # jit_train_step / eval_fn, built once

  def load_frozen(self):
    """The task's frozen networks (e.g. the VAE and text tower of a latent-diffusion run), placed on the mesh."""
    if self.frozen_shardings is None:
      return None
    host = self.task.load_frozen()
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
        host, self.frozen_shardings)

  @property
  def batch_sharding(self):
    return parallel.batch_sharding(self.mesh, self.rules)

  def eval_fn(self):
    """`eval_step` jitted for this setup's task."""
    if "eval" not in self.jitted:
      self.jitted["eval"] = jax.jit(functools.partial(eval_step, task=self.task, seed=self.config.seed,
                                                      batch_sharding=self.batch_sharding))
    return self.jitted["eval"]


# The setups of this process's latest runs: a run of a config that already ran here on the same devices, reading the
# same files (a run resumed in a test or a notebook, a sweep point run twice in one process), takes the same Setup, so
# the same jitted init, step, eval and sampling functions, and JAX's in-memory caches skip tracing, lowering and
# compiling them again. The cost: up to SETUPS_KEPT finished runs' tasks stay in memory (a fine-tune's task holds its
# base networks on the host); `train._SETUPS.clear()` frees them.
_SETUPS: collections.OrderedDict = collections.OrderedDict()
SETUPS_KEPT = 4
_FINGERPRINT_FILES = 2_000  # a path in the config with more files below it is not fingerprinted: no reuse


def _files_fingerprint(config: ml_collections.ConfigDict) -> tuple | None:
  """(path, size, mtime) of every local file the config names, directories walked; None when a path is remote or too
  large to fingerprint (the setup is then built afresh). A Task reads its frozen and base networks, tokenizers and
  model configs at construction from these paths, so a file changed between two runs makes a new Setup."""
  strings: list[str] = []

  def collect(node):
    if isinstance(node, dict):
      for v in node.values():
        collect(v)
    elif isinstance(node, (list, tuple)):
      for v in node:
        collect(v)
    elif isinstance(node, str) and node:
      strings.append(node)

  collect(config.to_dict())
  found = []
  for path in sorted(set(strings)):
    if "://" in path:
      return None
    if not os.path.exists(path):
      continue
    if os.path.isfile(path):
      st = os.stat(path)
      found.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
      continue
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for name in sorted(files):
        st = os.stat(os.path.join(root, name))
        found.append((os.path.abspath(os.path.join(root, name)), st.st_size, st.st_mtime_ns))
        if len(found) > _FINGERPRINT_FILES:
          return None
  return tuple(found)


def cached_setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """setup(config, devices) for the config's own trainer, reusing one of this process's earlier runs when the config
  (every field), the devices, the data directory and the files the config names are the same."""
  devices = list(jax.devices() if devices is None else devices)
  files = _files_fingerprint(config)
  if files is None:
    return setup(config, devices)
  key = (config.to_json_best_effort(sort_keys=True), tuple((d.platform, d.process_index, d.id) for d in devices),
         jax.process_count(), os.environ.get("SD_JAX_DATA_DIR"), files)
  exp = _SETUPS.pop(key, None)
  if exp is None:
    exp = setup(copy.deepcopy(config), devices)  # its own copy: the caller may change theirs for the next run
  else:
    logging.info("The same config ran on these devices earlier in this process: reusing its traced and compiled "
                 "programs.")
  _SETUPS[key] = exp
  while len(_SETUPS) > SETUPS_KEPT:
    _SETUPS.popitem(last=False)
  return exp


def setup(config: ml_collections.ConfigDict, devices=None, task=None) -> Setup:
  """Validates the config against the devices and builds the sharded-state machinery (nothing is compiled).

  `task`: a trainers.base.Task to use instead of `trainers.get(config.trainer).Task(config)` (e.g. sd_jax.bench's
  U-Net on precomputed latents)."""
  config_lib.validate(config)
  trainer_module = trainers.get(config.trainer) if task is None else None
  input_pipeline.validate_config(config.dataset)
  devices = list(jax.devices() if devices is None else devices)
  mesh = parallel.create_mesh(config.mesh, devices)
  check_config_against_devices(config, mesh, jax.process_count())
  rules = parallel.rules_tuple(config.logical_axis_rules)
  task = trainer_module.Task(config) if task is None else task
  tx, schedule = make_optimizer(config.optim, config.total_steps)

  # eval_shape with the params still logically boxed, so optimizer and EMA state inherit the axis names
  # -> logical-to-mesh shardings -> jit(init, out_shardings).
  def boxed_init(rng) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    with _per_device_kernels(parallel.batch_sharding(mesh, rules)):  # init runs the model once
      params = task.init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if config.ema_decay > 0 else None, rng=state_rng)

  boxed_state = jax.eval_shape(boxed_init, jax.random.PRNGKey(config.seed))
  state_shardings = parallel.logical_to_sharding(boxed_state, mesh, rules)
  abstract_state = nn.meta.unbox(boxed_state)
  if config.parallelism == "pmap":
    # pmap keeps every array replicated on each device; the checkpoint format is the same as the jit path's.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)
  frozen_abstract = task.frozen_abstract()
  frozen_shardings = None if frozen_abstract is None else parallel.logical_to_sharding(frozen_abstract, mesh, rules)
  return Setup(config=config, task=task, tx=tx, schedule=schedule, mesh=mesh, rules=rules,
               state_shardings=state_shardings, abstract_state=abstract_sharded, boxed_params=boxed_state.params,
               init_fn=_unboxed(jax.jit(boxed_init, out_shardings=state_shardings)),
               frozen_shardings=frozen_shardings)


def _unboxed(boxed_init_fn):
  """The jitted init without its logical-axis boxes. It jits the function eval_shape traced above, whose jaxpr JAX
  keeps (its trace cache is keyed by the function): the model is traced once, not once for the shapes and again for
  the program. The out_shardings (a tree of the unboxed state) apply to each box's value."""
  @functools.wraps(boxed_init_fn)
  def init_fn(rng):
    return nn.meta.unbox(boxed_init_fn(rng))
  return init_fn


def jit_train_step(exp: Setup):
  """`train_step` jitted with the setup's shardings and the state donated: the loop's step (and the bench's). Built
  once per Setup."""
  if "train_step" not in exp.jitted:
    config = exp.config
    exp.jitted["train_step"] = jax.jit(
        functools.partial(train_step, task=exp.task, tx=exp.tx, schedule=exp.schedule, config=config,
                          global_batch=config.batch_size, key_sharding=exp.batch_sharding),
        in_shardings=(exp.state_shardings, exp.batch_sharding, exp.frozen_shardings),
        out_shardings=(exp.state_shardings, None), donate_argnums=0)
  return exp.jitted["train_step"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
                       task: base.Task | None = None) -> dict[str, float]:
  """Trains `config.trainer` in `workdir`, resuming from the workdir's checkpoints. Returns the last metrics.

  `devices` restricts the mesh to a subset of devices (tests); by default all devices of all processes. `task`
  trains a trainers.base.Task of one's own instead of config.trainer's.
  """
  exp = setup(config, devices, task=task) if task is not None else cached_setup(config, devices)
  workdir = prepare_workdir(workdir)
  # One run per workdir (sd_jax/workdir_lock.py): taken before anything is written there.
  with workdir_lock.WorkdirLock(workdir):
    return _train(exp, workdir)


def _train(exp: Setup, workdir: epath.Path) -> dict[str, float]:
  """train_and_evaluate in a workdir this run holds."""
  config = exp.config
  task, tx, schedule, mesh, state_shardings = exp.task, exp.tx, exp.schedule, exp.mesh, exp.state_shardings
  if config.total_steps == 0 and not any(p.name.isdigit() for p in ckpt_lib.checkpoint_dir(str(workdir)).glob("*")):
    if not config.init_from:
      raise ValueError("config.total_steps=0 in a workdir with no checkpoint: nothing would be trained and the export "
                       "would be an untrained model. Set --config.total_steps to the number of steps to train (or "
                       "--config.init_from to export the params of another run as they are).")
    logging.warning("config.total_steps=0: the export will hold the params of config.init_from=%s, untrained.",
                    config.init_from)
  # --- Data (a task may first write derived data, e.g. the ldm trainer's precomputed latents).
  task.prepare_data(workdir)
  _write_config(config, task, workdir)
  logging.info("Mesh %s over %d devices (%s), %d process(es).", dict(mesh.shape), mesh.devices.size,
               mesh.devices.flat[0].platform, jax.process_count())
  global_batch = config.batch_size

  dataset = task.dataset_config()
  data_iter = input_pipeline.create_iterator(dataset, split=dataset.train_split,
                                       global_batch_size=global_batch, seed=config.seed, train=True)

  # --- Resume order: own checkpoint, else init_from, else fresh init.
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=config.keep, async_save=config.async_checkpointing)
  state, start_step = checkpointer.restore_latest(exp.abstract_state, data_iter,
                                                  strict=config.strict_restore)
  if state is not None:
    logging.info("Resuming from %s step %d.", ckpt_lib.checkpoint_dir(str(workdir)), start_step)
  else:
    state = exp.init_fn(jax.random.PRNGKey(config.seed))
    initial = task.initial_params(state.params, state_shardings.params)
    if initial is not None:  # e.g. a fine-tune's base weights, restored onto their shardings
      state = _with_params(state, initial, state_shardings, tx)
    if config.init_from:
      state = _init_from(state, config, exp.boxed_params, state_shardings, tx)
    start_step = 0
  metrics_lib.truncate_after(workdir, start_step)

  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  frozen = exp.load_frozen()
  eval_fn = exp.eval_fn()
  ctx = Context(config=config, workdir=workdir, mesh=mesh, writer=writer, eval_iterator_fn=lambda: (
      input_pipeline.create_iterator(dataset, split=dataset.eval_split, global_batch_size=global_batch,
                                     seed=config.seed, train=False)), frozen=frozen, batch_sharding=exp.batch_sharding)

  # --- Compile the step ahead of time.
  batch_sharding = exp.batch_sharding
  if config.parallelism == "pmap":
    step_fn, put_batch, put_state, get_state = _pmap_step(config, task, tx, schedule, mesh, global_batch)
    state = put_state(state)
    frozen = put_state(frozen) if frozen is not None else None
  else:
    step_fn = jit_train_step(exp)
    put_batch = functools.partial(parallel.host_batch_to_global, sharding=batch_sharding)
    get_state = lambda s: s  # noqa: E731

  last_metrics: dict[str, float] = {}
  if start_step >= config.total_steps:
    logging.info("Nothing to do: step %d >= total_steps %d.", start_step, config.total_steps)
    from sd_jax.weights import store  # pylint: disable=import-outside-toplevel
    if not (workdir / EXPORT_DIR / store.INDEX_FILE).exists():
      logging.info("The finished run has no %s/ (stopped while exporting?): exporting now.", EXPORT_DIR)
      _export(task, state, ctx)
    checkpointer.close()
    writer.close()
    return last_metrics

  first_batch = put_batch(next(data_iter))
  t0 = time.time()
  if config.parallelism == "jit":
    compiled = step_fn.lower(state, first_batch, frozen).compile()
    _log_compiled(compiled)
    step_fn = compiled
  logging.info("Compiled the train step in %.1fs.", time.time() - t0)
  parallel.sync_processes("sd_jax_train_step_compiled")  # hosts compile at different speeds

  progress = metrics_lib.Progress(start_step, config.total_steps)
  pending = None  # (step, device metrics) of the previous step, fetched one step late
  window: list[dict[str, float]] = []

  def finish(step_done: int, device_metrics) -> dict[str, float]:
    """Fetches a step's metrics; stops on a non-finite loss."""
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(values["loss"]):
      raise NonFiniteLossError(
          f"loss is {values['loss']} at step {step_done}. Training stopped; the last good checkpoint "
          f"({checkpointer.latest_step()}) is kept. Lower config.optim.lr or check the data.")
    window.append(values)
    return values

  batch = first_batch
  step = start_step
  try:
    with ckpt_lib.PreemptionWatcher() as preemption:
      while step < config.total_steps:
        state, device_metrics = step_fn(state, batch, frozen)
        if config.parallelism == "pmap":
          device_metrics = jax.tree.map(lambda x: x[0], device_metrics)
        if pending is not None:
          finish(*pending)
        step += 1
        pending = (step, device_metrics)
        is_last = step == config.total_steps
        if step % config.log_every_steps == 0 or is_last:
          last_metrics = finish(*pending)
          pending = None
          row = dict(last_metrics)
          row["loss_mean"] = float(np.mean([w["loss"] for w in window]))
          window.clear()
          row.update(progress.update(step))
          writer.write(step, row)
          progress.console(step, row)
        if due(step, config.eval_every_steps, is_last):
          _evaluate(step, get_state(state), task, ctx, eval_fn, config, batch_sharding, writer)
        if due(step, config.sample_every_steps, is_last):
          _write_grid(step, get_state(state), task, ctx)
        save_now = step % config.save_every_steps == 0 or is_last
        preempted = preemption.reached(step)
        if save_now or preempted:
          if pending is not None:
            finish(*pending)
            pending = None
          checkpointer.save(step, get_state(state), data_iter)
        if preempted:
          logging.warning("Preempted: saved step %d; exiting.", step)
          break
        if is_last:
          _export(task, get_state(state), ctx)
        if step < config.total_steps:
          batch = put_batch(next(data_iter))
  finally:
    checkpointer.close()
    writer.close()
  return last_metrics


def _export(task, state: TrainState, ctx: Context) -> None:
  """The finished model, for the next stage or for other tools: WORKDIR/export/ (sd_jax/weights/store.py)."""
  from jax.experimental import multihost_utils
  host_state = multihost_utils.process_allgather(state, tiled=True)
  task.export(host_state, ctx)


def _init_from(state: TrainState, config, boxed_params, state_shardings, tx) -> TrainState:
  loaded, mask = ckpt_lib.load_params(config.init_from, nn.meta.unbox(boxed_params), state_shardings.params,
                                      allow_partial=config.init_allow_partial)
  params = jax.tree.map(lambda new, fresh, ok: new if ok else fresh, loaded, state.params, mask,
                        is_leaf=lambda x: x is None)
  logging.info("init_from %s: loaded %d of %d arrays.", config.init_from, sum(jax.tree.leaves(mask)),
               len(jax.tree.leaves(mask)))
  return _with_params(state, params, state_shardings, tx)


def _with_params(state: TrainState, params, state_shardings, tx) -> TrainState:
  """A fresh state's params replaced, with the optimizer state and EMA started from them."""
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  # EMA starts from the new params, in buffers of its own (the step donates the state).
  ema_params = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
  return state.replace(params=params, opt_state=opt_state, ema_params=ema_params)


def due(step: int, every: int, is_last: bool) -> bool:
  """Periodic work: every `every` steps and at the end; 0 = only at the end; -1 = never."""
  if every < 0:
    return False
  return is_last or (every > 0 and step % every == 0)


def _pmap_step(config, task, tx, schedule, mesh, global_batch):
  devices = list(mesh.devices.flat)
  local_devices = [d for d in devices if d.process_index == jax.process_index()]
  axis = "batch"
  fn = jax.pmap(functools.partial(train_step_pmap, task=task, tx=tx, schedule=schedule, config=config,
                                  global_batch=global_batch, axis=axis),
                axis_name=axis, devices=devices, donate_argnums=0)

  n = len(local_devices)
  # pmap takes arrays whose leading axis is split over its devices.
  stacked = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(local_devices), ("pmap",)),
                                       jax.sharding.PartitionSpec("pmap"))

  def put_batch(local_batch):
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x).reshape(n, -1, *np.shape(x)[1:]), stacked),
                        local_batch)

  def put_state(state):
    host = jax.device_get(state)
    return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), stacked), host)

  def get_state(state):
    return jax.tree.map(lambda x: np.asarray(x[0]) if hasattr(x, "shape") else x, jax.device_get(state))

  return fn, put_batch, put_state, get_state


def _log_compiled(compiled) -> None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get("flops", float("nan")) if cost else float("nan")
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0
    logging.info("Train step: %.3g FLOPs (XLA cost analysis), %.1f MiB temporaries per device.", flops, temp / 2**20)
  except Exception as e:  # cost/memory analysis is informational; some backends do not implement it.
    logging.info("Compiled step analysis unavailable: %s", e)


def eval_params(state: TrainState):
  """The parameters evaluation, sample grids and export use: the EMA parameters when the run keeps them."""
  return state.ema_params if state.ema_params is not None else state.params


def _evaluate(step, state, task: base.Task, ctx: Context, eval_fn, config, batch_sharding, writer) -> None:
  """Held-out metrics (averaged over the examples of the eval split, config.eval_batches batches at most) and the
  trainer's own evaluation hook.

  A smaller last batch (or a split smaller than the batch) is evaluated too, trimmed to a multiple of the
  data-parallel size (one more compile of the evaluation step); what cannot be evaluated is said in the log."""
  results: dict[str, float] = {}
  parallel.sync_processes(f"sd_jax_eval_{step}")
  params = eval_params(state)
  data_parallel = parallel.data_parallel_size(ctx.mesh, config.logical_axis_rules)
  sums: dict[str, float] = {}
  count = batches = skipped = 0
  for local_batch in ctx.eval_iterator_fn():
    local = jax.tree.leaves(local_batch)[0].shape[0]
    n = local * jax.process_count()
    if n != config.batch_size:
      if jax.process_count() > 1:  # hosts may hold different tails: keep every host's program the same
        skipped += n
        break
      usable = local // data_parallel * data_parallel
      skipped += local - usable
      if not usable:
        break
      local_batch = jax.tree.map(lambda x, u=usable: x[:u], local_batch)
      n = usable
    batch = parallel.host_batch_to_global(local_batch, batch_sharding)
    values = jax.device_get(eval_fn(params, ctx.frozen, batch))
    for k, v in values.items():
      sums[k] = sums.get(k, 0.0) + float(v) * n
    count += n
    batches += 1
    if 0 < config.eval_batches <= batches:
      break
  if skipped:
    logging.warning("eval step %d: %d example(s) of the %s split were not evaluated (%s).", step, skipped,
                    task.dataset_config().eval_split,
                    "a partial last batch with several processes" if jax.process_count() > 1 else
                    f"not a multiple of the {data_parallel} data-parallel devices")
  if not count and skipped:
    logging.warning("eval step %d: no held-out metrics: the %s split has fewer examples than can be evaluated.",
                    step, task.dataset_config().eval_split)
  results.update({f"eval_{k}": v / count for k, v in sums.items()} if count else {})
  results.update(task.on_eval(step, params, ctx) or {})
  if results:
    writer.write(step, results)
    logging.info("eval step %d: %s", step, json.dumps({k: round(v, 5) for k, v in results.items()}))


def _write_grid(step: int, state, task: base.Task, ctx: Context) -> None:
  """The task's sample grid (EMA parameters): WORKDIR/samples/step_<step>.png and TensorBoard."""
  grid = task.sample_grid(eval_params(state), ctx)
  if grid is None or jax.process_index() != 0:
    return
  out = epath.Path(ctx.workdir) / "samples"
  out.mkdir(parents=True, exist_ok=True)
  images_lib.save_png(grid, out / f"step_{step:07d}.png")
  ctx.writer.write_image(step, task.grid_tag, grid)
