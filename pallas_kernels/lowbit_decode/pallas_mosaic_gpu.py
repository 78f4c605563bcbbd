"""Decode attention over the packed low-bit KV cache as a Pallas Mosaic GPU kernel (Hopper: TMA
loads, dequantisation in registers, wgmma), the `pallas_mosaic_gpu` implementation of
`lowbit_decode_attention`, dense or over selected 64-token blocks.

Split-K as the Triton kernel: program (b, k, j) takes the j-th share of the packed 64-token
blocks of (sequence b, KV head k) -- every one below the length, or the selected ones (the
leading slots of the ascending index row that lie in the packed region) -- and writes an
online-softmax partial; the residual window (at most R full-precision tokens, masked to the
selected blocks) is one more partial computed in XLA, and `combine_splits` merges them. Per
block, `plgpu.emit_pipeline` brings in by TMA, `pipeline_depth` blocks ahead: the K and
V words [64, W] (int32, W = H * bits / 32), the K scales / zeros of the block's group [32 / bits,
W] and the V scales / zeros of its tokens [64]. Then, in registers:

- sub-word i of every word holds channels [i W, (i + 1) W) (`layout.py`): shift, mask, convert,
  times scale plus zero (per channel for K, per token for V), rounded once to the cache dtype, and
  stored as the column slab [:, i W:(i + 1) W] of a [64, H] shared-memory tile whose swizzle is
  one slab wide (2 W bytes), so a slab is whole swizzle rows;
- QK^T and PV are wgmmas over those tiles (the Q tile shares their swizzle, as the wgmma needs),
  the G query rows padded to the 64 rows of a warpgroup MMA.

So the kernel reads bits (4 bits a value plus the scales: ~3.8x fewer bytes than bf16) and keeps
the per-element work to a shift, an and, a convert and an FMA.

`MosaicGPUConfig.token_rows` (`_kernel_tok`) turns both products around so that tokens, not the
G query rows, fill the 64 rows of every MMA: S^T [64 tokens, NR] = K Q^T with each dequantised K
slab [64, W] as the wgmma's register operand (K never goes through shared memory), the online
softmax down S^T's columns (cross-warp reductions), and O^T [H, NR] += V^T P^T with the V tile
read transposed from shared memory and P^T [64, NR] stored there. The query rows are padded to NR
= the slab width (16 or 32) instead of 64, which shrinks the softmax work and the accumulators 4x or more, and
codes become floats without a conversion instruction (`decode_codes`: or into a float's mantissa,
one subtraction). Shapes: 4-bit with H in {128,
256}, 2-bit with H = 256 (a slab must be at least the 16 channels of a wgmma K step; with
`paired_slabs` the token-rows form also takes 4-bit H 64 and 2-bit H 128, two 8-channel sub-words
a register operand), k_mode
"channel", v_group = H, groups of a multiple of 64 tokens, selections of 64-token blocks,
bfloat16 / float16. Others raise
NotSupported and the dispatcher moves on (Triton, then XLA). Interpret mode (the Mosaic GPU
interpreter, CPU tests): plain dots in place of the wgmmas and no register layouts; the rest is
the same kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import combine_splits as combine_lib
from pallas_kernels import launch, online_softmax, tuned
from pallas_kernels import mgpu_util
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.lowbit_decode import layout

T = 64               # tokens per block (one wgmma row tile of keys)
ROWS = 64            # query rows of a warpgroup MMA (G padded to it)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
  """num_splits: programs per (sequence, KV head) (None: about programs_per_sm programs an SM,
  rounded down to a power of 2 of splits, as the Triton kernel); pipeline_depth: blocks in flight
  (TMA copies issued ahead); overlap: dequantise V while the QK^T wgmma runs (False, the measured
  default: after it, in series; the form with query rows only); token_rows: the token-rows form
  (module docstring; G <= W, V always dequantised during QK^T), None (the default) where G <= W and
  overlap is off -- on the H100 at S128K int4 it takes 0.146 / 0.960 / 1.896 ms at B1 / B8 / B16
  against the query-rows form's 0.210 / 1.488 / 2.930; profile_dir: write a Mosaic GPU profiler
  trace of every launch there (per-warpgroup timelines of the named phases dequant_k / qk /
  dequant_v / softmax / pv; `benchmarks/profile_mgpu.py` sums them), with room for profile_space
  phases a warpgroup; defer_sums (token-rows form): keep the softmax's running sums as a [64 tokens,
  NR] tile, rescaled and added to elementwise, and reduce it over the tokens once at the end,
  instead of a cross-warp sum every block (one of the two cross-warp reductions of the block's
  softmax; the same values up to float32 summation order; the default: on the H100 at S128K int4 it
  takes B1 / B8 from 0.147 / 0.960 ms to 0.144 / 0.955, and the 90%-sparse kernel from 0.042 / 0.140
  to 0.039 / 0.133; a per-block max from the K group's score bound instead of the cross-warp max was
  slower and has been removed); paired_slabs (token-rows form): take rows of 8 words (2-bit H 128,
  4-bit H 64), whose sub-words hold 8 channels each, as 16-channel register operands of two
  sub-words (`slab_width`); the default (on the H200 at S128K, 2-bit H 128: B1 / B8 0.148 / 0.968
  ms, where the Triton kernel takes 0.244 / 1.890); False refuses such caches; residual: how the
  residual window's partial (computed in XLA) joins the kernel's split partials: "merge" (the
  default: its scores and sums as elementwise products and reductions, merged with the splits in one
  XLA reduction: no GEMM launches and no concatenation of the partials; on the H100, int4 S32K /
  S128K: B1 47.6 / 139.4 us against 56.1 / 146.3, B8 equal) or "concat" (as one more split,
  concatenated to them, then `combine_splits`); auto_barriers: let Pallas put a warpgroup barrier
  before and after every shared-memory store and before every copy issue (the default), or (False)
  compile with `unsafe_no_auto_barriers` and place only the barriers the kernel needs: one before a
  block's first store into the dequantised tiles (the previous block's wgmmas, which other warps may
  still be waiting on, read them) and the `commit_smem` after its stores (which also orders every
  read of the pipeline slot before the copy that refills it). The token-rows loop then has 5
  barriers a block instead of 28 (`tests/kernels/test_lowbit_decode_mgpu.py` counts them in the
  lowered kernel); block_tokens: tokens a pipeline step of the token-rows form takes over every
  block (no selection, group a multiple of it): 64 (the default) or 128 (S^T and P^T of 128 rows:
  two wgmma row tiles, one softmax with one cross-warp max, one PV wgmma of K = 128 and half the
  steps' fixed costs -- barriers, waits, copies -- a token, for twice the registers of K and the
  shared V tile); selections keep 64-token blocks; magic_pairs (token-rows form): decode a register
  of two codes from the register pair of their words with one byte permute, one shift and one and /
  or (`mgpu_util.magic_from_words`) instead of shifting and masking both words and packing them
  (about half the integer instructions of the dequantisation); fold_v (token-rows form): store V's
  codes and fold each token's scale into P and its zero into a per-token sum (`_kernel_tok`): V's
  dequantisation loses its multiply and add (64 float operations a thread and block) for 8
  multiplies and 8 multiply-adds on the softmax tile."""
  num_splits: int | None = None
  programs_per_sm: int = 2
  pipeline_depth: int | None = None
  overlap: bool = False
  token_rows: bool | None = None
  profile_dir: str | None = None
  profile_space: int = 4096
  defer_sums: bool = True
  paired_slabs: bool = True
  residual: str = "merge"
  auto_barriers: bool = True
  block_tokens: int = 64
  magic_pairs: bool = False
  fold_v: bool = False

  def validate(self) -> None:
    if not isinstance(self.programs_per_sm, int) or self.programs_per_sm < 1:
      raise ValueError(f"config.programs_per_sm must be a positive int, got "
                       f"{self.programs_per_sm!r}")
    for name in ("num_splits", "pipeline_depth"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"config.{name} must be a positive int or None, got {v!r}")
    for name in ("overlap", "defer_sums", "paired_slabs", "auto_barriers",
                 "magic_pairs", "fold_v"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"config.{name} must be a bool, got {getattr(self, name)!r}")
    if self.token_rows is not None and not isinstance(self.token_rows, bool):
      raise ValueError(f"config.token_rows must be a bool or None, got {self.token_rows!r}")
    if self.profile_dir is not None and not isinstance(self.profile_dir, str):
      raise ValueError(f"config.profile_dir must be a path (str) or None, got {self.profile_dir!r}")
    if not isinstance(self.profile_space, int) or self.profile_space < 1:
      raise ValueError(f"config.profile_space must be a positive int, got {self.profile_space!r}")
    if self.block_tokens not in (T, 2 * T):
      raise ValueError(f"config.block_tokens must be {T} or {2 * T}, got {self.block_tokens!r}")
    if self.residual not in ("concat", "merge"):
      raise ValueError(f"config.residual must be 'concat' or 'merge', got {self.residual!r}")


CONFIG = MosaicGPUConfig


def mgpu_supported(H: int, bits: int, group: int, k_mode: str, v_group: int, dtype,
                   sparse: bool) -> str | None:
  """Why the kernel can't take these settings, or None if it can."""
  if sparse:
    return f"block selections of other than {T}-token blocks"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name}: the wgmma kernel takes bfloat16 / float16 only"
  W = layout.words_per_row(H, bits)
  if W not in (8, 16, 32) or H > 256:
    return (f"H={H} at {bits} bits gives slabs of W={W} channels; the kernel takes 16 or 32 "
            f"(4-bit H 128 / 256, 2-bit H 256), or 8 as pairs (`paired_slabs`: 4-bit H 64, "
            f"2-bit H 128)")
  if k_mode != "channel" or v_group != H:
    return f"k_mode={k_mode!r}, v_group={v_group}: the kernel takes K per channel, V per token"
  if group % T:
    return f"group={group} must be a multiple of the kernel's {T}-token blocks"
  return None


def _program_blocks(packed_ref, len_ref, nslots_ref, sparse: bool, num_splits: int,
                    tokens: int = T):
  """(b, k, split j, length, first block slot, block count) of this program: its share of the
  packed blocks of (sequence b, KV head k) -- with a selection, the leading slots of the index row
  whose blocks are packed (counted in XLA, `_selection`); else the packed blocks holding a valid
  token (a prefill may pack rows past the length)."""
  b = lax.axis_index("b")
  kh = lax.axis_index("k")
  j = lax.axis_index("s")
  length = len_ref[b]
  if sparse:
    n_blocks = nslots_ref[b, kh]
  else:
    n_blocks = lax.div(jnp.minimum(packed_ref[b], length) + (tokens - 1), jnp.int32(tokens))
  per_split = lax.div(n_blocks + (num_splits - 1), jnp.int32(num_splits))
  start = j * per_split
  return b, kh, j, length, start, jnp.clip(n_blocks - start, 0, per_split)


def _selection(block_indices_BKM, lengths_B, packed_B, B: int, K: int):
  """(idx int32 [B, K, M], nslots int32 [B, K]): the selected blocks and how many of the leading
  ones lie in the packed region below the length (ascending rows: a prefix); placeholders when
  there is no selection."""
  if block_indices_BKM is None:
    return jnp.zeros((B, K, 1), jnp.int32), jnp.zeros((B, K), jnp.int32)
  idx = block_indices_BKM.astype(jnp.int32)
  limit = (jnp.minimum(packed_B, lengths_B) + (T - 1)) // T
  return idx, jnp.sum((idx >= 0) & (idx < limit[:, None, None]), axis=-1, dtype=jnp.int32)


def _kernel(packed_ref, len_ref, nslots_ref, idx_ref, q_ref, kw_ref, vw_ref, ks_ref, kz_ref, vs_ref,
            vz_ref, o_ref, m_ref, l_ref, q_smem, kt_smem, vt_smem, q_bar, *, bits: int,
            group: int, num_splits: int, stages: int, scale_log2: float, sparse: bool,
            overlap: bool, interpret: bool, auto_barriers: bool = True):
  H = q_smem.shape[-1]
  W = layout.words_per_row(H, bits)
  subs = 32 // bits
  mask = layout.levels(bits)
  dtype = q_smem.dtype
  wgmma_layout = plgpu.Layout.WGMMA
  b, kh, j, length, start, steps = _program_blocks(packed_ref, len_ref, nslots_ref, sparse,
                                                   num_splits)

  def cast(x, lay):
    return x if interpret else plgpu.layout_cast(x, lay)

  def load(ref, lay):
    return ref[...] if interpret else mgpu_util.load(ref, lay)

  plgpu.copy_gmem_to_smem(q_ref.at[b, kh], q_smem, q_bar)
  plgpu.barrier_wait(q_bar)

  def dequant(words, scale_of, zero_of, per_token: bool, out_smem):
    """Slab i of the [T, H] tile from sub-word i of the words."""
    for i in range(subs):
      codes = (lax.shift_right_logical(words, jnp.int32(bits * i)) & mask).astype(jnp.float32)
      s, z = scale_of(i), zero_of(i)
      dims = [0] if per_token else [1]
      x = codes * lax.broadcast_in_dim(s, codes.shape, dims) + lax.broadcast_in_dim(
          z, codes.shape, dims)
      out_smem.at[:, pl.ds(i * W, W)][...] = x.astype(dtype)

  def step(indices, kw_smem, vw_smem, ks_smem, kz_smem, vs_smem, vz_smem, carry):
    acc, m_i, l_i = carry
    col = wgmma_layout.reduce(0)
    row = wgmma_layout.reduce(1)
    f32 = lambda x: x.astype(jnp.float32)
    if not auto_barriers:   # the previous block's wgmmas read kt / vt: every warp past its wait
      plgpu.commit_smem()

    def dequant_v():
      with jax.named_scope("dequant_v"):
        vs, vz = f32(load(vs_smem, row)), f32(load(vz_smem, row))
        dequant(load(vw_smem, wgmma_layout), lambda i: vs, lambda i: vz, True, vt_smem)

    with jax.named_scope("dequant_k"):
      dequant(load(kw_smem, wgmma_layout), lambda i: f32(load(ks_smem.at[i], col)),
              lambda i: f32(load(kz_smem.at[i], col)), False, kt_smem)
    if not overlap:
      dequant_v()
    plgpu.commit_smem()          # the generic-proxy stores, visible to the wgmmas
    if interpret:
      s = jnp.dot(q_smem[...], kt_smem[...].T, preferred_element_type=jnp.float32)
      if overlap:
        dequant_v()
    else:
      def compute_qk(acc_ref):
        with jax.named_scope("qk"):
          plgpu.wgmma(acc_ref, q_smem, mgpu_util.transposed(kt_smem))
          if overlap:            # V's unpacking runs while the tensor cores work on QK^T
            dequant_v()
          return acc_ref[...]    # waits for the wgmma
      s = pl.run_scoped(compute_qk, plgpu.ACC((ROWS, T), jnp.float32))
    if overlap:
      plgpu.commit_smem()
    with jax.named_scope("softmax"):
      valid = cols < length - blk(indices[0]) * T
      s = jnp.where(valid, s * scale_log2, online_softmax.MASK_VALUE)
      m_new = jnp.maximum(m_i, s.max(axis=1))
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.where(valid, jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0])), 0.0)
      l_new = l_i * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p16 = p.astype(dtype)
    with jax.named_scope("pv"):
      if interpret:
        acc = acc + jnp.dot(p16, vt_smem[...], preferred_element_type=jnp.float32)
      else:
        def compute_pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, vt_smem)
        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
    return acc, m_new, l_new

  cols = (lax.broadcasted_iota(jnp.int32, (ROWS, T), 1) if interpret else
          plgpu.broadcasted_iota(jnp.int32, (ROWS, T), 1, layout=wgmma_layout))
  blk = (lambda i: idx_ref[b, kh, start + i]) if sparse else (lambda i: start + i)
  grp = lambda i: lax.div(blk(i) * T, jnp.int32(group))
  words = mgpu_util.tiles(jnp.int32, W * 4)    # swizzled: conflict-free loads into WGMMA layout
  specs = [plgpu.BlockSpec((T, W), lambda i: (blk(i), 0), transforms=words),        # K words
           plgpu.BlockSpec((T, W), lambda i: (blk(i), 0), transforms=words),        # V words
           plgpu.BlockSpec((None, subs, W), lambda i: (grp(i), 0, 0)),     # K scales of the group
           plgpu.BlockSpec((None, subs, W), lambda i: (grp(i), 0, 0)),     # K zeros
           plgpu.BlockSpec((T,), lambda i: (blk(i),)),                      # V scales of the tokens
           plgpu.BlockSpec((T,), lambda i: (blk(i),))]                      # V zeros
  init = (cast(jnp.zeros((ROWS, H), jnp.float32), wgmma_layout),
          cast(jnp.full((ROWS,), online_softmax.MASK_VALUE, jnp.float32), wgmma_layout.reduce(1)),
          cast(jnp.zeros((ROWS,), jnp.float32), wgmma_layout.reduce(1)))
  acc, m_i, l_i = plgpu.emit_pipeline(
      step, grid=(steps,), in_specs=specs, max_concurrent_steps=stages, init_carry=init)(
          kw_ref.at[b, kh], vw_ref.at[b, kh], ks_ref.at[b, kh], kz_ref.at[b, kh],
          vs_ref.at[b, kh], vz_ref.at[b, kh])

  mgpu_util.store_partial(acc, m_i, l_i, o_ref, m_ref, l_ref, (b, kh, j))


_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


def decode_codes(codes, dtype):
  """int32 codes in [0, 2^bits) (bits <= 4) -> exactly those values in dtype, without a
  conversion instruction: each code, truncated to 16 bits and or-ed into the low mantissa of a
  float whose mantissa unit is 1.0 (`_MAGIC`), makes base + code; one subtraction leaves the
  code. (Truncating a pair of adjacent int32 codes to a 16-bit pair is a byte permute.)"""
  bits, base = _MAGIC[jnp.dtype(dtype)]
  u = codes.astype(jnp.uint16) | jnp.uint16(bits)
  return lax.bitcast_convert_type(u, dtype) - base


def slab_width(W: int) -> int:
  """Channels of the token-rows form's register operand: a wgmma K step takes 16, so rows of 8
  words (2-bit H 128, 4-bit H 64) pair sub-words 2 i and 2 i + 1 (contiguous channels)."""
  return max(W, 16)


def _kernel_tok(packed_ref, len_ref, nslots_ref, idx_ref, q_ref, kw_ref, vw_ref, ks_ref, kz_ref,
                vs_ref, vz_ref, *rest, bits: int, group: int, num_splits: int, stages: int,
                scale_log2: float, sparse: bool, defer_sums: bool,
                interpret: bool, auto_barriers: bool = True, tokens: int = T,
                magic_pairs: bool = False, fold_v: bool = False):
  """Tokens as the rows of every MMA (`MosaicGPUConfig.token_rows`): S^T [64 tokens, NR] = K Q^T
  with the dequantised K slabs [64, W] as the wgmma's register operand (K never touches shared
  memory), the online softmax over the tokens (down each column of S^T: cross-warp reductions),
  and O^T [H, NR] +=
  V^T P^T with V dequantised into a [64, H] shared tile read transposed and P^T stored [64, NR].
  NR = `slab_width(W)` (the query rows padded to one swizzle of the slabs), not the 64 rows of
  the other form. tokens: the tokens a pipeline step takes (TB: 64, or 128 without a
  selection: two 64-row wgmma tiles a product, one softmax, one PV wgmma of K = 128). fold_v:
  the V tile holds the codes; each token's scale multiplies P instead (P' = P s_t, what the PV
  wgmma reads) and its zero enters as sum_t P z_t, kept as a per-token tile like the deferred
  sums and added to every channel at the end: O^T = codes^T P'^T + 1 (z^T P^T)."""
  o_ref, m_ref, l_ref, q_smem, v_smem, p_smem, q_bar = rest
  TB = tokens
  NR, H = q_smem.shape
  W = layout.words_per_row(H, bits)
  subs = 32 // bits
  SW = slab_width(W)            # channels a register operand: W, or two sub-words' 2 W
  pairs = SW // W
  slabs_n = subs // pairs
  mask = layout.levels(bits)
  dtype = q_smem.dtype
  wgmma_layout = plgpu.Layout.WGMMA
  col = wgmma_layout.reduce(0)      # a vector along the columns (one value a query row)
  row = wgmma_layout.reduce(1)      # a vector along the rows (one value a token / channel)
  b, kh, j, length, start, steps = _program_blocks(packed_ref, len_ref, nslots_ref, sparse,
                                                   num_splits, TB)

  def cast(x, lay):
    return x if interpret else plgpu.layout_cast(x, lay)

  def load(ref, lay):
    return ref[...] if interpret else mgpu_util.load(ref, lay)

  def bcast(v, shape, dim):
    return lax.broadcast_in_dim(v, shape, [dim])

  plgpu.copy_gmem_to_smem(q_ref.at[b, kh], q_smem, q_bar)
  plgpu.barrier_wait(q_bar)

  def slabs(words, i):
    """Slab i of the [64, W] words: channels [i SW, (i + 1) SW), as dtype codes: sub-word i, or
    with 8-word rows sub-words 2 i and 2 i + 1 side by side (channels [16 i, 16 i + 16):
    `mgpu_util.concat_columns`, each thread already holds both halves)."""
    if magic_pairs and not interpret:   # one permute, shift and LOP3 a register
      pattern, base = _MAGIC[jnp.dtype(dtype)]
      parts = [mgpu_util.magic_from_words(words, pairs * i + h, bits, pattern, dtype,
                                          wgmma_layout) for h in range(pairs)]
      return (parts[0] if pairs == 1 else
              mgpu_util.concat_columns(*parts, wgmma_layout)) - base
    parts = [lax.shift_right_logical(words, jnp.int32(bits * (pairs * i + h))) & mask
             for h in range(pairs)]
    if pairs > 1:
      parts = [jnp.concatenate(parts, axis=1) if interpret
               else mgpu_util.concat_columns(*parts, wgmma_layout)]
    return decode_codes(parts[0], dtype)

  def step(indices, kw_smem, vw_smem, ks_smem, kz_smem, vs_smem, vz_smem, carry):
    acc, m_i, l_i, *zl = carry
    with jax.named_scope("dequant_k"):
      kwords = load(kw_smem, wgmma_layout)
      k_slabs = [slabs(kwords, i) * bcast(load(ks_smem.at[i], col), (TB, SW), 1)
                 + bcast(load(kz_smem.at[i], col), (TB, SW), 1) for i in range(slabs_n)]

    def dequant_v():
      with jax.named_scope("dequant_v"):
        vwords = load(vw_smem, wgmma_layout)
        if not fold_v:          # (fold_v: the scales and zeros act in the softmax instead)
          vscale, vzero = load(vs_smem, row), load(vz_smem, row)
        if not auto_barriers:   # the previous block's PV wgmma read v / p: every warp past it
          plgpu.commit_smem()
        for i in range(slabs_n):
          x = slabs(vwords, i)
          if not fold_v:
            x = x * bcast(vscale, (TB, SW), 0) + bcast(vzero, (TB, SW), 0)
          v_smem.at[:, pl.ds(i * SW, SW)][...] = x
        plgpu.commit_smem()

    if interpret:
      s = sum(jnp.dot(k_slabs[i], q_smem[:, i * SW:(i + 1) * SW].T,
                      preferred_element_type=jnp.float32) for i in range(slabs_n))
      dequant_v()
    else:
      def compute_qk(acc_ref):
        with jax.named_scope("qk"):
          for i in range(slabs_n):
            plgpu.wgmma(acc_ref, k_slabs[i],
                        mgpu_util.transposed(q_smem.at[:, pl.ds(i * SW, SW)]))
          dequant_v()            # while the tensor cores work on S^T
          return acc_ref[...]
      s = pl.run_scoped(compute_qk, plgpu.ACC((TB, NR), jnp.float32))
    with jax.named_scope("softmax"):
      rows_t = (lax.broadcasted_iota(jnp.int32, (TB, NR), 0) if interpret else
                plgpu.broadcasted_iota(jnp.int32, (TB, NR), 0, layout=wgmma_layout))
      valid = rows_t < length - blk(indices[0]) * TB
      s = jnp.where(valid, s * scale_log2, online_softmax.MASK_VALUE)
      m_new = jnp.maximum(m_i, s.max(axis=0))
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.where(valid, jnp.exp2(s - bcast(m_new, s.shape, 1)), 0.0)
      if defer_sums:   # l_i: [TB, NR] per-token partial sums, reduced once after the loop
        l_new = l_i * bcast(alpha, s.shape, 1) + p
      else:
        l_new = l_i * alpha + p.sum(axis=0)
      acc = acc * bcast(alpha, acc.shape, 1)
      if fold_v:   # P' = P s_t for the codes' PV wgmma; sum_t P z_t deferred per token
        vs_t = bcast(load(vs_smem, row).astype(jnp.float32), s.shape, 0)
        zl = [zl[0] * bcast(alpha, s.shape, 1)
              + p * bcast(load(vz_smem, row).astype(jnp.float32), s.shape, 0)]
        p = p * vs_t
      p_smem[...] = p.astype(dtype)
      plgpu.commit_smem()
    with jax.named_scope("pv"):
      if interpret:
        acc = acc + jnp.dot(v_smem[...].T, p_smem[...], preferred_element_type=jnp.float32)
      else:
        def compute_pv(acc_ref):
          plgpu.wgmma(acc_ref, mgpu_util.transposed(v_smem), p_smem)
        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
    return (acc, m_new, l_new, *zl)

  blk = (lambda i: idx_ref[b, kh, start + i]) if sparse else (lambda i: start + i)
  grp = lambda i: lax.div(blk(i) * TB, jnp.int32(group))
  words = mgpu_util.tiles(jnp.int32, W * 4)
  specs = [plgpu.BlockSpec((TB, W), lambda i: (blk(i), 0), transforms=words),        # K words
           plgpu.BlockSpec((TB, W), lambda i: (blk(i), 0), transforms=words),        # V words
           plgpu.BlockSpec((None, slabs_n, SW), lambda i: (grp(i), 0, 0)),  # K scales, group
           plgpu.BlockSpec((None, slabs_n, SW), lambda i: (grp(i), 0, 0)),  # K zeros
           plgpu.BlockSpec((TB,), lambda i: (blk(i),)),                      # V scales of the tokens
           plgpu.BlockSpec((TB,), lambda i: (blk(i),))]                      # V zeros
  refs = [kw_ref.at[b, kh], vw_ref.at[b, kh], ks_ref.at[b, kh], kz_ref.at[b, kh],
          vs_ref.at[b, kh], vz_ref.at[b, kh]]
  init = (cast(jnp.zeros((H, NR), jnp.float32), wgmma_layout),
          cast(jnp.full((NR,), online_softmax.MASK_VALUE, jnp.float32), col),
          cast(jnp.zeros((TB, NR), jnp.float32), wgmma_layout) if defer_sums else
          cast(jnp.zeros((NR,), jnp.float32), col))
  if fold_v:
    init += (cast(jnp.zeros((TB, NR), jnp.float32), wgmma_layout),)
  acc, m_i, l_i, *zl = plgpu.emit_pipeline(
      step, grid=(steps,), in_specs=specs, max_concurrent_steps=stages, init_carry=init)(*refs)
  if defer_sums:
    l_i = l_i.sum(axis=0)
  if fold_v:   # the zeros' term, the same for every channel of a query row
    acc = acc + bcast(zl[0].sum(axis=0), acc.shape, 1)

  def store(o_smem, m_smem, l_smem):
    o_smem[...] = acc
    m_smem[...] = m_i * math.log(2.0)
    l_smem[...] = l_i
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, kh, j])
    plgpu.copy_smem_to_gmem(m_smem, m_ref.at[b, kh, j])
    plgpu.copy_smem_to_gmem(l_smem, l_ref.at[b, kh, j])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((H, NR), jnp.float32), plgpu.SMEM((NR,), jnp.float32),
                plgpu.SMEM((NR,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("bits", "group", "num_splits", "stages", "profile",
                                             "defer_sums", "auto_barriers",
                                             "tokens", "magic_pairs", "transpose_o",
                                             "fold_v", "interpret"))
def packed_partials_tok(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths_B,
                        packed_B, block_indices_BKM=None, *, bits: int, group: int,
                        num_splits: int, stages: int, profile: tuple[str, int] | None = None,
                        defer_sums: bool = False,
                        auto_barriers: bool = True, tokens: int = T, magic_pairs: bool = False,
                        transpose_o: bool = True, fold_v: bool = False,
                        interpret: bool = False):
  """`packed_partials` of the token-rows kernel: o f32 [B, K, N, RO, H] (transpose_o=False: as
  the kernel writes it, [B, K, N, H, RO]), m / l f32 [B, K, N, RO] (RO = G rounded up to 8).
  tokens: a pipeline step's tokens, 64 or (dense, group a multiple of 128) 128."""
  if tokens not in (T, 2 * T):
    raise ValueError(f"tokens must be {T} or {2 * T}, got {tokens}")
  if tokens != T and (block_indices_BKM is not None or group % tokens):
    raise ValueError(f"tokens={tokens} takes no block selection, and a group "
                     f"that is a multiple of it (group={group})")
  B, K, G, H = q_BKGH.shape
  S = k_packed.shape[2]
  W = layout.words_per_row(H, bits)
  subs = 32 // bits
  NR = slab_width(W)
  RO = launch.round_up(G, 8)
  dtype = q_BKGH.dtype
  swz = NR * jnp.dtype(dtype).itemsize
  qp = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, NR - G), (0, 0)))
  sparse = block_indices_BKM is not None
  idx, nslots = _selection(block_indices_BKM, lengths_B, packed_B, B, K)
  scale_log2 = H ** -0.5 * LOG2E
  kernel = functools.partial(_kernel_tok, bits=bits, group=group, num_splits=num_splits,
                             stages=stages, scale_log2=scale_log2, sparse=sparse,
                             defer_sums=defer_sums, interpret=interpret,
                             auto_barriers=auto_barriers, tokens=tokens,
                             magic_pairs=magic_pairs, fold_v=fold_v)
  f32 = jnp.float32
  interp = mgpu_util.interpret_params(interpret)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((B, K, num_splits, H, NR), f32),
                jax.ShapeDtypeStruct((B, K, num_splits, NR), f32),
                jax.ShapeDtypeStruct((B, K, num_splits, NR), f32)),
      scratch_types=(plgpu.SMEM((NR, H), dtype, transforms=mgpu_util.tiles(dtype, swz)),
                     plgpu.SMEM((tokens, H), dtype, transforms=mgpu_util.tiles(dtype, swz)),
                     plgpu.SMEM((tokens, NR), dtype, transforms=mgpu_util.tiles(dtype, swz)),
                     plgpu.Barrier(num_arrivals=1)),
      grid=(B, K, num_splits),
      grid_names=("b", "k", "s"),
      compiler_params=mgpu_util.compiler_params(profile, auto_barriers),
      interpret=interp,
  )
  o, m, l = call(packed_B.astype(jnp.int32), lengths_B.astype(jnp.int32), nslots, idx, qp,
                 k_packed, v_packed,
                 # [subs, W] per group -> [slabs, NR]: row i = channels [i NR, (i + 1) NR)
                 k_scale.reshape(B, K, S // group, subs * W // NR, NR),
                 k_zero.reshape(B, K, S // group, subs * W // NR, NR),
                 v_scale.reshape(B, K, S), v_zero.reshape(B, K, S))
  if not transpose_o:
    return o[..., :RO], m[..., :RO], l[..., :RO]
  return o.transpose(0, 1, 2, 4, 3)[..., :RO, :], m[..., :RO], l[..., :RO]


@functools.partial(jax.jit, static_argnames=("bits", "group", "num_splits", "stages", "overlap",
                                             "profile", "auto_barriers", "interpret"))
def packed_partials(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths_B,
                    packed_B, block_indices_BKM=None, *, bits: int, group: int, num_splits: int,
                    stages: int, overlap: bool = False, profile: tuple[str, int] | None = None,
                    auto_barriers: bool = True, interpret: bool = False):
  """The kernel's partials over the packed tokens below the length (with block_indices_BKM, int32
  [B, K, M] of 64-token blocks: over the selected packed blocks only): o f32 [B, K, N, RO, H],
  m / l f32 [B, K, N, RO] (N = num_splits, RO = G rounded up to 8)."""
  B, K, G, H = q_BKGH.shape
  S = k_packed.shape[2]
  W = layout.words_per_row(H, bits)
  subs = 32 // bits
  RO = launch.round_up(G, 8)
  dtype = q_BKGH.dtype
  swz = W * jnp.dtype(dtype).itemsize        # one slab of channels per swizzle row
  q64 = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, ROWS - G), (0, 0)))      # rows >= G: zeros
  sparse = block_indices_BKM is not None
  idx, nslots = _selection(block_indices_BKM, lengths_B, packed_B, B, K)
  kernel = functools.partial(_kernel, bits=bits, group=group, num_splits=num_splits,
                             stages=stages, scale_log2=H ** -0.5 * LOG2E, sparse=sparse,
                             overlap=overlap, interpret=interpret,
                             auto_barriers=auto_barriers)
  f32 = jnp.float32
  interp = mgpu_util.interpret_params(interpret)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((B, K, num_splits, RO, H), f32),
                jax.ShapeDtypeStruct((B, K, num_splits, RO), f32),
                jax.ShapeDtypeStruct((B, K, num_splits, RO), f32)),
      scratch_types=(plgpu.SMEM((ROWS, H), dtype, transforms=mgpu_util.tiles(dtype, swz)),
                     plgpu.SMEM((T, H), dtype, transforms=mgpu_util.tiles(dtype, swz)),
                     plgpu.SMEM((T, H), dtype, transforms=mgpu_util.tiles(dtype, swz)),
                     plgpu.Barrier(num_arrivals=1)),
      grid=(B, K, num_splits),
      grid_names=("b", "k", "s"),
      compiler_params=mgpu_util.compiler_params(profile, auto_barriers),
      interpret=interp,
  )
  return call(packed_B.astype(jnp.int32), lengths_B.astype(jnp.int32), nslots, idx, q64,
              k_packed, v_packed,
              k_scale.reshape(B, K, S // group, subs, W), k_zero.reshape(B, K, S // group, subs, W),
              v_scale.reshape(B, K, S), v_zero.reshape(B, K, S))


def _residual_valid(R: int, lengths_B, packed_B, block_indices_BKM, block_size):
  """bool [B, 1 or K, 1, R]: residual slots holding a valid token ([0, length_b - packed_b)),
  with block_indices_BKM only those of the selected blocks."""
  r = jnp.arange(R)
  valid = (r[None, :] < (lengths_B - packed_B)[:, None])[:, None, :]               # [B, 1, R]
  if block_indices_BKM is not None:
    blocks = (packed_B[:, None] + r[None, :]) // block_size                          # [B, R]
    chosen = jnp.any(block_indices_BKM[:, :, :, None] == blocks[:, None, None, :], axis=2)
    valid = valid & chosen                                                          # [B, K, R]
  return valid[:, :, None, :]


def residual_partial(q_BKGH, res_k, res_v, lengths_B, packed_B, rows: int,
                     block_indices_BKM=None, block_size: int | None = None):
  """The residual window's partial in XLA (tokens [packed_b, length_b) in residual slots
  [0, length_b - packed_b); with block_indices_BKM, only those of the selected blocks):
  o f32 [B, K, 1, rows, H], m / l f32 [B, K, 1, rows]."""
  B, K, G, H = q_BKGH.shape
  s = jnp.einsum("bkgh,bkrh->bkgr", q_BKGH.astype(jnp.float32), res_k.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST) * H ** -0.5
  valid = _residual_valid(res_k.shape[2], lengths_B, packed_B, block_indices_BKM, block_size)
  s = jnp.where(valid, s, online_softmax.MASK_VALUE)
  m = jnp.max(s, axis=-1)
  p = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
  o = jnp.einsum("bkgr,bkrh->bkgh", p, res_v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  pad = ((0, 0), (0, 0), (0, rows - G))
  return (jnp.pad(o, pad + ((0, 0),))[:, :, None], jnp.pad(m, pad)[:, :, None],
          jnp.pad(jnp.sum(p, axis=-1), pad)[:, :, None])


def residual_merged(q_BKGH, res_k, res_v, lengths_B, packed_B, o, m, l, block_indices_BKM=None,
                    block_size: int | None = None, o_rows_last: bool = False) -> jax.Array:
  """MosaicGPUConfig(residual="merge"): the residual window's partial as elementwise products and
  reductions (float32), merged with the kernel's split partials o [B, K, N, rows, H] (o_rows_last:
  [B, K, N, H, rows], as the token-rows kernel writes it, read in place instead of transposed
  first), m / l [B, K, N, rows] in one pass (the `combine_splits` merge with one more term).
  Returns [B, K, G, H] in q's dtype; rows with no valid token are zeros."""
  B, K, G, H = q_BKGH.shape
  q = q_BKGH.astype(jnp.float32)
  s = jnp.sum(q[:, :, :, None, :] * res_k.astype(jnp.float32)[:, :, None], axis=-1) * H ** -0.5
  valid = _residual_valid(res_k.shape[2], lengths_B, packed_B, block_indices_BKM, block_size)
  s = jnp.where(valid, s, online_softmax.MASK_VALUE)
  m_s, l_s = m[:, :, :, :G], l[:, :, :, :G]
  mx = jnp.maximum(jnp.max(m_s, axis=2), jnp.max(s, axis=-1))                        # [B, K, G]
  p = jnp.where(valid, jnp.exp(s - mx[..., None]), 0.0)                               # [B, K, G, R]
  w = jnp.exp(m_s - mx[:, :, None])                                                 # [B, K, N, G]
  den = jnp.sum(w * l_s, axis=2) + jnp.sum(p, axis=-1)
  if o_rows_last:   # sum over the splits in o's own layout; only the [H, G] result moves
    o_part = jnp.swapaxes(jnp.sum(w[:, :, :, None, :] * o[..., :G], axis=2), -1, -2)
  else:
    o_part = jnp.sum(w[..., None] * o[:, :, :, :G], axis=2)
  num = o_part + jnp.sum(p[..., None] * res_v.astype(jnp.float32)[:, :, None], axis=3)
  return (num / jnp.where(den > 0, den, 1.0)[..., None]).astype(q_BKGH.dtype)


def smem_bytes(H: int, stages: int, bits: int, dtype, tokens: int = T) -> int:
  """Shared memory of a program (an upper bound for either form): the query and two [tokens, H]
  tiles, and the pipeline's stages (K / V words, the group's K scales / zeros, the V ones) or the
  epilogue's partial, whichever is larger."""
  isz = jnp.dtype(dtype).itemsize
  W = layout.words_per_row(H, bits)
  per_stage = 2 * tokens * W * 4 + 2 * (32 // bits) * W * isz + 2 * tokens * isz
  return (ROWS * H * isz + 2 * tokens * H * isz + max(stages * per_stage, ROWS * H * 4 + 512)
          + 1024)


def lowbit_decode_attention(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                            res_v, lengths_B, packed_B, *, bits: int, group: int, k_mode: str,
                            v_group: int, block_indices_BKM=None, block_size=None,
                            num_live_BK=None, interpret: bool = False,
                            config: MosaicGPUConfig | None = None):
  """As `pallas_kernels.lowbit_decode_attention` (arguments checked there)."""
  require_platform("gpu", interpret, "the Mosaic GPU low-bit decode kernel")
  B, K, G, H = q_BKGH.shape
  why = mgpu_supported(H, bits, group, k_mode, v_group, q_BKGH.dtype,
                       block_indices_BKM is not None and block_size != T)
  if why is not None:
    raise NotSupported(why)
  if G > ROWS:
    raise NotSupported(f"G={G} query heads per KV head must be <= {ROWS}")
  config = config or MosaicGPUConfig()
  config.validate()
  W = layout.words_per_row(H, bits)
  if W < 16 and not config.paired_slabs:
    raise NotSupported(f"H={H} at {bits} bits gives slabs of W={W} channels: the kernel takes "
                       f"16 or 32, or 8 as pairs with MosaicGPUConfig(paired_slabs=True)")
  NR = slab_width(W)
  if config.token_rows and G > NR:
    raise NotSupported(f"token_rows: G={G} query heads per KV head must be <= {NR}")
  token_rows = G <= NR and not config.overlap if config.token_rows is None else config.token_rows
  if not token_rows and W < 16:
    raise NotSupported(f"H={H} at {bits} bits (rows of {W} words) runs the token-rows form only "
                       f"(G <= {NR}, no overlap); the query-rows form takes slabs of 16 or 32")
  # 128-token steps: the token-rows form over every block (no selection)
  tokens = (config.block_tokens if token_rows and block_indices_BKM is None
            and group % config.block_tokens == 0 else T)
  stages = config.pipeline_depth or 3
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  while stages > 1 and smem_bytes(H, stages, bits, q_BKGH.dtype, tokens) > limit:
    stages -= 1
  S = k_packed.shape[2]
  units = block_indices_BKM.shape[-1] if block_indices_BKM is not None else max(1, S // tokens)
  num_splits = config.num_splits or launch.default_num_splits(
      B * K, units, launch.target_programs(config.programs_per_sm))
  if block_indices_BKM is not None:
    block_indices_BKM = block_indices_BKM.astype(jnp.int32)
  profile = None if config.profile_dir is None else (config.profile_dir, config.profile_space)
  if token_rows:
    o, m, l = packed_partials_tok(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
                                  lengths_B.astype(jnp.int32), packed_B.astype(jnp.int32),
                                  block_indices_BKM, bits=int(bits), group=int(group),
                                  num_splits=int(num_splits), stages=int(stages),
                                  profile=profile, defer_sums=bool(config.defer_sums),
                                  auto_barriers=bool(config.auto_barriers),
                                  tokens=int(tokens), magic_pairs=bool(config.magic_pairs),
                                  transpose_o=config.residual != "merge",
                                  fold_v=bool(config.fold_v),
                                  interpret=bool(interpret))
  else:
    o, m, l = packed_partials(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
                              lengths_B.astype(jnp.int32), packed_B.astype(jnp.int32),
                              block_indices_BKM, bits=int(bits), group=int(group),
                              num_splits=int(num_splits), stages=int(stages),
                              overlap=config.overlap, profile=profile,
                              auto_barriers=bool(config.auto_barriers),
                              interpret=bool(interpret))
  if config.residual == "merge":
    return residual_merged(q_BKGH, res_k, res_v, lengths_B.astype(jnp.int32),
                           packed_B.astype(jnp.int32), o, m, l, block_indices_BKM, T,
                           o_rows_last=token_rows)
  ro, rm, rl = residual_partial(q_BKGH, res_k, res_v, lengths_B.astype(jnp.int32),
                                packed_B.astype(jnp.int32), o.shape[-2], block_indices_BKM, T)
  o = jnp.concatenate([o, ro], axis=2)
  m = jnp.concatenate([m, rm], axis=2)
  l = jnp.concatenate([l, rl], axis=2)
  many = o.shape[2] >= tuned.lookup("combine_splits", "pallas_triton")["min_splits"]
  impl = ("pallas_triton", "xla") if many and not interpret else "xla"
  return combine_lib.combine_splits(o, m, l, G, q_BKGH.dtype, implementation=impl)
