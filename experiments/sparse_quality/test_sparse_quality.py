"""experiments/sparse_quality: the passkey corpus, the report's arithmetic, the whole experiment at
smoke sizes on CPU, the low-bit KV cache evaluations (--kv-only) at smaller sizes still, and the
committed results' gain plot. Marked `experiment` (deselected by default; the default suite
collects tests/ only):

    python -m pytest -m experiment experiments/sparse_quality
"""

import json
import math
import pathlib
import re
import sys

import numpy as np
import pytest

EXP = pathlib.Path(__file__).resolve().parent
if str(EXP) not in sys.path:
  sys.path.insert(0, str(EXP))

import corpus  # noqa: E402  (experiments/sparse_quality/corpus.py)

pytestmark = pytest.mark.experiment

NEEDLE = re.compile(r" The pass key is (\d{5})\. Remember it\. \1 is the pass key\. ")
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
        "age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


def _docs(path):
  return [json.loads(l) for l in pathlib.Path(path).read_text().splitlines()]


def test_passkey_corpus_format_and_determinism(tmp_path):
  kw = dict(seq_len=256, n_docs=60, passkey_fraction=0.25, synthetic_filler_fraction=0.5,
            copy_fraction=0.1)
  a = corpus.write_corpus(tmp_path / "a", TEXT, seed=3, **kw)
  b = corpus.write_corpus(tmp_path / "b", TEXT, seed=3, **kw)
  c = corpus.write_corpus(tmp_path / "c", TEXT, seed=4, **kw)
  assert a["sha256"] == b["sha256"] != c["sha256"]
  assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
  docs = _docs(tmp_path / "a" / "train.jsonl")
  assert len(docs) == 60 and a["passkey_docs"] == 15
  assert all(len(d["text"]) == 255 for d in docs)      # BOS + doc + EOS = one row of seq_len + 1
  pk = [d["text"] for d in docs if d["kind"] == "passkey"]
  assert len(pk) == 15
  synthetic = 0
  for text in pk:
    m = NEEDLE.search(text)
    assert m, text
    assert text.endswith(f" What is the pass key? The pass key is {m.group(1)}.")
    synthetic += "The grass is green." in text
  assert synthetic == a["synthetic_filler_docs"] and 0 < synthetic < 15
  # text documents are windows of the source text; copy documents hold copies of their own text
  assert all(d["text"] in TEXT + TEXT for d in docs if d["kind"] == "text")
  cp = [d["text"] for d in docs if d["kind"] == "copy"]
  assert len(cp) == a["copy_docs"] == 6


def test_copy_document_copies_earlier_stretches():
  rng = np.random.default_rng(0)
  text = "".join(chr(97 + int(i)) for i in np.random.default_rng(1).integers(0, 26, 5000))  # no repeats
  doc = corpus.copy_document(text, 1000, rng)
  assert len(doc) == 1000
  # every 16-gram is either fresh source text or a copy of an earlier one; copies exist
  grams = [doc[i:i + 16] for i in range(len(doc) - 15)]
  repeated = sum(g in doc[:i + 15] for i, g in enumerate(grams))
  assert repeated > 200


def test_split_text_and_eval_prompts():
  docs = [f"document {i}: " + "word " * 50 for i in range(40)]
  train, held = corpus.split_text(docs, 0.1, seed=0)
  assert train.count("document") == 36 and held.count("document") == 4
  assert corpus.split_text(docs, 0.1, seed=0) == (train, held)
  prompts, lengths, keys = corpus.real_passkey_prompts(3, 200, TEXT, seed=1)
  assert prompts.shape == (3, 200) and list(lengths) == [200] * 3
  from effjax.data import ByteTokenizer
  tok = ByteTokenizer()
  for p, k in zip(prompts, keys):
    s = tok.decode(p)
    assert NEEDLE.search(s).group(1) == k
    assert s.endswith(" What is the pass key? The pass key is ")
  p, true = corpus.text_prompts(2, 100, 20, TEXT, seed=0)
  assert p.shape == (2, 100) and true.shape == (2, 20) and p[0, 0] == tok.bos_id
  assert corpus.ascii_text("caf\u00e9 \u2014 na\u00efve") == "cafe  naive"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  import run as sq_run
  out = tmp_path_factory.mktemp("sparse_quality")
  # --train-seconds: the capped path of the GPU command (a first chunk times the steps, then a
  # second train() call; the cap is generous, so all 24 steps run). --no-jax-cache: leave JAX's
  # global config alone.
  argv = ["--smoke", "--out", str(out), "--results-dir", str(out / "committed"),
          "--train-seconds", "600", "--no-jax-cache"]
  assert sq_run.main(argv) == 0
  return sq_run, argv, out


def test_smoke_run_writes_sane_results(smoke_run):
  _, _, out = smoke_run
  for f in ("results.json", "REPORT.md", "retrieval.png", "drift.png", "rectify_phase.png",
            "loss.png", "gate.npz"):
    assert (out / f).is_file(), f
  for f in ("results.json", "REPORT.md", "retrieval.png", "drift.png", "train_metrics.jsonl"):
    assert (out / "committed" / f).is_file(), f
  doc = json.loads((out / "results.json").read_text())
  assert doc["train"]["steps_done"] == 24 and math.isfinite(doc["train"]["final_loss"])
  assert math.isfinite(doc["gate"]["first_kl"]) and math.isfinite(doc["gate"]["last_kl"])
  ev = doc["eval"]
  for key in ("retrieval_real", "retrieval_synthetic"):
    acc = ev[key]["accuracy"]
    assert set(acc) == {"dense", "quest@48", "gate@48", "gate-f32@48"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
  d = ev["drift"]
  assert set(d["rows"]) == {"dense", "quest sparse", "quest sparse+rectify(f=16)", "gate sparse",
                            "gate sparse+rectify(f=16)", "gate-f32 sparse",
                            "gate-f32 sparse+rectify(f=16)"}
  for r in d["rows"].values():
    assert math.isfinite(r["nll"]) and r["nll"] > 0
    assert 0.0 <= r["agreement_with_dense"] <= 1.0
  assert d["rows"]["dense"]["agreement_with_dense"] == 1.0
  assert set(d["teacher_forced"]) == set(d["rows"])
  for r in d["teacher_forced"].values():
    assert math.isfinite(r["nll"]) and r["nll"] > 0 and 0.0 <= r["agreement_with_dense"] <= 1.0
    assert len(r["excess_nll_by_quarter"]) == 4
  assert d["teacher_forced"]["dense"]["excess_nll"] == 0.0
  assert math.isfinite(d["true_continuation_nll"])
  for where in ("text", "passkey"):
    for s in ("quest", "gate", "gate-f32", "gate-f8"):
      assert all(0.0 <= v <= 1.0 + 1e-5 for v in ev["recall"][where][s].values())
  mag = ev["recall"]["text"]["kc_abs"]           # |kc| against float8's range, held-out text
  q = [mag["quantiles"][k] for k in ("0.01", "0.1", "0.5", "0.9", "0.99", "1.0")]
  assert q == sorted(q) and q[-1] > 0, mag
  for k in ("share_below_f8_normal", "share_flushed_to_zero", "share_clipped"):
    assert 0.0 <= mag[k] <= 1.0, mag
  assert mag["share_flushed_to_zero"] <= mag["share_below_f8_normal"]
  report = (out / "REPORT.md").read_text()
  assert "Drift at" in report and "Passkey retrieval" in report and "Teacher-forced" in report
  assert "Rectification's gain, paired" in report and "gate f=16" in report
  assert "gate f=16 off" in report and "rectify_phase.png" in report
  assert "against float8_e4m3fn's range" in report


def test_rectify_gain_split_and_phase_on_a_made_up_run():
  """report's gain split and phase curves on hand-made per-sequence / per-position numbers."""
  import report
  seq = lambda *v: list(v)
  tf = {"dense": {"excess_nll_per_sequence": seq(0, 0, 0), "excess_nll_per_position": [0.0] * 8},
        "q sparse": {"excess_nll_per_sequence": seq(0.3, 0.5, 0.4),
                     "excess_nll_per_sequence_off": {"4": seq(0.2, 0.6, 0.4)},
                     "excess_nll_per_position": [0, 1, 2, 3, 4, 5, 6, 7]},
        "q sparse+rectify(f=4)": {"excess_nll_per_sequence": seq(0.2, 0.3, 0.4),
                                  "excess_nll_per_sequence_off": {"4": seq(0.2, 0.4, 0.3)},
                                  "excess_nll_per_position": [0, 1, 2, 3, 0, 1, 2, 3]},
        "q sparse+rectify-cache(f=2)": {"excess_nll_per_sequence": seq(0.1, 0.5, 0.3),
                                        "excess_nll_per_position": [0, 1, 0, 1, 0, 1, 0, 1]}}
  g = report._rectify_gains(tf, split=True)
  assert g["q f=4"][0] == pytest.approx(0.1) and g["q f=4 off"][0] == pytest.approx(0.1)
  assert g["q f=4"][1] == pytest.approx(np.std([0.1, 0.2, 0.0], ddof=1) / np.sqrt(3))
  assert g["q f=4 off"][1] == pytest.approx(np.std([0.0, 0.2, 0.1], ddof=1) / np.sqrt(3))
  assert g["q cache-only f=2"][0] == pytest.approx(0.1)
  assert set(report._rectify_gains(tf)) == {"q f=4", "q cache-only f=2"}
  ph = report.rectify_phase(tf)["q"]
  assert ph["q sparse+rectify(f=4)"] == (4, [0.0, 1.0, 2.0, 3.0])       # s >= 1 by s % 4
  assert ph["q sparse"] == (4, [4.0, 3.0, 4.0, 5.0])                     # s = 4 / 1,5 / 2,6 / 3,7
  assert ph["q sparse+rectify-cache(f=2)"] == (2, [0.0, 1.0])


def test_gate_variant_flags_name_the_extra_rows():
  import run as sq_run
  assert sq_run.parse_args(["--smoke"]).gate_variants == ["float32"]
  assert sq_run.parse_args(["--smoke", "--no-gate-f32"]).gate_variants == []
  a = sq_run.parse_args(["--smoke", "--gate-variants", "float32", "float8_e4m3fn"])
  assert [sq_run.GATE_VARIANTS[d] for d in a.gate_variants] == ["gate-f32", "gate-f8"]
  with pytest.raises(SystemExit):
    sq_run.parse_args(["--smoke", "--gate-variants", "float16"])
  ok = ["--smoke", "--sparsity", "0.8", "--local-tokens", "16"]   # drift budget 48 = 3 blocks
  assert sq_run.parse_args(ok).local_tokens == [16]
  # the plain rule; more forced blocks than a budget holds (the drift's 2 blocks, retrieval's 3)
  for bad in (["--local-tokens", "1"], ["--local-tokens", "16"], ok[1:-1] + ["18"]):
    with pytest.raises(SystemExit):
      sq_run.parse_args(["--smoke"] + bad)


def test_smoke_drift_matches_evaluation_drift_eval(smoke_run):
  """The experiment's batched drift numbers equal effjax.evaluation.drift_eval's definition."""
  import corpus as c
  from effjax import evaluation
  sq_run, argv, out = smoke_run
  args = sq_run.parse_args(argv)
  cfg = sq_run.make_config(args, sq_run.Run(out))
  params, _ = evaluation.load_params(cfg, cfg.train.out_dir)
  d = json.loads((out / "results.json").read_text())["eval"]["drift"]
  heldout = (out / "data" / "heldout.txt").read_text()
  prompts, _ = c.text_prompts(args.drift_n, d["prompt_len"], d["new_tokens"], heldout, args.seed)
  from effjax.sparse import resa
  scfg = resa.SparseConfig(selector="quest", block_size=args.block_size,
                           budget_tokens=d["budget_tokens"], rectify_every=16, d_gate=args.d_gate)
  ref = evaluation.drift_eval(cfg, params, prompts, np.full((len(prompts),), prompts.shape[1], np.int32),
                              new_tokens=d["new_tokens"], scfg=scfg)
  for mine, theirs in (("dense", "dense"), ("quest sparse", "sparse"),
                       ("quest sparse+rectify(f=16)", "sparse+rectify(f=16)")):
    np.testing.assert_allclose(d["rows"][mine]["nll"], ref[theirs]["nll"], rtol=1e-4)
    assert d["rows"][mine]["agreement_with_dense"] == ref[theirs]["agreement_with_dense"]


def test_smoke_rerun_skips_finished_phases(smoke_run, capsys):
  sq_run, argv, out = smoke_run
  before = json.loads((out / "results.json").read_text())
  assert sq_run.main(argv) == 0
  log = capsys.readouterr().out
  for phase in ("data: reusing", "train: done earlier", "gate: done earlier", "eval: done earlier"):
    assert phase in log
  after = json.loads((out / "results.json").read_text())
  assert after["eval"] == before["eval"] and after["train"] == before["train"]


def test_plot_rectify_gains_on_the_committed_runs(tmp_path, capsys):
  """The cross-model gain plot reads the committed results: per-prompt gains as in REPORT.md."""
  import plot_rectify_gains as prg
  out = tmp_path / "gains.png"
  assert prg.main(["--out", str(out)]) == 0
  assert out.is_file() and out.stat().st_size > 10_000
  runs = dict(prg.load_gains(prg.DEFAULT_DIRS))
  g = runs["results_h200_2048tok\n2048 tokens"]
  assert g["quest f=32"][0] == pytest.approx(-0.0063, abs=5e-5)
  assert g["quest f=32"][1] == pytest.approx(0.0013, abs=5e-5)
  assert g["gate f=16"][0] == pytest.approx(0.0013, abs=5e-5)
  assert "gate-f8 f=16" in runs["results_h200_1024tok\n1024 tokens"]
  assert "quest f=16 -0.0045 +- 0.0015" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="not found"):
    prg.main([str(tmp_path / "missing"), "--out", str(out)])


# ----------------------------------------------------------------------------------------------
# the low-bit KV cache evaluations (--kv-caches, --kv-only)

# Tiny and shaped so the compiled programs are shared: the drift prompts (seq 256 - 5 new tokens)
# have the passkey prompts' length and the retrieval budget is the drift's (2 blocks of 16), so the
# retrieval decodings reuse the drift's programs. K groups and windows of 32 tokens: the prompts
# are packed and the residual window flushes.
KV_ARGV = ["model.n_layers=1", "--smoke", "--no-jax-cache", "--steps", "4", "--kv-only",
           "--kv-caches", "int4,int2", "--kv-group", "32", "--kv-window", "32", "--drift-n", "2",
           "--retrieval-n", "2", "--new-tokens", "5", "--context", "251", "--kv-budgets", "32"]
KV_ROWS = {"bf16", "int4 K per channel", "int4 K per token", "int2 K per channel", "int2 K per token"}


def _main_fast(sq_run, argv) -> int:
  """run.main with XLA's optimisations off (compiling dominates at these sizes), restored after."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    return sq_run.main(argv)
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def kv_run(tmp_path_factory):
  import run as sq_run
  out = tmp_path_factory.mktemp("sparse_quality_kv")
  argv = KV_ARGV + ["--out", str(out), "--results-dir", str(out / "committed")]
  assert _main_fast(sq_run, argv) == 0
  return sq_run, argv, out


def test_kv_only_run_measures_the_low_bit_caches(kv_run):
  _, _, out = kv_run
  log = (out / "run.log").read_text()
  assert "phases data train kv report" in log             # no gate (Quest only), no eval phase
  assert not (out / "gate.npz").exists() and not (out / "eval.json").exists()
  doc = json.loads((out / "results.json").read_text())
  assert doc["eval"] is None and doc["train"]["steps_done"] == 4
  kv = doc["kv"]
  assert kv["model_step"] == 4
  assert kv["specs"]["int2 K per token"] == {"kind": "int2", "group": 32, "window": 32, "k_mode": "token"}
  # (a) perplexity through each cache, teacher-forced
  q = kv["quality"]
  assert (q["prompts"], q["prompt_len"], q["new_tokens"]) == (2, 251, 5)
  rows = q["rows"]
  assert set(rows) == KV_ROWS
  assert rows["bf16"]["ppl_increase"] == 0.0 and rows["bf16"]["excess_nll_se"] == 0.0
  assert rows["bf16"]["agreement_with_reference"] == 1.0
  for name, r in rows.items():
    for k in ("nll", "ppl", "ppl_increase", "excess_nll_se", "ppl_increase_se"):
      assert math.isfinite(r[k]), (name, k, r)
    assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
    assert r["ppl_increase"] == pytest.approx(r["ppl"] / rows["bf16"]["ppl"] - 1, abs=1e-9)
    assert 0.0 <= r["agreement_with_reference"] <= 1.0
  for name in KV_ROWS - {"bf16"}:    # the caches really quantise
    assert rows[name]["nll"] != rows["bf16"]["nll"], name
  ex = {n: abs(rows[n]["nll"] - rows["bf16"]["nll"]) for n in rows}
  assert ex["int4 K per channel"] < ex["int2 K per channel"] and ex["int4 K per token"] < ex["int2 K per token"]
  # (b) drift over bf16 and each low-bit cache (K per channel), dense and Quest
  d = kv["drift"]
  assert list(d["by_cache"]) == ["bf16", "int4", "int2"] and d["budget_tokens"] == 32
  for cache, r in d["by_cache"].items():
    assert set(r["rows"]) == set(r["teacher_forced"]) == {"dense", "quest sparse"}
    for row in r["rows"].values():
      assert math.isfinite(row["nll"]) and 0.0 <= row["agreement_with_reference"] <= 1.0
      assert 0 <= row["first_divergence_from_reference"] <= 5
    assert r["rows"]["dense"]["agreement_with_dense"] == 1.0
    assert r["teacher_forced"]["dense"]["excess_nll"] == 0.0
    assert math.isfinite(r["teacher_forced"]["quest sparse"]["excess_nll"])
    # its dense teacher-forced run is the perplexity table's row of the same cache
    q_row = rows["bf16" if cache == "bf16" else f"{cache} K per channel"]
    assert r["teacher_forced"]["dense"]["nll"] == pytest.approx(q_row["nll"], abs=1e-6)
  assert d["by_cache"]["bf16"]["rows"]["dense"]["agreement_with_reference"] == 1.0
  # (b) passkey retrieval over each cache, both haystack kinds
  for key in ("retrieval_real", "retrieval_synthetic"):
    r = kv[key]
    assert list(r["by_cache"]) == ["bf16", "int4", "int2"] and r["budgets"] == [32]
    for x in r["by_cache"].values():
      assert set(x["accuracy"]) == set(x["digit_accuracy"]) == {"dense", "quest@32"}
      assert all(0.0 <= v <= 1.0 for v in list(x["accuracy"].values()) + list(x["digit_accuracy"].values()))
  # the report's tables, also in the --results-dir copy
  report = (out / "committed" / "REPORT.md").read_text()
  assert report == (out / "REPORT.md").read_text()
  for s in ("## Low-bit KV caches", "### Perplexity through the cache",
            "### Drift over the low-bit caches", "### Passkey retrieval over the low-bit caches, "
            "real-text haystacks", "repetitive filler", "| int4 | per channel |",
            "| int2 | per token |", "| int2 | quest sparse |", "| kv |"):
    assert s in report, s
  assert re.search(r"\| bf16 \| - \| [0-9.]+ \| [0-9.]+ \| \+0\.00% ± 0\.00% \|", report)
  assert "Drift at" not in report and "Gate:** not distilled" in report
  if kv["retrieval_real"]["by_cache"]["bf16"]["accuracy"]["dense"] == 0.0:   # 4 steps: no retrieval
    assert "has not learnt retrieval" in report


def test_kv_rerun_reuses_the_model_and_resumes_the_parts(kv_run, capsys):
  """A second call trains nothing; a call whose kv results were cut short redoes only the missing
  parts; other kv settings redo the kv phase on the same model."""
  sq_run, argv, out = kv_run
  before = json.loads((out / "results.json").read_text())
  capsys.readouterr()
  assert _main_fast(sq_run, argv) == 0
  log = capsys.readouterr().out
  assert "data: reusing" in log and "train: done earlier" in log and "kv: done earlier" in log
  assert json.loads((out / "results.json").read_text())["kv"] == before["kv"]
  # cut short after the drift: the kv phase continues with the retrieval
  part = json.loads((out / "kv.json").read_text())
  del part["retrieval_real"], part["retrieval_synthetic"]
  (out / "kv_partial.json").write_text(json.dumps(part))
  (out / "kv.json").unlink()
  assert _main_fast(sq_run, argv) == 0
  log = capsys.readouterr().out
  assert "retrieval_real done" in log and "retrieval_synthetic done" in log
  assert "quality done" not in log and "drift done" not in log and "train: done earlier" in log
  after = json.loads((out / "results.json").read_text())["kv"]
  assert after["drift"] == before["kv"]["drift"] and after["quality"] == before["kv"]["quality"]
  # one low-bit cache: a new kv phase over the same trained model
  argv_int4 = [("int4" if a == "int4,int2" else a) for a in argv]
  assert _main_fast(sq_run, argv_int4) == 0
  log = capsys.readouterr().out
  assert "train: done earlier" in log and "quality done" in log
  kv = json.loads((out / "results.json").read_text())["kv"]
  assert set(kv["quality"]["rows"]) == {"bf16", "int4 K per channel", "int4 K per token"}
  assert list(kv["drift"]["by_cache"]) == ["bf16", "int4"]


def test_kv_flags_validate_before_compute():
  import run as sq_run
  a = sq_run.parse_args(["--smoke"])
  assert a.kv_caches == [] and a.kv_budgets == [48] and a.kv_selectors == ["quest"]
  a = sq_run.parse_args(["--smoke", "--kv-caches", "int4, int2", "--kv-selectors", "quest", "gate"])
  assert a.kv_caches == ["int4", "int2"] and sq_run.kv_needs_gate(a)
  assert not sq_run.kv_needs_gate(sq_run.parse_args(["--smoke", "--kv-caches", "int2"]))
  a = sq_run.parse_args(["--smoke", "--kv-caches", "int4", "--local-tokens", "16", "--sparsity", "0.8",
                         "--kv-selectors", "quest-l16", "--kv-budgets", "48"])
  assert a.kv_selectors == ["quest-l16"] and a.kv_budgets == [48]
  for bad in (["--kv-caches", "int3"], ["--kv-only"], ["--kv-caches", "int4,int4"],
              ["--kv-caches", "int4", "--kv-group", "24"],                      # not whole blocks of 16
              ["--kv-caches", "int4", "--kv-group", "32", "--kv-window", "48"],  # window not whole groups
              ["--kv-caches", "int4", "--kv-selectors", "quest-l16"],            # no such row
              ["--kv-caches", "int4", "--kv-budgets", "40"],
              ["--kv-caches", "int4", "--local-tokens", "16", "--sparsity", "0.8",   # 3 forced blocks
               "--kv-selectors", "quest-l16", "--kv-budgets", "32"]):
    with pytest.raises(SystemExit):
      sq_run.parse_args(["--smoke"] + bad)
