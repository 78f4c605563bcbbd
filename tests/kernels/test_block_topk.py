"""pallas_kernels.block_topk: the Triton selection kernel gives exactly the reference's integers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_topk import block_topk, block_topk_reference
from pallas_kernels.sparse_decode import live_slots

from ._oracle import lower_for_cuda, require_backend

KERNELS = [
    pytest.param(True, id="triton-interpret"),
    pytest.param(False, id="triton-gpu", marks=pytest.mark.gpu),
]


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


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("B,K,N,bs,lengths,k", CASES)
def test_kernel_matches_reference_exactly(interpret, B, K, N, bs, lengths, k):
  require_backend("pallas_triton", interpret)
  s = random_scores(B * 1000 + N + k, B, K, N)
  L = jnp.asarray(lengths, jnp.int32)
  ref_idx, ref_n = block_topk_reference(jnp.asarray(s), L, block_size=bs, k=k)
  idx, n = block_topk(jnp.asarray(s), L, block_size=bs, k=k, implementation="pallas_triton",
                      interpret=interpret)
  idx, ref_idx = np.asarray(idx), np.asarray(ref_idx)
  M = ref_idx.shape[-1]
  assert idx.shape[-1] > M and idx.shape[-1] & (idx.shape[-1] - 1) == 0
  np.testing.assert_array_equal(idx[..., :M], ref_idx)
  assert np.all(idx[..., M:] == -1)
  np.testing.assert_array_equal(n, ref_n)
  # the live count is what the sparse kernel would compute from the ids
  np.testing.assert_array_equal(n, live_slots(jnp.asarray(idx), L, bs))
  want = numpy_topk(s, lengths, bs, k)
  for b in range(B):
    for h in range(K):
      got = [int(x) for x in ref_idx[b, h] if x >= 0]
      assert got == want[b][h], (b, h)


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("local", [2, 17, 64, 130])
def test_local_window_blocks_are_forced(interpret, local):
  """local_tokens: every block holding one of the last local_tokens tokens is kept whatever its
  score (lengths just past a block boundary, deep inside one, shorter than the window), the
  kernel giving the reference's ids. The forced blocks get the lowest scores here, so only the
  rule can keep them."""
  require_backend("pallas_triton", interpret)
  B, K, N, bs, k = 4, 2, 50, 16, 12
  lengths = [33 * bs + 1, 20 * bs + 9, 5, 49 * bs + 2]
  s = random_scores(local, B, K, N, ties=False)
  for b, n in enumerate(lengths):
    for t in range(max(n - local, 0), n):
      s[b, :, t // bs] = -100.0 - t
  L = jnp.asarray(lengths, jnp.int32)
  ref_idx, ref_n = block_topk_reference(jnp.asarray(s), L, block_size=bs, k=k, local_tokens=local)
  idx, n = block_topk(jnp.asarray(s), L, block_size=bs, k=k, implementation="pallas_triton",
                      interpret=interpret, local_tokens=local)
  np.testing.assert_array_equal(np.asarray(idx)[..., :k], np.asarray(ref_idx))
  np.testing.assert_array_equal(n, ref_n)
  want = numpy_topk(s, lengths, bs, k, local)
  for b in range(B):
    for h in range(K):
      got = [int(x) for x in np.asarray(ref_idx)[b, h] if x >= 0]
      assert got == want[b][h], (b, h)
      recent = {t // bs for t in range(max(lengths[b] - local, 0), lengths[b])}
      assert recent <= set(got), (b, h, recent, got)
  # the previous block is what local_tokens adds just past a boundary: without it, it is dropped
  plain = np.asarray(block_topk_reference(jnp.asarray(s), L, block_size=bs, k=k)[0])
  assert 32 not in plain[0, 0] and 32 in np.asarray(ref_idx)[0, 0]
  with pytest.raises(ValueError, match="forced"):
    block_topk(jnp.asarray(s), L, block_size=bs, k=2, local_tokens=local)


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("warps", [1, 8, 16])
def test_num_warps_override_gives_the_same_ids(interpret, warps):
  require_backend("pallas_triton", interpret)
  B, K, N, bs, lengths, k = 2, 2, 100, 16, [1600, 300], 16
  s = jnp.asarray(random_scores(warps, B, K, N))
  L = jnp.asarray(lengths, jnp.int32)
  ref_idx, ref_n = block_topk_reference(s, L, block_size=bs, k=k)
  idx, n = block_topk(s, L, block_size=bs, k=k, implementation="pallas_triton",
                      interpret=interpret, num_warps=warps)
  np.testing.assert_array_equal(np.asarray(idx)[..., :ref_idx.shape[-1]], np.asarray(ref_idx))
  np.testing.assert_array_equal(n, ref_n)


@pytest.mark.parametrize("interpret", KERNELS)
def test_early_exit_and_full_search_give_the_reference_ids(interpret):
  """The key search stops once exactly k keys sit at or above the bracket's low end; rows where
  that happens early (distinct scores), never (ties straddling the k-th score: the bracket
  shrinks to one key, then the lowest-id ties), and at once (k = every valid block) must all
  match the reference."""
  require_backend("pallas_triton", interpret)
  rng = np.random.default_rng(7)
  N, bs, k = 256, 16, 40
  s = rng.uniform(-1.0, 0.5, (3, 2, N)).astype(np.float32)   # row (0, *): distinct scores
  s[1, :, 10:40] = 2.0                                        # rows (1, *): 30 above, then
  s[1, :, 100:120] = 1.0                                      # 20 tied for the last 10 places
  L = jnp.asarray([N * bs, N * bs, 40 * bs - 3], jnp.int32)   # row 2: exactly k valid blocks
  ref_idx, ref_n = block_topk_reference(jnp.asarray(s), L, block_size=bs, k=k)
  idx, n = block_topk(jnp.asarray(s), L, block_size=bs, k=k, implementation="pallas_triton",
                      interpret=interpret)
  np.testing.assert_array_equal(np.asarray(idx)[..., :k], np.asarray(ref_idx))
  np.testing.assert_array_equal(n, ref_n)
  # the forced first and last blocks, the 30 scores of 2.0, then the lowest-id 8 of the 20 ties
  assert list(np.asarray(idx)[1, 0, :k]) == [0, *range(10, 40), *range(100, 108), N - 1]


@pytest.mark.parametrize("interpret", KERNELS)
def test_search_over_score_scales_and_distributions(interpret):
  """Rows whose scores span tiny, huge, one-signed, heavy-tailed, two-valued and all-equal
  ranges, with infinities and NaN: the bracket search (whose first cuts span more than 2^31
  keys) must give the reference's ids for every k."""
  require_backend("pallas_triton", interpret)
  rng = np.random.default_rng(11)
  N, bs = 300, 16
  rows = [rng.standard_normal(N) * 1e-30, rng.standard_normal(N) * 1e30,
          -np.abs(rng.standard_normal(N)) - 5.0, np.abs(rng.standard_normal(N)) + 3.0,
          rng.standard_cauchy(N), rng.choice([-1.0, 2.0], N), np.full(N, 0.5),
          np.where(rng.random(N) < 0.3, -np.inf, rng.standard_normal(N))]
  s = np.stack(rows).astype(np.float32)[None]                  # [1, 8, N]
  s[0, 4, 7] = np.nan
  s[0, 5, 9] = np.inf
  L = jnp.asarray([N * bs - 5], jnp.int32)
  for k in (2, 3, 37, 150, 299, 300):
    ref_idx, ref_n = block_topk_reference(jnp.asarray(s), L, block_size=bs, k=k)
    idx, n = block_topk(jnp.asarray(s), L, block_size=bs, k=k, implementation="pallas_triton",
                        interpret=interpret)
    np.testing.assert_array_equal(np.asarray(idx)[..., :ref_idx.shape[-1]], np.asarray(ref_idx),
                                  err_msg=f"k={k}")
    np.testing.assert_array_equal(n, ref_n)


def test_auto_is_xla_on_cpu_and_validates():
  s = jnp.asarray(random_scores(0, 1, 1, 8))
  L = jnp.asarray([100], jnp.int32)
  if jax.default_backend() == "cpu":
    assert block_topk(s, L, block_size=16, k=3)[0].shape == (1, 1, 3)
  with pytest.raises(ValueError, match="k must be"):
    block_topk(s, L, block_size=16, k=1)
  with pytest.raises(ValueError, match="scores_BKN must be 3-D"):
    block_topk(s[0], L, block_size=16, k=3)
  with pytest.raises(ValueError, match="lengths_B"):
    block_topk(s, jnp.asarray([1, 2]), block_size=16, k=3)
  with pytest.raises(ValueError, match="implementation"):
    block_topk(s, L, block_size=16, k=3, implementation="cuda")
  with pytest.raises(ValueError, match="num_warps must be a power of 2"):
    block_topk(s, L, block_size=16, k=3, num_warps=6)
  # rows longer than the kernel's packed prefix sum allows: a clear error, and auto uses xla
  long = jax.ShapeDtypeStruct((1, 1, (1 << 15) + 1), jnp.float32)
  with pytest.raises(ValueError, match="at most 32768 blocks"):
    jax.eval_shape(lambda x: block_topk(x, L, block_size=16, k=3, implementation="pallas_triton"), long)
  assert jax.eval_shape(lambda x: block_topk(x, L, block_size=16, k=3), long)[0].shape == (1, 1, 3)


def test_triton_kernel_lowers_for_cuda():
  s = jax.ShapeDtypeStruct((2, 8, 2048), jnp.float32)
  L = jax.ShapeDtypeStruct((2,), jnp.int32)
  text = lower_for_cuda(lambda a, b: block_topk(a, b, block_size=64, k=205,
                                                implementation="pallas_triton"), s, L)
  assert "xla.gpu.triton" in text and 'name = "block_topk"' in text
