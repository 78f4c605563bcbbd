import numpy as np
import pytest

from effjax.data.packing import Examples, pack_documents, pad_documents
from effjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def _docs(seed=0, n=7):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=rng.integers(0, 40)).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [1, 5, 16, 33])
def test_pack_windows_are_consecutive_slices(seq_len):
  docs = _docs()
  stream = []
  for d in docs:
    stream += [BOS_ID] + d.tolist() + [EOS_ID]
  ex = pack_documents(docs, seq_len)
  w = seq_len + 1
  n = len(stream) // w
  assert ex.tokens.shape == (n, w) and ex.tokens.dtype == np.int32
  assert ex.mask.shape == (n, seq_len) and ex.mask.dtype == np.float32
  assert len(ex) == n and ex.seq_len == seq_len
  for i in range(n):  # disjoint windows, in order; only the short tail is dropped
    assert ex.tokens[i].tolist() == stream[i * w:(i + 1) * w]
  assert len(stream) - n * w < w
  np.testing.assert_array_equal(ex.mask, 1.0)


def test_pack_too_short_gives_no_examples():
  ex = pack_documents([np.array([1, 2], np.int32)], 10)
  assert ex.tokens.shape == (0, 11) and ex.mask.shape == (0, 10)
  assert pack_documents([], 4).tokens.shape == (0, 5)


def test_pad_documents():
  seq_len = 6
  docs = [np.array([], np.int32), np.array([10, 11], np.int32),
          np.arange(20, 25, dtype=np.int32),   # len 5 = seq_len - 1: BOS + 5 + EOS fills exactly
          np.arange(30, 36, dtype=np.int32),   # len 6: EOS truncated away
          np.arange(40, 60, dtype=np.int32)]   # long: truncated
  ex = pad_documents(docs, seq_len)
  P, B, E = PAD_ID, BOS_ID, EOS_ID
  want = [
      [B, E, P, P, P, P, P],
      [B, 10, 11, E, P, P, P],
      [B, 20, 21, 22, 23, 24, E],
      [B, 30, 31, 32, 33, 34, 35],
      [B, 40, 41, 42, 43, 44, 45],
  ]
  assert ex.tokens.dtype == np.int32 and ex.mask.dtype == np.float32
  np.testing.assert_array_equal(ex.tokens, want)
  want_mask = (np.array(want)[:, 1:] != P).astype(np.float32)
  np.testing.assert_array_equal(ex.mask, want_mask)
  np.testing.assert_array_equal(ex.mask.sum(1), [1, 3, 6, 6, 6])


def test_pad_mask_zero_exactly_at_pad_targets_random():
  docs = _docs(seed=3, n=50)
  ex = pad_documents(docs, 16)
  assert ex.tokens.shape == (50, 17)
  targets = ex.tokens[:, 1:]
  np.testing.assert_array_equal(ex.mask == 0, targets == PAD_ID)
  for d, row in zip(docs, ex.tokens):
    full = [BOS_ID] + d.tolist() + [EOS_ID]
    k = min(len(full), 17)
    assert row[:k].tolist() == full[:k]
    assert (row[k:] == PAD_ID).all()


def test_examples_take_and_validation():
  ex = pack_documents(_docs(), 4)
  sub = ex.take([2, 0])
  np.testing.assert_array_equal(sub.tokens, ex.tokens[[2, 0]])
  with pytest.raises(ValueError):
    Examples(np.zeros((3, 5), np.int32), np.zeros((3, 5), np.float32))
