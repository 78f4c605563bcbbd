"""Causal attention of F new tokens per sequence over a KV cache that already holds their K/V
(ReSA's rectification, chunked prefill).

    o_BKFGH = extend_attention(q_BKFGH, k_BKSH, v_BKSH, start_B, implementation=None)

Implementations (pallas_kernels.dispatch): `xla` (reference.py), `pallas_triton` (the split-K
decode kernel with F x G rows and per-row causal masks; the GPU default).
"""

from __future__ import annotations

import jax

from pallas_kernels import checks
from pallas_kernels.dispatch import Op
from pallas_kernels.extend_attention.reference import extend_attention_reference

_OP = Op("extend_attention", __name__,
         backends={"xla": "reference", "pallas_triton": "pallas_triton"},
         defaults={"gpu": ("pallas_triton",)})
IMPLEMENTATIONS = _OP.implementations

__all__ = ["IMPLEMENTATIONS", "extend_attention", "extend_attention_reference"]


def extend_attention(q_BKFGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     start_B: jax.Array, *, implementation=None, interpret: bool = False,
                     config=None) -> jax.Array:
  """Causal attention of F new tokens per sequence over a cache that already holds their K/V.

  Args:
    q_BKFGH: [B, K, F, G, H]: the G query heads of KV head k for new token f of sequence b,
      at position start_B[b] + f.
    k_BKSH, v_BKSH: [B, K, S, H] cache (same dtype as q) holding at least start_b + F tokens.
    start_B: int [B], position of each sequence's first new token (start_b + F <= S).
    implementation / interpret / config: as `decode_attention`.

  Returns:
    [B, K, F, G, H] in q's dtype; token f attends to keys [0, start_b + f] (f32 softmax).
  """
  if getattr(q_BKFGH, "ndim", None) != 5:
    raise ValueError(f"q_BKFGH must be 5-D [B, K, F, G, H], got shape "
                     f"{getattr(q_BKFGH, 'shape', None)}")
  B, K, F, G, H = q_BKFGH.shape
  checks.check_decode_args(q_BKFGH.reshape(B, K, F * G, H), k_BKSH, v_BKSH, None)
  checks.check_positions("start_B", start_B, B, k_BKSH.shape[2] - F, "S - F")
  return _OP(implementation, q_BKFGH, k_BKSH, v_BKSH, start_B, interpret=interpret,
             config=config)
