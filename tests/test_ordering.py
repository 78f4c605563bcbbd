import numpy as np
import pytest

from effjax.data.ordering import ORDERINGS, make_ordering, sequential_order, shuffle_order


@pytest.mark.parametrize("n", [0, 1, 2, 17, 1000])
def test_shuffle_is_a_permutation(n):
  for epoch in range(3):
    p = shuffle_order(n, seed=5, epoch=epoch)
    assert p.dtype == np.int64 and p.shape == (n,)
    np.testing.assert_array_equal(np.sort(p), np.arange(n))


def test_shuffle_deterministic_and_varies():
  a = shuffle_order(1000, 0, 0)
  np.testing.assert_array_equal(a, shuffle_order(1000, 0, 0))
  assert not np.array_equal(a, shuffle_order(1000, 0, 1))   # epochs differ
  assert not np.array_equal(a, shuffle_order(1000, 1, 0))   # seeds differ
  assert not np.array_equal(shuffle_order(1000, 1, 0), shuffle_order(1000, 0, 1))
  np.testing.assert_array_equal(a, np.random.default_rng((0, 0)).permutation(1000))


def test_sequential_and_make_ordering():
  s = sequential_order(7)
  assert s.dtype == np.int64
  np.testing.assert_array_equal(s, np.arange(7))
  np.testing.assert_array_equal(make_ordering("sequential", 7, 3, 9), s)
  np.testing.assert_array_equal(make_ordering("shuffle", 50, 3, 2), shuffle_order(50, 3, 2))
  assert set(ORDERINGS) >= {"shuffle", "sequential"}
  with pytest.raises(ValueError, match="unknown ordering 'bogus'"):
    make_ordering("bogus", 5, 0, 0)
