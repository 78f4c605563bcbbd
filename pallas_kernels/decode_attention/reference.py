"""The attention reference of the KV-cache layout, shared by every cached-attention op (dense and
block-sparse decode, multi-token extend), their kernels' tests and the model's XLA path.

Layout: queries q_BKRH [B, K, R, H] (the R query rows of KV head k: the G heads of its group, or
F tokens x G heads), cache k_BKSH / v_BKSH [B, K, S, H]; a validity mask says which keys each row
sees. The ops differ only in that mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def masked_attention_reference(q_BKRH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                               valid: jax.Array) -> jax.Array:
  """Softmax attention of each query row over the keys where `valid` is True.

  q_BKRH [B, K, R, H], k_BKSH / v_BKSH [B, K, S, H]; valid bool [B, K, S] (one mask for every
  row) or [B, K, R, S]. Scale H ** -0.5; scores, softmax and the PV product in float32 (HIGHEST
  precision dots). Returns [B, K, R, H] in q's dtype; rows with no valid key are zeros.
  """
  hi = lax.Precision.HIGHEST
  scale = q_BKRH.shape[-1] ** -0.5
  # preferred_element_type instead of upcasting K: the bf16 x bf16 products are exact in f32,
  # and a f32 copy of a long cache would double the reference's memory.
  s_BKRS = jnp.einsum("bkrh,bksh->bkrs", q_BKRH, k_BKSH, precision=hi,
                      preferred_element_type=jnp.float32) * scale
  valid_BKRS = valid[:, :, None, :] if valid.ndim == 3 else valid
  s_BKRS = jnp.where(valid_BKRS, s_BKRS, -jnp.inf)
  m_BKR = jnp.max(s_BKRS, axis=-1, keepdims=True)
  m_BKR = jnp.where(jnp.isfinite(m_BKR), m_BKR, 0.0)
  p_BKRS = jnp.where(valid_BKRS, jnp.exp(s_BKRS - m_BKR), 0.0)
  l_BKR = jnp.sum(p_BKRS, axis=-1, keepdims=True)
  o_BKRH = jnp.einsum("bkrs,bksh->bkrh", p_BKRS, v_BKSH.astype(jnp.float32), precision=hi)
  return (o_BKRH / jnp.where(l_BKR > 0, l_BKR, 1.0)).astype(q_BKRH.dtype)


def length_mask(lengths_B: jax.Array, n_heads: int, seq: int) -> jax.Array:
  """bool [B, K, S]: token s of sequence b is valid iff s < lengths_B[b]."""
  valid_BS = jnp.arange(seq)[None, :] < lengths_B[:, None]
  return jnp.broadcast_to(valid_BS[:, None, :], (lengths_B.shape[0], n_heads, seq))


@jax.jit
def decode_attention_reference(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                               lengths_B: jax.Array) -> jax.Array:
  """Plain-jnp decode attention; shapes as `pallas_kernels.decode_attention`."""
  valid_BKS = length_mask(lengths_B, k_BKSH.shape[1], k_BKSH.shape[2])
  return masked_attention_reference(q_BKGH, k_BKSH, v_BKSH, valid_BKS)


@functools.partial(jax.jit, static_argnames=("interpret",))
def decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, *, interpret: bool = False):
  """The `xla` implementation (interpret has nothing to interpret)."""
  del interpret
  return decode_attention_reference(q_BKGH, k_BKSH, v_BKSH, lengths_B.astype(jnp.int32))
