"""CPU smoke tests of the decode micro-benchmarks (interpret mode, tiny shapes): each script runs,
writes its JSON and reports every row it promises with a positive time."""

import json
import math
import pathlib
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(script, *args, tmp_path):
  out = tmp_path / "out.json"
  cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--interpret", "--windows", "1",
         "--out", str(out), *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["meta"]["argv"] and "device time" in data["meta"]["timing"]
  return data["results"]


def positive(rows):
  for r in rows:
    assert "skipped" not in r or r["impl"] == "cudnn", r
    if "ms" in r:
      assert math.isfinite(r["ms"]) and r["ms"] > 0, r


def test_bench_decode_smoke(tmp_path):
  rows = run("bench_decode.py", "--batches", "1", "--seqs", "1024", "--calls", "2", "--copies", "1",
             "--sparsities", "0.5", "--budget-tokens", "256", "--no-xla", tmp_path=tmp_path)
  positive(rows)
  impls = {r["impl"] for r in rows}
  assert {"cudnn", "harness_overhead", "pallas_triton", "pallas_triton_sparse",
          "gate+topk+pallas_triton_sparse"} <= impls
  assert {r.get("plan") for r in rows if r["impl"] == "pallas_triton_sparse"} == {"sparsity=0.5",
                                                                                 "budget=256"}


def test_bench_selector_smoke(tmp_path):
  rows = run("bench_selector.py", "--batches", "1", "--seqs", "2048", "--calls", "2", "--copies", "1",
             "--warps", "4", tmp_path=tmp_path)
  positive(rows)
  assert {r["row"] for r in rows} == {"harness", "gate_scores", "topk", "gate+topk"}
  assert {r["kc_dtype"] for r in rows if r["row"] == "gate_scores"} == {"float32", "bfloat16"}


def test_bench_extend_smoke(tmp_path):
  rows = run("bench_extend.py", "--batches", "1", "--seqs", "512", "--f", "4", "--calls", "2",
             "--copies", "1", tmp_path=tmp_path)
  positive(rows)
  assert {r["impl"] for r in rows} == {"pallas_triton", "xla"}
  assert all(r["F"] == 4 and r["floor_ms"] > 0 for r in rows)


def test_profile_trace_summary_counts_device_events_only():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from profile_decode import summarize_trace
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "name": "PjitFunction", "dur": 500.0},
      {"ph": "X", "pid": 2, "name": "sparse_decode_attention", "dur": 40.0},
      {"ph": "X", "pid": 2, "name": "sparse_decode_attention", "dur": 44.0},
      {"ph": "X", "pid": 2, "name": "fusion.3", "dur": 6.0},
      {"ph": "i", "pid": 2, "name": "marker"},
  ]}
  s = summarize_trace(trace, calls=2)
  assert s["device"] is True
  assert [(e["name"], e["count"]) for e in s["events"]] == [("sparse_decode_attention", 2), ("fusion.3", 1)]
  assert s["events"][0]["per_call_us"] == 42.0 and s["sum_per_call_us"] == 45.0
  # no device process (CPU): every process's events are reported
  cpu = summarize_trace({"traceEvents": trace["traceEvents"][:1] + trace["traceEvents"][2:3]}, calls=1)
  assert cpu["device"] is False and cpu["events"][0]["name"] == "PjitFunction"


def test_profile_decode_smoke(tmp_path):
  out = tmp_path / "p.json"
  cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"), "--interpret", "--batch", "1",
         "--seq", "2048", "--calls", "2", "--budget-tokens", "256", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())["results"]
  assert {"dense", "gate+topk+sparse sparsity=0.9", "gate+topk+sparse budget=256"} <= set(res)
  assert all(r["events"] and r["sum_per_call_us"] > 0 for r in res.values())
