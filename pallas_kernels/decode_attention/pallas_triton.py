"""Split-K flash decoding as a Pallas Triton kernel (`decode_attention`'s `pallas_triton`).

Grid (B, K, num_splits): program (b, k, j) takes the j-th share of the live key blocks of sequence
b (the live blocks, cdiv(length, block_k), are divided among splits at run time so ragged lengths
balance), runs an online softmax over them with the G query heads of KV head k as the rows of one
dot, and writes an (acc, max, sum) partial that `combine_splits` merges. The tuned default is
about one program per SM, each streaming a long contiguous range (B1 S128K on the H100: 87% of
the byte floor against 84% at 4 programs per SM), 4 pipeline stages (the H200 sweep: 3-5% over 3).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import launch, triton_splitk, tuned
from pallas_kernels.dispatch import require_platform


@dataclasses.dataclass(frozen=True)
class TritonConfig(triton_splitk.SplitKConfig):
  """Launch parameters of the dense Triton decode kernel; None takes the tuned value
  (`tuned.lookup("decode_attention", "pallas_triton")`). block_k: keys per loop step (a power
  of 2 >= 16)."""
  block_k: int | None = None

  def validate(self) -> None:
    super().validate()
    bk = self.block_k
    if bk is not None and (not isinstance(bk, int) or not launch.is_power_of_2(bk) or bk < 16):
      raise ValueError(f"config.block_k must be a power of 2 >= 16 or None, got {bk!r}")


CONFIG = TritonConfig


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_k: int,
                   num_splits: int, scale: float, precision: lax.Precision, n_rows: int):
  """Program (b, k, j). len_ref: int32 []; q_ref [R, H]; k_ref / v_ref [S, H] (the whole cache of
  this (b, k), so the split boundaries can follow the run-time length); o_ref f32 [R, H];
  m_ref / l_ref f32 [R]."""
  length = len_ref[()]
  start, end = triton_splitk.split_range(length, block_k, num_splits)
  offsets_T = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

  def load_block(i):
    t0 = pl.multiple_of(i * block_k, block_k)
    # Only the last block of a sequence is partial, but one compare per key is cheaper than
    # a branch, and the kernel is bound by the K/V bytes anyway.
    return (k_ref[pl.ds(t0, block_k), :], v_ref[pl.ds(t0, block_k), :],
            t0 + offsets_T < length)

  triton_splitk.attend_range(q_ref, o_ref, m_ref, l_ref, start, end, load_block, scale=scale,
                             precision=precision, n_rows=n_rows)


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "num_warps", "num_stages",
                                             "interpret"))
def _decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, *, block_k: int, num_splits: int | None,
            num_warps: int, num_stages: int, interpret: bool):
  H = q_BKGH.shape[-1]
  k_BKSH, v_BKSH, num_splits = triton_splitk.dense_layout(k_BKSH, v_BKSH, block_k, num_splits,
                                                          "decode_attention")
  kernel = functools.partial(_decode_kernel, block_k=block_k, num_splits=num_splits,
                             scale=H ** -0.5, precision=launch.dot_precision(q_BKGH.dtype))
  return triton_splitk.splitk_call(
      kernel, [pl.BlockSpec((triton_splitk.SQUEEZED,), lambda b, k, j: (b,))],
      [lengths_B.astype(jnp.int32)], q_BKGH, k_BKSH, v_BKSH, num_splits=num_splits,
      tile_rows=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      name="decode_attention")


def decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, *, interpret: bool = False,
                     config: TritonConfig | None = None):
  """Shapes as `pallas_kernels.decode_attention`."""
  require_platform("gpu", interpret, "the Pallas Triton decode kernel")
  triton_splitk.triton_supported(q_BKGH.shape[-1])
  config = config or TritonConfig()
  config.validate()
  t = tuned.lookup("decode_attention", "pallas_triton")
  return _decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_k=config.block_k or t["block_k"],
                 num_splits=config.num_splits, num_warps=config.num_warps or t["num_warps"],
                 num_stages=config.num_stages or t["num_stages"], interpret=bool(interpret))
