"""Plain-jnp causal GQA attention: the reference of the [B, T, N, H] layout (training, prefill)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                        causal: bool = True) -> jax.Array:
  """q [B, T, N, H]; k, v [B, S, K, H] with K dividing N. Causal masking aligns the last query
  with the last key (queries are the final T of S positions). Returns [B, T, N, H] in q's dtype;
  softmax in float32."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * (H ** -0.5)
  if causal:
    q_pos = jnp.arange(T)[:, None] + (S - T)
    k_pos = jnp.arange(S)[None, :]
    logits_BKGTS = jnp.where(k_pos <= q_pos, logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH, preferred_element_type=jnp.float32)
  return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def causal_attention(q_BTNH, k_BTKH, v_BTKH):
  """The `xla` implementation."""
  return attention_reference(q_BTNH, k_BTKH, v_BTKH, causal=True)
