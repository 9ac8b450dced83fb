"""Device mesh, logical-axis shardings, and host<->device batch plumbing.

Models name axes (`nn.with_logical_partitioning(init, ("embed", "mlp"))`), never devices. The config maps logical
names to the mesh axes `data`, `fsdp`, `tensor` (`config.logical_axis_rules`), and the mesh comes from
`config.mesh`. One code path serves 1 CPU, 8 fake CPU devices, one GPU and a TPU pod.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 entries of the mesh config against `num_devices`; raises a clear error on mismatch."""
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh={dict(sizes)}: at most one axis may be -1.")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh={dict(sizes)}: the fixed axes ({known} devices) do not divide the "
                       f"{num_devices} available devices. Change config.mesh.")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"config.mesh={dict(sizes)} needs {known} devices but {num_devices} are available. "
                     "Change config.mesh (set one axis to -1 to fill the remaining devices).")
  return tuple(sizes[axis] for axis in MESH_AXES)


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  if len(devices) == len(jax.devices()):
    try:
      # Topology-aware placement (contiguous ICI groups on TPU, process-major order on multi-host).
      device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
      device_array = np.asarray(devices).reshape(shape)
  else:
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def rules_tuple(rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists after a JSON round trip) -> the tuple-of-tuples flax expects."""
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _without_unit_axes(axes, mesh: Mesh):
  """`axes` (a mesh axis name, a tuple of them or None) without the axes of size 1, which split nothing."""
  if axes is None:
    return None
  kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if mesh.shape[a] > 1)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Replicates every dimension of `spec` that its mesh axes do not divide (e.g. 3 RGB channels over fsdp=8), and
  drops the mesh axes of size 1: a layout that shards nothing is written as replicated, so the programs of a
  data-parallel run are the same whatever other axes of size 1 its mesh names (a data=8 mesh's and pmap's initial
  state, an fsdp=1 ablation's and the baseline's), and one compiled program serves them."""
  entries = [_without_unit_axes(axes, mesh) for axes in list(spec) + [None] * (len(shape) - len(spec))]
  fitted = [axes if dim % _axis_size(mesh, axes) == 0 else None for axes, dim in zip(entries, shape)]
  return P(*fitted)


def logical_to_sharding(abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly logically boxed) abstract values.

  Leaves without logical names (step counters, RNG keys, optimizer counts) are replicated.
  """
  rules = rules_tuple(rules)
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))
  return jax.tree.map(
      lambda spec, shape: NamedSharding(mesh, fit_spec(spec, shape, mesh)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def data_axes(mesh: Mesh, rules) -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over (from the 'batch' logical rule)."""
  for name, axes in rules_tuple(rules):
    if name == "batch":
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, P(data_axes(mesh, rules)))


def data_parallel_size(mesh: Mesh, rules) -> int:
  return _axis_size(mesh, data_axes(mesh, rules))


def host_batch_to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Per-host numpy batch -> global jax.Arrays sharded along the batch axis (works with several processes)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def sync_processes(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process reaches `name` (no-op with one process).

  Uses the coordination service's key-value barrier, not a collective: collective back ends give up after a short
  rendezvous timeout (gloo: 30 s), which a host still compiling a big step would miss.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # no public KV barrier in JAX 0.10/0.11
  client = distributed.global_state.client
  if client is None:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
  else:
    client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
