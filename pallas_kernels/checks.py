"""Argument checks shared by the decode-attention ops (static properties always; values only when
the arrays are concrete -- under jit they are traced and trusted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_decode_args(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                      lengths_B: jax.Array | None) -> None:
  """q [B, K, G, H], k / v [B, K, S, H], one float dtype; lengths_B (None skips it) int [B] in
  [0, S]."""
  for name, x in (("q_BKGH", q_BKGH), ("k_BKSH", k_BKSH), ("v_BKSH", v_BKSH)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D [B, K, ., H], got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
      raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if k_BKSH.shape != v_BKSH.shape:
    raise ValueError(f"k_BKSH {k_BKSH.shape} and v_BKSH {v_BKSH.shape} must have the same shape")
  if not (q_BKGH.dtype == k_BKSH.dtype == v_BKSH.dtype):
    raise ValueError("q_BKGH, k_BKSH and v_BKSH must share a dtype, got "
                     f"{q_BKGH.dtype}, {k_BKSH.dtype}, {v_BKSH.dtype}")
  B, K, G, H = q_BKGH.shape
  if (k_BKSH.shape[0], k_BKSH.shape[1], k_BKSH.shape[3]) != (B, K, H):
    raise ValueError(f"k_BKSH {k_BKSH.shape} must be [B, K, S, H] matching q_BKGH {q_BKGH.shape}")
  if min(B, K, G, H, k_BKSH.shape[2]) < 1:
    raise ValueError(f"empty dimension: q_BKGH {q_BKGH.shape}, k_BKSH {k_BKSH.shape}")
  if lengths_B is not None:
    check_positions("lengths_B", lengths_B, B, k_BKSH.shape[2], "S")


def check_positions(name: str, x_B, batch: int, high: int, high_name: str) -> None:
  """x_B: an integer [batch] array; when concrete, every entry in [0, high] (high_name says what
  high is in the message, e.g. "S" or "S - F")."""
  if getattr(x_B, "shape", None) != (batch,):
    raise ValueError(f"{name} must have shape [B]={batch,}, got {getattr(x_B, 'shape', None)}")
  if not jnp.issubdtype(x_B.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got {x_B.dtype}")
  if is_concrete(x_B):
    xv = np.asarray(x_B)
    if xv.min() < 0 or xv.max() > high:
      raise ValueError(f"{name} must lie in [0, {high_name}={high}], got {xv.tolist()}")


def check_block_indices(q_BKGH: jax.Array, seq: int, block_indices_BKM: jax.Array,
                        block_size: int) -> None:
  """block_indices int [B, K, M >= 1]; when concrete: -1 or in [0, cdiv(S, block_size)), live ids
  distinct and ascending, the -1 padding after every live id."""
  B, K = q_BKGH.shape[:2]
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  shape = getattr(block_indices_BKM, "shape", None)
  if shape is None or len(shape) != 3 or tuple(shape[:2]) != (B, K) or shape[2] < 1:
    raise ValueError(f"block_indices_BKM must have shape [B={B}, K={K}, M>=1], got {shape}")
  if not jnp.issubdtype(block_indices_BKM.dtype, jnp.integer):
    raise ValueError(f"block_indices_BKM must be an integer array, got {block_indices_BKM.dtype}")
  if is_concrete(block_indices_BKM):
    idx = np.asarray(block_indices_BKM)
    n_blocks = -(-seq // block_size)
    if idx.min() < -1 or idx.max() >= n_blocks:
      raise ValueError(f"block_indices_BKM entries must be -1 or in [0, {n_blocks}) "
                       f"(S={seq}, block_size={block_size}); got range "
                       f"[{idx.min()}, {idx.max()}]")
    live = idx >= 0
    if np.any(~live[..., :-1] & live[..., 1:]):
      raise ValueError("block_indices_BKM must hold its -1 padding after all live indices")
    both = live[..., :-1] & live[..., 1:]
    if np.any(both & (idx[..., 1:] <= idx[..., :-1])):
      raise ValueError("block_indices_BKM live indices must be distinct and ascending")
