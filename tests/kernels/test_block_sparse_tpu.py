"""block_sparse_attention's Pallas Mosaic TPU kernels (forward, dq, dk / dv) in the TPU
interpreter: the shared test base (random block sets against a float64 loop and the masked dense
reference, gradients against autodiff of it; ragged lengths, GQA, per-head and per-group
indices; all blocks == dense causal attention; empty rows), plus the lse the forward kernel
saves, dead slots that must not be read, and the block-size refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention import pallas_mosaic_tpu as tpu
from pallas_kernels.dispatch import NotSupported

from ._oracle import generate_from_class
from .test_block_sparse_attention import BlockSparseAttentionBase, oracle, rand_qkv, random_indices

pytest_generate_tests = generate_from_class


class TestPallasMosaicTPUInterpret(BlockSparseAttentionBase):
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_tpu", True
  # (B, T, N, K, H, block_size, lengths, per_group): block sizes a multiple of 8
  CASES = [(2, 21, 4, 2, 16, 8, (21, 9), False), (1, 32, 2, 1, 8, 8, (32,), True),
           (3, 37, 3, 3, 8, 16, (37, 1, 12), False), (2, 24, 6, 2, 8, 8, (17, 24), True)]
  SMALL_BLOCK = 8                          # the TPU's sublane tile

  @pytest.mark.slow
  def test_gradients_match_masked_dense_autodiff(self, case):
    super().test_gradients_match_masked_dense_autodiff(case)

  def test_gradients_per_group_gqa_ragged(self):
    """The default suite's gradient case: per-group indices, 3 query heads per KV head, ragged."""
    super().test_gradients_match_masked_dense_autodiff(self.CASES[3])


def test_forward_saves_the_rows_log_sum_exp():
  """lse [B, N, Tp, 1]: the natural log-sum-exp of each row's visible scores; +inf on rows past
  the length and on rows whose selection holds no visible key."""
  B, T, N, K, H, bs = 1, 28, 2, 1, 8, 8
  q, k, v = rand_qkv(3, B, T, N, K, H, jnp.float32)
  idx = np.asarray(random_indices(4, B, N, 4, 3))
  idx[0, 1, 2] = [3, -1, -1]        # above the diagonal only: rows 16-23 of head 1 see nothing
  lengths = np.asarray([26], np.int32)
  _, lse = tpu.forward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=bs,
                       interpret=True)
  lse = np.asarray(lse)[..., 0]
  assert lse.shape == (B, N, 32)
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for n in range(N):
    for t in range(32):
      keys = [s for j in idx[0, n, t // bs] if j >= 0 for s in range(j * bs, (j + 1) * bs)
              if s <= t < lengths[0]]
      if not keys:
        assert lse[0, n, t] == np.inf, (n, t)
        continue
      s = kn[0, keys, 0] @ qn[0, t, n] / np.sqrt(H)
      want = s.max() + np.log(np.exp(s - s.max()).sum())
      np.testing.assert_allclose(lse[0, n, t], want, rtol=1e-5, atol=1e-5)


def test_dead_slots_are_not_read():
  """A block listed above the diagonal is a dead slot: it contributes nothing and is never read,
  even where it holds NaN (a NaN read anywhere would survive the 0 weights of the mask)."""
  B, T, N, K, H, bs = 1, 40, 2, 1, 8, 8
  q, k, v = rand_qkv(10, B, T, N, K, H, jnp.float32)
  idx = np.full((B, N, 5, 3), -1, np.int32)
  for i in range(4):
    idx[0, :, i, :2] = [0, i] if i else [0, -1]
  idx[0, :, 1, 2] = 4               # block 4, above row block 1's diagonal
  idx[0, :, 4, :2] = [0, 1]         # row block 4 skips its own block: nobody sees block 4
  poisoned = lambda x: x.at[:, 32:].set(jnp.nan)
  out = block_sparse_attention(q, poisoned(k), poisoned(v), jnp.asarray(idx), block_size=bs,
                               implementation="pallas_mosaic_tpu", interpret=True)
  want = oracle(q, k, v, idx, np.asarray([T]), bs)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_block_size_not_a_multiple_of_8_is_refused():
  q, k, v = rand_qkv(0, 1, 12, 2, 1, 8, jnp.float32)
  idx = jnp.asarray(random_indices(1, 1, 2, 3, 2))
  with pytest.raises(NotSupported, match="multiple of 8"):
    block_sparse_attention(q, k, v, idx, block_size=4, implementation="pallas_mosaic_tpu",
                           interpret=True)
  with pytest.raises(NotSupported, match="TPU"):
    block_sparse_attention(q, k, v, idx, block_size=4, implementation="pallas_mosaic_tpu")
