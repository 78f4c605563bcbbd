"""Ternary I2_S matmuls as a Pallas Triton kernel: `lowbit_matmul` (W2A16) and
`lowbit_matmul_int8` (W2A8) for the GPU, y = x @ W with W the packed bytes [rows / 4, N].

Layout. In an i2_s byte tile of one packing block ([block / 4, bn] bytes), one shift and mask
gives the codes of a contiguous K slice of block / 4 rows (slot i, layout.py). A K step multiplies
each slot's codes by the matching contiguous [bm, block / 4] slice of x: four dots per block, no
reshape, concatenation or permutation of the tile, and x is read as it is.

Unpacking is the cost to cut, not bytes: an int -> float conversion per weight runs at a quarter
of the ALU rate. The codes q = t + 1 in {0, 1, 2} are placed instead in the mantissa of a float
by bit operations (the magic-number trick): with the bytes widened once to 16 bits, (q << p) | ONE
is the bit pattern of w' = 1 + q 2^(p - m) (ONE = 1.0's bits, m the mantissa bits: bf16 7, f16
10), then bitcast. The dot of x with w' accumulates in float32, and since t = (w' - 1) 2^(m - p)
- 1,

    x @ t = 2^(m - p) (x @ w' - c rowsum(x)),   c = 1 + 2^(p - m),

so nothing happens per weight but a shift and one bitwise and-or. p (the code's bit position) sets
the accumulator's offset: the float32 sum carries c rowsum(x) besides the 2^(p - m) x @ t it
keeps, so the higher p, the less of float32's precision the offset costs (p = 0, w' = 128 + q,
would carry 129 rowsum(x)); p = 4 (bf16) / 6 (f16) put the codes of one slot in place without a
shift. The integer path takes q as int8 codes directly (exact: x_int8 @ t = x_int8 @ q -
rowsum(x_int8), int32). float32 x takes t itself (a conversion; nothing here is tuned for it).
rowsum(x) comes from the MMA (each x slice times a [block / 4, 16] matrix whose first column is
ones: the tensor cores have room at GEMV sizes) or from XLA (GEMM: the MMA is the bottleneck
there).

Grid (N tiles, M tiles, K splits), N fastest (consecutive programs share the x rows; the packed
weight, 8x smaller per element than bf16 x, stays in L2). GEMV (M <= max_gemv_rows): one 16-row
tile (the smallest tensor-core dot; the rows past M are masked to zero) and split-K so that the
grid fills the card; GEMM: [block_m, block_n] tiles. With one split the program finishes y (the
offset correction, the scales, the cast); with several each writes its corrected float32 / int32
partial and one XLA fusion sums them and scales (int32 partials keep the integer path exact).

`unpack="asm"` replaces the shifts and masks of the unpacking by inline PTX on packed 32-bit
registers (prmt to spread two bytes into 16-bit halves, then one shift and one lop3 per two
weights); interpret mode (and float32 x) runs the jnp form, which computes the same bits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch, tuned
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.lowbit_matmul import layout

UNPACKS = ("jnp", "asm")
ROWSUMS = ("kernel", "xla")
SLOTS = 4                     # 2-bit codes a byte
SLOT_SHIFT = (6, 4, 2, 0)     # slot i at bits [6 - 2i, 8 - 2i) (layout.py: slot 0 on top)
SQ = pl.squeezed


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch parameters of the Triton low-bit matmul; None takes the tuned value of the regime
  (GEMV: M <= max_gemv_rows, or GEMM; pallas_kernels/tuned).

  block_m: GEMM rows a tile (a power of 2 >= 16, capped at M's; GEMV tiles are 16 rows).
  block_n: columns a tile (a power of 2 >= 16).
  blocks_per_step: packing blocks a K step (each 4 dots).
  num_splits: K splits (None: towards the tuned programs per SM).
  num_warps / num_stages: Triton launch parameters (ignored in interpret mode).
  transpose: compute y^T = W^T x^T (the unpacked weights as the dot's left operand, which a
    Hopper wgmma can take from registers).
  unpack: "jnp" (shifts and masks the compiler lowers) or "asm" (inline PTX on packed registers).
  rowsum: "kernel" (from the MMA) or "xla" (a reduction outside; not used by float32 x).
  """
  block_m: int | None = None
  block_n: int | None = None
  blocks_per_step: int | None = None
  num_splits: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  transpose: bool | None = None
  unpack: str | None = None
  rowsum: str | None = None

  def validate(self) -> None:
    for name in ("block_m", "block_n"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or not launch.is_power_of_2(v) or v < 16):
        raise ValueError(f"config.{name} must be a power of 2 >= 16 or None, got {v!r}")
    for name in ("blocks_per_step", "num_splits", "num_stages"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"config.{name} must be a positive int or None, got {v!r}")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"config.num_warps must be a power of 2 in [1, 16], got {self.num_warps!r}")
    if self.transpose is not None and not isinstance(self.transpose, bool):
      raise ValueError(f"config.transpose must be a bool or None, got {self.transpose!r}")
    if self.unpack is not None and self.unpack not in UNPACKS:
      raise ValueError(f"config.unpack must be one of {UNPACKS} or None, got {self.unpack!r}")
    if self.rowsum is not None and self.rowsum not in ROWSUMS:
      raise ValueError(f"config.rowsum must be one of {ROWSUMS} or None, got {self.rowsum!r}")


CONFIG = TritonConfig


# ------------------------------------------------------------------------------ code arithmetic


@dataclasses.dataclass(frozen=True)
class _Codes:
  """How the codes of x's dtype reach the dot. kind: "int8" (q as int8), "magic" (w' = 1 + q
  2^(p - m) as bits), "float" (t itself). one: the bits of 1.0; pos: p; c / mult: x @ t = mult (x
  @ w' - c rowsum(x)) (c 0, mult 1 for the direct kinds, c 1 for int8)."""
  kind: str
  dtype: jnp.dtype
  one: int = 0
  pos: int = 0
  c: float = 0.0
  mult: float = 1.0


def _codes_for(dtype) -> _Codes:
  dt = jnp.dtype(dtype)
  if dt == jnp.int8:
    return _Codes("int8", dt, c=1)
  if dt == jnp.bfloat16:
    return _Codes("magic", dt, one=0x3F80, pos=4, c=1 + 2.0 ** (4 - 7), mult=2.0 ** (7 - 4))
  if dt == jnp.float16:
    return _Codes("magic", dt, one=0x3C00, pos=6, c=1 + 2.0 ** (6 - 10), mult=2.0 ** (10 - 6))
  return _Codes("float", dt)


def _shift_into(v, shift: int, pos: int):
  """v shifted so that its bits [shift, shift + 2) land at [pos, pos + 2)."""
  if shift > pos:
    return lax.shift_right_logical(v, jnp.asarray(shift - pos, v.dtype))
  if shift < pos:
    return lax.shift_left(v, jnp.asarray(pos - shift, v.dtype))
  return v


def _unpack_jnp(b_WN: jax.Array, codes: _Codes) -> list[jax.Array]:
  """uint8 bytes [W, bn] -> the four slots' codes [W, bn] in the dot dtype (module docstring)."""
  if codes.kind == "int8":
    return [(_shift_into(b_WN, s, 0) & jnp.uint8(3)).astype(jnp.int8) for s in SLOT_SHIFT]
  if codes.kind == "float":
    return [((_shift_into(b_WN, s, 0) & jnp.uint8(3)).astype(jnp.int32) - 1).astype(codes.dtype)
            for s in SLOT_SHIFT]
  b16 = b_WN.astype(jnp.int16)        # widened once; every slot is then a shift and an and-or
  mask, one = jnp.int16(3 << codes.pos), jnp.int16(codes.one)
  return [lax.bitcast_convert_type((_shift_into(b16, s, codes.pos) & mask) | one, codes.dtype)
          for s in SLOT_SHIFT]


def _shift_ptx(shift: int, pos: int) -> tuple[str, str]:
  """(PTX moving bits [shift, shift + 2) of $1 to [pos, pos + 2) into t, the register holding
  them): `_shift_into` on a 32-bit register."""
  if shift > pos:
    return f"shr.b32 t, $1, {shift - pos};\n", "t"
  if shift < pos:
    return f"shl.b32 t, $1, {pos - shift};\n", "t"
  return "", "$1"


# The PTX of the "asm" unpacking (a 32-bit scratch register t is declared around each):
# (asm, input dtype, output dtype, pack, output registers). An instance's inputs are its `pack`
# elements in one 32-bit register, element 0 in the low bits; its outputs likewise.
WIDEN_PTX = ("prmt.b32 $0, $2, 0, 0x4140;\nprmt.b32 $1, $2, 0, 0x4342;", jnp.uint8, jnp.int16, 4, 2)


def slot_ptx(codes: _Codes, shift: int) -> tuple:
  """The PTX giving one slot's codes (bits [shift, shift + 2) of each byte): int8 from the bytes
  (pack 4), or the 16-bit float bits from the widened bytes (pack 2, after WIDEN_PTX)."""
  if codes.kind == "int8":
    code, v = _shift_ptx(shift, 0)
    return code + f"and.b32 $0, {v}, 0x03030303;", jnp.uint8, jnp.int8, 4, 1
  code, v = _shift_ptx(shift, codes.pos)
  mask, one = (3 << codes.pos) * 0x10001, codes.one * 0x10001
  # lop3 0xea: (a & b) | c
  return (code + f"lop3.b32 $0, {v}, {mask:#010x}, {one:#010x}, 0xea;", jnp.int16, codes.dtype,
          2, 1)


def _asm(x, ptx: tuple):
  """One single-result inline-PTX call (Pallas lowers single-result calls only)."""
  asm, _, dtype, pack, n_out = ptx
  (out,) = plgpu.elementwise_inline_asm(
      "{\n.reg .b32 t;\n" + asm + "\n}", args=[x], constraints="=r," * n_out + "r", pack=pack,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, dtype)])
  return out


def _unpack_asm(b_WN: jax.Array, codes: _Codes) -> list[jax.Array]:
  """`_unpack_jnp` as inline PTX on packed 32-bit registers. int8: one shift and one and of a
  word give four codes. 16-bit floats: prmt spreads bytes (0, 1) and (2, 3) of a word into the
  16-bit halves of two registers (the widening, once), then one shift and one lop3 ((v & mask)
  | one) give two floats."""
  if codes.kind == "int8":
    return [_asm(b_WN, slot_ptx(codes, s)) for s in SLOT_SHIFT]
  b16 = _asm(b_WN, WIDEN_PTX)
  return [_asm(b16, slot_ptx(codes, s)) for s in SLOT_SHIFT]


# ------------------------------------------------------------------------------------- kernel


def _kernel(*refs, codes: _Codes, block: int, nb: int, nblocks: int, steps: int, per_split: int,
            M: int, N: int, transpose: bool, asm: bool, rowsum: str, fused: bool, precision):
  """Program (n, m, s). Refs: x [bm, rows] (the M tile, whole K), w uint8 [rows / 4, bn]; fused
  (one split) also rs [bm] (rowsum "xla"), xs f32 [bm] (int8 x), scale f32 []; out: y [bm, bn]
  (fused) or the split's partial [bm, bn] (float32 / int32); rows past M are not stored."""
  refs = list(refs)
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  rs_ref = refs.pop(0) if fused and rowsum == "xla" else None
  xs_ref = refs.pop(0) if fused and codes.kind == "int8" else None
  sc_ref = refs.pop(0) if fused else None
  (o_ref,) = refs
  bm, bn = x_ref.shape[0], w_ref.shape[1]
  W = block // SLOTS
  n_id, m_id, s_id = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  acc_dt = jnp.int32 if codes.kind == "int8" else jnp.float32
  rows_ok_M = (m_id * bm + lax.broadcasted_iota(jnp.int32, (bm,), 0) < M) if M % bm else None
  rows_ok = None if rows_ok_M is None else rows_ok_M[:, None]
  cols_ok = (n_id * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1) < N) if N % bn else None
  ragged_k = nblocks % nb != 0
  in_kernel_rowsum = rowsum == "kernel"
  # e_W16 [W, 16]: a first column of ones, so x @ e_W16 is rowsum(x) in column 0, zeros beside it
  e_W16 = (lax.broadcasted_iota(jnp.int32, (W, 16), 1) == 0).astype(codes.dtype)

  def dot(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=acc_dt,
                           precision=precision)

  def mm(x_MW, c_WN):          # x @ c, as [bm, bn] or (transpose) [bn, bm]
    return dot(c_WN, x_MW, ((0,), (1,))) if transpose else dot(x_MW, c_WN, ((1,), (0,)))

  def mm_rowsum(x_MW):         # [bm, 16] or [16, bm], rowsum(x) in column / row 0
    return dot(e_W16, x_MW, ((0,), (1,))) if transpose else dot(x_MW, e_W16, ((1,), (0,)))

  def load_x(col, live):
    src = x_ref.at[:, pl.ds(pl.multiple_of(col, W), W)]
    mask = rows_ok
    if live is not None:
      mask = jnp.broadcast_to(live, (bm, 1)) if mask is None else mask & live
    if mask is None:
      return src[...]
    return plgpu.load(src, mask=jnp.broadcast_to(mask, (bm, W)), other=0)

  def load_w(blk):
    src = w_ref.at[pl.ds(pl.multiple_of(blk * W, W), W), :]
    if cols_ok is None:
      return src[...]
    return plgpu.load(src, mask=jnp.broadcast_to(cols_ok, (W, bn)), other=0)

  def step(j, carry):
    acc, racc = carry if in_kernel_rowsum else (carry, None)
    for b in range(nb):
      blk = (s_id * per_split + j) * nb + b
      live = None
      if ragged_k:   # a block past the last: read the last one's bytes, and x as zeros
        live = blk < nblocks
        c_slots = (_unpack_asm if asm else _unpack_jnp)(load_w(jnp.minimum(blk, nblocks - 1)),
                                                       codes)
      else:
        c_slots = (_unpack_asm if asm else _unpack_jnp)(load_w(blk), codes)
      for i in range(SLOTS):
        x_MW = load_x(blk * block + i * W, live)
        acc = acc + mm(x_MW, c_slots[i])
        if in_kernel_rowsum:
          racc = racc + mm_rowsum(x_MW)
    return (acc, racc) if in_kernel_rowsum else acc

  carry = jnp.zeros((bn, bm) if transpose else (bm, bn), acc_dt)
  if in_kernel_rowsum:
    carry = (carry, jnp.zeros((16, bm) if transpose else (bm, 16), acc_dt))
  if steps % per_split:
    count = jnp.minimum(per_split, steps - s_id * per_split)
  else:
    count = per_split
  carry = lax.fori_loop(0, count, step, carry)
  acc, racc = carry if in_kernel_rowsum else (carry, None)
  if transpose:
    acc = acc.T
  if in_kernel_rowsum:
    rs = jnp.sum(racc, axis=0 if transpose else 1)
    acc = acc - rs[:, None] * jnp.asarray(codes.c, acc_dt)
  if fused:
    if rs_ref is not None:
      rs = _load_vec(rs_ref, rows_ok_M)
      acc = acc - rs[:, None] * jnp.asarray(codes.c, acc_dt)
    y = acc.astype(jnp.float32) * (sc_ref[()] * codes.mult)
    if xs_ref is not None:
      y = y * _load_vec(xs_ref, rows_ok_M)[:, None]
    acc = y.astype(o_ref.dtype)
  mask = rows_ok        # y, or a partial: only the live rows (M = 1 writes 1 row, not 16)
  if cols_ok is not None:
    mask = cols_ok if mask is None else mask & cols_ok
  if mask is None:
    o_ref[...] = acc
  else:
    plgpu.store(o_ref, acc, mask=jnp.broadcast_to(mask, acc.shape))


def _load_vec(ref, live_M):
  return ref[...] if live_M is None else plgpu.load(ref, mask=live_M, other=0)


# ------------------------------------------------------------------------------------ launch


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static launch shape of one call."""
  bm: int
  bn: int
  nb: int
  splits: int
  per_split: int
  steps: int
  nblocks: int
  num_warps: int
  num_stages: int
  transpose: bool
  asm: bool
  rowsum: str


def _plan(op: str, M: int, N: int, rows: int, block: int, codes: _Codes,
          config: TritonConfig, interpret: bool) -> _Plan:
  t = tuned.lookup(op, "pallas_triton")
  gemv = M <= t["max_gemv_rows"]
  g = "gemv_" if gemv else "gemm_"
  pick = lambda name: t[g + name] if getattr(config, name) is None else getattr(config, name)
  bm = launch.MIN_DOT_ROWS if gemv else max(launch.MIN_DOT_ROWS,
                                              min(pick("block_m"), launch.next_power_of_2(M)))
  bn = min(pick("block_n"), max(16, launch.next_power_of_2(N)))
  nblocks = rows // block
  nb = max(1, min(pick("blocks_per_step"), nblocks))
  # Triton keeps num_stages copies of a step's tiles in shared memory: fewer stages, not a
  # compile failure, when a step is large (GEMM x slices [bm, block])
  budget = tuned.lookup("device", "gpu")["shared_memory_budget"]
  stage_bytes = nb * (bm * block * codes.dtype.itemsize + block // SLOTS * bn)
  num_stages = max(1, min(pick("num_stages"), budget // stage_bytes))
  steps = -(-nblocks // nb)
  tiles = -(-N // bn) * -(-M // bm)
  if config.num_splits is None:
    target = launch.target_programs(t[g + "programs_per_sm"])
    splits = launch.default_num_splits(tiles, steps, target)
  else:
    splits = min(config.num_splits, steps)
  per_split = -(-steps // splits)
  splits = -(-steps // per_split)              # no empty split
  rowsum = pick("rowsum") if codes.c else "none"      # float32 x: t itself, no offset
  # the plan records whether the PTX form runs (not interpreted, not float32 x, and a JAX whose
  # Pallas Triton still has inline asm)
  asm = (pick("unpack") == "asm" and not interpret and codes.kind != "float"
         and hasattr(plgpu, "elementwise_inline_asm"))
  return _Plan(bm=bm, bn=bn, nb=nb, splits=splits, per_split=per_split, steps=steps,
               nblocks=nblocks, num_warps=pick("num_warps"), num_stages=num_stages,
               transpose=bool(pick("transpose")), asm=asm, rowsum=rowsum)


def _rowsum(x_MK: jax.Array) -> jax.Array:
  if x_MK.dtype == jnp.int8:
    return jnp.sum(x_MK, axis=1, dtype=jnp.int32)
  return jnp.sum(x_MK.astype(jnp.float32), axis=1)


@functools.partial(jax.jit, static_argnames=("block", "N", "plan", "out_dtype", "interpret"))
def _matmul(x_MK, w_packed, scale, x_scale_M, *, block: int, N: int, plan: _Plan, out_dtype,
            interpret: bool):
  """y [M, N] in out_dtype (x_scale_M None on the float path)."""
  M, K = x_MK.shape
  rows = w_packed.shape[0] * SLOTS
  if K != rows:                        # ragged K: zero columns meet the padding codes
    x_MK = jnp.pad(x_MK, ((0, 0), (0, rows - K)))
  codes = _codes_for(x_MK.dtype)
  p = plan
  fused = p.splits == 1
  m_tiles, n_tiles = -(-M // p.bm), -(-N // p.bn)
  grid = (n_tiles, m_tiles, p.splits)
  kernel = functools.partial(
      _kernel, codes=codes, block=block, nb=p.nb, nblocks=p.nblocks, steps=p.steps,
      per_split=p.per_split, M=M, N=N, transpose=p.transpose, asm=p.asm, rowsum=p.rowsum,
      fused=fused, precision=launch.dot_precision(x_MK.dtype))
  in_specs = [pl.BlockSpec((p.bm, rows), lambda n, m, s: (m, 0)),
              pl.BlockSpec((rows // SLOTS, p.bn), lambda n, m, s: (0, n))]
  args = [x_MK, w_packed]
  rs_M = _rowsum(x_MK) if p.rowsum == "xla" else None
  if fused:
    if rs_M is not None:
      in_specs.append(pl.BlockSpec((p.bm,), lambda n, m, s: (m,)))
      args.append(rs_M)
    if x_scale_M is not None:
      in_specs.append(pl.BlockSpec((p.bm,), lambda n, m, s: (m,)))
      args.append(x_scale_M.astype(jnp.float32))
    in_specs.append(pl.BlockSpec((SQ,), lambda n, m, s: (0,)))
    args.append(jnp.reshape(scale, (1,)).astype(jnp.float32))
    out_spec = pl.BlockSpec((p.bm, p.bn), lambda n, m, s: (m, n))
    out_shape = jax.ShapeDtypeStruct((M, N), out_dtype)
  else:
    acc_dt = jnp.int32 if codes.kind == "int8" else jnp.float32
    out_spec = pl.BlockSpec((SQ, p.bm, p.bn), lambda n, m, s: (s, m, n))
    out_shape = jax.ShapeDtypeStruct((p.splits, M, N), acc_dt)
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages),
      interpret=interpret,
      name="lowbit_matmul_int8" if codes.kind == "int8" else "lowbit_matmul",
  )(*args)
  if fused:
    return out
  # the split partials: one XLA fusion sums them (int32: exactly) and applies the scales
  acc_MN = jnp.sum(out, axis=0)
  if rs_M is not None:
    acc_MN = acc_MN - rs_M[:, None] * jnp.asarray(codes.c, acc_MN.dtype)
  y = acc_MN.astype(jnp.float32) * (scale.astype(jnp.float32) * codes.mult)
  if x_scale_M is not None:
    y = y * x_scale_M.astype(jnp.float32)[:, None]
  return y.astype(out_dtype)


def _prepare(op: str, x_MK, packed: layout.PackedWeight, config, interpret: bool) -> _Plan:
  """NotSupported for what this kernel does not take; the launch plan otherwise."""
  require_platform("gpu", interpret, f"the Pallas Triton {op} kernel")
  if packed.fmt != "i2_s":
    raise NotSupported(f"weight format {packed.fmt!r}: the Triton kernel reads i2_s only")
  W = packed.block // SLOTS
  min_w = 32 if x_MK.dtype == jnp.int8 else 16
  if not launch.is_power_of_2(W) or W < min_w:
    raise NotSupported(f"i2_s block={packed.block}: a slot's K slice (block / 4 = {W} rows) must "
                       f"be a power of 2 >= {min_w} for a {jnp.dtype(x_MK.dtype).name} Triton dot")
  config = config or TritonConfig()
  config.validate()
  return _plan(op, x_MK.shape[0], packed.shape[1], packed.rows, packed.block,
               _codes_for(x_MK.dtype), config, interpret)


def lowbit_matmul(x_MK, packed, out_dtype, *, interpret: bool = False,
                  config: TritonConfig | None = None):
  """Arguments as `pallas_kernels.lowbit_matmul.lowbit_matmul` (checked there)."""
  plan = _prepare("lowbit_matmul", x_MK, packed, config, interpret)
  return _matmul(x_MK, packed.packed, packed.scale, None, block=packed.block,
                 N=packed.shape[1], plan=plan, out_dtype=jnp.dtype(out_dtype),
                 interpret=bool(interpret))


def lowbit_matmul_int8(x_int8_MK, x_scale_M, packed, out_dtype, *, interpret: bool = False,
                       config: TritonConfig | None = None):
  """Arguments as `pallas_kernels.lowbit_matmul.lowbit_matmul_int8` (checked there)."""
  plan = _prepare("lowbit_matmul_int8", x_int8_MK, packed, config, interpret)
  return _matmul(x_int8_MK, packed.packed, packed.scale, x_scale_M, block=packed.block,
                 N=packed.shape[1], plan=plan, out_dtype=jnp.dtype(out_dtype),
                 interpret=bool(interpret))
