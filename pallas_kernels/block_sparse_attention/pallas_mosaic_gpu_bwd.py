"""Block-sparse causal prefill attention, backward pass as Pallas Mosaic GPU kernels (Hopper: TMA
loads, wgmma, a producer warpgroup): FlashAttention-2's two kernels over the selected blocks, the
Mosaic GPU counterpart of `pallas_triton.backward` (same inputs, same outputs).

- dq: one program (three warpgroups) per (sequence, query head, pair of query blocks), as the
  forward: each consumer owns one query block (its Q and dO tiles, its lse and D rows in shared
  memory) and walks that block's live index slots; the producer copies each selected block's K
  and V tiles into the consumer's ring. A step: S = Q K^T and dP = dO V^T (two wgmmas, one
  wait), P = exp2(S scale - lse) (masked on the diagonal block only), dS = P (dP - D),
  dq += dS K (a wgmma with dS as the register operand).
- dk / dv: one program per (sequence, KV head, pair of key blocks): each consumer owns one key
  block (its K and V tiles) and walks the (query block i, query head g) entries that selected it
  (`transpose_indices`: below-diagonal entries first, the diagonal ones, which need the mask,
  last); the producer copies each entry's Q and dO tiles and its lse and D rows. A step:
  S^T = K Q^T and dP^T = V dO^T, P^T = exp2(S^T scale - lse), dv += P^T dO, dS^T = P^T (dP^T - D),
  dk += dS^T Q. The GQA group's query heads are summed in the accumulators.

Query rows past the length (or that see no key) carry lse = +inf from the forward pass, so their
recomputed probabilities are 0 and no step masks them. Shapes: block_size 64, head dim 64 or
128 (256: the tiles and rings do not fit an SM; refused), bfloat16 / float16. In interpret mode
(the Mosaic GPU interpreter, CPU tests) the products are plain dots; the rest is the same kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mgpu_util, tuned
from pallas_kernels.block_sparse_attention.reference import (per_query_head, slot_counts,
                                                             transpose_indices)

LOG2E = math.log2(math.e)
CONSUMERS = 2        # query blocks (dq) or key blocks (dk / dv) a program


def bwd_supported(H: int, block_size: int, dtype) -> str | None:
  """Why the backward kernels can't take these shapes, or None if they can."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name}: the wgmma kernels take bfloat16 / float16 only"
  if H not in (64, 128):
    return (f"head dim H={H}: the backward kernels take 64 or 128 (at 256 a consumer's tiles "
            f"and one ring buffer exceed an SM's shared memory)")
  if block_size != 64:
    return f"block_size={block_size} must be 64 (one wgmma row tile per block)"
  return None


def bwd_smem_bytes(H: int, block_size: int, depth: int, dtype) -> int:
  """Shared memory of either backward program: per consumer two [bs, H] tiles of its own and a
  ring of `depth` buffers of two tiles and two f32 rows (the dk / dv kernel's; the dq kernel's
  own rows are as large), and 8 bytes a barrier."""
  tile = block_size * H * jnp.dtype(dtype).itemsize
  rows = 2 * block_size * 4
  per_consumer = 2 * tile + rows + depth * (2 * tile + rows)
  return CONSUMERS * per_consumer + 8 * CONSUMERS * (1 + 2 * depth) + 1024


def bwd_depth(H: int, block_size: int, dtype, depth: int | None = None) -> int:
  """Ring buffers a consumer (from `depth`, default 4 at H 64 and 2 at H 128), lowered until the
  program fits an SM."""
  limit = tuned.lookup("device", "gpu")["smem_per_sm"]
  depth = depth or (4 if H <= 64 else 2)
  while depth > 1 and bwd_smem_bytes(H, block_size, depth, dtype) > limit:
    depth -= 1
  return depth


class _Ops:
  """The pieces both kernels share: register layouts (none in interpret mode) and the two kinds
  of products, wgmmas on the GPU, dots in the interpreter."""

  def __init__(self, interpret: bool):
    self.interpret = interpret
    self.acc = plgpu.Layout.WGMMA

  def cast(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def iota(self, shape, dim):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.acc)

  def zeros(self, shape):
    return self.cast(jnp.zeros(shape, jnp.float32), self.acc)

  def row(self, ref, dim):
    """A [bs] f32 row from shared memory, laid out to broadcast along `dim` of a [bs, bs] tile
    (dim 1: one value a tile row; dim 0: one a column)."""
    if self.interpret:
      return ref[...]
    return mgpu_util.load(ref, self.acc.reduce(dim))

  def two_abt(self, a1, b1, a2, b2, shape):
    """(a1 b1^T, a2 b2^T) f32 for shared-memory tiles, issued together, one wait."""
    if self.interpret:
      dot = lambda a, b: jnp.dot(a[...], b[...].T, preferred_element_type=jnp.float32)
      return dot(a1, b1), dot(a2, b2)

    def body(refs):
      r1, r2 = refs
      plgpu.wgmma(r1, a1, mgpu_util.transposed(b1))
      plgpu.wgmma(r2, a2, mgpu_util.transposed(b2))
    z = self.zeros(shape)
    return pl.run_state(body)((plgpu.ACC.init(z), plgpu.ACC.init(z)))

  def acc_ab(self, acc, a16, b_smem):
    """acc + a16 b for a16 in registers and b a shared-memory tile (waits for the wgmma)."""
    if self.interpret:
      return acc + jnp.dot(a16, b_smem[...], preferred_element_type=jnp.float32)

    def body(acc_ref):
      plgpu.wgmma(acc_ref, a16, b_smem)
    return pl.run_state(body)(plgpu.ACC.init(acc))

  def two_acc_ab(self, acc1, a1, b1, acc2, a2, b2):
    """(acc1 + a1 b1, acc2 + a2 b2), both issued, one wait."""
    if self.interpret:
      dot = lambda a, b: jnp.dot(a, b[...], preferred_element_type=jnp.float32)
      return acc1 + dot(a1, b1), acc2 + dot(a2, b2)

    def body(refs):
      r1, r2 = refs
      plgpu.wgmma(r1, a1, b1)
      plgpu.wgmma(r2, a2, b2)
    return pl.run_state(body)((plgpu.ACC.init(acc1), plgpu.ACC.init(acc2)))


def live_slots(ref, b, row, pair, w: int, nq: int):
  """ref[b, row, i]: the slot count of consumer w's block i = pair * CONSUMERS + w of a program
  (0 past the last block)."""
  i = pair * CONSUMERS + w
  return jnp.where(i < nq, ref[b, row, jnp.minimum(i, nq - 1)], 0)


def _producer(counts, issue, free, depth: int, interpret: bool):
  """The producer warpgroup: for step s of each consumer w (s < counts[w]) wait until w's ring
  buffer is free again (after its first `depth` steps), then `issue(w, s, slot)` the step's
  copies; then wait for the consumers to free the buffers of their last steps (every phase of
  the free barriers observed before they are released)."""
  if not interpret:
    plgpu.set_max_registers(40, action="decrease")

  def step(s, carry):
    for w in range(CONSUMERS):
      @pl.when(s < counts[w])
      def _(w=w):
        slot = w * depth + lax.rem(s, jnp.int32(depth))

        @pl.when(s >= depth)
        def _():
          plgpu.barrier_wait(free.at[slot])
        issue(w, s, slot)
    return carry

  lax.fori_loop(0, jnp.maximum(counts[0], counts[1]), step, 0)
  for w in range(CONSUMERS):
    def drain(s, carry, w=w):
      plgpu.barrier_wait(free.at[w * depth + lax.rem(s, jnp.int32(depth))])
      return carry
    lax.fori_loop(jnp.maximum(counts[w] - depth, 0), counts[w], drain, 0)


def _dq_kernel(len_ref, nfull_ref, nlive_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, scoped, *, bs: int, G: int, hdiv: int, nq: int, depth: int,
               scale_log2: float, interpret: bool):
  (q_smem, do_smem, lse_smem, d_smem, k_smem, v_smem), (own_ready, ready), (free,) = scoped
  ops = _Ops(interpret)
  b, n, pair, wg = (lax.axis_index(a) for a in ("b", "n", "q", "wg"))
  hi = lax.div(n, jnp.int32(hdiv))
  kvh = lax.div(n, jnp.int32(G))
  length = len_ref[b]
  H = q_smem.shape[-1]
  dtype = q_smem.dtype

  def live(w, ref=nlive_ref):
    return live_slots(ref, b, hi, pair, w, nq)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    if not interpret:
      plgpu.set_max_registers(232, action="increase")
    i = pair * CONSUMERS + wg
    q0 = i * bs
    my = lambda ref: ref.at[wg]

    @pl.when(i < nq)
    def _():
      rows = pl.ds(q0, bs)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], my(q_smem), own_ready.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, n], my(do_smem), own_ready.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, n, rows], my(lse_smem), own_ready.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, n, rows], my(d_smem), own_ready.at[wg])
      plgpu.barrier_wait(own_ready.at[wg])
      lse2 = ops.row(my(lse_smem), 1) * LOG2E
      delta = ops.row(my(d_smem), 1)
      rows_i = q0 + ops.iota((bs, bs), 0)
      offs = ops.iota((bs, bs), 1)

      def step(s, dq, masked):
        slot = wg * depth + lax.rem(s, jnp.int32(depth))
        plgpu.barrier_wait(ready.at[slot])
        ks, vs = k_smem.at[slot], v_smem.at[slot]
        qk, dp = ops.two_abt(my(q_smem), ks, my(do_smem), vs, (bs, bs))
        p = jnp.exp2(qk * scale_log2 - lax.broadcast_in_dim(lse2, qk.shape, [0]))
        if masked:
          cols = idx_ref[b, hi, i, s] * bs + offs
          p = jnp.where((cols <= rows_i) & (cols < length), p, 0.0)
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
        dq = ops.acc_ab(dq, ds.astype(dtype), ks)
        plgpu.barrier_arrive(free.at[slot])
        return dq

      dq = lax.fori_loop(0, live(wg, nfull_ref), functools.partial(step, masked=False),
                         ops.zeros((bs, H)))
      dq = lax.fori_loop(live(wg, nfull_ref), live(wg), functools.partial(step, masked=True), dq)
      my(q_smem)[...] = (dq * (scale_log2 / LOG2E)).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my(q_smem), dq_ref.at[b, rows, n])
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _():
    def issue(w, s, slot):
      block = jnp.maximum(idx_ref[b, hi, pair * CONSUMERS + w, s], 0)
      keys = (b, pl.ds(block * bs, bs), kvh)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], ready.at[slot])
    _producer([live(w) for w in range(CONSUMERS)], issue, free, depth, interpret)


def _dkv_kernel(len_ref, tfull_ref, tlive_ref, tidx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, scoped, *, bs: int, G: int, nq: int, depth: int,
                scale_log2: float, interpret: bool):
  (k_smem, v_smem, q_smem, do_smem, lse_smem, d_smem), (own_ready, ready), (free,) = scoped
  ops = _Ops(interpret)
  b, kvh, pair, wg = (lax.axis_index(a) for a in ("b", "k", "j", "wg"))
  length = len_ref[b]
  H = k_smem.shape[-1]
  dtype = k_smem.dtype

  def live(w, ref=tlive_ref):
    return live_slots(ref, b, kvh, pair, w, nq)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    if not interpret:
      plgpu.set_max_registers(232, action="increase")
    j = pair * CONSUMERS + wg
    k0 = j * bs
    my = lambda ref: ref.at[wg]

    @pl.when(j < nq)
    def _():
      keys = pl.ds(k0, bs)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kvh], my(k_smem), own_ready.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kvh], my(v_smem), own_ready.at[wg])
      plgpu.barrier_wait(own_ready.at[wg])
      cols_k = k0 + ops.iota((bs, bs), 0)          # S^T: keys down the rows, queries across
      offs = ops.iota((bs, bs), 1)

      def step(s, carry, masked):
        dk, dv = carry
        slot = wg * depth + lax.rem(s, jnp.int32(depth))
        plgpu.barrier_wait(ready.at[slot])
        qs, dos = q_smem.at[slot], do_smem.at[slot]
        st, dpt = ops.two_abt(my(k_smem), qs, my(v_smem), dos, (bs, bs))
        lse2 = ops.row(lse_smem.at[slot], 0) * LOG2E
        delta = ops.row(d_smem.at[slot], 0)
        pt = jnp.exp2(st * scale_log2 - lax.broadcast_in_dim(lse2, st.shape, [1]))
        if masked:
          i = lax.div(tidx_ref[b, kvh, j, s], jnp.int32(G))
          rows_q = i * bs + offs
          pt = jnp.where((cols_k <= rows_q) & (cols_k < length), pt, 0.0)
        dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
        dv, dk = ops.two_acc_ab(dv, pt.astype(dtype), dos, dk, dst.astype(dtype), qs)
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      init = (ops.zeros((bs, H)), ops.zeros((bs, H)))
      carry = lax.fori_loop(0, live(wg, tfull_ref), functools.partial(step, masked=False), init)
      dk, dv = lax.fori_loop(live(wg, tfull_ref), live(wg), functools.partial(step, masked=True),
                             carry)
      my(k_smem)[...] = (dk * (scale_log2 / LOG2E)).astype(dtype)
      my(v_smem)[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my(k_smem), dk_ref.at[b, keys, kvh])
      plgpu.copy_smem_to_gmem(my(v_smem), dv_ref.at[b, keys, kvh])
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _():
    def issue(w, s, slot):
      r = jnp.maximum(tidx_ref[b, kvh, pair * CONSUMERS + w, s], 0)
      i, g = lax.div(r, jnp.int32(G)), lax.rem(r, jnp.int32(G))
      n = kvh * G + g
      rows = pl.ds(i * bs, bs)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_smem.at[slot], ready.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, n], do_smem.at[slot], ready.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, n, rows], lse_smem.at[slot], ready.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, n, rows], d_smem.at[slot], ready.at[slot])
    _producer([live(w) for w in range(CONSUMERS)], issue, free, depth, interpret)


@functools.partial(jax.jit, static_argnames=("block_size", "depth", "interpret"))
def backward(q_BTNH, k_BTKH, v_BTKH, idx_BHQM, lengths_B, o_BTNH, lse_BNT, do_BTNH, *,
             block_size: int, depth: int, interpret: bool = False):
  """(dq, dk, dv) in the inputs' dtypes, [B, T, ., H], from the forward's o ([B, T, N, H]) and
  lse (f32 [B, N, Tp], natural log, +inf on rows that see no key); do [B, T, N, H]. As
  `pallas_triton.backward`."""
  B, T, N, H = q_BTNH.shape
  K, Hi, nq = k_BTKH.shape[2], idx_BHQM.shape[1], idx_BHQM.shape[2]
  G, bs = N // K, block_size
  Tp = nq * bs
  dtype = q_BTNH.dtype
  idx = idx_BHQM.astype(jnp.int32)
  lengths = lengths_B.astype(jnp.int32)
  # D_t = do_t . o_t (FlashAttention-2's preprocessing), padded to Tp as lse is
  delta = jnp.einsum("btnh,btnh->bnt", do_BTNH.astype(jnp.float32), o_BTNH.astype(jnp.float32))
  delta = jnp.pad(delta, ((0, 0), (0, 0), (0, Tp - T)))
  scale_log2 = H ** -0.5 * LOG2E
  tiles = mgpu_util.tiles(dtype)
  f32 = jnp.float32
  interp = mgpu_util.interpret_params(interpret)
  params = mgpu_util.compiler_params()
  tile = lambda n: plgpu.SMEM((n, bs, H), dtype, transforms=tiles)
  rows = lambda n: plgpu.SMEM((n, bs), f32)
  ring = CONSUMERS * depth

  def scratch(own_tiles, own_rows, ring_tiles, ring_rows):
    """Shared memory and barriers: per consumer its own tiles and rows, the rings, then the
    ready barriers (one TMA arrival a copy) and the ring's free barriers."""
    own = own_tiles + own_rows
    return ((*(tile(CONSUMERS) for _ in range(own_tiles)),
             *(rows(CONSUMERS) for _ in range(own_rows)),
             *(tile(ring) for _ in range(ring_tiles)),
             *(rows(ring) for _ in range(ring_rows))),
            (plgpu.Barrier(num_arrivals=own, num_barriers=CONSUMERS),
             plgpu.Barrier(num_arrivals=ring_tiles + ring_rows, num_barriers=ring)),
            (plgpu.Barrier(num_arrivals=1, num_barriers=ring),))

  def launch(kernel, scratch_, out_type, grid, grid_names, *args):
    """One warp-specialised program a grid point: CONSUMERS + 1 warpgroups sharing `scratch_`."""
    def entry(*refs):
      pl.run_scoped(lambda *scoped: kernel(*refs, scoped), *scratch_, collective_axes="wg")
    return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names,
                        num_threads=CONSUMERS + 1, thread_name="wg", compiler_params=params,
                        interpret=interp)(*args)

  n_full, n_live = slot_counts(idx, lengths, bs)
  dq = launch(functools.partial(_dq_kernel, bs=bs, G=G, hdiv=N // Hi, nq=nq, depth=depth,
                                scale_log2=scale_log2, interpret=interpret),
              scratch(2, 2, 2, 0), jax.ShapeDtypeStruct((B, Tp, N, H), dtype),
              (B, N, -(-nq // CONSUMERS)), ("b", "n", "q"),
              lengths, n_full, n_live, idx, q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta)
  tidx, t_full, t_live = transpose_indices(per_query_head(idx, N), lengths, K, bs)
  dk, dv = launch(functools.partial(_dkv_kernel, bs=bs, G=G, nq=nq, depth=depth,
                                    scale_log2=scale_log2, interpret=interpret),
                  scratch(2, 0, 2, 2),
                  (jax.ShapeDtypeStruct((B, Tp, K, H), k_BTKH.dtype),
                   jax.ShapeDtypeStruct((B, Tp, K, H), v_BTKH.dtype)),
                  (B, K, -(-nq // CONSUMERS)), ("b", "k", "j"),
                  lengths, t_full, t_live, tidx, q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta)
  return dq[:, :T], dk[:, :T], dv[:, :T]
