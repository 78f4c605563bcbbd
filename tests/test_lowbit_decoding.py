"""Generation, teacher-forced scoring and ReSA over a 4 / 2-bit KV cache (`KVCacheSpec`)."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import decoding
from effjax.config import ModelConfig
from effjax.model import init_params
from effjax.quant.kv import KVCacheSpec, QuantKV
from effjax.sparse import resa

CFG = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=256, compute_dtype="float32")


@pytest.fixture(scope="module")
def setup():
  params = init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(0, 256, (2, 80)), jnp.int32)
  lengths = jnp.asarray([80, 45], jnp.int32)
  cont = jnp.asarray(rng.integers(0, 256, (2, 60)), jnp.int32)
  return params, prompts, lengths, cont


def score(setup, kv_cache, sparse=False, scfg=None):
  params, prompts, lengths, cont = setup
  scfg = scfg or resa.SparseConfig(rectify_every=0)
  lp, _ = resa.score_continuation(CFG, scfg, params, prompts, lengths, cont, sparse=sparse,
                                  decode_impl="xla", kv_cache=kv_cache)
  return np.asarray(lp)


def test_spec_validates_before_compute():
  with pytest.raises(ValueError, match="kv cache must be one of"):
    KVCacheSpec("int3")
  with pytest.raises(ValueError, match="window must be a positive multiple of group"):
    KVCacheSpec("int4", group=32, window=48)
  assert KVCacheSpec("int4", group=32).capacity_multiple == 32
  assert KVCacheSpec("bf16").capacity_multiple == 1


def test_low_bit_caches_score_close_to_the_dense_cache(setup):
  """Teacher-forced NLL through the cache: int4 within a small margin of bf16, int2 further
  off, and a cache that is really packed (groups of 16 tokens, windows of 32 / 64)."""
  dense = score(setup, None)
  nll = {k: -score(setup, KVCacheSpec(k, group=16, window=w)).mean()
         for k, w in (("int4", 32), ("int2", 64))}
  base = -dense.mean()
  assert abs(nll["int4"] - base) < 0.02 * base, (nll, base)
  assert abs(nll["int2"] - base) < 0.2 * base, (nll, base)
  assert abs(nll["int4"] - base) < abs(nll["int2"] - base) + 1e-3
  params, prompts, lengths, _ = setup
  cache = KVCacheSpec("int4", group=16, window=32).init(CFG, 2, 256)
  _, cache = decoding.prefill(CFG, params, prompts, lengths, cache)
  entry = cache.layers[0]
  assert isinstance(entry, QuantKV)
  np.testing.assert_array_equal(np.asarray(entry.packed_B), [80, 32])   # full groups of 16


def test_generate_and_sparse_resa_run_on_a_low_bit_cache(setup):
  params, prompts, lengths, _ = setup
  spec = KVCacheSpec("int4", group=16, window=32, flush="layer")
  out, n = decoding.generate(CFG, params, prompts, lengths, jax.random.key(0), max_new_tokens=20,
                             decode_impl="xla", kv_cache=spec)
  ref, _ = decoding.generate(CFG, params, prompts, lengths, jax.random.key(0), max_new_tokens=20,
                             decode_impl="xla")
  assert out.shape == (2, 20) and np.all(np.asarray(n) == 20)
  assert np.mean(np.asarray(out) == np.asarray(ref)) > 0.5   # greedy paths mostly agree
  scfg = resa.SparseConfig(selector="quest", block_size=16, budget_tokens=64, rectify_every=8)
  out, n = resa.generate(CFG, scfg, params, prompts, lengths, jax.random.key(0),
                         max_new_tokens=20, decode_impl="xla", kv_cache=spec)
  assert out.shape == (2, 20) and np.all(np.asarray(n) == 20)
  lp = score(setup, spec, sparse=True, scfg=scfg)
  assert np.all(np.isfinite(lp))
  # one write decision a step for all layers (sparse steps and rectifications): the same tokens
  # and, teacher-forced, bit-for-bit the same log-probs
  step, _ = resa.generate(CFG, scfg, params, prompts, lengths, jax.random.key(0),
                          max_new_tokens=20, decode_impl="xla",
                          kv_cache=dataclasses.replace(spec, flush="step"))
  np.testing.assert_array_equal(np.asarray(step), np.asarray(out))
  np.testing.assert_array_equal(score(setup, dataclasses.replace(spec, flush="step"), sparse=True,
                                      scfg=scfg), lp)
