"""Device meshes and shardings. One code path for 1 device and for N: a 2-D mesh ("data", "fsdp").

- Batches split their leading (example) axis over both axes: data x fsdp devices each hold a slice.
- Params and optimiser state are sharded over "fsdp" (ZeRO-3 / FSDP style): each array's largest
  dimension divisible by the fsdp size is split, everything else is replicated; with fsdp = 1 all
  state is replicated (plain data parallelism). XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over the first data * fsdp devices; data = -1 takes every visible device
  not used by fsdp."""
  devices = jax.devices()
  if fsdp < 1:
    raise ValueError(f"train.mesh_fsdp must be >= 1, got {fsdp}")
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"train.mesh_fsdp={fsdp} does not divide the {len(devices)} visible devices")
    data = len(devices) // fsdp
  if data * fsdp > len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices but only "
                     f"{len(devices)} are visible ({jax.default_backend()})")
  return Mesh(np.asarray(devices[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shard the largest dimension divisible by `fsdp` over "fsdp" (ties: the first); else replicate."""
  if fsdp == 1 or not shape:
    return P()
  cands = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0]
  if not cands:
    return P()
  _, axis = max(cands, key=lambda c: (c[0], -c[1]))
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, optimiser state, ...)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_state)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a host batch of numpy arrays [B, ...] on the mesh, split over data x fsdp."""
  n = batch_devices(mesh)
  b = next(iter(batch.values())).shape[0]
  if b % n:
    raise ValueError(f"batch of {b} examples cannot be split evenly over {n} devices "
                     f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  return jax.device_put(batch, batch_sharding(mesh))
