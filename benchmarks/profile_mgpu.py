"""Where a Mosaic GPU kernel spends its time: one launch under the Mosaic GPU profiler
(per-warpgroup timelines of the kernel's named phases), summed; optionally the instruction mix of
its compiled code.

    python -m benchmarks profile_mgpu [--kernel lowbit_decode] [--batch 8] [--seq 16384] [--bits 4]
                                      [--configs ';overlap=1'] [--sass] [--out FILE.json]
    python -m benchmarks profile_mgpu --kernel ternary [--shape 8192x8192] [--m 1] [--sass]

`lowbit_decode`: the low-bit decode kernel (phases dequant_k, qk, dequant_v, softmax, pv).
`ternary`: the I2_T ternary matmul (phases load, decode, mma, drain; W2A8 path). `--sass`: the
kernel's SASS (Mosaic GPU's dump, through the CUDA toolkit's nvdisasm) reduced to an opcode
histogram, and ptxas's register / spill report, per config.

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
import os
import pathlib
import re
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


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")


def sass_histogram(text: str) -> dict:
  """{"total": instructions, "ops": {opcode: count}} of nvdisasm output (one instruction a line,
  `/*addr*/ [@P] OPCODE.MODIFIERS operands ;`); the opcode keeps its first modifier (e.g.
  HFMA2.BF16 vs HFMA2), predicates are dropped."""
  ops: collections.Counter = collections.Counter()
  for line in text.splitlines():
    m = _SASS_LINE.match(line)
    if m:
      first = (m.group(2) or "").split(".")[1:2]
      ops[m.group(1) + ("." + first[0] if first else "")] += 1
  return {"total": sum(ops.values()), "ops": dict(ops.most_common())}


def read_dump(d: str) -> dict:
  """The SASS histogram and ptxas report of the kernels Mosaic GPU dumped into d (the largest
  SASS file: the kernel, not a smaller support function)."""
  files = sorted(pathlib.Path(d).glob("*.sass"), key=lambda f: f.stat().st_size)
  out = {}
  if files:
    out["sass"] = sass_histogram(files[-1].read_text())
    out["sass"]["ops"] = dict(list(out["sass"]["ops"].items())[:40])
  reports = [f.read_text() for f in pathlib.Path(d).glob("*.ptxas")]
  if reports:
    out["ptxas"] = [l.strip() for r in reports for l in r.splitlines()
                    if "registers" in l or "spill" in l][-4:]
    # e.g. "Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..."
    warn = [l.strip() for r in reports for l in r.splitlines() if "Performance Loss" in l]
    if warn:
      out["ptxas_warnings"] = warn[:8]
  if not out:
    out["sass_error"] = f"nothing dumped into {d} (no CUDA toolkit tools on this machine?)"
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--kernel", default="lowbit_decode", choices=("lowbit_decode", "ternary"))
  ap.add_argument("--shape", default="8192x8192", help="ternary: K x N")
  ap.add_argument("--m", type=int, default=1, help="ternary: activation rows")
  ap.add_argument("--sass", action="store_true",
                  help="also dump the compiled kernel and report its opcode histogram")
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

  if jax.default_backend() != "gpu":
    print("error: profile_mgpu needs a GPU (the Mosaic GPU profiler runs on the device)",
          file=sys.stderr)
    return 2
  key = jax.random.key(0)
  if args.kernel == "ternary":
    from pallas_kernels.lowbit_matmul import layout, lowbit_matmul_int8
    from pallas_kernels.lowbit_matmul.pallas_mosaic_gpu import MosaicGPUConfig
    K, N = (int(v) for v in args.shape.split("x"))
    codes = jax.random.randint(key, (K, N), -1, 2, jnp.int8)
    w = layout.pack_ternary(codes, 0.02, "i2_t")
    x_int8, x_scale = layout.quantize_activations(
        jax.random.normal(jax.random.fold_in(key, 1), (args.m, K), jnp.float32))
    head = {"K": K, "N": N, "M": args.m}
    space = lambda cfg: max(cfg.profile_space, 64 * K // 512 + 64)

    def launch(cfg):
      return lowbit_matmul_int8(x_int8, x_scale, w, implementation="pallas_mosaic_gpu",
                                config=cfg)
  else:
    from pallas_kernels.lowbit_decode import lowbit_decode_attention
    from pallas_kernels.lowbit_decode.pallas_mosaic_gpu import MosaicGPUConfig
    B, S, bits = args.batch, args.seq, args.bits
    window = 128 if bits == 4 else 256
    cache = bl.random_cache(key, B, S, bits, window)
    q = jax.random.normal(jax.random.fold_in(key, 1), (B, bl.HKV, bl.G, bl.D), bl.DTYPE)
    lengths = jnp.full((B,), S, jnp.int32)
    packed = jnp.full((B,), S - window, jnp.int32)
    st = dict(bits=bits, group=bl.GROUP, k_mode="channel", v_group=bl.D)
    head = {"B": B, "S": S, "bits": bits}
    space = lambda cfg: max(cfg.profile_space, 8 * S // 64 + 64)

    def launch(cfg):
      return lowbit_decode_attention(q, *cache, lengths, packed, **st,
                                     implementation="pallas_mosaic_gpu", config=cfg)
  configs = [(v.strip(), bl.parse_variant(MosaicGPUConfig(), v, "--configs") if v.strip() else MosaicGPUConfig())
             for v in dict.fromkeys(args.configs.split(";"))]
  rows = []
  for name, cfg in configs:
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as dump:
      pcfg = dataclasses.replace(cfg, profile_dir=d, profile_space=space(cfg))
      if args.sass:
        os.environ["MOSAIC_GPU_DUMP_TO"] = dump
      try:
        jax.block_until_ready(launch(pcfg))
      finally:
        os.environ.pop("MOSAIC_GPU_DUMP_TO", None)
      files = sorted(pathlib.Path(d).glob("*trace.json"))
      if not files:
        print(f"error: config {name!r}: the profiler wrote no trace", file=sys.stderr)
        return 1
      summary = summarize(json.loads(files[-1].read_text()))
      if args.sass:
        summary.update(read_dump(dump))
    row = {"kernel": args.kernel, **head, "config": name or "defaults", **summary}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    common.write_json(pathlib.Path(args.out), common.meta(), rows)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
