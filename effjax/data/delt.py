"""The DELT pipeline before training: score -> select -> order, with cached scores.

`prepare_order(cfg, train_examples)` returns the permutation of kept example ids the training
iterator consumes (repeated every epoch), or None when DELT is off. Scores are cached under
`delt.cache_dir/<key>/` (`scores.npy` float32 [N] + `meta.json`), keyed by everything that
determines them (data, reference set, proxy, scoring settings and a checksum of the pool), so
reruns and resumed runs skip scoring and see the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from effjax import sharding as shd
from effjax import training
from effjax.config import Config, OptimConfig, TrainConfig, to_dict
from effjax.data import ordering as ordering_lib
from effjax.data import scoring
from effjax.data import selection as selection_lib
from effjax.data.packing import Examples
from effjax.data.pipeline import to_examples
from effjax.data.sources import load_documents
from effjax.data.tokenizer import ByteTokenizer


def reference_split(cfg: Config) -> tuple[Examples, Examples]:
  """(reference set, held-out rest) of delt.reference_source: its first reference_fraction of
  documents form the reference set (at most reference_examples examples); the remaining documents
  are for evaluation and never touch scoring."""
  d = cfg.delt
  docs = load_documents(d.reference_source, text_field=cfg.data.text_field, root=cfg.data.root)
  n_ref = max(1, int(len(docs) * d.reference_fraction))
  tok = ByteTokenizer()
  ref = to_examples([tok.encode(x) for x in docs[:n_ref]], cfg.data)
  rest = to_examples([tok.encode(x) for x in docs[n_ref:]], cfg.data)
  if len(ref) == 0:
    raise ValueError(f"delt.reference_source {d.reference_source!r} gives no reference examples "
                     f"of seq_len={cfg.data.seq_len}")
  return ref.take(np.arange(min(len(ref), d.reference_examples))), rest


def _cache_key(cfg: Config, pool: Examples) -> str:
  d = to_dict(cfg.delt)
  for k in ("selection", "select_value", "ordering", "folds", "cache_dir", "chunk_size", "hvp_chunk"):
    d.pop(k)
  data = to_dict(cfg.data)
  for k in ("ordering", "shuffle_seed", "epochs"):  # how training walks the pool does not
    data.pop(k)                                      # change its scores
  blob = json.dumps({"delt": d, "data": data,
                     "pool_crc32": zlib.crc32(np.ascontiguousarray(pool.tokens).tobytes()),
                     "pool_n": len(pool)}, sort_keys=True)
  return f"{cfg.delt.scoring}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _pretrain_proxy(cfg: Config, pool: Examples, log: Callable[[str], None]):
  """The proxy's starting point: init + delt.proxy_pretrain_steps of AdamW on the pool (DELT starts
  its SGD trajectory from a pretrained proxy)."""
  d = cfg.delt
  steps = d.proxy_pretrain_steps
  pcfg = dataclasses.replace(
      cfg, model=d.proxy,
      optim=OptimConfig(lr=1e-3, warmup_steps=min(20, max(steps - 1, 0)), weight_decay=0.0),
      train=TrainConfig(steps=max(steps, 1), batch_size=d.proxy_batch_size))
  opt = training.make_optimizer(pcfg.optim, pcfg.train.steps)
  state = training.init_train_state(pcfg, jax.random.key(d.seed), opt)
  if steps == 0:
    return state["params"]
  step = jax.jit(training.make_train_step(pcfg, opt))
  m = None
  rng = np.random.default_rng((d.seed, 99))
  for _ in range(steps):
    ids = rng.integers(0, len(pool), d.proxy_batch_size)
    t = pool.tokens[ids]
    state, m = step(state, {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:]),
                            "loss_mask": jnp.asarray(pool.mask[ids])})
  log(f"proxy pretrained {steps} AdamW steps: loss {float(m['loss']):.3f}")
  return jax.block_until_ready(state["params"])


def compute_scores(cfg: Config, pool: Examples, log: Callable[[str], None] = print,
                   progress: bool = True) -> dict[str, tuple[np.ndarray, dict]]:
  """{scoring name: (scores float32 [N], metadata)} for every pool example; higher = keep / later
  in curricula. LQS and PDS come from the same proxy trajectory, so both are returned together.

  With delt.score_sample = 0 every example is scored directly by the proxy; otherwise the proxy
  scores a sample and a learned scorer extends its scores to the rest. The metadata times each phase (seconds_pretrain,
  seconds_trajectory, seconds_scoring: adjoint + per-example gradient passes, seconds_learned_scorer)
  and counts the per-example gradient evaluations, so the cost can be set against training's."""
  d = cfg.delt
  t0 = time.perf_counter()
  meta: dict = {"scoring": d.scoring, "n": len(pool), "proxy_params": d.proxy.num_params()}
  if d.scoring == "random":
    return {"random": (scoring.random_scores(len(pool), d.seed), meta)}
  params0 = _pretrain_proxy(cfg, pool, log)
  meta["seconds_pretrain"] = time.perf_counter() - t0
  fns = scoring.ScoringFns(d.proxy, d.projection_dim, d.seed, d.hvp_chunk)
  if d.score_sample and d.score_sample < len(pool):
    sample_ids = np.sort(np.random.default_rng((d.seed, 5)).choice(len(pool), d.score_sample,
                                                                   replace=False))
  else:
    sample_ids = np.arange(len(pool))
  scored = pool.take(sample_ids)
  if d.scoring == "loss":
    t1 = time.perf_counter()
    sample_scores = {"loss": scoring.loss_scores(fns, params0, scored, d.chunk_size)}
    meta["seconds_scoring"] = time.perf_counter() - t1
    encoder = params0
  else:
    ref, _ = reference_split(cfg)
    t1 = time.perf_counter()
    trace = scoring.train_proxy(fns, params0, pool, d.proxy_steps, d.proxy_lr, d.proxy_batch_size,
                                d.seed)
    jax.block_until_ready(trace.checkpoints[trace.steps])
    t2 = time.perf_counter()
    passes = scoring.scoring_passes(d.proxy_steps, trace.interval)
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=passes * len(scored), desc=f"{d.scoring} scoring", unit="ex",
                 dynamic_ncols=True)
    mesh = shd.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp)
    # per-example gradients sharded over examples when the chunk splits evenly over the devices
    mesh = mesh if shd.batch_devices(mesh) > 1 and d.chunk_size % shd.batch_devices(mesh) == 0 else None
    res = scoring.lqs_scores(fns, trace, pool, ref, scored, d.chunk_size,
                             progress=bar.update if bar else None, mesh=mesh)
    if bar:
      bar.close()
    sample_scores = {"lqs": res.lqs, "pds": res.pds}
    encoder = trace.checkpoints[trace.steps]
    meta.update(reference_examples=len(ref), proxy_steps=trace.steps, interval=trace.interval,
                scored_steps=res.steps, lam_norms={str(k): v for k, v in res.lam_norms.items()},
                seconds_trajectory=t2 - t1, seconds_scoring=time.perf_counter() - t2,
                example_gradient_passes=passes * len(scored))
  meta["scored_directly"] = len(sample_ids)
  out = {}
  for name, s in sample_scores.items():
    m = dict(meta, scoring=name)
    if len(sample_ids) < len(pool):
      t3 = time.perf_counter()
      scorer = scoring.fit_learned_scorer(d.proxy, encoder, scored, s, seed=d.seed,
                                          chunk=max(d.chunk_size, 32))
      s = scorer.predict(pool, chunk=max(d.chunk_size, 32))
      m["learned_scorer"] = scorer.fit
      m["seconds_learned_scorer"] = time.perf_counter() - t3
      log(f"{name}: learned scorer fit on {len(sample_ids)} proxy-scored examples: {scorer.fit}")
    m["seconds"] = time.perf_counter() - t0
    out[name] = (np.asarray(s, np.float32), m)
  log(f"{d.scoring} scoring of {len(pool)} examples ({len(sample_ids)} scored by the proxy "
      f"directly): {time.perf_counter() - t0:.1f} s (" + ", ".join(
          f"{k[len('seconds_'):]} {v:.1f} s" for k, v in meta.items() if k.startswith("seconds_"))
      + ")")
  return out


def load_or_compute_scores(cfg: Config, pool: Examples, log: Callable[[str], None] = print,
                           progress: bool = True) -> tuple[np.ndarray, dict]:
  cache = pathlib.Path(cfg.delt.cache_dir) / _cache_key(cfg, pool)
  f_scores, f_meta = cache / "scores.npy", cache / "meta.json"
  if f_scores.exists() and f_meta.exists():
    scores = np.load(f_scores)
    if scores.shape != (len(pool),) or scores.dtype != np.float32:
      raise ValueError(f"cached scores {f_scores} have shape {scores.shape} / {scores.dtype}, "
                       f"expected ({len(pool)},) float32: delete {cache} to rescore")
    log(f"using cached {cfg.delt.scoring} scores from {cache}")
    return scores, json.loads(f_meta.read_text())
  results = compute_scores(cfg, pool, log, progress)
  for name, (scores, meta) in results.items():
    c = pathlib.Path(cfg.delt.cache_dir) / _cache_key(
        dataclasses.replace(cfg, delt=dataclasses.replace(cfg.delt, scoring=name)), pool)
    c.mkdir(parents=True, exist_ok=True)
    tmp = c / "scores.tmp.npy"
    np.save(tmp, scores)
    tmp.rename(c / "scores.npy")  # atomic: a half-written cache is never read back
    (c / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"{name} scores of {len(pool)} examples cached in {c} ({meta.get('seconds', 0):.1f} s)")
  return results[cfg.delt.scoring]


def prepare_order(cfg: Config, pool: Examples, log: Callable[[str], None] = print,
                  progress: bool = True) -> tuple[np.ndarray | None, dict]:
  """The DELT order (int64 permutation of the kept ids) for `pool`, or (None, {}) when off."""
  d = cfg.delt
  if d.scoring == "none" and d.selection == "none" and d.ordering == "none":
    return None, {}
  if d.scoring == "none":  # only 'shuffle' ordering can get here (config validation)
    scores = np.zeros(len(pool), np.float32)
    meta = {}
  else:
    scores, meta = load_or_compute_scores(cfg, pool, log, progress)
  kept = selection_lib.select(scores, d.selection, d.select_value)
  kind = d.ordering if d.ordering != "none" else "shuffle"
  order = ordering_lib.score_ordering(kind, scores, kept, d.folds, d.seed)
  info = {"scoring": d.scoring, "selection": d.selection, "select_value": d.select_value,
          "ordering": kind, "folds": d.folds, "kept": int(len(kept)), "pool": len(pool), **meta}
  log(f"DELT: {d.scoring} scores -> {d.selection} keeps {len(kept)}/{len(pool)} -> {kind} order")
  return order, info
