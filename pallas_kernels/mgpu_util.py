"""Small pieces the Pallas Mosaic GPU kernels share, written once for the JAX versions the project
runs on (0.10 on the CPU, 0.11 on the GPU)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def tiles(dtype, width_bytes: int = 128):
  """Shared-memory transforms of a TMA / wgmma tile: 8-row tiles `width_bytes` wide, swizzled
  by as many bytes (128 for whole-row tiles; narrower for slabs written one at a time)."""
  return (plgpu.TilingTransform((8, width_bytes // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(width_bytes))


def transposed(ref):
  """ref transposed (1, 0): `Ref.transpose` on JAX >= 0.11, plgpu.transpose_ref before."""
  if hasattr(ref, "transpose"):
    try:
      return ref.transpose((1, 0))
    except (TypeError, AttributeError, NotImplementedError):
      pass
  return plgpu.transpose_ref(ref, (1, 0))


def interpret_params(interpret: bool):
  """The Mosaic GPU interpreter's settings for a kernel run with interpret=True (None otherwise):
  reads past a buffer are zero-filled, as the TMA unit does on the GPU."""
  if not interpret:
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


def compiler_params(profile: tuple[str, int] | None = None, auto_barriers: bool = True):
  """CompilerParams with approximate math; profile (dir, space) turns on the profiler;
  auto_barriers=False: Pallas inserts no warpgroup barrier around shared-memory stores and copy
  issues (`unsafe_no_auto_barriers`), so the kernel must place the ones it needs itself."""
  return plgpu.CompilerParams(
      approx_math=True, unsafe_no_auto_barriers=not auto_barriers,
      **({} if profile is None else dict(profile_dir=profile[0], profile_space=profile[1])))


def load(ref, layout):
  """The whole ref into registers in `layout`: JAX 0.11 takes the index as part of the ref
  (a separate one is deprecated there), 0.10 needs it as an argument."""
  try:
    return plgpu.load(ref, layout=layout)
  except TypeError:
    return plgpu.load(ref, (), layout=layout)


def store_partial(acc, m_i, l_i, o_ref, m_ref, l_ref, index) -> None:
  """A split-K decode program's online-softmax partial, through shared memory: the first RO rows
  (o_ref's row count, a whole number of 8-row tiles) of acc f32 [R, H], m (base 2, stored in
  natural-log units as every kernel's partials) and l [R], to o_ref / m_ref / l_ref.at[index]."""
  R, H = acc.shape
  RO = o_ref.shape[-2]

  def store(o_smem, m_smem, l_smem):
    o_smem[...] = acc
    m_smem[...] = m_i * math.log(2.0)
    l_smem[...] = l_i
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, RO)], o_ref.at[index])
    plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, RO)], m_ref.at[index])
    plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, RO)], l_ref.at[index])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((R, H), jnp.float32, transforms=tiles(jnp.float32)),
                plgpu.SMEM((R,), jnp.float32), plgpu.SMEM((R,), jnp.float32))


def _map_words(x, layout, dtype, fn, in_bits: int = 16):
  """x (an array in registers, `layout`, two elements a register: 16-bit elements, or with
  in_bits=32 32-bit ones) -> the array of `dtype` (16 bits) whose every register is fn(that
  register: as one i32 MLIR value for 16-bit elements, as the vector<2 x i32> itself for 32-bit
  ones), bitcast to two `dtype` values: whole-register instructions through
  `plgpu.inline_mgpu`."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jax._src.lib.mlir import ir
  import numpy as np

  dtype = jnp.dtype(dtype)

  @plgpu.inline_mgpu(arg_types=(layout,),
                     return_type=plgpu.ShapeDtypeStruct(x.shape, dtype, layout=layout))
  def body(ctx, a):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    out_t = ir.VectorType.get([2], mgpu_utils.dtype_to_ir_type(dtype))
    regs = np.empty_like(a.registers)
    for idx, reg in np.ndenumerate(a.registers):
      r = ir.VectorType(reg.type)
      if r.shape != [2] or mgpu_utils.bitwidth(r.element_type) != in_bits:
        raise NotImplementedError(f"registers of 2 x {in_bits} bits expected, got {reg.type}")
      regs[idx] = mgpu_utils.bitcast(fn(mgpu_utils.bitcast(reg, i32) if in_bits == 16 else reg),
                                     out_t)
    signed = a.is_signed if jnp.issubdtype(dtype, jnp.integer) else None
    return mgpu.FragmentedArray(_registers=regs, _layout=a.layout, _is_signed=signed)

  return body(x)


def shift_right_words(x, shift: int, layout):
  """x (a 16-bit unsigned array in registers, `layout`) shifted right by `shift` bits as whole
  32-bit registers, each holding two neighbouring elements: one instruction a register, where
  LLVM splits a shift of a 2 x 16-bit vector into two 16-bit shifts and a repack. The low element
  receives the high one's low bits in its top `shift` bits, so this is a per-element shift only
  under a mask of the bits below 16 - shift (the caller's job)."""
  from jax._src.lib.mlir.dialects import arith
  return _map_words(x, layout, x.dtype, lambda w: arith.shrui(w, _i32(shift)))


def _i32(v: int):
  """An i32 MLIR constant from a 32-bit pattern (values >= 2^31 as their two's complement)."""
  from jax._src.lib.mlir import ir
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  v &= 0xFFFFFFFF
  return mgpu_utils.c(v - (1 << 32) if v >= 1 << 31 else v, ir.IntegerType.get_signless(32))


def fma_from_words(x, *, shift: int, mask: int, magic: int, mul: float, add: float, dtype,
                   layout):
  """x (a 16-bit unsigned array in registers, `layout`, two elements a 32-bit register) ->
  bitcast((x >> shift & mask) | magic, dtype) * mul + add in `dtype` (bfloat16 / float16), the
  same layout, computed a whole register at a time: a 32-bit shift (skipped for 0), one and/or
  (ptxas merges them into one LOP3) and one packed fma (`fma.rn.bf16x2` / `fma.rn.f16x2`, inline
  PTX, so it is neither split nor left as a multiply and an add). mask and magic are 16-bit
  patterns applied to both halves; as in `shift_right_words`, the caller's mask must keep only
  bits below 16 - shift."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  import numpy as np

  dtype = jnp.dtype(dtype)
  ptx = {jnp.dtype(jnp.bfloat16): "bf16x2", jnp.dtype(jnp.float16): "f16x2"}.get(dtype)
  if ptx is None:
    raise NotImplementedError(f"fma_from_words makes bfloat16 / float16, not {dtype}")
  if not (0 <= shift < 16 and 0 <= mask < 1 << 16 and 0 <= magic < 1 << 16):
    raise ValueError(f"shift {shift}, mask {mask:#x}, magic {magic:#x}: 16-bit fields expected")
  pair = lambda v: int(np.asarray([v, v], dtype).view(np.uint32)[0])

  def fn(word):
    if shift:
      word = arith.shrui(word, _i32(shift))
    word = arith.ori(arith.andi(word, _i32(mask * 0x10001)), _i32(magic * 0x10001))
    return llvm.inline_asm(ir.IntegerType.get_signless(32),
                           [word, _i32(pair(mul)), _i32(pair(add))],
                           f"fma.rn.{ptx} $0, $1, $2, $3;", "=r,r,r,r")
  return _map_words(x, layout, dtype, fn)


def _s8_from_words(x, shift, layout, fold):
  """x (uint16 [R, C] in registers, `layout` = the 16-bit WGMMA layout, two neighbouring words a
  32-bit register) and a scalar int32 shift -> int8 [R, 2 C] in the 8-bit WGMMA layout (the s8
  wgmma's register operand): per 32-bit register v, the bytes fold(v >> shift) (`fold` builds
  the mask / shift instructions on an i32 value). Both layouts give a thread the same rows and
  column groups, a 16-bit register holding columns (2 c, 2 c + 1) of an 8-column group and an
  8-bit one columns 4 c .. 4 c + 3 of a 16-column group: no value moves between threads."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  import numpy as np

  R, C = x.shape

  @plgpu.inline_mgpu(arg_types=(layout, plgpu.Layout.WG_SPLAT(())),
                     return_type=plgpu.ShapeDtypeStruct((R, 2 * C), jnp.int8,
                                                        layout=plgpu.Layout.WGMMA_8BIT))
  def body(ctx, a, s):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    sh = s.registers.item()      # a splat scalar's one register: the integer value itself
    try:
      width = ir.IntegerType(sh.type).width
    except (ValueError, TypeError) as e:
      raise NotImplementedError(f"a scalar integer shift expected, got {sh.type}") from e
    if width != 32:
      sh = arith.extui(i32, sh) if width < 32 else arith.trunci(i32, sh)
    out_t = ir.VectorType.get([4], ir.IntegerType.get_signless(8))
    out_layout = plgpu.Layout.WGMMA_8BIT.to_mgpu()
    if out_layout.registers_shape((R, 2 * C)) != a.registers.shape:
      raise NotImplementedError(f"register shapes differ: {a.registers.shape} -> "
                                f"{out_layout.registers_shape((R, 2 * C))}")
    regs = np.empty_like(a.registers)
    for idx, reg in np.ndenumerate(a.registers):
      r = ir.VectorType(reg.type)
      if r.shape != [2] or mgpu_utils.bitwidth(r.element_type) != 16:
        raise NotImplementedError(f"registers of 2 x 16 bits expected, got {reg.type}")
      v = arith.shrui(mgpu_utils.bitcast(reg, i32), sh)
      regs[idx] = mgpu_utils.bitcast(fold(v), out_t)
    return mgpu.FragmentedArray(_registers=regs, _layout=out_layout, _is_signed=True)

  return body(x, jnp.asarray(shift, jnp.int32))


def s8_pairs_from_words(x, shift, layout):
  """`_s8_from_words` with shift a multiple of 4 (< 16): per register, the two 2-bit fields at
  bits [shift, shift + 4) of each word, q0 (low) and q1, as the bytes (word 0's q0, word 0's q1,
  word 1's q0, word 1's q1), so output column 16 g + 4 c + 2 e + s is field s of input column
  8 g + 2 c + e. Three instructions a register past the shift: (v & 0x00030003) |
  ((v & 0x000C000C) << 6)."""
  from jax._src.lib.mlir.dialects import arith

  return _s8_from_words(x, shift, layout, lambda v: arith.ori(
      arith.andi(v, _i32(0x00030003)), arith.shli(arith.andi(v, _i32(0x000C000C)), _i32(6))))


def s8_planes_from_words(x, shift, layout):
  """`_s8_from_words` with shift = 2 p (p < 4): the two fields a word gives are slots p and
  p + 4 (bits [shift, shift + 2) and [shift + 8, shift + 10)); one mask a register past the
  shift, (v >> shift) & 0x03030303, gives the bytes (word 0's slot p, word 0's slot p + 4, word
  1's slot p, word 1's slot p + 4), so output column 16 g + 4 c + 2 e + s is slot p + 4 s of
  input column 8 g + 2 c + e."""
  from jax._src.lib.mlir.dialects import arith

  return _s8_from_words(x, shift, layout, lambda v: arith.andi(v, _i32(0x03030303)))


# the factor each plane's bytes carry in `s8_planes_scaled_from_words`
PLANE_SCALES = (1, 4, 16, 1)


def s8_planes_scaled_from_words(x, p: int, layout):
  """`s8_planes_from_words`' operand of plane p (slots p and p + 4, the same bytes in the same
  order) times PLANE_SCALES[p], with one instruction a register for p < 3: the mask in place,
  v & (0x03030303 << 2 p), leaves each code at bit 2 p of its byte (4^p times the code; at
  most 2 * 16 = 32, a positive int8); plane 3 (a code of 2 there would read 128, past int8)
  keeps the shift, (v >> 6) & 0x03030303. A GEMV adds each plane's wgmma into the accumulator
  of its factor and divides them out at the end (exact: every sum is a multiple of it)."""
  from jax._src.lib.mlir.dialects import arith

  if p not in range(4):
    raise ValueError(f"plane {p}: 0 .. 3")
  mask = 0x03030303 if p == 3 else 0x03030303 << (2 * p)
  return _s8_from_words(x, 6 if p == 3 else 0, layout,
                        lambda v: arith.andi(v, _i32(mask)))


def concat_columns(a, b, layout):
  """a, b ([R, C] in registers, `layout` = the WGMMA layout, C a multiple of 8) -> [R, 2 C], a's
  columns then b's, in the same layout. The layout's registers come in tiles of 8 columns (the
  second axis of its register array), so this is a re-indexing of registers: no value moves
  between threads and no instruction is emitted."""
  from jax.experimental.mosaic import gpu as mgpu
  import numpy as np

  if a.shape != b.shape or a.dtype != b.dtype:
    raise ValueError(f"concat_columns: operands differ: {a.dtype}{a.shape} and {b.dtype}{b.shape}")
  R, C = a.shape

  @plgpu.inline_mgpu(arg_types=(layout, layout),
                     return_type=plgpu.ShapeDtypeStruct((R, 2 * C), a.dtype, layout=layout))
  def body(ctx, x, y):
    del ctx
    regs = np.concatenate([x.registers, y.registers], axis=1)
    want = layout.to_mgpu().registers_shape((R, 2 * C))
    if regs.shape != want:
      raise NotImplementedError(f"concat_columns: registers {regs.shape}, the layout wants {want}")
    return mgpu.FragmentedArray(_registers=regs, _layout=x.layout, _is_signed=x.is_signed)

  return body(a, b)


def magic_pair_recipe(sub: int, bits: int, magic: int) -> tuple[int, int, int, int]:
  """How `magic_from_words` builds one 32-bit register from a register pair (w0, w1) of packed
  words: (prmt selector, shift, and-mask, or-pattern). The selector takes the 16-bit halves of
  w0 and w1 holding sub-word `sub` (the low halves for the first 16 / bits sub-words, the high
  ones after) as the low and high half of one register; one shift brings the sub-word's field to
  bit 0 of both halves, and one and / or (a LOP3) leaves magic | code in each: two float16 /
  bfloat16 values base + code."""
  per_half = 16 // bits
  if not 0 <= sub < 2 * per_half:
    raise ValueError(f"sub-word {sub} of {bits}-bit codes: 0 .. {2 * per_half - 1}")
  selector = 0x5410 if sub < per_half else 0x7632
  return selector, bits * (sub % per_half), ((1 << bits) - 1) * 0x10001, magic * 0x10001


def magic_from_words(x, sub: int, bits: int, magic: int, dtype, layout):
  """x (int32 [R, C] packed words in registers, `layout`, two neighbouring columns a register
  pair) -> dtype [R, C] (16-bit), element (r, c) = the bit pattern magic | code where code is
  sub-word `sub` (bits [bits * sub, bits * (sub + 1))) of x[r, c]: per output register one
  byte permute of the pair, one shift and one and / or (`magic_pair_recipe`), where the generic
  form shifts and masks both words and packs them (five or more). With magic the pattern of a
  float whose mantissa unit is 1.0 (`lowbit_decode.pallas_mosaic_gpu._MAGIC`), subtracting its
  value leaves the codes."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, vector

  selector, shift, mask, pattern = magic_pair_recipe(sub, bits, magic)

  def fn(reg):
    w0, w1 = (vector.extract(reg, [], [e]) for e in (0, 1))
    v = llvm.inline_asm(ir.IntegerType.get_signless(32), [w0, w1],
                        f"prmt.b32 $0, $1, $2, {selector:#06x};", "=r,r,r")
    if shift:
      v = arith.shrui(v, _i32(shift))
    return arith.ori(arith.andi(v, _i32(mask)), _i32(pattern))
  return _map_words(x, layout, dtype, fn, in_bits=32)
