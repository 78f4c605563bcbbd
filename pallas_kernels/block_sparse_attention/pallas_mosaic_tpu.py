"""Block-sparse causal prefill attention as Pallas Mosaic TPU kernels (`block_sparse_attention`'s
`pallas_mosaic_tpu`, the TPU default): a forward kernel and FlashAttention-2's dq and dk / dv
kernels, tied together by a `jax.custom_vjp`.

Every kernel walks a block list along its last, sequential grid axis. The list goes in through
scalar prefetch (SMEM), so the BlockSpec index maps DMA exactly the listed blocks while the
previous one is in use (the sparse decode TPU kernel's pattern; splash attention's `data_next`):

- forward and dq: grid (B, N, nQ, M), the query block's selected key blocks (per query head;
  per-group indices are repeated for the G query heads of a group);
- dk / dv: grid (B, K, nK, G nQ), the (query block, query head) pairs that selected the key
  block (`reference.transpose_indices`, entries r = i G + g).

A slot past the row's live ones (`reference.slot_counts`: the selected blocks at or below the
diagonal, none for query blocks past the length) re-requests the last live block, which the
pipeline does not fetch again, and computes nothing. The online-softmax state, dq and dk / dv
accumulate in VMEM scratch across that axis and are written at its last step. Inside a block the
causal and length masks are computed from the block ids. The log-sum-exp and FlashAttention-2's
delta = rowsum(do * o) travel as [B, N, Tp, 1] float32 (a block whose last dimension is the whole
array's, which Mosaic accepts; +inf lse on rows that see no key, so the backward kernels need no
row mask). Blocks are [block_size, H] tiles: block_size a multiple of 8 (the sublane tile).

Tested in the TPU interpreter (`interpret=True` -> `pltpu.InterpretParams()`) against the masked
dense reference, forward and gradients; not yet run on a TPU. One limit the interpreter does not
show: the scalar-prefetched lists live in SMEM, B N nQ M int32 for the forward (at 32K tokens,
32 heads, 64-token blocks and 10% density ~3.4 MB, above a TPU core's SMEM); such lengths need
the lists fetched per head (a call per head group), not done yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import launch, online_softmax
from pallas_kernels.block_sparse_attention.reference import (per_query_head, slot_counts,
                                                             transpose_indices)
from pallas_kernels.dispatch import NotSupported, require_platform

_LANES = 128  # m / l scratch lane-dense (broadcast over 128 lanes), the layout Mosaic wants


def _visible(i, blk, length, bs: int) -> jax.Array:
  """bool [bs queries, bs keys] of query block i against key block blk: key <= query, both below
  the length."""
  qpos = i * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
  kpos = blk * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
  return (kpos <= qpos) & (kpos < length) & (qpos < length)


def _dot(a, b, precision, trans_a=False, trans_b=False):
  """a @ b in float32 with either operand transposed (dot_general, no explicit transpose)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _fwd_kernel(len_ref, live_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, bs: int, scale: float, precision):
  """Program (b, n, i, j): slot j of query block i's list."""
  b, n, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    online_softmax.scratch_init(m_sc, l_sc, acc_sc)

  @pl.when(j < live_ref[b, n, i])
  def _attend():
    valid = _visible(i, idx_ref[b, n, i, j], len_ref[b], bs)
    online_softmax.scratch_attend(q_ref[...], k_ref[...], v_ref[...], valid, m_sc, l_sc, acc_sc,
                                  scale=scale, precision=precision)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    online_softmax.scratch_finish(o_ref, l_sc, acc_sc)
    l, m = l_sc[:, :1], m_sc[:, :1]
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


def _dq_kernel(len_ref, live_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref,
               dq_sc, *, bs: int, scale: float, precision):
  b, n, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j < live_ref[b, n, i])
  def _step():
    k, v = k_ref[...], v_ref[...]
    valid = _visible(i, idx_ref[b, n, i, j], len_ref[b], bs)
    s = _dot(q_ref[...], k, precision, trans_b=True) * scale
    p = jnp.where(valid, jnp.exp(s - lse_ref[...]), 0.0)
    ds = p * (_dot(do_ref[...], v, precision, trans_b=True) - d_ref[...])
    dq_sc[...] += _dot(ds.astype(k.dtype), k, precision) * scale

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(len_ref, live_ref, tidx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, bs: int, group: int, scale: float, precision):
  """Program (b, h, j, r): entry r of key block j's list (query block tidx // G)."""
  b, h, j, r = (pl.program_id(a) for a in range(4))

  @pl.when(r == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(r < live_ref[b, h, j])
  def _step():
    q, do = q_ref[...], do_ref[...]
    valid = _visible(tidx_ref[b, h, j, r] // group, j, len_ref[b], bs)
    s = _dot(q, k_ref[...], precision, trans_b=True) * scale
    p = jnp.where(valid, jnp.exp(s - lse_ref[...]), 0.0)                     # [queries, keys]
    dv_sc[...] += _dot(p.astype(do.dtype), do, precision, trans_a=True)
    ds = p * (_dot(do, v_ref[...], precision, trans_b=True) - d_ref[...])
    dk_sc[...] += _dot(ds.astype(q.dtype), q, precision, trans_a=True) * scale

  @pl.when(r == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _live_slot(j, n_live):
  """Slots past the live ones point at the last live one (no new DMA); 0 for an empty list."""
  return jnp.maximum(jnp.minimum(j, n_live - 1), 0)


def _kv_map(G: int):
  """The index map of K / V along a query block's list (forward and dq): KV head n // G, the
  listed block of slot j (the last live one past them)."""
  def kv_map(b, n, i, j, len_ref, live_ref, idx_ref):
    del len_ref
    return b, n // G, jnp.maximum(idx_ref[b, n, i, _live_slot(j, live_ref[b, n, i])], 0), 0
  return kv_map


def _heads_major(x_BTXH: jax.Array, bs: int) -> jax.Array:
  """[B, T, X, H] -> [B, X, Tp, H], Tp = T rounded up to a block multiple (zeros after T)."""
  return launch.pad_axis(x_BTXH, 1, bs).transpose(0, 2, 1, 3)


def _params(interpret: bool):
  return dict(compiler_params=pltpu.CompilerParams(
                  dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
              # our boolean `interpret` -> the TPU interpreter on CPU
              interpret=pltpu.InterpretParams() if interpret else False)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def forward(q_BTNH, k_BTKH, v_BTKH, idx_BNQM, lengths_B, *, block_size: int, interpret: bool):
  """(o [B, N, Tp, H] in q's dtype, lse f32 [B, N, Tp, 1], natural log, +inf on rows that see no
  key); idx per query head."""
  B, T, N, H = q_BTNH.shape
  K, nq, M = k_BTKH.shape[2], idx_BNQM.shape[2], idx_BNQM.shape[3]
  G, bs = N // K, block_size
  q, k, v = (_heads_major(x, bs) for x in (q_BTNH, k_BTKH, v_BTKH))
  Tp = nq * bs
  _, n_live = slot_counts(idx_BNQM, lengths_B, bs)
  q_map, kv_map = (lambda b, n, i, j, *_: (b, n, i, 0)), _kv_map(G)
  tile = (None, None, bs, H)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, bs=bs, scale=H ** -0.5,
                        precision=launch.dot_precision(q.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(B, N, nq, M),
          in_specs=[pl.BlockSpec(tile, q_map), pl.BlockSpec(tile, kv_map),
                    pl.BlockSpec(tile, kv_map)],
          out_specs=[pl.BlockSpec(tile, q_map), pl.BlockSpec((None, None, bs, 1), q_map)],
          scratch_shapes=[pltpu.VMEM((bs, _LANES), jnp.float32),
                          pltpu.VMEM((bs, _LANES), jnp.float32),
                          pltpu.VMEM((bs, H), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, H), q.dtype),
                 jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32)],
      name="block_sparse_attention_fwd_tpu",
      **_params(interpret),
  )(lengths_B, n_live, idx_BNQM, q, k, v)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def backward(q_BTNH, k_BTKH, v_BTKH, idx_BNQM, lengths_B, o_BNTH, lse_BNT1, do_BTNH, *,
             block_size: int, interpret: bool):
  """(dq, dk, dv) in the inputs' layouts and dtypes."""
  B, T, N, H = q_BTNH.shape
  K, nq, M = k_BTKH.shape[2], idx_BNQM.shape[2], idx_BNQM.shape[3]
  G, bs = N // K, block_size
  q, k, v, do = (_heads_major(x, bs) for x in (q_BTNH, k_BTKH, v_BTKH, do_BTNH))
  Tp = nq * bs
  # D_t = do_t . o_t (FlashAttention-2's preprocessing, one XLA pass)
  delta = jnp.sum(do.astype(jnp.float32) * o_BNTH.astype(jnp.float32), axis=-1, keepdims=True)
  precision = launch.dot_precision(q.dtype)
  scale = H ** -0.5
  tile, row1 = (None, None, bs, H), (None, None, bs, 1)

  _, n_live = slot_counts(idx_BNQM, lengths_B, bs)
  q_map, kv_map = (lambda b, n, i, j, *_: (b, n, i, 0)), _kv_map(G)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, bs=bs, scale=scale, precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(B, N, nq, M),
          in_specs=[pl.BlockSpec(tile, q_map), pl.BlockSpec(tile, kv_map),
                    pl.BlockSpec(tile, kv_map), pl.BlockSpec(tile, q_map),
                    pl.BlockSpec(row1, q_map), pl.BlockSpec(row1, q_map)],
          out_specs=pl.BlockSpec(tile, q_map),
          scratch_shapes=[pltpu.VMEM((bs, H), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((B, N, Tp, H), q.dtype),
      name="block_sparse_attention_dq_tpu",
      **_params(interpret),
  )(lengths_B, n_live, idx_BNQM, q, k, v, do, lse_BNT1, delta)

  tidx, _, t_live = transpose_indices(idx_BNQM, lengths_B, K, bs)
  R = tidx.shape[-1]

  def entry_map(b, h, j, r, len_ref, live_ref, tidx_ref):
    e = jnp.maximum(tidx_ref[b, h, j, _live_slot(r, live_ref[b, h, j])], 0)
    return b, h * G + e % G, e // G, 0

  k_map = lambda b, h, j, r, *_: (b, h, j, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, bs=bs, group=G, scale=scale, precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(B, K, nq, R),
          in_specs=[pl.BlockSpec(tile, entry_map), pl.BlockSpec(tile, k_map),
                    pl.BlockSpec(tile, k_map), pl.BlockSpec(tile, entry_map),
                    pl.BlockSpec(row1, entry_map), pl.BlockSpec(row1, entry_map)],
          out_specs=[pl.BlockSpec(tile, k_map), pl.BlockSpec(tile, k_map)],
          scratch_shapes=[pltpu.VMEM((bs, H), jnp.float32), pltpu.VMEM((bs, H), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((B, K, Tp, H), k.dtype),
                 jax.ShapeDtypeStruct((B, K, Tp, H), v.dtype)],
      name="block_sparse_attention_dkv_tpu",
      **_params(interpret),
  )(lengths_B, t_live, tidx, q, k, v, do, lse_BNT1, delta)
  back = lambda x: x.transpose(0, 2, 1, 3)[:, :T]
  return back(dq), back(dk), back(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, idx_BNQM, lengths_B, block_size, interpret):
  o, _ = forward(q, k, v, idx_BNQM, lengths_B, block_size=block_size, interpret=interpret)
  return o.transpose(0, 2, 1, 3)[:, :q.shape[1]]


def _attention_fwd(q, k, v, idx_BNQM, lengths_B, block_size, interpret):
  o, lse = forward(q, k, v, idx_BNQM, lengths_B, block_size=block_size, interpret=interpret)
  return o.transpose(0, 2, 1, 3)[:, :q.shape[1]], (q, k, v, idx_BNQM, lengths_B, o, lse)


def _attention_bwd(block_size, interpret, res, do):
  q, k, v, idx_BNQM, lengths_B, o, lse = res
  dq, dk, dv = backward(q, k, v, idx_BNQM, lengths_B, o, lse, do, block_size=block_size,
                        interpret=interpret)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B, *,
                           block_size: int, interpret: bool = False):
  """Shapes as `pallas_kernels.block_sparse_attention`."""
  require_platform("tpu", interpret, "the Mosaic TPU block-sparse attention kernels")
  if block_size % 8:
    raise NotSupported(f"block_size={block_size}: the [block_size, H] tiles need a multiple of "
                       "8 rows (the TPU's sublane tile)")
  idx = per_query_head(block_indices_BHQM.astype(jnp.int32), q_BTNH.shape[2])
  return _attention(q_BTNH, k_BTKH, v_BTKH, idx, lengths_B.astype(jnp.int32), int(block_size),
                    bool(interpret))
