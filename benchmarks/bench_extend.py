"""Attention of F new tokens per sequence over a long cache (ReSA rectification, chunked prefill):
the multi-token Triton kernel (`extend_attention`) vs its XLA reference ([B, K, F * G, S] f32
scores), device time as in bench_decode.py.

  python -m benchmarks extend [--batches 1,8] [--seqs 32768,131072] [--f 32]
  python -m benchmarks extend --interpret --batches 1 --seqs 512 --f 4 --calls 2 --windows 1

Hq=32, Hkv=8, d=128, bf16, the F tokens at the end of a full cache. Floor: the K/V bytes at
the read bandwidth measured in the same run (both read the cache once at best). Writes out/<card>/extend.json (--update-results:
benchmarks/results/<card>/).
"""

from __future__ import annotations

import argparse
import json


import jax
import jax.numpy as jnp

from benchmarks import devtime
from benchmarks.bench_decode import (D, DTYPE, G, HKV, add_harness_args, parse_ints, time_calls,
                          write_results)
from pallas_kernels.extend_attention import extend_attention


def main():
  ap = argparse.ArgumentParser()
  add_harness_args(ap, batches="1,8", seqs="32768,131072", calls=32, copies=2)
  ap.add_argument("--f", type=int, default=32, help="new tokens per sequence")
  args = ap.parse_args()
  F = args.f
  results = []
  floor_tbps, floor_src = devtime.floor_bandwidth()
  for S in parse_ints(args.seqs):
    for B in parse_ints(args.batches):
      n_q = max(1, args.calls // args.copies)
      key = jax.random.key(S + B)
      qs = jax.random.normal(key, (n_q, B, HKV, F, G, D), DTYPE)
      kv = tuple((jax.random.normal(jax.random.fold_in(key, 2 * c + 1), (B, HKV, S, D), DTYPE),
                  jax.random.normal(jax.random.fold_in(key, 2 * c + 2), (B, HKV, S, D), DTYPE))
                 for c in range(args.copies))
      start = jnp.full((B,), S - F, jnp.int32)
      floor_ms = 2 * B * HKV * S * D * 2 / (floor_tbps * 1e12) * 1e3
      base = dict(B=B, S=S, F=F, Hq=HKV * G, Hkv=HKV, d=D, floor_ms=floor_ms)
      t = lambda call: time_calls(call, qs, kv, args.windows, args.unroll) * 1e3

      def kernel(q, c):
        return extend_attention(q, c[0], c[1], start, implementation="pallas_triton",
                                interpret=args.interpret)

      def xla(q, c):
        return extend_attention(q, c[0], c[1], start, implementation="xla")

      for name, call in (("pallas_triton", kernel), ("xla", xla)):
        try:
          ms = t(call)
          row = dict(base, impl=name, ms=ms, frac_of_floor=floor_ms / ms)
        except Exception as e:  # e.g. the XLA path's scores exceeding memory
          row = dict(base, impl=name, skipped=f"{type(e).__name__}: {str(e)[:200]}")
        results.append(row)
        print(json.dumps(row), flush=True)
      kv = None  # frees this shape's caches before the next are made
  write_results(args, "extend.json", results,
                f"device time: one jit of {args.calls} calls (bench_decode.time_calls, unroll "
                f"{args.unroll}), median of {args.windows} windows; floor: K/V bytes at "
                f"{floor_tbps:.3f} TB/s ({floor_src})")


if __name__ == "__main__":
  main()
