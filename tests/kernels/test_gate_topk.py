"""pallas_kernels.gate_topk: the fused gate-scores + top-k kernel.

Its scores must equal the reference scores up to float32 summation order, and its ids must equal
exactly the reference selection (`block_topk_reference`) on the scores it used. Selecting on the
reference scores instead could differ only on a near-tie at the k-th place (a few ulps): that
comparison is made too, over random rows where it holds, as a sanity check of the whole path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_topk import block_topk_reference
from pallas_kernels.gate_topk import fused_chunk, gate_block_topk, gate_scores
from pallas_kernels.sparse_decode import live_slots

from ._oracle import lower_for_cuda, require_backend

KERNELS = [
    pytest.param(True, id="triton-interpret"),
    pytest.param(False, id="triton-gpu", marks=pytest.mark.gpu),
]


def random_gate(seed, B, K, N, D, dtype):
  rng = np.random.default_rng(seed)
  qg = rng.standard_normal((B, K, D)).astype(np.float32) * D ** -0.5
  kc = rng.standard_normal((B, K, N, D)).astype(np.float32)
  return jnp.asarray(qg), jnp.asarray(kc, dtype)


# (B, K, N, D, block_size, lengths, k, chunk): several chunks (N / chunk not a power of 2 too),
# one chunk, ragged lengths (partial last block, one block, fewer valid blocks than k), k >= N
CASES = [
    (2, 3, 96, 16, 16, [96 * 16, 500], 9, 32),
    (3, 2, 64, 64, 64, [64 * 64, 1, 65], 8, None),
    (1, 4, 2048, 64, 64, [131072], 64, None),
    (2, 2, 1536, 64, 64, [1536 * 64 - 7, 40 * 64], 205, 256),
    (2, 1, 20, 32, 32, [640, 100], 40, 4),
]


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("B,K,N,D,bs,lengths,k,chunk", CASES)
def test_fused_kernel_matches_reference(interpret, dtype, B, K, N, D, bs, lengths, k, chunk):
  require_backend("pallas_triton", interpret)
  qg, kc = random_gate(B * 100 + N + k, B, K, N, D, dtype)
  L = jnp.asarray(lengths, jnp.int32)
  idx, n, s = gate_block_topk(qg, kc, L, block_size=bs, k=k, implementation="pallas_triton",
                              interpret=interpret, chunk=chunk, return_scores=True)
  ref_s = gate_scores(qg, kc)
  np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), rtol=1e-5, atol=1e-5)
  ref_idx, ref_n = block_topk_reference(s, L, block_size=bs, k=k)
  idx, ref_idx = np.asarray(idx), np.asarray(ref_idx)
  M = ref_idx.shape[-1]
  assert idx.shape[-1] > M and idx.shape[-1] & (idx.shape[-1] - 1) == 0
  np.testing.assert_array_equal(idx[..., :M], ref_idx)
  assert np.all(idx[..., M:] == -1)
  np.testing.assert_array_equal(n, ref_n)
  np.testing.assert_array_equal(n, live_slots(jnp.asarray(idx), L, bs))
  # without return_scores: the same ids (the scores output is optional, not a different path)
  idx2, n2 = gate_block_topk(qg, kc, L, block_size=bs, k=k, implementation="pallas_triton",
                             interpret=interpret, chunk=chunk)
  np.testing.assert_array_equal(np.asarray(idx2), idx)
  np.testing.assert_array_equal(n2, n)
  # on random scores no near-tie at the k-th place: the reference path picks the same blocks
  xla_idx, xla_n = gate_block_topk(qg, kc, L, block_size=bs, k=k, implementation="xla")
  np.testing.assert_array_equal(idx[..., :M], np.asarray(xla_idx))
  np.testing.assert_array_equal(n, xla_n)


@pytest.mark.parametrize("interpret", KERNELS)
def test_fused_kernel_nan_inf_and_ties(interpret):
  """NaN in the cache gives a NaN score (treated as -inf); an inf row a +inf score; tied scores
  (repeated cache rows) go to the lower block id."""
  require_backend("pallas_triton", interpret)
  B, K, N, D, bs, k = 1, 2, 128, 16, 16, 20
  qg, kc = random_gate(3, B, K, N, D, jnp.float32)
  kc = np.array(kc)
  kc[0, 0, 5, 3] = np.nan
  kc[0, 0, 9] = np.abs(kc[0, 0, 9]) * np.inf * np.sign(np.asarray(qg)[0, 0])
  kc[0, 1, 40:80] = kc[0, 1, 7]                       # 41 equal scores for the places left
  L = jnp.asarray([N * bs], jnp.int32)
  idx, n, s = gate_block_topk(qg, jnp.asarray(kc), L, block_size=bs, k=k,
                              implementation="pallas_triton", interpret=interpret, chunk=32,
                              return_scores=True)
  ref_idx, ref_n = block_topk_reference(s, L, block_size=bs, k=k)
  np.testing.assert_array_equal(np.asarray(idx)[..., :k], np.asarray(ref_idx))
  np.testing.assert_array_equal(n, ref_n)
  assert 5 not in np.asarray(idx)[0, 0] and 9 in np.asarray(idx)[0, 0]


def test_validation_and_auto():
  qg, kc = random_gate(0, 1, 2, 64, 16, jnp.float32)
  L = jnp.asarray([100], jnp.int32)
  if jax.default_backend() == "cpu":
    assert gate_block_topk(qg, kc, L, block_size=16, k=3)[0].shape == (1, 2, 3)
  with pytest.raises(ValueError, match="qg_BKD must have shape"):
    gate_block_topk(qg[:, :1], kc, L, block_size=16, k=3)
  with pytest.raises(ValueError, match="kc_BKND must be 4-D"):
    gate_block_topk(qg, kc[0], L, block_size=16, k=3)
  with pytest.raises(ValueError, match="k must be"):
    gate_block_topk(qg, kc, L, block_size=16, k=1)
  with pytest.raises(ValueError, match="lengths_B"):
    gate_block_topk(qg, kc, jnp.asarray([1, 2]), block_size=16, k=3)
  with pytest.raises(ValueError, match="chunk must be a power of 2"):
    gate_block_topk(qg, kc, L, block_size=16, k=3, chunk=48)
  with pytest.raises(ValueError, match="must be floating point"):
    gate_block_topk(qg, kc.astype(jnp.int32), L, block_size=16, k=3)
  # N = 100 has no power-of-2 chunk dividing it: a clear error for the kernel, xla for auto
  qg, kc = random_gate(0, 1, 1, 100, 16, jnp.float32)
  assert fused_chunk(100) is None and fused_chunk(2048) == 256 and fused_chunk(96, 32) == 32
  with pytest.raises(ValueError, match="multiple of a power-of-2 chunk"):
    gate_block_topk(qg, kc, L, block_size=16, k=3, implementation="pallas_triton", interpret=True)
  assert gate_block_topk(qg, kc, L, block_size=16, k=3)[0].shape == (1, 1, 3)


def test_fused_kernel_lowers_for_cuda():
  qg = jax.ShapeDtypeStruct((2, 8, 64), jnp.float32)
  kc = jax.ShapeDtypeStruct((2, 8, 2048, 64), jnp.bfloat16)
  L = jax.ShapeDtypeStruct((2,), jnp.int32)
  text = lower_for_cuda(lambda a, b, c: gate_block_topk(a, b, c, block_size=64, k=64,
                                                        implementation="pallas_triton"), qg, kc, L)
  assert "xla.gpu.triton" in text and 'name = "gate_block_topk"' in text
