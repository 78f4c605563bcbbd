"""Pallas Triton pieces shared by the split-K decode kernels (dense, multi-token, block-sparse).

Each kernel runs one program per (batch, kv head, split); a program folds its share of key blocks
into an online-softmax state (`pallas_kernels.online_softmax`) and writes it out as a partial,
which `pallas_kernels.combine_splits` merges (one Triton launch from `min_splits` splits, tuned;
XLA below). This module imports the Pallas Triton lowering: only the `pallas_triton` backend
modules import it, and only when dispatch tries them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import combine_splits as combine_lib
from pallas_kernels import launch, online_softmax, tuned
from pallas_kernels.dispatch import NotSupported

SQUEEZED = pl.squeezed  # a block dimension squeezed out of the kernel's ref


@dataclasses.dataclass(frozen=True)
class SplitKConfig:
  """Launch parameters shared by the split-K Triton kernels; None takes the tuned value.

  num_splits: programs per (batch, kv head) (None: `launch.default_num_splits` towards the tuned
  programs per SM). num_warps / num_stages: Triton launch parameters (ignored in interpret mode).
  """
  num_splits: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def validate(self) -> None:
    if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
      raise ValueError(f"config.num_splits must be a positive int or None, got {self.num_splits!r}")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"config.num_warps must be a power of 2 in [1, 16], got {self.num_warps!r}")
    if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
      raise ValueError(f"config.num_stages must be a positive int or None, got {self.num_stages!r}")


def triton_supported(head_dim: int) -> None:
  """NotSupported unless the head dim fits Triton tiles."""
  if not launch.is_power_of_2(head_dim) or head_dim < 16:
    raise NotSupported(f"head dim H={head_dim} must be a power of 2 >= 16 for Triton tiles")


def compiler_params(num_warps: int, num_stages: int, tile_rows: int, head_dim: int, dtype):
  """Triton launch parameters, num_stages lowered until a K tile and a V tile of
  [tile_rows, head_dim] per stage fit the shared-memory budget (Pallas Triton stages each loaded
  tile whole, once per stage; Hopper has 227 KB per block, some of which Triton needs for layout
  conversions; f32 128 x 128 tiles fit one stage)."""
  budget = tuned.lookup("device", "gpu")["shared_memory_budget"]
  stage_bytes = 2 * tile_rows * head_dim * jnp.dtype(dtype).itemsize
  stages = max(1, min(num_stages, budget // stage_bytes))
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=stages)


def splitk_call(kernel, prefix_specs: list, prefix_args: list, q_BKGH: jax.Array,
                k_BKSH: jax.Array, v_BKSH: jax.Array, *, num_splits: int, tile_rows: int,
                num_warps: int, num_stages: int, interpret: bool, name: str) -> jax.Array:
  """The pallas_call the split-K kernels share: grid (b, k, split); per-(b, k) scalar or index
  inputs first (`prefix_specs` / `prefix_args`), then the query rows (read as `dot_rows` rows)
  and the whole [S, H] K and V of the (b, k) (the kernel loads `tile_rows`-token slices of them).
  The kernel gets `n_rows=G` (the real rows: `write_partial` stores only those; the padding rows
  of a partial stay unwritten and the merge never reads them). Returns o [B, K, G, H] in q's
  dtype."""
  B, K, G, H = q_BKGH.shape
  S = k_BKSH.shape[2]
  R = launch.dot_rows(G)
  # The query block is R rows of the unpadded [B, K, G, H] array, where padding in XLA was a
  # separate kernel (0.2 us a call at B8). Pallas Triton does not mask a block that overhangs the
  # array (its lowering applies only the mask a load is given), so the kernels read it with
  # `load_query`, which masks the rows past G to zero.
  sq = SQUEEZED
  o_BKNRH, m_BKNR, l_BKNR = pl.pallas_call(
      functools.partial(kernel, n_rows=G),
      grid=(B, K, num_splits),
      in_specs=list(prefix_specs) + [
          pl.BlockSpec((sq, sq, R, H), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((sq, sq, S, H), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((sq, sq, S, H), lambda b, k, j: (b, k, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((sq, sq, sq, R, H), lambda b, k, j: (b, k, j, 0, 0)),
          pl.BlockSpec((sq, sq, sq, R), lambda b, k, j: (b, k, j, 0)),
          pl.BlockSpec((sq, sq, sq, R), lambda b, k, j: (b, k, j, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, K, num_splits, R, H), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), jnp.float32),
      ],
      compiler_params=compiler_params(num_warps, num_stages, tile_rows, H, q_BKGH.dtype),
      interpret=interpret,
      name=name,
  )(*prefix_args, q_BKGH, k_BKSH, v_BKSH)
  return merge_partials(o_BKNRH, m_BKNR, l_BKNR, G, q_BKGH.dtype, interpret=interpret)


def merge_partials(o_BKNRH, m_BKNR, l_BKNR, g: int, out_dtype, *, interpret: bool) -> jax.Array:
  """The merge of a split-K kernel's partials: one Triton launch from the tuned `min_splits`
  splits (XLA compiles a long split axis into three small kernels), else XLA, which fuses a few
  splits into one loop (~1 us)."""
  n = o_BKNRH.shape[2]
  many = n >= tuned.lookup("combine_splits", "pallas_triton")["min_splits"]
  impl = ("pallas_triton", "xla") if many else "xla"
  return combine_lib.combine_splits(o_BKNRH, m_BKNR, l_BKNR, g, out_dtype, implementation=impl,
                                    interpret=interpret)


def load_query(q_ref, n_rows: int) -> jax.Array:
  """The [R, H] query block with its rows past n_rows (the padding up to `dot_rows`, which lie
  past the (b, k)'s G rows of the unpadded array) masked to zero: no read past the query buffer,
  and in interpret mode no NaN fill either."""
  R = q_ref.shape[0]
  if n_rows >= R:
    return q_ref[...]
  live = lax.broadcasted_iota(jnp.int32, (R, 1), 0) < n_rows
  return plgpu.load(q_ref, mask=jnp.broadcast_to(live, q_ref.shape), other=0)


def attend_range(q_ref, o_ref, m_ref, l_ref, start, end, load_block, *, scale: float,
                 precision, n_rows: int) -> None:
  """A split's loop: online softmax over blocks i in [start, end), where load_block(i) ->
  (k_TH, v_TH, valid_T); writes the split's partial (its first n_rows rows)."""
  q_RH = load_query(q_ref, n_rows)

  def body(i, state):
    k_TH, v_TH, valid_T = load_block(i)
    return online_softmax.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                       precision=precision)

  state = lax.fori_loop(start, end, body, online_softmax.init_state(q_RH.shape[0], q_RH.shape[1]))
  write_partial(o_ref, m_ref, l_ref, state, n_rows)


def write_partial(o_ref, m_ref, l_ref, state, n_rows: int) -> None:
  """Stores a split's state (acc [R, H], m [R], l [R]), only its first n_rows rows: the dot's
  padding rows (R = dot_rows(G) >= 16 for G = 4) would be 3/4 of the partial bytes written and
  read back by the merge -- at B1 S128K, 4 MB against the 54 MB of K/V a 90%-sparse step reads."""
  acc_RH, m_R, l_R = state
  R = acc_RH.shape[0]
  if n_rows >= R:
    o_ref[...] = acc_RH
    m_ref[...] = m_R
    l_ref[...] = l_R
    return
  live_R = lax.broadcasted_iota(jnp.int32, (R,), 0) < n_rows
  plgpu.store(o_ref, acc_RH, mask=jnp.broadcast_to(live_R[:, None], acc_RH.shape))
  plgpu.store(m_ref, m_R, mask=live_R)
  plgpu.store(l_ref, l_R, mask=live_R)


def dense_layout(k_BKSH, v_BKSH, block_k: int, num_splits: int | None, op: str):
  """The cache padded to whole key blocks (a no-op, no copy, for the usual power-of-2
  capacities: a block load then never runs past the buffer) and the split count of a dense
  split-K kernel (`num_splits`, or towards the op's tuned programs per SM)."""
  k_BKSH = launch.pad_axis(k_BKSH, 2, block_k)
  v_BKSH = launch.pad_axis(v_BKSH, 2, block_k)
  B, K, S, _ = k_BKSH.shape
  per_sm = tuned.lookup(op, "pallas_triton")["programs_per_sm"]
  num_splits = num_splits or launch.default_num_splits(B * K, S // block_k,
                                                       launch.target_programs(per_sm))
  return k_BKSH, v_BKSH, num_splits


def split_range(n_keys, block_k: int, num_splits: int):
  """This program's share [first, end) of the cdiv(n_keys, block_k) key blocks (split = program
  axis 2), decided at run time so ragged lengths balance across the splits."""
  n_blocks = pl.cdiv(n_keys, block_k)
  per_split = pl.cdiv(n_blocks, num_splits)
  first = pl.program_id(2) * per_split
  return first, jnp.minimum(first + per_split, n_blocks)
