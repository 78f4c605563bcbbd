"""Parameter-free layer math shared by every path through the model: RMSNorm and rotary
embeddings (also used by the decode gate, which ropes its projected keys and queries)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float, dtype) -> jax.Array:
  """RMSNorm in float32, cast to `dtype`."""
  x = x_BTD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * scale_D).astype(dtype)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float):
  """cos/sin tables [B, T, 1, H/2] (float32) for rotary embeddings at integer positions."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x_BTNH: jax.Array, cos, sin) -> jax.Array:
  """Rotate-half RoPE: pairs (x[i], x[i + H/2]) rotate by position * freq_i."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)
