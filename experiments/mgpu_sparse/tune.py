"""Launch-parameter sweep of the Mosaic GPU block-sparse decode kernel against the Triton kernel
(same run, same inputs): kernel alone, B x S x plan, over TMA pipeline depth and programs per SM.

  python3 experiments/mgpu_sparse/tune.py --out tune.json [--batches 8,1] [--seqs 131072]

Device time as bench_decode.py (one jit of many calls, wall / calls, + profiler kernel time).
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
from benchmarks import bench_decode as bd  # noqa: E402
from benchmarks import devtime  # noqa: E402

from pallas_kernels import launch  # noqa: E402
from pallas_kernels.sparse_decode import sparse_decode_attention  # noqa: E402
from pallas_kernels.sparse_decode.pallas_mosaic_gpu import MosaicGPUConfig  # noqa: E402
from pallas_kernels.sparse_decode.pallas_triton import TritonConfig  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="8,1")
  ap.add_argument("--seqs", default="131072")
  ap.add_argument("--plans", default="0.9,4096", help="sparsities (< 1) or token budgets (>= 1)")
  ap.add_argument("--stages", default="2,3,4",
                  help="Mosaic GPU pipeline depths (MosaicGPUConfig.pipeline_depth)")
  ap.add_argument("--per-sm", default="1,2,4", help="programs per SM the split count aims for")
  ap.add_argument("--calls", type=int, default=64)
  ap.add_argument("--copies", type=int, default=4)
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--out", default="mgpu_tune.json")
  args = ap.parse_args()
  HKV, G, D, bs = 8, 4, 128, 64
  on_gpu = jax.default_backend() == "gpu"
  floor_tbps, src = devtime.floor_bandwidth(None if on_gpu else 1.0)
  rows = []
  rng = np.random.default_rng(0)
  for S in bd.parse_ints(args.seqs):
    for B in bd.parse_ints(args.batches):
      copies = args.copies
      n_q = max(1, args.calls // copies)
      keys = jax.random.split(jax.random.key(S + B), 2 * copies + 1)
      qs = jax.random.normal(keys[0], (n_q, B, HKV, G, D), jnp.bfloat16)
      kv = tuple((jax.random.normal(keys[1 + 2 * c], (B, HKV, S, D), jnp.bfloat16),
                  jax.random.normal(keys[2 + 2 * c], (B, HKV, S, D), jnp.bfloat16))
                 for c in range(copies))
      lengths = jnp.full((B,), S, jnp.int32)
      n_blocks = S // bs
      for p in args.plans.split(","):
        x = float(p)
        n_sel = max(1, round((1 - x) * n_blocks)) if x < 1 else min(n_blocks, int(x) // bs)
        idx = bd.random_block_sets(rng, n_q * B * HKV, n_blocks, n_sel).reshape(n_q, B, HKV, n_sel)
        xs = (qs, jnp.asarray(idx))
        sel_bytes = 2 * B * HKV * n_sel * bs * D * 2
        variants = [("pallas_triton", TritonConfig(), None)]
        for st in bd.parse_ints(args.stages):
          for per_sm in bd.parse_ints(args.per_sm):
            ns = launch.default_num_splits(B * HKV, n_sel, launch.target_programs(per_sm))
            variants.append(("pallas_mosaic_gpu",
                             MosaicGPUConfig(num_splits=ns, pipeline_depth=st),
                             dict(stages=st, per_sm=per_sm)))
        variants.append(("pallas_mosaic_gpu", MosaicGPUConfig(), "default"))
        for impl, cfg, knobs in variants:
          def call(x, c, impl=impl, cfg=cfg):
            return sparse_decode_attention(x[0], c[0], c[1], lengths, x[1], block_size=bs,
                                           implementation=impl, config=cfg,
                                           interpret=args.interpret)
          try:
            m = bd.measure(call, xs, kv, args.windows, 2, on_gpu)
          except Exception as e:
            r = dict(B=B, S=S, plan=p, impl=impl, knobs=knobs, error=f"{type(e).__name__}: {str(e)[:2000]}")
            print(json.dumps(r)[:3000], flush=True)
            rows.append(r)
            continue
          floor = sel_bytes / (floor_tbps * 1e12)
          r = dict(B=B, S=S, plan=p, blocks=n_sel, impl=impl, knobs=knobs, config=repr(cfg),
                   us=m["s"] * 1e6, busy_us=m.get("busy_s", 0) * 1e6,
                   frac_of_floor=floor / m["s"], kernels=m.get("kernels"))
          print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                            if k != "kernels"}), flush=True)
          rows.append(r)
      del kv
  meta = dict(card=jax.devices()[0].device_kind, jax=jax.__version__, floor_tbps=floor_tbps,
              floor=src, argv=sys.argv[1:],
              timing="one jit of calls x copies, wall / calls (median of windows); busy_us = "
                     "profiler kernel time per call")
  pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
  print("wrote", args.out)


if __name__ == "__main__":
  main()
