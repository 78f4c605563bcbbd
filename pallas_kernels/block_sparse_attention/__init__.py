"""Block-sparse causal prefill attention: each query block attends only to selected key blocks
(SeerAttention's prefill sparsity).

    o_BTNH = block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B,
                                    block_size=64, implementation=None)

Layout as `causal_attention`: queries [B, T, N, H], keys / values [B, T, K, H], K dividing N. The
selection is given as indices, not a mask (like splash attention's `data_next`): for every
sequence, head and query block of `block_size` tokens, block_indices_BHQM int32 [B, Hi, nQ, M]
lists the key blocks it attends to, ascending, distinct, padded with -1 at the end; nQ =
ceil(T / block_size); Hi = N (a choice per query head, as SeerAttention's prefill gate makes) or
Hi = K (one per GQA group, shared by its query heads). Causality holds inside the selected
blocks (key s is seen from query t only if s <= t), so the diagonal block is causal and blocks
above it contribute nothing. lengths_B (optional int [B]) masks keys past the length; query rows
there give zeros, as do rows that see no key.

Implementations (pallas_kernels.dispatch): `xla` (xla.py: a scan over the index slots with an
online softmax and a FlashAttention-2 backward as a `jax.custom_vjp`; O(T) memory per head),
`pallas_mosaic_gpu` (pallas_mosaic_gpu.py, the GPU default: a warp-specialised TMA + wgmma
forward for block_size 64, H in {64, 128, 256}, bf16 / f16, with the Triton backward),
`pallas_triton` (pallas_triton.py, the GPU fallback: a forward kernel looping over the live slots
and dq / dk-dv kernels, the latter over the transposed index lists; H and block_size powers of
2, H <= 256, 16 <= block_size <= 128), `pallas_mosaic_tpu` (pallas_mosaic_tpu.py, the TPU
default: forward, dq and dk / dv kernels walking the block lists through scalar prefetch;
block_size a multiple of 8; tested in the TPU interpreter).
`block_sparse_attention_reference` (reference.py) is the dense masked oracle the tests hold
every backend to; gradients flow to q, k and v (indices and lengths are not differentiable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import checks
from pallas_kernels.block_sparse_attention.reference import (block_mask,
                                                             block_sparse_attention_reference,
                                                             per_query_head, token_mask)
from pallas_kernels.dispatch import Op
from pallas_kernels.flash_attention import check_prefill_args

# `auto` on a GPU: the Mosaic GPU forward (with the Triton backward, or the Mosaic GPU one with
# MosaicGPUConfig(mosaic_backward=True) or without Pallas Triton), then the Triton kernels
# where it refuses (block_size != 64, float32, ...). H100, 32K tokens, 32 / 8 heads, head dim 128,
# bf16 forward (docs/results/seer_prefill.md): every causal block 18.4 ms Mosaic GPU, 21.3 Triton,
# 787 the XLA scan; 10% random blocks 2.24 ms Mosaic GPU, 2.58 Triton.
_OP = Op("block_sparse_attention", __name__,
         backends={"xla": "xla", "pallas_triton": "pallas_triton",
                   "pallas_mosaic_gpu": "pallas_mosaic_gpu",
                   "pallas_mosaic_tpu": "pallas_mosaic_tpu"},
         defaults={"gpu": ("pallas_mosaic_gpu", "pallas_triton"), "tpu": ("pallas_mosaic_tpu",)})
IMPLEMENTATIONS = _OP.implementations

__all__ = ["IMPLEMENTATIONS", "block_mask", "block_sparse_attention",
           "block_sparse_attention_reference", "check_block_indices", "per_query_head",
           "token_mask"]


def check_block_indices(q_BTNH, k_BTKH, block_indices_BHQM, block_size: int) -> None:
  """block_indices int [B, Hi in (N, K), ceil(T / block_size), M >= 1]; when concrete: -1 or
  in [0, nK), live ids distinct and ascending, the -1 padding after every live id."""
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  B, T, N, _ = q_BTNH.shape
  K, nb = k_BTKH.shape[2], -(-T // block_size)
  shape = tuple(getattr(block_indices_BHQM, "shape", ()))
  if len(shape) != 4 or shape[0] != B or shape[1] not in (N, K) or shape[2] != nb or shape[3] < 1:
    raise ValueError(f"block_indices_BHQM must have shape [B={B}, N={N} or K={K}, "
                     f"nQ=ceil(T/block_size)={nb}, M>=1], got {shape}")
  # the decode layout's value checks, with the (head, query block) rows as its [B, K] rows
  rows = jax.ShapeDtypeStruct((B, shape[1] * nb, 1, 1), q_BTNH.dtype)
  checks.check_block_indices(rows, T, block_indices_BHQM.reshape(B, shape[1] * nb, shape[3]),
                             int(block_size))


def block_sparse_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                           block_indices_BHQM: jax.Array, lengths_B: jax.Array | None = None, *,
                           block_size: int, implementation=None, interpret: bool = False,
                           config=None) -> jax.Array:
  """Causal attention over the selected key blocks only.

  Args:
    q_BTNH: [B, T, N, H] float32 / bfloat16 / float16.
    k_BTKH, v_BTKH: [B, T, K, H], q's dtype, K dividing N.
    block_indices_BHQM: int32 [B, N or K, ceil(T / block_size), M], ascending block ids padded
      with -1 (concrete inputs are checked; traced ones are trusted).
    lengths_B: optional int [B] in [0, T] (None: every sequence is T tokens).
    block_size: tokens per query and key block.
    implementation: None | a name in IMPLEMENTATIONS | a sequence of names.

  Returns:
    o_BTNH [B, T, N, H] in q's dtype (softmax in float32, scale H ** -0.5); zero rows at
    t >= length and where no selected key is visible.
  """
  check_prefill_args(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size)
  check_block_indices(q_BTNH, k_BTKH, block_indices_BHQM, block_size)
  if lengths_B is None:
    lengths_B = jnp.full((q_BTNH.shape[0],), q_BTNH.shape[1], jnp.int32)
  return _OP(implementation, q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM.astype(jnp.int32),
             lengths_B.astype(jnp.int32), block_size=int(block_size), interpret=interpret,
             config=config)
