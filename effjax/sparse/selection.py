"""Block scores -> block indices for the block-sparse decode kernel.

Indices are int32 [B, K, M]: the selected KV blocks of each sequence and kv head (one decision per
GQA group), ascending, padded with -1 -- the layout `pallas_kernels.sparse_decode` reads. Every
rule always keeps the first block (attention sinks) and the current, partly filled block (the
newest tokens), as SeerAttention-R and ReSA do; `local_tokens` > 1 widens the latter to every block
holding one of the last local_tokens tokens (a local window across the block boundary).

Quest (ReSA's training-free selector): per block and channel the min and max key; an upper bound of
q . k over the block is sum_h max(q_h * min_h, q_h * max_h). A group's score is the max of that bound
over its G query heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_topk import block_topk_reference, check_budget, valid_forced


def num_blocks(lengths_B: jax.Array, block_size: int) -> jax.Array:
  """Blocks holding at least one valid token: ceil(length / block_size), int32 [B]."""
  return (lengths_B + block_size - 1) // block_size


def block_minmax(k_BKSH: jax.Array, lengths_B: jax.Array, block_size: int):
  """Per-block channel-wise key min and max over valid tokens: [B, K, S/bs, H] each, in k's dtype
  (min / max of the cached keys are exact in it; bf16 summaries are half the bytes a decode step
  reads). S must be a multiple of block_size. Blocks with no valid token get (+inf, -inf)."""
  B, K, S, H = k_BKSH.shape
  if S % block_size:
    raise ValueError(f"cache capacity {S} must be a multiple of block_size {block_size}")
  nb = S // block_size
  k = k_BKSH.reshape(B, K, nb, block_size, H)
  valid = (jnp.arange(S).reshape(nb, block_size)[None] < lengths_B[:, None, None])  # [B, nb, bs]
  valid = valid[:, None, :, :, None]
  inf = jnp.asarray(jnp.inf, k.dtype)
  kmin = jnp.min(jnp.where(valid, k, inf), axis=3)
  kmax = jnp.max(jnp.where(valid, k, -inf), axis=3)
  return kmin, kmax


def quest_scores(q_BKGH: jax.Array, kmin_BKNH: jax.Array, kmax_BKNH: jax.Array) -> jax.Array:
  """Upper bound of max_{k in block} q . k, maxed over the group's heads: float32 [B, K, N]."""
  q = q_BKGH.astype(jnp.float32)[:, :, :, None, :]                     # [B, K, G, 1, H]
  lo, hi = kmin_BKNH[:, :, None], kmax_BKNH[:, :, None]                # [B, K, 1, N, H]
  # q*lo is nan where a block is empty and q == 0 (0 * inf); those blocks are masked later
  bound = jnp.sum(jnp.maximum(q * lo, q * hi), axis=-1)                # [B, K, G, N]
  return jnp.max(bound, axis=2)


def select_top_k(scores_BKN: jax.Array, lengths_B: jax.Array, block_size: int, k: int,
                 local_tokens: int = 1) -> jax.Array:
  """The first and current blocks plus the highest-scoring others, k blocks in all (fewer when
  fewer are valid), ties to the lower block index. Returns ascending ids, -1 padded, int32
  [B, K, M] with M = `output_width(k, N)` (the power of 2 above min(k, N), as every block_topk
  backend); a token budget of T tokens is k = T // block_size. The XLA path of
  `pallas_kernels.block_topk` (which also has the GPU kernel decode steps use)."""
  check_budget(k, block_size, local_tokens)
  return block_topk_reference(scores_BKN, lengths_B.astype(jnp.int32), block_size=block_size, k=k,
                              local_tokens=local_tokens)[0]


def select_threshold(probs_BKN: jax.Array, lengths_B: jax.Array, block_size: int, threshold: float,
                     max_blocks: int, local_tokens: int = 1) -> jax.Array:
  """Blocks whose gate probability is >= threshold, plus the first and current ones; at most
  max_blocks (the highest probabilities win). Returns int32 [B, K, max_blocks]."""
  check_budget(max_blocks, block_size, local_tokens)
  N = probs_BKN.shape[-1]
  valid, forced = valid_forced(lengths_B, N, block_size, local_tokens)
  keep = (valid & (probs_BKN >= threshold)) | forced
  s = jnp.where(forced, jnp.inf, jnp.where(keep, probs_BKN.astype(jnp.float32), -jnp.inf))
  _, idx_BKk = jax.lax.top_k(s, min(max_blocks, N))
  live = jnp.take_along_axis(jnp.broadcast_to(keep, s.shape), idx_BKk, axis=-1)
  idx_BKk = jnp.sort(jnp.where(live, idx_BKk, N), axis=-1)
  return jnp.where(idx_BKk < N, idx_BKk, -1).astype(jnp.int32)


def quest_select(q_BKGH, k_BKSH, lengths_B, block_size: int, budget_tokens: int,
                 local_tokens: int = 1) -> jax.Array:
  """Quest end to end: bounds from the cache, top blocks within a token budget."""
  kmin, kmax = block_minmax(k_BKSH, lengths_B, block_size)
  return select_top_k(quest_scores(q_BKGH, kmin, kmax), lengths_B, block_size,
                      max(2, budget_tokens // block_size), local_tokens)
