"""Ternary I2_S matmuls as a Pallas Mosaic TPU kernel: `lowbit_matmul` (W2A16) and
`lowbit_matmul_int8` (W2A8) for the TPU, y = x @ W with W the packed bytes [rows / 4, N].

Tiles keep N on the 128 lanes, as the packed weight does (layout.py: K packed, N minor), so a
[bk / 4, bn] byte tile is read as it lies. The bytes arrive as int8 (a free bitcast of the uint8
array: sign extension to int32 is the TPU's native widening, and the mask drops the extended
bits), are widened once to int32, and each packing block's [block / 4, bn] rows give its four
slots by one shift and mask each: slot i is the contiguous rows [i block / 4, (i + 1) block / 4)
of the block (layout.py's slot interleave), so concatenating the slots along the sublanes, block
by block, restores the natural K order with no lane shuffle, and one MXU dot per K step takes
the whole [bm, bk] x [bk, bn]. t = code - 1 is formed in int32 before the one conversion to the
dot's dtype.

Dots: W2A16 bf16 x takes bf16 codes (exact) with float32 accumulation; float32 and float16 x
take float32 codes at HIGHEST precision. W2A8 takes, by `int8_dot`, the int8 MXU path (int8 x
int8 -> int32) or bfloat16 operands (int8 values and codes are exact in bf16; the float32
accumulation is exact while |sum| < 2^24, i.e. K < 132,104: checked), which every TPU generation
has. The accumulator lives in VMEM scratch across the K steps (the "arbitrary" last grid axis);
the last step applies the per-tensor scale (SMEM) and, on the integer path, the activation
scales, in the reference's order, so the integer path equals the reference bit for bit.

Grid (N tiles, M tiles, K steps). M and N need no padding (a block equal to the whole dimension,
or partial edge blocks whose rows / columns past the array are never stored); x is zero-padded
along K to the packed rows, as every low-bit kernel does.

Tested here in TPU interpret mode (`interpret=pltpu.InterpretParams()`) and lowered to Mosaic on
any host (`jax.export(..., platforms=["tpu"])`); not yet run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tuned
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.lowbit_matmul import layout

SLOTS = 4
SLOT_SHIFT = (6, 4, 2, 0)       # slot i at bits [6 - 2i, 8 - 2i) (layout.py: slot 0 on top)
LANES = 128
SUBLANES = 8
EXACT_F32 = 1 << 24


@dataclasses.dataclass(frozen=True)
class TPUConfig:
  """Launch parameters of the TPU low-bit matmul; None takes the tuned value
  (pallas_kernels/tuned).

  block_m: rows a tile when M is larger (a multiple of 32; M <= block_m is one whole-M tile).
  block_n: columns a tile when N is larger (a multiple of 128).
  blocks_per_step: at most this many packing blocks a K step (the largest count dividing the
    blocks whose rows are a multiple of 128).
  int8_dot: W2A8 on the int8 MXU (True) or on exact bfloat16 operands (False).
  """
  block_m: int | None = None
  block_n: int | None = None
  blocks_per_step: int | None = None
  int8_dot: bool | None = None

  def validate(self) -> None:
    for name, unit in (("block_m", 32), ("block_n", LANES)):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < unit
                            or v % unit):
        raise ValueError(f"config.{name} must be a positive multiple of {unit} or None, got "
                         f"{v!r}")
    v = self.blocks_per_step
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise ValueError(f"config.blocks_per_step must be a positive int or None, got {v!r}")
    if self.int8_dot is not None and not isinstance(self.int8_dot, bool):
      raise ValueError(f"config.int8_dot must be a bool or None, got {self.int8_dot!r}")


CONFIG = TPUConfig


@dataclasses.dataclass(frozen=True)
class _Plan:
  bm: int
  bn: int
  nb: int
  int8_dot: bool


def _kernel(sc_ref, x_ref, w_ref, *refs, block: int, nb: int, code_dtype, acc_dtype, precision):
  """Program (n, m, k). sc_ref: f32 [1] (SMEM); x [bm, bk]; w int8 [bk / 4, bn]; xs f32 [bm, 1]
  (integer path); out y [bm, bn]; scratch acc [bm, bn] (float32 / int32)."""
  if len(refs) == 3:
    xs_ref, o_ref, acc_ref = refs
  else:
    (o_ref, acc_ref), xs_ref = refs, None
  k = pl.program_id(2)
  W = block // SLOTS

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  b = w_ref[...].astype(jnp.int32)
  codes = [((b[j * W:(j + 1) * W] >> s) & 3) - 1 for j in range(nb) for s in SLOT_SHIFT]
  c = (jnp.concatenate(codes, axis=0) if len(codes) > 1 else codes[0]).astype(code_dtype)
  x = x_ref[...]
  if x.dtype != code_dtype:
    x = x.astype(code_dtype)
  acc_ref[...] += jnp.dot(x, c, preferred_element_type=acc_dtype, precision=precision)

  @pl.when(k == pl.num_programs(2) - 1)
  def _finish():
    y = acc_ref[...].astype(jnp.float32) * sc_ref[0]
    if xs_ref is not None:
      y = y * xs_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


def _plan(op: str, M: int, N: int, packed: layout.PackedWeight, int8_x: bool,
          config: TPUConfig) -> _Plan:
  t = tuned.lookup(op, "pallas_mosaic_tpu")
  pick = lambda name: t[name] if getattr(config, name) is None else getattr(config, name)
  block = packed.block
  if block // SLOTS % SUBLANES:
    raise NotSupported(f"i2_s block={block}: a slot's rows (block / 4 = {block // SLOTS}) must be "
                       f"a multiple of {SUBLANES} sublanes for the TPU kernel")
  nblocks = packed.rows // block
  fits = [d for d in range(1, min(pick("blocks_per_step"), nblocks) + 1)
          if nblocks % d == 0 and d * block % LANES == 0]
  if fits:
    nb = fits[-1]
  elif packed.rows <= pick("blocks_per_step") * block:
    nb = nblocks                       # one step: the blocks span the whole (short) K
  else:
    raise NotSupported(f"i2_s block={block} with {nblocks} blocks: no K step of whole blocks is a "
                       f"multiple of {LANES} rows")
  bm = M if M <= pick("block_m") else pick("block_m")
  bn = N if N <= pick("block_n") else pick("block_n")
  int8_dot = bool(pick("int8_dot")) and int8_x
  if int8_x and not int8_dot and 127 * packed.rows >= EXACT_F32:
    raise NotSupported(f"W2A8 on bfloat16 operands is exact for K < {EXACT_F32 // 127}, got "
                       f"{packed.rows} rows (use TPUConfig(int8_dot=True))")
  return _Plan(bm=bm, bn=bn, nb=nb, int8_dot=int8_dot)


@functools.partial(jax.jit, static_argnames=("block", "N", "plan", "out_dtype", "interpret"))
def _matmul(x_MK, packed_bytes, scale, x_scale_M, *, block: int, N: int, plan: _Plan, out_dtype,
            interpret: bool):
  M, K = x_MK.shape
  rows = packed_bytes.shape[0] * SLOTS
  x = jnp.pad(x_MK, ((0, 0), (0, rows - K)))
  w = lax.bitcast_convert_type(packed_bytes, jnp.int8)
  p = plan
  bk = p.nb * block
  if x.dtype == jnp.int8:
    code_dtype, acc_dtype = (jnp.int8, jnp.int32) if p.int8_dot else (jnp.bfloat16, jnp.float32)
  elif x.dtype == jnp.bfloat16:
    code_dtype, acc_dtype = jnp.bfloat16, jnp.float32
  else:
    code_dtype, acc_dtype = jnp.float32, jnp.float32
  precision = lax.Precision.HIGHEST if code_dtype == jnp.float32 else None
  in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM),
              pl.BlockSpec((p.bm, bk), lambda n, m, k: (m, k)),
              pl.BlockSpec((bk // SLOTS, p.bn), lambda n, m, k: (k, n))]
  args = [jnp.reshape(scale, (1,)).astype(jnp.float32), x, w]
  if x_scale_M is not None:
    in_specs.append(pl.BlockSpec((p.bm, 1), lambda n, m, k: (m, 0)))
    args.append(x_scale_M.astype(jnp.float32).reshape(M, 1))
  return pl.pallas_call(
      functools.partial(_kernel, block=block, nb=p.nb, code_dtype=code_dtype,
                        acc_dtype=acc_dtype, precision=precision),
      grid=(pl.cdiv(N, p.bn), pl.cdiv(M, p.bm), rows // bk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((p.bm, p.bn), lambda n, m, k: (m, n)),
      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
      scratch_shapes=[pltpu.VMEM((p.bm, p.bn), acc_dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="lowbit_matmul_int8_tpu" if x_scale_M is not None else "lowbit_matmul_tpu",
  )(*args)


def _prepare(op: str, x_MK, packed: layout.PackedWeight, config, interpret: bool) -> _Plan:
  require_platform("tpu", interpret, f"the Mosaic TPU {op} kernel")
  if packed.fmt != "i2_s":
    raise NotSupported(f"weight format {packed.fmt!r}: the TPU kernel reads i2_s only")
  config = config or TPUConfig()
  config.validate()
  return _plan(op, x_MK.shape[0], packed.shape[1], packed, x_MK.dtype == jnp.int8, config)


def lowbit_matmul(x_MK, packed, out_dtype, *, interpret: bool = False,
                  config: TPUConfig | None = None):
  """Arguments as `pallas_kernels.lowbit_matmul.lowbit_matmul` (checked there)."""
  plan = _prepare("lowbit_matmul", x_MK, packed, config, interpret)
  return _matmul(x_MK, packed.packed, packed.scale, None, block=packed.block, N=packed.shape[1],
                 plan=plan, out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret))


def lowbit_matmul_int8(x_int8_MK, x_scale_M, packed, out_dtype, *, interpret: bool = False,
                       config: TPUConfig | None = None):
  """Arguments as `pallas_kernels.lowbit_matmul.lowbit_matmul_int8` (checked there)."""
  plan = _prepare("lowbit_matmul_int8", x_int8_MK, packed, config, interpret)
  return _matmul(x_int8_MK, packed.packed, packed.scale, x_scale_M, block=packed.block,
                 N=packed.shape[1], plan=plan, out_dtype=jnp.dtype(out_dtype),
                 interpret=bool(interpret))
