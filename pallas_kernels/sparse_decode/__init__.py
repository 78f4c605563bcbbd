"""Block-sparse decode attention: each (sequence, KV head) attends only to selected KV blocks.

    o_BKGH = sparse_decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM,
                                     block_size=64, implementation=None)

The selection is given as indices, not a mask (like splash attention's `data_next` or
SeerAttention-R's block indices): block_indices_BKM int32 [B, K, M] lists the selected blocks of
`block_size` tokens, ascending, padded with -1 at the end. Tokens at positions >= lengths_B[b]
are masked even inside a selected block.

Implementations (pallas_kernels.dispatch): `xla` (reference.py), `pallas_triton` (split-K over
the block slots; the GPU default), `pallas_mosaic_gpu` (Hopper TMA + wgmma; as fast as Triton at
B8 / B16, 1-2 us faster at B1 on an H200; bf16 / f16, H a multiple of 64 up to 256, blocks of 64
or 128), `pallas_mosaic_tpu` (a block list through scalar prefetch; TPU interpreter only so far).
"""

from __future__ import annotations

import jax

from pallas_kernels import checks
from pallas_kernels.dispatch import Op
from pallas_kernels.sparse_decode.reference import (block_token_mask, live_slots,
                                                    sparse_decode_attention_reference)

_OP = Op("sparse_decode_attention", __name__,
         backends={"xla": "reference", "pallas_triton": "pallas_triton",
                   "pallas_mosaic_gpu": "pallas_mosaic_gpu",
                   "pallas_mosaic_tpu": "pallas_mosaic_tpu"},
         defaults={"gpu": ("pallas_triton", "pallas_mosaic_gpu"), "tpu": ("pallas_mosaic_tpu",)})
IMPLEMENTATIONS = _OP.implementations

__all__ = ["IMPLEMENTATIONS", "block_token_mask", "live_slots", "sparse_decode_attention",
           "sparse_decode_attention_reference"]


def sparse_decode_attention(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                            lengths_B: jax.Array, block_indices_BKM: jax.Array, *,
                            block_size: int, implementation=None, interpret: bool = False,
                            config=None, num_live_BK: jax.Array | None = None) -> jax.Array:
  """Decode attention over the selected KV blocks only.

  Args:
    q_BKGH: [B, K, G, H] float32 / bfloat16 / float16, G query heads per KV head.
    k_BKSH, v_BKSH: [B, K, S, H], same dtype as q; S is the cache capacity.
    lengths_B: int [B], valid cached tokens per sequence, in [0, S].
    block_indices_BKM: int32 [B, K, M], selected block ids (block j = tokens
      [j * block_size, (j + 1) * block_size)), distinct and ascending, padded with -1 at the end.
      Concrete inputs are checked; traced ones are trusted.
    block_size: tokens per block.
    implementation: None (the platform's default order, then xla) | a name in IMPLEMENTATIONS |
      a sequence of names tried in order.
    interpret: run a Pallas kernel in interpret mode (CPU testing).
    config: the chosen backend's config (`pallas_triton.TritonConfig`,
      `pallas_mosaic_gpu.MosaicGPUConfig`); None: tuned.
    num_live_BK: optional int32 [B, K], the number of leading live slots of each row (what
      `live_slots` computes), when the selector already knows it (`block_topk` returns it);
      trusted, saves a pass over the indices.

  Returns:
    o_BKGH [B, K, G, H] in q's dtype: softmax (scale H ** -0.5, float32) over the tokens of the
    selected blocks below the length; zeros where no such token exists.
  """
  checks.check_decode_args(q_BKGH, k_BKSH, v_BKSH, lengths_B)
  checks.check_block_indices(q_BKGH, k_BKSH.shape[2], block_indices_BKM, block_size)
  if num_live_BK is not None and getattr(num_live_BK, "shape", None) != tuple(q_BKGH.shape[:2]):
    raise ValueError(f"num_live_BK must have shape [B, K]={tuple(q_BKGH.shape[:2])}, got "
                     f"{getattr(num_live_BK, 'shape', None)}")
  return _OP(implementation, q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM,
             block_size=int(block_size), num_live_BK=num_live_BK, interpret=interpret,
             config=config)
