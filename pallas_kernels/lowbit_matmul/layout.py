"""Packed low-bit weight formats of the ternary and LUT matmuls (BitNet b1.58 / bitnet.cpp, T-MAC,
LUT Tensor Core): the one place that quantises, packs and unpacks them. `lowbit_matmul`,
`lut_matmul` and their kernels read these; a checkpoint converter stores `PackedWeight.as_dict()`.

A weight W is [K, N] (y = x @ W, x [M, K]). Every format packs along K, the reduction axis, and
all but i2_t keep N the minor axis as in the dense W: each byte (word) feeds one output column's dot product,
a kernel tile is [bk * bits / 8, bn] with N on the lanes (coalesced on a GPU, the 128 lanes of a
TPU vreg), and nothing is transposed between the packed tile and the MMA / table lookup. N is never
packed, so any N works. K is padded at the end to `rows`, a multiple of the format's `block`;
`PackedWeight.shape` keeps the real K, every unpack returns exactly K rows, and a kernel pads x with
zero columns up to `rows`.

Ternary weights (BitNet b1.58): int8 codes t in {-1, 0, +1} and a float32 per-tensor scale,
w_hat = t * scale. `ternarize` is the absmean quantiser: scale = mean|W|, t = clip(round(W /
scale), -1, 1) (t = 0, scale = 0 for an all-zero W).

Slot interleave (i2_s, tl1, tl2): a byte holds 8 / b codes of b bits; within each block of R codes
(rows, pairs or triples) along K, code i * (R b / 8) + j lives in byte j at bits [8 - (i + 1) b,
8 - i b) (slot 0 in the top bits). One shift and mask of a tile of bytes then gives the codes of a
*contiguous* K slice of the block, which multiplies the matching contiguous slice of x: the
permutation is paid once, offline, never in the hot loop. Bytes, not int32 words, because that is
bitnet.cpp's unit: its buffers convert to these by a transpose.

  i2_s      packed uint8 [rows / 4, N]: q = t + 1 in {0, 1, 2}, four a byte, slot interleave over
            rows in blocks of `block` rows (default 128, a multiple of 4); padding rows are t = 0.
            With block 128 (64) this is bitnet.cpp's x86 (ARM) I2_S byte for byte, transposed:
            packed[:, n] is quantize_i2_s's row n (its QK_I2_S blocks). 2 bits a weight.
  i2_t      packed uint16 [N, rows / 8]: the i2_s codes q = t + 1 transposed, N the major axis,
            eight a 16-bit word, LSB first: within each block of `block` rows (default 512, a
            multiple of 8; W = block / 8 words a block), row i * W + j of the block is bits
            [2 i, 2 i + 2) of word j. The exception to "N minor", made for Hopper's warpgroup MMA
            with the weight as its register operand (y^T = W^T x^T, the Mosaic GPU kernel): a
            [64 columns, 64 words] tile loaded in the wgmma register layout gives every thread
            the words of exactly the (column, row) pairs it multiplies, and slot i of the tile is
            the A operand of the block's rows [i W, i W + W) with W = 64; each 32-bit register
            pair of adjacent words becomes a bf16x2 operand register by one mask, one or and
            one fused multiply-add (no conversion instructions, no shared-memory round trip).
            2 bits a weight.
  tl1       packed uint8 [rows / 4, N]: rows (2p, 2p + 1) as the index u = 3 (t0 + 1) + (t1 + 1)
            of the 9 pairs (4 = the zero pair, also the padding), two a byte, slot interleave over
            pairs in blocks of `block` rows (default 128, a multiple of 4). A LUT kernel looks one
            9-entry table of a x0 + b x1 (a, b in {-1, 0, 1}) up per index (bitnet.cpp's TL1).
            2 bits a weight, one lookup per 2 weights.
  tl2       packed uint8 [rows / 6, N] magnitudes and signs uint8 [rows / 24, N]: rows (3r, 3r + 1,
            3r + 2) as e = 9 (t0 + 1) + 3 (t1 + 1) + (t2 + 1) in [0, 27). Negating a triple maps
            e to 26 - e, so the 27 fold into (mag, sign) = (|e - 13|, e < 13): 14 magnitudes (0 =
            the zero triple) in 4 bits, two a byte, and one sign bit, eight a byte; e = 13 + mag or
            13 - mag. Both slot interleaved over triples in blocks of `block` rows (default 96 =
            32 triples; a multiple of 24, so a block fills whole sign bytes). A LUT kernel looks
            one 14-entry table up per triple and negates by the sign (bitnet.cpp's TL2). 5 bits
            per 3 weights = 1.67 a weight. K is padded with zero triples (mag 0, sign 0) to a
            multiple of `block`, which also makes it a multiple of 3 (bitnet.cpp instead runs the
            tail past the last multiple of 3 through TL1; padding keeps one format per tensor at
            fewer than `block` zero rows).
  bitplanes (T-MAC) packed int32 [bits, rows / 32, N], scale / zero float32 [rows / block, N]:
            n-bit unsigned codes q in [0, 2^n), w_hat = (q - zero) * scale per group of `block`
            rows (default 128, a multiple of 32) and column. Bit p of q is plane p; row 32 w + i
            is bit i of word w (LSB first, consecutive rows). Why: nibble c of a word, (word >>
            4c) & 15, is the T-MAC table index of rows 32 w + 4c .. 32 w + 4c + 3 (bit i <-> row
            4c + i) with one shift and mask; each plane is a binary matrix, so one kernel serves
            1..4 bits; int32 words like the KV cache's (`lowbit_decode.layout`), the TPU's native
            width. The rows past K repeat row K - 1 (so the last group's min / max are those of
            its real rows); x is zero there. Ternary as bit planes: q = t + 1 (two planes), zero 1,
            the tensor's scale in every column, one group (`block` = K rounded up to 32).

`quantize_nbit` is asymmetric min / max per group (as the KV cache's): scale = (max - min) /
(2^n - 1), zero = -min / scale (code units, float32), q = clip(round(w / scale + zero), 0,
2^n - 1), so the codes span [min, max] and |w - w_hat| <= scale / 2 (+ float32 rounding); a
constant group gets scale 1, zero -min (w_hat exact).

Activations of the W2A8 path (BitNet absmax per token): x_scale = max|x_m| / 127, x_int8 =
round(x * 127 / max|x_m|) in [-127, 127] (0 and scale 0 for an all-zero row); x ~ x_int8 *
x_scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import checks

FORMATS = ("i2_s", "i2_t", "tl1", "tl2", "bitplanes")
TERNARY_FORMATS = ("i2_s", "i2_t", "tl1", "tl2")
# `block` must be a multiple of: whole code bytes (i2_s, tl1), whole sign bytes of triples (tl2),
# whole int32 plane words (bitplanes).
BLOCK_MULTIPLE = {"i2_s": 4, "i2_t": 8, "tl1": 4, "tl2": 24, "bitplanes": 32}
DEFAULT_BLOCK = {"i2_s": 128, "i2_t": 512, "tl1": 128, "tl2": 96, "bitplanes": 128}
MAX_BITS = 4
PLANE_WORD = 32        # rows a bit-plane word
ZERO_TRIPLE = 13       # tl2: e of (0, 0, 0), the centre of the sign symmetry e <-> 26 - e
FLOAT_DTYPES = checks.FLOAT_DTYPES


def round_up(k: int, multiple: int) -> int:
  return -(-k // multiple) * multiple


def levels(bits: int) -> int:
  """The largest n-bit code, 2^bits - 1."""
  return (1 << bits) - 1


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("packed", "scale", "signs", "zero"),
                   meta_fields=("fmt", "shape", "block", "bits"))
@dataclasses.dataclass(frozen=True)
class PackedWeight:
  """A packed [K, N] weight; a pytree (arrays are leaves, the rest static), so it passes through
  `jax.jit`.

  fmt: one of FORMATS. shape: (K, N), the real (unpadded) shape. block: K rows a packing block
  (ternary formats) or a scale group (bitplanes); K is padded to `rows`, a multiple of it.
  bits: planes (bitplanes); None for the ternary formats.
  packed: the codes (uint8 / int32, per format: module docstring). scale: float32 [] (ternary
  formats; i2_t also [N], a scale per output column: `concat_i2t`) or [rows / block, N]
  (bitplanes). signs: uint8 [rows / 24, N] (tl2 only). zero: float32
  [rows / block, N] (bitplanes only).
  """
  fmt: str
  shape: tuple[int, int]
  packed: jax.Array
  scale: jax.Array
  signs: jax.Array | None = None
  zero: jax.Array | None = None
  block: int = 128
  bits: int | None = None

  @property
  def rows(self) -> int:
    """K padded to a multiple of block: the packed rows (x is read zero-padded to this)."""
    return round_up(self.shape[0], self.block)

  @property
  def groups(self) -> int:
    """G: scale groups along K (1 for the per-tensor ternary scale)."""
    return self.rows // self.block if self.fmt == "bitplanes" else 1

  def as_dict(self) -> dict:
    """Plain data for a checkpoint: the metadata and numpy arrays (absent arrays left out)."""
    out = {"format": self.fmt, "shape": list(self.shape), "block": self.block, "bits": self.bits}
    for name in ("packed", "scale", "signs", "zero"):
      if getattr(self, name) is not None:
        out[name] = np.asarray(getattr(self, name))
    return out

  @classmethod
  def from_dict(cls, d: dict) -> "PackedWeight":
    """Inverse of `as_dict`, checked (shapes, dtypes and the packed index ranges)."""
    pw = cls(fmt=d.get("format"), shape=tuple(d.get("shape", ())), packed=d.get("packed"),
             scale=d.get("scale"), signs=d.get("signs"), zero=d.get("zero"),
             block=d.get("block"), bits=d.get("bits"))
    check_packed(pw, values=True)
    pw = dataclasses.replace(pw, shape=tuple(int(s) for s in pw.shape), block=int(pw.block),
                             bits=None if pw.bits is None else int(pw.bits))
    return jax.tree.map(jnp.asarray, pw)


# ------------------------------------------------------------------------------------ checks


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else None


def _dtype(x):
  return getattr(x, "dtype", None)


def check_block(fmt: str, block) -> None:
  """ValueError unless block is a positive int multiple of BLOCK_MULTIPLE[fmt]."""
  unit = BLOCK_MULTIPLE[fmt]
  if (isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1
      or block % unit):
    what = "group" if fmt == "bitplanes" else "block"
    raise ValueError(f"{fmt} {what} must be a positive multiple of {unit} rows, got {block!r}")


def check_bits(bits) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def _check_2d(name: str, x, kind: str) -> None:
  """x a 2-D array of `kind` ("integer" / "float") dtype."""
  if getattr(x, "ndim", None) != 2 or min(x.shape) < 1:
    raise ValueError(f"{name} must be a non-empty 2-D [K, N] array, got shape {_shape(x)}")
  ok = (jnp.issubdtype(x.dtype, jnp.integer) if kind == "integer"
        else jnp.dtype(x.dtype) in FLOAT_DTYPES)
  if not ok:
    want = "an integer" if kind == "integer" else "a float32 / bfloat16 / float16"
    raise ValueError(f"{name} must have {want} dtype, got {x.dtype}")


def _check_ternary(codes_KN, scale) -> jax.Array:
  """The ternary inputs of the pack functions; returns scale as a float32 scalar."""
  _check_2d("codes_KN", codes_KN, "integer")
  if checks.is_concrete(codes_KN):
    c = np.asarray(codes_KN)
    bad = c[(c < -1) | (c > 1)]
    if bad.size:
      raise ValueError(f"codes_KN must be ternary, in {{-1, 0, 1}}; got {bad.size} entries "
                       f"outside it (e.g. {int(bad[0])})")
  scale = jnp.asarray(scale)
  if scale.ndim != 0 or not jnp.issubdtype(scale.dtype, jnp.floating):
    raise ValueError(f"scale must be a float scalar (the per-tensor scale), got "
                     f"{scale.dtype} {scale.shape}")
  if checks.is_concrete(scale) and not np.isfinite(np.asarray(scale, np.float32)):
    raise ValueError(f"scale must be finite, got {np.asarray(scale)}")
  return scale.astype(jnp.float32)


def check_packed(pw, *, values: bool = False) -> None:
  """ValueError naming the first inconsistency of a PackedWeight: format, shape, block, bits, and
  each array's dtype and shape. values=True (concrete arrays only) also checks the packed index
  ranges: no 2-bit code 3 (i2_s), no pair index above 8 (tl1), no magnitude above 13 (tl2)."""
  if not isinstance(pw, PackedWeight):
    raise ValueError(f"packed must be a lowbit_matmul.layout.PackedWeight, got "
                     f"{type(pw).__name__}")
  if pw.fmt not in FORMATS:
    raise ValueError(f"packed weight format must be one of {FORMATS}, got {pw.fmt!r}")
  shape = pw.shape
  if (not isinstance(shape, tuple) or len(shape) != 2
      or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape)):
    raise ValueError(f"packed weight shape must be (K, N) of positive ints, got {shape!r}")
  check_block(pw.fmt, pw.block)
  _, N = shape
  Kp = pw.rows
  f32 = jnp.dtype(jnp.float32)
  if pw.fmt == "bitplanes":
    check_bits(pw.bits)
    G = Kp // pw.block
    want = {"packed": (jnp.dtype(jnp.int32), (pw.bits, Kp // PLANE_WORD, N)),
            "scale": (f32, (G, N)), "zero": (f32, (G, N)), "signs": None}
  else:
    if pw.bits is not None:
      raise ValueError(f"bits is for bitplanes; a {pw.fmt} weight has bits=None, got {pw.bits!r}")
    per_byte = 6 if pw.fmt == "tl2" else 4
    packed = ((jnp.dtype(jnp.uint16), (N, Kp // 8)) if pw.fmt == "i2_t"
              else (jnp.dtype(jnp.uint8), (Kp // per_byte, N)))
    # i2_t: a per-tensor scale, or one per output column (`concat_i2t`: fused projections)
    scale_shape = (N,) if pw.fmt == "i2_t" and _shape(pw.scale) == (N,) else ()
    want = {"packed": packed, "scale": (f32, scale_shape),
            "zero": None,
            "signs": (jnp.dtype(jnp.uint8), (Kp // 24, N)) if pw.fmt == "tl2" else None}
  for name, spec in want.items():
    x = getattr(pw, name)
    if spec is None:
      if x is not None:
        raise ValueError(f"a {pw.fmt} weight has no {name}, got {_dtype(x)} {_shape(x)}")
      continue
    dtype, shp = spec
    if x is None or _dtype(x) != dtype or _shape(x) != shp:
      raise ValueError(f"{pw.fmt} {name} must be {dtype.name} {shp} for shape (K, N)={shape}, "
                       f"block={pw.block}, got {_dtype(x)} {_shape(x)}")
  if values and pw.fmt in TERNARY_FORMATS and checks.is_concrete(pw.packed):
    b = np.asarray(pw.packed)
    if pw.fmt in ("i2_s", "i2_t"):
      shifts = range(0, 8 * b.dtype.itemsize, 2)
      fields, top, what = [(b >> s) & 3 for s in shifts], 2, "2-bit code"
    else:
      fields, top = [b >> 4, b & 15], (8 if pw.fmt == "tl1" else ZERO_TRIPLE)
      what = "pair index" if pw.fmt == "tl1" else "magnitude index"
    worst = max(int(f.max()) for f in fields)
    if worst > top:
      raise ValueError(f"{pw.fmt} packed holds a {what} {worst} > {top}: not a {pw.fmt} weight")


def _check_fmt(pw, fmt: str) -> None:
  check_packed(pw)
  if pw.fmt != fmt:
    raise ValueError(f"expected a {fmt} weight, got {pw.fmt}")


# ----------------------------------------------------------------------------- slot packing


def _slot_shifts(bits: int, word_bits: int, msb_first: bool) -> np.ndarray:
  i = np.arange(word_bits // bits, dtype=np.uint32)
  return (word_bits - (i + 1) * bits if msb_first else i * bits).astype(np.uint32)


@functools.partial(jax.jit, static_argnames=("bits", "block", "word_bits", "msb_first"))
def pack_slots(codes_RN: jax.Array, *, bits: int, block: int, word_bits: int = 8,
               msb_first: bool = True) -> jax.Array:
  """Codes [R, N] in [0, 2^bits) (R a multiple of block) -> words [R * bits / word_bits, N],
  uint8 (word_bits 8), uint16 (16) or int32 (32): within each block of `block` codes along R, code i * W + j
  is in word j at slot i (W = block * bits / word_bits words a block); slot i sits at bits
  [word_bits - (i + 1) bits, word_bits - i bits) (msb_first) or [i bits, (i + 1) bits)."""
  R, N = codes_RN.shape
  per = word_bits // bits
  W = block // per
  c = codes_RN.astype(jnp.uint32).reshape(R // block, per, W, N)
  shifts = _slot_shifts(bits, word_bits, msb_first)[:, None, None]
  # the slots' bits are disjoint, so their sum is their bitwise or
  words = jnp.sum(c << shifts, axis=1, dtype=jnp.uint32).reshape(R // per, N)
  if word_bits == 8:
    return words.astype(jnp.uint8)
  if word_bits == 16:
    return words.astype(jnp.uint16)
  return lax.bitcast_convert_type(words, jnp.int32)


@functools.partial(jax.jit, static_argnames=("bits", "block", "word_bits", "msb_first"))
def unpack_slots(words: jax.Array, *, bits: int, block: int, word_bits: int = 8,
                 msb_first: bool = True) -> jax.Array:
  """Inverse of `pack_slots`: words [Rw, N] -> int32 codes [Rw * word_bits / bits, N]."""
  Rw, N = words.shape
  per = word_bits // bits
  W = block // per
  # uint32: logical shifts, so the top bit of an int32 word is an ordinary code bit
  u = (lax.bitcast_convert_type(words, jnp.uint32) if word_bits == 32
       else words.astype(jnp.uint32)).reshape(Rw // W, 1, W, N)
  c = (u >> _slot_shifts(bits, word_bits, msb_first)[:, None, None]) & np.uint32(levels(bits))
  return c.astype(jnp.int32).reshape(Rw * per, N)


def _pad_rows(a_KN: jax.Array, rows: int, value=None) -> jax.Array:
  """a [K, N] -> [rows, N]: the new rows are `value`, or repeat row K - 1 (value None)."""
  pad = rows - a_KN.shape[0]
  if not pad:
    return a_KN
  if value is None:
    return jnp.pad(a_KN, ((0, pad), (0, 0)), mode="edge")
  return jnp.pad(a_KN, ((0, pad), (0, 0)), constant_values=value)


# ------------------------------------------------------------------------- ternary formats


@functools.partial(jax.jit, static_argnames=("fmt", "block"))
def _pack_ternary_codes(codes_KN: jax.Array, *, fmt: str, block: int):
  """(packed, signs or None) of int codes [K, N] (module docstring); padding rows are t = 0."""
  K, N = codes_KN.shape
  t = _pad_rows(codes_KN.astype(jnp.int32), round_up(K, block), 0) + 1
  if fmt == "i2_s":
    return pack_slots(t, bits=2, block=block), None
  if fmt == "i2_t":
    return pack_slots(t, bits=2, block=block, word_bits=16, msb_first=False).T, None
  if fmt == "tl1":
    t = t.reshape(-1, 2, N)
    return pack_slots(3 * t[:, 0] + t[:, 1], bits=4, block=block // 2), None
  t = t.reshape(-1, 3, N)
  e = 9 * t[:, 0] + 3 * t[:, 1] + t[:, 2]
  mag, sign = jnp.abs(e - ZERO_TRIPLE), (e < ZERO_TRIPLE).astype(jnp.int32)
  return (pack_slots(mag, bits=4, block=block // 3),
          pack_slots(sign, bits=1, block=block // 3))


def _pack_ternary(fmt: str, codes_KN, scale, block) -> PackedWeight:
  scale = _check_ternary(codes_KN, scale)
  check_block(fmt, block)
  packed, signs = _pack_ternary_codes(jnp.asarray(codes_KN), fmt=fmt, block=block)
  return PackedWeight(fmt, tuple(codes_KN.shape), packed, scale, signs=signs, block=block)


@jax.jit
def _unpack_ternary(pw: PackedWeight) -> jax.Array:
  K, N = pw.shape
  if pw.fmt == "i2_s":
    t = unpack_slots(pw.packed, bits=2, block=pw.block)
  elif pw.fmt == "i2_t":
    t = unpack_slots(pw.packed.T, bits=2, block=pw.block, word_bits=16, msb_first=False)
  elif pw.fmt == "tl1":
    u = unpack_slots(pw.packed, bits=4, block=pw.block // 2)
    t = jnp.stack([u // 3, u % 3], axis=1).reshape(-1, N)
  else:
    triples = pw.block // 3
    mag = unpack_slots(pw.packed, bits=4, block=triples)
    sign = unpack_slots(pw.signs, bits=1, block=triples)
    e = ZERO_TRIPLE + mag * (1 - 2 * sign)
    t = jnp.stack([e // 9, (e // 3) % 3, e % 3], axis=1).reshape(-1, N)
  return (t[:K] - 1).astype(jnp.int8)


@jax.jit
def unpack_ternary_nk(pw: PackedWeight) -> jax.Array:
  """A ternary weight -> int8 codes [N, K] (W^T: K minor, the layout of an integer GEMM's weight
  operand on the GPU, which takes both int8 operands K-major). i2_t stores N major, so its
  words unpack straight into rows of W^T (contiguous reads and writes, no transpose); the other
  formats are unpacked and transposed."""
  if pw.fmt not in TERNARY_FORMATS:
    raise ValueError(f"unpack_ternary_nk takes a ternary format ({', '.join(TERNARY_FORMATS)}), "
                     f"got {pw.fmt!r}")
  K, N = pw.shape
  if pw.fmt != "i2_t":
    return _unpack_ternary(pw).T
  W = pw.block // 8                                    # words a block
  u = pw.packed.astype(jnp.uint32).reshape(N, -1, 1, W)
  q = (u >> _slot_shifts(2, 16, False)[:, None]) & np.uint32(3)      # [N, blocks, 8, W]
  return q.reshape(N, pw.rows)[:, :K].astype(jnp.int8) - jnp.int8(1)


def pack_i2s(codes_KN: jax.Array, scale, *, block: int = DEFAULT_BLOCK["i2_s"]) -> PackedWeight:
  """Ternary codes int [K, N] in {-1, 0, 1} and the float per-tensor scale -> an i2_s weight:
  packed uint8 [rows / 4, N], q = t + 1 four a byte (module docstring)."""
  return _pack_ternary("i2_s", codes_KN, scale, block)


def unpack_i2s(pw: PackedWeight) -> jax.Array:
  """An i2_s weight -> int8 codes [K, N] in {-1, 0, 1}."""
  _check_fmt(pw, "i2_s")
  return _unpack_ternary(pw)


def pack_i2t(codes_KN: jax.Array, scale, *, block: int = DEFAULT_BLOCK["i2_t"]) -> PackedWeight:
  """Ternary codes int [K, N] in {-1, 0, 1} and the float per-tensor scale -> an i2_t weight:
  packed uint16 [N, rows / 8], q = t + 1 eight a word (module docstring)."""
  return _pack_ternary("i2_t", codes_KN, scale, block)


def unpack_i2t(pw: PackedWeight) -> jax.Array:
  """An i2_t weight -> int8 codes [K, N] in {-1, 0, 1}."""
  _check_fmt(pw, "i2_t")
  return _unpack_ternary(pw)


def pack_tl1(codes_KN: jax.Array, scale, *, block: int = DEFAULT_BLOCK["tl1"]) -> PackedWeight:
  """Ternary codes int [K, N] and the per-tensor scale -> a tl1 weight: packed uint8 [rows / 4,
  N], the pair index 3 (t0 + 1) + (t1 + 1) of rows (2p, 2p + 1), two a byte."""
  return _pack_ternary("tl1", codes_KN, scale, block)


def unpack_tl1(pw: PackedWeight) -> jax.Array:
  """A tl1 weight -> int8 codes [K, N] in {-1, 0, 1}."""
  _check_fmt(pw, "tl1")
  return _unpack_ternary(pw)


def pack_tl2(codes_KN: jax.Array, scale, *, block: int = DEFAULT_BLOCK["tl2"]) -> PackedWeight:
  """Ternary codes int [K, N] and the per-tensor scale -> a tl2 weight: packed uint8 [rows / 6,
  N] (4-bit magnitudes, two a byte) and signs uint8 [rows / 24, N] (eight a byte) of the triples
  of rows (3r, 3r + 1, 3r + 2); K padded with zero rows to rows, a multiple of block (and of 3)."""
  return _pack_ternary("tl2", codes_KN, scale, block)


def unpack_tl2(pw: PackedWeight) -> jax.Array:
  """A tl2 weight -> int8 codes [K, N] in {-1, 0, 1} (the padding rows dropped)."""
  _check_fmt(pw, "tl2")
  return _unpack_ternary(pw)


def pack_ternary(codes_KN: jax.Array, scale, fmt: str, *, block: int | None = None) -> PackedWeight:
  """`pack_i2s` / `pack_i2t` / `pack_tl1` / `pack_tl2` by name (block None: the format's default)."""
  if fmt not in TERNARY_FORMATS:
    raise ValueError(f"fmt must be one of {TERNARY_FORMATS}, got {fmt!r}")
  return _pack_ternary(fmt, codes_KN, scale, DEFAULT_BLOCK[fmt] if block is None else block)


# ------------------------------------------------------------------------------- bit planes


def pack_bitplanes(q_KN: jax.Array, scale_GN: jax.Array, zero_GN: jax.Array, *, bits: int,
                   group: int = DEFAULT_BLOCK["bitplanes"]) -> PackedWeight:
  """Unsigned codes int [K, N] in [0, 2^bits) with float group scales and zeros [G, N] (G =
  ceil(K / group); w_hat = (q - zero) * scale) -> a bitplanes weight: packed int32 [bits, rows /
  32, N], scale / zero float32 [G, N]."""
  check_bits(bits)
  check_block("bitplanes", group)
  _check_2d("q_KN", q_KN, "integer")
  K, N = q_KN.shape
  G = -(-K // group)
  if checks.is_concrete(q_KN):
    q = np.asarray(q_KN)
    if q.min() < 0 or q.max() > levels(bits):
      raise ValueError(f"q_KN must lie in [0, {levels(bits)}] for bits={bits}, got range "
                       f"[{q.min()}, {q.max()}]")
  for name, p in (("scale_GN", scale_GN), ("zero_GN", zero_GN)):
    if _shape(p) != (G, N) or not jnp.issubdtype(p.dtype, jnp.floating):
      raise ValueError(f"{name} must be float [G, N]={(G, N)} (G = ceil(K={K} / group={group})), "
                       f"got {_dtype(p)} {_shape(p)}")
    if checks.is_concrete(p) and not np.isfinite(np.asarray(p, np.float32)).all():
      raise ValueError(f"{name} must be finite")
  planes = _pack_planes(jnp.asarray(q_KN), bits=bits, rows=G * group)
  return PackedWeight("bitplanes", (K, N), planes, jnp.asarray(scale_GN, jnp.float32),
                      zero=jnp.asarray(zero_GN, jnp.float32), block=group, bits=bits)


@functools.partial(jax.jit, static_argnames=("bits", "rows"))
def _pack_planes(q_KN: jax.Array, *, bits: int, rows: int) -> jax.Array:
  q = _pad_rows(q_KN.astype(jnp.int32), rows)
  return jnp.stack([pack_slots((q >> p) & 1, bits=1, block=PLANE_WORD, word_bits=PLANE_WORD,
                               msb_first=False) for p in range(bits)])


@jax.jit
def _unpack_planes(pw: PackedWeight) -> jax.Array:
  q = sum(unpack_slots(pw.packed[p], bits=1, block=PLANE_WORD, word_bits=PLANE_WORD,
                       msb_first=False) << p for p in range(pw.bits))
  return q[:pw.shape[0]]


def unpack_bitplanes(pw: PackedWeight) -> jax.Array:
  """A bitplanes weight -> int32 codes q [K, N] in [0, 2^bits)."""
  _check_fmt(pw, "bitplanes")
  return _unpack_planes(pw)


@functools.partial(jax.jit, static_argnames=("bits", "group"))
def _minmax_codes(w_KN, *, bits: int, group: int):
  K, N = w_KN.shape
  G = -(-K // group)
  w = _pad_rows(w_KN.astype(jnp.float32), G * group).reshape(G, group, N)
  lo, hi = w.min(axis=1), w.max(axis=1)
  step = (hi - lo) / levels(bits)
  scale = jnp.where(step > 0, step, 1.0)
  zero = -lo / scale
  q = jnp.clip(jnp.round(w / scale[:, None] + zero[:, None]), 0, levels(bits))
  return q.astype(jnp.int32).reshape(G * group, N)[:K], scale, zero


def quantize_nbit(w_KN: jax.Array, bits: int, group: int = DEFAULT_BLOCK["bitplanes"]
                  ) -> PackedWeight:
  """Asymmetric min / max n-bit quantisation per group of `group` rows and column (module
  docstring) of a float [K, N] weight -> a bitplanes weight (its packed planes int32 [bits,
  rows / 32, N], scale and zero float32 [G, N])."""
  check_bits(bits)
  check_block("bitplanes", group)
  _check_2d("w_KN", w_KN, "float")
  if checks.is_concrete(w_KN) and not np.isfinite(np.asarray(w_KN, np.float32)).all():
    raise ValueError("w_KN must be finite")
  q, scale, zero = _minmax_codes(w_KN, bits=bits, group=group)
  return pack_bitplanes(q, scale, zero, bits=bits, group=group)


def pack_ternary_bitplanes(codes_KN: jax.Array, scale) -> PackedWeight:
  """Ternary codes int [K, N] and the per-tensor scale as a 2-bit bitplanes weight: q = t + 1,
  zero 1, one group of K rounded up to 32 rows, so ternary weights go down the LUT path too."""
  scale = _check_ternary(codes_KN, scale)
  K, N = codes_KN.shape
  return pack_bitplanes(codes_KN.astype(jnp.int32) + 1, jnp.full((1, N), scale),
                        jnp.ones((1, N), jnp.float32), bits=2, group=round_up(K, PLANE_WORD))


def to_bitplanes(pw: PackedWeight) -> PackedWeight:
  """Any packed weight as bitplanes (a ternary one through `pack_ternary_bitplanes`; per-column
  scales become the group scales of its one group)."""
  check_packed(pw)
  if pw.fmt == "bitplanes":
    return pw
  if jnp.ndim(pw.scale) == 0:
    return pack_ternary_bitplanes(unpack(pw), pw.scale)
  K, N = pw.shape
  return pack_bitplanes(unpack(pw).astype(jnp.int32) + 1, pw.scale[None, :],
                        jnp.ones((1, N), jnp.float32), bits=2, group=round_up(K, PLANE_WORD))


def concat_i2t(weights) -> PackedWeight:
  """I2_T weights of one K (e.g. a layer's q / k / v projections) as one [K, sum N] weight
  whose scale is per output column (each weight's per-tensor scale over its columns), so one
  matmul computes them all: its columns equal each weight's own product bit for bit (the same
  int32 sums and the same float32 scalings)."""
  weights = list(weights)
  if not weights:
    raise ValueError("concat_i2t needs at least one weight")
  for w in weights:
    check_packed(w)
  first = weights[0]
  if any(w.fmt != "i2_t" or (w.shape[0], w.block) != (first.shape[0], first.block)
         for w in weights):
    raise ValueError(f"concat_i2t takes i2_t weights of one K and block, got (format, K, block) "
                     f"{[(w.fmt, w.shape[0], w.block) for w in weights]}")
  scale = jnp.concatenate([jnp.broadcast_to(jnp.asarray(w.scale, jnp.float32), (w.shape[1],))
                           for w in weights])
  return PackedWeight(fmt="i2_t", shape=(first.shape[0], sum(w.shape[1] for w in weights)),
                      packed=jnp.concatenate([w.packed for w in weights], axis=0), scale=scale,
                      block=first.block)


# ------------------------------------------------------------------------ any format, quantisers


def unpack(pw: PackedWeight) -> jax.Array:
  """Codes [K, N]: int8 ternary t (i2_s, tl1, tl2) or int32 q (bitplanes)."""
  check_packed(pw)
  return _unpack_planes(pw) if pw.fmt == "bitplanes" else _unpack_ternary(pw)


def expand_groups(p_GN: jax.Array, block: int, K: int) -> jax.Array:
  """Group parameters [G, N] -> one row per weight row [K, N] (group g = rows [g block, (g + 1)
  block))."""
  return jnp.repeat(p_GN, block, axis=0)[:K]


def dequantize(codes_KN: jax.Array, scale) -> jax.Array:
  """float32 w_hat = t * scale of ternary codes (any shape) and the per-tensor scale."""
  return codes_KN.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)


def dequantize_weight(pw: PackedWeight) -> jax.Array:
  """Any packed weight -> float32 w_hat [K, N]: t * scale, or (q - zero) * scale per group."""
  check_packed(pw)
  return _dequantize_weight(pw)


@jax.jit
def _dequantize_weight(pw: PackedWeight) -> jax.Array:
  codes = unpack(pw)
  if pw.fmt != "bitplanes":
    return dequantize(codes, pw.scale)
  K = pw.shape[0]
  return ((codes.astype(jnp.float32) - expand_groups(pw.zero, pw.block, K))
          * expand_groups(pw.scale, pw.block, K))


def ternarize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """BitNet b1.58 absmean quantiser of a float weight (any shape): (codes int8 in {-1, 0, 1},
  scale float32 []), scale = mean|w|, codes = clip(round(w / scale), -1, 1); all-zero w gives
  codes 0 and scale 0."""
  if getattr(w, "ndim", 0) < 1 or w.size < 1 or jnp.dtype(w.dtype) not in FLOAT_DTYPES:
    raise ValueError(f"w must be a non-empty float32 / bfloat16 / float16 array, got "
                     f"{_dtype(w)} {_shape(w)}")
  return _ternarize(w)


@jax.jit
def _ternarize(w):
  w = w.astype(jnp.float32)
  scale = jnp.mean(jnp.abs(w))
  t = jnp.clip(jnp.round(w / jnp.where(scale > 0, scale, 1.0)), -1, 1)
  return t.astype(jnp.int8), scale


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """BitNet absmax per token of float x [..., K]: (x_int8 [..., K] in [-127, 127], x_scale
  float32 [...]) with x ~ x_int8 * x_scale, x_scale = max|x| / 127 over the last axis."""
  if getattr(x, "ndim", 0) < 1 or x.size < 1 or jnp.dtype(x.dtype) not in FLOAT_DTYPES:
    raise ValueError(f"x must be a non-empty float32 / bfloat16 / float16 array, got "
                     f"{_dtype(x)} {_shape(x)}")
  return _quantize_activations(x)


@jax.jit
def _quantize_activations(x):
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  inv = 127.0 / jnp.where(amax > 0, amax, 1.0)
  q = jnp.clip(jnp.round(x * inv[..., None]), -127, 127)
  return q.astype(jnp.int8), amax / 127.0
