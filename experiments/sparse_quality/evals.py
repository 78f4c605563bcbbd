"""The sparse-quality experiment's evaluations, on top of the public decoding API
(`decoding.generate`, `resa.generate`, `gate_training.attention_recall`):

  drift      greedy continuations of held-out text under dense, block-sparse and block-sparse +
             ReSA-rectified decoding; each one's mean per-token NLL under the dense model, its token
             agreement with the dense continuation (the definitions of `evaluation.drift_eval`) and
             how many tokens it follows the dense one before the first difference. And the same
             decodings teacher-forced on the true continuation (`evaluation.teacher_forced_drift`):
             NLL in excess of dense decoding, overall and per quarter of the continuation.
  retrieval  passkey accuracy (all 5 digits, greedy) for dense decoding and each selector at each
             token budget, on given prompts (`evaluation.passkey_accuracy`, e.g. on real-text
             haystacks; `evaluation.retrieval_eval` builds its own prompts).
  recall     the share of dense attention probability inside the blocks Quest / the gate choose, per
             budget, at given query positions (teacher-forced: one dense forward, no decoding).
  kv_quality the teacher-forced perplexity through low-bit KV caches (`evaluation.kv_cache_quality`);
             drift and retrieval take a `kv_cache` too (`effjax.quant.kv.KVCacheSpec`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from effjax import decoding
from effjax.config import Config, ModelConfig
from effjax.data import ByteTokenizer
from effjax.evaluation import (continuation_nll, kv_cache_quality, passkey_accuracy,
                               teacher_forced_drift)
from effjax.quant.kv import KVCacheSpec
from effjax.sparse import gate as gate_lib
from effjax.sparse import resa, selection
from effjax.sparse.gate_training import attention_recall


def _block(x):
  return jax.block_until_ready(x)


def sparse_config(kind: str, gate_params, *, block_size: int, budget: int,
                  rectify_every: int = 0, **fields) -> resa.SparseConfig:
  """fields: further SparseConfig fields (e.g. gate_cache_dtype)."""
  d_gate = 64 if gate_params is None else int(gate_params["wq"].shape[-1])
  return resa.SparseConfig(selector=kind, block_size=block_size, budget_tokens=budget,
                           rectify_every=rectify_every, d_gate=d_gate, **fields)


# ----------------------------------------------------------------------------------------------
# drift


def dense_nll(mcfg: ModelConfig, params, prompts_BT: np.ndarray, cont_BN: np.ndarray,
              chunk: int = 8) -> np.ndarray:
  """Dense model's mean per-token NLL (nats) of each continuation given its (full-length) prompt:
  float [B] (`evaluation.continuation_nll`)."""
  lengths = np.full((len(prompts_BT),), prompts_BT.shape[1], np.int32)
  return continuation_nll(mcfg, params, prompts_BT, lengths, cont_BN, chunk=chunk)


def first_divergence(cont_BN: np.ndarray, ref_BN: np.ndarray) -> np.ndarray:
  """Tokens each continuation shares with the reference before the first difference: int [B]
  (N when identical)."""
  diff = cont_BN != ref_BN
  return np.where(diff.any(axis=1), diff.argmax(axis=1), cont_BN.shape[1])


def drift(cfg: Config, params, prompts_BT: np.ndarray, true_BN: np.ndarray, *, block_size: int,
          budget: int, rectify: list[int], selectors: dict, decode_impl: str = "auto",
          rectify_cache_only: list[int] = (), log=print, kv_cache: KVCacheSpec | None = None,
          reference_BN: np.ndarray | None = None, return_continuations: bool = False):
  """Greedy continuations of len(true_BN[0]) tokens of equal-length prompts under dense decoding
  and, per selector (name -> (kind, gate params or None[, further SparseConfig fields])),
  block-sparse decoding at `budget`
  tokens without rectification and with ReSA rectification every f in `rectify` steps (and, per
  f in `rectify_cache_only`, a diagnostic run "<sel> sparse+rectify-cache(f=F)": rectified the
  same way but every token picked from the sparse step's logits, SparseConfig.rectify_logits
  "sparse", so only the cache differs from the unrectified run).
  Then the same decodings teacher-forced on the true continuation (`evaluation.
  teacher_forced_drift`: every run fed the same tokens, so positions stay comparable).
  Returns {"rows": {run: {"nll", "agreement_with_dense", "first_divergence"}},
  "teacher_forced": {run: {"nll", "excess_nll", "agreement_with_dense", "excess_nll_by_quarter"}},
  "true_continuation_nll": the dense NLL of the real held-out continuation, "seconds": per run
  (wall, compile included), "continuations": {run: first continuation as text}}.
  kv_cache: every decoding (free-running and teacher-forced, the "dense" reference included)
  stores its K/V this way (None: bf16); the NLLs stay the dense model's over a full forward.
  reference_BN: int [B, N], e.g. the dense continuation over a bf16 cache: each row also gets
  "agreement_with_reference" and "first_divergence_from_reference".
  return_continuations: return (that dict, {run: int32 [B, N] continuation})."""
  B, T = prompts_BT.shape
  N = true_BN.shape[1]
  toks, lens = jnp.asarray(prompts_BT), jnp.full((B,), T, jnp.int32)
  key = jax.random.key(0)
  runs, seconds = {}, {}
  t0 = time.perf_counter()
  runs["dense"] = np.asarray(_block(decoding.generate(
      cfg.model, params, toks, lens, key, max_new_tokens=N, decode_impl=decode_impl,
      kv_cache=kv_cache)[0]))
  seconds["dense"] = time.perf_counter() - t0
  log(f"  drift dense: {seconds['dense']:.1f} s")
  decodings = {"dense": None}   # name -> None (dense) or (SparseConfig, gate params)
  for sel, (kind, gp, *extra) in selectors.items():
    runs_of_sel = [(f"{sel} sparse", 0, "dense")]
    runs_of_sel += [(f"{sel} sparse+rectify(f={f})", f, "dense") for f in rectify]
    runs_of_sel += [(f"{sel} sparse+rectify-cache(f={f})", f, "sparse") for f in rectify_cache_only]
    for name, f, logits_from in runs_of_sel:
      decodings[name] = (sparse_config(kind, gp, block_size=block_size, budget=budget,
                                       rectify_every=f, rectify_logits=logits_from,
                                       **(extra[0] if extra else {})), gp)
  for name, (scfg, gp) in list(decodings.items())[1:]:
    t0 = time.perf_counter()
    runs[name] = np.asarray(_block(resa.generate(
        cfg.model, scfg, params, toks, lens, key, gp, max_new_tokens=N, decode_impl=decode_impl,
        kv_cache=kv_cache)[0]))
    seconds[name] = time.perf_counter() - t0
    log(f"  drift {name}: {seconds[name]:.1f} s")
  t0 = time.perf_counter()
  teacher_forced = teacher_forced_drift(cfg, params, prompts_BT, np.asarray(lens), true_BN, decodings,
                                        decode_impl=decode_impl, kv_cache=kv_cache)
  seconds["teacher_forced"] = time.perf_counter() - t0
  log(f"  drift teacher-forced (true continuation, {len(decodings)} decodings): "
      f"{seconds['teacher_forced']:.1f} s; excess NLL " + ", ".join(
          f"{n} {r['excess_nll']:+.4f}" for n, r in teacher_forced.items() if n != "dense"))
  rows = {}
  for name, cont in runs.items():
    rows[name] = {"nll": float(np.mean(dense_nll(cfg.model, params, prompts_BT, cont))),
                  "agreement_with_dense": float(np.mean(cont == runs["dense"])),
                  "first_divergence": float(np.mean(first_divergence(cont, runs["dense"])))}
    if reference_BN is not None:
      rows[name]["agreement_with_reference"] = float(np.mean(cont == reference_BN))
      rows[name]["first_divergence_from_reference"] = float(np.mean(first_divergence(cont, reference_BN)))
  tok = ByteTokenizer()
  out = {"rows": rows, "teacher_forced": teacher_forced,
         "true_continuation_nll": float(np.mean(dense_nll(cfg.model, params, prompts_BT, true_BN))),
         "seconds": seconds,
         "continuations": {name: tok.decode(cont[0]) for name, cont in runs.items()}}
  return (out, runs) if return_continuations else out


# ----------------------------------------------------------------------------------------------
# retrieval


def retrieval(cfg: Config, params, prompts_BT: np.ndarray, lengths_B: np.ndarray, keys: list[str],
              *, budgets: list[int], selectors: dict, block_size: int, decode_impl: str = "auto",
              log=print, kv_cache: KVCacheSpec | None = None) -> dict:
  """Passkey accuracy on given prompts (`evaluation.passkey_accuracy`, the definition of
  `evaluation.retrieval_eval`), every decoding over `kv_cache` (None: bf16): {"accuracy",
  "digit_accuracy", "seconds"} by row."""
  return passkey_accuracy(cfg, params, prompts_BT, lengths_B, keys, budgets=budgets,
                          selectors=selectors, block_size=block_size, decode_impl=decode_impl, log=log,
                          kv_cache=kv_cache)


# ----------------------------------------------------------------------------------------------
# low-bit KV caches


def kv_specs(kinds: list[str], *, group: int | None = None, window: int | None = None,
             k_modes: tuple[str, ...] = ("channel", "token")) -> dict:
  """{"bf16": the reference, "<kind> K per <mode>": KVCacheSpec} for each kind ("int4" / "int2")
  and K mode; group / window None keep KVCacheSpec's defaults (128 tokens per K scale; a
  residual window of 128 tokens at 4 bits, 256 at 2). ValueError on a bad setting."""
  specs = {"bf16": KVCacheSpec("bf16")}
  for kind in kinds:
    for mode in k_modes:
      specs[f"{kind} K per {mode}"] = KVCacheSpec(kind, window=window, k_mode=mode,
                                                  **({} if group is None else {"group": group}))
  return specs


def kv_quality(cfg: Config, params, prompts_BT: np.ndarray, true_BN: np.ndarray, specs: dict, *,
               decode_impl: str = "auto") -> dict:
  """Teacher-forced NLL of the true continuations through each cache (`evaluation.
  kv_cache_quality`: dense attention, every K/V entry of prompt and continuation stored in the
  cache; the first spec is the reference). Equal-length prompts int [B, T], true_BN int [B, N].
  Returns {"rows": {name: kv_cache_quality's row + "ppl_increase_se": the standard error of
  ppl_increase (delta method: exp(excess) * SE of the per-sequence excess NLL)}, "seconds"}."""
  t0 = time.perf_counter()
  lengths = np.full((len(prompts_BT),), prompts_BT.shape[1], np.int32)
  rows = kv_cache_quality(cfg, params, prompts_BT, lengths, true_BN, specs, decode_impl=decode_impl)
  for r in rows.values():
    se = r["excess_nll_se"]
    r["ppl_increase_se"] = None if se is None else float((1.0 + r["ppl_increase"]) * se)
  return {"rows": rows, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# attention recall of the block choices


@functools.partial(jax.jit, static_argnames=("mcfg", "block_size", "budgets"))
def _recall(mcfg: ModelConfig, params, gate_params, tokens_BT, pos_P, block_size: int,
            budgets: tuple[int, ...]):
  """[L, P, len(RECALL_SELECTORS), len(budgets), B, K] recall of each selector's top-k choice."""
  B, T = tokens_BT.shape
  K, G, H = mcfg.n_kv_heads, mcfg.n_heads // mcfg.n_kv_heads, mcfg.hd
  S = -(-T // block_size) * block_size
  _, qs, ks, _ = decoding.forward_layers(mcfg, params, tokens_BT)
  per_layer = []
  for i in range(mcfg.n_layers):
    k_BKSH = jnp.pad(ks[i].astype(jnp.float32), ((0, 0), (0, S - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    def one(p, i=i, k_BKSH=k_BKSH):
      lengths = jnp.full((B,), p + 1, jnp.int32)
      q_BKGH = jax.lax.dynamic_index_in_dim(qs[i], p, axis=1, keepdims=False)
      q_BKGH = q_BKGH.astype(jnp.float32).reshape(B, K, G, H)
      kmin, kmax = selection.block_minmax(k_BKSH, lengths, block_size)
      scores = [selection.quest_scores(q_BKGH, kmin, kmax)]
      kc = gate_lib.compress_blocks(gate_params["wk"][i], k_BKSH, lengths, block_size, mcfg.rope_theta)
      for kc_dtype in RECALL_GATE_DTYPES:   # the K-compression cache as stored
        scores.append(gate_lib.gate_logits(gate_params["wq"][i], q_BKGH,
                                           gate_lib.to_cache_dtype(kc, kc_dtype),
                                           lengths - 1, mcfg.rope_theta))
      return jnp.stack([jnp.stack([
          attention_recall(q_BKGH, k_BKSH, lengths,
                           selection.select_top_k(s, lengths, block_size, b // block_size), block_size)
          for b in budgets]) for s in scores])

    per_layer.append(jax.lax.map(one, pos_P))
  return jnp.stack(per_layer)


# the selectors `_recall` scores: Quest, then the gate over its K-compression cache stored as
# bfloat16 (SparseConfig.gate_cache_dtype's default), float32 and float8_e4m3fn
RECALL_GATE_DTYPES = ("bfloat16", "float32", "float8_e4m3fn")
RECALL_SELECTORS = ("quest", "gate", "gate-f32", "gate-f8")


def recall(mcfg: ModelConfig, params, gate_params, tokens_BT: np.ndarray, positions: list[int], *,
           block_size: int, budgets: list[int], kc_stats: bool = False) -> dict:
  """Mean share of dense attention probability (over layers, kv heads, their query heads,
  sequences and the query positions) that falls in the blocks Quest and the gate (bfloat16,
  float32 and float8_e4m3fn K-compression cache) pick, per budget: {"quest": {budget: r},
  "gate": {budget: r}, "gate-f32": ..., "gate-f8": ..., "by_layer": {sel: {budget: [L]}},
  "kc_abs": `kc_magnitudes` of the sequences, with kc_stats}.
  tokens_BT: int32 [B, T]; positions: the query positions (each query sees keys 0..p)."""
  r = np.asarray(_recall(mcfg, params, gate_params, jnp.asarray(tokens_BT),
                         jnp.asarray(positions, jnp.int32), block_size, tuple(budgets)))
  out: dict = {"positions": [int(p) for p in positions], "by_layer": {}}
  for s, name in enumerate(RECALL_SELECTORS):
    out[name] = {str(b): float(r[:, :, s, j].mean()) for j, b in enumerate(budgets)}
    out["by_layer"][name] = {str(b): [float(x) for x in r[:, :, s, j].mean(axis=(1, 2, 3))]
                             for j, b in enumerate(budgets)}
  if kc_stats:
    out["kc_abs"] = kc_magnitudes(mcfg, params, gate_params, tokens_BT, block_size=block_size)
  return out


@functools.partial(jax.jit, static_argnames=("mcfg", "block_size"))
def _kc_abs(mcfg: ModelConfig, params, gate_params, tokens_BT, block_size: int):
  """|K-compression cache| of every full block of every layer, float32 [L, B, K, Nb * Dg]."""
  B, T = tokens_BT.shape
  nb = T // block_size
  _, _, ks, _ = decoding.forward_layers(mcfg, params, tokens_BT)
  lengths = jnp.full((B,), nb * block_size, jnp.int32)
  out = []
  for i in range(mcfg.n_layers):
    k_BKSH = ks[i][:, :nb * block_size].astype(jnp.float32).transpose(0, 2, 1, 3)
    kc = gate_lib.compress_blocks(gate_params["wk"][i], k_BKSH, lengths, block_size, mcfg.rope_theta)
    out.append(jnp.abs(kc).reshape(B, kc.shape[1], -1))
  return jnp.stack(out)


def kc_magnitudes(mcfg: ModelConfig, params, gate_params, tokens_BT: np.ndarray, *,
                  block_size: int) -> dict:
  """Where the gate's K-compression cache entries sit against float8_e4m3fn's range: quantiles
  of |kc| (all layers) and the shares below its smallest normal (2^-6, fewer mantissa bits),
  below half its smallest subnormal (2^-10, stored as 0) and above its largest value (448,
  clipped)."""
  a = np.asarray(_kc_abs(mcfg, params, gate_params, jnp.asarray(tokens_BT), block_size)).ravel()
  qs = (0.01, 0.1, 0.5, 0.9, 0.99, 1.0)
  return {"quantiles": {str(q): float(np.quantile(a, q)) for q in qs},
          "share_below_f8_normal": float(np.mean(a < 2.0 ** -6)),
          "share_flushed_to_zero": float(np.mean(a < 2.0 ** -10)),
          "share_clipped": float(np.mean(a > gate_lib.FLOAT8_MAX))}
