#!/usr/bin/env python3
"""The SeerAttention-R gate's selector per decode step and layer, by implementation, as device time.

  python benchmarks/bench_gate.py [--batches 1,8] [--seq 131072] [--out PATH]
  python benchmarks/bench_gate.py --interpret --batches 1 --seq 4096 --calls 2 --windows 1   # CPU

Rows per (B, cache dtype, plan k): `xla` (gate_logits in XLA: convert, projection GEMM, RoPE,
scores reduction) + `block_topk`; `kernel cN sS` (the `gate_scores` kernel with N programs per row
and S pipeline stages) + `block_topk`; `fused sS wW` (`gate_topk`: scores and top-k in one program
per row); `scores only` rows of the kernel and XLA without the top-k. Every call is a layer of its
own: distinct K-compression cache and gate projection wq (>= 8x the L2 of them, so the cache comes
from HBM as in a real step and XLA cannot share the projection between calls), distinct queries.
Timing: bench_decode.measure. Writes benchmarks/results/<card>/gate.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench_decode import (D, DTYPE, G, GATE_DIM, HKV, gate_cache_copies, measure, parse_ints,
                          write_results)
from effjax.sparse import gate as gate_lib
from pallas_kernels.block_topk import block_topk
from pallas_kernels import gate_scores as gs

THETA = 1e4


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--seq", type=int, default=131072)
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--ks", default="64,205", help="blocks kept: 64 = a 4K-token budget, 205 = 90%")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--variants", default="all", help="all | defaults (xla, kernel, fused defaults)")
  ap.add_argument("--calls", type=int, default=128)
  ap.add_argument("--unroll", type=int, default=1)
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None)
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  trace = on_gpu if args.trace is None else args.trace
  impl = "pallas_triton"
  N = args.seq // args.block
  rows = []

  for B in parse_ints(args.batches):
    lengths = jnp.full((B,), args.seq, jnp.int32)
    pos = lengths - 1
    for dtype in args.dtypes.split(","):
      kc_bytes = B * HKV * N * GATE_DIM * jnp.dtype(dtype).itemsize
      copies = gate_cache_copies(kc_bytes, 1, on_gpu) if on_gpu else 1
      n_q = max(1, args.calls // copies)
      qs = jax.random.normal(jax.random.key(B), (n_q, B, HKV, G, D), DTYPE)
      layers = tuple((jax.random.normal(jax.random.key(77 + c), (B, HKV, N, GATE_DIM),
                                        jnp.float32).astype(dtype),
                      jax.random.normal(jax.random.key(7000 + c), (HKV, G * D, GATE_DIM),
                                        jnp.float32) * (G * D) ** -0.5) for c in range(copies))
      for k in parse_ints(args.ks):
        kw = dict(interpret=args.interpret)

        def xla_scores(q, c):
          return gate_lib.gate_logits(c[1], q, c[0], pos, THETA)

        def query(q, c):
          return gs.gate_query_reference(q, c[1], pos, rope_theta=THETA)

        def kernel_scores(chunks=None, stages=3, sub=gs.SUB_ROWS, warps=4, pf=gs.PREFETCH,
                          dot=gs.USE_DOT):
          if chunks is None:   # the public entry point, its defaults
            return lambda q, c: gs.gate_scores(q, c[1], c[0], pos, rope_theta=THETA,
                                               implementation=impl, **kw)
          return lambda q, c: gs._gate_scores_triton(query(q, c), c[0], chunks, warps, stages,
                                                     args.interpret, sub, pf, dot)

        def then_topk(scores_fn):
          def call(q, c):
            idx, n = block_topk(scores_fn(q, c), lengths, block_size=args.block, k=k,
                                implementation=impl, **kw)
            return idx[..., :1] + n[..., None]   # keeps both outputs live
          return call

        def fused(warps=None, sub=gs.SUB_ROWS, pf=gs.PREFETCH, stages=3, dot=gs.USE_DOT):
          def call(q, c):
            if warps is None:
              idx, n = gs.gate_topk(q, c[1], c[0], pos, lengths, rope_theta=THETA,
                                    block_size=args.block, k=k, implementation=impl, **kw)
            else:
              idx, n, _ = gs._gate_topk_triton(query(q, c), c[0], lengths, args.block, k, warps,
                                               stages, args.interpret, sub, pf, dot)
            return idx[..., :1] + n[..., None]
          return call

        variants = [("xla + block_topk", then_topk(xla_scores)),
                    ("kernel + block_topk", then_topk(kernel_scores())),
                    ("fused", fused())]
        if args.variants == "all":
          variants += [("query only: xla", query),
                       ("scores only: xla", xla_scores),
                       ("scores only: kernel", kernel_scores())]
          variants += [(f"scores only: kernel c{c} s{s} sub{u} w{w} " + ("dot" if d else f"pf{f}"),
                        kernel_scores(c, s, u, w, f, d))
                       for c, s, u, w, f, d in ((4, 3, 256, 4, 0, True), (4, 4, 256, 4, 0, True),
                                                (4, 4, 128, 4, 0, True), (8, 3, 256, 4, 0, True),
                                                (8, 4, 128, 4, 0, True), (16, 3, 128, 4, 0, True),
                                                (2, 4, 256, 4, 0, True), (1, 4, 256, 8, 0, True),
                                                (4, 3, 256, 8, 0, True), (4, 3, 256, 4, 1, False))]
          variants += [(f"fused s{s} w{w} sub{u} " + ("dot" if d else f"pf{f}"), fused(w, u, f, s, d))
                       for s, w, u, f, d in ((3, 8, 256, 0, True), (4, 8, 256, 0, True),
                                             (5, 8, 128, 0, True), (4, 8, 128, 0, True),
                                             (4, 4, 256, 0, True), (3, 16, 256, 0, True),
                                             (6, 8, 64, 0, True), (3, 8, 256, 1, False))]
        for name, call in variants:
          if name.split(":")[0] in ("scores only", "query only") and k != parse_ints(args.ks)[0]:
            continue   # scores do not depend on k
          m = measure(call, qs, layers, args.windows, args.unroll, trace)
          row = dict(B=B, S=args.seq, Nb=N, k=k, gate_dtype=dtype, variant=name, copies=copies,
                     calls_per_jit=n_q * copies, gate_bytes=kc_bytes, ms=m["s"] * 1e3,
                     floor_ms_at_4_6_TBps=kc_bytes / 4.6e12 * 1e3)
          if "busy_s" in m:
            row.update(trace_busy_ms=m["busy_s"] * 1e3, trace_span_ms=m["span_s"] * 1e3,
                       kernels=m["kernels"])
          elif "trace_error" in m:
            row["trace_error"] = m["trace_error"]
          rows.append(row)
          print(f"B{B} {dtype:8s} k={k:3d} {name:34s} wall {row['ms'] * 1e3:7.2f} us  kernel "
                f"{row.get('trace_busy_ms', float('nan')) * 1e3:7.2f} us", flush=True)
      del layers
  write_results(args.out, "gate.json", rows, sys.argv[1:],
                "device time: bench_decode.measure over one jit of --calls calls, each with its own "
                "layer (gate cache + wq) and query; `ms` wall / call, `trace_busy_ms` kernel time")


if __name__ == "__main__":
  main()
