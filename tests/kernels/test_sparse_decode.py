"""pallas_kernels.sparse_decode: every implementation against a float64 masked oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.sparse_decode import (SparseDecodeConfig, sparse_decode_attention,
                                          sparse_decode_attention_reference)

from ._oracle import (IMPLEMENTATIONS, TOLERANCES, length_valid, lower_for_cuda, oracle, random_inputs,
                      require_backend)


def random_blocks(seed: int, B: int, K: int, n_blocks: int, M: int, min_live: int = 0) -> np.ndarray:
  """int32 [B, K, M]: per (b, k) a random ascending set of distinct blocks, -1 padded."""
  rng = np.random.default_rng(seed)
  out = np.full((B, K, M), -1, np.int32)
  for b in range(B):
    for k in range(K):
      n = rng.integers(min_live, min(M, n_blocks) + 1)
      out[b, k, :n] = np.sort(rng.choice(n_blocks, n, replace=False))
  return out


def block_valid(idx_BKM: np.ndarray, lengths, block_size: int, S: int) -> np.ndarray:
  """bool [B, K, S] for the oracle: token in a selected block and below the length."""
  B, K, _ = idx_BKM.shape
  sel = np.zeros((B, K, S), bool)
  for b in range(B):
    for k in range(K):
      for j in idx_BKM[b, k]:
        if j >= 0:
          sel[b, k, j * block_size:(j + 1) * block_size] = True
  return sel & length_valid(lengths, K, S)


def _check(out, want, dtype):
  chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)), want.astype(np.float32),
                              **TOLERANCES[dtype])


# (B, K, G, H, S, lengths, block_size, M): ragged lengths that are not block multiples, capacities
# that are not block multiples (S=200 with 64, S=300 with 128), M larger than the number of blocks
# (forced -1 padding) and M smaller (a real budget).
CASES = [
    (2, 2, 4, 64, 320, [320, 77], 16, 12),
    (3, 1, 8, 128, 200, [200, 65, 130], 64, 4),
    (1, 2, 1, 64, 300, [290], 128, 2),
    (3, 2, 8, 64, 256, [256, 100, 3], 64, 3),
]


@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}K{}G{}H{}S{}-bs{}-M{}".format(*c[:5], *c[6:]))
def test_random_blocks_match_oracle(implementation, interpret, dtype, case):
  """Random block sets (some past the length, -1 padded) against the masked float64 oracle."""
  require_backend(implementation, interpret)
  B, K, G, H, S, lengths, bs, M = case
  q, k, v = random_inputs(S + bs, B, K, G, H, S, dtype)
  idx = random_blocks(S * bs, B, K, -(-S // bs), M, min_live=1)
  out = sparse_decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx),
                                block_size=bs, implementation=implementation, interpret=interpret)
  assert out.shape == (B, K, G, H) and out.dtype == dtype
  _check(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), dtype)


@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS)
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_all_blocks_equal_dense(implementation, interpret, block_size):
  """Selecting every block is dense decode attention (and matches the dense op to f32 rounding)."""
  require_backend(implementation, interpret)
  B, K, G, H, S, lengths = 2, 2, 4, 64, 256, [256, 131]
  q, k, v = random_inputs(block_size, B, K, G, H, S, jnp.float32)
  nb = S // block_size
  idx = np.broadcast_to(np.arange(nb, dtype=np.int32), (B, K, nb))
  n = jnp.asarray(lengths, jnp.int32)
  out = sparse_decode_attention(q, k, v, n, jnp.asarray(idx), block_size=block_size,
                                implementation=implementation, interpret=interpret)
  dense = decode_attention(q, k, v, n, implementation=implementation, interpret=interpret)
  _check(out, np.asarray(dense, np.float64), jnp.float32)
  _check(out, oracle(q, k, v, length_valid(lengths, K, S)), jnp.float32)


@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS)
def test_no_live_block_gives_zeros(implementation, interpret):
  """Rows with only -1, or only blocks past the length, are zeros (not NaN); others unaffected."""
  require_backend(implementation, interpret)
  B, K, G, H, S, bs = 3, 2, 4, 64, 256, 64
  q, k, v = random_inputs(11, B, K, G, H, S, jnp.float32)
  lengths = [256, 60, 0]
  idx = np.array([[[-1, -1, -1], [0, 2, -1]],     # (0, 0): nothing selected
                  [[1, 2, 3], [0, 3, -1]],        # (1, 0): every block starts past length 60
                  [[0, 1, -1], [2, -1, -1]]],     # length 0
                 np.int32)
  out = np.asarray(sparse_decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32),
                                           jnp.asarray(idx), block_size=bs,
                                           implementation=implementation, interpret=interpret))
  assert np.all(np.isfinite(out))
  for b, h in [(0, 0), (1, 0), (2, 0), (2, 1)]:
    assert not np.any(out[b, h]), f"(b={b}, k={h}) has no live token and must be zeros"
  _check(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), jnp.float32)


TRITON = [p for p in IMPLEMENTATIONS if p.values[0] == "pallas_triton"]
SPLIT_CASES = ([pytest.param(*p.values, False, marks=p.marks, id=p.id) for p in IMPLEMENTATIONS[1:]]
               + [pytest.param(*p.values, True, marks=p.marks, id=p.id + "-prefetch") for p in TRITON])


@pytest.mark.parametrize("implementation,interpret,prefetch", SPLIT_CASES)
@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_split_counts(implementation, interpret, prefetch, num_splits):
  """Splits partition the live slots at run time; any count (even > M) gives the same result,
  with the block id loaded in its iteration or prefetched one iteration ahead (Triton option)."""
  require_backend(implementation, interpret)
  B, K, G, H, S, bs, M = 2, 2, 8, 64, 512, 32, 9
  q, k, v = random_inputs(5, B, K, G, H, S, jnp.float32)
  lengths = [500, 222]
  idx = random_blocks(num_splits, B, K, S // bs, M)
  out = sparse_decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx),
                                block_size=bs, implementation=implementation, interpret=interpret,
                                config=SparseDecodeConfig(num_splits=num_splits,
                                                          prefetch_index=prefetch))
  _check(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), jnp.float32)


TILE_CASES = [pytest.param(*p.values, marks=p.marks, id=p.id) for p in TRITON]


@pytest.mark.parametrize("implementation,interpret", TILE_CASES)
@pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
@pytest.mark.parametrize("blocks_per_tile,block_size,num_splits", [(2, 64, 1), (2, 16, 3), (4, 16, 2),
                                                                   (4, 32, 5)])
def test_gathered_tiles(implementation, interpret, prefetch, blocks_per_tile, block_size, num_splits):
  """Several selected blocks gathered into one tile per iteration: live counts that are not tile
  multiples (a tile's tail slots masked), ragged lengths inside and past blocks, empty rows, and
  more splits than tiles."""
  require_backend(implementation, interpret)
  B, K, G, H, S = 3, 2, 4, 64, 448
  q, k, v = random_inputs(21 + blocks_per_tile, B, K, G, H, S, jnp.bfloat16)
  lengths = [448, 213, 37]
  M = 7
  idx = random_blocks(blocks_per_tile * 10 + block_size, B, K, S // block_size, M)
  idx[0, 1] = -1                                      # a row with nothing selected
  cfg = SparseDecodeConfig(num_splits=num_splits, prefetch_index=prefetch,
                           blocks_per_tile=blocks_per_tile)
  out = sparse_decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx),
                                block_size=block_size, implementation=implementation,
                                interpret=interpret, config=cfg)
  _check(out, oracle(q, k, v, block_valid(idx, lengths, block_size, S)), jnp.bfloat16)
  assert not np.any(np.asarray(out[0, 1], np.float32))


@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS)
def test_under_jit_with_traced_indices(implementation, interpret):
  """The ReSA decode step selects blocks inside jit: indices and lengths are traced."""
  require_backend(implementation, interpret)
  B, K, G, H, S, bs = 2, 2, 4, 128, 256, 64
  q, k, v = random_inputs(9, B, K, G, H, S, jnp.bfloat16)
  lengths = [256, 150]
  idx = random_blocks(9, B, K, S // bs, 3)
  fn = jax.jit(lambda *a: sparse_decode_attention(*a, block_size=bs, implementation=implementation,
                                                  interpret=interpret))
  out = fn(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx))
  _check(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_triton_kernel_lowers_for_cuda(dtype, block_size):
  """The compiled path's Pallas -> Triton lowering succeeds (checked on CPU, without a GPU)."""
  q = jax.ShapeDtypeStruct((2, 2, 4, 128), dtype)
  kv = jax.ShapeDtypeStruct((2, 2, 300, 128), dtype)
  n = jax.ShapeDtypeStruct((2,), jnp.int32)
  idx = jax.ShapeDtypeStruct((2, 2, 3), jnp.int32)
  fn = lambda *a: sparse_decode_attention(*a, block_size=block_size, implementation="pallas_triton")
  text = lower_for_cuda(fn, q, kv, kv, n, idx)
  assert "xla.gpu.triton" in text and 'name = "sparse_decode_attention"' in text


@pytest.mark.parametrize("blocks_per_tile", [2, 4])
def test_gathered_tiles_lower_for_cuda(blocks_per_tile):
  q = jax.ShapeDtypeStruct((2, 2, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 2, 512, 128), jnp.bfloat16)
  n = jax.ShapeDtypeStruct((2,), jnp.int32)
  idx = jax.ShapeDtypeStruct((2, 2, 5), jnp.int32)
  cfg = SparseDecodeConfig(blocks_per_tile=blocks_per_tile)
  fn = lambda *a: sparse_decode_attention(*a, block_size=32, implementation="pallas_triton",
                                          config=cfg)
  assert 'name = "sparse_decode_attention"' in lower_for_cuda(fn, q, kv, kv, n, idx)


def test_reference_is_xla_implementation():
  q, k, v = random_inputs(1, 1, 2, 4, 64, 128, jnp.float32)
  n, idx = jnp.asarray([100], jnp.int32), jnp.asarray([[[0, 3, -1], [1, -1, -1]]], jnp.int32)
  chex.assert_trees_all_equal(
      sparse_decode_attention_reference(q, k, v, n, idx, block_size=32),
      sparse_decode_attention(q, k, v, n, idx, block_size=32, implementation="xla"))


def _args(**over):
  q, k, v = random_inputs(0, 2, 1, 4, 64, 128, jnp.float32)
  args = dict(q_BKGH=q, k_BKSH=k, v_BKSH=v, lengths_B=jnp.asarray([100, 128], jnp.int32),
              block_indices_BKM=jnp.asarray([[[0, 1, -1]], [[1, -1, -1]]], jnp.int32),
              block_size=32)
  args.update(over)
  return args


@pytest.mark.parametrize("over,match", [
    (dict(block_indices_BKM=jnp.zeros((2, 3), jnp.int32)), "block_indices_BKM must have shape"),
    (dict(block_indices_BKM=jnp.zeros((2, 2, 3), jnp.int32)), "block_indices_BKM must have shape"),
    (dict(block_indices_BKM=jnp.zeros((2, 1, 3), jnp.float32)), "must be an integer array"),
    (dict(block_indices_BKM=jnp.asarray([[[0, 4, -1]], [[1, -1, -1]]], jnp.int32)),
     r"must be -1 or in \[0, 4\)"),
    (dict(block_indices_BKM=jnp.asarray([[[0, -2, -1]], [[1, -1, -1]]], jnp.int32)), "must be -1 or in"),
    (dict(block_indices_BKM=jnp.asarray([[[0, -1, 2]], [[1, -1, -1]]], jnp.int32)), "padding after"),
    (dict(block_indices_BKM=jnp.asarray([[[2, 1, -1]], [[1, -1, -1]]], jnp.int32)), "ascending"),
    (dict(block_indices_BKM=jnp.asarray([[[1, 1, -1]], [[1, -1, -1]]], jnp.int32)), "distinct"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(lengths_B=jnp.asarray([100, 129], jnp.int32)), "lengths_B must lie in"),
    (dict(q_BKGH=jnp.ones((2, 1, 4, 32), jnp.float32)), "k_BKSH .* must be"),
])
def test_bad_inputs_raise(over, match):
  with pytest.raises(ValueError, match=match):
    sparse_decode_attention(**_args(**over), implementation="xla")


@pytest.mark.parametrize("kwargs,match", [
    (dict(implementation="dense"), "implementation must be one of"),
    (dict(implementation="pallas_triton", block_size=24), "block_size=24 must be a power of 2"),
    (dict(implementation="pallas_triton", block_size=8), "block_size=8 must be a power of 2 >= 16"),
    (dict(implementation="pallas_triton", config=SparseDecodeConfig(num_stages=0)), "num_stages"),
    (dict(implementation="pallas_triton", config=SparseDecodeConfig(blocks_per_tile=3)),
     "blocks_per_tile must be None or a power of 2"),
])
def test_bad_options_raise(kwargs, match):
  args = _args()
  args.update(kwargs)
  if args["block_size"] != 32:  # keep the indices in range for the other block sizes
    args["block_indices_BKM"] = jnp.asarray([[[0, 1, -1]], [[1, -1, -1]]], jnp.int32)
  with pytest.raises(ValueError, match=match):
    sparse_decode_attention(**args, interpret=True)
