"""Block-sparse decoding with Quest / gate selectors and ReSA rectification."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import decoding
from effjax.config import ModelConfig
from effjax.model import init_params
from effjax.sparse import gate as gate_lib
from effjax.sparse import resa, selection

CFG = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                  compute_dtype="float32", attention_impl="xla")


def setup(seed=0, B=2, T=40):
  params = init_params(CFG, jax.random.key(seed))
  toks = np.random.default_rng(seed).integers(0, 256, (B, T)).astype(np.int32)
  lengths = np.array([T, T - 13][:B], np.int32)
  return params, jnp.asarray(toks), jnp.asarray(lengths)


@pytest.mark.parametrize("selector", ["quest", "gate"])
def test_full_budget_sparse_generation_equals_dense(selector):
  params, toks, lengths = setup()
  scfg = resa.SparseConfig(selector=selector, block_size=16, budget_tokens=256, rectify_every=0,
                           d_gate=16)
  gp = gate_lib.init_gate_params(CFG, scfg.gate, jax.random.key(1)) if selector == "gate" else None
  dense, _ = decoding.generate(CFG, params, toks, lengths, jax.random.key(0), max_new_tokens=24,
                               decode_impl="xla", cache_dtype=jnp.float32)
  sparse, n = resa.generate(CFG, scfg, params, toks, lengths, jax.random.key(0), gp,
                            max_new_tokens=24, decode_impl="xla", cache_dtype=jnp.float32)
  np.testing.assert_array_equal(sparse, dense)
  np.testing.assert_array_equal(n, [24, 24])


def test_incremental_summaries_match_a_full_recompute():
  params, toks, lengths = setup(2)
  for selector in ("quest", "gate"):
    scfg = resa.SparseConfig(selector=selector, block_size=16, budget_tokens=32, d_gate=16)
    gp = gate_lib.init_gate_params(CFG, scfg.gate, jax.random.key(3))
    cache = decoding.init_cache(CFG, 2, 80, jnp.float32)
    _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
    summ = resa.init_summaries(CFG, scfg, cache, gp)
    for t in range(20):   # crosses block boundaries for both sequences
      _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ,
                                               jnp.asarray([t + 1, t + 7]), gp, decode_impl="xla")
    full = resa.init_summaries(CFG, scfg, cache, gp)
    nb = np.asarray(selection.num_blocks(cache["lengths"], 16))
    for key in full:
      for b in range(2):
        chex.assert_trees_all_close(jnp.stack(summ[key])[:, b, :, :nb[b]], jnp.stack(full[key])[:, b, :, :nb[b]],
                                    rtol=1e-5, atol=1e-5)


def test_rectification_restores_the_dense_cache_after_sparse_steps():
  """Sparse steps at a tight budget leave approximate K/V; extend over the last f tokens makes the
  cache equal to a dense recomputation of the same tokens."""
  params, toks, lengths = setup(4)
  scfg = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=32, rectify_every=8)
  cache = decoding.init_cache(CFG, 2, 80, jnp.float32)
  _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
  summ = resa.init_summaries(CFG, scfg, cache, None)
  fed = np.random.default_rng(5).integers(0, 256, (2, 8)).astype(np.int32)
  for t in range(8):
    _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ, jnp.asarray(fed[:, t]),
                                             decode_impl="xla")
  full = np.concatenate([np.asarray(toks), np.zeros((2, 8), np.int32)], axis=1)
  for b in range(2):
    full[b, lengths[b]:lengths[b] + 8] = fed[b]
  dense = decoding.init_cache(CFG, 2, 80, jnp.float32)
  _, dense = decoding.prefill(CFG, params, jnp.asarray(full), jnp.asarray(np.asarray(lengths) + 8), dense)
  L = np.asarray(lengths)
  tail = lambda c, b: jnp.stack(c["k"])[:, b, :, L[b]:L[b] + 8]
  assert float(jnp.max(jnp.abs(tail(cache, 0) - tail(dense, 0)))) > 1e-3   # sparse drifted
  _, fixed = decoding.extend(CFG, params, cache, jnp.asarray(fed), cache["lengths"] - 8)
  for b in range(2):
    sl = slice(0, int(L[b]) + 8)
    chex.assert_trees_all_close(jnp.stack(fixed["k"])[:, b, :, sl], jnp.stack(dense["k"])[:, b, :, sl], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(jnp.stack(fixed["v"])[:, b, :, sl], jnp.stack(dense["v"])[:, b, :, sl], rtol=1e-4, atol=1e-5)


def test_rectification_reduces_accumulated_cache_error():
  """Teacher-forced decoding of the same tokens: sparse steps leave the generated tokens' K/V off
  the dense values (layer 2 onwards); with a rectification every 4 steps only the 2 steps after the
  last one are off, so after 18 steps the cache error is far smaller than without."""
  params, toks, lengths = setup(6)
  scfg = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=32)
  fed = np.random.default_rng(8).integers(0, 256, (2, 18)).astype(np.int32)
  L = np.asarray(lengths)

  def start():
    cache = decoding.init_cache(CFG, 2, 80, jnp.float32)
    _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
    return cache

  dense = start()
  for t in range(18):
    _, dense = decoding.decode_step(CFG, params, dense, jnp.asarray(fed[:, t]), decode_impl="xla")
  gen = lambda c: jnp.stack([jnp.stack(c["k"])[:, b, :, L[b]:L[b] + 18] for b in range(2)])
  errs = {}
  for f in (0, 4):
    cache = start()
    summ = resa.init_summaries(CFG, scfg, cache)
    for t in range(18):
      _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ,
                                               jnp.asarray(fed[:, t]), decode_impl="xla")
      if f and (t + 1) % f == 0:
        _, cache = decoding.extend(CFG, params, cache, jnp.asarray(fed[:, t + 1 - f:t + 1]),
                                   cache["lengths"] - f)
        summ = resa.init_summaries(CFG, scfg, cache)
    errs[f] = float(jnp.linalg.norm(gen(cache) - gen(dense)) / jnp.linalg.norm(gen(dense)))
  assert errs[0] > 1e-3, errs           # the tight budget really is lossy here
  assert errs[4] < 0.5 * errs[0], errs


def test_resa_generate_is_deterministic_and_shaped():
  params, toks, lengths = setup(6)
  scfg = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=32, rectify_every=4)
  kw = dict(max_new_tokens=20, decode_impl="xla", cache_dtype=jnp.float32, temperature=1.0, top_k=8)
  a, n = resa.generate(CFG, scfg, params, toks, lengths, jax.random.key(3), **kw)
  b, _ = resa.generate(CFG, scfg, params, toks, lengths, jax.random.key(3), **kw)
  assert a.shape == (2, 20) and np.array_equal(a, b) and list(np.asarray(n)) == [20, 20]
