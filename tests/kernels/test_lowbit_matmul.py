"""pallas_kernels.lowbit_matmul and its packed formats: exact pack / unpack round trips checked
against an independent numpy bit extraction (and bitnet.cpp's I2_S bytes), the quantisers, and
one op test base, subclassed once per backend, against numpy int64 (the integer path, exactly)
and float64 (the float path) on random non-zero inputs with ragged shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lowbit_matmul import layout, lowbit_matmul, lowbit_matmul_int8
from pallas_kernels.lowbit_matmul.reference import int_group_sums

from ._oracle import TOLERANCES, BackendBase, generate_from_class

pytest_generate_tests = generate_from_class


# ------------------------------------------------------------------------------ random inputs


def random_codes(seed: int, K: int, N: int) -> np.ndarray:
  """int8 ternary codes [K, N], each of -1 / 0 / +1 about a third of the entries."""
  return np.random.default_rng(seed).integers(-1, 2, (K, N)).astype(np.int8)


def random_x_int8(seed: int, M: int, K: int) -> np.ndarray:
  """int8 [M, K] in [-127, 127] without zeros."""
  rng = np.random.default_rng(seed)
  return (rng.integers(1, 128, (M, K)) * rng.choice([-1, 1], (M, K))).astype(np.int8)


def fmt_bits(fmt: str) -> int | None:
  """"bits3" -> 3 (a bitplanes weight); None for a ternary format."""
  return int(fmt[4:]) if fmt.startswith("bits") else None


def make_weight(seed: int, K: int, N: int, fmt: str, *, integer: bool = False):
  """(packed weight, float64 w_hat [K, N]) of format fmt ("i2_s", "tl1", "tl2" or "bits1".."bits4",
  groups of 32 rows so ragged K leaves a partial last group). integer=True: unit scales and
  integer zeros, so the integer path's result is an exact integer."""
  rng = np.random.default_rng(seed)
  bits = fmt_bits(fmt)
  if bits is None:
    codes = random_codes(seed, K, N)
    scale = np.float32(1.0 if integer else rng.uniform(0.02, 0.1))
    return layout.pack_ternary(codes, scale, fmt), codes.astype(np.float64) * scale
  group, L = 32, layout.levels(bits)
  G = -(-K // group)
  if integer:
    q = rng.integers(0, L + 1, (K, N))
    zero = rng.integers(0, L + 1, (G, N)).astype(np.float32)
    pw = layout.pack_bitplanes(q, np.ones((G, N), np.float32), zero, bits=bits, group=group)
    return pw, (q - np.repeat(zero, group, 0)[:K]).astype(np.float64)
  pw = layout.quantize_nbit(jnp.asarray(rng.standard_normal((K, N)), jnp.float32), bits, group)
  q = np.asarray(layout.unpack(pw), np.float64)
  s, z = (np.repeat(np.asarray(p, np.float64), group, 0)[:K] for p in (pw.scale, pw.zero))
  return pw, (q - z) * s


def np_unpack_slots(words, bits: int, block: int, word_bits: int, msb_first: bool) -> np.ndarray:
  """Independent unpacker, one row at a time: code r (block b = r // block, offset o = r % block)
  sits in word b * W + o % W at slot o // W (W = block * bits / word_bits)."""
  u = np.asarray(words).astype(np.int64) & ((1 << word_bits) - 1)
  W = block * bits // word_bits
  rows = u.shape[0] * word_bits // bits
  out = np.zeros((rows, u.shape[1]), np.int64)
  for r in range(rows):
    b, o = divmod(r, block)
    slot, j = divmod(o, W)
    shift = word_bits - (slot + 1) * bits if msb_first else slot * bits
    out[r] = (u[b * W + j] >> shift) & ((1 << bits) - 1)
  return out


def check_float(got, want, dtype, rms_atol: float) -> None:
  """|got - want| <= rtol |want| + rms_atol * rms(want), rtol from _oracle.TOLERANCES."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  rms = np.sqrt(np.mean(want ** 2))
  np.testing.assert_allclose(got, want, rtol=TOLERANCES[dtype]["rtol"], atol=rms_atol * rms)


# --------------------------------------------------------------------------- layout and formats


# (K, N, block): K a block multiple, ragged K (101, 250 and 7 < one block; 250 and 7 leave K % 3 =
# 1, 101 leaves 2), the smallest blocks, N = 1.
TERNARY_CASES = [(256, 3, None), (101, 5, 24), (250, 1, 48), (7, 4, None)]


@pytest.mark.parametrize("fmt", layout.TERNARY_FORMATS)
@pytest.mark.parametrize("K,N,block", TERNARY_CASES)
def test_ternary_round_trip(fmt, K, N, block):
  codes = random_codes(K * N, K, N)
  pw = layout.pack_ternary(codes, 0.37, fmt, block=block)
  layout.check_packed(pw, values=True)
  got = np.asarray(layout.unpack(pw))
  assert got.dtype == np.int8 and got.shape == (K, N)
  np.testing.assert_array_equal(got, codes)
  np.testing.assert_array_equal(np.asarray(layout.dequantize_weight(pw)),
                                codes.astype(np.float32) * np.float32(0.37))
  Kp = pw.rows
  assert Kp % pw.block == 0 and Kp - K < pw.block
  # bits a (padded) weight: 2 for i2_s / i2_t / tl1, 5 per triple for tl2
  stored = pw.packed.nbytes + (0 if pw.signs is None else pw.signs.nbytes)
  assert stored * 8 == Kp * N * (5 / 3 if fmt == "tl2" else 2)


@pytest.mark.parametrize("K,N,block,tl2_block", [(100, 7, 128, 96), (256, 3, 64, 48),
                                                 (96, 5, 32, 24)])
def test_ternary_bit_layout(K, N, block, tl2_block):
  """The documented bits: i2_s q = t + 1 per slot; tl1 pair index 3 (t0 + 1) + (t1 + 1); tl2
  (|e - 13|, e < 13) of e = 9 (t0 + 1) + 3 (t1 + 1) + (t2 + 1); padding = zero weights."""
  codes = random_codes(K + N, K, N)
  i2s = layout.pack_i2s(codes, 1.0, block=block)
  t = np.pad(codes.astype(np.int64), ((0, i2s.rows - K), (0, 0))) + 1
  np.testing.assert_array_equal(np_unpack_slots(i2s.packed, 2, block, 8, True), t)
  i2t = layout.pack_i2t(codes, 1.0, block=block)     # the same codes, transposed, LSB first
  np.testing.assert_array_equal(np_unpack_slots(np.asarray(i2t.packed).T, 2, block, 16, False), t)
  tl1 = layout.pack_tl1(codes, 1.0, block=block)
  np.testing.assert_array_equal(np_unpack_slots(tl1.packed, 4, block // 2, 8, True),
                                3 * t[0::2] + t[1::2])
  tl2 = layout.pack_tl2(codes, 1.0, block=tl2_block)
  t3 = np.pad(codes.astype(np.int64), ((0, tl2.rows - K), (0, 0))) + 1
  e = 9 * t3[0::3] + 3 * t3[1::3] + t3[2::3]
  triples = tl2.block // 3
  np.testing.assert_array_equal(np_unpack_slots(tl2.packed, 4, triples, 8, True), np.abs(e - 13))
  np.testing.assert_array_equal(np_unpack_slots(tl2.signs, 1, triples, 8, True), e < 13)


def test_i2s_is_bitnet_cpp_bytes():
  """block 128: packed[:, n] is bitnet.cpp's quantize_i2_s buffer of row n (its loop: element j
  of a 128-block goes to byte j % 32 at bits 6 - 2 (j // 32))."""
  K, N = 384, 3
  codes = random_codes(5, K, N)
  packed = np.asarray(layout.pack_i2s(codes, 1.0).packed)
  for n in range(N):
    q = codes[:, n].astype(np.int64) + 1
    row = np.zeros(K // 4, np.int64)
    for i in range(K // 128):
      for j in range(128):
        row[i * 32 + j % 32] |= q[i * 128 + j] << (6 - 2 * (j // 32))
    np.testing.assert_array_equal(packed[:, n], row)


# (K, N, group): partial last groups of 32 (100, 33 rows) and of 128 (300 rows).
BITPLANE_CASES = [(100, 7, 32), (300, 5, 128), (33, 4, 32)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N,group", BITPLANE_CASES)
def test_bitplanes_round_trip(bits, K, N, group):
  rng = np.random.default_rng(bits * K + N)
  q = rng.integers(0, layout.levels(bits) + 1, (K, N))
  G = -(-K // group)
  scale = rng.uniform(0.5, 2.0, (G, N)).astype(np.float32)
  zero = rng.uniform(0.0, layout.levels(bits), (G, N)).astype(np.float32)
  pw = layout.pack_bitplanes(q, scale, zero, bits=bits, group=group)
  assert pw.packed.shape == (bits, pw.rows // 32, N) and pw.packed.dtype == jnp.int32
  got = np.asarray(layout.unpack(pw))
  np.testing.assert_array_equal(got, q)
  # row 32 w + i is bit i of word w of each plane (LSB first, consecutive rows)
  qp = np.pad(q, ((0, pw.rows - K), (0, 0)), mode="edge")
  for p in range(bits):
    np.testing.assert_array_equal(
      np_unpack_slots(np.asarray(pw.packed[p]), 1, 32, 32, False), (qp >> p) & 1)
  want = (q - np.repeat(zero, group, 0)[:K]) * np.repeat(scale, group, 0)[:K]
  np.testing.assert_allclose(np.asarray(layout.dequantize_weight(pw)), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N,group", [(100, 7, 32), (300, 5, 128)])
def test_quantize_nbit(bits, K, N, group):
  rng = np.random.default_rng(bits + K)
  w = rng.standard_normal((K, N)).astype(np.float32)
  w[:group, 0] = 0.75   # a constant group: scale 1, w_hat exact
  pw = layout.quantize_nbit(jnp.asarray(w), bits, group)
  q = np.asarray(layout.unpack(pw))
  assert q.min() >= 0 and q.max() <= layout.levels(bits)
  s, z = (np.repeat(np.asarray(p, np.float64), group, 0)[:K] for p in (pw.scale, pw.zero))
  w_hat = np.asarray(layout.dequantize_weight(pw), np.float64)
  np.testing.assert_allclose(w_hat, (q - z) * s, rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(w - w_hat) <= s / 2 * (1 + 1e-5) + 1e-6)
  assert w_hat[0, 0] == np.float32(0.75) and float(pw.scale[0, 0]) == 1.0
  # the codes span each group's [min, max]: 0 and 2^bits - 1 both occur in every other column
  qg = np.pad(q, ((0, pw.rows - K), (0, 0)), mode="edge").reshape(-1, group, N)[:, :, 1:]
  assert np.all(qg.min(axis=1) == 0) and np.all(qg.max(axis=1) == layout.levels(bits))


def test_ternary_bitplanes_and_conversions():
  K, N = 100, 9
  codes = random_codes(11, K, N)
  pw = layout.pack_ternary_bitplanes(codes, np.float32(0.25))
  assert (pw.fmt, pw.bits, pw.block, pw.groups) == ("bitplanes", 2, 128, 1)
  np.testing.assert_array_equal(np.asarray(layout.unpack(pw)), codes.astype(np.int64) + 1)
  np.testing.assert_array_equal(np.asarray(pw.zero), 1.0)
  want = codes.astype(np.float32) * np.float32(0.25)
  np.testing.assert_array_equal(np.asarray(layout.dequantize_weight(pw)), want)
  for fmt in layout.TERNARY_FORMATS:
    conv = layout.to_bitplanes(layout.pack_ternary(codes, np.float32(0.25), fmt))
    np.testing.assert_array_equal(np.asarray(conv.packed), np.asarray(pw.packed))


@pytest.mark.parametrize("fmt", ["i2_s", "tl2", "bits3"])
def test_as_dict_round_trip_and_jit(fmt):
  pw, _ = make_weight(3, 100, 7, fmt)
  d = pw.as_dict()
  assert d["format"] == pw.fmt and d["shape"] == [100, 7]
  back = layout.PackedWeight.from_dict(d)
  np.testing.assert_array_equal(np.asarray(layout.unpack(back)), np.asarray(layout.unpack(pw)))
  assert (back.fmt, back.shape, back.block, back.bits) == (pw.fmt, pw.shape, pw.block, pw.bits)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 100)), jnp.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(lowbit_matmul)(x, back)),
                             np.asarray(lowbit_matmul(x, pw)), rtol=1e-6, atol=1e-6)


def test_ternarize():
  rng = np.random.default_rng(0)
  w = (0.05 * rng.standard_normal((100, 33))).astype(np.float32)
  codes, scale = layout.ternarize(jnp.asarray(w))
  codes, scale = np.asarray(codes), float(scale)
  assert codes.dtype == np.int8 and set(np.unique(codes)) == {-1, 0, 1}
  np.testing.assert_allclose(scale, np.abs(w.astype(np.float64)).mean(), rtol=1e-6)
  np.testing.assert_array_equal(codes, np.clip(np.round(w / np.float32(scale)), -1, 1))
  zc, zs = layout.ternarize(jnp.zeros((4, 3), jnp.bfloat16))
  assert float(zs) == 0.0 and not np.any(np.asarray(zc))


def test_quantize_activations():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 77)).astype(np.float32)
  x[3] = 0.0
  q, s = layout.quantize_activations(jnp.asarray(x))
  q, s = np.asarray(q), np.asarray(s, np.float64)
  assert q.dtype == np.int8 and np.abs(q.astype(np.int64)).max() <= 127
  np.testing.assert_allclose(s, np.abs(x).max(axis=1) / 127, rtol=1e-6)
  assert np.all(np.abs(q.astype(np.int64)).max(axis=1)[[0, 1, 2, 4]] == 127)
  assert np.all(np.abs(x - q * s[:, None]) <= s[:, None] / 2 * (1 + 1e-5) + 1e-7)
  assert s[3] == 0 and not np.any(q[3])


@pytest.mark.parametrize("fmt", ["i2_s", "i2_t", "tl1", "tl2"])
def test_unpack_ternary_nk_is_the_transposed_unpack(fmt):
  for K, N in ((101, 9), (1024, 3)):                # ragged K; K a multiple of every block
    pw, _ = make_weight(11, K, N, fmt)
    got = np.asarray(layout.unpack_ternary_nk(pw))
    assert got.dtype == np.int8 and got.shape == (N, K)
    np.testing.assert_array_equal(got, np.asarray(layout.unpack(pw)).T)
  with pytest.raises(ValueError, match="ternary format"):
    layout.unpack_ternary_nk(make_weight(11, 64, 8, "bits3")[0])


@pytest.mark.parametrize("M", [4, 13])     # multiply + reduce; the dot (ternary: on W^T)
@pytest.mark.parametrize("fmt", ["i2_s", "i2_t", "tl1", "tl2", "bits3"])
def test_int_group_sums_are_int64_exact(fmt, M):
  """Per weight group (the op tests check the totals of every format)."""
  K, N = 101, 9
  pw, _ = make_weight(7, K, N, fmt)
  x = random_x_int8(8, M, K)
  got = np.asarray(int_group_sums(jnp.asarray(x), pw))
  assert got.dtype == np.int32 and got.shape == (M, pw.groups, N)
  c = np.asarray(layout.unpack(pw)).astype(np.int64)
  block = pw.block if pw.fmt == "bitplanes" else pw.rows
  for g in range(pw.groups):
    rows = slice(g * block, min((g + 1) * block, K))
    np.testing.assert_array_equal(got[:, g], x[:, rows].astype(np.int64) @ c[rows])


# ------------------------------------------------------------------------------------ the ops


# (M, K, N, fmt): GEMV (M 1..16) and GEMM (64, 130), ragged K and N, every format.
CASES = [
    (1, 300, 33, "i2_s"),
    (3, 101, 7, "tl1"),
    (16, 250, 64, "tl2"),
    (64, 256, 96, "i2_s"),
    (2, 100, 9, "bits1"),
    (5, 130, 17, "bits2"),
    (16, 96, 40, "bits3"),
    (130, 200, 24, "bits4"),
]


class LowbitBase(BackendBase):
  """What every implementation of lowbit_matmul / lowbit_matmul_int8 must do."""
  CASES = CASES
  DTYPES = (jnp.float32, jnp.bfloat16)

  def test_int8_path_is_exact(self, case):
    """Unit weight and activation scales, integer zeros: y is the integer sum itself, so it must
    equal numpy int64 exactly."""
    M, K, N, fmt = case
    pw, w = make_weight(M + K + N, K, N, fmt, integer=True)
    x = random_x_int8(M * K, M, K)
    y = lowbit_matmul_int8(jnp.asarray(x), jnp.ones((M,), jnp.float32), pw, **self.kw)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))

  def test_int8_path_scaled(self, case):
    M, K, N, fmt = case
    pw, w = make_weight(M + K, K, N, fmt)
    xf = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    x, xs = layout.quantize_activations(jnp.asarray(xf))
    y = lowbit_matmul_int8(x, xs, pw, **self.kw)
    want = (np.asarray(x, np.float64) * np.asarray(xs, np.float64)[:, None]) @ w
    check_float(y, want, jnp.float32, 1e-5)

  def test_float_path(self, case, dtype):
    """x in dtype, float32 sums: within dtype's tolerance of float64 (the dequantised n-bit
    weight is rounded once to x's dtype, hence 2e-2 of the output's rms for bf16)."""
    M, K, N, fmt = case
    pw, w = make_weight(K + N, K, N, fmt)
    x = jnp.asarray(np.random.default_rng(K).standard_normal((M, K)), dtype)
    y = lowbit_matmul(x, pw, **self.kw)
    assert y.shape == (M, N) and y.dtype == dtype
    want = np.asarray(x.astype(jnp.float32), np.float64) @ w
    check_float(y, want, dtype, 1e-5 if dtype == jnp.float32 else 2e-2)


class TestXla(LowbitBase):
  pass


def test_validates_arguments():
  codes = random_codes(0, 64, 5)
  pw = layout.pack_i2s(codes, 0.5)
  x = jnp.ones((2, 64), jnp.float32)
  xi = jnp.ones((2, 64), jnp.int8)
  bad = [
      (lambda: layout.pack_i2s(codes * 2, 0.5), "ternary"),
      (lambda: layout.pack_tl1(codes.astype(np.float32), 0.5), "integer dtype"),
      (lambda: layout.pack_tl2(codes[:, 0], 0.5), "2-D"),
      (lambda: layout.pack_i2s(codes, 0.5, block=6), "multiple of 4"),
      (lambda: layout.pack_tl2(codes, 0.5, block=30), "multiple of 24"),
      (lambda: layout.pack_i2s(codes, np.ones(2, np.float32)), "scalar"),
      (lambda: layout.pack_i2s(codes, np.float32(np.nan)), "finite"),
      (lambda: layout.pack_ternary(codes, 0.5, "i3_s"), "fmt must be"),
      (lambda: layout.quantize_nbit(x, 5), "bits"),
      (lambda: layout.quantize_nbit(x, 0), "bits"),
      (lambda: layout.quantize_nbit(x, 4, 48), "multiple of 32"),
      (lambda: layout.quantize_nbit(xi, 4), "float"),
      (lambda: layout.quantize_nbit(x.at[0, 0].set(jnp.inf), 4), "finite"),
      (lambda: layout.pack_bitplanes(np.full((64, 5), 16), np.ones((1, 5), np.float32),
                                     np.ones((1, 5), np.float32), bits=4, group=64), r"\[0, 15\]"),
      (lambda: layout.pack_bitplanes(np.ones((64, 5), int), np.ones((2, 5), np.float32),
                                     np.ones((2, 5), np.float32), bits=4, group=64), "scale_GN"),
      (lambda: layout.ternarize(xi), "float"),
      (lambda: layout.quantize_activations(xi), "float"),
      (lambda: layout.check_packed(dataclasses.replace(pw, packed=pw.packed[:3])),
       "packed must be uint8"),
      (lambda: layout.check_packed(dataclasses.replace(pw, zero=pw.scale)), "no zero"),
      (lambda: layout.PackedWeight.from_dict({**pw.as_dict(), "format": "i3"}), "format"),
      (lambda: layout.PackedWeight.from_dict({**pw.as_dict(), "packed": np.full((32, 5), 255,
                                              np.uint8)}), "2-bit code 3"),
      (lambda: layout.PackedWeight.from_dict({**layout.pack_tl1(codes, 0.5).as_dict(),
                                              "packed": np.full((32, 5), 0x9F, np.uint8)}),
       "pair index 15"),
      (lambda: layout.PackedWeight.from_dict({**layout.pack_tl2(codes, 0.5).as_dict(),
                                              "packed": np.full((16, 5), 0xE0, np.uint8)}),
       "magnitude index 14"),
      (lambda: lowbit_matmul(xi, pw), "float32, bfloat16 or float16"),
      (lambda: lowbit_matmul(x[:, :63], pw), "K=63"),
      (lambda: lowbit_matmul(x[None], pw), "2-D"),
      (lambda: lowbit_matmul(x, codes), "PackedWeight"),
      (lambda: lowbit_matmul(x, pw, out_dtype=jnp.int32), "out_dtype"),
      (lambda: lowbit_matmul(x, pw, implementation="cublas"), "implementation must be"),
      (lambda: lowbit_matmul(x, pw, config=object()), "config"),
      (lambda: lowbit_matmul_int8(x, jnp.ones(2), pw), "int8"),
      (lambda: lowbit_matmul_int8(xi, jnp.ones(3), pw), "x_scale_M"),
      (lambda: lowbit_matmul_int8(xi, None, pw), "x_scale_M"),
  ]
  for fn, match in bad:
    with pytest.raises(ValueError, match=match):
      fn()
