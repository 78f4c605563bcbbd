"""One entry point for every benchmark suite.

    python -m benchmarks <suite> [args]        # results -> out/<card>/<suite>.json
    python -m benchmarks <suite> --update-results [args]   # -> benchmarks/results/<card>/

Suites:
  decode      decode attention: dense / block-sparse kernels vs cuDNN and the XLA reference,
              with the selector (gate + top-k) step; byte floors checked
  lowbit      low-bit (4 / 2-bit) KV cache decode: fused-dequant kernels vs cuDNN bf16 and XLA
              dequantise-then-attend; byte floors checked
  lowbit_matmul  packed ternary / 2-bit weight matmuls (dequant, W2A8, LUT) vs XLA bf16, int4
              dequant and int8 x int8 matmuls
  selector    gate scores and top-k block selection alone
  extend      multi-token (rectification) attention over a cache
  seer_prefill  SeerAttention prefill: block-sparse attention at several densities vs cuDNN
              causal and XLA, forward and forward + backward
  gate_layout the gate's scores by cache layout and dtype
  generate    end-to-end decoding tokens/s (dense, sparse, ReSA)
  train       train-step throughput and MFU
  scoring     DELT / LQS scoring throughput
  tune        launch-parameter sweep of the decode kernels
  profile     per-kernel device time of a gated sparse step
  profile_gate  the prefill gate's kernels, and formulations of its pooling and top-k
  profile_mgpu  the Mosaic GPU low-bit decode kernel's phases (dequantisation, wgmmas, softmax)
              under the Mosaic GPU profiler
  compare     this tree against another checkout of effjax, same run (decode grid + train step)
  plot        decode grid JSON -> markdown table + plot
"""

from __future__ import annotations

import importlib
import sys

SUITES = {"decode": "bench_decode", "lowbit": "bench_lowbit", "lowbit_matmul": "bench_lowbit_matmul", "selector": "bench_selector", "extend": "bench_extend",
          "seer_prefill": "bench_seer_prefill",
          "gate_layout": "bench_gate_layout", "generate": "bench_generate", "train": "bench_train",
          "scoring": "bench_scoring", "tune": "tune_decode", "profile": "profile_decode",
          "profile_mgpu": "profile_mgpu", "profile_gate": "profile_gate",
          "compare": "compare", "plot": "plot_decode"}


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
    print(__doc__)
    if argv and argv[0] not in ("-h", "--help"):
      print(f"error: unknown suite {argv[0]!r}; choose one of {', '.join(SUITES)}", file=sys.stderr)
      return 2
    return 0
  mod = importlib.import_module(f"benchmarks.{SUITES[argv[0]]}")
  sys.argv = [f"python -m benchmarks {argv[0]}", *argv[1:]]
  rc = mod.main()
  return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
