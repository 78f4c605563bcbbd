"""The split-K decode kernel for F consecutive new tokens per sequence (`extend_attention`'s
`pallas_triton`): the F x G query rows of a KV head share every K/V block load, each row masked
causally at its own position, so the cache is read once for all F tokens and no [F, S] score
matrix is ever materialised (ReSA's rectification, chunked prefill)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import launch, triton_splitk, tuned
from pallas_kernels.decode_attention.pallas_triton import TritonConfig as DecodeTritonConfig
from pallas_kernels.dispatch import require_platform


@dataclasses.dataclass(frozen=True)
class TritonConfig(DecodeTritonConfig):
  """Launch parameters (as the dense decode kernel's); None takes the tuned value
  (`tuned.lookup("extend_attention", "pallas_triton")`): num_warps doubles from `many_rows`
  query rows (F x G padded), where the [rows, H] accumulators need the registers."""


CONFIG = TritonConfig


def _extend_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_k: int,
                   num_splits: int, group: int, n_tokens: int, scale: float,
                   precision: lax.Precision, n_rows: int):
  """Program (b, k, j). start_ref int32 []; q_ref [R, H]: row r is query head r % group of new
  token r // group (rows from n_tokens * group on are padding); the rest as the decode kernel."""
  start = start_ref[()]
  rows_R = lax.broadcasted_iota(jnp.int32, (q_ref.shape[0],), 0)
  # keys visible to each row: its token's position + 1 (padding rows: the last token's)
  row_len_R = start + jnp.minimum(rows_R // group, n_tokens - 1) + 1
  first, end = triton_splitk.split_range(start + n_tokens, block_k, num_splits)
  offsets_T = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

  def load_block(i):
    t0 = pl.multiple_of(i * block_k, block_k)
    return (k_ref[pl.ds(t0, block_k), :], v_ref[pl.ds(t0, block_k), :],
            (t0 + offsets_T)[None, :] < row_len_R[:, None])

  triton_splitk.attend_range(q_ref, o_ref, m_ref, l_ref, first, end, load_block, scale=scale,
                             precision=precision, n_rows=n_rows)


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "num_warps", "num_stages",
                                             "interpret"))
def _extend(q_BKFGH, k_BKSH, v_BKSH, start_B, *, block_k: int, num_splits: int | None,
            num_warps: int, num_stages: int, interpret: bool):
  B, K, F, G, H = q_BKFGH.shape
  k_BKSH, v_BKSH, num_splits = triton_splitk.dense_layout(k_BKSH, v_BKSH, block_k, num_splits,
                                                          "extend_attention")
  kernel = functools.partial(_extend_kernel, block_k=block_k, num_splits=num_splits, group=G,
                             n_tokens=F, scale=H ** -0.5,
                             precision=launch.dot_precision(q_BKFGH.dtype))
  o = triton_splitk.splitk_call(
      kernel, [pl.BlockSpec((triton_splitk.SQUEEZED,), lambda b, k, j: (b,))],
      [start_B.astype(jnp.int32)], q_BKFGH.reshape(B, K, F * G, H), k_BKSH, v_BKSH,
      num_splits=num_splits, tile_rows=block_k, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret, name="extend_attention")
  return o.reshape(B, K, F, G, H)


def extend_attention(q_BKFGH, k_BKSH, v_BKSH, start_B, *, interpret: bool = False,
                     config: TritonConfig | None = None):
  """Shapes as `pallas_kernels.extend_attention`."""
  require_platform("gpu", interpret, "the Pallas Triton extend kernel")
  B, K, F, G, H = q_BKFGH.shape
  triton_splitk.triton_supported(H)
  config = config or TritonConfig()
  config.validate()
  t = tuned.lookup("extend_attention", "pallas_triton")
  warps = config.num_warps or (t["num_warps_many_rows"] if launch.dot_rows(F * G) >= t["many_rows"]
                               else t["num_warps"])
  return _extend(q_BKFGH, k_BKSH, v_BKSH, start_B, block_k=config.block_k or t["block_k"],
                 num_splits=config.num_splits, num_warps=warps,
                 num_stages=config.num_stages or t["num_stages"], interpret=bool(interpret))
