"""Block-sparse decode attention as a Pallas Mosaic GPU kernel (Hopper: TMA loads + wgmma), the
`pallas_mosaic_gpu` implementation of `sparse_decode_attention`.

Same split-K structure as the Triton kernel: program (b, k, j) takes the j-th share of the live
block slots of (sequence b, KV head k) and writes an online-softmax partial (o, m, l) that
`combine_splits` merges. What differs is how the bytes move:

- each selected block is one TMA copy of a [block_size, H] K tile and one of V into swizzled
  shared memory, `pipeline_depth` blocks in flight (`plgpu.emit_pipeline` with a dynamic step
  count; the block id of a step is read from the index array inside the pipeline's index map);
- the G query rows of the group are padded to the 64 rows of a warpgroup MMA (rows past G are
  zero, their softmax stays in those rows and is never stored); QK^T and PV are `wgmma`s with the
  K / V tiles read straight from shared memory;
- the tail of the last block past the buffer is zero-filled by the TMA unit, so the cache is
  padded only to a multiple of 8 rows (the TMA tile), not to a block multiple.

H200, same runs as the Triton kernel: within 1% at B8 / B16 (106.7 against 106.4 us at B8 S128K
90%), 1-2 us faster at B1; both sit at ~84% of the byte floor on random 16 KB gathers. Rows of a
partial: RO = G rounded up to 8 (`rows_out`, a TMA store of whole 8-row tiles); the merge reads
the first G.
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
from pallas_kernels.sparse_decode.reference import live_slots


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
  """Launch parameters; None takes the tuned value (`tuned.lookup("sparse_decode_attention",
  "pallas_mosaic_gpu")`; H200 sweep at B8 / B1 S128K, 90% and a 4K budget: two blocks in flight
  and two programs per SM best or within 2%).

  num_splits: programs per (batch, kv head) (None: towards `programs_per_sm` programs per SM).
  pipeline_depth: blocks in flight per program (TMA copies issued ahead; lowered until one
  program's shared memory fits an SM).
  max_programs_per_sm: the most programs per SM the split heuristic aims for when their shared
  memory fits.
  """
  num_splits: int | None = None
  pipeline_depth: int | None = None
  max_programs_per_sm: int | None = None


CONFIG = MosaicGPUConfig

WGMMA_ROWS = 64  # rows of a warpgroup MMA: the query rows are padded to this
LOG2E = math.log2(math.e)


def mgpu_supported(G: int, H: int, block_size: int, dtype) -> str | None:
  """Why the Mosaic GPU kernel can't take these shapes, or None if it can."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name}: the wgmma kernel takes bfloat16 / float16 only"
  if H % 64 or H > 256:
    return f"head dim H={H} must be a multiple of 64 up to 256 (128-byte swizzled tiles)"
  if block_size not in (64, 128):
    # The PV wgmma's K extent is a block, in 64-element swizzle tiles (16 / 32 do not lower);
    # 192 lowered but gave wrong results on the H200 (28% of outputs, 2026-11-30): not offered.
    return f"block_size={block_size} must be 64 or 128 for the wgmma kernel"
  if G > WGMMA_ROWS:
    return f"G={G} query heads per KV head must be <= {WGMMA_ROWS} (one wgmma row tile)"
  return None  # at H <= 256 and blocks <= 128 one pipeline stage always fits (<= 161 KB)


def rows_out(G: int) -> int:
  return launch.round_up(G, 8)


def query_stride(G: int) -> int:
  """Rows per group in the flat query the kernel copies from: G when every group's RO-row copy
  window starts on an 8-row boundary or stays inside one (G = 1, 2, 4 or a multiple of 8), else
  G padded to RO. A TMA copy whose unaligned window crossed an 8-row boundary of the source put
  the rows past the boundary in the wrong place (H200, JAX 0.11.2: G = 3 / 5 / 6 with B * K > 1,
  experiments/mgpu_sparse/diagnose_g.txt)."""
  return G if (8 % G == 0 or G % 8 == 0) else rows_out(G)


def _kernel(len_ref, nslots_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, q_smem, q_bar,
            *, G: int, q_stride: int, T: int, num_splits: int, stages: int, scale: float,
            interpret: bool):
  # Register layouts are a compiler matter: the GPU interpreter (CPU tests) has no layout_cast,
  # and its arrays have no layout.
  def cast(x, layout):
    return x if interpret else plgpu.layout_cast(x, layout)

  def iota(shape, dim):
    if interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

  R = WGMMA_ROWS
  H = q_smem.shape[-1]
  RO = o_ref.shape[-2]
  dtype = q_smem.dtype
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  b = lax.axis_index("b")
  kh = lax.axis_index("k")
  j = lax.axis_index("s")
  length = len_ref[b]
  n_slots = nslots_ref[b, kh]
  kv_heads = nslots_ref.shape[1]
  per_split = lax.div(n_slots + (num_splits - 1), num_splits)
  start = j * per_split
  steps = jnp.clip(n_slots - start, 0, per_split)

  # The G query rows -> rows [0, G) of a [64, H] swizzled tile. q_ref is the flat query,
  # [B * K * GS, H] with GS query rows per group (GS = G, or G padded to RO when a group's RO-row
  # window would cross an 8-row boundary: `query_stride`); RO rows are copied (whole 8-row tiles:
  # rows past G belong to the next group, or lie past the array and are zero-filled).
  plgpu.copy_gmem_to_smem(q_ref.at[pl.ds((b * kv_heads + kh) * q_stride, RO)],
                          q_smem.at[pl.ds(0, RO)], q_bar)
  plgpu.barrier_wait(q_bar)
  # Rows of a wgmma are independent (each row's scores, softmax and output stay in that row) and
  # only rows < G are stored, so rows >= G cannot change the result; they are zeroed anyway, so
  # that no stale shared memory (NaN / Inf bit patterns) flows through the row arithmetic.
  q = q_smem[...]
  q_smem[...] = jnp.where(iota((R, H), 0) < G, q, jnp.zeros_like(q))
  plgpu.commit_smem()  # the generic-proxy stores, visible to the wgmma that reads q_smem

  scale_log2 = scale * LOG2E
  cols = iota((R, T), 1)

  def block_id(i):
    return idx_ref[b, kh, start + i]

  def step(indices, k_smem, v_smem, carry):
    acc, m_i, l_i = carry
    block = block_id(indices[0])
    # tokens of this block below the length (a -1 id inside the live range: none)
    limit = jnp.where(block >= 0, length - block * T, 0)

    def compute_qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, mgpu_util.transposed(k_smem))
      return acc_ref[...]

    if interpret:
      # The GPU interpreter of JAX 0.10 has no wgmma with a transposed operand (0.11 has); the
      # two products are plain dots there, the rest of the kernel is the same. The wgmma path
      # is checked against the reference on the GPU (`pytest -m gpu`).
      s = jnp.dot(q_smem[...], k_smem[...].T, preferred_element_type=jnp.float32)
    else:
      s = pl.run_scoped(compute_qk, plgpu.ACC((R, T), jnp.float32))
    valid = cols < limit
    s = jnp.where(valid, s * scale_log2, online_softmax.MASK_VALUE)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.where(valid, jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0])), 0.0)
    l_new = l_i * alpha + p.sum(axis=1)
    p16 = p.astype(dtype)

    def compute_pv(acc_ref):
      plgpu.wgmma(acc_ref, p16, v_smem)
      return acc_ref[...]

    if interpret:
      pv = jnp.dot(p16, v_smem[...], preferred_element_type=jnp.float32)
    else:
      pv = pl.run_scoped(compute_pv, plgpu.ACC((R, H), jnp.float32))
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l_new

  spec = plgpu.BlockSpec((T, H), lambda i: (jnp.maximum(block_id(i), 0), 0),
                         transforms=mgpu_util.tiles(dtype))
  init = (cast(jnp.zeros((R, H), jnp.float32), wgmma_layout),
          cast(jnp.full((R,), online_softmax.MASK_VALUE, jnp.float32), row_layout),
          cast(jnp.zeros((R,), jnp.float32), row_layout))
  acc, m_i, l_i = plgpu.emit_pipeline(
      step, grid=(steps,), in_specs=[spec, spec], max_concurrent_steps=stages,
      init_carry=init)(k_ref.at[b, kh], v_ref.at[b, kh])

  mgpu_util.store_partial(acc, m_i, l_i, o_ref, m_ref, l_ref, (b, kh, j))


@functools.partial(jax.jit, static_argnames=("block_size", "num_splits", "stages", "interpret"))
def sparse_decode_partials(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, num_live_BK, *,
                           block_size: int, num_splits: int, stages: int, interpret: bool = False):
  """The kernel's partials: o f32 [B, K, N, RO, H], m / l f32 [B, K, N, RO] (N = num_splits,
  RO = rows_out(G)), as the Triton kernels write them."""
  B, K, G, H = q_BKGH.shape
  RO = rows_out(G)
  GS = query_stride(G)
  kernel = functools.partial(_kernel, G=G, q_stride=GS, T=block_size, num_splits=num_splits,
                             stages=stages, scale=H ** -0.5, interpret=interpret)
  f32 = jnp.float32
  # Reads past the buffer (the tail of a last block past S) are zero-filled, as the TMA unit
  # does on the GPU. Rows G..RO of the query tile hold the next group's query (or zeros past
  # the array), so the kernel's row masking is still exercised.
  interp = mgpu_util.interpret_params(interpret)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((B, K, num_splits, RO, H), f32),
                jax.ShapeDtypeStruct((B, K, num_splits, RO), f32),
                jax.ShapeDtypeStruct((B, K, num_splits, RO), f32)),
      scratch_types=(plgpu.SMEM((WGMMA_ROWS, H), q_BKGH.dtype,
                                transforms=mgpu_util.tiles(q_BKGH.dtype)),
                     plgpu.Barrier(num_arrivals=1)),
      grid=(B, K, num_splits),
      grid_names=("b", "k", "s"),
      # Lane semantics: the kernel states its register layouts (the WGMMA accumulator layout and
      # its row reduction) itself; JAX 0.11 defaults to Warpgroup semantics, whose layout
      # inference rejects the row masks of 16-token blocks and unaligned query-row copies.
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interp,
  )
  # TMA tiles of 8 rows need the row extents of the K / V buffers and the flat query to be
  # multiples of 8: padded here (a copy) only for capacities or B * K * GS that are not; the
  # query's groups are padded to GS rows (a copy) only for G other than 1, 2, 4 or 8k.
  q_flat = launch.pad_axis(launch.pad_axis(q_BKGH, 2, GS).reshape(B * K * GS, H), 0, 8)
  k_BKSH = launch.pad_axis(k_BKSH, 2, 8)
  v_BKSH = launch.pad_axis(v_BKSH, 2, 8)
  return call(lengths_B.astype(jnp.int32), num_live_BK.astype(jnp.int32),
              block_indices_BKM.astype(jnp.int32), q_flat, k_BKSH, v_BKSH)


def smem_per_sm() -> int:
  """Shared memory on Hopper that one block may use (227 KB)."""
  return tuned.lookup("device", "gpu")["smem_per_sm"]


def smem_bytes(G: int, H: int, block_size: int, stages: int, dtype) -> int:
  """Shared memory of one program: the query tile, then the K / V pipeline buffers (the partial's
  store scratch reuses the pipeline's space after it)."""
  isz = jnp.dtype(dtype).itemsize
  pipeline = stages * 2 * block_size * H * isz
  store = WGMMA_ROWS * H * 4 + 2 * WGMMA_ROWS * 4
  return WGMMA_ROWS * H * isz + max(pipeline, store) + 1024  # + barriers, alignment


def fit_stages(G: int, H: int, block_size: int, stages: int, dtype) -> int:
  """`stages`, lowered until one program's shared memory fits an SM (at least 1)."""
  while stages > 1 and smem_bytes(G, H, block_size, stages, dtype) > smem_per_sm():
    stages -= 1
  return stages


def programs_per_sm(G: int, H: int, block_size: int, stages: int, dtype, max_per_sm: int) -> int:
  """Programs whose shared memory fits one SM, at most max_per_sm."""
  fit = smem_per_sm() // smem_bytes(G, H, block_size, stages, dtype)
  return max(1, min(max_per_sm, fit))


def sparse_decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM, *,
                            block_size: int, num_live_BK=None, interpret: bool = False,
                            config: MosaicGPUConfig | None = None) -> jax.Array:
  """Shapes as `pallas_kernels.sparse_decode_attention`."""
  require_platform("gpu", interpret, "the Mosaic GPU sparse decode kernel")
  B, K, G, H = q_BKGH.shape
  why = mgpu_supported(G, H, block_size, q_BKGH.dtype)
  if why is not None:
    raise NotSupported(why)
  config = config or MosaicGPUConfig()
  t = tuned.lookup("sparse_decode_attention", "pallas_mosaic_gpu")
  M = block_indices_BKM.shape[-1]
  stages = fit_stages(G, H, block_size, config.pipeline_depth or t["pipeline_depth"],
                      q_BKGH.dtype)
  lengths_B = lengths_B.astype(jnp.int32)
  block_indices_BKM = block_indices_BKM.astype(jnp.int32)
  num_splits = config.num_splits
  if num_splits is None:
    per_sm = programs_per_sm(G, H, block_size, stages, q_BKGH.dtype,
                             config.max_programs_per_sm or t["max_programs_per_sm"])
    num_splits = launch.default_num_splits(B * K, M, launch.target_programs(per_sm))
  nslots_BK = (live_slots(block_indices_BKM, lengths_B, block_size) if num_live_BK is None
               else num_live_BK.astype(jnp.int32))
  o, m, l = sparse_decode_partials(q_BKGH, k_BKSH, v_BKSH, lengths_B, block_indices_BKM,
                                   nslots_BK, block_size=int(block_size), num_splits=num_splits,
                                   stages=stages, interpret=bool(interpret))
  # The Triton merge where it applies, from the tuned number of splits (it cannot run inside the
  # Mosaic GPU interpreter's process model, so interpret mode merges in XLA).
  many = num_splits >= tuned.lookup("combine_splits", "pallas_triton")["min_splits"]
  impl = ("pallas_triton", "xla") if many and not interpret else "xla"
  return combine_lib.combine_splits(o, m, l, G, q_BKGH.dtype, implementation=impl)
