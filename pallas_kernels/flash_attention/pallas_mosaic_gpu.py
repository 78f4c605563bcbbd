"""Causal flash attention with SeerAttention's block target as a Pallas Mosaic GPU kernel (Hopper),
the `pallas_mosaic_gpu` implementation of `flash_attention`: the block-sparse forward kernel
(`block_sparse_attention.pallas_mosaic_gpu`, TMA, wgmma, a producer warpgroup and two consumer
query blocks) over every causal key block, which with a target also writes each step's row maxima
of the scaled scores (the Triton kernel's `mt`, pooled after the pass by
`reference.block_target_from_row_max`).

Unlike the Triton kernel (whose output differentiates through the XLA reference), the output
differentiates through the block-sparse backward kernels over the same blocks (the Triton ones,
or the Mosaic GPU ones where Pallas Triton is missing or `MosaicGPUConfig.mosaic_backward`): O(T)
memory. The target passes no gradient. Shapes: head dim 64 / 128 / 256, block_size None or 64
(the kernel's blocks), bfloat16 / float16; others raise NotSupported and the dispatcher moves on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu as bsa
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.flash_attention.reference import block_target_from_row_max

BLOCK = 64
CONFIG = bsa.MosaicGPUConfig


def causal_rows(B: int, K: int, nq: int) -> jax.Array:
  """int32 [B, K, nQ, nQ]: query block i selects key blocks 0..i (ascending, -1 padded)."""
  j = jnp.arange(nq, dtype=jnp.int32)
  rows = jnp.where(j[None, :] <= j[:, None], j[None, :], -1)
  return jnp.broadcast_to(rows, (B, K, nq, nq))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, lengths_B, target, launch, bwd_launch, interpret):
  return _attention_fwd(q, k, v, lengths_B, target, launch, bwd_launch, interpret)[0]


def _attention_fwd(q, k, v, lengths_B, target, launch, bwd_launch, interpret):
  B, T, N, _ = q.shape
  nq = -(-T // BLOCK)
  idx = causal_rows(B, k.shape[2], nq)
  outs = bsa.forward(q, k, v, idx, lengths_B, block_size=BLOCK, row_max=target,
                     interpret=interpret, **dict(launch))
  o, lse = outs[:2]
  tgt = block_target_from_row_max(outs[2], lse, lengths_B, T, BLOCK) if target else None
  return (o, tgt), (q, k, v, idx, lengths_B, o, lse)


def _attention_bwd(target, launch, bwd_launch, interpret, res, cotangents):
  del target
  q, k, v, idx, lengths_B, o, lse = res
  dq, dk, dv, _, _ = bsa._attention_bwd(BLOCK, launch, bwd_launch, interpret,
                                        (q, k, v, idx, lengths_B, o, lse), cotangents[0])
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, *, block_size: int | None,
                    interpret: bool = False, config: bsa.MosaicGPUConfig | None = None):
  """Shapes as `pallas_kernels.flash_attention` (inputs checked there). config: the block-sparse
  kernel's `MosaicGPUConfig` (its depth and backward options; the schedule options are refused
  with a target)."""
  require_platform("gpu", interpret, "the Mosaic GPU flash attention kernel")
  H = q_BTNH.shape[-1]
  why = bsa.mgpu_supported(H, BLOCK, q_BTNH.dtype)
  if why is not None:
    raise NotSupported(why)
  if block_size not in (None, BLOCK):
    raise NotSupported(f"block_size={block_size}: the kernel's target blocks are {BLOCK} tokens")
  config = config or bsa.MosaicGPUConfig()
  config.validate()
  target = block_size is not None
  if target and (config.overlap_qk or config.pingpong or config.pair_blocks):
    raise NotSupported("the block target runs with the default schedule only (overlap_qk, "
                       "pingpong and pair_blocks off)")
  launch, bwd = bsa.launch_of(config, H, q_BTNH.dtype, BLOCK, interpret)
  B, T = q_BTNH.shape[:2]
  if lengths_B is None:
    lengths_B = jnp.full((B,), T, jnp.int32)
  o, tgt = _attention(q_BTNH, k_BTKH, v_BTKH, lengths_B.astype(jnp.int32), target, launch, bwd,
                      bool(interpret))
  return (o, tgt) if target else o
