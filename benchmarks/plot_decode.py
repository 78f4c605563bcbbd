"""Markdown table and plot of a bench_decode.py result file.

  python -m benchmarks plot benchmarks/results/NVIDIA_H100_80GB_HBM3/decode.json

Writes <name>.md and <name>.png next to the JSON: per (B, S), milliseconds per call and speedup over
cuDNN for the dense kernel, the sparse kernel alone, and gate + top-k + sparse kernel, at each
sparsity / budget plan.
"""

from __future__ import annotations

import json
import pathlib
import sys


def load(path: pathlib.Path):
  doc = json.loads(path.read_text())
  rows = [r for r in doc["results"] if "skipped" not in r]
  return doc["meta"], rows


def table(rows, ms: str = "ms", speedup: str = "speedup_vs_cudnn") -> str:
  """One row per (B, S); `ms` / `speedup` name the time and ratio fields (wall: "ms",
  "speedup_vs_cudnn"; profiler kernel time: "trace_busy_ms", "trace_speedup_vs_cudnn"). Gate rows
  are those of the first K-compression cache dtype the run measured (its `--gate-dtypes` order;
  float32 in files from before the field)."""
  gate_dtype = next((r.get("gate_dtype", "float32") for r in rows
                     if r["impl"] == "gate+topk+pallas_triton_sparse"), "float32")
  shapes = sorted({(r["B"], r["S"]) for r in rows}, key=lambda x: (x[1], x[0]))
  plans = [p for p in dict.fromkeys(r.get("plan") for r in rows) if p]
  head = ("| B | S | cuDNN ms | dense ms (x) | harness ms | "
          + " | ".join(f"{p}: sparse ms (x) / +gate ms (x)" for p in plans) + " |")
  lines = [head, "|" + "---|" * (5 + len(plans))]
  for B, S in shapes:
    get = lambda impl, plan=None: next((r for r in rows if r["B"] == B and r["S"] == S
                                        and r["impl"] == impl and r.get("plan") == plan
                                        and (not r["impl"].startswith("gate")
                                             or r.get("gate_dtype", "float32") == gate_dtype)), None)
    fmt = lambda r: "-" if r is None or ms not in r else (
        f"{r[ms]:.4f} ({r[speedup]:.2f}x)" if speedup in r else f"{r[ms]:.4f}")
    cells = [str(B), f"{S // 1024}K", fmt(get("cudnn")), fmt(get("pallas_triton")),
             fmt(get("harness_overhead"))]
    for p in plans:
      cells.append(f"{fmt(get('pallas_triton_sparse', p))} / "
                   f"{fmt(get('gate+topk+pallas_triton_sparse', p))}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows, out: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  seqs = sorted({r["S"] for r in rows})
  batches = sorted({r["B"] for r in rows})
  fig, axes = plt.subplots(1, len(seqs), figsize=(4.5 * len(seqs), 3.8), sharey=True, squeeze=False)
  for ax, S in zip(axes[0], seqs):
    for B in batches:
      for impl, style in (("pallas_triton_sparse", "-o"), ("gate+topk+pallas_triton_sparse", "--x")):
        pts = [(r["sparsity"], r["speedup_vs_cudnn"]) for r in rows
               if r["S"] == S and r["B"] == B and r["impl"] == impl and r.get("sparsity")
               and "speedup_vs_cudnn" in r]
        if pts:
          xs, ys = zip(*sorted(pts))
          ax.plot(xs, ys, style, label=f"B{B} {'kernel' if impl.startswith('pallas') else '+gate'}")
    sp = [0.5, 0.8, 0.9]
    ax.plot(sp, [1 / (1 - s) for s in sp], ":", color="gray", label="1/(1-s): bytes saved")
    ax.set_title(f"S = {S // 1024}K")
    ax.set_xlabel("sparsity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("speedup over cuDNN dense decode")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2
  path = pathlib.Path(argv[0])
  if not path.is_file():
    print(f"error: no result file {path}", file=sys.stderr)
    return 2
  meta, rows = load(path)
  md = "Wall time of the jit / calls (ms per call, speedup over cuDNN):\n\n" + table(rows)
  if any("trace_busy_ms" in r for r in rows):
    md += ("\n\nProfiler kernel time per call (same runs; gaps between kernels excluded):\n\n"
           + table(rows, "trace_busy_ms", "trace_speedup_vs_cudnn"))
  (path.with_suffix(".md")).write_text(f"{meta['card']}, JAX {meta['jax']}; {meta['timing']}; "
                                       f"floor: {meta.get('floor', '')}\n\n{md}\n")
  plot(rows, path.with_suffix(".png"), f"{meta['card']} (JAX {meta['jax']}), Hq=32 Hkv=8 d=128 bf16, block 64")
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
