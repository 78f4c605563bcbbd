"""Block-sparse decoding with Quest / gate selectors and ReSA rectification."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import decoding
from effjax.cache import BlockMinMax, GateKCache, KVCache
from effjax.config import ModelConfig
from effjax.model import forward, init_params
from effjax.sparse import gate as gate_lib
from effjax.sparse import resa, selection

CFG = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                  compute_dtype="float32", attention_impl="xla")


def keys(cache):
  """The cache's keys stacked over layers: [L, B, K, S, H]."""
  return jnp.stack([e.k for e in cache.layers])


def values(cache):
  return jnp.stack([e.v for e in cache.layers])


def fields(summ):
  """Per-layer summaries as {field: [L, B, K, Nb, ...]}: kmin / kmax (Quest) or kc (gate)."""
  names = [f.name for f in dataclasses.fields(summ[0])]
  return {n: jnp.stack([getattr(s, n) for s in summ]) for n in names}


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
    cache = KVCache.init(CFG, 2, 80, jnp.float32)
    _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
    summ = resa.init_summaries(CFG, scfg, cache, gp)
    for t in range(20):   # crosses block boundaries for both sequences
      _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ,
                                               jnp.asarray([t + 1, t + 7]), gp, decode_impl="xla")
    full = resa.init_summaries(CFG, scfg, cache, gp)
    kind = BlockMinMax if selector == "quest" else GateKCache
    assert isinstance(summ, tuple) and len(summ) == CFG.n_layers
    assert all(isinstance(x, kind) for x in summ + full)
    nb = np.asarray(selection.num_blocks(cache.lengths, 16))
    summ, full = fields(summ), fields(full)
    assert set(full) == ({"kmin", "kmax"} if selector == "quest" else {"kc"})
    for key in full:
      for b in range(2):
        chex.assert_trees_all_close(summ[key][:, b, :, :nb[b]], full[key][:, b, :, :nb[b]],
                                    rtol=1e-5, atol=1e-5)


def test_rectification_restores_the_dense_cache_after_sparse_steps():
  """Sparse steps at a tight budget leave approximate K/V; extend over the last f tokens makes the
  cache equal to a dense recomputation of the same tokens."""
  params, toks, lengths = setup(4)
  scfg = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=32, rectify_every=8)
  cache = KVCache.init(CFG, 2, 80, jnp.float32)
  _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
  summ = resa.init_summaries(CFG, scfg, cache, None)
  fed = np.random.default_rng(5).integers(0, 256, (2, 8)).astype(np.int32)
  for t in range(8):
    _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ, jnp.asarray(fed[:, t]),
                                             decode_impl="xla")
  full = np.concatenate([np.asarray(toks), np.zeros((2, 8), np.int32)], axis=1)
  for b in range(2):
    full[b, lengths[b]:lengths[b] + 8] = fed[b]
  dense = KVCache.init(CFG, 2, 80, jnp.float32)
  _, dense = decoding.prefill(CFG, params, jnp.asarray(full), jnp.asarray(np.asarray(lengths) + 8), dense)
  L = np.asarray(lengths)
  tail = lambda c, b: keys(c)[:, b, :, L[b]:L[b] + 8]
  assert float(jnp.max(jnp.abs(tail(cache, 0) - tail(dense, 0)))) > 1e-3   # sparse drifted
  _, fixed = decoding.extend(CFG, params, cache, jnp.asarray(fed), cache.lengths - 8)
  for b in range(2):
    sl = slice(0, int(L[b]) + 8)
    chex.assert_trees_all_close(keys(fixed)[:, b, :, sl], keys(dense)[:, b, :, sl], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(values(fixed)[:, b, :, sl], values(dense)[:, b, :, sl], rtol=1e-4, atol=1e-5)


def test_rectification_reduces_accumulated_cache_error():
  """Teacher-forced decoding of the same tokens: sparse steps leave the generated tokens' K/V off
  the dense values (layer 2 onwards); with a rectification every 4 steps only the 2 steps after the
  last one are off, so after 18 steps the cache error is far smaller than without."""
  params, toks, lengths = setup(6)
  scfg = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=32)
  fed = np.random.default_rng(8).integers(0, 256, (2, 18)).astype(np.int32)
  L = np.asarray(lengths)

  def start():
    cache = KVCache.init(CFG, 2, 80, jnp.float32)
    _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
    return cache

  dense = start()
  for t in range(18):
    _, dense = decoding.decode_step(CFG, params, dense, jnp.asarray(fed[:, t]), decode_impl="xla")
  gen = lambda c: jnp.stack([keys(c)[:, b, :, L[b]:L[b] + 18] for b in range(2)])
  errs = {}
  for f in (0, 4):
    cache = start()
    summ = resa.init_summaries(CFG, scfg, cache)
    for t in range(18):
      _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ,
                                               jnp.asarray(fed[:, t]), decode_impl="xla")
      if f and (t + 1) % f == 0:
        _, cache = decoding.extend(CFG, params, cache, jnp.asarray(fed[:, t + 1 - f:t + 1]),
                                   cache.lengths - f)
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


def _host_generate(params, toks, lengths, scfg, max_new_tokens, temperature, rng, stop_tokens=(),
                   gp=None):
  """ReSA generation as a host loop of the jitted pieces (same sampling keys as `resa.generate`),
  rectifying after steps f, 2f, ... below max_new_tokens with a full `init_summaries`: the
  reference for the on-device loop."""
  B, T = toks.shape
  f, pad = scfg.rectify_every, 256
  cap = decoding.generation_capacity(CFG, T, max_new_tokens, multiple=scfg.block_size)
  cache = KVCache.init(CFG, B, cap, jnp.float32)
  logits, cache = decoding.prefill(CFG, params, toks, lengths, cache)
  summ = resa.init_summaries(CFG, scfg, cache, gp)
  out = np.full((B, max_new_tokens), pad, np.int32)
  done, n, fed = np.zeros(B, bool), np.zeros(B, np.int32), []
  for step in range(max_new_tokens):
    if done.all():
      break
    rng, sub = jax.random.split(rng)
    tok = np.asarray(decoding.sample_logits(logits, sub, jnp.float32(temperature), 0))
    tok = np.where(done, pad, tok).astype(np.int32)
    out[:, step] = tok
    n += ~done
    done = done | np.isin(tok, stop_tokens)
    fed.append(np.where(done, 0, tok).astype(np.int32))
    logits, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ, jnp.asarray(fed[-1]),
                                                  gp, decode_impl="xla")
    if f and (step + 1) % f == 0 and step + 1 < max_new_tokens:
      lg, cache = decoding.extend(CFG, params, cache, jnp.asarray(np.stack(fed[-f:], 1)),
                                  cache.lengths - f)
      summ, logits = resa.init_summaries(CFG, scfg, cache, gp), lg[:, -1]
  return out, n


@pytest.mark.parametrize("selector", ["quest", "gate"])
def test_generate_rectifies_in_chunks_like_a_host_loop(selector):
  """Batch of 2 with different prompt lengths, max_new_tokens (11) not a multiple of f (4): the
  on-device chunked loop (rectify after steps 4 and 8, summaries refreshed only where rewritten)
  gives the host loop's tokens, also when one sequence stops early; f > max_new_tokens never
  rectifies. Low-temperature sampling: greedy tokens of this random model repeat one token and do
  not react to the rectifications; these do. (Whether a rectification flips a sampled token of a
  random model depends on its weights: seed 0 is one where it does.)"""
  params, toks, lengths = setup(0)
  scfg = resa.SparseConfig(selector=selector, block_size=16, budget_tokens=32, rectify_every=4,
                           d_gate=16)
  gp = gate_lib.init_gate_params(CFG, scfg.gate, jax.random.key(2)) if selector == "gate" else None
  key, temp = jax.random.key(0), 0.2
  kw = dict(max_new_tokens=11, temperature=temp, decode_impl="xla", cache_dtype=jnp.float32)
  out, n = resa.generate(CFG, scfg, params, toks, lengths, key, gp, **kw)
  ref, ref_n = _host_generate(params, toks, lengths, scfg, 11, temp, key, gp=gp)
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(n, ref_n)
  plain = dataclasses.replace(scfg, rectify_every=0)
  unrect, _ = _host_generate(params, toks, lengths, plain, 11, temp, key, gp=gp)
  assert not np.array_equal(unrect, ref)     # the rectifications change tokens here
  if selector == "gate":                     # the loop logic below does not depend on the selector
    return
  # sequence 0 stops at its 6th token; the later chunks go on for sequence 1
  stop = int(ref[0, 5])
  out_s, n_s = resa.generate(CFG, scfg, params, toks, lengths, key, gp, stop_tokens=(stop,), **kw)
  ref_s, ref_ns = _host_generate(params, toks, lengths, scfg, 11, temp, key, stop_tokens=(stop,), gp=gp)
  np.testing.assert_array_equal(out_s, ref_s)
  np.testing.assert_array_equal(n_s, ref_ns)
  assert int(n_s[0]) <= 6 and int(n_s[1]) > 6
  # f > max_new_tokens: no rectification at all (this used to fail to trace)
  late = dataclasses.replace(scfg, rectify_every=32)
  out_l, _ = resa.generate(CFG, late, params, toks, lengths, key, gp, **kw)
  np.testing.assert_array_equal(out_l, unrect)


@pytest.mark.parametrize("selector", ["quest", "gate"])
def test_refreshed_summaries_after_rectification_equal_a_full_recompute(selector):
  """After sparse steps and a rectification of the last f = 20 tokens (more than a block, not a
  multiple of it, at per-sequence offsets), refreshing only the rewritten blocks of the stale
  summaries gives `init_summaries` of the rectified cache. Positions 60..79 and 47..66 both span
  3 blocks (ceil(f / 16) + 1); sequence 0's window (from block 3) is clamped to end at the cache's
  last block."""
  params, toks, lengths = setup(3, T=60)
  f = 20
  scfg = resa.SparseConfig(selector=selector, block_size=16, budget_tokens=32, rectify_every=f,
                           d_gate=16)
  gp = gate_lib.init_gate_params(CFG, scfg.gate, jax.random.key(4))
  cache = KVCache.init(CFG, 2, 80, jnp.float32)   # 5 blocks; lengths end at 80 and 67
  _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
  summ = resa.init_summaries(CFG, scfg, cache, gp)
  fed = np.random.default_rng(9).integers(0, 256, (2, f)).astype(np.int32)
  for t in range(f):
    _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ, jnp.asarray(fed[:, t]),
                                             gp, decode_impl="xla")
  start = cache.lengths - f
  _, cache = decoding.extend(CFG, params, cache, jnp.asarray(fed), start)
  full = resa.init_summaries(CFG, scfg, cache, gp)
  refreshed = resa.refresh_summaries(CFG, scfg, summ, cache, start, f, gp)
  nb = np.asarray(selection.num_blocks(cache.lengths, 16))
  assert len(refreshed) == len(full) == CFG.n_layers
  assert all(type(r) is type(x) for r, x in zip(refreshed, full))
  summ, full, refreshed = fields(summ), fields(full), fields(refreshed)
  valid = lambda s, b: s[:, b, :, :nb[b]]
  for key in full:
    stale = max(float(jnp.max(jnp.abs(valid(summ[key], b) - valid(full[key], b)))) for b in range(2))
    assert stale > 1e-4, (key, stale)      # the rectification did change some summaries
    for b in range(2):
      chex.assert_trees_all_close(valid(refreshed[key], b), valid(full[key], b), rtol=1e-5, atol=1e-5)
      chex.assert_shape(refreshed[key][0], full[key][0].shape)


def test_low_precision_gate_caches_keep_their_dtype_and_nearly_the_same_choice():
  """gate_cache_dtype="bfloat16" / "float8_e4m3fn": the K-compression cache is stored (and kept
  through decode steps) in that dtype, after a prefill equal to the float32 cache converted; the
  blocks it picks are those of the f32 cache but for near-ties."""
  params, toks, lengths = setup(4)
  # block 8, budget 3 blocks of the 6 / 5 the sequences fill: one real choice besides the forced two
  base = resa.SparseConfig(selector="gate", block_size=8, budget_tokens=24, d_gate=16)
  gp = gate_lib.init_gate_params(CFG, base.gate, jax.random.key(5))
  picks = {}
  caches = {}
  lows = ("bfloat16", "float8_e4m3fn")
  for dt in ("float32", *lows):
    scfg = dataclasses.replace(base, gate_cache_dtype=dt)
    cache = KVCache.init(CFG, 2, 80, jnp.float32)
    _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
    summ = resa.init_summaries(CFG, scfg, cache, gp)
    # of the prefilled cache (decode steps differ once choices do); copied: the steps donate it
    caches[dt] = [np.asarray(s.kc.astype(jnp.float32)) for s in summ]
    for t in range(6):
      _, cache, summ = resa.sparse_decode_step(CFG, scfg, params, cache, summ,
                                               jnp.asarray([t + 1, t + 7]), gp, decode_impl="xla")
    assert all(s.kc.dtype == jnp.dtype(dt) for s in summ)
    q = jax.random.normal(jax.random.key(9), (2, 2, 2, CFG.hd))
    idx, _ = resa._select(scfg, CFG, summ[0], q, cache.lengths, gp["wq"][0], decode_impl="xla")
    picks[dt] = np.asarray(idx)
  for low in lows:
    for kc32, kc_low in zip(caches["float32"], caches[low]):
      np.testing.assert_array_equal(np.asarray(gate_lib.to_cache_dtype(kc32, low), np.float32),
                                    kc_low)
    agree = np.mean(picks["float32"] == picks[low])
    assert agree >= 0.9, (low, agree, picks)
  with pytest.raises(ValueError, match="gate_cache_dtype"):
    resa.SparseConfig(selector="gate", gate_cache_dtype="float16")


def test_sparse_kernel_must_be_an_implementation():
  assert resa.SparseConfig(sparse_kernel="pallas_mosaic_gpu").sparse_kernel == "pallas_mosaic_gpu"
  with pytest.raises(ValueError, match="sparse_kernel"):
    resa.SparseConfig(sparse_kernel="cuda")


def test_float8_gate_cache_saturates_instead_of_nan():
  """float8_e4m3fn has no inf and XLA turns values past its range into NaN: the cache
  conversion clips to +-448, so an outlying block key keeps a finite (extreme) score."""
  kc = jnp.asarray([[0.3, -2.0, 1000.0, -5e4, 448.0, 1e-3]], jnp.float32)
  got = np.asarray(gate_lib.to_cache_dtype(kc, "float8_e4m3fn").astype(jnp.float32))
  assert np.all(np.isfinite(got)), got
  np.testing.assert_array_equal(got[0, 2:5], [448.0, -448.0, 448.0])
  np.testing.assert_allclose(got[0, :2], [0.3, -2.0], rtol=2 ** -4)   # 3 mantissa bits
  assert np.isnan(np.asarray(kc.astype(jnp.float8_e4m3fn).astype(jnp.float32))[0, 2])  # unclipped
  with pytest.raises(ValueError, match="gate cache dtype"):
    gate_lib.to_cache_dtype(kc, "float16")


def test_score_continuation_follows_generate_and_the_dense_forward():
  """Teacher-forced scoring runs generate's steps: fed generate's own greedy tokens (tight budget,
  rectification every 4 steps) its argmax is those tokens; dense scoring gives the full forward's
  log-probs of the continuation; SparseConfig.rectify_logits "dense" / "sparse" (below). (A
  budget that keeps every block scores like dense: test_decoding's teacher_forced_drift check.)"""
  params, toks, lengths = setup(7)
  kw = dict(decode_impl="xla", cache_dtype=jnp.float32)
  scfg = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=32, rectify_every=4)
  cont, _ = resa.generate(CFG, scfg, params, toks, lengths, jax.random.key(0), max_new_tokens=14, **kw)
  lp_tight, am = resa.score_continuation(CFG, scfg, params, toks, lengths, cont, **kw)
  np.testing.assert_array_equal(am, cont)
  lp_dense, am_dense = resa.score_continuation(CFG, scfg, params, toks, lengths, cont, sparse=False, **kw)
  L = np.asarray(lengths)
  for b in range(2):
    seq = jnp.concatenate([toks[b, :L[b]], cont[b]])[None]
    logp = jax.nn.log_softmax(forward(CFG, params, seq)[0, L[b] - 1:-1].astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(lp_dense[b], logp[jnp.arange(14), cont[b]], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(am_dense[b], jnp.argmax(logp, axis=-1))
  assert float(jnp.max(jnp.abs(lp_tight - lp_dense))) > 1e-3     # the tight budget is lossy here
  with pytest.raises(ValueError, match="cont_BN"):
    resa.score_continuation(CFG, scfg, params, toks, lengths, cont[:1], **kw)
  # Where the next token's logits come from after a rectification. "dense" (ReSA): positions
  # s = k f are scored from the rectifying dense forward over a dense-exact cache, so they equal
  # dense decoding (and f = 1 is dense decoding); teacher_forced_drift's off-f split leaves them
  # out. "sparse" with f = 1: every step is a sparse step over a dense-exact cache -- one sparse
  # step after a dense prefill of the same prefix.
  import dataclasses
  from effjax import evaluation
  N = 14
  score = lambda c, **k: np.asarray(resa.score_continuation(CFG, c, params, toks, lengths, cont,
                                                            **k, **kw)[0])
  dense, rect = np.asarray(lp_dense), np.asarray(lp_tight)
  on = np.arange(N) % 4 == 0                      # s = 0 (prefill) and s = 4, 8, 12
  np.testing.assert_allclose(rect[:, on], dense[:, on], rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(rect[:, ~on] - dense[:, ~on])) > 1e-3
  np.testing.assert_allclose(score(dataclasses.replace(scfg, rectify_every=1)), dense,
                             rtol=1e-4, atol=1e-4)
  cache_only = score(dataclasses.replace(scfg, rectify_every=1, rectify_logits="sparse"))
  assert np.max(np.abs(cache_only[:, 1:] - dense[:, 1:])) > 1e-3
  for s in (1, 6, 13):
    prefix = np.zeros((2, int(L.max()) + N), np.int32)           # one shape: one compile
    for b in range(2):
      prefix[b, :L[b] + s - 1] = np.concatenate([np.asarray(toks[b, :L[b]]), np.asarray(cont[b, :s - 1])])
    cache = KVCache.init(CFG, 2, 96, jnp.float32)
    _, cache = decoding.prefill(CFG, params, jnp.asarray(prefix), jnp.asarray(L + s - 1), cache)
    summ = resa.init_summaries(CFG, scfg, cache)
    logits, _, _ = resa.sparse_decode_step(CFG, scfg, params, cache, summ, cont[:, s - 1],
                                           decode_impl="xla")
    want = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[jnp.arange(2), cont[:, s]]
    np.testing.assert_allclose(cache_only[:, s], want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="rectify_logits"):
    resa.SparseConfig(rectify_logits="oracle")
  # teacher_forced_drift's split: per-position means and the off-f per-sequence means agree with
  # the totals; the dense-logit positions of the rectified run carry no excess
  runs = {"dense": None, "rect": (scfg, None),
          "cache": (dataclasses.replace(scfg, rectify_every=2, rectify_logits="sparse"), None)}
  tf = evaluation.teacher_forced_drift(CFG, params, toks, lengths, cont, runs, decode_impl="xla")
  off = np.arange(N) % 4 != 0
  for name, r in tf.items():
    pp = np.asarray(r["excess_nll_per_position"])
    assert pp.shape == (N,) and abs(pp.mean() - r["excess_nll"]) < 1e-5
    assert set(r["excess_nll_per_sequence_off"]) == {"4"}          # the "sparse"-logit run adds none
    np.testing.assert_allclose(np.mean(r["excess_nll_per_sequence_off"]["4"]), pp[off].mean(),
                               atol=1e-5)
  rect_pp = np.asarray(tf["rect"]["excess_nll_per_position"])
  assert np.max(np.abs(rect_pp[~off])) < 1e-3 < np.max(np.abs(rect_pp[off]))


@pytest.mark.parametrize("selector", ["quest", "gate"])
def test_local_tokens_keep_the_recent_blocks(selector):
  """SparseConfig.local_tokens reaches the selection of both selectors (top-k and threshold):
  the blocks holding the last local_tokens tokens are always among the picks; budgets that
  cannot hold them fail at construction."""
  import dataclasses
  params, toks, lengths = setup(3)
  scfg = resa.SparseConfig(selector=selector, block_size=8, budget_tokens=40, d_gate=16,
                           local_tokens=12)
  gp = gate_lib.init_gate_params(CFG, scfg.gate, jax.random.key(2)) if selector == "gate" else None
  cache = KVCache.init(CFG, 2, 80, jnp.float32)
  lengths = jnp.asarray([57, 66], jnp.int32)          # 1 and 2 tokens past a block boundary
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 66)), jnp.int32)
  _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
  summ = resa.init_summaries(CFG, scfg, cache, resa.per_layer(gp))
  summ_l = summ[0]
  q = jax.random.normal(jax.random.key(9), (2, 2, 2, CFG.hd))
  wq = None if gp is None else gp["wq"][0]
  wants = [{0, 5, 6, 7}, {0, 6, 7, 8}]                 # the first block + tokens L-12 .. L-1
  for c in (scfg, dataclasses.replace(scfg, threshold=0.5)) if selector == "gate" else (scfg,):
    idx, _ = resa._select(c, CFG, summ_l, q, lengths, wq, decode_impl="xla")
    plain, _ = resa._select(dataclasses.replace(c, local_tokens=1), CFG, summ_l, q, lengths, wq,
                            decode_impl="xla")
    idx, plain = np.asarray(idx), np.asarray(plain)
    for b, want in enumerate(wants):
      for h in range(2):
        assert want <= set(idx[b, h].tolist()), (c.threshold, b, h, idx[b, h])
    # the plain rule (current block only) leaves some of them out here
    assert not all(wants[b] <= set(plain[b, h].tolist()) for b in range(2) for h in range(2))
  with pytest.raises(ValueError, match="local_tokens"):
    resa.SparseConfig(block_size=8, budget_tokens=24, local_tokens=20)
  with pytest.raises(ValueError, match="local_tokens"):
    resa.SparseConfig(local_tokens=0)


def test_gate_params_are_checked_before_compute():
  """selector='gate' with missing, incomplete or mis-shaped gate params fails with a message that
  names the problem, in every entry point; dense runs of the same config need none."""
  params, toks, lengths = setup(2)
  scfg = resa.SparseConfig(selector="gate", block_size=8, budget_tokens=24, d_gate=16)
  good = gate_lib.init_gate_params(CFG, scfg.gate, jax.random.key(5))
  wrong_dg = gate_lib.init_gate_params(CFG, gate_lib.GateConfig(block_size=8, d_gate=32),
                                       jax.random.key(5))
  cases = [(None, "needs gate_params"), ({"wq": good["wq"]}, "'wq' and 'wk'"),
           (wrong_dg, r"gate_params\['wq'\] must be .*d_gate=16"),
           ({"wq": good["wq"][:1], "wk": good["wk"]}, r"gate_params\['wq'\] must be \[L=2"),
           (resa.per_layer({"wq": good["wq"], "wk": good["wk"][:, :, :5]}), r"gate_params\['wk'\]")]
  cache = KVCache.init(CFG, 2, 80, jnp.float32)
  _, cache = decoding.prefill(CFG, params, toks, lengths, cache)
  for gp, msg in cases:
    with pytest.raises(ValueError, match=msg):
      resa.init_summaries(CFG, scfg, cache, gp)
    with pytest.raises(ValueError, match=msg):
      resa.generate(CFG, scfg, params, toks, lengths, jax.random.key(0), gp, max_new_tokens=2,
                    decode_impl="xla")
  with pytest.raises(ValueError, match="needs gate_params"):
    resa.sparse_decode_step(CFG, scfg, params, cache, (), jnp.asarray([1, 2]), None,
                            decode_impl="xla")
  # a per-layer tuple of the right shapes passes; a dense run needs no gate
  resa.init_summaries(CFG, scfg, cache, resa.per_layer(good))
  out, n = resa.generate(CFG, scfg, params, toks, lengths, jax.random.key(0), None, max_new_tokens=2,
                         decode_impl="xla", sparse=False)
  assert out.shape == (2, 2) and np.all(np.asarray(n) == 2)
