"""CPU smoke tests of the decode micro-benchmarks (interpret mode, tiny shapes) through the one
entry point (`python -m benchmarks <suite>`): each suite runs, writes its JSON with its metadata
and reports every row it promises with a positive time; and the harness's own guarantees."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import devtime, plot_decode
from benchmarks.bench_decode import GATE_L2_DEFEAT_BYTES, MAX_GATE_COPIES, gate_cache_copies

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(suite, *args, tmp_path):
  out = tmp_path / "out.json"
  cmd = [sys.executable, "-m", "benchmarks", suite, "--interpret", "--windows", "1",
         "--out", str(out), *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  meta = data["meta"]
  assert meta["command"].startswith(f"python -m benchmarks {suite}") and meta["commit"]
  assert meta["card"] and meta["date"] and "device time" in meta["timing"]
  return data["results"]


def positive(rows):
  for r in rows:
    assert "skipped" not in r or r["impl"] == "cudnn", r
    if "ms" in r:
      assert math.isfinite(r["ms"]) and r["ms"] > 0, r


def test_bench_decode_smoke(tmp_path):
  rows = run("decode", "--batches", "1", "--seqs", "1024", "--calls", "2", "--copies", "1",
             "--sparsities", "0.5", "--budget-tokens", "256", "--no-xla", "--trace",
             "--gate-dtypes", "float8_e4m3fn,bfloat16", tmp_path=tmp_path)
  positive(rows)
  # --trace: every timed row also carries the profiler's (here: host) time and kernel list
  timed = [r for r in rows if "ms" in r]
  assert timed and all(r["trace_busy_ms"] > 0 and r["kernels"] for r in timed)
  assert {r["gate_dtype"] for r in rows if r["impl"].startswith("gate")} == {"float8_e4m3fn", "bfloat16"}
  impls = {r["impl"] for r in rows}
  assert {"cudnn", "harness_overhead", "pallas_triton", "pallas_triton_sparse",
          "gate+topk+pallas_triton_sparse"} <= impls
  assert {r.get("plan") for r in rows if r["impl"] == "pallas_triton_sparse"} == {"sparsity=0.5",
                                                                                 "budget=256"}


def test_bench_lowbit_smoke(tmp_path):
  rows = run("lowbit", "--batches", "1", "--seqs", "1024", "--calls", "2", "--copies", "1",
             "--bits", "4", "--variants", "magic=1", tmp_path=tmp_path)
  positive(rows)
  assert {r["impl"] for r in rows} == {"cudnn", "xla_dequant int4", "pallas_triton int4",
                                       "pallas_triton int4 sparse", "pallas_triton int4 [magic=1]",
                                       "pallas_triton int4 sparse [magic=1]",
                                       "gate+topk+pallas_triton int4 sparse"}
  assert all(r["bytes_read"] > 0 for r in rows if "ms" in r)


def test_bench_lowbit_matmul_smoke(tmp_path):
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks", "lowbit_matmul", "--shapes", "128x256",
                         "--ms", "1", "--calls", "2", "--copies", "1", "--windows", "1", "--out",
                         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["results"]
  positive(rows)
  assert len(rows) == 6 and all("speedup_vs_bf16" in r for r in rows if r["impl"] != "bf16")


def test_lowbit_matmul_mosaic_configs_parse():
  from benchmarks.bench_lowbit_matmul import parse_mosaic_config
  cfg = parse_mosaic_config("num_splits=8,overlap=1")
  assert cfg.num_splits == 8 and cfg.overlap is True and cfg.pipeline_depth is None
  with pytest.raises(SystemExit, match="bad item"):
    parse_mosaic_config("unpack=asm")
  with pytest.raises(SystemExit, match="num_splits"):
    parse_mosaic_config("num_splits=0")


def test_gate_cache_copies_defeat_the_l2_on_the_gpu_only():
  mb = 2 ** 20
  # B8 S128K float32 (32 MiB) / bfloat16 (16 MiB) gate caches, 4 K/V copies: 16 and 32 copies
  assert gate_cache_copies(32 * mb, 4, True) == 16 and 16 * 32 * mb >= GATE_L2_DEFEAT_BYTES
  assert gate_cache_copies(16 * mb, 4, True) == MAX_GATE_COPIES == 16   # capped (XLA remat at 32)
  assert gate_cache_copies(16 * mb, 4, True, max_copies=32) == 32
  assert gate_cache_copies(4 * mb, 4, True) == MAX_GATE_COPIES        # capped
  assert gate_cache_copies(1024 * mb, 4, True) == 4                   # already far past the L2
  assert gate_cache_copies(4 * mb, 3, True) % 3 == 0                  # whole rounds of K/V copies
  assert gate_cache_copies(4 * mb, 4, False) == 4                     # CPU: no L2 to defeat


def test_bench_selector_smoke(tmp_path):
  rows = run("selector", "--batches", "1", "--seqs", "2048", "--calls", "2", "--copies", "1",
             "--warps", "4", tmp_path=tmp_path)
  positive(rows)
  assert {r["row"] for r in rows} == {"harness", "gate_scores", "topk", "gate+topk"}
  assert {r["kc_dtype"] for r in rows if r["row"] == "gate_scores"} == {"float32", "bfloat16",
                                                                       "float8_e4m3fn"}


def test_bench_extend_smoke(tmp_path):
  rows = run("extend", "--batches", "1", "--seqs", "512", "--f", "4", "--calls", "2",
             "--copies", "1", tmp_path=tmp_path)
  positive(rows)
  assert {r["impl"] for r in rows} == {"pallas_triton", "xla"}
  assert all(r["F"] == 4 and r["floor_ms"] > 0 for r in rows)


def test_trace_summary_counts_stream_lines_of_the_device_only():
  summarize_trace = devtime.summarize_trace
  M = lambda pid, name, tid=None: ({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
                                   if tid is None else
                                   {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                                    "args": {"name": name}})
  trace = {"traceEvents": [
      M(1, "/host:CPU"), M(2, "/device:GPU:0"),
      M(2, "XLA Modules", tid=1), M(2, "XLA Ops", tid=2), M(2, "Stream #14(Compute)", tid=3),
      {"ph": "X", "pid": 1, "tid": 9, "name": "PjitFunction", "ts": 0.0, "dur": 500.0},
      {"ph": "X", "pid": 2, "tid": 1, "name": "jit_many", "ts": 10.0, "dur": 200.0},
      {"ph": "X", "pid": 2, "tid": 2, "name": "custom-call.1", "ts": 10.0, "dur": 40.0},
      {"ph": "X", "pid": 2, "tid": 3, "name": "sparse_decode_attention", "ts": 10.0, "dur": 40.0},
      {"ph": "X", "pid": 2, "tid": 3, "name": "sparse_decode_attention", "ts": 60.0, "dur": 44.0},
      {"ph": "X", "pid": 2, "tid": 3, "name": "fusion.3", "ts": 104.0, "dur": 6.0},
      {"ph": "i", "pid": 2, "tid": 3, "name": "marker", "ts": 0.0},
  ]}
  s = summarize_trace(trace, calls=2)
  assert s["device"] is True and s["lines"] == ["Stream #14(Compute)"]
  # module / op aggregate lines and host events are not kernel time
  assert [(e["name"], e["count"]) for e in s["events"]] == [("sparse_decode_attention", 2), ("fusion.3", 1)]
  assert s["events"][0]["per_call_us"] == 42.0 and s["busy_us_per_call"] == 45.0
  assert s["span_us_per_call"] == 50.0          # (110 - 10) / 2: the gap at 50..60 counts here
  # no stream-named line: every device line but the aggregate ones
  no_stream = [e for e in trace["traceEvents"] if e.get("args", {}).get("name") != "Stream #14(Compute)"]
  no_stream.append(M(2, "/gpu:0 compute", tid=3))
  s2 = summarize_trace({"traceEvents": no_stream}, calls=2)
  assert s2["busy_us_per_call"] == 45.0 and s2["lines"] == ["/gpu:0 compute"]
  # no device process (CPU): every event is reported
  cpu = summarize_trace({"traceEvents": trace["traceEvents"][:1] + trace["traceEvents"][5:6]}, calls=1)
  assert cpu["device"] is False and cpu["events"][0]["name"] == "PjitFunction"


def test_profile_decode_smoke(tmp_path):
  out = tmp_path / "p.json"
  cmd = [sys.executable, "-m", "benchmarks", "profile", "--interpret", "--batch", "1",
         "--seq", "2048", "--calls", "2", "--budget-tokens", "256", "--gate-copies", "2",
         "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["meta"]["gate_copies"] == 2 and doc["meta"]["gate_dtype"] == "bfloat16"
  res = doc["results"]
  assert {"dense", "gate+topk+sparse sparsity=0.9", "gate+topk+sparse budget=256"} <= set(res)
  assert all(r["events"] and r["sum_per_call_us"] > 0 for r in res.values())


def test_plot_decode_table_takes_the_first_gate_dtype_and_every_other_row():
  base = dict(B=8, S=131072)
  rows = [dict(base, impl="cudnn", ms=1.0),
          dict(base, impl="pallas_triton", ms=0.98, speedup_vs_cudnn=1.02),
          dict(base, impl="pallas_triton_sparse", plan="p", ms=0.04, speedup_vs_cudnn=25.0),
          dict(base, impl="gate+topk+pallas_triton_sparse", plan="p", gate_dtype="bfloat16", ms=0.05,
               speedup_vs_cudnn=20.0),
          dict(base, impl="gate+topk+pallas_triton_sparse", plan="p", gate_dtype="float32", ms=0.055,
               speedup_vs_cudnn=18.18)]
  line = plot_decode.table(rows).splitlines()[-1]
  assert line == "| 8 | 128K | 1.0000 | 0.9800 (1.02x) | - | 0.0400 (25.00x) / 0.0500 (20.00x) |", line
  old = [dict(r) for r in rows[:3]] + [{k: v for k, v in rows[4].items() if k != "gate_dtype"}]
  assert plot_decode.table(old).splitlines()[-1].endswith("/ 0.0550 (18.18x) |")


def test_every_call_reads_its_inputs():
  """Two calls of one loop trip against the same cache must not share work: with the inputs
  behind the harness's optimization barrier, XLA keeps one dot per call (it merged two dots that
  share an operand into one before, so the XLA reference read the cache once for two calls)."""
  q = jnp.ones((4, 2, 8, 16), jnp.float32)
  k = jnp.ones((2, 64, 16), jnp.float32)
  call = lambda x, c: jnp.einsum("bgh,bsh->bgs", x, c)
  many = devtime.build_many(call, q, (k, k), unroll=2)
  lowered = jax.jit(lambda xs, cs: many(xs, cs)).lower(q, (k, k)).as_text()
  assert lowered.count("optimization_barrier") >= 2      # one per call of a loop trip
  got = np.asarray(many(q, (k, k)))
  np.testing.assert_allclose(got, 4 * 2 * np.asarray(call(q[0], k)), rtol=1e-6)
  # shared arrays (the K/V copies gate rows rotate over) reach the call with its index
  many2 = devtime.build_many(lambda x, c, sh, i: call(x, sh[i % 2]) * c, q, (1.0, 2.0, 3.0),
                             shared=(k, k))
  np.testing.assert_allclose(np.asarray(many2(q, (1.0, 2.0, 3.0))),
                             4 * 6 * np.asarray(call(q[0], k)), rtol=1e-6)


def test_rows_faster_than_their_floor_are_reported():
  rows = [dict(B=1, S=131072, impl="xla", frac_of_floor=1.21, trace_frac_of_floor=0.9),
          dict(B=8, S=131072, impl="pallas_triton", plan=None, frac_of_floor=0.99),
          dict(B=1, S=131072, impl="cudnn", frac_of_floor=1.02, trace_frac_of_floor=None)]
  bad = devtime.floor_violations(rows)
  assert len(bad) == 1 and "impl=xla" in bad[0] and "frac_of_floor = 1.210" in bad[0]


def test_unknown_suite_is_an_error():
  proc = subprocess.run([sys.executable, "-m", "benchmarks", "decoed"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "unknown suite 'decoed'" in proc.stderr
