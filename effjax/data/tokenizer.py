"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then PAD, BOS, EOS. Needs no download."""

from __future__ import annotations

from typing import Sequence

import numpy as np

NUM_BYTES = 256  # ids below this are the bytes of the text
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259


class ByteTokenizer:
  """Text <-> int32 ids over UTF-8 bytes plus three specials (PAD=256, BOS=257, EOS=258)."""

  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  vocab_size: int = VOCAB_SIZE

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """str -> int32 [L] (L = UTF-8 byte count, +1 per special added)."""
    # surrogatepass: JSON corpora can hold lone surrogates ("\ud800"); strict UTF-8 would reject
    # the whole document, while this keeps them and still round-trips through `decode`.
    ids = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(np.int32)
    if add_bos or add_eos:
      parts = [np.array([BOS_ID], np.int32)] if add_bos else []
      parts.append(ids)
      if add_eos:
        parts.append(np.array([EOS_ID], np.int32))
      ids = np.concatenate(parts)
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """int [L] -> str. Specials (and anything outside 0..255) are skipped; bad UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    try:
      # Exact inverse of `encode`, lone surrogates included.
      return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
      # Model samples can stop mid-character or emit invalid sequences.
      return data.decode("utf-8", "replace")
