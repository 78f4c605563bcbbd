"""DELT selection and score-based orderings: exact permutations with the documented structure."""

import numpy as np
import pytest

from effjax.data import selection
from effjax.data.ordering import folding_order, score_ordering, sorted_order


def rand_scores(n, seed=0, ties=False):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=n).astype(np.float32)
  if ties:
    s = np.round(s, 1)
  return s


@pytest.mark.parametrize("n", [1, 7, 30, 101])
@pytest.mark.parametrize("folds", [1, 2, 3, 5])
def test_folding_is_exact_permutation_with_fold_structure(n, folds):
  s = rand_scores(n, seed=n + folds, ties=True)
  order = folding_order(s, folds=folds)
  assert order.dtype == np.int64
  assert sorted(order.tolist()) == list(range(n))
  asc = np.argsort(s, kind="stable")
  # fold l is asc[l::folds], in that order, folds concatenated
  expected = np.concatenate([asc[l::folds] for l in range(folds)])
  np.testing.assert_array_equal(order, expected)
  # every fold is non-decreasing in score: L ascending sweeps
  start = 0
  for l in range(folds):
    size = len(range(l, n, folds))
    fold_scores = s[order[start:start + size]]
    assert np.all(np.diff(fold_scores) >= 0)
    start += size


def test_folding_hand_example():
  s = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8], np.float32)
  # ascending ids: 1(.1) 5(.2) 3(.3) 0(.5) 4(.7) 6(.8) 2(.9)
  np.testing.assert_array_equal(folding_order(s, folds=3), [1, 0, 2, 5, 4, 3, 6])
  np.testing.assert_array_equal(score_ordering("zigzag", s, folds=3), [1, 0, 2, 4, 5, 3, 6])
  np.testing.assert_array_equal(sorted_order(s), [1, 5, 3, 0, 4, 6, 2])
  np.testing.assert_array_equal(score_ordering("sorted_desc", s), [2, 6, 4, 0, 3, 5, 1])


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_zigzag_reverses_odd_folds(folds):
  s = rand_scores(50, seed=3)
  z = score_ordering("zigzag", s, folds=folds)
  f = folding_order(s, folds=folds)
  assert sorted(z.tolist()) == list(range(50))
  start = 0
  for l in range(folds):
    size = len(range(l, 50, folds))
    fz, ff = z[start:start + size], f[start:start + size]
    np.testing.assert_array_equal(fz, ff[::-1] if l % 2 else ff)
    start += size


def test_orderings_over_a_selection_use_only_kept_ids():
  s = rand_scores(40, seed=5)
  kept = selection.top_r(s, 0.5)
  for kind in ("sorted_asc", "sorted_desc", "folding", "zigzag", "shuffle"):
    o = score_ordering(kind, s, kept, folds=3, seed=1)
    assert sorted(o.tolist()) == kept.tolist(), kind
  np.testing.assert_array_equal(score_ordering("shuffle", s, kept, seed=1),
                                score_ordering("shuffle", s, kept, seed=1))
  assert not np.array_equal(score_ordering("shuffle", s, kept, seed=1),
                            score_ordering("shuffle", s, kept, seed=2))


def test_selection_keeps_exactly_the_right_ids():
  s = np.array([0.3, -1.0, 2.0, 0.3, 5.0, -0.5], np.float32)
  np.testing.assert_array_equal(selection.top_k(s, 2), [2, 4])
  np.testing.assert_array_equal(selection.top_k(s, 4), [0, 2, 3, 4])
  np.testing.assert_array_equal(selection.top_k(s, 3), [0, 2, 4])   # tie 0.3: lower id wins
  np.testing.assert_array_equal(selection.top_r(s, 0.5), [0, 2, 4])
  np.testing.assert_array_equal(selection.threshold(s, 0.3), [0, 2, 3, 4])
  np.testing.assert_array_equal(selection.select(s, "none"), np.arange(6))
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(1, 200))
    sc = rng.normal(size=n)
    r = float(rng.uniform(0.01, 1.0))
    kept = selection.top_r(sc, r)
    k = max(1, int(np.floor(r * n + 0.5)))
    assert len(kept) == k and len(set(kept.tolist())) == k
    rest = np.setdiff1d(np.arange(n), kept)
    if rest.size:
      assert sc[kept].min() >= sc[rest].max()


def test_selection_and_ordering_errors():
  s = rand_scores(10)
  with pytest.raises(ValueError, match="r must be"):
    selection.top_r(s, 0.0)
  with pytest.raises(ValueError, match="k must be"):
    selection.top_k(s, 11)
  with pytest.raises(ValueError, match="keeps no example"):
    selection.threshold(s, 99.0)
  with pytest.raises(ValueError, match="unknown selection"):
    selection.select(s, "best")
  with pytest.raises(ValueError, match="NaN"):
    selection.top_k(np.array([1.0, np.nan]), 1)
  with pytest.raises(ValueError, match="unknown score ordering"):
    score_ordering("spiral", s)
  with pytest.raises(ValueError, match="folds"):
    folding_order(s, folds=0)
