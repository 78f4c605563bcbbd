"""The Pallas Mosaic TPU backend of lowbit_matmul / lowbit_matmul_int8 (i2_s weights): the op
test base of test_lowbit_matmul.py (int8 path exact, float paths within tolerance) in TPU
interpret mode, its launch forms (K steps of several blocks, partial M / N tiles, the int8 MXU
dot), bit-for-bit agreement with the reference on the integer path, the fallbacks, and the Mosaic
lowering on any host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.dispatch import NotSupported, lowering_for
from pallas_kernels.lowbit_matmul import layout, lowbit_matmul, lowbit_matmul_int8
from pallas_kernels.lowbit_matmul.pallas_mosaic_tpu import TPUConfig
from pallas_kernels.lowbit_matmul.reference import (
  lowbit_matmul_int8_reference,
  lowbit_matmul_reference,
)

from ._oracle import generate_from_class
from .test_lowbit_matmul import LowbitBase, check_float, make_weight, random_codes, random_x_int8

pytest_generate_tests = generate_from_class

# (M, K, N, fmt): GEMV (M = 1, one whole-M tile; K = 300 pads to 3 blocks, N = 33 one whole-N
# tile) and a GEMM-sized M (40) with K = 520 (5 blocks: one block a step) and N = 130.
CASES = [(1, 300, 33, "i2_s"), (40, 520, 130, "i2_s")]

# On (M, K, N) = (40, 512, 300): 4 blocks, 2 a step; partial M (32-row tiles) and N (128-column
# tiles) edges; the int8 MXU dot (under -m slow; its lowering is checked by default).
CONFIGS = [
    TPUConfig(block_m=32, block_n=128, blocks_per_step=2),
    pytest.param(TPUConfig(int8_dot=True, blocks_per_step=4), marks=pytest.mark.slow),
]


def lower_for_tpu(fn, *args) -> str:
  """StableHLO text of fn lowered for a TPU on any host: the Pallas -> Mosaic lowering runs (so
  an unsupported primitive fails here), Mosaic's own compilation is left to a TPU."""
  with lowering_for("tpu"):
    return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


class TestPallasMosaicTPUInterpret(LowbitBase):
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_tpu", True
  CASES = CASES

  def test_float_path(self, case):
    """One float dtype a case: float32 (float32 codes, HIGHEST) for GEMV, bf16 for GEMM."""
    LowbitBase.test_float_path(self, case, jnp.float32 if case == CASES[0] else jnp.bfloat16)

  @pytest.mark.parametrize("cfg", CONFIGS, ids=["tiles", "int8_dot"])
  def test_configs(self, cfg):
    M, K, N = 40, 512, 300
    pw, w = make_weight(M, K, N, "i2_s", integer=True)
    x = random_x_int8(M, M, K)
    y = lowbit_matmul_int8(jnp.asarray(x), jnp.ones((M,), jnp.float32), pw, config=cfg,
                           **self.kw)
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))
    pw, w = make_weight(M + 1, K, N, "i2_s")
    xf = jnp.asarray(np.random.default_rng(M).standard_normal((M, K)), jnp.bfloat16)
    y = lowbit_matmul(xf, pw, config=cfg, **self.kw)
    check_float(y, np.asarray(xf.astype(jnp.float32), np.float64) @ w, jnp.bfloat16, 2e-2)

  def test_int8_scaled_equals_reference_bitwise(self):
    """Exact int sums (int8 or bf16 MXU operands), then the scales in the reference's order."""
    M, K, N, _ = CASES[1]
    pw, _ = make_weight(9, K, N, "i2_s")
    x, xs = layout.quantize_activations(
      jnp.asarray(np.random.default_rng(9).standard_normal((M, K)), jnp.float32))
    want = np.asarray(lowbit_matmul_int8_reference(x, xs, pw, jnp.float32))
    np.testing.assert_array_equal(np.asarray(lowbit_matmul_int8(x, xs, pw, **self.kw)), want)

  def test_float16_and_block_64(self):
    """float16 x (float32 codes and dot) and i2_s block 64 (16-row slots; K steps of whole
    blocks spanning a multiple of 128 rows), bf16 out."""
    M, K, N = 3, 200, 40
    codes = random_codes(4, K, N)
    pw = layout.pack_i2s(codes, np.float32(0.25), block=64)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((M, K)), jnp.float16)
    y = lowbit_matmul(x, pw, out_dtype=jnp.bfloat16, **self.kw)
    assert y.dtype == jnp.bfloat16
    check_float(y, np.asarray(x.astype(jnp.float32), np.float64) @ (codes * 0.25), jnp.bfloat16,
                1e-2)

  def test_other_formats_and_blocks_fall_back(self):
    M, K, N = 3, 256, 24
    x = jnp.asarray(np.random.default_rng(0).standard_normal((M, K)), jnp.bfloat16)
    for fmt in ("tl1", "bits2"):
      pw, _ = make_weight(1, K, N, fmt)
      with pytest.raises(NotSupported, match="reads i2_s only"):
        lowbit_matmul(x, pw, **self.kw)
      got = lowbit_matmul(x, pw, implementation=("pallas_mosaic_tpu", "xla"),
                          interpret=self.INTERPRET)
      np.testing.assert_array_equal(np.asarray(got),
                                    np.asarray(lowbit_matmul_reference(x, pw, jnp.bfloat16)))
    codes = random_codes(1, K, N)
    with pytest.raises(NotSupported, match="multiple of 8 sublanes"):
      lowbit_matmul(x, layout.pack_i2s(codes, 1.0, block=24), **self.kw)
    xl = jnp.ones((1, 132104), jnp.int8)
    big = layout.pack_i2s(np.zeros((132104, 1), np.int8), 1.0)
    with pytest.raises(NotSupported, match="int8_dot=True"):
      lowbit_matmul_int8(xl, jnp.ones((1,)), big, **self.kw)

  def test_bad_config_raises(self):
    pw, _ = make_weight(0, 128, 16, "i2_s")
    x = jnp.ones((2, 128), jnp.bfloat16)
    for cfg, match in ((TPUConfig(block_n=100), "block_n must be a positive multiple of 128"),
                       (TPUConfig(block_m=48), "block_m"),
                       (TPUConfig(blocks_per_step=0), "blocks_per_step"),
                       (TPUConfig(int8_dot=1), "int8_dot")):
      with pytest.raises(ValueError, match=match):
        lowbit_matmul(x, pw, config=cfg, **self.kw)


def test_mosaic_lowering_on_any_host():
  """The Pallas -> Mosaic lowering of every dot form, and `auto` choosing this backend on a
  TPU (a config only it takes would be refused by any other)."""
  pw, _ = make_weight(0, 300, 300, "i2_s")
  for M, dtype in ((1, jnp.bfloat16), (300, jnp.float32), (1, jnp.float16)):
    text = lower_for_tpu(lambda x, w: lowbit_matmul(x, w, config=TPUConfig()),
                         jnp.zeros((M, 300), dtype), pw)
    assert "tpu_custom_call" in text and "lowbit_matmul_tpu" in text
  for M, int8_dot in ((1, False), (300, True)):
    text = lower_for_tpu(lambda x, s, w, d=int8_dot: lowbit_matmul_int8(
        x, s, w, config=TPUConfig(int8_dot=d)), jnp.zeros((M, 300), jnp.int8),
        jnp.ones((M,)), pw)
    assert "tpu_custom_call" in text and "lowbit_matmul_int8_tpu" in text


def test_cpu_without_interpret_is_not_supported():
  pw, _ = make_weight(0, 128, 16, "i2_s")
  x = jnp.ones((2, 128), jnp.bfloat16)
  if jax.default_backend() == "tpu":
    pytest.skip("runs on a TPU")
  with pytest.raises(NotSupported, match="needs a TPU"):
    lowbit_matmul(x, pw, implementation="pallas_mosaic_tpu")
