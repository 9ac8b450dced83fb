"""Checkpoints: orbax CheckpointManager, exact resume, `init_from`, and preemption.

Layout: `WORKDIR/checkpoints/<step>/{state,data}` where `state` is the whole train state (step, params, optimizer
state, EMA params, RNG) and `data` is the grain iterator state of every process.

Resume order (see DESIGN.md): the workdir's own latest complete checkpoint, else `config.init_from` (params only,
with a readable diff on mismatch), else a fresh init. Orbax writes each step into a temporary directory and renames
it when the save is complete, so a half-written checkpoint (process killed mid-save) is never listed and never
restored; `latest_step` also requires orbax's commit marker where the filesystem uses one.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


class Checkpointer:
  """The train state and the data iterator, saved together at one step."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, with_data: bool = True):
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
    except ValueError as e:
      raise ValueError(f"checkpoint {step} in {self.manager.directory} does not fit the current config (optimizer "
                       f"or EMA settings changed?): {e}\nUse a new --workdir, or --config.init_from to load params "
                       "only.") from e
    return restored["state"]

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Fails with a readable key diff when the checkpoint's params do not fit the current model."""
    state_dir = epath.Path(self.manager.directory) / str(step) / "state"
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
    found = getattr(metadata, "tree", metadata)
    diff = format_diff(*tree_diff(abstract_state.params, found.get("params", {})))
    if diff:
      raise ValueError(
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
