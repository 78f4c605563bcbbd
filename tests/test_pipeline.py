import json

import numpy as np
import pytest

from effjax.config import DataConfig
from effjax.data.ordering import shuffle_order
from effjax.data.packing import Examples, pack_documents
from effjax.data.pipeline import (TrainIterator, eval_batches, load_eval_split, load_splits,
                                  split_documents)
from effjax.data.sources import BUNDLED_DIR
from effjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer


def _examples(n: int, seq_len: int = 4) -> Examples:
  """Row i is filled with i, so a batch's rows reveal the example ids it took."""
  tokens = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len + 1, axis=1)
  return Examples(tokens, np.ones((n, seq_len), np.float32))


def _ids(batch) -> list[int]:
  return batch["inputs"][:, 0].tolist()


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture
def jsonl_corpus(tmp_path):
  texts = [f"doc {i:03d} " + "abcdefghij" * (i % 7 + 1) for i in range(100)]
  p = tmp_path / "corpus.jsonl"
  p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return p, texts


# ---------------------------------------------------------------------------------------------
# splits


def test_load_splits_bundled():
  cfg = DataConfig(seq_len=64, valid_fraction=0.1)
  s = load_splits(cfg)
  raw = (BUNDLED_DIR / "tinyshakespeare" / "input.txt").read_bytes()
  cut = int(len(raw) * 0.9)
  for k, ex in s.items():
    assert ex.tokens.dtype == np.int32 and ex.tokens.shape[1] == 65
    assert ex.mask.dtype == np.float32 and ex.mask.shape == (len(ex), 64)
  # One document: train is the first 90% of the bytes, valid the rest (nanoGPT's split), packed.
  train_stream = [BOS_ID] + list(raw[:cut]) + [EOS_ID]
  valid_stream = [BOS_ID] + list(raw[cut:]) + [EOS_ID]
  assert len(s["train"]) == len(train_stream) // 65
  assert len(s["valid"]) == len(valid_stream) // 65
  assert s["train"].tokens.reshape(-1).tolist() == train_stream[:len(s["train"]) * 65]
  assert s["valid"].tokens.reshape(-1).tolist() == valid_stream[:len(s["valid"]) * 65]


def test_load_splits_jsonl_disjoint_and_deterministic(jsonl_corpus):
  path, texts = jsonl_corpus
  tok = ByteTokenizer()
  cfg = DataConfig(source=str(path), packing="pad", seq_len=96, valid_fraction=0.1, seed=3)
  s = load_splits(cfg)
  assert len(s["train"]) == 90 and len(s["valid"]) == 10
  train_docs = {tok.decode(r) for r in s["train"].tokens}
  valid_docs = {tok.decode(r) for r in s["valid"].tokens}
  assert train_docs | valid_docs == set(texts) and not train_docs & valid_docs
  # Same seed -> same holdout, whatever the ordering; another seed -> another holdout.
  s2 = load_splits(DataConfig(source=str(path), packing="pad", seq_len=96, valid_fraction=0.1,
                              seed=3, ordering="sequential"))
  np.testing.assert_array_equal(s["valid"].tokens, s2["valid"].tokens)
  s3 = load_splits(DataConfig(source=str(path), packing="pad", seq_len=96, valid_fraction=0.1,
                              seed=4))
  assert {tok.decode(r) for r in s3["valid"].tokens} != valid_docs
  # pad mode: mask is 0 exactly at PAD targets.
  np.testing.assert_array_equal(s["train"].mask == 0, s["train"].tokens[:, 1:] == PAD_ID)
  # max_documents and pack mode.
  s4 = load_splits(DataConfig(source=str(path), seq_len=16, max_documents=30, valid_fraction=0.1))
  assert len(s4["train"]) > 0 and len(s4["valid"]) > 0


def test_root_sources_through_the_config(tmp_path, monkeypatch):
  """DataConfig.root (else $EFFJAX_DATA_ROOT) resolves root:<path> for the training splits and for
  evaluation files: the same examples as the absolute path."""
  from effjax.data.sources import ROOT_ENV
  monkeypatch.delenv(ROOT_ENV, raising=False)
  texts = [f"doc {i:03d} " + "klmnopqrst" * (i % 5 + 1) for i in range(40)]
  (tmp_path / "corpus").mkdir()
  p = tmp_path / "corpus" / "docs.jsonl"
  p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  kw = dict(packing="pad", seq_len=64, valid_fraction=0.1, seed=5)
  ref = load_splits(DataConfig(source=str(p), **kw))
  got = load_splits(DataConfig(source="root:corpus/docs.jsonl", root=str(tmp_path), **kw))
  for k in ("train", "valid"):
    np.testing.assert_array_equal(got[k].tokens, ref[k].tokens)
    np.testing.assert_array_equal(got[k].mask, ref[k].mask)
  ev = load_eval_split("root:corpus/docs.jsonl", DataConfig(root=str(tmp_path), **kw))
  np.testing.assert_array_equal(ev.tokens, load_eval_split(str(p), DataConfig(**kw)).tokens)
  with pytest.raises(ValueError, match="EFFJAX_DATA_ROOT"):
    load_splits(DataConfig(source="root:corpus/elsewhere.jsonl", **kw))
  monkeypatch.setenv(ROOT_ENV, str(tmp_path))
  env = load_eval_split("root:corpus/docs.jsonl", DataConfig(**kw))
  np.testing.assert_array_equal(env.tokens, ev.tokens)


def test_split_documents_small_and_zero():
  docs = [np.arange(100, dtype=np.int32), np.arange(10, dtype=np.int32)]
  train, valid = split_documents(docs, 0.25, seed=0)
  assert [len(d) for d in train] == [75, 7] and [len(d) for d in valid] == [25, 3]
  for d, t, v in zip(docs, train, valid):
    np.testing.assert_array_equal(np.concatenate([t, v]), d)
  train, valid = split_documents(docs, 0.0, seed=0)
  assert valid == [] and len(train) == 2
  s = load_splits(DataConfig(valid_fraction=0.0))
  assert len(s["valid"]) == 0 and s["valid"].tokens.shape[1] == 129


def test_load_eval_split_whole_file(tmp_path):
  p = tmp_path / "eval.txt"
  p.write_text("line one\nline two\n")
  ex = load_eval_split(str(p), DataConfig(seq_len=6, packing="pad"))
  tok = ByteTokenizer()
  assert [tok.decode(r) for r in ex.tokens] == ["line o", "line t"]  # BOS + 6 bytes, EOS cut
  ex = load_eval_split(str(p), DataConfig(seq_len=9, packing="pad", max_documents=1))
  assert [tok.decode(r) for r in ex.tokens] == ["line one", "line two"]  # whole file, no holdout
  assert (ex.tokens[:, -1] == EOS_ID).all()
  ex = load_eval_split(str(p), DataConfig(seq_len=4))
  assert len(ex) == (10 + 10) // 5


# ---------------------------------------------------------------------------------------------
# iterator


def test_batch_format_and_stream_semantics():
  n, B = 10, 4
  ex = _examples(n, seq_len=6)
  ex.tokens[:, -1] = 99  # make inputs/targets distinguishable
  it = TrainIterator(ex, B, "shuffle", seed=7)
  batches = _take(it, 10)
  b = batches[0]
  assert set(b) == {"inputs", "targets", "loss_mask"}
  assert b["inputs"].shape == (B, 6) and b["inputs"].dtype == np.int32
  assert b["targets"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
  np.testing.assert_array_equal(b["targets"][:, -1], 99)
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  # The stream is epoch 0's permutation, then epoch 1's, ...; batches straddle epoch boundaries.
  stream = np.concatenate([shuffle_order(n, 7, e) for e in range(4)])
  got = sum((_ids(b) for b in batches), [])
  assert got == stream[:40].tolist()
  assert it.get_state()["step"] == 10


def test_iterator_deterministic_and_batch_at():
  ex = _examples(37)
  a = _take(TrainIterator(ex, 8, "shuffle", seed=1), 12)
  it = TrainIterator(ex, 8, "shuffle", seed=1)
  _assert_batches_equal(a, _take(it, 12))
  _assert_batches_equal(a, [it.batch_at(s) for s in range(12)])
  c = _take(TrainIterator(ex, 8, "shuffle", seed=2), 12)
  assert any(_ids(x) != _ids(y) for x, y in zip(a, c))
  seq = _take(TrainIterator(ex, 8, "sequential", seed=1), 5)
  assert sum((_ids(b) for b in seq), []) == (list(range(37)) + list(range(3)))


@pytest.mark.parametrize("k", [0, 1, 3, 4, 7])
def test_resume_is_exact_across_epochs(k):
  n, B = 11, 4  # epoch boundaries fall inside batches 2, 5, 8, ...
  ex = _examples(n)
  full = _take(TrainIterator(ex, B, "shuffle", seed=3), k + 6)
  it = TrainIterator(ex, B, "shuffle", seed=3)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
  assert state["step"] == k
  resumed = TrainIterator(ex, B, "shuffle", seed=3)
  _take(resumed, 2)  # a fresh run that already moved on is rewound by set_state
  resumed.set_state(state)
  _assert_batches_equal(full[k:], _take(resumed, 6))
  started = TrainIterator(ex, B, "shuffle", seed=3, start_step=state["step"])
  _assert_batches_equal(full[k:], _take(started, 6))
  _assert_batches_equal(full[k:], _take(it, 6))  # and the original keeps going unaffected


def test_explicit_order_repeats_every_epoch():
  ex = _examples(10)
  order = np.array([9, 3, 3, 0, 5, 7, 1], np.int64)  # a selection may drop or repeat ids
  it = TrainIterator(ex, 3, "shuffle", seed=0, order=order)
  got = sum((_ids(b) for b in _take(it, 7)), [])
  assert got == np.tile(order, 3)[:21].tolist()
  state = it.get_state()
  assert state["ordering"] == "explicit" and isinstance(state["order_crc32"], int)
  r = TrainIterator(ex, 3, "shuffle", seed=0, order=order, start_step=7)
  assert _ids(next(r)) == np.tile(order, 4)[21:24].tolist()
  with pytest.raises(ValueError, match="order_crc32"):
    TrainIterator(ex, 3, "shuffle", seed=0, order=order[::-1]).set_state(state)
  with pytest.raises(ValueError, match="outside"):
    TrainIterator(ex, 3, order=np.array([0, 10, 1]))


def test_state_mismatch_and_too_small():
  ex = _examples(20)
  state = TrainIterator(ex, 4, "shuffle", seed=0).get_state()
  with pytest.raises(ValueError, match="batch_size"):
    TrainIterator(ex, 5, "shuffle", seed=0).set_state(state)
  with pytest.raises(ValueError, match="seed"):
    TrainIterator(ex, 4, "shuffle", seed=1).set_state(state)
  with pytest.raises(ValueError, match="too little training data.*has 3 examples.*batch_size=4"):
    TrainIterator(_examples(3), 4)
  with pytest.raises(ValueError, match="unknown ordering"):
    TrainIterator(ex, 4, "bogus")


def test_iterator_on_bundled_corpus():
  train = load_splits(DataConfig(seq_len=32))["train"]
  it = TrainIterator(train, 16, "shuffle", seed=0, start_step=1000)
  b = next(it)
  assert b["inputs"].shape == (16, 32)
  np.testing.assert_array_equal(b["loss_mask"], 1.0)
  assert it.get_state()["step"] == 1001


def test_eval_batches_sequential_and_padded():
  ex = _examples(10)
  bs = list(eval_batches(ex, 4))
  assert [_ids(b) for b in bs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, PAD_ID, PAD_ID]]
  for b in bs:
    assert b["inputs"].shape == (4, 4)
  np.testing.assert_array_equal(bs[-1]["loss_mask"].sum(1), [4, 4, 0, 0])
  assert [_ids(b) for b in eval_batches(ex, 4, max_batches=2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert list(eval_batches(pack_documents([], 4), 4)) == []
