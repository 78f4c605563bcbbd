"""cuDNN flash attention through `jax.nn.dot_product_attention` (`causal_attention`'s `cudnn`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import NotSupported, require_platform


def causal_attention(q_BTNH, k_BTKH, v_BTKH):
  require_platform("gpu", False, "cuDNN flash attention")
  if jnp.dtype(q_BTNH.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise NotSupported(f"cuDNN flash attention takes bfloat16 / float16, got {q_BTNH.dtype}")
  T = q_BTNH.shape[1]
  if T % 2:
    # cuDNN's training kernels need even lengths. One extra trailing query/key is exact under the
    # causal mask: no real query can see a key placed after all of them.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(pad(q_BTNH), pad(k_BTKH), pad(v_BTKH), is_causal=True,
                                       implementation="cudnn")
    return out[:, :T]
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True,
                                      implementation="cudnn")
