"""Plain-jnp T-MAC LUT mpGEMM with LUT Tensor Core's table symmetrisation: the `xla`
implementation of `lut_matmul`, and the two halves a kernel fuses: `lut_tables` (the prologue)
and `lut_group_sums` (the lookups).

The algebra, for one column, one weight group and n bit planes (`lowbit_matmul.layout`,
bitplanes: q_k = sum_p 2^p b_{p,k}, b in {0, 1}). The rows k split into LUT groups c of 4.
  Re-encode each bit as s = 2b - 1 in {-1, +1}, i.e. b = (s + 1) / 2:
    sum_k x_k q_k = (1/2) [ sum_p 2^p sum_c S_{p,c} + (2^n - 1) X ],
  S_{p,c} = sum_{i<4} s_{p,4c+i} x_{4c+i}, X = sum_k x_k (the constant correction term).
  S_{p,c} depends on the bits only through the plane's nibble e (bit i <-> row 4c + i): S_c[e]
  (T-MAC's 16-entry table would hold sum_i b_i(e) x_i). Flipping all four bits negates every s,
  S_c[e ^ 15] = -S_c[e], so 8 entries suffice: H_c[j] = S_c[8 + j] (top bit set, s_3 = +1) and
    S_c[e] = H_c[e & 7] (e >= 8),  S_c[e] = -H_c[(e ^ 15) & 7] = -H_c[7 - e] (e < 8):
  the top bit negates.
  With integer x, H and X are integers and the bracket is 2 sum x q, so the halving is an exact
  shift; the weight group's scale and zero follow: sum_k x_k w_k = scale (sum x q - zero X).

Int8 tables (table_dtype=int8): H ~ ts * round(H / ts), ts = max|H| / 127 over a row's tables
(table_scale "row") or over the tables of one (row, weight group) ("group", which the group's
scale multiply absorbs). An entry is off by at most ts / 2, so a group's sum of x q (`group` rows,
n planes) is off by at most (2^n - 1) * (group / 4) * ts / 4 (`table_error_bound`), plus float32
rounding; X stays exact. With int8 x in [-127, 127] (|H| <= 508: 10 bits) the tables lose 2 bits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.lowbit_matmul import layout
from pallas_kernels.lowbit_matmul.reference import group_epilogue

LUT_ROWS = 4           # activations a table (one nibble of a plane word)
ENTRIES = 8            # stored entries a table: 16 halved by the symmetry
TABLE_SCALES = ("row", "group")
# s_i of entry j, i.e. of nibble e = 8 + j: [4, 8] in {-1, +1}
SIGNS_IJ = np.array([[2 * (((8 + j) >> i) & 1) - 1 for j in range(ENTRIES)]
                     for i in range(LUT_ROWS)], np.int8)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("table_MCJ", "xsum_MG", "scale_MS"), meta_fields=("group",))
@dataclasses.dataclass(frozen=True)
class LutTables:
  """Symmetrised tables of x [M, K] for a weight of `rows` packed rows, C = rows / 4.

  table_MCJ: [M, C, 8] H_c[j] = sum_i s_i(8 + j) x_{4c+i}: int32 (int8 x), float32 (float x) or
    int8 (quantised). xsum_MG: [M, G] x summed over each weight group (int32 / float32).
  scale_MS: float32 [M, 1] ("row") or [M, G] ("group") table scales; None unless quantised.
  group: rows a weight group (the packed weight's block).
  """
  table_MCJ: jax.Array
  xsum_MG: jax.Array
  scale_MS: jax.Array | None
  group: int


@functools.partial(jax.jit, static_argnames=("k_pad", "group", "table_dtype", "table_scale"))
def lut_tables(x_MK: jax.Array, *, k_pad: int, group: int, table_dtype=None,
               table_scale: str = "row") -> LutTables:
  """The table prologue: x int8 or float [M, K] zero-padded to k_pad columns (a multiple of
  group, itself of 4) -> `LutTables`. table_dtype None: exact tables (int32 for int8 x, float32
  otherwise); int8: quantised, scales per `table_scale` ("row" | "group")."""
  M, K = x_MK.shape
  if group < LUT_ROWS or group % LUT_ROWS or k_pad < K or k_pad % group:
    raise ValueError(f"k_pad must be a multiple of group (a multiple of {LUT_ROWS}) and >= K={K}, "
                     f"got k_pad={k_pad}, group={group}")
  if table_scale not in TABLE_SCALES:
    raise ValueError(f"table_scale must be one of {TABLE_SCALES}, got {table_scale!r}")
  C, G = k_pad // LUT_ROWS, k_pad // group
  x = jnp.pad(x_MK, ((0, 0), (0, k_pad - K)))
  integer = x.dtype == jnp.int8
  if integer:
    table = lax.dot_general(x.reshape(M, C, LUT_ROWS), jnp.asarray(SIGNS_IJ),
                            (((2,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  else:
    x = x.astype(jnp.float32)
    table = jnp.einsum("mci,ij->mcj", x.reshape(M, C, LUT_ROWS), SIGNS_IJ.astype(np.float32),
                       precision=lax.Precision.HIGHEST)
  xsum = jnp.sum(x.reshape(M, G, group), axis=2, dtype=jnp.int32 if integer else jnp.float32)
  if table_dtype is None:
    return LutTables(table, xsum, None, group)
  t = table.astype(jnp.float32)
  if table_scale == "row":
    ts = jnp.max(jnp.abs(t), axis=(1, 2))[:, None] / 127.0
    ts_MC = ts
  else:
    ts = jnp.max(jnp.abs(t).reshape(M, G, C // G, ENTRIES), axis=(2, 3)) / 127.0
    ts_MC = jnp.repeat(ts, C // G, axis=1)
  tq = jnp.round(t / jnp.where(ts_MC > 0, ts_MC, 1.0)[:, :, None])
  return LutTables(jnp.clip(tq, -127, 127).astype(jnp.int8), xsum, ts, group)


def check_tables(tables: LutTables, packed: layout.PackedWeight) -> None:
  """ValueError unless the tables were built for this bitplanes weight's rows and groups."""
  M = tables.table_MCJ.shape[0]
  C, G = packed.rows // LUT_ROWS, packed.groups
  if tables.table_MCJ.shape != (M, C, ENTRIES) or tables.xsum_MG.shape != (M, G) \
      or tables.group != packed.block:
    raise ValueError(f"tables [M, C, 8]={tables.table_MCJ.shape}, xsum {tables.xsum_MG.shape}, "
                     f"group {tables.group} do not fit the weight (C={C}, G={G}, group="
                     f"{packed.block}): build them with k_pad=packed.rows, group=packed.block")


@jax.jit
def lut_group_sums(tables: LutTables, packed: layout.PackedWeight) -> jax.Array:
  """[M, G, N]: sum over weight group g's rows of x * q by table lookup (module docstring):
  int32, exact, for int32 tables; float32 for float or quantised tables.

  Each plane's nibble e of LUT group c and column n picks entry j = (e if e >= 8 else e ^ 15) & 7
  of table c, negated when the top bit is clear, weighted 2^p. The lookups are written as one
  contraction over (c, j) with that signed, weighted one-hot selection summed over the planes
  (sel [C, N, 8], entries in [-(2^n - 1), 2^n - 1]): the same integers as gathering entry by
  entry, in one batched dot per weight group."""
  check_tables(tables, packed)
  P, N = packed.bits, packed.shape[1]
  M, C, _ = tables.table_MCJ.shape
  G = packed.groups
  u = lax.bitcast_convert_type(packed.packed, jnp.uint32)
  shifts = (LUT_ROWS * np.arange(32 // LUT_ROWS, dtype=np.uint32))[None, None, :, None]
  # nibble c' of word w is LUT group 8 w + c'
  e_PCN = ((u[:, :, None, :] >> shifts) & np.uint32(15)).astype(jnp.int32).reshape(P, C, N)
  top_PCN = e_PCN >= 8
  j_PCN = jnp.where(top_PCN, e_PCN, e_PCN ^ 15) & 7
  weight_PCN = jnp.where(top_PCN, 1, -1) << jnp.arange(P, dtype=jnp.int32)[:, None, None]
  sel_CNJ = jnp.sum(jnp.where(j_PCN[..., None] == jnp.arange(ENTRIES), weight_PCN[..., None], 0),
                    axis=0)
  table = tables.table_MCJ
  acc_dtype = jnp.float32 if jnp.issubdtype(table.dtype, jnp.floating) else jnp.int32
  acc_GMN = lax.dot_general(
    table.reshape(M, G, C // G, ENTRIES).astype(acc_dtype),
    sel_CNJ.reshape(G, C // G, N, ENTRIES).astype(acc_dtype),
    (((2, 3), (1, 3)), ((1,), (0,))), precision=lax.Precision.HIGHEST,
    preferred_element_type=acc_dtype)
  acc_MGN = acc_GMN.transpose(1, 0, 2)
  if tables.scale_MS is not None:
    acc_MGN = acc_MGN.astype(jnp.float32) * tables.scale_MS[:, :, None]
  correction_MGN = layout.levels(P) * tables.xsum_MG[:, :, None]
  if acc_MGN.dtype == jnp.int32 and correction_MGN.dtype == jnp.int32:
    return (acc_MGN + correction_MGN) >> 1     # even: exactly twice the sum of x q
  return (acc_MGN + correction_MGN.astype(jnp.float32)) * 0.5


@functools.partial(jax.jit, static_argnames=("bits",))
def table_error_bound(tables: LutTables, bits: int) -> jax.Array:
  """float32 [M, G]: the bound on |lut_group_sums - exact sum of x q| that int8 tables allow,
  (2^bits - 1) * (group / 4) * ts / 4 (zeros for exact tables), float32 rounding aside."""
  M, G = tables.xsum_MG.shape
  if tables.scale_MS is None:
    return jnp.zeros((M, G), jnp.float32)
  ts_MG = jnp.broadcast_to(tables.scale_MS, (M, G))
  return layout.levels(bits) * (tables.group // LUT_ROWS) * ts_MG / 4.0


@functools.partial(jax.jit, static_argnames=("table_dtype", "table_scale", "out_dtype"))
def lut_matmul_reference(x_MK: jax.Array, x_scale_M: jax.Array | None,
                         packed: layout.PackedWeight, *, table_dtype, table_scale: str,
                         out_dtype) -> jax.Array:
  """Tables, lookups, then `lowbit_matmul.reference.group_epilogue` (the same float32 epilogue as
  the dequantising integer path). Shapes as `pallas_kernels.lut_matmul`; returns [M, N]."""
  tables = lut_tables(x_MK, k_pad=packed.rows, group=packed.block, table_dtype=table_dtype,
                      table_scale=table_scale)
  acc_MGN = lut_group_sums(tables, packed)
  return group_epilogue(acc_MGN, tables.xsum_MG, packed.scale, packed.zero, x_scale_M, out_dtype)


def lut_matmul(x_MK, x_scale_M, packed, out_dtype, *, table_dtype, table_scale: str,
               interpret: bool = False):
  del interpret  # nothing to interpret
  return lut_matmul_reference(x_MK, x_scale_M, packed, table_dtype=table_dtype,
                              table_scale=table_scale, out_dtype=out_dtype)
