"""Block-sparse decode attention as a Pallas Triton kernel (`sparse_decode_attention`'s
`pallas_triton`, the GPU default).

Split-K over the M block slots: grid (B, K, num_splits); program (b, k, j) takes the j-th share of
the live slots of (b, k), loads each selected block with a dynamic `pl.ds(index * block_size,
block_size)` (so only selected blocks are read), runs the shared online softmax and writes a
partial that `combine_splits` merges. Tuned (`tuned.lookup("sparse_decode_attention",
"pallas_triton")`): gathered blocks behind an index load want more programs than the dense
kernel -- 4 per SM at small batch, 2 per SM from B * K >= 64 -- and 3 pipeline stages.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import launch, online_softmax, triton_splitk, tuned
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.sparse_decode.reference import live_slots


@dataclasses.dataclass(frozen=True)
class TritonConfig(triton_splitk.SplitKConfig):
  """Launch parameters of the block-sparse Triton decode kernel (block size comes from the
  selection); None takes the tuned value.

  prefetch_index: load the next slot's block id one loop iteration ahead (a software-pipelined
  index) instead of at the top of the iteration that uses it; on the H100 3-8% faster at S128K.
  blocks_per_tile: selected blocks gathered into one [blocks_per_tile * block_size, H] tile per
  loop iteration (one row-gather load of K and of V, one dot): more bytes in flight per
  iteration and larger dots. 1 loads a block with a contiguous `pl.ds` slice. None: tiles of the
  tuned `tile_rows` (64) rows. H200, B8 S128K 4K budget, kernel time: blocks of 16 take 52.2 us
  one per iteration and 40.1 us four per tile (as fast as blocks of 64); at blocks of 64, two per
  tile tie with one and four are 25-45% slower.
  """
  prefetch_index: bool | None = None
  blocks_per_tile: int | None = None

  def validate(self) -> None:
    super().validate()
    if self.prefetch_index is not None and not isinstance(self.prefetch_index, bool):
      raise ValueError(f"config.prefetch_index must be a bool, got {self.prefetch_index!r}")
    if self.blocks_per_tile is not None and (
        not isinstance(self.blocks_per_tile, int) or self.blocks_per_tile < 1
        or self.blocks_per_tile & (self.blocks_per_tile - 1)):
      raise ValueError(f"config.blocks_per_tile must be None or a power of 2 >= 1, got "
                       f"{self.blocks_per_tile!r}")


CONFIG = TritonConfig


def _sparse_kernel(len_ref, nslots_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                   block_size: int, num_splits: int, scale: float, precision: lax.Precision,
                   n_rows: int, prefetch_index: bool = False, blocks_per_tile: int = 1):
  """Program (b, k, j). len_ref / nslots_ref int32 []; idx_ref int32 [M]; q_ref [R, H];
  k_ref / v_ref [S, H] (the whole cache of this (b, k): blocks are fetched by index);
  o_ref f32 [R, H]; m_ref / l_ref f32 [R]."""
  split = pl.program_id(2)
  length = len_ref[()]
  # Slots [0, n_slots) hold every selected block that starts before `length` (computed in XLA);
  # dividing them at run time keeps the splits balanced when rows hold fewer than M blocks.
  n_slots = nslots_ref[()]
  per_split = pl.cdiv(n_slots, num_splits)
  start = split * per_split
  end = jnp.minimum(start + per_split, n_slots)
  offsets_T = lax.broadcasted_iota(jnp.int32, (block_size,), 0)

  def load_block_id(block):
    # A -1 inside the live range (malformed padding) loads block 0 and masks all of it, so it
    # contributes nothing instead of reading before the buffer.
    t0 = pl.multiple_of(jnp.maximum(block, 0) * block_size, block_size)
    return (k_ref[pl.ds(t0, block_size), :], v_ref[pl.ds(t0, block_size), :],
            (block >= 0) & (t0 + offsets_T < length))

  if blocks_per_tile > 1:
    _gathered_tiles(idx_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, length, n_slots, split,
                    block_size=block_size, blocks_per_tile=blocks_per_tile, num_splits=num_splits,
                    scale=scale, precision=precision, n_rows=n_rows, prefetch_index=prefetch_index)
    return
  if not prefetch_index:
    triton_splitk.attend_range(q_ref, o_ref, m_ref, l_ref, start, end,
                         lambda slot: load_block_id(idx_ref[slot]), scale=scale,
                         precision=precision, n_rows=n_rows)
    return
  # Index prefetch: the id of the next slot is loaded one iteration ahead and carried, so the
  # K/V loads of a step never wait on that step's index load.
  last = idx_ref.shape[0] - 1
  q_RH = triton_splitk.load_query(q_ref, n_rows)

  def body(slot, carry):
    state, block = carry
    nxt = idx_ref[jnp.minimum(slot + 1, last)]
    k_TH, v_TH, valid_T = load_block_id(block)
    state = online_softmax.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                 precision=precision)
    return state, nxt

  init = (online_softmax.init_state(q_RH.shape[0], q_RH.shape[1]), idx_ref[jnp.minimum(start, last)])
  state, _ = lax.fori_loop(start, end, body, init)
  triton_splitk.write_partial(o_ref, m_ref, l_ref, state, n_rows)


def _gathered_tiles(idx_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, length, n_slots, split, *,
                    block_size: int, blocks_per_tile: int, num_splits: int, scale: float,
                    precision: lax.Precision, n_rows: int, prefetch_index: bool):
  """The split loop with `blocks_per_tile` selected blocks per iteration: tile t covers slots
  [t * P, (t + 1) * P); its T = P * block_size rows are gathered by one row-index load of K and
  one of V (row r comes from slot t * P + r // block_size, token r % block_size of that block).
  Slots past the live count, -1 ids and tokens past the length are masked (their rows read
  block 0, in bounds)."""
  P = blocks_per_tile
  T = P * block_size
  last = idx_ref.shape[0] - 1
  n_tiles = pl.cdiv(n_slots, P)
  per_split = pl.cdiv(n_tiles, num_splits)
  start = split * per_split
  end = jnp.minimum(start + per_split, n_tiles)
  r_T = lax.broadcasted_iota(jnp.int32, (T,), 0)
  slot_in_tile_T = r_T // block_size
  token_T = r_T % block_size

  def tile_rows(tile):
    slot_T = tile * P + slot_in_tile_T
    block_T = idx_ref[jnp.minimum(slot_T, last)]
    row_T = jnp.maximum(block_T, 0) * block_size + token_T
    return row_T, (slot_T < n_slots) & (block_T >= 0) & (row_T < length)

  def load_tile(rows):
    row_T, valid_T = rows
    return k_ref[row_T, :], v_ref[row_T, :], valid_T

  q_RH = triton_splitk.load_query(q_ref, n_rows)
  init_state = online_softmax.init_state(q_RH.shape[0], q_RH.shape[1])
  if not prefetch_index:
    def body(tile, state):
      k_TH, v_TH, valid_T = load_tile(tile_rows(tile))
      return online_softmax.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                  precision=precision)
    state = lax.fori_loop(start, end, body, init_state)
  else:
    # the next tile's row indices are loaded one iteration ahead and carried
    def body(tile, carry):
      state, rows = carry
      nxt = tile_rows(tile + 1)
      k_TH, v_TH, valid_T = load_tile(rows)
      state = online_softmax.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                   precision=precision)
      return state, nxt
    state, _ = lax.fori_loop(start, end, body, (init_state, tile_rows(start)))
  triton_splitk.write_partial(o_ref, m_ref, l_ref, state, n_rows)


@functools.partial(jax.jit, static_argnames=("block_size", "num_splits", "num_warps",
                                             "num_stages", "prefetch_index", "tile_blocks",
                                             "interpret"))
def _sparse_decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, num_live_BK, *,
                   block_size: int, num_splits: int | None, num_warps: int, num_stages: int,
                   prefetch_index: bool, tile_blocks: int, interpret: bool):
  B, K, G, H = q_BKGH.shape
  M = block_indices_BKM.shape[-1]
  lengths_B = lengths_B.astype(jnp.int32)
  block_indices_BKM = block_indices_BKM.astype(jnp.int32)
  # Whole blocks in the buffer so the last (partial) block's load stays in bounds; a no-op for
  # capacities that are block multiples.
  k_BKSH = launch.pad_axis(k_BKSH, 2, block_size)
  v_BKSH = launch.pad_axis(v_BKSH, 2, block_size)
  t = tuned.lookup("sparse_decode_attention", "pallas_triton")
  per_sm = t["programs_per_sm"] if B * K < t["large_rows"] else t["programs_per_sm_large"]
  num_splits = num_splits or launch.default_num_splits(B * K, -(-M // tile_blocks),
                                                       launch.target_programs(per_sm))
  nslots_BK = (live_slots(block_indices_BKM, lengths_B, block_size) if num_live_BK is None
               else num_live_BK.astype(jnp.int32))
  kernel = functools.partial(_sparse_kernel, block_size=block_size, num_splits=num_splits,
                             scale=H ** -0.5, precision=launch.dot_precision(q_BKGH.dtype),
                             prefetch_index=prefetch_index, blocks_per_tile=tile_blocks)
  sq = triton_splitk.SQUEEZED
  return triton_splitk.splitk_call(
      kernel,
      [pl.BlockSpec((sq,), lambda b, k, j: (b,)),
       pl.BlockSpec((sq, sq), lambda b, k, j: (b, k)),
       pl.BlockSpec((sq, sq, M), lambda b, k, j: (b, k, 0))],
      [lengths_B, nslots_BK, block_indices_BKM], q_BKGH, k_BKSH, v_BKSH,
      num_splits=num_splits, tile_rows=block_size * tile_blocks, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, name="sparse_decode_attention")


def sparse_decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, *,
                            block_size: int, num_live_BK=None, interpret: bool = False,
                            config: TritonConfig | None = None):
  """Shapes as `pallas_kernels.sparse_decode_attention`."""
  require_platform("gpu", interpret, "the Pallas Triton sparse decode kernel")
  triton_splitk.triton_supported(q_BKGH.shape[-1])
  if not launch.is_power_of_2(block_size) or block_size < 16:
    raise NotSupported(f"block_size={block_size} must be a power of 2 >= 16 for Triton tiles")
  config = config or TritonConfig()
  config.validate()
  t = tuned.lookup("sparse_decode_attention", "pallas_triton")
  tile_blocks = config.blocks_per_tile or max(1, t["tile_rows"] // block_size)
  prefetch = t["prefetch_index"] if config.prefetch_index is None else config.prefetch_index
  return _sparse_decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, num_live_BK,
                        block_size=int(block_size), num_splits=config.num_splits,
                        num_warps=config.num_warps or t["num_warps"],
                        num_stages=config.num_stages or t["num_stages"],
                        prefetch_index=bool(prefetch), tile_blocks=tile_blocks,
                        interpret=bool(interpret))
