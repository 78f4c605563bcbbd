"""CPU smoke test of the SeerAttention prefill benchmark (interpret mode, tiny shapes) through the
one entry point, and the block sets it times (ascending, -1 padded, diagonal kept, the
promised counts)."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks.bench_seer_prefill import (block_counts, block_indices, parse_mosaic_configs,
                                           splash_mask_info, splash_visible, visible_pairs)
from pallas_kernels.block_sparse_attention import check_block_indices

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_seer_prefill_smoke(tmp_path):
  out = tmp_path / "out.json"
  cmd = [sys.executable, "-m", "benchmarks", "seer_prefill", "--interpret", "--seqs", "64",
         "--heads", "4,2", "--head-dim", "16", "--block-size", "16", "--densities", "0.5",
         "--calls", "1", "--copies", "1", "--windows", "1", "--select-impl", "pallas_triton",
         "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  meta, rows = data["meta"], data["results"]
  assert meta["command"].startswith("python -m benchmarks seer_prefill") and meta["commit"]
  assert "device time" in meta["timing"] and meta["peak_tflops"] > 0
  got = {(r["impl"], r["mode"], r.get("pattern")) for r in rows}
  assert got == {("cudnn", "fwd", None), ("cudnn", "fwdbwd", None),
                 ("xla_dense", "fwd", None), ("xla_dense", "fwdbwd", None),
                 ("pallas_triton_flash", "fwd", None), ("pallas_triton_flash+target", "fwd", None),
                 ("pallas_triton_sparse", "fwd", "random"), ("pallas_triton_sparse", "fwdbwd", "random"),
                 ("xla_sparse", "fwd", "random"), ("xla_sparse", "fwdbwd", "random"),
                 ("pallas_triton_sparse", "fwd", "static"), ("pallas_triton_sparse", "fwdbwd", "static"),
                 ("pallas_triton_sparse+gate", "fwd", "random")}
  for r in rows:
    if r["impl"] == "cudnn":
      assert "skipped" in r                       # no GPU here
      continue
    assert "skipped" not in r, r
    assert math.isfinite(r["ms"]) and r["ms"] > 0 and 0 < r["frac_of_floor"] < 1
  sparse = [r for r in rows if r["impl"] == "pallas_triton_sparse"]
  assert all(0.4 < r["density_of_causal"] < 0.75 for r in sparse)


@pytest.mark.slow
def test_bench_seer_prefill_mosaic_configs_smoke(tmp_path):
  """--mosaic-configs: one Mosaic GPU row per config (interpret mode), timed like the rest;
  --flash-impls: the Mosaic GPU flash rows, with and without the target."""
  out = tmp_path / "out.json"
  cmd = [sys.executable, "-m", "benchmarks", "seer_prefill", "--interpret", "--seqs", "128",
         "--heads", "2,1", "--head-dim", "64", "--block-size", "64", "--densities", "1.0",
         "--modes", "fwd", "--no-xla", "--no-gate", "--splash", "",
         "--sparse-impls", "pallas_mosaic_gpu", "--flash-impls", "pallas_mosaic_gpu",
         "--mosaic-configs", "overlap_qk=1;overlap_qk=1,pingpong=1",
         "--calls", "1", "--copies", "1", "--windows", "1", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["results"]
  sparse = {r["impl"]: r for r in rows if r["impl"].startswith("pallas_mosaic_gpu_sparse")}
  assert set(sparse) == {"pallas_mosaic_gpu_sparse", "pallas_mosaic_gpu_sparse[overlap_qk=1]",
                         "pallas_mosaic_gpu_sparse[overlap_qk=1,pingpong=1]"}
  for r in sparse.values():
    assert "skipped" not in r, r
    assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["density_of_causal"] == 1.0
  flash = {r["impl"]: r for r in rows if "_flash" in r["impl"]}
  assert set(flash) == {"pallas_mosaic_gpu_flash", "pallas_mosaic_gpu_flash+target"}
  assert all("skipped" not in r and r["ms"] > 0 for r in flash.values()), flash


def test_parse_mosaic_configs():
  got = parse_mosaic_configs("overlap_qk=1; pingpong=true ;overlap_qk=1,pingpong=1,pipeline_depth=3")
  assert [label for label, _ in got] == ["overlap_qk=1", "pingpong=1",
                                         "overlap_qk=1,pingpong=1,pipeline_depth=3"]
  cfg = got[2][1]
  assert cfg.overlap_qk and cfg.pingpong and cfg.pipeline_depth == 3
  assert not got[0][1].pingpong and got[1][1].pingpong and not got[1][1].overlap_qk
  assert parse_mosaic_configs("") == []
  for bad in ("nope=1", "overlap_qk", "pipeline_depth=x", "pipeline_depth=0", "overlap_qk=2",
              "backward=1"):
    with pytest.raises(SystemExit, match="--mosaic-configs"):
      parse_mosaic_configs(bad)


@pytest.mark.parametrize("pattern,density", [("random", 0.2), ("random", 0.5), ("static", 0.1),
                                             ("static", 0.5), ("all", 1.0)])
def test_block_sets_are_valid_and_keep_the_promised_counts(pattern, density):
  B, N, K, nq, bs = 2, 4, 2, 12, 16
  idx = block_indices(jax.random.key(0), B, N, nq, density, pattern)
  q = jax.ShapeDtypeStruct((B, nq * bs, N, 16), np.float32)
  k = jax.ShapeDtypeStruct((B, nq * bs, K, 16), np.float32)
  check_block_indices(q, k, idx, bs)               # ascending, distinct, -1 padded
  idx = np.asarray(idx)
  i = np.arange(nq)[:, None]
  live = idx >= 0
  assert np.all(idx[live] <= np.broadcast_to(i, idx.shape)[live])     # causal blocks only
  assert np.all(np.any(idx == i, axis=-1))                            # the diagonal kept
  counts = live.sum(-1)
  want = block_counts(nq, density)
  assert np.all(counts <= want) and (pattern == "static" or np.all(counts == want))
  if pattern == "static":
    assert np.all(idx[:, :, want >= 2, 0] == 0)                       # the sink block
  full = nq * bs * (nq * bs + 1) // 2 * B * N
  assert visible_pairs(idx, bs, nq * bs) <= full
  if pattern == "all":
    assert visible_pairs(idx, bs, nq * bs) == full


@pytest.mark.parametrize("pattern,density", [("random", 0.2), ("random", 0.5), ("static", 0.3),
                                             ("all", 1.0)])
def test_splash_mask_info_attends_exactly_the_block_sets(pattern, density):
  """The Hopper splash peer's MaskInfo, walked as its forward kernel walks it, makes visible
  exactly the causal pairs of the first head's block sets, nothing more."""
  B, N, nq, bs = 2, 3, 10, 4
  idx = np.asarray(block_indices(jax.random.key(3), B, N, nq, density, pattern))
  info = splash_mask_info(idx[:, 0], bs)
  assert info["data_next"].shape == (B, 1, nq // 2, nq)
  assert info["block_mask"].shape == info["mask_next"].shape == (B, 1, nq, nq)
  assert info["partial_mask_blocks"].shape == (B, 1, 1, bs, bs)
  S = nq * bs
  want = np.zeros((B, S, S), bool)
  for b in range(B):
    for i in range(nq):
      for j in idx[b, 0, i]:
        if j >= 0:
          want[b, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True
  want &= np.tril(np.ones((S, S), bool))
  got = splash_visible(info, bs)
  np.testing.assert_array_equal(got, want)
  assert visible_pairs(np.broadcast_to(idx[:, :1], idx.shape), bs, S) == int(want.sum()) * N
  # the shared sequence of a query-block pair is ascending, its live prefix has no -1
  dn, nnz = info["data_next"][:, 0], info["num_nonzero_blocks"][:, 0]
  for b in range(B):
    for p in range(nq // 2):
      live = dn[b, p, :nnz[b, p]]
      assert np.all(live >= 0) and np.all(np.diff(live) > 0) and np.all(dn[b, p, nnz[b, p]:] == -1)


def test_splash_mask_info_refuses_an_odd_block_count():
  with pytest.raises(ValueError, match="groups of 2"):
    splash_mask_info(np.zeros((1, 3, 1), np.int32), 4)


@pytest.mark.slow
def test_profile_gate_smoke(tmp_path):
  """The gate profile on the CPU at a tiny size: every row profiled, the formulations checked
  equal before timing, the metadata of a result file."""
  out = tmp_path / "gate.json"
  cmd = [sys.executable, "-m", "benchmarks", "profile_gate", "--seq", "256", "--heads", "4",
         "--kv-heads", "2", "--head-dim", "16", "--block-size", "16", "--d-gate", "8",
         "--density", "0.25", "--impl", "xla", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  assert [r["row"] for r in data["results"]] == [
      "gate", "gated", "select", "topk", "topk_int32_keys", "pool_q", "pool_q_f32_copy",
      "pool_q_dot", "pool_k", "pool_k_f32_copy"]
  assert all(r["kernels"] and r["busy_us"] > 0 for r in data["results"])
  assert data["meta"]["shape"]["top_k_width"] == 4 and data["meta"]["commit"]
  assert 0.9 <= data["meta"]["topk_int32_keys_agreement"] <= 1.0
  bad = subprocess.run(cmd[:-2] + ["--seq", "250"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2 and "multiple of --block-size" in bad.stderr
