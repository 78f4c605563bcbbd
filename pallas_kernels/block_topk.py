"""Top-k block selection for sparse decoding, as one small kernel per decode step and layer.

  idx_BKM, n_live_BK = block_topk(scores_BKN, lengths_B, block_size=64, k=205)

Per (sequence, KV head) row: the first and the current block (the one holding token length - 1)
are always kept -- with `local_tokens` > 1, every block holding one of the last local_tokens tokens
(a local window: right after a block boundary the current block holds only the newest token or
two, and the previous one then holds the local context) -- then the highest-scoring other valid
blocks (block n is valid iff n * block_size < length), k blocks in all, ties to the lower block
index, NaN scores treated as -inf. The result is what `pallas_kernels.sparse_decode` consumes:
ascending block ids padded with -1 (`idx_BKM` int32 [B, K, M], M >= k) and the number of live ids
per row (`n_live_BK` int32 [B, K]), so the attention kernel needs no extra pass to count them.

Implementations:
- `xla`: `block_topk_reference` -- `lax.top_k` over the N blocks, then a sort of the k winners
  (M = k). `lax.top_k` with k in the hundreds runs as sorts: ~25 us of kernel time for 64 rows
  of 2048 blocks on the H200 (results/NVIDIA_H200/selector.json), ~35-40 us wall on the H100.
- `pallas_triton`: one program per row holds the N scores in registers, finds the k-th largest
  score exactly by a bracket search over its order-preserving int32 key (two thresholds per
  counting pass, ~10-11 passes on Gaussian scores, at most 21; no sort; it stops as soon as
  exactly k keys lie at or above the bracket: 5.7-6.2 us of kernel time for 64 rows of 2048 on
  the H200, of which 2.0 us is the kernel without its search), then resolves ties by index and
  compacts the ascending ids with one prefix sum (M = the power of 2 above k, the tail -1).
  A row with at most k valid blocks (a short sequence in a long cache) skips the search: all its
  valid blocks are selected (7.5 -> 2.0 us at B8, 32 of 2048 blocks valid, k = 64).
- `auto`: pallas_triton on GPU, xla elsewhere.
Both give identical integers (tested in interpret mode and on the GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _splitk

INT32_MIN = np.int32(-2**31)
INT32_MAX_POSITIVE = np.int32(2**31 - 1)
KEY_ABOVE_ALL = np.int32(0x7F800001)   # the order key of +inf, plus one


def forced_blocks_max(block_size: int, local_tokens: int) -> int:
  """The most blocks the rule forces: the first one and those holding the last local_tokens."""
  return 1 + 1 + (local_tokens - 1 + block_size - 1) // block_size


def check_budget(k: int, block_size: int, local_tokens: int) -> None:
  """A budget of k blocks must hold the forced ones (`forced_blocks_max`): a clear ValueError."""
  need = forced_blocks_max(block_size, local_tokens)
  if k < need:
    raise ValueError(f"k={k} blocks cannot hold the {need} forced ones (first block + the last "
                     f"local_tokens={local_tokens} tokens in blocks of {block_size})")


def _check(scores_BKN, lengths_B, block_size: int, k: int, local_tokens: int = 1) -> None:
  if getattr(scores_BKN, "ndim", None) != 3:
    raise ValueError(f"scores_BKN must be 3-D [B, K, N], got shape {getattr(scores_BKN, 'shape', None)}")
  if not jnp.issubdtype(scores_BKN.dtype, jnp.floating):
    raise ValueError(f"scores_BKN must be floating point, got {scores_BKN.dtype}")
  if getattr(lengths_B, "shape", None) != (scores_BKN.shape[0],):
    raise ValueError(f"lengths_B must have shape [B]=({scores_BKN.shape[0]},), got "
                     f"{getattr(lengths_B, 'shape', None)}")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"k must be an int >= 2 (first + current block), got {k!r}")
  if not isinstance(local_tokens, (int, np.integer)) or local_tokens < 1:
    raise ValueError(f"local_tokens must be an int >= 1, got {local_tokens!r}")
  check_budget(k, block_size, local_tokens)


def _valid_forced(lengths_B: jax.Array, n: int, block_size: int, local_tokens: int = 1):
  """(valid [B, 1, N], forced [B, 1, N]): blocks below the length; the first one and those
  holding the last local_tokens tokens (1: the current one)."""
  nb = ((lengths_B + block_size - 1) // block_size)[:, None, None]
  first_local = (jnp.maximum(lengths_B - local_tokens, 0) // block_size)[:, None, None]
  ar = jnp.arange(n)[None, None]
  valid = ar < nb
  return valid, valid & ((ar == 0) | (ar >= first_local))


@functools.partial(jax.jit, static_argnames=("block_size", "k", "local_tokens"))
def block_topk_reference(scores_BKN: jax.Array, lengths_B: jax.Array, *, block_size: int,
                         k: int, local_tokens: int = 1) -> tuple[jax.Array, jax.Array]:
  """Plain-XLA selection: (idx int32 [B, K, min(k, N)], n_live int32 [B, K])."""
  N = scores_BKN.shape[-1]
  k = min(k, N)
  valid, forced = _valid_forced(lengths_B, N, block_size, local_tokens)
  s = jnp.where(jnp.isnan(scores_BKN), -jnp.inf, scores_BKN.astype(jnp.float32))
  s = jnp.where(forced, jnp.inf, jnp.where(valid, s, -jnp.inf))
  _, idx_BKk = lax.top_k(s, k)  # ties: lower index first
  live = jnp.take_along_axis(jnp.broadcast_to(valid, s.shape), idx_BKk, axis=-1)
  idx_BKk = jnp.sort(jnp.where(live, idx_BKk, N), axis=-1)
  return (jnp.where(idx_BKk < N, idx_BKk, -1).astype(jnp.int32),
          jnp.sum(live, axis=-1).astype(jnp.int32))


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
  s = jnp.where(forced, jnp.inf, jnp.where(valid, s, -jnp.inf))
  bits = lax.bitcast_convert_type(s, jnp.int32)
  # int32 key with the float order: negative floats have their magnitude bits flipped
  key = jnp.where(bits < 0, bits ^ INT32_MAX_POSITIVE, bits)
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
  few = jnp.minimum(nb, n_blocks) <= k
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
def _block_topk_triton(scores_BKN, lengths_B, block_size: int, k: int, interpret: bool,
                       num_warps: int | None = None, local_tokens: int = 1):
  B, K, N = scores_BKN.shape
  k = min(k, N)
  n_pad = _splitk.next_power_of_2(N)
  m = _splitk.next_power_of_2(k + 1)  # power-of-2 width with at least one slot past k
  scores_BKN = _splitk.pad_axis(scores_BKN.astype(jnp.float32), 2, n_pad)
  sq = _splitk.SQUEEZED
  # Registers: a handful of [Np] vectors per program; more warps for long rows. At Np = 2048 on
  # the H200 (kernel time, 32 passes, results/NVIDIA_H200/selector*.json): 1 / 2 / 4 / 8 / 16
  # warps 21.8 / 13.4 / 8.8 / 7.4 / 7.4 us.
  warps = num_warps or (4 if n_pad <= 1024 else 8 if n_pad <= 8192 else 16)
  kernel = functools.partial(_topk_kernel, block_size=block_size, n_blocks=N, k=k,
                             local_tokens=local_tokens)
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=warps, num_stages=1)
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


# The kernel's single prefix sum packs two counts of up to Np into the halves of an int32.
MAX_TRITON_BLOCKS = 1 << 15


def block_topk(scores_BKN: jax.Array, lengths_B: jax.Array, *, block_size: int, k: int,
               implementation: str = "auto", interpret: bool = False, num_warps: int | None = None,
               local_tokens: int = 1):
  """Top-k block selection (see the module docstring).

  Args:
    scores_BKN: float [B, K, N] block scores (gate logits or Quest bounds), N = cache blocks.
    lengths_B: int [B] valid tokens per sequence (block n is valid iff n * block_size < length).
    block_size: tokens per block. k: blocks to keep per row (>= 2), capped at N.
    local_tokens: the blocks holding the last local_tokens tokens are always kept (1: the
      current block); k must hold them and the first block (`forced_blocks_max`).
    implementation: "auto" | "xla" | "pallas_triton"; interpret: Pallas interpret mode.
    num_warps: pallas_triton warps per row (default 4 up to 1024 blocks, 8 up to 8192, then 16).

  Returns:
    (idx int32 [B, K, M], n_live int32 [B, K]): ascending selected block ids, -1 padded
    (M = min(k, N) for xla, the power of 2 above it for pallas_triton), and how many
    are live per row.
  """
  _check(scores_BKN, lengths_B, block_size, k, local_tokens)
  if num_warps is not None and (not isinstance(num_warps, (int, np.integer)) or num_warps < 1
                                or num_warps & (num_warps - 1)):
    raise ValueError(f"num_warps must be a power of 2, got {num_warps!r}")
  if implementation not in ("auto", "xla", "pallas_triton"):
    raise ValueError(f"implementation must be auto | xla | pallas_triton, got {implementation!r}")
  too_long = _splitk.next_power_of_2(scores_BKN.shape[-1]) > MAX_TRITON_BLOCKS
  if implementation == "auto":
    gpu = jax.default_backend() == "gpu"
    implementation = "pallas_triton" if gpu and not too_long else "xla"
  if implementation == "xla":
    return block_topk_reference(scores_BKN, lengths_B.astype(jnp.int32), block_size=int(block_size),
                                k=int(k), local_tokens=int(local_tokens))
  if too_long:
    raise ValueError(f"implementation='pallas_triton' takes at most {MAX_TRITON_BLOCKS} blocks per "
                     f"row (padded to a power of 2), got N={scores_BKN.shape[-1]}; use 'xla'")
  return _block_topk_triton(scores_BKN, lengths_B, int(block_size), int(k), bool(interpret),
                            None if num_warps is None else int(num_warps), int(local_tokens))
