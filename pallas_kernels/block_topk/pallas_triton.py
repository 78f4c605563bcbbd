"""Top-k block selection as one Pallas Triton program per row (`block_topk`'s `pallas_triton`,
the GPU default).

A program holds the row's N scores in registers, finds the k-th largest score exactly by a bracket
search over its order-preserving int32 key (two thresholds per counting pass, ~10-11 passes on
Gaussian scores, at most 21; no sort; it stops as soon as exactly k keys lie at or above the
bracket: 5.7-6.2 us of kernel time for 64 rows of 2048 on the H200, of which 2.0 us is the kernel
without its search), then resolves ties by index and compacts the ascending ids with one prefix
sum. A row with at most k valid blocks (a short sequence in a long cache) skips the search: all
its valid blocks are selected (7.5 -> 2.0 us at B8, 32 of 2048 blocks valid, k = 64). Equal to
the reference on every integer (tested in interpret mode and on the GPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch, tuned
from pallas_kernels.block_topk.reference import output_width, prefix_output_width
from pallas_kernels.dispatch import NotSupported, require_platform

INT32_MIN = np.int32(-2**31)
INT32_MAX_POSITIVE = np.int32(2**31 - 1)
KEY_ABOVE_ALL = np.int32(0x7F800001)   # the order key of +inf, plus one
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The kernel's single prefix sum packs two counts of up to Np into the halves of an int32.
MAX_BLOCKS = 1 << 15


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """num_warps per row (None: tuned by row length -- registers hold a handful of [Np] vectors;
  at Np = 2048 on the H200, 1 / 2 / 4 / 8 / 16 warps: 21.8 / 13.4 / 8.8 / 7.4 / 7.4 us)."""
  num_warps: int | None = None


CONFIG = TritonConfig


def _select(key, valid, k, few, n_pad):
  """(sel bool [Np], pos int32 [Np]): the k largest keys (ties to the lower index) among the
  valid ones, and each selected key's rank among the selected in index order. The valid keys
  must be a prefix of the row (the invalid ones, -inf, after it); `few` (at most k valid)
  selects every valid key without a search."""
  # The k-th largest key T is the largest t with #(key >= t) >= k. The search keeps a bracket
  # lo <= T < hi (#(key >= lo) >= k > #(key >= hi)) and cuts it in three per pass: two candidate
  # thresholds at about 1/3 and 2/3 of [lo, hi), both counted by ONE row reduction (the two
  # counts, each <= Np <= 2^15, packed in the halves of an int32 sum). Each pass is one dependent
  # cross-warp reduction: a ternary pass ~0.37 us at Np = 2048 and 8 warps on the H200 (a one-bit
  # pass was ~0.24 us), ~3.7 of the kernel's 5.7 us (topk_variants.json). A third of the bracket
  # per pass needs ~10-11 passes on Gaussian, exponential or Cauchy scores (N = 2048, k = 64..205)
  # where one bit per pass needed ~16-17, and at most 21 (many ties) instead of 32. The search
  # stops as soon as exactly k keys lie at or above lo (those k are then the selection) or the
  # bracket is one key wide (T = lo). Counting 2^r candidates per pass as [2^r, Np] compares
  # summed along one axis was measured slower (r = 2, 4, 8: 10 / 17 / 37 us against 7.7 us for
  # 32 one-bit passes: selector.json).
  def more(c):
    lo, hi, count_lo, _ = c
    return (count_lo != k) & (hi - lo != 1)   # (hi - lo wraps past 2^31: compare with != only)

  def pass_step(c):
    lo, hi, count_lo, count_hi = c
    width = hi - lo                                        # as unsigned: the bracket is < 2^32
    half = lax.shift_right_logical(width, 1)
    third = jnp.maximum(half // 3 + half // 3, 1)          # ~width / 3, no int32 overflow
    c1 = lo + third
    c2 = jnp.minimum(c1 + third, hi - 1)
    packed = jnp.sum((key >= c1).astype(jnp.int32) + lax.shift_left((key >= c2).astype(jnp.int32), 16))
    n1 = packed & 0xFFFF
    n2 = lax.shift_right_logical(packed, 16)
    # the new bracket: [c2, hi) if n2 >= k, [c1, c2) if only n1 >= k, else [lo, c1)
    return (jnp.where(n2 >= k, c2, jnp.where(n1 >= k, c1, lo)),
            jnp.where(n2 >= k, hi, jnp.where(n1 >= k, c2, c1)),
            jnp.where(n2 >= k, n2, jnp.where(n1 >= k, n1, count_lo)),
            jnp.where(n2 >= k, count_hi, jnp.where(n1 >= k, n2, n1)))

  # key(+inf) + 1 is above every key (NaN scores are -inf by now); INT32_MIN is at or below all.
  # With at most k valid blocks every valid one is selected: the loop is skipped (count_lo = k
  # stands for "take all at or above INT32_MIN", and `& valid` below keeps the valid ones, a
  # prefix), where the search would run its maximum ~21 passes to separate the -inf padding.
  init = (INT32_MIN, jnp.int32(KEY_ABOVE_ALL), jnp.where(few, jnp.int32(k), jnp.int32(n_pad)),
          jnp.int32(0))
  t, hi, count_lo, count_hi = lax.while_loop(more, pass_step, init)
  above = key > t
  tie = key == t
  # Ties to take, lowest ids first: with exactly k keys at or above t, all of them (k is enough);
  # else the bracket is [t, t + 1) and count_hi = #(key > t).
  need = jnp.where(count_lo == k, k, k - count_hi)
  # One prefix sum for both counts: #above in the low 16 bits, #tie in the high ones (N < 2^15).
  packed = jnp.cumsum(above.astype(jnp.int32) + lax.shift_left(tie.astype(jnp.int32), 16))
  cum_above = packed & 0xFFFF
  cum_tie = lax.shift_right_logical(packed, 16)                        # 1-based rank among ties
  sel = (above | (tie & (cum_tie <= need))) & valid
  # position among the selected = selected at or before it - 1 (the taken ties are a prefix)
  pos = cum_above + jnp.minimum(cum_tie, need) - 1
  return sel, pos


def _topk_kernel(len_ref, s_ref, idx_ref, n_ref, *, block_size: int, n_blocks: int, k: int,
                 local_tokens: int = 1):
  """Program (b, h). len_ref int32 []; s_ref f32 [Np] (Np a power of 2 >= N, padding ignored);
  idx_ref int32 [M]; n_ref int32 []."""
  length = len_ref[()]
  n_pad = s_ref.shape[0]
  ar = lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
  nb = (length + block_size - 1) // block_size
  valid = (ar < nb) & (ar < n_blocks)
  first_local = jnp.maximum(length - local_tokens, 0) // block_size   # nb - 1 for local_tokens 1
  forced = valid & ((ar == 0) | (ar >= first_local))
  s = s_ref[...].astype(jnp.float32)
  s = jnp.where(s != s, -jnp.inf, s)                                   # NaN -> -inf
  # a +inf score must not tie with (and, by a lower id, displace) a forced block
  s = jnp.minimum(s, FLOAT32_MAX)
  s = jnp.where(forced, jnp.inf, jnp.where(valid, s, -jnp.inf))
  bits = lax.bitcast_convert_type(s, jnp.int32)
  # int32 key with the float order: negative floats have their magnitude bits flipped
  key = jnp.where(bits < 0, bits ^ INT32_MAX_POSITIVE, bits)
  # With at most k valid blocks every valid one is selected: the search is skipped.
  few = jnp.minimum(nb, n_blocks) <= k
  sel, pos = _select(key, valid, k, few, n_pad)
  # k keys are selected before `& valid`; invalid blocks are -inf and sit after every valid one,
  # so the valid among them are min(k, valid blocks) -- no reduction needed to count them.
  count = jnp.minimum(k, jnp.clip(nb, 0, n_blocks))
  m = idx_ref.shape[0]
  slots = lax.broadcasted_iota(jnp.int32, (m,), 0)
  plgpu.store(idx_ref.at[slots], jnp.full((m,), -1, jnp.int32), mask=slots >= count)
  # Ascending ids, compacted. Masked-off lanes point at the last slot, which m > k keeps -1 and
  # unclaimed: the GPU skips them, and interpret mode (which rewrites masked lanes with the old
  # value) then writes -1 over -1 instead of racing a real id.
  plgpu.store(idx_ref.at[jnp.where(sel, pos, m - 1)], ar, mask=sel)
  n_ref[()] = count


@functools.partial(jax.jit, static_argnames=("block_size", "k", "interpret", "num_warps",
                                             "local_tokens"))
def _block_topk(scores_BKN, lengths_B, *, block_size: int, k: int, interpret: bool,
                num_warps: int, local_tokens: int):
  B, K, N = scores_BKN.shape
  k = min(k, N)
  n_pad = launch.next_power_of_2(N)
  m = output_width(k, N)
  scores_BKN = launch.pad_axis(scores_BKN.astype(jnp.float32), 2, n_pad)
  sq = pl.squeezed
  kernel = functools.partial(_topk_kernel, block_size=block_size, n_blocks=N, k=k,
                             local_tokens=local_tokens)
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  return pl.pallas_call(
      kernel,
      grid=(B, K),
      in_specs=[pl.BlockSpec((sq,), lambda b, h: (b,)),
                pl.BlockSpec((sq, sq, n_pad), lambda b, h: (b, h, 0))],
      out_specs=[pl.BlockSpec((sq, sq, m), lambda b, h: (b, h, 0)),
                 pl.BlockSpec((sq, sq), lambda b, h: (b, h))],
      out_shape=[jax.ShapeDtypeStruct((B, K, m), jnp.int32),
                 jax.ShapeDtypeStruct((B, K), jnp.int32)],
      compiler_params=compiler_params,
      interpret=interpret,
      name="block_topk",
  )(lengths_B.astype(jnp.int32), scores_BKN)


def _row_warps(N: int, config: TritonConfig | None) -> int:
  """num_warps of a program holding one row of N scores (config's, or tuned by the padded row
  length); NotSupported past the packed prefix sum's MAX_BLOCKS."""
  if launch.next_power_of_2(N) > MAX_BLOCKS:
    raise NotSupported(f"takes at most {MAX_BLOCKS} blocks per row (padded to a power of 2), "
                       f"got N={N}")
  warps = (config or TritonConfig()).num_warps
  if warps is None:
    n_pad = launch.next_power_of_2(N)
    table = tuned.lookup("block_topk", "pallas_triton")["num_warps_by_blocks"]
    warps = next(w for limit, w in table if n_pad <= limit)
  if not launch.is_power_of_2(warps):
    raise ValueError(f"num_warps must be a power of 2, got {warps!r}")
  return warps


def block_topk(scores_BKN, lengths_B, *, block_size: int, k: int, local_tokens: int = 1,
               interpret: bool = False, config: TritonConfig | None = None):
  """Shapes as `pallas_kernels.block_topk`."""
  require_platform("gpu", interpret, "the Pallas Triton top-k kernel")
  warps = _row_warps(scores_BKN.shape[-1], config)
  return _block_topk(scores_BKN, lengths_B, block_size=int(block_size), k=int(k),
                     interpret=bool(interpret), num_warps=int(warps),
                     local_tokens=int(local_tokens))


def _prefix_topk_kernel(nv_ref, cnt_ref, s_ref, idx_ref, *, width: int):
  """Program r. nv_ref / cnt_ref int32 []: the row's valid prefix and how many to keep (capped at
  width); s_ref f32 [Np]; idx_ref int32 [Mp] (Mp > width: the last slot stays -1 and takes the
  masked lanes)."""
  n_pad = s_ref.shape[0]
  m = idx_ref.shape[0]
  nv = nv_ref[()]
  k = jnp.clip(cnt_ref[()], 0, width)
  ar = lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
  valid = ar < nv
  s = s_ref[...].astype(jnp.float32)
  s = jnp.where(valid & (s == s), s, -jnp.inf)                          # NaN, past the prefix
  s = jnp.where(s == 0, 0.0, s)                          # -0 and +0 one value, as the reference
  bits = lax.bitcast_convert_type(s, jnp.int32)
  key = jnp.where(bits < 0, bits ^ INT32_MAX_POSITIVE, bits)
  sel, pos = _select(key, valid, k, nv <= k, n_pad)
  count = jnp.minimum(k, jnp.maximum(nv, 0))
  slots = lax.broadcasted_iota(jnp.int32, (m,), 0)
  plgpu.store(idx_ref.at[slots], jnp.full((m,), -1, jnp.int32), mask=slots >= count)
  plgpu.store(idx_ref.at[jnp.where(sel, pos, m - 1)], ar, mask=sel)


@functools.partial(jax.jit, static_argnames=("width", "interpret", "num_warps"))
def _prefix_topk(scores_RN, n_valid_R, count_R, *, width: int, interpret: bool, num_warps: int):
  R, N = scores_RN.shape
  n_pad = launch.next_power_of_2(N)
  m = prefix_output_width(width)
  scores_RN = launch.pad_axis(scores_RN.astype(jnp.float32), 1, n_pad)
  sq = pl.squeezed
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  idx = pl.pallas_call(
      functools.partial(_prefix_topk_kernel, width=width),
      grid=(R,),
      in_specs=[pl.BlockSpec((sq,), lambda r: (r,)), pl.BlockSpec((sq,), lambda r: (r,)),
                pl.BlockSpec((sq, n_pad), lambda r: (r, 0))],
      out_specs=pl.BlockSpec((sq, m), lambda r: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((R, m), jnp.int32),
      compiler_params=compiler_params,
      interpret=interpret,
      name="prefix_topk",
  )(n_valid_R.astype(jnp.int32), count_R.astype(jnp.int32), scores_RN)
  return idx[:, :width]


def prefix_topk(scores_RN, n_valid_R, count_R, *, width: int, interpret: bool = False,
                config: TritonConfig | None = None):
  """Shapes as `pallas_kernels.block_topk.prefix_topk`."""
  require_platform("gpu", interpret, "the Pallas Triton prefix top-k kernel")
  warps = _row_warps(scores_RN.shape[-1], config)
  return _prefix_topk(scores_RN, n_valid_R, count_R, width=int(width), interpret=bool(interpret),
                      num_warps=int(warps))
