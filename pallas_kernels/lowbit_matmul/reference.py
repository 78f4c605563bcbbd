"""Plain-jnp low-bit matmuls: the `xla` implementations of `lowbit_matmul` (unpack, dequantise,
dot) and `lowbit_matmul_int8` (int8 activations, int32 accumulation, then the scales), and the
integer pieces the LUT path shares: per-group integer sums and the scale / zero epilogue."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.lowbit_matmul import layout


# Rows up to which the products are written as multiply + reduce rather than a dot. The decode
# loops compile with XLA:GPU's dot-strength-reduction pass off (`effjax.decoding`), and without
# it an int8 [1, K] x [K, N] dot lowers to a slow generic loop (an 8B ternary model's decode step:
# 159 ms on an H100 against 5.4 ms in bf16); as a reduction XLA fuses the unpacking and the
# multiply into one kernel that reads the packed weight once, whatever the pass settings.
REDUCE_MAX_ROWS = 4


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def lowbit_matmul_reference(x_MK: jax.Array, packed: layout.PackedWeight, out_dtype) -> jax.Array:
  """W2A16: x float [M, K] @ the dequantised weight [K, N], in x's dtype with float32
  accumulation; returns [M, N] in out_dtype. Ternary codes go to the dot exactly (t in x's
  dtype) and the per-tensor scale multiplies the float32 sum; n-bit weights are dequantised to
  (q - zero) * scale in float32 and rounded once to x's dtype."""
  ternary = packed.fmt in layout.TERNARY_FORMATS
  w_KN = (layout.unpack(packed) if ternary else layout.dequantize_weight(packed)).astype(x_MK.dtype)
  if x_MK.shape[0] <= REDUCE_MAX_ROWS:
    y_MN = jnp.sum(x_MK.astype(jnp.float32)[:, :, None] * w_KN.astype(jnp.float32)[None], axis=1)
  else:
    y_MN = jnp.dot(x_MK, w_KN, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  if ternary:
    y_MN = y_MN * packed.scale
  return y_MN.astype(out_dtype)


def _group_rows(x_MK: jax.Array, packed: layout.PackedWeight) -> jax.Array:
  """x [M, K] zero-padded to the packed rows, as [M, G, rows / G]."""
  M, K = x_MK.shape
  return jnp.pad(x_MK, ((0, 0), (0, packed.rows - K))).reshape(M, packed.groups, -1)


@jax.jit
def int_group_sums(x_int8_MK: jax.Array, packed: layout.PackedWeight) -> jax.Array:
  """int32 [M, G, N]: sum over the rows k of weight group g of x[m, k] * c[k, n], c the integer
  codes (ternary t, G = 1; or bit-plane q, G = rows / block), from int8 x [M, K]. Exact: int8
  operands, int32 accumulation (|sum| <= 127 * 15 * K). Above REDUCE_MAX_ROWS rows a ternary
  weight is unpacked as W^T [N, K] (`layout.unpack_ternary_nk`) and contracted on its minor axis:
  the GPU's int8 GEMM takes both operands K-major, so [K, N] codes would be transposed first."""
  if packed.fmt in layout.TERNARY_FORMATS and x_int8_MK.shape[0] > REDUCE_MAX_ROWS:
    acc_MN = lax.dot_general(x_int8_MK, layout.unpack_ternary_nk(packed), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.int32)
    return acc_MN[:, None, :]
  c_KN = layout.unpack(packed).astype(jnp.int8)
  c_GRN = jnp.pad(c_KN, ((0, packed.rows - c_KN.shape[0]), (0, 0))).reshape(
    packed.groups, -1, c_KN.shape[1])
  x_MGR = _group_rows(x_int8_MK, packed)
  if x_int8_MK.shape[0] <= REDUCE_MAX_ROWS:                 # see REDUCE_MAX_ROWS
    return jnp.sum(x_MGR.astype(jnp.int32)[..., None] * c_GRN.astype(jnp.int32)[None], axis=2)
  acc_GMN = lax.dot_general(x_MGR, c_GRN, (((2,), (1,)), ((1,), (0,))),
                            preferred_element_type=jnp.int32)
  return acc_GMN.transpose(1, 0, 2)


@jax.jit
def group_xsums(x_MK: jax.Array, packed: layout.PackedWeight) -> jax.Array:
  """[M, G]: x summed over each weight group's rows (int32 for int8 x, else float32): the input
  of the zero-point correction."""
  x = _group_rows(x_MK, packed)
  return jnp.sum(x, axis=2, dtype=jnp.int32 if x.dtype == jnp.int8 else jnp.float32)


def group_epilogue(acc_MGN: jax.Array, xsum_MG: jax.Array | None, scale, zero_GN, x_scale_M,
                   out_dtype) -> jax.Array:
  """y [M, N] = x_scale_m * sum_g scale_g * (acc_g - zero_g * xsum_g), in float32, then
  out_dtype. acc_MGN: per-group sums of x * codes (int32 or float32); scale: float32 [] or
  [G, N]; zero_GN: float32 [G, N] or None (ternary: w = t * scale); x_scale_M: float32 [M] or
  None (float activations)."""
  y_MGN = acc_MGN.astype(jnp.float32)
  if zero_GN is not None:
    y_MGN = y_MGN - zero_GN[None] * xsum_MG.astype(jnp.float32)[:, :, None]
  y_MN = jnp.sum(y_MGN * scale, axis=1)
  if x_scale_M is not None:
    y_MN = y_MN * x_scale_M.astype(jnp.float32)[:, None]
  return y_MN.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def lowbit_matmul_int8_reference(x_int8_MK: jax.Array, x_scale_M: jax.Array,
                                 packed: layout.PackedWeight, out_dtype) -> jax.Array:
  """W2A8 (and WnA8): int8 x [M, K] with per-row scales float32 [M]; the integer sums of x *
  codes accumulate exactly in int32 (`int_group_sums`), then `group_epilogue` applies the weight
  and activation scales (and zeros). Returns [M, N] in out_dtype."""
  acc_MGN = int_group_sums(x_int8_MK, packed)
  xsum_MG = group_xsums(x_int8_MK, packed) if packed.zero is not None else None
  return group_epilogue(acc_MGN, xsum_MG, packed.scale, packed.zero, x_scale_M, out_dtype)


def lowbit_matmul(x_MK, packed, out_dtype, *, interpret: bool = False):
  del interpret  # nothing to interpret
  return lowbit_matmul_reference(x_MK, packed, out_dtype)


def lowbit_matmul_int8(x_int8_MK, x_scale_M, packed, out_dtype, *, interpret: bool = False):
  del interpret  # nothing to interpret
  return lowbit_matmul_int8_reference(x_int8_MK, x_scale_M, packed, out_dtype)
