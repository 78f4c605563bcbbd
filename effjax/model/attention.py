"""Causal grouped-query attention behind one dispatch point.

Model code calls `attention(...)` only; the implementation is chosen by config:
  xla   -- plain-jnp reference (fp32 softmax), always available;
  cudnn -- `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on NVIDIA GPUs);
  auto  -- cudnn on a GPU backend with 16-bit inputs, else xla.
Later the Pallas kernels (sparse prefill, low-bit KV) plug in here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_reference(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                        causal: bool = True) -> jax.Array:
  """Plain-jnp GQA attention.

  q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N (query head n reads kv head n // (N/K)).
  Causal masking aligns the last query with the last key (queries are the final T of S positions).
  Returns [B, T, N, H] in q's dtype; softmax in float32.
  """
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


def resolve_implementation(implementation: str, dtype) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "auto":
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
  return implementation


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, causal: bool = True,
              implementation: str = "auto") -> jax.Array:
  """Causal GQA attention, [B, T, N, H] x [B, S, K, H] -> [B, T, N, H]; see module docstring."""
  if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.shape != k_BSKH.shape:
    raise ValueError(f"attention expects q [B,T,N,H], k/v [B,S,K,H]; got {q_BTNH.shape}, "
                     f"{k_BSKH.shape}, {v_BSKH.shape}")
  if q_BTNH.shape[2] % k_BSKH.shape[2]:
    raise ValueError(f"kv heads {k_BSKH.shape[2]} must divide query heads {q_BTNH.shape[2]}")
  impl = resolve_implementation(implementation, q_BTNH.dtype)
  if impl == "xla":
    return attention_reference(q_BTNH, k_BSKH, v_BSKH, causal=causal)
  T = q_BTNH.shape[1]
  if T != k_BSKH.shape[1] and causal:
    raise ValueError("cudnn path supports causal self-attention with T == S only")
  if causal and T % 2:
    # cuDNN's training kernels need even lengths. One extra trailing query/key is exact under the
    # causal mask: no real query can see a key placed after all of them.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(pad(q_BTNH), pad(k_BSKH), pad(v_BSKH), is_causal=True,
                                       implementation="cudnn")
    return out[:, :T]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=causal,
                                      implementation="cudnn")
