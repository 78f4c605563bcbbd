"""Low-bit weight matmuls (ternary / 2-bit, LUT) against the XLA matmuls a JAX user has, in the
same run.

  python -m benchmarks lowbit_matmul [--shapes 4096x4096,8192x8192,4096x14336] [--ms 1,16,2048]
  python -m benchmarks lowbit_matmul --impls xla,pallas_triton \
      --configs 'num_splits=4;unpack=asm;transpose=1,unpack=asm'   # a launch-config sweep
  python -m benchmarks lowbit_matmul --impls xla,pallas_triton --lut-weights bitplanes,bits4 \
      --lut-paths float,int8,int8_tables --lut-configs 'lookup=select;lookup=onehot'  # LUT rows
  python -m benchmarks lowbit_matmul --shapes 256x512 --ms 1,16 --calls 2 --windows 1  # CPU smoke

y = x @ W, x [M, K] bf16, W [K, N]. Rows (each backend named in `--impls` that the op has:
`xla` (the references of `pallas_kernels.lowbit_matmul` / `lut_matmul`), `pallas_triton` (the
GPU kernel of the two lowbit_matmul ops)):
- `bf16`: jnp.dot of bf16 x and bf16 W (cuBLAS / XLA's GEMM).
- `int4_dequant`: W as jnp.int4 [K, N] with a bf16 scale per column, dequantised in the same jit
  and dotted (what XLA makes of an int4 weight).
- `int8xint8`: int8 x int8 -> int32 dot (`preferred_element_type`), the integer peer of W2A8.
- `lowbit_matmul[<impl>] <fmt>` (W2A16), `lowbit_matmul_int8[<impl>] <fmt>` (W2A8: int8
  activations from `quantize_activations` in the timed call), for each packed format in
  `--formats` (i2_s, the default; i2_t, the Mosaic GPU register-operand kernel's layout).
- `lut_matmul[<impl>] <weights> <path>`, per `--lut-weights` (`bitplanes`: the ternary weight
  as 2 planes, one group; `bits4`: 4-bit planes in groups of 128, the bytes of `int4_dequant`)
  and `--lut-paths` (`float`: bf16 x, float32 tables; `int8`: int8 x from
  `quantize_activations` in the call, exact integer tables; `int8_tables`: bf16 x, int8 tables
  scaled per row). The default (`bitplanes`, `float`) is one row per backend.
- `... [<config>]`: the pallas_triton rows again under each `--configs` entry (';'-separated
  key=value lists of `pallas_triton.TritonConfig` fields over the tuned defaults, e.g.
  'block_n=64,num_splits=8;unpack=asm'; bools as 0 / 1), and the LUT rows under each
  `--lut-configs` entry (`lut_matmul.pallas_triton.TritonConfig` fields, e.g.
  'lookup=select;lookup=onehot,block_n=32'). Every pallas_triton row records its resolved launch
  plan (tiles, splits, warps, stages, unpacking or lookup).
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
from jax import lax
import numpy as np

from benchmarks import common, devtime
from benchmarks.bench_decode import measure, parse_ints
from pallas_kernels import lowbit_matmul as lm
from pallas_kernels import lut_matmul as lut
from pallas_kernels.lowbit_matmul import layout


KEEP_ROWS = 8              # rows of each product the harness adds up (see `keep`)
LUT_PATHS = ("float", "int8", "int8_tables")
LUT_WEIGHTS = ("bitplanes", "bits4")
LUT_GROUP = 128            # rows a scale group of the bits4 LUT weights
TERNARY_ROW_FORMATS = ("i2_s", "i2_t")


def parse_config(text: str, lut: bool = False):
  """'num_splits=4,unpack=asm' -> a pallas_triton TritonConfig (lowbit_matmul's, or
  lut_matmul's with lut=True) with those fields (the others None: tuned); ints, 0 / 1 for
  transpose, names for unpack / rowsum / lookup."""
  if lut:
    from pallas_kernels.lut_matmul.pallas_triton import TritonConfig
  else:
    from pallas_kernels.lowbit_matmul.pallas_triton import TritonConfig
  return common.parse_fields(text, TritonConfig, "--lut-configs" if lut else "--configs",
                             names=("unpack", "rowsum", "lookup"))


def parse_choices(text: str, flag: str, choices) -> list[str]:
  items = [v.strip() for v in text.split(",") if v.strip()]
  bad = [v for v in items if v not in choices]
  if bad or not items:
    raise SystemExit(f"{flag}: want a comma list of {choices}, got {text!r}")
  return items


def parse_mosaic_config(text: str):
  """'num_splits=4,overlap=1' -> a lowbit_matmul pallas_mosaic_gpu MosaicGPUConfig (ints; 0 / 1
  for the bools overlap and word_shifts)."""
  from pallas_kernels.lowbit_matmul.pallas_mosaic_gpu import MosaicGPUConfig
  return common.parse_fields(text, MosaicGPUConfig, "--mosaic-configs")


def launch_plan(op: str, M: int, K: int, w: layout.PackedWeight, cfg, impl: str,
                interpret: bool, table_dtype=None) -> dict:
  """{"config", "plan"} of a pallas_triton row (the launch the kernel resolves for these shapes),
  {} for other backends or where the kernel refuses (the row then says why). op: lowbit_matmul,
  lowbit_matmul_int8, or lut_matmul / lut_matmul_int8 (float / int8 x)."""
  if impl != "pallas_triton":
    return {}
  dtype = jnp.int8 if op.endswith("_int8") else jnp.bfloat16
  x = jax.ShapeDtypeStruct((M, K), dtype)
  try:
    if op.startswith("lut_matmul"):
      from pallas_kernels.lut_matmul import pallas_triton as lut_triton
      plan = lut_triton._prepare(x, w, table_dtype, cfg, interpret)
    else:
      from pallas_kernels.lowbit_matmul import pallas_triton
      plan = pallas_triton._prepare(op, x, w, cfg, interpret)
  except Exception:  # noqa: BLE001 -- reported by the timed call itself
    return {}
  return {"config": repr(cfg), "plan": dataclasses.asdict(plan)}


def lut_call(path: str, kw: dict):
  """The timed call of a lut_matmul row: (x bf16, packed weight) -> y float32."""
  if path == "int8":
    def call(x, w):
      x_int8, x_scale = layout.quantize_activations(x)
      return lut.lut_matmul(x_int8, w, x_scale, out_dtype=jnp.float32, **kw)
    return call
  table_dtype = jnp.int8 if path == "int8_tables" else None
  return lambda x, w: lut.lut_matmul(x, w, table_dtype=table_dtype, out_dtype=jnp.float32, **kw)


def lut_weight(w_KN, kind: str) -> layout.PackedWeight:
  if kind == "bitplanes":
    return layout.pack_ternary_bitplanes(*layout.ternarize(w_KN))
  return layout.quantize_nbit(w_KN, 4, LUT_GROUP)


def keep(y):
  """The first KEEP_ROWS rows of y [M, N], taken after y passes whole through an optimization
  barrier: every call stays live and computes all of y, but the harness adds up only a few rows.
  (Adding up all of y cost ~25 us a call at M = 2048, N = 8192, fused into XLA's GEMMs but a kernel
  of its own after a Pallas call.)"""
  return lax.optimization_barrier(y)[:KEEP_ROWS]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="4096x4096,8192x8192,4096x14336", help="KxN list")
  ap.add_argument("--ms", default="1,16,2048")
  ap.add_argument("--impls", default="xla", help="backends of the low-bit ops to time")
  ap.add_argument("--configs", default="",
                  help="more pallas_triton launch configs to time in the same run: ';'-separated "
                       "key=value lists of TritonConfig fields (e.g. 'num_splits=4;unpack=asm,"
                       "transpose=1')")
  ap.add_argument("--mosaic-configs", default="",
                  help="more pallas_mosaic_gpu configs to time: ';'-separated key=value lists of "
                       "its MosaicGPUConfig fields (e.g. 'overlap=1;num_splits=8,overlap=1')")
  ap.add_argument("--formats", default="i2_s",
                  help=f"packed formats of the ternary weight for the lowbit_matmul rows, a comma "
                       f"list of {TERNARY_ROW_FORMATS} (i2_t: the Mosaic GPU register-operand "
                       f"kernel's)")
  ap.add_argument("--lut-weights", default="bitplanes",
                  help=f"weights of the lut_matmul rows, a comma list of {LUT_WEIGHTS}")
  ap.add_argument("--lut-paths", default="float",
                  help=f"activation / table paths of the lut_matmul rows, a comma list of "
                       f"{LUT_PATHS}")
  ap.add_argument("--lut-configs", default="",
                  help="more lut_matmul pallas_triton launch configs: ';'-separated key=value "
                       "lists of its TritonConfig fields (e.g. 'lookup=select;lookup=onehot')")
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
              f"distinct weights, an optimization barrier on each call's inputs and on its "
              f"product, of which {KEEP_ROWS} rows are summed; `ms` = wall / calls, median of "
              f"{args.windows} "
              f"windows" + ("; `trace_busy_ms` = profiler kernel time per call" if trace else "")),
      floor=f"bytes read (weight + x) at {floor_tbps:.3f} TB/s ({floor_src}); flop_floor_ms at "
            f"{args.peak_tflops} TFLOP/s", floor_tbps=floor_tbps)
  results = []
  rng = np.random.default_rng(0)
  impls = [i for i in args.impls.split(",") if i]
  configs = [("", None)] + [(c.strip(), parse_config(c)) for c in args.configs.split(";")
                            if c.strip()]
  mosaic_configs = [("", None)] + [(c.strip(), parse_mosaic_config(c))
                                   for c in args.mosaic_configs.split(";") if c.strip()]
  lut_configs = [("", None)] + [(c.strip(), parse_config(c, lut=True))
                                for c in args.lut_configs.split(";") if c.strip()]
  lut_weights = parse_choices(args.lut_weights, "--lut-weights", LUT_WEIGHTS)
  formats = parse_choices(args.formats, "--formats", TERNARY_ROW_FORMATS)
  lut_paths = parse_choices(args.lut_paths, "--lut-paths", LUT_PATHS)

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
        **{fmt: tuple(layout.pack_ternary(*layout.ternarize(x), fmt) for x in w)
           for fmt in formats},
        **{kind: tuple(lut_weight(x, kind) for x in w) for kind in lut_weights},
    }
    del w
    nbytes = {"bf16": K * N * 2, "int4": K * N // 2 + N * 2, "int8": K * N,
              "i2_s": K * N // 4, "i2_t": K * N // 4, "bitplanes": 2 * K * N // 8,
              "bits4": K * N // 2 + 2 * -(-K // LUT_GROUP) * N * 4}
    for M in parse_ints(args.ms):
      n_q = max(1, args.calls // args.copies)
      xs = jnp.asarray(rng.standard_normal((n_q, M, K)), jnp.bfloat16)
      base = dict(K=K, N=N, M=M, copies=args.copies, calls_per_jit=n_q * args.copies)
      bf16 = {}

      def timed(impl, call, kind, x_bytes=M * K * 2, **extra):
        try:
          m = measure(lambda x, w: keep(call(x, w)), xs, weights[kind], args.windows,
                      args.unroll, trace)
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
        for fmt, (tag, cfg) in ((f, c) for f in formats for c in (
            configs if impl == "pallas_triton" else mosaic_configs
            if impl == "pallas_mosaic_gpu" else [("", None)])):
          name = f"[{impl}] {fmt}" + (f" [{tag}]" if tag else "")
          plans = {op: launch_plan(op, M, K, weights[fmt][0], cfg, impl, args.interpret)
                   for op in ("lowbit_matmul", "lowbit_matmul_int8")}
          kw = {"implementation": impl, "config": cfg, "interpret": args.interpret}
          timed(f"lowbit_matmul{name}", lambda x, w, kw=kw: lm.lowbit_matmul(
              x, w, out_dtype=jnp.float32, **kw), fmt, **plans["lowbit_matmul"])
          timed(f"lowbit_matmul_int8{name}", lambda x, w, kw=kw: lm.lowbit_matmul_int8(
              *layout.quantize_activations(x), w, **kw), fmt, **plans["lowbit_matmul_int8"])
        if impl not in lut.IMPLEMENTATIONS:
          continue
        for kind in lut_weights:
          for path in lut_paths:
            for tag, cfg in (lut_configs if impl == "pallas_triton" else [("", None)]):
              name = (f"lut_matmul[{impl}] {kind}" + ("" if path == "float" else f" {path}")
                      + (f" [{tag}]" if tag else ""))
              op = "lut_matmul_int8" if path == "int8" else "lut_matmul"
              plan = launch_plan(op, M, K, weights[kind][0], cfg, impl, args.interpret,
                                 jnp.dtype(jnp.int8) if path == "int8_tables" else None)
              kw = {"implementation": impl, "config": cfg, "interpret": args.interpret}
              timed(name, lut_call(path, kw), kind, **plan)
      common.write_json(out, meta, results)
  return common.finish(out, meta, results)


if __name__ == "__main__":
  sys.exit(main())
