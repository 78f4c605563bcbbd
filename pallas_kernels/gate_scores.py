"""SeerAttention-R gate scores of one decode step as one kernel, optionally with the top-k.

  scores_BKN = gate_scores(q_BKGH, wq_KCD, kc_BKND, pos_B, rope_theta=1e4)
  idx_BKM, n_live_BK = gate_topk(q_BKGH, wq_KCD, kc_BKND, pos_B, lengths_B, rope_theta=1e4,
                                 block_size=64, k=64)

Per (sequence b, KV head k), with Dg the gate dim and G the query heads of the group:
  gate query  r = RoPE(concat_g q[b, k, g] @ wq[k], pos[b]) / sqrt(Dg)       [Dg], rotate-half RoPE
  scores      s[n] = r . kc[b, k, n]                                          over the Nb cache rows
(`effjax.sparse.gate.gate_logits`'s math; kc is the K-compression cache, float32 or bfloat16.)

Why a kernel: in XLA a decode step's gate was five small kernels (convert, transposes, the
projection GEMM, RoPE, the scores reduction), each ~1-2 us of launch and ramp on the H200 against a
3.6 us read of the bf16 cache at B8 S128K. Here one program per (b, k, chunk of rows) computes the
gate query itself (G x H x Dg multiply-adds; wq[k] comes from L2) and streams its rows of the cache
in sub-tiles of `SUB_ROWS` (two half-width loads, so the RoPE halves never need a register
shuffle). `gate_topk` runs the whole row in one program and, after a CTA barrier, the exact top-k
search of `block_topk` on the scores it just wrote: one launch for the whole selector.

Implementations: `xla` (`gate_scores_reference` [+ `block_topk_reference`]), `pallas_triton`,
`auto` (Triton on GPU, XLA elsewhere). Scores agree to float32 rounding (the sums run in a
different order); the top-k of `gate_topk` is exactly `block_topk` of its own scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _splitk
from pallas_kernels import block_topk as _topk

# Cache rows a program folds per loop step: [SUB_ROWS, Dg / 2] per half (8K bf16 at Dg = 64).
SUB_ROWS = 256
# How a tile's scores are computed (`_scores_into`): a tensor-core dot, whose loads Triton
# pipelines through shared memory (USE_DOT), or a multiply-and-sum with PREFETCH tiles loaded
# ahead in registers.
USE_DOT = True
PREFETCH = 0
# Rows of a program's block: at least the 16 rows of a dot tile.
MIN_ROWS = 16


def rope_inv_freq(d_gate: int, theta: float) -> jax.Array:
  """RoPE inverse frequencies [Dg / 2], as `effjax.model.transformer.rope_tables` computes them."""
  return 1.0 / (theta ** (jnp.arange(0, d_gate, 2, dtype=jnp.float32) / d_gate))


@functools.partial(jax.jit, static_argnames=("rope_theta",))
def gate_query_reference(q_BKGH: jax.Array, wq_KCD: jax.Array, pos_B: jax.Array,
                         rope_theta: float) -> jax.Array:
  """The scaled, rotated gate query: float32 [B, K, Dg] (full float32 products). XLA, also in
  front of the kernels: a GEMM and one elementwise fusion (~1 us on the H200); always under jit,
  so the RoPE frequencies are folded the same way for the reference and the kernels."""
  B, K, G, H = q_BKGH.shape
  D = wq_KCD.shape[-1]
  qg = jnp.einsum("bkc,kcd->bkd", q_BKGH.astype(jnp.float32).reshape(B, K, G * H),
                  wq_KCD.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  ang = pos_B.astype(jnp.float32)[:, None] * rope_inv_freq(D, rope_theta)        # [B, Dg/2]
  cos, sin = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]
  q1, q2 = qg[..., :D // 2], qg[..., D // 2:]
  return jnp.concatenate([q1 * cos - q2 * sin, q2 * cos + q1 * sin], axis=-1) * D ** -0.5


@functools.partial(jax.jit, static_argnames=("rope_theta",))
def gate_scores_reference(q_BKGH, wq_KCD, kc_BKND, pos_B, *, rope_theta: float) -> jax.Array:
  """Plain-XLA gate scores: float32 [B, K, Nb]."""
  r = gate_query_reference(q_BKGH, wq_KCD, pos_B, rope_theta=rope_theta)
  return jnp.einsum("bkd,bknd->bkn", r, kc_BKND.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)


# ------------------------------------------------------------------------- Pallas Triton kernels


def _dot_operand(r_ref, dtype):
  """The gate query as the [Dg, 16] right operand of a tensor-core dot with the cache tile, and
  the [16] column weights that sum the dot's columns back into one score per row. A bf16 / f16
  cache: r split into three half-precision parts (hi + mid + lo carry its 24 mantissa bits; the
  products with the cache's 8-bit mantissas are exact and accumulate in float32), in columns 0-2.
  A float32 cache: r itself in column 0 (an IEEE float32 dot)."""
  r = r_ref[...].astype(jnp.float32)
  D = r.shape[0]
  col = lax.broadcasted_iota(jnp.int32, (D, 16), 1)
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    return jnp.where(col == 0, r[:, None], 0.0), lax.broadcasted_iota(jnp.int32, (16,), 0) < 1
  hi = r.astype(dtype)
  rest = r - hi.astype(jnp.float32)
  mid = rest.astype(dtype)
  lo = (rest - mid.astype(jnp.float32)).astype(dtype)
  parts = jnp.where(col == 0, hi[:, None].astype(jnp.float32),
                    jnp.where(col == 1, mid[:, None].astype(jnp.float32),
                              jnp.where(col == 2, lo[:, None].astype(jnp.float32), 0.0)))
  return parts.astype(dtype), lax.broadcasted_iota(jnp.int32, (16,), 0) < 3


def _scores_into(r_ref, kc_ref, s_ref, first_row, n_rows: int, sub: int, prefetch: int,
                 use_dot: bool = True) -> None:
  """s_ref[i] = r . kc_ref[i] for the block's rows, `sub` rows per loop step.

  Rows whose global index (first_row + i) is >= n_rows are neither read nor written: Pallas-Triton
  does not mask blocks that overhang the array, so a ragged last block would otherwise read the
  next row's cache and overwrite the next row's scores.

  use_dot: the scores of a tile as a [sub, Dg] x [Dg, 16] dot (`_dot_operand`). Triton's software
  pipeliner (`num_stages`, cp.async into shared memory) only pipelines loads that feed a dot; a
  multiply-and-sum tile waits a full memory latency per loop step (H200, B8 S128K bf16, 256
  programs: 9.6 us at 2, 3 or 4 stages). prefetch: tiles loaded ahead in registers instead (7.4 us
  at one tile ahead), for the multiply-and-sum path."""
  rows = kc_ref.shape[0]
  sub = min(sub, rows)
  n_iter = rows // sub
  from jax.experimental.pallas import triton as plgpu
  iota = lax.broadcasted_iota(jnp.int32, (sub,), 0)
  if use_dot:
    rhs, cols = _dot_operand(r_ref, kc_ref.dtype)
    precision = _splitk.dot_precision(kc_ref.dtype)
  else:
    r = r_ref[...].astype(jnp.float32)[None, :]

  def rows_of(i):   # (start, live rows) of step i; steps past the block load nothing
    start = pl.multiple_of(jnp.minimum(i, n_iter - 1) * sub, sub)
    return start, (i < n_iter) & (first_row + start + iota < n_rows)

  def load(i):
    start, live = rows_of(i)
    return plgpu.load(kc_ref.at[pl.ds(start, sub), :], mask=live[:, None], other=0.0)

  def fold(i, kc):
    start, live = rows_of(i)
    if use_dot:
      out = jnp.dot(kc, rhs, preferred_element_type=jnp.float32, precision=precision)
      s = jnp.sum(jnp.where(cols[None, :], out, 0.0), axis=1)
    else:
      s = jnp.sum(kc.astype(jnp.float32) * r, axis=1)
    plgpu.store(s_ref.at[pl.ds(start, sub)], s, mask=live)

  if prefetch <= 0:
    def body(i, carry):
      fold(i, load(i))
      return carry
    lax.fori_loop(0, n_iter, body, 0)
    return

  def body_pf(i, tiles):
    nxt = load(i + prefetch)
    fold(i, tiles[0])
    return tiles[1:] + (nxt,)

  lax.fori_loop(0, n_iter, body_pf, tuple(load(jnp.int32(j)) for j in range(prefetch)))


def _gate_scores_kernel(r_ref, kc_ref, s_ref, *, n_rows: int, sub: int, prefetch: int,
                        use_dot: bool):
  """Program (b, k, j): rows [j T, (j + 1) T) of the (b, k) cache. r_ref [Dg] f32 (the rotated,
  scaled gate query), kc_ref [T, Dg], s_ref f32 [T]."""
  _scores_into(r_ref, kc_ref, s_ref, pl.program_id(2) * kc_ref.shape[0], n_rows, sub, prefetch,
               use_dot)


def _gate_topk_kernel(len_ref, r_ref, kc_ref, s_ref, idx_ref, n_ref, *, sub: int, prefetch: int,
                      use_dot: bool, block_size: int, n_blocks: int, k: int, interpret: bool):
  """Program (b, k): the whole row. kc_ref [Np, Dg] (Np a power of 2 >= Nb), s_ref f32 [Np]
  (the scores, also the search's input), idx_ref int32 [M], n_ref int32 []."""
  _scores_into(r_ref, kc_ref, s_ref, 0, n_blocks, sub, prefetch, use_dot)
  from jax.experimental.pallas import triton as plgpu
  if not interpret:
    # Every thread reads every score next: the CTA barrier orders the stores above (made by
    # other threads) before the load (bar.sync also makes global writes visible in the CTA).
    plgpu.debug_barrier()
  n_pad = s_ref.shape[0]
  live = lax.broadcasted_iota(jnp.int32, (n_pad,), 0) < n_blocks
  s = plgpu.load(s_ref, mask=live, other=-jnp.inf)
  _topk.select_row(s, len_ref[()], idx_ref, n_ref, block_size=block_size, n_blocks=n_blocks,
                   k=k)


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def default_chunks(batch_kv: int, n_blocks: int) -> int:
  """Programs per (b, k) row for `gate_scores`: about 256 programs in all, each >= 256 rows."""
  want = max(1, 256 // max(batch_kv, 1))
  return int(min(1 << (want.bit_length() - 1), max(1, n_blocks // 256)))


@functools.partial(jax.jit, static_argnames=("chunks", "num_warps", "num_stages", "interpret",
                                             "sub_rows", "prefetch", "use_dot"))
def _gate_scores_triton(r_BKD, kc_BKND, chunks: int, num_warps: int, num_stages: int,
                        interpret: bool, sub_rows: int = SUB_ROWS, prefetch: int = PREFETCH,
                        use_dot: bool = USE_DOT):
  B, K, N, D = kc_BKND.shape
  rows = max(MIN_ROWS, _splitk.next_power_of_2(-(-N // chunks)))
  sq = _splitk.SQUEEZED
  return pl.pallas_call(
      functools.partial(_gate_scores_kernel, n_rows=N, sub=sub_rows, prefetch=prefetch,
                        use_dot=use_dot),
      grid=(B, K, -(-N // rows)),
      in_specs=[pl.BlockSpec((sq, sq, D), lambda b, k, j: (b, k, 0)),
                pl.BlockSpec((sq, sq, rows, D), lambda b, k, j: (b, k, j, 0))],
      out_specs=pl.BlockSpec((sq, sq, rows), lambda b, k, j: (b, k, j)),
      out_shape=jax.ShapeDtypeStruct((B, K, N), jnp.float32),
      compiler_params=_compiler_params(interpret, num_warps, num_stages),
      interpret=interpret,
      name="gate_scores",
  )(r_BKD, kc_BKND)


@functools.partial(jax.jit, static_argnames=("block_size", "k", "num_warps", "num_stages",
                                             "interpret", "sub_rows", "prefetch", "use_dot"))
def _gate_topk_triton(r_BKD, kc_BKND, lengths_B, block_size: int, k: int, num_warps: int,
                      num_stages: int, interpret: bool, sub_rows: int = SUB_ROWS,
                      prefetch: int = PREFETCH, use_dot: bool = USE_DOT):
  """(idx, n_live, scores): the kernel's three outputs (the scores are its scratch)."""
  B, K, N, D = kc_BKND.shape
  k = min(k, N)
  n_pad = max(MIN_ROWS, _splitk.next_power_of_2(N))
  m = _splitk.next_power_of_2(k + 1)
  sq = _splitk.SQUEEZED
  scores, idx, n_live = pl.pallas_call(
      functools.partial(_gate_topk_kernel, sub=sub_rows, prefetch=prefetch, use_dot=use_dot,
                        block_size=block_size,
                        n_blocks=N, k=k,
                        interpret=interpret),
      grid=(B, K),
      in_specs=[pl.BlockSpec((sq,), lambda b, h: (b,)),
                pl.BlockSpec((sq, sq, D), lambda b, h: (b, h, 0)),
                pl.BlockSpec((sq, sq, n_pad, D), lambda b, h: (b, h, 0, 0))],
      out_specs=[pl.BlockSpec((sq, sq, n_pad), lambda b, h: (b, h, 0)),
                 pl.BlockSpec((sq, sq, m), lambda b, h: (b, h, 0)),
                 pl.BlockSpec((sq, sq), lambda b, h: (b, h))],
      out_shape=[jax.ShapeDtypeStruct((B, K, N), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, m), jnp.int32),
                 jax.ShapeDtypeStruct((B, K), jnp.int32)],
      compiler_params=_compiler_params(interpret, num_warps, num_stages),
      interpret=interpret,
      name="gate_topk",
  )(lengths_B.astype(jnp.int32), r_BKD, kc_BKND)
  return idx, n_live, scores


# ------------------------------------------------------------------------------------ dispatch


def _check(q_BKGH, wq_KCD, kc_BKND, pos_B) -> None:
  if getattr(q_BKGH, "ndim", None) != 4:
    raise ValueError(f"q_BKGH must be 4-D [B, K, G, H], got shape {getattr(q_BKGH, 'shape', None)}")
  B, K, G, H = q_BKGH.shape
  if getattr(kc_BKND, "ndim", None) != 4 or tuple(kc_BKND.shape[:2]) != (B, K):
    raise ValueError(f"kc_BKND must be [B={B}, K={K}, Nb, Dg], got {getattr(kc_BKND, 'shape', None)}")
  D = kc_BKND.shape[-1]
  if getattr(wq_KCD, "shape", None) != (K, G * H, D):
    raise ValueError(f"wq_KCD must be [K, G*H, Dg]=({K}, {G * H}, {D}), got "
                     f"{getattr(wq_KCD, 'shape', None)}")
  if D % 2 or kc_BKND.shape[2] < 1:
    raise ValueError(f"gate dim Dg={D} must be even and the cache non-empty, got {kc_BKND.shape}")
  for name, x in (("q_BKGH", q_BKGH), ("wq_KCD", wq_KCD), ("kc_BKND", kc_BKND)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")
  _splitk.check_positions("pos_B", pos_B, B, np.iinfo(np.int32).max, "int32 max")


def _why_not_triton(q_BKGH, kc_BKND) -> str | None:
  D = kc_BKND.shape[-1]
  if not _splitk.is_power_of_2(D) or D < 16:
    return f"gate dim Dg={D} must be a power of 2 >= 16 for Triton tiles"
  return None


def _resolve(implementation: str, q_BKGH, kc_BKND) -> str:
  if implementation not in ("auto", "xla", "pallas_triton"):
    raise ValueError(f"implementation must be auto | xla | pallas_triton, got {implementation!r}")
  why = _why_not_triton(q_BKGH, kc_BKND)
  if implementation == "auto":
    return "pallas_triton" if jax.default_backend() == "gpu" and why is None else "xla"
  if implementation == "pallas_triton" and why is not None:
    raise ValueError(f"implementation='pallas_triton': {why}")
  return implementation


def _check_launch(num_warps, num_stages) -> None:
  if num_warps is not None and (not isinstance(num_warps, (int, np.integer)) or num_warps < 1
                                or num_warps & (num_warps - 1)):
    raise ValueError(f"num_warps must be a power of 2, got {num_warps!r}")
  if num_stages is not None and (not isinstance(num_stages, (int, np.integer)) or num_stages < 1):
    raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")


def gate_scores(q_BKGH: jax.Array, wq_KCD: jax.Array, kc_BKND: jax.Array, pos_B: jax.Array, *,
                rope_theta: float, implementation: str = "auto", interpret: bool = False,
                chunks: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None) -> jax.Array:
  """Gate scores of one new token per sequence (see the module docstring).

  Args:
    q_BKGH: [B, K, G, H] query heads (any float dtype; used as float32).
    wq_KCD: [K, G*H, Dg] gate query projection of the layer.
    kc_BKND: [B, K, Nb, Dg] K-compression cache (float32 or bfloat16).
    pos_B: int [B] position of the new token (RoPE angle).
    rope_theta: RoPE base. implementation: "auto" | "xla" | "pallas_triton".
    chunks: Triton programs per (b, k) row (default `default_chunks`); num_warps (default 4) /
      num_stages (default 3): Triton launch parameters.

  Returns: float32 [B, K, Nb].
  """
  _check(q_BKGH, wq_KCD, kc_BKND, pos_B)
  _check_launch(num_warps, num_stages)
  if chunks is not None and (not isinstance(chunks, (int, np.integer)) or chunks < 1):
    raise ValueError(f"chunks must be a positive int, got {chunks!r}")
  if _resolve(implementation, q_BKGH, kc_BKND) == "xla":
    return gate_scores_reference(q_BKGH, wq_KCD, kc_BKND, pos_B, rope_theta=float(rope_theta))
  B, K = q_BKGH.shape[:2]
  N = kc_BKND.shape[2]
  chunks = int(chunks or default_chunks(B * K, N))
  r = gate_query_reference(q_BKGH, wq_KCD, pos_B, rope_theta=float(rope_theta))
  return _gate_scores_triton(r, kc_BKND, chunks, int(num_warps or 4), int(num_stages or 3),
                             bool(interpret))


def gate_topk(q_BKGH: jax.Array, wq_KCD: jax.Array, kc_BKND: jax.Array, pos_B: jax.Array,
              lengths_B: jax.Array, *, rope_theta: float, block_size: int, k: int,
              implementation: str = "auto", interpret: bool = False,
              num_warps: int | None = None, num_stages: int | None = None):
  """`block_topk(gate_scores(...), lengths_B, block_size=, k=)` in one kernel (pallas_triton: one
  program per (b, k) row). Returns (idx int32 [B, K, M], n_live int32 [B, K]) as `block_topk`
  (M = min(k, Nb) for xla, the power of 2 above it for pallas_triton)."""
  _check(q_BKGH, wq_KCD, kc_BKND, pos_B)
  _check_launch(num_warps, num_stages)
  N = kc_BKND.shape[2]
  B = q_BKGH.shape[0]
  _splitk.check_positions("lengths_B", lengths_B, B, N * block_size if isinstance(
      block_size, (int, np.integer)) else np.iinfo(np.int32).max, "Nb * block_size")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"k must be an int >= 2 (first + current block), got {k!r}")
  impl = _resolve(implementation, q_BKGH, kc_BKND)
  if impl == "pallas_triton" and _splitk.next_power_of_2(N) > _topk.MAX_TRITON_BLOCKS:
    if implementation == "pallas_triton":
      raise ValueError(f"implementation='pallas_triton' takes at most {_topk.MAX_TRITON_BLOCKS} "
                       f"blocks per row (padded to a power of 2), got Nb={N}; use 'xla'")
    impl = "xla"
  if impl == "xla":
    s = gate_scores_reference(q_BKGH, wq_KCD, kc_BKND, pos_B, rope_theta=float(rope_theta))
    return _topk.block_topk_reference(s, lengths_B.astype(jnp.int32), block_size=int(block_size),
                                      k=int(k))
  n_pad = _splitk.next_power_of_2(N)
  warps = num_warps or (4 if n_pad <= 1024 else 8 if n_pad <= 8192 else 16)
  r = gate_query_reference(q_BKGH, wq_KCD, pos_B, rope_theta=float(rope_theta))
  return _gate_topk_triton(r, kc_BKND, lengths_B, int(block_size), int(k), int(warps),
                           int(num_stages or 3), bool(interpret))[:2]
