"""SeerAttention-R decode gate: pooling, K-compression cache, distillation target, KL, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.config import ModelConfig
from effjax.sparse import gate


def rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("token_major", [False, True])
def test_pool_blocks_matches_loop(token_major):
  """The cache layout [B, K, S, H] and a prompt's [B, S, K, H] (token_major) pool alike."""
  B, K, S, H, bs = 2, 2, 48, 8, 16
  k = rand((B, K, S, H), 0)
  lengths = np.array([48, 20])
  arg = k.transpose(0, 2, 1, 3) if token_major else k
  p = np.asarray(gate.pool_blocks(jnp.asarray(arg), jnp.asarray(lengths), bs,
                                  token_major=token_major))
  assert p.shape == (B, K, 3, 3 * H)
  for b in range(B):
    for h in range(K):
      for n in range(3):
        toks = k[b, h, n * bs:min((n + 1) * bs, lengths[b])]
        if len(toks) == 0:
          np.testing.assert_array_equal(p[b, h, n], 0)
          continue
        exp = np.concatenate([toks.max(0), toks.min(0), toks.mean(0)])
        np.testing.assert_allclose(p[b, h, n], exp, rtol=1e-5, atol=1e-6)


def test_distill_target_matches_loop():
  B, K, G, S, H, bs = 2, 2, 3, 64, 8, 16
  q, k = rand((B, K, G, H), 1), rand((B, K, S, H), 2)
  lengths = np.array([64, 37])
  t = np.asarray(gate.distill_target(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), bs))
  for b in range(B):
    for h in range(K):
      rows = []
      for g in range(G):
        s = k[b, h, :lengths[b]] @ q[b, h, g] / np.sqrt(H)
        p = np.exp(s - s.max())
        p /= p.sum()
        rows.append([p[n * bs:(n + 1) * bs].max() if n * bs < lengths[b] else 0.0 for n in range(S // bs)])
      exp = np.max(rows, axis=0)
      exp /= exp.sum()
      np.testing.assert_allclose(t[b, h], exp, rtol=1e-5, atol=1e-7)


def test_gate_logits_match_the_formula():
  """gate_logits (the query's RoPE halves meeting the cache's halves inside one sum) against the
  module docstring's formula in float64 numpy: q_g = RoPE(concat_G(q) @ Wq) / sqrt(Dg), scores =
  q_g . kc. Random inputs, ragged sizes, positions up to 131071; gate_query is q_g."""
  B, K, G, H, Dg, N, theta = 3, 2, 3, 24, 16, 37, 10000.0
  q, wq, kc = rand((B, K, G, H), 11), rand((K, G * H, Dg), 12) * 0.2, rand((B, K, N, Dg), 13)
  pos = np.array([131071, 4099, 5])
  qg = np.einsum("bkc,kcd->bkd", q.astype(np.float64).reshape(B, K, G * H), wq)
  # angles in float32 as rope_tables takes them (at position 131071 float32 rounding moves an
  # angle by up to ~0.008 rad: the model's convention, not this function's error)
  inv = (1.0 / np.float32(theta) ** (np.arange(0, Dg, 2, dtype=np.float32) / np.float32(Dg)))
  ang = (pos.astype(np.float32)[:, None, None] * inv.astype(np.float32)).astype(np.float64)
  x1, x2 = qg[..., :Dg // 2], qg[..., Dg // 2:]
  ref_q = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                          x2 * np.cos(ang) + x1 * np.sin(ang)], -1) / np.sqrt(Dg)
  ref = np.einsum("bkd,bknd->bkn", ref_q, kc)
  args = (jnp.asarray(wq), jnp.asarray(q), jnp.asarray(pos))
  np.testing.assert_allclose(gate.gate_query(*args, theta), ref_q, rtol=2e-4, atol=2e-5)
  got = gate.gate_logits(args[0], args[1], jnp.asarray(kc), args[2], theta)
  assert got.shape == (B, K, N) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-4)


def test_kl_loss():
  t = jnp.asarray([[[0.5, 0.5, 0.0]]])
  assert abs(float(gate.kl_loss(t, t))) < 1e-7
  p = jnp.asarray([[[0.8, 0.1, 0.1]]])
  exp = 0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.1)
  np.testing.assert_allclose(float(gate.kl_loss(t, p)), exp, rtol=1e-6)


def test_gate_learns_to_predict_block_maxima():
  """A few hundred Adam steps on the distillation loss cut the KL substantially (frozen q/k)."""
  mcfg = ModelConfig(d_model=128, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=256)  # H = 32, G = 2
  gcfg = gate.GateConfig(block_size=16, d_gate=32)
  B, K, G, S, H = 32, 2, 2, 128, 32
  k = rand((B, K, S, H), 3)
  # queries aligned with one planted block each, so the target is peaked and learnable
  planted = np.random.default_rng(4).integers(1, S // 16 - 1, B)
  q = rand((B, K, G, H), 5) * 0.3
  for b in range(B):
    q[b] += 2.0 * k[b, :, planted[b] * 16 + 3][:, None, :]
  lengths = jnp.full((B,), S)
  pos = jnp.full((B,), S - 1)
  q, k = jnp.asarray(q), jnp.asarray(k)
  target = gate.distill_target(q, k, lengths, gcfg.block_size)
  params = jax.tree.map(lambda x: x[0], gate.init_gate_params(mcfg, gcfg, jax.random.key(0)))

  def loss_fn(p):
    kc = gate.compress_blocks(p["wk"], k, lengths, gcfg.block_size, mcfg.rope_theta)
    logits = gate.gate_logits(p["wq"], q, kc, pos, mcfg.rope_theta)
    return gate.kl_loss(target, gate.masked_softmax(logits, lengths, gcfg.block_size))

  opt = optax.adam(1e-2)
  st = opt.init(params)

  @jax.jit
  def step(p, st):
    l, g = jax.value_and_grad(loss_fn)(p)
    u, st = opt.update(g, st)
    return optax.apply_updates(p, u), st, l

  l0 = float(loss_fn(params))
  for _ in range(300):
    params, st, l = step(params, st)
  assert float(loss_fn(params)) < 0.5 * l0, (l0, float(loss_fn(params)))


def test_attention_recall_and_gate_training_on_a_model():
  from effjax.model import init_params
  from effjax.sparse import gate_training
  B, K, G, S, H, bs = 2, 2, 2, 64, 16, 16
  q, k = jnp.asarray(rand((B, K, G, H), 6)), jnp.asarray(rand((B, K, S, H), 7))
  lengths = jnp.asarray([64, 40])
  all_blocks = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (B, K, 4))
  np.testing.assert_allclose(gate_training.attention_recall(q, k, lengths, all_blocks, bs), 1.0, rtol=1e-5)
  some = jnp.asarray(np.array([[[0, 2, -1, -1]] * K, [[1, -1, -1, -1]] * K], np.int32))
  r = np.asarray(gate_training.attention_recall(q, k, lengths, some, bs))
  s = np.einsum("bkgh,bksh->bkgs", np.asarray(q), np.asarray(k)) / np.sqrt(H)
  for b, blocks in ((0, [0, 2]), (1, [1])):
    for h in range(K):
      p = np.exp(s[b, h, :, :lengths[b]] - s[b, h, :, :lengths[b]].max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      want = np.mean([sum(p[g, n * bs:(n + 1) * bs].sum() for n in blocks) for g in range(G)])
      np.testing.assert_allclose(r[b, h], want, rtol=1e-5)
  # gate training on a (random) model's own attention lowers the distillation loss
  mcfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                     compute_dtype="float32", attention_impl="xla")
  gcfg = gate.GateConfig(block_size=16, d_gate=16)
  params = init_params(mcfg, jax.random.key(1))
  toks = np.random.default_rng(2).integers(0, 256, (16, 96)).astype(np.int32)
  gp, losses = gate_training.train_gate(mcfg, gcfg, params, toks, steps=60, batch_size=4,
                                         queries=8, lr=1e-2)
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-10:])
