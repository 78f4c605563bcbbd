"""Low-bit decode attention as a Pallas Mosaic TPU kernel (`lowbit_decode_attention`'s
`pallas_mosaic_tpu`): the block-list pattern of `sparse_decode.pallas_mosaic_tpu` over a packed
cache.

Grid (B, K, M) walks a list of token blocks (the selected blocks, or 0 .. cdiv(length, T) - 1 for
dense decode) given through scalar prefetch. Each step's BlockSpecs fetch the block's packed K / V
words [T, W], its K scale / zero row (K per channel: one row per group, T dividing the group) or
rows (K per token), its V scale / zero rows, and the residual window's block that the same
position would be in (index clamped to 0 for packed blocks: an unchanged block index is not
fetched again). In VMEM the words are unpacked by one shift and mask per sub-word and
concatenated into the [T, H] codes (sub-word i = the contiguous channels [i*W, (i+1)*W),
layout.py), dequantised, and folded into the online softmax in VMEM scratch.

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
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.lowbit_decode import layout
from pallas_kernels.sparse_decode.reference import live_slots

_LANES = 128


def _expand(x_TN, H):
  T, n = x_TN.shape
  return jnp.concatenate([jnp.broadcast_to(x_TN[:, i:i + 1], (T, H // n)) for i in range(n)],
                         axis=1) if n > 1 else jnp.broadcast_to(x_TN, (T, H))


def _kernel(len_ref, packed_ref, nlive_ref, idx_ref, q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref,
            vz_ref, rk_ref, rv_ref, o_ref, m_sc, l_sc, acc_sc, *, tile: int, bits: int,
            k_channel: bool, scale: float, precision):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  H = q_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    online_softmax.scratch_init(m_sc, l_sc, acc_sc)

  @pl.when(j < nlive_ref[b, h])
  def _attend():
    block = idx_ref[b, h, j]
    t0 = jnp.maximum(block, 0) * tile
    is_packed = t0 < packed_ref[b]
    dtype = rk_ref.dtype

    def codes(w_ref):
      w = w_ref[...]
      parts = [lax.shift_right_logical(w, i * bits) & layout.levels(bits) for i in range(32 // bits)]
      return jnp.concatenate(parts, axis=1).astype(jnp.float32)

    ks = ks_ref[...].astype(jnp.float32)
    kz = kz_ref[...].astype(jnp.float32)
    if not k_channel:
      ks, kz = _expand(ks, H), _expand(kz, H)
    k_hat = (codes(kw_ref) * ks + kz).astype(dtype)
    v_hat = (codes(vw_ref) * _expand(vs_ref[...].astype(jnp.float32), H)
             + _expand(vz_ref[...].astype(jnp.float32), H)).astype(dtype)
    k_TH = jnp.where(is_packed, k_hat, rk_ref[...])
    v_TH = jnp.where(is_packed, v_hat, rv_ref[...])
    offsets_T = lax.broadcasted_iota(jnp.int32, (tile,), 0)
    valid_T = (block >= 0) & (t0 + offsets_T < len_ref[b])
    online_softmax.scratch_attend(q_ref[...], k_TH, v_TH, valid_T, m_sc, l_sc, acc_sc,
                                  scale=scale, precision=precision)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    online_softmax.scratch_finish(o_ref, l_sc, acc_sc)


@functools.partial(jax.jit, static_argnames=("tile", "bits", "group", "k_channel", "interpret"))
def _block_list(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
                lengths_B, packed_B, idx_BKM, nlive_BK, *, tile: int, bits: int, group: int,
                k_channel: bool, interpret: bool):
  B, K, G, H = q_BKGH.shape
  M = idx_BKM.shape[-1]
  W = k_packed.shape[-1]
  Rw = res_k.shape[2]
  nk, nv = k_scale.shape[-1], v_scale.shape[-1]
  R = launch.round_up(G, 8)
  q_BKRH = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, R - G), (0, 0)))

  def slot_block(b, h, j, nlive_ref, idx_ref):
    slot = jnp.maximum(jnp.minimum(j, nlive_ref[b, h] - 1), 0)
    return jnp.maximum(idx_ref[b, h, slot], 0)

  def rows(b, h, j, len_ref, packed_ref, nlive_ref, idx_ref):      # packed words, V params
    return b, h, slot_block(b, h, j, nlive_ref, idx_ref), 0

  def k_rows(b, h, j, len_ref, packed_ref, nlive_ref, idx_ref):    # K params
    blk = slot_block(b, h, j, nlive_ref, idx_ref)
    return (b, h, blk * tile // group, 0) if k_channel else (b, h, blk, 0)

  def res_rows(b, h, j, len_ref, packed_ref, nlive_ref, idx_ref):  # the residual's block
    blk = slot_block(b, h, j, nlive_ref, idx_ref)
    r = jnp.clip(blk * tile - packed_ref[b], 0, Rw - tile)
    return b, h, r // tile, 0

  fixed = lambda b, h, j, *_: (b, h, 0, 0)
  k_block = (None, None, 1, nk) if k_channel else (None, None, tile, nk)
  out = pl.pallas_call(
      functools.partial(_kernel, tile=tile, bits=bits, k_channel=k_channel, scale=H ** -0.5,
                        precision=launch.dot_precision(q_BKGH.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(B, K, M),
          in_specs=[pl.BlockSpec((None, None, R, H), fixed),
                    pl.BlockSpec((None, None, tile, W), rows),
                    pl.BlockSpec(k_block, k_rows), pl.BlockSpec(k_block, k_rows),
                    pl.BlockSpec((None, None, tile, W), rows),
                    pl.BlockSpec((None, None, tile, nv), rows),
                    pl.BlockSpec((None, None, tile, nv), rows),
                    pl.BlockSpec((None, None, tile, H), res_rows),
                    pl.BlockSpec((None, None, tile, H), res_rows)],
          out_specs=pl.BlockSpec((None, None, R, H), fixed),
          scratch_shapes=[pltpu.VMEM((R, _LANES), jnp.float32),
                          pltpu.VMEM((R, _LANES), jnp.float32),
                          pltpu.VMEM((R, H), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((B, K, R, H), q_BKGH.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="lowbit_decode_tpu",
  )(lengths_B, packed_B, nlive_BK, idx_BKM, q_BKRH, k_packed, k_scale, k_zero, v_packed, v_scale,
    v_zero, res_k, res_v)
  return out[:, :, :G]


def lowbit_decode_attention(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                            res_v, lengths_B, packed_B, *, bits: int, group: int, k_mode: str,
                            v_group: int, block_indices_BKM=None, block_size=None,
                            num_live_BK=None, interpret: bool = False, config=None):
  """Arguments as `pallas_kernels.lowbit_decode.lowbit_decode_attention` (checked there)."""
  del v_group, config
  require_platform("tpu", interpret, "the Mosaic TPU low-bit decode kernel")
  B, K = q_BKGH.shape[:2]
  S = k_packed.shape[2]
  lengths_B = lengths_B.astype(jnp.int32)
  if block_indices_BKM is None:
    tile = min(64, group)
    n = -(-S // tile)
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, K, n))
    nlive = jnp.broadcast_to((-(-lengths_B // tile))[:, None], (B, K)).astype(jnp.int32)
  else:
    tile = int(block_size)
    idx = block_indices_BKM.astype(jnp.int32)
    nlive = (live_slots(idx, lengths_B, tile) if num_live_BK is None else num_live_BK)
  if S % tile or res_k.shape[2] % tile:
    raise NotSupported(f"the tile of {tile} tokens must divide the capacity {S} and the window "
                       f"{res_k.shape[2]}")
  return _block_list(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
                     lengths_B, packed_B.astype(jnp.int32), idx, nlive.astype(jnp.int32),
                     tile=tile, bits=bits, group=group, k_channel=k_mode == "channel",
                     interpret=bool(interpret))
