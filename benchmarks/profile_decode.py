"""Per-kernel device time of one sparse decode attention step (gate scores, top-k, the sparse
kernel, the combine, and every small XLA op between them) from a profiler trace, next to the
dense kernel and cuDNN: where the microseconds of a step go, which the one-number device time of
bench_decode.py cannot say.

  python -m benchmarks profile [--batch 8] [--seq 131072] [--budget-tokens 4096]
  python -m benchmarks profile --interpret --batch 1 --seq 2048 --calls 2   # CPU smoke

Runs `--calls` calls (distinct queries) inside one jit under `jax.profiler.trace(create_perfetto_trace=True)`, reads
the Perfetto JSON and sums the complete ("X") events of the device processes (GPU streams) by
name; per call = total / calls. On CPU there are no device processes: the host events are
reported instead (and say little). Writes out/<card>/profile_decode.json (--update-results:
benchmarks/results/<card>/).
"""

from __future__ import annotations

import argparse


import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import common, devtime
from benchmarks.bench_decode import D, DTYPE, G, GATE_DIM, HKV, gate_cache_copies
from effjax.sparse import gate as gate_lib
from pallas_kernels.block_topk import block_topk
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.sparse_decode import sparse_decode_attention


def profile(fn, qs, rest: tuple, kcs) -> dict:
  """Trace fn(q, *rest, kc) for every q of the stack qs inside one jit (a scan over distinct
  queries, as the benchmarks time it, so nothing is loop-invariant and hoisted), call i reading
  gate cache kcs[i % len(kcs)] (distinct caches, so the gate scores read HBM, not a warm L2), and
  summarise the device events per call (devtime.summarize_trace)."""
  calls, copies = qs.shape[0], kcs.shape[0]

  @jax.jit
  def many(qs, rest, kcs):
    def body(carry, q):
      acc, i = carry
      kc = lax.dynamic_index_in_dim(kcs, i % copies, keepdims=False)
      return (acc + jnp.sum(fn(q, *rest, kc).astype(jnp.float32)), i + 1), None
    return lax.scan(body, (jnp.float32(0), jnp.int32(0)), qs)[0][0]

  return devtime.trace_summary(many, (qs, rest, kcs), calls)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=131072)
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--budget-tokens", type=int, default=4096)
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--calls", type=int, default=64)
  ap.add_argument("--gate-dtype", default="bfloat16", choices=list(gate_lib.CACHE_DTYPES),
                  help="K-compression cache dtype (SparseConfig.gate_cache_dtype's default: bfloat16)")
  ap.add_argument("--gate-copies", type=int, default=None,
                  help="distinct gate caches the calls rotate through (default: bench_decode's rule, "
                       "enough to defeat the L2 on a GPU)")
  ap.add_argument("--interpret", action="store_true")
  common.add_output_args(ap)
  args = ap.parse_args()
  B, S, bs = args.batch, args.seq, args.block
  nb = S // bs
  key = jax.random.key(0)
  qs = jax.random.normal(key, (args.calls, B, HKV, G, D), DTYPE)
  k = jax.random.normal(jax.random.fold_in(key, 1), (B, HKV, S, D), DTYPE)
  v = jax.random.normal(jax.random.fold_in(key, 2), (B, HKV, S, D), DTYPE)
  kc_bytes = B * HKV * nb * GATE_DIM * jnp.dtype(args.gate_dtype).itemsize
  copies = args.gate_copies or gate_cache_copies(kc_bytes, 1, jax.default_backend() == "gpu")
  kcs = gate_lib.to_cache_dtype(jax.random.normal(jax.random.fold_in(key, 3),
                                                  (copies, B, HKV, nb, GATE_DIM), jnp.float32),
                                args.gate_dtype)
  wq = jax.random.normal(jax.random.fold_in(key, 4), (HKV, G * D, GATE_DIM), jnp.float32) * (G * D) ** -0.5
  lengths = jnp.full((B,), S, jnp.int32)
  impl = "xla" if args.interpret else "pallas_triton"

  def gated(n_sel):
    def step(q, k, v, kc):
      scores = gate_lib.gate_logits(wq, q, kc, lengths - 1, 10000.0)
      idx, n_live = block_topk(scores, lengths, block_size=bs, k=n_sel, implementation=impl)
      return sparse_decode_attention(q, k, v, lengths, idx, block_size=bs, implementation="pallas_triton",
                                     interpret=args.interpret, num_live_BK=n_live)
    return step

  plans = {"dense": lambda q, k, v, kc: decode_attention(q, k, v, lengths, implementation="pallas_triton",
                                                         interpret=args.interpret),
           f"gate+topk+sparse sparsity={args.sparsity}": gated(max(2, round((1 - args.sparsity) * nb))),
           f"gate+topk+sparse budget={args.budget_tokens}": gated(min(nb, args.budget_tokens // bs))}
  if jax.default_backend() == "gpu":
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    plans["cudnn"] = lambda q, k, v, kc: jax.nn.dot_product_attention(
        q.reshape(B, 1, HKV * G, D), kt, vt, implementation="cudnn")
  results = {}
  for name, fn in plans.items():
    results[name] = profile(fn, qs, (k, v), kcs)
    r = results[name]
    print(f"== {name}: {r['busy_us_per_call']:.1f} us of {'device' if r['device'] else 'host'} "
          f"events per call (span {r['span_us_per_call']:.1f} us; lines {r['lines']})")
    for e in r["events"][:12]:
      print(f"   {e['per_call_us']:9.2f} us  x{e['count'] / args.calls:.0f}  {e['name'][:90]}")
  out = common.output_path(args, "profile_decode.json")
  common.write_json(out, common.meta(B=B, S=S, calls=args.calls, gate_dtype=args.gate_dtype,
                                     gate_copies=copies), results)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
