"""SeerAttention prefill: block-sparse attention at several densities vs dense causal attention,
forward and forward + backward, device time.

  python -m benchmarks seer_prefill [--seqs 32768,131072] [--densities 1.0,0.5,0.2,0.1]
  python -m benchmarks seer_prefill --interpret --seqs 128 --heads 4,2 --head-dim 16 \\
      --block-size 16 --densities 0.5 --calls 1 --copies 1 --windows 1      # CPU smoke

Shapes: B1, 32 query / 8 KV heads, d 128, bf16, full sequences, 64-token blocks. Rows per S and
mode (`fwd`: the forward; `fwdbwd`: forward + the gradients of q, k and v):
- `cudnn`: `jax.nn.dot_product_attention(..., implementation="cudnn", is_causal=True)`, what a
  JAX user runs for dense causal prefill (the peer of every row's `speedup_vs_cudnn`);
- `xla_dense`: `causal_attention(implementation="xla")` (the [T, T] map: skipped where it
  cannot fit);
- `<impl>_flash` / `<impl>_flash+target` (forward only, each of --flash-impls):
  `flash_attention`'s dense kernel, and with SeerAttention's block target (the gate's
  distillation target);
- `<impl>_sparse+gate` (forward, --gate): the whole SeerAttention forward at that density: the
  prefill gate's scores (random gate params), the nz-ratio top-k, the first --sparse-impls
  backend over the chosen blocks;
- `pallas_mosaic_gpu_sparse[k=v,...]` (each config of --mosaic-configs): the Mosaic GPU
  backend with those `MosaicGPUConfig` fields (schedule options to A/B against its default);
- `pallas_triton_sparse` (each of --sparse-impls) / `xla_sparse`: `block_sparse_attention` over per-query-head block
  sets of the density: `random` (the diagonal plus random causal blocks, ceil(d (i + 1)) per
  query block i) or `static` (a sink block and a local window ending at the diagonal, same
  counts); at 1.0 both are every causal block (`all`). The XLA path (a scan over the index
  slots) runs the random sets up to --xla-max-seq.
- `splash_hopper_c<n>` (forward, --splash, where the installed JAX ships
  `jax.experimental.pallas.ops.gpu.splash_attention`): JAX's Hopper splash attention (Pallas Mosaic
  GPU, FA3-style warp specialisation) over the same block sets. Its mask is one per sequence,
  shared by every head, so it gets the first head's sets (its row counts those pairs, for all
  heads); its two compute warpgroups share one key-block sequence per pair of query blocks (the
  union of both blocks' sets, the blocks one of them skips masked), and `c<n>` is its
  `max_concurrent_steps`. `max_abs_err` is its largest difference from
  `block_sparse_attention` over the same sets.

Timing (benchmarks/devtime.py, as the other suites): one jit runs --calls calls over --copies
distinct inputs (each behind an optimization barrier, so nothing is hoisted or shared), wall
time / calls, median of --windows windows; with --trace (default on a GPU) also the profiler's
kernel time. FLOPs are the useful ones (4 H per visible query-key pair forward, 3.5x that
forward + backward); the floor is those FLOPs at the card's dense bf16 peak, and a row faster
than its floor fails the run (a harness error). Writes out/<card>/seer_prefill.json
(--update-results: benchmarks/results/<card>/).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from benchmarks import common
from benchmarks.bench_decode import device_bytes_limit, measure, parse_ints
from benchmarks.bench_train import PEAK_BF16, peak_tflops
from effjax.config import ModelConfig
from effjax.sparse.gate import GateConfig
from effjax.sparse.prefill_gate import gate_logits, init_prefill_gate_params
from effjax.sparse.prefill_selection import select_nz_ratio
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.flash_attention import flash_attention

try:  # JAX's Hopper splash attention (Pallas Mosaic GPU), a peer where the installed JAX has it
  from jax.experimental.pallas.ops.gpu.splash_attention import attention_mask as splash_mask
  from jax.experimental.pallas.ops.gpu.splash_attention import hopper_splash_attention as splash
except Exception:  # noqa: BLE001  (absent, or failing to import, in this JAX)
  splash = splash_mask = None

ROWS_KEPT = 8                # rows of each output the harness reads (see `keep`)
BWD_FLOP_FACTOR = 3.5        # forward + backward = 2 + 5 matmuls over 2 (FlashAttention-2's count)
FALLBACK_PEAK = "H100"       # the floor's peak where the card is unknown (CPU smoke runs)


def block_counts(nq: int, density: float) -> np.ndarray:
  """Blocks kept per query block i: ceil(density * (i + 1)), at least the diagonal. int [nQ]."""
  i = np.arange(1, nq + 1)
  return np.maximum(1, np.minimum(i, np.ceil(density * i - 1e-9).astype(int)))


def block_indices(key, B: int, N: int, nq: int, density: float, pattern: str) -> jax.Array:
  """int32 [B, N, nQ, M], ascending, -1 padded (M = the widest row). random: the diagonal plus
  uniformly random causal blocks per (sequence, head, query block); static: block 0 (the sink)
  and the window ending at the diagonal; all: every causal block."""
  n_Q = jnp.asarray(block_counts(nq, density))
  M = int(block_counts(nq, density).max())
  i, j = jnp.arange(nq)[:, None], jnp.arange(nq)[None, :]
  if pattern == "all" or density >= 1.0:
    keep = jnp.broadcast_to(j <= i, (B, N, nq, nq))
  elif pattern == "random":
    # the diagonal scores above every uniform, blocks above it below: the n_i best are the
    # diagonal and n_i - 1 random causal blocks
    u = jax.random.uniform(key, (B, N, nq, nq))
    score = jnp.where(j < i, u, jnp.where(j == i, 2.0, -1.0))
    kth = jnp.take_along_axis(-jnp.sort(-score, axis=-1),
                              jnp.broadcast_to((n_Q - 1)[:, None], (B, N, nq, 1)), axis=-1)
    keep = score >= kth
  elif pattern == "static":
    n = n_Q[:, None]
    keep = jnp.broadcast_to(((j == 0) & (n >= 2)) | ((j <= i) & (j > i - n + (n >= 2))),
                            (B, N, nq, nq))
  else:
    raise ValueError(f"unknown pattern {pattern!r}")
  ids = jnp.sort(jnp.where(keep, j, nq), axis=-1)[..., :M]
  return jnp.where(ids == nq, -1, ids).astype(jnp.int32)


def splash_mask_info(ids_BQM: np.ndarray, block_size: int, data_tiling: int = 2) -> dict:
  """The forward `MaskInfo` fields of JAX's Hopper splash attention for one block set per
  (sequence, query block): ids_BQM int [B, nQ, M], -1 padded, causal (j <= i). Built directly
  (`attention_mask.process_dynamic_mask` would materialise the [S, S] mask): every kept
  off-diagonal block is full (2), a kept diagonal block is partial (1) under the one causal
  [bs, bs] block, a block of the pair's union that this query block skips is 0. Per pair of
  query blocks (the `data_tiling` warpgroups share one key-block sequence) the union of their
  blocks, ascending, -1 padded; `num_nonzero_blocks` its length."""
  B, nq, _ = ids_BQM.shape
  if nq % data_tiling:
    raise ValueError(f"{nq} query blocks do not split into groups of {data_tiling}")
  keep = np.zeros((B, nq, nq + 1), bool)
  np.put_along_axis(keep, np.where(ids_BQM >= 0, ids_BQM, nq), True, axis=-1)
  keep = keep[..., :nq]
  union = keep.reshape(B, nq // data_tiling, data_tiling, nq).any(axis=2)
  cols = np.arange(nq)
  order = np.argsort(np.where(union, cols, nq + cols), axis=-1, kind="stable")
  n_nonzero = union.sum(-1)
  data_next = np.where(cols < n_nonzero[..., None], order, -1)            # [B, nQ/t, nKV]
  dn_rows = np.repeat(data_next, data_tiling, axis=1)                      # [B, nQ, nKV]
  kept = np.take_along_axis(keep, np.maximum(dn_rows, 0), axis=-1) & (dn_rows >= 0)
  diag = dn_rows == np.arange(nq)[None, :, None]
  block_mask = np.where(kept, np.where(diag, 1, 2), 0).astype(np.int8)
  return dict(data_next=data_next[:, None].astype(np.int32),
              mask_next=np.zeros((B, 1, nq, nq), np.int32),
              block_mask=block_mask[:, None],
              num_nonzero_blocks=n_nonzero[:, None].astype(np.int32),
              partial_mask_blocks=np.tril(np.ones((block_size, block_size), bool))[None, None, None]
              .repeat(B, axis=0))


def splash_visible(info: dict, block_size: int, data_tiling: int = 2) -> np.ndarray:
  """The [B, S, S] bool mask a `splash_mask_info` dict makes the kernel attend (decoded the way
  the forward kernel walks it: steps below num_nonzero_blocks, block_mask per query block)."""
  dn, bm = info["data_next"][:, 0], info["block_mask"][:, 0]
  nnz, part = info["num_nonzero_blocks"][:, 0], info["partial_mask_blocks"][:, 0]
  B, nq, nkv = bm.shape
  bs = block_size
  out = np.zeros((B, nq * bs, nkv * bs), bool)
  for b in range(B):
    for r in range(nq):
      p = r // data_tiling
      for step in range(int(nnz[b, p])):
        c, t = int(dn[b, p, step]), int(bm[b, r, step])
        if t:
          blk = np.ones((bs, bs), bool) if t == 2 else part[b, int(info["mask_next"][b, 0, r, step])]
          out[b, r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] |= blk
  return out


def visible_pairs(idx_BNQM: np.ndarray, block_size: int, T: int) -> int:
  """Query-key pairs the selection makes visible (causal inside the diagonal block; T a block
  multiple): full blocks bs^2, diagonal ones bs (bs + 1) / 2."""
  i = np.arange(idx_BNQM.shape[2])[:, None]
  live = (idx_BNQM >= 0) & (idx_BNQM <= i)
  diag = int(np.sum(live & (idx_BNQM == i)))
  return (int(np.sum(live)) - diag) * block_size ** 2 + diag * block_size * (block_size + 1) // 2


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seqs", default="32768,131072")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", default="32,8", help="query heads,KV heads")
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--densities", default="1.0,0.5,0.2,0.1")
  ap.add_argument("--patterns", default="random,static")
  ap.add_argument("--modes", default="fwd,fwdbwd")
  ap.add_argument("--calls", type=int, default=2, help="calls per timed jit")
  ap.add_argument("--copies", type=int, default=2, help="distinct inputs rotated inside the jit")
  ap.add_argument("--unroll", type=int, default=1)
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--xla-max-seq", type=int, default=32768,
                  help="longest S of the XLA rows (a scan over the slots: seconds per call at "
                       "128K)")
  ap.add_argument("--no-xla", action="store_true", help="skip every XLA row")
  ap.add_argument("--sparse-impls", default="pallas_triton",
                  help="block-sparse backends to time (e.g. pallas_triton,pallas_mosaic_gpu)")
  ap.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                  help="also time the gated forward (gate scores + top-k + the first backend)")
  ap.add_argument("--d-gate", type=int, default=64)
  ap.add_argument("--select-impl", default=None,
                  help="the gated row's top-k (`prefix_topk`): xla or pallas_triton (default: its "
                       "default)")
  ap.add_argument("--splash", default="2,4", metavar="STEPS",
                  help="JAX's Hopper splash attention peer (where installed): its "
                       "max_concurrent_steps values, comma-separated; '' skips it")
  ap.add_argument("--no-target", action="store_true", help="skip the flash+target rows")
  ap.add_argument("--flash-impls", default="pallas_triton",
                  help="flash_attention backends of the flash rows, comma-separated "
                       "(pallas_triton, pallas_mosaic_gpu)")
  ap.add_argument("--mosaic-configs", default="", metavar="K=V,K=V;...",
                  help="one pallas_mosaic_gpu_sparse row per ';'-separated MosaicGPUConfig "
                       "(fields k=v, comma-separated; bools as 0/1/true/false), e.g. "
                       "'overlap_qk=1;pingpong=1;overlap_qk=1,pingpong=1'")
  ap.add_argument("--mem-frac", type=float, default=0.5,
                  help="share of device memory a row's largest buffer may take")
  ap.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None,
                  help="also time every row from a profiler trace (default: on a GPU)")
  ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test)")
  common.add_output_args(ap)
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  trace = on_gpu if args.trace is None else args.trace
  N, K = parse_ints(args.heads)
  B, H, bs, dtype = args.batch, args.head_dim, args.block_size, jnp.dtype(args.dtype)
  modes = args.modes.split(",")
  mosaic_configs = parse_mosaic_configs(args.mosaic_configs)
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind)
  peak_src = f"{kind} dense bf16 datasheet" if peak else f"{FALLBACK_PEAK} (card unknown)"
  peak = peak or PEAK_BF16[FALLBACK_PEAK]
  limit = device_bytes_limit()
  fits = lambda nbytes: limit is None or nbytes <= args.mem_frac * limit
  results = []

  for S in parse_ints(args.seqs):
    if S % bs:
      ap.error(f"--seqs: S={S} must be a multiple of --block-size {bs}")
    nq = S // bs
    key = jax.random.key(S)
    copies = tuple(tuple(jax.random.normal(jax.random.fold_in(key, 4 * c + t), shape, dtype)
                         for t, shape in enumerate(((B, S, N, H), (B, S, K, H), (B, S, K, H),
                                                    (B, S, N, H))))
                   for c in range(args.copies))               # (q, k, v, d_out) per copy
    xs = jnp.arange(args.calls // args.copies or 1, dtype=jnp.float32)
    dense_pairs = B * N * S * (S + 1) // 2
    peers: dict[str, float] = {}

    def keep(a):
      """[B, H] f32 that depends on all of a [B, T, heads, H] but costs only a few rows: a
      passes whole through an optimization barrier (so nothing that computes it can be narrowed
      to the rows read), then its first ROWS_KEPT rows are summed. Summing all of it cost ~0.1
      ms a call at S 32K, a harness cost every row paid, which shrank the fast rows' ratios by
      up to ~4%."""
      a = lax.optimization_barrier(a)
      return jnp.sum(a[:, :ROWS_KEPT].astype(jnp.float32), axis=(1, 2))

    def row(impl, mode, fn, pairs, skip=None, operands=(), **extra):
      """Times fn(q, k, v, *operands) (fwd) or its vjp in q, k, v (fwdbwd) over the copies; one
      result row. operands (the block indices) enter the jit as arguments: as constants XLA
      would spend minutes folding the reductions over them."""
      flops = 4 * H * pairs * (BWD_FLOP_FACTOR if mode == "fwdbwd" else 1)
      r = dict(B=B, S=S, Hq=N, Hkv=K, d=H, dtype=dtype.name, block_size=bs, impl=impl, mode=mode,
               **extra, density_of_causal=round(pairs / dense_pairs, 4), flops=flops)
      if skip:
        r["skipped"] = skip
      else:
        def call(x, c):
          (q, k, v, do), ops = c
          f = lambda q, k, v: fn(q, k, v, *ops)
          if mode == "fwd":
            return keep(f(q, k, v))
          o, vjp = jax.vjp(f, q, k, v)
          dq, dk, dv = vjp(do.astype(o.dtype))
          return keep(o) + keep(dq) + keep(dk) + keep(dv)
        try:
          m = measure(call, xs, [(c, tuple(operands)) for c in copies], args.windows,
                      args.unroll, trace)
        except Exception as e:  # a backend that cannot run here (cuDNN off the GPU) or OOM
          r["skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
        else:
          floor_s = flops / (peak * 1e12)
          r.update(ms=m["s"] * 1e3, tflops=flops / m["s"] / 1e12, floor_ms=floor_s * 1e3,
                   frac_of_floor=floor_s / m["s"])
          if "busy_s" in m:
            r.update(trace_busy_ms=m["busy_s"] * 1e3, kernels=m["kernels"],
                     trace_frac_of_floor=floor_s / m["busy_s"] if m["busy_s"] else None)
          elif "trace_error" in m:
            r["trace_error"] = m["trace_error"]
          if impl == "cudnn":
            peers[mode] = m["s"]
          elif mode in peers:
            r["speedup_vs_cudnn"] = peers[mode] / m["s"]
      results.append(r)
      print(json.dumps(r), flush=True)

    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn")
    xla_dense = lambda q, k, v: causal_attention(q, k, v, implementation="xla")
    map_bytes = B * N * S * S * 4
    for mode in modes:
      row("cudnn", mode, cudnn, dense_pairs,
          skip=None if on_gpu else "cuDNN needs a GPU")
      if not args.no_xla:
        row("xla_dense", mode, xla_dense, dense_pairs,
            skip=None if fits(map_bytes * (3 if mode == "fwdbwd" else 1)) and S <= args.xla_max_seq
            else f"the [T, T] map ({map_bytes / 2**30:.0f} GiB per copy) or S > --xla-max-seq")
    if "fwd" in modes:
      for fimpl in args.flash_impls.split(","):
        row(f"{fimpl}_flash", "fwd",
            lambda q, k, v, fimpl=fimpl: flash_attention(q, k, v, implementation=fimpl,
                                                         interpret=args.interpret), dense_pairs)
        if not args.no_target:
          target_bytes = B * N * nq * S * 4
          row(f"{fimpl}_flash+target", "fwd",
              lambda q, k, v, fimpl=fimpl: flash_attention(
                  q, k, v, block_size=bs, implementation=fimpl, interpret=args.interpret)[0],
              dense_pairs,
              skip=None if fits(target_bytes * args.copies) else
              f"the row-max buffers ({args.copies} x {target_bytes / 2**30:.0f} GiB, one per "
              "copy in the jit) exceed --mem-frac")

    lengths = jnp.full((B,), S, jnp.int32)
    gate_params = init_prefill_gate_params(
        ModelConfig(d_model=N * H, n_heads=N, n_kv_heads=K, head_dim=H),
        GateConfig(block_size=bs, d_gate=args.d_gate), jax.random.fold_in(key, 7))

    def gated(impl, density):
      """The whole SeerAttention forward: gate scores of every (head, query block), the nz-ratio
      top-k, then block-sparse attention over the chosen blocks (one gate layer's params)."""
      def fn(q, k, v):
        # the model's nz-ratio path: a top-k of the gate logits (softmax keeps each row's order)
        logits = gate_logits(gate_params["wq"][0], gate_params["wk"][0], q, k, lengths, bs,
                             10000.0)
        idx = select_nz_ratio(logits, lengths, bs, density, implementation=args.select_impl,
                              interpret=args.interpret)
        return block_sparse_attention(q, k, v, idx, lengths, block_size=bs, implementation=impl,
                                      interpret=args.interpret)
      return fn

    def splash_row(idx, pairs_plan):
      """JAX's Hopper splash attention over the first head's block sets (forward)."""
      steps = [int(x) for x in args.splash.split(",") if x]
      if not steps or "fwd" not in modes:
        return
      ids0 = np.asarray(idx)[:, 0]
      shared = np.broadcast_to(ids0[:, None], idx.shape)
      pairs0 = visible_pairs(shared, bs, S)
      if splash is None:
        for c in steps:
          row(f"splash_hopper_c{c}", "fwd", None, pairs0, **pairs_plan,
              skip="this JAX has no jax.experimental.pallas.ops.gpu.splash_attention")
        return
      info = splash_mask.MaskInfo(**{k: jnp.asarray(v) for k, v in
                                      splash_mask_info(ids0, bs).items()},
                                  data_tiling=2, is_dkv=False)
      q0, k0, v0, _ = copies[0]
      ours = block_sparse_attention(q0, k0, v0, jnp.asarray(shared), block_size=bs,
                                    implementation=args.sparse_impls.split(",")[0])
      for c in steps:
        cfg = splash.TuningConfig(block_q=bs, block_kv=bs, max_concurrent_steps=c)
        fn = lambda q, k, v, info, cfg=cfg: splash.attention(q, k, v, info, None, config=cfg,
                                                             scale=H ** -0.5)
        try:
          err = float(jnp.max(jnp.abs(fn(q0, k0, v0, info).astype(jnp.float32)
                                      - ours.astype(jnp.float32))))
        except Exception as e:  # noqa: BLE001  (a peer that cannot run here is reported)
          row(f"splash_hopper_c{c}", "fwd", None, pairs0, **pairs_plan,
              skip=f"{type(e).__name__}: {str(e)[:300]}")
          continue
        row(f"splash_hopper_c{c}", "fwd", fn, pairs0, operands=(info,), **pairs_plan,
            heads_share_blocks=True, max_abs_err=err)

    for density in parse_ints_f(args.densities):
      patterns = ["all"] if density >= 1.0 else args.patterns.split(",")
      for pattern in patterns:
        idx = block_indices(jax.random.fold_in(key, 99), B, N, nq, density, pattern)
        pairs = visible_pairs(np.asarray(idx), bs, S)
        plan = dict(pattern=pattern, density=density, slots=int(idx.shape[-1]))
        sparse = lambda impl, cfg=None: (lambda q, k, v, idx: block_sparse_attention(
            q, k, v, idx, block_size=bs, implementation=impl, interpret=args.interpret,
            config=cfg))
        for mode in modes:
          for impl in args.sparse_impls.split(","):
            row(f"{impl}_sparse", mode, sparse(impl), pairs, operands=(idx,), **plan)
          for label, cfg in mosaic_configs:
            row(f"pallas_mosaic_gpu_sparse[{label}]", mode, sparse("pallas_mosaic_gpu", cfg),
                pairs, operands=(idx,), **plan)
          if args.gate and mode == "fwd" and pattern == patterns[0] != "all":   # once a density
            row(f"{args.sparse_impls.split(',')[0]}_sparse+gate", mode,
                gated(args.sparse_impls.split(",")[0], density), pairs, **plan)
          if mode == "fwd" and on_gpu and args.splash and pattern in ("random", "all"):
            splash_row(idx, plan)
          if not args.no_xla and pattern in ("random", "all"):
            row("xla_sparse", mode, sparse("xla"), pairs, operands=(idx,), **plan,
                skip=None if S <= args.xla_max_seq else f"S > --xla-max-seq {args.xla_max_seq}")
    copies = None  # frees this S's inputs before the next are made

  timing = (f"device time: one jit of {args.calls} calls over {args.copies} distinct inputs "
            f"(bench_decode.measure, unroll {args.unroll}; each output whole behind an "
            f"optimization barrier, {ROWS_KEPT} rows of it summed), median of {args.windows} windows"
            f"{'; profiler kernel time' if trace else ''}; floor: useful FLOPs at {peak} TFLOP/s "
            f"({peak_src})")
  path = common.output_path(args, "seer_prefill.json")
  return common.finish(path, common.meta(timing=timing, peak_tflops=peak), results)


def parse_mosaic_configs(spec: str) -> list[tuple[str, object]]:
  """'k=v,k=v;k=v' -> [(label, MosaicGPUConfig)], one per ';'-separated group
  (`common.parse_fields`; bad items exit naming --mosaic-configs)."""
  from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu
  out = []
  for group in (g.strip() for g in spec.split(";")):
    if group:
      cfg = common.parse_fields(group, pallas_mosaic_gpu.MosaicGPUConfig, "--mosaic-configs",
                                skip=("backward",))
      keys = [item.partition("=")[0].strip() for item in group.split(",")]
      out.append((",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                           for k, v in ((k, getattr(cfg, k)) for k in keys)), cfg))
  return out


def parse_ints_f(s: str) -> list[float]:
  return [float(x) for x in s.split(",") if x]


if __name__ == "__main__":
  raise SystemExit(main())
