"""KV-cached decoding: prefill + decode_step reproduce the full forward; on-device generation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import decoding
from effjax.cache import DenseKV, KVCache
from effjax.config import ModelConfig
from effjax.model import forward, init_params


def stacked(cache):
  """The per-layer cache as stacked [L, B, K, S, H] arrays (for comparisons)."""
  return {"k": jnp.stack([e.k for e in cache.layers]), "v": jnp.stack([e.v for e in cache.layers]),
          "lengths": cache.lengths}


def cfg_(**kw):
  base = dict(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
              compute_dtype="float32", attention_impl="xla")
  base.update(kw)
  return ModelConfig(**base)


def random_batch(B, T, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (B, T)).astype(np.int32)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_steps_after_prefill_match_full_forward(scan_layers):
  cfg = cfg_(scan_layers=scan_layers)
  params = init_params(cfg, jax.random.key(0))
  B, T, extra = 3, 12, 7
  full = random_batch(B, T + extra, 1)
  lengths = np.array([12, 5, 9], np.int32)   # ragged prompts, right-padded with junk
  prompts = full[:, :T].copy()
  for b in range(B):
    prompts[b, lengths[b]:] = 200 + b        # padding content must not matter
  ref = forward(cfg, params, jnp.asarray(full))  # [B, T+extra, V]
  cache = KVCache.init(cfg, B, T + extra, jnp.float32)
  logits, cache = decoding.prefill(cfg, params, jnp.asarray(prompts), jnp.asarray(lengths), cache)
  for b in range(B):
    chex.assert_trees_all_close(logits[b], ref[b, lengths[b] - 1], rtol=1e-4, atol=1e-4)
  # feed each sequence's true next tokens; positions differ per sequence
  for s in range(extra):
    tok = full[np.arange(B), lengths + s]
    logits, cache = decoding.decode_step(cfg, params, cache, jnp.asarray(tok), decode_impl="xla")
    for b in range(B):
      chex.assert_trees_all_close(logits[b], ref[b, lengths[b] + s], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(cache.lengths, lengths + extra)


def test_bf16_cache_close_to_full_forward():
  cfg = cfg_(compute_dtype="bfloat16")
  params = init_params(cfg, jax.random.key(1))
  full = random_batch(2, 20, 2)
  lengths = np.array([16, 10], np.int32)
  ref = forward(cfg, params, jnp.asarray(full))
  cache = KVCache.init(cfg, 2, 24, jnp.bfloat16)
  _, cache = decoding.prefill(cfg, params, jnp.asarray(full[:, :16]), jnp.asarray(lengths), cache)
  logits, _ = decoding.decode_step(cfg, params, cache, jnp.asarray(full[[0, 1], lengths]),
                                   decode_impl="xla")
  for b in range(2):
    r = ref[b, lengths[b]]
    assert float(jnp.linalg.norm(logits[b] - r) / jnp.linalg.norm(r)) < 3e-2


def test_generate_greedy_matches_host_loop_and_stops():
  cfg = cfg_()
  params = init_params(cfg, jax.random.key(3))
  prompts = random_batch(2, 6, 4)
  lengths = np.array([6, 3], np.int32)
  out, n = decoding.generate(cfg, params, jnp.asarray(prompts), jnp.asarray(lengths),
                             jax.random.key(0), max_new_tokens=10, decode_impl="xla",
                             cache_dtype=jnp.float32)
  assert out.shape == (2, 10) and out.dtype == jnp.int32
  np.testing.assert_array_equal(n, [10, 10])
  # greedy decoding with full forwards on the host: one jitted forward over a fixed 16-token
  # window (causal, so the zero padding after the sequence does not change its logits)
  fwd = jax.jit(lambda t: forward(cfg, params, t))
  for b in range(2):
    seq = list(prompts[b, :lengths[b]])
    for _ in range(10):
      window = np.zeros((1, 16), np.int32)
      window[0, :len(seq)] = seq
      seq.append(int(jnp.argmax(fwd(jnp.asarray(window))[0, len(seq) - 1])))
    np.testing.assert_array_equal(out[b], seq[lengths[b]:])
  # stop at the first generated token of sequence 0: it stops, sequence 1 goes on
  stop = int(out[0, 2])
  out2, n2 = decoding.generate(cfg, params, jnp.asarray(prompts), jnp.asarray(lengths),
                               jax.random.key(0), max_new_tokens=10, stop_tokens=(stop,),
                               decode_impl="xla", cache_dtype=jnp.float32)
  first0 = int(np.argmax(np.asarray(out[0]) == stop))
  assert int(n2[0]) == first0 + 1
  np.testing.assert_array_equal(out2[0, :first0 + 1], out[0, :first0 + 1])
  assert np.all(np.asarray(out2[0, first0 + 1:]) == 256)
  hits1 = np.nonzero(np.asarray(out[1]) == stop)[0]
  expect1 = 10 if len(hits1) == 0 else int(hits1[0]) + 1
  assert int(n2[1]) == expect1


def test_sampling_is_seeded_and_respects_top_k():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
  a = decoding.sample_logits(logits, jax.random.key(1), jnp.float32(1.0), 3)
  b = decoding.sample_logits(logits, jax.random.key(1), jnp.float32(1.0), 3)
  np.testing.assert_array_equal(a, b)
  top3 = np.argsort(-np.asarray(logits), axis=1)[:, :3]
  for _ in range(5):
    s = decoding.sample_logits(logits, jax.random.key(_), jnp.float32(2.0), 3)
    assert all(int(s[i]) in top3[i] for i in range(4))
  g = decoding.sample_logits(logits, jax.random.key(0), jnp.float32(0.0), 0)
  np.testing.assert_array_equal(g, np.argmax(np.asarray(logits), 1))


def test_kv_cache_is_a_typed_pytree():
  """KVCache.init: one DenseKV per layer of [B, K, S, H] zeros in the cache dtype, int32 lengths
  of 0; a pytree whose leaves are those arrays (what the jitted steps take, donate and return)."""
  cfg = cfg_(n_layers=3)
  cache = KVCache.init(cfg, 2, 48, jnp.bfloat16)
  assert len(cache.layers) == 3 and all(isinstance(e, DenseKV) for e in cache.layers)
  assert cache.capacity == 48 and cache.dtype == jnp.bfloat16
  for e in cache.layers:
    assert e.k.shape == e.v.shape == (2, cfg.n_kv_heads, 48, cfg.hd)
    assert e.k.dtype == e.v.dtype == jnp.bfloat16 and not np.any(np.asarray(e.k, np.float32))
  assert cache.lengths.dtype == jnp.int32 and list(np.asarray(cache.lengths)) == [0, 0]
  assert len(jax.tree.leaves(cache)) == 2 * 3 + 1
  doubled = jax.tree.map(lambda x: x + 1, cache)
  assert isinstance(doubled, KVCache) and list(np.asarray(doubled.lengths)) == [1, 1]
  # write: a prefill stores at 0, later tokens at per-sequence offsets
  kv = jnp.arange(2 * 3 * cfg.n_kv_heads * cfg.hd, dtype=jnp.float32).reshape(
      2, 3, cfg.n_kv_heads, cfg.hd)
  e = cache.layers[0].write(kv, -kv, None)
  np.testing.assert_array_equal(np.asarray(e.k[:, :, :3], np.float32),
                                np.asarray(kv.astype(jnp.bfloat16).transpose(0, 2, 1, 3), np.float32))
  e = e.write(kv[:, :1], kv[:, :1], jnp.asarray([3, 10]))
  np.testing.assert_array_equal(np.asarray(e.v[0, :, 3], np.float32),
                                np.asarray(kv[0, 0].astype(jnp.bfloat16), np.float32))
  np.testing.assert_array_equal(np.asarray(e.v[1, :, 10], np.float32),
                                np.asarray(kv[1, 0].astype(jnp.bfloat16), np.float32))
  assert not np.any(np.asarray(e.v[0, :, 4:], np.float32))


def test_cache_capacity_errors():
  cfg = cfg_()
  with pytest.raises(ValueError, match="max_seq_len"):
    KVCache.init(cfg, 1, 65)
  with pytest.raises(ValueError, match="max_new_tokens 60 = 66 tokens do not fit model.max_seq_len=64"):
    decoding.generate(cfg, init_params(cfg, jax.random.key(0)), jnp.zeros((1, 6), jnp.int32),
                      jnp.asarray([6]), jax.random.key(0), max_new_tokens=60)


def test_generation_capacity_rounds_to_whole_kernel_blocks():
  big = cfg_(max_seq_len=1024)
  assert decoding.generation_capacity(big, 6, 10) == 128
  assert decoding.generation_capacity(big, 200, 57) == 384
  assert decoding.generation_capacity(big, 128, 0) == 128
  assert decoding.generation_capacity(big, 100, 10, multiple=96) == 384      # lcm(96, 128)
  # no multiple of 128 fits: the largest capacity within max_seq_len (in whole blocks) instead
  assert decoding.generation_capacity(cfg_(max_seq_len=200), 100, 90) == 200
  assert decoding.generation_capacity(cfg_(max_seq_len=200), 100, 90, multiple=16) == 192
  with pytest.raises(ValueError, match="in whole blocks of 16"):
    decoding.generation_capacity(cfg_(max_seq_len=200), 100, 95, multiple=16)


def _attention_inputs(F, dtype, B=3, N=4, K=2, S=40, H=16):
  rng = np.random.default_rng(11)
  q, k, v = (jnp.asarray(rng.normal(size=sh), dtype)
             for sh in ((B, F, N, H), (B, K, S, H), (B, K, S, H)))
  return q, k, v, jnp.asarray([0, 17, S - F], jnp.int32)


@pytest.mark.parametrize("F", [1, 5])
def test_dense_cached_attention_is_exact_causal_attention(F):
  """The cache's attention (`DenseKV.attend`: decode_attention for one token, extend_attention
  for more) on the CPU path (float32): softmax over positions [0, start_b + i] of each query, per
  GQA group; ragged start positions."""
  q, k, v, start = _attention_inputs(F, jnp.float32)
  out = DenseKV(k, v).attend(q, start, implementation="xla")
  assert out.shape == q.shape and out.dtype == q.dtype
  (B, _, N, H), G = q.shape, q.shape[2] // k.shape[1]
  qf, kf, vf = (np.asarray(x) for x in (q, k, v))
  for b in range(B):
    for i in range(F):
      kv = slice(0, int(start[b]) + i + 1)
      for n in range(N):
        s = kf[b, n // G, kv] @ qf[b, i, n] / np.sqrt(H)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[b, i, n], (p / p.sum()) @ vf[b, n // G, kv],
                                   rtol=1e-4, atol=1e-5)
  # the default implementation (the platform's, then xla) computes the same
  np.testing.assert_allclose(DenseKV(k, v).attend(q, start), out, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["xla", None])
@pytest.mark.parametrize("F", [1, 5])
def test_dense_cached_attention_on_bf16_operands_matches_float32(F, impl):
  """The cache's attention on the GPU with bf16 cache operands (float32 accumulation and
  softmax): the XLA path and the platform default (the Triton kernels) against float32 on the
  same bf16 values."""
  if jax.default_backend() != "gpu":
    pytest.fail("needs a GPU backend (run on a GPU host with -m gpu)")
  q, k, v, start = _attention_inputs(F, jnp.bfloat16)
  attend = lambda q, k, v, start: DenseKV(k, v).attend(q, start, implementation=impl)
  native = jax.jit(attend)(q, k, v, start)
  ref = DenseKV(k.astype(jnp.float32), v.astype(jnp.float32)).attend(
      q.astype(jnp.float32), start, implementation="xla")
  assert native.dtype == jnp.bfloat16 and native.shape == q.shape
  rel = jnp.linalg.norm(native.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
  assert float(rel) < 1e-2, float(rel)


@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas_triton", marks=pytest.mark.gpu)])
def test_extend_rectifies_a_corrupted_cache_to_the_dense_one(impl):
  """ReSA rectification: re-running the last f tokens densely leaves their cache entries equal to a
  dense recomputation, whatever approximate values were there (batch > 1, different positions).
  On the GPU ("pallas_triton") the attention runs through the multi-token Triton kernel, and every
  matmul at "highest" precision: XLA's f32 default there is TF32 (~1e-4 off in the reference)."""
  if impl == "pallas_triton" and jax.default_backend() != "gpu":
    pytest.fail("the Triton extend path needs a GPU backend (run `pytest -m gpu` on a GPU host)")
  with jax.default_matmul_precision("highest"):
    _check_extend_rectifies(impl)


def _check_extend_rectifies(impl):
  cfg = cfg_()
  params = init_params(cfg, jax.random.key(5))
  B, T = 2, 24
  full = random_batch(B, T, 6)
  lengths = np.array([24, 17], np.int32)
  dense = KVCache.init(cfg, B, T, jnp.float32)
  _, dense = decoding.prefill(cfg, params, jnp.asarray(full), jnp.asarray(lengths), dense)
  f = 8
  start = lengths - f
  # a cache whose last f entries (every layer) are wrong, as after sparse decoding
  noise = jax.random.normal(jax.random.key(7), stacked(dense)["k"].shape)   # [L, B, K, S, H]
  pos = np.arange(T)[None, :]
  region = jnp.asarray((pos >= start[:, None]) & (pos < lengths[:, None]))[:, None, :, None]
  bad = KVCache(layers=tuple(DenseKV(jnp.where(region, e.k + noise[i], e.k),
                                     jnp.where(region, e.v - noise[i], e.v))
                             for i, e in enumerate(dense.layers)),
                lengths=dense.lengths)
  assert float(jnp.max(jnp.abs(stacked(bad)["k"] - stacked(dense)["k"]))) > 1.0
  toks = np.stack([full[b, start[b]:start[b] + f] for b in range(B)])
  logits, fixed = decoding.extend(cfg, params, bad, jnp.asarray(toks), jnp.asarray(start),
                                  decode_impl=impl)
  fixed, dense = stacked(fixed), stacked(dense)
  for b in range(B):
    sl = slice(0, int(lengths[b]))
    chex.assert_trees_all_close(fixed["k"][:, b, :, sl], dense["k"][:, b, :, sl], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(fixed["v"][:, b, :, sl], dense["v"][:, b, :, sl], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(fixed["lengths"], lengths)
  ref = forward(cfg, params, jnp.asarray(full))
  for b in range(B):
    chex.assert_trees_all_close(logits[b], ref[b, start[b]:start[b] + f], rtol=1e-4, atol=1e-4)


def test_decoding_evaluations_run_and_are_consistent(tmp_path):
  """drift_eval / retrieval_eval on a tiny model: dense agrees with itself, NLLs are finite, and a
  full-budget sparse decoder is indistinguishable from dense."""
  from effjax import evaluation
  from effjax.config import load_config
  from effjax.sparse import resa
  cfg = load_config("configs/tiny.yaml", ["model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                          "model.n_kv_heads=2", "model.compute_dtype=float32"])
  params = init_params(cfg.model, jax.random.key(0))
  prompts = random_batch(3, 32, 9)
  lengths = np.full((3,), 32, np.int32)
  full = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=256, rectify_every=8)
  d = evaluation.drift_eval(cfg, params, prompts, lengths, new_tokens=16, scfg=full, decode_impl="xla")
  assert d["dense"]["agreement_with_dense"] == 1.0
  for r in d.values():
    assert np.isfinite(r["nll"]) and r["agreement_with_dense"] == 1.0 and r["nll"] == d["dense"]["nll"]
  # teacher-forced: the full-budget decodings score a given continuation like the dense one
  cont = random_batch(3, 16, 12)
  tf = evaluation.teacher_forced_drift(cfg, params, prompts, lengths, cont,
                                       evaluation.drift_runs(full), decode_impl="xla")
  assert set(tf) == {"dense", "sparse", "sparse+rectify(f=8)"}
  for r in tf.values():
    assert abs(r["excess_nll"]) < 1e-4 and r["agreement_with_dense"] == 1.0, r
    assert len(r["excess_nll_by_quarter"]) == 4 and len(r["excess_nll_per_sequence"]) == 3
    assert r["excess_nll_se"] is not None and 0.0 <= r["excess_nll_se"] < 1e-4
  ref_nll = evaluation.continuation_nll(cfg, params, prompts, lengths, cont)
  np.testing.assert_allclose(tf["dense"]["nll"], np.mean(ref_nll), rtol=1e-4)
  assert set(d) == {"dense", "sparse", "sparse+rectify(f=8)"}
  # the batched NLL helper (ragged prompts, chunks with padding) equals one forward per sequence
  rag = np.array([32, 7, 20], np.int32)
  cont = random_batch(3, 5, 11)
  nll = evaluation.continuation_nll(cfg, params, prompts, rag, cont, chunk=2)
  for b in range(3):
    seq = np.concatenate([prompts[b, :rag[b]], cont[b]])[None]
    lp = jax.nn.log_softmax(forward(cfg.model, params, jnp.asarray(seq[:, :-1]))[0, -5:], axis=-1)
    want = -float(jnp.mean(jnp.take_along_axis(lp, jnp.asarray(cont[b])[:, None], 1)))
    assert abs(nll[b] - want) < 1e-5, (b, nll[b], want)
  p, lens, keys = evaluation.passkey_prompts(4, 200, seed=1)
  from effjax.data import ByteTokenizer
  for row, n, k in zip(p, lens, keys):
    text = ByteTokenizer().decode(row[:n])
    assert f"The pass key is {k}." in text and text.endswith("The pass key is ") and n <= 200
  r = evaluation.retrieval_eval(cfg, params, n=4, context_tokens=200, budgets=[64],
                                selectors={"quest": ("quest", None)}, block_size=16, decode_impl="xla")
  assert set(r) == {"dense", "quest@64"} and all(0.0 <= v <= 1.0 for v in r.values())


def test_passkey_accuracy_rows_by_selector_and_budget():
  """evaluation.passkey_accuracy: a dense row, then one row per selector (name -> (kind, gate
  params or None[, further SparseConfig fields])) and budget. With the dense greedy answers as the
  keys, dense scores 1.0; budgets that keep every block generate the dense tokens (1.0 for Quest,
  the gate and the gate over a float32 K-compression cache); a tight budget gives some accuracy
  in [0, 1]."""
  from effjax import evaluation
  from effjax.config import load_config
  from effjax.data import ByteTokenizer
  from effjax.sparse import gate as gate_lib
  cfg = load_config("configs/tiny.yaml", ["model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                          "model.n_kv_heads=2", "model.compute_dtype=float32",
                                          "model.max_seq_len=256"])
  params = init_params(cfg.model, jax.random.key(2))
  prompts, lengths, _ = evaluation.passkey_prompts(3, 120, seed=4)
  dense, _ = decoding.generate(cfg.model, params, jnp.asarray(prompts), jnp.asarray(lengths),
                               jax.random.key(0), max_new_tokens=5, decode_impl="xla")
  keys = [ByteTokenizer().decode(o[:5]) for o in np.asarray(dense)]
  gp = gate_lib.init_gate_params(cfg.model, gate_lib.GateConfig(block_size=16, d_gate=16),
                                 jax.random.key(3))
  selectors = {"quest": ("quest", None), "gate": ("gate", gp),
               "gate-f32": ("gate", gp, {"gate_cache_dtype": "float32"})}
  logs = []
  r = evaluation.passkey_accuracy(cfg, params, prompts, lengths, keys, budgets=[256, 48],
                                  selectors=selectors, block_size=16, decode_impl="xla",
                                  log=logs.append)
  rows = {"dense"} | {f"{n}@{b}" for n in selectors for b in (256, 48)}
  assert set(r) == {"accuracy", "digit_accuracy", "seconds"}
  for part in r.values():
    assert set(part) == rows
  for name in rows:
    full = name == "dense" or name.endswith("@256")
    assert 0.0 <= r["accuracy"][name] <= r["digit_accuracy"][name] <= 1.0, name
    if full:
      assert r["accuracy"][name] == r["digit_accuracy"][name] == 1.0, name
  assert len(logs) == len(rows)


def test_decode_compiler_options_env(monkeypatch):
  monkeypatch.delenv("EFFJAX_DECODE_XLA_OPTIONS", raising=False)
  assert decoding._decode_compiler_options() == {"xla_disable_hlo_passes": "dot-strength-reduction"}
  monkeypatch.setenv("EFFJAX_DECODE_XLA_OPTIONS",
                     "xla_disable_hlo_passes=default;xla_gpu_enable_triton_gemm=false")
  assert decoding._decode_compiler_options() == {"xla_gpu_enable_triton_gemm": False}
  monkeypatch.setenv("EFFJAX_DECODE_XLA_OPTIONS", "enable_triton_gemm")
  with pytest.raises(ValueError, match="xla_name=value"):
    decoding._decode_compiler_options()
