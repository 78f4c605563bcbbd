"""The `Linear` interface every projection of the model goes through, chosen by config
(`model.linear_impl`).

    lin = make_linear(cfg)                       # a frozen dataclass, hashable (a jit static)
    p = lin.init(rng, d_in, d_out, std)          # this layer's params (a dict pytree)
    y_NF = lin(p, x_ND)                          # compute-dtype output

`dense` (DenseLinear) and `bitlinear` (effjax.quant.ternary.BitLinear: BitNet b1.58's ternary
weights and int8 activations, straight-through). LoRA adapters over a frozen low-bit base and
packed inference formats plug in here as further classes with the same two methods: the
transformer layer never changes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from effjax.quant.ternary import BitLinear


class Linear(Protocol):
  def init(self, rng: jax.Array, d_in: int, d_out: int, std: float) -> dict: ...
  def __call__(self, p: dict, x: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class DenseLinear:
  """y = x @ W, no bias. W {"kernel": [d_in, d_out]} is stored in param_dtype (fp32 master) and
  cast to dtype for compute."""
  dtype: str = "bfloat16"
  param_dtype: str = "float32"

  def init(self, rng: jax.Array, d_in: int, d_out: int, std: float) -> dict:
    return {"kernel": jax.random.normal(rng, (d_in, d_out), jnp.dtype(self.param_dtype)) * std}

  def __call__(self, p: dict, x: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.dtype)
    return jnp.dot(x.astype(dt), p["kernel"].astype(dt))


LINEARS = {"dense": DenseLinear, "bitlinear": BitLinear}


def make_linear(cfg) -> Linear:
  """The Linear of a ModelConfig (`linear_impl`, `compute_dtype`, `param_dtype`)."""
  if cfg.linear_impl not in LINEARS:
    raise ValueError(f"unknown linear implementation {cfg.linear_impl!r}; available: "
                     f"{sorted(LINEARS)}")
  return LINEARS[cfg.linear_impl](dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
