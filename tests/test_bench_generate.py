"""CPU smoke test of `python -m benchmarks generate`: every mode runs and reports a sane throughput."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_generate_cpu_smoke(tmp_path):
  out = tmp_path / "generate.json"
  # 2 layers and one sparse budget keep the five compiles to seconds; block 16 with a 32-token
  # budget out of 128 makes the sparse modes really sparse; f = 4 makes quest_rectify rectify 4 times.
  # The step time is a difference of two timings: 64 new tokens, median of 3 (16 tokens, median
  # of 2, gave noise <= 0 on a busy CPU).
  cmd = [sys.executable, "-m", "benchmarks", "generate",
         "--config", "configs/tiny.yaml", "--override", "model.n_layers=2",
         "--context", "128", "--new-tokens", "64", "--batch", "1",
         "--block-size", "16", "--budget-tokens", "32", "--sparsities", "",
         "--rectify-every", "4", "--repeats", "3", "--trace", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  data = json.loads(out.read_text())
  assert data["meta"]["backend"] == "cpu" and "random" in data["meta"]["weights"]
  rows = data["results"]
  assert {r["mode"] for r in rows} == {"dense", "quest", "gate", "quest_rectify", "quest_rectify_xla"}
  for r in rows:
    assert "skipped" not in r, r
    assert r["B"] == 1 and r["context"] == 128 and r["new_tokens"] == 64
    for k in ("decode_tok_s", "end_to_end_tok_s", "prefill_tok_s", "step_ms", "t_N_ms", "t_1_ms"):
      assert math.isfinite(r[k]) and r[k] > 0, (k, r)
    assert r["t_N_ms"] > r["t_1_ms"]
    tr = r["trace"]   # CPU: host events, so only the plumbing is checked
    assert not tr["device"] and tr["kernels"] and all(math.isfinite(e["us_per_step"]) for e in tr["kernels"])
  sparse = [r for r in rows if r["mode"] != "dense"]
  assert all(r["budget_tokens"] == 32 and r["budget_blocks"] == 2 for r in sparse)
  assert {r["rectify_every"] for r in sparse if r["mode"].startswith("quest_rectify")} == {4}
  assert all("decode_speedup_vs_dense" in r for r in sparse)


@pytest.mark.parametrize("fmt", ["i2_s"])   # i2_t decoding: test_ternary_packed.py
def test_bench_generate_ternary_weights(tmp_path, fmt):
  """--weights ternary decodes a BitNet model packed to I2_S or I2_T (its projections on the W2A8
  path), with a low-bit KV cache too; the floor counts the packed weight bytes. (64 new tokens,
  median of 3: the step time is a difference of two timings, and 4 or 16 tokens on a busy CPU
  gave noise <= 0.)"""
  out = tmp_path / "generate.json"
  cmd = [sys.executable, "-m", "benchmarks", "generate", "--config", "configs/tiny.yaml",
         "--override", "model.n_layers=2", "--context", "128", "--new-tokens", "64", "--batch", "1",
         "--modes", "dense", "--sparsities", "", "--kv-caches", "dense,int4", "--repeats", "3",
         "--weights", "ternary", "--ternary-format", fmt, "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["meta"]["model"]["linear_impl"] == "ternary_packed"
  assert f"packed to {fmt}" in data["meta"]["weights"]
  rows = data["results"]
  assert {r["kv_cache"] for r in rows} == {"dense", "int4"}
  assert all(math.isfinite(r["decode_tok_s"]) and r["decode_tok_s"] > 0 for r in rows)


def test_bench_generate_refuses_fused_projections_outside_i2t(tmp_path):
  cmd = [sys.executable, "-m", "benchmarks", "generate", "--config", "configs/tiny.yaml",
         "--weights", "ternary", "--ternary-format", "i2_s", "--ternary-fuse",
         "--out", str(tmp_path / "g.json")]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "--ternary-fuse takes" in proc.stderr
  assert not (tmp_path / "g.json").exists()
