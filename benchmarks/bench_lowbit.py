"""Low-bit KV cache decode attention (BitDecoding): fused-dequant kernels vs cuDNN bf16 and the
XLA dequantise-then-attend path, in the same run.

  python -m benchmarks lowbit [--batches 1,8,16] [--seqs 32768,131072] [--bits 4,2]
  python -m benchmarks lowbit --batches 1 --seqs 1024 --interpret --calls 2 --windows 1  # CPU smoke

Shapes: Hq=32, Hkv=8 (G=4), d=128, bf16 queries / scales / residual, every sequence full: the
packed region holds S - R tokens and the residual window the last R (128 at 4 bits, 256 at 2 bits),
K per channel in groups of 128 tokens, V per token. Rows:
- `cudnn`: `jax.nn.dot_product_attention(..., implementation="cudnn")` over a bf16 cache, what a
  JAX user runs without a low-bit cache.
- `xla_dequant int{b}`: the reference (`lowbit_decode_attention(implementation="xla")`):
  dequantise the whole cache in XLA, then attend -- the path a MaxText-style KV quantisation gives.
- `pallas_triton int{b}`: the fused kernel (`pallas_kernels/lowbit_decode/pallas_triton.py`).
- `pallas_triton int4 sparsity=0.9`: the same kernel over 10% of the blocks (64 tokens), random
  ascending block sets.
- `pallas_mosaic_gpu int{b}` (--mosaic): the Mosaic GPU kernel
  (`pallas_kernels/lowbit_decode/pallas_mosaic_gpu.py`) where it takes the shape, dense and over
  the sparse rows' blocks; `gate+topk+pallas_mosaic_gpu` the gated step with it.
Timing as `benchmarks/bench_decode.py` (one jit of `--calls` calls over distinct queries x
distinct caches, an optimization barrier per call, median of windows; the profiler's kernel time
on a GPU). Floor: the packed words + scales + zeros + residual bytes a call must read, at the read
bandwidth measured in the same run; a row faster than its floor fails the run.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, devtime
from benchmarks.bench_decode import (D, DTYPE, G, GATE_DIM, HKV, HQ, device_bytes_limit, measure,
                                     parse_ints, random_block_sets)
from effjax.sparse import gate as gate_lib
from pallas_kernels.block_topk import block_topk
from pallas_kernels.lowbit_decode import layout, lowbit_decode_attention
from pallas_kernels.lowbit_decode import pallas_mosaic_gpu as mosaic_lib
from pallas_kernels.lowbit_decode.pallas_mosaic_gpu import MosaicGPUConfig
from pallas_kernels.lowbit_decode.pallas_triton import TritonConfig

GROUP = 128


def lowbit_bytes(B: int, tokens_packed: int, window: int, bits: int, group: int) -> int:
  """Bytes of K and V for B x HKV heads: packed words, K channel scales + zeros (one row per
  group), V per-token scale + zero, the bf16 residual."""
  per_head = (2 * tokens_packed * D * bits // 8            # K and V codes
              + 2 * -(-tokens_packed // group) * D * 2      # K scale + zero rows (bf16)
              + 2 * tokens_packed * 2                        # V scale + zero per token (bf16)
              + 2 * window * D * 2)                          # residual K and V (bf16)
  return B * HKV * per_head


def random_cache(key, B: int, S: int, bits: int, window: int):
  """A packed cache of random codes with plausible scales: (k_packed, k_scale, k_zero, v_packed,
  v_scale, v_zero, res_k, res_v)."""
  W = layout.words_per_row(D, bits)
  ks = jax.random.split(key, 8)
  words = lambda k: jax.random.bits(k, (B, HKV, S, W), jnp.uint32).view(jnp.int32)
  scale = lambda k, shape: (jax.random.uniform(k, shape, jnp.float32, 0.01, 0.1)).astype(DTYPE)
  zero = lambda k, shape: (-0.5 + 0.1 * jax.random.normal(k, shape, jnp.float32)).astype(DTYPE)
  kshape, vshape = (B, HKV, S // GROUP, D), (B, HKV, S, 1)
  res = lambda k: jax.random.normal(k, (B, HKV, window, D), DTYPE)
  return (words(ks[0]), scale(ks[1], kshape), zero(ks[2], kshape), words(ks[3]),
          scale(ks[4], vshape), zero(ks[5], vshape), res(ks[6]), res(ks[7]))


def parse_variant(base, text: str, flag: str = "--variants"):
  """'magic=0,block_k=128' -> base (a TritonConfig or MosaicGPUConfig) with those fields replaced
  (`common.parse_fields`: ints, 0 / 1 for the bools, profile_dir a path)."""
  return common.parse_fields(text, type(base), flag, names=("profile_dir", "residual"), base=base)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="1,8,16")
  ap.add_argument("--seqs", default="32768,131072")
  ap.add_argument("--bits", default="4,2")
  ap.add_argument("--sparsity", type=float, default=0.9, help="0 to skip the sparse rows")
  ap.add_argument("--sparse-block", type=int, default=64)
  ap.add_argument("--calls", type=int, default=128)
  ap.add_argument("--copies", type=int, default=4)
  ap.add_argument("--unroll", type=int, default=2)
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--mem-frac", type=float, default=0.6)
  ap.add_argument("--no-xla", action="store_true", help="skip the XLA dequantise-then-attend rows")
  ap.add_argument("--no-selector", action="store_true",
                  help="skip the gate + top-k + sparse 4-bit row")
  ap.add_argument("--num-warps", type=int, default=None, help="Triton kernel (default: tuned)")
  ap.add_argument("--num-stages", type=int, default=None)
  ap.add_argument("--num-splits", type=int, default=None)
  ap.add_argument("--block-k", type=int, default=None)
  ap.add_argument("--magic", action="store_true",
                  help="the magic-number Triton path (TritonConfig.magic) instead of the general one")
  ap.add_argument("--variants", default="",
                  help="more Triton launch configs to time in the same run, ';'-separated "
                       "key=value lists of TritonConfig fields (e.g. 'magic=0;block_k=128,"
                       "num_warps=8'), each over the flags' config")
  ap.add_argument("--mosaic", default=None, metavar="CONFIGS",
                  help="also time the Mosaic GPU kernel (dense rows; where it takes the shape): "
                       "';'-separated key=value lists of MosaicGPUConfig fields, an empty item "
                       "for the defaults (e.g. ';num_splits=8,pipeline_depth=2': both)")
  ap.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None)
  ap.add_argument("--floor-tbps", type=float, default=None)
  ap.add_argument("--interpret", action="store_true")
  common.add_output_args(ap)
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  trace = on_gpu if args.trace is None else args.trace
  limit = device_bytes_limit()
  floor_tbps, floor_src = devtime.floor_bandwidth(args.floor_tbps)
  print(f"floor bandwidth {floor_tbps:.2f} TB/s ({floor_src})", flush=True)
  out = common.output_path(args, "lowbit.json")
  meta = common.meta(
      timing=(f"device time: one jit of {args.calls} calls (lax.scan, unroll {args.unroll}, over "
              f"distinct queries x unrolled loop over distinct caches, optimization barrier per "
              f"call); `ms` = wall / calls, median of {args.windows} windows"
              + ("; `trace_busy_ms` = profiler kernel time per call" if trace else "")),
      floor=f"bytes read at {floor_tbps:.3f} TB/s ({floor_src})", floor_tbps=floor_tbps,
      interpret=args.interpret, group=GROUP, k_mode="channel", v_group=D)
  results = []
  rng = np.random.default_rng(0)
  kcfg = TritonConfig(num_warps=args.num_warps, num_stages=args.num_stages,
                      num_splits=args.num_splits, block_k=args.block_k, magic=args.magic)
  variants = [("", kcfg)] + [(v.strip(), parse_variant(kcfg, v)) for v in args.variants.split(";")
                             if v.strip()]
  mosaic = [] if args.mosaic is None else [
      (v.strip(), parse_variant(MosaicGPUConfig(), v, "--mosaic") if v.strip()
       else MosaicGPUConfig())
      for v in dict.fromkeys(args.mosaic.split(";"))]          # '' (an empty item): the defaults

  def record(row):
    results.append(row)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                      if k in ("B", "S", "impl", "plan", "ms", "trace_busy_ms", "frac_of_floor",
                               "speedup_vs_cudnn", "trace_speedup_vs_cudnn", "skipped")}),
          flush=True)

  for S in parse_ints(args.seqs):
    for B in parse_ints(args.batches):
      base = dict(B=B, S=S, Hq=HQ, Hkv=HKV, d=D, dtype="bfloat16")
      bf16_bytes = 2 * B * HKV * S * D * 2
      copies = args.copies
      if limit is not None:
        copies = max(1, min(copies, int(args.mem_frac * limit // bf16_bytes)))
      n_q = max(1, args.calls // copies)
      keys = jax.random.split(jax.random.key(S * 7 + B), 4 * copies + 2)
      qs = jax.random.normal(keys[0], (n_q, B, HKV, G, D), DTYPE)
      lengths = jnp.full((B,), S, jnp.int32)
      row0 = {**base, "copies": copies, "calls_per_jit": n_q * copies}
      cudnn = {}

      def timed(impl, call, xs, caches, nbytes, **extra):
        m = measure(call, xs, caches, args.windows, args.unroll, trace)
        record({**row0, "impl": impl, **extra, **devtime.timing_fields(
            m, nbytes, floor_tbps, None if impl == "cudnn" else cudnn, "cudnn")})
        if impl == "cudnn":
          cudnn.update(m)

      if on_gpu:
        kv = tuple((jax.random.normal(keys[1 + 2 * c], (B, S, HKV, D), DTYPE),
                    jax.random.normal(keys[2 + 2 * c], (B, S, HKV, D), DTYPE))
                   for c in range(copies))

        def cudnn_call(q, c):
          o = jax.nn.dot_product_attention(q.reshape(B, 1, HQ, D), c[0], c[1],
                                           implementation="cudnn")
          return o.reshape(B, HKV, G, D)

        timed("cudnn", cudnn_call, qs, kv, bf16_bytes)
        del kv
      else:
        record({**row0, "impl": "cudnn", "skipped": "cuDNN needs a GPU backend"})

      for bits in parse_ints(args.bits):
        window = layout.default_window(bits, GROUP)
        packed = jnp.full((B,), S - window, jnp.int32)
        caches = tuple(random_cache(keys[1 + 2 * copies + c], B, S, bits, window)
                       for c in range(copies))
        nbytes = lowbit_bytes(B, S - window, window, bits, GROUP)
        st = dict(bits=bits, group=GROUP, k_mode="channel", v_group=D)

        def call(impl, sparse_bs=None, cfg=kcfg):
          def f(x, c):
            q, idx = (x if sparse_bs else (x, None))
            return lowbit_decode_attention(q, *c, lengths, packed, **st, implementation=impl,
                                           interpret=args.interpret, block_indices_BKM=idx,
                                           block_size=sparse_bs,
                                           config=cfg if impl != "xla" else None)
          return f

        plan = dict(bits=bits, window=window, group=GROUP, bf16_over_packed_bytes=bf16_bytes / nbytes,
                    config=repr(kcfg))
        if not args.no_xla:
          need = 2 * B * HKV * S * D * 4 * args.unroll   # f32 dequantised K and V per call
          if limit is not None and copies * nbytes + need > 0.85 * limit:
            record({**row0, "impl": f"xla_dequant int{bits}", "skipped": "f32 dequantised cache "
                    "exceeds device memory"})
          else:
            # one cache: the f32 dequantised copies of several would not fit at B16
            timed(f"xla_dequant int{bits}", call("xla"), qs, caches[:1], nbytes, **plan)
        kimpl = "xla" if not on_gpu and not args.interpret else "pallas_triton"
        if args.sparsity and bits == 4:
          bs = args.sparse_block
          n_blocks = S // bs
          n_sel = max(1, round((1 - args.sparsity) * n_blocks))
          idx = random_block_sets(rng, n_q * B * HKV, n_blocks, n_sel).reshape(n_q, B, HKV, n_sel)
          sel_tokens = n_sel * bs   # upper bound on tokens read: blocks in the residual read bf16
          sel_bytes = int(nbytes * sel_tokens / S)
        for vname, vcfg in (variants if kimpl == "pallas_triton" else variants[:1]):
          vplan = {**plan, "config": repr(vcfg)}
          tag = f" [{vname}]" if vname else ""
          timed(f"{kimpl} int{bits}{tag}", call(kimpl, cfg=vcfg), qs, caches, nbytes, **vplan)
          if args.sparsity and bits == 4:
            timed(f"{kimpl} int{bits} sparse{tag}", call(kimpl, bs, vcfg), (qs, jnp.asarray(idx)),
                  caches, sel_bytes, plan=f"sparsity={args.sparsity}", blocks_selected=n_sel,
                  blocks_total=n_blocks, **vplan)
        for mname, mcfg in mosaic:
          tag = f" [{mname}]" if mname else ""
          why = mosaic_lib.mgpu_supported(D, bits, GROUP, "channel", D, DTYPE, False)
          if why or (not on_gpu and not args.interpret):
            record({**row0, "impl": f"pallas_mosaic_gpu int{bits}{tag}",
                    "skipped": why or "the Mosaic GPU kernel needs a GPU (or --interpret)"})
          else:
            timed(f"pallas_mosaic_gpu int{bits}{tag}", call("pallas_mosaic_gpu", cfg=mcfg), qs,
                  caches, nbytes, **{**plan, "config": repr(mcfg)})
            if args.sparsity and bits == 4:
              timed(f"pallas_mosaic_gpu int{bits} sparse{tag}", call("pallas_mosaic_gpu", bs, mcfg),
                    (qs, jnp.asarray(idx)), caches, sel_bytes, plan=f"sparsity={args.sparsity}",
                    blocks_selected=n_sel, blocks_total=n_blocks,
                    **{**plan, "config": repr(mcfg)})
        if args.sparsity and bits == 4 and not args.no_selector:
          # The whole sparse step over the 4-bit cache: the SeerAttention-R gate's scores over its
          # K-compression cache (bf16, Dg = 64, one row per block; each cache copy is a layer
          # with its own gate cache and projection), top-k (`block_topk`), the sparse kernel.
          kc_bytes = B * HKV * n_blocks * GATE_DIM * 2
          gated = tuple(
              (*c, gate_lib.to_cache_dtype(jax.random.normal(
                  jax.random.key(77 + i), (B, HKV, n_blocks, GATE_DIM), jnp.float32), "bfloat16"),
               jax.random.normal(jax.random.key(7000 + i), (HKV, G * D, GATE_DIM), jnp.float32)
               * (G * D) ** -0.5)
              for i, c in enumerate(caches))
          topk_impl = "xla" if kimpl == "xla" or args.interpret else "pallas_triton"

          def gated_call(impl, cfg):
            def f(q, c):
              scores = gate_lib.gate_logits(c[9], q, c[8], lengths - 1, 1e4)
              sel, n_live = block_topk(scores, lengths, block_size=bs, k=n_sel,
                                       implementation=topk_impl, interpret=args.interpret)
              return lowbit_decode_attention(q, *c[:8], lengths, packed, **st,
                                             implementation=impl, interpret=args.interpret,
                                             block_indices_BKM=sel, block_size=bs,
                                             num_live_BK=n_live,
                                             config=cfg if impl != "xla" else None)
            return f

          gated_rows = [(kimpl, kcfg)] + ([("pallas_mosaic_gpu", mosaic[0][1])] if mosaic and (
              on_gpu or args.interpret) else [])
          for impl, cfg in gated_rows:
            timed(f"gate+topk+{impl} int{bits} sparse", gated_call(impl, cfg), qs, gated,
                  sel_bytes + kc_bytes, plan=f"sparsity={args.sparsity}", blocks_selected=n_sel,
                  blocks_total=n_blocks, gate_dim=GATE_DIM, **plan)
          del gated
        del caches
      common.write_json(out, meta, results)

  return common.finish(out, meta, results)


if __name__ == "__main__":
  sys.exit(main())
