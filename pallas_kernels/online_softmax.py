"""The online-softmax (FlashAttention-2) block update shared by the decode kernels of every
backend that runs jnp inside the kernel (Pallas Triton, Pallas Mosaic TPU, interpret mode).

State per query row: (unnormalised accumulator acc [R, H], running max m [R], running sum l [R]),
all float32. `attend_block` folds one block of keys into it; a split-K kernel writes the state
out as a partial that `pallas_kernels.combine_splits` merges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite stand-in for -inf: a fully masked row then gives exp(MASK - MASK) = 1 instead of NaN
# from (-inf) - (-inf); the explicit `where(valid, ., 0)` below zeroes those weights.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def init_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Empty state: (acc f32 [rows, H], max f32 [rows], sum f32 [rows])."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def attend_block(q_RH: jax.Array, k_TH: jax.Array, v_TH: jax.Array, valid_T: jax.Array,
                 state: tuple[jax.Array, jax.Array, jax.Array], *, scale: float,
                 precision: lax.Precision) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Folds one block of T keys into the state.

  q_RH [R, H], k_TH / v_TH [T, H] (same dtype), valid_T bool [T] or [R, T] (per-row masks:
  causal multi-token queries); state = (acc f32 [R, H], m f32 [R], l f32 [R]).
  """
  acc_RH, m_R, l_R = state
  s_RT = jnp.dot(q_RH, k_TH.T, preferred_element_type=jnp.float32, precision=precision) * scale
  valid_1T = valid_T[None, :] if valid_T.ndim == 1 else valid_T
  s_RT = jnp.where(valid_1T, s_RT, MASK_VALUE)
  m_new_R = jnp.maximum(m_R, jnp.max(s_RT, axis=1))
  # Masked keys get weight exactly 0, so a block (or a whole split) with no valid key leaves
  # l = 0 and acc = 0 however the running max sits.
  p_RT = jnp.where(valid_1T, jnp.exp(s_RT - m_new_R[:, None]), 0.0)
  corr_R = jnp.exp(m_R - m_new_R)
  l_new_R = corr_R * l_R + jnp.sum(p_RT, axis=1)
  # Probabilities in the cache dtype so that the PV product is a bf16 tensor-core dot.
  pv_RH = jnp.dot(p_RT.astype(v_TH.dtype), v_TH, preferred_element_type=jnp.float32,
                  precision=precision)
  return corr_R[:, None] * acc_RH + pv_RH, m_new_R, l_new_R


# The same state kept in VMEM scratch across the sequential last grid axis of a Pallas Mosaic TPU
# kernel (the block-list kernels): m / l lane-dense [R, 128] (broadcast over the lanes, the
# layout Mosaic wants), acc [R, H].

def scratch_init(m_sc, l_sc, acc_sc) -> None:
  """Empty state (call at the first step of the axis)."""
  m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
  l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
  acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def scratch_attend(q_RH, k_TH, v_TH, valid_T, m_sc, l_sc, acc_sc, *, scale: float,
                   precision) -> None:
  """Folds one block into the scratch state (`attend_block`)."""
  acc, m, l = attend_block(q_RH, k_TH, v_TH, valid_T, (acc_sc[...], m_sc[:, 0], l_sc[:, 0]),
                           scale=scale, precision=precision)
  acc_sc[...] = acc
  m_sc[...] = jnp.broadcast_to(m[:, None], m_sc.shape)
  l_sc[...] = jnp.broadcast_to(l[:, None], l_sc.shape)


def scratch_finish(o_ref, l_sc, acc_sc) -> None:
  """Writes the normalised output (rows with no valid key: zeros); call at the last step."""
  l = l_sc[:, :1]
  o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
