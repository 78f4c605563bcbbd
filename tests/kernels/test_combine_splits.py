"""pallas_kernels.combine_splits: one test base, subclassed once per backend, against a float64
log-sum-exp merge of random partials (garbage in the padding rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.combine_splits import combine_splits
from pallas_kernels.combine_splits import pallas_triton as triton_combine
from pallas_kernels.combine_splits.pallas_triton import TritonConfig
from pallas_kernels.online_softmax import MASK_VALUE

from ._oracle import TOLERANCES, BackendBase, generate_from_class, lower_for_cuda

pytest_generate_tests = generate_from_class


def random_partials(seed: int, B: int, K: int, N: int, R: int, g: int, H: int):
  """Random split partials (o f32 [B, K, N, R, H], m / l f32 [B, K, N, R]) as the split kernels
  leave them, for rows [0, g): random accumulators, maxima and positive sums (never zeros); some
  splits empty for every row, some for a few rows only (o = 0, l = 0, m = MASK_VALUE, what
  `attend_block` gives a split with no valid key); when B * K > 1, every split of (b, k) = (0, 0)
  empty. Rows >= g hold NaN / +-inf garbage, which the split kernels never overwrite."""
  rng = np.random.default_rng(seed)
  o = rng.standard_normal((B, K, N, R, H)).astype(np.float32)
  m = (3.0 * rng.standard_normal((B, K, N, R))).astype(np.float32)
  l = rng.uniform(0.5, 8.0, (B, K, N, R)).astype(np.float32)
  empty = rng.random((B, K, N, 1)) < 0.2                   # whole splits
  empty = empty | (rng.random((B, K, N, R)) < 0.05)        # single rows of a split
  if B * K > 1:
    empty[0, 0] = True
  o[np.broadcast_to(empty[..., None], o.shape)] = 0.0
  m[empty] = MASK_VALUE
  l[empty] = 0.0
  # garbage in the padding rows: NaN accumulators, +inf / NaN maxima, inf / NaN sums
  o[:, :, :, g:] = np.nan
  m[:, :, :, g::2] = np.inf
  m[:, :, :, g + 1::2] = np.nan
  l[:, :, :, g::2] = np.nan
  l[:, :, :, g + 1::2] = np.inf
  return jnp.asarray(o), jnp.asarray(m), jnp.asarray(l)


# (B, K, N, R, g, H): N = 1, ragged N (3, 5, 66), a power-of-2 N (64), g = 1 / 4 / 8 with the
# dot padding R = 16 (and once R = 32), the multi-token extend layout g = R = 128.
CASES = [
    (2, 2, 1, 16, 1, 64),
    (1, 3, 3, 16, 4, 128),
    (2, 1, 5, 32, 8, 64),
    (1, 2, 64, 16, 4, 128),
    (2, 2, 66, 16, 1, 128),
    (1, 2, 66, 16, 8, 64),
    (2, 1, 5, 128, 128, 64),
    (1, 1, 3, 128, 128, 128),
]


def merge_oracle(o, m, l, g: int) -> np.ndarray:
  """float64 merge of rows [0, g): sum_n exp(m_n - max m) o_n / sum_n exp(m_n - max m) l_n."""
  o, m, l = (np.asarray(x, np.float64)[:, :, :, :g] for x in (o, m, l))
  w = np.exp(m - m.max(axis=2, keepdims=True))
  num = (w[..., None] * o).sum(axis=2)
  den = (w * l).sum(axis=2)[..., None]
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


class CombineBase(BackendBase):
  """What every implementation of combine_splits must do."""
  CASES = CASES
  DTYPES = (jnp.float32, jnp.bfloat16)

  def run(self, o, m, l, g, dtype, **kw):
    return combine_splits(o, m, l, g, dtype, **self.kw, **kw)

  def test_matches_oracle(self, case, dtype):
    B, K, N, R, g, H = case
    o, m, l = random_partials(B * 100 + N * 10 + g, B, K, N, R, g, H)
    got = self.run(o, m, l, g, dtype)
    assert got.shape == (B, K, g, H) and got.dtype == dtype
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, merge_oracle(o, m, l, g).astype(np.float32),
                               **TOLERANCES[dtype])
    if B * K > 1:  # every split of (0, 0) empty: zeros, not NaN
      assert np.all(got[0, 0] == 0.0)


class TestXla(CombineBase):
  pass


class TestPallasTritonInterpret(CombineBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True

  @pytest.mark.parametrize("N,R,g,chunk,block_rows", [
      (7, 16, 8, 1, 8), (7, 16, 8, 2, 4), (7, 16, 8, 4, 2), (7, 16, 8, 64, 1), (5, 128, 128, 2, 32),
  ])
  def test_chunk_and_row_tiles_give_the_same_result(self, N, R, g, chunk, block_rows):
    """N = 7: a loop of whole chunks plus a ragged tail (chunk 2, 4), one split per step (chunk
    1), a chunk capped at N's power of 2 (64 -> 4); several rows per program, up to all g."""
    B, K, H = 1, 2, 64
    o, m, l = random_partials(N + chunk + block_rows, B, K, N, R, g, H)
    got = self.run(o, m, l, g, jnp.float32, config=TritonConfig(chunk=chunk, block_rows=block_rows))
    np.testing.assert_allclose(np.asarray(got), merge_oracle(o, m, l, g).astype(np.float32),
                               **TOLERANCES[jnp.float32])

  def test_unsupported_and_bad_options(self):
    o, m, l = random_partials(0, 1, 1, 3, 16, 4, 64)
    with pytest.raises(ValueError, match="g=3"):
      self.run(o, m, l, 3, jnp.float32)
    for cfg, match in ((TritonConfig(chunk=3), "chunk"), (TritonConfig(block_rows=8), "block_rows"),
                       (TritonConfig(num_warps=3), "num_warps")):
      with pytest.raises(ValueError, match=match):
        self.run(o, m, l, 4, jnp.float32, config=cfg)


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True


def test_supported_gives_reasons():
  sup = triton_combine.supported
  assert sup(4, 16, 128) is None and sup(1, 16, 64) is None and sup(128, 128, 128) is None
  assert "g=3" in sup(3, 16, 128)
  assert "g=0" in sup(0, 16, 128)
  assert "H=96" in sup(4, 16, 96)
  assert "H=8" in sup(4, 16, 8)
  assert "R=24" in sup(16, 24, 64)
  assert "R=16" in sup(32, 16, 64)  # g > R


def test_validates_arguments():
  o, m, l = random_partials(0, 1, 1, 3, 16, 4, 64)
  with pytest.raises(ValueError, match="m_BKNR"):
    combine_splits(o, m[..., :8], l, 4, jnp.float32)
  with pytest.raises(ValueError, match="o_BKNRH must be 5-D"):
    combine_splits(o[0], m, l, 4, jnp.float32)
  with pytest.raises(ValueError, match="g must be"):
    combine_splits(o, m, l, 17, jnp.float32)


@pytest.mark.parametrize("N,R,g,H,dtype", [
    (66, 16, 4, 128, jnp.bfloat16),
    (64, 16, 1, 128, jnp.float32),
    (3, 16, 8, 64, jnp.float16),
    (64, 128, 128, 128, jnp.bfloat16),
])
def test_triton_kernel_lowers_for_cuda(N, R, g, H, dtype):
  B, K = 2, 8
  o = jax.ShapeDtypeStruct((B, K, N, R, H), jnp.float32)
  ml = jax.ShapeDtypeStruct((B, K, N, R), jnp.float32)
  text = lower_for_cuda(lambda a, b, c: combine_splits(a, b, c, g, dtype,
                                                       implementation="pallas_triton"), o, ml, ml)
  assert "xla.gpu.triton" in text and 'name = "combine_splits"' in text
  # one launch: a single custom call
  assert text.count("xla.gpu.triton") == 1
