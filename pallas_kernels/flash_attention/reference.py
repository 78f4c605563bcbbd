"""Plain-jnp prefill attention with SeerAttention's block-level ground truth (`flash_attention`'s
`xla` implementation), computed over the full attention map.

The target of query block i and key block j (Gao et al., SeerAttention, sec. 3.2): for every
query row t of block i, the largest softmax probability among the keys of block j; the max of that
over the rows of block i (2-D max pooling of the attention map); then each row of blocks
normalised to sum 1. A flash kernel gets it without the map: it keeps each (row, key block)'s
largest logit m_tj while streaming the keys, and once the row's log-sum-exp is known,
max_prob_tj = exp(m_tj - lse_t).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def num_blocks(T: int, block_size: int) -> int:
  return -(-T // block_size)


def token_valid(T: int, lengths_B: jax.Array) -> jax.Array:
  """bool [B, T, S=T]: key s is visible from query t iff s <= t and both lie below the length
  (padded queries see nothing)."""
  t = jnp.arange(T)
  causal_TS = t[None, :] <= t[:, None]
  below_BT = t[None, :] < lengths_B[:, None]
  return causal_TS[None] & below_BT[:, :, None] & below_BT[:, None, :]


def attention_probs(q_BTNH: jax.Array, k_BTKH: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """Causal softmax probabilities float32 [B, K, G, T, S=T] (query head n = k * G + g); zero on
  masked keys and on padded query rows. Scale H ** -0.5, HIGHEST-precision f32 logits."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  s = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH, precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32) * H ** -0.5
  valid = token_valid(T, lengths_B)[:, None, None]                      # [B, 1, 1, T, S]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(l > 0, l, 1.0)


def block_target_from_probs(p_BKGTS: jax.Array, block_size: int) -> jax.Array:
  """The 2-D max-pooled, row-normalised block map of attention probabilities [B, K, G, T, S]:
  float32 [B, N, nQ, nK] (N = K * G), rows without a valid query zero."""
  B, K, G, T, S = p_BKGTS.shape
  nq, nk = num_blocks(T, block_size), num_blocks(S, block_size)
  p = jnp.pad(p_BKGTS, ((0, 0),) * 3 + ((0, nq * block_size - T), (0, nk * block_size - S)))
  # probabilities are >= 0 and padding / masked entries are 0, so they never win a max
  pooled = jnp.max(p.reshape(B, K, G, nq, block_size, nk, block_size), axis=(4, 6))
  total = jnp.sum(pooled, axis=-1, keepdims=True)
  target = pooled / jnp.where(total > 0, total, 1.0)
  return target.reshape(B, K * G, nq, nk)


@functools.partial(jax.jit, static_argnames=("block_size",))
def block_target_reference(q_BTNH: jax.Array, k_BTKH: jax.Array, lengths_B: jax.Array | None,
                           block_size: int) -> jax.Array:
  """The block-level distillation target alone: float32 [B, N, nQ, nK], nQ = nK =
  ceil(T / block_size); each row with a valid query sums to 1 over the key blocks it sees
  (j <= i), zero elsewhere."""
  B, T = q_BTNH.shape[:2]
  lengths_B = jnp.full((B,), T, jnp.int32) if lengths_B is None else lengths_B
  return block_target_from_probs(attention_probs(q_BTNH, k_BTKH, lengths_B), block_size)


def block_target_from_row_max(mt_BNKT, lse_BNT, lengths_B, T: int, block_size: int):
  """The target float32 [B, N, nQ, nK] from the kernel's per-(key block, row) maxima (base 2,
  [B, N, nK, Tp]) and the rows' lse (natural log, [B, N, Tp]): max_prob_tj = 2 ** (m_tj -
  lse_t log2 e) where key block j is visible from row t (j * bs <= t < length; everything
  else, unwritten entries included, counts 0), max over each query block's rows, rows
  normalised (reference.block_target_from_probs)."""
  B, N, nK, Tp = mt_BNKT.shape
  nq = num_blocks(T, block_size)
  t = jnp.arange(nq * block_size)
  vis = ((jnp.arange(nK)[:, None] * block_size <= t[None, :])[None]
         & (t[None, :] < lengths_B[:, None])[:, None, :])                 # [B, nK, nq * bs]
  mt = mt_BNKT[..., :nq * block_size]
  lse2 = lse_BNT[:, :, None, :nq * block_size] * math.log2(math.e)
  p = jnp.where(vis[:, None], jnp.exp2(mt - lse2), 0.0)
  pooled = jnp.max(p.reshape(B, N, nK, nq, block_size), axis=-1)        # [B, N, nK, nQ]
  pooled = jnp.swapaxes(pooled, -1, -2)[..., :nq]
  total = jnp.sum(pooled, axis=-1, keepdims=True)
  return pooled / jnp.where(total > 0, total, 1.0)


@functools.partial(jax.jit, static_argnames=("block_size",))
def flash_attention_reference(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                              lengths_B: jax.Array | None = None, *,
                              block_size: int | None = None):
  """Causal GQA attention o [B, T, N, H] (q's dtype; zero rows at t >= length) and, with a
  block_size, also the block target float32 [B, N, nQ, nK]. The probabilities meet V in V's dtype
  (as a flash kernel's PV product), accumulated in float32."""
  B, T, N, H = q_BTNH.shape
  lengths_B = jnp.full((B,), T, jnp.int32) if lengths_B is None else lengths_B.astype(jnp.int32)
  p = attention_probs(q_BTNH, k_BTKH, lengths_B)
  o = jnp.einsum("bkgts,bskh->btkgh", p.astype(v_BTKH.dtype), v_BTKH,
                 precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  o = o.reshape(B, T, N, H).astype(q_BTNH.dtype)
  if block_size is None:
    return o
  return o, block_target_from_probs(p, block_size)


def flash_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, *, block_size, interpret: bool = False):
  """The `xla` implementation (interpret has nothing to interpret)."""
  del interpret
  return flash_attention_reference(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size=block_size)
