"""Block selection rules and Quest bounds."""

import jax.numpy as jnp
import numpy as np
import pytest

from effjax.sparse import selection as sel
from pallas_kernels.block_topk import output_width


def test_top_k_keeps_first_and_current_and_best():
  scores = jnp.asarray([[[0.0, 5.0, 1.0, 9.0, 3.0, 7.0, -1.0, 2.0]]])   # B1 K1 N8
  lengths = jnp.asarray([6 * 4 + 1])                                   # 7 valid blocks (bs 4)
  idx = sel.select_top_k(scores, lengths, 4, k=4)
  # forced: block 0 and current block 6; best others: 3 (9.0), 5 (7.0); -1 padded to the width
  # every block_topk backend returns (the power of 2 above min(k, N))
  assert output_width(4, 8) == 8
  np.testing.assert_array_equal(idx, [[[0, 3, 5, 6, -1, -1, -1, -1]]])
  idx = sel.select_top_k(scores, jnp.asarray([8]), 4, k=3)            # 2 valid blocks only
  np.testing.assert_array_equal(idx, [[[0, 1, -1, -1]]])


def test_threshold_rule():
  probs = jnp.asarray([[[0.01, 0.3, 0.02, 0.4, 0.05, 0.2]], [[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]]])
  probs = probs.reshape(2, 1, 6)
  lengths = jnp.asarray([24, 9])   # bs 4: 6 and 3 valid blocks
  idx = sel.select_threshold(probs, lengths, 4, threshold=0.1, max_blocks=4)
  np.testing.assert_array_equal(idx[0, 0], [0, 1, 3, 5])   # 0, 5 forced; 1 (.3), 3 (.4) pass
  np.testing.assert_array_equal(idx[1, 0], [0, 1, 2, -1])  # 0 and current 2 forced; 1 passes
  idx = sel.select_threshold(probs, lengths, 4, threshold=0.1, max_blocks=3)
  np.testing.assert_array_equal(idx[0, 0], [0, 3, 5])      # budget: highest probability wins


def test_budgets_too_small_for_the_forced_blocks_are_refused():
  """k / max_blocks must hold the first block and those of the last local_tokens tokens; a
  smaller budget is a clear error, not a selection that silently drops forced blocks."""
  scores = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 8)), jnp.float32)
  lengths = jnp.asarray([6 * 4 + 1])
  with pytest.raises(ValueError, match="forced ones"):
    sel.select_top_k(scores, lengths, 4, k=1)
  with pytest.raises(ValueError, match="forced ones"):
    sel.select_top_k(scores, lengths, 4, k=2, local_tokens=4)     # 1 + 2 blocks forced
  with pytest.raises(ValueError, match="forced ones"):
    sel.select_threshold(scores, lengths, 4, threshold=0.1, max_blocks=2, local_tokens=4)
  # exactly enough: the first block and the blocks of tokens 21-24 (5 and 6)
  np.testing.assert_array_equal(sel.select_top_k(scores, lengths, 4, k=3, local_tokens=4),
                                [[[0, 5, 6, -1]]])


@pytest.mark.parametrize("seed", range(4))
def test_random_selections_are_valid_index_sets(seed):
  rng = np.random.default_rng(seed)
  B, K, N, bs = 3, 2, 16, 16
  lengths = jnp.asarray(rng.integers(1, N * bs + 1, B))
  scores = jnp.asarray(rng.normal(size=(B, K, N)), jnp.float32)
  for k in (2, 5, 16):
    idx = np.asarray(sel.select_top_k(scores, lengths, bs, k))
    assert idx.shape == (B, K, output_width(k, N)) and idx.dtype == np.int32
    nb = np.asarray(sel.num_blocks(lengths, bs))
    for b in range(B):
      for h in range(K):
        live = idx[b, h][idx[b, h] >= 0]
        assert np.all(np.diff(live) > 0) and np.all(idx[b, h][len(live):] == -1)
        assert len(live) == min(k, nb[b]) and live.max() < nb[b]
        assert 0 in live and nb[b] - 1 in live
        others = [i for i in range(nb[b]) if i not in (0, nb[b] - 1)]
        chosen = [i for i in live if i not in (0, nb[b] - 1)]
        rest = [i for i in others if i not in chosen]
        if chosen and rest:
          assert min(scores[b, h, chosen]) >= max(scores[b, h, rest])


def test_quest_bound_is_an_upper_bound_and_selects_the_needle():
  rng = np.random.default_rng(0)
  B, K, G, S, H, bs = 2, 2, 4, 128, 16, 16
  k = rng.normal(size=(B, K, S, H)).astype(np.float32)
  q = rng.normal(size=(B, K, G, H)).astype(np.float32)
  lengths = np.array([128, 70])
  kmin, kmax = sel.block_minmax(jnp.asarray(k), jnp.asarray(lengths), bs)
  bound = np.asarray(sel.quest_scores(jnp.asarray(q), kmin, kmax))
  for b in range(B):
    for h in range(K):
      for n in range(-(-lengths[b] // bs)):
        toks = k[b, h, n * bs:min((n + 1) * bs, lengths[b])]
        true = (q[b, h] @ toks.T).max()
        assert bound[b, h, n] >= true - 1e-4
  # a planted key aligned with q makes its block the top non-forced choice
  k2 = k.copy()
  k2[:, :, 3 * bs + 5] = 8.0 * q[:, :, 0]
  idx = sel.quest_select(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(lengths), bs, budget_tokens=3 * bs)
  assert all(3 in np.asarray(idx[b, h]) for b in range(B) for h in range(K))
