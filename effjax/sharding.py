"""Device meshes and shardings. One code path for 1 device and for N: a mesh with a `data` axis,
params replicated, batches split along their leading axis. (FSDP adds an `fsdp` axis later.)"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(data: int = -1) -> Mesh:
  """A 1-D mesh over the first `data` devices (-1 = all visible devices)."""
  devices = jax.devices()
  n = len(devices) if data == -1 else data
  if n > len(devices):
    raise ValueError(f"train.mesh_data={data} asks for {n} devices but only {len(devices)} are "
                     f"visible ({jax.default_backend()})")
  return Mesh(np.asarray(devices[:n]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over `data`."""
  return NamedSharding(mesh, P("data"))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a host batch of numpy arrays [B, ...] on the mesh, split over `data`."""
  n = mesh.shape["data"]
  b = next(iter(batch.values())).shape[0]
  if b % n:
    raise ValueError(f"batch of {b} examples cannot be split evenly over {n} data-parallel devices")
  return jax.device_put(batch, batch_sharding(mesh))
