import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig
from effjax.model import apply_rope, forward, init_params, rope_tables
from pallas_kernels.causal_attention import attention_reference, causal_attention

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def naive_attention(q, k, v, causal=True):
  """Loop over heads in float64 numpy: the textbook definition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  out = np.zeros((B, T, N, H))
  for n in range(N):
    kv = n // (N // K)
    s = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, kv]) / np.sqrt(H)
    if causal:
      mask = np.arange(S)[None, :] <= (np.arange(T)[:, None] + S - T)
      s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, :, n] = np.einsum("bts,bsh->bth", p, v[:, :, kv])
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 13, 4, 2, 16), (1, 33, 8, 8, 32), (3, 7, 6, 1, 8)])
def test_attention_reference_matches_naive(dtype, shape):
  B, T, N, K, H = shape
  kq, kk, kv = jax.random.split(jax.random.key(sum(shape)), 3)
  q = jax.random.normal(kq, (B, T, N, H), dtype)
  k = jax.random.normal(kk, (B, T, K, H), dtype)
  v = jax.random.normal(kv, (B, T, K, H), dtype)
  out = causal_attention(q, k, v, implementation="xla")
  assert out.dtype == dtype
  chex.assert_trees_all_close(np.asarray(out, np.float64), naive_attention(q, k, v), **TOL[dtype])
  # the default implementation (platform default, then xla) is the same function here
  chex.assert_trees_all_close(np.asarray(causal_attention(q, k, v), np.float64),
                              naive_attention(q, k, v), **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_reference_with_more_keys_than_queries(dtype):
  """attention_reference's causal mask aligns the last query with the last key (the queries
  are the final T of S positions)."""
  B, T, S, N, K, H = 2, 5, 19, 4, 2, 16
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (B, T, N, H), dtype)
  k = jax.random.normal(kk, (B, S, K, H), dtype)
  v = jax.random.normal(kv, (B, S, K, H), dtype)
  out = attention_reference(q, k, v, causal=True)
  assert out.dtype == dtype and out.shape == (B, T, N, H)
  chex.assert_trees_all_close(np.asarray(out, np.float64), naive_attention(q, k, v), **TOL[dtype])
  full = attention_reference(q, k, v, causal=False)
  chex.assert_trees_all_close(np.asarray(full, np.float64), naive_attention(q, k, v, causal=False),
                              **TOL[dtype])


def test_attention_rejects_bad_shapes():
  q = jnp.ones((1, 4, 6, 8))
  with pytest.raises(ValueError, match="must divide"):
    causal_attention(q, jnp.ones((1, 4, 4, 8)), jnp.ones((1, 4, 4, 8)), implementation="xla")
  with pytest.raises(ValueError, match="implementation"):
    causal_attention(q, jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), implementation="flash9")


def test_rope_is_a_rotation_with_relative_phase():
  H = 16
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, H))
  pos = jnp.arange(5)[None]
  cos, sin = rope_tables(pos, H, 10000.0)
  y = apply_rope(x, cos, sin)
  # norms preserved per (token, head)
  chex.assert_trees_all_close(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  # dot products depend only on relative position: shift all positions by 7
  cos2, sin2 = rope_tables(pos + 7, H, 10000.0)
  y2 = apply_rope(x, cos2, sin2)
  d1 = jnp.einsum("bthd,bshd->bhts", y, y)
  d2 = jnp.einsum("bthd,bshd->bhts", y2, y2)
  chex.assert_trees_all_close(d1, d2, rtol=1e-4, atol=1e-4)


def small_cfg(**kw):
  base = dict(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
              compute_dtype="float32")
  base.update(kw)
  return ModelConfig(**base)


def test_param_count_and_dtypes():
  cfg = small_cfg(tie_embeddings=False, scan_layers=True)
  params = init_params(cfg, jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert params["layers"]["wq"]["kernel"].shape == (2, 64, 64)   # stacked [L, D, N*H]
  assert params["layers"]["wk"]["kernel"].shape == (2, 64, 32)   # K*H = 2*16


def test_param_tree_layout_and_init_distributions():
  """Unrolled params are "layers_<i>" with the Flax-era names; weights N(0, init_std), the
  residual output projections (wo, w_down) N(0, init_std / sqrt(2L)), norm scales 1."""
  cfg = small_cfg(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, tie_embeddings=False)
  params = init_params(cfg, jax.random.key(0))
  assert set(params) == {"embed", "final_norm", "unembed"} | {f"layers_{i}" for i in range(4)}
  assert set(params["layers_0"]) == {"attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate",
                                     "w_up", "w_down"}
  assert params["embed"].shape == (259, 128) and params["unembed"].shape == (128, 259)
  std, out_std = cfg.init_std, cfg.init_std / np.sqrt(2 * cfg.n_layers)
  def check(x, want):
    x = np.asarray(x)
    assert abs(x.mean()) < 4 * want / np.sqrt(x.size), (x.mean(), want)
    assert abs(x.std() / want - 1) < 0.05, (x.std(), want)
  check(params["embed"], std)
  check(params["unembed"], std)
  for i in range(4):
    lp = params[f"layers_{i}"]
    for name in ("wq", "wk", "wv", "w_gate", "w_up"):
      check(lp[name]["kernel"], std)
    for name in ("wo", "w_down"):
      check(lp[name]["kernel"], out_std)
    for name in ("attn_norm", "mlp_norm"):
      np.testing.assert_array_equal(lp[name]["scale"], 1.0)
  # layers draw from different keys
  assert not np.allclose(params["layers_0"]["wq"]["kernel"], params["layers_1"]["wq"]["kernel"])
  np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)


def test_forward_is_causal():
  cfg = small_cfg()
  params = init_params(cfg, jax.random.key(1))
  toks = jax.random.randint(jax.random.key(2), (2, 20), 0, 259)
  logits = forward(cfg, params, toks)
  assert logits.shape == (2, 20, 259) and logits.dtype == jnp.float32
  toks2 = toks.at[:, 12:].set((toks[:, 12:] + 1) % 259)
  logits2 = forward(cfg, params, toks2)
  chex.assert_trees_all_close(logits[:, :12], logits2[:, :12], rtol=1e-6, atol=1e-6)
  assert not np.allclose(logits[:, 12:], logits2[:, 12:])


def test_bf16_compute_close_to_fp32():
  cfg32 = small_cfg()
  cfg16 = small_cfg(compute_dtype="bfloat16")
  params = init_params(cfg32, jax.random.key(3))
  toks = jax.random.randint(jax.random.key(4), (2, 24), 0, 259)
  l32 = forward(cfg32, params, toks)
  l16 = forward(cfg16, params, toks)
  assert l16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32))
  assert rel < 2e-2, rel


def test_remat_gives_same_gradients():
  cfg = small_cfg()
  params = init_params(cfg, jax.random.key(5))
  toks = jax.random.randint(jax.random.key(6), (2, 16), 0, 259)
  f = lambda c: jax.grad(lambda p: forward(c, p, toks).mean())(params)
  chex.assert_trees_all_close(f(cfg), f(small_cfg(remat=True)), rtol=1e-5, atol=1e-7)


def test_layer_stacking_and_embedding_lookup_are_equivalent():
  """scan-stacked vs unrolled layers, one-hot vs gather embedding: the same function."""
  toks = jax.random.randint(jax.random.key(7), (2, 16), 0, 259)
  scanned = small_cfg(scan_layers=True, embed_lookup="gather")
  p_scan = init_params(scanned, jax.random.key(8))
  # unstack [L, ...] params into layers_0, layers_1, ...
  p_unroll = {k: v for k, v in p_scan.items() if k != "layers"}
  for i in range(scanned.n_layers):
    p_unroll[f"layers_{i}"] = jax.tree.map(lambda x: x[i], p_scan["layers"])
  ref = forward(scanned, p_scan, toks)
  for lookup in ("gather", "onehot"):
    out = forward(small_cfg(scan_layers=False, embed_lookup=lookup), p_unroll, toks)
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
