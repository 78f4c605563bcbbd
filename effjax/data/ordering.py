"""Orderings: the order in which example ids are visited. An ordering is a permutation of ids (int64).

Per-epoch orderings are functions (n, seed, epoch) -> int64 [n] registered in `ORDERINGS`; the
training iterator asks for one per epoch. Orderings computed from data (DELT's score-sorted and
folding orders) belong in this module too: they return one fixed permutation that is handed to
`TrainIterator(order=...)`, which repeats it every epoch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

OrderFn = Callable[[int, int, int], np.ndarray]  # (n, seed, epoch) -> int64 [n]


def shuffle_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """A fresh uniform permutation per epoch: int64 [n], a pure function of (n, seed, epoch)."""
  # Seeding with the (seed, epoch) pair rather than seed + epoch keeps runs with neighbouring seeds
  # from sharing epochs.
  return np.random.default_rng((seed, epoch)).permutation(n).astype(np.int64)


def sequential_order(n: int) -> np.ndarray:
  """0, 1, ..., n-1 as int64 [n]; the same every epoch."""
  return np.arange(n, dtype=np.int64)


ORDERINGS: dict[str, OrderFn] = {
    "shuffle": shuffle_order,
    "sequential": lambda n, seed, epoch: sequential_order(n),
}


def make_ordering(kind: str, n: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation (int64 [n]) that ordering `kind` visits in `epoch`."""
  if kind not in ORDERINGS:
    raise ValueError(f"unknown ordering {kind!r} (known: {', '.join(sorted(ORDERINGS))})")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  return ORDERINGS[kind](n, seed, epoch)


# ---------------------------------------------------------------------------------------------
# Score-based orderings (DELT: sorted, folding) go below: (scores float32 [n], ...) -> int64 [n].


def _check_scores(scores: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores)
  if scores.ndim != 1:
    raise ValueError(f"scores must be 1-D (one per example id), got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf")
  ids = np.arange(len(scores), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
  if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= len(scores))):
    raise ValueError(f"ids must be 1-D example ids in [0, {len(scores)})")
  return scores, ids


def sorted_order(scores: np.ndarray, ids: np.ndarray | None = None, descending: bool = False) -> np.ndarray:
  """`ids` (default all) sorted by score, ascending unless `descending`; ties keep id order.
  scores: float [N] indexed by example id; returns int64 [len(ids)]."""
  scores, ids = _check_scores(scores, ids)
  key = -scores[ids] if descending else scores[ids]
  return ids[np.argsort(key, kind="stable")]


def folding_order(scores: np.ndarray, ids: np.ndarray | None = None, folds: int = 3,
                  zigzag: bool = False) -> np.ndarray:
  """DELT Folding: sort ascending, fold l takes every `folds`-th example from offset l, folds are
  concatenated -- `folds` ascending sweeps over the whole score range, each a disjoint 1/L of the
  data, so no example repeats and the curriculum restarts L times. `zigzag` reverses odd folds
  (ascending, descending, ascending, ...). Returns int64 [len(ids)]."""
  if folds < 1:
    raise ValueError(f"folds must be >= 1, got {folds}")
  s = sorted_order(scores, ids)
  parts = [s[l::folds] for l in range(folds)]
  if zigzag:
    parts = [p[::-1] if l % 2 else p for l, p in enumerate(parts)]
  return np.concatenate(parts).astype(np.int64)


SCORE_ORDERINGS = ("sorted_asc", "sorted_desc", "folding", "zigzag", "shuffle")


def score_ordering(kind: str, scores: np.ndarray, ids: np.ndarray | None = None, folds: int = 3,
                   seed: int = 0) -> np.ndarray:
  """One fixed permutation of `ids` for a score-based ordering name (repeated every epoch by the
  iterator). 'shuffle' ignores the scores (a seeded permutation of ids)."""
  if kind == "sorted_asc":
    return sorted_order(scores, ids)
  if kind == "sorted_desc":
    return sorted_order(scores, ids, descending=True)
  if kind == "folding":
    return folding_order(scores, ids, folds)
  if kind == "zigzag":
    return folding_order(scores, ids, folds, zigzag=True)
  if kind == "shuffle":
    _, ids = _check_scores(scores, ids)
    return ids[np.random.default_rng((seed, 0)).permutation(len(ids))]
  raise ValueError(f"unknown score ordering {kind!r} (known: {', '.join(SCORE_ORDERINGS)})")
