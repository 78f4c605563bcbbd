"""The Pallas Mosaic GPU low-bit decode kernel (`lowbit_decode_attention`'s `pallas_mosaic_gpu`):
in the Mosaic GPU interpreter against the float64 oracle over the cache dequantised by the
independent numpy unpacker of test_lowbit_decode.py (ragged lengths, partly full residual windows,
packed rows past the length, an empty sequence, several splits); the compiled wgmma path lowered
for CUDA on the CPU for every shape it takes; refusals. On a GPU (`pytest -m gpu`): the same
checks compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mgpu_util
from pallas_kernels.dispatch import NotSupported, lowering_for
from pallas_kernels.lowbit_decode import lowbit_decode_attention
from pallas_kernels.lowbit_decode import pallas_mosaic_gpu as mgpu

from ._oracle import check_close, length_valid, loop_barriers, mosaic_gpu_modules, oracle
from .test_lowbit_decode import block_valid, dequant_np, make_case, random_blocks

# (B, K, G, H, S, lengths, packed, bits, group, window, k_mode, v_group)
CASES = [
    (2, 2, 4, 128, 512, [300, 77], [256, 64], 4, 64, 128, "channel", 128),
    (3, 1, 2, 128, 256, [0, 256, 100], [0, 128, 128], 4, 128, 128, "channel", 128),
    (1, 2, 8, 256, 512, [511], [384], 2, 128, 256, "channel", 256),
]
# the second: an empty sequence and packed rows past the length; the third: 2 bits at H 256, a
# residual window holding 127 of its 256 slots
# rows of 8 words, the token-rows form with `paired_slabs`: 2 bits at H 128 (G 8, ragged, a
# partly full window), 4 bits at H 64 (an empty sequence)
PAIRED = [
    (2, 2, 8, 128, 512, [450, 129], [256, 128], 2, 128, 256, "channel", 128),
    (2, 1, 4, 64, 256, [0, 200], [0, 128], 4, 64, 128, "channel", 64),
]


def partials_args(bits, H, B, K, G, S, group, R=None):
  """Shapes of `packed_partials[_tok]`'s arguments (q, K words, scales, zeros, V words, scales,
  zeros, lengths, packed), or with R a residual window of R rows, `lowbit_decode_attention`'s."""
  S_ = jax.ShapeDtypeStruct
  W = H * bits // 32
  cache = (S_((B, K, S, W), jnp.int32), S_((B, K, S // group, H), jnp.bfloat16),
           S_((B, K, S // group, H), jnp.bfloat16), S_((B, K, S, W), jnp.int32),
           S_((B, K, S, 1), jnp.bfloat16), S_((B, K, S, 1), jnp.bfloat16))
  window = () if R is None else (S_((B, K, R, H), jnp.bfloat16),) * 2
  return (S_((B, K, G, H), jnp.bfloat16), *cache, *window, S_((B,), jnp.int32),
          S_((B,), jnp.int32))


def run(q, cache, lengths, packed, st, interpret=True, block_indices_BKM=None, block_size=None,
        **cfg):
  return lowbit_decode_attention(q, *cache, jnp.asarray(lengths, jnp.int32),
                                 jnp.asarray(packed, jnp.int32), **st,
                                 block_indices_BKM=block_indices_BKM, block_size=block_size,
                                 implementation="pallas_mosaic_gpu", interpret=interpret,
                                 config=mgpu.MosaicGPUConfig(**cfg) if cfg else None)


def check_case(case, dtype, interpret, **cfg):
  q, cache, st = make_case(case, dtype)
  lengths, packed = case[5], case[6]
  out = run(q, cache, lengths, packed, st, interpret, **cfg)
  assert out.shape == q.shape and out.dtype == dtype
  k, v = dequant_np(cache, lengths, packed, **st)
  check_close(out, oracle(q, k, v, length_valid(lengths, q.shape[1], k.shape[2])), dtype)


def check_sparse(case, dtype, interpret, n_sel=5, **cfg):
  """The kernel over random selections of n_sel 64-token blocks (some past the length, -1
  padded) against the oracle masked to them; returns the case's (q, cache, st)."""
  q, cache, st = make_case(case, dtype, seed=5)
  lengths, packed = case[5], case[6]
  B, K, S = q.shape[0], q.shape[1], case[4]
  idx = random_blocks(7, B, K, S // 64, n_sel)
  out = run(q, cache, lengths, packed, st, interpret, block_indices_BKM=jnp.asarray(idx),
            block_size=64, **cfg)
  k, v = dequant_np(cache, lengths, packed, **st)
  check_close(out, oracle(q, k, v, block_valid(idx, lengths, 64, S)), dtype)
  return q, cache, st


@pytest.mark.parametrize("case", CASES)
def test_interpret_matches_oracle(case):
  check_case(case, jnp.bfloat16, True, num_splits=3, pipeline_depth=2)


@pytest.mark.parametrize("case", CASES)
def test_interpret_per_block_sums_match_oracle(case):
  """defer_sums=False (a cross-warp sum every block; the default keeps per-token partial sums,
  reduced once)."""
  check_case(case, jnp.bfloat16, True, num_splits=2, pipeline_depth=2, defer_sums=False)


@pytest.mark.parametrize("case", CASES)
def test_interpret_query_rows_matches_oracle(case):
  """token_rows=False (the query rows padded to 64, K and V dequantised into shared tiles): the
  same results as the default token-rows form (S^T = K Q^T with K dequantised as the register
  operand, O^T = V^T P^T), in bf16 and f16."""
  check_case(case, jnp.bfloat16, True, num_splits=3, pipeline_depth=2, token_rows=False)
  if case is CASES[0]:
    check_case(case, jnp.float16, True, num_splits=2)


def test_decode_codes_is_exact():
  """Every 4-bit code -> its value in bf16 / f16 by the or-into-the-mantissa decoding."""
  codes = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  for dtype in (jnp.bfloat16, jnp.float16):
    got = mgpu.decode_codes(codes, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.arange(16).reshape(2, 8))


@pytest.mark.parametrize("case", PAIRED)
def test_interpret_paired_slabs_match_oracle(case):
  """`paired_slabs`: 8-word rows as 16-channel operands of two sub-words, dense (per-block and
  deferred sums) and over selected blocks; without it the kernel refuses them."""
  check_case(case, jnp.bfloat16, True, num_splits=3, pipeline_depth=2, paired_slabs=True)
  check_case(case, jnp.float16, True, num_splits=2, paired_slabs=True, defer_sums=False)
  q, cache, st = check_sparse(case, jnp.bfloat16, True, 3, num_splits=2, paired_slabs=True)
  lengths, packed = case[5], case[6]
  with pytest.raises(NotSupported, match="paired_slabs"):
    run(q, cache, lengths, packed, st, True, paired_slabs=False)
  with pytest.raises(NotSupported, match="token-rows form only"):
    run(q, cache, lengths, packed, st, True, paired_slabs=True, token_rows=False)


@pytest.mark.parametrize("case", [pytest.param(CASES[0], marks=pytest.mark.slow), CASES[1]])
def test_interpret_residual_concat_matches_oracle(case):
  """residual="concat" (the window's partial as one more split, concatenated, then
  combine_splits; the other tests run the default "merge"): the oracle's result, both kernel
  forms, dense and over selected blocks; the second case has an empty sequence and one whose
  window holds every valid token."""
  check_case(case, jnp.bfloat16, True, num_splits=3, residual="concat")
  check_case(case, jnp.bfloat16, True, num_splits=2, token_rows=False, residual="concat")
  check_sparse(case, jnp.bfloat16, True, num_splits=2, residual="concat")


def test_interpret_overlapped_matches_oracle():
  """overlap=True (V dequantised while the QK^T wgmma runs): the same results."""
  check_case(CASES[0], jnp.bfloat16, True, num_splits=2, overlap=True)


@pytest.mark.slow    # the 128-token interpreter test runs auto_barriers=False as well
def test_interpret_without_auto_barriers_matches_oracle():
  """auto_barriers=False: the interpreter ignores the compiler setting, so this checks the
  explicitly placed barrier runs and changes no result (the race-free placement itself is checked
  by the barrier counts below and by the compiled tests under `pytest -m gpu`)."""
  check_case(CASES[0], jnp.bfloat16, True, num_splits=2, auto_barriers=False)
  check_case(CASES[0], jnp.bfloat16, True, num_splits=2, token_rows=False, auto_barriers=False)
  check_sparse(CASES[0], jnp.bfloat16, True, num_splits=2, auto_barriers=False)


@pytest.mark.parametrize("bits,H", [(4, 128), (2, 128)])
def test_explicit_barriers_leave_few_in_the_loop(bits, H):
  """auto_barriers=False, lowered for CUDA: the main loop of the token-rows form synchronises its
  warpgroup 5 times a 64-token block (the barrier before the V stores, the two commits, two in
  the cross-warp max) instead of 28 (two around each of the 9 shared-memory stores, one before each
  of the 6 copy issues, ...); the query-rows form twice instead of 39."""
  B, K, G, S, group = 2, 2, 4, 1024, 128
  W = H * bits // 32
  args = partials_args(bits, H, B, K, G, S, group)
  forms = [(mgpu.packed_partials_tok, 5, dict(defer_sums=True))]    # the defaults
  forms += [(mgpu.packed_partials, 2, {})] if W >= 16 else []
  for part, most, kw in forms:
    counts = {}
    for auto in (True, False):
      fn = jax.jit(lambda *a, part=part, auto=auto, kw=kw: part(
          *a, bits=bits, group=group, num_splits=2, stages=2, auto_barriers=auto, **kw))
      (text,) = mosaic_gpu_modules(fn, *args)
      counts[auto] = loop_barriers(text)
    assert counts[False] == most and counts[True] >= 20, (part.__name__, counts)


# packed rows past the length in a later 128-token step (the first sequence: 300 of 384)
TOKENS_128 = (2, 2, 4, 128, 512, [300, 457], [384, 384], 4, 128, 128, "channel", 128)


@pytest.mark.parametrize("case", [TOKENS_128, PAIRED[0],
                                  *(pytest.param(c, marks=pytest.mark.slow) for c in CASES[1:])])
def test_interpret_block_tokens_128_matches_oracle(case, monkeypatch):
  """block_tokens=128 (128-token pipeline steps of the token-rows form, groups of 128): the
  oracle's result with one split (a step partly past the length) and three (split boundaries
  inside a sequence), and the 128-token kernel is the one that ran."""
  seen = []
  real = mgpu.packed_partials_tok
  monkeypatch.setattr(mgpu, "packed_partials_tok",
                      lambda *a, **k: seen.append(k["tokens"]) or real(*a, **k))
  check_case(case, jnp.bfloat16, True, num_splits=1, pipeline_depth=2, block_tokens=128)
  check_case(case, jnp.bfloat16, True, num_splits=3, block_tokens=128, auto_barriers=False)
  assert seen == [128, 128]
  # a selection keeps 64-token blocks
  check_sparse(case, jnp.bfloat16, True, num_splits=2, block_tokens=128)
  assert seen[-1] == 64


@pytest.mark.parametrize("case", [CASES[0], *(pytest.param(c, marks=pytest.mark.slow)
                                            for c in (PAIRED[0], TOKENS_128))])
def test_interpret_fold_v_matches_oracle(case):
  """fold_v=True (the V tile holds codes; the per-token scales multiply P, the zeros enter as a
  deferred per-token sum): the oracle's result in bf16 and f16, with per-block sums and 128-token
  steps, and over selected blocks."""
  check_case(case, jnp.bfloat16, True, num_splits=3, fold_v=True)
  check_case(case, jnp.float16, True, num_splits=2, fold_v=True, defer_sums=False,
             block_tokens=128)
  check_sparse(case, jnp.bfloat16, True, num_splits=2, fold_v=True)


def test_block_tokens_refusals():
  with pytest.raises(ValueError, match="block_tokens"):
    mgpu.MosaicGPUConfig(block_tokens=96).validate()
  q, cache, st = make_case(CASES[1], jnp.bfloat16)
  kw = dict(bits=4, group=128, num_splits=1, stages=2, tokens=128, interpret=True)
  lengths, packed = jnp.asarray(CASES[1][5], jnp.int32), jnp.asarray(CASES[1][6], jnp.int32)
  with pytest.raises(ValueError, match="no block selection"):
    mgpu.packed_partials_tok(q, *cache[:6], lengths, packed, jnp.zeros((3, 1, 2), jnp.int32),
                             **kw)


@pytest.mark.parametrize("case", CASES[:2])
def test_interpret_sparse_matches_oracle(case):
  """Selected 64-token blocks only: packed ones in the kernel, residual ones in the XLA
  partial, some past the length, -1 padded, rows with nothing selected."""
  check_sparse(case, jnp.bfloat16, True, num_splits=2, pipeline_depth=2)
  check_sparse(case, jnp.bfloat16, True, num_splits=2, token_rows=False)


@pytest.mark.parametrize("bits,H", [(4, 128), (4, 256), (2, 256), (2, 128), (4, 64)])
def test_compiled_kernel_lowers_for_cuda(bits, H):
  """TMA loads of swizzled words, register dequantisation into slab-swizzled tiles, wgmmas: the
  Pallas -> Mosaic GPU lowering, checked on the CPU (PTX compilation is left to the GPU)."""
  from jax import export
  S_ = jax.ShapeDtypeStruct
  B, K, G, S, group = 2, 2, 4, 1024, 128
  args = partials_args(bits, H, B, K, G, S, group)
  variants = (((), {}), ((S_((B, K, 5), jnp.int32),), {}),   # dense, and over selected blocks
              ((), dict(overlap=True)))                                    # overlapped
  variants += (((), dict(token_rows=True)), ((S_((B, K, 5), jnp.int32),), dict(token_rows=True)),
               ((), dict(token_rows=True, defer_sums=True)))
  if H * bits // 32 < 16:   # rows of 8 words: the token-rows form only (paired sub-words)
    variants = tuple(v for v in variants if v[1].get("token_rows"))
  for extra, kw in variants:
    part = mgpu.packed_partials_tok if kw.pop("token_rows", False) else mgpu.packed_partials
    fn = jax.jit(lambda *a, kw=kw, part=part: part(*a, bits=bits, group=group, num_splits=2,
                                                   stages=2, **kw))
    with lowering_for("gpu"):
      text = export.export(fn, platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args, *extra).mlir_module()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("bits,H", [(4, 128), (2, 128), (4, 256)])
def test_block_tokens_128_lowers_for_cuda(bits, H):
  """128-token steps lower for CUDA (two 64-row wgmma tiles with K as the register operand, a
  PV wgmma of K = 128), with and without the automatic barriers; without them a 128-token step
  has as many barriers as a 64-token one (half as many a token)."""
  B, K, G, S, group = 2, 2, 4, 1024, 128
  args = partials_args(bits, H, B, K, G, S, group)
  barriers = {}
  for auto, tokens in ((True, 128), (False, 128), (False, 64)):
    fn = jax.jit(lambda *a, auto=auto, tokens=tokens: mgpu.packed_partials_tok(
        *a, bits=bits, group=group, num_splits=2, stages=2, defer_sums=True, tokens=tokens,
        auto_barriers=auto))
    (text,) = mosaic_gpu_modules(fn, *args)
    assert "wgmma" in text
    barriers[auto, tokens] = loop_barriers(text)
  assert barriers[False, 128] == barriers[False, 64] < barriers[True, 128], barriers


def _prmt(a, b, selector):
  """PTX prmt.b32 (default mode) on uint32 arrays: result byte k is byte (selector >> 4 k) & 7
  of the 8 bytes of b:a."""
  src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
  out = np.zeros_like(a)
  for k in range(4):
    byte = (src >> np.uint64(8 * ((selector >> (4 * k)) & 7))) & np.uint64(0xFF)
    out |= (byte.astype(np.uint32) << np.uint32(8 * k))
  return out


@pytest.mark.parametrize("bits", [4, 2])
def test_magic_pair_recipe_decodes_every_sub_word(bits):
  """`magic_from_words`' register recipe (`mgpu_util.magic_pair_recipe`) run in numpy as the GPU
  runs it on a register pair of random words (byte permute, shift, and / or): the low half holds
  word 0's sub-word, the high half word 1's, as magic | code, for every sub-word, and the float
  each half encodes minus the magic's value is the code, in bfloat16 and float16."""
  rng = np.random.default_rng(4)
  w = rng.integers(0, 2 ** 32, size=(256, 2), dtype=np.uint64).astype(np.uint32)
  for dtype in (jnp.bfloat16, jnp.float16):
    pattern, base = mgpu._MAGIC[jnp.dtype(dtype)]
    for sub in range(32 // bits):
      sel, shift, mask, orp = mgpu_util.magic_pair_recipe(sub, bits, pattern)
      v = ((_prmt(w[:, 0], w[:, 1], sel) >> np.uint32(shift)) & np.uint32(mask)) | np.uint32(orp)
      halves = np.stack([v & 0xFFFF, v >> 16], axis=-1).astype(np.uint16)
      got = halves.view(jnp.dtype(dtype)).astype(np.float64) - base
      want = (w >> np.uint32(bits * sub)) & np.uint32((1 << bits) - 1)
      np.testing.assert_array_equal(got, want.astype(np.float64))
  with pytest.raises(ValueError, match="sub-word"):
    mgpu_util.magic_pair_recipe(32 // bits, bits, 0x4300)


@pytest.mark.parametrize("bits,H", [(4, 128), (2, 256), (2, 128), (4, 64)])
def test_magic_pairs_lower_for_cuda(bits, H):
  """magic_pairs=True lowers for CUDA with one byte permute a decoded register (64 tokens x
  H channels of K and of V, two values a register, 128 threads), the generic form with none;
  rows of 8 words (2-bit H 128, 4-bit H 64) too, their sub-word pairs side by side."""
  B, K, G, S, group = 2, 2, 4, 1024, 128
  args = partials_args(bits, H, B, K, G, S, group)
  for on in (False, True):
    fn = jax.jit(lambda *a, on=on: mgpu.packed_partials_tok(
        *a, bits=bits, group=group, num_splits=2, stages=2, defer_sums=True, magic_pairs=on))
    (text,) = mosaic_gpu_modules(fn, *args)
    assert text.count("prmt.b32") == (2 * 64 * H // 2 // 128 if on else 0)


def test_merged_residual_reads_the_token_rows_partials_in_place():
  """residual="merge" with the token-rows kernel sums the splits' partials in the layout the
  kernel writes ([.., H, rows]): the lowered program transposes only the [G, H] result, where
  "concat" transposes every split's partial first."""
  import re
  from jax import export
  B, K, G, H, S, R, group = 1, 8, 4, 128, 4096, 128, 128
  args = partials_args(4, H, B, K, G, S, group, R)
  ranks = {}
  for residual in ("merge", "concat"):
    fn = jax.jit(lambda *a, residual=residual: lowbit_decode_attention(
        *a, bits=4, group=group, implementation="pallas_mosaic_gpu",
        config=mgpu.MosaicGPUConfig(residual=residual)))
    with lowering_for("gpu"):
      text = export.export(fn, platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"),
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args).mlir_module()
    ranks[residual] = [t.count("x") for t in re.findall(r"stablehlo\.transpose.*-> tensor<([^>]*)>",
                                                          text)]
  # a result type "1x8x4x128xf32" has as many "x" as dimensions
  assert ranks["merge"] and max(ranks["merge"]) == 4, ranks        # [B, K, G, H] only
  assert max(ranks["concat"]) == 5, ranks                          # [B, K, N, rows, H]


@pytest.mark.parametrize("bits,H", [(4, 128), (2, 128)])
def test_fold_v_drops_the_v_tile_arithmetic(bits, H):
  """fold_v lowered for CUDA: the loop's packed float multiplies / adds lose V's scale and zero
  (one of each per register of the [64, H] tile: 64 x H / 256 a thread) and gain the softmax
  tile's few (P s_t, the zeros' sum)."""
  import re
  B, K, G, S, group = 2, 2, 4, 1024, 128
  args = partials_args(bits, H, B, K, G, S, group)
  ops = {}
  for on in (False, True):
    fn = jax.jit(lambda *a, on=on: mgpu.packed_partials_tok(
        *a, bits=bits, group=group, num_splits=2, stages=2, defer_sums=True, fold_v=on))
    (text,) = mosaic_gpu_modules(fn, *args)
    ops[on] = sum(len(re.findall(rf"= arith\.{op} .*vector<2x(?:bf16|f16)>", text))
                  for op in ("mulf", "addf"))
  per_thread = 64 * H // 256          # registers of two values a thread in the [64, H] tile
  assert ops[False] - ops[True] == 2 * per_thread, ops


def test_auto_on_a_gpu_is_the_mosaic_kernel_where_it_applies():
  """`auto` lowered for CUDA: the Mosaic GPU kernel for 4-bit H 128 and 2-bit H 128 (8-word
  rows as pairs); the Triton kernel for per-token K, which the Mosaic kernel refuses."""
  from jax import export
  for case, kernel in (((1, 2, 4, 128, 512, [300], [256], 4, 128, 128, "channel", 128), "mosaic"),
                       ((1, 2, 4, 128, 512, [300], [256], 2, 128, 128, "channel", 128), "mosaic"),
                       ((1, 2, 4, 128, 512, [300], [256], 4, 128, 128, "token", 32), "triton")):
    q, cache, st = make_case(case, jnp.bfloat16)
    fn = jax.jit(lambda q, *c, st=st: lowbit_decode_attention(
        q, *c, jnp.asarray([300], jnp.int32), jnp.asarray([256], jnp.int32), **st))
    with lowering_for("gpu"):
      text = export.export(fn, platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"),
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, *cache).mlir_module()
    assert ("mosaic_gpu" in text) == (kernel == "mosaic"), case
    assert ("xla.gpu.triton" in text) == (kernel == "triton") or kernel == "mosaic", case


def test_auto_over_block_selections_prefers_triton_for_few_pairs():
  """Block selections: `auto` lowered for CUDA runs the Triton kernel below
  SPARSE_MOSAIC_MIN_PAIRS (sequence, KV head) pairs and the Mosaic GPU kernel from there on."""
  from jax import export
  import pallas_kernels.lowbit_decode as lbd
  for B, kernel in ((1, "triton"), (lbd.SPARSE_MOSAIC_MIN_PAIRS // 2, "mosaic")):
    case = (B, 2, 4, 128, 256, [200] * B, [128] * B, 4, 128, 128, "channel", 128)
    q, cache, st = make_case(case, jnp.bfloat16)
    idx = jnp.asarray(random_blocks(3, B, 2, 4, 2))
    fn = jax.jit(lambda q, *c, st=st, B=B: lowbit_decode_attention(
        q, *c, jnp.full((B,), 200, jnp.int32), jnp.full((B,), 128, jnp.int32), **st,
        block_indices_BKM=idx, block_size=64))
    with lowering_for("gpu"):
      text = export.export(fn, platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"),
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, *cache).mlir_module()
    assert ("mosaic_gpu" in text) == (kernel == "mosaic"), B


def test_refusals_name_the_setting():
  bf16 = jnp.bfloat16
  assert "bfloat16 / float16" in mgpu.mgpu_supported(128, 4, 128, "channel", 128, jnp.float32,
                                                     False)
  assert mgpu.mgpu_supported(128, 2, 128, "channel", 128, bf16, False) is None   # as pairs
  assert "W=4" in mgpu.mgpu_supported(64, 2, 128, "channel", 64, bf16, False)
  assert "k_mode" in mgpu.mgpu_supported(128, 4, 128, "token", 128, bf16, False)
  assert "k_mode" in mgpu.mgpu_supported(128, 4, 128, "channel", 32, bf16, False)
  assert "group=32" in mgpu.mgpu_supported(128, 4, 32, "channel", 128, bf16, False)
  assert "64-token blocks" in mgpu.mgpu_supported(128, 4, 128, "channel", 128, bf16, True)
  assert mgpu.mgpu_supported(128, 4, 128, "channel", 128, bf16, False) is None
  q, cache, st = make_case((1, 1, 2, 64, 256, [100], [64], 4, 64, 128, "channel", 64), bf16)
  with pytest.raises(NotSupported, match="W=8"):
    mgpu.lowbit_decode_attention(q, *cache, jnp.asarray([100]), jnp.asarray([64]), **st,
                                 interpret=True,
                                 config=mgpu.MosaicGPUConfig(paired_slabs=False))
  # auto falls through to the next backend rather than failing (2 bits at H 64: rows of 4 words)
  q, cache, st = make_case((1, 1, 2, 64, 256, [100], [64], 2, 64, 128, "channel", 64), bf16)
  with pytest.raises(NotSupported, match="W=4"):
    mgpu.lowbit_decode_attention(q, *cache, jnp.asarray([100]), jnp.asarray([64]), **st,
                                 interpret=True)
  out = lowbit_decode_attention(q, *cache, jnp.asarray([100], jnp.int32),
                                jnp.asarray([64], jnp.int32), **st,
                                implementation=("pallas_mosaic_gpu", "xla"), interpret=True)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  with pytest.raises(ValueError, match="num_splits"):
    mgpu.MosaicGPUConfig(num_splits=0).validate()
  with pytest.raises(ValueError, match="programs_per_sm"):
    mgpu.MosaicGPUConfig(programs_per_sm=0).validate()
  with pytest.raises(ValueError, match="overlap"):
    mgpu.MosaicGPUConfig(overlap=1).validate()
  with pytest.raises(ValueError, match="residual must be 'concat' or 'merge'"):
    mgpu.MosaicGPUConfig(residual="fold").validate()
  with pytest.raises(ValueError, match="token_rows"):
    mgpu.MosaicGPUConfig(token_rows=1).validate()
  # G > W: the default falls back to the query-rows form; asking for token rows is refused
  q, cache, st = make_case((1, 1, 32, 128, 256, [100], [64], 4, 64, 128, "channel", 128), bf16)
  with pytest.raises(NotSupported, match="G=32"):
    mgpu.lowbit_decode_attention(q, *cache, jnp.asarray([100]), jnp.asarray([64]), **st,
                                 interpret=True, config=mgpu.MosaicGPUConfig(token_rows=True))
  out = mgpu.lowbit_decode_attention(q, *cache, jnp.asarray([100]), jnp.asarray([64]), **st,
                                     interpret=True)
  k, v = dequant_np(cache, [100], [64], **st)
  check_close(out, oracle(q, k, v, length_valid([100], q.shape[1], k.shape[2])), bf16)
  with pytest.raises(ValueError, match="profile_space"):
    mgpu.MosaicGPUConfig(profile_dir="/tmp", profile_space=0).validate()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_matches_oracle(case, dtype):
  check_case(case, dtype, False)
  check_case(case, dtype, False, num_splits=5, pipeline_depth=1)
  check_case(case, dtype, False, overlap=True)
  check_case(case, dtype, False, token_rows=False)
  check_case(case, dtype, False, num_splits=5, pipeline_depth=2, token_rows=False)
  check_case(case, dtype, False, defer_sums=False)
  check_case(case, dtype, False, residual="concat")


# many blocks a program (S 8K, one or two splits): the pipeline refills every slot many times
STRESS = (4, 8, 4, 128, 8192, [8000, 5000, 7777, 64], [7936, 4992, 7680, 0], 4, 128, 128,
          "channel", 128)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [STRESS, *CASES, *PAIRED])
def test_gpu_without_auto_barriers_matches_oracle(case):
  """auto_barriers=False compiled (only the kernel's own barriers): both forms where they apply,
  a refill of the pipeline slot every block (depth 1) and deeper pipelines, dense and over
  selected blocks, each run three times (a missing barrier shows as a race, not every run)."""
  paired = case in PAIRED
  for _ in range(3):
    check_case(case, jnp.bfloat16, False, auto_barriers=False, num_splits=1, pipeline_depth=1)
    check_case(case, jnp.float16, False, auto_barriers=False, num_splits=2, pipeline_depth=3)
    check_case(case, jnp.bfloat16, False, auto_barriers=False, defer_sums=False)
    if not paired:
      check_case(case, jnp.bfloat16, False, auto_barriers=False, token_rows=False,
                 num_splits=1, pipeline_depth=1)
      check_case(case, jnp.bfloat16, False, auto_barriers=False, token_rows=False,
                 overlap=True)
    check_sparse(case, jnp.bfloat16, False, 5 if case is not STRESS else 40,
                 auto_barriers=False, num_splits=1)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [STRESS, *CASES, *PAIRED])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_magic_pairs_match_oracle(case, dtype):
  """magic_pairs=True compiled (slabs of 16 / 32 channels and the paired 8-word rows), alone and
  with the other new options, dense and over selected blocks."""
  check_case(case, dtype, False, magic_pairs=True)
  check_case(case, dtype, False, magic_pairs=True, auto_barriers=False, block_tokens=128)
  check_sparse(case, dtype, False, 5, magic_pairs=True, auto_barriers=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [STRESS, *CASES, *PAIRED])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_fold_v_matches_oracle(case, dtype):
  """fold_v=True compiled, alone and with the other new options, dense and over selected
  blocks."""
  check_case(case, dtype, False, fold_v=True)
  check_case(case, dtype, False, fold_v=True, magic_pairs=True, auto_barriers=False,
             block_tokens=128)
  check_sparse(case, dtype, False, 5, fold_v=True, auto_barriers=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [STRESS, TOKENS_128, *CASES, *PAIRED])
def test_gpu_block_tokens_128_matches_oracle(case):
  """block_tokens=128 compiled (cases with groups of 64 run 64-token steps), with and without
  the automatic barriers, one split (a refill every step at depth 1) and several."""
  for _ in range(2):
    check_case(case, jnp.bfloat16, False, block_tokens=128)
    check_case(case, jnp.float16, False, block_tokens=128, auto_barriers=False, num_splits=1,
               pipeline_depth=1)
    check_case(case, jnp.bfloat16, False, block_tokens=128, auto_barriers=False,
               defer_sums=False, num_splits=3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", PAIRED)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_paired_slabs_match_oracle(case, dtype):
  check_case(case, dtype, False, paired_slabs=True)
  check_case(case, dtype, False, paired_slabs=True, num_splits=5, pipeline_depth=1)
  check_case(case, dtype, False, paired_slabs=True, defer_sums=False)
  check_sparse(case, dtype, False, 3, num_splits=2, paired_slabs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("token_rows", [False, True])
def test_gpu_sparse_matches_oracle(case, token_rows):
  check_sparse(case, jnp.bfloat16, False, num_splits=2, token_rows=token_rows)
  check_sparse(case, jnp.bfloat16, False, num_splits=2, token_rows=token_rows, residual="concat")
