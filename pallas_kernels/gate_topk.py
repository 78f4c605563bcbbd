"""The SeerAttention-R gate's block scores and the top-k block choice, fused in one kernel.

  idx_BKM, n_live_BK = gate_block_topk(qg_BKD, kc_BKND, lengths_B, block_size=64, k=64)

A sparse decode step with the gate computes, per (sequence, KV head) row, the scores
s_n = qg . kc[n] of its gate query qg (projected, RoPE'd and scaled: `effjax.sparse.gate.
gate_query`) against the N rows of its K-compression cache kc, then keeps the k best blocks
(`block_topk`). Unfused that is an XLA reduction writing [B, K, N] float32 scores and the top-k
kernel reading them back: two launches, each with its own start-up latency, on a path every
layer of every decode step waits for. Here one program per row streams its kc rows through
registers in chunks of `chunk` blocks (a software-pipelined loop of [chunk, Dg] loads), places
each chunk's scores in row c of a [C, chunk] register array, reshapes that to the [N] row and
runs `block_topk`'s exact selection on it (same rule: the first and the current block forced,
then the best scores, ties to the lower id, NaN as -inf; same outputs: ascending ids padded with
-1 in a power-of-2 width M > k, and the live count).

Implementations: `pallas_triton` (GPU, or interpret mode on CPU) and `xla` (`gate_scores` then
`block_topk_reference`: the reference). Scores are float32 sums of float32 products, as in XLA,
but in another order: a near-tie between the k-th and the (k+1)-th score can resolve differently
from the reference's scores. The tests therefore check the kernel's own scores (returned with
`return_scores=True`) against the reference scores, and its ids exactly against the reference
selection on those scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _splitk
from pallas_kernels.block_topk import (MAX_TRITON_BLOCKS, _check, _select_row,
                                       block_topk_reference)

# kc rows per loop step: [256, 64] bf16 = 32 KB a pipeline stage.
DEFAULT_CHUNK = 256


def gate_scores(qg_BKD: jax.Array, kc_BKND: jax.Array) -> jax.Array:
  """Reference scores qg . kc[n]: float32 [B, K, N] (float32 products and sums)."""
  return jnp.einsum("bkd,bknd->bkn", qg_BKD.astype(jnp.float32), kc_BKND.astype(jnp.float32))


def fused_chunk(n_blocks: int, chunk: int | None = None) -> int | None:
  """The chunk the fused kernel would use for N = n_blocks rows, or None if it can't: chunks
  are powers of 2 that divide N (the kernel reads whole chunks and never past the cache)."""
  want = DEFAULT_CHUNK if chunk is None else chunk
  c = min(want, _splitk.next_power_of_2(n_blocks))
  if n_blocks % c or _splitk.next_power_of_2(n_blocks) > MAX_TRITON_BLOCKS:
    return None
  return c


def _gate_topk_kernel(len_ref, qg_ref, kc_ref, idx_ref, n_ref, *scores_ref, block_size: int,
                      n_blocks: int, k: int, chunk: int):
  """Program (b, h). len_ref int32 []; qg_ref f32 [Dg]; kc_ref [N, Dg]; idx_ref int32 [M];
  n_ref int32 []; optional scores_ref f32 [N]."""
  n_chunks = n_blocks // chunk
  c_pad = _splitk.next_power_of_2(n_chunks)
  qg_D = qg_ref[...].astype(jnp.float32)
  row_CX = lax.broadcasted_iota(jnp.int32, (c_pad, chunk), 0)

  def body(c, s_CX):
    start = pl.multiple_of(c * chunk, chunk)
    kc_XD = kc_ref[pl.ds(start, chunk), :].astype(jnp.float32)
    s_X = jnp.sum(kc_XD * qg_D[None, :], axis=1)
    if scores_ref:
      scores_ref[0][pl.ds(start, chunk)] = s_X
    return jnp.where(row_CX == c, s_X[None, :], s_CX)

  # rows of chunks past N (c_pad > n_chunks) stay -inf; _select_row ignores blocks >= N anyway
  s_CX = lax.fori_loop(0, n_chunks, body, jnp.full((c_pad, chunk), -jnp.inf, jnp.float32))
  _select_row(s_CX.reshape(c_pad * chunk), len_ref[()], idx_ref, n_ref, block_size=block_size,
              n_blocks=n_blocks, k=k)


@functools.partial(jax.jit, static_argnames=("block_size", "k", "chunk", "interpret", "num_warps",
                                             "num_stages", "return_scores"))
def _gate_topk_triton(qg_BKD, kc_BKND, lengths_B, block_size: int, k: int, chunk: int,
                      interpret: bool, num_warps: int, num_stages: int, return_scores: bool):
  B, K, N, D = kc_BKND.shape
  k = min(k, N)
  m = _splitk.next_power_of_2(k + 1)  # as block_topk: at least one -1 slot past k
  sq = _splitk.SQUEEZED
  kernel = functools.partial(_gate_topk_kernel, block_size=block_size, n_blocks=N, k=k,
                             chunk=chunk)
  out_specs = [pl.BlockSpec((sq, sq, m), lambda b, h: (b, h, 0)),
               pl.BlockSpec((sq, sq), lambda b, h: (b, h))]
  out_shape = [jax.ShapeDtypeStruct((B, K, m), jnp.int32), jax.ShapeDtypeStruct((B, K), jnp.int32)]
  if return_scores:
    out_specs.append(pl.BlockSpec((sq, sq, N), lambda b, h: (b, h, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, K, N), jnp.float32))
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return pl.pallas_call(
      kernel,
      grid=(B, K),
      in_specs=[pl.BlockSpec((sq,), lambda b, h: (b,)),
                pl.BlockSpec((sq, sq, D), lambda b, h: (b, h, 0)),
                pl.BlockSpec((sq, sq, N, D), lambda b, h: (b, h, 0, 0))],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params,
      interpret=interpret,
      name="gate_block_topk",
  )(lengths_B.astype(jnp.int32), qg_BKD.astype(jnp.float32), kc_BKND)


def gate_block_topk(qg_BKD: jax.Array, kc_BKND: jax.Array, lengths_B: jax.Array, *,
                    block_size: int, k: int, implementation: str = "auto",
                    interpret: bool = False, chunk: int | None = None, num_warps: int = 8,
                    num_stages: int = 3, return_scores: bool = False):
  """Gate scores + top-k block selection of one layer (see the module docstring).

  Args:
    qg_BKD: float [B, K, Dg] gate queries (`effjax.sparse.gate.gate_query`).
    kc_BKND: float32 / bfloat16 [B, K, N, Dg] K-compression cache (one row per cache block).
    lengths_B: int [B] valid tokens per sequence. block_size: tokens per block. k: blocks to
      keep per row (>= 2), capped at N.
    implementation: "auto" (pallas_triton on a GPU when the kernel takes the shape, else xla) |
      "xla" | "pallas_triton". interpret: Pallas interpret mode.
    chunk: kc rows per loop step (a power of 2 dividing N; default 256 or N if smaller).
    num_warps / num_stages: Triton launch parameters.
    return_scores: also return the float32 [B, K, N] scores the selection used (for tests).

  Returns:
    (idx int32 [B, K, M], n_live int32 [B, K]) as `block_topk` (M = min(k, N) for xla, the
    power of 2 above k for pallas_triton) [, scores f32 [B, K, N]].
  """
  if getattr(kc_BKND, "ndim", None) != 4:
    raise ValueError(f"kc_BKND must be 4-D [B, K, N, Dg], got shape {getattr(kc_BKND, 'shape', None)}")
  B, K, N, D = kc_BKND.shape
  if getattr(qg_BKD, "shape", None) != (B, K, D):
    raise ValueError(f"qg_BKD must have shape [B, K, Dg]=({B}, {K}, {D}), got "
                     f"{getattr(qg_BKD, 'shape', None)}")
  for name, x in (("qg_BKD", qg_BKD), ("kc_BKND", kc_BKND)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")
  _check(jax.ShapeDtypeStruct((B, K, N), jnp.float32), lengths_B, block_size, k)
  if implementation not in ("auto", "xla", "pallas_triton"):
    raise ValueError(f"implementation must be auto | xla | pallas_triton, got {implementation!r}")
  if chunk is not None and (not isinstance(chunk, (int, np.integer)) or chunk < 1
                            or chunk & (chunk - 1)):
    raise ValueError(f"chunk must be a power of 2, got {chunk!r}")
  c = fused_chunk(N, chunk)
  if implementation == "auto":
    implementation = "pallas_triton" if jax.default_backend() == "gpu" and c else "xla"
  if implementation == "xla":
    scores = gate_scores(qg_BKD, kc_BKND)
    out = block_topk_reference(scores, lengths_B.astype(jnp.int32), block_size=int(block_size),
                               k=int(k))
    return (*out, scores) if return_scores else out
  if c is None:
    raise ValueError(f"implementation='pallas_triton' needs N={N} blocks to be a multiple of a "
                     f"power-of-2 chunk (chunk={chunk or DEFAULT_CHUNK}) and at most "
                     f"{MAX_TRITON_BLOCKS}; use 'xla' or block_topk on gate_scores")
  return tuple(_gate_topk_triton(qg_BKD, kc_BKND, lengths_B, int(block_size), int(k), int(c),
                                 bool(interpret), int(num_warps), int(num_stages),
                                 bool(return_scores)))
