"""Decode attention (dense and block-sparse kernels) vs cuDNN and the XLA reference.

  python -m benchmarks decode [--quick] [--batches 1,8,16] [--seqs 8192,32768,131072]
  python -m benchmarks decode --batches 1 --seqs 1024 --interpret --calls 2 --windows 1  # CPU smoke

Shapes: Hq=32 query heads, Hkv=8 KV heads (G=4), d=128, bf16, every sequence full (length = S).
Dense: `decode_attention` (pallas_triton) vs cuDNN (`jax.nn.dot_product_attention(...,
implementation="cudnn")`, layout [B, S, K, H]) and vs the XLA reference. Sparse:
`sparse_decode_attention` with random ascending block sets (block 64) at sparsity 0.5 / 0.8 / 0.9
and at a 4K-token budget, against the same dense cuDNN call (what a user would run instead);
then the same plans as a whole sparse attention step, selector included: SeerAttention-R gate
scores over the K-compression cache (Dg=64) + `block_topk` + the sparse kernel. Those rows rotate
through more distinct gate caches than K/V copies (`gate_copies`, together >= 8x the L2): a
layer's gate cache comes from HBM in a real decode step, and each is a layer with its own gate
projection wq (one shared wq let XLA compute the gate query projection once for all copies).
The K/V copies the gate rows rotate over are passed to the jit once (`devtime.build_many`'s
`shared`): passed once per gate cache, XLA's memory estimate counted each reference and, at B16
S128K, rematerialised the Mosaic GPU kernel's custom call (launched twice per call).

Timing is device time: one jit runs `--calls` kernel calls (a `lax.scan`, unrolled `--unroll`
times, over a stack of different queries -- and, for sparse, different block sets -- times a
Python-unrolled loop over `--copies` distinct caches, every call's inputs behind an optimization
barrier), so nothing can be hoisted or shared and dispatch is amortised; the wall time of that
jit, divided by the number of calls, median over `--windows` windows; and, on a GPU, the
profiler's kernel time of the same jit. The `harness_overhead` row is the same jit with an
identity in place of the kernel. The floor is the K/V bytes the op must read (all of them for
dense; the selected blocks for sparse; + the gate cache) at the read bandwidth measured in the
same run (`devtime.read_bandwidth`; 3.0 TB/s without a GPU). A row faster than its floor is a
harness error: the run fails after writing its results (`devtime.floor_violations`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, devtime
from effjax.decoding import DECODE_COMPILER_OPTIONS
from effjax.sparse import gate as gate_lib
from pallas_kernels.block_topk import block_topk
from pallas_kernels.block_topk.pallas_triton import TritonConfig as TopkConfig
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_attention.pallas_triton import TritonConfig as DenseConfig
from pallas_kernels.sparse_decode import sparse_decode_attention
from pallas_kernels.sparse_decode.pallas_mosaic_gpu import MosaicGPUConfig as SparseMosaicGPUConfig
from pallas_kernels.sparse_decode.pallas_triton import TritonConfig as SparseTritonConfig

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
DTYPE = jnp.bfloat16
GATE_DIM = 64
# The gate rows rotate through distinct K-compression caches whose total is at least this many
# bytes (8x the H100 / H200 L2), at most MAX_GATE_COPIES of them: in a decode step a layer's
# cache was last read a whole step (every other layer) earlier, so it comes from HBM. With only
# `--copies` of them (4 x 34 MB float32 at B8 S128K, 134 MB against a 60 MB L2) the gate scores
# ran at 6.6 TB/s, above the HBM peak: L2 hits. 16 x 17 MB (bf16, B8 S128K) is 4.5x the L2.
GATE_L2_DEFEAT_BYTES = 8 * 60 * 2**20
MAX_GATE_COPIES = 16


def parse_ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def device_bytes_limit() -> int | None:
  try:
    return int(jax.devices()[0].memory_stats()["bytes_limit"])
  except Exception:  # CPU and some backends report nothing
    return None


def time_calls(call, xs, caches, windows: int, unroll: int = 1) -> float:
  """Median seconds per `call(x, cache)` over windows; each window is one jit running every x in
  xs (a lax.scan unrolled `unroll` times) against every cache (unrolled). The fixed cost of a
  window (dispatch, the final sync) and of each loop trip is spread over the calls: more calls
  per jit and fewer trips measure the calls themselves more closely (devtime.py)."""
  return devtime.wall_seconds(devtime.build_many(call, xs, caches, unroll), xs, caches, windows)


def measure(call, xs, caches, windows: int, unroll: int, trace: bool,
            compiler_options: dict | None = None, shared=None, barrier: bool = True) -> dict:
  """{"s": wall seconds per call} (time_calls), plus with `trace` the profiler's kernel time of
  the same compiled jit: {"busy_s", "span_s", "kernels": [(name, us per call, launches per
  call)...]} (devtime.py), or {"trace_error": why} if the profiler failed.
  `compiler_options`: XLA options of that jit; `shared`: see devtime.build_many."""
  many = devtime.build_many(call, xs, caches, unroll, compiler_options, shared, barrier)
  out = {"s": devtime.wall_seconds(many, xs, caches, windows)}
  if trace:
    try:
      t = devtime.trace_summary(many, (xs, caches), devtime.n_calls(xs, caches))
    except Exception as e:  # a profiler that fails must not cost the wall-time numbers
      out["trace_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      return out
    out.update(busy_s=t["busy_us_per_call"] * 1e-6, span_s=t["span_us_per_call"] * 1e-6,
               on_device=t["device"],
               kernels=[(e["name"][:80], round(e["per_call_us"], 3),
                         round(e["count"] / devtime.n_calls(xs, caches), 3))
                        for e in t["events"][:8]])
  return out


def add_harness_args(ap, *, batches: str, seqs: str, calls: int, copies: int) -> None:
  """The shape and timing flags the decode micro-benchmarks share (bench_selector, bench_extend)."""
  ap.add_argument("--batches", default=batches)
  ap.add_argument("--seqs", default=seqs)
  ap.add_argument("--calls", type=int, default=calls, help="calls per timed jit")
  ap.add_argument("--copies", type=int, default=copies, help="distinct inputs rotated inside the jit")
  ap.add_argument("--unroll", type=int, default=2, help="unroll factor of the scan over calls")
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test)")
  common.add_output_args(ap)


def write_results(args, default_name: str, results: list, timing: str):
  """out/<card>/<default_name> (or the curated results, or --out) with a meta block."""
  path = common.write_json(common.output_path(args, default_name), common.meta(timing=timing),
                           results)
  print(f"wrote {path}")
  return path


def gate_cache_copies(kc_bytes: int, copies: int, on_gpu: bool,
                      max_copies: int = MAX_GATE_COPIES) -> int:
  """Distinct gate caches the gate rows rotate through: a multiple of the K/V `copies` whose
  bytes reach GATE_L2_DEFEAT_BYTES, at most max_copies (and at least `copies`); just `copies`
  off the GPU (no L2 to defeat; more copies would only slow the CPU smoke run)."""
  if not on_gpu:
    return copies
  per_kv = -(-GATE_L2_DEFEAT_BYTES // (kc_bytes * copies))
  return copies * max(1, min(max_copies // copies, per_kv))


def random_block_sets(rng, n_rows: int, n_blocks: int, n_sel: int) -> np.ndarray:
  """int32 [n_rows, n_sel]: distinct ascending random blocks per row (argsort of uniforms)."""
  picks = np.argsort(rng.random((n_rows, n_blocks)), axis=1)[:, :n_sel]
  return np.sort(picks, axis=1).astype(np.int32)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="B in {1, 8}, S in {32K}, fewer windows")
  ap.add_argument("--batches", default="1,8,16")
  ap.add_argument("--seqs", default="8192,32768,131072")
  ap.add_argument("--sparsities", default="0.5,0.8,0.9")
  ap.add_argument("--budget-tokens", type=int, default=4096)
  ap.add_argument("--sparse-block", type=int, default=64)
  ap.add_argument("--block-k", type=int, default=None, help="dense DecodeConfig.block_k")
  ap.add_argument("--num-splits", type=int, default=None, help="num_splits for both kernels")
  ap.add_argument("--num-warps", type=int, default=None, help="Triton kernels (default: tuned)")
  ap.add_argument("--blocks-per-tile", type=int, default=None,
                  help="sparse Triton kernel's blocks_per_tile (default: tuned 64-row tiles)")
  ap.add_argument("--num-stages", type=int, default=None, help="Triton kernels (default: tuned)")
  ap.add_argument("--pipeline-depth", type=int, default=None,
                  help="Mosaic GPU sparse kernel: blocks in flight (default: tuned)")
  ap.add_argument("--calls", type=int, default=128,
                  help="kernel calls per timed jit (with 16 the fixed cost of a window added "
                       "0.010-0.019 ms to every call)")
  ap.add_argument("--unroll", type=int, default=2, help="unroll factor of the scan over queries")
  ap.add_argument("--copies", type=int, default=4,
                  help="distinct caches rotated inside the jit (4 x the smallest shape > 50 MB L2)")
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--mem-frac", type=float, default=0.6, help="share of device memory for caches")
  ap.add_argument("--no-xla", action="store_true", help="skip the (slow) XLA reference")
  ap.add_argument("--no-sparse", action="store_true")
  ap.add_argument("--sparse-impls", default="pallas_triton",
                  help="sparse kernels timed (comma list): pallas_triton, pallas_mosaic_gpu")
  ap.add_argument("--no-selector", action="store_true", help="skip the gate + top-k + sparse rows")
  ap.add_argument("--gate-dtypes", default="bfloat16",
                  help="K-compression cache dtypes of the gate rows, comma-separated (bfloat16, "
                       "float32, float8_e4m3fn; effjax.sparse.resa.SparseConfig's default is "
                       "bfloat16)")
  ap.add_argument("--topk-warps", type=int, default=None, help="block_topk num_warps (default: its own)")
  ap.add_argument("--xla-default-options", action="store_true",
                  help="compile with XLA's default options instead of the decode loops' "
                       "(effjax.decoding.DECODE_COMPILER_OPTIONS)")
  ap.add_argument("--max-gate-copies", type=int, default=MAX_GATE_COPIES,
                  help="cap on the distinct gate caches a gate row rotates")
  ap.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None,
                  help="also time every row from a profiler trace (default: on a GPU)")
  ap.add_argument("--floor-tbps", type=float, default=None,
                  help="bandwidth of the byte floor (default: read bandwidth measured on a GPU)")
  ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test)")
  ap.add_argument("--legacy-harness", action="store_true",
                  help="the harness before the optimization barrier and the once-passed K/V of the "
                       "gated rows (its XLA rows could share work across calls; its B16 gated "
                       "Mosaic GPU rows were rematerialised): only to compare with results "
                       "measured with it")
  common.add_output_args(ap)
  args = ap.parse_args()
  for dt in args.gate_dtypes.split(","):
    if dt not in gate_lib.CACHE_DTYPES:
      ap.error(f"--gate-dtypes: {dt!r} is not one of {', '.join(gate_lib.CACHE_DTYPES)}")
  if args.quick:
    args.batches, args.seqs, args.windows = "1,8", "32768", 3

  on_gpu = jax.default_backend() == "gpu"
  trace = on_gpu if args.trace is None else args.trace
  limit = device_bytes_limit()
  dense_cfg = DenseConfig(block_k=args.block_k, num_splits=args.num_splits,
                          num_warps=args.num_warps, num_stages=args.num_stages)
  sparse_cfgs = sparse_configs(args)
  rng = np.random.default_rng(0)
  results = []
  floor_tbps, floor_src = devtime.floor_bandwidth(args.floor_tbps)
  print(f"floor bandwidth {floor_tbps:.2f} TB/s ({floor_src})", flush=True)
  # Every timed jit is compiled like the decode loops (resa.generate): XLA's dot-strength-reduction
  # off. It changes only the XLA ops of the gate rows (the gate query and scores); the kernels
  # are custom calls.
  compiler_options = None if args.xla_default_options else dict(DECODE_COMPILER_OPTIONS)

  def record(row):
    results.append(row)
    keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
            if k in ("B", "S", "impl", "plan", "ms", "trace_busy_ms", "frac_of_floor",
                     "speedup_vs_cudnn", "trace_speedup_vs_cudnn", "skipped")}
    print(json.dumps(keep), flush=True)

  out = common.output_path(args, "decode.json")
  meta = common.meta(
      timing= (f"device time: one jit of {args.calls} calls = lax.scan (unroll {args.unroll}) "
                 f"over distinct queries (and block sets) x unrolled loop over distinct caches; "
                 f"`ms` = jit wall time / calls, median of {args.windows} windows after a "
                 f"warm-up call" + ("; `trace_busy_ms` / `trace_span_ms` = the same jit under "
                                    "jax.profiler: kernel time summed over the GPU stream lines "
                                    "/ first start to last end, per call" if trace else "")),
      floor=f"K/V (+ gate cache) bytes read at {floor_tbps:.3f} TB/s ({floor_src})",
      floor_tbps=floor_tbps, interpret=args.interpret, compiler_options=compiler_options)

  def save():  # after every shape too: a run cut short by a time limit keeps what it measured
    common.write_json(out, meta, results)

  for S in parse_ints(args.seqs):
    for B in parse_ints(args.batches):
      base = dict(B=B, S=S, Hq=HQ, Hkv=HKV, d=D, dtype="bfloat16", lengths="full (=S)")
      cache_bytes = 2 * B * HKV * S * D * jnp.dtype(DTYPE).itemsize  # K and V of one copy
      copies = args.copies
      if limit is not None:
        copies = min(copies, int(args.mem_frac * limit // cache_bytes))
      if copies < 1:
        record({**base, "impl": "all", "skipped": f"one K/V copy ({cache_bytes / 2**30:.1f} GiB) "
                f"exceeds {args.mem_frac} of device memory ({limit / 2**30:.1f} GiB)"})
        continue
      n_q = max(1, args.calls // copies)
      keys = jax.random.split(jax.random.key(S * 131 + B), 2 * copies + 1)
      qs = jax.random.normal(keys[0], (n_q, B, HKV, G, D), DTYPE)
      lengths = jnp.full((B,), S, jnp.int32)
      shape_row = {**base, "copies": copies, "calls_per_jit": n_q * copies}
      cudnn = {}

      def timed(impl, call, xs, caches, bytes_read, shared=None, **extra):
        if args.legacy_harness and shared is not None:   # K/V again referenced by every entry
          caches = tuple((*shared[i % len(shared)], *c) for i, c in enumerate(caches))
          call = functools.partial(_legacy_gated, call, len(shared))
          shared = None
        m = measure(call, xs, caches, args.windows, args.unroll, trace, compiler_options, shared,
                    barrier=not args.legacy_harness)
        floor = bytes_read / (floor_tbps * 1e12)
        r = {**shape_row, "impl": impl, **extra, "ms": m["s"] * 1e3, "bytes_read": bytes_read,
             "floor_ms": floor * 1e3, "GBps_effective": bytes_read / m["s"] / 1e9,
             "frac_of_floor": floor / m["s"]}
        if "trace_error" in m:
          r["trace_error"] = m["trace_error"]
        elif trace:
          r.update(trace_busy_ms=m["busy_s"] * 1e3, trace_span_ms=m["span_s"] * 1e3,
                   trace_on_device=m["on_device"], kernels=m["kernels"],
                   trace_frac_of_floor=floor / m["busy_s"] if m["busy_s"] else None)
        if impl == "cudnn":
          cudnn.update(m)
        elif cudnn and bytes_read:
          r["speedup_vs_cudnn"] = cudnn["s"] / m["s"]
          if m.get("busy_s") and cudnn.get("busy_s"):
            r["trace_speedup_vs_cudnn"] = cudnn["busy_s"] / m["busy_s"]
        record(r)

      # ---- cuDNN first (its own [B, S, K, H] caches, freed before ours are made).
      if on_gpu:
        try:
          kv = tuple((jax.random.normal(keys[1 + 2 * c], (B, S, HKV, D), DTYPE),
                      jax.random.normal(keys[2 + 2 * c], (B, S, HKV, D), DTYPE)) for c in range(copies))

          def cudnn_call(q, c):
            o = jax.nn.dot_product_attention(q.reshape(B, 1, HQ, D), c[0], c[1], implementation="cudnn")
            return o.reshape(B, HKV, G, D)

          timed("cudnn", cudnn_call, qs, kv, cache_bytes)
          del kv
        except Exception as e:  # report, keep going: the Pallas numbers are still useful
          record({**shape_row, "impl": "cudnn", "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
      else:
        record({**shape_row, "impl": "cudnn", "skipped": "cuDNN needs a GPU backend"})

      kv = tuple((jax.random.normal(keys[1 + 2 * c], (B, HKV, S, D), DTYPE),
                  jax.random.normal(keys[2 + 2 * c], (B, HKV, S, D), DTYPE)) for c in range(copies))

      def dense_call(impl):
        cfg = dense_cfg if impl == "pallas_triton" else None
        return lambda q, c: decode_attention(q, c[0], c[1], lengths, implementation=impl,
                                             interpret=args.interpret, config=cfg)

      # What the harness itself costs per call (slice a query, add it to the accumulator): the
      # part of every row below that no kernel can remove; it matters at the small shapes.
      # (it reads one element of the cache: a call that ignored it would be merged by XLA's CSE)
      timed("harness_overhead", lambda q, c: q + c[0][0, 0, 0, 0], qs, kv, 0)
      timed("pallas_triton", dense_call("pallas_triton"), qs, kv, cache_bytes,
            config=repr(dense_cfg))
      if not args.no_xla:
        # The reference materialises f32 scores and a f32 view of V.
        need = B * HKV * S * (D * 4 + G * 8)
        if limit is not None and copies * cache_bytes + need > 0.9 * limit:
          record({**shape_row, "impl": "xla", "skipped": "reference temporaries exceed device memory"})
        else:
          timed("xla", dense_call("xla"), qs, kv, cache_bytes)

      if not args.no_sparse:
        bs = args.sparse_block
        n_blocks = S // bs
        plans = [(f"sparsity={sp}", sp, max(1, round((1 - sp) * n_blocks)))
                 for sp in (float(x) for x in args.sparsities.split(",") if x)]
        if args.budget_tokens:
          plans.append((f"budget={args.budget_tokens}", None,
                        min(n_blocks, args.budget_tokens // bs)))

        def time_sparse(sparse_impl, xs, kv, sel_bytes, n_sel, n_blocks, bs, copies, plan):
          sparse_cfg = sparse_cfgs.get(sparse_impl)

          def sparse_call(x, c):
            return sparse_decode_attention(x[0], c[0], c[1], lengths, x[1], block_size=bs,
                                           implementation=sparse_impl, interpret=args.interpret,
                                           config=sparse_cfg)

          timed(f"{sparse_impl}_sparse", sparse_call, xs, kv, sel_bytes, config=repr(sparse_cfg),
                **plan)
          if args.no_selector:
            return
          # The whole sparse attention of a decode step: the SeerAttention-R gate's scores over
          # its K-compression cache (Dg = 64, one row per block), top-k block selection
          # (Triton `block_topk`) and the sparse kernel, against the same dense cuDNN call.
          impl = "xla" if args.interpret else "pallas_triton"
          topk_kw = ({} if args.topk_warps is None
                     else {"config": TopkConfig(num_warps=args.topk_warps)})
          for gate_dtype in args.gate_dtypes.split(","):
            kc_bytes = B * HKV * n_blocks * GATE_DIM * jnp.dtype(gate_dtype).itemsize
            gate_copies = gate_cache_copies(kc_bytes, copies, on_gpu, args.max_gate_copies)
            n_q_gate = max(1, args.calls // gate_copies)
            # Every entry is a layer: its own gate cache and gate projection wq (one shared wq
            # let XLA compute the query projection once per query for all entries -- common-
            # subexpression elimination); entry c reads K/V copy c % copies, passed once.
            layers = tuple(
                (gate_lib.to_cache_dtype(jax.random.normal(
                    jax.random.key(77 + c), (B, HKV, n_blocks, GATE_DIM), jnp.float32), gate_dtype),
                 jax.random.normal(jax.random.key(7000 + c), (HKV, G * D, GATE_DIM),
                                   jnp.float32) * (G * D) ** -0.5)
                for c in range(gate_copies))

            def gated_call(q, c, kv_shared, i):
              k, v = kv_shared[i % copies]
              scores = gate_lib.gate_logits(c[1], q, c[0], lengths - 1, 1e4)
              idx, n_live = block_topk(scores, lengths, block_size=bs, k=n_sel, implementation=impl,
                                       interpret=args.interpret, **topk_kw)
              return sparse_decode_attention(q, k, v, lengths, idx, block_size=bs,
                                             implementation=sparse_impl,
                                             interpret=args.interpret, config=sparse_cfg,
                                             num_live_BK=n_live)

            timed(f"gate+topk+{sparse_impl}_sparse", gated_call, qs[:n_q_gate], layers,
                  sel_bytes + kc_bytes, shared=kv, gate_dim=GATE_DIM, gate_dtype=gate_dtype,
                  gate_copies=gate_copies, calls_per_jit=n_q_gate * gate_copies,
                  topk=repr(topk_kw.get("config", "tuned")), config=repr(sparse_cfg), **plan)
            del layers

        for label, sp, n_sel in plans:
          idx = random_block_sets(rng, n_q * B * HKV, n_blocks, n_sel).reshape(n_q, B, HKV, n_sel)
          xs = (qs, jnp.asarray(idx))
          plan = dict(plan=label, sparsity=sp, block_size=bs, blocks_selected=n_sel,
                      blocks_total=n_blocks)

          sel_bytes = 2 * B * HKV * n_sel * bs * D * jnp.dtype(DTYPE).itemsize
          for sparse_impl in args.sparse_impls.split(","):
            time_sparse(sparse_impl, xs, kv, sel_bytes, n_sel, n_blocks, bs, copies, plan)
      del kv
      save()

  save()
  print(f"wrote {out}")
  bad = devtime.floor_violations(results)
  if bad:
    print("error: rows faster than their byte floor (the harness let calls share work):\n  "
          + "\n  ".join(bad), file=sys.stderr)
    return 1
  return 0


def _legacy_gated(call, copies: int, x, entry):
  """A gated call on an entry that carries its K/V (the legacy harness's layout)."""
  k, v, *rest = entry
  return call(x, tuple(rest), ((k, v),) * copies, 0)


def sparse_configs(args) -> dict:
  """The sparse kernels' configs from the launch flags (None fields: tuned)."""
  return {"pallas_triton": SparseTritonConfig(num_splits=args.num_splits, num_warps=args.num_warps,
                                        num_stages=args.num_stages,
                                        blocks_per_tile=args.blocks_per_tile),
          "pallas_mosaic_gpu": SparseMosaicGPUConfig(num_splits=args.num_splits,
                                               pipeline_depth=args.pipeline_depth)}


if __name__ == "__main__":
  sys.exit(main())
