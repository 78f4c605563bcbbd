"""The Pallas Mosaic GPU ternary matmul (`lowbit_matmul` / `lowbit_matmul_int8`'s
`pallas_mosaic_gpu`, I2_S, M <= 64): in the Mosaic GPU interpreter the W2A8 path equals the XLA
integer path bit for bit and the W2A16 path is within bf16 rounding of float64 (ragged K, M 1..64,
several splits); the compiled path lowered for CUDA on the CPU; refusals. On a GPU
(`pytest -m gpu`): the same at an 8B model's shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import NotSupported, lowering_for
from pallas_kernels.lowbit_matmul import layout, lowbit_matmul, lowbit_matmul_int8
from pallas_kernels.lowbit_matmul import pallas_mosaic_gpu as mgpu


def lower_for_cuda(fn, *args) -> str:
  """StableHLO text of fn (jitted) lowered for CUDA on any host: the Pallas -> Mosaic GPU
  lowering runs (layouts, shared-memory fit), Mosaic's own compilation is left to a GPU."""
  from jax import export
  with lowering_for("gpu"):
    return export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args).mlir_module()


def weight(seed, K, N, fmt="i2_s"):
  codes = np.random.default_rng(seed).integers(-1, 2, size=(K, N)).astype(np.int8)
  return layout.pack_ternary(codes, 0.37, fmt), codes


def check(M, K, N, interpret, fmt="i2_s", **cfg):
  pw, codes = weight(M + K + N, K, N, fmt)
  rng = np.random.default_rng(K)
  config = mgpu.MosaicGPUConfig(**cfg) if cfg else None
  kw = dict(implementation="pallas_mosaic_gpu", interpret=interpret, config=config)
  xi = jnp.asarray(rng.integers(-127, 128, size=(M, K)), jnp.int8)
  xs = jnp.asarray(rng.random(M) + 0.5, jnp.float32)
  want = lowbit_matmul_int8(xi, xs, pw, implementation="xla")
  # i2_t W2A8: the s8 GEMV (the default) and the 16-bit operand's path (in the interpreter only
  # where the config sets one of that path's options)
  sixteen = fmt == "i2_t" and (not interpret or bool(set(cfg) & {
      "block_n", "word_shifts", "fused_decode", "hold_operands"}))
  for c in [config] + ([dataclasses.replace(config or mgpu.MosaicGPUConfig(), gemv_s8=False)]
                       if sixteen else []):
    got = lowbit_matmul_int8(xi, xs, pw, **{**kw, "config": c})
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for dtype in (jnp.bfloat16, jnp.float16):
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    y = lowbit_matmul(x, pw, **kw)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = np.asarray(x, np.float64) @ codes.astype(np.float64) * np.float64(np.float32(0.37))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-2,
                               atol=1e-2 * np.abs(ref).max())


@pytest.mark.parametrize("M,K,N,cfg", [(1, 500, 256, dict(num_splits=2)),
                                       (13, 768, 384, dict(num_splits=3, pipeline_depth=1))])
def test_interpret_matches_the_xla_paths(M, K, N, cfg):
  check(M, K, N, True, **cfg)


@pytest.mark.parametrize("M,K,N,cfg", [(1, 1000, 128, dict(num_splits=2)),
                                       (13, 1536, 192, dict(block_n=64, num_splits=2,
                                                            pipeline_depth=1)),
                                       (64, 512, 256, {}),
                                       (5, 1024, 128, dict(word_shifts=True, fused_decode=False)),
                                       (7, 1000, 192, dict(block_n=64, fused_decode=False))])
def test_i2t_interpret_matches_the_xla_paths(M, K, N, cfg):
  """The i2_t kernel (the weight as the wgmma's register operand): ragged K, 64-column tiles,
  several splits, M up to 64."""
  check(M, K, N, True, "i2_t", **cfg)


def test_i2t_slot_operands_are_exact():
  """Every 16-bit word -> its 8 codes - 1, exactly, in bf16 and f16 (the mask / magic / fma
  decoding)."""
  words = jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16).reshape(1024, 64)
  want = [((np.asarray(words, np.int64) >> (2 * i)) & 3) - 1 for i in range(8)]
  for dtype in (jnp.bfloat16, jnp.float16):
    got = mgpu.slot_operands(words, dtype)
    for i in range(8):
      assert got[i].dtype == dtype
      np.testing.assert_array_equal(np.asarray(got[i], np.float64), want[i])


@pytest.mark.parametrize("high", ["complement", "random"])
def test_i2t_word_shifts_read_only_their_own_word(high):
  """config.word_shifts shifts two neighbouring words as one 32-bit register: every word (as the
  low half, whose top bits then hold the neighbour's) still decodes exactly, whatever its
  neighbour (the complement, or random); the high half's own decoding is checked as well."""
  low = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
  hi = (~low if high == "complement" else
        np.random.default_rng(0).integers(0, 1 << 16, low.size).astype(np.uint16))
  words = jnp.asarray(np.stack([low, hi], -1).reshape(2048, 64))
  want = [((np.asarray(words, np.int64) >> (2 * i)) & 3) - 1 for i in range(8)]
  for dtype in (jnp.bfloat16, jnp.float16):
    for i in range(8):
      got = mgpu.slot_operand(words, i, dtype, mgpu.shift_pairs)
      np.testing.assert_array_equal(np.asarray(got, np.float64), want[i])


def test_i2t_fused_decode_fields_are_exact_per_register():
  """config.fused_decode decodes a 32-bit register (two words) at a time
  (`mgpu_util.fma_from_words`): shift, and / or with both halves' mask / magic, then one packed
  fma. Emulated on the register pairs in numpy with `slot_fields`' constants, every word (the low
  half, whose neighbour is its complement or random) and its neighbour decode exactly."""
  low = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
  for hi in (~low, np.random.default_rng(1).integers(0, 1 << 16, low.size).astype(np.uint16)):
    regs = np.stack([low, hi], -1).view(np.uint32)[:, 0]          # little endian: low first
    for dtype in (jnp.bfloat16, jnp.float16):
      for i in range(8):
        f = mgpu.slot_fields(i, dtype)
        assert f["mask"] >> (16 - f["shift"]) == 0                  # below 16 - shift
        r = ((regs >> f["shift"]) & (f["mask"] * 0x10001)) | (f["magic"] * 0x10001)
        v = r.astype(np.uint32).view(np.uint16).view(jnp.dtype(dtype)).astype(np.float64)
        got = v * f["mul"] + f["add"]                                 # exact in dtype
        want = ((np.stack([low, hi], -1).reshape(-1).astype(np.int64) >> (2 * i)) & 3) - 1
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block_n,M,dtype,word_shifts,fused,hold", [
    (128, 1, jnp.bfloat16, False, False, False), (64, 16, jnp.float16, False, False, False),
    (128, 1, jnp.bfloat16, True, False, False), (64, 16, jnp.float16, True, False, False),
    (128, 1, jnp.bfloat16, False, True, False), (64, 16, jnp.float16, False, True, False),
    (128, 1, jnp.bfloat16, False, True, True), (64, 16, jnp.float16, True, False, True)])
def test_i2t_kernel_lowers_for_cuda(block_n, M, dtype, word_shifts, fused, hold):
  S_ = jax.ShapeDtypeStruct
  fn = jax.jit(lambda x, p: mgpu.partial_sums_t(x, p, N=1024, block_n=block_n, num_splits=2,
                                                stages=3, word_shifts=word_shifts,
                                                fused_decode=fused, hold_operands=hold))
  assert "mosaic_gpu" in lower_for_cuda(fn, S_((M, 2048), dtype), S_((1024, 256), jnp.uint16))


@pytest.mark.parametrize("overlap", [False, True])
def test_compiled_kernel_lowers_for_cuda(overlap):
  """Both schedules (overlap: two B tiles, the wgmma in flight across steps) lower for CUDA."""
  S_ = jax.ShapeDtypeStruct
  fn = jax.jit(lambda x, p: mgpu.partial_sums(x, p, N=1024, num_splits=4, stages=2,
                                              overlap=overlap))
  assert "mosaic_gpu" in lower_for_cuda(fn, S_((1, 2048), jnp.bfloat16),
                                        S_((512, 1024), jnp.uint8))


def test_pipeline_depth_is_cut_to_what_shared_memory_holds():
  """overlap's second B tile leaves room for two K steps: a requested depth of 3 runs at 2 and
  lowers for CUDA (Mosaic refuses kernels over 227 KiB of shared memory while lowering)."""
  bf16 = jnp.bfloat16
  assert mgpu.smem_bytes(2, True, bf16) <= 227 * 1024 < mgpu.smem_bytes(3, True, bf16)
  assert mgpu.smem_bytes(3, False, bf16) <= 227 * 1024
  pw, _ = weight(0, 1024, 256)
  config = mgpu.MosaicGPUConfig(num_splits=2, pipeline_depth=3, overlap=True)
  fn = jax.jit(lambda x: lowbit_matmul(x, pw, implementation="pallas_mosaic_gpu", config=config))
  assert "mosaic_gpu" in lower_for_cuda(fn, jax.ShapeDtypeStruct((1, 1024), bf16))


def test_layout_bookkeeping_and_refusals():
  perm = mgpu.row_permutation()
  assert sorted(perm.tolist()) == list(range(mgpu.KT))
  y = np.arange(2 * 256).reshape(2, 256)
  cols = np.asarray(mgpu.unpermute_columns(jnp.asarray(y)))
  assert cols[0, 4 * 5 + 2] == y[0, 2 * 32 + 5] and cols[1, 128 + 4 * 31 + 3] == y[1, 128 + 3 * 32 + 31]
  pw, _ = weight(0, 256, 256)
  assert mgpu.mgpu_supported(1, pw, jnp.bfloat16) is None
  assert "i2_s" in mgpu.mgpu_supported(1, weight(0, 256, 256, "tl1")[0], jnp.bfloat16)
  assert "multiple of 256" in mgpu.mgpu_supported(1, weight(0, 300, 256)[0], jnp.bfloat16)
  assert "N=200" in mgpu.mgpu_supported(1, weight(0, 256, 200)[0], jnp.bfloat16)
  assert "M=65" in mgpu.mgpu_supported(65, pw, jnp.bfloat16)
  assert "float32" in mgpu.mgpu_supported(1, pw, jnp.float32)
  with pytest.raises(NotSupported, match="multiple of 128"):
    mgpu.lowbit_matmul(jnp.ones((1, 256), jnp.bfloat16), weight(0, 256, 200)[0], jnp.bfloat16,
                       interpret=True)
  # a chain falls through to XLA where the kernel does not take the shape
  y = lowbit_matmul(jnp.ones((1, 300), jnp.float32), weight(0, 300, 256)[0],
                    implementation=("pallas_mosaic_gpu", "xla"))
  assert y.shape == (1, 256)
  pt, _ = weight(0, 1024, 128, "i2_t")
  assert mgpu.mgpu_supported_t(1, pt, jnp.bfloat16) is None
  assert "i2_t" in mgpu.mgpu_supported_t(1, pw, jnp.bfloat16)
  assert "N=96" in mgpu.mgpu_supported_t(1, weight(0, 512, 96, "i2_t")[0], jnp.bfloat16)
  assert "M=65" in mgpu.mgpu_supported_t(65, pt, jnp.bfloat16)
  assert "K=1001" in mgpu.mgpu_supported_t(1, weight(0, 1001, 64, "i2_t")[0], jnp.bfloat16)
  with pytest.raises(NotSupported, match="block_n=128"):
    mgpu.lowbit_matmul(jnp.ones((1, 1024), jnp.bfloat16), weight(0, 1024, 192, "i2_t")[0],
                       jnp.bfloat16, interpret=True, config=mgpu.MosaicGPUConfig(block_n=128))
  with pytest.raises(ValueError, match="block_n"):
    mgpu.MosaicGPUConfig(block_n=96).validate()
  with pytest.raises(ValueError, match="num_splits"):
    mgpu.MosaicGPUConfig(num_splits=0).validate()
  with pytest.raises(ValueError, match="overlap"):
    mgpu.MosaicGPUConfig(overlap="yes").validate()


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1, 4096, 14336), (16, 14336, 4096), (64, 8192, 8192)])
def test_gpu_matches_the_xla_paths(M, K, N):
  check(M, K, N, False)
  check(M, K, N, False, num_splits=3, pipeline_depth=3)
  check(M, K, N, False, overlap=True)
  check(M, K, N, False, num_splits=5, pipeline_depth=3, overlap=True)


def test_i2t_x_is_padded_only_where_the_tma_needs_it():
  """x is read in place when each dimension is below its shared-memory tile (8 rows, 128 bytes)
  or a multiple of it; otherwise padded up to the next multiple (both measured on the GPU: K =
  1000 failed to lower in place)."""
  assert mgpu.x_padded_shape(1, 4096, jnp.bfloat16) == (1, 4096)
  assert mgpu.x_padded_shape(3, 1000, jnp.bfloat16) == (3, 1024)
  assert mgpu.x_padded_shape(13, 8192, jnp.float16) == (16, 8192)
  assert mgpu.x_padded_shape(16, 40, jnp.bfloat16) == (16, 40)
  assert mgpu.x_padded_shape(64, 14336, jnp.bfloat16) == (64, 14336)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1, 4096, 14336), (16, 14336, 4096), (64, 8192, 8192),
                                   (3, 1000, 192), (13, 1536, 256)])
def test_gpu_i2t_matches_the_xla_paths(M, K, N):
  check(M, K, N, False, "i2_t")
  check(M, K, N, False, "i2_t", block_n=64, num_splits=3, pipeline_depth=2)
  check(M, K, N, False, "i2_t", word_shifts=True, fused_decode=False)
  check(M, K, N, False, "i2_t", fused_decode=False)                       # 16-bit decoding
  check(M, K, N, False, "i2_t", hold_operands=True)


# ------------------------------------------------ the i2_t GEMM (W2A8, M > 64: s8 wgmma)

def check_gemm(M, K, N, interpret, out_dtype=None, **cfg):
  """The GEMM kernel's W2A8 output equals the exact integer product (float64 sums of integer
  products below 2^53, then the same float32 scaling as the XLA integer path) bit for bit; in
  the interpreter also the XLA integer path itself. (On the H100 under the tests' "highest"
  matmul precision XLA's int8 GEMM of these shapes was off in ~12% of the elements, so the GPU
  test does not take XLA as its reference.)"""
  pw, codes = weight(M + K + N, K, N, "i2_t")
  rng = np.random.default_rng(K + 1)
  xi = jnp.asarray(rng.integers(-127, 128, size=(M, K)), jnp.int8)
  xs = jnp.asarray(rng.random(M) + 0.5, jnp.float32)
  config = mgpu.MosaicGPUConfig(**cfg) if cfg else None
  got = lowbit_matmul_int8(xi, xs, pw, out_dtype=out_dtype, implementation="pallas_mosaic_gpu",
                           interpret=interpret, config=config)
  exact = np.asarray(xi, np.float64) @ codes.astype(np.float64)
  want = jnp.asarray(exact.astype(np.float32) * np.float32(0.37) * np.asarray(xs)[:, None])
  want = want.astype(out_dtype or jnp.float32)     # one rounding of the same float32 values
  assert got.shape == (M, N) and got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  if interpret:
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(lowbit_matmul_int8(
        xi, xs, pw, out_dtype=out_dtype, implementation="xla"), np.float32))


ONE_WG = dict(gemm_warpgroups=1, fused_epilogue=False)


@pytest.mark.parametrize("M,K,N,cfg", [(65, 1000, 128, {}), (300, 600, 64, {}),
                                       (130, 1536, 192, dict(pipeline_depth=3)),
                                       (200, 1024, 128, dict(gemm_block_m=64)),
                                       (300, 600, 64, dict(out_dtype=jnp.bfloat16)),
                                       (65, 1000, 128, ONE_WG),
                                       (130, 1536, 192, dict(pipeline_depth=2, **ONE_WG)),
                                       (200, 1024, 128, dict(gemm_block_m=64, **ONE_WG)),
                                       (100, 600, 256, dict(fused_epilogue=False)),
                                       (70, 512, 128, dict(gemm_warpgroups=1)),
                                       (200, 1536, 256, dict(gemm_k_slots=1)),
                                       (70, 1000, 128, dict(gemm_k_slots=4, gemm_block_m=64)),
                                       (130, 1000, 192, dict(gemm_k_slots=2, **ONE_WG)),
                                       (65, 600, 64, dict(gemm_k_slots=4))])
def test_i2t_gemm_interpret_matches_the_xla_integer_path(M, K, N, cfg):
  """Ragged K (padded to 512-row blocks), M past a program's 64 / 256 rows, several column
  tiles, two and three stages, 64-row programs; the default (two consumer warpgroups in a
  warp-specialised pipeline, the epilogue in the kernel: float32 and bf16 y; one warpgroup
  where N is not a multiple of 128), one warpgroup with the int32 sums out, each alone; two and
  four slot pairs a pipeline step (256 / 512 K rows), with two warpgroups and with one."""
  check_gemm(M, K, N, True, **cfg)


GV = dict(gemv_s8=True)


@pytest.mark.parametrize("M,K,N,cfg", [(1, 1024, 128, GV),                     # split in 2
                                       (3, 1000, 192, dict(num_splits=1, **GV)),   # fused
                                       pytest.param(16, 1536, 256,
                                                    dict(gemv_warpgroups=2, **GV),
                                                    marks=pytest.mark.slow),   # ~11 s
                                       (40, 600, 64, dict(pipeline_depth=2, **GV)),
                                       (13, 2048, 128, dict(num_splits=2, gemv_warpgroups=2,
                                                            **GV))])
def test_i2t_s8_gemv_interpret_matches_the_xla_integer_path(M, K, N, cfg):
  """`gemv_s8`: decoding rows on the GEMM's s8 wgmma, split along K (int32 sums of each share
  added in XLA) or with the epilogue fused (one split), one or two consumer warpgroups."""
  check_gemm(M, K, N, True, **cfg)
  check_gemm(M, K, N, True, jnp.bfloat16, **cfg)


def test_i2t_s8_gemv_bookkeeping():
  assert [mgpu.gemv_block_m(m) for m in (1, 8, 9, 16, 17, 33, 64)] == [8, 8, 16, 16, 32, 64, 64]
  # 8192 rows = 16 blocks over 128 column tiles: 2 splits (~2 programs an SM on 132 SMs); the
  # most that divides the blocks
  assert mgpu.gemv_splits(16, 128) == 2 and mgpu.gemv_splits(28, 64) == 4
  assert mgpu.gemv_splits(8, 16) == 8 and mgpu.gemv_splits(7, 128) == 1
  assert mgpu.gemv_splits(16, 128, 4) == 4 and mgpu.gemv_splits(16, 128, 3) == 2
  with pytest.raises(ValueError, match="gemv_warpgroups"):
    mgpu.MosaicGPUConfig(gemv_warpgroups=4).validate()
  with pytest.raises(ValueError, match="gemv_s8"):
    mgpu.MosaicGPUConfig(gemv_s8=1).validate()


def test_i2t_gemm_layout_bookkeeping_and_refusals():
  perm = mgpu.gemm_x_permutation()
  assert sorted(perm.tolist()) == list(range(mgpu.KS_G))
  # position 16 g + 4 c + 2 e + s <- row s * 64 + 8 g + 2 c + e (g 3, c 1, e 1, s 1)
  assert perm[16 * 3 + 4 + 2 + 1] == 64 + 24 + 2 + 1 and perm[0] == 0 and perm[1] == 64
  x = np.arange(3 * 256).reshape(3, 256)
  np.testing.assert_array_equal(np.asarray(mgpu.permute_x_gemm(jnp.asarray(x))),
                                x.reshape(3, 2, 128)[:, :, perm].reshape(3, 256))
  assert [mgpu.gemm_block_m(m) for m in (65, 128, 200, 300, 4096)] == [128, 128, 256, 256, 256]
  assert [mgpu.gemm_block_m(m, 128) for m in (65, 300)] == [128, 128]
  assert mgpu.gemm_block_m(65, 256) == 128 and mgpu.gemm_block_m(300, 64) == 64
  with pytest.raises(ValueError, match="gemm_block_m"):
    mgpu.MosaicGPUConfig(gemm_block_m=96).validate()
  with pytest.raises(ValueError, match="fused_epilogue"):
    mgpu.MosaicGPUConfig(fused_epilogue=1).validate()
  with pytest.raises(ValueError, match="gemm_warpgroups"):
    mgpu.MosaicGPUConfig(gemm_warpgroups=3).validate()
  with pytest.raises(ValueError, match="gemm_k_slots"):
    mgpu.MosaicGPUConfig(gemm_k_slots=3).validate()
  # four slot pairs a step: [128, 512] x tiles do not fit two warpgroups' three stages
  assert mgpu.gemm_stages(64, None, 2, 4) == 4 and mgpu.gemm_stages(128, None, 2, 2) == 3
  with pytest.raises(NotSupported, match="gemm_k_slots"):
    mgpu.gemm_stages(128, None, 2, 4)
  # two warpgroups: 128-row programs, their two output tiles beside a four-stage pipeline
  assert mgpu.smem_bytes_g(128, 4, 2) <= 227 * 1024 < mgpu.smem_bytes_g(128, 5, 2)
  assert mgpu.gemm_stages(128, 6, 2) == 4
  pt, _ = weight(0, 1024, 128, "i2_t")
  assert mgpu.mgpu_supported_g(100, pt, jnp.int8) is None
  assert "W2A8" in mgpu.mgpu_supported_g(100, pt, jnp.bfloat16)
  assert "N=96" in mgpu.mgpu_supported_g(100, weight(0, 512, 96, "i2_t")[0], jnp.int8)
  assert "i2_t" in mgpu.mgpu_supported_g(100, weight(0, 512, 128)[0], jnp.int8)
  with pytest.raises(NotSupported, match="W2A8"):
    mgpu.lowbit_matmul(jnp.ones((100, 1024), jnp.bfloat16), pt, jnp.bfloat16, interpret=True)
  # float x past 64 rows falls through to XLA in a chain
  y = lowbit_matmul(jnp.ones((100, 1024), jnp.float32), pt, implementation=("pallas_mosaic_gpu",
                                                                            "xla"))
  assert y.shape == (100, 128)
  assert mgpu.smem_bytes_g(256, 4) <= 227 * 1024
  # one warpgroup: at least two stages; two warpgroups: three
  assert [mgpu.gemm_stages(256, d) for d in (None, 1, 2, 3, 5)] == [4, 2, 2, 3, 5]
  assert [mgpu.gemm_stages(128, d, 2) for d in (None, 1, 2, 3)] == [4, 3, 3, 3]


@pytest.mark.parametrize("block_m,stages,k_slots", [(256, 4, 1), (128, 3, 1), (64, 5, 1),
                                                    (128, 3, 2), (64, 3, 4)])
def test_i2t_gemm_lowers_for_cuda(block_m, stages, k_slots):
  S_ = jax.ShapeDtypeStruct
  fn = jax.jit(lambda x, p: mgpu.gemm_sums(x, p, N=1024, block_m=block_m, stages=stages,
                                           k_slots=k_slots))
  Mp = -(-300 // block_m) * block_m
  fused = jax.jit(lambda x, p, v: mgpu.gemm_fused(
      x, p, v, N=1024, block_m=block_m, stages=stages, k_slots=k_slots,
      out_dtype=jnp.dtype(jnp.bfloat16 if block_m == 128 else jnp.float32)))
  bm2 = min(block_m, 128)
  two = jax.jit(lambda x, p, v: mgpu.gemm_fused(
      x, p, v, N=1024, block_m=bm2, stages=mgpu.gemm_stages(bm2, 4, 2, k_slots), warpgroups=2,
      k_slots=k_slots, out_dtype=jnp.dtype(jnp.float32)))
  Mp2 = -(-300 // bm2) * bm2
  for f, args in ((fn, ()), (fused, (S_((3, Mp), jnp.float32),)),
                  (two, (S_((3, Mp2), jnp.float32),))):
    assert "mosaic_gpu" in lower_for_cuda(f, S_((300, 2048), jnp.int8),
                                          S_((1024, 256), jnp.uint16), *args)


@pytest.mark.parametrize("block_m,warpgroups,splits", [(8, 1, 4), (16, 2, 2), (64, 1, 1)])
def test_i2t_s8_gemv_lowers_for_cuda(block_m, warpgroups, splits):
  S_ = jax.ShapeDtypeStruct
  stages = mgpu.gemm_stages(block_m, None, warpgroups, 4)
  fn = jax.jit(lambda x, p: mgpu.gemm_sums(x, p, N=1024, block_m=block_m, stages=stages,
                                           warpgroups=warpgroups, k_slots=4, num_splits=splits))
  assert "mosaic_gpu" in lower_for_cuda(fn, S_((block_m - 3, 2048), jnp.int8),
                                        S_((1024, 256), jnp.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1, 8192, 8192), (1, 4096, 14336), (16, 14336, 4096),
                                   (3, 4096, 1024), (40, 1000, 192)])
def test_gpu_i2t_s8_gemv_matches_the_xla_integer_path(M, K, N):
  check_gemm(M, K, N, False, **GV)
  check_gemm(M, K, N, False, jnp.bfloat16, **GV)
  check_gemm(M, K, N, False, num_splits=1, **GV)                 # the epilogue fused
  check_gemm(M, K, N, False, gemv_warpgroups=2, **GV)
  check_gemm(M, K, N, False, pipeline_depth=2, **GV)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(2048, 8192, 8192), (2048, 4096, 14336), (513, 14336, 4096),
                                   (100, 1000, 192)])
def test_gpu_i2t_gemm_matches_the_xla_integer_path(M, K, N):
  check_gemm(M, K, N, False)                       # two warpgroups, the epilogue fused
  check_gemm(M, K, N, False, jnp.bfloat16)
  check_gemm(M, K, N, False, pipeline_depth=2)     # runs at 3 (gemm_stages)
  check_gemm(M, K, N, False, gemm_block_m=64)
  check_gemm(M, K, N, False, fused_epilogue=False)
  # one warpgroup: the (block_m, stages) pairs that gave wrong sums while a step's wgmma was
  # left in flight into the next step (128 / 3, 128 / 4, 256 / 3, 64 / 3), and two stages
  one = dict(gemm_warpgroups=1, fused_epilogue=False, gemm_k_slots=1)
  for block_m, depth in ((256, 4), (256, 3), (256, 2), (128, 3), (128, 4), (64, 3)):
    check_gemm(M, K, N, False, gemm_block_m=block_m, pipeline_depth=depth, **one)
  check_gemm(M, K, N, False, gemm_warpgroups=1)
  check_gemm(M, K, N, False, jnp.bfloat16, gemm_warpgroups=1, gemm_block_m=128)
  # one / four slot pairs a pipeline step (two: the default)
  check_gemm(M, K, N, False, gemm_k_slots=1)
  check_gemm(M, K, N, False, gemm_k_slots=4, gemm_block_m=64)
  check_gemm(M, K, N, False, **{**one, "gemm_k_slots": 2})


def test_i2t_gemm_register_decoding_matches_the_interpreter_operand():
  """`mgpu_util.s8_pairs_from_words`' per-register formula, emulated in numpy on the 32-bit
  registers of word pairs (2 j, 2 j + 1) (the 16-bit WGMMA layout's vectors), gives bytes that,
  placed at s8 columns 4 j .. 4 j + 3 (the 8-bit layout's vector of the same thread and rows),
  equal the interpreter's operand (`_decode_interpret`) for every slot pair."""
  words = np.random.default_rng(0).integers(0, 1 << 16, (64, 64)).astype(np.uint16)
  regs = words.view(np.uint32)                        # little endian: word 2 j in the low half
  for t in range(4):
    v = regs >> np.uint32(4 * t)
    q = (v & np.uint32(0x00030003)) | ((v & np.uint32(0x000C000C)) << np.uint32(6))
    emulated = q.view(np.uint8).reshape(64, 128)      # byte b of register j -> column 4 j + b
    want = np.asarray(mgpu._decode_interpret(jnp.asarray(words), jnp.int32(t)))
    np.testing.assert_array_equal(emulated.astype(np.int32), want)


# ------------------------------------- fused projections: i2_t weights with per-column scales

def fused_weights(K, Ns, seed=0):
  """I2_T weights of one K with distinct per-tensor scales, and their `concat_i2t`."""
  rng = np.random.default_rng(seed)
  ws = [layout.pack_ternary(rng.integers(-1, 2, size=(K, n)).astype(np.int8),
                            np.float32(0.2 + 0.1 * i), "i2_t") for i, n in enumerate(Ns)]
  return ws, layout.concat_i2t(ws)


@pytest.mark.parametrize("M,cfg", [(1, {}), (1, dict(num_splits=1)), (3, dict(gemv_s8=False)),
                                   pytest.param(70, {}, marks=pytest.mark.slow),   # ~8 s
                                   (70, dict(gemm_warpgroups=1))])
def test_interpret_concatenated_weights_equal_each_weights_product(M, cfg):
  """`layout.concat_i2t` (q / k / v as one projection): every backend path (the s8 GEMV split and
  unsplit, the 16-bit operand path, the GEMM) gives each weight's columns bit for bit, W2A8 and
  W2A16, with per-column scales in the XLA epilogue."""
  K, Ns = 1000, (128, 64, 64)
  ws, cat = fused_weights(K, Ns, seed=M)
  assert cat.shape == (K, sum(Ns)) and cat.scale.shape == (sum(Ns),)
  rng = np.random.default_rng(1)
  xi = jnp.asarray(rng.integers(-127, 128, size=(M, K)), jnp.int8)
  xs = jnp.asarray(rng.random(M) + 0.5, jnp.float32)
  xf = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
  kw = dict(implementation="pallas_mosaic_gpu", interpret=True,
            config=mgpu.MosaicGPUConfig(**cfg))
  for impl_kw in (kw, dict(implementation="xla")):
    got = np.asarray(lowbit_matmul_int8(xi, xs, cat, **impl_kw))
    want = np.concatenate([np.asarray(lowbit_matmul_int8(xi, xs, w, **impl_kw)) for w in ws], 1)
    np.testing.assert_array_equal(got, want)
    if M <= 64:
      got = np.asarray(lowbit_matmul(xf, cat, **impl_kw), np.float32)
      want = np.concatenate([np.asarray(lowbit_matmul(xf, w, **impl_kw), np.float32) for w in ws], 1)
      np.testing.assert_array_equal(got, want)


def test_concat_i2t_refusals_and_bitplanes():
  ws, cat = fused_weights(512, (64, 64))
  with pytest.raises(ValueError, match="one K and block"):
    layout.concat_i2t([ws[0], fused_weights(1024, (64,))[0][0]])
  with pytest.raises(ValueError, match="one K and block"):
    layout.concat_i2t([ws[0], layout.pack_ternary(np.zeros((512, 64), np.int8), 0.5, "i2_s")])
  with pytest.raises(ValueError, match="at least one"):
    layout.concat_i2t([])
  with pytest.raises(ValueError, match="scale"):     # a scale of neither shape
    layout.check_packed(layout.PackedWeight(fmt="i2_t", shape=cat.shape, packed=cat.packed,
                                            scale=jnp.ones((3,), jnp.float32), block=cat.block))
  # as bit planes (the LUT path): the same dequantised weight
  np.testing.assert_array_equal(np.asarray(layout.dequantize_weight(layout.to_bitplanes(cat))),
                                np.asarray(layout.dequantize_weight(cat)))
  np.testing.assert_array_equal(
      np.asarray(layout.dequantize_weight(cat)),
      np.concatenate([np.asarray(layout.dequantize_weight(w)) for w in ws], 1))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_concatenated_weights_equal_each_weights_product(M):
  """q / k / v of an 8B-shaped layer as one weight on the GPU: each weight's columns bit for bit
  (W2A8; the defaults: the s8 GEMV split along K, the GEMM with its epilogue in XLA)."""
  K, Ns = 4096, (4096, 1024, 1024)
  ws, cat = fused_weights(K, Ns, seed=M)
  rng = np.random.default_rng(2)
  xi = jnp.asarray(rng.integers(-127, 128, size=(M, K)), jnp.int8)
  xs = jnp.asarray(rng.random(M) + 0.5, jnp.float32)
  kw = dict(implementation="pallas_mosaic_gpu")
  got = np.asarray(lowbit_matmul_int8(xi, xs, cat, **kw))
  want = np.concatenate([np.asarray(lowbit_matmul_int8(xi, xs, w, **kw)) for w in ws], 1)
  np.testing.assert_array_equal(got, want)


# ------------------------------------- planar_decode: slots p and p + 4 a step, one mask a register

def test_i2t_planar_register_decoding_and_x_order():
  """`mgpu_util.s8_planes_from_words`' formula, (v >> 2 p) & 0x03030303 on the 32-bit registers
  of word pairs, gives the interpreter's planar operand for every p; `gemm_x_permutation(True)`
  and `permute_x_gemm(..., True)` put x's rows where those bytes are: K row 64 f + w of a 512-row
  block is slot f of word w."""
  words = np.random.default_rng(1).integers(0, 1 << 16, (64, 64)).astype(np.uint16)
  regs = words.view(np.uint32)
  for p in range(4):
    q = (regs >> np.uint32(2 * p)) & np.uint32(0x03030303)
    emulated = q.view(np.uint8).reshape(64, 128)
    want = np.asarray(mgpu._decode_interpret(jnp.asarray(words), jnp.int32(p), True))
    np.testing.assert_array_equal(emulated.astype(np.int32), want)
    # column 4 j + b of step p's operand is slot (p if b even... ) of word 2 j + b // 2, the slot
    # p + 4 (b % 2); the x row it multiplies is the permutation's entry at 128 p + 4 j + b
    perm = mgpu.gemm_x_permutation(True)
    j, b = np.meshgrid(np.arange(32), np.arange(4), indexing="ij")
    slot, word = p + 4 * (b % 2), 2 * j + b // 2
    np.testing.assert_array_equal(perm[128 * p + 4 * j + b], 64 * slot + word)
    np.testing.assert_array_equal(want[:, 4 * j + b], (words[:, word] >> (2 * slot)) & 3)
  perm = mgpu.gemm_x_permutation(True)
  assert sorted(perm.tolist()) == list(range(4 * mgpu.KS_G))
  x = np.arange(3 * 1024).reshape(3, 1024)
  np.testing.assert_array_equal(np.asarray(mgpu.permute_x_gemm(jnp.asarray(x), True)),
                                x.reshape(3, 2, 512)[:, :, perm].reshape(3, 1024))
  with pytest.raises(ValueError, match="planar_decode"):
    mgpu.MosaicGPUConfig(planar_decode=1).validate()


PL = dict(planar_decode=True)


@pytest.mark.parametrize("M,K,N,cfg", [(65, 1000, 128, PL), (70, 1000, 128, dict(gemm_k_slots=4,
                                                                                gemm_block_m=64,
                                                                                **PL)),
                                       (130, 1000, 192, dict(gemm_k_slots=1, **ONE_WG, **PL)),
                                       (1, 1024, 128, dict(**GV, **PL)),
                                       (13, 2048, 128, dict(num_splits=2, gemv_warpgroups=2,
                                                            **GV, **PL))])
def test_i2t_planar_decode_interpret_matches_the_xla_integer_path(M, K, N, cfg):
  """planar_decode on the GEMM (two warpgroups with the fused epilogue, four and one slot pairs
  a step, one warpgroup) and the s8 GEMV (split, two warpgroups): the exact integer product."""
  check_gemm(M, K, N, True, **cfg)


@pytest.mark.parametrize("warpgroups,k_slots,splits", [(1, 1, 1), (2, 2, 1), (1, 4, 4)])
def test_i2t_planar_decode_lowers_for_cuda(warpgroups, k_slots, splits):
  S_ = jax.ShapeDtypeStruct
  block_m = 128 if warpgroups == 2 else 64
  stages = mgpu.gemm_stages(block_m, None, warpgroups, k_slots)
  fn = jax.jit(lambda x, p: mgpu.gemm_sums(x, p, N=1024, block_m=block_m, stages=stages,
                                           warpgroups=warpgroups, k_slots=k_slots,
                                           num_splits=splits, planar=True))
  assert "mosaic_gpu" in lower_for_cuda(fn, S_((block_m - 3, 2048), jnp.int8),
                                        S_((1024, 256), jnp.uint16))


def test_i2t_scaled_planes_register_decoding():
  """`mgpu_util.s8_planes_scaled_from_words`' masks on the 32-bit registers of word pairs: plane
  p's bytes are the planar operand times `PLANE_SCALES[p]` (codes 0 .. 2 of the ternary weight
  and every 2-bit pattern), all within int8."""
  from pallas_kernels import mgpu_util
  words = np.random.default_rng(2).integers(0, 1 << 16, (64, 64)).astype(np.uint16)
  regs = words.view(np.uint32)
  for p in range(4):
    shift, mask = (6, 0x03030303) if p == 3 else (0, 0x03030303 << (2 * p))
    got = ((regs >> np.uint32(shift)) & np.uint32(mask)).view(np.uint8).reshape(64, 128)
    want = np.asarray(mgpu._decode_interpret(jnp.asarray(words), jnp.int32(p), True))
    np.testing.assert_array_equal(got.astype(np.int32), want * mgpu_util.PLANE_SCALES[p])
    assert got.max() <= 3 * mgpu_util.PLANE_SCALES[p] <= 127
  with pytest.raises(ValueError, match="planar_scaled needs planar_decode"):
    mgpu.MosaicGPUConfig(planar_scaled=True).validate()


@pytest.mark.parametrize("M,K,N,cfg", [(1, 1024, 128, dict(**GV, **PL, planar_scaled=True)),
                                       (13, 2048, 192, dict(num_splits=1, **GV, **PL,
                                                            planar_scaled=True))])
def test_i2t_scaled_planes_interpret_match_the_xla_integer_path(M, K, N, cfg):
  """planar_scaled on the s8 GEMV (split along K, and with the fused epilogue): three
  accumulators of factors 1, 4, 16, divided out at the end, give the exact integer product."""
  check_gemm(M, K, N, True, **cfg)


def test_i2t_scaled_planes_lower_for_cuda():
  """The scaled planes lower for CUDA: 3 accumulators, 4 wgmma calls a step."""
  S_ = jax.ShapeDtypeStruct
  stages = mgpu.gemm_stages(16, None, 1, 4)
  fn = jax.jit(lambda x, p: mgpu.gemm_sums(x, p, N=1024, block_m=16, stages=stages,
                                           warpgroups=1, k_slots=4, num_splits=2, planar=True,
                                           scaled=True))
  assert "mosaic_gpu" in lower_for_cuda(fn, S_((13, 2048), jnp.int8),
                                        S_((1024, 256), jnp.uint16))
  with pytest.raises(ValueError, match="scaled planes"):
    mgpu.gemm_sums(jnp.zeros((13, 2048), jnp.int8), jnp.zeros((1024, 256), jnp.uint16),
                   N=1024, block_m=16, stages=2, k_slots=2, planar=True, scaled=True,
                   interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1, 8192, 8192), (16, 14336, 4096), (2048, 4096, 14336),
                                   (100, 1000, 192)])
def test_gpu_i2t_planar_decode_matches_the_xla_integer_path(M, K, N):
  check_gemm(M, K, N, False, **PL)
  check_gemm(M, K, N, False, planar_scaled=True, **PL)
  check_gemm(M, K, N, False, jnp.bfloat16, **PL)
  check_gemm(M, K, N, False, gemm_warpgroups=1, gemm_k_slots=1, **PL)
  check_gemm(M, K, N, False, num_splits=1, **PL)
