"""Block scores -> block indices for block-sparse prefill attention
(`pallas_kernels.block_sparse_attention`).

Every selector returns int32 [B, H, nQ, M]: for each sequence, head (query head, or KV head for
per-group scores) and query block, the selected key blocks ascending, padded with -1. Rules shared
by all of them: only causally visible blocks (j <= i) are chosen, the diagonal block is always
kept (a query always sees its own block's earlier tokens), the last `dense_rows` query blocks of
each sequence keep every visible block (SeerAttention keeps the final rows dense: they are few and
carry the tokens generation starts from), and query blocks past a sequence's length select
nothing (their output is zero anyway).

Selectors: `select_threshold` (gate probability >= tau), `select_nz_ratio` (per-row top-k with
k_i = ceil(ratio * (i + 1)): the density over the causal triangle is the ratio), `select_oracle`
(the same top-k on the ground-truth target of `pallas_kernels.flash_attention`),
`select_oracle_mass` (the top-k by attention mass per block: an ablation of the target's
max-pooling), `select_static`
(attention sinks + a local window, the training-free baseline). `density` and `recall` measure a
selection.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_mask, per_query_head, token_mask
from pallas_kernels.block_topk import prefix_topk
from pallas_kernels.flash_attention import attention_probs, flash_attention


def num_blocks(T: int, block_size: int) -> int:
  return -(-T // block_size)


def visible(lengths_B: jax.Array, nb: int, block_size: int) -> jax.Array:
  """bool [B, 1, nQ, nK]: block j is causally visible from query block i, which holds a valid
  token (every such j lies below the length too)."""
  i, j = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
  row_ok = jnp.arange(nb)[None, :, None] * block_size < lengths_B[:, None, None]
  return ((j <= i)[None] & row_ok)[:, None]


def forced(lengths_B: jax.Array, nb: int, block_size: int, dense_rows: int,
           sink_blocks: int = 0, local_blocks: int = 1) -> jax.Array:
  """bool [B, 1, nQ, nK]: the diagonal block (with local_blocks > 1: the local_blocks blocks
  ending at it), the first sink_blocks blocks, and every visible block of the last dense_rows
  valid query blocks."""
  if sink_blocks < 0 or local_blocks < 1:
    raise ValueError(f"need sink_blocks >= 0 and local_blocks >= 1, got {sink_blocks}, "
                     f"{local_blocks}")
  vis = visible(lengths_B, nb, block_size)
  i, j = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
  last_B = (lengths_B + block_size - 1) // block_size                       # valid query blocks
  dense = jnp.arange(nb)[None, :] >= (last_B - dense_rows)[:, None]         # [B, nQ]
  always = (j > i - local_blocks) | (j < sink_blocks)
  return vis & (always[None, None] | dense[:, None, :, None])


def _ceil_ratio(ratio: float, n):
  """ceil(ratio * n), robust to float noise (0.1 * 30 is 3.0000000000000004)."""
  return jnp.ceil(jnp.round(ratio * n * 1e6) / 1e6).astype(jnp.int32)


def _top(scores_BHQN: jax.Array, keep_BHQN: jax.Array, force_BHQN: jax.Array, count_BHQ,
         width: int) -> jax.Array:
  """The forced blocks, then the highest-scoring kept ones, count_BHQ in all (None: all kept),
  as ascending ids of static width, -1 padded. Ties go to the lower block index."""
  nk = scores_BHQN.shape[-1]
  s = jnp.where(force_BHQN, jnp.inf,
                jnp.where(keep_BHQN, jnp.nan_to_num(scores_BHQN.astype(jnp.float32), nan=-jnp.inf),
                          -jnp.inf))
  # best first, ties to the lower block (lax.top_k's order): a top-k, not a sort of every row.
  # top_k orders floats totally (-0 below +0), so zeros are made one value first
  order = jax.lax.top_k(jnp.where(s == 0, 0.0, s), width)[1]
  live = jnp.take_along_axis(force_BHQN | keep_BHQN, order, axis=-1)
  if count_BHQ is not None:
    live &= jnp.arange(width) < count_BHQ[..., None]
  idx = jnp.sort(jnp.where(live, order, nk), axis=-1)
  return jnp.where(idx < nk, idx, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_size", "dense_rows", "max_blocks",
                                             "sink_blocks", "local_blocks"))
def select_threshold(probs_BHQN: jax.Array, lengths_B: jax.Array, block_size: int,
                     threshold: float, dense_rows: int = 0,
                     max_blocks: int | None = None, sink_blocks: int = 0,
                     local_blocks: int = 1) -> jax.Array:
  """Blocks whose gate probability is >= threshold, plus the forced ones (as `select_nz_ratio`);
  at most max_blocks per row (the highest probabilities win; None: no cap, M = nK).
  probs [B, H, nQ, nK] -> int32 [B, H, nQ, M]."""
  if max_blocks is not None and (dense_rows or max_blocks < 1):
    raise ValueError(f"max_blocks must be >= 1 and leaves no room for dense rows (every visible "
                     f"block); got max_blocks={max_blocks}, dense_rows={dense_rows}")
  nb = probs_BHQN.shape[-1]
  vis = visible(lengths_B, nb, block_size)
  force = jnp.broadcast_to(forced(lengths_B, nb, block_size, dense_rows, sink_blocks,
                                  local_blocks), probs_BHQN.shape)
  keep = vis & (probs_BHQN >= threshold)
  width = nb if max_blocks is None else min(max_blocks, nb)
  count = None if max_blocks is None else jnp.full(probs_BHQN.shape[:-1], width)
  return _top(probs_BHQN, keep, force, count, width)


def nz_ratio_width(nb: int, nz_ratio: float, dense_rows: int = 0) -> int:
  """M of `select_nz_ratio`: the widest row, ceil(ratio * nK) (nK with dense rows)."""
  return nb if dense_rows else max(1, min(nb, math.ceil(round(nz_ratio * nb, 6))))


@functools.partial(jax.jit, static_argnames=("block_size", "nz_ratio", "dense_rows",
                                             "sink_blocks", "local_blocks", "implementation",
                                             "interpret"))
def select_nz_ratio(scores_BHQN: jax.Array, lengths_B: jax.Array, block_size: int,
                    nz_ratio: float, dense_rows: int = 0, sink_blocks: int = 0,
                    local_blocks: int = 1, implementation=None,
                    interpret: bool = False) -> jax.Array:
  """Per-row top-k: query block i keeps k_i = ceil(nz_ratio * (i + 1)) of its i + 1 visible
  blocks (at least the forced ones: the diagonal, or with local_blocks > 1 the local window
  ending at it, and the first sink_blocks; all of them in dense rows), the rest of its budget
  the highest scores. scores [B, H, nQ, nK] (gate logits or probabilities, or a target) ->
  int32 [B, H, nQ, M], M = nz_ratio_width(nK, nz_ratio, dense_rows), widened to hold the forced
  blocks. The top-k runs as `pallas_kernels.block_topk.prefix_topk` (a row's visible blocks are
  a prefix) with the given `implementation` (None: its default) and `interpret`. NaN scores
  rank lowest and +inf ones just below the forced blocks."""
  if not 0 < nz_ratio <= 1:
    raise ValueError(f"nz_ratio must be in (0, 1], got {nz_ratio}")
  nb = scores_BHQN.shape[-1]
  force = jnp.broadcast_to(forced(lengths_B, nb, block_size, dense_rows, sink_blocks,
                                  local_blocks), scores_BHQN.shape)
  k_Q = jnp.maximum(_ceil_ratio(nz_ratio, jnp.arange(1, nb + 1)), 1)        # [nQ]
  n_forced = jnp.sum(force, axis=-1)
  count = jnp.maximum(jnp.broadcast_to(k_Q, scores_BHQN.shape[:-1]), n_forced)
  width = max(nz_ratio_width(nb, nz_ratio, dense_rows), min(nb, sink_blocks + local_blocks))
  s = jnp.minimum(scores_BHQN.astype(jnp.float32), jnp.finfo(jnp.float32).max)
  s = jnp.where(force, jnp.inf, s)
  # the visible blocks of row i are the prefix j <= i, none past the length
  row = jnp.arange(nb, dtype=jnp.int32)
  n_vis = jnp.where(row[None] * block_size < lengths_B[:, None], row[None] + 1, 0)   # [B, nQ]
  n_vis = jnp.broadcast_to(n_vis[:, None], count.shape)
  shape = scores_BHQN.shape
  idx = prefix_topk(s.reshape(-1, nb), n_vis.reshape(-1), count.reshape(-1), width=width,
                    implementation=implementation, interpret=interpret)
  return idx.reshape(*shape[:-1], width)


def select_oracle(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, lengths_B: jax.Array,
                  block_size: int, nz_ratio: float, dense_rows: int = 0,
                  implementation=None, sink_blocks: int = 0, local_blocks: int = 1) -> jax.Array:
  """The true top-k: `select_nz_ratio` on the block-level ground truth of the layer's own
  attention (`pallas_kernels.flash_attention`), per query head: int32 [B, N, nQ, M]."""
  _, target = flash_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size=block_size,
                              implementation=implementation)
  return select_nz_ratio(target, lengths_B, block_size, nz_ratio, dense_rows, sink_blocks,
                         local_blocks)


def block_mass(q_BTNH: jax.Array, k_BTKH: jax.Array, lengths_B: jax.Array,
               block_size: int) -> jax.Array:
  """float32 [B, N, nQ, nK]: the attention probability mass of key block j, averaged over the
  query rows of block i (the full attention map: for the mass oracle, an ablation of the
  max-pooled target)."""
  B, T, N, _ = q_BTNH.shape
  nb = num_blocks(T, block_size)
  p = attention_probs(q_BTNH, k_BTKH, lengths_B)                            # [B, K, G, T, S]
  pad = nb * block_size - T
  p = jnp.pad(p, ((0, 0),) * 3 + ((0, pad), (0, pad)))
  K, G = p.shape[1], p.shape[2]
  mass = jnp.sum(p.reshape(B, K, G, nb, block_size, nb, block_size), axis=(4, 6)) / block_size
  return mass.reshape(B, N, nb, nb)


def select_oracle_mass(q_BTNH: jax.Array, k_BTKH: jax.Array, lengths_B: jax.Array,
                       block_size: int, nz_ratio: float, dense_rows: int = 0,
                       sink_blocks: int = 0, local_blocks: int = 1) -> jax.Array:
  """`select_nz_ratio` on `block_mass`: the blocks holding the most attention probability (not
  the sharpest single probability, as `select_oracle`). int32 [B, N, nQ, M]."""
  return select_nz_ratio(block_mass(q_BTNH, k_BTKH, lengths_B, block_size), lengths_B,
                         block_size, nz_ratio, dense_rows, sink_blocks, local_blocks)


@functools.partial(jax.jit, static_argnames=("n_heads", "T", "block_size", "sink_blocks",
                                             "local_blocks", "dense_rows"))
def select_static(lengths_B: jax.Array, n_heads: int, T: int, block_size: int,
                  sink_blocks: int = 1, local_blocks: int = 2, dense_rows: int = 0) -> jax.Array:
  """Attention sinks and a local window: the first sink_blocks blocks and the local_blocks
  blocks ending at the diagonal, for every head: int32 [B, n_heads, nQ, M] with
  M = min(nK, sink_blocks + local_blocks) (nK with dense rows)."""
  if sink_blocks < 0 or local_blocks < 1:
    raise ValueError(f"need sink_blocks >= 0 and local_blocks >= 1, got {sink_blocks}, "
                     f"{local_blocks}")
  nb = num_blocks(T, block_size)
  B = lengths_B.shape[0]
  i, j = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
  keep = visible(lengths_B, nb, block_size) & ((j < sink_blocks) | (j > i - local_blocks))[None, None]
  shape = (B, n_heads, nb, nb)
  force = jnp.broadcast_to(forced(lengths_B, nb, block_size, dense_rows), shape)
  width = nb if dense_rows else min(nb, sink_blocks + local_blocks)
  # ids as scores: ties are impossible and every kept block fits the width
  return _top(jnp.zeros(shape), jnp.broadcast_to(keep, shape), force, None, width)


@functools.partial(jax.jit, static_argnames=("block_size",))
def density(block_indices_BHQM: jax.Array, lengths_B: jax.Array, block_size: int) -> jax.Array:
  """Selected share of the causally visible (query block, key block) pairs, over every head and
  sequence: float32 scalar (1.0 for dense causal attention)."""
  nb = block_indices_BHQM.shape[2]
  vis = visible(lengths_B, nb, block_size)
  sel = block_mask(block_indices_BHQM, nb) & vis
  return jnp.sum(sel) / jnp.maximum(jnp.sum(jnp.broadcast_to(vis, sel.shape)), 1)


@functools.partial(jax.jit, static_argnames=("block_size",))
def recall(q_BTNH: jax.Array, k_BTKH: jax.Array, lengths_B: jax.Array,
           block_indices_BHQM: jax.Array, block_size: int) -> jax.Array:
  """Share of each valid query row's dense attention probability that falls in its selected
  blocks, averaged over rows, heads and sequences: float32 scalar (1.0 for dense). Full
  attention map: small shapes only."""
  B, T, N, _ = q_BTNH.shape
  K = k_BTKH.shape[2]
  p = attention_probs(q_BTNH, k_BTKH, lengths_B)                            # [B, K, G, T, S]
  mask = token_mask(per_query_head(block_indices_BHQM, N), lengths_B, T, block_size)
  kept = jnp.sum(jnp.where(mask.reshape(B, K, N // K, T, T), p, 0.0), axis=-1)
  rows = jnp.broadcast_to((jnp.arange(T)[None] < lengths_B[:, None])[:, None, None], kept.shape)
  return jnp.sum(jnp.where(rows, kept, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
