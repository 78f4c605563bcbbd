"""The pieces of the LUT matmul kernels that every backend shares, written with jnp ops that
lower in Pallas Triton and Mosaic TPU alike: the 8 symmetrised entries of a table, the int8
rounding of an entry, the entry index and sign of every nibble of a plane word, one weight
group's share of y (reference.py's algebra and epilogue), and, outside the kernels, the int8
tables' scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.lut_matmul.reference import ENTRIES, LUT_ROWS

NIBBLE_TOPS = 0x11111111                  # bit 0 of every nibble
KINDS = ("int", "q8", "float")            # exact int32 tables (int8 x), int8 tables, float32


def table_kind(x_dtype, table_dtype) -> str:
  """"q8" for int8 tables, "int" for exact tables of int8 x, "float" otherwise."""
  if table_dtype is not None:
    return "q8"
  return "int" if jnp.dtype(x_dtype) == jnp.int8 else "float"


def table_entries(x0, x1, x2, x3) -> list:
  """The 8 symmetrised entries H[j] = s0 x0 + s1 x1 + s2 x2 + x3 (s_i = 2 bit_i(j) - 1) of four
  same-shaped activation arrays: 20 adds, summed in the order x0, x1, x2, x3."""
  p, q = x0 + x1, x0 - x1
  low = [-p, q, -q, p]                    # s0 x0 + s1 x1 for j & 3 = b0 + 2 b1
  return [(low[j & 3] + (x2 if j >= 4 else -x2)) + x3 for j in range(ENTRIES)]


def quantize_entry(h_f32, ts_safe):
  """The reference's int8 table entry of a float32 entry: clip(round(h / ts), -127, 127) with
  jnp.round's half-to-even, from floor (Pallas Triton has no round; the magic-number form (v +
  1.5 2^23) - 1.5 2^23 is folded to v by XLA's simplifier in interpret mode); int32."""
  v = h_f32 / ts_safe
  f = jnp.floor(v)
  d = v - f                                    # exact: |v| < 2^23
  odd = f * 0.5 != jnp.floor(f * 0.5)
  r = jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
  return jnp.clip(r, -127.0, 127.0).astype(jnp.int32)


def flip_words(u):
  """(v, flip) of plane words u (int32): flip has bit 4c set where nibble c's top bit is clear,
  v = u ^ 15 flip has every top bit set; v's nibble & 7 is the entry, flip's bit the sign (a
  nibble e < 8 reads -H[7 - e] = -H[(e ^ 15) & 7]). Five ops give all eight nibbles."""
  flip = lax.shift_right_logical(~u, jnp.int32(3)) & jnp.int32(NIBBLE_TOPS)
  return u ^ (flip * 15), flip


def bit_set(v, b: int):
  """bool: bit b of the int32 words v."""
  return (v & jnp.int32(1 << b)) != 0


def group_share(kind: str, acc, xsum, ts, scale, zero, levels: int):
  """One weight group's part -> its float32 share of y, by the reference's epilogue: acc the
  looked-up sums (int32, or float32 holding them), xsum x's sum over the part (int32 for int8 x),
  ts the int8 tables' scale ("q8"), scale / zero the group's row, levels 2^bits - 1. Integer
  tables halve exactly (acc + levels xsum is even over whole LUT groups)."""
  if kind == "int":
    grp = ((acc.astype(jnp.int32) + levels * xsum) >> 1).astype(jnp.float32)
  elif kind == "q8":
    grp = (acc.astype(jnp.float32) * ts + (levels * xsum).astype(jnp.float32)) * 0.5
  else:
    grp = (acc + levels * xsum) * 0.5
  return (grp - zero * xsum.astype(jnp.float32)) * scale


def table_scales(x_MK, rows: int, group: int, table_scale: str) -> jax.Array:
  """float32 [G, M]: the int8 tables' ts = max|H| / 127 per row (broadcast over the groups) or
  per (row, weight group), from max_j |H_c[j]| = sum_i |x_{4c+i}| (reference.lut_tables)."""
  M, K = x_MK.shape
  G = rows // group
  a = jnp.abs(x_MK.astype(jnp.int32 if x_MK.dtype == jnp.int8 else jnp.float32))
  a = jnp.pad(a, ((0, 0), (0, rows - K))).reshape(M, rows // LUT_ROWS, LUT_ROWS).sum(axis=2)
  if table_scale == "row":
    ts = jnp.broadcast_to(jnp.max(a, axis=1)[:, None], (M, G))
  else:
    ts = jnp.max(a.reshape(M, G, -1), axis=2)
  return (ts.astype(jnp.float32) / 127.0).T
