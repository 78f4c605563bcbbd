"""Chunked prefill (`decoding.prefill_chunked`, `generate(prefill_chunk=...)`) equals the one-call
prefill: first-token logits, cache contents and generated tokens, for the bf16 and the int4 cache,
ragged right-padded prompts, chunk sizes that do and do not divide the prompt length."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import decoding
from effjax.config import ModelConfig
from effjax.model import init_params
from effjax.quant.kv import KVCacheSpec, QuantKV

# init_std 0.3: attention shapes the output (at the default 0.02 greedy decoding repeats a token)
CFG = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=128, compute_dtype="float32", attention_impl="xla", init_std=0.3)
B, T, CAP = 3, 48, 128
# group 16, window 32: prompts of 47 / 9 / 45 tokens leave 15 / 9 / 13 rows in the residual
# window, so every sequence flushes it during 26 decode steps
SPECS = {"bf16": KVCacheSpec("bf16"), "float32": KVCacheSpec("float32"),
         "int4": KVCacheSpec("int4", group=16, window=32)}
LENGTHS = np.array([47, 9, 45], np.int32)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def prompts():
  toks = np.random.default_rng(1).integers(0, 256, (B, T)).astype(np.int32)
  for b in range(B):
    toks[b, LENGTHS[b]:] = 200 + b          # right padding
  return jnp.asarray(toks), jnp.asarray(LENGTHS)


def assert_quant_close(got: QuantKV, want: QuantKV, lengths):
  """Same packed/residual split, scales and zeros close, the dequantised valid rows equal up to
  float rounding: a rounding-level change of a K/V value may move a code across its rounding
  boundary, so a few elements (< 0.5%) may differ by one quantisation step."""
  np.testing.assert_array_equal(got.packed_B, want.packed_B)
  chex.assert_trees_all_close((got.k_scale, got.k_zero, got.v_scale, got.v_zero),
                              (want.k_scale, want.k_zero, want.v_scale, want.v_zero),
                              rtol=1e-2, atol=1e-5)
  step = max(float(jnp.max(got.k_scale)), float(jnp.max(got.v_scale)))
  for g, w in zip(got.dequantize(), want.dequantize()):
    d = np.concatenate([np.abs(np.asarray(g[b, :, :n] - w[b, :, :n], np.float32)).ravel()
                        for b, n in enumerate(lengths)])
    assert d.max() <= 1.01 * step and np.mean(d > 1e-4) < 5e-3, (d.max(), np.mean(d > 1e-4))


# float32: the chunks run in the cache itself; bf16 (narrower than the float32 compute) and int4:
# over a float32 copy of the prompt rows, then written to the cache once
@pytest.mark.parametrize("kind", [pytest.param("float32", marks=pytest.mark.slow), "bf16", "int4"])
def test_chunked_prefill_matches_one_call(params, kind):
  toks, lengths = prompts()
  spec = SPECS[kind]
  want_logits, want = decoding.prefill(CFG, params, toks, lengths, spec.init(CFG, B, CAP))
  for chunk in (16, 20):                      # divides T = 48; does not (16 + 16 + 16 / 20 + 20 + 8)
    logits, got = decoding.prefill_chunked(CFG, params, toks, lengths, spec.init(CFG, B, CAP),
                                           chunk, "xla")
    chex.assert_trees_all_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.lengths, LENGTHS)
    if kind != "int4":   # every row, the prompts' padding included (bf16: one rounding step)
      tol = 1e-2 if kind == "bf16" else 1e-4
      chex.assert_trees_all_close(got.layers, want.layers, rtol=tol, atol=tol)
    else:
      for g, w in zip(got.layers, want.layers):
        assert_quant_close(g, w, LENGTHS)


@pytest.mark.parametrize("kind", [pytest.param("bf16", marks=pytest.mark.slow), "int4"])
def test_generate_with_prefill_chunk_matches_one_call(params, kind):
  toks, lengths = prompts()
  run = lambda chunk: decoding.generate(CFG, params, toks, lengths, jax.random.key(0),
                                        max_new_tokens=26, decode_impl="xla",
                                        kv_cache=SPECS[kind], prefill_chunk=chunk)
  want, chunked = run(None), run(20)
  assert len(set(np.asarray(want[0][0]).tolist())) > 5    # not a repeated token
  chex.assert_trees_all_equal(chunked, want)


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True, "16"])
def test_invalid_prefill_chunk(params, chunk):
  toks, lengths = prompts()
  with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
    decoding.generate(CFG, params, toks, lengths, jax.random.key(0), max_new_tokens=2,
                      prefill_chunk=chunk)
  with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
    decoding.prefill_chunked(CFG, params, toks, lengths, SPECS["bf16"].init(CFG, B, CAP), chunk)
