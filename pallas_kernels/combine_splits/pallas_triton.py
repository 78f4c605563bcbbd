"""The split-K log-sum-exp merge as one Pallas Triton kernel launch (`combine_splits`'s
`pallas_triton` implementation).

XLA compiles the merge into three small kernels (max over the splits, then the weighted sums, then
the divide), about 5 us on an H200 when the split axis is long (64 splits). Here one program per
(b, k, query row) (`block_rows` rows per program, default 1) loads the splits of its row in chunks
of up to `chunk_elements` f32 (64 splits at H = 128), merges them with an online softmax and
writes the normalised row: the partials are read once, in one launch (H200: 2.2 us at B1 K8 N64
g4). Query rows per program, H200, bf16 out, kernel time, against the XLA merge:
  B1 K8 N64 g4 H128:     1 row 2.2 us, 4 rows 4.2 us, XLA 5.0 us
  B8 K8 N64 g4 H128:     1 row 4.9 us, 4 rows 13.3 us, XLA 8.1 us
  B1 K8 N66 g8 H128:     1 row 2.7 us, 8 rows 12.9 us, XLA 5.7 us
  B1 K8 N16 g128 H128:   1 row 4.7 us, 32 rows 13.4 us, XLA 7.8 us
(num_warps 8 and num_stages 1 changed these by < 0.6 us; chunks of 4 splits instead of all 64
made them 1.5-5x slower.) More, smaller programs win: the merge is latency bound.

Only the first g of the R rows of a partial are real: the split kernels leave the padding rows
unwritten, so they may hold anything (NaN, inf). The BlockSpecs select rows [0, g) and the kernel
never addresses the others.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch, tuned
from pallas_kernels.dispatch import NotSupported, require_platform


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch parameters; None takes the tuned value (`tuned.lookup("combine_splits",
  "pallas_triton")`). chunk: splits merged per loop step (a power of 2, capped at N);
  block_rows: query rows per program (a power of 2 dividing g)."""
  num_warps: int | None = None
  num_stages: int | None = None
  chunk: int | None = None
  block_rows: int | None = None


CONFIG = TritonConfig


def supported(g: int, R: int, H: int) -> str | None:
  """Why the kernel can't merge partials of R padded rows (g real) and head dim H, or None.
  Triton tiles are powers of 2, and rows [0, g) must be a whole block of the R axis."""
  if not isinstance(g, int) or not launch.is_power_of_2(g):
    return f"g={g} real rows must be a power of 2 for a Triton tile"
  if not isinstance(H, int) or not launch.is_power_of_2(H) or H < 16:
    return f"head dim H={H} must be a power of 2 >= 16 for Triton tiles"
  if not isinstance(R, int) or R < g or R % g != 0:
    return f"padded rows R={R} must be a multiple of g={g} (the first g rows form one block)"
  return None


def default_chunk(n_splits: int, block_rows: int, H: int, chunk_elements: int) -> int:
  """Splits merged per loop step: the largest power of 2 with [chunk, rows, H] f32 within
  chunk_elements (64 registers a thread at 4 warps) and no more than the n_splits there are."""
  return min(launch.prev_power_of_2(n_splits),
             launch.prev_power_of_2(max(1, chunk_elements // (block_rows * H))))


def _merge_chunk(o_ref, m_ref, l_ref, start, chunk: int, skip: int, state):
  """Folds the splits [start + skip, start + chunk) into the running merge (the online-softmax
  update with whole partials in place of scores).

  o_ref f32 [N, rows, H], m_ref / l_ref f32 [N, rows]; state = (acc f32 [rows, H], running max
  f32 [rows], running sum f32 [rows]). skip 0: plain loads of the whole chunk; skip > 0 (the
  ragged tail, whose first `skip` splits were merged already): masked loads that read none of
  those and give them m = -inf, l = 0, o = 0, i.e. weight 0 and no contribution.
  """
  acc_RH, m_R, l_R = state
  rows, H = acc_RH.shape
  sl = pl.ds(start, chunk)
  if skip == 0:
    m_CR, l_CR, o_CRH = m_ref[sl, :], l_ref[sl, :], o_ref[sl, :, :]
  else:
    new_C = lax.broadcasted_iota(jnp.int32, (chunk,), 0) >= skip
    new_CR = jnp.broadcast_to(new_C[:, None], (chunk, rows))
    new_CRH = jnp.broadcast_to(new_C[:, None, None], (chunk, rows, H))
    m_CR = plgpu.load(m_ref.at[sl, :], mask=new_CR, other=-jnp.inf)
    l_CR = plgpu.load(l_ref.at[sl, :], mask=new_CR, other=0.0)
    o_CRH = plgpu.load(o_ref.at[sl, :, :], mask=new_CRH, other=0.0)
  m_new_R = jnp.maximum(m_R, jnp.max(m_CR, axis=0))
  # The running max starts at -inf, so the first chunk's correction is exp(-inf) = 0 against a
  # zero state; every chunk holds at least one split not yet merged, so m_new is finite from then
  # on (>= MASK_VALUE, an empty split's max) and no (-inf) - (-inf) = NaN can arise.
  corr_R = jnp.exp(m_R - m_new_R)
  w_CR = jnp.exp(m_CR - m_new_R[None, :])
  l_new_R = corr_R * l_R + jnp.sum(w_CR * l_CR, axis=0)
  acc_RH = corr_R[:, None] * acc_RH + jnp.sum(w_CR[:, :, None] * o_CRH, axis=0)
  return acc_RH, m_new_R, l_new_R


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, n_splits: int, chunk: int):
  """Program (b, k, r). o_ref f32 [N, rows, H], m_ref / l_ref f32 [N, rows] (rows
  [r * rows, (r + 1) * rows) of the g real ones); out_ref [rows, H] in the output dtype.

  The split axis is walked in chunks of `chunk` <= N splits: N // chunk whole chunks with plain
  loads, then, if N is not a multiple of chunk, the window [N - chunk, N) aligned to the end with
  its already-merged head masked off. No slice ever reaches past split N - 1, so nothing out of
  bounds is addressed for any N (no padding copy in XLA, and interpret mode sees the same loads).
  """
  rows, H = out_ref.shape
  state = (jnp.zeros((rows, H), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  n_full, tail = divmod(n_splits, chunk)

  def body(c, state):
    # chunk-aligned starts: Triton can then vectorise the loads across splits too
    return _merge_chunk(o_ref, m_ref, l_ref, pl.multiple_of(c * chunk, chunk), chunk, 0, state)

  if n_full == 1:  # one chunk needs no loop (and a constant start needs no alignment hint)
    state = _merge_chunk(o_ref, m_ref, l_ref, 0, chunk, 0, state)
  else:
    state = lax.fori_loop(0, n_full, body, state)
  if tail:
    state = _merge_chunk(o_ref, m_ref, l_ref, n_splits - chunk, chunk, chunk - tail, state)
  acc_RH, _, l_R = state
  # Same normalisation as combine_splits: rows with l = 0 in every split (no valid key) divide a
  # zero accumulator by 1 and come out as zeros, not NaN.
  out_ref[...] = (acc_RH / jnp.where(l_R > 0, l_R, 1.0)[:, None]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("g", "out_dtype", "interpret", "num_warps",
                                             "num_stages", "chunk", "block_rows"))
def _combine_call(o_BKNRH, m_BKNR, l_BKNR, *, g: int, out_dtype, interpret: bool, num_warps: int,
                  num_stages: int, chunk: int, block_rows: int):
  B, K, N, _, H = o_BKNRH.shape
  rows = block_rows
  sq = pl.squeezed
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  # Block r of `rows` rows along R is rows [r * rows, (r + 1) * rows): with r < g // rows only the
  # first g rows are ever addressed. The whole split axis is one block (any N: it is never
  # loaded whole, only in power-of-2 chunks).
  return pl.pallas_call(
      functools.partial(_combine_kernel, n_splits=N, chunk=chunk),
      grid=(B, K, g // rows),
      in_specs=[pl.BlockSpec((sq, sq, N, rows, H), lambda b, k, r: (b, k, 0, r, 0)),
                pl.BlockSpec((sq, sq, N, rows), lambda b, k, r: (b, k, 0, r)),
                pl.BlockSpec((sq, sq, N, rows), lambda b, k, r: (b, k, 0, r))],
      out_specs=pl.BlockSpec((sq, sq, rows, H), lambda b, k, r: (b, k, r, 0)),
      out_shape=jax.ShapeDtypeStruct((B, K, g, H), out_dtype),
      compiler_params=compiler_params,
      interpret=interpret,
      name="combine_splits",
  )(o_BKNRH, m_BKNR, l_BKNR)


def combine_splits(o_BKNRH: jax.Array, m_BKNR: jax.Array, l_BKNR: jax.Array, g: int, out_dtype,
                   *, interpret: bool = False, config: TritonConfig | None = None) -> jax.Array:
  """The Triton merge; shapes as `pallas_kernels.combine_splits`."""
  require_platform("gpu", interpret, "the Pallas Triton merge")
  B, K, N, R, H = o_BKNRH.shape
  why = supported(g, R, H)
  if why is not None:
    raise NotSupported(why)
  config = config or TritonConfig()
  t = tuned.lookup("combine_splits", "pallas_triton")
  num_warps = config.num_warps or t["num_warps"]
  num_stages = config.num_stages or t["num_stages"]
  block_rows = config.block_rows or t["block_rows"]
  if num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"num_warps must be a power of 2 in [1, 16], got {num_warps!r}")
  if not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
  if not isinstance(block_rows, int) or not launch.is_power_of_2(block_rows) or g % block_rows:
    raise ValueError(f"block_rows must be a power of 2 dividing g={g}, got {block_rows!r}")
  chunk = config.chunk or default_chunk(N, block_rows, H, t["chunk_elements"])
  if not isinstance(chunk, int) or not launch.is_power_of_2(chunk):
    raise ValueError(f"chunk must be a power of 2, got {chunk!r}")
  chunk = min(chunk, launch.prev_power_of_2(N))  # a chunk never spans more splits than there are
  f32 = jnp.float32
  return _combine_call(o_BKNRH.astype(f32), m_BKNR.astype(f32), l_BKNR.astype(f32), g=g,
                       out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret),
                       num_warps=num_warps, num_stages=num_stages, chunk=chunk,
                       block_rows=block_rows)
