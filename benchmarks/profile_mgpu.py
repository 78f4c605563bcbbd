"""Where the Mosaic GPU low-bit decode kernel spends its time: one launch under the Mosaic GPU
profiler (per-warpgroup timelines of the kernel's named phases: dequant_k, qk, dequant_v,
softmax, pv), summed.

    python -m benchmarks profile_mgpu [--batch 8] [--seq 16384] [--bits 4]
                                      [--configs ';overlap=1'] [--out FILE.json]

For every config (`;`-separated `key=value` lists of `MosaicGPUConfig`, '' the defaults) the
kernel runs once with `profile_dir` set, and the trace it writes is reduced to: per phase, the
mean time a warpgroup spends in it per 64-token block and its share of the warpgroup's span
(the phases nest: dequant_v runs inside qk with `overlap` and in the token-rows form), plus
the span of a whole program.
Profiling adds a few cycles per phase boundary; compare configs within one run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import sys
import tempfile



def summarize(trace: dict) -> dict:
  """{phase: {"us_per_block", "share", "entries"}, "_span_us": the mean span of a warpgroup's
  events, "_warpgroups"} from a Mosaic GPU profiler trace (Chrome trace events in us: B / E
  pairs per (pid, tid) = (SM, warpgroup)). The blocks are counted as the entries of the most
  frequent phase (every phase runs once a block); share = the phase's time over all spans."""
  stacks: dict = collections.defaultdict(list)
  total: dict = collections.defaultdict(float)
  count: dict = collections.defaultdict(int)
  first: dict = {}
  last: dict = {}
  for e in trace["traceEvents"]:
    key = (e["pid"], e["tid"])
    first.setdefault(key, e["ts"])
    last[key] = e["ts"]
    if e["ph"] == "B":
      stacks[key].append((e["name"], e["ts"]))
    elif e["ph"] == "E" and stacks[key]:
      name, t0 = stacks[key].pop()
      total[name] += e["ts"] - t0
      count[name] += 1
  if not count:
    raise ValueError("the trace holds no complete phase")
  blocks = max(count.values())
  span = sum(last[k] - first[k] for k in first)
  out = {name: {"us_per_block": total[name] / blocks, "share": total[name] / span if span else None,
                "entries": count[name]}
         for name in sorted(total)}
  out["_span_us"] = span / len(first)
  out["_warpgroups"] = len(first)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=16384)
  ap.add_argument("--bits", type=int, default=4, choices=(2, 4))
  ap.add_argument("--configs", default="", help="';'-separated MosaicGPUConfig key=value lists")
  ap.add_argument("--out", default=None, help="JSON result file")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from benchmarks import bench_lowbit as bl
  from benchmarks import common
  from pallas_kernels.lowbit_decode import lowbit_decode_attention
  from pallas_kernels.lowbit_decode.pallas_mosaic_gpu import MosaicGPUConfig

  if jax.default_backend() != "gpu":
    print("error: profile_mgpu needs a GPU (the Mosaic GPU profiler runs on the device)",
          file=sys.stderr)
    return 2
  configs = [(v.strip(), bl.parse_variant(MosaicGPUConfig(), v) if v.strip() else MosaicGPUConfig())
             for v in dict.fromkeys(args.configs.split(";"))]
  B, S, bits = args.batch, args.seq, args.bits
  window = 128 if bits == 4 else 256
  key = jax.random.key(0)
  cache = bl.random_cache(key, B, S, bits, window)
  q = jax.random.normal(jax.random.fold_in(key, 1), (B, bl.HKV, bl.G, bl.D), bl.DTYPE)
  lengths = jnp.full((B,), S, jnp.int32)
  packed = jnp.full((B,), S - window, jnp.int32)
  st = dict(bits=bits, group=bl.GROUP, k_mode="channel", v_group=bl.D)
  rows = []
  for name, cfg in configs:
    with tempfile.TemporaryDirectory() as d:
      pcfg = dataclasses.replace(cfg, profile_dir=d,
                                 profile_space=max(cfg.profile_space, 8 * S // 64 + 64))
      out = lowbit_decode_attention(q, *cache, lengths, packed, **st,
                                    implementation="pallas_mosaic_gpu", config=pcfg)
      jax.block_until_ready(out)
      files = sorted(pathlib.Path(d).glob("*trace.json"))
      if not files:
        print(f"error: config {name!r}: the profiler wrote no trace", file=sys.stderr)
        return 1
      summary = summarize(json.loads(files[-1].read_text()))
    row = {"B": B, "S": S, "bits": bits, "config": name or "defaults", **summary}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    common.write_json(pathlib.Path(args.out), common.meta(), rows)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
