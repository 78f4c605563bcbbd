"""Block-sparse causal prefill attention, forward pass as a Pallas Mosaic GPU kernel (Hopper: TMA
loads, wgmma, warp specialisation as in FlashAttention-3), the `pallas_mosaic_gpu`
implementation of `block_sparse_attention`. The backward pass is the Triton kernels'
(`pallas_triton.backward`, from this kernel's o and lse), or with
`MosaicGPUConfig(mosaic_backward=True)` the Mosaic GPU ones (`pallas_mosaic_gpu_bwd`), tied by a
`jax.custom_vjp`.

One program (a CTA of three warpgroups) per (sequence, query head, pair of query blocks):

- warpgroups 0 and 1 each own one query block of 64 rows: its Q tile in shared memory, its
  online softmax in registers, QK^T and PV as wgmmas reading K / V straight from shared memory;
- warpgroup 2 is the producer: for each consumer it walks that query block's live index slots
  (ascending block ids, `slot_counts`) and issues one TMA copy of the selected [64, H] K tile and
  one of V per slot into that consumer's ring of `pipeline_depth` buffers, waiting for the
  consumer to free a buffer before refilling it.

The two consumers have their own index rows (a choice per query block, as the gate makes it), so
unlike dense FlashAttention-3 they do not share K / V tiles, and each has its own buffers and
barriers; by default they run independently. Two opt-in schedules (`MosaicGPUConfig`) bring in
FlashAttention-3's: `overlap_qk` (the next slot's QK^T wgmma in flight under this slot's
softmax) and `pingpong` (a rendezvous barrier alternating the consumers' softmax and wgmmas;
the consumer with fewer steps makes up the count with empty meetings). A third, `pair_blocks`,
takes two selected blocks a step (FlashAttention-3's 128-wide key tiles at H=128): the producer
copies them into the two halves of one [128, H] buffer, and a row's last pair alone is masked.
Ids ascend, so a row's live slots are the blocks below the diagonal (no mask: they end before
the length whenever the query block holds a valid row) and then the diagonal, the only step that
applies the causal and length mask (col <= row, col < length). Rows past the length, or that
see no key, give o = 0 and lse = +inf, as the Triton forward (whose backward kernels this one
feeds).

Shapes: block_size 64 (one wgmma row tile per query block), head dim 64 or 128 (256 fits one
buffer per consumer and is offered, unpipelined), bfloat16 / float16. Others raise NotSupported
and the dispatcher moves on. In interpret mode (the Mosaic GPU interpreter, CPU tests) the two
products are plain dots (JAX 0.10's interpreter has no wgmma with a transposed operand) and no
register layouts are stated; the rest is the same kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import online_softmax, tuned
from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu_bwd as mosaic_bwd
from pallas_kernels.block_sparse_attention.reference import slot_counts
from pallas_kernels import mgpu_util
from pallas_kernels.dispatch import NotSupported, require_platform

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
CONSUMERS = 2        # query blocks (compute warpgroups) per program
REDUCTION_SCRATCH = 2048   # plgpu.CompilerParams' default reduction_scratch_bytes


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
  """Launch parameters of the forward kernel; the schedule options are off by default (the
  kernel timed on the H100) until a GPU A/B decides.

  pipeline_depth: K / V buffers per consumer (None: as many as fit, at most 4 for H=64 and
    2 for H=128; lowered until the program's shared memory fits an SM).
  backward: the Triton backward kernels' config (`pallas_triton.TritonConfig`; None: tuned).
  mosaic_backward: the backward pass as the Mosaic GPU kernels (`pallas_mosaic_gpu_bwd`: dq and
    dk / dv, a producer warpgroup and two consumers each) instead of the Triton ones, where they
    take the shapes (head dim 64 / 128); off until timed on the GPU. Without Pallas Triton the
    Mosaic GPU kernels run regardless. backward_depth: their ring buffers a consumer (None: 4 at
    H 64, 2 at H 128, lowered to fit).
  overlap_qk: FlashAttention-3's intra-warpgroup overlap: each consumer issues the next slot's
    QK^T wgmma before the current slot's softmax and reads it after the PV wgmma, so one wgmma
    is in flight while the softmax runs (the scores of a slot are carried one step, 32 more
    f32 registers a thread; the first slot's QK^T is a prologue). With `pingpong` it needs
    two buffers per consumer (H=256 has one: refused).
  pingpong: FlashAttention-3's ping-pong between the two consumers (attention_mgpu's schedule
    barrier): a rendezvous after a consumer issues its QK^T and another at the end of its
    softmax, so one consumer's softmax runs while the other's wgmmas hold the tensor cores.
    The consumers walk their own index rows, so their step counts differ: the one that
    finishes first (or a second query block past the last) keeps meeting the other with empty
    rendezvous until both have met 2 * max(steps) + 1 times, so neither waits forever.
  pair_blocks: each consumer step takes two selected key blocks (slots 2s and 2s + 1, any ids),
    as FlashAttention-3's 128-wide key tiles: QK^T a [64, 128] wgmma and PV one with K = 128,
    half the steps' online-softmax work (row max / sum, acc rescale, barrier waits). The
    producer copies the two blocks into the halves of a [128, H] buffer; an odd slot count's
    last step copies its one block into both halves and masks the second. The buffers double:
    K and V rings get their own depths (`fit_depths`; H=128 keeps two K buffers and one V,
    or with overlap_qk + pingpong one K and two V), and H=256 does not fit (refused). With
    overlap_qk the carried scores are [64, 128] f32 (64 more registers a thread).
  """
  pipeline_depth: int | None = None
  backward: object | None = None
  overlap_qk: bool = False
  pingpong: bool = False
  pair_blocks: bool = False
  mosaic_backward: bool = False
  backward_depth: int | None = None

  def validate(self) -> None:
    d = self.pipeline_depth
    if d is not None and (not isinstance(d, int) or d < 1):
      raise ValueError(f"config.pipeline_depth must be a positive int or None, got {d!r}")
    bd = self.backward_depth
    if bd is not None and (not isinstance(bd, int) or bd < 1):
      raise ValueError(f"config.backward_depth must be a positive int or None, got {bd!r}")
    for name in ("overlap_qk", "pingpong", "pair_blocks", "mosaic_backward"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"config.{name} must be a bool, got {getattr(self, name)!r}")


CONFIG = MosaicGPUConfig


def mgpu_supported(H: int, block_size: int, dtype) -> str | None:
  """Why the kernel can't take these shapes, or None if it can."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name}: the wgmma kernel takes bfloat16 / float16 only"
  if H not in (64, 128, 256):
    return f"head dim H={H} must be 64, 128 or 256 (128-byte swizzled tiles in shared memory)"
  if block_size != 64:
    return f"block_size={block_size} must be 64 (one wgmma row tile per query block)"
  return None


def smem_bytes(H: int, block_size: int, depth: int, dtype, *, v_depth: int | None = None,
               blocks_per_step: int = 1) -> int:
  """Shared memory of one program as Mosaic GPU allocates it: two Q / O tiles, per consumer a
  ring of `depth` K buffers and one of `v_depth` (default: depth) V buffers of blocks_per_step
  key blocks each, the lse tile (1 KiB-aligned), 8 bytes a barrier (the rendezvous counted),
  and Pallas's cross-warp reduction scratch (2 KiB; `pair_blocks` turns it off)."""
  isz = jnp.dtype(dtype).itemsize
  tile = block_size * H * isz
  v_depth = depth if v_depth is None else v_depth
  kv = CONSUMERS * (depth + v_depth) * blocks_per_step * tile
  lse = -(-CONSUMERS * block_size * 4 // 1024) * 1024
  barriers = 8 * (2 * CONSUMERS * (depth + v_depth) + CONSUMERS + 1)
  scratch = 0 if blocks_per_step > 1 else REDUCTION_SCRATCH
  return CONSUMERS * tile + kv + lse + barriers + scratch


def fit_depth(H: int, block_size: int, depth: int, dtype) -> int:
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  while depth > 1 and smem_bytes(H, block_size, depth, dtype) > limit:
    depth -= 1
  return depth


def fit_depths(H: int, block_size: int, depth: int, dtype, *,
               keep_v: bool = False) -> tuple[int, int] | None:
  """(K depth, V depth) of `pair_blocks` rings (two key blocks a buffer) that fit an SM, from
  `depth` each, lowering the deeper ring first and, on a tie, V's (K is waited for first in a
  step) or with keep_v K's (overlap_qk + pingpong needs two V buffers); None if one each does
  not fit."""
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  kd = vd = depth
  while smem_bytes(H, block_size, kd, dtype, v_depth=vd, blocks_per_step=2) > limit:
    if kd == vd == 1:
      return None
    if vd > kd or (vd == kd and not keep_v):
      vd -= 1
    else:
      kd -= 1
  return kd, vd


def _kernel(len_ref, nfull_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *,
            bs: int, G: int, hdiv: int, nq: int, depth: int, v_depth: int, scale_log2: float,
            overlap_qk: bool, pingpong: bool, pair_blocks: bool, interpret: bool, mt_ref=None):
  """mt_ref: None, or f32 [B, N, nK, Tp] taking each step's row maxima of the scaled scores
  (base 2; the block target's, `flash_attention`), through a ring of two [bs] buffers a
  consumer (the last scoped buffer); the default schedule only."""
  (q_smem, k_smem, v_smem, lse_smem, *mt_smem), (k_ready, v_ready, q_ready), (k_free, v_free) = (
      scoped[:3])
  sched = scoped[3] if pingpong else None     # the consumers' rendezvous (2 arrivals)
  b = lax.axis_index("b")
  n = lax.axis_index("n")
  pair = lax.axis_index("q")
  wg = lax.axis_index("wg")
  hi = lax.div(n, jnp.int32(hdiv))                  # the index row: per query head or per group
  kvh = lax.div(n, jnp.int32(G))
  length = len_ref[b]
  H = q_smem.shape[-1]
  dtype = q_smem.dtype
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  kw = 2 * bs if pair_blocks else bs            # keys a step (a K / V buffer's rows)
  M = idx_ref.shape[-1]

  def cast(x, layout):
    return x if interpret else plgpu.layout_cast(x, layout)

  def iota(shape, dim):
    if interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

  def live(w, ref=nlive_ref):
    """Live slots of consumer w's query block (0 past the last block); with nfull_ref, those
    strictly below the diagonal."""
    return mosaic_bwd.live_slots(ref, b, hi, pair, w, nq)

  def n_steps(w):
    """Consumer w's steps: its live slots, or with pair_blocks their pairs."""
    return lax.div(live(w) + 1, jnp.int32(2)) if pair_blocks else live(w)

  def pair_ids(w, s, n_slots):
    """The two block ids of consumer w's step s (pair_blocks): slots 2s and 2s + 1, the second
    the first again past the live slots (a real block, so the unused half holds finite
    values; never a -1 pad), and whether the second is live."""
    row = (b, hi, pair * CONSUMERS + w)
    second = 2 * s + 1 < n_slots
    b0 = idx_ref[(*row, 2 * s)]
    b1 = jnp.where(second, idx_ref[(*row, jnp.minimum(2 * s + 1, M - 1))], b0)
    return b0, b1, second

  def rendezvous():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    if not interpret:
      plgpu.set_max_registers(232, action="increase")
    i = pair * CONSUMERS + wg
    q0 = i * bs
    steps = n_steps(wg)
    my_q = q_smem.at[wg]

    def slot_of(s):
      return wg * depth + lax.rem(s, jnp.int32(depth))

    def v_slot_of(s, slot):
      """V's buffer of step s (K's is `slot`; the rings differ only with pair_blocks)."""
      return slot if v_depth == depth else wg * v_depth + lax.rem(s, jnp.int32(v_depth))

    def qk_dot(slot):           # the interpreter's product (no transposed wgmma operand in 0.10)
      return jnp.dot(my_q[...], k_smem.at[slot][...].T, preferred_element_type=jnp.float32)

    def qk_of(slot, after_issue=lambda: None):
      """S = Q K^T of the K tile in `slot` (f32 [bs, kw]); after_issue runs while the wgmma
      is in flight."""
      if interpret:
        qk = qk_dot(slot)
        after_issue()
        return qk

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, my_q, mgpu_util.transposed(k_smem.at[slot]))
        after_issue()
        return acc_ref[...]
      return pl.run_scoped(compute_qk, plgpu.ACC((bs, kw), jnp.float32))

    def valid_of(s, block, mask):
      """None (no mask), or a function giving step s's causal and length mask (bool [bs, kw]);
      block: the slot's id (one block a step); mask: the (rows, offs) iotas, or with
      pair_blocks True (the pair's iotas and ids are made here, in its one masked step)."""
      if mask is None:
        return None
      if not pair_blocks:
        rows, offs = mask

        def single():
          cols = block * bs + offs
          return (cols <= rows) & (cols < length)
        return single

      def paired():
        rows, offs = q0 + iota((bs, kw), 0), iota((bs, kw), 1)
        b0, b1, second = pair_ids(wg, s, live(wg))
        cols = jnp.where(offs < bs, b0 * bs + offs, (b1 - 1) * bs + offs)
        width = jnp.where(second, kw, bs)         # an odd count's second half: no key
        return (cols <= rows) & (cols < length) & (offs < width)
      return paired

    def softmax(qk, acc, m_i, l_i, valid_fn):
      """One step's online-softmax update (base 2): (acc rescaled, m, l, p in q's dtype);
      valid_fn: None, or `valid_of`'s mask function."""
      s_ = qk * scale_log2
      masked = valid_fn is not None
      if masked:                # the diagonal block (the only one that can cross the length)
        valid = valid_fn()
        s_ = jnp.where(valid, s_, online_softmax.MASK_VALUE)
      m_tile = s_.max(axis=1)
      m_new = jnp.maximum(m_i, m_tile)
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s_ - lax.broadcast_in_dim(m_new, s_.shape, [0]))
      if masked:
        p = jnp.where(valid, p, 0.0)
      l_new = l_i * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p16 = p.astype(dtype)
      if pingpong and H <= 128 and not interpret:
        # keeps the softmax ahead of the rendezvous that hands the tensor cores back (as
        # attention_mgpu: without it the compiler may sink this work past the barrier)
        acc, l_new, m_new, p16 = lax.optimization_barrier((acc, l_new, m_new, p16))
      return acc, m_new, l_new, p16, m_tile

    def wait_v(slot):
      """The end of a softmax: V of `slot` ready (ping-pong: and the other consumer's wgmmas
      issued, so its softmax now overlaps this one's PV)."""
      if pingpong:
        plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_ready.at[slot])
      if pingpong:
        plgpu.barrier_wait(sched)

    def pv(acc, p16, slot):
      """acc + P V (the run_state's exit waits for every wgmma in flight)."""
      if interpret:
        return acc + jnp.dot(p16, v_smem.at[slot][...], preferred_element_type=jnp.float32)

      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
      return pl.run_state(compute_pv)(plgpu.ACC.init(acc))

    after_qk = rendezvous if pingpong else (lambda: None)

    def store_row_max(s, block, m_tile):
      """m_tile [bs] to mt_ref[b, n, block, q0:q0 + bs] through buffer s % 2 of the ring, once
      the copy that read it two steps ago is done."""
      buf = mt_smem[0].at[wg * 2 + lax.rem(s, jnp.int32(2))]
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      buf[...] = m_tile
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(buf, mt_ref.at[b, n, block, pl.ds(q0, bs)])

    def step(s, carry, mask):
      acc, m_i, l_i = carry
      slot = slot_of(s)
      vslot = v_slot_of(s, slot)
      block = None if pair_blocks else idx_ref[b, hi, i, s]
      plgpu.barrier_wait(k_ready.at[slot])
      qk = qk_of(slot, after_qk)
      plgpu.barrier_arrive(k_free.at[slot])
      acc, m_new, l_new, p16, m_tile = softmax(qk, acc, m_i, l_i, valid_of(s, block, mask))
      if mt_ref is not None:
        store_row_max(s, block, m_tile)
      wait_v(vslot)
      acc = pv(acc, p16, vslot)
      plgpu.barrier_arrive(v_free.at[vslot])
      return acc, m_new, l_new

    def step_overlapped(s, carry, prefetch, mask):
      """One slot with its scores already in the carry; with prefetch, the next slot's QK^T
      wgmma is issued first and runs under this slot's softmax."""
      acc, m_i, l_i, qk = carry
      slot, nslot = slot_of(s), slot_of(s + 1)
      vslot = v_slot_of(s, slot)

      def body(qk_ref):
        if prefetch:
          plgpu.barrier_wait(k_ready.at[nslot])
          if interpret:
            nxt = qk_dot(nslot)
          else:
            plgpu.wgmma(qk_ref, my_q, mgpu_util.transposed(k_smem.at[nslot]))
        after_qk()
        block = None if pair_blocks else idx_ref[b, hi, i, s]
        acc2, m_new, l_new, p16, _ = softmax(qk, acc, m_i, l_i, valid_of(s, block, mask))
        wait_v(vslot)
        acc2 = pv(acc2, p16, vslot)                # waits for the next QK^T too
        plgpu.barrier_arrive(v_free.at[vslot])
        if prefetch and not interpret:
          nxt = qk_ref[...]
        return acc2, m_new, l_new, nxt if prefetch else qk

      if prefetch and not interpret:
        out = pl.run_scoped(body, plgpu.ACC((bs, kw), jnp.float32))
      else:
        out = body(None)
      if prefetch:
        plgpu.barrier_arrive(k_free.at[nslot])
      return out

    @pl.when(i < nq)
    def _():
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bs), n], my_q, q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])
      if pingpong:
        pl.when(wg == 1)(rendezvous)      # consumer 1 starts half a step behind consumer 0
      mask = True if pair_blocks else (q0 + iota((bs, bs), 0), iota((bs, bs), 1))
      init = (cast(jnp.zeros((bs, H), jnp.float32), wgmma_layout),
              cast(jnp.full((bs,), online_softmax.MASK_VALUE, jnp.float32), row_layout),
              cast(jnp.zeros((bs,), jnp.float32), row_layout))
      if overlap_qk:
        def first(_, qk):
          slot = slot_of(0)
          plgpu.barrier_wait(k_ready.at[slot])
          qk = qk_of(slot)
          plgpu.barrier_arrive(k_free.at[slot])
          return qk
        qk0 = lax.fori_loop(0, jnp.minimum(steps, 1), first,
                            cast(jnp.zeros((bs, kw), jnp.float32), wgmma_layout))
        # Every slot but the last prefetches (the slots before the last lie below the
        # diagonal: unmasked); the last is masked whether or not it is the diagonal (a block
        # below it is wholly visible to every valid row, so the mask changes nothing there).
        last = jnp.maximum(steps - 1, 0)
        carry = lax.fori_loop(0, last, functools.partial(step_overlapped, prefetch=True,
                                                         mask=None), (*init, qk0))
        acc, m_i, l_i, _ = lax.fori_loop(last, steps, functools.partial(
            step_overlapped, prefetch=False, mask=mask), carry)
      else:
        # Ascending ids: the slots below the diagonal come first and need no mask (a block
        # j < i of a query block holding a valid row ends before the length); then the diagonal.
        # With pair_blocks every pair but the last lies below it (the last holds the last
        # live slot, and an odd count's empty half): only the last is masked.
        n_full = jnp.maximum(steps - 1, 0) if pair_blocks else live(wg, nfull_ref)
        carry = lax.fori_loop(0, n_full, functools.partial(step, mask=None), init)
        acc, m_i, l_i = lax.fori_loop(n_full, steps, functools.partial(step, mask=mask), carry)
      row_ids = q0 + (lax.broadcasted_iota(jnp.int32, (bs,), 0) if interpret else
                      plgpu.broadcasted_iota(jnp.int32, (bs,), 0, layout=row_layout))
      ok = (row_ids < length) & (l_i > 0)
      l_safe = jnp.where(ok, l_i, 1.0)
      o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
      o = jnp.where(lax.broadcast_in_dim(ok, acc.shape, [0]), o, 0.0)
      my_q[...] = o.astype(dtype)                  # the Q tile's buffer takes the output
      lse_smem.at[wg][...] = jnp.where(ok, (m_i + jnp.log2(l_safe)) * LN2, jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(q0, bs), n])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, pl.ds(q0, bs)])
      plgpu.wait_smem_to_gmem(0)

    if pingpong:
      # Both consumers must meet 2 * max(steps) + 1 times: 2 a step, consumer 1 once before
      # its first and consumer 0 once after its last. The one with fewer steps (or a second
      # query block past the last, with none) makes up the difference with empty meetings.
      pl.when((wg == 1) & (i >= nq))(rendezvous)

      def empty(_, carry):
        rendezvous()
        rendezvous()
        return carry
      lax.fori_loop(steps, n_steps(1 - wg), empty, 0)
      pl.when(wg == 0)(rendezvous)

  @pl.when(wg == CONSUMERS)
  def _producer():
    if not interpret:
      plgpu.set_max_registers(40, action="decrease")
    counts = [n_steps(w) for w in range(CONSUMERS)]

    def issue(w, s):
      slot = w * depth + lax.rem(s, jnp.int32(depth))
      vslot = slot if v_depth == depth else w * v_depth + lax.rem(s, jnp.int32(v_depth))
      if pair_blocks:             # two copies a buffer, one a half (the barriers count two)
        ids = pair_ids(w, s, live(w))[:2]
        parts = [((b, pl.ds(jnp.maximum(j, 0) * bs, bs), kvh), pl.ds(h * bs, bs))
                 for h, j in enumerate(ids)]
      else:
        block = jnp.maximum(idx_ref[b, hi, pair * CONSUMERS + w, s], 0)
        parts = [((b, pl.ds(block * bs, bs), kvh), None)]

      def copy(ref, smem, ready, slot):
        for src, half in parts:
          dst = smem.at[slot] if half is None else smem.at[slot, half]
          plgpu.copy_gmem_to_smem(ref.at[src], dst, ready.at[slot])

      @pl.when(s >= depth)
      def _():
        plgpu.barrier_wait(k_free.at[slot])
      copy(k_ref, k_smem, k_ready, slot)

      @pl.when(s >= v_depth)
      def _():
        plgpu.barrier_wait(v_free.at[vslot])
      copy(v_ref, v_smem, v_ready, vslot)

    def step(s, carry):
      for w in range(CONSUMERS):
        pl.when(s < counts[w])(functools.partial(issue, w, s))
      return carry

    lax.fori_loop(0, jnp.maximum(counts[0], counts[1]), step, 0)

    # Drain: wait for the consumers to free the buffers of their last steps, so that every
    # phase of the free barriers is observed before they are released (the interpreter checks
    # it; on the GPU the producer has nothing else to do).
    rings = ([(depth, (k_free, v_free))] if v_depth == depth else
             [(depth, (k_free,)), (v_depth, (v_free,))])
    for w in range(CONSUMERS):
      for d, frees in rings:
        def drain(s, carry, w=w, d=d, frees=frees):
          slot = w * d + lax.rem(s, jnp.int32(d))
          for free in frees:
            plgpu.barrier_wait(free.at[slot])
          return carry
        lax.fori_loop(jnp.maximum(counts[w] - d, 0), counts[w], drain, 0)


@functools.partial(jax.jit, static_argnames=("block_size", "depth", "overlap_qk", "pingpong",
                                             "v_depth", "pair_blocks", "row_max", "interpret"))
def forward(q_BTNH, k_BTKH, v_BTKH, idx_BHQM, lengths_B, *, block_size: int, depth: int,
            overlap_qk: bool = False, pingpong: bool = False, v_depth: int | None = None,
            pair_blocks: bool = False, row_max: bool = False, interpret: bool = False):
  """(o [B, T, N, H] in q's dtype, lse f32 [B, N, Tp] natural log, +inf on rows that see no
  key), Tp = nQ * block_size (the Triton forward's outputs, o unpadded); with row_max also mt
  f32 [B, N, nK, Tp]: row t's largest scaled score (base 2) in each selected key block j of its
  query block (MASK_VALUE where it sees none; entries of unselected blocks unwritten), the
  block target's input (`flash_attention.reference.block_target_from_row_max`). depth /
  v_depth: K / V buffers a consumer (v_depth None: depth). overlap_qk, pingpong, pair_blocks:
  as `MosaicGPUConfig`'s."""
  if row_max and (overlap_qk or pingpong or pair_blocks):
    raise NotSupported("row_max (the block target) runs with the default schedule only")
  v_depth = depth if v_depth is None else v_depth
  if overlap_qk and pingpong and v_depth < 2:
    # the producer's wait for a consumer's one V buffer sits between the other's K copies
    raise NotSupported("overlap_qk with pingpong needs pipeline_depth >= 2 (with one V buffer a "
                       "consumer's prefetch and the other's rendezvous wait on each other)")
  B, T, N, H = q_BTNH.shape
  K, Hi, nq = k_BTKH.shape[2], idx_BHQM.shape[1], idx_BHQM.shape[2]
  bs = block_size
  n_full, n_live = slot_counts(idx_BHQM, lengths_B, bs)
  dtype = q_BTNH.dtype
  kernel = functools.partial(_kernel, bs=bs, G=N // K, hdiv=N // Hi, nq=nq, depth=depth,
                             v_depth=v_depth, scale_log2=H ** -0.5 * LOG2E,
                             overlap_qk=overlap_qk, pingpong=pingpong, pair_blocks=pair_blocks,
                             interpret=interpret)
  kps = 2 if pair_blocks else 1                 # key blocks a buffer (TMA copies a barrier)
  tiles = mgpu_util.tiles(dtype)

  def entry(len_ref, nfull_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            *mt_ref):
    pl.run_scoped(
        lambda *scoped: kernel(len_ref, nfull_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, o_ref,
                               lse_ref, scoped, mt_ref=mt_ref[0] if mt_ref else None),
        (plgpu.SMEM((CONSUMERS, bs, H), dtype, transforms=tiles),
         plgpu.SMEM((CONSUMERS * depth, kps * bs, H), dtype, transforms=tiles),
         plgpu.SMEM((CONSUMERS * v_depth, kps * bs, H), dtype, transforms=tiles),
         plgpu.SMEM((CONSUMERS, bs), jnp.float32),
         *((plgpu.SMEM((CONSUMERS * 2, bs), jnp.float32),) if row_max else ())),
        (plgpu.Barrier(num_arrivals=kps, num_barriers=CONSUMERS * depth),
         plgpu.Barrier(num_arrivals=kps, num_barriers=CONSUMERS * v_depth),
         plgpu.Barrier(num_barriers=CONSUMERS)),
        (plgpu.Barrier(num_arrivals=1, num_barriers=CONSUMERS * depth),
         plgpu.Barrier(num_arrivals=1, num_barriers=CONSUMERS * v_depth)),
        *((plgpu.Barrier(num_arrivals=CONSUMERS),) if pingpong else ()),
        collective_axes="wg",
    )

  params = mgpu_util.compiler_params()
  if pair_blocks and hasattr(params, "reduction_scratch_bytes"):
    # The softmax's row max / sum reduce within a warp (a row's columns never span warps in
    # the wgmma layout): no cross-warp scratch, 2 KiB for H=128's second K buffer.
    params = dataclasses.replace(params, reduction_scratch_bytes=0)
  # reads past T (the last block of a ragged length) are zero-filled, as the TMA unit does
  interp = mgpu_util.interpret_params(interpret)
  Tp = nq * bs
  # The output rows past T (a ragged last block) land in the padded o, sliced off below.
  outs = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((B, Tp, N, H), dtype),
                jax.ShapeDtypeStruct((B, N, Tp), jnp.float32),
                *((jax.ShapeDtypeStruct((B, N, nq, Tp), jnp.float32),) if row_max else ())),
      grid=(B, N, -(-nq // CONSUMERS)),
      grid_names=("b", "n", "q"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=params,
      interpret=interp,
  )(lengths_B.astype(jnp.int32), n_full, n_live, idx_BHQM.astype(jnp.int32), q_BTNH, k_BTKH,
    v_BTKH)
  if row_max:
    return outs[0][:, :T], outs[1], outs[2]
  return outs[0][:, :T], outs[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, idx_BHQM, lengths_B, block_size, launch, bwd_launch, interpret):
  return _attention_fwd(q, k, v, idx_BHQM, lengths_B, block_size, launch, bwd_launch,
                        interpret)[0]


def _attention_fwd(q, k, v, idx_BHQM, lengths_B, block_size, launch, bwd_launch, interpret):
  """launch: the forward's static options, (("depth", d), ("overlap_qk", b), ...)."""
  o, lse = forward(q, k, v, idx_BHQM, lengths_B, block_size=block_size, interpret=interpret,
                   **dict(launch))
  return o, (q, k, v, idx_BHQM, lengths_B, o, lse)


def _attention_bwd(block_size, launch, bwd_launch, interpret, res, do):
  """bwd_launch: ("pallas_mosaic_gpu", ring depth) or ("pallas_triton", its Launch)."""
  q, k, v, idx_BHQM, lengths_B, o, lse = res
  impl, params = bwd_launch
  if impl == "pallas_mosaic_gpu":
    dq, dk, dv = mosaic_bwd.backward(q, k, v, idx_BHQM, lengths_B, o, lse, do,
                                     block_size=block_size, depth=params, interpret=interpret)
  else:
    from pallas_kernels.block_sparse_attention import pallas_triton
    dq, dk, dv = pallas_triton.backward(q, k, v, idx_BHQM, lengths_B, o, lse, do,
                                        block_size=block_size, launch_=params)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _backward_launch(config: MosaicGPUConfig, block_size: int, H: int, dtype, interpret: bool):
  """The backward pass's kernels: the Mosaic GPU ones with `mosaic_backward` (or when Pallas
  Triton is missing) where they take the shapes, else the Triton ones."""
  mosaic_why = mosaic_bwd.bwd_supported(H, block_size, dtype)
  triton = None
  if not (config.mosaic_backward and mosaic_why is None):
    try:
      triton = importlib.import_module("pallas_kernels.block_sparse_attention.pallas_triton")
    except ImportError as e:
      if mosaic_why is not None:
        raise NotSupported(f"its backward: the Mosaic GPU kernels refuse ({mosaic_why}) and the "
                           f"Pallas Triton ones are missing ({e})") from e
  if triton is None:
    return "pallas_mosaic_gpu", mosaic_bwd.bwd_depth(H, block_size, dtype,
                                                     config.backward_depth)
  return "pallas_triton", triton.resolve(config.backward, block_size, H, interpret)[1]


def launch_of(config: MosaicGPUConfig, H: int, dtype, block_size: int, interpret: bool):
  """(the forward's static options, the backward's launch) of a validated config: ring depths
  fitted to an SM (NotSupported where pair_blocks cannot fit)."""
  depth = config.pipeline_depth or {64: 4, 128: 2, 256: 1}[H]
  if config.pair_blocks:
    fit = fit_depths(H, block_size, depth, dtype,
                     keep_v=config.overlap_qk and config.pingpong)
    if fit is None:
      raise NotSupported(
          f"pair_blocks with H={H}: one [128, H] K and V buffer a consumer takes "
          f"{smem_bytes(H, block_size, 1, dtype, blocks_per_step=2)} bytes of shared "
          "memory, more than an SM has")
    depth, v_depth = fit
  else:
    depth = v_depth = fit_depth(H, block_size, depth, dtype)
  bwd = _backward_launch(config, block_size, H, dtype, interpret)
  launch = (("depth", depth), ("overlap_qk", config.overlap_qk), ("pingpong", config.pingpong),
            ("v_depth", v_depth), ("pair_blocks", config.pair_blocks))
  return launch, bwd


def block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM, lengths_B, *,
                           block_size: int, interpret: bool = False,
                           config: MosaicGPUConfig | None = None):
  """As `pallas_kernels.block_sparse_attention` (inputs checked there)."""
  require_platform("gpu", interpret, "the Mosaic GPU block-sparse attention kernel")
  H = q_BTNH.shape[-1]
  why = mgpu_supported(H, block_size, q_BTNH.dtype)
  if why is not None:
    raise NotSupported(why)
  config = config or MosaicGPUConfig()
  config.validate()
  launch, bwd = launch_of(config, H, q_BTNH.dtype, block_size, interpret)
  return _attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM.astype(jnp.int32),
                    lengths_B.astype(jnp.int32), int(block_size), launch, bwd, bool(interpret))
