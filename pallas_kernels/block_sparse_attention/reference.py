"""Plain-jnp block-sparse prefill attention: dense attention with every token outside the selected
key blocks masked (the oracle of `block_sparse_attention`'s backends), and the index <-> mask
conversions the selectors and tests share, and the index bookkeeping of the kernels (live slot
counts, the transposed lists of the dk / dv kernels)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.reference import masked_attention_reference


def per_query_head(block_indices_BHQM: jax.Array, n_heads: int) -> jax.Array:
  """Indices given per KV head ([B, K, nQ, M], one decision per GQA group) repeated for the
  G = N / K query heads of each group; per-query-head indices pass through. [B, N, nQ, M]."""
  Hi = block_indices_BHQM.shape[1]
  return block_indices_BHQM if Hi == n_heads else jnp.repeat(block_indices_BHQM, n_heads // Hi, 1)


def block_mask(block_indices_BHQM: jax.Array, num_kv_blocks: int) -> jax.Array:
  """bool [B, Hi, nQ, nK]: key block j is selected for query block i (-1 padding selects
  nothing)."""
  # -1 is sent past the end and dropped (a negative index would wrap to the last block)
  idx = jnp.where(block_indices_BHQM >= 0, block_indices_BHQM, num_kv_blocks)
  onehot = idx[..., None] == jnp.arange(num_kv_blocks, dtype=idx.dtype)
  return jnp.any(onehot, axis=-2)


def token_mask(block_indices_BNQM: jax.Array, lengths_B: jax.Array, T: int,
               block_size: int) -> jax.Array:
  """bool [B, N, T, S=T]: key s is visible from query t iff its block is selected for t's block,
  s <= t, and both lie below the length."""
  nb = -(-T // block_size)
  sel = block_mask(block_indices_BNQM, nb)                                    # [B, N, nQ, nK]
  sel = jnp.repeat(jnp.repeat(sel, block_size, axis=2), block_size, axis=3)[:, :, :T, :T]
  t = jnp.arange(T)
  below_BT = t[None, :] < lengths_B[:, None]
  causal = (t[None, :] <= t[:, None])[None, None]
  return sel & causal & below_BT[:, None, :, None] & below_BT[:, None, None, :]


@functools.partial(jax.jit, static_argnames=("block_size",))
def block_sparse_attention_reference(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                                     block_indices_BHQM: jax.Array, lengths_B: jax.Array, *,
                                     block_size: int) -> jax.Array:
  """Dense causal attention with the unselected key blocks (and tokens past the length) masked,
  through the cache layout's masked reference (float32 softmax and PV, HIGHEST precision).
  Shapes as `block_sparse_attention`; rows with no visible key are zeros. Differentiable."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  valid_BNTS = token_mask(per_query_head(block_indices_BHQM, N), lengths_B, T, block_size)
  # rows of KV head k: its G query heads x T tokens (the cache layout's q_BKRH)
  q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  valid_BKRS = valid_BNTS.reshape(B, K, G * T, T)
  o_BKRH = masked_attention_reference(q_BKRH, k_BTKH.transpose(0, 2, 1, 3),
                                      v_BTKH.transpose(0, 2, 1, 3), valid_BKRS)
  return o_BKRH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def slot_counts(idx_BHQM: jax.Array, lengths_B: jax.Array, block_size: int):
  """(n_full, n_live) int32 [B, Hi, nQ]: the row's live slots hold the selected blocks j <= i
  (a prefix, the ids being ascending); the first n_full of them lie strictly below the
  diagonal. Query blocks wholly past the length have none."""
  nq = idx_BHQM.shape[2]
  i = jnp.arange(nq, dtype=jnp.int32)[:, None]
  alive = (i[None, None, :, 0] * block_size < lengths_B[:, None, None])             # [B, 1, nQ]
  below = jnp.sum((idx_BHQM >= 0) & (idx_BHQM < i), axis=-1, dtype=jnp.int32)
  live = below + jnp.sum(idx_BHQM == i, axis=-1, dtype=jnp.int32)
  return jnp.where(alive, below, 0), jnp.where(alive, live, 0)


def transpose_indices(idx_BNQM: jax.Array, lengths_B: jax.Array, n_kv_heads: int,
                      block_size: int):
  """The dk / dv kernels' lists (the Triton and Mosaic TPU backends): for each (sequence, KV
  head, key block j) the query (block, head) pairs that selected it, as entries r = i * G + g,
  int32 [B, K, nK, G * nQ] (-1 padded), entries with i > j first and i == j last; with (n_full,
  n_live) int32 [B, K, nK]. Pairs with i < j (above the diagonal) or query blocks past the
  length are dropped: they contribute nothing. Memory O(B N nQ^2) (the selection as a dense
  mask; at S128K, 64-token blocks and 32 heads, ~3 GB of temporaries)."""
  return jax.vmap(functools.partial(_transpose_one, n_kv_heads=n_kv_heads,
                                    block_size=block_size))(idx_BNQM, lengths_B)


def _transpose_one(idx_NQM, length, *, n_kv_heads: int, block_size: int):
  """`transpose_indices` of one sequence. Scatters take flat int32 indices (one index array,
  not one per dimension); N nQ (nQ + 1) < 2^31 holds to 512K tokens of 64 at 32 heads."""
  N, nq, M = idx_NQM.shape
  K = n_kv_heads
  G, R = N // K, (N // K) * nq
  i = jnp.arange(nq, dtype=jnp.int32)
  live = (idx_NQM >= 0) & (idx_NQM <= i[:, None]) & (i[:, None] * block_size < length)
  # sel[n, i, j]: column nq takes the dropped slots
  row = jnp.arange(N, dtype=jnp.int32)[:, None, None] * nq + i[:, None]
  flat = row * (nq + 1) + jnp.where(live, idx_NQM, nq)
  sel = jnp.zeros(N * nq * (nq + 1), bool).at[flat.reshape(-1)].set(True)
  sel = sel.reshape(N, nq, nq + 1)[..., :nq]
  # [K, G, i, j] -> [K, j, i, g]: rows of key blocks, entries r = i * G + g
  sel = sel.reshape(K, G, nq, nq).transpose(0, 3, 2, 1).reshape(K, nq, R)
  r = jnp.arange(R, dtype=jnp.int32)
  diag = (r // G)[None, :] == i[:, None]                                            # [nK, R]
  full, part = sel & ~diag, sel & diag
  n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)
  n_live = n_full + jnp.sum(part, axis=-1, dtype=jnp.int32)
  pos = jnp.where(full, jnp.cumsum(full, axis=-1, dtype=jnp.int32) - 1,
                  jnp.where(part, n_full[..., None] + jnp.cumsum(part, axis=-1, dtype=jnp.int32)
                            - 1, R))                                 # R: the trash column
  rows = jnp.arange(K * nq, dtype=jnp.int32).reshape(K, nq, 1)
  tidx = jnp.full(K * nq * (R + 1), -1, jnp.int32).at[(rows * (R + 1) + pos).reshape(-1)].set(
      jnp.broadcast_to(r, pos.shape).reshape(-1))
  return tidx.reshape(K, nq, R + 1)[..., :R], n_full, n_live
