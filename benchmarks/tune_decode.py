"""Launch-parameter sweep for the Triton decode kernels, and the cost of block selection.

  python -m benchmarks tune --out tune.json [--quick]

For each shape (Hq=32, Hkv=8, d=128, bf16, full caches) it times every config of a small grid
(block_k, num_warps, num_stages, num_splits) of the dense kernel and of the block-sparse kernel
(block 64, random block sets) with the same device-time harness as bench_decode.py, next to cuDNN,
and times the selectors alone (gate scores + top-k, Quest bounds + top-k) at the same shapes. The
best configs feed pallas_kernels/tuned/<card>.json; the JSON is kept with the results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time


import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, devtime
from benchmarks.bench_decode import D, DTYPE, G, HKV, HQ, measure, random_block_sets
from effjax.sparse import gate as gate_lib
from effjax.sparse import selection
from pallas_kernels import launch
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_attention.pallas_triton import TritonConfig as DecodeConfig
from pallas_kernels.sparse_decode import sparse_decode_attention
from pallas_kernels.sparse_decode.pallas_triton import TritonConfig as SparseDecodeConfig


def ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="1x32768,1x131072,8x131072", help="BxS list")
  ap.add_argument("--sparse-shapes", default="1x131072,8x131072")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--block-ks", default="64,128", help="dense block_k values")
  ap.add_argument("--warps", default="4,8")
  ap.add_argument("--stages", default="2,3")
  ap.add_argument("--programs-per-sm", default="1,2,4,8", help="num_splits = SMs * m // (B * Hkv)")
  ap.add_argument("--prefetch", default="0,1", help="sparse: TritonConfig.prefetch_index values")
  ap.add_argument("--tiles", default="1", help="sparse: TritonConfig.blocks_per_tile values")
  ap.add_argument("--block-size", type=int, default=64, help="sparse: tokens per KV block")
  ap.add_argument("--sparse-splits", default=None,
                  help="sparse: explicit num_splits values (instead of --programs-per-sm)")
  ap.add_argument("--plans", default="sparsity=0.9,budget=4096", help="sparse plans to sweep")
  ap.add_argument("--copies", type=int, default=2)
  ap.add_argument("--calls", type=int, default=64)
  ap.add_argument("--unroll", type=int, default=2)
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None,
                  help="also time each config from a profiler trace (default: on a GPU)")
  ap.add_argument("--interpret", action="store_true", help="CPU smoke test (no cuDNN row)")
  common.add_output_args(ap)
  args = ap.parse_args()
  out = common.output_path(args, "tune.json")
  rows = []
  FLOOR_TBPS, floor_src = devtime.floor_bandwidth()

  trace = jax.default_backend() == "gpu" if args.trace is None else args.trace

  def rec(r):
    rows.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
    # after every row: a sweep cut short by a time limit keeps what it measured
    common.write_json(out, {"partial": True}, rows)

  def timing(call, xs, kv, nbytes):
    """ms (wall, bench_decode's harness) and, with --trace, trace_ms (kernel time per call)
    and the fraction of the byte floor of each."""
    m = measure(call, xs, kv, args.windows, args.unroll, trace)
    floor = nbytes / (FLOOR_TBPS * 1e12)
    r = dict(ms=m["s"] * 1e3, frac_of_floor=floor / m["s"] if nbytes else None)
    if m.get("busy_s"):
      r.update(trace_ms=m["busy_s"] * 1e3, trace_frac_of_floor=floor / m["busy_s"] if nbytes else None,
               kernels=m["kernels"])
    elif "trace_error" in m:
      r["trace_error"] = m["trace_error"]
    return r

  def caches(B, S, copies, seed):
    ks = jax.random.split(jax.random.key(seed), 2 * copies)
    return tuple((jax.random.normal(ks[2 * c], (B, HKV, S, D), DTYPE),
                  jax.random.normal(ks[2 * c + 1], (B, HKV, S, D), DTYPE)) for c in range(copies))

  t_start = time.time()
  for shape in [x for x in args.shapes.split(",") if x]:
    B, S = map(int, shape.split("x"))
    n_q = max(1, args.calls // args.copies)
    qs = jax.random.normal(jax.random.key(1), (n_q, B, HKV, G, D), DTYPE)
    lengths = jnp.full((B,), S, jnp.int32)
    nbytes = 2 * B * HKV * S * D * 2
    kv = tuple((c[0].transpose(0, 2, 1, 3), c[1].transpose(0, 2, 1, 3)) for c in caches(B, S, args.copies, 0))
    if not args.interpret:
      t = timing(lambda q, c: jax.nn.dot_product_attention(q.reshape(B, 1, HQ, D), c[0], c[1],
                                                           implementation="cudnn").reshape(B, HKV, G, D),
                 qs, kv, nbytes)
      rec(dict(kind="dense", B=B, S=S, impl="cudnn", **t))
    del kv
    kv = caches(B, S, args.copies, 0)
    base_programs = B * HKV
    sms = launch.sm_count()
    split_opts = sorted({max(1, (sms * m) // base_programs) for m in ints(args.programs_per_sm)})
    grid = itertools.product(ints(args.block_ks), ints(args.warps), ints(args.stages), split_opts)
    if args.quick:
      grid = itertools.product((128,), (4,), (2, 3), split_opts[:2])
    for bk, w, st, sp in grid:
      cfg = DecodeConfig(block_k=bk, num_warps=w, num_stages=st, num_splits=sp)
      try:
        t = timing(lambda q, c: decode_attention(q, c[0], c[1], lengths, implementation="pallas_triton",
                                                 config=cfg, interpret=args.interpret), qs, kv, nbytes)
        rec(dict(kind="dense", B=B, S=S, impl="pallas_triton", block_k=bk, num_warps=w, num_stages=st,
                 num_splits=sp, **t))
      except Exception as e:  # a config Triton rejects (e.g. shared memory) is recorded, not fatal
        rec(dict(kind="dense", B=B, S=S, block_k=bk, num_warps=w, num_stages=st, num_splits=sp,
                 error=f"{type(e).__name__}: {str(e)[:200]}"))
    t = timing(lambda q, c: decode_attention(q, c[0], c[1], lengths, implementation="pallas_triton",
                                             interpret=args.interpret), qs, kv, nbytes)
    rec(dict(kind="dense", B=B, S=S, impl="pallas_triton", config="default", **t))
    del kv
    print(f"-- {shape} dense done at {time.time() - t_start:.0f}s", flush=True)

  rng = np.random.default_rng(0)
  for shape in [x for x in args.sparse_shapes.split(",") if x]:
    B, S = map(int, shape.split("x"))
    bs = args.block_size
    nb = S // bs
    n_q = max(1, args.calls // args.copies)
    qs = jax.random.normal(jax.random.key(1), (n_q, B, HKV, G, D), DTYPE)
    lengths = jnp.full((B,), S, jnp.int32)
    kv = caches(B, S, args.copies, 0)
    plans = {"sparsity=0.9": round(0.1 * nb), "budget=4096": min(nb, 4096 // bs)}
    for label, n_sel in [(p, plans[p]) for p in args.plans.split(",") if p]:
      idx = jnp.asarray(random_block_sets(rng, n_q * B * HKV, nb, n_sel).reshape(n_q, B, HKV, n_sel))
      nbytes = 2 * B * HKV * n_sel * bs * D * 2
      base_programs = B * HKV
      split_opts = sorted({max(1, min(n_sel, (launch.sm_count() * m) // base_programs))
                           for m in ints(args.programs_per_sm)})
      if args.sparse_splits:
        split_opts = ints(args.sparse_splits)
      grid = itertools.product(ints(args.warps), ints(args.stages), split_opts, ints(args.prefetch),
                               ints(args.tiles))
      if args.quick:
        grid = itertools.product((4,), (2, 3), split_opts[:2], (0,), (1,))
      for w, st, sp, pf, tb in list(grid) + [(None, None, None, None, None)]:
        cfg = SparseDecodeConfig() if w is None else SparseDecodeConfig(
            num_warps=w, num_stages=st, num_splits=sp, prefetch_index=bool(pf), blocks_per_tile=tb)
        try:
          t = timing(lambda x, c: sparse_decode_attention(x[0], c[0], c[1], lengths, x[1], block_size=bs,
                                                          implementation="pallas_triton", config=cfg,
                                                          interpret=args.interpret),
                     (qs, idx), kv, nbytes)
          rec(dict(kind="sparse", B=B, S=S, plan=label, block_size=bs, blocks=n_sel,
                   num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages, num_splits=cfg.num_splits,
                   prefetch_index=cfg.prefetch_index, blocks_per_tile=cfg.blocks_per_tile,
                   config="default" if w is None else None, **t))
        except Exception as e:
          rec(dict(kind="sparse", B=B, S=S, plan=label, num_warps=w, num_stages=st, num_splits=sp,
                   error=f"{type(e).__name__}: {str(e)[:200]}"))
      # selector cost alone: gate (K-compression cache, Dg=64) and Quest (bf16 min/max) + top-k
      k_sel = n_sel
      # a gate projection per copy: one shared wq let XLA compute the query projection once for
      # all copies (CSE; tune_*.json before 2026-11-30 undercount it)
      kc = tuple((jax.random.normal(jax.random.key(3 + c), (B, HKV, nb, 64), jnp.float32),
                  jax.random.normal(jax.random.key(200 + c), (HKV, G * D, 64), jnp.float32) * 0.05)
                 for c in range(args.copies))
      pos = lengths - 1
      t = timing(lambda q, c: selection.select_top_k(
          gate_lib.gate_logits(c[1], q, c[0], pos, 10000.0), lengths, bs, k_sel).astype(jnp.float32),
                 qs, kc, 0)
      rec(dict(kind="selector", B=B, S=S, plan=label, selector="gate", **t))
      mm = tuple((jax.random.normal(jax.random.key(9 + c), (B, HKV, nb, D), DTYPE),
                  jax.random.normal(jax.random.key(19 + c), (B, HKV, nb, D), DTYPE)) for c in range(args.copies))
      t = timing(lambda q, c: selection.select_top_k(selection.quest_scores(q, c[0], c[1]),
                                                     lengths, bs, k_sel).astype(jnp.float32),
                 qs, mm, 0)
      rec(dict(kind="selector", B=B, S=S, plan=label, selector="quest", **t))
      scores = tuple(jax.random.normal(jax.random.key(29 + c), (B, HKV, nb), jnp.float32) for c in range(args.copies))
      t = timing(lambda q, c: selection.select_top_k(c + q[:, :, 0, :1].astype(jnp.float32), lengths, bs,
                                                     k_sel).astype(jnp.float32), qs, scores, 0)
      rec(dict(kind="selector", B=B, S=S, plan=label, selector="top_k only", **t))
    del kv
    print(f"-- {shape} sparse done at {time.time() - t_start:.0f}s", flush=True)

  meta = common.meta(floor_TBps=FLOOR_TBPS, floor_source=floor_src,
                     timing=f"bench_decode.measure: {args.calls} calls per jit (scan unroll "
                            f"{args.unroll}); ms = wall / calls (median of {args.windows}); "
                            f"trace_ms = profiler kernel time per call")
  common.write_json(out, meta, rows)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
