"""Block-sparse decode attention: each (sequence, KV head) attends only to selected KV blocks.

  o_BKGH = sparse_decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM,
                                   block_size=64, implementation="auto")

The selection is given as indices, not a mask (DESIGN.md, like splash attention's `data_next` or
SeerAttention-R's block indices): block_indices_BKM int32 [B, K, M] lists the selected blocks of
`block_size` tokens, ascending, padded with -1 at the end. Tokens at positions >= lengths_B[b]
are masked even inside a selected block. Implementations:

- `xla`: `sparse_decode_attention_reference`, dense masked attention over the selected tokens.
- `pallas_triton`: split-K over the M block slots. Grid (B, K, num_splits); program (b, k, j)
  takes the j-th share of the live slots of (b, k), loads each block with a dynamic
  `pl.ds(index * block_size, block_size)` (so only selected blocks are read), runs the shared
  online softmax and writes a partial merged by `_splitk.splitk_call`'s combine.
- `pallas_mosaic_gpu`: the same split-K partials from a Pallas Mosaic GPU kernel (Hopper): each
  selected block is one TMA copy into swizzled shared memory, a few blocks in flight, and QK^T /
  PV are warpgroup MMAs (`_mgpu_sparse.py`).
- `pallas_tpu`: the Mosaic TPU kernel over a block list (`_tpu_decode.py`).
- `auto`: pallas_triton on GPU, pallas_tpu on TPU, xla elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _splitk
from pallas_kernels.decode_attention import length_mask, masked_decode_reference


TILE_ROWS = 64  # the default gathered tile: 64 token rows per loop iteration

# This op's implementations: the shared ones plus the Mosaic GPU kernel (`_mgpu_sparse.py`).
IMPLEMENTATIONS = _splitk.IMPLEMENTATIONS + ("pallas_mosaic_gpu",)


@dataclasses.dataclass(frozen=True)
class SparseDecodeConfig(_splitk.SplitKConfig):
  """Launch parameters of the block-sparse Triton decode kernel (block size comes from the
  selection, so only splits / warps / stages are tunable; see `_splitk.SplitKConfig`).

  prefetch_index: load the next slot's block id one loop iteration ahead (a software-pipelined
  index) instead of at the top of the iteration that uses it; on the H100 3-8% faster at S128K
  (tune_decode_2.json), so the default.
  blocks_per_tile: selected blocks gathered into one [blocks_per_tile * block_size, H] tile per
  loop iteration (one row-gather load of K and of V, one dot): more bytes in flight per
  iteration and larger dots. 1 loads a block with a contiguous `pl.ds` slice. None (default):
  tiles of TILE_ROWS = 64 rows. H200, B8 S128K 4K budget, kernel time (tune_tiles*.json):
  blocks of 16 take 52.2 us one per iteration and 40.1 us four per tile (as fast as blocks of
  64); at blocks of 64, two per tile tie with one and four are 25-45% slower.
  """
  prefetch_index: bool = True
  blocks_per_tile: int | None = None

  def validate(self) -> None:
    super().validate()
    if not isinstance(self.prefetch_index, bool):
      raise ValueError(f"config.prefetch_index must be a bool, got {self.prefetch_index!r}")
    if self.blocks_per_tile is not None and (
        not isinstance(self.blocks_per_tile, int) or self.blocks_per_tile < 1
        or self.blocks_per_tile & (self.blocks_per_tile - 1)):
      raise ValueError(f"config.blocks_per_tile must be None or a power of 2 >= 1, got "
                       f"{self.blocks_per_tile!r}")

  def tile_blocks(self, block_size: int) -> int:
    """blocks_per_tile, or its default: 64-row tiles (4 blocks of 16, 2 of 32, 1 from 64)."""
    return self.blocks_per_tile or max(1, TILE_ROWS // block_size)


# ------------------------------------------------------------------------------------ reference


def block_token_mask(block_indices_BKM: jax.Array, lengths_B: jax.Array, block_size: int,
                     seq: int) -> jax.Array:
  """bool [B, K, S]: token s is valid iff its block is selected and s < lengths_B[b]."""
  B, K, _ = block_indices_BKM.shape
  n_blocks = -(-seq // block_size)
  # -1 padding is sent past the end and dropped (a negative index would wrap to the last block).
  idx_BKM = jnp.where(block_indices_BKM >= 0, block_indices_BKM, n_blocks)
  b_BKM = jnp.arange(B)[:, None, None]
  k_BKM = jnp.arange(K)[None, :, None]
  sel_BKN = jnp.zeros((B, K, n_blocks), bool).at[b_BKM, k_BKM, idx_BKM].set(True, mode="drop")
  sel_BKS = jnp.repeat(sel_BKN, block_size, axis=2)[:, :, :seq]
  return sel_BKS & length_mask(lengths_B, K, seq)


@functools.partial(jax.jit, static_argnames=("block_size",))
def sparse_decode_attention_reference(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                                      lengths_B: jax.Array, block_indices_BKM: jax.Array, *,
                                      block_size: int) -> jax.Array:
  """Plain-jnp block-sparse decode attention (the `xla` implementation): dense attention with
  every token outside the selected blocks (or past the length) masked. Shapes as
  `sparse_decode_attention`."""
  valid_BKS = block_token_mask(block_indices_BKM, lengths_B, block_size, k_BKSH.shape[2])
  return masked_decode_reference(q_BKGH, k_BKSH, v_BKSH, valid_BKS)


# ------------------------------------------------------------------------- Pallas Triton kernel


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
    _splitk.attend_range(q_ref, o_ref, m_ref, l_ref, start, end,
                         lambda slot: load_block_id(idx_ref[slot]), scale=scale,
                         precision=precision, n_rows=n_rows)
    return
  # Index prefetch: the id of the next slot is loaded one iteration ahead and carried, so the
  # K/V loads of a step never wait on that step's index load.
  last = idx_ref.shape[0] - 1
  q_RH = _splitk.load_query(q_ref, n_rows)

  def body(slot, carry):
    state, block = carry
    nxt = idx_ref[jnp.minimum(slot + 1, last)]
    k_TH, v_TH, valid_T = load_block_id(block)
    state = _splitk.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                 precision=precision)
    return state, nxt

  init = (_splitk.init_state(q_RH.shape[0], q_RH.shape[1]), idx_ref[jnp.minimum(start, last)])
  state, _ = lax.fori_loop(start, end, body, init)
  _splitk.write_partial(o_ref, m_ref, l_ref, state, n_rows)


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

  q_RH = _splitk.load_query(q_ref, n_rows)
  init_state = _splitk.init_state(q_RH.shape[0], q_RH.shape[1])
  if not prefetch_index:
    def body(tile, state):
      k_TH, v_TH, valid_T = load_tile(tile_rows(tile))
      return _splitk.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                  precision=precision)
    state = lax.fori_loop(start, end, body, init_state)
  else:
    # the next tile's row indices are loaded one iteration ahead and carried
    def body(tile, carry):
      state, rows = carry
      nxt = tile_rows(tile + 1)
      k_TH, v_TH, valid_T = load_tile(rows)
      state = _splitk.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                   precision=precision)
      return state, nxt
    state, _ = lax.fori_loop(start, end, body, (init_state, tile_rows(start)))
  _splitk.write_partial(o_ref, m_ref, l_ref, state, n_rows)


def live_slots(block_indices_BKM: jax.Array, lengths_B: jax.Array, block_size: int) -> jax.Array:
  """int32 [B, K]: 1 + the last slot whose block is >= 0 and starts before the length (0 if
  none). With ascending indices every slot before it is live, and blocks past the length
  (trailing, being ascending) are never loaded."""
  M = block_indices_BKM.shape[-1]
  live_BKM = (block_indices_BKM >= 0) & (block_indices_BKM * block_size < lengths_B[:, None, None])
  return jnp.max(jnp.where(live_BKM, jnp.arange(1, M + 1, dtype=jnp.int32), 0), axis=-1)


@functools.partial(jax.jit, static_argnames=("block_size", "config", "interpret"))
def _sparse_decode_triton(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                          lengths_B: jax.Array, block_indices_BKM: jax.Array,
                          num_live_BK: jax.Array | None, block_size: int,
                          config: SparseDecodeConfig, interpret: bool) -> jax.Array:
  B, K, G, H = q_BKGH.shape
  M = block_indices_BKM.shape[-1]
  lengths_B = lengths_B.astype(jnp.int32)
  block_indices_BKM = block_indices_BKM.astype(jnp.int32)
  # Whole blocks in the buffer so the last (partial) block's load stays in bounds; a no-op for
  # capacities that are block multiples.
  k_BKSH = _splitk.pad_axis(k_BKSH, 2, block_size)
  v_BKSH = _splitk.pad_axis(v_BKSH, 2, block_size)
  per_sm = (_splitk.SPARSE_PROGRAMS_PER_SM if B * K < 64 else _splitk.SPARSE_PROGRAMS_PER_SM_LARGE)
  tile_blocks = config.tile_blocks(block_size)
  num_splits = config.num_splits or _splitk.default_num_splits(
      B * K, -(-M // tile_blocks), _splitk.target_programs(per_sm))
  nslots_BK = (live_slots(block_indices_BKM, lengths_B, block_size) if num_live_BK is None
               else num_live_BK.astype(jnp.int32))
  kernel = functools.partial(_sparse_kernel, block_size=block_size, num_splits=num_splits,
                             scale=H ** -0.5, precision=_splitk.dot_precision(q_BKGH.dtype),
                             prefetch_index=config.prefetch_index,
                             blocks_per_tile=tile_blocks)
  sq = _splitk.SQUEEZED
  return _splitk.splitk_call(
      kernel,
      [pl.BlockSpec((sq,), lambda b, k, j: (b,)),
       pl.BlockSpec((sq, sq), lambda b, k, j: (b, k)),
       pl.BlockSpec((sq, sq, M), lambda b, k, j: (b, k, 0))],
      [lengths_B, nslots_BK, block_indices_BKM], q_BKGH, k_BKSH, v_BKSH,
      num_splits=num_splits, tile_rows=block_size * tile_blocks, config=config,
      interpret=interpret, name="sparse_decode_attention", default_stages=3)


# ------------------------------------------------------------------------------------ dispatch


def _check_block_args(q_BKGH: jax.Array, k_BKSH: jax.Array, block_indices_BKM: jax.Array,
                      block_size: int) -> None:
  B, K = q_BKGH.shape[:2]
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  shape = getattr(block_indices_BKM, "shape", None)
  if shape is None or len(shape) != 3 or tuple(shape[:2]) != (B, K) or shape[2] < 1:
    raise ValueError(f"block_indices_BKM must have shape [B={B}, K={K}, M>=1], got {shape}")
  if not jnp.issubdtype(block_indices_BKM.dtype, jnp.integer):
    raise ValueError(f"block_indices_BKM must be an integer array, got {block_indices_BKM.dtype}")
  if not isinstance(block_indices_BKM, jax.core.Tracer):
    # Value checks only for concrete inputs (under jit the indices are traced).
    idx = np.asarray(block_indices_BKM)
    n_blocks = -(-k_BKSH.shape[2] // block_size)
    if idx.min() < -1 or idx.max() >= n_blocks:
      raise ValueError(f"block_indices_BKM entries must be -1 or in [0, {n_blocks}) "
                       f"(S={k_BKSH.shape[2]}, block_size={block_size}); got range "
                       f"[{idx.min()}, {idx.max()}]")
    live = idx >= 0
    if np.any(~live[..., :-1] & live[..., 1:]):
      raise ValueError("block_indices_BKM must hold its -1 padding after all live indices")
    both = live[..., :-1] & live[..., 1:]
    if np.any(both & (idx[..., 1:] <= idx[..., :-1])):
      raise ValueError("block_indices_BKM live indices must be distinct and ascending")


def sparse_decode_attention(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                            lengths_B: jax.Array, block_indices_BKM: jax.Array, *,
                            block_size: int, implementation: str = "auto",
                            interpret: bool = False,
                            config: SparseDecodeConfig | None = None,
                            num_live_BK: jax.Array | None = None) -> jax.Array:
  """Decode attention over the selected KV blocks only.

  Args:
    q_BKGH: [B, K, G, H] float32 / bfloat16 / float16, G query heads per KV head.
    k_BKSH, v_BKSH: [B, K, S, H], same dtype as q; S is the cache capacity.
    lengths_B: int [B], valid cached tokens per sequence, in [0, S].
    block_indices_BKM: int32 [B, K, M], selected block ids (block j = tokens
      [j * block_size, (j + 1) * block_size)), distinct and ascending, padded with -1 at the end.
      Concrete inputs are checked; traced ones are trusted.
    block_size: tokens per block (a power of 2 >= 16 for the Triton kernel, e.g. 16, 64, 128).
    implementation: "auto" | "xla" | "pallas_triton" | "pallas_mosaic_gpu" | "pallas_tpu"
      (`pallas_mosaic_gpu`: the Hopper TMA + wgmma kernel of `_mgpu_sparse.py`; bf16 / f16, H a
      multiple of 64 up to 256, block sizes 64 / 128; config.num_splits / num_stages apply, the
      stages being its TMA pipeline depth).
    interpret: run the Pallas kernel in interpret mode (CPU testing).
    config: SparseDecodeConfig for the Triton kernel; None uses the defaults.
    num_live_BK: optional int32 [B, K], the number of leading live slots of each row (what
      `live_slots` computes: selected blocks that start below the length), when the selector
      already knows it (`block_topk` returns it); trusted, saves a pass over the indices.

  Returns:
    o_BKGH [B, K, G, H] in q's dtype: softmax (scale H ** -0.5, float32) over the tokens of the
    selected blocks below the length; zeros where no such token exists.
  """
  _splitk.check_implementation(implementation, IMPLEMENTATIONS)
  _splitk.check_decode_args(q_BKGH, k_BKSH, v_BKSH, lengths_B)
  _check_block_args(q_BKGH, k_BKSH, block_indices_BKM, block_size)
  block_size = int(block_size)
  config = SparseDecodeConfig() if config is None else config
  if not isinstance(config, SparseDecodeConfig):
    raise ValueError(f"config must be a SparseDecodeConfig, got {type(config).__name__}")
  config.validate()
  H = q_BKGH.shape[-1]
  tile_ok = _splitk.is_power_of_2(block_size) and block_size >= 16
  if implementation == "auto":
    implementation = _splitk.auto_implementation(H, q_BKGH.dtype, tpu_available=True)
    if implementation == "pallas_triton" and not tile_ok:
      implementation = "xla"
  if implementation == "xla":
    return sparse_decode_attention_reference(q_BKGH, k_BKSH, v_BKSH, lengths_B.astype(jnp.int32),
                                             block_indices_BKM.astype(jnp.int32),
                                             block_size=block_size)
  if implementation == "pallas_tpu":
    from pallas_kernels import _tpu_decode
    lengths_B = lengths_B.astype(jnp.int32)
    return _tpu_decode.block_list_decode(
        q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM,
        live_slots(block_indices_BKM.astype(jnp.int32), lengths_B, block_size),
        block_size=block_size, interpret=_tpu_decode.tpu_interpret(interpret))
  if num_live_BK is not None and getattr(num_live_BK, "shape", None) != tuple(q_BKGH.shape[:2]):
    raise ValueError(f"num_live_BK must have shape [B, K]={tuple(q_BKGH.shape[:2])}, got "
                     f"{getattr(num_live_BK, 'shape', None)}")
  if implementation == "pallas_mosaic_gpu":
    from pallas_kernels import _mgpu_sparse
    why = _mgpu_sparse.mgpu_supported(q_BKGH.shape[2], H, block_size, q_BKGH.dtype)
    if why is not None:
      raise ValueError(f"implementation='pallas_mosaic_gpu': {why}")
    return _mgpu_sparse.sparse_decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM,
                                      num_live_BK, block_size=block_size,
                                      num_splits=config.num_splits, stages=config.num_stages,
                                      interpret=bool(interpret))
  why = _splitk.triton_supported(H, q_BKGH.dtype)
  if why is None and not tile_ok:
    why = f"block_size={block_size} must be a power of 2 >= 16 for Triton tiles"
  if why is not None:
    raise ValueError(f"implementation='pallas_triton': {why}")
  return _sparse_decode_triton(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, num_live_BK,
                               block_size, config, bool(interpret))
