"""SeerAttention's prefill AttnGate: which key blocks each query block of each head should attend
to during prefill (Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs").

Per layer, for query head n (of KV head k = n // G) and blocks of `block_size` tokens:
  gate query  q_g[i] = RoPE(avgpool_i(q_n) @ Wq_n)                       [Dg], at position i * bs
  gate key    k_g[j] = RoPE(concat(max, min, avg)_j(k_k) @ Wk_k)          [Dg], at position j * bs
  score       s[i, j] = q_g[i] . k_g[j] / sqrt(Dg), block-causal (j <= i)
  probs       softmax over j                                             [B, N, nQ, nK]
The key side is the decode gate's K-compression (`gate.compress_blocks`: the same pooling,
projection and RoPE), so a prefill gate's Wk has the decode gate's shape. The query side pools by
average and keeps one projection per query head (no GQA grouping of queries: SeerAttention's
prefill gate decides per head). Pooling counts only tokens below each sequence's length.

Gate params are their own pytree, apart from the model's: {"wq": [L, N, H, Dg], "wk": [L, K, 3H,
Dg]} float32 (`init_prefill_gate_params`). Training is self-distillation from the frozen model
(`prefill_gate_training`): KL(target || gate probabilities) per valid query-block row, the target
being the block-level ground truth of `pallas_kernels.flash_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.model.layers import apply_rope, rope_tables
from effjax.sparse.gate import GateConfig, pool_blocks, project_blocks
from pallas_kernels.launch import pad_axis

__all__ = ["GateConfig", "block_causal", "gate_keys", "gate_logits", "gate_probs", "gate_queries",
           "init_prefill_gate_params", "kl_loss", "num_blocks", "pool_queries", "row_valid"]


def num_blocks(T: int, block_size: int) -> int:
  return -(-T // block_size)


def init_prefill_gate_params(mcfg: ModelConfig, gcfg: GateConfig, rng: jax.Array) -> dict:
  """{"wq": [L, N, H, Dg], "wk": [L, K, 3H, Dg]} float32, scaled for unit-variance scores."""
  L, N, K, H, D = mcfg.n_layers, mcfg.n_heads, mcfg.n_kv_heads, mcfg.hd, gcfg.d_gate
  kq, kk = jax.random.split(rng)
  return {"wq": jax.random.normal(kq, (L, N, H, D), jnp.float32) * H ** -0.5,
          "wk": jax.random.normal(kk, (L, K, 3 * H, D), jnp.float32) * (3 * H) ** -0.5}


def row_valid(lengths_B: jax.Array, nq: int, block_size: int) -> jax.Array:
  """bool [B, nQ]: query block i holds at least one valid token (i * bs < length)."""
  return jnp.arange(nq)[None] * block_size < lengths_B[:, None]


def block_causal(nq: int, nk: int) -> jax.Array:
  """bool [nQ, nK]: key block j is visible from query block i (j <= i)."""
  return jnp.arange(nk)[None, :] <= jnp.arange(nq)[:, None]


def pool_queries(q_BTNH: jax.Array, lengths_B: jax.Array, block_size: int) -> jax.Array:
  """Average of each query block's valid tokens: float32 [B, N, nQ, H]; zeros for blocks with
  none. The sum runs over the block's tokens where q lies ([B, nQ, bs, N, H]), so q is read once
  and only the pooled blocks are transposed."""
  B, T, N, H = q_BTNH.shape
  nq = num_blocks(T, block_size)
  q = pad_axis(q_BTNH, 1, block_size).reshape(B, nq, block_size, N * H)
  valid = (jnp.arange(nq * block_size) < lengths_B[:, None]).reshape(B, nq, block_size, 1)
  # summed in float32 without a float32 copy of q: converting first made XLA on the GPU lay q
  # out anew (a transpose fusion, 4.7x slower in all at 32K tokens on an H100)
  total = jnp.sum(jnp.where(valid, q, 0), axis=2, dtype=jnp.float32)        # [B, nQ, N * H]
  pooled = total / jnp.maximum(jnp.sum(valid, axis=2), 1)
  return pooled.reshape(B, nq, N, H).transpose(0, 2, 1, 3)


def _block_starts(B: int, nb: int, block_size: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32) * block_size, (B, nb))


def gate_queries(wq_NHD: jax.Array, q_BTNH: jax.Array, lengths_B: jax.Array, block_size: int,
                 rope_theta: float) -> jax.Array:
  """Gate queries of one layer, projected, RoPE'd at each block's first position and scaled by
  1/sqrt(Dg): float32 [B, N, nQ, Dg]."""
  pooled = pool_queries(q_BTNH, lengths_B, block_size)                      # [B, N, nQ, H]
  qg = jnp.einsum("bnqh,nhd->bnqd", pooled, wq_NHD.astype(jnp.float32))
  B, _, nq, Dg = qg.shape
  cos, sin = rope_tables(_block_starts(B, nq, block_size), Dg, rope_theta)  # [B, nQ, 1, Dg/2]
  # apply_rope expects [B, T, N, H]: blocks play T
  qg = apply_rope(qg.transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)
  return qg * Dg ** -0.5


def gate_keys(wk_KCD: jax.Array, k_BTKH: jax.Array, lengths_B: jax.Array, block_size: int,
              rope_theta: float) -> jax.Array:
  """Gate keys of one layer: max / min / mean pooled, projected, RoPE'd at each block's first
  position (the decode gate's K-compression of the whole prompt): float32 [B, K, nK, Dg]."""
  pooled = pool_blocks(pad_axis(k_BTKH, 1, block_size), lengths_B, block_size,
                       token_major=True)
  return project_blocks(wk_KCD.astype(jnp.float32), pooled, block_size, rope_theta)


@functools.partial(jax.jit, static_argnames=("block_size", "rope_theta"))
def gate_logits(wq_NHD: jax.Array, wk_KCD: jax.Array, q_BTNH: jax.Array, k_BTKH: jax.Array,
                lengths_B: jax.Array, block_size: int, rope_theta: float) -> jax.Array:
  """Block scores of one layer: float32 [B, N, nQ, nK], -inf above the block diagonal.

  q_BTNH [B, T, N, H], k_BTKH [B, T, K, H] (post-RoPE, any float dtype); wq_NHD [N, H, Dg],
  wk_KCD [K, 3H, Dg]; lengths_B int [B]."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  if wq_NHD.shape[:2] != (N, H) or wk_KCD.shape[:2] != (K, 3 * H):
    raise ValueError(f"prefill gate weights wq {wq_NHD.shape} / wk {wk_KCD.shape} do not fit "
                     f"N={N}, K={K}, H={H} (want [N, H, Dg] and [K, 3H, Dg])")
  qg = gate_queries(wq_NHD, q_BTNH, lengths_B, block_size, rope_theta)
  kg = gate_keys(wk_KCD, k_BTKH, lengths_B, block_size, rope_theta)
  nq, nk, Dg = qg.shape[2], kg.shape[2], qg.shape[3]
  s = jnp.einsum("bkgqd,bknd->bkgqn", qg.reshape(B, K, N // K, nq, Dg), kg,
                 precision=jax.lax.Precision.HIGHEST).reshape(B, N, nq, nk)
  return jnp.where(block_causal(nq, nk), s, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("block_size", "rope_theta"))
def gate_probs(wq_NHD, wk_KCD, q_BTNH, k_BTKH, lengths_B, block_size: int,
               rope_theta: float) -> jax.Array:
  """Softmax of `gate_logits` over key blocks: float32 [B, N, nQ, nK] (zero above the diagonal;
  rows of query blocks past the length are meaningless and masked by every consumer)."""
  return jax.nn.softmax(gate_logits(wq_NHD, wk_KCD, q_BTNH, k_BTKH, lengths_B, block_size,
                                    rope_theta), axis=-1)


@functools.partial(jax.jit, static_argnames=("block_size",))
def kl_loss(target_BNQK: jax.Array, logits_BNQK: jax.Array, lengths_B: jax.Array,
            block_size: int) -> jax.Array:
  """Mean over valid (sequence, head, query block) rows of KL(target || softmax(logits)); key
  blocks where the target is zero contribute nothing. Scalar float32."""
  t = target_BNQK.astype(jnp.float32)
  pos = t > 0
  # -inf log-probabilities above the diagonal meet zero targets: keep them out of the product
  logp = jnp.where(pos, jax.nn.log_softmax(logits_BNQK, axis=-1), 0.0)
  kl = jnp.sum(jnp.where(pos, t * (jnp.log(jnp.where(pos, t, 1.0)) - logp), 0.0), axis=-1)
  valid = jnp.broadcast_to(row_valid(lengths_B, t.shape[2], block_size)[:, None], kl.shape)
  return jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
