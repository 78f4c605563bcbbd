"""This tree against another checkout of effjax, measured in the same run on the same card.

  python -m benchmarks compare --baseline DIR [--skip-train] [--decode-args "..."]

DIR holds an earlier effjax tree (e.g. `git archive <commit> | tar -x -C DIR`), whose own
`benchmarks/bench_decode.py` and `benchmarks/bench_train.py` are run from DIR (its code on the
path), then this tree's `decode` and `train` suites with the same arguments. Speedups over cuDNN
are ratios measured within one process each, so they compare across the two runs; the report
gives, per row, this tree's ratio over the baseline's (wall and kernel time) and the train step's
time. Writes out/<card>/compare.json and compare.md (--out / --update-results as every suite).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys

from benchmarks import common

DECODE_ARGS = ("--seqs 131072 --batches 1,8,16 --sparsities 0.9 --budget-tokens 4096 "
               "--sparse-impls pallas_triton,pallas_mosaic_gpu")
TRAIN_ARGS = "--config configs/350m.yaml --seq 2048 --batch 16"
TOLERANCE = 0.03


def run(cmd: list[str], cwd: pathlib.Path, log: pathlib.Path) -> int:
  env = dict(os.environ, PYTHONPATH=str(cwd), PYTHONUNBUFFERED="1")
  print(f"$ (cd {cwd} && {' '.join(cmd)})", flush=True)
  with log.open("w") as f:
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def _key(r: dict):
  return (r.get("B"), r.get("S"), r.get("impl"), r.get("plan"), r.get("gate_dtype"))


def compare_decode(old: list[dict], new: list[dict]) -> list[dict]:
  """Per row of both runs: speedups over cuDNN and this tree's over the baseline's."""
  old_rows = {_key(r): r for r in old if "skipped" not in r}
  rows = []
  for r in new:
    if "skipped" in r or r.get("impl") in ("cudnn", "harness_overhead"):
      continue
    o = old_rows.get(_key(r))
    row = {"B": r["B"], "S": r["S"], "impl": r["impl"], "plan": r.get("plan"),
           "new_ms": r["ms"], "new_x": r.get("speedup_vs_cudnn"),
           "new_kernel_x": r.get("trace_speedup_vs_cudnn"),
           "new_frac_of_floor": r.get("frac_of_floor")}
    if o is not None:
      row.update(old_ms=o["ms"], old_x=o.get("speedup_vs_cudnn"),
                 old_kernel_x=o.get("trace_speedup_vs_cudnn"),
                 old_frac_of_floor=o.get("frac_of_floor"))
      for k in ("x", "kernel_x"):
        if row.get(f"new_{k}") and row.get(f"old_{k}"):
          row[f"ratio_{k}"] = row[f"new_{k}"] / row[f"old_{k}"]
    rows.append(row)
  return rows


def verdicts(rows: list[dict], new: list[dict], train: dict | None) -> list[str]:
  """The restructuring's acceptance checks, one line each."""
  out = []
  for r in rows:
    if r["impl"] == "xla":
      ok = (r["new_frac_of_floor"] or 0) <= 1.03
      out.append(f"{'ok' if ok else 'FAIL'}: B{r['B']} xla reference at "
                 f"{r['new_frac_of_floor']:.2f} of its byte floor (before: "
                 f"{r.get('old_frac_of_floor') or float('nan'):.2f})")
      continue
    if "ratio_x" in r:
      ok = r["ratio_x"] >= 1 - TOLERANCE
      is_mgpu_gate = r["impl"].startswith("gate+") and "mosaic" in r["impl"]
      out.append(f"{'ok' if ok else ('improved-defect' if is_mgpu_gate else 'SLOWER')}: "
                 f"B{r['B']} {r['impl']} {r['plan'] or ''}: {r['old_x']:.2f}x -> {r['new_x']:.2f}x "
                 f"({r['ratio_x'] - 1:+.1%})")
  by = {_key(r): r for r in new if "skipped" not in r}
  for B in sorted({r["B"] for r in rows}):
    for plan in sorted({r["plan"] for r in rows if r["plan"]}):
      m = by.get((B, 131072, "gate+topk+pallas_mosaic_gpu_sparse", plan, "bfloat16"))
      t = by.get((B, 131072, "gate+topk+pallas_triton_sparse", plan, "bfloat16"))
      if m and t:
        rel = m["ms"] / t["ms"]
        out.append(f"{'ok' if rel <= 1.05 else 'FAIL'}: B{B} {plan} gated Mosaic GPU path "
                   f"{m['ms'] * 1e3:.1f} us vs Triton {t['ms'] * 1e3:.1f} us ({rel - 1:+.1%})")
  if train:
    rel = train["new_step_ms"] / train["old_step_ms"]
    out.append(f"{'ok' if rel <= 1 + TOLERANCE else 'SLOWER'}: train step "
               f"{train['old_step_ms']:.1f} -> {train['new_step_ms']:.1f} ms ({rel - 1:+.1%})")
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--baseline", required=True, help="directory of the earlier effjax tree")
  ap.add_argument("--decode-args", default=DECODE_ARGS)
  ap.add_argument("--train-args", default=TRAIN_ARGS)
  ap.add_argument("--skip-train", action="store_true")
  ap.add_argument("--skip-decode", action="store_true")
  common.add_output_args(ap)
  args = ap.parse_args()
  base = pathlib.Path(args.baseline).resolve()
  if not (base / "benchmarks" / "bench_decode.py").is_file():
    ap.error(f"--baseline {base}: no benchmarks/bench_decode.py there")
  out = common.output_path(args, "compare.json")
  d = out.parent
  here = common.ROOT
  py = sys.executable
  files = {}
  suites = [("decode", "bench_decode.py", args.decode_args, args.skip_decode),
            ("train", "bench_train.py", args.train_args, args.skip_train)]
  for suite, script, suite_args, skip in suites:
    if skip:
      continue
    for side, cmd, cwd in (("old", [py, f"benchmarks/{script}"], base),
                           ("new", [py, "-m", "benchmarks", suite], here)):
      files[f"{side}_{suite}"] = d / f"compare_{side}_{suite}.json"
      run([*cmd, *shlex.split(suite_args), "--out", str(files[f"{side}_{suite}"])], cwd,
          d / f"compare_{side}_{suite}.log")
  load = lambda k: json.loads(files[k].read_text()) if k in files and files[k].exists() else None
  old_d, new_d, old_t, new_t = (load(k) for k in ("old_decode", "new_decode", "old_train",
                                                   "new_train"))
  rows = compare_decode(old_d["results"], new_d["results"]) if old_d and new_d else []
  train = None
  if old_t and new_t:
    ot, nt = old_t["results"][0], new_t["results"][0]
    train = {"old_step_ms": ot["step_ms"], "new_step_ms": nt["step_ms"],
             "old_tokens_per_s": ot["tokens_per_s"], "new_tokens_per_s": nt["tokens_per_s"]}
  lines = verdicts(rows, new_d["results"] if new_d else [], train)
  common.write_json(out, common.meta(baseline=str(base), decode_args=args.decode_args,
                                     train_args=args.train_args, train=train, verdicts=lines),
                    rows)
  md = ["| B | impl | plan | before x (kernel x) | after x (kernel x) | after / before |",
        "|---|---|---|---|---|---|"]
  f = lambda v, s="{:.2f}": "-" if v is None else s.format(v)
  for r in rows:
    md.append(f"| {r['B']} | {r['impl']} | {r['plan'] or ''} | {f(r.get('old_x'))} "
              f"({f(r.get('old_kernel_x'))}) | {f(r.get('new_x'))} ({f(r.get('new_kernel_x'))}) | "
              f"{f(r.get('ratio_x'), '{:.3f}')} |")
  out.with_suffix(".md").write_text("\n".join(md + [""] + [f"- {l}" for l in lines]) + "\n")
  print("\n".join(lines))
  print(f"wrote {out}")
  return 0 if not any(l.startswith(("FAIL", "SLOWER")) for l in lines) else 1


if __name__ == "__main__":
  sys.exit(main())
