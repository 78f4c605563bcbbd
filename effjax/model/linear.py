"""Pluggable linear layers. `make_linear(impl)` returns the Flax module class the model uses.

Only `dense` exists now; BitLinear (ternary) and LoRA adapters plug in here later with the same
call signature: `Linear(features, name=...)(x_...D) -> x_...F`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class DenseLinear(nn.Module):
  """y = x @ W, no bias. W is stored in param_dtype (fp32 master) and cast to dtype for compute."""
  features: int
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    w_DF = self.param("kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features),
                      self.param_dtype)
    return jnp.dot(x.astype(self.dtype), w_DF.astype(self.dtype))


LINEARS = {"dense": DenseLinear}


def make_linear(impl: str):
  if impl not in LINEARS:
    raise ValueError(f"unknown linear implementation {impl!r}; available: {sorted(LINEARS)}")
  return LINEARS[impl]
