"""Packed ternary matmul as Pallas Mosaic GPU kernels (Hopper:
TMA loads, unpacking in registers, wgmma): the `pallas_mosaic_gpu` implementation of
`lowbit_matmul` and `lowbit_matmul_int8` for I2_T and I2_S weights.

I2_T (`layout.py`; `auto` on a GPU): the weight is the wgmma's *register* operand, so decoded
codes never touch shared memory and x is not padded to 64 rows. y^T [N, M] = W^T [N, K] x^T
[K, M]: one program per (tile of 128 or 64 output columns, share of K); per 512-row K step the
pipeline brings in the tile's words [NT, 64] (uint16, 8 codes each) and x's [MR, 512] tile (MR
= M rounded up to 8, the wgmma's N; x read in place, the TMA filling the rows past M and the
columns past K with zeros, so no XLA op prepares it). The words
are loaded in the wgmma register layout, so every thread holds the words of exactly the (column, K
row) pairs of the A fragments it feeds; slot i of them (`slot_operands`: mask, or, one multiply-
add; exact) is the A operand [NT, 64] of K rows [64 i, 64 i + 64), multiplied by x's slab i read
transposed from shared memory (a 64-column slice of the x tile) into a float32 accumulator
[NT, MR]. Each slot's wgmma runs while
the next slot decodes (`wgmma_wait(1)`). The split-K partial sums [splits, N, MR] are added,
transposed, scaled and cast in XLA. Shapes: I2_T in 512-row blocks, N a multiple of 64, M <= 64.
This is the bf16 / f16 (W2A16) path; int8 x (W2A8) at M <= 64 takes the GEMM below by default
(`gemv_s8`: x rows rounded up to 8 / 16 / 32 / 64, whole 512-row blocks a step, the blocks split
over programs along K and their int32 sums added in XLA; 8-29% less kernel time on the H200).

I2_T GEMM (W2A8, M > 64, and M <= 64 with `gemv_s8`; `auto` for i2_t weights with int8 x; on the
H200 at M = 2048 1.42-1.76x bf16, docs/results/ternary.md): the same y^T = W^T x^T with the weight as the register operand of
s8 wgmmas (int8 x int8 -> int32, twice bf16's tensor-core rate on Hopper). Per 128-row K step
the pipeline brings in the words [64, 64] of a block of 64 output columns and x's [block_m, 128]
int8 tile. Slots 2 t and 2 t + 1 of every word (`mgpu_util.s8_pairs_from_words`: shift, two
masks, one shift-or a 32-bit register) are the codes q = t + 1 of a [64, 128] s8 operand, whose
column order x's columns are permuted to once in XLA (`gemm_x_permutation`, with the padding).
By default a program is two consumer warpgroups of 64 output columns each sharing every x tile
of 128 rows, and a producer warpgroup issuing the loads (a warp-specialised pipeline), and the
epilogue runs in the kernel: the offset sum_k x subtracted, the scales applied, y written
transposed through shared memory in its dtype, the same float32 operations as the integer
reference. `MosaicGPUConfig` selects one warpgroup a program (`gemm_warpgroups=1`, up to 256
rows), the int32 sums out with the epilogue in XLA (`fused_epilogue=False`), the rows a
program (`gemm_block_m`) and 128 / 256 / 512 K rows a pipeline step (`gemm_k_slots`, default 2
pairs: each 512-row block's words fetched 4 / 2 / 1 times, and within a step a slot pair decoding
while the previous one's wgmma runs). A weight with per-column scales (`layout.concat_i2t`)
takes the XLA epilogue.

I2_S (named only; slower than the Triton kernel on the H100):

y [M, N] = x [M, K] @ t [K, N] * scale. One program per (128-column tile, share of K): for each
256-row K tile, `plgpu.emit_pipeline` brings in by TMA the tile's packed bytes, read as int32
words [64, 32] (4 columns a word, byte e = column 4 c + e), and the matching x tile [64, 256]
(M padded to the 64 rows of a warpgroup MMA). In registers, slot i (2 bits at 6 - 2 i of each
byte) of byte e of every word is one [64, 32] slab of ternary codes: rows of slot i of the two
128-row I2_S blocks, columns e, e + 4, ... of the tile. Each slab, t = code - 1 in bf16, is stored
as a block of a [256, 128] shared-memory tile (64-byte swizzle, one slab wide), and one wgmma
multiplies x by it. The slabs' order is fixed, so the permutation is paid outside the loop: x's K
columns are permuted to the tile's row order once per call (XLA, M x K), and y's columns are
un-permuted once (XLA, M x N). The split-K partial sums (float32, only the M rows rounded up to 8)
are added, scaled and cast in XLA.

Both kernels run the W2A8 op on the int8 activations cast to a 16-bit float (bf16 for I2_S, f16
for I2_T, whose decoding is cheaper in f16; integers up to 127 are exact in both, and the float32
sums of products up to 127 stay exact below 2^24: K <= 132K), then the activation and weight
scales: it equals the integer path bit for bit.

Shapes (I2_S): 128-row blocks, K rows a multiple of 256, N a multiple of 128, M <= 64;
bfloat16 / float16 activations (W2A16) or int8 ones (W2A8) for both. Others raise
NotSupported and the dispatcher moves on. Interpret mode (the Mosaic GPU interpreter, CPU tests):
plain dots in place of the wgmmas, no register layouts; the rest is the same kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import launch, tuned
from pallas_kernels import mgpu_util
from pallas_kernels.dispatch import NotSupported, require_platform

KT = 256          # K rows a step (two I2_S blocks of 128)
NT = 128          # output columns a program
ROWS = 64         # x rows of a warpgroup MMA (M padded to it)
WR, WC = KT // 4, NT // 4      # the step's packed words: [64 rows, 32 words]


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
  """num_splits: programs per column tile along K (None: about two programs per SM);
  pipeline_depth: K steps in flight (None: 2 for I2_S, 3 for I2_T; fewer where shared memory
  cannot hold them); overlap (I2_S): unpack step k's weights while step k - 1's wgmma runs (two
  B tiles in turn, the wgmma left in flight across the step; x tiles released a step late),
  instead of waiting for each wgmma before the next unpacking; block_n (I2_T): output columns a
  program, 64 or 128 (None: 128 where N allows);
  profile_dir (I2_T, every path): write a Mosaic GPU profiler trace of every launch there
  (per-warpgroup timelines of the named phases load / decode / mma / drain; `python -m
  benchmarks profile_mgpu --kernel ternary` sums them), with room for profile_space phases a
  warpgroup; word_shifts
  (I2_T): shift the packed words as whole 32-bit registers (two words each; one instruction
  where a shift of 16-bit pairs takes several), exact since a slot reads only bits the
  neighbouring word cannot reach; fused_decode (I2_T, the default): decode a whole 32-bit
  register (two words) a slot with a 32-bit shift, one and/or and one packed fma
  (`mgpu_util.fma_from_words`), the same values -- on the H100 at 8192 x 8192, M = 1 it takes the
  kernel from 13.2-13.9 us to 12.3-12.6 (W2A8 / W2A16; `word_shifts` alone 12.5-12.6), 8-10% at
  every shape measured;
  hold_operands (I2_T): keep the register operand of the wgmma in flight live while the next
  slot decodes (an optimization barrier over both), so the compiler cannot reuse its registers
  for the next slot and make the decoding wait for that wgmma; gemm_block_m (I2_T GEMM, M > 64):
  x rows a program, 64 / 128 / 256 (None: 256, at most 128 with two warpgroups);
  fused_epilogue (I2_T GEMM, the default; per-tensor scales only, per-column ones go to XLA):
  subtract the offset, scale and cast in the kernel and
  write y [M, N] transposed through shared memory (the same float32 operations in the same
  order, so the same bits), instead of the int32 sums [N, M] and an XLA epilogue (44 / 79 us at
  8192 x 8192 / 4096 x 14336, M = 2048, on the H100); gemm_warpgroups (I2_T GEMM): 2, the
  default (two consumer warpgroups of 64 columns each sharing every x tile and a producer
  warpgroup issuing the loads: a warp-specialised pipeline; 251 / 240 us where one warpgroup
  takes 292 / 277 at those shapes; at most 128 x rows a program; N must be a multiple of 128,
  else one warpgroup) or 1 (one warpgroup a program, 64 output columns); gemm_k_slots (I2_T
  GEMM): slot pairs a pipeline step, 1 / 2 / 4 (128 / 256 / 512 K rows, x tiles [block_m, 128 x
  slots]): a block's words are fetched 4 / slots times (each step needs all 64 words of its
  512-row block), and within a step the next pair decodes while the previous pair's wgmma
  runs; gemv_s8 (I2_T, W2A8, M <= 64): decode on the GEMM's s8 wgmma instead of the 16-bit
  operand (`_run_gv`: x rows rounded up to 8 / 16 / 32 / 64, whole 512-row blocks a step, split
  along K; num_splits / pipeline_depth / fused_epilogue apply), gemv_warpgroups its consumer
  warpgroups (1: 64 columns a program; 2: 128, with a producer warpgroup); planar_decode
  (I2_T s8 GEMM and GEMV): a step takes slots p and p + 4 of every word instead of 2 t and
  2 t + 1, so one 32-bit shift and one mask (`mgpu_util.s8_planes_from_words`; the mask alone
  for p = 0) decode 4 codes where the pair form takes a shift, two masks and a shift-or; x's
  columns permuted per 512-row block instead (`gemm_x_permutation(planar=True)`); the packed
  words are the same. To be timed on a GPU, so off; planar_scaled (with planar_decode, the s8
  GEMV with one warpgroup): planes 1 and 2 decoded by a mask alone, their codes left 4 and 16
  times too large (`mgpu_util.s8_planes_scaled_from_words`), each plane's wgmma into the
  accumulator of its factor (three chains instead of one), divided out at the end: 5 integer
  instructions a register pair of planes instead of 7. Off until timed."""
  num_splits: int | None = None
  pipeline_depth: int | None = None
  overlap: bool = False
  block_n: int | None = None
  profile_dir: str | None = None
  profile_space: int = 4096
  word_shifts: bool = False
  fused_decode: bool = True
  hold_operands: bool = False
  gemm_block_m: int | None = None
  fused_epilogue: bool = True
  gemm_warpgroups: int = 2
  gemm_k_slots: int = 2
  gemv_s8: bool = True
  gemv_warpgroups: int = 1
  planar_decode: bool = False
  planar_scaled: bool = False

  def validate(self) -> None:
    if self.profile_dir is not None and not isinstance(self.profile_dir, str):
      raise ValueError(f"config.profile_dir must be a path (str) or None, got {self.profile_dir!r}")
    if not isinstance(self.profile_space, int) or self.profile_space < 1:
      raise ValueError(f"config.profile_space must be a positive int, got {self.profile_space!r}")
    if self.block_n is not None and self.block_n not in (64, 128):
      raise ValueError(f"config.block_n must be 64, 128 or None, got {self.block_n!r}")
    for name in ("gemm_warpgroups", "gemv_warpgroups"):
      if getattr(self, name) not in (1, 2):
        raise ValueError(f"config.{name} must be 1 or 2, got {getattr(self, name)!r}")
    if self.gemm_k_slots not in (1, 2, 4):
      raise ValueError(f"config.gemm_k_slots must be 1, 2 or 4, got {self.gemm_k_slots!r}")
    if self.gemm_block_m is not None and self.gemm_block_m not in (64, 128, 256):
      raise ValueError(f"config.gemm_block_m must be 64, 128, 256 or None, got "
                       f"{self.gemm_block_m!r}")
    for name in ("num_splits", "pipeline_depth"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"config.{name} must be a positive int or None, got {v!r}")
    for name in ("overlap", "word_shifts", "fused_decode", "hold_operands", "fused_epilogue",
                 "gemv_s8", "planar_decode", "planar_scaled"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"config.{name} must be a bool, got {getattr(self, name)!r}")
    if self.planar_scaled and not self.planar_decode:
      raise ValueError("config.planar_scaled needs planar_decode=True (it scales the planes)")


CONFIG = MosaicGPUConfig


def _rows_and_dtype(M: int, dtype) -> str | None:
  """Why neither kernel takes M rows of `dtype` activations, or None."""
  if M > ROWS:
    return f"M={M} rows: the kernel is for decoding (M <= {ROWS})"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                              jnp.dtype(jnp.int8)):
    return (f"activations in {jnp.dtype(dtype).name}: the wgmma kernel takes bfloat16 / float16 "
            f"(or int8, exact in a 16-bit float)")
  return None


def mgpu_supported(M: int, packed, dtype) -> str | None:
  if packed.fmt != "i2_s" or packed.block != 128:
    return f"format {packed.fmt} (block {packed.block}): the kernel reads i2_s in 128-row blocks"
  if packed.rows % KT:
    return f"K rows {packed.rows} must be a multiple of {KT}"
  if packed.shape[1] % NT:
    return f"N={packed.shape[1]} must be a multiple of {NT}"
  return _rows_and_dtype(M, dtype)


def row_permutation() -> np.ndarray:
  """int [KT]: tile row rho = i * 64 + r (slot i, word row r) holds K row (r // 32) * 128 +
  i * 32 + r % 32 of the step."""
  rho = np.arange(KT)
  i, r = rho // WR, rho % WR
  return (r // 32) * 128 + i * 32 + r % 32


def _kernel(x_ref, w_ref, o_ref, b_smem, *, num_splits: int, stages: int, n_steps: int,
            overlap: bool, interpret: bool):
  n = lax.axis_index("n")
  s = lax.axis_index("s")
  per = -(-n_steps // num_splits)
  start = s * per
  steps = jnp.clip(n_steps - start, 0, per)
  dtype = b_smem.dtype
  RO = o_ref.shape[-2]
  wgmma_layout = plgpu.Layout.WGMMA

  def unpack(w_smem, b):
    """The step's [64, 32] words -> the [256, 128] tile of codes - 1 (16 slabs)."""
    words = w_smem[...] if interpret else mgpu_util.load(w_smem, wgmma_layout)
    for i in range(4):
      for e in range(4):
        code = lax.shift_right_logical(words, jnp.int32(8 * e + 6 - 2 * i)) & 3
        b.at[pl.ds(i * WR, WR), pl.ds(e * WC, WC)][...] = (code - 1).astype(
            jnp.float32).astype(dtype)
    plgpu.commit_smem()          # the generic-proxy stores, visible to the wgmma

  x_spec = lambda delay: plgpu.BlockSpec((ROWS, KT), lambda k: (0, start + k),
                                         transforms=mgpu_util.tiles(dtype, 64),
                                         delay_release=delay)
  w_spec = plgpu.BlockSpec((WR, WC), lambda k: (start + k, n),
                           transforms=mgpu_util.tiles(jnp.int32))
  if overlap and not interpret:
    def accumulate(acc_ref):
      def step(idx, x_smem, w_smem):
        b = b_smem.at[lax.rem(idx[0], 2)]
        unpack(w_smem, b)        # while the previous step's wgmma reads the other tile
        plgpu.wgmma(acc_ref, x_smem, b)
        plgpu.wgmma_wait(1)      # the previous wgmma is done: its B tile and x tile are free

      plgpu.emit_pipeline(step, grid=(steps,), in_specs=[x_spec(1), w_spec],
                          max_concurrent_steps=max(stages, 2))(x_ref, w_ref)
      plgpu.wgmma_wait(0)
      return acc_ref[...]
    acc = pl.run_scoped(accumulate, plgpu.ACC((ROWS, NT), jnp.float32))
  else:
    # one B tile, the scratch itself: a constant index into a stacked scratch (b_smem.at[0])
    # fails to lower inside the pipeline's loop on JAX 0.11
    b = b_smem

    def step(_, x_smem, w_smem, acc):
      unpack(w_smem, b)
      if interpret:
        return acc + jnp.dot(x_smem[...], b[...], preferred_element_type=jnp.float32)

      def mma(acc_ref):
        plgpu.wgmma(acc_ref, x_smem, b)
      return pl.run_state(mma)(plgpu.ACC.init(acc))

    init = jnp.zeros((ROWS, NT), jnp.float32)
    if not interpret:
      init = plgpu.layout_cast(init, wgmma_layout)
    acc = plgpu.emit_pipeline(step, grid=(steps,), in_specs=[x_spec(0), w_spec],
                              max_concurrent_steps=stages, init_carry=init)(x_ref, w_ref)

  def store(o_smem):
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, RO)], o_ref.at[s, :, pl.ds(n * NT, NT)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((ROWS, NT), jnp.float32,
                                  transforms=mgpu_util.tiles(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("N", "num_splits", "stages", "overlap", "interpret"))
def partial_sums(x_MK, packed_u8, *, N: int, num_splits: int, stages: int, overlap: bool = False,
                 interpret: bool = False):
  """float32 [num_splits, RO, N] split-K sums of x @ t (t the ternary codes; RO = M rounded up to
  8), columns in the kernel's order (`unpermute_columns`)."""
  M, K = x_MK.shape
  rows = packed_u8.shape[0] * 4
  RO = launch.round_up(M, 8)
  dtype = x_MK.dtype
  x = jnp.pad(x_MK, ((0, ROWS - M), (0, rows - K)))
  x = x.reshape(ROWS, rows // KT, KT)[:, :, row_permutation()].reshape(ROWS, rows)
  words = lax.bitcast_convert_type(packed_u8.reshape(rows // 4, N // 4, 4), jnp.int32)
  interp = mgpu_util.interpret_params(interpret)
  call = plgpu.kernel(
      functools.partial(_kernel, num_splits=num_splits, stages=stages, n_steps=rows // KT,
                        overlap=overlap and not interpret, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((num_splits, RO, N), jnp.float32),
      scratch_types=(plgpu.SMEM((2, KT, NT) if overlap and not interpret else (KT, NT), dtype,
                                transforms=mgpu_util.tiles(dtype, 64)),),
      grid=(N // NT, num_splits),
      grid_names=("n", "s"),
      compiler_params=mgpu_util.compiler_params(),
      interpret=interp,
  )
  return call(x, words)


def unpermute_columns(y_MN: jax.Array) -> jax.Array:
  """Kernel column e * 32 + c of each 128-column tile -> column 4 c + e."""
  M, N = y_MN.shape
  return y_MN.reshape(M, N // NT, 4, WC).transpose(0, 1, 3, 2).reshape(M, N)


def smem_bytes(stages: int, overlap: bool, dtype=jnp.bfloat16) -> int:
  """Shared memory of the I2_S kernel: `stages` x (x tile [64, 256] + packed words [64, 32] int32
  + a barrier) + one B tile [256, 128] (two with overlap); the output tile's scope comes after the
  pipeline's and is smaller. Equal to what Mosaic GPU allocates (checked by lowering for CUDA)."""
  item = jnp.dtype(dtype).itemsize
  return stages * (ROWS * KT * item + WR * WC * 4 + 8) + (2 if overlap else 1) * KT * NT * item


def _run(x_MK, packed, x_scale_M, out_dtype, interpret, config):
  require_platform("gpu", interpret, "the Mosaic GPU ternary matmul")
  M = x_MK.shape[0]
  if packed.fmt == "i2_t" and M > ROWS:
    why = mgpu_supported_g(M, packed, x_MK.dtype)
    if why is not None:
      raise NotSupported(why)
    return _run_g(x_MK, packed, x_scale_M, out_dtype, interpret, config)
  if packed.fmt == "i2_t":
    why = mgpu_supported_t(M, packed, x_MK.dtype)
    if why is not None:
      raise NotSupported(why)
    config = config or MosaicGPUConfig()
    config.validate()
    if config.gemv_s8 and jnp.dtype(x_MK.dtype) == jnp.dtype(jnp.int8):
      return _run_gv(x_MK, packed, x_scale_M, out_dtype, interpret, config)
    return _run_t(x_MK, packed, x_scale_M, out_dtype, interpret, config)
  why = mgpu_supported(M, packed, x_MK.dtype)
  if why is not None:
    raise NotSupported(why)
  config = config or MosaicGPUConfig()
  config.validate()
  N = packed.shape[1]
  dtype = x_MK.dtype if x_MK.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  n_steps = packed.rows // KT
  num_splits = config.num_splits or max(1, min(n_steps, launch.target_programs(2) // (N // NT)))
  # the deepest pipeline up to the requested one that fits shared memory (overlap's second B
  # tile leaves room for 2 steps, not 3)
  stages = config.pipeline_depth or 2
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  while stages > 1 and smem_bytes(stages, config.overlap, dtype) > limit:
    stages -= 1
  sums = partial_sums(x_MK.astype(dtype), packed.packed, N=N, num_splits=int(num_splits),
                      stages=int(stages), overlap=config.overlap,
                      interpret=bool(interpret))
  y = unpermute_columns(jnp.sum(sums, axis=0)[:M]) * packed.scale
  if x_scale_M is not None:
    y = y * x_scale_M.astype(jnp.float32)[:, None]
  return y.astype(out_dtype)


# ----------------------------------------------------------------- i2_t: the weight in registers

KT_T = 512        # K rows a step: the 8 slots of a 16-bit word x 64 words
PW = 64           # K rows a slot: one 128-byte swizzle of bf16, the width of the A operand
# bits of 128.0 (bf16) / 1024.0 (f16): the exponent whose mantissa unit is 1.0; and the slots
# that fit the mantissa (7 / 10 bits: 3 / 5 two-bit slots) between shifts of the word
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}
_SLOTS_PER_SHIFT = {jnp.dtype(jnp.bfloat16): 3, jnp.dtype(jnp.float16): 5}


def mgpu_supported_t(M: int, packed, dtype) -> str | None:
  if packed.fmt != "i2_t" or packed.block != KT_T:
    return f"format {packed.fmt} (block {packed.block}): this kernel reads i2_t in {KT_T}-row blocks"
  if packed.shape[1] % 64:
    return f"N={packed.shape[1]} must be a multiple of 64"
  if packed.shape[0] % 8:
    return f"K={packed.shape[0]} must be a multiple of 8 (x's rows are read by TMA: 16-byte strides)"
  return _rows_and_dtype(M, dtype)


def slot_operands(words, dtype):
  """uint16 words [R, 64] (i2_t: 8 codes q = t + 1 a word, slot i at bits [2 i, 2 i + 2)) ->
  the 8 slots' t = q - 1 in dtype [R, 64], exactly. No conversion instruction: the code's two bits,
  masked in place into the low mantissa of `magic` (a float whose mantissa unit is 1.0), make the
  float magic + q 4^j (slot i = P h + j, after a shift of the word by 2 P h, where the mantissa
  holds P slots: 3 in bf16, so two shifts a word, 5 in f16, one); one multiply-add, exact in the
  format, gives q - 1."""
  return [slot_operand(words, i, dtype) for i in range(8)]


def slot_fields(i: int, dtype) -> dict:
  """How slot i of a word decodes in dtype: shift the word right by `shift`, keep `mask`, or in
  `magic` (a float whose mantissa unit is 1.0, so the result is magic + q 4^j), then * `mul` +
  `add` gives q - 1 exactly (`slot_operand`, `mgpu_util.fma_from_words`). The mask keeps only
  bits below 16 - shift."""
  bits, base = _MAGIC[jnp.dtype(dtype)]
  h, j = divmod(i, _SLOTS_PER_SHIFT[jnp.dtype(dtype)])
  unit = 0.25 ** j
  return dict(shift=2 * _SLOTS_PER_SHIFT[jnp.dtype(dtype)] * h, mask=3 << 2 * j, magic=bits,
              mul=unit, add=-(base * unit + 1.0))


def slot_operand(words, i: int, dtype, shift=None):
  """Slot i of `slot_operands`. shift(words, n): the words shifted right by n bits (default a
  per-element shift); only the bits below 16 - n of each shifted word are read, so a shift of
  whole 32-bit registers (`mgpu_util.shift_right_words`) gives the same operand."""
  f = slot_fields(i, dtype)
  n = f["shift"]
  if n:
    words = (lax.shift_right_logical(words, jnp.uint16(n)) if shift is None
             else shift(words, n))
  # bits [2 j, 2 j + 2) with 2 (per h + j) + 2 = 2 i + 2 <= 16: below 16 - n
  v = lax.bitcast_convert_type((words & jnp.uint16(f["mask"])) | jnp.uint16(f["magic"]), dtype)
  return v * f["mul"] + f["add"]


def shift_pairs(words, n: int):
  """`mgpu_util.shift_right_words` in jnp (the interpreter's form): uint16 [..., C] (C even) as
  little-endian pairs of neighbouring columns in uint32, each pair shifted right by n bits."""
  pairs = lax.bitcast_convert_type(words.reshape(*words.shape[:-1], -1, 2), jnp.uint32)
  pairs = lax.shift_right_logical(pairs, jnp.uint32(n))
  return lax.bitcast_convert_type(pairs, jnp.uint16).reshape(words.shape)


def _kernel_t(x_ref, w_ref, o_ref, *, block_n: int, num_splits: int, stages: int, n_steps: int,
              word_shifts: bool, fused_decode: bool, hold_operands: bool, interpret: bool):
  n = lax.axis_index("n")
  s = lax.axis_index("s")
  per = -(-n_steps // num_splits)
  start = s * per
  steps = jnp.clip(n_steps - start, 0, per)
  dtype = x_ref.dtype
  MR = launch.round_up(x_ref.shape[0], 8)
  NT = block_n
  x_spec = plgpu.BlockSpec((MR, KT_T), lambda k: (0, start + k),
                           transforms=mgpu_util.tiles(dtype))
  w_spec = plgpu.BlockSpec((NT, PW), lambda k: (n, start + k),
                           transforms=mgpu_util.tiles(jnp.uint16))
  wgmma_layout = plgpu.Layout.WGMMA

  if interpret:
    def step(_, x_smem, w_smem, acc):
      words = w_smem[...]
      for i in range(8):
        a = slot_operand(words, i, dtype, shift_pairs if word_shifts or fused_decode else None)
        acc = acc + jnp.dot(a, x_smem[:, i * PW:(i + 1) * PW].T,
                            preferred_element_type=jnp.float32)
      return acc
    acc = plgpu.emit_pipeline(step, grid=(steps,), in_specs=[x_spec, w_spec],
                              max_concurrent_steps=stages,
                              init_carry=jnp.zeros((NT, MR), jnp.float32))(x_ref, w_ref)
  else:
    def accumulate(acc_ref):
      def step(_, x_smem, w_smem):
        with jax.named_scope("load"):
          words = mgpu_util.load(w_smem, wgmma_layout)
        shifted = {}    # one shift a slot group, not one a slot

        def shift(w, n):
          if n not in shifted:
            shifted[n] = (mgpu_util.shift_right_words(w, n, wgmma_layout) if word_shifts
                          else lax.shift_right_logical(w, jnp.uint16(n)))
          return shifted[n]

        held = None     # the operand of the wgmma in flight
        for i in range(8):
          with jax.named_scope("decode"):
            if fused_decode:
              a = mgpu_util.fma_from_words(words, **slot_fields(i, dtype), dtype=dtype,
                                           layout=wgmma_layout)
            else:
              a = slot_operand(words, i, dtype, shift)
            if hold_operands and held is not None:
              # keeps the in-flight wgmma's registers live until this slot is decoded, so
              # the decoding cannot be given those registers (and wait for that wgmma)
              a, _ = lax.optimization_barrier((a, held))
            held = a
          with jax.named_scope("mma"):
            plgpu.wgmma(acc_ref, a, mgpu_util.transposed(x_smem.at[:, pl.ds(i * PW, PW)]))
            plgpu.wgmma_wait(1)  # the previous slot's wgmma is done; this one runs on
        with jax.named_scope("drain"):
          plgpu.wgmma_wait(0)    # the x tile is read before the pipeline reuses its slot
      plgpu.emit_pipeline(step, grid=(steps,), in_specs=[x_spec, w_spec],
                          max_concurrent_steps=stages)(x_ref, w_ref)
      return acc_ref[...]
    acc = pl.run_scoped(accumulate, plgpu.ACC((NT, MR), jnp.float32))

  def store(o_smem):
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[s, pl.ds(n * NT, NT)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((NT, MR), jnp.float32))


@functools.partial(jax.jit, static_argnames=("N", "block_n", "num_splits", "stages", "profile",
                                             "word_shifts", "fused_decode", "hold_operands",
                                             "interpret"))
def partial_sums_t(x_MK, packed_u16, *, N: int, block_n: int, num_splits: int, stages: int,
                   profile: tuple[str, int] | None = None, word_shifts: bool = False,
                   fused_decode: bool = False, hold_operands: bool = False,
                   interpret: bool = False):
  """float32 [num_splits, N, MR] split-K sums of (x @ t)^T for an i2_t weight's packed words
  [N, rows / 8] (MR = M rounded up to 8, the wgmma's N)."""
  M, K = x_MK.shape
  rows = packed_u16.shape[1] * 8
  MR = launch.round_up(M, 8)
  # x is read in place where the TMA allows it (it fills the rows past M and the columns past K
  # with zeros); otherwise padded once in XLA
  Mp, Kp = x_padded_shape(M, K, x_MK.dtype)
  x = x_MK if (Mp, Kp) == (M, K) else jnp.pad(x_MK, ((0, Mp - M), (0, Kp - K)))
  interp = mgpu_util.interpret_params(interpret)
  call = plgpu.kernel(
      functools.partial(_kernel_t, block_n=block_n, num_splits=num_splits, stages=stages,
                        n_steps=rows // KT_T, word_shifts=word_shifts,
                        fused_decode=fused_decode, hold_operands=hold_operands,
                        interpret=interpret),
      out_type=jax.ShapeDtypeStruct((num_splits, N, MR), jnp.float32),
      grid=(N // block_n, num_splits),
      grid_names=("n", "s"),
      compiler_params=mgpu_util.compiler_params(profile),
      interpret=interp,
  )
  return call(x, packed_u16)


def x_padded_shape(M: int, K: int, dtype) -> tuple[int, int]:
  """The shape x must have for the i2_t kernel's TMA: a dimension of the global array must be
  smaller than its shared-memory tile's (8 rows, 128 bytes of columns) or a multiple of it (the
  TMA then zero-fills past the end). (M, K) where x is read in place."""
  cols = 128 // jnp.dtype(dtype).itemsize
  fit = lambda n, t: n if n < t or n % t == 0 else launch.round_up(n, t)
  return fit(M, 8), fit(K, cols)


def smem_bytes_t(block_n: int, MR: int, stages: int) -> int:
  """Shared memory of the i2_t kernel: `stages` x (x tile [MR, 512] bf16 + words [block_n, 64]
  uint16) + the [block_n, MR] float32 output tile + barriers."""
  return stages * (8 * MR * PW * 2 + block_n * PW * 2) + block_n * MR * 4 + 1024


def _run_t(x_MK, packed, x_scale_M, out_dtype, interpret, config):
  M = x_MK.shape[0]
  config = config or MosaicGPUConfig()
  config.validate()
  N = packed.shape[1]
  # int8 x (W2A8) in f16: exact, and its decoding takes one shift a word instead of bf16's two
  dtype = x_MK.dtype if x_MK.dtype in (jnp.bfloat16, jnp.float16) else jnp.float16
  block_n = config.block_n or (128 if N % 128 == 0 else 64)
  if N % block_n:
    raise NotSupported(f"N={N} is not a multiple of config.block_n={block_n}")
  n_steps = packed.rows // KT_T
  num_splits = config.num_splits or max(1, min(n_steps,
                                               launch.target_programs(2) // (N // block_n)))
  MR = launch.round_up(M, 8)
  stages = config.pipeline_depth or 3
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  while stages > 1 and smem_bytes_t(block_n, MR, stages) > limit:
    stages -= 1
  sums = partial_sums_t(x_MK.astype(dtype), packed.packed, N=N, block_n=int(block_n),
                        num_splits=int(num_splits), stages=int(stages),
                        profile=None if config.profile_dir is None else (
                            config.profile_dir, config.profile_space),
                        word_shifts=bool(config.word_shifts),
                        fused_decode=bool(config.fused_decode),
                        hold_operands=bool(config.hold_operands), interpret=bool(interpret))
  y = jnp.sum(sums, axis=0)[:, :M].T * packed.scale
  if x_scale_M is not None:
    y = y * x_scale_M.astype(jnp.float32)[:, None]
  return y.astype(out_dtype)


# ------------------------------------------------- i2_t GEMM: s8 wgmma, W2A8 for M > 64 rows

KS_G = 128        # K rows a step: slots (2 t, 2 t + 1) of a block's 64 words; one s8 wgmma K
BN_G = 64         # output columns a program: the wgmma's M (the weight is its register operand)
BM_MAX_G = 256    # x rows a program at most: the wgmma's N


def gemm_x_permutation(planar: bool = False) -> np.ndarray:
  """int [KS_G]: position p = 16 g + 4 c + 2 e + s of a step's x tile holds K row s * 64 + 8 g +
  2 c + e of the step's 128 rows (`mgpu_util.s8_pairs_from_words`' column order: field s of word
  8 g + 2 c + e); step 4 b + t covers rows [128 t, 128 t + 128) of 512-row block b, slots 2 t
  and 2 t + 1 of its words."""
  if planar:
    # int [4 KS_G] over a 512-row block: position 128 j + 16 g + 4 c + 2 e + s holds row
    # 64 (j + 4 s) + 8 g + 2 c + e (`mgpu_util.s8_planes_from_words`: slot j + 4 s of word
    # 8 g + 2 c + e); step j of the block takes slots j and j + 4
    p = np.arange(4 * KS_G)
    j, p = p // KS_G, p % KS_G
    g, c, e, s = p // 16, (p // 4) % 4, (p // 2) % 2, p % 2
    return 64 * (j + 4 * s) + 8 * g + 2 * c + e
  p = np.arange(KS_G)
  g, c, e, s = p // 16, (p // 4) % 4, (p // 2) % 2, p % 2
  return s * 64 + 8 * g + 2 * c + e


def permute_x_gemm(x_MK: jax.Array, planar: bool = False) -> jax.Array:
  """x [M, K] (K a multiple of 128) with each 128 columns in `gemm_x_permutation`'s order, as a
  reshape and transpose (rows s * 64 + 8 g + 2 c + e -> position ((g * 4 + c) * 2 + e) * 2 + s),
  which XLA fuses into the op producing x."""
  M, K = x_MK.shape
  if planar:    # per 512 columns (K a multiple of 512): rows 256 s + 64 j + 8 g + 2 c + e
    return (x_MK.reshape(M, K // (4 * KS_G), 2, 4, 8, 4, 2).transpose(0, 1, 3, 4, 5, 6, 2)
            .reshape(M, K))
  return x_MK.reshape(M, K // KS_G, 2, 8, 4, 2).transpose(0, 1, 3, 4, 5, 2).reshape(M, K)


def gemm_block_m(M: int, requested: int | None = None) -> int:
  """x rows a GEMM program: the request (64, 128 or 256; `MosaicGPUConfig.gemm_block_m`) or
  256, never more than M rounded up to 64."""
  return min(requested or BM_MAX_G, launch.round_up(M, 64))


def _kernel_g(x_ref, w_ref, *refs, block_m: int, stages: int, n_steps: int, k_slots: int,
              interpret: bool, num_splits: int = 1, planar: bool = False, scaled: bool = False):
  # refs: (o_ref,): the int32 sums [N, Mp] ([num_splits, N, Mp] split along K: program s takes
  # steps [s n_steps, (s + 1) n_steps)); or (v_ref, o_ref) with the epilogue fused: v_ref
  # float32 [3, Mp] (sum_k x, the weight scale, x's scale per row) and o_ref y [Mp, N]
  v_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
  n = lax.axis_index("n")
  m = lax.axis_index("m")
  start = 0
  if num_splits > 1:
    s = lax.axis_index("s")
    start = s * n_steps
    o_ref = o_ref.at[s]
  x_spec = plgpu.BlockSpec((block_m, KS_G * k_slots), lambda k: (m, start + k),
                           transforms=mgpu_util.tiles(jnp.int8))
  w_spec = plgpu.BlockSpec((BN_G, PW), lambda k: (n, (start + k) // (4 // k_slots)),
                           transforms=mgpu_util.tiles(jnp.uint16))

  if interpret and scaled:
    def step(idx, x_smem, w_smem, accs):
      return tuple(a + d for a, d in zip(accs, _step_interpret_scaled(w_smem[...], x_smem)))
    zero = jnp.zeros((BN_G, block_m), jnp.int32)
    acc = _unscale(plgpu.emit_pipeline(step, grid=(n_steps,), in_specs=[x_spec, w_spec],
                                       max_concurrent_steps=stages,
                                       init_carry=(zero,) * 3)(x_ref, w_ref))
  elif interpret:
    def step(idx, x_smem, w_smem, acc):
      return acc + _step_interpret(w_smem[...], x_smem, start + idx[0], k_slots, planar)
    acc = plgpu.emit_pipeline(step, grid=(n_steps,), in_specs=[x_spec, w_spec],
                              max_concurrent_steps=stages,
                              init_carry=jnp.zeros((BN_G, block_m), jnp.int32))(x_ref, w_ref)
  elif scaled:
    def accumulate(*acc_refs):
      def step(idx, x_smem, w_smem):
        with jax.named_scope("load"):
          words = mgpu_util.load(w_smem, plgpu.Layout.WGMMA)
        _step_wgmmas_scaled(acc_refs, words, x_smem)
      plgpu.emit_pipeline(step, grid=(n_steps,), in_specs=[x_spec, w_spec],
                          max_concurrent_steps=stages)(x_ref, w_ref)
      return _unscale(tuple(r[...] for r in acc_refs))
    acc = pl.run_scoped(accumulate, *(plgpu.ACC((BN_G, block_m), jnp.int32),) * 3)
  else:
    wgmma_layout = plgpu.Layout.WGMMA

    def accumulate(acc_ref):
      def step(idx, x_smem, w_smem):
        # drained every step: left in flight into the next step (x and the words released a
        # step late, `delay_release=1` + `wgmma_wait(1)`) it gave wrong sums on the H100 at
        # some (block_m, stages), 0.2-50% of the outputs, exact at others
        with jax.named_scope("load"):
          words = mgpu_util.load(w_smem, wgmma_layout)
        _step_wgmmas(acc_ref, words, x_smem, start + idx[0], k_slots, planar)
      plgpu.emit_pipeline(step, grid=(n_steps,), in_specs=[x_spec, w_spec],
                          max_concurrent_steps=stages)(x_ref, w_ref)
      return acc_ref[...]
    acc = pl.run_scoped(accumulate, plgpu.ACC((BN_G, block_m), jnp.int32))

  if v_ref is None:
    pl.run_scoped(lambda o_smem: _store_g(acc, o_ref, None, o_smem, None, None, n * BN_G, m,
                                          block_m, interpret),
                  plgpu.SMEM((BN_G, block_m), jnp.int32))
  else:
    pl.run_scoped(lambda v_smem, o_smem, barrier: _store_g(
        acc, o_ref, v_ref, o_smem, v_smem, barrier, n * BN_G, m, block_m, interpret),
                  plgpu.SMEM((3, block_m), jnp.float32),
                  plgpu.SMEM((block_m, BN_G), o_ref.dtype,
                             transforms=mgpu_util.tiles(o_ref.dtype)),
                  plgpu.Barrier())


def _store_g(acc, o_ref, v_ref, o_smem, v_smem, barrier, row0, m, block_m: int,
             interpret: bool):
  """A GEMM program's int32 tile acc [64, block_m] (weight rows row0.., x rows m * block_m..)
  out through shared memory: as is into o_ref [N, Mp] (v_ref None), or with the epilogue fused
  into y [Mp, N]: ((acc - sum_k x) * w_scale * x_scale) in the reference's order (v_ref float32
  [3, Mp]), written transposed, so y leaves the kernel in its own layout and dtype."""
  cols = pl.ds(m * block_m, block_m)
  if v_ref is None:
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(row0, BN_G), cols])
    plgpu.wait_smem_to_gmem(0)
    return
  plgpu.copy_gmem_to_smem(v_ref.at[:, cols], v_smem, barrier)
  plgpu.barrier_wait(barrier)
  if interpret:
    vec = lambda i: v_smem[i][None, :]
  else:
    col = plgpu.Layout.WGMMA.reduce(0)
    vec = lambda i: lax.broadcast_in_dim(mgpu_util.load(v_smem.at[i], col), (BN_G, block_m),
                                         [1])
  t = acc.astype(jnp.float32) - vec(0)          # exact: integers below 2^24
  y = (t * vec(1) * vec(2)).astype(o_ref.dtype)
  if interpret:
    o_smem[...] = y.T
  else:
    mgpu_util.transposed(o_smem)[...] = plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[cols, pl.ds(row0, BN_G)])
  plgpu.wait_smem_to_gmem(0)


def _decode_interpret(words, t, planar: bool = False):
  """The interpreter's s8 operand: slots 2 t, 2 t + 1 of words [R, 64] as int32 [R, 128],
  column 2 j + s = slot 2 t + s of word j (`mgpu_util.s8_pairs_from_words`' order); planar:
  slots t and t + 4 (`mgpu_util.s8_planes_from_words`)."""
  first, stride = (2 * t, 8) if planar else (4 * t, 2)
  q = [lax.shift_right_logical(words, (first + stride * s).astype(jnp.uint16)) & jnp.uint16(3)
       for s in (0, 1)]
  return jnp.stack(q, axis=-1).reshape(words.shape[0], KS_G).astype(jnp.int32)


def _step_interpret(words, x_smem, k, k_slots: int, planar: bool = False):
  """The interpreter's int32 [R, block_m] sums of pipeline step k: slot pairs t = k_slots * (k
  mod 4 / k_slots) + j of the words [R, 64] against the x tile's 128-column slab j."""
  first = k_slots * lax.rem(k, 4 // k_slots)
  return sum(jnp.dot(_decode_interpret(words, first + j, planar),
                     x_smem[:, j * KS_G:(j + 1) * KS_G].astype(jnp.int32).T,
                     preferred_element_type=jnp.int32) for j in range(k_slots))


def _step_interpret_scaled(words, x_smem):
  """The interpreter's `_step_wgmmas_scaled`: each plane's operand times its factor
  (`mgpu_util.PLANE_SCALES`), its sums added to that factor's accumulator (1, 4, 16)."""
  accs = [0, 0, 0]
  for p in range(4):
    a = _decode_interpret(words, jnp.int32(p), True) * mgpu_util.PLANE_SCALES[p]
    x = x_smem[:, p * KS_G:(p + 1) * KS_G].astype(jnp.int32)
    accs[_PLANE_ACC[p]] = accs[_PLANE_ACC[p]] + jnp.dot(a, x.T,
                                                        preferred_element_type=jnp.int32)
  return tuple(accs)


_PLANE_ACC = (0, 1, 2, 0)    # plane p's accumulator: factor 1, 4, 16, 1


def _unscale(accs):
  """The sums of the three accumulators (factors 1, 4, 16) with their factors divided out
  (arithmetic shifts: every sum there is a multiple of its factor)."""
  a1, a4, a16 = accs
  return a1 + lax.shift_right_arithmetic(a4, 2) + lax.shift_right_arithmetic(a16, 4)


def _step_wgmmas_scaled(acc_refs, words, x_smem):
  """A GEMV step (k_slots = 4: planes 0 .. 3 of a 512-row block) with `planar_scaled`: plane p
  decoded by `mgpu_util.s8_planes_scaled_from_words` into the accumulator of its factor; one
  wgmma in flight while the next plane decodes, drained at the end."""
  for p in range(4):
    with jax.named_scope("decode"):
      a = mgpu_util.s8_planes_scaled_from_words(words, p, plgpu.Layout.WGMMA)
    with jax.named_scope("mma"):
      plgpu.wgmma(acc_refs[_PLANE_ACC[p]], a,
                  mgpu_util.transposed(x_smem.at[:, pl.ds(p * KS_G, KS_G)]))
      plgpu.wgmma_wait(1 if p < 3 else 0)


def _step_wgmmas(acc_ref, words, x_smem, k, k_slots: int, planar: bool = False):
  """Pipeline step k on the GPU: per slot pair of the step, its s8 operand decoded from the
  words (registers, WGMMA layout) and one wgmma against the x tile's 128-column slab; a pair
  decodes while the previous pair's wgmma runs (`wgmma_wait(1)`); drained at the end."""
  first = k_slots * lax.rem(k, 4 // k_slots)
  for j in range(k_slots):
    with jax.named_scope("decode"):
      a = (mgpu_util.s8_planes_from_words(words, 2 * (first + j), plgpu.Layout.WGMMA)
           if planar else
           mgpu_util.s8_pairs_from_words(words, 4 * (first + j), plgpu.Layout.WGMMA))
    with jax.named_scope("mma"):
      x = x_smem if k_slots == 1 else x_smem.at[:, pl.ds(j * KS_G, KS_G)]
      plgpu.wgmma(acc_ref, a, mgpu_util.transposed(x))
      plgpu.wgmma_wait(1 if j + 1 < k_slots else 0)


def _kernel_g2(x_ref, w_ref, *refs, block_m: int, stages: int, n_steps: int, k_slots: int,
               interpret: bool, num_splits: int = 1, planar: bool = False):
  """The GEMM with two consumer warpgroups a program and a producer one (warp-specialised
  pipeline): 128 output columns a program, each consumer the wgmmas of 64 of them against the
  same x tile. refs: as `_kernel_g`'s, then the scratch (out tiles [2, ...], and with the fused
  epilogue the vectors [2, 3, block_m] and two barriers)."""
  fused = len(refs) == 5
  if fused:
    v_ref, o_ref, o_smem2, v_smem2, barriers = refs
  else:
    (o_ref, o_smem2), v_ref, v_smem2, barriers = refs, None, None, None
  n = lax.axis_index("n")
  m = lax.axis_index("m")
  wg = lax.axis_index("wg")
  start = 0
  if num_splits > 1:          # split along K, int32 sums only (as `_kernel_g`)
    s = lax.axis_index("s")
    start = s * n_steps
    o_ref = o_ref.at[s]
  rows = pl.ds(wg * BN_G, BN_G)
  x_spec = plgpu.BlockSpec((block_m, KS_G * k_slots), lambda k: (m, start + k),
                           transforms=mgpu_util.tiles(jnp.int8))
  w_spec = plgpu.BlockSpec((2 * BN_G, PW), lambda k: (n, (start + k) // (4 // k_slots)),
                           transforms=mgpu_util.tiles(jnp.uint16))

  def finish(acc):
    _store_g(acc, o_ref, v_ref, o_smem2.at[wg], None if v_smem2 is None else v_smem2.at[wg],
             None if barriers is None else barriers.at[wg], n * 2 * BN_G + wg * BN_G, m,
             block_m, interpret)

  if interpret:
    def step(idx, x_smem, w_smem, acc):
      return acc + _step_interpret(w_smem[rows], x_smem, start + idx[0], k_slots, planar)

    def compute(run):
      finish(run(jnp.zeros((BN_G, block_m), jnp.int32)))
  else:
    def step(idx, x_smem, w_smem, acc_ref):
      # the step's tiles are released when it returns: its wgmmas are drained
      with jax.named_scope("load"):
        words = mgpu_util.load(w_smem.at[rows], plgpu.Layout.WGMMA)
      _step_wgmmas(acc_ref, words, x_smem, start + idx[0], k_slots, planar)
      return acc_ref

    def compute(run):
      def scope(acc_ref):
        run(acc_ref)
        finish(acc_ref[...])
      pl.run_scoped(scope, plgpu.ACC((BN_G, block_m), jnp.int32))

  plgpu.emit_pipeline_warp_specialized(
      step, grid=(n_steps,), memory_registers=40, max_concurrent_steps=stages,
      num_compute_wgs=2, wg_axis="wg", compute_context=compute,
      in_specs=[x_spec, w_spec])(x_ref, w_ref)


def _gemm_call(x_int8_MK, packed_u16, vecs_3M, *, N: int, block_m: int, stages: int, out_dtype,
               warpgroups: int, k_slots: int, interpret: bool, num_splits: int = 1,
               profile: tuple[str, int] | None = None, planar: bool = False,
               scaled: bool = False):
  M, K = x_int8_MK.shape
  if scaled and (not planar or k_slots != 4 or warpgroups != 1):
    raise ValueError("scaled planes take planar decoding, 4 slot pairs a step (the GEMV) and "
                     "one warpgroup")
  rows = packed_u16.shape[1] * 8
  Mp = launch.round_up(M, block_m)
  x = permute_x_gemm(jnp.pad(x_int8_MK, ((0, Mp - M), (0, rows - K))), planar)
  fused = vecs_3M is not None
  n_steps = rows // (KS_G * k_slots)
  if n_steps % num_splits or (fused and num_splits > 1):
    raise ValueError(f"num_splits={num_splits} must divide the {n_steps} pipeline steps, and "
                     f"the fused epilogue takes no split")
  out_type = (jax.ShapeDtypeStruct((Mp, N), out_dtype) if fused
              else jax.ShapeDtypeStruct((N, Mp) if num_splits == 1 else (num_splits, N, Mp),
                                        jnp.int32))
  kw = dict(block_m=block_m, stages=stages, n_steps=n_steps // num_splits, k_slots=k_slots,
            interpret=interpret, num_splits=num_splits, planar=planar)
  if warpgroups == 1:
    body, extra = functools.partial(_kernel_g, scaled=scaled, **kw), {}
  else:
    out_dtype = jnp.dtype(out_dtype) if fused else jnp.dtype(jnp.int32)
    tile = (2, block_m, BN_G) if fused else (2, BN_G, block_m)
    scratch = [plgpu.SMEM(tile, out_dtype,
                          transforms=mgpu_util.tiles(out_dtype) if fused else ())]
    if fused:
      scratch += [plgpu.SMEM((2, 3, block_m), jnp.float32), plgpu.Barrier(num_barriers=2)]
    body = functools.partial(_kernel_g2, **kw)
    extra = dict(scratch_types=scratch, num_threads=3, thread_name="wg")
  split = num_splits > 1
  call = plgpu.kernel(
      body, out_type=out_type,
      grid=(N // (BN_G * warpgroups), Mp // block_m) + ((num_splits,) if split else ()),
      grid_names=("n", "m") + (("s",) if split else ()),
      compiler_params=mgpu_util.compiler_params(profile),
      interpret=mgpu_util.interpret_params(interpret),
      **extra,
  )
  return call(x, packed_u16, *(() if vecs_3M is None else (vecs_3M,)))


@functools.partial(jax.jit, static_argnames=("N", "block_m", "stages", "warpgroups", "k_slots",
                                             "num_splits", "profile", "interpret", "planar",
                                             "scaled"))
def gemm_sums(x_int8_MK, packed_u16, *, N: int, block_m: int, stages: int, warpgroups: int = 1,
              k_slots: int = 1, num_splits: int = 1, profile: tuple[str, int] | None = None,
              interpret: bool = False, planar: bool = False, scaled: bool = False):
  """int32 [N, Mp] = (q^T x^T) for an i2_t weight's words [N, rows / 8], q = t + 1 in {0, 1, 2}
  (the codes before the offset), x int8 [M, K] (Mp = M rounded up to block_m); x is padded and
  its columns permuted per 128-row step (`gemm_x_permutation`) in one XLA op. warpgroups: 1
  (64 output columns a program) or 2 (128: two consumer warpgroups sharing each x tile, a
  producer warpgroup issuing the loads); k_slots: slot pairs (128 K rows each) a pipeline step;
  num_splits > 1 (dividing the steps): [num_splits, N, Mp], the sums of each share of K;
  profile (dir, space): the Mosaic GPU profiler's trace of each launch (phases decode / mma);
  planar / scaled: `MosaicGPUConfig.planar_decode` / `planar_scaled`."""
  return _gemm_call(x_int8_MK, packed_u16, None, N=N, block_m=block_m, stages=stages,
                    out_dtype=None, warpgroups=warpgroups, k_slots=k_slots, interpret=interpret,
                    num_splits=num_splits, profile=profile, planar=planar, scaled=scaled)


@functools.partial(jax.jit, static_argnames=("N", "block_m", "stages", "out_dtype", "warpgroups",
                                             "k_slots", "profile", "interpret", "planar",
                                             "scaled"))
def gemm_fused(x_int8_MK, packed_u16, vecs_3M, *, N: int, block_m: int, stages: int, out_dtype,
               warpgroups: int = 1, k_slots: int = 1, profile: tuple[str, int] | None = None,
               interpret: bool = False, planar: bool = False, scaled: bool = False):
  """y [Mp, N] in out_dtype = ((q^T x^T)^T - s) * w * r, the epilogue in the kernel: vecs_3M
  float32 [3, Mp] holds s = sum_k x (as floats: exact), w = the weight scale and r = x's scale
  per row (zero rows past M). Same x preparation, warpgroups and k_slots as `gemm_sums`."""
  return _gemm_call(x_int8_MK, packed_u16, vecs_3M, N=N, block_m=block_m, stages=stages,
                    out_dtype=out_dtype, warpgroups=warpgroups, k_slots=k_slots,
                    interpret=interpret, profile=profile, planar=planar, scaled=scaled)


def smem_bytes_g(block_m: int, stages: int, warpgroups: int = 1, k_slots: int = 1) -> int:
  """Shared memory of the i2_t GEMM: `stages` x (x tile [block_m, 128 k_slots] int8 + words [64
  x warpgroups, 64] uint16 + a barrier), and the output tile ([64, block_m] int32, or the fused
  epilogue's y tile of at most 4 bytes an element and its [3, block_m] vectors): after the
  pipeline in its own scope with one warpgroup, one per consumer beside it with two."""
  pipe = stages * (block_m * KS_G * k_slots + BN_G * warpgroups * PW * 2 + 16)
  out = BN_G * block_m * 4 + 3 * block_m * 4 + 16
  return (max(pipe, out) if warpgroups == 1 else pipe + 2 * out) + 1024


def gemm_stages(block_m: int, requested: int | None, warpgroups: int = 1,
                k_slots: int = 1) -> int:
  """Pipeline stages of the GEMM: the request (default 4), at most what shared memory holds,
  at least 2 with one warpgroup (every step's wgmma is done when the step returns, so its
  tiles are free: exact at two on the H100) and 3 with two (the fewest run on the H100).
  NotSupported where even the fewest do not fit (large k_slots with large block_m)."""
  least = 2 if warpgroups == 1 else 3
  stages = max(least, requested or 4)
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  while stages > least and smem_bytes_g(block_m, stages, warpgroups, k_slots) > limit:
    stages -= 1
  need = smem_bytes_g(block_m, stages, warpgroups, k_slots)
  if need > limit:
    raise NotSupported(f"the i2_t GEMM with {warpgroups} warpgroup(s), {block_m}-row programs "
                       f"and {k_slots} slot pairs a step needs {need} bytes of shared memory at "
                       f"{stages} stages ({limit} available): lower gemm_block_m or gemm_k_slots")
  return stages


def mgpu_supported_g(M: int, packed, dtype) -> str | None:
  if packed.fmt != "i2_t" or packed.block != KT_T:
    return f"format {packed.fmt} (block {packed.block}): this kernel reads i2_t in {KT_T}-row blocks"
  if packed.shape[1] % BN_G:
    return f"N={packed.shape[1]} must be a multiple of {BN_G}"
  if jnp.dtype(dtype) != jnp.dtype(jnp.int8):
    return (f"activations in {jnp.dtype(dtype).name} with M={M} rows: the GEMM kernel is W2A8 "
            f"(int8 x, s8 wgmma); float x with M > {ROWS} takes the XLA path")
  return None


def _run_g(x_int8_MK, packed, x_scale_M, out_dtype, interpret, config):
  config = config or MosaicGPUConfig()
  config.validate()
  M = x_int8_MK.shape[0]
  N = packed.shape[1]
  warpgroups = config.gemm_warpgroups if N % (BN_G * config.gemm_warpgroups) == 0 else 1
  block_m = gemm_block_m(M, config.gemm_block_m)
  if warpgroups == 2:
    block_m = min(block_m, 128)      # two consumers' output tiles beside the pipeline
  k_slots = config.gemm_k_slots
  stages = gemm_stages(block_m, config.pipeline_depth, warpgroups, k_slots)
  return _s8_matmul(x_int8_MK, packed, x_scale_M, out_dtype, interpret, config,
                    block_m=block_m, stages=stages, warpgroups=warpgroups, k_slots=k_slots)


def _s8_matmul(x_int8_MK, packed, x_scale_M, out_dtype, interpret, config, *, block_m: int,
               stages: int, warpgroups: int, k_slots: int, splits: int = 1):
  """y [M, N] of the s8 GEMM kernel (`_run_g`, `_run_gv`): with one split and a per-tensor
  weight scale the epilogue in the kernel (`gemm_fused`, when config.fused_epilogue), else the
  int32 sums (of each share of K, added) and the epilogue in XLA."""
  M = x_int8_MK.shape[0]
  N = packed.shape[1]
  kw = dict(N=N, block_m=int(block_m), stages=int(stages), warpgroups=warpgroups,
            k_slots=int(k_slots), profile=_profile(config), interpret=bool(interpret),
            planar=bool(config.planar_decode),
            scaled=bool(config.planar_scaled) and k_slots == 4 and warpgroups == 1)
  xsum = jnp.sum(x_int8_MK, axis=1, dtype=jnp.int32)
  if splits == 1 and config.fused_epilogue and jnp.ndim(packed.scale) == 0:
    Mp = launch.round_up(M, block_m)
    pad = lambda v: jnp.pad(v, (0, Mp - M))
    vecs = jnp.stack([pad(xsum.astype(jnp.float32)),
                      jnp.broadcast_to(jnp.asarray(packed.scale, jnp.float32), (Mp,)),
                      pad(x_scale_M.astype(jnp.float32))])
    return gemm_fused(x_int8_MK, packed.packed, vecs, out_dtype=jnp.dtype(out_dtype), **kw)[:M]
  # per-column scales (`layout.concat_i2t`) take this path too
  sums = gemm_sums(x_int8_MK, packed.packed, num_splits=int(splits), **kw)
  if splits > 1:
    sums = jnp.sum(sums, axis=0)
  # the kernel's codes are q = t + 1: sum_k q x = sum_k t x + sum_k x (exact in int32)
  acc = sums[:, :M].T - xsum[:, None]
  y = acc.astype(jnp.float32) * packed.scale * x_scale_M.astype(jnp.float32)[:, None]
  return y.astype(out_dtype)


def _profile(config) -> tuple[str, int] | None:
  """The profiler's (dir, space) of a config, or None."""
  return None if config.profile_dir is None else (config.profile_dir, config.profile_space)


def gemv_block_m(M: int) -> int:
  """x rows a program of the s8 GEMV (M <= 64): M rounded up to 8, 16, 32 or 64 (row counts
  the s8 wgmma takes as its N)."""
  return next(b for b in (8, 16, 32, 64) if b >= M)


def gemv_splits(n_steps: int, programs: int, requested: int | None = None) -> int:
  """Programs along K of the s8 GEMV: the most that divides the 512-row blocks, at most the
  request (config.num_splits) or else ~2 programs an SM in all (`programs` column tiles)."""
  target = requested or max(1, launch.target_programs(2) // programs)
  return max(d for d in range(1, n_steps + 1) if n_steps % d == 0 and d <= target)


def _run_gv(x_int8_MK, packed, x_scale_M, out_dtype, interpret, config):
  """W2A8 decoding (M <= 64) on the GEMM's s8 wgmma: the codes q in {0, 1, 2} decoded as
  bytes (a shift and three logic instructions per 4 codes, against ~2.5 instructions per 2 codes
  for the 16-bit operand of `_run_t`), 8 / 16 / 32 / 64 x rows, a whole 512-row block a
  pipeline step (words fetched once), split along K; the split sums added, the offset
  subtracted and the scales applied in XLA (fused into the kernel without a split)."""
  M = x_int8_MK.shape[0]
  N = packed.shape[1]
  warpgroups = config.gemv_warpgroups if N % (BN_G * config.gemv_warpgroups) == 0 else 1
  block_m = gemv_block_m(M)
  n_steps = packed.rows // KT_T
  splits = gemv_splits(n_steps, N // (BN_G * warpgroups), config.num_splits)
  stages = gemm_stages(block_m, config.pipeline_depth, warpgroups, 4)
  return _s8_matmul(x_int8_MK, packed, x_scale_M, out_dtype, interpret, config,
                    block_m=block_m, stages=stages, warpgroups=warpgroups, k_slots=4,
                    splits=splits)


def lowbit_matmul(x_MK, packed, out_dtype, *, interpret: bool = False,
                  config: MosaicGPUConfig | None = None):
  """Arguments as `pallas_kernels.lowbit_matmul.lowbit_matmul` (checked there)."""
  return _run(x_MK, packed, None, out_dtype, interpret, config)


def lowbit_matmul_int8(x_int8_MK, x_scale_M, packed, out_dtype, *, interpret: bool = False,
                       config: MosaicGPUConfig | None = None):
  """Arguments as `pallas_kernels.lowbit_matmul.lowbit_matmul_int8` (checked there); exact."""
  return _run(x_int8_MK, packed, x_scale_M, out_dtype, interpret, config)

