"""How a global stream of examples becomes per-host batches, and a checkpointable iterator over them.

Shared by the image input pipeline (input_pipeline.py) and precomputed latents (precomputed.py), so both lay out
and resume their batches the same way: global batch s holds stream positions [s*G, (s+1)*G) and host p reads the
p-th block of B = G / P rows of each.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags
import grain
import jax
import numpy as np


def shuffle_and_augment_seeds(seed: int) -> tuple[int, int]:
  """The shuffle seed and the augmentation seed derived from a run's seed (the same in every data source, so a
  precomputed split is shuffled exactly as its images are)."""
  shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  return shuffle_seed, augment_seed


def process_index_count(process_index, process_count) -> tuple[int, int]:
  """(this host's index, the host count), defaulting to JAX's."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count



class HostBlocks(grain.MapDataset):
  """This host's rows of every global batch (the module docstring; input_pipeline.py "Order, sharding").

  Local index i -> global index (i // B) * G + p * B + i % B, with B rows per
  host and G = P * B. For finite parents the tail is truncated (or padded with a
  copy of element 0 marked "mask": False when `pad`).
  """

  def __init__(self, parent: grain.MapDataset, *, process_index: int,
               process_count: int, local_batch: int, pad: bool):
    super().__init__(parent)
    self._p, self._b = process_index, local_batch
    self._g = local_batch * process_count
    self._n = len(parent)
    self._pad = pad
    if self._n >= sys.maxsize:  # repeated forever
      self._len = sys.maxsize
    elif pad:
      self._len = -(-self._n // self._g) * self._b
    else:
      full, rem = divmod(self._n, self._g)
      self._len = full * self._b + min(max(rem - self._p * self._b, 0), self._b)

  def __len__(self) -> int:
    return self._len

  def global_index(self, index: int) -> int:
    """Position in the global stream of this host's element `index`."""
    return (index // self._b) * self._g + self._p * self._b + index % self._b

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g = self.global_index(index)
    if not self._pad:
      return self._parent[g]
    if g < self._n:
      return {**self._parent[g], "mask": np.bool_(True)}
    return {**self._parent[0], "mask": np.bool_(False)}

  def __str__(self) -> str:
    return f"HostBlocks(process={self._p}, rows={self._b}, global={self._g})"



class BatchIterator(grain.DatasetIterator):
  """Iterates a `grain.MapDataset` of batches; the state is a stream position.

  `get_state()` is {"examples_seen": n, "global_batch_size": G}: n examples of
  the global stream have been consumed (over all hosts), identical on every
  host. Restoring recreates the grain iterator at batch n // G, so a state
  stays valid when num_workers, prefetch, the process count or — if n is a
  multiple of the new value — the global batch size change between runs.
  (grain's own iterator states depend on num_workers.)
  """

  def __init__(self, batches: grain.MapDataset, *, global_batch_size: int,
               prefetch: int = 2, num_workers: int = 0):
    super().__init__()
    self._batches = batches
    self._global_batch_size = int(global_batch_size)
    self._prefetch = int(prefetch)
    self._num_workers = int(num_workers)
    self._next_batch = 0
    self._inner: grain.DatasetIterator | None = None

  def _start(self) -> grain.DatasetIterator:
    ds = self._batches[self._next_batch:] if self._next_batch else self._batches
    # Threads assemble whole batches; `prefetch` of them are in flight.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self._prefetch, prefetch_buffer_size=self._prefetch))
    if self._num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # grain's worker start-up reads an absl flag; outside an absl app
        # (tests, notebooks) nothing has parsed flags: use their defaults.
        flags.FLAGS.mark_as_parsed()
      # Workers take whole batches round-robin: batches do not depend on
      # num_workers.
      iter_ds = iter_ds.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(iter_ds)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._inner is None:
      self._inner = self._start()
    batch = next(self._inner)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """JSON-serializable position (same on every host)."""
    return {"examples_seen": self._next_batch * self._global_batch_size,
            "global_batch_size": self._global_batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues after `state["examples_seen"]` examples of the global stream."""
    seen = int(state["examples_seen"])
    if seen % self._global_batch_size:
      raise ValueError(
          f"cannot resume the input pipeline: the checkpoint consumed {seen} "
          f"examples (global batch size {state.get('global_batch_size')}), not a "
          f"multiple of the current global batch size {self._global_batch_size}")
    self._stop()
    self._next_batch = seen // self._global_batch_size

  def start_prefetch(self) -> None:
    if self._inner is None:
      self._inner = self._start()
    self._inner.start_prefetch()

  def _stop(self) -> None:
    inner, self._inner = getattr(self, "_inner", None), None
    if inner is not None:
      inner.close()

  def close(self) -> None:
    """Stops prefetch threads and worker processes."""
    self._stop()
    super().close()

  def __str__(self) -> str:
    return (f"BatchIterator(next_batch={self._next_batch}, "
            f"global_batch_size={self._global_batch_size})")
