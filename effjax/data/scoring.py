"""DELT data scoring: Learnability-Quality Scoring (LQS) and its baselines (PDS, loss, random).

LQS follows the DELT reference implementation (microsoft/DELT `data_scoring/lqs`, which builds on
PDS's optimal-control solver):

1. A proxy model takes T steps of plain SGD (constant lr) on the training pool; its params are
   kept every dt = int(sqrt(T)) steps and the example ids of every step's batch are recorded.
2. The adjoint runs backwards over *every* step (PDS):
       lambda_T = grad L_ref(theta_T)
       lambda_t = lambda_{t+1} + grad L_ref(theta_t) - lr * H(theta_t; batch_t) lambda_{t+1}
   where L_ref is the mean loss of the reference ("quality") set and H the Hessian of step t's batch
   loss; Hessian-vector products are `jax.jvp` of `jax.grad`. theta_t inside a segment is
   recomputed by replaying SGD from the segment's stored params.
3. At every scored step t in {0, dt, ..., T - dt}, with per-example gradients g_t(x) from
   `jax.vmap(jax.grad(loss))` (chunked):
       learnability_t(x) = ||g_t(x)|| / ||g_{t+dt}(x)||
       quality_t(x)      = cos(g_t(x), lambda_{t+1})          (lambda before step t's update)
       contribution_t(x) = lr * ||lambda_{t+1}|| * learnability_t(x) * quality_t(x)
   summed over scored steps, then z-scored (population std) and clipped to [-3, 3].
   The reference code divides the latest scored step by 1 (a ones-initialised buffer); we use the
   gradient norm at theta_T, the next evaluated checkpoint, as the definition says.
4. PDS baseline: sum_t lr * g_t(x) . lambda_{t+1} over the same steps (same normalisation).

Losses are per-sequence token means (masked), averaged over sequences for batch and reference
losses, as in the reference. An optional count-sketch random projection (fixed seed) maps each
per-example gradient and lambda to `projection_dim` dimensions before norms and dot products.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import model as model_lib
from effjax import sharding as shd
from effjax.config import ModelConfig
from effjax.data.packing import Examples

Params = Any


# ----------------------------------------------------------------------------------------------
# losses


def example_loss(mcfg: ModelConfig, params: Params, tokens_T1: jax.Array, mask_T: jax.Array) -> jax.Array:
  """Token-mean masked cross-entropy of one example (tokens int32 [T+1], mask float32 [T])."""
  logits = model_lib.forward(mcfg, params, tokens_T1[None, :-1])[0]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens_T1[1:])
  return jnp.sum(nll * mask_T) / jnp.maximum(jnp.sum(mask_T), 1.0)


def batch_loss(mcfg: ModelConfig, params: Params, tokens_BT1: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Mean over sequences of the per-sequence token-mean loss."""
  logits = model_lib.forward(mcfg, params, tokens_BT1[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT1[:, 1:])
  per_seq = jnp.sum(nll * mask_BT, -1) / jnp.maximum(jnp.sum(mask_BT, -1), 1.0)
  return jnp.mean(per_seq)


def tree_dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_axpy(alpha, x, y):
  """alpha * x + y, leafwise."""
  return jax.tree.map(lambda u, v: alpha * u + v, x, y)


# ----------------------------------------------------------------------------------------------
# count-sketch projection


def _sketch_tables(params: Params, dim: int, seed: int):
  """Per-leaf fixed (bucket, sign) tables: a count-sketch, which preserves inner products in
  expectation and needs no dense [P, dim] matrix."""
  leaves = jax.tree.leaves(params)
  keys = jax.random.split(jax.random.key(seed), 2 * len(leaves))
  buckets = [jax.random.randint(keys[2 * i], (x.size,), 0, dim, jnp.int32) for i, x in enumerate(leaves)]
  signs = [jax.random.rademacher(keys[2 * i + 1], (x.size,), jnp.float32) for i, x in enumerate(leaves)]
  return buckets, signs


def sketch(tree: Params, dim: int, seed: int) -> jax.Array:
  """Count-sketch of a params-shaped pytree -> float32 [dim]."""
  buckets, signs = _sketch_tables(tree, dim, seed)
  out = jnp.zeros((dim,), jnp.float32)
  for x, b, s in zip(jax.tree.leaves(tree), buckets, signs):
    out = out + jax.ops.segment_sum(x.reshape(-1).astype(jnp.float32) * s, b, num_segments=dim)
  return out


# ----------------------------------------------------------------------------------------------
# jitted building blocks


@dataclasses.dataclass(frozen=True)
class ScoringFns:
  """Jitted functions for one proxy model config.

  hvp_chunk: run the Hessian-vector product over micro-batches of this many sequences (a scan,
  averaged: the batch loss is a mean over sequences) when it divides the batch; 0 = whole batch.
  Forward-over-reverse through the XLA attention keeps [B, heads, T, T] scores and their tangents
  alive: a 121M proxy at batch 32 x 1024 tokens needs ~79 GiB in one piece.
  """
  mcfg: ModelConfig
  projection_dim: int = 0
  projection_seed: int = 0
  hvp_chunk: int = 0

  def __post_init__(self):
    mcfg = self.mcfg
    loss_b = lambda p, t, m: batch_loss(mcfg, p, t, m)
    grad_b = jax.grad(loss_b)
    object.__setattr__(self, "batch_loss", jax.jit(loss_b))
    object.__setattr__(self, "batch_grad", jax.jit(grad_b))

    @jax.jit
    def sgd_step(params, tokens, mask, lr):
      return tree_axpy(-lr, grad_b(params, tokens, mask), params)
    object.__setattr__(self, "sgd_step", sgd_step)

    # JAX has no forward-mode rule for cuDNN attention's backward, so the HVP runs the same model
    # with the XLA attention (the same function; only the kernel differs).
    grad_x = jax.grad(lambda p, t, m: batch_loss(dataclasses.replace(mcfg, attention_impl="xla"),
                                                 p, t, m))

    hvp_chunk = self.hvp_chunk

    @jax.jit
    def hvp(params, tokens, mask, v):
      # forward-over-reverse: the directional derivative of the gradient along v
      one = lambda t, m: jax.jvp(lambda p: grad_x(p, t, m), (params,), (v,))[1]
      B = tokens.shape[0]
      if not hvp_chunk or hvp_chunk >= B or B % hvp_chunk:
        return one(tokens, mask)
      n = B // hvp_chunk
      split = lambda x: x.reshape(n, hvp_chunk, *x.shape[1:])

      def body(acc, tm):
        return jax.tree.map(lambda a, h: a + h.astype(jnp.float32), acc, one(*tm)), None

      zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
      acc, _ = jax.lax.scan(body, zero, (split(tokens), split(mask)))
      return jax.tree.map(lambda a, x: (a / n).astype(x.dtype), acc, params)
    object.__setattr__(self, "hvp", hvp)

    ex_grad = jax.vmap(jax.grad(lambda p, t, m: example_loss(mcfg, p, t, m)), in_axes=(None, 0, 0))
    dim, seed = self.projection_dim, self.projection_seed

    @jax.jit
    def example_stats(params, tokens, mask, lam):
      """Per-example gradient norms and dots with lam: float32 [C], [C]."""
      g = ex_grad(params, tokens, mask)  # pytree with a leading [C] axis
      if dim:
        gp = jax.vmap(lambda gi: sketch(gi, dim, seed))(g)
        lp = sketch(lam, dim, seed)
        return jnp.linalg.norm(gp, axis=-1), gp @ lp
      sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), -1)
               for x in jax.tree.leaves(g))
      dots = sum(jnp.sum((x.astype(jnp.float32) * l.astype(jnp.float32)).reshape(x.shape[0], -1), -1)
                 for x, l in zip(jax.tree.leaves(g), jax.tree.leaves(lam)))
      return jnp.sqrt(sq), dots
    object.__setattr__(self, "example_stats", example_stats)

    @jax.jit
    def example_losses(params, tokens, mask):
      return jax.vmap(lambda t, m: example_loss(mcfg, params, t, m))(tokens, mask)
    object.__setattr__(self, "example_losses", example_losses)

  def lam_norm(self, lam) -> float:
    if self.projection_dim:
      return float(jnp.linalg.norm(sketch(lam, self.projection_dim, self.projection_seed)))
    return float(jnp.sqrt(tree_dot(lam, lam)))


def _chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
  for s in range(0, n, size):
    yield s, min(n, s + size)


def _padded_chunk(ex: Examples, s: int, e: int, size: int):
  """Rows [s, e) padded to `size` rows (mask 0) so every chunk has one compiled shape."""
  t, m = ex.tokens[s:e], ex.mask[s:e]
  if e - s < size:
    t = np.concatenate([t, np.zeros((size - (e - s),) + t.shape[1:], t.dtype)])
    m = np.concatenate([m, np.zeros((size - (e - s),) + m.shape[1:], m.dtype)])
  return jnp.asarray(t), jnp.asarray(m)


def reference_grad(fns: ScoringFns, params: Params, ref: Examples, chunk: int) -> Params:
  """Gradient of the reference set's mean per-sequence loss (chunked; exact mean over all rows)."""
  total = None
  for s, e in _chunks(len(ref), chunk):
    t, m = jnp.asarray(ref.tokens[s:e]), jnp.asarray(ref.mask[s:e])
    g = fns.batch_grad(params, t, m)
    g = jax.tree.map(lambda x: x * (e - s), g)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return jax.tree.map(lambda x: x / len(ref), total)


def example_stats(fns: ScoringFns, params: Params, ex: Examples, lam: Params, chunk: int,
                  progress: Callable[[int], None] | None = None,
                  mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Per-example gradient norms and dots with lam over all of `ex`: float32 [N], [N]. With a
  `mesh`, each chunk's examples are split over its data x fsdp devices (chunk must divide)."""
  norms, dots = [], []
  for s, e in _chunks(len(ex), chunk):
    t, m = _padded_chunk(ex, s, e, chunk)
    if mesh is not None:
      t, m = (shd.shard_batch({"x": a}, mesh)["x"] for a in (t, m))
    n, d = fns.example_stats(params, t, m, lam)
    norms.append(np.asarray(n)[: e - s])
    dots.append(np.asarray(d)[: e - s])
    if progress:
      progress(e - s)
  return np.concatenate(norms), np.concatenate(dots)


# ----------------------------------------------------------------------------------------------
# proxy training


@dataclasses.dataclass
class ProxyTrace:
  """The proxy's SGD trajectory: params every `interval` steps (keys 0, dt, ..., T) and the example
  ids of every step's batch (int64 [T, B])."""
  checkpoints: dict[int, Params]
  batch_ids: np.ndarray
  lr: float
  interval: int

  @property
  def steps(self) -> int:
    return self.batch_ids.shape[0]


def proxy_batches(n_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """Example ids of each proxy step: consecutive slices of seeded per-epoch permutations."""
  need = steps * batch_size
  perms, e = [], 0
  while sum(len(p) for p in perms) < need:
    perms.append(np.random.default_rng((seed, 1000 + e)).permutation(n_examples))
    e += 1
  return np.concatenate(perms)[:need].reshape(steps, batch_size).astype(np.int64)


def train_proxy(fns: ScoringFns, params0: Params, pool: Examples, steps: int, lr: float,
                batch_size: int, seed: int = 0, interval: int | None = None) -> ProxyTrace:
  """T steps of constant-lr SGD from params0 on batches of `pool`; keeps params every interval
  (default int(sqrt(T))) steps, and at T."""
  if steps < 1:
    raise ValueError(f"proxy steps must be >= 1, got {steps}")
  interval = interval or max(1, int(math.sqrt(steps)))
  ids = proxy_batches(len(pool), steps, batch_size, seed)
  ckpts = {0: params0}
  p = params0
  for t in range(steps):
    p = fns.sgd_step(p, jnp.asarray(pool.tokens[ids[t]]), jnp.asarray(pool.mask[ids[t]]), lr)
    if (t + 1) % interval == 0 or t + 1 == steps:
      ckpts[t + 1] = p
  return ProxyTrace(ckpts, ids, lr, interval)


def _segment_params(fns: ScoringFns, trace: ProxyTrace, pool: Examples, start: int, end: int) -> list:
  """theta_start .. theta_{end-1}, replayed by SGD from the stored theta_start."""
  out = [trace.checkpoints[start]]
  for t in range(start, end - 1):
    ids = trace.batch_ids[t]
    out.append(fns.sgd_step(out[-1], jnp.asarray(pool.tokens[ids]), jnp.asarray(pool.mask[ids]),
                            trace.lr))
  return out


# ----------------------------------------------------------------------------------------------
# scores


@dataclasses.dataclass
class ScoreResult:
  """Raw and normalised scores (float32 [N]) of the scored examples plus per-step diagnostics."""
  lqs_raw: np.ndarray
  pds_raw: np.ndarray
  steps: list[int]
  lam_norms: dict[int, float]
  grad_norms: dict[int, np.ndarray]

  @property
  def lqs(self) -> np.ndarray:
    return normalize(self.lqs_raw)

  @property
  def pds(self) -> np.ndarray:
    return normalize(self.pds_raw)


def normalize(x: np.ndarray, clip: float = 3.0) -> np.ndarray:
  """z-score (population std) and clip to [-clip, clip], float32."""
  x = np.asarray(x, np.float64)
  sd = x.std()
  z = (x - x.mean()) / (sd if sd > 0 else 1.0)
  return np.clip(z, -clip, clip).astype(np.float32)


def lqs_scores(fns: ScoringFns, trace: ProxyTrace, pool: Examples, ref: Examples, scored: Examples,
               chunk: int = 16, progress: Callable[[int], None] | None = None,
               mesh=None) -> ScoreResult:
  """LQS and PDS scores of every row of `scored` from a proxy trace (see the module docstring).

  pool: the examples the proxy trained on (trace.batch_ids index it); ref: the reference set.
  mesh: split the per-example gradient chunks over its devices (scoring sharded over examples).
  """
  T, dt, lr = trace.steps, trace.interval, trace.lr
  scored_steps = [t for t in range(0, T, dt)]
  # g_T norms: the denominator of the latest scored step's learnability
  theta_T = trace.checkpoints[T]
  lam = reference_grad(fns, theta_T, ref, chunk)                       # lambda_T
  zero = jax.tree.map(jnp.zeros_like, lam)
  next_norm, _ = example_stats(fns, theta_T, scored, zero, chunk, progress, mesh)
  grad_norms = {T: next_norm}
  lqs = np.zeros(len(scored), np.float64)
  pds = np.zeros(len(scored), np.float64)
  lam_norms = {T: fns.lam_norm(lam)}
  seg_ends = sorted(trace.checkpoints)
  for seg_start, seg_end in reversed(list(zip(seg_ends[:-1], seg_ends[1:]))):
    thetas = _segment_params(fns, trace, pool, seg_start, seg_end)
    for t in range(seg_end - 1, seg_start - 1, -1):
      theta_t = thetas[t - seg_start]
      if t in scored_steps:
        # score with lambda_{t+1}: the adjoint before this step's update
        norms, dots = example_stats(fns, theta_t, scored, lam, chunk, progress, mesh)
        lam_n = fns.lam_norm(lam)
        cos = np.clip(dots / np.maximum(norms * lam_n, 1e-30), -1.0, 1.0)
        learn = norms / np.maximum(next_norm, 1e-30)
        lqs += lr * lam_n * learn * cos
        pds += lr * dots
        next_norm = norms
        grad_norms[t] = norms
      ids = trace.batch_ids[t]
      hv = fns.hvp(theta_t, jnp.asarray(pool.tokens[ids]), jnp.asarray(pool.mask[ids]), lam)
      g_ref = reference_grad(fns, theta_t, ref, chunk)
      lam = jax.tree.map(lambda l, g, h: l + g - lr * h, lam, g_ref, hv)
      lam_norms[t] = fns.lam_norm(lam)
  return ScoreResult(lqs.astype(np.float32), pds.astype(np.float32), scored_steps, lam_norms,
                     grad_norms)


def loss_scores(fns: ScoringFns, params: Params, ex: Examples, chunk: int = 64) -> np.ndarray:
  """Per-example token-mean loss under the proxy (higher = harder), float32 [N]."""
  out = []
  for s, e in _chunks(len(ex), chunk):
    t, m = _padded_chunk(ex, s, e, chunk)
    out.append(np.asarray(fns.example_losses(params, t, m))[: e - s])
  return np.concatenate(out).astype(np.float32)


def random_scores(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng((seed, 7)).standard_normal(n).astype(np.float32)


def scoring_passes(steps: int, interval: int | None = None) -> int:
  """Number of per-example gradient passes over the scored set LQS makes (scored steps + theta_T)."""
  interval = interval or max(1, int(math.sqrt(steps)))
  return len(range(0, steps, interval)) + 1


# ----------------------------------------------------------------------------------------------
# learned scorer for large corpora


@dataclasses.dataclass
class LearnedScorer:
  """Mean-pooled hidden states of a (proxy) LM encoder + a linear head fitted by least squares
  (MSE) to proxy scores of a sample; predicts scores for every example."""
  mcfg: ModelConfig
  params: Params
  w: np.ndarray        # float64 [D]
  b: float
  fit: dict            # diagnostics: held-out Pearson / Spearman of the fit

  def predict(self, ex: Examples, chunk: int = 64) -> np.ndarray:
    return (embed_examples(self.mcfg, self.params, ex, chunk) @ self.w + self.b).astype(np.float32)


_EMBED_CACHE: dict = {}


def embed_examples(mcfg: ModelConfig, params: Params, ex: Examples, chunk: int = 64) -> np.ndarray:
  """Masked mean of final hidden states over each example's input positions: float64 [N, D]."""
  fn = _EMBED_CACHE.get(mcfg)
  if fn is None:
    @jax.jit
    def fn(params, tokens, mask):
      h = model_lib.forward(mcfg, params, tokens[:, :-1], return_hidden=True).astype(jnp.float32)
      w = mask[..., None]
      return jnp.sum(h * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
    _EMBED_CACHE[mcfg] = fn
  out = []
  for s, e in _chunks(len(ex), chunk):
    t, m = _padded_chunk(ex, s, e, chunk)
    out.append(np.asarray(fn(params, t, m), np.float64)[: e - s])
  return np.concatenate(out)


def _rank(x: np.ndarray) -> np.ndarray:
  r = np.empty(len(x))
  r[np.argsort(x, kind="stable")] = np.arange(len(x))
  return r


def fit_learned_scorer(mcfg: ModelConfig, params: Params, ex: Examples, targets: np.ndarray,
                       ridge: float = 1e-3, holdout: float = 0.2, seed: int = 0,
                       chunk: int = 64) -> LearnedScorer:
  """Ridge-regularised least squares of targets on mean-pooled features; reports the held-out
  correlation of a fit on the remaining 1 - holdout, then refits on everything."""
  X = embed_examples(mcfg, params, ex, chunk)
  y = np.asarray(targets, np.float64)
  mu, sd = X.mean(0), X.std(0) + 1e-8

  def solve(Xs, ys):
    Z = (Xs - mu) / sd
    A = Z.T @ Z + ridge * len(Z) * np.eye(Z.shape[1])
    w = np.linalg.solve(A, Z.T @ (ys - ys.mean()))
    return w / sd, ys.mean() - (mu / sd) @ w

  perm = np.random.default_rng((seed, 11)).permutation(len(y))
  n_hold = int(len(y) * holdout)
  fit = {}
  if n_hold >= 10:
    w, b = solve(X[perm[n_hold:]], y[perm[n_hold:]])
    pred = X[perm[:n_hold]] @ w + b
    yh = y[perm[:n_hold]]
    fit = {"heldout_pearson": float(np.corrcoef(pred, yh)[0, 1]),
           "heldout_spearman": float(np.corrcoef(_rank(pred), _rank(yh))[0, 1]),
           "heldout_n": n_hold}
  w, b = solve(X, y)
  return LearnedScorer(mcfg, params, w, float(b), fit)
