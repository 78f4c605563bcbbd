"""Where the selector's time goes in a sparse decode step: the SeerAttention-R gate's scores, the
top-k block choice, and both, per call, as device time (the harness of bench_decode.py).

  python -m benchmarks selector [--batches 1,8] [--seqs 131072] [--out PATH]
  python -m benchmarks selector --interpret --batches 1 --seqs 2048 --calls 2 --windows 1  # CPU

Rows per (B, S, plan): `harness` (slice + add), `gate_scores` (query projection, RoPE, scores
over the K-compression cache [B, 8, S/64, 64] in float32, bfloat16 and float8_e4m3fn), `topk` (`block_topk`
on given scores, one distinct score set per call, at each --warps, and `lax.top_k` for
reference), `gate+topk` (the gate's scores then `block_topk`, each --warps, float32 cache; and
the defaults with a bfloat16 cache). Plans: sparsity 0.9 (k = 10% of the blocks) and a
4,096-token budget (k = 64). Timing: bench_decode.measure (wall and, on a GPU, the profiler's
kernel time). Writes out/<card>/selector.json (--update-results:
benchmarks/results/<card>/).

Until selector.json of 2026-11-29 the `topk` rows passed the same scores to the calls of every
cache copy, which XLA merged (CSE): those rows under-counted block_topk by the copy factor (4).
The gate rows rotate `--copies` K-compression caches (4 x 34 MB float32 at B8 S128K), which stay
partly in the 60 MB L2 of an H200 (5.7 us = 5.9 TB/s for the float32 scores, above the HBM peak;
8.2 us when bench_decode.py rotates 16 caches): read them as L2-warm lower bounds. Until
2026-11-30 all copies also shared one gate projection wq, so XLA computed the query projection
once per query for all of them (CSE): selector.json's gate rows undercount it (~1.5-3 us a call
at B8 S128K; each copy now has its own wq).
"""

from __future__ import annotations

import argparse
import json


import jax
import jax.numpy as jnp

from benchmarks.bench_decode import (D, DTYPE, G, GATE_DIM, HKV, add_harness_args, measure, parse_ints,
                          write_results)
from effjax.sparse import gate as gate_lib
from pallas_kernels.block_topk import block_topk
from pallas_kernels.block_topk.pallas_triton import TritonConfig as TopkConfig


def topk_config(impl: str, warps):
  """block_topk's Triton config with `warps` (None: tuned); the reference takes none."""
  return TopkConfig(num_warps=warps) if impl == "pallas_triton" and warps else None


def main():
  ap = argparse.ArgumentParser()
  add_harness_args(ap, batches="1,8", seqs="131072", calls=128, copies=4)
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--budget-tokens", type=int, default=4096)
  ap.add_argument("--length", type=int, default=None,
                  help="valid tokens per sequence (default: S, full caches); shorter lengths leave "
                       "-inf (invalid) blocks in every row")
  ap.add_argument("--warps", default="1,2,4,8", help="block_topk num_warps variants")
  ap.add_argument("--plans", default="sparsity,budget", help="which plans to run: sparsity, budget")
  ap.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None,
                  help="also time every row from a profiler trace (default: on a GPU)")
  args = ap.parse_args()
  impl = "xla" if args.interpret else "pallas_triton"
  trace = jax.default_backend() == "gpu" if args.trace is None else args.trace
  results = []

  def record(**row):
    results.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)

  for S in parse_ints(args.seqs):
    for B in parse_ints(args.batches):
      nb = S // args.block
      n_q = max(1, args.calls // args.copies)
      key = jax.random.key(S + B)
      kq, kw, kc_key, ks = jax.random.split(key, 4)
      qs = jax.random.normal(kq, (n_q, B, HKV, G, D), DTYPE)
      lengths = jnp.full((B,), S if args.length is None else min(S, args.length), jnp.int32)
      # each cache copy is a layer with its own gate projection: with one shared wq, XLA computed
      # the query projection once per query for all copies (CSE) and the gate rows undercounted it
      wqs = [jax.random.normal(jax.random.fold_in(kw, c), (HKV, G * D, GATE_DIM), jnp.float32)
             * (G * D) ** -0.5 for c in range(args.copies)]
      kc32 = tuple((jax.random.normal(jax.random.fold_in(kc_key, c), (B, HKV, nb, GATE_DIM),
                                      jnp.float32), wqs[c]) for c in range(args.copies))
      kc16 = tuple((x.astype(jnp.bfloat16), w) for x, w in kc32)
      kc8 = tuple((gate_lib.to_cache_dtype(x, "float8_e4m3fn"), w) for x, w in kc32)
      # one [B, K, N] score row set per call: a call that ignored its cache argument would be
      # the same computation for every cache copy, and XLA would merge those copies (CSE)
      scores = jax.random.normal(ks, (n_q * args.copies, B, HKV, nb), jnp.float32)
      one = (jnp.zeros((), jnp.float32),)
      base = dict(B=B, S=S, length=int(lengths[0]), blocks=nb, calls_per_jit=n_q * args.copies)
      def t(call, xs, caches) -> dict:
        m = measure(call, xs, caches, args.windows, args.unroll, trace)
        r = {"ms": m["s"] * 1e3}
        if "busy_s" in m:
          r.update(trace_ms=m["busy_s"] * 1e3, kernels=m["kernels"])
        return r

      record(**base, row="harness", **t(lambda q, c: q.astype(jnp.float32) + c[0][0, 0, 0, 0], qs, kc32))
      for name, kc in (("float32", kc32), ("bfloat16", kc16), ("float8_e4m3fn", kc8)):
        record(**base, row="gate_scores", kc_dtype=name,
               **t(lambda q, c: gate_lib.gate_logits(c[1], q, c[0], lengths - 1, 10000.0), qs, kc))
      plans = [("sparsity=0.9", max(2, round(0.1 * nb))), (f"budget={args.budget_tokens}",
                                                           min(nb, args.budget_tokens // args.block))]
      plans = [p for p in plans if p[0].split("=")[0] in args.plans.split(",")]
      # block_topk at each num_warps, alone (on given scores) and chained after the gate's scores
      # (what a decode step runs)
      for plan, k in plans:
        for w in parse_ints(args.warps):
          record(**base, row="topk", plan=plan, k=k, impl=impl, num_warps=w,
                 **t(lambda s, c: block_topk(s, lengths, block_size=args.block, k=k, implementation=impl,
                                             interpret=args.interpret, config=topk_config(impl, w))[0],
                     scores, one))
        record(**base, row="topk", plan=plan, k=k, impl="xla (lax.top_k + sort)",
               **t(lambda s, c: block_topk(s, lengths, block_size=args.block, k=k,
                                           implementation="xla")[0], scores, one))
        # num_warps None: block_topk's default
        chained = [("float32", kc32, w) for w in parse_ints(args.warps)] + [("bfloat16", kc16, None)]
        for name, kc, w in chained:
          def both(q, c):
            sc = gate_lib.gate_logits(c[1], q, c[0], lengths - 1, 10000.0)
            return block_topk(sc, lengths, block_size=args.block, k=k, implementation=impl,
                              interpret=args.interpret, config=topk_config(impl, w))[0]
          record(**base, row="gate+topk", plan=plan, k=k, kc_dtype=name, num_warps=w,
                 **t(both, qs, kc))
  write_results(args, "selector.json", results,
                f"device time: one jit of {args.calls} calls (bench_decode.measure, unroll "
                f"{args.unroll}), median of {args.windows} windows")


if __name__ == "__main__":
  main()
