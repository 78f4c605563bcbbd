"""Gate scores in XLA by K-compression cache layout: [B, K, Nb, Dg] (a row reduction over Dg, the
layout effjax keeps) vs [B, K, Dg, Nb] (a column reduction: adjacent threads read adjacent
blocks), float32 and bfloat16, alone and followed by `block_topk` (k = 64, a 4K budget).

  python -m benchmarks gate_layout [--batches 8,1] [--seq 131072] [--out PATH]
  python -m benchmarks gate_layout --interpret --batches 1 --seq 2048 --calls 1 --windows 1
  python -m benchmarks gate_layout --query-variants --batches 8,1 --dtypes bfloat16  # gate_query.json
  python -m benchmarks gate_layout --scores-variants --decode-options --dtypes bfloat16
      # the library's gate scores vs the RoPE-as-halves forms: gate_scores_forms.json
  (--forms "name;name" times only the named forms of either variant set)

Every call is a layer of its own (gate cache + projection wq, >= 8x the L2 of them) with its own
query. Timing: bench_decode.measure. Writes out/<card>/gate_layout.json (--update-results:
benchmarks/results/<card>/).
"""

from __future__ import annotations

import argparse
import functools


import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.bench_decode import (D, DTYPE, G, GATE_DIM, HKV, gate_cache_copies, measure, parse_ints,
                          write_results)
from effjax.decoding import DECODE_COMPILER_OPTIONS
from effjax.model import apply_rope, rope_tables
from effjax.sparse import gate as gate_lib
from pallas_kernels.block_topk import block_topk

THETA = 1e4


def gate_query(wq, q, pos):
  """effjax.sparse.gate.gate_logits' query: projection, RoPE, 1/sqrt(Dg): f32 [B, K, Dg]."""
  B, K, Gq, H = q.shape
  qg = jnp.einsum("bkc,kcd->bkd", q.astype(jnp.float32).reshape(B, K, Gq * H), wq)
  cos, sin = rope_tables(pos[:, None], qg.shape[-1], THETA)
  return apply_rope(qg[:, None], cos, sin)[:, 0] * qg.shape[-1] ** -0.5


def gate_query_reduce(wq, q, pos):
  """The same query with the projection as a multiply-and-sum over c (a reduction, no GEMM)."""
  B, K, Gq, H = q.shape
  qg = jnp.sum(q.astype(jnp.float32).reshape(B, K, Gq * H, 1) * wq[None], axis=2)
  cos, sin = rope_tables(pos[:, None], qg.shape[-1], THETA)
  return apply_rope(qg[:, None], cos, sin)[:, 0] * qg.shape[-1] ** -0.5


def rotated_weights(wq):
  """[K, C, 2 Dg]: wq and its rotate-half partner (-w2, w1), so RoPE needs no concatenate:
  r = (q wq) * [cos, cos] + (q rot(wq)) * [sin, sin]."""
  h = wq.shape[-1] // 2
  return jnp.concatenate([wq, jnp.concatenate([-wq[..., h:], wq[..., :h]], -1)], -1)


def gate_query_rotw(wq2, q, pos):
  B, K, Gq, H = q.shape
  D = wq2.shape[-1] // 2
  out = jnp.einsum("bkc,kcd->bkd", q.astype(jnp.float32).reshape(B, K, Gq * H), wq2)
  cos, sin = rope_tables(pos[:, None], D, THETA)                 # [B, 1, 1, D/2]
  cos = jnp.concatenate([cos, cos], -1)[:, 0]                     # [B, 1, D]
  sin = jnp.concatenate([sin, sin], -1)[:, 0]
  return (out[..., :D] * cos + out[..., D:] * sin) * D ** -0.5


def gate_query_rot_const(wq2, q, pos):
  """Rotated weights, and cos / sin taken at the full-width frequencies [f, f] (a constant), so
  no concatenate is left at run time: r = (q wq) * cos + (q rot(wq)) * sin."""
  B, K, Gq, H = q.shape
  D = wq2.shape[-1] // 2
  out = jnp.einsum("bkc,kcd->bkd", q.astype(jnp.float32).reshape(B, K, Gq * H), wq2)
  # rope_tables' frequencies, computed the same way (bit-equal angles); constant-folded by XLA
  inv = 1.0 / (THETA ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  ang = pos.astype(jnp.float32)[:, None, None] * jnp.concatenate([inv, inv])     # [B, 1, D]
  return (out[..., :D] * jnp.cos(ang) + out[..., D:] * jnp.sin(ang)) * D ** -0.5


def gate_query_tables(wq, q, tables):
  """The library's form (reduction + concatenate RoPE) with the cos / sin tables given: computed
  once per decode step for every layer (`effjax.sparse.gate.gate_rope_tables`), so no per-layer
  kernel evaluates cos / sin of angles up to ~1e5 rad (their slow range reduction)."""
  B, K, Gq, H = q.shape
  qg = jnp.sum(q.astype(jnp.float32).reshape(B, K, Gq * H, 1) * wq[None], axis=2)
  cos, sin = tables
  return apply_rope(qg[:, None], cos, sin)[:, 0] * qg.shape[-1] ** -0.5


def gate_query_rotw_tables(wq, q, tables):
  """Projection and RoPE in ONE reduction, tables given: r_d = sum_c x_c (w_cd cos_d + w'_cd
  sin_d), w' = rotate-half partner of w (-w2, w1), cos / sin repeated to full width."""
  B, K, Gq, H = q.shape
  D = wq.shape[-1]
  cos, sin = tables                                              # [B, 1, 1, D/2]
  cf = jnp.concatenate([cos, cos], -1)[:, 0] * D ** -0.5          # [B, 1, D]
  sf = jnp.concatenate([sin, sin], -1)[:, 0] * D ** -0.5
  wr = jnp.concatenate([-wq[..., D // 2:], wq[..., :D // 2]], -1)  # [K, C, D]
  w = wq[None] * cf[:, :, None] + wr[None] * sf[:, :, None]        # [B, K, C, D]
  return jnp.sum(q.astype(jnp.float32).reshape(B, K, Gq * H, 1) * w, axis=2)


def gate_query_kfirst(wq, q, pos):
  """The projection with the kv head as the leading (batch) axis of its output, RoPE in that
  layout, then back: XLA's batched GEMM puts batch dims first."""
  B, K, Gq, H = q.shape
  qg = jnp.einsum("bkc,kcd->kbd", q.astype(jnp.float32).reshape(B, K, Gq * H), wq)
  cos, sin = rope_tables(pos[:, None], qg.shape[-1], THETA)        # [B, 1, 1, D/2]
  r = apply_rope(qg[:, :, None], cos[:, 0, 0][None, :, None], sin[:, 0, 0][None, :, None])
  return r[:, :, 0].transpose(1, 0, 2) * qg.shape[-1] ** -0.5


def layout_cases(B, N, dtype, copies, pos, lengths, topk):
  """(label fields, layers, [(what, call)]) per cache layout: [B, K, Nb, Dg] and [B, K, Dg, Nb]."""
  for layout, eq in (("BKND", "bkd,bknd->bkn"), ("BKDN", "bkd,bkdn->bkn")):
    shape = (B, HKV, N, GATE_DIM) if layout == "BKND" else (B, HKV, GATE_DIM, N)
    layers = tuple((jax.random.normal(jax.random.key(77 + c), shape, jnp.float32).astype(dtype),
                    jax.random.normal(jax.random.key(7000 + c), (HKV, G * D, GATE_DIM),
                                      jnp.float32) * (G * D) ** -0.5) for c in range(copies))

    def scores(q, c, eq=eq):
      return jnp.einsum(eq, gate_query(c[1], q, pos), c[0])

    yield {"layout": layout}, layers, [("scores", scores),
                                       ("scores+topk", lambda q, c, f=scores: topk(f(q, c)))]


def query_cases(B, N, dtype, copies, pos, lengths, topk, only=None):
  """The same per form of the gate query: GEMM + concatenate RoPE, reduction, rotated weights,
  and the two forms with cos / sin tables computed once outside the layer (a per-step constant
  here; in a decode step one small kernel for all layers). `only`: the form names to time."""
  tables = jax.block_until_ready(rope_tables(pos[:, None], GATE_DIM, THETA))
  layers = []
  for c in range(copies):
    wq = jax.random.normal(jax.random.key(7000 + c), (HKV, G * D, GATE_DIM), jnp.float32)
    wq = wq * (G * D) ** -0.5
    layers.append((jax.random.normal(jax.random.key(77 + c), (B, HKV, N, GATE_DIM),
                                     jnp.float32).astype(dtype), wq, rotated_weights(wq)))
  forms = {"gemm+concat": lambda q, c: gate_query(c[1], q, pos),
           "reduce+concat": lambda q, c: gate_query_reduce(c[1], q, pos),
           "rotated weights": lambda q, c: gate_query_rotw(c[2], q, pos),
           "rotated weights, const freqs": lambda q, c: gate_query_rot_const(c[2], q, pos),
           "kv head first": lambda q, c: gate_query_kfirst(c[1], q, pos),
           "reduce+concat, tables given": lambda q, c: gate_query_tables(c[1], q, tables),
           "one reduction, tables given": lambda q, c: gate_query_rotw_tables(c[1], q, tables)}
  if only:
    forms = {n: f for n, f in forms.items() if n in only}
  for name, fq in forms.items():
    chain = lambda q, c, fq=fq: topk(jnp.einsum("bkd,bknd->bkn", fq(q, c), c[0]))
    yield {"query": name}, tuple(layers), [("query", fq), ("query+scores+topk", chain)]


def scores_halves(wq, q, kc, pos, tables=None):
  """Gate scores with the query's RoPE left as two halves (no concatenate): r1 = x1 cos - x2 sin,
  r2 = x2 cos + x1 sin, scores = sum_d r1 kc[:Dg/2] + r2 kc[Dg/2:] as one reduction."""
  B, K, Gq, H = q.shape
  D = wq.shape[-1]
  qg = jnp.sum(q.astype(jnp.float32).reshape(B, K, Gq * H, 1) * wq[None], axis=2) * D ** -0.5
  cos, sin = tables if tables is not None else rope_tables(pos[:, None], D, THETA)
  cos, sin = cos[:, 0], sin[:, 0]                                  # [B, 1, D/2]
  x1, x2 = qg[..., :D // 2], qg[..., D // 2:]
  r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
  kc = kc.astype(jnp.float32)
  return jnp.sum(r1[:, :, None] * kc[..., :D // 2] + r2[:, :, None] * kc[..., D // 2:], axis=-1)


def scores_cases(B, N, dtype, copies, pos, lengths, topk, only=None):
  """Whole gate scores (+ block_topk) in the library's product + sum form: as built
  (`gate_lib.gate_logits`), and with the query RoPE kept as two halves (tables computed in the
  layer, or given once per step)."""
  tables = jax.block_until_ready(rope_tables(pos[:, None], GATE_DIM, THETA))
  layers = []
  for c in range(copies):
    wq = jax.random.normal(jax.random.key(7000 + c), (HKV, G * D, GATE_DIM), jnp.float32)
    layers.append((jax.random.normal(jax.random.key(77 + c), (B, HKV, N, GATE_DIM),
                                     jnp.float32).astype(dtype), wq * (G * D) ** -0.5))
  forms = {"library": lambda q, c: gate_lib.gate_logits(c[1], q, c[0], pos, THETA),
           "halves": lambda q, c: scores_halves(c[1], q, c[0], pos),
           "halves, tables given": lambda q, c: scores_halves(c[1], q, c[0], pos, tables)}
  if only:
    forms = {n: f for n, f in forms.items() if n in only}
  for name, fs in forms.items():
    yield {"scores": name}, tuple(layers), [("scores", fs),
                                            ("scores+topk", lambda q, c, f=fs: topk(f(q, c)))]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="8,1")
  ap.add_argument("--seq", type=int, default=131072)
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--calls", type=int, default=128)
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--query-variants", action="store_true",
                  help="instead: the gate query's formulations (GEMM + concat RoPE, reduction, "
                       "rotated weights), B and dtype from --batches / --dtypes")
  ap.add_argument("--scores-variants", action="store_true",
                  help="instead: the library's gate scores against the RoPE-as-halves forms "
                       "(writes gate_scores_forms.json)")
  ap.add_argument("--forms", default=None,
                  help="--query-variants: semicolon-separated form names to time (default: all)")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--decode-options", action="store_true",
                  help="compile with effjax.decoding.DECODE_COMPILER_OPTIONS (what the decode "
                       "loops use: XLA's dot-strength-reduction off)")
  common.add_output_args(ap)
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  impl = "xla" if args.interpret else "pallas_triton"
  N = args.seq // args.block
  only = args.forms.split(";") if args.forms else None
  cases = (functools.partial(query_cases, only=only) if args.query_variants else
           functools.partial(scores_cases, only=only) if args.scores_variants else layout_cases)
  rows = []
  for B in parse_ints(args.batches):
    lengths = jnp.full((B,), args.seq, jnp.int32)

    def topk(scores, lengths=lengths):
      idx, n = block_topk(scores, lengths, block_size=args.block, k=args.k, implementation=impl,
                          interpret=args.interpret)
      return idx[..., :1] + n[..., None]   # keeps both outputs live

    for dtype in args.dtypes.split(","):
      kc_bytes = B * HKV * N * GATE_DIM * jnp.dtype(dtype).itemsize
      copies = gate_cache_copies(kc_bytes, 1, on_gpu)
      n_q = max(1, args.calls // copies)
      qs = jax.random.normal(jax.random.key(B), (n_q, B, HKV, G, D), DTYPE)
      for label, layers, calls in cases(B, N, dtype, copies, lengths - 1, lengths, topk):
        for what, call in calls:
          m = measure(call, qs, layers, args.windows, 1, on_gpu,
                      DECODE_COMPILER_OPTIONS if args.decode_options else None)
          row = dict(B=B, S=args.seq, Nb=N, gate_dtype=dtype, **label, what=what, copies=copies,
                     calls_per_jit=n_q * copies, gate_bytes=kc_bytes, ms=m["s"] * 1e3)
          if "busy_s" in m:
            row.update(trace_busy_ms=m["busy_s"] * 1e3, kernels=m["kernels"])
          rows.append(row)
          print(f"B{B} {dtype:8s} {list(label.values())[0]:16s} {what:18s} wall "
                f"{row['ms'] * 1e3:7.2f} us  kernel "
                f"{row.get('trace_busy_ms', float('nan')) * 1e3:7.2f} us  "
                f"{[k for k in row.get('kernels', [])[:4]]}", flush=True)
        del layers
  write_results(args, "gate_query.json" if args.query_variants else
                "gate_scores_forms.json" if args.scores_variants else "gate_layout.json", rows,
                "device time: bench_decode.measure (unroll 1); every call its own "
                "layer and query")


if __name__ == "__main__":
  main()
