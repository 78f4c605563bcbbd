"""pallas_kernels.sparse_decode: one test base, subclassed once per backend, against a float64
masked oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.sparse_decode import (live_slots, sparse_decode_attention,
                                          sparse_decode_attention_reference)
from pallas_kernels.sparse_decode import pallas_mosaic_gpu as mgpu
from pallas_kernels.sparse_decode.pallas_mosaic_gpu import MosaicGPUConfig
from pallas_kernels.sparse_decode.pallas_triton import TritonConfig

from ._oracle import (BackendBase, check_close, generate_from_class, length_valid,
                      lower_for_cuda, oracle, random_inputs)

pytest_generate_tests = generate_from_class


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


# (B, K, G, H, S, lengths, block_size, M): ragged lengths that are not block multiples, capacities
# that are not block multiples (S=200 with 64, S=300 with 128), M larger than the number of blocks
# (forced -1 padding) and M smaller (a real budget).
CASES = [
    (2, 2, 4, 64, 320, [320, 77], 16, 12),
    (3, 1, 8, 128, 200, [200, 65, 130], 64, 4),
    (1, 2, 1, 64, 300, [290], 128, 2),
    (3, 2, 8, 64, 256, [256, 100, 3], 64, 3),
]

# The Mosaic GPU kernel: blocks of 64 / 128, H a multiple of 64. Capacities that are neither block
# multiples (the last block's tail lies past the buffer: zero-filled by the TMA unit) nor
# multiples of 8 (padded to the TMA tile); G = 1 / 2 / 4 / 8 / 5 / 6 / 12 (G rows of a 64-row
# wgmma tile, the partial's rows rounded up to 8); G = 5 / 6 / 12 with several groups are padded
# to whole 8-row windows (`query_stride`; unpadded, rows past an 8-row boundary came out wrong on
# the H200); H = 64 / 128 / 256.
MGPU_CASES = [
    (2, 2, 4, 128, 320, [320, 77], 64, 12),
    (3, 1, 8, 128, 200, [200, 65, 130], 64, 4),
    (1, 2, 1, 64, 300, [290], 128, 2),
    (2, 2, 5, 64, 450, [450, 3], 64, 9),
    (1, 1, 2, 256, 130, [130], 64, 3),
    (2, 2, 6, 64, 256, [256, 100], 64, 4),
    (1, 3, 12, 128, 256, [200], 128, 2),
]


class SparseDecodeBase(BackendBase):
  """What every implementation of sparse_decode_attention must do."""
  CASES = CASES
  DTYPES = (jnp.float32, jnp.bfloat16)
  BLOCK_SIZES = (16, 64, 128)

  def run(self, q, k, v, lengths, idx, bs, **kw):
    return sparse_decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx),
                                   block_size=bs, **self.kw, **kw)

  def split_config(self, num_splits: int):
    """This backend's config with `num_splits` splits (None: the backend has no splits)."""
    return None

  def test_random_blocks_match_oracle(self, dtype, case):
    """Random block sets (some past the length, -1 padded) against the masked float64 oracle."""
    B, K, G, H, S, lengths, bs, M = case
    q, k, v = random_inputs(S + bs, B, K, G, H, S, dtype)
    idx = random_blocks(S * bs, B, K, -(-S // bs), M, min_live=1)
    out = self.run(q, k, v, lengths, idx, bs)
    assert out.shape == (B, K, G, H) and out.dtype == dtype
    check_close(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), dtype)

  def test_all_blocks_equal_dense(self, block_size):
    """Selecting every block is dense decode attention over the lengths."""
    dtype = self.DTYPES[0]
    B, K, G, H, S, lengths = 2, 2, 4, 64, 256, [256, 131]
    q, k, v = random_inputs(block_size, B, K, G, H, S, dtype)
    nb = S // block_size
    idx = np.broadcast_to(np.arange(nb, dtype=np.int32), (B, K, nb))
    out = self.run(q, k, v, lengths, idx, block_size)
    check_close(out, oracle(q, k, v, length_valid(lengths, K, S)), dtype)

  def test_no_live_block_gives_zeros(self):
    """Rows with only -1, or only blocks past the length, are zeros (not NaN); others unaffected."""
    dtype = self.DTYPES[0]
    B, K, G, H, S, bs = 3, 2, 4, 64, 256, 64
    q, k, v = random_inputs(11, B, K, G, H, S, dtype)
    lengths = [256, 60, 0]
    idx = np.array([[[-1, -1, -1], [0, 2, -1]],     # (0, 0): nothing selected
                    [[1, 2, 3], [0, 3, -1]],        # (1, 0): every block starts past length 60
                    [[0, 1, -1], [2, -1, -1]]],     # length 0
                   np.int32)
    out = np.asarray(self.run(q, k, v, lengths, idx, bs).astype(jnp.float32))
    assert np.all(np.isfinite(out))
    for b, h in [(0, 0), (1, 0), (2, 0), (2, 1)]:
      assert not np.any(out[b, h]), f"(b={b}, k={h}) has no live token and must be zeros"
    check_close(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), dtype)

  @pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
  def test_split_counts_and_live_counts(self, num_splits):
    """Splits partition the live slots at run time: any count (even > M) gives the same result;
    the selector's live counts may be passed in."""
    dtype = self.DTYPES[-1]
    B, K, G, H, S, bs, M = 2, 2, 8, 64, 1024, 64, 9
    q, k, v = random_inputs(5, B, K, G, H, S, dtype)
    lengths = [1000, 601]
    idx = random_blocks(num_splits, B, K, S // bs, M)
    want = oracle(q, k, v, block_valid(idx, lengths, bs, S))
    cfg = self.split_config(num_splits)
    check_close(self.run(q, k, v, lengths, idx, bs, config=cfg), want, dtype)
    n_live = live_slots(jnp.asarray(idx), jnp.asarray(lengths, jnp.int32), bs)
    check_close(self.run(q, k, v, lengths, idx, bs, config=cfg, num_live_BK=n_live), want, dtype)

  def test_under_jit_with_traced_indices(self):
    """The ReSA decode step selects blocks inside jit: indices and lengths are traced."""
    dtype = self.DTYPES[-1]
    B, K, G, H, S, bs = 2, 2, 4, 128, 256, 64
    q, k, v = random_inputs(9, B, K, G, H, S, dtype)
    lengths = [256, 150]
    idx = random_blocks(9, B, K, S // bs, 3, min_live=1)
    fn = jax.jit(lambda *a: sparse_decode_attention(*a, block_size=bs, **self.kw))
    out = fn(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx))
    check_close(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), dtype)


class TestXla(SparseDecodeBase):
  def test_reference_is_the_xla_implementation(self):
    q, k, v = random_inputs(1, 1, 2, 4, 64, 128, jnp.float32)
    n, idx = jnp.asarray([100], jnp.int32), jnp.asarray([[[0, 3, -1], [1, -1, -1]]], jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(sparse_decode_attention_reference(q, k, v, n, idx, block_size=32)),
        np.asarray(sparse_decode_attention(q, k, v, n, idx, block_size=32, implementation="xla")))


class TestPallasTritonInterpret(SparseDecodeBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True

  def split_config(self, num_splits):
    return TritonConfig(num_splits=num_splits)

  @pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
  @pytest.mark.parametrize("blocks_per_tile,bs,num_splits",
                           [(1, 64, 3), (2, 64, 1), (2, 16, 3), (4, 16, 2), (4, 32, 5)])
  def test_gathered_tiles(self, prefetch, blocks_per_tile, bs, num_splits):
    """Several selected blocks gathered into one tile per iteration, the block id loaded in its
    iteration or prefetched one ahead: live counts that are not tile multiples (a tile's tail
    slots masked), ragged lengths inside and past blocks, empty rows, more splits than tiles."""
    B, K, G, H, S = 3, 2, 4, 64, 448
    q, k, v = random_inputs(21 + blocks_per_tile, B, K, G, H, S, jnp.bfloat16)
    lengths = [448, 213, 37]
    idx = random_blocks(blocks_per_tile * 10 + bs, B, K, S // bs, 7)
    idx[0, 1] = -1                                      # a row with nothing selected
    cfg = TritonConfig(num_splits=num_splits, prefetch_index=prefetch,
                       blocks_per_tile=blocks_per_tile)
    out = self.run(q, k, v, lengths, idx, bs, config=cfg)
    check_close(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), jnp.bfloat16)
    assert not np.any(np.asarray(out[0, 1], np.float32))

  @pytest.mark.parametrize("config,match", [
      (TritonConfig(num_stages=0), "num_stages"),
      (TritonConfig(blocks_per_tile=3), "blocks_per_tile must be None or a power of 2"),
      (MosaicGPUConfig(), "is not the pallas_triton backend's config"),
  ])
  def test_bad_config_raises(self, config, match):
    q, k, v = random_inputs(0, 1, 1, 4, 64, 128, jnp.float32)
    with pytest.raises(ValueError, match=match):
      self.run(q, k, v, [100], np.asarray([[[0, 1]]], np.int32), 32, config=config)


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True


class TestPallasMosaicTPUInterpret(SparseDecodeBase):
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_tpu", True
  CASES = CASES[1:]


class TestPallasMosaicGPUInterpret(SparseDecodeBase):
  """The Mosaic GPU kernel in JAX's Mosaic GPU interpreter (JAX 0.10's lacks wgmma with a
  transposed operand: there the two products are plain dots, the rest runs as written)."""
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_gpu", True
  CASES = MGPU_CASES
  DTYPES = (jnp.bfloat16, jnp.float16)
  BLOCK_SIZES = (64, 128)

  def split_config(self, num_splits):
    return MosaicGPUConfig(num_splits=num_splits, pipeline_depth=1 + num_splits % 4)

  @pytest.mark.parametrize("over,match", [
      (dict(dtype=jnp.float32), "bfloat16 / float16"),
      (dict(H=32), "multiple of 64"),
      (dict(bs=32), "64 or 128"),
      (dict(bs=192, S=384), "64 or 128"),
      (dict(G=65), "<= 64"),
  ])
  def test_unsupported_inputs_are_not_supported(self, over, match):
    """Inputs the kernel cannot take raise NotSupported naming why (dispatch moves on)."""
    a = dict(B=1, K=1, G=4, H=64, S=128, bs=64, dtype=jnp.bfloat16)
    a.update(over)
    q, k, v = random_inputs(0, a["B"], a["K"], a["G"], a["H"], a["S"], a["dtype"])
    with pytest.raises(ValueError, match=match):
      self.run(q, k, v, [a["S"]], np.zeros((1, 1, 1), np.int32), a["bs"])

  def test_shared_memory_plan(self):
    """One program's shared memory fits a Hopper SM at the default depth; deeper pipelines than
    fit are cut; the split heuristic counts how many programs fit an SM."""
    bf16 = jnp.bfloat16
    assert mgpu.smem_bytes(4, 128, 64, 2, bf16) <= mgpu.smem_per_sm()
    assert mgpu.programs_per_sm(4, 128, 64, 2, bf16, 4) == 2   # 16 + 64 KB (+1) per program
    assert mgpu.programs_per_sm(4, 128, 64, 3, bf16, 4) == 2   # 16 + 96 KB
    assert mgpu.programs_per_sm(4, 128, 64, 1, bf16, 4) == 4   # 16 + 33 KB store scratch
    assert mgpu.fit_stages(4, 128, 128, 4, bf16) == 3          # 4 x 64 KB would not fit
    assert mgpu.fit_stages(4, 256, 128, 8, bf16) == 1


@pytest.mark.gpu
class TestPallasMosaicGPU(TestPallasMosaicGPUInterpret):
  INTERPRET, GPU = False, True

  def test_matches_triton_at_decode_scale(self):
    """B8, 8 KV heads x G 4, H 128, S 32K + a ragged tail, 4K-token random budgets of 64-token
    blocks: the Mosaic GPU kernel agrees with the Triton kernel and the XLA reference."""
    B, K, G, H, S, bs = 8, 8, 4, 128, 32768 + 40, 64
    q, k, v = random_inputs(21, B, K, G, H, S, jnp.bfloat16)
    rng = np.random.default_rng(0)
    lengths = jnp.asarray(rng.integers(S // 2, S + 1, B), jnp.int32)
    nb = -(-S // bs)
    idx = np.sort(np.argsort(rng.random((B * K, nb)), axis=1)[:, :64], axis=1).reshape(B, K, 64)
    idx = jnp.asarray(idx.astype(np.int32))
    run = lambda impl: sparse_decode_attention(q, k, v, lengths, idx, block_size=bs,
                                               implementation=impl)
    out = run("pallas_mosaic_gpu")
    for other in (run("pallas_triton"), run("xla")):
      check_close(out, np.asarray(other.astype(jnp.float32)), jnp.bfloat16)


# ------------------------------------------------------------------------- lowering, dispatch


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size,blocks_per_tile", [(16, None), (64, None), (128, None),
                                                        (32, 2), (32, 4)])
def test_triton_kernel_lowers_for_cuda(dtype, block_size, blocks_per_tile):
  """The compiled path's Pallas -> Triton lowering succeeds (checked on CPU, without a GPU)."""
  q = jax.ShapeDtypeStruct((2, 2, 4, 128), dtype)
  kv = jax.ShapeDtypeStruct((2, 2, 512, 128), dtype)
  n = jax.ShapeDtypeStruct((2,), jnp.int32)
  idx = jax.ShapeDtypeStruct((2, 2, 5), jnp.int32)
  cfg = TritonConfig(blocks_per_tile=blocks_per_tile)
  fn = lambda *a: sparse_decode_attention(*a, block_size=block_size,
                                          implementation="pallas_triton", config=cfg)
  text = lower_for_cuda(fn, q, kv, kv, n, idx)
  assert "xla.gpu.triton" in text and 'name = "sparse_decode_attention"' in text


def test_auto_falls_back_to_what_can_take_the_inputs():
  """implementation=None ends at the reference: on the CPU it is the reference; a named
  sequence moves past a backend that refuses (Triton tiles need a power-of-2 block)."""
  q, k, v = random_inputs(2, 1, 1, 4, 64, 96, jnp.float32)
  n, idx = jnp.asarray([90], jnp.int32), jnp.asarray([[[0, 2]]], jnp.int32)
  want = sparse_decode_attention(q, k, v, n, idx, block_size=24, implementation="xla")
  np.testing.assert_array_equal(np.asarray(sparse_decode_attention(q, k, v, n, idx, block_size=24)),
                                np.asarray(want))
  got = sparse_decode_attention(q, k, v, n, idx, block_size=24, interpret=True,
                                implementation=("pallas_triton", "pallas_mosaic_gpu", "xla"))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


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
    (dict(implementation="dense"), "implementation must be one of"),
    (dict(implementation="pallas_triton", block_size=24), "block_size=24 must be a power of 2"),
    (dict(implementation="pallas_triton", block_size=8), "block_size=8 must be a power of 2 >= 16"),
])
def test_bad_inputs_raise(over, match):
  args = dict(implementation="xla")
  args.update(_args(**over))
  if args["block_size"] not in (0, 32):  # keep the indices in range for the other block sizes
    args["block_indices_BKM"] = jnp.asarray([[[0, 1, -1]], [[1, -1, -1]]], jnp.int32)
  with pytest.raises(ValueError, match=match):
    sparse_decode_attention(**args, interpret=True)


def test_dense_op_matches_all_blocks():
  """The sparse op over every block and the dense op agree (both XLA references)."""
  q, k, v = random_inputs(3, 2, 2, 4, 64, 256, jnp.float32)
  n = jnp.asarray([256, 131], jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 2, 4))
  check_close(sparse_decode_attention(q, k, v, n, idx, block_size=64),
              np.asarray(decode_attention(q, k, v, n)), jnp.float32)
