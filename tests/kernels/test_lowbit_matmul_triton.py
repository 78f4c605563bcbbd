"""The Pallas Triton backend of lowbit_matmul / lowbit_matmul_int8 (i2_s weights): the op test
base of test_lowbit_matmul.py (int8 path exact, float paths within tolerance) interpreted on CPU
and compiled under `pytest -m gpu`, its launch configs (splits, ragged K steps, transposed dots,
rowsum from the MMA or XLA, inline-PTX unpacking), the fallbacks, and the inline PTX checked by a
small interpreter of its instructions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import NotSupported
from pallas_kernels.lowbit_matmul import layout, lowbit_matmul, lowbit_matmul_int8
from pallas_kernels.lowbit_matmul import pallas_triton as lt
from pallas_kernels.lowbit_matmul.pallas_triton import TritonConfig
from pallas_kernels.lowbit_matmul.reference import (
  lowbit_matmul_int8_reference,
  lowbit_matmul_reference,
)

from ._oracle import generate_from_class, lower_for_cuda
from .test_lowbit_matmul import (
  LowbitBase,
  check_float,
  make_weight,
  random_codes,
  random_x_int8,
)

pytest_generate_tests = generate_from_class

# (M, K, N, fmt): GEMV (1, 5, 16: one 16-row tile, split-K) and GEMM (40), K not a block
# multiple (300, 250, 520), N not a tile multiple (33, 70).
CASES = [(1, 300, 33, "i2_s"), (5, 256, 128, "i2_s"), (16, 250, 64, "i2_s"),
         (40, 520, 70, "i2_s")]

# K = 520 is 5 blocks of 128: 3 blocks a step leave a ragged last step, 3 splits of 5 steps an
# uneven last split.
CONFIGS = [
    TritonConfig(num_splits=1),                       # one split: the kernel finishes y
    TritonConfig(num_splits=3, blocks_per_step=1),
    TritonConfig(blocks_per_step=3),
    TritonConfig(transpose=True),
    TritonConfig(rowsum="xla"),
    TritonConfig(rowsum="kernel", num_splits=1),
    TritonConfig(block_n=16, block_m=16, num_splits=2),
    TritonConfig(unpack="asm"),                       # interpreted as jnp: real on the GPU only
    TritonConfig(unpack="asm", transpose=True, num_splits=1, blocks_per_step=2),
]


class TestPallasTritonInterpret(LowbitBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True
  CASES = CASES
  DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

  @pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(
      f"{k}={v}" for k, v in vars(c).items() if v is not None))
  @pytest.mark.parametrize("M", [5, pytest.param(40, marks=pytest.mark.slow)])
  def test_configs(self, cfg, M):
    """Every launch form: the integer path exactly, bf16 within tolerance."""
    K, N = 520, 70
    pw, w = make_weight(M + 1, K, N, "i2_s", integer=True)
    x = random_x_int8(M, M, K)
    y = lowbit_matmul_int8(jnp.asarray(x), jnp.ones((M,), jnp.float32), pw, config=cfg,
                           **self.kw)
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))
    pw, w = make_weight(M + 2, K, N, "i2_s")
    xf = jnp.asarray(np.random.default_rng(M).standard_normal((M, K)), jnp.bfloat16)
    y = lowbit_matmul(xf, pw, config=cfg, **self.kw)
    want = np.asarray(xf.astype(jnp.float32), np.float64) @ w
    check_float(y, want, jnp.bfloat16, 2e-2)

  def test_int8_scaled_equals_reference_bitwise(self):
    """Split partials (int32) and the fused epilogue apply the scales in the reference's order,
    so the integer path equals it bit for bit."""
    M, K, N = 5, 520, 70
    pw, _ = make_weight(9, K, N, "i2_s")
    x, xs = layout.quantize_activations(
      jnp.asarray(np.random.default_rng(9).standard_normal((M, K)), jnp.float32))
    want = np.asarray(lowbit_matmul_int8_reference(x, xs, pw, jnp.float32))
    for cfg in (TritonConfig(num_splits=1), TritonConfig(num_splits=4)):
      got = lowbit_matmul_int8(x, xs, pw, config=cfg, **self.kw)
      np.testing.assert_array_equal(np.asarray(got), want)

  def test_positive_activations(self):
    """x with a large mean (rowsum(x) ~ 1.5 K): the float32 sum carries c rowsum(x) beside the
    codes' share, and must still be within bf16 / f16 tolerance of float64."""
    M, K, N = 3, 2048, 48
    pw, w = make_weight(5, K, N, "i2_s")
    xf = 1.0 + np.abs(np.random.default_rng(5).standard_normal((M, K)))
    for dtype in (jnp.bfloat16, jnp.float16):
      x = jnp.asarray(xf, dtype)
      want = np.asarray(x.astype(jnp.float32), np.float64) @ w
      for cfg in (TritonConfig(num_splits=1), TritonConfig(num_splits=2, rowsum="xla")):
        check_float(lowbit_matmul(x, pw, config=cfg, **self.kw), want, dtype, 2e-2)

  def test_out_dtype_and_block_64(self):
    """bf16 / f16 x with i2_s block 64 (bitnet.cpp's ARM blocks: 16-row slots), float32 out."""
    M, K, N = 3, 200, 40
    codes = random_codes(4, K, N)
    pw = layout.pack_i2s(codes, np.float32(0.25), block=64)
    for dtype in (jnp.bfloat16, jnp.float16):
      x = jnp.asarray(np.random.default_rng(4).standard_normal((M, K)), dtype)
      y = lowbit_matmul(x, pw, out_dtype=jnp.float32, **self.kw)
      assert y.dtype == jnp.float32
      want = np.asarray(x.astype(jnp.float32), np.float64) @ (codes * 0.25)
      check_float(y, want, dtype, 1e-5)

  def test_other_formats_fall_back(self):
    """Formats and blocks the kernel does not read: NotSupported alone, the XLA reference when
    it is next in the list (as `auto` tries it on a GPU)."""
    M, K, N = 3, 256, 24
    x = jnp.asarray(np.random.default_rng(0).standard_normal((M, K)), jnp.bfloat16)
    xi = jnp.asarray(random_x_int8(0, M, K))
    codes = random_codes(1, K, N)
    for fmt in ("tl1", "tl2", "bits2"):
      pw, _ = make_weight(1, K, N, fmt)
      with pytest.raises(NotSupported, match="reads i2_s only"):
        lowbit_matmul(x, pw, **self.kw)
      got = lowbit_matmul(x, pw, implementation=("pallas_triton", "xla"),
                          interpret=self.INTERPRET)
      np.testing.assert_array_equal(np.asarray(got),
                                    np.asarray(lowbit_matmul_reference(x, pw, jnp.bfloat16)))
    with pytest.raises(NotSupported, match="power of 2 >= 32"):
      lowbit_matmul_int8(xi, jnp.ones((M,)), layout.pack_i2s(codes, 1.0, block=64), **self.kw)
    with pytest.raises(NotSupported, match="power of 2 >= 16"):
      lowbit_matmul(x, layout.pack_i2s(codes, 1.0, block=24), **self.kw)

  def test_bad_config_raises(self):
    pw, _ = make_weight(0, 64, 16, "i2_s")
    x = jnp.ones((2, 64), jnp.bfloat16)
    for cfg, match in ((TritonConfig(block_n=24), "block_n must be a power of 2"),
                       (TritonConfig(num_splits=0), "num_splits"),
                       (TritonConfig(unpack="lut"), "unpack"),
                       (TritonConfig(rowsum="none"), "rowsum"),
                       (TritonConfig(transpose=1), "transpose")):
      with pytest.raises(ValueError, match=match):
        lowbit_matmul(x, pw, config=cfg, **self.kw)


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True

  @pytest.mark.parametrize("unpack", ["jnp", "asm"])
  @pytest.mark.parametrize("M", [1, 16, 256])
  def test_model_shapes(self, M, unpack):
    """Compiled at a 4096 x 4096 projection: exact int8 sums, bf16 against the reference."""
    K = N = 4096
    cfg = TritonConfig(unpack=unpack)
    pw, w = make_weight(M, K, N, "i2_s", integer=True)
    x = random_x_int8(M, M, K)
    y = lowbit_matmul_int8(jnp.asarray(x), jnp.ones((M,), jnp.float32), pw, config=cfg,
                           **self.kw)
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))
    pw, w = make_weight(M + 1, K, N, "i2_s")
    xf = jnp.asarray(np.random.default_rng(M).standard_normal((M, K)), jnp.bfloat16)
    y = lowbit_matmul(xf, pw, config=cfg, **self.kw)
    check_float(y, np.asarray(xf.astype(jnp.float32), np.float64) @ w, jnp.bfloat16, 2e-2)

def test_auto_on_a_gpu_is_the_kernel_for_gemv_rows_and_xla_above():
  """`auto` lowered for CUDA: the Triton kernel up to max_gemv_rows (16) rows, XLA past them."""
  pw, _ = make_weight(0, 256, 64, "i2_s")
  for M, kernel in ((1, True), (16, True), (17, False), (64, False)):
    x, xi = jnp.zeros((M, 256), jnp.bfloat16), jnp.zeros((M, 256), jnp.int8)
    text = lower_for_cuda(lambda x, w: lowbit_matmul(x, w), x, pw)
    assert ("xla.gpu.triton" in text) == kernel, M
    text = lower_for_cuda(lambda x, w, M=M: lowbit_matmul_int8(
        x, jnp.ones((M,), jnp.float32), w), xi, pw)
    assert ("xla.gpu.triton" in text) == kernel, M


def test_triton_lowers_for_cuda():
  """The whole Pallas -> Triton IR lowering on any host, the inline PTX included."""
  for M, cfg in ((1, TritonConfig()), (40, TritonConfig(unpack="asm")),
                 (5, TritonConfig(unpack="asm", transpose=True, num_splits=1))):
    pw, _ = make_weight(0, 300, 64, "i2_s")
    x, xi = jnp.zeros((M, 300), jnp.bfloat16), jnp.zeros((M, 300), jnp.int8)
    text = lower_for_cuda(lambda x, w, cfg=cfg: lowbit_matmul(
        x, w, implementation="pallas_triton", config=cfg), x, pw)
    assert "xla.gpu.triton" in text and 'name = "lowbit_matmul"' in text
    text = lower_for_cuda(lambda x, w, M=M, cfg=cfg: lowbit_matmul_int8(
        x, jnp.ones((M,), jnp.float32), w, implementation="pallas_triton", config=cfg), xi, pw)
    assert "xla.gpu.triton" in text and 'name = "lowbit_matmul_int8"' in text


def test_cpu_without_interpret_is_not_supported():
  pw, _ = make_weight(0, 64, 16, "i2_s")
  x = jnp.ones((2, 64), jnp.bfloat16)
  if jax.default_backend() == "gpu":
    pytest.skip("runs on a GPU")
  with pytest.raises(NotSupported, match="needs a GPU"):
    lowbit_matmul(x, pw, implementation="pallas_triton")
  np.testing.assert_array_equal(np.asarray(lowbit_matmul(x, pw)),
                                np.asarray(lowbit_matmul(x, pw, implementation="xla")))


# ------------------------------------------------------------------------------ the inline PTX


def _operand(regs: dict, tok: str) -> np.ndarray:
  tok = tok.strip()
  if tok in regs:
    return regs[tok]
  return np.uint32(int(tok, 0))


def run_ptx(asm: str, inputs: list[np.ndarray], n_out: int) -> list[np.ndarray]:
  """Runs the PTX subset of the unpacking (prmt, shr, shl, mov, and, lop3 on .b32) over uint32
  registers, vectorised over numpy arrays; $0..$(n_out - 1) are the outputs, then the inputs."""
  regs = {f"${n_out + i}": np.asarray(v, np.uint32) for i, v in enumerate(inputs)}
  for stmt in filter(None, (s.strip() for s in asm.split(";"))):
    op, rest = stmt.split(None, 1)
    dst, *args = [a.strip() for a in rest.split(",")]
    a = [_operand(regs, t) for t in args]
    if op == "prmt.b32":
      sel = int(args[2], 0)
      src = [(a[0] >> np.uint32(8 * i)) & np.uint32(255) for i in range(4)]
      src += [(a[1] >> np.uint32(8 * i)) & np.uint32(255) for i in range(4)]
      out = np.zeros_like(regs[f"${n_out}"])
      for i in range(4):
        nib = (sel >> (4 * i)) & 15
        assert nib < 8, "sign-replicate selectors are not used"
        out = out | (src[nib] << np.uint32(8 * i))
    elif op == "shr.b32":
      out = a[0] >> a[1]
    elif op == "shl.b32":
      out = (a[0] << a[1]) & np.uint32(0xFFFFFFFF)
    elif op == "mov.b32":
      out = a[0]
    elif op == "and.b32":
      out = a[0] & a[1]
    elif op == "lop3.b32":
      lut = int(args[3], 0)
      out = np.zeros_like(a[0] | a[1] | a[2])
      for i in range(8):
        if (lut >> i) & 1:
          out = out | ((a[0] if i & 4 else ~a[0]) & (a[1] if i & 2 else ~a[1])
                       & (a[2] if i & 1 else ~a[2]))
    else:
      raise AssertionError(f"unexpected PTX instruction {op}")
    regs[dst] = np.asarray(out, np.uint32)
  return [regs[f"${i}"] for i in range(n_out)]


def apply_ptx(ptx: tuple, x: np.ndarray) -> np.ndarray:
  """An elementwise inline-PTX call on a 1-D array as Triton packs it: `pack` consecutive
  elements a 32-bit register, element 0 in the low bits, outputs likewise."""
  asm, _, out_dtype, pack, n_out = ptx
  body = re.sub(r"^\{|\}$|\.reg[^;]*;", "", asm.strip())
  words_in = x.view(np.uint32)                        # pack elements of x's width a word
  assert words_in.size * pack == x.size
  outs = run_ptx(body, [words_in], n_out)
  out = np.stack(outs, axis=1).reshape(-1)            # per instance: its n_out words in order
  return out.view(np.dtype(jnp.dtype(out_dtype)))


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.bfloat16, jnp.float16])
def test_inline_ptx_computes_the_jnp_bits(dtype):
  """The PTX of `unpack="asm"`, run by `run_ptx` on random bytes, equals `_unpack_jnp` bit for
  bit, slot by slot (what the GPU tests then check end to end)."""
  codes = lt._codes_for(dtype)
  b = np.random.default_rng(0).integers(0, 256, (8, 64)).astype(np.uint8)
  want = [np.asarray(c) for c in lt._unpack_jnp(jnp.asarray(b), codes)]
  src = b.reshape(-1)
  if codes.kind != "int8":
    src = apply_ptx(lt.WIDEN_PTX, src)
    np.testing.assert_array_equal(src, b.reshape(-1).astype(np.int16))
  for shift, w in zip(lt.SLOT_SHIFT, want):
    got = apply_ptx(lt.slot_ptx(codes, shift), src).reshape(b.shape)
    assert got.dtype == w.dtype
    np.testing.assert_array_equal(got.view(np.uint8 if w.itemsize == 1 else np.uint16),
                                  w.view(np.uint8 if w.itemsize == 1 else np.uint16))
