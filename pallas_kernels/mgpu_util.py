"""Small pieces the Pallas Mosaic GPU kernels share, written once for the JAX versions the project
runs on (0.10 on the CPU, 0.11 on the GPU)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def tiles(dtype, width_bytes: int = 128):
  """Shared-memory transforms of a TMA / wgmma tile: 8-row tiles `width_bytes` wide, swizzled
  by as many bytes (128 for whole-row tiles; narrower for slabs written one at a time)."""
  return (plgpu.TilingTransform((8, width_bytes // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(width_bytes))


def transposed(ref):
  """ref transposed (1, 0): `Ref.transpose` on JAX >= 0.11, plgpu.transpose_ref before."""
  if hasattr(ref, "transpose"):
    try:
      return ref.transpose((1, 0))
    except (TypeError, AttributeError, NotImplementedError):
      pass
  return plgpu.transpose_ref(ref, (1, 0))


def load(ref, layout):
  """The whole ref into registers in `layout`: JAX 0.11 takes the index as part of the ref
  (a separate one is deprecated there), 0.10 needs it as an argument."""
  try:
    return plgpu.load(ref, layout=layout)
  except TypeError:
    return plgpu.load(ref, (), layout=layout)
