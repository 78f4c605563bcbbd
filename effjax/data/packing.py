"""Documents of token ids -> fixed-length examples (packed windows, or one padded row per document)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from effjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """Fixed-length training examples; row i is example id i (scores, selections and orderings index it).

  tokens: int32 [N, T + 1]; the model reads tokens[:, :-1] and predicts tokens[:, 1:].
  mask:   float32 [N, T], over the targets tokens[:, 1:]; 0 where the target is PAD.
  """
  tokens: np.ndarray
  mask: np.ndarray

  def __post_init__(self):
    if self.tokens.ndim != 2 or self.mask.shape != (self.tokens.shape[0], self.tokens.shape[1] - 1):
      raise ValueError(f"Examples: tokens {self.tokens.shape} and mask {self.mask.shape} must be "
                       "[N, T+1] and [N, T]")

  def __len__(self) -> int:
    return self.tokens.shape[0]

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1] - 1

  def take(self, ids: np.ndarray | Sequence[int]) -> "Examples":
    """The examples at ids (int [K]) -> Examples with K rows (e.g. a selection of kept ids)."""
    ids = np.asarray(ids, dtype=np.int64)
    return Examples(self.tokens[ids], self.mask[ids])


def empty_examples(seq_len: int) -> Examples:
  return Examples(np.zeros((0, seq_len + 1), np.int32), np.zeros((0, seq_len), np.float32))


def _with_specials(docs_ids: Sequence[np.ndarray]) -> list[np.ndarray]:
  bos, eos = np.array([BOS_ID], np.int32), np.array([EOS_ID], np.int32)
  out = []
  for d in docs_ids:
    out += [bos, np.asarray(d, np.int32).reshape(-1), eos]
  return out


def pack_documents(docs_ids: Sequence[np.ndarray], seq_len: int) -> Examples:
  """Concatenates BOS doc EOS BOS doc EOS ... and cuts it into disjoint windows of seq_len + 1.

  docs_ids: list of int [L_i] (raw token ids, no specials). Returns Examples with
  N = len(stream) // (seq_len + 1) rows, mask all ones; the short tail is dropped. Windows share no
  token, so each window's first token is context only (never a target).
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be > 0, got {seq_len}")
  if not docs_ids:
    return empty_examples(seq_len)
  stream = np.concatenate(_with_specials(docs_ids))
  n = stream.shape[0] // (seq_len + 1)
  tokens = stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)
  return Examples(np.ascontiguousarray(tokens), np.ones((n, seq_len), np.float32))


def pad_documents(docs_ids: Sequence[np.ndarray], seq_len: int) -> Examples:
  """One example per document: BOS doc EOS truncated to seq_len + 1, right-padded with PAD.

  docs_ids: list of int [L_i]. Returns Examples with N = len(docs_ids); mask is 0 exactly where the
  target is PAD. A document longer than seq_len - 1 loses its tail (and its EOS).
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be > 0, got {seq_len}")
  n = len(docs_ids)
  tokens = np.full((n, seq_len + 1), PAD_ID, np.int32)
  for i, d in enumerate(docs_ids):
    d = np.asarray(d, np.int32).reshape(-1)
    row = np.concatenate([[BOS_ID], d[:seq_len], [EOS_ID]])[: seq_len + 1]
    tokens[i, : row.shape[0]] = row
  mask = (tokens[:, 1:] != PAD_ID).astype(np.float32)
  return Examples(tokens, mask)
