"""Block-sparse prefill attention in XLA (`block_sparse_attention`'s `xla` implementation): a
scan over the M index slots, each gathering one key block per (sequence, head, query block) and
folding it into the online-softmax state (`pallas_kernels.online_softmax.attend_block`), so
memory is O(T (H + block_size)) per head whatever the density, never the T x T map. The backward
pass is FlashAttention-2's (a `jax.custom_vjp`): it recomputes each block's probabilities from
the saved log-sum-exp and scatter-adds the key / value gradients into the selected blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import online_softmax
from pallas_kernels.block_sparse_attention.reference import per_query_head

_HI = lax.Precision.HIGHEST


def _blocks(x_BTXH: jax.Array, nb: int, bs: int) -> jax.Array:
  """[B, T, X, H] -> [B, X, nb, bs, H] (zero-padded to nb * bs tokens)."""
  B, T, X, H = x_BTXH.shape
  x = jnp.pad(x_BTXH, ((0, 0), (0, nb * bs - T), (0, 0), (0, 0)))
  return x.reshape(B, nb, bs, X, H).transpose(0, 3, 1, 2, 4)


def _unblocks(x_BXnbH: jax.Array, T: int) -> jax.Array:
  """[B, X, nb, bs, H] -> [B, T, X, H]."""
  B, X, nb, bs, H = x_BXnbH.shape
  return x_BXnbH.transpose(0, 2, 3, 1, 4).reshape(B, nb * bs, X, H)[:, :T]


class _Geometry:
  """Gathers of one index slot: the selected key blocks and which (query, key) pairs count."""

  def __init__(self, B, N, K, nb, bs, lengths_B):
    self.b = jnp.arange(B)[:, None, None]
    self.h = (jnp.arange(N) // (N // K))[None, :, None]       # the KV head of each query head
    self.bs = bs
    self.qpos = jnp.arange(nb)[:, None] * bs + jnp.arange(bs)[None]           # [nb, bs]
    self.q_ok = self.qpos[None] < lengths_B[:, None, None]                    # [B, nb, bs]
    self.lengths = lengths_B

  def gather(self, x_BKnbH: jax.Array, blk_BNQ: jax.Array) -> jax.Array:
    """The block blk[b, n, i] of KV head n // G for every (b, n, i): [B, N, nQ, bs, H]."""
    return x_BKnbH[self.b, self.h, jnp.maximum(blk_BNQ, 0)]

  def valid(self, blk_BNQ: jax.Array) -> jax.Array:
    """bool [B, N, nQ, bs (queries), bs (keys)]."""
    kpos = jnp.maximum(blk_BNQ, 0)[..., None] * self.bs + jnp.arange(self.bs)  # [B, N, nQ, bs]
    ok = (blk_BNQ >= 0)[..., None, None] & (kpos[..., None, :] <= self.qpos[None, None, :, :, None])
    ok &= (kpos < self.lengths[:, None, None, None])[..., None, :]
    return ok & self.q_ok[:, None, :, :, None]

  def scatter_add(self, acc_BKnbH: jax.Array, blk_BNQ: jax.Array, upd_BNQbH: jax.Array):
    """acc[b, n // G, blk[b, n, i]] += upd[b, n, i] (duplicates accumulate; a -1 slot's update
    is zero, since no pair of it is valid)."""
    return acc_BKnbH.at[self.b, self.h, jnp.maximum(blk_BNQ, 0)].add(upd_BNQbH)


def _forward(q, k, v, idx_BNQM, lengths_B, block_size):
  B, T, N, H = q.shape
  K, nb, bs = k.shape[2], -(-q.shape[1] // block_size), block_size
  geo = _Geometry(B, N, K, nb, bs, lengths_B)
  qb, kb, vb = _blocks(q, nb, bs), _blocks(k, nb, bs), _blocks(v, nb, bs)
  attend = functools.partial(online_softmax.attend_block, scale=H ** -0.5, precision=_HI)
  for _ in range(3):                   # over (B, N, nQ): one [bs, H] x [bs, H] update each
    attend = jax.vmap(attend)

  def body(state, blk_BNQ):
    return attend(qb, geo.gather(kb, blk_BNQ), geo.gather(vb, blk_BNQ), geo.valid(blk_BNQ),
                  state), None

  init = (jnp.zeros((B, N, nb, bs, H), jnp.float32),
          jnp.full((B, N, nb, bs), online_softmax.MASK_VALUE, jnp.float32),
          jnp.zeros((B, N, nb, bs), jnp.float32))
  (acc, m, l), _ = lax.scan(body, init, jnp.moveaxis(idx_BNQM, -1, 0))
  o_b = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
  return o_b, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, idx_BNQM, lengths_B, block_size):
  o_b, _ = _forward(q, k, v, idx_BNQM, lengths_B, block_size)
  return _unblocks(o_b, q.shape[1]).astype(q.dtype)


def _attention_fwd(q, k, v, idx_BNQM, lengths_B, block_size):
  o_b, lse = _forward(q, k, v, idx_BNQM, lengths_B, block_size)
  out = _unblocks(o_b, q.shape[1]).astype(q.dtype)
  return out, (q, k, v, idx_BNQM, lengths_B, out, lse)


def _attention_bwd(block_size, res, do_BTNH):
  q, k, v, idx_BNQM, lengths_B, out, lse = res
  B, T, N, H = q.shape
  K, nb, bs = k.shape[2], -(-T // block_size), block_size
  scale = H ** -0.5
  geo = _Geometry(B, N, K, nb, bs, lengths_B)
  qb = _blocks(q, nb, bs).astype(jnp.float32)
  kb, vb = _blocks(k, nb, bs), _blocks(v, nb, bs)
  do_b = _blocks(do_BTNH, nb, bs).astype(jnp.float32)
  # D_t = do_t . o_t (the output as returned, as FlashAttention-2 uses it)
  delta = jnp.sum(do_b * _blocks(out, nb, bs).astype(jnp.float32), axis=-1)    # [B, N, nQ, bs]

  def body(carry, blk_BNQ):
    dq, dk, dv = carry
    kblk = geo.gather(kb, blk_BNQ).astype(jnp.float32)
    vblk = geo.gather(vb, blk_BNQ).astype(jnp.float32)
    s = jnp.einsum("bnqrh,bnqch->bnqrc", qb, kblk, precision=_HI) * scale
    # padded / dead rows have lse = +inf: exp(-inf) = 0, and the mask zeroes them anyway
    p = jnp.where(geo.valid(blk_BNQ), jnp.exp(s - lse[..., None]), 0.0)
    dp = jnp.einsum("bnqrh,bnqch->bnqrc", do_b, vblk, precision=_HI)
    ds = p * (dp - delta[..., None])
    dq = dq + jnp.einsum("bnqrc,bnqch->bnqrh", ds, kblk, precision=_HI) * scale
    dk = geo.scatter_add(dk, blk_BNQ, jnp.einsum("bnqrc,bnqrh->bnqch", ds, qb, precision=_HI) * scale)
    dv = geo.scatter_add(dv, blk_BNQ, jnp.einsum("bnqrc,bnqrh->bnqch", p, do_b, precision=_HI))
    return (dq, dk, dv), None

  init = (jnp.zeros((B, N, nb, bs, H), jnp.float32), jnp.zeros((B, K, nb, bs, H), jnp.float32),
          jnp.zeros((B, K, nb, bs, H), jnp.float32))
  (dq, dk, dv), _ = lax.scan(body, init, jnp.moveaxis(idx_BNQM, -1, 0))
  return (_unblocks(dq, T).astype(q.dtype), _unblocks(dk, T).astype(k.dtype),
          _unblocks(dv, T).astype(v.dtype), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B, *,
                           block_size: int, interpret: bool = False):
  """The `xla` implementation (interpret has nothing to interpret). Shapes as the op."""
  del interpret
  idx_BNQM = per_query_head(block_indices_BHQM.astype(jnp.int32), q_BTNH.shape[2])
  return _attention(q_BTNH, k_BTKH, v_BTKH, idx_BNQM, lengths_B.astype(jnp.int32),
                    int(block_size))
