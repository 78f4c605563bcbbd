"""pallas_kernels.block_topk.prefix_topk (the prefill selectors' top-k): one test base, subclassed
per backend; every backend gives exactly the integers of an independent numpy loop, and
`select_nz_ratio` gives the same selection through each backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.sparse.prefill_selection import select_nz_ratio
from pallas_kernels.block_topk import prefix_topk
from pallas_kernels.block_topk.pallas_triton import TritonConfig

from ._oracle import BackendBase, generate_from_class, lower_for_cuda

pytest_generate_tests = generate_from_class
F32_MAX = np.finfo(np.float32).max


def numpy_prefix_topk(s, n_valid, count, width):
  """Loop oracle: per row the min(count, width) best of the first n_valid scores (+inf first,
  NaN as -inf, ties to the lower id), ascending, -1 padded to width."""
  out = np.full((s.shape[0], width), -1, np.int64)
  for r in range(s.shape[0]):
    row = np.where(np.isnan(s[r]), -np.inf, s[r]).astype(np.float64)
    ids = sorted(range(min(int(n_valid[r]), s.shape[1])), key=lambda j: (-row[j], j))
    keep = sorted(ids[:max(0, min(int(count[r]), width))])
    out[r, :len(keep)] = keep
  return out


def random_rows(seed, R, N, ties=True):
  rng = np.random.default_rng(seed)
  s = rng.standard_normal((R, N)).astype(np.float32)
  if ties:  # repeated values, +-0, infinities (forced blocks are +inf) and NaN
    s[:, 1::5] = 0.25
    s[:, 2::9] = np.where(rng.random(s[:, 2::9].shape) < 0.5, 0.0, -0.0)
    f = min(3, N)
    s[:, :f] = np.where(rng.random((R, f)) < 0.4, np.inf, s[:, :f])
    s[rng.random((R, N)) < 0.03] = np.nan
    s[rng.random((R, N)) < 0.03] = -np.inf
  return s


# (R, N, width): N not a power of 2, N a power of 2, width >= N, one-block rows
CASES = [(40, 37, 8), (64, 64, 13), (24, 100, 16), (16, 512, 52), (12, 20, 40), (9, 1, 1)]


class PrefixTopkBase(BackendBase):
  """What every implementation of prefix_topk must do, integer-exactly."""
  CASES = CASES

  def check(self, s, n_valid, count, width, **kw):
    idx = np.asarray(prefix_topk(jnp.asarray(s), jnp.asarray(n_valid, jnp.int32),
                                 jnp.asarray(count, jnp.int32), width=width, **self.kw, **kw))
    assert idx.shape == (s.shape[0], width) and idx.dtype == np.int32
    np.testing.assert_array_equal(idx, numpy_prefix_topk(s, n_valid, count, width))
    return idx

  def test_matches_numpy_exactly(self, case):
    R, N, width = case
    rng = np.random.default_rng(R * 100 + N)
    n_valid = rng.integers(0, N + 1, R)            # ragged prefixes, empty rows, full rows
    n_valid[:2] = [0, N]
    count = rng.integers(0, width + 3, R)          # 0, within, and past the width
    self.check(random_rows(N + width, R, N), n_valid, count, width)

  def test_ties_straddling_the_kth_score(self):
    """30 scores above, then 20 ties for the last 10 places: the lowest-id ties win; a row with
    exactly count valid blocks takes them all at once."""
    N = 256
    s = np.random.default_rng(7).uniform(-1.0, 0.5, (3, N)).astype(np.float32)
    s[1, 10:40] = 2.0
    s[1, 100:120] = 1.0
    idx = self.check(s, [N, N, 40], [40, 40, 40], 48)
    assert list(idx[1, :40]) == [*range(10, 40), *range(100, 110)]

  def test_score_scales_and_distributions(self):
    rng = np.random.default_rng(11)
    N = 300
    rows = [rng.standard_normal(N) * 1e-30, rng.standard_normal(N) * 1e30,
            -np.abs(rng.standard_normal(N)) - 5.0, rng.standard_cauchy(N),
            rng.choice([-1.0, 2.0], N), np.full(N, 0.5), np.full(N, F32_MAX),
            np.where(rng.random(N) < 0.3, -np.inf, rng.standard_normal(N))]
    s = np.stack(rows).astype(np.float32)
    for count in (1, 3, 37, 150, 299, 300):
      self.check(s, [N, N - 5, 200, N, 1, N, N, 250], [count] * len(rows), 300)

  def test_select_nz_ratio_through_the_backend(self):
    """The prefill selector on random gate scores (ragged lengths, dense rows, sink and local
    blocks) selects the same blocks through this backend as through XLA."""
    rng = np.random.default_rng(3)
    scores = jnp.asarray(rng.standard_normal((2, 3, 24, 24)), jnp.float32)
    lengths = jnp.asarray([24 * 8, 13 * 8 - 3], jnp.int32)
    for kw in (dict(), dict(dense_rows=2), dict(sink_blocks=1, local_blocks=3)):
      want = select_nz_ratio(scores, lengths, 8, 0.3, **kw)
      got = select_nz_ratio(scores, lengths, 8, 0.3, **kw, **self.kw)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class TestXla(PrefixTopkBase):
  pass


class TestPallasTritonInterpret(PrefixTopkBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True

  @pytest.mark.parametrize("warps", [1, 8])
  def test_num_warps_gives_the_same_ids(self, warps):
    self.check(random_rows(warps, 8, 100), [100, 50, 0, 99, 1, 100, 64, 3], [16] * 8, 16,
               config=TritonConfig(num_warps=warps))


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True


def test_validates():
  s = jnp.zeros((4, 8), jnp.float32) + 1.0
  n = jnp.full((4,), 8, jnp.int32)
  with pytest.raises(ValueError, match="scores_RN must be floating"):
    prefix_topk(s[None], n, n, width=4)
  with pytest.raises(ValueError, match="count_R must be integer"):
    prefix_topk(s, n, n.astype(jnp.float32), width=4)
  with pytest.raises(ValueError, match="n_valid_R must be integer"):
    prefix_topk(s, n[:3], n, width=4)
  with pytest.raises(ValueError, match="width must be a positive int"):
    prefix_topk(s, n, n, width=0)
  with pytest.raises(ValueError, match="implementation"):
    prefix_topk(s, n, n, width=4, implementation="cuda")


def test_triton_kernel_lowers_for_cuda():
  s = jax.ShapeDtypeStruct((16384, 512), jnp.float32)
  n = jax.ShapeDtypeStruct((16384,), jnp.int32)
  text = lower_for_cuda(lambda a, b, c: prefix_topk(a, b, c, width=52,
                                                    implementation="pallas_triton"), s, n, n)
  assert "xla.gpu.triton" in text and 'name = "prefix_topk"' in text
