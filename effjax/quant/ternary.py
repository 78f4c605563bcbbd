"""BitNet b1.58: ternary weights and 8-bit activations, trained with a straight-through estimator.

    model.linear_impl: bitlinear        # every projection of the layer is a BitLinear
    model.sub_norm: true                # SubLN: an RMSNorm before the attention output and the
                                        # MLP down projection (BitNet's extra norms)

Forward of a BitLinear (y = Q_a(x) @ Q_w(W)):
- weights per tensor by absmean: s_w = mean|W|, W_t = clip(round(W / s_w), -1, 1) in
  {-1, 0, +1}, Q_w(W) = W_t * s_w;
- activations per token by absmax to int8: s_x = max|x| / 127, x_q = round(x / s_x) in
  [-127, 127], Q_a(x) = x_q * s_x (an all-zero row: codes 0, scale 0).
Backward: the straight-through estimator, d Q(z) / dz = 1 (Q(z) = z + stop_gradient(Q(z) - z)),
so the fp32 master weights and the activations get the full-precision gradient of the
quantised forward. The params are the dense layer's ({"kernel": [d_in, d_out]} in param_dtype),
so a checkpoint trained with BitLinear (`effjax.model.linear.BitLinear`, built on these
functions) converts into the packed inference formats of
`pallas_kernels.lowbit_matmul` (`ternarize` gives the codes and the scale a packer takes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.lowbit_matmul import layout


def absmean_ternary(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(codes in {-1, 0, +1} as float32, scale f32 []): BitNet b1.58's weight quantiser, the very
  one the packed formats store (`pallas_kernels.lowbit_matmul.layout.ternarize`: scale =
  mean|w|, codes = clip(round(w / scale), -1, 1)), so a packed model computes what was trained."""
  codes, scale = layout.ternarize(w)
  return codes.astype(jnp.float32), scale


def absmax_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(integer codes in [-127, 127] as float32 [..., D], per-token scale f32 [..., 1]): the
  activation quantiser of the W2A8 path (`layout.quantize_activations`, max|x| / 127)."""
  codes, scale = layout.quantize_activations(x)
  return codes.astype(jnp.float32), scale[..., None]


def ste(z: jax.Array, quantised: jax.Array) -> jax.Array:
  """The quantised value forward, the identity's gradient backward."""
  return z + jax.lax.stop_gradient(quantised.astype(z.dtype) - z)
