"""Plain-jnp split merge: the `xla` implementation of `combine_splits`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine_splits_reference(o_BKNRH: jax.Array, m_BKNR: jax.Array, l_BKNR: jax.Array, g: int,
                             out_dtype) -> jax.Array:
  """Shapes as `pallas_kernels.combine_splits`; returns [B, K, g, H] in out_dtype."""
  # Drop the padding rows first, so the merge reads only the g real rows of each partial.
  o_BKNGH, m_BKNG, l_BKNG = o_BKNRH[:, :, :, :g], m_BKNR[:, :, :, :g], l_BKNR[:, :, :, :g]
  m_BKG = jnp.max(m_BKNG, axis=2)
  w_BKNG = jnp.exp(m_BKNG - m_BKG[:, :, None])
  l_BKG = jnp.sum(w_BKNG * l_BKNG, axis=2)
  o_BKGH = jnp.sum(w_BKNG[..., None] * o_BKNGH, axis=2)
  o_BKGH = o_BKGH / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]
  return o_BKGH.astype(out_dtype)


def combine_splits(o_BKNRH, m_BKNR, l_BKNR, g: int, out_dtype, *, interpret: bool = False):
  del interpret  # nothing to interpret
  return combine_splits_reference(o_BKNRH, m_BKNR, l_BKNR, g, out_dtype)
