"""Block-sparse decode attention as a Pallas Mosaic TPU kernel (`sparse_decode_attention`'s
`pallas_mosaic_tpu`), also serving dense decode (`decode_attention.pallas_mosaic_tpu`).

Both ops are "attend to a list of KV blocks": the sparse op's list is its block indices, the dense
op's is 0 .. cdiv(length, block) - 1. The block list, its live length and the sequence lengths go in
through scalar prefetch (SMEM), so the K/V BlockSpec index_map fetches exactly the listed blocks:
grid (B, K, M) walks the list, the pipeline DMAs block idx[b, k, j] while the previous one is being
used, and a slot past the live length re-requests the last live block, which the pipeline does not
fetch again (same block index) -- as splash attention's `data_next` does. The online softmax lives
in VMEM scratch across the "arbitrary" last grid axis; the output is written at the last slot.

Tested here in TPU interpret mode (`interpret=pltpu.InterpretParams()`); not yet run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import launch, online_softmax
from pallas_kernels.dispatch import require_platform
from pallas_kernels.sparse_decode.reference import live_slots

_LANES = 128  # m / l scratch kept lane-dense (broadcast over 128 lanes), the layout Mosaic wants


def _kernel(len_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
            block_size: int, scale: float, precision):
  """Program (b, k, j). Scalar refs: lengths int32 [B], n_live int32 [B, K], idx int32 [B, K, M].
  q_ref [R, H]; k_ref / v_ref [block, H] (block idx[b, k, j]); o_ref [R, H]."""
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    online_softmax.scratch_init(m_sc, l_sc, acc_sc)

  @pl.when(j < nlive_ref[b, h])
  def _attend():
    block = idx_ref[b, h, j]
    offsets_T = lax.broadcasted_iota(jnp.int32, (block_size,), 0)
    valid_T = (block >= 0) & (block * block_size + offsets_T < len_ref[b])
    online_softmax.scratch_attend(q_ref[...], k_ref[...], v_ref[...], valid_T, m_sc, l_sc, acc_sc,
                                  scale=scale, precision=precision)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    online_softmax.scratch_finish(o_ref, l_sc, acc_sc)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def block_list_decode(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, lengths_B: jax.Array,
                      block_indices_BKM: jax.Array, n_live_BK: jax.Array, *, block_size: int,
                      interpret: bool) -> jax.Array:
  """Attention of q over the listed blocks (slots [0, n_live) of block_indices, -1 allowed and
  masked) and tokens < length. Shapes as `sparse_decode_attention`; returns [B, K, G, H]."""
  B, K, G, H = q_BKGH.shape
  M = block_indices_BKM.shape[-1]
  k_BKSH = launch.pad_axis(k_BKSH, 2, block_size)
  v_BKSH = launch.pad_axis(v_BKSH, 2, block_size)
  R = launch.round_up(G, 8)  # sublane multiple
  q_BKRH = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, R - G), (0, 0)))

  def kv_map(b, h, j, len_ref, nlive_ref, idx_ref):
    # past the live slots, keep pointing at the last live block: no new DMA is issued
    slot = jnp.maximum(jnp.minimum(j, nlive_ref[b, h] - 1), 0)
    return b, h, jnp.maximum(idx_ref[b, h, slot], 0), 0

  fixed = lambda b, h, j, *_: (b, h, 0, 0)
  out = pl.pallas_call(
      functools.partial(_kernel, block_size=block_size, scale=H ** -0.5,
                        precision=launch.dot_precision(q_BKGH.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(B, K, M),
          in_specs=[pl.BlockSpec((None, None, R, H), fixed),
                    pl.BlockSpec((None, None, block_size, H), kv_map),
                    pl.BlockSpec((None, None, block_size, H), kv_map)],
          out_specs=pl.BlockSpec((None, None, R, H), fixed),
          scratch_shapes=[pltpu.VMEM((R, _LANES), jnp.float32),
                          pltpu.VMEM((R, _LANES), jnp.float32),
                          pltpu.VMEM((R, H), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((B, K, R, H), q_BKGH.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      # our boolean `interpret` -> the TPU interpreter on CPU
      interpret=pltpu.InterpretParams() if interpret else False,
      name="block_list_decode_tpu",
  )(lengths_B.astype(jnp.int32), n_live_BK.astype(jnp.int32), block_indices_BKM.astype(jnp.int32),
    q_BKRH, k_BKSH, v_BKSH)
  return out[:, :, :G]


def sparse_decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, *,
                            block_size: int, num_live_BK=None, interpret: bool = False):
  """Shapes as `pallas_kernels.sparse_decode_attention`."""
  require_platform("tpu", interpret, "the Mosaic TPU sparse decode kernel")
  lengths_B = lengths_B.astype(jnp.int32)
  idx = block_indices_BKM.astype(jnp.int32)
  n_live = live_slots(idx, lengths_B, block_size) if num_live_BK is None else num_live_BK
  return block_list_decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, idx, n_live.astype(jnp.int32),
                           block_size=int(block_size), interpret=bool(interpret))
