"""LQS / PDS scoring against a slow per-example, per-step loop, and HVPs against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from effjax.config import ModelConfig
from effjax.data.packing import Examples
from effjax.data import scoring
from effjax.model import init_params

MCFG = ModelConfig(vocab_size=259, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16,
                   compute_dtype="float32")


def rand_examples(n, T, seed):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, 256, (n, T + 1)).astype(np.int32)
  mask = np.ones((n, T), np.float32)
  mask[rng.random((n, T)) < 0.15] = 0.0  # some masked targets, like padded examples
  mask[:, 0] = 1.0
  return Examples(toks, mask)


def slow_lqs(params0, pool, ref, scored, steps, lr, batch_ids, interval):
  """The definition, one example and one step at a time, on flat parameter vectors."""
  flat0, unravel = ravel_pytree(params0)
  ex_loss = lambda f, t, m: scoring.example_loss(MCFG, unravel(f), jnp.asarray(t), jnp.asarray(m))
  b_loss = lambda f, t, m: scoring.batch_loss(MCFG, unravel(f), jnp.asarray(t), jnp.asarray(m))
  g_b = jax.jit(jax.grad(b_loss))
  g_ex = jax.jit(jax.grad(ex_loss))
  thetas = [flat0]
  for t in range(steps):
    ids = batch_ids[t]
    thetas.append(thetas[-1] - lr * g_b(thetas[-1], pool.tokens[ids], pool.mask[ids]))

  def ref_grad(f):  # mean over reference sequences, one at a time
    return sum(g_ex(f, ref.tokens[i], ref.mask[i]) for i in range(len(ref))) / len(ref)

  @jax.jit
  def hvp_rr(f, t, m, v):  # reverse-over-reverse: independent of the jvp path under test
    return jax.grad(lambda x: jnp.vdot(g_b(x, t, m), v))(f)

  def ex_grads(f):
    return np.stack([np.asarray(g_ex(f, scored.tokens[i], scored.mask[i]))
                     for i in range(len(scored))])

  lam = ref_grad(thetas[steps])
  next_norm = np.linalg.norm(ex_grads(thetas[steps]), axis=1)
  lqs = np.zeros(len(scored))
  pds = np.zeros(len(scored))
  for t in range(steps - 1, -1, -1):
    if t % interval == 0:
      g = ex_grads(thetas[t])
      lam_np = np.asarray(lam)
      norms = np.linalg.norm(g, axis=1)
      ln = np.linalg.norm(lam_np)
      cos = np.clip(g @ lam_np / (norms * ln), -1, 1)
      lqs += lr * ln * (norms / next_norm) * cos
      pds += lr * g @ lam_np
      next_norm = norms
    lam = lam + ref_grad(thetas[t]) - lr * hvp_rr(thetas[t], pool.tokens[batch_ids[t]], pool.mask[batch_ids[t]], lam)
  return lqs, pds, thetas


# 10 steps: checkpoint interval 3 and a last checkpoint off the interval (the ragged case); 4
# steps (interval 2, all on it) adds no path and ~22 s, so it runs only with -m slow.
@pytest.mark.parametrize("steps", [10, pytest.param(4, marks=pytest.mark.slow)])
def test_lqs_matches_slow_loop(steps):
  params0 = init_params(MCFG, jax.random.key(0))
  pool, ref, scored = rand_examples(24, 12, 1), rand_examples(5, 12, 2), rand_examples(9, 12, 3)
  fns = scoring.ScoringFns(MCFG)
  lr = 0.5
  trace = scoring.train_proxy(fns, params0, pool, steps=steps, lr=lr, batch_size=4, seed=0)
  assert trace.interval == int(np.sqrt(steps))
  assert sorted(trace.checkpoints) == sorted(set(range(0, steps + 1, trace.interval)) | {steps})
  res = scoring.lqs_scores(fns, trace, pool, ref, scored, chunk=4)  # 9 rows: a ragged last chunk
  lqs, pds, thetas = slow_lqs(params0, pool, ref, scored, steps, lr, trace.batch_ids, trace.interval)
  # the trajectory itself
  np.testing.assert_allclose(ravel_pytree(trace.checkpoints[steps])[0], thetas[steps], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.lqs_raw, lqs, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(res.pds_raw, pds, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(res.lqs, scoring.normalize(lqs), rtol=1e-3, atol=1e-4)
  assert res.steps == list(range(0, steps, trace.interval))
  assert np.all(np.abs(res.lqs) <= 3.0) and abs(res.lqs.mean()) < 1e-5
  assert np.std(res.lqs_raw) > 0  # non-degenerate scores


def test_chunked_hvp_equals_the_whole_batch_hvp():
  params = init_params(MCFG, jax.random.key(4))
  ex = rand_examples(6, 10, 5)
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  t, m = jnp.asarray(ex.tokens), jnp.asarray(ex.mask)
  whole = scoring.ScoringFns(MCFG).hvp(params, t, m, v)
  chunked = scoring.ScoringFns(MCFG, hvp_chunk=2).hvp(params, t, m, v)
  np.testing.assert_allclose(ravel_pytree(chunked)[0], ravel_pytree(whole)[0], rtol=1e-4, atol=1e-6)
  # a chunk that does not divide the batch falls back to the whole batch
  odd = scoring.ScoringFns(MCFG, hvp_chunk=4).hvp(params, t, m, v)
  np.testing.assert_allclose(ravel_pytree(odd)[0], ravel_pytree(whole)[0], rtol=1e-6, atol=1e-7)


def test_hvp_matches_finite_differences_and_reverse_mode():
  params = init_params(MCFG, jax.random.key(4))
  ex = rand_examples(6, 10, 5)
  fns = scoring.ScoringFns(MCFG)
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  t, m = jnp.asarray(ex.tokens), jnp.asarray(ex.mask)
  hv = fns.hvp(params, t, m, v)
  flat_hv = ravel_pytree(hv)[0]
  # reverse-over-reverse
  rr = jax.grad(lambda p: scoring.tree_dot(fns.batch_grad(p, t, m), v))(params)
  np.testing.assert_allclose(flat_hv, ravel_pytree(rr)[0], rtol=1e-4, atol=1e-5)
  # central finite differences of the gradient
  eps = 1e-3
  gp = ravel_pytree(fns.batch_grad(scoring.tree_axpy(eps, v, params), t, m))[0]
  gm = ravel_pytree(fns.batch_grad(scoring.tree_axpy(-eps, v, params), t, m))[0]
  fd = (gp - gm) / (2 * eps)
  rel = float(jnp.linalg.norm(fd - flat_hv) / jnp.linalg.norm(flat_hv))
  assert rel < 2e-2, rel


def test_projection_is_deterministic_and_preserves_scores():
  # How closely a count-sketch of 4x the parameter count keeps LQS's order varies with the draw
  # (correlation 0.85-0.97 over init and projection seeds: LQS is a ratio of gradient norms times
  # a cosine, so a small error can move a score a lot), so the bound is on three inits together.
  pool, ref, scored = rand_examples(16, 12, 1), rand_examples(4, 12, 2), rand_examples(32, 12, 3)
  exact = scoring.ScoringFns(MCFG)
  n_params = ravel_pytree(init_params(MCFG, jax.random.key(0)))[0].size
  proj = scoring.ScoringFns(MCFG, projection_dim=4 * n_params, projection_seed=3)  # compiled once
  corr = []
  for seed in (0, 1, 2):
    params0 = init_params(MCFG, jax.random.key(seed))
    trace = scoring.train_proxy(exact, params0, pool, steps=4, lr=0.5, batch_size=4)
    r0 = scoring.lqs_scores(exact, trace, pool, ref, scored, chunk=8)
    r1 = scoring.lqs_scores(proj, trace, pool, ref, scored, chunk=8)
    corr.append(np.corrcoef(r0.lqs, r1.lqs)[0, 1])
  assert min(corr) > 0.8 and np.mean(corr) > 0.9, corr
  r2 = scoring.lqs_scores(proj, trace, pool, ref, scored, chunk=8)   # the same sketch again
  np.testing.assert_array_equal(r1.lqs_raw, r2.lqs_raw)
  # a sketch of a pytree has the right size and approximately preserves the norm
  s = scoring.sketch(params0, 4 * n_params, 0)
  ratio = float(jnp.linalg.norm(s) / jnp.linalg.norm(ravel_pytree(params0)[0]))
  assert s.shape == (4 * n_params,) and 0.8 < ratio < 1.2


def test_loss_and_random_scores():
  params = init_params(MCFG, jax.random.key(0))
  ex = rand_examples(10, 12, 7)
  fns = scoring.ScoringFns(MCFG)
  ls = scoring.loss_scores(fns, params, ex, chunk=4)
  for i in range(10):
    np.testing.assert_allclose(ls[i], scoring.example_loss(MCFG, params, ex.tokens[i], ex.mask[i]),
                               rtol=1e-5)
  r = scoring.random_scores(10, 0)
  np.testing.assert_array_equal(r, scoring.random_scores(10, 0))
  assert not np.array_equal(r, scoring.random_scores(10, 1))


def test_learned_scorer_recovers_a_feature_defined_target():
  """Targets that are a linear function of the encoder features are recovered (held-out r ~ 1)."""
  params = init_params(MCFG, jax.random.key(9))
  ex = rand_examples(120, 12, 11)
  X = scoring.embed_examples(MCFG, params, ex, chunk=32)
  assert X.shape == (120, MCFG.d_model)
  w_true = np.random.default_rng(0).normal(size=MCFG.d_model)
  y = X @ w_true + 0.5
  sc = scoring.fit_learned_scorer(MCFG, params, ex, y, ridge=1e-6, chunk=32)
  assert sc.fit["heldout_pearson"] > 0.99 and sc.fit["heldout_spearman"] > 0.95
  np.testing.assert_allclose(sc.predict(ex, chunk=32), y, rtol=1e-2, atol=1e-2)
