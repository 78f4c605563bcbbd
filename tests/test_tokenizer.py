import numpy as np
import pytest

from effjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

TEXTS = [
    "",
    "hello world",
    "First Citizen:\nBefore we proceed any further, hear me speak.\r\n\t",
    "héllo wörld — naïve café",
    "日本語のテキスト, 中文, 한국어",
    "emoji 🙂👍🏽 and flags 🇫🇷, ZWJ 👩‍👩‍👧",
    "combining e\u0301 and nul \x00 and \uffff and \U0010ffff",
    "lone surrogate \ud800 inside",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_ids_are_utf8_bytes():
  ids = ByteTokenizer().encode("aé")
  np.testing.assert_array_equal(ids, [0x61, 0xC3, 0xA9])


def test_specials():
  tok = ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
  assert (PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258, 259)
  ids = tok.encode("ab", add_bos=True, add_eos=True)
  np.testing.assert_array_equal(ids, [BOS_ID, 97, 98, EOS_ID])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(tok.encode("ab", add_bos=True), [BOS_ID, 97, 98])
  np.testing.assert_array_equal(tok.encode("ab", add_eos=True), [97, 98, EOS_ID])
  # Specials anywhere are skipped on decode.
  assert tok.decode([BOS_ID, 104, PAD_ID, 105, EOS_ID, PAD_ID]) == "hi"
  assert tok.decode(np.array([[BOS_ID, 104], [105, EOS_ID]])) == "hi"


def test_decode_invalid_utf8_replaces():
  tok = ByteTokenizer()
  # A truncated multi-byte character (as a sampled sequence may end) must not raise.
  ids = tok.encode("é")[:1]
  assert tok.decode(list(ids) + [97]) == "\ufffda"
