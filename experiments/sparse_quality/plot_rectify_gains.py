#!/usr/bin/env python3
"""Rectification's teacher-forced gain across the trained models, with standard errors.

  python3 experiments/sparse_quality/plot_rectify_gains.py [RESULTS_DIR ...] [--out PNG]

Reads each run's results.json (runs without per-prompt excess NLL, i.e. before the paired
standard errors, are skipped), computes the gain of every rectified decoding the way REPORT.md
does (`report._rectify_gains`: per-prompt excess NLL without minus with rectification, mean and
standard error over the prompts) and plots them by model, with the continuation length in the
label. Writes `rectify_gains.png` next to this file by default and prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
  sys.path.insert(0, str(HERE))

import report  # noqa: E402  (experiments/sparse_quality/report.py)

DEFAULT_DIRS = ("results_h200_paired", "results_h200_1024tok", "results_h200_2048tok",
                "results_h200_cache_oracle", "results_h200_local_window",
                "results_h200_local_window_retrieval")


def load_gains(dirs) -> list[tuple[str, dict]]:
  """[(label, {"<selector> f=<f>": (gain, se)})] for the runs that have per-prompt excess NLL."""
  out = []
  for d in dirs:
    path = pathlib.Path(d)
    path = path if path.is_absolute() or path.exists() else HERE / path
    f = path / "results.json"
    if not f.is_file():
      raise SystemExit(f"error: {f} not found")
    doc = json.loads(f.read_text())
    drift = (doc.get("eval") or {}).get("drift") or {}
    gains = report._rectify_gains(drift.get("teacher_forced") or {})
    if gains:
      out.append((f"{path.name}\n{drift.get('new_tokens')} tokens", gains))
  return out


def plot(runs, out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  widest = max(len(g) for _, g in runs)
  fig, ax = plt.subplots(figsize=(2.0 + 0.45 * sum(len(g) for _, g in runs) + len(runs), 4.4), dpi=110)
  width = 0.85 / widest
  seen = set()
  for i, (_, g) in enumerate(runs):
    names = sorted(g)
    for j, name in enumerate(names):
      x = i + (j - (len(names) - 1) / 2) * width
      ax.bar(x, g[name][0], width * 0.92, yerr=g[name][1], capsize=2, color=report._color(name),
             alpha=1.0 if "f=16" in name or "f=1" == name[-3:] else 0.55,
             hatch="//" if "cache-only" in name else None, edgecolor="k", linewidth=0.3,
             label=None if name in seen else name)
      seen.add(name)
  ax.axhline(0, c="gray", lw=1)
  ax.set_xticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
  ax.set_ylabel("excess NLL removed by rectification (nats/byte)")
  ax.set_title("ReSA rectification, teacher-forced: gain +- SE over prompts "
               "(hatched: cache-only, tokens from the sparse steps)", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("dirs", nargs="*", default=list(DEFAULT_DIRS),
                  help="result directories (relative ones also under experiments/sparse_quality/)")
  ap.add_argument("--out", default=str(HERE / "rectify_gains.png"))
  args = ap.parse_args(argv)
  runs = load_gains(args.dirs)
  if not runs:
    raise SystemExit("error: none of the runs has per-prompt teacher-forced results")
  for label, g in runs:
    print(label.replace("\n", ", ") + ": " + "; ".join(f"{k} {m:+.4f} +- {s:.4f}"
                                                      for k, (m, s) in sorted(g.items())))
  plot(runs, pathlib.Path(args.out))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
