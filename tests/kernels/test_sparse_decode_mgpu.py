"""pallas_kernels.sparse_decode, implementation="pallas_mosaic_gpu" (`_mgpu_sparse.py`): the
Mosaic GPU kernel in the GPU interpreter (CPU) and compiled on a Hopper GPU (`pytest -m gpu`),
against the float64 masked oracle. Its inputs are bf16 / f16 (wgmma operands)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _mgpu_sparse
from pallas_kernels.sparse_decode import SparseDecodeConfig, live_slots, sparse_decode_attention

from ._oracle import TOLERANCES, length_valid, oracle, random_inputs
from .test_sparse_decode import block_valid, random_blocks

MGPU = [
    pytest.param(True, id="mgpu-interpret"),
    pytest.param(False, id="mgpu-gpu", marks=pytest.mark.gpu),
]


def _require(interpret: bool) -> None:
  if not interpret and jax.default_backend() != "gpu":
    pytest.fail("compiled pallas_mosaic_gpu tests need a GPU backend (run `pytest -m gpu`)")


def _run(q, k, v, lengths, idx, bs, interpret, config=None, num_live=None):
  return sparse_decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx),
                                 block_size=bs, implementation="pallas_mosaic_gpu",
                                 interpret=interpret, config=config, num_live_BK=num_live)


def _check(out, want, dtype=jnp.bfloat16):
  chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)), want.astype(np.float32),
                              **TOLERANCES[dtype])


# (B, K, G, H, S, lengths, block_size, M): ragged lengths inside blocks, capacities that are not
# block multiples (the last block's tail lies past the buffer: zero-filled by the TMA unit) nor
# multiples of 8 (padded to the TMA tile), M above and below the block count, G = 1 / 2 / 4 / 8 /
# 5 (G rows of a 64-row wgmma tile, the partial's rows rounded up to 8; B * K * G = 20 is padded
# to whole 8-row tiles), H = 64 / 128 / 256, block sizes 64 / 128. G = 5 / 6 / 12 with several
# groups: their groups are padded to whole 8-row windows (`_mgpu_sparse.query_stride`; unpadded,
# rows past an 8-row boundary came out wrong on the H200).
CASES = [
    (2, 2, 4, 128, 320, [320, 77], 64, 12),
    (3, 1, 8, 128, 200, [200, 65, 130], 64, 4),
    (1, 2, 1, 64, 300, [290], 128, 2),
    (2, 2, 5, 64, 450, [450, 3], 64, 9),
    (1, 1, 2, 256, 130, [130], 64, 3),
    (2, 2, 6, 64, 256, [256, 100], 64, 4),
    (1, 3, 12, 128, 256, [200], 128, 2),
]


@pytest.mark.parametrize("interpret", MGPU)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}K{}G{}H{}S{}-bs{}-M{}".format(*c[:5], *c[6:]))
def test_random_blocks_match_oracle(interpret, case):
  _require(interpret)
  B, K, G, H, S, lengths, bs, M = case
  q, k, v = random_inputs(S + bs + 1, B, K, G, H, S, jnp.bfloat16)
  idx = random_blocks(S * bs + 1, B, K, -(-S // bs), M, min_live=1)
  out = _run(q, k, v, lengths, idx, bs, interpret)
  assert out.shape == (B, K, G, H) and out.dtype == jnp.bfloat16
  _check(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)))


@pytest.mark.parametrize("interpret", MGPU)
def test_float16_and_all_blocks_equal_dense(interpret):
  """Every block selected (f16) is dense decode attention over the lengths."""
  _require(interpret)
  B, K, G, H, S, lengths, bs = 2, 2, 4, 64, 256, [256, 131], 64
  q, k, v = random_inputs(bs, B, K, G, H, S, jnp.float16)
  nb = S // bs
  idx = np.broadcast_to(np.arange(nb, dtype=np.int32), (B, K, nb))
  out = _run(q, k, v, lengths, idx, bs, interpret)
  assert out.dtype == jnp.float16
  _check(out, oracle(q, k, v, length_valid(lengths, K, S)))


@pytest.mark.parametrize("interpret", MGPU)
def test_no_live_block_gives_zeros(interpret):
  """Rows with only -1, or only blocks past the length, are zeros (not NaN); others unaffected."""
  _require(interpret)
  B, K, G, H, S, bs = 3, 2, 4, 64, 256, 64
  q, k, v = random_inputs(11, B, K, G, H, S, jnp.bfloat16)
  lengths = [256, 60, 0]
  idx = np.array([[[-1, -1, -1], [0, 2, -1]],
                  [[1, 2, 3], [0, 3, -1]],
                  [[0, 1, -1], [2, -1, -1]]], np.int32)
  out = np.asarray(_run(q, k, v, lengths, idx, bs, interpret).astype(jnp.float32))
  assert np.all(np.isfinite(out))
  for b, h in [(0, 0), (1, 0), (2, 0), (2, 1)]:
    assert not np.any(out[b, h]), f"(b={b}, k={h}) has no live token and must be zeros"
  _check(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)))


@pytest.mark.parametrize("interpret", MGPU)
@pytest.mark.parametrize("num_splits,stages", [(1, 1), (2, 2), (5, 3), (16, 4)])
def test_split_counts_and_pipeline_depths(interpret, num_splits, stages):
  """Any split count (even > the live slots: empty splits) and TMA pipeline depth (even > a
  split's steps) gives the same result; the selector's live counts may be passed in."""
  _require(interpret)
  B, K, G, H, S, bs, M = 2, 2, 8, 64, 1024, 64, 9
  q, k, v = random_inputs(5, B, K, G, H, S, jnp.bfloat16)
  lengths = [1024, 601]
  idx = random_blocks(num_splits, B, K, S // bs, M, min_live=1)
  cfg = SparseDecodeConfig(num_splits=num_splits, num_stages=stages)
  want = oracle(q, k, v, block_valid(idx, lengths, bs, S))
  _check(_run(q, k, v, lengths, idx, bs, interpret, cfg), want)
  n_live = live_slots(jnp.asarray(idx), jnp.asarray(lengths, jnp.int32), bs)
  _check(_run(q, k, v, lengths, idx, bs, interpret, cfg, num_live=n_live), want)


@pytest.mark.parametrize("interpret", MGPU)
def test_under_jit_with_traced_indices(interpret):
  _require(interpret)
  B, K, G, H, S, bs = 2, 2, 4, 128, 384, 64
  q, k, v = random_inputs(3, B, K, G, H, S, jnp.bfloat16)
  lengths = jnp.asarray([384, 200], jnp.int32)
  idx = random_blocks(9, B, K, S // bs, 4, min_live=1)
  f = jax.jit(lambda q, k, v, n, i: sparse_decode_attention(
      q, k, v, n, i, block_size=bs, implementation="pallas_mosaic_gpu", interpret=interpret))
  _check(f(q, k, v, lengths, jnp.asarray(idx)),
         oracle(q, k, v, block_valid(idx, np.asarray(lengths), bs, S)))


@pytest.mark.gpu
def test_matches_triton_at_decode_scale():
  """B8, 8 KV heads x G 4, H 128, S 32K + a ragged tail, 4K-token random budgets of 64-token
  blocks: the Mosaic GPU kernel agrees with the Triton kernel and the XLA reference."""
  _require(False)
  B, K, G, H, S, bs = 8, 8, 4, 128, 32768 + 40, 64
  q, k, v = random_inputs(21, B, K, G, H, S, jnp.bfloat16)
  rng = np.random.default_rng(0)
  lengths = jnp.asarray(rng.integers(S // 2, S + 1, B), jnp.int32)
  nb = -(-S // bs)
  idx = np.sort(np.argsort(rng.random((B * K, nb)), axis=1)[:, :64], axis=1).reshape(B, K, 64)
  idx = jnp.asarray(idx.astype(np.int32))
  out = sparse_decode_attention(q, k, v, lengths, idx, block_size=bs,
                                implementation="pallas_mosaic_gpu")
  tri = sparse_decode_attention(q, k, v, lengths, idx, block_size=bs,
                                implementation="pallas_triton")
  ref = sparse_decode_attention(q, k, v, lengths, idx, block_size=bs, implementation="xla")
  for other in (tri, ref):
    chex.assert_trees_all_close(out.astype(jnp.float32), other.astype(jnp.float32),
                                **TOLERANCES[jnp.bfloat16])


@pytest.mark.parametrize("over,match", [
    (dict(dtype=jnp.float32), "bfloat16 / float16"),
    (dict(H=32), "multiple of 64"),
    (dict(bs=32), "64 or 128"),
    (dict(bs=16), "64 or 128"),
    (dict(bs=192, S=384), "64 or 128"),
    (dict(G=65), "<= 64"),

])
def test_unsupported_inputs_raise(over, match):
  a = dict(B=1, K=1, G=4, H=64, S=128, bs=64, dtype=jnp.bfloat16)
  a.update(over)
  q, k, v = random_inputs(0, a["B"], a["K"], a["G"], a["H"], a["S"], a["dtype"])
  idx = np.zeros((1, 1, 1), np.int32)
  with pytest.raises(ValueError, match=match):
    _run(q, k, v, [a["S"]], idx, a["bs"], True)


def test_shared_memory_plan():
  """One program's shared memory fits a Hopper SM at the default depth; deeper pipelines than
  fit are cut; the split heuristic counts how many programs fit an SM."""
  m = _mgpu_sparse
  assert m.smem_bytes(4, 128, 64, m.DEFAULT_STAGES, jnp.bfloat16) <= m.SMEM_PER_SM
  assert m.programs_per_sm(4, 128, 64, 2, jnp.bfloat16) == 2   # 16 + 64 KB (+1) per program
  assert m.programs_per_sm(4, 128, 64, 3, jnp.bfloat16) == 2   # 16 + 96 KB
  assert m.programs_per_sm(4, 128, 64, 1, jnp.bfloat16) == 4   # 16 + 33 KB store scratch
  assert m.fit_stages(4, 128, 128, 4, jnp.bfloat16) == 3       # 4 x 64 KB would not fit
  assert m.fit_stages(4, 256, 128, 8, jnp.bfloat16) == 1
