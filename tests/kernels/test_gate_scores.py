"""pallas_kernels.gate_scores: the fused gate-score kernel equals the XLA reference (and the model's
`gate_logits`); the fused gate + top-k kernel selects exactly `block_topk` of its own scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.sparse import gate as gate_lib
from pallas_kernels import gate_scores as gs
from pallas_kernels.block_topk import block_topk_reference

from ._oracle import lower_for_cuda, require_backend

KERNELS = [
    pytest.param(True, id="triton-interpret"),
    pytest.param(False, id="triton-gpu", marks=pytest.mark.gpu),
]
THETA = 10000.0


def random_gate(seed, B, K, G, H, N, D, kc_dtype=jnp.float32, max_pos=None):
  """Random q [B, K, G, H] bf16, wq [K, G*H, D] f32 (unit-variance scale), kc [B, K, N, D] and
  ragged positions (never zeros)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, K, G, H)), jnp.bfloat16)
  wq = jnp.asarray(rng.standard_normal((K, G * H, D)) * (G * H) ** -0.5, jnp.float32)
  kc = jnp.asarray(rng.standard_normal((B, K, N, D)), kc_dtype)
  pos = jnp.asarray(rng.integers(0, max_pos or 64 * N, size=B), jnp.int32)
  return q, wq, kc, pos


# (B, K, G, H, N, D, kc dtype, chunks): ragged N (not a multiple of any tile, shorter than a
# sub-tile), G not a power of 2, Dg 32 / 64, float32 and bfloat16 caches, 1-4 programs per row
SCORE_CASES = [
    (2, 3, 4, 32, 37, 64, jnp.float32, None),
    (1, 2, 3, 16, 300, 32, jnp.bfloat16, 2),
    (2, 2, 4, 64, 1000, 64, jnp.bfloat16, 4),
    (1, 1, 2, 32, 2048, 64, jnp.float32, 1),
]


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("B,K,G,H,N,D,dt,chunks", SCORE_CASES)
def test_gate_scores_match_reference(interpret, B, K, G, H, N, D, dt, chunks):
  require_backend("pallas_triton", interpret)
  q, wq, kc, pos = random_gate(N + B * 7, B, K, G, H, N, D, dt)
  got = gs.gate_scores(q, wq, kc, pos, rope_theta=THETA, implementation="pallas_triton",
                       interpret=interpret, chunks=chunks)
  ref = gs.gate_scores_reference(q, wq, kc, pos, rope_theta=THETA)
  assert got.shape == (B, K, N) and got.dtype == jnp.float32
  assert float(jnp.std(ref)) > 0.1          # real scores, not a degenerate input
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=2e-5)


def test_reference_is_the_models_gate_logits():
  """The kernel's reference computes exactly what `effjax.sparse.gate.gate_logits` defines."""
  q, wq, kc, pos = random_gate(3, 2, 4, 4, 32, 50, 64, jnp.bfloat16)
  ref = gs.gate_scores_reference(q, wq, kc, pos, rope_theta=THETA)
  # both under jit: RoPE angles at position p move by p * (one ulp of an inverse frequency) when
  # XLA folds theta ** x differently eagerly and under jit (~2e-5 on these scores at p ~ 3000)
  model = jax.jit(gate_lib.gate_logits, static_argnums=4)(wq, q, kc, pos, THETA)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(model), rtol=1e-5, atol=1e-5)
  # and gate_logits' kernel path dispatches here
  via = gate_lib.gate_logits(wq, q, kc, pos, THETA, implementation="pallas_triton", interpret=True)
  np.testing.assert_allclose(np.asarray(via), np.asarray(ref), rtol=1e-5, atol=2e-5)


# (B, K, G, H, N, D, block_size, lengths, k): ragged lengths (one block only, fewer valid blocks
# than k, partial last block), N not a power of 2, k >= N
TOPK_CASES = [
    (2, 2, 4, 32, 37, 64, 16, [37 * 16, 200], 5),
    (3, 1, 4, 32, 100, 32, 64, [6400, 1, 65 * 64 + 3], 16),
    (1, 2, 3, 16, 20, 64, 32, [640], 40),
    (1, 2, 4, 32, 2048, 64, 64, [131072], 205),
]


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("B,K,G,H,N,D,bs,lengths,k", TOPK_CASES)
def test_gate_topk_is_block_topk_of_its_scores(interpret, B, K, G, H, N, D, bs, lengths, k):
  require_backend("pallas_triton", interpret)
  q, wq, kc, _ = random_gate(N + k, B, K, G, H, N, D, jnp.bfloat16)
  L = jnp.asarray(lengths, jnp.int32)
  pos = L - 1
  r = gs.gate_query_reference(q, wq, pos, rope_theta=THETA)
  idx, n_live, scores = gs._gate_topk_triton(r, kc, L, bs, k, 4, 3, interpret)
  ref_s = gs.gate_scores_reference(q, wq, kc, pos, rope_theta=THETA)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_s), rtol=1e-5, atol=2e-5)
  ref_idx, ref_n = block_topk_reference(scores, L, block_size=bs, k=k)
  idx = np.asarray(idx)
  assert idx.shape[-1] > ref_idx.shape[-1] - 1 and np.all(idx[..., ref_idx.shape[-1]:] == -1)
  np.testing.assert_array_equal(idx[..., :ref_idx.shape[-1]], np.asarray(ref_idx))
  np.testing.assert_array_equal(np.asarray(n_live), np.asarray(ref_n))
  # the public entry point returns the same pair
  pub = gs.gate_topk(q, wq, kc, pos, L, rope_theta=THETA, block_size=bs, k=k,
                     implementation="pallas_triton", interpret=interpret)
  np.testing.assert_array_equal(np.asarray(pub[0]), idx)


def test_xla_path_and_validation():
  q, wq, kc, pos = random_gate(1, 1, 2, 4, 16, 40, 32)
  L = pos + 1
  s = gs.gate_scores(q, wq, kc, pos, rope_theta=THETA, implementation="xla")
  idx, n = gs.gate_topk(q, wq, kc, pos, L, rope_theta=THETA, block_size=64, k=4,
                        implementation="xla")
  ref_idx, ref_n = block_topk_reference(s, L, block_size=64, k=4)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
  if jax.default_backend() == "cpu":   # auto is XLA off the GPU
    np.testing.assert_array_equal(np.asarray(gs.gate_scores(q, wq, kc, pos, rope_theta=THETA)),
                                  np.asarray(s))
  with pytest.raises(ValueError, match="wq_KCD must be"):
    gs.gate_scores(q, wq[:, :, :16], kc, pos, rope_theta=THETA)
  with pytest.raises(ValueError, match="kc_BKND must be"):
    gs.gate_scores(q, wq, kc[0], pos, rope_theta=THETA)
  with pytest.raises(ValueError, match="pos_B"):
    gs.gate_scores(q, wq, kc, jnp.asarray([1, 2]), rope_theta=THETA)
  with pytest.raises(ValueError, match="implementation"):
    gs.gate_scores(q, wq, kc, pos, rope_theta=THETA, implementation="cuda")
  with pytest.raises(ValueError, match="chunks"):
    gs.gate_scores(q, wq, kc, pos, rope_theta=THETA, chunks=0)
  with pytest.raises(ValueError, match="k must be"):
    gs.gate_topk(q, wq, kc, pos, L, rope_theta=THETA, block_size=64, k=1)
  with pytest.raises(ValueError, match="Dg=24 must be a power of 2"):
    gs.gate_scores(q, jnp.zeros((2, 64, 24)), jnp.zeros((1, 2, 40, 24)), pos, rope_theta=THETA,
                   implementation="pallas_triton")


def test_default_chunks():
  assert gs.default_chunks(64, 2048) == 4          # B8 K8 S128K: 256 programs of 512 rows
  assert gs.default_chunks(8, 2048) == 8           # capped by 256-row chunks
  assert gs.default_chunks(8, 16384) == 32
  assert gs.default_chunks(256, 2048) == 1
  assert gs.default_chunks(8, 100) == 1


def test_triton_kernels_lower_for_cuda():
  q = jax.ShapeDtypeStruct((8, 8, 4, 128), jnp.bfloat16)
  wq = jax.ShapeDtypeStruct((8, 512, 64), jnp.float32)
  kc = jax.ShapeDtypeStruct((8, 8, 2048, 64), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((8,), jnp.int32)
  text = lower_for_cuda(lambda *a: gs.gate_scores(*a, rope_theta=THETA,
                                                  implementation="pallas_triton"), q, wq, kc, pos)
  assert "xla.gpu.triton" in text and 'name = "gate_scores"' in text
  text = lower_for_cuda(lambda a, b, c, d: gs.gate_topk(a, b, c, d, d + 1, rope_theta=THETA,
                                                        block_size=64, k=64,
                                                        implementation="pallas_triton"),
                        q, wq, kc, pos)
  assert "xla.gpu.triton" in text and 'name = "gate_topk"' in text


@pytest.mark.parametrize("interpret", KERNELS)
@pytest.mark.parametrize("use_dot,prefetch", [(True, 0), (False, 0), (False, 1), (False, 3)])
def test_tile_paths_prefetch_and_ragged_chunks(interpret, use_dot, prefetch):
  """Both ways of scoring a tile (the 3-part bf16 dot, multiply-and-sum), with tiles loaded
  ahead past a program's block or past the end of a ragged row (masked)."""
  require_backend("pallas_triton", interpret)
  q, wq, kc, pos = random_gate(11, 2, 2, 4, 32, 1000, 64, jnp.bfloat16)
  r = gs.gate_query_reference(q, wq, pos, rope_theta=THETA)
  ref = gs.gate_scores_reference(q, wq, kc, pos, rope_theta=THETA)
  for chunks, sub in ((2, 128), (3, 64)):
    got = gs._gate_scores_triton(r, kc, chunks, 4, 3, interpret, sub, prefetch, use_dot)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=2e-5,
                               err_msg=f"chunks={chunks} sub={sub}")
  L = pos + 1
  idx, n, s = gs._gate_topk_triton(r, kc, L, 64, 20, 4, 3, interpret, 128, prefetch, use_dot)
  np.testing.assert_allclose(np.asarray(s), np.asarray(ref), rtol=1e-5, atol=2e-5)
  ref_idx, ref_n = block_topk_reference(s, L, block_size=64, k=20)
  np.testing.assert_array_equal(np.asarray(idx)[..., :20], np.asarray(ref_idx))
