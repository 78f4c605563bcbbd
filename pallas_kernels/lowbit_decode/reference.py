"""Plain-jnp low-bit decode / extend attention (the `xla` implementations): dequantise the packed
rows to float32, splice the residual window in, then the cache layout's masked reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.reference import (
  length_mask,
  masked_attention_reference,
)
from pallas_kernels.extend_attention.reference import extend_attention_reference
from pallas_kernels.lowbit_decode import layout
from pallas_kernels.sparse_decode.reference import block_token_mask

_STATIC = ("bits", "group", "k_mode", "v_group")


@functools.partial(jax.jit, static_argnames=_STATIC + ("block_size",))
def lowbit_decode_attention_reference(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
                                      res_k, res_v, lengths_B, packed_B, block_indices_BKM=None, *,
                                      bits: int, group: int, k_mode: str, v_group: int,
                                      block_size: int | None = None) -> jax.Array:
  """Attention of one query token per sequence over the dequantised cache (float32 keys and
  values, so the reference carries no rounding beyond the quantisation itself). Tokens below
  lengths_b are valid; with block_indices_BKM only those of the selected blocks. Shapes as
  `pallas_kernels.lowbit_decode.lowbit_decode_attention`; returns [B, K, G, H] in q's dtype."""
  k, v = layout.dequantize_cache(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                                 res_v, packed_B, bits=bits, group=group, k_mode=k_mode,
                                 v_group=v_group)
  _B, K, S, _ = k.shape
  if block_indices_BKM is None:
    valid_BKS = length_mask(lengths_B, K, S)
  else:
    valid_BKS = block_token_mask(block_indices_BKM, lengths_B, block_size, S)
  return masked_attention_reference(q_BKGH, k, v, valid_BKS)


@functools.partial(jax.jit, static_argnames=_STATIC)
def lowbit_extend_attention_reference(q_BKFGH, k_packed, k_scale, k_zero, v_packed, v_scale,
                                      v_zero, res_k, res_v, start_B, packed_B, *, bits: int,
                                      group: int, k_mode: str, v_group: int) -> jax.Array:
  """Causal attention of F new tokens per sequence (token f at start_b + f sees keys [0, start_b
  + f]) over the dequantised cache, which already holds them. Returns [B, K, F, G, H] in q's
  dtype."""
  k, v = layout.dequantize_cache(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                                 res_v, packed_B, bits=bits, group=group, k_mode=k_mode,
                                 v_group=v_group)
  return extend_attention_reference(q_BKFGH, k, v, start_B)


def lowbit_decode_attention(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                            res_v, lengths_B, packed_B, *, bits, group, k_mode, v_group,
                            block_indices_BKM=None, block_size=None, num_live_BK=None,
                            interpret: bool = False):
  """The `xla` implementation (num_live_BK is not needed, interpret has nothing to interpret)."""
  del num_live_BK, interpret
  if block_indices_BKM is not None:
    block_indices_BKM = block_indices_BKM.astype(jnp.int32)
  return lowbit_decode_attention_reference(
      q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
      lengths_B.astype(jnp.int32), packed_B.astype(jnp.int32), block_indices_BKM, bits=bits,
      group=group, k_mode=k_mode, v_group=v_group, block_size=block_size)


def lowbit_extend_attention(q_BKFGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                            res_v, start_B, packed_B, *, bits, group, k_mode, v_group,
                            interpret: bool = False):
  """The `xla` implementation of the multi-token variant."""
  del interpret
  return lowbit_extend_attention_reference(
      q_BKFGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
      start_B.astype(jnp.int32), packed_B.astype(jnp.int32), bits=bits, group=group,
      k_mode=k_mode, v_group=v_group)
