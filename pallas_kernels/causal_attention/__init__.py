"""Causal grouped-query self-attention over whole sequences (training, prefill).

    o_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, implementation=None)

Layout [B, T, N, H] queries, [B, T, K, H] keys / values, K dividing N (query head n reads KV head
n // (N / K)). Implementations (pallas_kernels.dispatch): `xla` (reference.py, f32 softmax) and
`cudnn` (`jax.nn.dot_product_attention(implementation="cudnn")`, flash attention on NVIDIA GPUs;
the GPU default for 16-bit inputs).
"""

from __future__ import annotations

import jax

from pallas_kernels.causal_attention.reference import attention_reference
from pallas_kernels.dispatch import Op

_OP = Op("causal_attention", __name__, backends={"xla": "reference", "cudnn": "cudnn"},
         defaults={"gpu": ("cudnn",)})
IMPLEMENTATIONS = _OP.implementations

__all__ = ["IMPLEMENTATIONS", "attention_reference", "causal_attention"]


def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, *,
                     implementation=None) -> jax.Array:
  """Causal GQA attention, [B, T, N, H] x [B, T, K, H] -> [B, T, N, H] in q's dtype (scale
  H ** -0.5)."""
  if q_BTNH.ndim != 4 or k_BTKH.ndim != 4 or v_BTKH.shape != k_BTKH.shape:
    raise ValueError(f"attention expects q [B,T,N,H], k/v [B,T,K,H]; got {q_BTNH.shape}, "
                     f"{k_BTKH.shape}, {v_BTKH.shape}")
  if q_BTNH.shape[2] % k_BTKH.shape[2]:
    raise ValueError(f"kv heads {k_BTKH.shape[2]} must divide query heads {q_BTNH.shape[2]}")
  return _OP(implementation, q_BTNH, k_BTKH, v_BTKH)
