"""pallas_kernels._combine: the one-launch Triton merge of split-K partials equals
`_splitk.combine_splits`, never reads the padding rows, and lowers to a Triton custom call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _splitk
from pallas_kernels._combine import combine_splits_triton, triton_combine_supported

from ._oracle import TOLERANCES, lower_for_cuda, require_backend

KERNELS = [
    pytest.param(True, id="triton-interpret"),
    pytest.param(False, id="triton-gpu", marks=pytest.mark.gpu),
]


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
  m[empty] = _splitk.MASK_VALUE
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


def check(got, want, dtype):
  got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("B,K,N,R,g,H", CASES)
def test_matches_combine_splits(interpret, B, K, N, R, g, H):
  require_backend("pallas_triton", interpret)
  o, m, l = random_partials(B * 100 + N * 10 + g, B, K, N, R, g, H)
  want = _splitk.combine_splits(o, m, l, g, jnp.float32)
  got = combine_splits_triton(o, m, l, g, jnp.float32, interpret=interpret)
  assert got.shape == (B, K, g, H) and got.dtype == jnp.float32
  check(got, want, jnp.float32)
  if B * K > 1:  # every split of (0, 0) empty: zeros, not NaN
    assert np.all(np.asarray(got[0, 0]) == 0.0)


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("B,K,N,R,g,H", [CASES[1], CASES[4], CASES[6]])
def test_bfloat16_output(interpret, B, K, N, R, g, H):
  require_backend("pallas_triton", interpret)
  o, m, l = random_partials(N + g, B, K, N, R, g, H)
  want = _splitk.combine_splits(o, m, l, g, jnp.bfloat16)
  got = combine_splits_triton(o, m, l, g, jnp.bfloat16, interpret=interpret)
  assert got.shape == (B, K, g, H) and got.dtype == jnp.bfloat16
  check(got, want, jnp.bfloat16)


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("N,R,g,chunk,block_rows", [
    (7, 16, 8, 1, 8), (7, 16, 8, 2, 4), (7, 16, 8, 4, 2), (7, 16, 8, 64, 1), (5, 128, 128, 2, 32),
])
def test_chunk_and_row_tiles_give_the_same_result(interpret, N, R, g, chunk, block_rows):
  # N = 7: a loop of whole chunks plus a ragged tail (chunk 2, 4), one split per step (chunk 1),
  # a chunk capped at N's power of 2 (64 -> 4); several rows per program, up to all g of them.
  require_backend("pallas_triton", interpret)
  B, K, H = 1, 2, 64
  o, m, l = random_partials(N + chunk + block_rows, B, K, N, R, g, H)
  want = _splitk.combine_splits(o, m, l, g, jnp.float32)
  got = combine_splits_triton(o, m, l, g, jnp.float32, interpret=interpret, chunk=chunk,
                              block_rows=block_rows)
  check(got, want, jnp.float32)


def test_supported_gives_reasons():
  assert triton_combine_supported(4, 16, 128) is None
  assert triton_combine_supported(1, 16, 64) is None
  assert triton_combine_supported(128, 128, 128) is None
  assert "g=3" in triton_combine_supported(3, 16, 128)
  assert "g=0" in triton_combine_supported(0, 16, 128)
  assert "H=96" in triton_combine_supported(4, 16, 96)
  assert "H=8" in triton_combine_supported(4, 16, 8)
  assert "R=24" in triton_combine_supported(16, 24, 64)
  assert "R=16" in triton_combine_supported(32, 16, 64)  # g > R


def test_validates_arguments():
  o, m, l = random_partials(0, 1, 1, 3, 16, 4, 64)
  with pytest.raises(ValueError, match="g=3"):
    combine_splits_triton(o, m, l, 3, jnp.float32, interpret=True)
  with pytest.raises(ValueError, match="m_BKNR"):
    combine_splits_triton(o, m[..., :8], l, 4, jnp.float32, interpret=True)
  with pytest.raises(ValueError, match="o_BKNRH must be 5-D"):
    combine_splits_triton(o[0], m, l, 4, jnp.float32, interpret=True)
  with pytest.raises(ValueError, match="chunk"):
    combine_splits_triton(o, m, l, 4, jnp.float32, interpret=True, chunk=3)
  with pytest.raises(ValueError, match="block_rows"):
    combine_splits_triton(o, m, l, 4, jnp.float32, interpret=True, block_rows=8)
  with pytest.raises(ValueError, match="num_warps"):
    combine_splits_triton(o, m, l, 4, jnp.float32, num_warps=3)


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
  text = lower_for_cuda(lambda a, b, c: combine_splits_triton(a, b, c, g, dtype), o, ml, ml)
  assert "xla.gpu.triton" in text and 'name = "combine_splits"' in text
  # one launch: a single custom call
  assert text.count("xla.gpu.triton") == 1
