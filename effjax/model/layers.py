"""Parameter-free layer math shared by every path through the model: RMSNorm and rotary
embeddings (also used by the decode gate, which ropes its projected keys and queries), with
optional YaRN context extension of the model's RoPE (`model_rope_tables`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


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


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_seq_len: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
  """YaRN's per-dimension frequencies (Peng et al. 2023, "NTK-by-parts"), float32 [H/2].

  Dimension pair d rotates r_d = L / (2 pi theta^(2d/H)) times over the original context L.
  Pairs turning more than beta_fast times keep their frequency (extrapolation), pairs turning
  fewer than beta_slow times are divided by the factor s (interpolation), and a linear ramp
  blends the two in between. As in the authors' code (and HF transformers, so YaRN checkpoints
  load unchanged) the ramp is linear in the pair index between floor / ceil of the indices where
  r_d = beta_fast and r_d = beta_slow, not linear in r_d as the paper's gamma(r) is written.
  """
  def correction_dim(rotations):      # the (real) pair index d where r_d = rotations
    return head_dim * math.log(original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(beta_fast)), 0)
  high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
  if low == high:
    high += 0.001                     # the authors' guard against a zero-width ramp
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  extrapolate = 1.0 - ramp            # 1: keep the frequency, 0: divide it by the factor
  pos_freqs = float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  inv_freq = (1.0 / (factor * pos_freqs)) * (1.0 - extrapolate) + (1.0 / pos_freqs) * extrapolate
  return inv_freq.astype(np.float32)


def yarn_attention_scale(factor: float) -> float:
  """YaRN's sqrt(1/t) = 0.1 ln(s) + 1 (1 for s <= 1). It multiplies the cos / sin tables, so
  queries and keys both carry it and the logits are scaled by 1/t."""
  return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def model_rope_tables(cfg, positions_BT: jax.Array):
  """The model's RoPE tables [B, T, 1, H/2] (float32) at integer positions, from a ModelConfig:
  plain `rope_tables` with model.rope_scaling "none" (bit-identical to it), YaRN's frequencies
  and attention scale with "yarn"."""
  if cfg.rope_scaling == "none":
    return rope_tables(positions_BT, cfg.hd, cfg.rope_theta)
  if cfg.rope_scaling != "yarn":
    raise ValueError(f"unknown model.rope_scaling {cfg.rope_scaling!r}")
  inv_freq = jnp.asarray(yarn_inv_freq(cfg.hd, cfg.rope_theta, cfg.rope_factor,
                                       cfg.rope_original_max_seq_len, cfg.rope_beta_fast,
                                       cfg.rope_beta_slow))
  mscale = yarn_attention_scale(cfg.rope_factor)
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return (jnp.cos(angles)[:, :, None, :] * mscale, jnp.sin(angles)[:, :, None, :] * mscale)


def apply_rope(x_BTNH: jax.Array, cos, sin) -> jax.Array:
  """Rotate-half RoPE: pairs (x[i], x[i + H/2]) rotate by position * freq_i."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)
