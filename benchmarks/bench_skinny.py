#!/usr/bin/env python3
"""Decode-step linear layers: `pallas_kernels.skinny_matmul` against XLA's dot, as device time.

  python benchmarks/bench_skinny.py [--rows 1,8] [--out PATH]
  python benchmarks/bench_skinny.py --interpret --rows 1 --shapes 256x384 --calls 2 --windows 1  # CPU

Shapes default to the 350m model's weights (d 1024, ff 3584, 8 query / 4 kv heads of 128):
[K, N] = 1024x1024 (wq, wo), 1024x512 (wk, wv), 1024x3584 (w_gate, w_up), 3584x1024 (w_down).
Rows per (M, shape): `xla` = jnp.dot in a plain jit (at M = 1 XLA strength-reduces it),
`xla+decode_options` = the same under decoding.DECODE_COMPILER_OPTIONS (what the generation loops
compile with), `skinny` = the Triton kernel (in the options' jit too). Each call is its own
layer: `--copies` distinct weights rotate inside the jit (16 x 7.3 MB > the 50 MB L2). Floor:
the weight's bytes at the measured read bandwidth. Writes benchmarks/results/<card>/skinny.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import devtime
from bench_decode import parse_ints, write_results
from effjax import decoding
from pallas_kernels.skinny_matmul import skinny_matmul


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", default="1,8", help="M values (batch of a decode step)")
  ap.add_argument("--shapes", default="1024x1024,1024x512,1024x3584,3584x1024", help="KxN list")
  ap.add_argument("--calls", type=int, default=128)
  ap.add_argument("--copies", type=int, default=16)
  ap.add_argument("--unroll", type=int, default=2)
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  floor_tbps, floor_src = devtime.floor_bandwidth() if on_gpu else (1.0, "CPU: not a floor")
  results = []
  impl = "pallas_triton"
  for shape in [s for s in args.shapes.split(",") if s]:
    K, N = map(int, shape.split("x"))
    ws = tuple(jax.random.normal(jax.random.key(c), (K, N), jnp.bfloat16) * K ** -0.5
               for c in range(args.copies))
    for M in parse_ints(args.rows):
      n_x = max(1, args.calls // args.copies)
      xs = jax.random.normal(jax.random.key(1000 + M), (n_x, M, K), jnp.bfloat16)
      floor_us = K * N * 2 / (floor_tbps * 1e12) * 1e6
      variants = [("xla", lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), None),
                  ("xla+decode_options", lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32),
                   decoding.DECODE_COMPILER_OPTIONS),
                  ("skinny", lambda x, w: skinny_matmul(x, w, implementation=impl,
                                                        interpret=args.interpret),
                   decoding.DECODE_COMPILER_OPTIONS)]
      for name, call, opts in variants:
        many = devtime.build_many(call, xs, ws, args.unroll, compiler_options=opts)
        row = dict(M=M, K=K, N=N, impl=name, calls=devtime.n_calls(xs, ws), floor_us=floor_us,
                   us=devtime.wall_seconds(many, xs, ws, args.windows) * 1e6)
        if on_gpu:
          t = devtime.trace_summary(many, (xs, ws), devtime.n_calls(xs, ws))
          row.update(trace_us=t["busy_us_per_call"],
                     kernels=[(e["name"][:60], round(e["per_call_us"], 3)) for e in t["events"][:6]])
          row["trace_frac_of_floor"] = floor_us / row["trace_us"]
        results.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "kernels"}), flush=True)
  write_results(args.out, "skinny.json", results, sys.argv[1:],
                f"device time: one jit of {args.calls} calls over {args.copies} rotated weights "
                f"(devtime.build_many, unroll {args.unroll}), wall median of {args.windows} windows; "
                f"trace_us = profiler kernel time per call; floor at {floor_tbps:.3f} TB/s ({floor_src})")


if __name__ == "__main__":
  main()
