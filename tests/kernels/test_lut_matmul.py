"""pallas_kernels.lut_matmul: the symmetrised-table algebra against T-MAC's 16-entry tables, the
table lookups against numpy int64 group sums, and one op test base, subclassed once per backend:
exact on the integer path (equal to numpy int64 and to lowbit_matmul_int8), within float
tolerance on the float path, within the documented bound with int8 tables."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lowbit_matmul import layout, lowbit_matmul_int8
from pallas_kernels.lut_matmul import lut_group_sums, lut_matmul, lut_tables, table_error_bound

from ._oracle import BackendBase, generate_from_class
from .test_lowbit_matmul import check_float, make_weight, random_codes, random_x_int8

pytest_generate_tests = generate_from_class


def as_bitplanes(seed: int, K: int, N: int, fmt: str, *, integer: bool = False):
  """make_weight's (weight, float64 w_hat), ternary formats converted to bit planes."""
  pw, w = make_weight(seed, K, N, fmt, integer=integer)
  return layout.to_bitplanes(pw), w


def np_group_sums(x, pw) -> np.ndarray:
  """int64 [M, G, N]: x times the unpacked codes q over each weight group's rows."""
  q = np.asarray(layout.unpack(pw)).astype(np.int64)
  K = q.shape[0]
  return np.stack([x[:, g * pw.block:(g + 1) * pw.block].astype(np.int64)
                   @ q[g * pw.block:min((g + 1) * pw.block, K)] for g in range(pw.groups)], axis=1)


def test_symmetric_tables_give_tmac_tables():
  """For every nibble e: T-MAC's entry sum_i bit_i(e) x_i = (S[e] + X) / 2 with S[e] = H[e & 7]
  (top bit set) or -H[7 - e] (top bit clear), H the 8 stored entries, X the group's sum."""
  x = random_x_int8(0, 3, 40)
  t = lut_tables(jnp.asarray(x), k_pad=64, group=64)
  H = np.asarray(t.table_MCJ).astype(np.int64)
  assert H.shape == (3, 16, 8) and t.table_MCJ.dtype == jnp.int32
  x4 = np.pad(x.astype(np.int64), ((0, 0), (0, 24))).reshape(3, 16, 4)
  for e in range(16):
    tmac = sum(((e >> i) & 1) * x4[:, :, i] for i in range(4))
    S = H[:, :, e & 7] if e >= 8 else -H[:, :, 7 - e]
    np.testing.assert_array_equal(2 * tmac, S + x4.sum(axis=2))
  np.testing.assert_array_equal(np.asarray(t.xsum_MG)[:, 0], x.astype(np.int64).sum(axis=1))


@pytest.mark.parametrize("fmt", ["tl2", "bits1", "bits4"])
def test_lookups_equal_int64_group_sums(fmt):
  M, K, N = 5, 101, 9
  pw, _ = as_bitplanes(len(fmt), K, N, fmt)
  x = random_x_int8(len(fmt), M, K)
  got = lut_group_sums(lut_tables(jnp.asarray(x), k_pad=pw.rows, group=pw.block), pw)
  assert got.dtype == jnp.int32 and got.shape == (M, pw.groups, N)
  np.testing.assert_array_equal(np.asarray(got), np_group_sums(x, pw))


@pytest.mark.parametrize("table_scale", ["row", "group"])
def test_int8_table_error_bound(table_scale):
  """|group sum with int8 tables - exact| <= (2^n - 1) (group / 4) ts / 4, for int8 and float x."""
  M, K, N = 6, 200, 11
  pw, _ = as_bitplanes(1, K, N, "bits4")
  x = random_x_int8(2, M, K)
  exact = np_group_sums(x, pw)
  for xin in (jnp.asarray(x), jnp.asarray(x, jnp.float32)):
    t = lut_tables(xin, k_pad=pw.rows, group=pw.block, table_dtype=jnp.dtype(jnp.int8),
                   table_scale=table_scale)
    assert t.table_MCJ.dtype == jnp.int8
    assert t.scale_MS.shape == ((M, 1) if table_scale == "row" else (M, pw.groups))
    err = np.abs(np.asarray(lut_group_sums(t, pw), np.float64) - exact)
    bound = np.asarray(table_error_bound(t, pw.bits), np.float64)[:, :, None]
    assert np.all(err <= bound * (1 + 1e-6) + 1e-6 * np.abs(exact))
    assert err.max() > 0   # the bound is not vacuous: the tables did round


# (M, K, N, fmt): GEMV (M 1..16) and GEMM (64, 130), ragged K and N, ternary weights (converted
# to two planes, one group) and 1..4-bit weights in groups of 32.
CASES = [
    (1, 300, 33, "i2_s"),
    (2, 100, 9, "bits1"),
    (5, 130, 17, "bits2"),
    (16, 96, 40, "bits3"),
    (130, 200, 24, "bits4"),
]


class LutBase(BackendBase):
  """What every implementation of lut_matmul must do."""
  CASES = CASES
  DTYPES = (jnp.float32, jnp.bfloat16)

  def test_integer_path_is_exact(self, case):
    """Unit scales, integer zeros: y is the integer sum itself (numpy int64 exactly); with real
    scales it matches the dequantising integer path."""
    M, K, N, fmt = case
    pw, w = as_bitplanes(M + K + N, K, N, fmt, integer=True)
    x = random_x_int8(M * K, M, K)
    ones = jnp.ones((M,), jnp.float32)
    y = lut_matmul(jnp.asarray(x), pw, ones, **self.kw)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))
    pw, _ = as_bitplanes(M + K, K, N, fmt)
    xs = jnp.asarray(np.random.default_rng(M).uniform(0.005, 0.02, M), jnp.float32)
    y = lut_matmul(jnp.asarray(x), pw, xs, **self.kw)
    want = lowbit_matmul_int8(jnp.asarray(x), xs, pw, implementation="xla")
    # float32 tolerance: a kernel sums the groups' float shares in its own order
    check_float(y, np.asarray(want, np.float64), jnp.float32, 1e-5)

  def test_float_path(self, case, dtype):
    M, K, N, fmt = case
    pw, w = as_bitplanes(K + N, K, N, fmt)
    x = jnp.asarray(np.random.default_rng(K).standard_normal((M, K)), dtype)
    y = lut_matmul(x, pw, **self.kw)
    assert y.shape == (M, N) and y.dtype == dtype
    check_float(y, np.asarray(x.astype(jnp.float32), np.float64) @ w, dtype,
                1e-5 if dtype == jnp.float32 else 1e-2)

  @pytest.mark.parametrize("table_scale", ["row", "group"])
  def test_int8_tables_within_bound(self, case, table_scale):
    """|y - exact| <= x_scale_m * sum_g |scale_g| * bound_g (the tables' scales are the
    contract: max|H| / 127 per row or per (row, group))."""
    M, K, N, fmt = case
    pw, w = as_bitplanes(M + N, K, N, fmt)
    x, xs = layout.quantize_activations(
      jnp.asarray(np.random.default_rng(N).standard_normal((M, K)), jnp.float32))
    y = lut_matmul(x, pw, xs, table_dtype=jnp.int8, table_scale=table_scale, **self.kw)
    want = (np.asarray(x, np.float64) @ w) * np.asarray(xs, np.float64)[:, None]
    t = lut_tables(x, k_pad=pw.rows, group=pw.block, table_dtype=jnp.dtype(jnp.int8),
                   table_scale=table_scale)
    bound_MG = np.asarray(table_error_bound(t, pw.bits), np.float64)
    bound = np.einsum("mg,gn->mn", bound_MG, np.abs(np.asarray(pw.scale, np.float64)))
    bound = bound * np.asarray(xs, np.float64)[:, None]
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= bound + 1e-5 * np.sqrt(np.mean(want ** 2)))


class TestXla(LutBase):
  pass


def test_validates_arguments():
  codes = random_codes(0, 64, 5)
  pw = layout.pack_ternary_bitplanes(codes, 0.5)
  x = jnp.ones((2, 64), jnp.float32)
  xi = jnp.ones((2, 64), jnp.int8)
  bad = [
      (lambda: lut_matmul(x, layout.pack_i2s(codes, 0.5)), "bit planes"),
      (lambda: lut_matmul(xi, pw), "x_scale_M"),
      (lambda: lut_matmul(x, pw, jnp.ones(2)), "x_scale_M"),
      (lambda: lut_matmul(x[:, :60], pw), "K=60"),
      (lambda: lut_matmul(x.astype(jnp.int32), pw), "float32, bfloat16"),
      (lambda: lut_matmul(x, pw, table_dtype=jnp.int16), "table_dtype"),
      (lambda: lut_matmul(x, pw, table_dtype="nonsense"), "table_dtype"),
      (lambda: lut_matmul(x, pw, table_scale="column"), "table_scale"),
      (lambda: lut_matmul(x, pw, implementation="pallas_mosaic_gpu"), "implementation must be"),
      (lambda: lut_group_sums(lut_tables(x, k_pad=128, group=128), pw), "do not fit"),
      (lambda: lut_tables(x, k_pad=60, group=32), "k_pad must be"),
      (lambda: lut_tables(x, k_pad=64, group=64, table_scale="column"), "table_scale"),
  ]
  for fn, match in bad:
    with pytest.raises(ValueError, match=match):
      fn()
