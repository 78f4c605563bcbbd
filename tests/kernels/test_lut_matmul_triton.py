"""The Pallas Triton backend of lut_matmul: the op test base of test_lut_matmul.py (integer path
exact, float path within tolerance, int8 tables within their bound) interpreted on CPU and
compiled under `pytest -m gpu`; the kernel against the dequantising kernel of lowbit_matmul on
the same weights; both lookup forms, splits and K steps across weight groups; the table pieces
(entries, rounding, scales) against the reference; refusals and the CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import NotSupported
from pallas_kernels.lowbit_matmul import layout, lowbit_matmul, lowbit_matmul_int8
from pallas_kernels.lut_matmul import kernel_math, lut_matmul, lut_tables
from pallas_kernels.lut_matmul.pallas_triton import TritonConfig
from pallas_kernels.lut_matmul.reference import SIGNS_IJ

from ._oracle import generate_from_class, lower_for_cuda
from .test_lowbit_matmul import check_float, make_weight, random_x_int8
from .test_lut_matmul import CASES as ALL_CASES
from .test_lut_matmul import LutBase, as_bitplanes

pytest_generate_tests = generate_from_class

# (M, K, N, fmt), interpreted: the select tree (M = 1, ternary weights as two planes in one group
# of 320 rows, ragged K and N) and the one-hot MMA (M = 20: a 32-row tile, 3-bit planes in groups
# of 32, ragged K, N and M).
CASES = [(1, 300, 33, "i2_s"), (20, 100, 24, "bits3")]

# Launch forms on K = 256 rows of 2-bit planes in groups of 64 (2 words): splits that cut a group,
# one word a step, narrow tiles, the select tree on several rows (a static loop) and M tiles. The
# first two run interpreted by default, the rest under -m slow (and on the GPU).
CONFIGS = [
    TritonConfig(lookup="select", block_m=2, num_splits=3, words_per_step=1),
    TritonConfig(lookup="onehot", num_splits=2, block_n=16, words_per_step=4),  # ws 2: the group
    pytest.param(TritonConfig(lookup="select", num_splits=1), marks=pytest.mark.slow),
    pytest.param(TritonConfig(lookup="onehot", num_splits=1, words_per_step=1),
                 marks=pytest.mark.slow),
    pytest.param(TritonConfig(lookup="onehot", block_m=16, block_n=32, num_splits=4),
                 marks=pytest.mark.slow),
]


def _cfg_id(c):
  return ",".join(f"{k}={v}" for k, v in vars(c).items() if v is not None)


class TestPallasTritonInterpret(LutBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True
  CASES = CASES

  # Interpreted, one float dtype and one table scale a case (the GPU class runs them all).
  def test_float_path(self, case):
    LutBase.test_float_path(self, case, jnp.bfloat16 if case == CASES[0] else jnp.float32)

  def test_int8_tables_within_bound(self, case):
    LutBase.test_int8_tables_within_bound(self, case, "group" if case == CASES[0] else "row")

  def test_equals_dequant_kernel(self):
    """Ternary weights: the LUT kernel over their bit planes (one split) equals, bit for bit on
    the integer path, the dequantising kernel over i2_s and the reference (the exact sums of x *
    t times the same scales in the same order); on the GPU also bf16 x within tolerance."""
    M, K, N, _ = CASES[0]
    pw, w = make_weight(5, K, N, "i2_s")
    planes = layout.to_bitplanes(pw)
    x, xs = layout.quantize_activations(
      jnp.asarray(np.random.default_rng(5).standard_normal((M, K)), jnp.float32))
    lut = lut_matmul(x, planes, xs, config=TritonConfig(num_splits=1), **self.kw)
    deq = lowbit_matmul_int8(x, xs, pw, implementation="pallas_triton", interpret=self.INTERPRET)
    np.testing.assert_array_equal(np.asarray(lut), np.asarray(deq))
    np.testing.assert_array_equal(np.asarray(lut),
                                  np.asarray(lut_matmul(x, planes, xs, implementation="xla")))
    if not self.GPU:
      return
    for lookup in ("select", "onehot"):
      xf = jnp.asarray(np.random.default_rng(6).standard_normal((M, K)), jnp.bfloat16)
      lut = lut_matmul(xf, planes, config=TritonConfig(lookup=lookup), **self.kw)
      deq = lowbit_matmul(xf, pw, implementation="pallas_triton", interpret=self.INTERPRET)
      check_float(lut, np.asarray(deq.astype(jnp.float32), np.float64), jnp.bfloat16, 1e-2)

  @pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
  def test_configs(self, cfg):
    """Every launch form on the integer path, exactly (groups split across programs and steps
    included: each part's sum is even, so its halving is exact)."""
    M, K, N = 3, 256, 40
    rng = np.random.default_rng(11)
    q = rng.integers(0, 4, (K, N))
    zero = rng.integers(0, 4, (K // 64, N)).astype(np.float32)
    pw = layout.pack_bitplanes(q, np.ones((K // 64, N), np.float32), zero, bits=2, group=64)
    w = (q - np.repeat(zero, 64, 0)).astype(np.int64)
    x = random_x_int8(12, M, K)
    y = lut_matmul(jnp.asarray(x), pw, jnp.ones((M,), jnp.float32), config=cfg, **self.kw)
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w)

  def test_onehot_exactness_limit_falls_back(self):
    """Exact int8-x tables summed in float32 by the one-hot MMA: a group whose sums can pass 2^24
    is refused (the select tree sums in int32 and takes it; `auto` order falls back to XLA)."""
    K, N, M = 64, 16, 2
    pw = layout.quantize_nbit(jnp.asarray(np.random.default_rng(0).standard_normal((K, N)),
                                          jnp.float32), 4, 8832)
    x = jnp.asarray(random_x_int8(1, M, K))
    ones = jnp.ones((M,), jnp.float32)
    with pytest.raises(NotSupported, match="exact below 2\\^24"):
      lut_matmul(x, pw, ones, config=TritonConfig(lookup="onehot"), **self.kw)
    got = lut_matmul(x, pw, ones, implementation=("pallas_triton", "xla"),
                     interpret=self.INTERPRET, config=TritonConfig(lookup="onehot"))
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(lut_matmul(x, pw, ones, implementation="xla")))

  def test_bad_config_raises(self):
    pw, _ = as_bitplanes(0, 64, 16, "bits2")
    x = jnp.ones((2, 64), jnp.bfloat16)
    for cfg, match in ((TritonConfig(lookup="gather"), "lookup"),
                       (TritonConfig(block_n=24), "block_n must be a power of 2"),
                       (TritonConfig(words_per_step=3), "words_per_step"),
                       (TritonConfig(num_splits=0), "num_splits"),
                       (TritonConfig(num_warps=3), "num_warps")):
      with pytest.raises(ValueError, match=match):
        lut_matmul(x, pw, config=cfg, **self.kw)


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True
  CASES = ALL_CASES + CASES
  DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
  test_float_path = LutBase.test_float_path
  test_int8_tables_within_bound = LutBase.test_int8_tables_within_bound

  @pytest.mark.parametrize("M,lookup", [(1, "select"), (16, "select"), (1, "onehot"),
                                        (16, "onehot"), (256, "onehot")])
  def test_model_shapes(self, M, lookup):
    """Compiled at a 4096 x 4096 projection (ternary planes, and 4-bit planes in groups of 128):
    exact int8 sums, bf16 against float64."""
    K = N = 4096
    cfg = TritonConfig(lookup=lookup)
    for fmt in ("i2_s", "bits4"):
      pw, w = as_bitplanes(M, K, N, fmt, integer=True)
      x = random_x_int8(M, M, K)
      y = lut_matmul(jnp.asarray(x), pw, jnp.ones((M,), jnp.float32), config=cfg, **self.kw)
      np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))
    pw, w = as_bitplanes(M + 1, K, N, "i2_s")
    xf = jnp.asarray(np.random.default_rng(M).standard_normal((M, K)), jnp.bfloat16)
    y = lut_matmul(xf, pw, config=cfg, **self.kw)
    check_float(y, np.asarray(xf.astype(jnp.float32), np.float64) @ w, jnp.bfloat16, 2e-2)

  def test_auto_is_xla_until_timed_on_a_gpu(self):
    M, K, N = 16, 1024, 256
    pw, _ = as_bitplanes(3, K, N, "i2_s")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((M, K)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(lut_matmul(x, pw)),
                                  np.asarray(lut_matmul(x, pw, implementation="xla")))


# ------------------------------------------------------------------------------ table pieces


def test_table_entries_are_the_reference_signs():
  x = np.random.default_rng(0).integers(-127, 128, (4, 5)).astype(np.int32)
  got = np.stack([np.asarray(e) for e in kernel_math.table_entries(*(jnp.asarray(r) for r in x))])
  np.testing.assert_array_equal(got, SIGNS_IJ.astype(np.int64).T @ x.astype(np.int64))


def test_quantize_entry_rounds_half_to_even():
  v = np.concatenate([np.random.default_rng(1).uniform(-130, 130, 4096),
                      np.arange(-130, 130.5, 0.5), [0.49999997, -0.49999997]]).astype(np.float32)
  got = np.asarray(jax.jit(kernel_math.quantize_entry)(jnp.asarray(v), jnp.float32(1.0)))
  np.testing.assert_array_equal(got, np.clip(np.round(v), -127, 127))


@pytest.mark.parametrize("table_scale", ["row", "group"])
def test_table_scales_are_the_references(table_scale):
  """int8 x: max_j |H_c[j]| = sum_i |x_i| gives the reference's ts exactly."""
  pw, _ = as_bitplanes(0, 200, 8, "bits2")
  x = jnp.asarray(random_x_int8(2, 3, 200))
  t = lut_tables(x, k_pad=pw.rows, group=pw.block, table_dtype=jnp.dtype(jnp.int8),
                 table_scale=table_scale)
  got = np.asarray(kernel_math.table_scales(x, pw.rows, pw.block, table_scale)).T
  np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(t.scale_MS), got.shape))


def test_triton_lowers_for_cuda():
  """The whole Pallas -> Triton IR lowering on any host, for both lookups and every table kind
  (exact int32, float32, int8)."""
  pw, _ = as_bitplanes(0, 300, 70, "bits3")
  for M, lookup, dtype, table_dtype in ((1, "select", jnp.int8, None),
                                        (1, "select", jnp.bfloat16, jnp.int8),
                                        (5, "onehot", jnp.int8, None),
                                        (40, "onehot", jnp.bfloat16, None),
                                        (40, "onehot", jnp.int8, jnp.int8)):
    x = jnp.zeros((M, 300), dtype)
    xs = jnp.ones((M,), jnp.float32) if dtype == jnp.int8 else None
    text = lower_for_cuda(lambda x, xs, w, cfg=TritonConfig(lookup=lookup), td=table_dtype:
                          lut_matmul(x, w, xs, table_dtype=td, config=cfg,
                                     implementation="pallas_triton"), x, xs, pw)
    assert "xla.gpu.triton" in text and 'name = "lut_matmul"' in text


def test_cpu_without_interpret_is_not_supported():
  pw, _ = as_bitplanes(0, 64, 16, "bits2")
  x = jnp.ones((2, 64), jnp.bfloat16)
  if jax.default_backend() == "gpu":
    pytest.skip("runs on a GPU")
  with pytest.raises(NotSupported, match="needs a GPU"):
    lut_matmul(x, pw, implementation="pallas_triton")
  np.testing.assert_array_equal(np.asarray(lut_matmul(x, pw)),
                                np.asarray(lut_matmul(x, pw, implementation="xla")))
