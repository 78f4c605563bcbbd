"""block_sparse_attention's Pallas Triton kernels (forward, dq, dk / dv): the shared test base
(random block sets against a float64 loop and the masked dense reference, gradients against
autodiff of it; ragged lengths, GQA, per-head and per-group indices) in interpret mode on the
CPU and compiled under `pytest -m gpu`; all blocks == dense causal attention; the transposed
index lists; the Pallas -> Triton lowering of all three kernels for CUDA on any host."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (block_sparse_attention,
                                                   block_sparse_attention_reference)
from pallas_kernels.block_sparse_attention.pallas_triton import (TritonConfig,
                                                                 block_sparse_attention_fwd,
                                                                 halve_blocks, transpose_indices)
from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.dispatch import NotSupported
from pallas_kernels.flash_attention import flash_attention

from ._oracle import check_close, generate_from_class, lower_for_cuda
from .test_block_sparse_attention import (BlockSparseAttentionBase, check_at_scale, rand_qkv,
                                          random_indices)

pytest_generate_tests = generate_from_class

# (B, T, N, K, H, block_size, lengths, per_group): powers of 2 >= 16 for Triton tiles
CASES = [(2, 45, 4, 2, 16, 16, (45, 20), False), (1, 64, 6, 2, 32, 16, (64,), True),
         (3, 40, 3, 3, 16, 16, (40, 1, 27), False)]


def triangle(B, H, nb):
  """Every causal block (j <= i), -1 above the diagonal: int32 [B, H, nb, nb]."""
  j = np.arange(nb)
  tri = np.where(j[None, :] <= j[:, None], j[None, :], -1).astype(np.int32)
  return jnp.asarray(np.broadcast_to(tri, (B, H, nb, nb)))


class TestPallasTritonInterpret(BlockSparseAttentionBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True
  CASES = CASES
  SMALL_BLOCK, SMALL_H = 16, 16            # Triton tiles: powers of 2 >= 16

  @pytest.mark.slow
  def test_gradients_match_masked_dense_autodiff(self, case):
    super().test_gradients_match_masked_dense_autodiff(case)

  def test_gradients_per_group_gqa(self):
    """The default suite's gradient case: per-group indices, 3 query heads per KV head."""
    super().test_gradients_match_masked_dense_autodiff(CASES[1])

  @pytest.mark.slow
  def test_bf16_gradients_close(self):
    super().test_bf16_gradients_close()

  def test_all_blocks_is_dense_causal_attention(self):
    self._all_blocks(jnp.float32)

  @pytest.mark.slow
  def test_all_blocks_bf16(self):
    self._all_blocks(jnp.bfloat16)

  def _all_blocks(self, dtype):
    B, T, N, K, H, bs = 2, 40, 4, 2, 16, 16
    q, k, v = rand_qkv(3, B, T, N, K, H, dtype)
    nb = -(-T // bs)
    every = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, N, nb, nb))
    out = block_sparse_attention(q, k, v, every, block_size=bs, **self.kw)
    check_close(out, np.asarray(causal_attention(q, k, v, implementation="xla"), np.float64), dtype)
    lengths = jnp.asarray([29, 40], jnp.int32)
    out = block_sparse_attention(q, k, v, triangle(B, K, nb), lengths, block_size=bs, **self.kw)
    want = flash_attention(q, k, v, lengths, implementation="xla")
    check_close(out, np.asarray(jnp.asarray(want, jnp.float32), np.float64), dtype)

  @pytest.mark.parametrize("prefetch", [pytest.param(False, marks=pytest.mark.slow), True],
                           ids=["load", "prefetch"])
  def test_forward_lse_and_all_blocks_gradients(self, prefetch):
    """The forward kernel's lse is the rows' log-sum-exp (+inf past the length); with every
    causal block selected the kernels' gradients are dense causal attention's."""
    B, T, N, K, H, bs = 1, 56, 4, 2, 16, 16
    q, k, v = rand_qkv(11, B, T, N, K, H, jnp.float32)
    nb = -(-T // bs)
    lengths = jnp.asarray([50], jnp.int32)
    cfg = TritonConfig(prefetch_index=prefetch)
    idx = triangle(B, N, nb)
    o, lse = block_sparse_attention_fwd(q, k, v, idx, lengths, block_size=bs, interpret=True,
                                        config=cfg)
    G = N // K
    s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, G, axis=2)) * H ** -0.5
    t = np.arange(T)
    ok = (t[None, :] <= t[:, None]) & (t[None, :] < 50)
    want = jax.nn.logsumexp(jnp.where(ok, s, -jnp.inf), axis=-1)
    np.testing.assert_allclose(np.asarray(lse)[..., :50], np.asarray(want)[..., :50], rtol=1e-5)
    assert np.all(np.isposinf(np.asarray(lse)[..., 50:]))
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
    got = jax.grad(loss(lambda q, k, v: block_sparse_attention(
        q, k, v, idx, lengths, block_size=bs, config=cfg, **self.kw)), (0, 1, 2))(q, k, v)
    dense = jax.grad(loss(lambda q, k, v: flash_attention(q, k, v, lengths,
                                                          implementation="xla")), (0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(got, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True
  DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

  def test_auto_is_the_triton_kernel_where_the_mosaic_kernel_refuses(self):
    """16-token blocks: the Mosaic GPU forward (64-token blocks only) refuses, Triton runs."""
    q, k, v = rand_qkv(12, 1, 64, 2, 1, 64, jnp.bfloat16)
    idx = jnp.asarray(random_indices(13, 1, 2, 4, 2))
    lowered = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=16)).lower(
        q, k, v)
    assert "xla.gpu.triton" in lowered.as_text()

  @pytest.mark.parametrize("bs", [64, 128])
  @pytest.mark.parametrize("H", [64, 128, 256])
  def test_prefill_scale(self, H, bs):
    """16 / 4 heads, T 2000 ragged, ~30% random causal blocks per query head (diagonal kept),
    bf16: forward and gradients against the XLA backend in float32."""
    check_at_scale("pallas_triton", H, bs)


def test_transposed_lists_hold_each_selecting_query_block_once():
  """Every live (query head, query block) -> key block pair appears once in the key block's
  list, below-diagonal entries before the diagonal ones, -1 padded; counts match."""
  B, N, K, nb, bs = 2, 6, 2, 5, 16
  G = N // K
  idx = random_indices(4, B, N, nb, 4)
  lengths = np.asarray([80, 50])
  tidx, n_full, n_live = (np.asarray(x) for x in transpose_indices(
      jnp.asarray(idx), jnp.asarray(lengths, jnp.int32), K, bs))
  assert tidx.shape == (B, K, nb, G * nb)
  for b in range(B):
    for h in range(K):
      for j in range(nb):
        want = {(i, g) for g in range(G) for i in range(nb)
                if j in idx[b, h * G + g, i] and j <= i and i * bs < lengths[b]}
        row = tidx[b, h, j]
        live = row[:n_live[b, h, j]]
        assert np.all(row[n_live[b, h, j]:] == -1)
        got = [(r // G, r % G) for r in live]
        assert len(got) == len(set(got)) and set(got) == want
        assert all(i > j for i, _ in got[:n_full[b, h, j]])
        assert all(i == j for i, _ in got[n_full[b, h, j]:])


def test_refusals():
  q, k, v = rand_qkv(0, 1, 32, 2, 1, 24, jnp.float32)                # H=24: no Triton tile
  idx = jnp.zeros((1, 2, 2, 1), jnp.int32)
  with pytest.raises(NotSupported, match="head dim H=24"):
    block_sparse_attention(q, k, v, idx, block_size=16, implementation="pallas_triton",
                           interpret=True)
  q, k, v = rand_qkv(0, 1, 32, 2, 1, 16, jnp.float32)
  with pytest.raises(NotSupported, match="block_size=8"):
    block_sparse_attention(q, k, v, jnp.zeros((1, 2, 4, 1), jnp.int32), block_size=8,
                           implementation="pallas_triton", interpret=True)
  with pytest.raises(ValueError, match="num_warps"):
    block_sparse_attention(q, k, v, idx, block_size=16, implementation="pallas_triton",
                           interpret=True, config=TritonConfig(num_warps=3))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("H,bs,per_group", [(64, 64, False), (128, 64, True), (128, 128, False),
                                            (256, 64, False)])
def test_kernels_lower_for_cuda(dtype, H, bs, per_group):
  """Forward, dq and dk / dv kernels lower to Triton IR for CUDA (checked on CPU, without a
  GPU), through a gradient."""
  S = jax.ShapeDtypeStruct
  T, N, K = 1000, 8, 2
  nb = -(-T // bs)
  q, kv = S((1, T, N, H), dtype), S((1, T, K, H), dtype)
  n, idx = S((1,), jnp.int32), S((1, K if per_group else N, nb, 5), jnp.int32)
  f = lambda q, k, v, n, i: block_sparse_attention(q, k, v, i, n, block_size=bs,
                                                   implementation="pallas_triton")
  g = lambda q, k, v, n, i: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, n, i).astype(
      jnp.float32)), (0, 1, 2))(q, k, v)
  text = lower_for_cuda(g, q, kv, kv, n, idx)
  assert "xla.gpu.triton" in text
  for name in ("block_sparse_attention_fwd", "block_sparse_attention_dq",
               "block_sparse_attention_dkv"):
    assert f'name = "{name}"' in text, name


def test_halve_blocks_selects_the_same_token_pairs():
  """A selection in blocks of 8 and its `halve_blocks` form in blocks of 4 attend to the same
  keys (the XLA backend's outputs agree), some blocks above the diagonal included."""
  B, T, N, K, H, bs = 2, 29, 2, 1, 8, 8
  q, k, v = rand_qkv(21, B, T, N, K, H, jnp.float32)
  idx = jnp.asarray(random_indices(22, B, N, 4, 3))
  lengths = jnp.asarray([29, 13], jnp.int32)
  half = halve_blocks(idx)
  assert half.shape == (B, N, 8, 6)
  a = block_sparse_attention(q, k, v, idx, lengths, block_size=bs, implementation="xla")
  b = block_sparse_attention(q, k, v, half, lengths, block_size=bs // 2, implementation="xla")
  chex.assert_trees_all_close(a, b, atol=1e-6, rtol=1e-6)


def test_gradients_at_h256_with_128_token_blocks():
  """H 256 with 128-token blocks runs the backward in 64-token blocks (the 128-row tiles exceed
  the H100's shared memory): bf16 gradients against the XLA backend's in float32 on the same
  inputs (interpret mode, ragged T)."""
  B, T, N, K, H, bs = 1, 300, 2, 1, 256, 128
  q, k, v = rand_qkv(23, B, T, N, K, H, jnp.bfloat16)
  idx = jnp.asarray(random_indices(24, B, N, 3, 2, causal_only=True))
  idx = idx.at[..., 0].set(jnp.maximum(idx[..., 0], 0))        # every row sees something

  def grads(impl, dtype, **kw):
    f = lambda q, k, v: jnp.sum(jnp.sin(block_sparse_attention(
        q, k, v, idx, block_size=bs, implementation=impl, **kw).astype(jnp.float32)))
    x = [a.astype(dtype) for a in (q, k, v)]
    return [g.astype(jnp.float32) for g in jax.grad(f, argnums=(0, 1, 2))(*x)]

  got, want = grads("pallas_triton", jnp.bfloat16, interpret=True), grads("xla", jnp.float32)
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(w))) > 0.1
    chex.assert_trees_all_close(g, w, atol=3e-2, rtol=3e-2)
