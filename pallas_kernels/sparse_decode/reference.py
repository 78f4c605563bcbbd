"""Plain-jnp block-sparse decode attention (`sparse_decode_attention`'s `xla` implementation):
the cache layout's masked reference with every token outside the selected blocks masked."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.reference import length_mask, masked_attention_reference


def block_token_mask(block_indices_BKM: jax.Array, lengths_B: jax.Array, block_size: int,
                     seq: int) -> jax.Array:
  """bool [B, K, S]: token s is valid iff its block is selected and s < lengths_B[b]."""
  B, K, _ = block_indices_BKM.shape
  n_blocks = -(-seq // block_size)
  # -1 padding is sent past the end and dropped (a negative index would wrap to the last block).
  idx_BKM = jnp.where(block_indices_BKM >= 0, block_indices_BKM, n_blocks)
  b_BKM = jnp.arange(B)[:, None, None]
  k_BKM = jnp.arange(K)[None, :, None]
  sel_BKN = jnp.zeros((B, K, n_blocks), bool).at[b_BKM, k_BKM, idx_BKM].set(True, mode="drop")
  sel_BKS = jnp.repeat(sel_BKN, block_size, axis=2)[:, :, :seq]
  return sel_BKS & length_mask(lengths_B, K, seq)


def live_slots(block_indices_BKM: jax.Array, lengths_B: jax.Array, block_size: int) -> jax.Array:
  """int32 [B, K]: 1 + the last slot whose block is >= 0 and starts before the length (0 if
  none). With ascending indices every slot before it is live, and blocks past the length
  (trailing, being ascending) are never loaded. What the kernels loop over."""
  M = block_indices_BKM.shape[-1]
  live_BKM = (block_indices_BKM >= 0) & (block_indices_BKM * block_size < lengths_B[:, None, None])
  return jnp.max(jnp.where(live_BKM, jnp.arange(1, M + 1, dtype=jnp.int32), 0), axis=-1)


@functools.partial(jax.jit, static_argnames=("block_size",))
def sparse_decode_attention_reference(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                                      lengths_B: jax.Array, block_indices_BKM: jax.Array, *,
                                      block_size: int) -> jax.Array:
  """Dense attention with every token outside the selected blocks (or past the length) masked.
  Shapes as `sparse_decode_attention`."""
  valid_BKS = block_token_mask(block_indices_BKM, lengths_B, block_size, k_BKSH.shape[2])
  return masked_attention_reference(q_BKGH, k_BKSH, v_BKSH, valid_BKS)


def sparse_decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, *,
                            block_size: int, num_live_BK=None, interpret: bool = False):
  """The `xla` implementation (num_live_BK is not needed, interpret has nothing to interpret)."""
  del num_live_BK, interpret
  return sparse_decode_attention_reference(q_BKGH, k_BKSH, v_BKSH, lengths_B.astype(jnp.int32),
                                           block_indices_BKM.astype(jnp.int32),
                                           block_size=block_size)
