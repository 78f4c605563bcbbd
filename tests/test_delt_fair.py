"""experiments/delt/fair.py: --eval-source checks, the report's merge and statistics, skipping
finished runs, resuming an interrupted one, and a whole tiny pass."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("delt_fair", ROOT / "experiments/delt/fair.py")
fair = sys.modules.setdefault("delt_fair", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fair)


@pytest.fixture
def corpora(tmp_path):
  """A mixed-quality pool (English-like and junk documents) and a reference text, as the data
  overrides that point --tiny at them."""
  rng = np.random.default_rng(0)
  words = ["the", "river", "city", "was", "built", "in", "a", "king", "war", "of", "and", "north"]
  docs = []
  for i in range(24):
    if i % 3:
      docs.append(" ".join(rng.choice(words, 40)) + ".")
    else:
      docs.append("".join(rng.choice(list("qzx#@!0123 "), 220)))
  pool = tmp_path / "pool.jsonl"
  pool.write_text("".join(json.dumps({"text": d, "source": "t"}) + "\n" for d in docs))
  ref = tmp_path / "ref.txt"
  ref.write_text("\n".join(" ".join(rng.choice(words, 25)) for _ in range(24)) + "\n")
  return [f"data.source={pool}", f"delt.reference_source={ref}", "data.max_documents=null",
          "data.valid_fraction=0.1"]


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


# ---------------------------------------------------------------------------------------------
# --eval-source


def test_eval_sources_parse(tmp_path):
  a = tmp_path / "a.txt"
  a.write_text("first document\n\nsecond document\n")
  b = tmp_path / "sub" / "a.jsonl"
  b.parent.mkdir()
  b.write_text('{"body": "one"}\n\n{"body": "two", "x": 1}\n')
  got = fair.parse_eval_sources([str(a), str(b)], text_field="body")
  assert [(n, d) for n, _, d in got] == [("a", ["first document", "second document"]),
                                        ("a_2", ["one", "two"])]
  assert fair.parse_eval_sources([]) == []


BAD = {
    "missing": (None, "no such file"),
    "empty.txt": ("\n  \n\n", "holds no text"),
    "bad.jsonl": ('{"text": "ok"}\n{"text": oops}\n', "line 2: invalid JSON"),
    "nofield.jsonl": ('{"content": "x"}\n', "line 1: no field 'text' (fields: content); set --eval-text-field"),
    "notstr.jsonl": ('{"text": 3}\n', "line 1: field 'text' is int"),
    "list.jsonl": ('["text"]\n', "line 1: expected a JSON object"),
    "table.csv": ("a,b\n", "expected a .txt"),
    "empty.jsonl": ("", "holds no text"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_eval_source_errors_are_one_line_before_any_work(tmp_path, corpora, capsys, name):
  text, why = BAD[name]
  path = tmp_path / ("missing.txt" if text is None else name)
  if text is not None:
    path.write_text(text)
  with pytest.raises(fair.FairError, match="^--eval-source "):
    fair.parse_eval_sources([str(path)])
  out = tmp_path / "out"
  rc = fair.main(["run", "--tiny", "--out", str(out), "--eval-source", str(path), *corpora])
  line = _one_error_line(capsys)
  assert rc == 2 and line.startswith(f"error: --eval-source {path}: ") and why in line, line
  assert line.count(str(path)) == 1                              # named once
  assert not out.exists()                                        # nothing done


def test_eval_source_too_short_and_bad_arguments(tmp_path, corpora, capsys):
  short = tmp_path / "short.txt"
  short.write_text("tiny\n")
  out = tmp_path / "out"
  assert fair.main(["run", "--tiny", "--out", str(out), "--eval-source", str(short),
                    *corpora]) == 2
  assert "too short for one example" in _one_error_line(capsys)
  assert not (out / "results").exists()
  assert fair.main(["run", "--tiny", "--out", str(out), "--conditions", "bogus", *corpora]) == 2
  assert "unknown condition(s) bogus" in _one_error_line(capsys)
  assert fair.main(["run", "--tiny", "--out", str(out), "model.bogus=1", *corpora]) == 2
  assert "model.bogus" in _one_error_line(capsys)
  assert fair.main(["nonsense"]) == 2


# ---------------------------------------------------------------------------------------------
# report: merge and statistics (fabricated result files: no training)


def _result(fp, budget, cond, seed, wiki, pool, **kw):
  r = {"fingerprint": fp, "condition": cond, "label": cond, "budget": budget, "seed": seed,
       "epochs": budget, "examples_per_epoch": 100, "pool_examples": 100, "steps": 7 * budget,
       "batch_size": 16, "seq_len": 32, "model_params": 1000, "proxy_params": 500,
       "step_seconds": 0.01, "eval": {"wikitext_heldout": {"loss": wiki, "bits_per_byte": 1.0,
                                                           "examples": 8},
                                      "pool_heldout": {"loss": pool, "bits_per_byte": 1.0,
                                                       "examples": 8}},
       "curve": [[1, 5.0], [7, 4.0]], "valid_curve": [[7, 4.2]],
       "delt": {"scoring": "lqs", "seconds": 3.0, "seconds_pretrain": 1.0, "n": 100,
                "scored_directly": 100, "example_gradient_passes": 300, "proxy_params": 500,
                "proxy_steps": 4} if cond != "conventional" else {},
       "scores_crc32": 7 if cond != "conventional" else None, "card": "cpu", "jax": "0.10",
       "commit": "abc", "command": "python experiments/delt/fair.py run --tiny"}
  r.update(kw)
  return r


def _write(d, r):
  f = fair.result_path(d, r["budget"], r["condition"], r["seed"])
  f.parent.mkdir(parents=True, exist_ok=True)
  f.write_text(json.dumps(r))
  return f


def _losses(seed):
  rng = np.random.default_rng(seed)
  conv = 3.0 + 0.1 * rng.normal()
  return conv, conv - 0.05 + 0.01 * rng.normal()


def test_report_merges_runs_and_computes_paired_t_intervals(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  conv, lqs = {}, {}
  for seed in range(5):
    conv[seed], lqs[seed] = _losses(seed)
    d = a if seed < 3 else b
    _write(d, _result("fp", 1, "conventional", seed, conv[seed], conv[seed] + 1, score_validity={
        "spearman_lqs_vs_loss": 0.1 * seed, "lqs_bin_mean_loss": [2.0 + i / 10 for i in range(10)],
        "pool_mean_loss": 2.5, "examples": 100}))
    _write(d, _result("fp", 1, "folding_lqs_L3", seed, lqs[seed], lqs[seed] + 1))
  _write(b, _result("fp", 1, "conventional", 0, conv[0], conv[0] + 1))   # the same run twice: fine
  out = tmp_path / "rep"
  assert fair.main(["report", "--results", str(a), "--results", str(b), "--report-out", str(out)]) == 0
  doc = json.loads((out / "results.json").read_text())
  row = doc["summary"]["1"]["folding_lqs_L3"]["sets"]["wikitext_heldout"]
  diffs = np.array([lqs[s] - conv[s] for s in range(5)])
  half = 2.7764451051977987 * diffs.std(ddof=1) / math.sqrt(5)        # t(0.975, 4)
  assert row["n"] == 5 and row["delta"]["n"] == 5
  assert row["mean"] == pytest.approx(np.mean(list(lqs.values())))
  assert row["std"] == pytest.approx(np.std(list(lqs.values()), ddof=1))
  assert row["delta"]["mean"] == pytest.approx(diffs.mean())
  assert row["delta"]["low"] == pytest.approx(diffs.mean() - half)
  assert row["delta"]["high"] == pytest.approx(diffs.mean() + half)
  assert "delta" not in doc["summary"]["1"]["conventional"]["sets"]["wikitext_heldout"]
  md = (out / "REPORT.md").read_text()
  assert "## Budget: 1 epoch over the pool" in md and "| folding_lqs_L3 | 1 x 100 | 7 | 5 |" in md
  assert f"--results {a} --results {b} --report-out {out}" in md          # the regenerating command
  assert "python experiments/delt/fair.py run --tiny" in md
  assert "scoring costs **" in md                                           # 3 s vs 7 x 0.01 s
  assert "| 1 | 5 | +0.200 | 2.000 | 2.100 |" in md                          # mean rho over seeds
  assert (out / "fair_curves.png").stat().st_size > 0 and (out / "fair_deltas.png").stat().st_size > 0


def test_score_validity_ranks_the_pool_by_the_trained_loss():
  """score_validity: per-example losses of the given params on the pool against the scores; scores
  equal to those losses give rho = 1 and increasing decile means, their negation rho = -1."""
  import jax

  from effjax.config import ModelConfig
  from effjax.data.packing import Examples
  from effjax.data.scoring import ScoringFns, loss_scores
  from effjax.model import init_params
  mcfg = ModelConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                     max_seq_len=16)
  params = init_params(mcfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  pool = Examples(tokens=rng.integers(0, 256, (40, 17)).astype(np.int32),
                  mask=(rng.random((40, 16)) < 0.9).astype(np.float32))
  losses = loss_scores(ScoringFns(mcfg), params, pool, chunk=512)
  v = fair.score_validity(mcfg, params, pool, losses)
  assert v["spearman_lqs_vs_loss"] == pytest.approx(1.0) and v["examples"] == 40
  assert np.all(np.diff(v["lqs_bin_mean_loss"]) > 0)
  assert v["pool_mean_loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
  assert fair.score_validity(mcfg, params, pool, -losses)["spearman_lqs_vs_loss"] == pytest.approx(-1.0)


def _two_source_pool(tmp_path):
  """24 documents of two sources of different lengths (so windows straddle documents), as the
  data overrides of --tiny."""
  rng = np.random.default_rng(1)
  rows = []
  for i in range(24):
    src = "news" if i % 3 else "web"
    n = 90 if src == "news" else 30
    rows.append({"text": "".join(rng.choice(list("abcdefgh "), n)), "source": src})
  pool = tmp_path / "pool.jsonl"
  pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return pool, ["data.source=" + str(pool), "data.max_documents=null", "data.valid_fraction=0.1"]


def test_composition_labels_the_pool_and_shares_the_score_bins(tmp_path, capsys):
  """composition: every pool example gets the source of most of its tokens (checked by rebuilding
  the token windows with the source as the token); scores that put one source on top give it the
  whole top half, and the report shows the table."""
  from effjax.data import delt, load_splits
  from effjax.data.tokenizer import ByteTokenizer
  pool_file, ovs = _two_source_pool(tmp_path)
  args = fair.parse_args(["composition", "--tiny", "--out", str(tmp_path / "o"), *ovs])
  base, all_ovs = fair.base_config(args)
  names, label, share = fair.pool_labels(base.data, "source")
  assert names == ["news", "web"]
  pool = load_splits(base.data)["train"]
  assert label.shape == (len(pool),) and np.all((share > 0.5) & (share <= 1.0))
  # an independent labelling: the same documents with each byte replaced by its source's letter
  from effjax.data.pipeline import split_documents, to_examples
  docs = [json.loads(l) for l in pool_file.read_text().splitlines()]
  marked = [np.full(len(ByteTokenizer().encode(d["text"])), ord("n" if d["source"] == "news"
                                                              else "w"), np.int32) for d in docs]
  train, _ = split_documents(marked, base.data.valid_fraction, base.data.seed)
  win = to_examples(train, base.data).tokens
  web = (win == ord("w")).sum(1) > (win == ord("n")).sum(1)
  np.testing.assert_array_equal(label, web.astype(np.int32))
  assert 0 < web.sum() < len(web)
  # fake cached scores: web examples score high (LQS), news high (PDS)
  from effjax.config import load_config
  ramp = np.linspace(0, 0.1, len(web), dtype=np.float32)              # distinct scores
  for kind, s in (("lqs", web + ramp), ("pds", ~web + ramp[::-1])):
    cfg = load_config(args.config, all_ovs + [f"delt.scoring={kind}",
                                             f"delt.cache_dir={tmp_path / 'o' / 'scores'}"])
    d = tmp_path / "o" / "scores" / delt._cache_key(cfg, pool)
    d.mkdir(parents=True)
    np.save(d / "scores.npy", s.astype(np.float32))
  assert fair.main(["composition", "--tiny", "--out", str(tmp_path / "o"), *ovs]) == 0
  doc = json.loads((tmp_path / "o" / "report" / "composition.json").read_text())
  n_web, h = int(web.sum()), int(np.floor(0.5 * len(web) + 0.5))
  assert doc["pool_share"] == pytest.approx([1 - n_web / len(web), n_web / len(web)])
  assert doc["scores"]["lqs"]["top50_share"][1] == pytest.approx(min(n_web, h) / h)
  assert doc["scores"]["pds"]["top50_share"][0] == pytest.approx(min(len(web) - n_web, h) / h)
  assert doc["scores"]["lqs"]["bin_share"][-1] == pytest.approx([0.0, 1.0])
  assert doc["lqs_vs_pds"]["spearman"] < 0
  md = fair._composition_md(doc)
  assert any(l.startswith("| web |") for l in md) and any("Spearman" in l for l in md)


def test_composition_errors_are_one_line(tmp_path, capsys):
  pool_file, ovs = _two_source_pool(tmp_path)
  out = str(tmp_path / "o")
  assert fair.main(["composition", "--tiny", "--out", out, *ovs]) == 2    # nothing scored yet
  assert "no cached LQS / PDS scores" in _one_error_line(capsys)
  txt = tmp_path / "pool.txt"
  txt.write_text("\n".join(json.loads(l)["text"] for l in pool_file.read_text().splitlines()))
  assert fair.main(["composition", "--tiny", "--out", out, *ovs, f"data.source={txt}"]) == 2
  assert "no cached" in _one_error_line(capsys)          # the scores are checked first


def test_report_refuses_conflicts(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _write(a, _result("fp", 1, "conventional", 0, 3.0, 4.0))
  _write(b, _result("fp", 1, "conventional", 0, 3.1, 4.0))
  with pytest.raises(fair.FairError, match="two different results of E1 conventional seed 0"):
    fair.load_results([a, b])
  c = tmp_path / "c"
  _write(c, _result("other", 1, "conventional", 1, 3.0, 4.0))
  with pytest.raises(fair.FairError, match="different setups"):
    fair.load_results([a, c])
  with pytest.raises(fair.FairError, match="no result files"):
    fair.load_results([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [])
  with pytest.raises(fair.FairError, match="no such directory"):
    fair.load_results([tmp_path / "nowhere"])


def test_rerun_skips_finished_runs(tmp_path, corpora, capsys):
  """Every run has a result of this setup: nothing trains, the report is rebuilt."""
  out = tmp_path / "out"
  argv = ["run", "--tiny", "--out", str(out), "--budgets", "1", "--conditions", "conventional",
          "folding_lqs_L3", *corpora]
  args = fair.parse_args(argv)
  base, _ = fair.base_config(args)
  fp = fair.fingerprint(base, args)
  for seed in (0, 1):
    for cond in ("conventional", "folding_lqs_L3"):
      _write(out / "results", _result(fp, 1, cond, seed, 3.0 + seed, 4.0))
  assert fair.main(argv) == 0
  log = capsys.readouterr().out
  assert "4 runs: 4 done, 0 to do" in log and "DONE" in log
  assert not (out / "runs").exists() and not (out / "scores").exists()
  assert (out / "report" / "REPORT.md").exists()
  _write(out / "results", _result("stale", 1, "conventional", 0, 3.0, 4.0))
  assert fair.main(argv) == 2
  assert "comes from another setup" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# training (slow on 2 CPU cores: each run compiles)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path, corpora, capsys):
  common = ["--tiny", "--budgets", "1", "--seeds", "0", "--conditions", "folding_lqs_L3", *corpora]
  a, b = tmp_path / "a", tmp_path / "b"
  assert fair.main(["run", "--out", str(a), "--stop-at-step", "5", *common]) == fair.INCOMPLETE
  assert "INCOMPLETE" in capsys.readouterr().out
  run_dir = a / "runs" / "E1" / "folding_lqs_L3" / "seed0"
  assert (run_dir / "checkpoints").is_dir() and not (a / "results").exists()
  assert fair.main(["run", "--out", str(a), *common]) == 0
  log = capsys.readouterr().out
  assert "0 done, 1 to do" in log and "resuming from checkpoint at step 5" in log
  assert not (run_dir / "checkpoints").exists()                      # deleted once recorded
  assert fair.main(["run", "--out", str(b), *common]) == 0             # uninterrupted
  ra, rb = (json.loads(fair.result_path(d / "results", 1, "folding_lqs_L3", 0).read_text())
            for d in (a, b))
  assert ra["eval"] == rb["eval"]                                      # bit-identical
  ca, cb = dict(map(tuple, ra["curve"])), dict(map(tuple, rb["curve"]))
  assert set(ca) == set(cb) | {5} and all(ca[k] == v for k, v in cb.items())  # + the stop at 5
  assert ra["steps"] == ra["epochs"] * -(-ra["examples_per_epoch"] // ra["batch_size"])


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, corpora, capsys):
  """Every default condition x budgets 1 and 3 x seeds 0 1, two --eval-source sets; then a rerun
  that finds everything done."""
  extra_txt = tmp_path / "extra.txt"
  extra_txt.write_text("\n".join("a plain sentence about the city and the river " * 3
                                 for _ in range(6)))
  extra_jsonl = tmp_path / "notes.jsonl"
  extra_jsonl.write_text("".join(json.dumps({"text": "notes on the war of the north " * 4}) + "\n"
                                 for _ in range(6)))
  out = tmp_path / "study"
  argv = ["run", "--tiny", "--out", str(out), "--eval-source", str(extra_txt),
          "--eval-source", str(extra_jsonl), *corpora]
  assert fair.main(argv) == 0
  log = capsys.readouterr().out
  conds = fair.make_conditions([3, 5])[1]
  assert len(conds) == 10
  files = sorted((out / "results").rglob("seed*.json"))
  assert len(files) == 10 * 2 * 2
  sets = {"wikitext_heldout", "pool_heldout", "extra", "notes"}
  for f in files:
    r = json.loads(f.read_text())
    assert set(r["eval"]) == sets and all(math.isfinite(v["loss"]) for v in r["eval"].values())
    n, B = r["examples_per_epoch"], r["batch_size"]
    assert r["steps"] == r["epochs"] * -(-n // B)                       # epoch-complete
    assert r["real_examples_seen"] == r["epochs"] * n
    if "top50" in r["condition"]:
      assert n == round(r["pool_examples"] / 2)
      assert r["epochs"] == r["budget"] * (2 if r["condition"].endswith("same_steps") else 1)
    else:
      assert n == r["pool_examples"] and r["epochs"] == r["budget"]
  # LQS scored once for every pool example, directly (no learned scorer)
  lqs = json.loads(fair.result_path(out / "results", 1, "folding_lqs_L3", 0).read_text())["delt"]
  assert lqs["scored_directly"] == lqs["n"] and "learned_scorer" not in lqs
  assert "seconds_scoring" in lqs and lqs["example_gradient_passes"] == 3 * lqs["n"]
  assert len(list((out / "scores").glob("lqs-*"))) == 1
  md = (out / "report" / "REPORT.md").read_text()
  for b in ("1 epoch", "3 epochs"):
    assert f"## Budget: {b} over the pool" in md
  for label in ("Folding L=5, random scores", "LQS top-50% + Folding L=3, same steps",
                "random top-50% + Folding L=3, same epochs", "sorted by LQS (ascending)"):
    assert label in md
  assert "| extra | delta | notes | delta |" in md and "scoring costs **" in md
  for seed in (0, 1):                # the trained model's per-example pool losses against LQS
    for b in (1, 3):
      v = json.loads(fair.result_path(out / "results", b, "conventional", seed).read_text())[
          "score_validity"]
      assert -1 <= v["spearman_lqs_vs_loss"] <= 1 and v["examples"] == lqs["n"]
      assert len(v["lqs_bin_mean_loss"]) == 10 and all(map(math.isfinite, v["lqs_bin_mean_loss"]))
  assert "## Do the LQS scores rank what training fits?" in md
  assert "DONE: all 40 runs" in log
  assert fair.main(argv) == 0                                          # rerun: nothing to do
  assert "40 runs: 40 done, 0 to do" in capsys.readouterr().out
