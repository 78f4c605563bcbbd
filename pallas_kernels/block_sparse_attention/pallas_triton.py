"""Block-sparse causal prefill attention as Pallas Triton kernels (`block_sparse_attention`'s
`pallas_triton`, the GPU default): a forward kernel and FlashAttention-2's two backward kernels,
tied together by a `jax.custom_vjp`.

Forward / dq: one program per (query block, query head, sequence), heaviest query blocks first.
It reads its row of indices (per query head, or per GQA group through the index map) and loops
over the live slots only, loading each selected key block with a dynamic `pl.ds` (so unselected
blocks are never read). Indices are ascending, so a row's live slots split into a prefix of
blocks strictly below the diagonal, which run without a mask, and at most one diagonal block,
the only one that can cross the causal boundary or the length (splash attention's full /
partial blocks; FlexAttention's FULL_KV_IDX / KV_IDX). XLA counts both per row beforehand.
The next block id is loaded one step ahead (as the sparse decode kernel: its K/V loads never
wait on their own index load).

dk / dv: one program per (key block, KV head, sequence). It needs the (query head, query
block) pairs that selected its key block -- the transpose of the index lists, built in XLA
(`transpose_indices`): entries r = i * G + g (query block i, query head g of the group),
below-diagonal entries first and the diagonal ones (which need the mask) last, -1 padded, as
wide as G * nQ (a key block can be chosen by every query block of the group). Query rows past
the length carry lse = +inf from the forward pass, so their recomputed probabilities are 0 and
no backward kernel masks them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import launch
from pallas_kernels.block_sparse_attention.reference import (per_query_head, slot_counts,
                                                             transpose_indices)
from pallas_kernels.dispatch import require_platform
from pallas_kernels.flash_attention import pallas_triton as flash

SQUEEZED = pl.squeezed


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch parameters (the block size comes from the selection); None takes the tuned value
  (`tuned.lookup("block_sparse_attention", "pallas_triton")`, by block size and head dim).

  num_warps / num_stages: the forward kernel's; bwd_num_warps / bwd_num_stages: the dq and
  dk / dv kernels'. prefetch_index: load the next block id one loop step ahead.
  """
  num_warps: int | None = None
  num_stages: int | None = None
  bwd_num_warps: int | None = None
  bwd_num_stages: int | None = None
  prefetch_index: bool = True

  def validate(self) -> None:
    for name in ("num_warps", "bwd_num_warps"):
      w = getattr(self, name)
      if w is not None and w not in (1, 2, 4, 8, 16):
        raise ValueError(f"config.{name} must be a power of 2 in [1, 16], got {w!r}")
    for name in ("num_stages", "bwd_num_stages"):
      s = getattr(self, name)
      if s is not None and (not isinstance(s, int) or s < 1):
        raise ValueError(f"config.{name} must be a positive int or None, got {s!r}")
    if not isinstance(self.prefetch_index, bool):
      raise ValueError(f"config.prefetch_index must be a bool, got {self.prefetch_index!r}")


CONFIG = TritonConfig


# -- kernels --

def _slot_loop(idx_ref, n_full, n_live, step, init, *, prefetch: bool):
  """Runs step(block_id, carry, masked) over the row's live slots: [0, n_full) unmasked,
  [n_full, n_live) masked; with `prefetch` the unmasked loop carries the next id."""
  last = idx_ref.shape[0] - 1
  if prefetch:
    def body(s, carry):
      state, block = carry
      nxt = idx_ref[jnp.minimum(s + 1, last)]
      return step(block, state, False), nxt
    carry, _ = lax.fori_loop(0, n_full, body, (init, idx_ref[0]))
  else:
    carry = lax.fori_loop(0, n_full, lambda s, c: step(idx_ref[s], c, False), init)
  return lax.fori_loop(n_full, n_live, lambda s, c: step(idx_ref[s], c, True), carry)


def _fwd_kernel(nfull_ref, nlive_ref, len_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                block_size: int, n_q_blocks: int, scale2: float, precision, prefetch: bool):
  """Program (query block, n, b). Scalars n_full / n_live / length; idx_ref int32 [M];
  q_ref / o_ref [bs, H]; k_ref / v_ref [Tp, H]; lse_ref f32 [bs]."""
  bs = block_size
  i = n_q_blocks - 1 - pl.program_id(0)
  length = len_ref[()]
  rows = i * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
  offsets = lax.broadcasted_iota(jnp.int32, (bs,), 0)
  q = q_ref[...]

  def step(block, state, masked):
    t0 = pl.multiple_of(block * bs, bs)
    mask = flash.causal_mask(rows, t0 + offsets, length) if masked else None
    state, _ = flash.fold_tile(q, k_ref[pl.ds(t0, bs), :], v_ref[pl.ds(t0, bs), :], state,
                               scale2=scale2, precision=precision, mask_RT=mask)
    return state

  state = _slot_loop(idx_ref, nfull_ref[()], nlive_ref[()], step,
                     flash.init_state(bs, q.shape[1]), prefetch=prefetch)
  o, lse = flash.finish(state, rows < length)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dq_kernel(nfull_ref, nlive_ref, len_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, block_size: int, n_q_blocks: int, scale2: float,
               precision, prefetch: bool):
  """Program (query block, n, b): dq [bs, H] = scale * sum over slots of dS K, dS = P * (dP -
  delta), P recomputed from the saved lse."""
  bs = block_size
  i = n_q_blocks - 1 - pl.program_id(0)
  length = len_ref[()]
  rows = i * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
  offsets = lax.broadcasted_iota(jnp.int32, (bs,), 0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def step(block, dq, masked):
    t0 = pl.multiple_of(block * bs, bs)
    k, v = k_ref[pl.ds(t0, bs), :], v_ref[pl.ds(t0, bs), :]
    mask = flash.causal_mask(rows, t0 + offsets, length) if masked else None
    p = flash.recompute_probs(q, k, lse, scale2=scale2, precision=precision, mask_RT=mask)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32, precision=precision)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32,
                        precision=precision)

  dq = _slot_loop(idx_ref, nfull_ref[()], nlive_ref[()], step,
                  jnp.zeros(q.shape, jnp.float32), prefetch=prefetch)
  dq_ref[...] = (dq * (scale2 / flash.LOG2E)).astype(dq_ref.dtype)


def _dkv_kernel(nfull_ref, nlive_ref, len_ref, tidx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, block_size: int, group: int, scale2: float,
                precision, prefetch: bool):
  """Program (key block j, KV head, b). tidx_ref int32 [G * nQ] (entries r = i * G + g);
  q_ref / do_ref [Tp, G, H] (the group's query heads); k_ref / v_ref / dk_ref / dv_ref
  [bs, H]; lse_ref / delta_ref f32 [G, Tp]."""
  bs = block_size
  j = pl.program_id(0)
  length = len_ref[()]
  cols = j * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
  offsets = lax.broadcasted_iota(jnp.int32, (bs,), 0)
  k, v = k_ref[...], v_ref[...]

  def step(entry, carry, masked):
    dk, dv = carry
    i, g = entry // group, entry % group
    t0 = pl.multiple_of(i * bs, bs)
    q, do = q_ref[pl.ds(t0, bs), g, :], do_ref[pl.ds(t0, bs), g, :]
    lse, delta = lse_ref[g, pl.ds(t0, bs)], delta_ref[g, pl.ds(t0, bs)]
    mask = flash.causal_mask(t0 + offsets, cols, length) if masked else None
    p = flash.recompute_probs(q, k, lse, scale2=scale2, precision=precision, mask_RT=mask)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32,
                      precision=precision)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32, precision=precision)
    ds = p * (dp - delta[:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32,
                      precision=precision)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = _slot_loop(tidx_ref, nfull_ref[()], nlive_ref[()], step, (zeros, zeros),
                      prefetch=prefetch)
  dk_ref[...] = (dk * (scale2 / flash.LOG2E)).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# -- calls --

def _padded(x_BTXH, bs):
  return launch.pad_axis(x_BTXH, 1, bs)


@dataclasses.dataclass(frozen=True)
class Launch:
  """One kernel family's resolved launch parameters (hashable: a static argument)."""
  num_warps: int
  num_stages: int
  prefetch: bool
  interpret: bool


def forward(q_BTNH, k_BTKH, v_BTKH, idx_BHQM, lengths_B, *, block_size: int, launch_: Launch):
  """(o [B, Tp, N, H] in q's dtype, lse f32 [B, N, Tp] natural log, +inf on rows that see no
  key), Tp = nQ * block_size."""
  B, T, N, H = q_BTNH.shape
  K, Hi, nq, M = k_BTKH.shape[2], idx_BHQM.shape[1], idx_BHQM.shape[2], idx_BHQM.shape[3]
  G, hdiv, bs = N // K, N // Hi, block_size
  q, k, v = (_padded(x, bs) for x in (q_BTNH, k_BTKH, v_BTKH))
  Tp = nq * bs
  n_full, n_live = slot_counts(idx_BHQM, lengths_B, bs)
  rev = lambda p: nq - 1 - p
  sq = SQUEEZED
  row = lambda p, n, b: (b, n // hdiv, rev(p))
  kernel = functools.partial(_fwd_kernel, block_size=bs, n_q_blocks=nq,
                             scale2=H ** -0.5 * flash.LOG2E,
                             precision=launch.dot_precision(q.dtype),
                             prefetch=launch_.prefetch)
  return pl.pallas_call(
      kernel,
      grid=(nq, N, B),
      in_specs=[pl.BlockSpec((sq, sq, sq), row), pl.BlockSpec((sq, sq, sq), row),
                pl.BlockSpec((sq,), lambda p, n, b: (b,)),
                pl.BlockSpec((sq, sq, sq, M), lambda p, n, b: (b, n // hdiv, rev(p), 0)),
                pl.BlockSpec((sq, bs, sq, H), lambda p, n, b: (b, rev(p), n, 0)),
                pl.BlockSpec((sq, Tp, sq, H), lambda p, n, b: (b, 0, n // G, 0)),
                pl.BlockSpec((sq, Tp, sq, H), lambda p, n, b: (b, 0, n // G, 0))],
      out_specs=[pl.BlockSpec((sq, bs, sq, H), lambda p, n, b: (b, rev(p), n, 0)),
                 pl.BlockSpec((sq, sq, bs), lambda p, n, b: (b, n, rev(p)))],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, N, H), q.dtype),
                 jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
      compiler_params=flash.compiler_params(launch_.num_warps, launch_.num_stages, bs, H,
                                            q.dtype),
      interpret=launch_.interpret,
      name="block_sparse_attention_fwd",
  )(n_full, n_live, lengths_B, idx_BHQM, q, k, v)


# The largest [block, H] tile the backward kernels take: at H 256 with 128-token blocks they ask
# 256 KB of shared memory on the H100 (227 KB available), so such selections run the backward in
# blocks of half the size (`halve_blocks`: the same pairs of tokens).
_BWD_TILE_ELEMENTS = 128 * 128


def halve_blocks(idx_BHQM: jax.Array) -> jax.Array:
  """The same selection in blocks of half the size: query blocks 2i and 2i + 1 each select key
  blocks 2j and 2j + 1 for every j that block i selected. Ascending and -1 padded as before; the
  one half-block above the diagonal (2i + 1, from row 2i) drops out as every block past a row's
  own does."""
  B, Hi, nq, M = idx_BHQM.shape
  sub = jnp.where(idx_BHQM[..., None] >= 0,
                  2 * idx_BHQM[..., None] + jnp.arange(2, dtype=idx_BHQM.dtype), -1)
  return jnp.repeat(sub.reshape(B, Hi, nq, 2 * M), 2, axis=2)


def backward(q_BTNH, k_BTKH, v_BTKH, idx_BHQM, lengths_B, o_BTNH, lse_BNT, do_BTNH, *,
             block_size: int, launch_: Launch):
  """(dq, dk, dv) in the inputs' dtypes, [B, T, ., H]; o / lse as `forward` returned them
  (o unpadded or padded), do [B, T, N, H]."""
  B, T, N, H = q_BTNH.shape
  while block_size * H > _BWD_TILE_ELEMENTS and block_size % 32 == 0:
    idx_BHQM, block_size = halve_blocks(idx_BHQM), block_size // 2
  K, Hi, nq, M = k_BTKH.shape[2], idx_BHQM.shape[1], idx_BHQM.shape[2], idx_BHQM.shape[3]
  G, hdiv, bs = N // K, N // Hi, block_size
  Tp = nq * bs
  q, k, v, do = (_padded(x, bs) for x in (q_BTNH, k_BTKH, v_BTKH, do_BTNH))
  # D_t = do_t . o_t (FlashAttention-2's preprocessing; XLA fuses it into one pass)
  delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32),
                     _padded(o_BTNH[:, :T], bs).astype(jnp.float32))
  scale2 = H ** -0.5 * flash.LOG2E
  precision = launch.dot_precision(q.dtype)
  params = flash.compiler_params(launch_.num_warps, launch_.num_stages, bs, H, q.dtype)
  prefetch, interpret = launch_.prefetch, launch_.interpret
  sq = SQUEEZED
  rev = lambda p: nq - 1 - p
  row = lambda p, n, b: (b, n // hdiv, rev(p))
  qblk = lambda p, n, b: (b, rev(p), n, 0)
  n_full, n_live = slot_counts(idx_BHQM, lengths_B, bs)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_size=bs, n_q_blocks=nq, scale2=scale2,
                        precision=precision, prefetch=prefetch),
      grid=(nq, N, B),
      in_specs=[pl.BlockSpec((sq, sq, sq), row), pl.BlockSpec((sq, sq, sq), row),
                pl.BlockSpec((sq,), lambda p, n, b: (b,)),
                pl.BlockSpec((sq, sq, sq, M), lambda p, n, b: (b, n // hdiv, rev(p), 0)),
                pl.BlockSpec((sq, bs, sq, H), qblk),
                pl.BlockSpec((sq, Tp, sq, H), lambda p, n, b: (b, 0, n // G, 0)),
                pl.BlockSpec((sq, Tp, sq, H), lambda p, n, b: (b, 0, n // G, 0)),
                pl.BlockSpec((sq, bs, sq, H), qblk),
                pl.BlockSpec((sq, sq, bs), lambda p, n, b: (b, n, rev(p))),
                pl.BlockSpec((sq, sq, bs), lambda p, n, b: (b, n, rev(p)))],
      out_specs=pl.BlockSpec((sq, bs, sq, H), qblk),
      out_shape=jax.ShapeDtypeStruct((B, Tp, N, H), q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="block_sparse_attention_dq",
  )(n_full, n_live, lengths_B, idx_BHQM, q, k, v, do, lse_BNT, delta)

  tidx, t_full, t_live = transpose_indices(per_query_head(idx_BHQM, N), lengths_B, K, bs)
  R = tidx.shape[-1]
  kblk = lambda j, h, b: (b, j, h, 0)
  group = lambda j, h, b: (b, h, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_size=bs, group=G, scale2=scale2,
                        precision=precision, prefetch=prefetch),
      grid=(nq, K, B),
      in_specs=[pl.BlockSpec((sq, sq, sq), lambda j, h, b: (b, h, j)),
                pl.BlockSpec((sq, sq, sq), lambda j, h, b: (b, h, j)),
                pl.BlockSpec((sq,), lambda j, h, b: (b,)),
                pl.BlockSpec((sq, sq, sq, R), lambda j, h, b: (b, h, j, 0)),
                pl.BlockSpec((sq, Tp, G, H), lambda j, h, b: (b, 0, h, 0)),
                pl.BlockSpec((sq, bs, sq, H), kblk),
                pl.BlockSpec((sq, bs, sq, H), kblk),
                pl.BlockSpec((sq, Tp, G, H), lambda j, h, b: (b, 0, h, 0)),
                pl.BlockSpec((sq, G, Tp), group),
                pl.BlockSpec((sq, G, Tp), group)],
      out_specs=[pl.BlockSpec((sq, bs, sq, H), kblk), pl.BlockSpec((sq, bs, sq, H), kblk)],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, K, H), k.dtype),
                 jax.ShapeDtypeStruct((B, Tp, K, H), v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="block_sparse_attention_dkv",
  )(t_full, t_live, lengths_B, tidx, q, k, v, do, lse_BNT, delta)
  return dq[:, :T], dk[:, :T], dv[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, idx_BHQM, lengths_B, block_size, launches):
  o, _ = forward(q, k, v, idx_BHQM, lengths_B, block_size=block_size, launch_=launches[0])
  return o[:, :q.shape[1]]


def _attention_fwd(q, k, v, idx_BHQM, lengths_B, block_size, launches):
  o, lse = forward(q, k, v, idx_BHQM, lengths_B, block_size=block_size, launch_=launches[0])
  o = o[:, :q.shape[1]]
  return o, (q, k, v, idx_BHQM, lengths_B, o, lse)


def _attention_bwd(block_size, launches, res, do):
  q, k, v, idx_BHQM, lengths_B, o, lse = res
  dq, dk, dv = backward(q, k, v, idx_BHQM, lengths_B, o, lse, do, block_size=block_size,
                        launch_=launches[1])
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def resolve(config: TritonConfig | None, block_size: int, head_dim: int,
            interpret: bool) -> tuple[Launch, Launch]:
  """(forward, backward) launch parameters from the config and the tuned defaults."""
  config = config or TritonConfig()
  config.validate()
  t = flash.launch_params("block_sparse_attention", head_dim)
  big = "_block_128" if block_size >= 128 else ""
  fwd = Launch(config.num_warps or t["num_warps" + big], config.num_stages or t["num_stages"],
               config.prefetch_index, bool(interpret))
  bwd = Launch(config.bwd_num_warps or t["bwd_num_warps" + big],
               config.bwd_num_stages or t["bwd_num_stages"], config.prefetch_index,
               bool(interpret))
  return fwd, bwd


@functools.partial(jax.jit, static_argnames=("block_size", "launches"))
def _block_sparse_attention(q, k, v, idx_BHQM, lengths_B, *, block_size, launches):
  return _attention(q, k, v, idx_BHQM.astype(jnp.int32), lengths_B.astype(jnp.int32),
                    block_size, launches)


def block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B, *,
                           block_size: int, interpret: bool = False,
                           config: TritonConfig | None = None):
  """Shapes as `pallas_kernels.block_sparse_attention`; differentiable in q, k and v."""
  require_platform("gpu", interpret, "the Pallas Triton block-sparse attention kernels")
  flash.supported(q_BTNH.shape[-1], block_size, "block_size", q_BTNH.dtype)
  launches = resolve(config, int(block_size), q_BTNH.shape[-1], interpret)
  return _block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B,
                                 block_size=int(block_size), launches=launches)


@functools.partial(jax.jit, static_argnames=("block_size", "launch_"))
def _forward_unpadded(q, k, v, idx_BHQM, lengths_B, *, block_size, launch_):
  T = q.shape[1]
  o, lse = forward(q, k, v, idx_BHQM.astype(jnp.int32), lengths_B.astype(jnp.int32),
                   block_size=block_size, launch_=launch_)
  return o[:, :T], lse[..., :T]


def block_sparse_attention_fwd(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B, *,
                               block_size: int, interpret: bool = False,
                               config: TritonConfig | None = None):
  """The forward kernel alone: (o [B, T, N, H] in q's dtype, lse f32 [B, N, T], natural log,
  +inf on rows that see no key)."""
  require_platform("gpu", interpret, "the Pallas Triton block-sparse attention kernels")
  flash.supported(q_BTNH.shape[-1], block_size, "block_size", q_BTNH.dtype)
  fwd, _ = resolve(config, int(block_size), q_BTNH.shape[-1], interpret)
  return _forward_unpadded(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B,
                           block_size=int(block_size), launch_=fwd)
