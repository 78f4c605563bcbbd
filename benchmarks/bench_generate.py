"""End-to-end generation throughput at long context: dense vs block-sparse vs sparse + ReSA rectification.

  python -m benchmarks generate                                  # 350m, 32K context, B in {1, 8}
  python -m benchmarks generate --config configs/tiny.yaml --context 128 --new-tokens 8 \
      --batch 1 --out /tmp/g.json                                      # CPU smoke (seconds)

Model: a config from configs/ (default 350m: d 1024, 24 layers, 8 query / 4 kv heads, head dim 128)
with `model.max_seq_len` raised to fit context + new tokens, **random weights** (`init_params`;
throughput does not depend on the values), parameters in bf16 (`--param-dtype`; f32 master params
would double the weight bytes every decode step reads). Prompts are random byte tokens, every
sequence `--context` long; the KV cache is bf16.

Modes (all through the public generation functions, greedy, the whole loop on device):
  dense          `decoding.generate` (decode attention `--decode-impl`, auto = Pallas-Triton on GPU)
  quest          `resa.generate`, SparseConfig(selector="quest", rectify_every=0)
  gate           `resa.generate`, selector="gate", random gate params (`gate.init_gate_params`)
  quest_rectify  `resa.generate`, selector="quest", rectify_every=`--rectify-every` (ReSA)
  quest_rectify_xla  the same with the rectification's attention in XLA (rectify_impl="xla",
                 the path before the multi-token Triton kernel; [F, S] f32 scores per layer)
Sparse modes run at a `--budget-tokens` budget and at each `--sparsities` budget (sparsity 0.9 =
10% of the context), block size `--block-size`.

Prefill: one call over the whole prompt by default; `--prefill-chunk N` prefills it in chunks of N
tokens (`generate(prefill_chunk=N)`, `decoding.prefill_chunked`: the first chunk a prefill, the
rest `extend` over the cache with `--decode-impl`), for batches whose one-call prefill does not
fit (the 8B-shaped model at 32K x B4 asked for a 28 GiB temporary). Same logits and cache up to
rounding; the low-bit caches hold a compute-dtype copy of the prompt's K/V while prefilling.
Only prefill_ms changes. On a GPU a chunk's attention is the Triton extend kernel, one program
holding all chunk x G query rows of a KV head; it was measured at 32 tokens x G = 4
(results/NVIDIA_H100_80GB_HBM3/extend.json), so `--prefill-chunk 32` is the tried size.

Timing: host wall time of whole `generate` calls (one dispatch each; a call takes 0.1-10 s, so the
~0.1 ms dispatch is noise). Prefill and decode are separated with two runs of the *same* compiled
executable: one that generates N = `--new-tokens` tokens, and one that stops after its first token
(a stop token, token 0: the second run's params zero the final-norm scale, so every logit is 0 and
greedy argmax picks token 0; the first run's params zero token 0's logit column, so it never wins).
The short run is prefill + 1 decode step, the long one prefill + N steps, with the same cache
capacity and code, so
    step_ms = (t_N - t_1) / (N - 1),   decode tokens/s = B * (N - 1) / (t_N - t_1),
    prefill_ms = t_1 - step_ms (includes the sparse modes' summary build).
The step time of quest_rectify includes its dense re-forward of f tokens every f steps, amortised.
Medians over `--repeats` repeats after a warm-up run of each. The numbers of tokens generated are
checked (N and 1 for every sequence). Memory: the compiled program's memory analysis (arguments +
temporaries + outputs) and the device's process-wide peak (`memory_stats`, cumulative over rows).
The floor of a step is the bytes it must read -- weights, the K/V it attends to (all of the valid
cache for dense, the budget for sparse), block summaries -- at the read bandwidth measured in the same
run (devtime.floor_bandwidth); rectification is not in it. Batch sizes whose KV cache exceeds `--mem-frac` of device
memory are recorded as skipped. Writes out/<card>/generate.json (--update-results:
benchmarks/results/<card>/) after every row.

`--trace` adds, per row, a profiler breakdown of one decode step (`step_trace`: kernel time and
launches by name, long run minus short run), e.g. where the B1 step's time goes (README: the
strength-reduced linear layers were ~1.2 of 2.1 ms on the H200), e.g.
  GENERATE_ARGS="--batch 1 --modes dense,quest --repeats 1 --trace" bash benchmarks/run_device.sh generate
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import statistics
import sys
import time


import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, devtime
from effjax import decoding
from effjax.config import load_config
from effjax.model import init_params
from effjax.quant.kv import KVCacheSpec
from effjax.sparse import gate as gate_lib
from effjax.sparse import resa

MODES = ("dense", "quest", "gate", "quest_rectify", "quest_rectify_xla")
STOP = 0  # the stop token that ends the short run (see the module docstring)


def parse_ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def parse_floats(s: str) -> list[float]:
  return [float(x) for x in s.split(",") if x]


def device_memory() -> tuple[int | None, int | None]:
  """(bytes_limit, peak_bytes_in_use) of device 0; None where the backend reports nothing (CPU)."""
  try:
    st = jax.devices()[0].memory_stats() or {}
  except Exception:
    st = {}
  return st.get("bytes_limit"), st.get("peak_bytes_in_use")


def stop_params(params, tie_embeddings: bool):
  """(params of the long run, params of the short run): see the module docstring. Only logits
  change; every matmul and the attention work stay the same."""
  p_long = dict(params)
  if tie_embeddings:
    p_long["embed"] = params["embed"].at[STOP].set(0)
  else:
    p_long["unembed"] = params["unembed"].at[:, STOP].set(0)
  p_short = dict(p_long)
  p_short["final_norm"] = jax.tree.map(jnp.zeros_like, params["final_norm"])
  return p_long, p_short


def compile_generate(fn, static_args: tuple, dyn_args: tuple, kwargs: dict):
  """AOT-compiles `fn(*static_args, *dyn_args, **kwargs)` (kwargs all static). Returns
  (call(*dyn_args), compile seconds, memory analysis dict or None, optimised HLO text or None)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*static_args, *dyn_args, **kwargs).compile()
  compile_s = time.perf_counter() - t0
  mem = None
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      mem = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                               "alias_size_in_bytes", "temp_size_in_bytes")}
  except Exception:  # not every backend / version reports it
    pass
  try:
    hlo = compiled.as_text()
  except Exception:
    hlo = None
  return compiled, compile_s, mem, hlo


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
              "u32": 4, "f64": 8, "s64": 8}
_HLO_COPY = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} copy(?:-start)?\(")


def loop_copies(hlo_text: str, min_bytes: int) -> tuple[int, int]:
  """(count, bytes) of `copy` ops of at least min_bytes outside the entry computation and fusion
  bodies of an optimised HLO module: whole-buffer copies in the generation loop and its branches
  (a static count, not per step). Per-step copies of the KV cache are what a decode loop must not
  do; this flags them from the compiled program itself."""
  n = total = 0
  comp = ""
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      comp = line.split(" ", 1)[0]
      continue
    if comp == "ENTRY" or "fused" in comp or "wrapped" in comp:
      continue
    m = _HLO_COPY.search(line)
    if m and m.group(1) in _HLO_BYTES:
      size = _HLO_BYTES[m.group(1)] * math.prod(int(d) for d in m.group(2).split(",") if d)
      if size >= min_bytes:
        n, total = n + 1, total + size
  return n, total


def step_trace(call, long_args: tuple, short_args: tuple, n: int, top: int = 25) -> dict:
  """Per decode step, from profiler traces of the long (n tokens) and the short (1 token) run of
  one executable: kernel time by name and launches, (long - short) / (n - 1) -- prefill and the
  first step cancel. `busy_us_per_step` vs the wall step time says how much of a step is gaps
  between kernels (launch latency) rather than kernel work. On CPU the host events stand in and
  say little."""
  long = devtime.trace_summary(call, long_args, 1, top=100000)
  short = devtime.trace_summary(call, short_args, 1, top=100000)
  lt = {e["name"]: e for e in long["events"]}
  st = {e["name"]: e for e in short["events"]}
  rows = []
  for name, e in lt.items():
    s = st.get(name, {"total_us": 0.0, "count": 0})
    rows.append({"name": name, "us_per_step": (e["total_us"] - s["total_us"]) / (n - 1),
                 "launches_per_step": (e["count"] - s["count"]) / (n - 1)})
  rows.sort(key=lambda r: -r["us_per_step"])
  return {"device": long["device"],
          "busy_us_per_step": (long["busy_us_per_call"] - short["busy_us_per_call"]) / (n - 1),
          "span_us_per_step": (long["span_us_per_call"] - short["span_us_per_call"]) / (n - 1),
          "launches_per_step": sum(r["launches_per_step"] for r in rows),
          "kernels": rows[:top]}


def timed(call, *args) -> tuple[float, np.ndarray]:
  t0 = time.perf_counter()
  _, n = call(*args)
  n = np.asarray(jax.block_until_ready(n))  # (the host copy of B ints is part of any generate)
  return time.perf_counter() - t0, n



def kv_spec(kind: str) -> KVCacheSpec:
  """--kv-caches item -> KVCacheSpec: "int4", or with fields, "int4:flush=step:window=256"."""
  name, *fields = kind.split(":")
  kw = {}
  for f in fields:
    key, sep, value = f.partition("=")
    if not sep or key not in ("group", "window", "k_mode", "v_group", "flush"):
      raise SystemExit(f"--kv-caches: expected name=value with name in group, window, k_mode, "
                       f"v_group, flush after {name!r}, got {f!r}")
    kw[key] = value
  try:
    kw = {k: int(v) if k in ("group", "window", "v_group") else v for k, v in kw.items()}
    return KVCacheSpec(name, **kw)
  except (ValueError, TypeError) as e:
    raise SystemExit(f"--kv-caches {kind!r}: {e}") from None

def main(argv: list[str] | None = None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/350m.yaml")
  ap.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
  ap.add_argument("--context", type=int, default=32768, help="prompt tokens per sequence")
  ap.add_argument("--new-tokens", type=int, default=256)
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--budget-tokens", type=int, default=4096)
  ap.add_argument("--sparsities", default="0.9", help="extra sparse budgets: (1 - s) * context")
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--rectify-every", type=int, default=32,
                  help="ReSA f of quest_rectify (clamped to --new-tokens)")
  ap.add_argument("--d-gate", type=int, default=64)
  ap.add_argument("--gate-cache-dtype", default="bfloat16",
                  choices=list(gate_lib.CACHE_DTYPES),
                  help="gate mode: the K-compression cache dtype (SparseConfig.gate_cache_dtype)")
  ap.add_argument("--decode-impl", default="auto", help="auto | xla | pallas_triton")
  ap.add_argument("--sparse-kernel", default="auto",
                  help="SparseConfig.sparse_kernel: auto (= decode-impl) | pallas_mosaic_gpu | ...")
  ap.add_argument("--param-dtype", default="bfloat16")
  ap.add_argument("--ternary-format", choices=["i2_s", "i2_t"], default="i2_s",
                  help="packed format of --weights ternary (i2_t: the Mosaic GPU register-operand "
                       "kernel's layout)")
  ap.add_argument("--ternary-fuse", action="store_true",
                  help="--ternary-format i2_t: q / k / v and gate / up packed as one weight each "
                       "(pack_model(fuse=True))")
  ap.add_argument("--weights", choices=["dense", "ternary"], default="dense",
                  help="ternary: a BitNet b1.58 model (bitlinear + SubLN) packed to --ternary-format "
                       "(effjax.quant.convert.pack_model); its projections run the W2A8 "
                       "lowbit_matmul_int8 kernel")
  ap.add_argument("--cache-dtype", default="bfloat16")
  ap.add_argument("--kv-caches", default="dense",
                  help="cache kinds, each row repeated per kind: dense (--cache-dtype), int4, int2 "
                       "(effjax.quant.kv.KVCacheSpec: K per channel in groups of 128 tokens, "
                       "flush loop), with KVCacheSpec fields after colons, e.g. "
                       "int4:flush=layer:window=256")
  ap.add_argument("--prefill-chunk", type=int, default=None,
                  help="prefill the prompt in chunks of this many tokens (default: one call)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--mem-frac", type=float, default=0.25,
                  help="skip a batch whose KV cache exceeds this share of device memory (prefill "
                       "and the decode loop hold a few cache-sized buffers at once)")
  ap.add_argument("--dump-hlo", default=None, help="folder for each row's optimised HLO text")
  ap.add_argument("--trace", action="store_true",
                  help="also profile one long and one short run of each row: per decode step, the "
                       "device time and launches of every kernel (long minus short, / (N - 1)), "
                       "so kernel time can be set against the step's wall time")
  ap.add_argument("--seed", type=int, default=0)
  common.add_output_args(ap)
  args = ap.parse_args(argv)
  N = args.new_tokens
  if N < 2:
    ap.error("--new-tokens must be >= 2 (decode time is the difference of N and 1 steps)")
  if args.prefill_chunk is not None and args.prefill_chunk < 1:
    ap.error(f"--prefill-chunk must be a positive number of tokens, got {args.prefill_chunk}")
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    if m not in MODES:
      ap.error(f"unknown mode {m!r}; choose from {MODES}")

  if args.ternary_fuse and (args.weights != "ternary" or args.ternary_format != "i2_t"):
    raise SystemExit("--ternary-fuse takes --weights ternary --ternary-format i2_t")
  floor_tbps, floor_src = devtime.floor_bandwidth()
  out = common.output_path(args, "generate.json")

  T, bs = args.context, args.block_size
  if args.weights == "ternary":
    args.override = [*args.override, "model.linear_impl=bitlinear", "model.sub_norm=true"]
  cfg = load_config(args.config, [*args.override, f"model.param_dtype={args.param_dtype}"])
  mcfg = cfg.model
  # the capacity both generate functions use (rounded up to 128 and whole blocks)
  need = -(-(T + N) // math.lcm(bs, 128)) * math.lcm(bs, 128)
  if mcfg.max_seq_len < need:
    cfg = load_config(args.config, [*args.override, f"model.param_dtype={args.param_dtype}",
                                    f"model.max_seq_len={need}"])
    mcfg = cfg.model
  capacity = decoding.generation_capacity(mcfg, T, N, multiple=bs)
  dense_capacity = decoding.generation_capacity(mcfg, T, N)
  cache_dtype = jnp.dtype(args.cache_dtype)
  L, K, H = mcfg.n_layers, mcfg.n_kv_heads, mcfg.hd

  params = init_params(mcfg, jax.random.key(args.seed))
  if args.weights == "ternary":  # random float weights, then BitNet's absmean quantiser + packing
    from effjax.quant.convert import pack_model
    cfg, params = pack_model(cfg, params, args.ternary_format, fuse=args.ternary_fuse)
    mcfg = cfg.model
  p_long, p_short = stop_params(params, mcfg.tie_embeddings)
  del params
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p_long))

  # Sparse budgets, deduplicated after clamping to [2 blocks, the whole capacity].
  plans = []
  for label, tokens in ([(f"budget={args.budget_tokens}", args.budget_tokens)] +
                        [(f"sparsity={s}", int((1 - s) * T)) for s in parse_floats(args.sparsities)]):
    tokens = min(max(tokens // bs, 2), capacity // bs) * bs
    if all(tokens != p[1] for p in plans):
      plans.append((label, tokens))

  limit, _ = device_memory()
  rng = np.random.default_rng(args.seed)
  results = []

  def meta():
    return {
        **common.meta(), "config": args.config, "overrides": args.override, "model": {
            "d_model": mcfg.d_model, "n_layers": L, "n_heads": mcfg.n_heads, "n_kv_heads": K,
            "head_dim": H, "d_ff": mcfg.ff, "vocab_size": mcfg.vocab_size,
            "params": mcfg.num_params(), "param_dtype": args.param_dtype,
            "max_seq_len": mcfg.max_seq_len, "attention_impl": mcfg.attention_impl,
            "linear_impl": mcfg.linear_impl, "lowbit_impl": mcfg.lowbit_impl},
        "weights": ("random init (init_params); throughput does not depend on the values"
                    + (f"; ternary: absmean-quantised and packed to {args.ternary_format} "
                       f"(pack_model{', fused projections' if args.ternary_fuse else ''})"
                       if args.weights == "ternary" else "")),
        "prompt": f"random byte tokens, every sequence {T} long", "cache_dtype": str(cache_dtype),
        "decode_impl": args.decode_impl, "sparse_kernel": args.sparse_kernel, "sampling": "greedy",
        "prefill_chunk": args.prefill_chunk,
        "compiler_options": decoding.DECODE_COMPILER_OPTIONS,
        "timing": (f"host wall time of whole generate calls (one dispatch each, loop on device), "
                   f"same executable run for N={N} tokens and stopped after 1 token (stop token, "
                   f"logit-only param change); step = (t_N - t_1)/(N - 1), prefill = t_1 - step; "
                   f"median of {args.repeats} repeats after a warm-up run of each"),
        "hlo_loop_cache_copies": ("static count of copy ops of >= half a layer's K buffer inside "
                                  "the loop / branch computations of the optimised HLO"),
        "memory": ("compiled_bytes = memory_analysis() arguments + outputs + temporaries - aliased; "
                   "peak_bytes_process = memory_stats()['peak_bytes_in_use'], cumulative over rows"),
        "floor": (f"bytes a decode step reads (weights + attended K/V at the mean length + block "
                  f"summaries) at {floor_tbps:.3f} TB/s ({floor_src}); rectification excluded"),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }

  def record(row):
    results.append(row)
    keep = {k: row[k] for k in row if k in (
        "B", "mode", "kv_cache", "plan", "decode_tok_s", "step_ms", "prefill_ms", "frac_of_floor",
        "decode_speedup_vs_dense", "compile_s", "hlo_loop_cache_copies", "skipped")}
    print(json.dumps(keep), flush=True)
    # Written after every row, so a run cut short by a timeout still leaves its rows.
    out.write_text(json.dumps({"meta": meta(), "results": results}, indent=1))

  for B in parse_ints(args.batch):
    cache_bytes = 2 * L * B * K * capacity * H * cache_dtype.itemsize
    base = dict(B=B, context=T, new_tokens=N, cache_capacity=capacity, cache_bytes=cache_bytes,
                prefill_chunk=args.prefill_chunk)
    if limit is not None and cache_bytes > args.mem_frac * limit:
      record({**base, "mode": "all", "skipped": f"KV cache {cache_bytes / 2**30:.1f} GiB exceeds "
              f"{args.mem_frac} of device memory ({limit / 2**30:.1f} GiB)"})
      continue
    toks = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
    lengths = jnp.full((B,), T, jnp.int32)
    key = jax.random.key(args.seed + 1)
    mean_len = T + N / 2
    dense_decode = None

    rows = [("dense", None, None)] if "dense" in modes else []
    for label, tokens in plans:
      rows += [(m, label, tokens) for m in ("quest", "gate", "quest_rectify", "quest_rectify_xla")
               if m in modes]

    kinds = [k for k in args.kv_caches.split(",") if k]
    for k in kinds:
      if k != "dense":
        kv_spec(k)                       # bad kinds fail before any compile
    for (mode, label, budget), kind in [(r, k) for r in rows for k in kinds]:
      row_base = dict(base, mode=mode, kv_cache=kind)
      kw = dict(max_new_tokens=N, stop_tokens=(STOP,), decode_impl=args.decode_impl,
                cache_dtype=cache_dtype, prefill_chunk=args.prefill_chunk)
      # bytes a step reads per cached token and KV head, relative to the dense cache
      kv_ratio = 1.0
      if kind != "dense":
        spec = kv_spec(kind)
        kw["kv_cache"] = spec
        per_token = 2 * H * spec.bits / 8 + 2 * 2 + 2 * 2 * H / spec.group   # codes, V, K params
        kv_ratio = per_token / (2 * H * cache_dtype.itemsize)
      weight_read = param_bytes
      if mode == "dense":
        fn, static, gp = decoding.generate, (mcfg,), None
        row_base.update(cache_capacity=dense_capacity,
                      cache_bytes=2 * L * B * K * dense_capacity * H * cache_dtype.itemsize)
        kv_read = 2 * L * B * K * mean_len * H * cache_dtype.itemsize * kv_ratio
        summ_read = 0
        dyn = lambda p: (p, toks, lengths, key)
      else:
        # resa.generate slices the last f generated tokens out of the [B, N] output, so it cannot
        # trace with f > N; such a run would never rectify anyway, so f is clamped to N.
        f = min(args.rectify_every, N) if mode.startswith("quest_rectify") else 0
        if mode == "quest_rectify_xla":
          kw["rectify_impl"] = "xla"
        scfg = resa.SparseConfig(selector="gate" if mode == "gate" else "quest", block_size=bs,
                                 budget_tokens=budget, rectify_every=f, d_gate=args.d_gate,
                                 gate_cache_dtype=args.gate_cache_dtype,
                                 sparse_kernel=args.sparse_kernel)
        gp = (gate_lib.init_gate_params(mcfg, scfg.gate, jax.random.key(args.seed + 2))
              if mode == "gate" else None)
        fn, static = resa.generate, (mcfg, scfg)
        row_base.update(plan=label, selector=scfg.selector, budget_tokens=budget,
                      budget_blocks=scfg.budget_blocks, block_size=bs,
                      sparsity=max(0.0, 1 - budget / mean_len), rectify_every=f,
                      **({"gate_cache_dtype": args.gate_cache_dtype} if mode == "gate" else {}))
        kv_read = 2 * L * B * K * min(budget, mean_len) * H * cache_dtype.itemsize * kv_ratio
        n_blocks = capacity // bs
        summ_read = (L * B * K * n_blocks * (2 * H * cache_dtype.itemsize if mode != "gate"
                                             else args.d_gate *
                                             jnp.dtype(args.gate_cache_dtype).itemsize))
        if gp is not None:
          weight_read += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gp))
        dyn = lambda p, gp=gp: (p, toks, lengths, key, gp)

      try:
        call, compile_s, mem, hlo = compile_generate(fn, static, dyn(p_long), kw)
        t1s, tns = [], []
        for r in range(args.repeats + 1):  # repeat 0 is the warm-up
          t_n, n_long = timed(call, *dyn(p_long))
          t_1, n_short = timed(call, *dyn(p_short))
          if not (np.all(n_long == N) and np.all(n_short == 1)):
            raise RuntimeError(f"generated {n_long.tolist()} / {n_short.tolist()} tokens, "
                               f"expected {N} / 1 (stop-token split failed)")
          if r:
            tns.append(t_n)
            t1s.append(t_1)
      except Exception as e:  # out of memory, a kernel that does not lower: report, keep going
        record({**row_base, "skipped": f"{type(e).__name__}: {str(e)[:400]}"})
        continue

      t_n, t_1 = statistics.median(tns), statistics.median(t1s)
      step = (t_n - t_1) / (N - 1)
      step_bytes = weight_read + kv_read + summ_read
      floor = step_bytes / (floor_tbps * 1e12)
      row = {**row_base, "t_N_ms": t_n * 1e3, "t_1_ms": t_1 * 1e3,
             "t_N_ms_all": [t * 1e3 for t in tns], "t_1_ms_all": [t * 1e3 for t in t1s],
             "step_ms": step * 1e3, "decode_tok_s": B / step if step > 0 else None,  # <= 0: timing noise
             "prefill_ms": (t_1 - step) * 1e3, "prefill_tok_s": B * T / max(t_1 - step, 1e-12),
             "end_to_end_tok_s": B * N / t_n, "compile_s": compile_s,
             "step_bytes_read": step_bytes, "floor_step_ms": floor * 1e3,
             "frac_of_floor": floor / step if step > 0 else None}
      if mem is not None:
        row["compiled_bytes"] = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] +
                                 mem["temp_size_in_bytes"] - mem["alias_size_in_bytes"])
        row["compiled_temp_bytes"] = mem["temp_size_in_bytes"]
      if hlo is not None:
        # "cache-sized": at least half of one layer's K (or V) buffer
        n_copy, copy_bytes = loop_copies(hlo, B * K * T * H * cache_dtype.itemsize // 2)
        row.update(hlo_loop_cache_copies=n_copy, hlo_loop_cache_copy_bytes=copy_bytes)
        if args.dump_hlo:
          d = pathlib.Path(args.dump_hlo)
          d.mkdir(parents=True, exist_ok=True)
          name = f"generate_B{B}_{mode}_{label or 'dense'}_{kind}".replace("=", "").replace(":", "_")
          (d / f"{name}.hlo.txt").write_text(hlo)
      if args.trace:
        row["trace"] = step_trace(call, dyn(p_long), dyn(p_short), N)
        tr = row["trace"]
        print(f"   trace: {tr['busy_us_per_step']:.1f} us of kernels in {tr['launches_per_step']:.0f} "
              f"launches per step (wall {row['step_ms'] * 1e3:.1f} us); top: " + ", ".join(
                  f"{e['name'][:40]} {e['us_per_step']:.1f}" for e in tr["kernels"][:6]), flush=True)
      _, peak = device_memory()
      if peak is not None:
        row["peak_bytes_process"] = int(peak)
      if mode == "dense" and kind == "dense":
        dense_decode = row["decode_tok_s"]
      elif dense_decode and row["decode_tok_s"]:
        row["decode_speedup_vs_dense"] = row["decode_tok_s"] / dense_decode  # the bf16 dense row
      record(row)
      del call

  if not results:
    out.write_text(json.dumps({"meta": meta(), "results": results}, indent=1))
  print(f"wrote {out}")
  return results


if __name__ == "__main__":
  main()
