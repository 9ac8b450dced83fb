"""Checkpoints: orbax CheckpointManager, exact resume, `init_from`, and preemption.

Layout: `WORKDIR/checkpoints/<step>/{state,data}` where `state` is the whole train state (step, params, optimizer
state, EMA params, RNG) and `data` is the grain iterator state of every process.

Resume order (see DESIGN.md): the workdir's own latest complete checkpoint, else `config.init_from` (params only,
with a readable diff on mismatch), else a fresh init. Orbax writes each step into a temporary directory and renames
it when the save is complete, so a half-written checkpoint (process killed mid-save) is never listed and never
restored; `latest_step` also requires orbax's commit marker where the filesystem uses one.

A complete checkpoint can still be damaged afterwards (a file deleted or truncated on disk): `restore_latest` checks
the files of the newest checkpoint and reads it; when it cannot, it says which files are damaged, moves the
checkpoint aside to `checkpoints/<step>.damaged` (never deletes it) and falls back to the previous one, loudly, or
with `strict=True` (config.strict_restore) stops with that message. A checkpoint that reads fine but does not fit
the config (another model or optimizer) is not damage: that stops the run with the difference.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import signal
import sys
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


DAMAGED_SUFFIX = ".damaged"  # checkpoints/<step>.damaged: moved aside, kept for inspection


class CheckpointMismatchError(ValueError):
  """The checkpoint is readable but was written by a run with another model or optimizer."""


class DamagedCheckpointError(RuntimeError):
  """A checkpoint's files are missing or unreadable."""


@contextlib.contextmanager
def _quiet_closed_event_loops():
  """Orbax's reads of a damaged checkpoint leave tensorstore callbacks that fire after orbax closed its asyncio loop;
  Python prints each as an "Exception ignored ... Event loop is closed" traceback. The damage itself is reported
  (and logged) by restore_latest, so those are dropped; any other unraisable exception still reaches the hook.
  Yields a list: the caller appends to it when a read failed (only then are there callbacks to flush)."""
  previous = sys.unraisablehook
  failed_reads = []

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  raised = True
  try:
    yield failed_reads
    raised = False
  finally:
    if raised or failed_reads:
      gc.collect()  # let the orphaned callbacks run while the hook is in place (a full collection: ~0.3 s)
    sys.unraisablehook = previous


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def write_whole_replicas_on_cpu() -> bool:
  """On CPU devices, orbax writes each replicated array from one replica instead of from a slice per replica.

  Orbax's replica-parallel saving splits an array that is replicated over N devices into N slices, each copied to
  the host from its own device: on accelerators, N device-to-host links at once. On CPU devices the "device"
  buffers are host memory already, so the split only costs N slicing programs per array shape (each compiled once
  per process, then dispatched every save) and N small copies. Off on CPU: an 8-device data-parallel run of the ddpm
  test U-Net, 4 steps with a save after each and every program already compiled, took 12.0 s with the slices and
  6.2 s without (2026-12-04, machine F). The files are the same. Returns whether orbax's jax.Array handler now
  writes whole replicas (True on CPU)."""
  if jax.default_backend() != "cpu":
    return False
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_use_replica_parallel", False):
    handler = copy.copy(current)
    handler._use_replica_parallel = False  # ArrayHandler(use_replica_parallel=False), keeping its other settings
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  # False if this orbax has no such attribute (renamed): tests/test_train.py catches that.
  return getattr(ocp.type_handlers.get_type_handler(jax.Array), "_use_replica_parallel", None) is False


class Checkpointer:
  """The train state and the data iterator, saved together at one step."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, with_data: bool = True):
    write_whole_replicas_on_cpu()
    self._with_data = with_data
    item_names = ("state", "data") if with_data else ("state",)
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_names=item_names,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None) -> None:
    items = dict(state=ocp.args.StandardSave(state))
    if self._with_data:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores `step` onto the shardings in `abstract_state` (any mesh: restore reshards).

    A checkpoint written by a different model or optimizer fails with the key diff, before anything is read.
    """
    self.check_compatible(step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if self._with_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - damaged, or another config: `unreadable` tells which
      problems = self.unreadable(step)
      if problems:
        raise DamagedCheckpointError(self._damage_message(step, problems)) from e
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.manager.directory} does not fit the current config (optimizer or EMA settings "
          f"changed?): {e}\nUse a new --workdir, or --config.init_from to load params only.") from e
    return restored["state"]

  # -- damage --------------------------------------------------------------------------------------------------------

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.manager.directory) / str(step)

  def missing_files(self, step: int) -> list[str]:
    """The files a restore needs that are not there (paths relative to the checkpoints directory)."""
    step_dir, missing = self.step_dir(step), []
    state = step_dir / "state"
    if not state.is_dir():
      return [f"{step}/state/"]
    needed = [state / "_METADATA"]
    if (state / "d").is_dir() or any(state.glob("ocdbt.process_*")):  # OCDBT: the manifests index the data files
      needed.append(state / "manifest.ocdbt")
      needed += [p / "manifest.ocdbt" for p in state.glob("ocdbt.process_*")]
    if self._with_data:
      needed.append(step_dir / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    for path in needed:
      if not path.exists():
        missing.append(str(path.relative_to(self.manager.directory)))
    return missing

  def unreadable(self, step: int) -> list[str]:
    """What cannot be read of checkpoint `step` (missing files, or files that fail to read), read without the
    current config: an empty list means the checkpoint is whole."""
    problems = [f"{path} is missing" for path in self.missing_files(step)]
    if problems:
      return problems
    state = self.step_dir(step) / "state"
    try:
      metadata = ocp.PyTreeCheckpointer().metadata(state).item_metadata
      tree = getattr(metadata, "tree", metadata)
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      ocp.PyTreeCheckpointer().restore(state, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # noqa: BLE001 - any failure to read the files is damage
      problems.append(f"{step}/state/ cannot be read ({_first_line(e)})")
    if self._with_data:
      data_file = self.step_dir(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      try:
        json.loads(data_file.read_text())
      except (OSError, ValueError) as e:
        problems.append(f"{data_file.relative_to(self.manager.directory)} cannot be read ({_first_line(e)})")
    return problems

  def _damage_message(self, step: int, problems: list[str]) -> str:
    return f"checkpoint {step} in {self.manager.directory} is damaged: " + "; ".join(problems) + "."

  def move_aside(self, step: int) -> epath.Path:
    """Renames checkpoints/<step> to checkpoints/<step>.damaged (process 0; every process waits for it)."""
    from sd_jax import parallel  # pylint: disable=import-outside-toplevel
    source = self.step_dir(step)
    target = source.parent / f"{step}{DAMAGED_SUFFIX}"
    n = 1
    while target.exists():
      n += 1
      target = source.parent / f"{step}{DAMAGED_SUFFIX}{n}"
    if jax.process_index() == 0:
      source.rename(target)
    parallel.sync_processes(f"sd_jax_move_aside_{step}")
    self.manager.reload()
    return target

  def restore_latest(self, abstract_state: Any, data_iterator=None, *, strict: bool = False
                     ) -> tuple[Any, int] | tuple[None, None]:
    """(state, step) of the newest checkpoint that reads, or (None, None) when there is none.

    A damaged checkpoint is moved aside (never deleted) and the previous one tried, with an error in the log; with
    `strict`, DamagedCheckpointError instead. Every checkpoint damaged is an error too: never a silent fresh start.
    """
    with _quiet_closed_event_loops() as failed_reads:
      return self._restore_latest(abstract_state, data_iterator, strict, failed_reads)

  def _restore_latest(self, abstract_state, data_iterator, strict, failed_reads):
    steps = sorted(self.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      missing = self.missing_files(step)
      try:
        if missing:
          raise DamagedCheckpointError(self._damage_message(step, [f"{p} is missing" for p in missing]))
        state = self.restore(step, abstract_state, data_iterator)
        if int(state.step) != step:
          raise DamagedCheckpointError(self._damage_message(step, [f"it holds the state of step {int(state.step)}"]))
        return state, step
      except DamagedCheckpointError as e:
        failed_reads.append(step)
        if strict:
          raise DamagedCheckpointError(f"{e} config.strict_restore=True: stopping. Repair or move the checkpoint "
                                       "away, or set config.strict_restore=False to fall back to the previous "
                                       "one.") from e
        target = self.move_aside(step)
        damaged.append(step)
        logging.error("%s It is moved to %s (kept, not deleted); falling back to the previous checkpoint.", e, target)
    if damaged:
      raise DamagedCheckpointError(
          f"every checkpoint in {self.manager.directory} is damaged (steps {damaged}, moved to <step>"
          f"{DAMAGED_SUFFIX}); not starting from scratch in a workdir that had them. Repair one, or use a new "
          "--workdir (with --config.init_from=... to start from another run's params).")
    return None, None

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Fails with a readable key diff when the checkpoint's params do not fit the current model."""
    state_dir = epath.Path(self.manager.directory) / str(step) / "state"
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
    found = getattr(metadata, "tree", metadata)
    diff = format_diff(*tree_diff(abstract_state.params, found.get("params", {})))
    if diff:
      raise CheckpointMismatchError(
          f"{state_dir} was written by a run with a different model:\n{diff}\n"
          "Use a new --workdir for a new config, or load params only with --config.init_from=OLD_WORKDIR.")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------------------------------------------
# init_from: params only, from another workdir or a checkpoint directory.


def resolve_state_dir(path: str) -> epath.Path:
  """Finds the `state` item directory for a workdir, a checkpoints/ dir, a step dir or a state dir."""
  p = epath.Path(path if "://" in str(path) else os.path.abspath(os.path.expanduser(str(path))))
  if not p.exists():
    raise FileNotFoundError(f"config.init_from={path!r} does not exist. Give a workdir or a checkpoint directory.")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  steps = sorted(int(c.name) for c in p.iterdir() if c.is_dir() and c.name.isdigit()) if p.is_dir() else []
  if steps:
    complete = [s for s in steps if ocp.step.is_checkpoint_finalized(p / str(s))]
    if not complete:
      raise FileNotFoundError(f"config.init_from={path!r}: no complete checkpoint under {p}.")
    p = p / str(complete[-1])
  if (p / "state").is_dir():
    p = p / "state"
  elif (p / "params" / "_METADATA").exists():  # a component of an sd_jax model directory (weights/store.py)
    p = p / "params"
  if not (p / "_METADATA").exists():
    raise FileNotFoundError(
        f"config.init_from={path!r}: {p} is not an sd_jax checkpoint (expected WORKDIR, WORKDIR/checkpoints, "
        "WORKDIR/checkpoints/<step>, its state/ directory, or a component of a converted model such as OUT/unet).")
  return p


def _flat(tree) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_diff(expected: Any, found: Any) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, mis-shaped) keys of `found` relative to `expected` (both trees of shaped leaves)."""
  exp, got = _flat(expected), _flat(found)
  missing = sorted(set(exp) - set(got))
  unexpected = sorted(set(got) - set(exp))
  misshaped = sorted(f"{k}: expected {tuple(exp[k].shape)}, found {tuple(got[k].shape)}"
                     for k in set(exp) & set(got) if tuple(exp[k].shape) != tuple(got[k].shape))
  return missing, unexpected, misshaped


def format_diff(missing, unexpected, misshaped, limit: int = 50) -> str:
  lines = []
  for title, keys in (("missing (in the model, not in the checkpoint)", missing),
                      ("unexpected (in the checkpoint, not in the model)", unexpected),
                      ("wrong shape", misshaped)):
    if keys:
      lines.append(f"  {title}: {len(keys)}")
      lines.extend(f"    {k}" for k in keys[:limit])
      if len(keys) > limit:
        lines.append(f"    ... and {len(keys) - limit} more")
  return "\n".join(lines)


def load_params(path: str, abstract_params: Any, shardings: Any, *, allow_partial: bool,
                subtree: str = "params") -> tuple[Any, Any]:
  """Loads the `subtree` of a checkpoint's state onto `shardings`.

  Returns (params, loaded_mask) where params holds the checkpoint values for every key that matches in name and
  shape and None elsewhere; loaded_mask is a tree of bools. A mismatch raises with a readable diff unless
  `allow_partial`.
  """
  state_dir = resolve_state_dir(path)
  metadata = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
  metadata = getattr(metadata, "tree", metadata)
  if subtree not in metadata:
    raise ValueError(f"init_from {state_dir}: no '{subtree}' in the checkpoint (found {sorted(metadata)}).")
  found = metadata[subtree]
  missing, unexpected, misshaped = tree_diff(abstract_params, found)
  diff = format_diff(missing, unexpected, misshaped)
  if diff:
    message = f"init_from {state_dir} does not match the model:\n{diff}"
    if not allow_partial:
      raise ValueError(message + "\nFix the config, or set config.init_allow_partial=True to load what matches.")
    logging.warning("%s\n(partial load allowed: the rest keeps its fresh initialisation)", message)
  else:
    logging.info("init_from %s: all %d arrays match.", state_dir, len(_flat(abstract_params)))

  found_flat = _flat(found)
  bad = set(missing) | {m.split(":")[0] for m in misshaped}
  exp_flat = _flat(abstract_params)
  shard_flat = _flat(shardings)
  keep = {k for k in exp_flat if k not in bad and k in found_flat}

  # Build a restore target holding only the keys we load, nested like the checkpoint.
  def nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
      node = out
      parts = key.split("/")
      for part in parts[:-1]:
        node = node.setdefault(part, {})
      node[parts[-1]] = value
    return out

  item = nest({k: jax.ShapeDtypeStruct(exp_flat[k].shape, exp_flat[k].dtype) for k in keep})
  restore_args = nest({k: ocp.ArrayRestoreArgs(sharding=shard_flat[k], dtype=exp_flat[k].dtype) for k in keep})
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(item={subtree: item}, restore_args={subtree: restore_args},
                                             partial_restore=True))[subtree] if keep else {}
  restored_flat = _flat(restored)
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  keys = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in paths]
  values = [restored_flat.get(k) for k in keys]
  mask = [k in restored_flat for k in keys]
  return jax.tree_util.tree_unflatten(treedef, values), jax.tree_util.tree_unflatten(treedef, mask)


# ---------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM sets a flag; the loop saves at the current step and exits cleanly.


class PreemptionWatcher:
  """Catches SIGTERM. With several processes, all agree on the step via JAX's preemption sync point."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint at the current step and exit.")
    self._event.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:
        pass  # preemption sync service not started (jax.distributed without it): fall back to the local flag
    return self._event.is_set()
