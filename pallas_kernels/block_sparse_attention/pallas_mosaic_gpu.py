"""Block-sparse causal prefill attention, forward pass as a Pallas Mosaic GPU kernel (Hopper: TMA
loads, wgmma, warp specialisation as in FlashAttention-3), the `pallas_mosaic_gpu`
implementation of `block_sparse_attention`. The backward pass is the Triton kernels'
(`pallas_triton.backward`, from this kernel's o and lse), tied by a `jax.custom_vjp`.

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
the consumer with fewer steps makes up the count with empty meetings).
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
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import online_softmax, tuned
from pallas_kernels.block_sparse_attention.reference import slot_counts
from pallas_kernels import mgpu_util
from pallas_kernels.dispatch import NotSupported, require_platform

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
CONSUMERS = 2        # query blocks (compute warpgroups) per program


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
  """Launch parameters of the forward kernel; the schedule options are off by default (the
  kernel timed on the H100) until a GPU A/B decides.

  pipeline_depth: K / V buffers per consumer (None: as many as fit, at most 4 for H=64 and
    2 for H=128; lowered until the program's shared memory fits an SM).
  backward: the Triton backward kernels' config (`pallas_triton.TritonConfig`; None: tuned).
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
  """
  pipeline_depth: int | None = None
  backward: object | None = None
  overlap_qk: bool = False
  pingpong: bool = False

  def validate(self) -> None:
    d = self.pipeline_depth
    if d is not None and (not isinstance(d, int) or d < 1):
      raise ValueError(f"config.pipeline_depth must be a positive int or None, got {d!r}")
    for name in ("overlap_qk", "pingpong"):
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


def smem_bytes(H: int, block_size: int, depth: int, dtype) -> int:
  """Shared memory of one program: two Q / O tiles, two rings of depth K and V buffers, lse."""
  isz = jnp.dtype(dtype).itemsize
  tile = block_size * H * isz
  return CONSUMERS * tile + 2 * CONSUMERS * depth * tile + CONSUMERS * block_size * 4 + 1024


def fit_depth(H: int, block_size: int, depth: int, dtype) -> int:
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  while depth > 1 and smem_bytes(H, block_size, depth, dtype) > limit:
    depth -= 1
  return depth


def _kernel(len_ref, nfull_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *,
            bs: int, G: int, hdiv: int, nq: int, depth: int, scale_log2: float,
            overlap_qk: bool, pingpong: bool, interpret: bool):
  (q_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), (k_free, v_free) = scoped[:3]
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

  def cast(x, layout):
    return x if interpret else plgpu.layout_cast(x, layout)

  def iota(shape, dim):
    if interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

  def live(w, ref=nlive_ref):
    """Live slots of consumer w's query block (0 past the last block); with nfull_ref, those
    strictly below the diagonal."""
    i = pair * CONSUMERS + w
    return jnp.where(i < nq, ref[b, hi, jnp.minimum(i, nq - 1)], 0)

  def rendezvous():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    if not interpret:
      plgpu.set_max_registers(232, action="increase")
    i = pair * CONSUMERS + wg
    q0 = i * bs
    steps = live(wg)
    my_q = q_smem.at[wg]

    def slot_of(s):
      return wg * depth + lax.rem(s, jnp.int32(depth))

    def qk_dot(slot):           # the interpreter's product (no transposed wgmma operand in 0.10)
      return jnp.dot(my_q[...], k_smem.at[slot][...].T, preferred_element_type=jnp.float32)

    def qk_of(slot, after_issue=lambda: None):
      """S = Q K^T of the K tile in `slot` (f32 [bs, bs]); after_issue runs while the wgmma
      is in flight."""
      if interpret:
        qk = qk_dot(slot)
        after_issue()
        return qk

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, my_q, mgpu_util.transposed(k_smem.at[slot]))
        after_issue()
        return acc_ref[...]
      return pl.run_scoped(compute_qk, plgpu.ACC((bs, bs), jnp.float32))

    def softmax(qk, acc, m_i, l_i, block, mask):
      """One slot's online-softmax update (base 2): (acc rescaled, m, l, p in q's dtype);
      mask: None, or the (rows, offs) iotas of the causal and length mask."""
      s_ = qk * scale_log2
      masked = mask is not None
      if masked:                # the diagonal block (the only one that can cross the length)
        rows, offs = mask
        cols = block * bs + offs
        valid = (cols <= rows) & (cols < length)
        s_ = jnp.where(valid, s_, online_softmax.MASK_VALUE)
      m_new = jnp.maximum(m_i, s_.max(axis=1))
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
      return acc, m_new, l_new, p16

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

    def step(s, carry, mask):
      acc, m_i, l_i = carry
      slot = slot_of(s)
      block = idx_ref[b, hi, i, s]
      plgpu.barrier_wait(k_ready.at[slot])
      qk = qk_of(slot, after_qk)
      plgpu.barrier_arrive(k_free.at[slot])
      acc, m_new, l_new, p16 = softmax(qk, acc, m_i, l_i, block, mask)
      wait_v(slot)
      acc = pv(acc, p16, slot)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_new

    def step_overlapped(s, carry, prefetch, mask):
      """One slot with its scores already in the carry; with prefetch, the next slot's QK^T
      wgmma is issued first and runs under this slot's softmax."""
      acc, m_i, l_i, qk = carry
      slot, nslot = slot_of(s), slot_of(s + 1)

      def body(qk_ref):
        if prefetch:
          plgpu.barrier_wait(k_ready.at[nslot])
          if interpret:
            nxt = qk_dot(nslot)
          else:
            plgpu.wgmma(qk_ref, my_q, mgpu_util.transposed(k_smem.at[nslot]))
        after_qk()
        acc2, m_new, l_new, p16 = softmax(qk, acc, m_i, l_i, idx_ref[b, hi, i, s], mask)
        wait_v(slot)
        acc2 = pv(acc2, p16, slot)                 # waits for the next QK^T too
        plgpu.barrier_arrive(v_free.at[slot])
        if prefetch and not interpret:
          nxt = qk_ref[...]
        return acc2, m_new, l_new, nxt if prefetch else qk

      if prefetch and not interpret:
        out = pl.run_scoped(body, plgpu.ACC((bs, bs), jnp.float32))
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
      mask = (q0 + iota((bs, bs), 0), iota((bs, bs), 1))
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
                            cast(jnp.zeros((bs, bs), jnp.float32), wgmma_layout))
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
        n_full = live(wg, nfull_ref)
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
      lax.fori_loop(steps, live(1 - wg), empty, 0)
      pl.when(wg == 0)(rendezvous)

  @pl.when(wg == CONSUMERS)
  def _producer():
    if not interpret:
      plgpu.set_max_registers(40, action="decrease")
    counts = [live(w) for w in range(CONSUMERS)]

    def issue(w, s):
      slot = w * depth + lax.rem(s, jnp.int32(depth))
      block = jnp.maximum(idx_ref[b, hi, pair * CONSUMERS + w, s], 0)
      src = (b, pl.ds(block * bs, bs), kvh)

      @pl.when(s >= depth)
      def _():
        plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])

      @pl.when(s >= depth)
      def _():
        plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

    def step(s, carry):
      for w in range(CONSUMERS):
        pl.when(s < counts[w])(functools.partial(issue, w, s))
      return carry

    lax.fori_loop(0, jnp.maximum(counts[0], counts[1]), step, 0)

    # Drain: wait for the consumers to free the buffers of their last steps, so that every
    # phase of the free barriers is observed before they are released (the interpreter checks
    # it; on the GPU the producer has nothing else to do).
    for w in range(CONSUMERS):
      def drain(s, carry, w=w):
        slot = w * depth + lax.rem(s, jnp.int32(depth))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        return carry
      lax.fori_loop(jnp.maximum(counts[w] - depth, 0), counts[w], drain, 0)


@functools.partial(jax.jit, static_argnames=("block_size", "depth", "overlap_qk", "pingpong",
                                             "interpret"))
def forward(q_BTNH, k_BTKH, v_BTKH, idx_BHQM, lengths_B, *, block_size: int, depth: int,
            overlap_qk: bool = False, pingpong: bool = False, interpret: bool = False):
  """(o [B, T, N, H] in q's dtype, lse f32 [B, N, Tp] natural log, +inf on rows that see no
  key), Tp = nQ * block_size (the Triton forward's outputs, o unpadded). overlap_qk, pingpong:
  as `MosaicGPUConfig`'s."""
  if overlap_qk and pingpong and depth < 2:
    raise NotSupported("overlap_qk with pingpong needs pipeline_depth >= 2 (with one buffer a "
                       "consumer's prefetch and the other's rendezvous wait on each other)")
  B, T, N, H = q_BTNH.shape
  K, Hi, nq = k_BTKH.shape[2], idx_BHQM.shape[1], idx_BHQM.shape[2]
  bs = block_size
  n_full, n_live = slot_counts(idx_BHQM, lengths_B, bs)
  dtype = q_BTNH.dtype
  kernel = functools.partial(_kernel, bs=bs, G=N // K, hdiv=N // Hi, nq=nq, depth=depth,
                             scale_log2=H ** -0.5 * LOG2E, overlap_qk=overlap_qk,
                             pingpong=pingpong, interpret=interpret)
  tiles = mgpu_util.tiles(dtype)

  def entry(len_ref, nfull_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
    pl.run_scoped(
        lambda *scoped: kernel(len_ref, nfull_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, o_ref,
                               lse_ref, scoped),
        (plgpu.SMEM((CONSUMERS, bs, H), dtype, transforms=tiles),
         plgpu.SMEM((CONSUMERS * depth, bs, H), dtype, transforms=tiles),
         plgpu.SMEM((CONSUMERS * depth, bs, H), dtype, transforms=tiles),
         plgpu.SMEM((CONSUMERS, bs), jnp.float32)),
        (plgpu.Barrier(num_barriers=CONSUMERS * depth),
         plgpu.Barrier(num_barriers=CONSUMERS * depth),
         plgpu.Barrier(num_barriers=CONSUMERS)),
        (plgpu.Barrier(num_arrivals=1, num_barriers=CONSUMERS * depth),) * 2,
        *((plgpu.Barrier(num_arrivals=CONSUMERS),) if pingpong else ()),
        collective_axes="wg",
    )

  # reads past T (the last block of a ragged length) are zero-filled, as the TMA unit does
  interp = mgpu_util.interpret_params(interpret)
  Tp = nq * bs
  # The output rows past T (a ragged last block) land in the padded o, sliced off below.
  o, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((B, Tp, N, H), dtype),
                jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
      grid=(B, N, -(-nq // CONSUMERS)),
      grid_names=("b", "n", "q"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=mgpu_util.compiler_params(),
      interpret=interp,
  )(lengths_B.astype(jnp.int32), n_full, n_live, idx_BHQM.astype(jnp.int32), q_BTNH, k_BTKH,
    v_BTKH)
  return o[:, :T], lse


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
  from pallas_kernels.block_sparse_attention import pallas_triton
  q, k, v, idx_BHQM, lengths_B, o, lse = res
  dq, dk, dv = pallas_triton.backward(q, k, v, idx_BHQM, lengths_B, o, lse, do,
                                      block_size=block_size, launch_=bwd_launch)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


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
  depth = fit_depth(H, block_size, config.pipeline_depth or {64: 4, 128: 2, 256: 1}[H],
                    q_BTNH.dtype)
  try:                                          # the backward pass is the Triton kernels'
    from pallas_kernels.block_sparse_attention import pallas_triton
  except ImportError as e:
    raise NotSupported(f"its backward needs the Pallas Triton kernels ({e})") from e
  _, bwd = pallas_triton.resolve(config.backward, block_size, H, interpret)
  launch = (("depth", depth), ("overlap_qk", config.overlap_qk), ("pingpong", config.pingpong))
  return _attention(q_BTNH, k_BTKH, v_BTKH, block_indices_BHQM.astype(jnp.int32),
                    lengths_B.astype(jnp.int32), int(block_size), launch, bwd, bool(interpret))
