"""Plain-jnp multi-token cached attention (`extend_attention`'s `xla` implementation): the cache
layout's masked reference with a causal mask per query row."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.reference import masked_attention_reference


@jax.jit
def extend_attention_reference(q_BKFGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                               start_B: jax.Array) -> jax.Array:
  """Causal attention of F new tokens per sequence at positions start_b + f over a cache that
  already holds them: token f sees keys [0, start_b + f]. Shapes as `extend_attention`."""
  B, K, F, G, H = q_BKFGH.shape
  S = k_BKSH.shape[2]
  q_pos_BF = start_B[:, None] + jnp.arange(F)[None]
  valid_BFS = jnp.arange(S)[None, None, :] <= q_pos_BF[:, :, None]
  valid_BKRS = jnp.broadcast_to(valid_BFS[:, None, :, None, :], (B, K, F, G, S)).reshape(
      B, K, F * G, S)
  o = masked_attention_reference(q_BKFGH.reshape(B, K, F * G, H), k_BKSH, v_BKSH, valid_BKRS)
  return o.reshape(B, K, F, G, H)


@functools.partial(jax.jit, static_argnames=("interpret",))
def extend_attention(q_BKFGH, k_BKSH, v_BKSH, start_B, *, interpret: bool = False):
  """The `xla` implementation (interpret has nothing to interpret)."""
  del interpret
  return extend_attention_reference(q_BKFGH, k_BKSH, v_BKSH, start_B.astype(jnp.int32))
