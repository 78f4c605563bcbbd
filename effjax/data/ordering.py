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
