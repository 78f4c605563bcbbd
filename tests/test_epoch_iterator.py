"""Epoch-complete training data: every example exactly once per epoch under every ordering, the
ordering applied within each epoch, exact resume mid-epoch, steps derived from data.epochs."""

import json
import pathlib

import numpy as np
import pytest

from effjax.config import ConfigError, load_config
from effjax.data import selection
from effjax.data.ordering import folding_order, shuffle_order, sorted_order
from effjax.data.packing import Examples
from effjax.data.pipeline import TrainIterator, epoch_steps
from effjax.data.scoring import random_scores
from effjax.data.tokenizer import PAD_ID

ROOT = pathlib.Path(__file__).resolve().parents[1]
N, B, E = 23, 4, 3           # 23 = 5 * 4 + 3: every epoch ends in a padded batch


def _examples(n: int, seq_len: int = 3) -> Examples:
  """Row i is filled with i, so a batch's rows reveal the example ids it took."""
  tokens = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len + 1, axis=1)
  return Examples(tokens, np.ones((n, seq_len), np.float32))


def _scores():
  return np.random.default_rng(5).normal(size=N).astype(np.float32)


# name -> (TrainIterator kwargs, expected permutation of epoch e or None = fresh shuffle per epoch)
def _orderings():
  s, r = _scores(), random_scores(N, seed=3)
  kept = selection.top_r(s, 0.5)
  return {
      "shuffle": (dict(ordering_kind="shuffle", seed=11), lambda e: shuffle_order(N, 11, e)),
      "sequential": (dict(ordering_kind="sequential"), lambda e: np.arange(N)),
      "folding_L3": (dict(order=folding_order(s, folds=3)), lambda e: folding_order(s, folds=3)),
      "folding_L5": (dict(order=folding_order(s, folds=5)), lambda e: folding_order(s, folds=5)),
      "sorted": (dict(order=sorted_order(s)), lambda e: sorted_order(s)),
      "random_folding": (dict(order=folding_order(r, folds=3)), lambda e: folding_order(r, folds=3)),
      "top50_folding": (dict(order=folding_order(s, kept, folds=3)),
                        lambda e: folding_order(s, kept, folds=3)),
  }


def _ids(batch) -> np.ndarray:
  """Example ids of a batch's rows; -1 for padding rows (all PAD, loss_mask 0)."""
  ids = batch["inputs"][:, 0].astype(np.int64)
  pad = batch["loss_mask"].sum(-1) == 0
  assert np.all(batch["inputs"][pad] == PAD_ID) and np.all(batch["targets"][pad] == PAD_ID)
  assert np.all(batch["loss_mask"][~pad] == 1)
  ids[pad] = -1
  return ids


def test_epoch_steps():
  assert epoch_steps(23, 4, 3) == 18 and epoch_steps(24, 4, 3) == 18 and epoch_steps(25, 4, 1) == 7
  assert epoch_steps(4, 4, 2) == 2
  for bad in [(0, 4, 1), (5, 0, 1), (5, 4, 0)]:
    with pytest.raises(ValueError):
      epoch_steps(*bad)


@pytest.mark.parametrize("name", list(_orderings()))
def test_every_example_once_per_epoch_in_the_epochs_order(name):
  kw, expected = _orderings()[name]
  it = TrainIterator(_examples(N), B, epochs=E, **kw)
  n = it.examples_per_epoch
  spe = -(-n // B)
  assert it.steps_per_epoch == spe and it.total_steps == E * spe
  batches = list(it)                                   # ends by itself after E epochs
  assert len(batches) == E * spe
  seen = []
  for e in range(E):
    ids = np.concatenate([_ids(b) for b in batches[e * spe:(e + 1) * spe]])
    real = ids[ids >= 0]
    # the epoch's batches are exactly its permutation, in order: the ordering applied per epoch
    np.testing.assert_array_equal(real, expected(e))
    np.testing.assert_array_equal(real, it.epoch_order(e))
    assert len(np.unique(real)) == n == len(real)      # each example exactly once, none dropped
    assert np.all(ids[:n] >= 0) and np.all(ids[n:] == -1)  # padding only ends an epoch
    assert len(ids) - n == spe * B - n < B
    seen.append(real)
  if name == "shuffle":                                # a fresh permutation every epoch
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])
  else:                                                # a fixed (score) order repeats every epoch
    assert all(np.array_equal(seen[0], x) for x in seen)


@pytest.mark.parametrize("name", ["shuffle", "folding_L3", "top50_folding"])
def test_resume_mid_epoch_is_bit_identical(name):
  """Stopped after every step k (mid-epoch, the padded last batch, epoch boundaries), a new
  iterator given the saved state continues with exactly the batches an uninterrupted one yields."""
  kw, _ = _orderings()[name]
  ex = _examples(N)
  full = list(TrainIterator(ex, B, epochs=E, **kw))
  for k in range(1, len(full)):
    it = TrainIterator(ex, B, epochs=E, **kw)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))      # as a checkpoint stores it
    assert state["step"] == k and state["epochs"] == E
    resumed = TrainIterator(ex, B, epochs=E, **kw)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - k
    for a, b in zip(full[k:], rest):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    if k % 4 == 1:
      started = list(TrainIterator(ex, B, epochs=E, start_step=k, **kw))
      np.testing.assert_array_equal(np.stack([b["inputs"] for b in started]),
                                    np.stack([b["inputs"] for b in full[k:]]))


def test_epoch_state_mismatch_and_bounds():
  ex = _examples(N)
  state = TrainIterator(ex, B, epochs=E).get_state()
  with pytest.raises(ValueError, match="epochs"):
    TrainIterator(ex, B, epochs=2).set_state(state)
  with pytest.raises(ValueError, match="epochs"):
    TrainIterator(ex, B).set_state(state)             # endless vs epoch-complete
  TrainIterator(ex, B, epochs=E).set_state({"step": 3})  # a state without the key still resumes
  with pytest.raises(ValueError, match="past the end"):
    TrainIterator(ex, B, epochs=E).set_state({"step": E * 6 + 1})
  assert list(TrainIterator(ex, B, epochs=E, start_step=E * 6)) == []
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="epochs"):
      TrainIterator(ex, B, epochs=bad)
  with pytest.raises(IndexError):
    TrainIterator(ex, B, epochs=1).batch_at(6)


def test_endless_mode_unchanged():
  """Without epochs the stream straddles epochs exactly as before (no padding)."""
  ex = _examples(N)
  it = TrainIterator(ex, B, "shuffle", seed=2)
  ids = np.concatenate([_ids(next(it)) for _ in range(12)])
  stream = np.concatenate([shuffle_order(N, 2, e) for e in range(3)])
  np.testing.assert_array_equal(ids, stream[:48])
  assert it.total_steps is None and it.get_state()["epochs"] is None


# ---------------------------------------------------------------------------------------------
# config keys and the trainer


def _cfg(tmp_path, *extra):
  pool = tmp_path / "pool.jsonl"
  if not pool.exists():  # 40 documents of ~150 bytes: ~90 training examples of 32 bytes
    rng = np.random.default_rng(0)
    words = ["the", "of", "river", "city", "was", "built", "in", "a", "king", "war", "x7", "zq"]
    pool.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 35))}) + "\n"
                            for _ in range(40)))
  return load_config(ROOT / "configs/tiny.yaml", [f"data.source={pool}",
      "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
      "model.max_seq_len=64", "data.seq_len=32", "data.valid_fraction=0.5", "train.batch_size=8",
      "optim.warmup_steps=1", "train.log_every=1", "train.progress=false", "eval.max_batches=1",
      "train.mesh_data=1", "train.checkpoint_every=4", "train.eval_every=100",
      f"train.out_dir={tmp_path}/run", f"delt.cache_dir={tmp_path}/cache",
      *extra])


def test_config_keys_checked_at_load(tmp_path):
  cfg = _cfg(tmp_path, "data.epochs=2", "train.steps=0")
  assert cfg.data.epochs == 2 and cfg.train.steps == 0
  assert _cfg(tmp_path).data.epochs == 0                      # default: off, train.steps governs
  with pytest.raises(ConfigError, match="'data.epochs'"):
    _cfg(tmp_path, "data.epochs=-1")
  with pytest.raises(ConfigError, match="'data.epochs'"):
    _cfg(tmp_path, "data.epochs=1.5")
  with pytest.raises(ConfigError, match="'train.steps'"):
    _cfg(tmp_path, "train.steps=0")                           # 0 needs data.epochs
  with pytest.raises(ConfigError, match="'train.steps'"):
    _cfg(tmp_path, "data.epochs=1", "train.steps=-3")
  with pytest.raises(ConfigError, match="'optim.warmup_steps'"):
    _cfg(tmp_path, "data.epochs=1", "train.steps=5", "optim.warmup_steps=5")


def test_train_epoch_complete_resumes_exactly(tmp_path):
  from effjax.data import load_splits
  from effjax.trainer import TrainingError, train

  cfg = _cfg(tmp_path, "data.epochs=2", "train.steps=0", f"train.out_dir={tmp_path}/full")
  n = len(load_splits(cfg.data)["train"])
  steps = 2 * -(-n // 8)
  full = train(cfg, log=lambda *_: None)
  assert full["finished"] and full["step"] == full["total_steps"] == steps
  assert full["epochs"] == 2 and full["examples_per_epoch"] == n
  saved = load_config(tmp_path / "full" / "config.yaml")
  assert saved.train.steps == steps                           # config.yaml holds the derived count
  logs = []
  assert train(cfg, log=logs.append)["step"] == steps         # finished: nothing to do
  assert any("is complete" in m for m in logs)
  # interrupted mid-epoch (step 3 of the first epoch), resumed: the same losses, bit for bit
  part = _cfg(tmp_path, "data.epochs=2", "train.steps=0", f"train.out_dir={tmp_path}/res",
              "train.checkpoint_every=3")
  train(part, stop_at_step=3, log=lambda *_: None)
  train(part, log=lambda *_: None)
  rows = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text()
                    .splitlines() if "loss" in json.loads(l)]
  assert rows("full") == rows("res") and len(rows("full")) == steps
  with pytest.raises(TrainingError, match=f"set train.steps=0 \\(derived\\) or {steps}"):
    train(_cfg(tmp_path, "data.epochs=2", f"train.steps={steps + 1}",
               f"train.out_dir={tmp_path}/bad"), log=lambda *_: None)
  with pytest.raises(TrainingError, match="warmup_steps"):
    train(_cfg(tmp_path, "data.epochs=1", "train.steps=0", f"optim.warmup_steps={steps}",
               f"train.out_dir={tmp_path}/bad2"), log=lambda *_: None)
  assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
