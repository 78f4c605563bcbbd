"""The `Linear` interface every projection of the model goes through, chosen by config
(`model.linear_impl`).

    lin = make_linear(cfg)                       # a frozen dataclass, hashable (a jit static)
    p = lin.init(rng, d_in, d_out, std)          # this layer's params (a dict pytree)
    y_NF = lin(p, x_ND)                          # compute-dtype output

`dense` (DenseLinear) and `bitlinear` (BitLinear: BitNet b1.58's ternary weights and int8
activations, straight-through; the quantisers are effjax/quant/ternary.py). LoRA adapters over a frozen low-bit base and
packed inference formats plug in here as further classes with the same two methods: the
transformer layer never changes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from effjax.quant import ternary
from pallas_kernels import lowbit_matmul


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


@dataclasses.dataclass(frozen=True)
class BitLinear(DenseLinear):
  """BitNet b1.58: y = absmax_int8(x) @ absmean_ternary(W), straight-through
  (effjax/quant/ternary.py). The dense layer's params ({"kernel"} in param_dtype, fp32 master);
  the quantised operands go to the dot in `dtype` (ternary codes times a scale, integers of at
  most 8 bits times a scale)."""

  def __call__(self, p: dict, x: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.dtype)
    w = p["kernel"].astype(jnp.float32)
    codes, s_w = ternary.absmean_ternary(w)
    xf = x.astype(jnp.float32)
    x_codes, s_x = ternary.absmax_int8(xf)
    w_q = ternary.ste(w, codes * s_w)
    x_q = ternary.ste(xf, x_codes * s_x)
    return jnp.dot(x_q.astype(dt), w_q.astype(dt))


@dataclasses.dataclass(frozen=True)
class PackedTernaryLinear:
  """Inference with packed ternary weights (`effjax.quant.convert.pack_model`): the params of a
  layer are a `pallas_kernels.lowbit_matmul.layout.PackedWeight` (I2_S, I2_T, TL1, TL2 or bit
  planes) and y = lowbit_matmul_int8(absmax_int8(x), W): BitLinear's forward on the integer path
  (int8 activations, ternary codes, exact int32 sums, then the two scales)."""
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  implementation: str = "auto"      # model.lowbit_impl: backend names, comma-separated

  def init(self, rng: jax.Array, d_in: int, d_out: int, std: float) -> dict:
    raise ValueError("packed ternary layers are made from a trained bitlinear checkpoint "
                     "(effjax.quant.convert.pack_model), not initialised")

  def __call__(self, p, x: jax.Array) -> jax.Array:
    *lead, K = x.shape
    x_int8, x_scale = lowbit_matmul.layout.quantize_activations(x.reshape(-1, K))
    impl = tuple(self.implementation.split(","))
    y = lowbit_matmul.lowbit_matmul_int8(x_int8, x_scale, p, out_dtype=jnp.dtype(self.dtype),
                                         implementation=impl[0] if len(impl) == 1 else impl)
    return y.reshape(*lead, p.shape[1])


LINEARS = {"dense": DenseLinear, "bitlinear": BitLinear, "ternary_packed": PackedTernaryLinear}


def make_linear(cfg) -> Linear:
  """The Linear of a ModelConfig (`linear_impl`, `compute_dtype`, `param_dtype`)."""
  if cfg.linear_impl not in LINEARS:
    raise ValueError(f"unknown linear implementation {cfg.linear_impl!r}; available: "
                     f"{sorted(LINEARS)}")
  if cfg.linear_impl == "ternary_packed":
    return PackedTernaryLinear(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                               implementation=cfg.lowbit_impl)
  return LINEARS[cfg.linear_impl](dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
