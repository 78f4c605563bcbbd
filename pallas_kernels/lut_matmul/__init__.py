"""Table-lookup mpGEMM over bit-plane weights (T-MAC, with LUT Tensor Core's symmetrised tables):
y = x @ W_hat without dequantising W.

    y_MN = lut_matmul(x_MK, packed)                       # float x: float32 tables
    y_MN = lut_matmul(x_int8_MK, packed, x_scale_M)       # int8 x: int32 tables, exact sums
    y_MN = lut_matmul(x_MK, packed, table_dtype=jnp.int8, table_scale="row")   # int8 tables

packed: a bitplanes `lowbit_matmul.layout.PackedWeight` (`layout.quantize_nbit` for 1..4-bit
weights; `layout.to_bitplanes` / `pack_ternary_bitplanes` for ternary ones). Per group of 4
activations along K one table of 8 entries (16 halved by sign symmetry) is built once and shared
by every column and bit plane; each plane's nibble picks an entry; the algebra and the int8-table
error bound are reference.py's. On the integer path with exact tables the per-group sums equal
`lowbit_matmul.reference.int_group_sums` exactly, and the result equals `lowbit_matmul_int8`'s.
Any M, N and K.

Implementations (pallas_kernels.dispatch): `xla` (reference.py), `pallas_triton` (named
only until timed on a GPU: tables built in the kernel from its x slice, looked up by a select tree (GEMV) or as one
MMA over a one-hot selection (GEMM), pallas_triton.py) and `pallas_mosaic_tpu` (the TPU default:
tables as a small MXU matmul of the x slice, looked up as one MXU matmul over a one-hot
selection, pallas_mosaic_tpu.py); kernel_math.py holds the pieces they share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import Op
from pallas_kernels.lowbit_matmul import check_matmul_args, layout, resolve_out_dtype
from pallas_kernels.lut_matmul.reference import (
  TABLE_SCALES,
  LutTables,
  lut_group_sums,
  lut_matmul_reference,
  lut_tables,
  table_error_bound,
)

# `auto` is XLA on a GPU until the Triton kernel has been run and timed on one (name it to use it).
_OP = Op("lut_matmul", __name__,
         backends={"xla": "reference", "pallas_triton": "pallas_triton",
                   "pallas_mosaic_tpu": "pallas_mosaic_tpu"},
         defaults={"tpu": ("pallas_mosaic_tpu",)})
IMPLEMENTATIONS = _OP.implementations

__all__ = ["IMPLEMENTATIONS", "TABLE_SCALES", "LutTables", "lut_group_sums", "lut_matmul",
           "lut_matmul_reference", "lut_tables", "table_error_bound"]


def lut_matmul(x_MK: jax.Array, packed: layout.PackedWeight, x_scale_M: jax.Array | None = None,
               *, table_dtype=None, table_scale: str = "row", out_dtype=None,
               implementation=None, interpret: bool = False, config=None) -> jax.Array:
  """y = x @ W_hat by table lookup.

  Args:
    x_MK: [M, K] float32 / bfloat16 / float16, or int8 with x_scale_M (the integer path).
    packed: a bitplanes `layout.PackedWeight` of shape (K, N).
    x_scale_M: float [M] per-row scales of int8 x (`layout.quantize_activations`); None for
      float x.
    table_dtype: None (exact tables: int32 for int8 x, float32 otherwise) or int8 (quantised).
    table_scale: int8 table scale per "row" or per (row, weight) "group".
    out_dtype: float dtype of y; None: x's dtype (float x) or float32 (int8 x).
    implementation: None | "xla" | "pallas_triton" | "pallas_mosaic_tpu" | a sequence
      (pallas_kernels.dispatch). interpret: Pallas interpret mode. config: the chosen backend's
      config (`pallas_triton.TritonConfig`, `pallas_mosaic_tpu.TPUConfig`).

  Returns:
    y_MN [M, N] in out_dtype: x_scale_m * sum_g scale_g (S_g - zero_g X_g), S_g the looked-up
    sum of x * q over weight group g (exact with int8 x and exact tables), X_g that of x.
  """
  layout.check_packed(packed)
  if packed.fmt != "bitplanes":
    raise ValueError(f"lut_matmul reads bit planes; convert the {packed.fmt} weight with "
                     "layout.to_bitplanes")
  int8 = getattr(x_MK, "dtype", None) == jnp.int8
  check_matmul_args(x_MK, packed, x_scale_M, int8=int8)
  if table_dtype is not None:
    try:
      int8_tables = jnp.dtype(table_dtype) == jnp.int8
    except TypeError:
      int8_tables = False
    if not int8_tables:
      raise ValueError(f"table_dtype must be None (exact tables) or int8, got {table_dtype!r}")
    table_dtype = jnp.dtype(jnp.int8)
  if table_scale not in TABLE_SCALES:
    raise ValueError(f"table_scale must be one of {TABLE_SCALES}, got {table_scale!r}")
  out_dtype = resolve_out_dtype(out_dtype, x_MK)
  return _OP(implementation, x_MK, x_scale_M, packed, out_dtype, table_dtype=table_dtype,
             table_scale=table_scale, interpret=interpret, config=config)
