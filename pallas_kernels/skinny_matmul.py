"""Skinny matmul for decode steps: y [M, N] = x [M, K] @ w [K, N] with few rows (M <= 16).

  y_MN = skinny_matmul(x_MK, w_KN, implementation="auto")

A decode step's linear layers at batch B are [B, K] x [K, N] products: the weight's bytes are all
the work. XLA (JAX 0.11.2, H200) runs them as Triton GEMM fusions that reach ~25-40% of the HBM
bandwidth at M = 1 (its autotuner times candidates with the weight warm in L2), or, at M = 1
without `DECODE_COMPILER_OPTIONS`, as a multiply that writes x * W and a reduce that reads it back
(README, "Why B1 was 4x off its floor").

Implementations:
- `xla`: `skinny_matmul_reference`, `jnp.dot` with float32 accumulation.
- `pallas_triton`: grid (N / block_n, splits). A program takes a [K / splits, block_n] slab of w
  and walks it in [block_k, block_n] tiles, each one tensor-core dot with the x rows (read as a
  16-row block with the rows past M masked to zero), so Triton software-pipelines the tile loads
  (`num_stages`). Each program writes its float32 partial [16, block_n]; XLA sums the splits and
  casts (one small fusion). The split count brings the grid to about `PROGRAMS_PER_SM` programs
  per SM: a decode weight has too few column tiles to fill the card alone.
- `auto`: pallas_triton on GPU when the shapes fit (N a multiple of a block_n, K of block_k),
  else xla.
Both accumulate in float32; they differ by summation order only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _splitk

MAX_ROWS = 16        # x rows a program holds (one tensor-core dot operand); M must be <= this
PROGRAMS_PER_SM = 2  # the split count aims at this many programs per SM


@dataclasses.dataclass(frozen=True)
class SkinnyMatmulConfig:
  """Launch parameters of the Triton kernel. None: chosen from the shapes (`_plan`)."""
  block_n: int | None = None
  block_k: int | None = None
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 3

  def validate(self) -> None:
    for name in ("block_n", "block_k", "num_splits"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"config.{name} must be a positive int or None, got {v!r}")
    for name in ("block_n", "block_k"):
      v = getattr(self, name)
      if v is not None and (v < 16 or not _splitk.is_power_of_2(v)):
        raise ValueError(f"config.{name} must be a power of 2 >= 16, got {v!r}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"config.num_warps must be a power of 2 in [1, 16], got {self.num_warps!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"config.num_stages must be a positive int, got {self.num_stages!r}")


def skinny_matmul_reference(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """Plain XLA: x @ w with float32 accumulation, in x's dtype."""
  return jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32).astype(x_MK.dtype)


def _plan(M: int, K: int, N: int, config: SkinnyMatmulConfig) -> tuple[int, int, int] | str:
  """(block_n, block_k, splits) for these shapes, or why the kernel cannot take them."""
  if M > MAX_ROWS:
    return f"M={M} rows exceed {MAX_ROWS}"
  block_n = config.block_n or next((b for b in (128, 64, 32, 16) if N % b == 0), None)
  if block_n is None or N % block_n:
    return f"N={N} is not a multiple of a block_n in (128, 64, 32, 16)"
  block_k = config.block_k or next((b for b in (128, 64, 32, 16) if K % b == 0), None)
  if block_k is None or K % block_k:
    return f"K={K} is not a multiple of a block_k in (128, 64, 32, 16)"
  if config.num_splits is not None:
    splits = config.num_splits
    if (K // block_k) % splits:
      return f"num_splits={splits} does not divide the K/block_k={K // block_k} tiles"
    return block_n, block_k, splits
  tiles_n, tiles_k = N // block_n, K // block_k
  want = max(1, PROGRAMS_PER_SM * _splitk.sm_count() // tiles_n)
  # the largest divisor of the K tiles at most `want` (every split gets whole tiles)
  splits = max(d for d in range(1, tiles_k + 1) if tiles_k % d == 0 and d <= want)
  return block_n, block_k, splits


def _kernel(x_ref, w_ref, o_ref, *, m: int, block_k: int, tiles_per_split: int,
            precision: lax.Precision):
  """Program (n, s). x_ref [R, K] (rows >= m masked); w_ref [K, block_n]; o_ref f32 [R, block_n]."""
  split = pl.program_id(1)
  from jax.experimental.pallas import triton as plgpu
  R = x_ref.shape[0]
  live = lax.broadcasted_iota(jnp.int32, (R, block_k), 0) < m

  def body(i, acc):
    k0 = pl.multiple_of((split * tiles_per_split + i) * block_k, block_k)
    x = plgpu.load(x_ref.at[:, pl.ds(k0, block_k)], mask=live, other=0)
    w = w_ref[pl.ds(k0, block_k), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

  acc = lax.fori_loop(0, tiles_per_split, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _skinny_triton(x_MK, w_KN, config: SkinnyMatmulConfig, interpret: bool):
  M, K = x_MK.shape
  N = w_KN.shape[1]
  block_n, block_k, splits = _plan(M, K, N, config)
  R = MAX_ROWS
  tiles_per_split = K // block_k // splits
  kernel = functools.partial(_kernel, m=M, block_k=block_k, tiles_per_split=tiles_per_split,
                             precision=_splitk.dot_precision(x_MK.dtype))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    compiler_params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
  sq = _splitk.SQUEEZED
  part = pl.pallas_call(
      kernel,
      grid=(N // block_n, splits),
      # x as an R-row block of the unpadded [M, K] array: the rows past M are masked in the
      # kernel (Pallas-Triton does not mask a block that overhangs the array)
      in_specs=[pl.BlockSpec((R, K), lambda n, s: (0, 0)),
                pl.BlockSpec((K, block_n), lambda n, s: (0, n))],
      out_specs=pl.BlockSpec((sq, R, block_n), lambda n, s: (s, 0, n)),
      out_shape=jax.ShapeDtypeStruct((splits, R, N), jnp.float32),
      compiler_params=compiler_params,
      interpret=interpret,
      name="skinny_matmul",
  )(x_MK, w_KN)
  return jnp.sum(part[:, :M], axis=0).astype(x_MK.dtype)


def skinny_matmul(x_MK: jax.Array, w_KN: jax.Array, *, implementation: str = "auto",
                  interpret: bool = False, config: SkinnyMatmulConfig | None = None) -> jax.Array:
  """x [M, K] @ w [K, N] for M <= 16, float32 accumulation, result in x's dtype.

  Args:
    x_MK: [M, K] float32 / bfloat16 / float16. w_KN: [K, N], the same dtype.
    implementation: "auto" | "xla" | "pallas_triton"; interpret: Pallas interpret mode (CPU).
    config: SkinnyMatmulConfig (Triton launch parameters); None picks them from the shapes.
  """
  if getattr(x_MK, "ndim", None) != 2 or getattr(w_KN, "ndim", None) != 2:
    raise ValueError(f"x_MK must be [M, K] and w_KN [K, N], got {getattr(x_MK, 'shape', None)} "
                     f"and {getattr(w_KN, 'shape', None)}")
  if x_MK.shape[1] != w_KN.shape[0]:
    raise ValueError(f"contracting sizes differ: x_MK {x_MK.shape}, w_KN {w_KN.shape}")
  if x_MK.dtype != w_KN.dtype or jnp.dtype(x_MK.dtype) not in (
      jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"x_MK and w_KN must share a float dtype (f32 / bf16 / f16), got "
                     f"{x_MK.dtype} and {w_KN.dtype}")
  if implementation not in ("auto", "xla", "pallas_triton"):
    raise ValueError(f"implementation must be auto | xla | pallas_triton, got {implementation!r}")
  config = SkinnyMatmulConfig() if config is None else config
  if not isinstance(config, SkinnyMatmulConfig):
    raise ValueError(f"config must be a SkinnyMatmulConfig, got {type(config).__name__}")
  config.validate()
  plan = _plan(x_MK.shape[0], x_MK.shape[1], w_KN.shape[1], config)
  if implementation == "auto":
    implementation = ("pallas_triton" if jax.default_backend() == "gpu" and not isinstance(plan, str)
                      else "xla")
  if implementation == "xla":
    return skinny_matmul_reference(x_MK, w_KN)
  if isinstance(plan, str):
    raise ValueError(f"implementation='pallas_triton': {plan}")
  return _skinny_triton(x_MK, w_KN, config, bool(interpret))
