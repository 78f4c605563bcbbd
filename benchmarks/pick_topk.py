#!/usr/bin/env python3
"""Prints the block_topk launch flags (`--topk-warps W --topk-radix R`) of the fastest `gate+topk`
row (float32 cache, profiler kernel time, else wall time) of a bench_selector.py result file.

  python benchmarks/pick_topk.py selector.json
"""

import json
import sys


def best(rows):
  cand = [r for r in rows if r.get("row") == "gate+topk" and r.get("kc_dtype") == "float32"
          and r.get("num_warps") is not None]
  if not cand:
    raise SystemExit("no float32 gate+topk rows with explicit num_warps in the file")
  key = lambda r: r.get("trace_ms") or r["ms"]
  return min(cand, key=key)


if __name__ == "__main__":
  r = best(json.load(open(sys.argv[1]))["results"])
  print(f"--topk-warps {r['num_warps']} --topk-radix {r['radix_bits']}")
