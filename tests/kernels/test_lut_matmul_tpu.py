"""The Pallas Mosaic TPU backend of lut_matmul: the op test base of test_lut_matmul.py (integer
path exact, float path within tolerance, int8 tables within their bound) in TPU interpret mode,
the kernel against the TPU dequantising kernel of lowbit_matmul, partial tiles, the refusals, and
the Mosaic lowering on any host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import NotSupported
from pallas_kernels.lowbit_matmul import layout, lowbit_matmul_int8
from pallas_kernels.lut_matmul import lut_matmul
from pallas_kernels.lut_matmul.pallas_mosaic_tpu import TPUConfig, sign_matrix
from pallas_kernels.lut_matmul.reference import lut_tables

from ._oracle import generate_from_class
from .test_lowbit_matmul import make_weight, random_x_int8
from .test_lowbit_matmul_tpu import lower_for_tpu
from .test_lut_matmul import LutBase, as_bitplanes

pytest_generate_tests = generate_from_class

# (M, K, N, fmt): ternary planes in one group of 512 rows (a group over 2 K steps, its sums kept
# in VMEM across them) and 2-bit planes in groups of 32 with K = 600 (8 groups a step, a ragged
# last step), M = 20 and N = 140 whole tiles.
CASES = [(1, 512, 33, "i2_s"), (20, 600, 140, "bits2")]


class TestPallasMosaicTPUInterpret(LutBase):
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_tpu", True
  CASES = CASES

  # one float dtype and one table scale a case
  def test_float_path(self, case):
    LutBase.test_float_path(self, case, jnp.float32 if case == CASES[0] else jnp.bfloat16)

  def test_int8_tables_within_bound(self, case):
    LutBase.test_int8_tables_within_bound(self, case, "row" if case == CASES[0] else "group")

  def test_equals_dequant_kernel(self):
    """Ternary weights, int8 x: the LUT kernel over their bit planes equals the TPU dequantising
    kernel over i2_s bit for bit (one group: the same integer sums, the same scale order)."""
    M, K, N, _ = CASES[0]
    pw, _ = make_weight(5, K, N, "i2_s")
    x, xs = layout.quantize_activations(
      jnp.asarray(np.random.default_rng(5).standard_normal((M, K)), jnp.float32))
    lut = lut_matmul(x, layout.to_bitplanes(pw), xs, **self.kw)
    deq = lowbit_matmul_int8(x, xs, pw, **self.kw)
    np.testing.assert_array_equal(np.asarray(lut), np.asarray(deq))

  def test_partial_tiles(self):
    """M and N past whole tiles (32-row, 128-column blocks): exact integer sums."""
    M, K, N = 40, 256, 140
    pw, w = as_bitplanes(3, K, N, "bits3", integer=True)
    x = random_x_int8(3, M, K)
    y = lut_matmul(jnp.asarray(x), pw, jnp.ones((M,), jnp.float32),
                   config=TPUConfig(block_m=32, block_n=128), **self.kw)
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))

  def test_refusals_fall_back(self):
    """Groups that neither divide nor are divided by a 256-row step, and integer sums that could
    pass float32's exact range: NotSupported, then XLA when it is next."""
    M, K, N = 2, 300, 8
    x = jnp.asarray(random_x_int8(0, M, K))
    ones = jnp.ones((M,), jnp.float32)
    rng = np.random.default_rng(0)
    w96 = layout.quantize_nbit(jnp.asarray(rng.standard_normal((K, N)), jnp.float32), 2, 96)
    big = layout.quantize_nbit(jnp.asarray(rng.standard_normal((K, N)), jnp.float32), 4, 8960)
    for pw, match in ((w96, "groups of 96 rows"), (big, "exact below 2\\^24")):
      with pytest.raises(NotSupported, match=match):
        lut_matmul(x, pw, ones, **self.kw)
    got = lut_matmul(x, w96, ones, implementation=("pallas_mosaic_tpu", "xla"),
                     interpret=self.INTERPRET)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(lut_matmul(x, w96, ones, implementation="xla")))

  def test_bad_config_raises(self):
    pw, _ = as_bitplanes(0, 64, 16, "bits2")
    x = jnp.ones((2, 64), jnp.bfloat16)
    for cfg, match in ((TPUConfig(block_n=100), "block_n must be a positive multiple of 128"),
                       (TPUConfig(block_m=0), "block_m")):
      with pytest.raises(ValueError, match=match):
        lut_matmul(x, pw, config=cfg, **self.kw)


def test_sign_matrix_gives_the_tables():
  """x @ S is the reference's tables, columns (word, nibble, entry)."""
  x = random_x_int8(0, 3, 64)
  got = x.astype(np.int64) @ sign_matrix(2).astype(np.int64)
  want = np.asarray(lut_tables(jnp.asarray(x), k_pad=64, group=64).table_MCJ)
  np.testing.assert_array_equal(got, want.reshape(3, -1))


def test_mosaic_lowering_on_any_host():
  """The Pallas -> Mosaic lowering for every table kind and both group layouts (whole groups a
  step, a group over several steps)."""
  for fmt, K, kinds in (("bits3", 600, ((1, jnp.int8, None), (300, jnp.bfloat16, jnp.int8))),
                       ("i2_s", 512, ((1, jnp.float32, None), (300, jnp.int8, jnp.int8)))):
    pw, _ = as_bitplanes(0, K, 300, fmt)
    for M, dtype, table_dtype in kinds:
      xs = jnp.ones((M,)) if dtype == jnp.int8 else None
      text = lower_for_tpu(lambda x, xs, w, td=table_dtype: lut_matmul(
          x, w, xs, table_dtype=td, table_scale="group"), jnp.zeros((M, K), dtype), xs, pw)
      assert "tpu_custom_call" in text and "lut_matmul_tpu" in text


def test_cpu_without_interpret_is_not_supported():
  pw, _ = as_bitplanes(0, 64, 16, "bits2")
  x = jnp.ones((2, 64), jnp.bfloat16)
  if jax.default_backend() == "tpu":
    pytest.skip("runs on a TPU")
  with pytest.raises(NotSupported, match="needs a TPU"):
    lut_matmul(x, pw, implementation="pallas_mosaic_tpu")
