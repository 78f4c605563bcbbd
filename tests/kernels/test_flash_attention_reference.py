"""pallas_kernels.flash_attention: causal attention and SeerAttention's block-level target against
a float64 loop over heads, query blocks and key blocks (ragged lengths, GQA, T not a block
multiple). One test base, subclassed per backend."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.flash_attention import flash_attention

from ._oracle import TOLERANCES, BackendBase, check_close, generate_from_class

pytest_generate_tests = generate_from_class


def oracle(q, k, v, lengths, bs):
  """float64: o [B, T, N, H] (zero rows at t >= length) and target [B, N, nQ, nK]."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  nb = -(-T // bs)
  o = np.zeros((B, T, N, H))
  target = np.zeros((B, N, nb, nb))
  for b in range(B):
    L = int(lengths[b])
    for n in range(N):
      p = np.zeros((T, T))
      for t in range(min(L, T)):
        s = k[b, :t + 1, n // G] @ q[b, t, n] / np.sqrt(H)
        e = np.exp(s - s.max())
        p[t, :t + 1] = e / e.sum()
        o[b, t, n] = p[t, :t + 1] @ v[b, :t + 1, n // G]
      for i in range(nb):
        rows = range(i * bs, min((i + 1) * bs, L))
        if not len(rows):
          continue
        for j in range(i + 1):
          target[b, n, i, j] = max(p[t, j * bs:(j + 1) * bs].max() for t in rows)
        target[b, n, i] /= target[b, n, i].sum()
  return o, target


def rand_qkv(case, dtype):
  B, T, N, K, H = case[:5]
  rng = np.random.default_rng(sum(case[:5]))
  return tuple(jnp.asarray(rng.standard_normal(s), dtype)
               for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))


class FlashAttentionBase(BackendBase):
  # (B, T, N, K, H, block_size, lengths): ragged, T not a block multiple, GQA groups 1 / 2 / 3
  CASES = [(2, 21, 4, 2, 16, 8, (21, 10)), (1, 32, 3, 1, 8, 16, (32,)),
           (3, 19, 2, 2, 8, 4, (19, 1, 8))]
  DTYPES = (jnp.float32, jnp.bfloat16)
  # the target block size and head dim of test_jits (raised by backends with tile limits)
  SMALL_BLOCK, SMALL_H = 4, 8

  def test_output_and_target_match_oracle(self, dtype, case):
    bs, lengths = case[5], jnp.asarray(case[6], jnp.int32)
    q, k, v = rand_qkv(case, dtype)
    o, target = flash_attention(q, k, v, lengths, block_size=bs, **self.kw)
    want_o, want_t = oracle(q, k, v, case[6], bs)
    B, T, N, H = q.shape
    nb = -(-T // bs)
    assert o.shape == (B, T, N, H) and o.dtype == dtype
    assert target.shape == (B, N, nb, nb) and target.dtype == jnp.float32
    check_close(o, want_o, dtype)
    # the target comes from float32 probabilities whatever the input dtype: only the rounding
    # of q and k (already in want's inputs) differs
    chex.assert_trees_all_close(np.asarray(target), want_t.astype(np.float32),
                                **TOLERANCES[jnp.float32])

  def test_target_is_a_distribution_over_visible_blocks(self, case):
    bs, lengths = case[5], np.asarray(case[6])
    q, k, v = rand_qkv(case, jnp.float32)
    _, target = flash_attention(q, k, v, jnp.asarray(lengths), block_size=bs, **self.kw)
    t = np.asarray(target)
    nb = t.shape[-1]
    i, j = np.arange(nb)[:, None], np.arange(nb)[None]
    assert np.all(t[..., j > i] == 0) and np.all(t >= 0)
    row_valid = (np.arange(nb)[None] * bs < lengths[:, None])[:, None, :]  # [B, 1, nQ]
    sums = t.sum(-1)
    np.testing.assert_allclose(sums[np.broadcast_to(row_valid, sums.shape)], 1.0, rtol=1e-5)
    assert np.all(sums[~np.broadcast_to(row_valid, sums.shape)] == 0)

  def test_full_lengths_match_causal_attention(self, dtype):
    case = (2, 24, 4, 2, 16)
    q, k, v = rand_qkv(case, dtype)
    o = flash_attention(q, k, v, **self.kw)
    check_close(o, np.asarray(causal_attention(q, k, v, implementation="xla"), np.float64), dtype)
    o2, _ = flash_attention(q, k, v, jnp.full((2,), 24, jnp.int32), block_size=8, **self.kw)
    chex.assert_trees_all_equal(o, o2)

  def test_jits(self):
    bs = self.SMALL_BLOCK
    q, k, v = rand_qkv((2, 3 * bs, 2, 1, self.SMALL_H), jnp.float32)
    lengths = jnp.asarray([3 * bs, bs + 1], jnp.int32)
    fn = jax.jit(lambda q, k, v, n: flash_attention(q, k, v, n, block_size=bs, **self.kw))
    chex.assert_trees_all_close(fn(q, k, v, lengths),
                                flash_attention(q, k, v, lengths, block_size=bs, **self.kw),
                                rtol=1e-6, atol=1e-6)


class TestXla(FlashAttentionBase):
  pass


def test_rejects_bad_arguments():
  q = jnp.ones((1, 4, 6, 8))
  with pytest.raises(ValueError, match="must divide"):
    flash_attention(q, jnp.ones((1, 4, 4, 8)), jnp.ones((1, 4, 4, 8)))
  kv = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="lengths_B"):
    flash_attention(q, kv, kv, jnp.asarray([5]))
  with pytest.raises(ValueError, match="block_size"):
    flash_attention(q, kv, kv, block_size=0)
  with pytest.raises(ValueError, match="implementation"):
    flash_attention(q, kv, kv, implementation="cuda")
