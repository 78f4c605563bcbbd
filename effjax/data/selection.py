"""Selection: which example ids to keep, given per-example scores (float [N], higher = better).

Every method returns the kept ids as int64, in ascending id order; ties in score are broken towards
the lower id so results are deterministic.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("none", "top_r", "top_k", "threshold")


def _ranked(scores: np.ndarray) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 1:
    raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf")
  return np.argsort(-scores, kind="stable")  # best first, ties by id


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """The k highest-scoring ids."""
  if not 0 < k <= len(scores):
    raise ValueError(f"top_k: k must be in [1, {len(scores)}], got {k}")
  return np.sort(_ranked(scores)[:k]).astype(np.int64)


def top_r(scores: np.ndarray, r: float) -> np.ndarray:
  """The highest-scoring fraction r in (0, 1] of ids: round(r * N) of them (at least one)."""
  if not 0 < r <= 1:
    raise ValueError(f"top_r: r must be in (0, 1], got {r}")
  return top_k(scores, max(1, int(math.floor(r * len(scores) + 0.5))))


def threshold(scores: np.ndarray, t: float) -> np.ndarray:
  """Ids whose score is >= t."""
  _ranked(scores)
  ids = np.nonzero(np.asarray(scores) >= t)[0].astype(np.int64)
  if ids.size == 0:
    raise ValueError(f"threshold {t} keeps no example (max score {np.max(scores):.4g})")
  return ids


def select(scores: np.ndarray, method: str, value: float | None = None) -> np.ndarray:
  """Dispatch by name: none (all ids) | top_r (value = fraction) | top_k (value = count) |
  threshold (value = minimum score)."""
  if method not in METHODS:
    raise ValueError(f"unknown selection {method!r} (known: {', '.join(METHODS)})")
  if method == "none":
    _ranked(scores)
    return np.arange(len(scores), dtype=np.int64)
  if value is None:
    raise ValueError(f"selection {method!r} needs a value")
  if method == "top_r":
    return top_r(scores, float(value))
  if method == "top_k":
    if float(value) != int(value):
      raise ValueError(f"top_k needs an integer count, got {value}")
    return top_k(scores, int(value))
  if method == "threshold":
    return threshold(scores, float(value))
  raise ValueError(f"unknown selection {method!r} (known: {', '.join(METHODS)})")
