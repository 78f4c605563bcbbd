"""Perplexity / bits-per-byte on named splits and text sampling from a trained checkpoint.

(KV-cached decoding lives in `decoding.py`; sampling here re-runs the full window each token,
which is fine for the few hundred tokens of an evaluation sample.)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from effjax import data as data_lib
from effjax import decoding
from effjax import model as model_lib
from effjax import sharding as shd
from effjax.checkpoint import CheckpointError, restore
from effjax.config import Config, ModelConfig
from effjax.data import ByteTokenizer
from effjax.decoding import sample_logits
from effjax.sparse import resa
from effjax.training import evaluate_loss, init_train_state, make_eval_step, make_optimizer


def load_params(cfg: Config, run_dir: str | pathlib.Path, step: int | None = None):
  """Restores params (fp32 pytree) of the checkpoint at `step` (default latest) of a run."""
  run_dir = pathlib.Path(run_dir)
  if not run_dir.is_dir():
    raise CheckpointError(f"run directory {run_dir} does not exist")
  ckpt_dir = run_dir / "checkpoints"
  # Only the params are needed, but orbax restores the saved tree as a whole: build the abstract
  # train state from the same optimiser the run used.
  opt = make_optimizer(cfg.optim, cfg.train.steps)
  abstract = jax.eval_shape(lambda: init_train_state(cfg, jax.random.key(0), opt))
  # restore onto this process's first device, whatever mesh the run was saved from
  repl = shd.replicated(shd.make_mesh(1, 1))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)
  state, data_state, step = restore(ckpt_dir, abstract, step)
  return state["params"], step


def split_examples(cfg: Config, name: str):
  """'valid' / 'train': the run's own held-out / training part of data.source; else a local file
  path or source string, evaluated whole."""
  if name in ("valid", "train"):
    return data_lib.load_splits(cfg.data)[name]
  return data_lib.load_eval_split(name, cfg.data)


def full_windows(examples, seq: int, n: int) -> np.ndarray:
  """int32 [<= n, seq]: the first n examples whose first seq tokens are all real (mask 1)."""
  toks, mask = examples.tokens, examples.mask
  if toks.shape[1] < seq:
    raise ValueError(f"examples hold {toks.shape[1]} tokens, fewer than the {seq} asked for")
  full = np.all(mask[:, :seq - 1] > 0, axis=1)
  rows = toks[full][:n, :seq]
  if len(rows) == 0:
    raise ValueError(f"no example has {seq} real tokens")
  return np.ascontiguousarray(rows, np.int32)


def evaluate_splits(cfg: Config, params, splits=None) -> dict:
  """{split: {"loss" (nats/token), "ppl", "bits_per_byte", "tokens", "bytes", "examples",
  "of_examples"}} over the first eval.max_batches * eval.batch_size examples of each split (the
  valid loss training reports uses the same ones). Raises FloatingPointError naming the split if a
  loss is not finite."""
  mesh = shd.make_mesh(1)
  eval_fn = jax.jit(make_eval_step(cfg.model))
  out = {}
  for name in (splits or cfg.eval.splits):
    ex = split_examples(cfg, name)
    batches = data_lib.eval_batches(ex, cfg.eval.batch_size, cfg.eval.max_batches)
    try:
      r = evaluate_loss(eval_fn, params, batches, mesh)
    except FloatingPointError as e:
      raise FloatingPointError(f"{e} on split {name!r}") from e
    r["ppl"] = math.exp(r["loss"])
    r.update(examples=min(len(ex), cfg.eval.max_batches * cfg.eval.batch_size),
             of_examples=len(ex))
    out[name] = r
  return out


@partial(jax.jit, static_argnames=("mcfg", "total_len", "top_k"))
def _sample_loop(mcfg: ModelConfig, params, buf_BL, prompt_len, rng, temperature, total_len: int,
                 top_k: int):
  # Condition on at most max_seq_len tokens: a window sliding over the fixed-size buffer.
  W = min(total_len, mcfg.max_seq_len)

  def body(pos, carry):
    buf, rng = carry
    start = jnp.maximum(pos - W, 0)
    window = jax.lax.dynamic_slice_in_dim(buf, start, W, axis=1)
    logits_BTV = model_lib.forward(mcfg, params, window)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, pos - start - 1, axis=1,
                                             keepdims=False).astype(jnp.float32)
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits_BV, sub, temperature, top_k).astype(buf.dtype)
    return buf.at[:, pos].set(tok), rng

  buf, _ = jax.lax.fori_loop(prompt_len, total_len, body, (buf_BL, rng))
  return buf


def sample(cfg: Config, params, prompt: str, num: int, length: int, temperature: float,
           top_k: int, seed: int = 0) -> list[str]:
  """Samples `num` continuations of `length` tokens after `prompt` (temperature 0 = greedy)."""
  tok = ByteTokenizer()
  ids = tok.encode(prompt, add_bos=True)
  if len(ids) > cfg.model.max_seq_len:  # keep the prompt's end: the model sees max_seq_len tokens
    ids = ids[-cfg.model.max_seq_len:]
  total = len(ids) + length
  buf = np.zeros((num, total), np.int32)
  buf[:, :len(ids)] = ids
  out = _sample_loop(cfg.model, params, jnp.asarray(buf), len(ids), jax.random.key(seed),
                     jnp.float32(temperature), total, top_k)
  return [tok.decode(np.asarray(row[len(ids):])) for row in out]


# ----------------------------------------------------------------------------------------------
# decoding evaluations: drift of sparse decoding, and retrieval


@partial(jax.jit, static_argnames=("mcfg", "n"))
def _continuation_nll_rows(mcfg: ModelConfig, params, seq_BL, start_B, n: int):
  """Mean NLL of tokens seq[b, start_b : start_b + n] given everything before them: float [B]."""
  logits_BLV = model_lib.forward(mcfg, params, seq_BL[:, :-1])
  pos_BN = start_B[:, None] + jnp.arange(n)[None]
  lp_BNV = jax.nn.log_softmax(
      jnp.take_along_axis(logits_BLV, (pos_BN - 1)[..., None], axis=1).astype(jnp.float32), axis=-1)
  tgt_BN = jnp.take_along_axis(seq_BL, pos_BN, axis=1)
  return -jnp.mean(jnp.take_along_axis(lp_BNV, tgt_BN[..., None], axis=-1)[..., 0], axis=-1)


def continuation_nll(cfg: Config | ModelConfig, params, prompts_BT: np.ndarray,
                     lengths_B: np.ndarray, cont_BN: np.ndarray, chunk: int = 8) -> np.ndarray:
  """Dense model's mean per-token NLL (nats) of each continuation given its prompt (the first
  lengths_b tokens of row b): float [B]. Rows are right-padded to one length and run `chunk` at a
  time through one jitted forward (causal, so the padding after a row's tokens changes nothing)."""
  mcfg = cfg.model if isinstance(cfg, Config) else cfg
  B, N = cont_BN.shape
  lengths_B = np.asarray(lengths_B, np.int32)
  if np.any(lengths_B < 1):
    raise ValueError("continuation_nll needs prompts of at least one token")
  seq = np.zeros((B, int(lengths_B.max()) + N), np.int32)
  for b in range(B):
    seq[b, :lengths_B[b]] = prompts_BT[b, :lengths_B[b]]
    seq[b, lengths_B[b]:lengths_B[b] + N] = cont_BN[b]
  out = []
  for s in range(0, B, chunk):
    part, start = seq[s:s + chunk], lengths_B[s:s + chunk]
    pad = chunk - len(part) if B > chunk else 0      # one compiled shape for every chunk
    if pad:
      part, start = np.concatenate([part, part[-1:].repeat(pad, 0)]), np.concatenate([start, start[-1:].repeat(pad)])
    nll = _continuation_nll_rows(mcfg, params, jnp.asarray(part), jnp.asarray(start), N)
    out.append(np.asarray(nll)[:len(part) - pad])
  return np.concatenate(out)


def teacher_forced_drift(cfg: Config | ModelConfig, params, prompts_BT: np.ndarray,
                         lengths_B: np.ndarray, cont_BN: np.ndarray, runs: dict, *,
                         decode_impl: str = "auto", kv_cache=None) -> dict:
  """Teacher-forced drift: every run decodes the same continuation token by token
  (`resa.score_continuation`), so the K/V entries of the continuation are written by that run's
  decode steps (sparse attention in the layers below, rectified or not) while the tokens, and so
  the positions compared, stay the same. runs: {name: None (dense decode steps) or
  (SparseConfig, gate params or None)}; the first dense run is the reference (one named
  "dense" is added first if there is none).
  Returns {name: {"nll": mean per-token NLL of the continuation, "excess_nll": nll minus the
  reference's, "excess_nll_se": its standard error over the sequences (None for one sequence),
  "excess_nll_per_sequence": [B] (for paired comparisons of two runs), "agreement_with_dense":
  share of positions whose greedy choice equals the reference's, "excess_nll_by_quarter": excess
  NLL over each quarter of the continuation, "excess_nll_per_position": [N] mean over the
  sequences, "excess_nll_per_sequence_off": {f: [B] excess over the positions s with s % f != 0}
  for every rectification period f of the runs whose rectifications supply the next logits
  (rectify_logits "dense"): the positions s = k f (k >= 1) are scored from the rectifying dense
  forward's logits, so a rectified run's gain splits into those positions and the cache's effect
  on the others}}."""
  mcfg = cfg.model if isinstance(cfg, Config) else cfg
  toks, lens, cont = jnp.asarray(prompts_BT), jnp.asarray(lengths_B, jnp.int32), jnp.asarray(cont_BN)
  if not any(v is None for v in runs.values()):
    runs = {"dense": None, **runs}
  scored = {}
  for name, run in runs.items():
    if run is None:   # the SparseConfig is unused when sparse=False
      lp, am = resa.score_continuation(mcfg, resa.SparseConfig(rectify_every=0), params, toks, lens,
                                       cont, sparse=False, decode_impl=decode_impl,
                                       kv_cache=kv_cache)
    else:
      lp, am = resa.score_continuation(mcfg, run[0], params, toks, lens, cont, run[1],
                                       decode_impl=decode_impl, kv_cache=kv_cache)
    scored[name] = (np.asarray(lp), np.asarray(am))
  ref = next(name for name, run in runs.items() if run is None)
  ref_lp, ref_am = scored[ref]
  N = cont.shape[1]
  quarters = np.array_split(np.arange(N), 4)
  periods = sorted({run[0].rectify_every for run in runs.values() if run is not None
                    and 0 < run[0].rectify_every < N and run[0].rectify_logits == "dense"})
  off = {f: np.arange(N) % f != 0 for f in periods}
  out = {}
  for name, (lp, am) in scored.items():
    ex = ref_lp - lp                                             # [B, N] excess NLL
    per_seq = ex.mean(axis=1)
    se = float(per_seq.std(ddof=1) / np.sqrt(len(per_seq))) if len(per_seq) > 1 else None
    out[name] = {"nll": float(-lp.mean()), "excess_nll": float(ex.mean()),
                 "excess_nll_se": se, "excess_nll_per_sequence": [float(x) for x in per_seq],
                 "agreement_with_dense": float(np.mean(am == ref_am)),
                 "excess_nll_by_quarter": [float(ex[:, q].mean()) for q in quarters if len(q)],
                 "excess_nll_per_position": [round(float(x), 6) for x in ex.mean(axis=0)],
                 "excess_nll_per_sequence_off": {str(f): [float(x) for x in ex[:, m].mean(axis=1)]
                                                 for f, m in off.items()}}
  return out


def kv_cache_quality(cfg: Config | ModelConfig, params, prompts_BT: np.ndarray,
                     lengths_B: np.ndarray, cont_BN: np.ndarray, specs: dict, *,
                     decode_impl: str = "auto") -> dict:
  """How much a KV cache's storage costs in quality: each spec decodes the same continuation
  teacher-forced (`resa.score_continuation`, dense attention), so every K/V entry of prompt and
  continuation goes through that cache. specs: {name: effjax.quant.kv.KVCacheSpec}; the first
  is the reference (e.g. "bf16"). Returns {name: {"nll": mean per-token NLL, "ppl": exp(nll),
  "ppl_increase": ppl / reference ppl - 1, "excess_nll_se": standard error of the per-sequence
  excess, "agreement_with_reference": share of positions with the reference's greedy choice}}."""
  mcfg = cfg.model if isinstance(cfg, Config) else cfg
  toks, lens, cont = jnp.asarray(prompts_BT), jnp.asarray(lengths_B, jnp.int32), jnp.asarray(cont_BN)
  scored = {}
  for name, spec in specs.items():
    lp, am = resa.score_continuation(mcfg, resa.SparseConfig(rectify_every=0), params, toks, lens,
                                     cont, sparse=False, decode_impl=decode_impl, kv_cache=spec)
    scored[name] = (np.asarray(lp), np.asarray(am))
  ref_lp, ref_am = next(iter(scored.values()))
  out = {}
  for name, (lp, am) in scored.items():
    per_seq = (ref_lp - lp).mean(axis=1)
    nll = float(-lp.mean())
    out[name] = {"nll": nll, "ppl": math.exp(nll),
                 "ppl_increase": math.exp(nll + float(ref_lp.mean())) - 1.0,
                 "excess_nll_se": (float(per_seq.std(ddof=1) / np.sqrt(len(per_seq)))
                                   if len(per_seq) > 1 else None),
                 "agreement_with_reference": float(np.mean(am == ref_am))}
  return out


def drift_eval(cfg: Config, params, prompts_BT: np.ndarray, lengths_B: np.ndarray, *,
               new_tokens: int, scfg, gate_params=None, decode_impl: str = "auto",
               kv_cache=None) -> dict:
  """Greedy continuations under dense, sparse and sparse + rectification decoding of the same
  prompts: each one's dense-model NLL and its token agreement with the dense greedy continuation.
  (`drift_runs` names the same three decodings for `teacher_forced_drift`.)"""
  toks, lens = jnp.asarray(prompts_BT), jnp.asarray(lengths_B)
  kw = dict(max_new_tokens=new_tokens, decode_impl=decode_impl, kv_cache=kv_cache)
  dense, _ = decoding.generate(cfg.model, params, toks, lens, jax.random.key(0), **kw)
  runs = {"dense": np.asarray(dense)}
  for name, (v, gp) in list(drift_runs(scfg, gate_params).items())[1:]:
    runs[name] = np.asarray(resa.generate(cfg.model, v, params, toks, lens, jax.random.key(0),
                                          gp, **kw)[0])
  out = {}
  for name, cont in runs.items():
    out[name] = {"nll": float(np.mean(continuation_nll(cfg, params, prompts_BT, lengths_B, cont))),
                 "agreement_with_dense": float(np.mean(cont == runs["dense"]))}
  return out


def drift_runs(scfg, gate_params=None) -> dict:
  """drift_eval's three decodings as `teacher_forced_drift` runs: dense, scfg without
  rectification, scfg rectified every scfg.rectify_every (32 when 0) steps."""
  f = scfg.rectify_every or 32
  return {"dense": None, "sparse": (dataclasses.replace(scfg, rectify_every=0), gate_params),
          f"sparse+rectify(f={f})": (dataclasses.replace(scfg, rectify_every=f), gate_params)}


def passkey_prompts(n: int, context_tokens: int, seed: int = 0, filler: str | None = None):
  """Needle-in-a-haystack prompts: filler text with 'The pass key is NNNNN. Remember it.' at a
  random depth, ending 'What is the pass key? The pass key is '. Returns (prompts int32 [n, T]
  right-padded, lengths [n], keys list[str])."""
  rng = np.random.default_rng(seed)
  tok = ByteTokenizer()
  filler = filler or ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                      "There and back again. ")
  question = " What is the pass key? The pass key is "
  prompts, keys = [], []
  for _ in range(n):
    key = f"{rng.integers(10000, 99999)}"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    room = context_tokens - len(needle) - len(question) - 1
    hay = (filler * (room // len(filler) + 1))[:room]
    at = int(rng.integers(0, room + 1))
    text = hay[:at] + needle + hay[at:] + question
    prompts.append(tok.encode(text, add_bos=True))
    keys.append(key)
  T = max(len(p) for p in prompts)
  arr = np.zeros((n, T), np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = p
  return arr, np.asarray([len(p) for p in prompts], np.int32), keys


def passkey_accuracy(cfg: Config, params, prompts_BT: np.ndarray, lengths_B: np.ndarray,
                     keys: list[str], *, budgets: list[int], selectors: dict, block_size: int,
                     decode_impl: str = "auto", log=None, kv_cache=None) -> dict:
  """Passkey accuracy on given prompts (right-padded tokens, lengths, the keys): the 5 greedily
  generated tokens must spell the key. Dense decoding, then each selector (name -> (selector
  kind, gate params or None[, dict of further SparseConfig fields, e.g. {"gate_cache_dtype":
  "bfloat16"}])) at each token budget. Returns {"accuracy": {"dense": a,
  "<name>@<budget>": a, ...}, "digit_accuracy": same keys (share of the 5 digits right),
  "seconds": same keys}; `log` (optional) gets a line per row."""
  tok = ByteTokenizer()
  toks, lens = jnp.asarray(prompts_BT), jnp.asarray(lengths_B)
  rng = jax.random.key(0)
  acc, digits, seconds = {}, {}, {}
  kw = dict(max_new_tokens=5, decode_impl=decode_impl, kv_cache=kv_cache)

  def score(name, out, t0):
    got = [tok.decode(o[:5]) for o in np.asarray(jax.block_until_ready(out))]
    acc[name] = float(np.mean([g == k for g, k in zip(got, keys)]))
    digits[name] = float(np.mean([sum(a == b for a, b in zip(g, k)) / len(k) for g, k in zip(got, keys)]))
    seconds[name] = time.perf_counter() - t0
    if log is not None:
      log(f"  passkey {name}: accuracy {acc[name]:.3f} (digits {digits[name]:.3f}), {seconds[name]:.1f} s")

  t0 = time.perf_counter()
  score("dense", decoding.generate(cfg.model, params, toks, lens, rng, **kw)[0], t0)
  for name, (kind, gp, *extra) in selectors.items():
    for budget in budgets:
      t0 = time.perf_counter()
      scfg = resa.SparseConfig(selector=kind, block_size=block_size, budget_tokens=budget,
                               rectify_every=0, d_gate=64 if gp is None else int(gp["wq"].shape[-1]),
                               **(extra[0] if extra else {}))
      score(f"{name}@{budget}", resa.generate(cfg.model, scfg, params, toks, lens, rng, gp, **kw)[0], t0)
  return {"accuracy": acc, "digit_accuracy": digits, "seconds": seconds}


def retrieval_eval(cfg: Config, params, *, n: int, context_tokens: int, budgets: list[int],
                   selectors: dict, block_size: int, decode_impl: str = "auto", seed: int = 0,
                   filler: str | None = None, kv_cache=None) -> dict:
  """Passkey accuracy (all 5 digits generated greedily) for dense decoding and for each selector
  (name -> (selector kind, gate params or None)) at each token budget, on `passkey_prompts(n,
  context_tokens, seed, filler)`: {"dense": a, "<name>@<budget>": a, ...}."""
  prompts, lengths, keys = passkey_prompts(n, context_tokens, seed, filler=filler)
  return passkey_accuracy(cfg, params, prompts, lengths, keys, budgets=budgets, selectors=selectors,
                          block_size=block_size, decode_impl=decode_impl,
                          kv_cache=kv_cache)["accuracy"]
