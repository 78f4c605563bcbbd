"""SeerAttention at inference: block-sparse prefill attention inside the model.

`SeerSparseAttention` is an attention strategy of `effjax.model.run_layers` (the one layer): per
layer it chooses key blocks for every (sequence, query head, query block) and runs
`pallas_kernels.block_sparse_attention` over them. Selectors (`PrefillSparseConfig.selector`):

  gate    the distilled prefill AttnGate (`prefill_gate`): top-k of its probabilities at
          nz-ratio `density` per query-block row (`select_nz_ratio`), or every block whose
          probability reaches `threshold`
  oracle  the same top-k on the layer's true block-level attention (`select_oracle`): the
          upper bound of any gate at that density
  oracle_mass  the top-k by the attention mass of each block (`select_oracle_mass`; the full
          attention map): whether max-pooled targets pick the right blocks
  static  attention sinks + a local window (`select_static`), the window sized so the density
          over the causal triangle is the closest to `density`
  recency the nearest blocks, each row's budget as the gate's nz-ratio top-k (with +local the
          same forced sink and local blocks too): a static pattern at exactly the gate's density
  dense   every visible block (block-sparse attention with nothing left out == causal attention)

`NAMES` lists the selector names the drivers take: these, and `<name>+local` for gate, oracle,
oracle_mass and recency (`keep_sink_blocks` / `keep_local_blocks` always kept inside the row's
budget, the scores filling the rest). Every selector keeps the diagonal block, and the last `dense_rows` query blocks of each sequence
attend densely (SeerAttention's setting for the rows that produce the next tokens).
`sparse_nll` / `evaluate_densities` give the perplexity of a frozen model at given densities.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from effjax.config import ModelConfig
from effjax.model import transformer as model_lib
from effjax.sparse import prefill_gate as pg
from effjax.sparse import prefill_selection as sel
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.flash_attention import flash_attention

SELECTORS = ("gate", "oracle", "oracle_mass", "static", "recency", "dense")
_WITH_LOCAL = ("gate", "oracle", "oracle_mass", "recency")
NAMES = ("gate", "gate+local", "oracle", "oracle+local", "oracle_mass", "oracle_mass+local",
         "static", "recency", "recency+local")


@dataclasses.dataclass(frozen=True)
class PrefillSparseConfig:
  """How block-sparse prefill chooses its blocks (hashable: a static argument)."""
  selector: str = "gate"
  block_size: int = 64
  density: float = 0.1            # nz ratio per query-block row (gate, oracle); static: target
  threshold: float | None = None  # gate: keep blocks with probability >= threshold instead
  dense_rows: int = 0             # the last query blocks of each sequence attend densely
  sink_blocks: int = 1            # static: the first blocks always kept
  keep_local_blocks: int = 1      # top-k selectors: the blocks ending at the diagonal always kept
  keep_sink_blocks: int = 0       # top-k selectors: the first blocks always kept (both count
                                  # against the row's budget; the scores fill the rest)
  implementation: str | None = None  # block-sparse attention backend (None: auto)
  topk_implementation: str | None = None  # the nz-ratio top-k (`block_topk.prefix_topk`)

  def __post_init__(self):
    if self.selector not in SELECTORS:
      raise ValueError(f"selector must be one of {', '.join(SELECTORS)}, got {self.selector!r}")
    if not isinstance(self.block_size, int) or self.block_size < 1:
      raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
    if not 0 < self.density <= 1:
      raise ValueError(f"density must be in (0, 1], got {self.density}")
    if self.threshold is not None and not 0 < self.threshold <= 1:
      raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
    if self.dense_rows < 0 or self.sink_blocks < 0 or self.keep_sink_blocks < 0:
      raise ValueError("dense_rows, sink_blocks and keep_sink_blocks must be >= 0")
    if self.keep_local_blocks < 1:
      raise ValueError(f"keep_local_blocks must be >= 1 (the diagonal), got {self.keep_local_blocks}")


def static_local_blocks(nb: int, density: float, sink_blocks: int) -> int:
  """The local window (in blocks, >= 1) whose sink + window pattern over nb query blocks keeps
  the share of causal (query, key) block pairs closest to `density`."""
  total = nb * (nb + 1) / 2

  def kept(w):
    return sum(min(i + 1, sink_blocks + w) for i in range(nb)) / total

  return min(range(1, nb + 1), key=lambda w: (abs(kept(w) - density), w))


class SeerSparseAttention:
  """Attention strategy: block-sparse causal attention over the blocks the selector picks.
  aux per layer: the selected share of visible block pairs (float32 scalar)."""
  stateless = False

  def __init__(self, mcfg: ModelConfig, scfg: PrefillSparseConfig, lengths_B: jax.Array,
               gate_params: dict | None = None):
    if scfg.selector == "gate" and gate_params is None:
      raise ValueError("selector 'gate' needs prefill gate params (prefill_gate_training)")
    self.mcfg, self.scfg, self.lengths_B, self.gate_params = mcfg, scfg, lengths_B, gate_params

  def select(self, layer: int, q_BTNH, k_BTKH, v_BTKH) -> jax.Array:
    s, bs, lengths = self.scfg, self.scfg.block_size, self.lengths_B
    B, T, N, _ = q_BTNH.shape
    nb = pg.num_blocks(T, bs)
    if s.selector == "dense":
      return sel.select_static(lengths, N, T, bs, sink_blocks=0, local_blocks=nb)
    if s.selector == "static":
      w = static_local_blocks(nb, s.density, s.sink_blocks)
      return sel.select_static(lengths, N, T, bs, sink_blocks=s.sink_blocks, local_blocks=w,
                               dense_rows=s.dense_rows)
    keep = dict(sink_blocks=s.keep_sink_blocks, local_blocks=s.keep_local_blocks)
    if s.selector == "oracle":
      return sel.select_oracle(q_BTNH, k_BTKH, v_BTKH, lengths, bs, s.density, s.dense_rows,
                               **keep)
    if s.selector == "oracle_mass":
      return sel.select_oracle_mass(q_BTNH, k_BTKH, lengths, bs, s.density, s.dense_rows, **keep)
    if s.selector == "recency":                           # nearer blocks score higher
      i, j = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
      near = jnp.broadcast_to((j - i).astype(jnp.float32), (B, N, nb, nb))
      return sel.select_nz_ratio(near, lengths, bs, s.density, s.dense_rows, **keep,
                                 implementation=s.topk_implementation)
    logits = pg.gate_logits(self.gate_params["wq"][layer], self.gate_params["wk"][layer],
                            q_BTNH, k_BTKH, lengths, bs, self.mcfg.rope_theta)
    if s.threshold is not None:
      return sel.select_threshold(jax.nn.softmax(logits, axis=-1), lengths, bs, s.threshold,
                                  dense_rows=s.dense_rows, **keep)
    # a top-k per row: the softmax keeps each row's order, so the logits choose the same blocks
    # without a pass over the [B, N, nQ, nK] probabilities
    return sel.select_nz_ratio(logits, lengths, bs, s.density, s.dense_rows, **keep,
                               implementation=s.topk_implementation)

  def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
    idx = self.select(layer, q_BTNH, k_BTKH, v_BTKH)
    o = block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, idx, self.lengths_B,
                               block_size=self.scfg.block_size,
                               implementation=self.scfg.implementation)
    return o, sel.density(idx, self.lengths_B, self.scfg.block_size)


class SeerTrainingAttention(SeerSparseAttention):
  """Fine-tuning strategy (model and gate trained together, SeerAttention's long-context use):
  the gate's nz-ratio selection as `SeerSparseAttention` (no gradient through the choice),
  block-sparse attention with gradients to q, k and v, and the gate's distillation loss:
  KL(block-level target of the layer's dense attention || softmax(gate logits)), the target
  and the gate's inputs computed from stop-gradient q / k / v (so only the gate learns from it).
  aux per layer: (density, KL) float32 scalars."""

  def __init__(self, mcfg: ModelConfig, scfg: PrefillSparseConfig, lengths_B: jax.Array,
               gate_params: dict, target_implementation=None):
    if scfg.selector != "gate" or scfg.threshold is not None:
      raise ValueError("fine-tuning selects by the gate's nz-ratio top-k: selector 'gate', "
                       "threshold None")
    super().__init__(mcfg, scfg, lengths_B, gate_params)
    self.target_implementation = target_implementation

  def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
    s, bs, lengths = self.scfg, self.scfg.block_size, self.lengths_B
    qs, ks, vs = (jax.lax.stop_gradient(x) for x in (q_BTNH, k_BTKH, v_BTKH))
    logits = pg.gate_logits(self.gate_params["wq"][layer], self.gate_params["wk"][layer], qs, ks,
                            lengths, bs, self.mcfg.rope_theta)
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
    idx = sel.select_nz_ratio(probs, lengths, bs, s.density, s.dense_rows,
                              s.keep_sink_blocks, s.keep_local_blocks,
                              implementation=s.topk_implementation)
    o = block_sparse_attention(q_BTNH, k_BTKH, v_BTKH, idx, lengths, block_size=bs,
                               implementation=s.implementation)
    _, target = flash_attention(qs, ks, vs, lengths, block_size=bs,
                                implementation=self.target_implementation)
    kl = pg.kl_loss(jax.lax.stop_gradient(target), logits, lengths, bs)
    return o, (sel.density(idx, lengths, bs), kl)


@functools.partial(jax.jit, static_argnames=("mcfg", "scfg"))
def sparse_training_loss(mcfg: ModelConfig, scfg: PrefillSparseConfig, trainable: dict,
                         tokens_BT: jax.Array, lengths_B: jax.Array, kl_weight=1.0):
  """(loss, (next-token NLL, mean KL over layers, mean density)) of trainable
  {"model": params, "gate": prefill gate params} on right-padded tokens: the mean NLL with
  block-sparse attention chosen by the gate in every layer, plus kl_weight times the gate's
  distillation loss (`SeerTrainingAttention`). Differentiate with respect to `trainable`."""
  params, gate = trainable["model"], trainable["gate"]
  B, T = tokens_BT.shape
  x = model_lib.embed(mcfg, params, tokens_BT, mcfg.embed_lookup)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x, aux = model_lib.run_layers(mcfg, params, x, pos,
                                SeerTrainingAttention(mcfg, scfg, lengths_B, gate),
                                remat=mcfg.remat)
  logp = jax.nn.log_softmax(model_lib.logits(mcfg, params, x)[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  valid = jnp.arange(T - 1)[None] < (lengths_B[:, None] - 1)
  nll = jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
  dens = jnp.mean(jnp.stack([a[0] for a in aux]))
  kl = jnp.mean(jnp.stack([a[1] for a in aux]))
  return nll + kl_weight * kl, (nll, kl, dens)


@functools.partial(jax.jit, static_argnames=("mcfg", "scfg"))
def sparse_forward(mcfg: ModelConfig, scfg: PrefillSparseConfig, params, tokens_BT: jax.Array,
                   lengths_B: jax.Array, gate_params=None):
  """(logits float32 [B, T, V], per-layer density float32 [L]) of right-padded tokens with
  block-sparse attention in every layer."""
  B, T = tokens_BT.shape
  x = model_lib.embed(mcfg, params, tokens_BT)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x, dens = model_lib.run_layers(mcfg, params, x, pos,
                                 SeerSparseAttention(mcfg, scfg, lengths_B, gate_params))
  return model_lib.logits(mcfg, params, x), jnp.stack(dens)


@functools.partial(jax.jit, static_argnames=("mcfg", "scfg"))
def sparse_nll(mcfg: ModelConfig, scfg: PrefillSparseConfig, params, tokens_BT: jax.Array,
               lengths_B: jax.Array, gate_params=None, score_from: int = 0):
  """(summed NLL of tokens score_from + 1..length-1 of each sequence, number of those tokens,
  mean density over layers): next-token loss with block-sparse prefill attention."""
  logits, dens = sparse_forward(mcfg, scfg, params, tokens_BT, lengths_B, gate_params)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  tgt = tokens_BT[:, 1:]
  nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  pos = jnp.arange(tokens_BT.shape[1] - 1)[None]
  valid = (pos < (lengths_B[:, None] - 1)) & (pos >= score_from)
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid), jnp.mean(dens)


def evaluate_densities(mcfg: ModelConfig, params, tokens_NT: np.ndarray, *,
                       densities=(1.0, 0.5, 0.2, 0.1), selectors=("gate", "oracle", "static"),
                       block_size: int = 64, dense_rows: int = 0, gate_params=None,
                       batch_size: int = 4, implementation=None, local_blocks: int = 2,
                       sink_blocks: int = 1, score_from: int = 0, topk_implementation=None,
                       log=None) -> dict:
  """Perplexity of the frozen model on tokens_NT (int32 [N, T], full-length sequences) with
  block-sparse prefill at each density for each selector, plus the dense reference; only the
  predictions from position score_from on are scored (e.g. the second copy of a repeated text).
  A selector "gate+local" / "oracle+local" is the gate / oracle top-k with the first sink_blocks
  and the local_blocks blocks ending at the diagonal always kept (inside the same budget). Returns
  {"dense": row, "<selector>@<density>": row}, row = {"nll", "ppl", "ppl_increase" (over dense),
  "density" (measured), "tokens"}."""
  N, T = tokens_NT.shape
  lengths = np.full((N,), T, np.int32)

  def run(scfg):
    tot, cnt, dsum = 0.0, 0, 0.0
    for i in range(0, N, batch_size):
      t, n, d = sparse_nll(mcfg, scfg, params, jnp.asarray(tokens_NT[i:i + batch_size]),
                           jnp.asarray(lengths[i:i + batch_size]), gate_params, score_from)
      tot, cnt, dsum = tot + float(t), cnt + int(n), dsum + float(d) * len(tokens_NT[i:i + batch_size])
    nll = tot / max(cnt, 1)
    return {"nll": nll, "ppl": math.exp(nll), "density": dsum / N, "tokens": cnt}

  out = {"dense": run(PrefillSparseConfig("dense", block_size, implementation=implementation,
                                          topk_implementation=topk_implementation))}
  out["dense"]["ppl_increase"] = 0.0
  if log:
    log(f"dense: ppl {out['dense']['ppl']:.4f}")
  for s in selectors:
    base, _, variant = s.partition("+")
    if s not in NAMES:
      raise ValueError(f"selector {s!r}: want one of {', '.join(NAMES)}")
    if base == "gate" and gate_params is None:
      continue
    keep = dict(keep_local_blocks=local_blocks, keep_sink_blocks=sink_blocks) if variant else {}
    for d in densities:
      row = run(PrefillSparseConfig(base, block_size, density=float(d), dense_rows=dense_rows,
                                    implementation=implementation,
                                    topk_implementation=topk_implementation, **keep))
      row["ppl_increase"] = row["ppl"] / out["dense"]["ppl"] - 1.0
      out[f"{s}@{d}"] = row
      if log:
        log(f"{s} @ {d}: ppl {row['ppl']:.4f} ({100 * row['ppl_increase']:+.2f}%), "
            f"density {row['density']:.3f}")
  return out
