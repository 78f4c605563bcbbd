"""SeerAttention block-sparse prefill inside the model (`effjax.sparse.prefill_sparse`): the dense
selector and the oracle at density 1 are the model's causal forward; the selectors hit their
densities; perplexity rows at several densities; clear errors."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig
from effjax.model import forward, init_params
from effjax.sparse import prefill_sparse as ps
from effjax.sparse.gate import GateConfig
from effjax.sparse.prefill_gate import init_prefill_gate_params

MCFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                   compute_dtype="float32")
BS = 8


@pytest.fixture(scope="module")
def setup():
  params = init_params(MCFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, size=(2, 64)), jnp.int32)
  gate = init_prefill_gate_params(MCFG, GateConfig(block_size=BS, d_gate=16), jax.random.key(1))
  return params, tokens, gate


def test_dense_selector_and_full_oracle_are_the_causal_forward(setup):
  params, tokens, _ = setup
  want = forward(MCFG, params, tokens)
  lengths = jnp.full((2,), 64, jnp.int32)
  for scfg in (ps.PrefillSparseConfig("dense", BS), ps.PrefillSparseConfig("oracle", BS, 1.0)):
    got, dens = ps.sparse_forward(MCFG, scfg, params, tokens, lengths)
    chex.assert_trees_all_close(got, want, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(dens), 1.0)


@pytest.mark.parametrize("selector", ["gate", "oracle", "oracle_mass", "static", "recency"])
def test_selectors_reach_their_density_and_change_the_output(setup, selector):
  params, tokens, gate = setup
  lengths = jnp.full((2,), 64, jnp.int32)
  dense, _ = ps.sparse_forward(MCFG, ps.PrefillSparseConfig("dense", BS), params, tokens, lengths)
  scfg = ps.PrefillSparseConfig(selector, BS, density=0.3)
  got, dens = ps.sparse_forward(MCFG, scfg, params, tokens, lengths, gate)
  d = float(jnp.mean(dens))
  # 8 query blocks: ceil(0.3 * (i + 1)) per row keeps 13 of 36 pairs (0.36); static: the closest
  assert 0.25 <= d <= 0.45, d
  assert np.all(np.isfinite(np.asarray(got)))
  assert not np.allclose(np.asarray(got), np.asarray(dense), atol=1e-3)


def test_recency_keeps_the_nearest_blocks_at_the_gates_budget(setup):
  """recency(+local) picks the blocks nearest the diagonal, as many per row as the gate's top-k
  with the same forced blocks: the same density to the pair, a different choice."""
  params, tokens, gate = setup
  B, T, N, H = 2, 64, MCFG.n_heads, MCFG.d_model // MCFG.n_heads
  lengths = jnp.asarray([64, 37], jnp.int32)
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, MCFG.n_kv_heads, H)), jnp.float32)
  keep = dict(keep_local_blocks=2, keep_sink_blocks=1)
  pick = lambda name, **kw: np.asarray(ps.SeerSparseAttention(
      MCFG, ps.PrefillSparseConfig(name, BS, density=kw.pop("d", 0.6), **kw), lengths,
      gate).select(0, q, k, k))
  rec, g = pick("recency", **keep), pick("gate", **keep)
  np.testing.assert_array_equal(np.sum(rec >= 0, -1), np.sum(g >= 0, -1))
  assert not np.array_equal(rec, g)
  for i in range(8):                                     # row i: sink 0, then the nearest blocks
    ids = rec[0, 0, i][rec[0, 0, i] >= 0]
    n = len(ids)
    want = sorted({0} | set(range(max(0, i - n + 2), i + 1))) if n < i + 1 else list(range(i + 1))
    assert list(ids) == want, (i, ids, want)
  np.testing.assert_array_equal(pick("recency", d=0.3)[0, 0, 7], [5, 6, 7])   # ceil(0.3 * 8)


def test_static_window_matches_the_density():
  assert ps.static_local_blocks(8, 1.0, 1) == 7          # sink + 7 = every block of the last row
  for nb, d in ((64, 0.1), (64, 0.5), (16, 0.2)):
    w = ps.static_local_blocks(nb, d, 1)
    kept = sum(min(i + 1, 1 + w) for i in range(nb)) / (nb * (nb + 1) / 2)
    assert abs(kept - d) < 2.0 / nb, (nb, d, w, kept)


def test_sparse_nll_scores_from_a_position(setup):
  """score_from keeps the loss of the predictions from that position on: the same sum as the
  per-token losses of the dense forward over those positions."""
  params, tokens, _ = setup
  lengths = jnp.asarray([64, 50], jnp.int32)
  logp = jax.nn.log_softmax(forward(MCFG, params, tokens)[:, :-1], axis=-1)
  nll = -np.asarray(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0])
  scfg = ps.PrefillSparseConfig("dense", BS)
  for start in (0, 20):
    tot, n, _ = ps.sparse_nll(MCFG, scfg, params, tokens, lengths, None, start)
    want = nll[0, start:63].sum() + nll[1, start:49].sum()
    assert int(n) == (63 - start) + (49 - start)
    np.testing.assert_allclose(float(tot), want, rtol=1e-4)


@pytest.mark.slow  # also run end to end by experiments/seer_prefill's test
def test_evaluate_densities_rows(setup):
  params, tokens, gate = setup
  r = ps.evaluate_densities(MCFG, params, np.asarray(tokens), densities=(1.0, 0.25),
                            selectors=("gate", "oracle", "static"), block_size=BS,
                            gate_params=gate, batch_size=2)
  assert set(r) == {"dense", "gate@1.0", "gate@0.25", "oracle@1.0", "oracle@0.25",
                    "static@1.0", "static@0.25"}
  assert r["dense"]["ppl_increase"] == 0.0 and r["dense"]["tokens"] == 2 * 63
  assert abs(r["oracle@1.0"]["ppl_increase"]) < 1e-4 and abs(r["gate@1.0"]["ppl_increase"]) < 1e-4
  for k in ("gate@0.25", "oracle@0.25", "static@0.25"):
    assert r[k]["density"] < 0.5 and np.isfinite(r[k]["ppl"])


def test_topk_implementation_reaches_the_selection(setup):
  """PrefillSparseConfig.topk_implementation is what select_nz_ratio's prefix_topk runs: XLA
  gives the default's rows; the Triton kernel, uncompiled here without a GPU, refuses by name."""
  params, tokens, gate = setup
  lengths = jnp.full((2,), 64, jnp.int32)
  base = ps.PrefillSparseConfig("gate", BS, 0.25)
  want = ps.sparse_nll(MCFG, base, params, tokens, lengths, gate)
  got = ps.sparse_nll(MCFG, dataclasses.replace(base, topk_implementation="xla"), params, tokens,
                      lengths, gate)
  chex.assert_trees_all_close(got, want)
  with pytest.raises(ValueError, match="prefix_topk"):
    ps.sparse_nll(MCFG, dataclasses.replace(base, topk_implementation="pallas_triton"), params,
                  tokens, lengths, gate)


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="selector must be one of"):
    ps.PrefillSparseConfig("topk")
  with pytest.raises(ValueError, match="density must be in"):
    ps.PrefillSparseConfig("gate", density=0.0)
  with pytest.raises(ValueError, match="needs prefill gate params"):
    ps.SeerSparseAttention(MCFG, ps.PrefillSparseConfig("gate"), jnp.ones((1,), jnp.int32))


def test_generate_with_block_sparse_prefill(setup):
  """generate's prefill through SeerAttention: the dense selector gives the same tokens as the
  plain prefill; a sparse gate prefill (ragged prompts) generates; a chunked one is refused."""
  from effjax import decoding
  params, tokens, gate = setup
  lengths = jnp.asarray([64, 41], jnp.int32)
  kw = dict(max_new_tokens=6, decode_impl="xla")
  want, _ = decoding.generate(MCFG, params, tokens, lengths, jax.random.key(0), **kw)
  got, _ = decoding.generate(MCFG, params, tokens, lengths, jax.random.key(0), **kw,
                             prefill_sparse=ps.PrefillSparseConfig("dense", BS))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  out, n = decoding.generate(MCFG, params, tokens, lengths, jax.random.key(0), **kw,
                             prefill_sparse=ps.PrefillSparseConfig("gate", BS, density=0.3),
                             prefill_gate=gate)
  assert np.asarray(n).tolist() == [6, 6] and np.all((np.asarray(out) >= 0) & (np.asarray(out) < 259))
  with pytest.raises(ValueError, match="prefill_chunk None"):
    decoding.generate(MCFG, params, tokens, lengths, jax.random.key(0), **kw, prefill_chunk=16,
                      prefill_sparse=ps.PrefillSparseConfig("dense", BS))


def test_sparse_training_loss_trains_model_and_gate_apart(setup):
  """At density 1 the training loss's NLL is the causal forward's; the LM loss reaches the model
  only (the choice and the gate's inputs carry no gradient), the distillation loss the gate only;
  a few Adam steps on the gate lower the KL."""
  import optax
  params, tokens, gate = setup
  lengths = jnp.asarray([64, 50], jnp.int32)
  trainable = {"model": params, "gate": gate}
  full = ps.PrefillSparseConfig("gate", BS, density=1.0)
  _, (nll, kl, dens) = ps.sparse_training_loss(MCFG, full, trainable, tokens, lengths)
  logp = jax.nn.log_softmax(forward(MCFG, params, tokens)[:, :-1], -1)
  tok_nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  valid = jnp.arange(63)[None] < (lengths[:, None] - 1)
  want = jnp.sum(jnp.where(valid, tok_nll, 0.0)) / jnp.sum(valid)
  np.testing.assert_allclose(float(nll), float(want), rtol=2e-4)
  np.testing.assert_allclose(float(dens), 1.0)
  assert float(kl) > 0
  scfg = ps.PrefillSparseConfig("gate", BS, density=0.3, keep_local_blocks=2, keep_sink_blocks=1)
  grad = jax.grad(lambda t, w: ps.sparse_training_loss(MCFG, scfg, t, tokens, lengths, w)[0])
  g_lm, g_kl = grad(trainable, 0.0), grad(trainable, 1.0)
  norm = lambda t: float(optax.tree.norm(t))
  assert norm(g_lm["gate"]) == 0.0 and norm(g_lm["model"]) > 0
  chex.assert_trees_all_close(g_kl["model"], g_lm["model"], atol=1e-6)
  assert norm(g_kl["gate"]) > 0
  opt = optax.adam(3e-3)                   # the gate alone (frozen model): its KL goes down
  gp = gate
  st = opt.init(gp)
  kl_of = lambda gp: float(ps.sparse_training_loss(MCFG, scfg, {"model": params, "gate": gp},
                                                   tokens, lengths)[1][1])
  kl0 = kl_of(gp)
  for _ in range(5):
    u, st = opt.update(grad({"model": params, "gate": gp}, 1.0)["gate"], st, gp)
    gp = optax.apply_updates(gp, u)
  assert kl_of(gp) < kl0
  with pytest.raises(ValueError, match="nz-ratio"):
    ps.SeerTrainingAttention(MCFG, ps.PrefillSparseConfig("oracle", BS), lengths, gate)
