"""Causal prefill attention that can also return SeerAttention's block-level ground truth, the
distillation target of the prefill gate (`effjax.sparse.prefill_gate`).

    o_BTNH = flash_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B)
    o_BTNH, target_BNQK = flash_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size=64)

Layout as `causal_attention`: queries [B, T, N, H], keys / values [B, T, K, H], K dividing N
(query head n reads KV head n // (N / K)). lengths_B (optional, int [B]) makes sequences ragged:
keys at positions >= length are masked and query rows there give zeros. The target
[B, N, nQ, nK] (float32, nQ = nK = ceil(T / block_size)) is, for query block i and key block j,
the largest attention probability of block j seen by any query row of block i, each row of blocks
normalised to sum 1 over the blocks it sees (j <= i); rows of blocks without a valid query are
zeros (reference.py gives the construction and how a kernel computes it without the full map).

Implementations (pallas_kernels.dispatch): `xla` (reference.py, the full attention map in
float32; memory O(T^2) per head), `pallas_triton` (pallas_triton.py, the GPU default: a flash
kernel keeping each (row, key block)'s max logit, pooled after the pass; O(T^2 / block_size)
memory per head with a target, O(T) without; H and block_size powers of 2, H <= 256,
16 <= block_size <= 128; forward only), `pallas_mosaic_gpu` (pallas_mosaic_gpu.py, Hopper: the
block-sparse Mosaic GPU forward over every causal block, writing the same row maxima; block_size
64, bf16 / f16; its output differentiates through the block-sparse backward kernels),
`pallas_mosaic_tpu` (pallas_mosaic_tpu.py, the TPU
default: the same pass over a (query block, key block) grid, the per-block row maxima in VMEM;
block_size a multiple of 8; forward only; tested in the TPU interpreter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import checks
from pallas_kernels.dispatch import Op
from pallas_kernels.flash_attention.reference import (attention_probs, block_target_from_probs,
                                                      block_target_reference,
                                                      flash_attention_reference, num_blocks)

# `auto` on a GPU: the Triton kernel (H100, 32K tokens, 32 / 8 heads: 19.7 ms; the XLA
# reference cannot hold the [T, T] map there), then the Mosaic GPU kernel (not yet timed with
# the target; the block-sparse kernel it runs took 18.4 ms over every causal block there).
_OP = Op("flash_attention", __name__,
         backends={"xla": "reference", "pallas_triton": "pallas_triton",
                   "pallas_mosaic_gpu": "pallas_mosaic_gpu",
                   "pallas_mosaic_tpu": "pallas_mosaic_tpu"},
         defaults={"gpu": ("pallas_triton", "pallas_mosaic_gpu"), "tpu": ("pallas_mosaic_tpu",)})
IMPLEMENTATIONS = _OP.implementations

__all__ = ["IMPLEMENTATIONS", "attention_probs", "block_target_from_probs",
           "block_target_reference", "check_prefill_args", "flash_attention",
           "flash_attention_reference", "num_blocks"]


def check_prefill_args(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size) -> None:
  """q [B, T, N, H], k / v [B, T, K, H] of one float dtype, K dividing N; lengths_B None or int
  [B] in [0, T] (checked when concrete); block_size None or a positive int."""
  for name, x in (("q_BTNH", q_BTNH), ("k_BTKH", k_BTKH), ("v_BTKH", v_BTKH)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D [B, T, ., H], got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype) not in checks.FLOAT_DTYPES:
      raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if k_BTKH.shape != v_BTKH.shape:
    raise ValueError(f"k_BTKH {k_BTKH.shape} and v_BTKH {v_BTKH.shape} must have the same shape")
  if not (q_BTNH.dtype == k_BTKH.dtype == v_BTKH.dtype):
    raise ValueError("q, k and v must share a dtype, got "
                     f"{q_BTNH.dtype}, {k_BTKH.dtype}, {v_BTKH.dtype}")
  B, T, N, H = q_BTNH.shape
  if (k_BTKH.shape[0], k_BTKH.shape[1], k_BTKH.shape[3]) != (B, T, H):
    raise ValueError(f"k_BTKH {k_BTKH.shape} must be [B, T, K, H] matching q_BTNH {q_BTNH.shape}")
  if min(B, T, N, H, k_BTKH.shape[2]) < 1:
    raise ValueError(f"empty dimension: q_BTNH {q_BTNH.shape}, k_BTKH {k_BTKH.shape}")
  if N % k_BTKH.shape[2]:
    raise ValueError(f"kv heads {k_BTKH.shape[2]} must divide query heads {N}")
  if lengths_B is not None:
    checks.check_positions("lengths_B", lengths_B, B, T, "T")
  if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
    raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")


def flash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                    lengths_B: jax.Array | None = None, *, block_size: int | None = None,
                    implementation=None, interpret: bool = False, config=None):
  """Causal GQA prefill attention, optionally with the block-level target.

  Args:
    q_BTNH: [B, T, N, H] float32 / bfloat16 / float16.
    k_BTKH, v_BTKH: [B, T, K, H], q's dtype, K dividing N.
    lengths_B: optional int [B] in [0, T], valid tokens per (right-padded) sequence.
    block_size: None (output only) or the tokens per query / key block of the target.
    implementation: None | a name in IMPLEMENTATIONS | a sequence of names.

  Returns:
    o_BTNH [B, T, N, H] in q's dtype (softmax in float32, scale H ** -0.5), or, with a
    block_size, (o_BTNH, target_BNQK float32 [B, N, nQ, nK]).
  """
  check_prefill_args(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size)
  if lengths_B is not None:
    lengths_B = lengths_B.astype(jnp.int32)
  return _OP(implementation, q_BTNH, k_BTKH, v_BTKH, lengths_B,
             block_size=None if block_size is None else int(block_size), interpret=interpret,
             config=config)
