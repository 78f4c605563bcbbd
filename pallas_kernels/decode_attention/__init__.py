"""Decode attention: one new query token per sequence over a ragged KV cache (split-K flash
decoding).

    o_BKGH = decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, implementation=None)

Implementations (pallas_kernels.dispatch): `xla` (reference.py, the masked reference of the cache
layout), `pallas_triton` (pallas_triton.py; the GPU default), `pallas_mosaic_tpu`
(pallas_mosaic_tpu.py: the block-list kernel over every live block; TPU interpreter only so far).
"""

from __future__ import annotations

import jax

from pallas_kernels import checks
from pallas_kernels.decode_attention.reference import (decode_attention_reference, length_mask,
                                                       masked_attention_reference)
from pallas_kernels.dispatch import Op

_OP = Op("decode_attention", __name__,
         backends={"xla": "reference", "pallas_triton": "pallas_triton",
                   "pallas_mosaic_tpu": "pallas_mosaic_tpu"},
         defaults={"gpu": ("pallas_triton",), "tpu": ("pallas_mosaic_tpu",)})
IMPLEMENTATIONS = _OP.implementations

__all__ = ["IMPLEMENTATIONS", "decode_attention", "decode_attention_reference", "length_mask",
           "masked_attention_reference"]


def decode_attention(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     lengths_B: jax.Array, *, implementation=None, interpret: bool = False,
                     config=None) -> jax.Array:
  """Attention of one new query token per sequence over a ragged KV cache.

  Args:
    q_BKGH: [B, K, G, H] float32 / bfloat16 / float16, G query heads per KV head.
    k_BKSH, v_BKSH: [B, K, S, H], same dtype as q; S is the cache capacity.
    lengths_B: int [B], valid cached tokens per sequence, in [0, S]; keys at positions
      >= length are ignored.
    implementation: None (the platform's default, then xla) | a name in IMPLEMENTATIONS | a
      sequence of names tried in order.
    interpret: run a Pallas kernel in interpret mode (CPU testing).
    config: the chosen backend's config (e.g. `pallas_triton.TritonConfig`); None: tuned.

  Returns:
    o_BKGH [B, K, G, H] in q's dtype; softmax scale H ** -0.5, softmax in float32; rows of a
    sequence with length 0 are zeros.
  """
  checks.check_decode_args(q_BKGH, k_BKSH, v_BKSH, lengths_B)
  return _OP(implementation, q_BKGH, k_BKSH, v_BKSH, lengths_B, interpret=interpret,
             config=config)
