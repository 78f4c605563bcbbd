"""pallas_kernels.block_sparse_attention: every backend against a float64 loop and the dense
masked reference (random block sets, ragged lengths, GQA, per-query-head and per-group indices),
all blocks == dense causal attention, and gradients == autodiff of masked dense attention."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (block_sparse_attention,
                                                   block_sparse_attention_reference)
from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.flash_attention import flash_attention

from ._oracle import TOLERANCES, BackendBase, check_close, generate_from_class

pytest_generate_tests = generate_from_class


def random_indices(seed, B, Hi, nb, M, causal_only=False):
  """Random distinct ascending block sets of 0..M blocks per row (some above the diagonal unless
  causal_only), -1 padded to M."""
  rng = np.random.default_rng(seed)
  idx = np.full((B, Hi, nb, M), -1, np.int32)
  for b in range(B):
    for h in range(Hi):
      for i in range(nb):
        pool = np.arange(i + 1 if causal_only else nb)
        n = rng.integers(0, min(M, len(pool)) + 1)
        idx[b, h, i, :n] = np.sort(rng.choice(pool, n, replace=False))
  return idx


def oracle(q, k, v, idx, lengths, bs):
  """float64 loop: each query row over the keys of its selected blocks with s <= t < length."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  hG = N // idx.shape[1]         # query heads per index row (1, or G for per-group indices)
  o = np.zeros((B, T, N, H))
  for b in range(B):
    for n in range(N):
      for t in range(min(int(lengths[b]), T)):
        blocks = [j for j in idx[b, n // hG, t // bs] if j >= 0]
        keys = [s for j in blocks for s in range(j * bs, (j + 1) * bs) if s <= t]
        if not keys:
          continue
        s = k[b, keys, n // G] @ q[b, t, n] / np.sqrt(H)
        p = np.exp(s - s.max())
        o[b, t, n] = (p / p.sum()) @ v[b, keys, n // G]
  return o


def rand_qkv(seed, B, T, N, K, H, dtype):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), dtype)
               for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))


class BlockSparseAttentionBase(BackendBase):
  # (B, T, N, K, H, block_size, lengths, per_group): ragged, T not a block multiple, GQA
  CASES = [(2, 21, 4, 2, 16, 4, (21, 9), False), (1, 32, 2, 1, 8, 8, (32,), True),
           (3, 19, 3, 3, 8, 4, (19, 1, 12), False), (2, 24, 6, 2, 8, 8, (17, 24), True)]
  DTYPES = (jnp.float32, jnp.bfloat16)
  # the block size and head dim of the small fixed-shape tests below (a backend with tile
  # constraints raises them; sequence lengths scale with the block size)
  SMALL_BLOCK, SMALL_H = 4, 8

  def _case(self, case, dtype, causal_only=False):
    B, T, N, K, H, bs, lengths, per_group = case
    nb = -(-T // bs)
    q, k, v = rand_qkv(T + N, B, T, N, K, H, dtype)
    idx = random_indices(T * N, B, K if per_group else N, nb, max(1, nb - 1), causal_only)
    return q, k, v, idx, np.asarray(lengths, np.int32), bs

  def test_random_blocks_match_oracle_and_masked_dense(self, dtype, case):
    q, k, v, idx, lengths, bs = self._case(case, dtype)
    out = block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=bs,
                                 **self.kw)
    assert out.shape == q.shape and out.dtype == dtype
    want = oracle(q, k, v, idx, lengths, bs)
    check_close(out, want, dtype)
    ref = block_sparse_attention_reference(q, k, v, jnp.asarray(idx), jnp.asarray(lengths),
                                           block_size=bs)
    check_close(ref, want, dtype)

  def test_all_blocks_is_dense_causal_attention(self, dtype):
    B, T, N, K, H, bs = 2, 20, 4, 2, 16, 8
    q, k, v = rand_qkv(3, B, T, N, K, H, dtype)
    nb = -(-T // bs)
    every = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, N, nb, nb))
    out = block_sparse_attention(q, k, v, every, block_size=bs, **self.kw)
    check_close(out, np.asarray(causal_attention(q, k, v, implementation="xla"), np.float64), dtype)
    # the causal triangle only (-1 above the diagonal), per group, ragged: the flash reference
    tri = jnp.where(jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None], jnp.arange(nb), -1)
    tri = jnp.sort(jnp.where(tri < 0, nb, tri), axis=-1)
    tri = jnp.broadcast_to(jnp.where(tri == nb, -1, tri).astype(jnp.int32), (B, K, nb, nb))
    lengths = jnp.asarray([13, 20], jnp.int32)
    out = block_sparse_attention(q, k, v, tri, lengths, block_size=bs, **self.kw)
    want = flash_attention(q, k, v, lengths, implementation="xla")
    check_close(out, np.asarray(jnp.asarray(want, jnp.float32), np.float64), dtype)

  def test_per_group_indices_equal_repeated_per_head(self):
    bs, H = self.SMALL_BLOCK, self.SMALL_H
    B, T, N, K = 2, 4 * bs, 4, 2
    q, k, v = rand_qkv(5, B, T, N, K, H, jnp.float32)
    idx = jnp.asarray(random_indices(6, B, K, 4, 3))
    a = block_sparse_attention(q, k, v, idx, block_size=bs, **self.kw)
    b = block_sparse_attention(q, k, v, jnp.repeat(idx, N // K, axis=1), block_size=bs, **self.kw)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)

  def test_gradients_match_masked_dense_autodiff(self, case):
    q, k, v, idx, lengths, bs = self._case(case, jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    idx, lengths = jnp.asarray(idx), jnp.asarray(lengths)

    def loss(fn):
      return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    got = jax.grad(loss(lambda q, k, v: block_sparse_attention(
        q, k, v, idx, lengths, block_size=bs, **self.kw)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: block_sparse_attention_reference(
        q, k, v, idx, lengths, block_size=bs)), argnums=(0, 1, 2))(q, k, v)
    for g in got:
      assert np.all(np.isfinite(np.asarray(g)))
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)

  def test_bf16_gradients_close(self):
    case = self.CASES[0]
    q, k, v, idx, lengths, bs = self._case(case, jnp.bfloat16, causal_only=True)
    idx, lengths = jnp.asarray(idx), jnp.asarray(lengths)
    f = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
    got = f(lambda q, k, v: block_sparse_attention(q, k, v, idx, lengths, block_size=bs,
                                                   **self.kw))(q, k, v)
    want = f(lambda q, k, v: block_sparse_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), idx, lengths,
        block_size=bs))(q, k, v)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), got), want,
                                **TOLERANCES[jnp.bfloat16])

  def test_empty_rows_are_zero_with_finite_gradients(self):
    bs, H = self.SMALL_BLOCK, self.SMALL_H
    B, T, N, K = 1, 3 * bs, 2, 1
    q, k, v = rand_qkv(7, B, T, N, K, H, jnp.float32)
    idx = np.full((B, N, 3, 2), -1, np.int32)
    idx[0, 0, 1] = [2, -1]           # only a block above the diagonal: nothing visible
    idx[0, 1, 2] = [0, 2]
    fn = lambda q: block_sparse_attention(q, k, v, jnp.asarray(idx), block_size=bs, **self.kw)
    out = np.asarray(fn(q))
    assert np.all(out[0, :2 * bs, :] == 0) and np.all(out[0, 2 * bs:, 0] == 0)
    assert np.all(np.abs(out[0, 2 * bs:, 1]) > 0)
    g = jax.grad(lambda q: jnp.sum(fn(q)))(q)
    assert np.all(np.isfinite(np.asarray(g)))

  def test_jit_with_traced_indices(self):
    bs, H = self.SMALL_BLOCK, self.SMALL_H
    B, T, N, K = 2, 3 * bs, 2, 1
    q, k, v = rand_qkv(8, B, T, N, K, H, jnp.float32)
    idx = jnp.asarray(random_indices(9, B, N, 3, 2))
    lengths = jnp.asarray([T, 2 * bs - 1], jnp.int32)
    fn = jax.jit(lambda *a: block_sparse_attention(*a, block_size=bs, **self.kw))
    chex.assert_trees_all_close(fn(q, k, v, idx, lengths),
                                block_sparse_attention_reference(q, k, v, idx, lengths,
                                                                 block_size=bs),
                                rtol=1e-5, atol=1e-5)


class TestXla(BlockSparseAttentionBase):
  pass


def test_rejects_bad_indices():
  q, k, v = rand_qkv(0, 1, 8, 2, 1, 8, jnp.float32)
  ok = jnp.asarray([[[[0, -1], [0, 1]]] * 2], jnp.int32)           # [1, 2, 2, 2]
  block_sparse_attention(q, k, v, ok, block_size=4)
  with pytest.raises(ValueError, match="shape"):
    block_sparse_attention(q, k, v, ok[:, :, :1], block_size=4)
  with pytest.raises(ValueError, match="ascending"):
    block_sparse_attention(q, k, v, ok.at[0, 0, 1].set(jnp.asarray([1, 0])), block_size=4)
  with pytest.raises(ValueError, match="padding"):
    block_sparse_attention(q, k, v, ok.at[0, 0, 0].set(jnp.asarray([-1, 0])), block_size=4)
  with pytest.raises(ValueError, match="entries"):
    block_sparse_attention(q, k, v, ok.at[0, 0, 0, 0].set(2), block_size=4)


def check_at_scale(impl, H, bs, config=None):
  """A GPU backend (with `config`) against the XLA backend in float32: 16 / 4 heads, T 2000
  ragged, ~30% random causal blocks per query head (diagonal kept), bf16; forward and the
  gradients of q, k, v, within 2% relative L2."""
  B, T, N, K = 2, 2000, 16, 4
  q, k, v = rand_qkv(H + bs, B, T, N, K, H, jnp.bfloat16)
  nb = -(-T // bs)
  rng = np.random.default_rng(bs)
  keep = (rng.random((B, N, nb, nb)) < 0.3) | np.eye(nb, dtype=bool)
  keep &= np.tri(nb, dtype=bool)
  idx = np.where(keep, np.arange(nb), nb)
  idx = np.sort(idx, axis=-1)
  idx = jnp.asarray(np.where(idx == nb, -1, idx).astype(np.int32))
  lengths = jnp.asarray([2000, 1337], jnp.int32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def run(impl, *x):
    f = lambda q, k, v: block_sparse_attention(q, k, v, idx, lengths, block_size=bs,
                                              implementation=impl,
                                              config=None if impl == "xla" else config)
    o, vjp = jax.vjp(f, *x)
    return (o, *vjp(w.astype(o.dtype)))

  got = run(impl, q, k, v)
  want = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
  for a, b in zip(got, want):
    rel = np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b)) / np.linalg.norm(b)
    assert rel < 2e-2, rel
