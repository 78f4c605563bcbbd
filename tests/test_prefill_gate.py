"""SeerAttention prefill gate: pooling and scores against the formula in float64 numpy, the KL
loss, the selectors (threshold, nz-ratio top-k, oracle, static) against loops, their index format
feeding block-sparse attention, and distillation from a frozen model."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.config import ModelConfig
from effjax.sparse import prefill_gate as pg
from effjax.sparse import prefill_selection as sel
from effjax.sparse.gate import GateConfig
from pallas_kernels.block_sparse_attention import block_sparse_attention, check_block_indices
from pallas_kernels.flash_attention import flash_attention


def rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def rope_np(x, pos, theta):
  """Rotate-half RoPE in float64, angles from float32 frequencies (the model's convention)."""
  D = x.shape[-1]
  inv = 1.0 / np.float32(theta) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D))
  ang = (np.float32(pos) * inv.astype(np.float32)).astype(np.float64)
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def gate_logits_np(wq, wk, q, k, lengths, bs, theta):
  """float64 loops over the module docstring's formula; -inf above the diagonal."""
  B, T, N, H = q.shape
  K, Dg = k.shape[2], wq.shape[-1]
  G, nb = N // K, -(-T // bs)
  out = np.full((B, N, nb, nb), -np.inf)
  for b in range(B):
    L = int(lengths[b])
    for n in range(N):
      for i in range(nb):
        qt = q[b, i * bs:min((i + 1) * bs, L), n].astype(np.float64)
        qp = qt.mean(0) if len(qt) else np.zeros(H)
        qg = rope_np(qp @ wq[n], i * bs, theta) / np.sqrt(Dg)
        for j in range(i + 1):
          kt = k[b, j * bs:min((j + 1) * bs, L), n // G].astype(np.float64)
          kp = np.concatenate([kt.max(0), kt.min(0), kt.mean(0)]) if len(kt) else np.zeros(3 * H)
          out[b, n, i, j] = qg @ rope_np(kp @ wk[n // G], j * bs, theta)
  return out


def test_pool_queries_matches_loop():
  B, T, N, H, bs = 2, 21, 3, 4, 8
  q = rand((B, T, N, H), 0)
  lengths = np.array([21, 9])
  got = np.asarray(pg.pool_queries(jnp.asarray(q), jnp.asarray(lengths), bs))
  assert got.shape == (B, N, 3, H)
  for b in range(B):
    for i in range(3):
      toks = q[b, i * bs:min((i + 1) * bs, lengths[b])]
      want = toks.mean(0) if len(toks) else np.zeros((N, H))
      np.testing.assert_allclose(got[b, :, i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,T,N,K,H,Dg,bs,lengths", [
    (2, 21, 4, 2, 8, 6, 4, (21, 10)), (1, 32, 3, 1, 8, 8, 8, (32,)), (3, 17, 2, 2, 4, 4, 4, (17, 1, 6))])
def test_gate_logits_match_the_formula(B, T, N, K, H, Dg, bs, lengths):
  theta = 10000.0
  q, k = rand((B, T, N, H), 1), rand((B, T, K, H), 2)
  wq, wk = rand((N, H, Dg), 3, 0.3), rand((K, 3 * H, Dg), 4, 0.3)
  args = (jnp.asarray(wq), jnp.asarray(wk), jnp.asarray(q), jnp.asarray(k),
          jnp.asarray(lengths, jnp.int32), bs, theta)
  got = np.asarray(pg.gate_logits(*args))
  want = gate_logits_np(wq, wk, q, k, lengths, bs, theta)
  assert got.shape == want.shape and got.dtype == np.float32
  assert np.array_equal(np.isfinite(got), np.isfinite(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=2e-4, atol=2e-5)
  p = np.asarray(pg.gate_probs(*args))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  assert np.all(p[~fin] == 0)
  # the nz-ratio top-k of the logits (what the model selects with) is that of the probabilities
  L = jnp.asarray(lengths, jnp.int32)
  np.testing.assert_array_equal(sel.select_nz_ratio(jnp.asarray(got), L, bs, 0.4),
                                sel.select_nz_ratio(jnp.asarray(p), L, bs, 0.4))


def test_kl_loss():
  lengths = jnp.asarray([5, 2])
  t = jnp.asarray(np.broadcast_to(np.array([[1.0, 0, 0], [0.25, 0.75, 0], [0.5, 0.2, 0.3]]),
                                  (2, 1, 3, 3)))
  tri = pg.block_causal(3, 3)
  logits = jnp.where(tri, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)
  assert abs(float(pg.kl_loss(t, logits, lengths, 2))) < 1e-6
  unif = jnp.where(tri, 0.0, -jnp.inf)
  # sequence 0: rows 0, 1, 2 valid; sequence 1 (length 2, block size 2): row 0 only
  rows = [0.0, 0.25 * np.log(0.25 * 2) + 0.75 * np.log(0.75 * 2),
          sum(x * np.log(3 * x) for x in (0.5, 0.2, 0.3))]
  np.testing.assert_allclose(float(pg.kl_loss(t, unif, lengths, 2)), sum(rows) / 4, rtol=1e-5)
  g = jax.grad(lambda z: pg.kl_loss(t, z, lengths, 2))(logits)
  assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------
# selection


def rows_of(idx):
  return [sorted(j for j in row if j >= 0) for row in idx]


def check_format(idx, q, k, bs):
  """Ascending, -1 padded, accepted by block_sparse_attention (and usable by it)."""
  idx = jnp.asarray(idx)
  check_block_indices(q, k, idx, bs)
  out = block_sparse_attention(q, k, k, idx, block_size=bs)
  assert np.all(np.isfinite(np.asarray(out)))


def setup_sel(seed=0, B=2, T=44, N=4, K=2, H=8, bs=4, lengths=(44, 19)):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
  nb = -(-T // bs)
  scores = jnp.asarray(rng.standard_normal((B, N, nb, nb)), jnp.float32)
  return q, k, scores, jnp.asarray(lengths, jnp.int32), bs, nb


def check_rows(idx, lengths, bs, nb, dense_rows, want_of):
  """Every (sequence, head, query block) row of idx [2, 4, nQ, M]: empty past the length, dense
  in the last dense_rows blocks, else want_of(b, n, i)."""
  for b in range(2):
    nv = -(-int(lengths[b]) // bs)
    for n in range(4):
      for i in range(nb):
        want = ([] if i >= nv else list(range(i + 1)) if i >= nv - dense_rows
                else want_of(b, n, i))
        assert rows_of(idx[b, n, i:i + 1])[0] == want, (b, n, i)


@pytest.mark.parametrize("dense_rows", [0, 2])
def test_select_threshold_matches_loop(dense_rows):
  q, k, scores, lengths, bs, nb = setup_sel()
  probs = jax.nn.softmax(jnp.where(pg.block_causal(nb, nb), scores, -jnp.inf), -1)
  tau = 0.12
  idx = np.asarray(sel.select_threshold(probs, lengths, bs, tau, dense_rows=dense_rows))
  assert idx.shape == (2, 4, nb, nb) and idx.dtype == np.int32
  p = np.asarray(probs)
  check_rows(idx, lengths, bs, nb, dense_rows,
             lambda b, n, i: sorted({j for j in range(i + 1) if p[b, n, i, j] >= tau} | {i}))
  check_format(idx, q, k, bs)
  capped = np.asarray(sel.select_threshold(probs, lengths, bs, 0.0, max_blocks=3))
  assert capped.shape[-1] == 3
  for b, n, i in [(0, 1, 10), (1, 3, 4)]:
    top = np.argsort(-p[b, n, i, :i], kind="stable")[:2]
    assert rows_of(capped[b, n, i:i + 1])[0] == sorted(set(top.tolist()) | {i})


@pytest.mark.parametrize("ratio,dense_rows,ties", [(0.3, 0, False), (0.5, 1, False),
                                                   (1.0, 0, False), (0.3, 0, True)])
def test_select_nz_ratio_matches_loop(ratio, dense_rows, ties):
  """ties: scores on 3 levels, so most rows hold equal scores at the cut; the lower block wins."""
  q, k, scores, lengths, bs, nb = setup_sel(1)
  if ties:
    scores = jnp.round(scores)
    assert len(np.unique(np.asarray(scores))) <= 9
  idx = np.asarray(sel.select_nz_ratio(scores, lengths, bs, ratio, dense_rows))
  assert idx.shape[-1] == sel.nz_ratio_width(nb, ratio, dense_rows)
  s = np.asarray(scores)

  def top(b, n, i):
    kk = max(1, math.ceil(round(ratio * (i + 1), 6)))
    others = [j for j in np.argsort(-s[b, n, i, :i], kind="stable")][:kk - 1]
    return sorted(set(int(j) for j in others) | {i})

  check_rows(idx, lengths, bs, nb, dense_rows, top)
  check_format(idx, q, k, bs)
  if dense_rows == 0:
    d = float(sel.density(jnp.asarray(idx), lengths, bs))
    assert abs(d - ratio) < 0.1, d


@pytest.mark.parametrize("ratio,sink,local", [(0.3, 1, 2), (0.2, 0, 3), (0.5, 2, 1)])
def test_select_nz_ratio_keeps_sink_and_local_blocks_inside_the_budget(ratio, sink, local):
  q, k, scores, lengths, bs, nb = setup_sel(3)
  idx = np.asarray(sel.select_nz_ratio(scores, lengths, bs, ratio, 0, sink, local))
  s = np.asarray(scores)

  def top(b, n, i):
    keep = {j for j in range(i + 1) if j < sink or j > i - local}
    kk = max(1, math.ceil(round(ratio * (i + 1), 6)), len(keep))
    rest = [int(j) for j in np.argsort(-s[b, n, i, :i + 1], kind="stable") if j not in keep]
    return sorted(keep | set(rest[:kk - len(keep)]))

  check_rows(idx, lengths, bs, nb, 0, top)
  check_format(idx, q, k, bs)
  thr = np.asarray(sel.select_threshold(jax.nn.softmax(scores, -1), lengths, bs, 0.99,
                                        sink_blocks=sink, local_blocks=local))
  check_rows(thr, lengths, bs, nb, 0,
             lambda b, n, i: sorted(j for j in range(i + 1) if j < sink or j > i - local))
  with pytest.raises(ValueError, match="local_blocks >= 1"):
    sel.select_nz_ratio(scores, lengths, bs, ratio, 0, 0, 0)


def test_oracle_is_top_k_of_the_ground_truth_and_beats_random():
  q, k, scores, lengths, bs, nb = setup_sel(2)
  q = q * 3.0          # sharper attention than standard normals give, so block choice matters
  idx = sel.select_oracle(q, k, k, lengths, bs, 0.3)
  _, target = flash_attention(q, k, k, lengths, block_size=bs)
  chex.assert_trees_all_equal(idx, sel.select_nz_ratio(target, lengths, bs, 0.3))
  # random scores under the same rule: the same number of blocks in every row
  rand_idx = sel.select_nz_ratio(scores, lengths, bs, 0.3)
  np.testing.assert_allclose(float(sel.density(idx, lengths, bs)),
                             float(sel.density(rand_idx, lengths, bs)))
  r_o, r_r = (float(sel.recall(q, k, lengths, x, bs)) for x in (idx, rand_idx))
  assert r_o > r_r + 0.1, (r_o, r_r)


def test_select_static_and_density():
  q, k, _, lengths, bs, nb = setup_sel(3)
  idx = np.asarray(sel.select_static(lengths, 4, q.shape[1], bs, sink_blocks=2, local_blocks=3))
  assert idx.shape == (2, 4, nb, 5)
  for b in range(2):
    nv = -(-int(lengths[b]) // bs)
    for i in range(nb):
      want = [] if i >= nv else sorted({j for j in range(i + 1) if j < 2 or j > i - 3})
      assert all(rows_of(idx[b, n, i:i + 1])[0] == want for n in range(4))
  check_format(idx, q, k, bs)
  every = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (2, 4, nb, nb))
  np.testing.assert_allclose(float(sel.density(every, lengths, bs)), 1.0)
  np.testing.assert_allclose(float(sel.recall(q, k, lengths, every, bs)), 1.0, rtol=1e-5)
  # density of the static pattern, counted by hand
  vis = sum(i + 1 for b in range(2) for i in range(-(-int(lengths[b]) // bs)))
  kept = sum(len({j for j in range(i + 1) if j < 2 or j > i - 3})
             for b in range(2) for i in range(-(-int(lengths[b]) // bs)))
  np.testing.assert_allclose(float(sel.density(jnp.asarray(idx), lengths, bs)), kept / vis,
                             rtol=1e-6)


def test_recall_matches_loop():
  q, k, _, lengths, bs, nb = setup_sel(4, T=20, lengths=(20, 11))
  idx = sel.select_static(lengths, 4, 20, bs, sink_blocks=1, local_blocks=1)
  got = float(sel.recall(q, k, lengths, idx, bs))
  qn, kn, ix = np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(idx)
  vals = []
  for b in range(2):
    for n in range(4):
      for t in range(int(lengths[b])):
        s = kn[b, :t + 1, n // 2] @ qn[b, t, n] / np.sqrt(8)
        p = np.exp(s - s.max())
        p /= p.sum()
        blocks = set(j for j in ix[b, n, t // bs] if j >= 0)
        vals.append(sum(p[u] for u in range(t + 1) if u // bs in blocks))
  np.testing.assert_allclose(got, np.mean(vals), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# distillation


def test_gate_learns_planted_blocks():
  """Adam on the KL loss with frozen q / k, where each query block copies one token of a planted
  earlier key block: the gate's KL falls well below its start."""
  B, T, N, K, H, bs = 8, 64, 2, 1, 16, 8
  nb = T // bs
  rng = np.random.default_rng(5)
  k = rng.standard_normal((B, T, K, H)).astype(np.float32)
  q = 0.3 * rng.standard_normal((B, T, N, H)).astype(np.float32)
  for b in range(B):
    for i in range(nb):
      j = rng.integers(0, i + 1)
      q[b, i * bs:(i + 1) * bs] += 2.5 * k[b, j * bs + 3, 0]
  q, k = jnp.asarray(q), jnp.asarray(k)
  lengths = jnp.asarray([64, 60, 64, 33, 64, 64, 50, 64], jnp.int32)
  _, target = flash_attention(q, k, k, lengths, block_size=bs)
  mcfg = ModelConfig(d_model=32, n_layers=1, n_heads=N, n_kv_heads=K)
  gcfg = GateConfig(block_size=bs, d_gate=16)
  params = jax.tree.map(lambda x: x[0], pg.init_prefill_gate_params(mcfg, gcfg, jax.random.key(0)))

  def loss_fn(p):
    logits = pg.gate_logits(p["wq"], p["wk"], q, k, lengths, bs, mcfg.rope_theta)
    return pg.kl_loss(target, logits, lengths, bs)

  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, st):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, st = opt.update(g, st)
    return optax.apply_updates(p, u), st, loss

  st = opt.init(params)
  l0 = float(loss_fn(params))
  for _ in range(40):
    params, st, _ = step(params, st)
  assert float(loss_fn(params)) < 0.1 * l0, (l0, float(loss_fn(params)))


@pytest.mark.slow
def test_train_prefill_gate_on_a_model():
  from effjax.model import init_params
  from effjax.sparse import prefill_gate_training as pgt
  mcfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                     compute_dtype="float32", attention_impl="xla", init_std=0.2)
  gcfg = GateConfig(block_size=8, d_gate=8)
  params = jax.jit(init_params, static_argnums=0)(mcfg, jax.random.key(1))
  toks = np.random.default_rng(2).integers(0, 256, (16, 40)).astype(np.int32)
  lengths = np.random.default_rng(3).integers(9, 41, 16).astype(np.int32)
  gp0 = pg.init_prefill_gate_params(mcfg, gcfg, jax.random.key(0))
  tb, lb = jnp.asarray(toks[:8]), jnp.asarray(lengths[:8])

  @jax.jit
  def per_layer(gp):   # the loss is the sum over layers of each layer's KL
    return [pgt.layer_loss(mcfg, gcfg, gp["wq"][i], gp["wk"][i], q, k, t, lb)
            for i, (q, k, _, t) in enumerate(pgt.layer_targets(mcfg, params, tb, lb, 8))]

  l0 = float(pgt.prefill_gate_loss(mcfg, gcfg, gp0, params, tb, lb))
  np.testing.assert_allclose(l0, float(sum(per_layer(gp0))), rtol=1e-5)
  gp, losses = pgt.train_prefill_gate(mcfg, gcfg, params, toks, steps=25, batch_size=4, lr=2e-2,
                                      lengths_N=lengths, seed=0)
  assert jax.tree.map(jnp.shape, gp) == jax.tree.map(jnp.shape, gp0)
  assert np.all(np.isfinite(losses))
  l1 = float(pgt.prefill_gate_loss(mcfg, gcfg, gp, params, tb, lb))
  assert l1 < 0.7 * l0, (l0, l1)


def test_block_mass_and_the_mass_oracle():
  """block_mass == the loop's mean over a query block's rows of each key block's probability
  sum; the mass oracle is select_nz_ratio on it."""
  from pallas_kernels.flash_attention import attention_probs
  q, k, _, lengths, bs, nb = setup_sel(4)
  mass = np.asarray(sel.block_mass(q, k, lengths, bs))
  p = np.asarray(attention_probs(q, k, lengths))                  # [B, K, G, T, S]
  B, K, G, T, _ = p.shape
  for b, n, i, j in [(0, 0, 3, 1), (1, 3, 2, 2), (0, 2, 10, 0), (1, 1, 9, 4)]:
    rows = slice(i * bs, min((i + 1) * bs, T))
    want = p[b, n // G, n % G, rows, j * bs:(j + 1) * bs].sum() / bs
    np.testing.assert_allclose(mass[b, n, i, j], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mass[0, :, :11].sum(-1), 1.0, rtol=1e-5)  # whole valid blocks
  got = np.asarray(sel.select_oracle_mass(q, k, lengths, bs, 0.3, 0, 1, 2))
  np.testing.assert_array_equal(got, np.asarray(sel.select_nz_ratio(jnp.asarray(mass), lengths,
                                                                     bs, 0.3, 0, 1, 2)))
