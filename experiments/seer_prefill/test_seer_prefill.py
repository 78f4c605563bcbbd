"""The SeerAttention prefill experiment end to end at toy scale: a tiny trained run, the gate
distilled, perplexity by density on the valid split and an --eval-source file, resume, errors;
the YaRN long-context fine-tuning (yarn.py) likewise."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.experiment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(a 4-step tiny training run, a held-out .txt of documents shorter than a window: the
  default --eval-packing pack concatenates them), shared by the tests here."""
  tmp = tmp_path_factory.mktemp("seer")
  run = tmp / "run"
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml",
                      f"train.out_dir={run}", "train.steps=4", "train.batch_size=4",
                      "train.checkpoint_every=4", "train.eval_every=4", "optim.warmup_steps=1",
                      "train.progress=false", "data.seq_len=64", "model.max_seq_len=64",
                      "model.n_layers=2",
                      "eval.max_batches=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  extra = tmp / "extra.txt"
  extra.write_text("\n".join(f"short held-out document {i}." for i in range(60)))
  return run, extra


def test_seer_prefill_tiny(tiny, tmp_path):
  run, extra = tiny
  out = tmp_path / "out"
  cmd = [sys.executable, "experiments/seer_prefill/run.py", "--run", str(run), "--out", str(out),
         "--gate-steps", "3", "--gate-batch", "2", "--gate-seqs", "8", "--block-size", "8",
         "--d-gate", "8", "--n-eval", "2", "--densities", "1.0,0.25", "--eval-source", str(extra)]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((out / "results.json").read_text())["results"]
  assert set(res) == {"valid", "extra.txt"}
  for rows in res.values():
    assert rows["dense"]["ppl_increase"] == 0.0
    assert abs(rows["oracle@1.0"]["ppl_increase"]) < 1e-3
    assert rows["static@0.25"]["density"] < 0.6 and rows["gate@0.25"]["density"] < 0.6
    assert rows["gate+local@0.25"]["density"] < 0.6         # the default selectors include it
  report = (out / "REPORT.md").read_text()
  assert "**valid**" in report and "**extra.txt**" in report and "Command:" in report
  assert "| gate+local |" in report
  assert (out / "density.png").stat().st_size > 0 and "density.png" in report
  # eval.py reports the same rows for a run: a prefill gate distilled there, then reused
  r = subprocess.run([sys.executable, "eval.py", "--run", str(run), "--train-prefill-gate", "2",
                      "--prefill-densities", "1.0,0.25", "--prefill-block-size", "8",
                      "--prefill-windows", "2", "eval.num_samples=0", "eval.max_batches=1"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  ev = json.loads((run / "eval.json").read_text())["prefill_sparse"]["results"]
  assert abs(ev["oracle@1.0"]["ppl_increase"]) < 1e-3 and ev["gate+local@0.25"]["density"] < 0.6
  r = subprocess.run([sys.executable, "eval.py", "--run", str(run), "--prefill-gate",
                      str(run / "prefill_gate.npz"), "--prefill-densities", "0.5",
                      "--prefill-selectors", "gate", "--prefill-block-size", "8",
                      "--prefill-windows", "2", "eval.num_samples=0", "eval.max_batches=1"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "gate@0.5" in r.stdout, r.stderr[-2000:]
  r = subprocess.run([sys.executable, "eval.py", "--run", str(run), "--prefill-densities", "0.5",
                      "--prefill-selectors", "static", "--prefill-topk-impl", "cuda"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "--prefill-topk-impl" in r.stderr
  # a rerun reuses the gate and every finished set
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "gate: reusing" in r.stdout and "done earlier" in r.stdout
  # --repeat-eval adds each set as repeated text (scored on the second copy), keeping the rest
  r = subprocess.run(cmd + ["--repeat-eval"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads((out / "results.json").read_text())["results"]
  assert set(rep) == {"valid", "extra.txt", "valid repeated", "extra.txt repeated"}
  assert rep["valid"] == res["valid"]
  # windows of 64 tokens: the second copy's 31 predictions from position 32 on, per window
  assert rep["valid repeated"]["dense"]["tokens"] == 2 * 31
  assert "**valid repeated**" in (out / "REPORT.md").read_text()
  # clear errors before any compute
  r = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.txt")], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and "no such file" in r.stderr
  r = subprocess.run(cmd + ["--densities", "0,2"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2 and "--densities" in r.stderr


def test_yarn_fine_tuning_tiny(tiny, tmp_path):
  """yarn.py end to end on a tiny run: both arms, the baselines and the report; a rerun resumes."""
  run, extra = tiny
  out = tmp_path / "yarn"
  cmd = [sys.executable, "experiments/seer_prefill/yarn.py", "--run", str(run), "--out", str(out),
         "--factor", "2", "--steps", "3", "--batch", "2", "--gate-steps", "2", "--block-size", "8",
         "--d-gate", "8", "--n-eval", "2", "--eval-batch", "2", "--train-windows", "8",
         "--density", "0.3", "--eval-source", str(extra)]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((out / "results.json").read_text())["phases"]
  assert set(res) == {"gate", "baselines", "dense", "sparse", "selectors"}
  # every model against the selectors at --density; the dense arm has no gate of its own
  table = res["selectors"]["table"]
  assert set(table) == {"YaRN, no fine-tuning", "YaRN + dense fine-tuning",
                        "YaRN + sparse fine-tuning"}
  sel = ["static@0.3", "recency+local@0.3", "oracle+local@0.3"]
  assert set(table["YaRN + sparse fine-tuning"]["valid"]) == {"dense", "gate+local@0.3", *sel}
  assert set(table["YaRN + dense fine-tuning"]["extra.txt"]) == {"dense", *sel}
  for set_name, rows in table["YaRN + sparse fine-tuning"].items():
    assert all(math.isfinite(r["ppl"]) and 0 < r["density"] <= 1 for r in rows.values())
    # its dense row is the arm's own dense evaluation
    assert rows["dense"]["ppl"] == pytest.approx(res["sparse"]["eval"][set_name]["dense"],
                                                 rel=1e-3)
  for arm in ("dense", "sparse"):
    assert len(res[arm]["curve"]) == 3
    ev = res[arm]["eval"]
    assert set(ev) == {"valid", "extra.txt"}
    assert all(math.isfinite(v["dense"]) and v["dense"] > 1 for v in ev.values())
  sp = res["sparse"]["eval"]["valid"]
  assert 0.2 < sp["sparse_density"] < 0.8 and math.isfinite(sp["sparse"])
  # the sparse arm trains the gate: its KL is recorded and positive
  assert all(c[2] > 0 for c in res["sparse"]["curve"])
  report = (out / "REPORT.md").read_text()
  assert "YaRN + sparse fine-tuning" in report and "Command:" in report
  assert "| YaRN + sparse fine-tuning | static @ 0.3 |" in report
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "dense: done earlier" in r.stdout and "gate: reusing" in r.stdout
  assert "static @ 0.3" not in r.stdout            # the selector phase was kept too
  # other selectors rerun that phase alone
  r = subprocess.run(cmd + ["--selectors", "static"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0 and "dense: done earlier" in r.stdout and "static @ 0.3" in r.stdout
  again = json.loads((out / "results.json").read_text())["phases"]["selectors"]
  assert again["names"] == ["static"]
  r = subprocess.run(cmd + ["--factor", "0.5"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2 and "--factor" in r.stderr
