"""Low-bit weight matmuls (ternary / 2-bit, LUT) against the XLA matmuls a JAX user has, in the
same run.

  python -m benchmarks lowbit_matmul [--shapes 4096x4096,8192x8192,4096x14336] [--ms 1,16,2048]
  python -m benchmarks lowbit_matmul --impls xla,pallas_triton \
      --configs 'num_splits=4;unpack=asm;transpose=1,unpack=asm'   # a launch-config sweep
  python -m benchmarks lowbit_matmul --shapes 256x512 --ms 1,16 --calls 2 --windows 1  # CPU smoke

y = x @ W, x [M, K] bf16, W [K, N]. Rows (each backend named in `--impls` that the op has:
`xla` (the references of `pallas_kernels.lowbit_matmul` / `lut_matmul`), `pallas_triton` (the
GPU kernel of the two lowbit_matmul ops)):
- `bf16`: jnp.dot of bf16 x and bf16 W (cuBLAS / XLA's GEMM).
- `int4_dequant`: W as jnp.int4 [K, N] with a bf16 scale per column, dequantised in the same jit
  and dotted (what XLA makes of an int4 weight).
- `int8xint8`: int8 x int8 -> int32 dot (`preferred_element_type`), the integer peer of W2A8.
- `lowbit_matmul[<impl>] i2_s` (W2A16), `lowbit_matmul_int8[<impl>] i2_s` (W2A8: int8
  activations from `quantize_activations` in the timed call), `lut_matmul[<impl>] bitplanes`.
- `... [<config>]`: the pallas_triton rows again under each `--configs` entry (';'-separated
  key=value lists of `pallas_triton.TritonConfig` fields over the tuned defaults, e.g.
  'block_n=64,num_splits=8;unpack=asm'; bools as 0 / 1). Every pallas_triton row records its
  resolved launch plan (tiles, splits, warps, stages, unpacking).
Timing as the other micro-benchmarks (`benchmarks/devtime.py`): one jit of `--calls` calls over
distinct activations x `--copies` distinct weights (each behind an optimization barrier),
median of windows; the profiler's kernel time on a GPU. Floors: the bytes a call reads (packed
weight + x) at the read bandwidth measured in the run, and for M = 2048 also the FLOP floor at
`--peak-tflops` (989, the H100 SXM dense bf16 peak; a row that beats a byte floor fails the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, devtime
from benchmarks.bench_decode import measure, parse_ints
from pallas_kernels import lowbit_matmul as lm
from pallas_kernels import lut_matmul as lut
from pallas_kernels.lowbit_matmul import layout


def parse_config(text: str):
  """'num_splits=4,unpack=asm' -> a pallas_triton TritonConfig with those fields (the others
  None: tuned); ints, 0 / 1 for transpose, names for unpack / rowsum."""
  from pallas_kernels.lowbit_matmul.pallas_triton import TritonConfig
  fields = {f.name for f in dataclasses.fields(TritonConfig)}
  kw = {}
  for item in text.split(","):
    key, sep, value = (v.strip() for v in item.partition("="))
    if not sep or key not in fields:
      raise SystemExit(f"--configs: bad item {item!r}: want key=value with key in {sorted(fields)}")
    if value == "None":
      kw[key] = None
    elif key in ("unpack", "rowsum"):
      kw[key] = value
    else:
      try:
        kw[key] = bool(int(value)) if key == "transpose" else int(value)
      except ValueError:
        raise SystemExit(f"--configs: {key} wants an int, got {value!r}") from None
  cfg = TritonConfig(**kw)
  try:
    cfg.validate()
  except ValueError as e:
    raise SystemExit(f"--configs: {e}") from None
  return cfg


def launch_plan(op: str, M: int, K: int, w: layout.PackedWeight, cfg, impl: str,
                interpret: bool) -> dict:
  """{"config", "plan"} of a pallas_triton row (the launch the kernel resolves for these shapes),
  {} for other backends or where the kernel refuses (the row then says why)."""
  if impl != "pallas_triton":
    return {}
  from pallas_kernels.lowbit_matmul import pallas_triton
  dtype = jnp.int8 if op == "lowbit_matmul_int8" else jnp.bfloat16
  try:
    plan = pallas_triton._prepare(op, jax.ShapeDtypeStruct((M, K), dtype), w, cfg, interpret)
  except Exception:  # noqa: BLE001 -- reported by the timed call itself
    return {}
  return {"config": repr(cfg), "plan": dataclasses.asdict(plan)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="4096x4096,8192x8192,4096x14336", help="KxN list")
  ap.add_argument("--ms", default="1,16,2048")
  ap.add_argument("--impls", default="xla", help="backends of the low-bit ops to time")
  ap.add_argument("--configs", default="",
                  help="more pallas_triton launch configs to time in the same run: ';'-separated "
                       "key=value lists of TritonConfig fields (e.g. 'num_splits=4;unpack=asm,"
                       "transpose=1')")
  ap.add_argument("--calls", type=int, default=64)
  ap.add_argument("--copies", type=int, default=4)
  ap.add_argument("--unroll", type=int, default=2)
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--peak-tflops", type=float, default=989.0)
  ap.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None)
  ap.add_argument("--floor-tbps", type=float, default=None)
  ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test)")
  common.add_output_args(ap)
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  trace = on_gpu if args.trace is None else args.trace
  floor_tbps, floor_src = devtime.floor_bandwidth(args.floor_tbps)
  print(f"floor bandwidth {floor_tbps:.2f} TB/s ({floor_src})", flush=True)
  out = common.output_path(args, "lowbit_matmul.json")
  meta = common.meta(
      timing=(f"device time: one jit of {args.calls} calls (distinct x) x {args.copies} "
              f"distinct weights, an "
              f"optimization barrier per call; `ms` = wall / calls, median of {args.windows} "
              f"windows" + ("; `trace_busy_ms` = profiler kernel time per call" if trace else "")),
      floor=f"bytes read (weight + x) at {floor_tbps:.3f} TB/s ({floor_src}); flop_floor_ms at "
            f"{args.peak_tflops} TFLOP/s", floor_tbps=floor_tbps)
  results = []
  rng = np.random.default_rng(0)
  impls = [i for i in args.impls.split(",") if i]
  configs = [("", None)] + [(c.strip(), parse_config(c)) for c in args.configs.split(";")
                            if c.strip()]

  def record(row):
    results.append(row)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                      if k in ("K", "N", "M", "impl", "ms", "trace_busy_ms", "frac_of_floor",
                               "speedup_vs_bf16", "skipped")}), flush=True)

  for shape in args.shapes.split(","):
    K, N = (int(v) for v in shape.split("x"))
    w = [jnp.asarray(rng.standard_normal((K, N)) * 0.02, jnp.float32) for _ in range(args.copies)]
    weights = {
        "bf16": tuple(x.astype(jnp.bfloat16) for x in w),
        "int4": tuple((jnp.clip(jnp.round(x / 0.006), -8, 7).astype(jnp.int4),
                       jnp.full((N,), 0.006, jnp.bfloat16)) for x in w),
        "int8": tuple(jnp.clip(jnp.round(x / 0.0005), -127, 127).astype(jnp.int8) for x in w),
        "i2_s": tuple(layout.pack_ternary(*layout.ternarize(x), "i2_s") for x in w),
        "bitplanes": tuple(layout.pack_ternary_bitplanes(*layout.ternarize(x)) for x in w),
    }
    del w
    nbytes = {"bf16": K * N * 2, "int4": K * N // 2 + N * 2, "int8": K * N,
              "i2_s": K * N // 4, "bitplanes": 2 * K * N // 8}
    for M in parse_ints(args.ms):
      n_q = max(1, args.calls // args.copies)
      xs = jnp.asarray(rng.standard_normal((n_q, M, K)), jnp.bfloat16)
      base = dict(K=K, N=N, M=M, copies=args.copies, calls_per_jit=n_q * args.copies)
      bf16 = {}

      def timed(impl, call, kind, x_bytes=M * K * 2, **extra):
        try:
          m = measure(call, xs, weights[kind], args.windows, args.unroll, trace)
        except Exception as e:  # a backend that cannot take the shape: say so, keep going
          record({**base, "impl": impl, "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
          return
        record({**base, "impl": impl, **extra,
                **devtime.timing_fields(m, nbytes[kind] + x_bytes, floor_tbps,
                                        None if impl == "bf16" else bf16, "bf16"),
                "flop_floor_ms": 2 * M * K * N / (args.peak_tflops * 1e12) * 1e3})
        if impl == "bf16":
          bf16.update(m)

      timed("bf16", lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), "bf16")
      timed("int4_dequant", lambda x, w: jnp.dot(
          x, w[0].astype(jnp.bfloat16) * w[1], preferred_element_type=jnp.float32), "int4")
      timed("int8xint8", lambda x, w: jnp.dot(
          jnp.clip(jnp.round(x * 16), -127, 127).astype(jnp.int8), w,
          preferred_element_type=jnp.int32), "int8", x_bytes=M * K)
      for impl in impls:
        for tag, cfg in (configs if impl == "pallas_triton" else [("", None)]):
          name = f"[{impl}] i2_s" + (f" [{tag}]" if tag else "")
          plans = {op: launch_plan(op, M, K, weights["i2_s"][0], cfg, impl, args.interpret)
                   for op in ("lowbit_matmul", "lowbit_matmul_int8")}
          kw = {"implementation": impl, "config": cfg, "interpret": args.interpret}
          timed(f"lowbit_matmul{name}", lambda x, w, kw=kw: lm.lowbit_matmul(
              x, w, out_dtype=jnp.float32, **kw), "i2_s", **plans["lowbit_matmul"])
          timed(f"lowbit_matmul_int8{name}", lambda x, w, kw=kw: lm.lowbit_matmul_int8(
              *layout.quantize_activations(x), w, **kw), "i2_s", **plans["lowbit_matmul_int8"])
        if impl in lut.IMPLEMENTATIONS:
          timed(f"lut_matmul[{impl}] bitplanes", lambda x, w, impl=impl: lut.lut_matmul(
              x, w, out_dtype=jnp.float32, implementation=impl), "bitplanes")
      common.write_json(out, meta, results)
  return common.finish(out, meta, results)


if __name__ == "__main__":
  sys.exit(main())
