"""Matmuls with packed low-bit weights (BitNet b1.58 / bitnet.cpp): y = x @ W_hat, W [K, N].

    y_MN = lowbit_matmul(x_MK, packed)                          # W2A16: float x, float32 sums
    x_int8_MK, x_scale_M = layout.quantize_activations(x_MK)    # BitNet absmax per token
    y_MN = lowbit_matmul_int8(x_int8_MK, x_scale_M, packed)     # W2A8: int32 sums, then scales

packed: a `layout.PackedWeight` -- ternary (i2_s, tl1, tl2: int8 codes t in {-1, 0, 1} times a
per-tensor scale, from `layout.ternarize`) or n-bit bit planes (w = (q - zero) * scale per group,
from `layout.quantize_nbit`); the formats, their packing and the quantisers are layout.py's. The
format is the weight's own (`packed.fmt`), so one call serves all. Any M (GEMV 1..16 or GEMM),
any N, any K (the packed rows past K are padding the ops never read).

The integer path is exact: the sums of x_int8 * codes (per weight group) equal integer math,
then float32 scales them; `reference.int_group_sums` exposes those sums, and `lut_matmul` (the
table-lookup form over bit planes) reproduces them.

Implementations (pallas_kernels.dispatch): `xla` (reference.py; `auto` on a GPU for M > 16),
`pallas_triton` (i2_s weights: unpacking by bit operations into the dot's operand, split-K GEMV
or tiled GEMM, pallas_triton.py; `auto` on a GPU for M <= 16), `pallas_mosaic_gpu`
(pallas_mosaic_gpu.py: i2_t weights, `auto` on a GPU for them -- y^T = W^T x^T with the weight
decoded in registers as the wgmma's register operand: int8 x at any M on s8 wgmmas (decoding rows
split along K), bf16 / f16 x at M <= 64 on 16-bit ones; i2_s weights (M <= 64) named only, slower than the
Triton kernel on the H100 -- unpacking into swizzled shared-memory tiles, one wgmma a 256-row
step) and `pallas_mosaic_tpu` (i2_s weights, the TPU default: N on the
lanes, shift / mask unpacking in VMEM, one MXU dot a K step, pallas_mosaic_tpu.py); other formats
fall back to `xla`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import checks
from pallas_kernels import dispatch, tuned
from pallas_kernels.dispatch import Op
from pallas_kernels.lowbit_matmul import layout
from pallas_kernels.lowbit_matmul.reference import (
  lowbit_matmul_int8_reference,
  lowbit_matmul_reference,
)

_BACKENDS = {"xla": "reference", "pallas_triton": "pallas_triton",
             "pallas_mosaic_gpu": "pallas_mosaic_gpu", "pallas_mosaic_tpu": "pallas_mosaic_tpu"}
# `auto` on a GPU: the Triton kernel (inline-PTX unpacking) for GEMV rows, M <= its
# `max_gemv_rows` (tuned/default.json), XLA above. On the H100 (docs/results/ternary.md, W2A8,
# M = 1): 8192 x 8192 41.5 us against XLA's 58.0 and bf16's 59.2; 4096 x 14336 45.1 against
# 111.7 and 52.6; at M = 16 37.9 against 124.8. At M = 2048 the XLA path is faster (357 against
# 1,572 us). On a TPU `auto` tries the Mosaic TPU kernel first (not yet measured on a TPU).
_DEFAULTS = {"gpu": ("pallas_triton",), "tpu": ("pallas_mosaic_tpu",)}


def _auto_rows(implementation, M: int, packed=None):
  """`auto` with M rows: on a GPU, an i2_t weight goes to the Mosaic GPU kernel (its layout is
  that kernel's; it takes M <= 64, XLA the rest); other weights past the Triton kernel's GEMV
  rows take the XLA path."""
  if (implementation is None or implementation == dispatch.AUTO) and dispatch.platform() == "gpu":
    if packed is not None and packed.fmt == "i2_t":
      # the s8-wgmma kernel for int8 x (W2A8: on the H200 at M = 2048 226 us against bf16's 352
      # at 8192 x 8192; at M = 1 11.4 against 34.3), the 16-bit GEMV for float x at M <= 64,
      # XLA for float x past it
      return ("pallas_mosaic_gpu", "xla")
    if M > tuned.lookup("lowbit_matmul", "pallas_triton")["max_gemv_rows"]:
      return "xla"
  return implementation


_OP = Op("lowbit_matmul", __name__, backends=_BACKENDS, defaults=_DEFAULTS)
_INT8_OP = Op("lowbit_matmul_int8", __name__, backends=_BACKENDS, defaults=_DEFAULTS)
IMPLEMENTATIONS = _OP.implementations
INT8_IMPLEMENTATIONS = _INT8_OP.implementations

__all__ = ["IMPLEMENTATIONS", "INT8_IMPLEMENTATIONS", "check_matmul_args", "layout",
           "lowbit_matmul", "lowbit_matmul_int8", "lowbit_matmul_int8_reference",
           "lowbit_matmul_reference", "resolve_out_dtype"]


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else None


def check_matmul_args(x_MK, packed, x_scale_M=None, *, int8: bool) -> None:
  """ValueError naming the first bad argument: packed a consistent `layout.PackedWeight`; x
  2-D [M, K] with K the weight's, int8 (int8=True, with x_scale_M float [M]) or float32 /
  bfloat16 / float16 (int8=False, no x_scale_M)."""
  layout.check_packed(packed)
  if getattr(x_MK, "ndim", None) != 2 or min(x_MK.shape) < 1:
    raise ValueError(f"x_MK must be a non-empty 2-D [M, K] array, got shape {_shape(x_MK)}")
  if int8 and x_MK.dtype != jnp.int8:
    raise ValueError(f"x_MK must be int8 on the integer path (layout.quantize_activations), got "
                     f"{x_MK.dtype}")
  if not int8 and jnp.dtype(x_MK.dtype) not in checks.FLOAT_DTYPES:
    raise ValueError(f"x_MK must be float32, bfloat16 or float16 (int8 x: the integer path), got "
                     f"{x_MK.dtype}")
  M, K = x_MK.shape
  if K != packed.shape[0]:
    raise ValueError(f"x_MK has K={K} columns but the packed weight is [K, N]={packed.shape}")
  if int8:
    if _shape(x_scale_M) != (M,) or jnp.dtype(x_scale_M.dtype) not in checks.FLOAT_DTYPES:
      raise ValueError(f"x_scale_M must be a float [M]={(M,)} array (per-row activation scales), "
                       f"got {getattr(x_scale_M, 'dtype', None)} {_shape(x_scale_M)}")
  elif x_scale_M is not None:
    raise ValueError("x_scale_M is for int8 activations; float x_MK takes none")


def resolve_out_dtype(out_dtype, x_MK) -> jnp.dtype:
  """out_dtype, or x's dtype (float x) / float32 (int8 x) when None; ValueError unless float."""
  if out_dtype is None:
    return jnp.dtype(jnp.float32) if x_MK.dtype == jnp.int8 else jnp.dtype(x_MK.dtype)
  try:
    dt = jnp.dtype(out_dtype)
  except TypeError as e:
    raise ValueError(f"out_dtype must be a float dtype, got {out_dtype!r}") from e
  if dt not in checks.FLOAT_DTYPES:
    raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {dt}")
  return dt


def lowbit_matmul(x_MK: jax.Array, packed: layout.PackedWeight, *, out_dtype=None,
                  implementation=None, interpret: bool = False, config=None) -> jax.Array:
  """y = x @ W_hat with float activations (the W2A16 path).

  Args:
    x_MK: float32 / bfloat16 / float16 [M, K].
    packed: a `layout.PackedWeight` of shape (K, N), any format.
    out_dtype: float dtype of y; None: x's dtype.
    implementation: None | "xla" | "pallas_triton" | "pallas_mosaic_tpu" | a sequence
      (pallas_kernels.dispatch). interpret: Pallas interpret mode. config: the chosen backend's
      config (`pallas_triton.TritonConfig`, `pallas_mosaic_tpu.TPUConfig`).

  Returns:
    y_MN [M, N] in out_dtype: x (in its dtype) times the dequantised weight, float32 sums.
  """
  check_matmul_args(x_MK, packed, int8=False)
  out_dtype = resolve_out_dtype(out_dtype, x_MK)
  implementation = _auto_rows(implementation, x_MK.shape[0], packed)
  return _OP(implementation, x_MK, packed, out_dtype, interpret=interpret, config=config)


def lowbit_matmul_int8(x_int8_MK: jax.Array, x_scale_M: jax.Array, packed: layout.PackedWeight,
                       *, out_dtype=None, implementation=None, interpret: bool = False,
                       config=None) -> jax.Array:
  """y = (x_int8 * x_scale) @ W_hat on the integer path (W2A8 for ternary weights).

  Args:
    x_int8_MK: int8 [M, K] and x_scale_M: float [M], e.g. `layout.quantize_activations(x)`.
    packed: a `layout.PackedWeight` of shape (K, N), any format.
    out_dtype: float dtype of y; None: float32.
    implementation, interpret, config: as `lowbit_matmul`.

  Returns:
    y_MN [M, N] in out_dtype: x_scale_m * sum_g scale_g (S_g - zero_g * X_g), S_g the exact
    int32 sum of x_int8 * codes over weight group g (one group for ternary weights, zero 0) and
    X_g the sum of x_int8 over it; float32 from S_g on.
  """
  check_matmul_args(x_int8_MK, packed, x_scale_M, int8=True)
  out_dtype = resolve_out_dtype(out_dtype, x_int8_MK)
  implementation = _auto_rows(implementation, x_int8_MK.shape[0], packed)
  return _INT8_OP(implementation, x_int8_MK, x_scale_M, packed, out_dtype, interpret=interpret,
                  config=config)
