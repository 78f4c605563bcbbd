"""DELT end to end through train(): scoring -> selection -> ordering -> training, cached, resumable."""

import json
import pathlib

import numpy as np
import pytest

from effjax.config import ConfigError, load_config
from effjax.data import delt, load_splits, selection
from effjax.data.ordering import folding_order
from effjax.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_cfg(tmp_path, *extra):
  ref = tmp_path / "ref.txt"
  if not ref.exists():
    rng = np.random.default_rng(0)
    words = ["the", "of", "history", "river", "city", "was", "built", "in", "a", "king", "war"]
    ref.write_text("\n".join(" ".join(rng.choice(words, 40)) for _ in range(40)))
  return load_config(ROOT / "configs/tiny.yaml", [
      "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
      "model.max_seq_len=64", "data.seq_len=32", "data.valid_fraction=0.5", "train.batch_size=8",
      "optim.warmup_steps=1", "train.log_every=1", "train.progress=false", "eval.max_batches=1",
      "train.mesh_data=1", "train.steps=6", "train.checkpoint_every=3", "train.eval_every=100",
      f"train.out_dir={tmp_path}/run", f"delt.cache_dir={tmp_path}/cache",
      f"delt.reference_source={ref}", "delt.reference_examples=8",
      "delt.proxy.d_model=16", "delt.proxy.n_layers=1", "delt.proxy.n_heads=2",
      "delt.proxy.n_kv_heads=1", "delt.proxy.max_seq_len=64", "delt.proxy.compute_dtype=float32",
      "delt.proxy_pretrain_steps=3", "delt.proxy_steps=4", "delt.proxy_batch_size=4",
      "delt.chunk_size=16", "data.max_documents=1", *extra])


def test_lqs_top_r_folding_end_to_end(tmp_path):
  cfg = make_cfg(tmp_path, "delt.scoring=lqs", "delt.selection=top_r", "delt.select_value=0.5",
                 "delt.ordering=folding", "delt.folds=3")
  pool = load_splits(cfg.data)["train"]
  logs = []
  order, info = delt.prepare_order(cfg, pool, log=logs.append, progress=False)
  cache = next((tmp_path / "cache").glob("lqs-*"))
  assert len(list((tmp_path / "cache").glob("pds-*"))) == 1  # same trajectory: PDS cached too
  scores = np.load(cache / "scores.npy")
  assert scores.shape == (len(pool),) and scores.dtype == np.float32
  assert np.all(np.abs(scores) <= 3) and np.std(scores) > 0
  kept = selection.top_r(scores, 0.5)
  np.testing.assert_array_equal(order, folding_order(scores, kept, folds=3))
  assert info["kept"] == len(kept) == round(len(pool) * 0.5)
  meta = json.loads((cache / "meta.json").read_text())
  assert meta["scored_steps"] == [0, 2] and meta["interval"] == 2
  # a rerun reads the cache instead of rescoring
  logs2 = []
  order2, _ = delt.prepare_order(cfg, pool, log=logs2.append, progress=False)
  np.testing.assert_array_equal(order, order2)
  assert any("using cached" in m for m in logs2)
  logs3 = []
  delt.prepare_order(make_cfg(tmp_path, "delt.scoring=pds", "delt.ordering=folding"), pool,
                     log=logs3.append, progress=False)
  assert any("using cached pds" in m for m in logs3)
  # train() consumes it, and resumes bit-identically
  full = train(make_cfg(tmp_path, "delt.scoring=lqs", "delt.selection=top_r",
                        "delt.select_value=0.5", "delt.ordering=folding",
                        f"train.out_dir={tmp_path}/full"), log=lambda *_: None)
  assert full["delt"]["kept"] == len(kept) and full["train_examples"] == len(pool)
  part_cfg = make_cfg(tmp_path, "delt.scoring=lqs", "delt.selection=top_r",
                      "delt.select_value=0.5", "delt.ordering=folding", f"train.out_dir={tmp_path}/res")
  train(part_cfg, stop_at_step=3, log=lambda *_: None)
  train(part_cfg, log=lambda *_: None)
  rows = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(l)]
  assert rows("full") == rows("res") and len(rows("full")) == 6


def test_learned_scorer_path_and_baselines(tmp_path):
  cfg = make_cfg(tmp_path, "delt.scoring=pds", "delt.ordering=sorted_desc", "delt.score_sample=60")
  pool = load_splits(cfg.data)["train"]
  order, info = delt.prepare_order(cfg, pool, log=lambda *_: None, progress=False)
  assert sorted(order.tolist()) == list(range(len(pool)))   # no selection: a full permutation
  assert info["scored_directly"] == 60 and "heldout_pearson" in info["learned_scorer"]
  for scoring in ("loss", "random"):
    c = make_cfg(tmp_path, f"delt.scoring={scoring}", "delt.ordering=zigzag")
    o, inf = delt.prepare_order(c, pool, log=lambda *_: None, progress=False)
    assert sorted(o.tolist()) == list(range(len(pool))) and inf["scoring"] == scoring


def test_reference_source_under_the_data_root(tmp_path):
  """delt.reference_source as root:<path> resolves under data.root: the same reference split as
  the absolute path."""
  cfg = make_cfg(tmp_path)
  ref, rest = delt.reference_split(cfg)
  rooted = make_cfg(tmp_path, f"data.root={tmp_path}", "delt.reference_source=root:ref.txt")
  ref2, rest2 = delt.reference_split(rooted)
  assert len(ref) == 8 and len(rest) > 0
  np.testing.assert_array_equal(ref2.tokens, ref.tokens)
  np.testing.assert_array_equal(rest2.tokens, rest.tokens)


def test_delt_config_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"delt\.scoring"):
    make_cfg(tmp_path, "delt.ordering=folding")              # folding needs scores
  with pytest.raises(ConfigError, match=r"delt\.select_value"):
    make_cfg(tmp_path, "delt.scoring=random", "delt.selection=top_r", "delt.select_value=2")
  with pytest.raises(ConfigError, match=r"delt\.reference_source"):
    load_config(ROOT / "configs/tiny.yaml", ["delt.scoring=lqs"])
  with pytest.raises(ConfigError, match=r"delt\.ordering"):
    make_cfg(tmp_path, "delt.scoring=random", "delt.ordering=spiral")
