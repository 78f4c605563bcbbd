"""pallas_kernels.block_topk: one test base, subclassed once per backend; every backend gives
exactly the integers of an independent numpy loop (and of the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_topk import block_topk, block_topk_reference, output_width
from pallas_kernels.block_topk.pallas_triton import TritonConfig
from pallas_kernels.sparse_decode import live_slots

from ._oracle import BackendBase, generate_from_class, lower_for_cuda

pytest_generate_tests = generate_from_class


def numpy_topk(scores, lengths, block_size, k, local_tokens=1):
  """Independent loop oracle: forced first block and the blocks of the last local_tokens tokens,
  then best scores (ties: lower id)."""
  B, K, N = scores.shape
  out = []
  for b in range(B):
    nb = -(-int(lengths[b]) // block_size)
    rows = []
    for h in range(K):
      valid = [n for n in range(min(nb, N))]
      recent = {t // block_size for t in range(max(int(lengths[b]) - local_tokens, 0), int(lengths[b]))}
      forced = sorted(({0} | recent) & set(valid))
      rest = [n for n in valid if n not in forced]
      s = np.where(np.isnan(scores[b, h]), -np.inf, scores[b, h])
      rest.sort(key=lambda n: (-s[n], n))
      rows.append(sorted(forced + rest[:max(0, min(k, N) - len(forced))]))
    out.append(rows)
  return out


def random_scores(seed, B, K, N, ties=True):
  rng = np.random.default_rng(seed)
  s = rng.standard_normal((B, K, N)).astype(np.float32)
  if ties:  # repeated values, +-0, infinities and NaN
    s[..., 1::7] = 0.25
    s[0, 0, 2] = np.nan
    s[-1, -1, 3] = -np.inf
    s[0, -1, 4] = np.inf
    s[-1, 0, 5] = -0.0
  return s


# (B, K, N, block_size, lengths, k): ragged lengths (partial last blocks, one block only, fewer
# valid blocks than k), N not a power of 2, k a power of 2, k >= N
CASES = [
    (2, 3, 37, 16, [37 * 16, 200], 5),
    (3, 2, 64, 64, [64 * 64, 1, 65], 8),
    (2, 2, 100, 16, [1600, 300], 16),
    (1, 4, 2048, 64, [131072], 205),
    (2, 1, 20, 32, [640, 100], 40),
]



class BlockTopkBase(BackendBase):
  """What every implementation of block_topk must do, integer-exactly."""
  CASES = CASES

  def run(self, s, lengths, bs, k, **kw):
    return block_topk(jnp.asarray(s), jnp.asarray(lengths, jnp.int32), block_size=bs, k=k,
                      **self.kw, **kw)

  def check(self, s, lengths, bs, k, local_tokens=1, **kw):
    """ids and live counts equal the reference's and the numpy loop's; returns the ids."""
    L = jnp.asarray(lengths, jnp.int32)
    idx, n = self.run(s, lengths, bs, k, local_tokens=local_tokens, **kw)
    ref_idx, ref_n = block_topk_reference(jnp.asarray(s), L, block_size=bs, k=k,
                                          local_tokens=local_tokens)
    idx = np.asarray(idx)
    M = output_width(k, s.shape[-1])
    assert idx.shape == (*s.shape[:2], M) and M & (M - 1) == 0 and M > min(k, s.shape[-1])
    np.testing.assert_array_equal(idx, np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(n), np.asarray(ref_n))
    # the live count is what the sparse kernel would compute from the ids
    np.testing.assert_array_equal(np.asarray(n), np.asarray(live_slots(jnp.asarray(idx), L, bs)))
    want = numpy_topk(s, lengths, bs, k, local_tokens)
    for b in range(s.shape[0]):
      for h in range(s.shape[1]):
        got = [int(x) for x in idx[b, h] if x >= 0]
        assert got == want[b][h], (b, h)
        assert np.all(idx[b, h, len(got):] == -1)
    return idx

  def test_matches_numpy_exactly(self, case):
    B, K, N, bs, lengths, k = case
    self.check(random_scores(B * 1000 + N + k, B, K, N), lengths, bs, k)

  @pytest.mark.parametrize("local", [2, 17, 64, 130])
  def test_local_window_blocks_are_forced(self, local):
    """local_tokens: every block holding one of the last local_tokens tokens is kept whatever its
    score (lengths just past a block boundary, deep inside one, shorter than the window). The
    forced blocks get the lowest scores here, so only the rule can keep them."""
    B, K, N, bs, k = 4, 2, 50, 16, 12
    lengths = [33 * bs + 1, 20 * bs + 9, 5, 49 * bs + 2]
    s = random_scores(local, B, K, N, ties=False)
    for b, n in enumerate(lengths):
      for t in range(max(n - local, 0), n):
        s[b, :, t // bs] = -100.0 - t
    idx = self.check(s, lengths, bs, k, local_tokens=local)
    for b in range(B):
      recent = {t // bs for t in range(max(lengths[b] - local, 0), lengths[b])}
      assert recent <= set(idx[b, 0].tolist()), (b, recent)
    # the previous block is what local_tokens adds just past a boundary: without it, it is dropped
    plain = np.asarray(self.run(s, lengths, bs, k)[0])
    assert 32 not in plain[0, 0] and 32 in idx[0, 0]
    with pytest.raises(ValueError, match="forced"):
      self.run(s, lengths, bs, 2, local_tokens=local)

  def test_early_exit_and_full_search(self):
    """Rows where an exact search can stop early (distinct scores), never (ties straddling the
    k-th score: the lowest-id ties win), and at once (k = every valid block)."""
    rng = np.random.default_rng(7)
    N, bs, k = 256, 16, 40
    s = rng.uniform(-1.0, 0.5, (3, 2, N)).astype(np.float32)   # row (0, *): distinct scores
    s[1, :, 10:40] = 2.0                                        # rows (1, *): 30 above, then
    s[1, :, 100:120] = 1.0                                      # 20 tied for the last 10 places
    idx = self.check(s, [N * bs, N * bs, 40 * bs - 3], bs, k)   # row 2: exactly k valid blocks
    # the forced first and last blocks, the 30 scores of 2.0, then the lowest-id 8 of the 20 ties
    assert list(idx[1, 0, :k]) == [0, *range(10, 40), *range(100, 108), N - 1]

  def test_score_scales_and_distributions(self):
    """Tiny, huge, one-signed, heavy-tailed, two-valued and all-equal rows, with infinities and
    NaN, for every k."""
    rng = np.random.default_rng(11)
    N, bs = 300, 16
    rows = [rng.standard_normal(N) * 1e-30, rng.standard_normal(N) * 1e30,
            -np.abs(rng.standard_normal(N)) - 5.0, np.abs(rng.standard_normal(N)) + 3.0,
            rng.standard_cauchy(N), rng.choice([-1.0, 2.0], N), np.full(N, 0.5),
            np.where(rng.random(N) < 0.3, -np.inf, rng.standard_normal(N))]
    s = np.stack(rows).astype(np.float32)[None]                  # [1, 8, N]
    s[0, 4, 7] = np.nan
    s[0, 5, 9] = np.inf
    for k in (2, 3, 37, 150, 299, 300):
      self.check(s, [N * bs - 5], bs, k)


class TestXla(BlockTopkBase):
  pass


class TestPallasTritonInterpret(BlockTopkBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True

  @pytest.mark.parametrize("warps", [1, 8, 16])
  def test_num_warps_gives_the_same_ids(self, warps):
    self.check(random_scores(warps, 2, 2, 100), [1600, 300], 16, 16,
               config=TritonConfig(num_warps=warps))

  def test_rows_past_the_packed_prefix_sum_are_not_supported(self):
    """Rows longer than the kernel's packed prefix sum allows: NotSupported naming the limit;
    the default order then ends at the reference."""
    L = jnp.asarray([100], jnp.int32)
    long = jax.ShapeDtypeStruct((1, 1, (1 << 15) + 1), jnp.float32)
    with pytest.raises(ValueError, match="at most 32768 blocks"):
      jax.eval_shape(lambda x: block_topk(x, L, block_size=16, k=3, **self.kw), long)
    out = jax.eval_shape(lambda x: block_topk(x, L, block_size=16, k=3, interpret=True,
                                              implementation=("pallas_triton", "xla")), long)
    assert out[0].shape == (1, 1, 4)


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True


def test_validates():
  s = jnp.asarray(random_scores(0, 1, 1, 8))
  L = jnp.asarray([100], jnp.int32)
  with pytest.raises(ValueError, match="k must be"):
    block_topk(s, L, block_size=16, k=1)
  with pytest.raises(ValueError, match="scores_BKN must be 3-D"):
    block_topk(s[0], L, block_size=16, k=3)
  with pytest.raises(ValueError, match="lengths_B"):
    block_topk(s, jnp.asarray([1, 2]), block_size=16, k=3)
  with pytest.raises(ValueError, match="implementation"):
    block_topk(s, L, block_size=16, k=3, implementation="cuda")
  with pytest.raises(ValueError, match="num_warps must be a power of 2"):
    block_topk(s, L, block_size=16, k=3, implementation="pallas_triton", interpret=True,
               config=TritonConfig(num_warps=6))


def test_triton_kernel_lowers_for_cuda():
  s = jax.ShapeDtypeStruct((2, 8, 2048), jnp.float32)
  L = jax.ShapeDtypeStruct((2,), jnp.int32)
  text = lower_for_cuda(lambda a, b: block_topk(a, b, block_size=64, k=205,
                                                implementation="pallas_triton"), s, L)
  assert "xla.gpu.triton" in text and 'name = "block_topk"' in text
