#!/usr/bin/env python3
"""DELT, the fair test: does LQS + Folding train a better model when every condition sees all of
its data for whole epochs, and the scores come straight from a strong proxy?

  python experiments/delt/fair.py run    [--tiny] [--out DIR] [--seeds 0 1 2 3 4] [--budgets 1 3]
                                         [--folds 3 5] [--conditions NAME ...]
                                         [--eval-source PATH ...] [--time-limit SECONDS]
                                         [key.sub=value ...]
  python experiments/delt/fair.py report [--out DIR | --results DIR [--results DIR ...]]
                                         [--report-out DIR]
  python experiments/delt/fair.py plan   [--tiny] [--pool-examples N] [--tflops 120]
  python experiments/delt/fair.py composition [--tiny] [--out DIR] [--scores DIR] [--field source]
                                         [--report-out DIR] [key.sub=value ...]

The study's size and settings are configs/delt_fair.yaml (--config), `--tiny` (a CPU-sized model,
pool and proxy) and key.sub=value overrides; experiments/delt/REPORT.md gives its time arithmetic.

Conditions (L = the --folds values; the first L is used with selection):

  conventional                 shuffled, a fresh permutation every epoch
  folding_lqs_L<L>             LQS scores, Folding with L folds in every epoch
  folding_random_L<L>          random scores (drawn per seed), Folding
  sorted_lqs                   LQS ascending in every epoch
  lqs_top50_L<L>_same_steps    the top 50% by LQS, Folding, 2 x budget epochs (= the steps of the rest)
  lqs_top50_L<L>_same_epochs   the top 50% by LQS, Folding, budget epochs (half the steps)
  random_top50_L<L>_same_steps / _same_epochs   a random 50% (random scores), Folding
  pds_folding_L<L>             PDS scores, Folding (not in the default set)

A budget B (--budgets, in epochs over the whole pool) trains every full-data condition for exactly B
epochs: every example once per epoch, the ordering applied within each epoch (data.epochs,
effjax/data/pipeline.py). The top-50% conditions train B epochs over their half (same epochs:
compute efficiency) and 2B epochs (same steps: data efficiency). Scores: LQS and PDS from one proxy
trajectory, computed for every pool example (delt.score_sample=0), once, and cached under
<out>/scores; a seed varies model init, the shuffle and the random scores.

Evaluation (loss in nats per byte-token, and bits per byte): the second half of WikiText-2
validation (never seen by scoring), held-out pool documents, and each --eval-source (a .txt file,
one document per line, or a .jsonl file with a text field).

Resumable and mergeable: each budget x condition x seed writes <out>/results/E<B>/<condition>/
seed<k>.json; a rerun skips finished ones and resumes unfinished ones from their checkpoints;
`--time-limit` stops starting runs that would not finish in time. `report` merges result folders of
several separate runs into REPORT.md (mean +- std, paired differences vs conventional with
t-intervals over seeds), results.json and loss-curve plots. Exit status: 0 done, 3 stopped by
--time-limit (rerun the same command), 2 bad arguments or data.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import numpy as np

DEFAULT_CONFIG = ROOT / "configs/delt_fair.yaml"
BUILTIN_EVALS = ("wikitext_heldout", "pool_heldout")
EVAL_LABELS = {"wikitext_heldout": "WikiText-2 held-out", "pool_heldout": "held-out pool"}
INCOMPLETE = 3

# Small enough that a whole pass (every condition, both budgets, 2 seeds) runs in a few minutes on
# 2 CPU cores; the numbers mean nothing, the plumbing is what is tested.
TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32", "data.max_documents=12",
    "train.batch_size=16", "train.checkpoint_every=1000", "train.eval_every=8", "train.log_every=2",
    "train.mesh_data=1", "eval.batch_size=16", "eval.max_batches=2",
    "delt.proxy.d_model=16", "delt.proxy.n_layers=1", "delt.proxy.n_heads=2",
    "delt.proxy.n_kv_heads=1", "delt.proxy.d_ff=32", "delt.proxy.max_seq_len=64",
    "delt.proxy_pretrain_steps=5", "delt.proxy_steps=4", "delt.proxy_batch_size=8",
    "delt.chunk_size=32", "delt.reference_examples=16",
]
TINY_ARGS = {"seeds": [0, 1], "eval_examples": 64}


class FairError(Exception):
  """A bad argument, source or result file: reported as one line before (or instead of) work."""


# ---------------------------------------------------------------------------------------------
# conditions


@dataclasses.dataclass(frozen=True)
class Condition:
  name: str
  scoring: str          # none | lqs | pds | random
  selection: str        # none | top_r
  ordering: str         # none (shuffle per epoch) | folding | sorted_asc
  folds: int
  epoch_factor: int     # epochs over the kept ids = epoch_factor x budget
  label: str

  def overrides(self, budget: int, seed: int) -> list[str]:
    ovs = [f"delt.scoring={self.scoring}", f"delt.selection={self.selection}",
           f"delt.ordering={self.ordering}", f"delt.folds={self.folds}",
           f"data.epochs={budget * self.epoch_factor}", f"train.seed={seed}",
           f"data.shuffle_seed={seed}"]
    if self.selection == "top_r":
      ovs.append("delt.select_value=0.5")
    if self.scoring == "none":
      ovs.append("data.ordering=shuffle")
    if self.scoring == "random":
      ovs.append(f"delt.seed={seed}")  # new random scores (subset and order) per seed
    return ovs


def make_conditions(folds: list[int]) -> tuple[dict[str, Condition], list[str]]:
  """(every known condition by name, the names of the default set); see the module docstring."""
  l0 = folds[0]
  c = [Condition("conventional", "none", "none", "none", 1, 1, "conventional (shuffled)")]
  for L in folds:
    c.append(Condition(f"folding_lqs_L{L}", "lqs", "none", "folding", L, 1, f"Folding L={L}, LQS"))
  for L in folds:
    c.append(Condition(f"folding_random_L{L}", "random", "none", "folding", L, 1,
                       f"Folding L={L}, random scores"))
  c.append(Condition("sorted_lqs", "lqs", "none", "sorted_asc", 1, 1, "sorted by LQS (ascending)"))
  for src in ("lqs", "random"):
    what = "LQS" if src == "lqs" else "random"
    c.append(Condition(f"{src}_top50_L{l0}_same_steps", src, "top_r", "folding", l0, 2,
                       f"{what} top-50% + Folding L={l0}, same steps"))
    c.append(Condition(f"{src}_top50_L{l0}_same_epochs", src, "top_r", "folding", l0, 1,
                       f"{what} top-50% + Folding L={l0}, same epochs"))
  default = [x.name for x in c]
  for L in folds:
    c.append(Condition(f"pds_folding_L{L}", "pds", "none", "folding", L, 1, f"Folding L={L}, PDS"))
  return {x.name: x for x in c}, default


# ---------------------------------------------------------------------------------------------
# --eval-source


def parse_eval_sources(paths: list[str], text_field: str = "text") -> list[tuple[str, str, list[str]]]:
  """[(name, path, documents)] for each --eval-source; FairError (one line) for a missing or
  unreadable file, an unsupported suffix, bad JSON lines, a missing text field, or no text. Names
  are the file stems, made unique."""
  from effjax.data import sources

  out, names = [], set(BUILTIN_EVALS)
  for raw in paths:
    p = pathlib.Path(raw).expanduser()
    where = f"--eval-source {raw}"
    if p.suffix.lower() not in (".txt", ".jsonl"):
      raise FairError(f"{where}: expected a .txt (one document per line) or .jsonl file")
    if not p.is_file():
      raise FairError(f"{where}: no such file")
    try:
      docs = list(sources.read_file(p, text_field))
    except (OSError, ValueError) as e:
      msg = str(e).replace("set data.text_field", "set --eval-text-field").replace(str(p), "")
      raise FairError(f"{where}: {msg.lstrip(', ')}") from None
    if not docs:
      raise FairError(f"{where}: holds no text (every line is empty)")
    name, k = p.stem, 2
    while name in names:
      name, k = f"{p.stem}_{k}", k + 1
    names.add(name)
    out.append((name, str(p), docs))
  return out


# ---------------------------------------------------------------------------------------------
# the study


def _git_commit() -> str | None:
  """The tree's commit: $EFFJAX_COMMIT if set (a copy without its git metadata, e.g. on a GPU
  host), else git's."""
  if os.environ.get("EFFJAX_COMMIT"):
    return os.environ["EFFJAX_COMMIT"]
  try:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, timeout=10)
    return (r.stdout.strip() or None) if r.returncode == 0 else None
  except (OSError, subprocess.SubprocessError):
    return None


def base_config(args):
  from effjax.config import load_config
  ovs = (TINY if args.tiny else []) + list(args.overrides)
  return load_config(args.config, ovs), ovs


def fingerprint(cfg, args) -> str:
  """What makes two runs' results comparable: the base config (minus where files go) and the
  driver settings that shape training and evaluation."""
  from effjax.config import to_dict
  d = to_dict(cfg)
  d["train"].pop("out_dir"), d["train"].pop("progress"), d["delt"].pop("cache_dir")
  blob = json.dumps({"cfg": d, "warmup_fraction": args.warmup_fraction,
                     "eval_examples": args.eval_examples}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def result_path(results: pathlib.Path, budget: int, cond: str, seed: int) -> pathlib.Path:
  return results / f"E{budget}" / cond / f"seed{seed}.json"


def _atomic_json(path: pathlib.Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)


def _metrics(run_dir: pathlib.Path) -> list[dict]:
  f = run_dir / "metrics.jsonl"
  return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []


def _thin(points: list, n: int = 200) -> list:
  if len(points) <= n:
    return points
  idx = np.unique(np.linspace(0, len(points) - 1, n).round().astype(int))
  return [points[i] for i in idx]


def cmd_run(args) -> int:
  t_start = time.perf_counter()
  evsrc = parse_eval_sources(args.eval_source, args.eval_text_field)  # before anything heavy
  base, ovs = base_config(args)
  conds, default = make_conditions(args.folds)
  names = args.conditions or default
  unknown = [n for n in names if n not in conds]
  if unknown:
    raise FairError(f"unknown condition(s) {', '.join(unknown)} (known: {', '.join(conds)})")
  if min(args.budgets) < 1 or min(args.seeds) < 0 or min(args.folds) < 1:
    raise FairError("--budgets and --folds must be >= 1 and --seeds >= 0")
  out = pathlib.Path(args.out)
  results_dir = out / "results"
  scores_dir = out / "scores"

  from effjax.config import load_config
  from effjax.data import delt, load_splits
  from effjax.data.pipeline import to_examples
  from effjax.data.tokenizer import ByteTokenizer

  log = lambda m: print(m, flush=True)
  try:
    splits = load_splits(base.data)
    _, wiki_rest = delt.reference_split(base)
  except (OSError, ValueError) as e:
    raise FairError(f"data: {e}") from None
  pool = splits["train"]
  evals = {"wikitext_heldout": wiki_rest, "pool_heldout": splits["valid"]}
  tok = ByteTokenizer()
  for name, path, docs in evsrc:
    ex = to_examples([tok.encode(d) for d in docs], base.data)
    if len(ex) == 0:
      raise FairError(f"--eval-source {path}: too short for one example of data.seq_len="
                      f"{base.data.seq_len} tokens")
    evals[name] = ex
  evals = {k: v.take(np.arange(min(len(v), args.eval_examples))) for k, v in evals.items()}
  for k, v in evals.items():
    if len(v) == 0:
      raise FairError(f"evaluation set {k} is empty (data.valid_fraction=0 or a short reference "
                      f"source?)")
  fp = fingerprint(base, args)
  log(f"pool {len(pool)} examples of {base.data.seq_len} tokens; eval sets: "
      + ", ".join(f"{k} {len(v)}" for k, v in evals.items()) + f"; setup {fp}")

  plan = [(seed, b, conds[n]) for seed in args.seeds for b in args.budgets for n in names]
  todo, done = [], 0
  for seed, b, c in plan:
    f = result_path(results_dir, b, c.name, seed)
    if f.exists():
      try:
        r = json.loads(f.read_text())
      except ValueError:
        raise FairError(f"{f} is unreadable: delete it to rerun that run") from None
      if r.get("fingerprint") != fp:
        raise FairError(f"{f} comes from another setup ({r.get('fingerprint')} != {fp}): use "
                        f"another --out, or delete {results_dir} to start over")
      missing = [k for k in evals if k not in r.get("eval", {})]
      if missing:
        todo.append((seed, b, c, missing))
      else:
        done += 1
      continue
    todo.append((seed, b, c, None))
  log(f"{len(plan)} runs: {done} done, {len(todo)} to do")

  import jax
  # Each call of a study split over several processes compiles the same few train steps (one
  # per run length): keep them on disk beside the results.
  if args.compile_cache != "none" and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache or str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from effjax import sharding as shd
  from effjax.data import epoch_steps
  from effjax.evaluation import load_params
  from effjax.trainer import TrainingError, train
  from effjax.training import make_eval_step

  # Scores first (once; cached): their cost is logged against training's.
  need = sorted({c.scoring for _, _, c, _ in todo if c.scoring in ("lqs", "pds")})
  if need:
    scfg = load_config(args.config, ovs + [f"delt.scoring={need[0]}",
                                           f"delt.cache_dir={scores_dir}"])
    t0 = time.perf_counter()
    delt.load_or_compute_scores(scfg, pool, log=log, progress=False)
    log(f"scores ready ({time.perf_counter() - t0:.1f} s)")

  mesh = shd.make_mesh(1)
  eval_fn = jax.jit(make_eval_step(base.model))
  meta = {"card": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": _git_commit(),
          "command": shlex.join(["python", "experiments/delt/fair.py", *args.argv])}
  per_step: list[float] = []  # wall seconds per step of finished runs (time-limit estimate)
  stopped = None
  for i, (seed, b, c, missing) in enumerate(todo):
    run_dir = out / "runs" / f"E{b}" / c.name / f"seed{seed}"
    run_ovs = ovs + c.overrides(b, seed) + [
        f"delt.cache_dir={scores_dir}", f"train.out_dir={run_dir}", "train.progress=false"]
    cfg = load_config(args.config, run_ovs + ["train.steps=0"])
    order, info = delt.prepare_order(cfg, pool, log=lambda *_: None, progress=False)
    n_epoch = len(order) if order is not None else len(pool)
    steps = epoch_steps(n_epoch, cfg.train.batch_size, cfg.data.epochs)
    warmup = min(int(round(args.warmup_fraction * steps)), steps - 1)
    # One checkpoint, at the end: it is evaluated and then deleted, and a run that would not fit
    # --time-limit is not started, so checkpoints along the way (~1 s each) would be lost time.
    cfg = load_config(args.config, run_ovs + [f"train.steps={steps}",
                                              f"optim.warmup_steps={warmup}",
                                              f"train.checkpoint_every={steps}"])
    tag = f"E{b} {c.name} seed {seed}"
    if missing is not None:  # finished earlier; a new --eval-source needs its checkpoint
      f = result_path(results_dir, b, c.name, seed)
      if not (run_dir / "checkpoints").is_dir():
        log(f"{tag}: no checkpoint to evaluate {', '.join(missing)} on (its result predates "
            f"that --eval-source; --keep-checkpoints keeps them); left as it is")
        continue
      params, _ = load_params(cfg, run_dir)
      r = json.loads(f.read_text())
      for k in missing:
        r["eval"][k] = _evaluate(eval_fn, params, evals[k], mesh)
      _atomic_json(f, r)
      log(f"{tag}: evaluated {', '.join(missing)}")
      continue
    if args.time_limit and per_step:
      est = float(np.median(per_step)) * steps * 1.15 + 5
      if time.perf_counter() - t_start + est > args.time_limit:
        stopped = (i, tag, est)
        break
    if (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").is_dir():
      shutil.rmtree(run_dir)  # finished, checkpoints deleted, its result file deleted: run again
      log(f"{tag}: its result file was deleted: training it again")
    t0 = time.perf_counter()
    try:
      summary = train(cfg, stop_at_step=args.stop_at_step, log=lambda m: log(f"    {m}"))
    except TrainingError as e:
      raise FairError(f"{tag}: {e}") from None
    secs = time.perf_counter() - t0
    if not summary.get("finished"):
      log(f"{tag}: stopped at step {summary['step']} (--stop-at-step)")
      stopped = (i, tag, 0.0)
      break
    params, _ = load_params(cfg, run_dir)
    res = {k: _evaluate(eval_fn, params, ex, mesh) for k, ex in evals.items()}
    rows = _metrics(run_dir)
    step_s = [cfg.train.batch_size * cfg.data.seq_len / r["tokens_per_s"] for r in rows
              if r.get("tokens_per_s")][1:]  # the first interval holds the compile
    scores_crc = None
    if c.scoring != "none":
      s, _ = delt.load_or_compute_scores(cfg, pool, log=lambda *_: None, progress=False)
      scores_crc = int(zlib.crc32(s.tobytes()))
    validity = None
    if c.name == "conventional" and "lqs" in need:
      lqs_cfg = load_config(args.config, ovs + ["delt.scoring=lqs", f"delt.cache_dir={scores_dir}"])
      lqs, _ = delt.load_or_compute_scores(lqs_cfg, pool, log=lambda *_: None, progress=False)
      validity = score_validity(cfg.model, params, pool, lqs)
    result = {
        "fingerprint": fp, "condition": c.name, "label": c.label, "budget": b, "seed": seed,
        "epochs": cfg.data.epochs, "examples_per_epoch": n_epoch, "pool_examples": len(pool),
        "steps": steps, "warmup_steps": warmup, "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len, "examples_seen": summary["step"] * cfg.train.batch_size,
        "real_examples_seen": n_epoch * cfg.data.epochs,
        "model_params": cfg.model.num_params(), "proxy_params": cfg.delt.proxy.num_params(),
        "train_seconds": secs, "step_seconds": float(np.median(step_s)) if step_s else None,
        "eval": res,
        "curve": _thin([(r["step"], r["loss"]) for r in rows if "loss" in r]),
        "valid_curve": [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r],
        "delt": {k: v for k, v in info.items() if k not in ("lam_norms",)},
        "score_validity": validity,
        "scores_crc32": scores_crc, "order_crc32": None if order is None else int(
            zlib.crc32(np.ascontiguousarray(order).tobytes())),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **meta,
    }
    _atomic_json(result_path(results_dir, b, c.name, seed), result)
    if not args.keep_checkpoints:
      shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    per_step.append(secs / steps)
    log(f"{tag}: {steps} steps ({cfg.data.epochs} epochs x {n_epoch} examples) in {secs:.0f} s; "
        + "  ".join(f"{k} {v['loss']:.4f}" for k, v in res.items()))
  left = len(todo) - (stopped[0] if stopped else len(todo))
  try:
    report(sorted({results_dir}), out / "report", log=log)
  except FairError as e:
    log(f"no report yet: {e}")
  if stopped:
    why = (f"--time-limit {args.time_limit:.0f} s: {stopped[1]} needs ~{stopped[2]:.0f} s more"
           if stopped[2] else "--stop-at-step")
    log(f"INCOMPLETE ({why}); {left} of {len(plan)} runs left: rerun the same command to continue")
    return INCOMPLETE
  log(f"DONE: all {len(plan)} runs in {results_dir}; report in {out / 'report'}")
  return 0


_LOSS_FNS: dict = {}


def score_validity(mcfg, params, pool, lqs: np.ndarray, bins: int = 10) -> dict:
  """Do the LQS scores rank the pool the way training fits it? The trained (conventional) model's
  per-example loss on every pool example, against the example's LQS: Spearman's rho and the mean
  loss per LQS decile (lowest scores first). LQS keeps what it expects to be learnable and
  reference-like; a rho near 0 says the ordering cannot be explained by how well training fits
  the examples."""
  from scipy import stats

  from effjax.data.scoring import ScoringFns, loss_scores
  fns = _LOSS_FNS.get(mcfg) or _LOSS_FNS.setdefault(mcfg, ScoringFns(mcfg))
  losses = loss_scores(fns, params, pool, chunk=512)
  order = np.argsort(lqs, kind="stable")
  deciles = [float(losses[ix].mean()) for ix in np.array_split(order, bins)]
  return {"spearman_lqs_vs_loss": float(stats.spearmanr(lqs, losses).statistic),
          "lqs_bin_mean_loss": deciles, "pool_mean_loss": float(losses.mean()),
          "examples": int(len(losses))}


def _evaluate(eval_fn, params, ex, mesh) -> dict:
  from effjax.data import eval_batches
  from effjax.training import evaluate_loss
  r = evaluate_loss(eval_fn, params, eval_batches(ex, 64), mesh)
  return {"loss": r["loss"], "bits_per_byte": r["bits_per_byte"], "examples": len(ex)}


# ---------------------------------------------------------------------------------------------
# report: merge, statistics, tables, plots


def load_results(dirs: list[pathlib.Path]) -> list[dict]:
  """Every seed*.json under `dirs`, one per (budget, condition, seed); FairError for results of
  different setups or two different results of the same run."""
  runs: dict[tuple, tuple[pathlib.Path, dict]] = {}
  for d in dirs:
    d = pathlib.Path(d)
    if not d.is_dir():
      raise FairError(f"--results {d}: no such directory")
    for f in sorted(d.rglob("seed*.json")):
      try:
        r = json.loads(f.read_text())
        key = (r["budget"], r["condition"], r["seed"])
      except (ValueError, KeyError, TypeError):
        raise FairError(f"{f} is not a result file of this study") from None
      if key in runs:
        f0, r0 = runs[key]
        if r0["eval"] != r["eval"]:
          raise FairError(f"two different results of E{key[0]} {key[1]} seed {key[2]}: {f0} and "
                          f"{f}; keep one")
        continue
      runs[key] = (f, r)
  if not runs:
    raise FairError("no result files (results/E*/<condition>/seed*.json) found in "
                    + ", ".join(str(d) for d in dirs))
  fps = {}
  for f, r in runs.values():
    fps.setdefault(r["fingerprint"], f)
  if len(fps) > 1:
    raise FairError("results from different setups cannot be merged: "
                    + "; ".join(f"{k} (e.g. {v})" for k, v in fps.items()))
  return [r for _, r in sorted(runs.values(), key=lambda x: (x[1]["budget"], x[1]["seed"]))]


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the t-interval of the mean over seeds; NaN bounds for one value."""
  x = np.asarray(x, np.float64)
  m = float(x.mean())
  if len(x) < 2:
    return m, float("nan"), float("nan")
  from scipy import stats
  h = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
  return m, m - h, m + h


def summarize(runs: list[dict]) -> dict:
  """{budget: {condition: {...}}}: per eval set mean/std over seeds and the paired difference vs
  conventional (same budget and seed) with its 95% t-interval."""
  order = list(dict.fromkeys(r["condition"] for r in sorted(
      runs, key=lambda r: _cond_rank(r["condition"]))))
  sets = list(dict.fromkeys(k for r in runs for k in r["eval"]))
  out: dict = {}
  for b in sorted({r["budget"] for r in runs}):
    rb = [r for r in runs if r["budget"] == b]
    conv = {r["seed"]: r for r in rb if r["condition"] == "conventional"}
    out[b] = {}
    for c in order:
      rc = sorted((r for r in rb if r["condition"] == c), key=lambda r: r["seed"])
      if not rc:
        continue
      row = {"label": rc[0].get("label", c), "seeds": [r["seed"] for r in rc],
             "epochs": rc[0]["epochs"], "steps": rc[0]["steps"],
             "examples_per_epoch": rc[0]["examples_per_epoch"], "sets": {}}
      for s in sets:
        v = np.array([r["eval"][s]["loss"] for r in rc if s in r["eval"]])
        if not len(v):
          continue
        e = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
             "n": int(len(v))}
        paired = [(r["eval"][s]["loss"] - conv[r["seed"]]["eval"][s]["loss"]) for r in rc
                  if s in r["eval"] and r["seed"] in conv and s in conv[r["seed"]]["eval"]]
        if paired and c != "conventional":
          m, lo, hi = t_interval(np.array(paired))
          e["delta"] = {"mean": m, "low": lo, "high": hi, "n": len(paired)}
        row["sets"][s] = e
      out[b][c] = row
  return out


def _cond_rank(name: str) -> tuple:
  """Table order: make_conditions' order (L ascending, same steps before same epochs)."""
  prefixes = ["conventional", "folding_lqs", "folding_random", "sorted_lqs", "lqs_top50",
              "random_top50", "pds_folding"]
  i = next((i for i, p in enumerate(prefixes) if name.startswith(p)), len(prefixes))
  digits = "".join(ch if ch.isdigit() else " " for ch in name.split("_L", 1)[-1]).split()
  return (i, int(digits[0]) if "_L" in name and digits else 0, name.endswith("same_epochs"), name)


def _fmt_delta(d: dict | None) -> str:
  if not d:
    return ""
  if math.isnan(d["low"]):
    return f"{d['mean']:+.4f}"
  sig = " *" if d["low"] > 0 or d["high"] < 0 else ""
  return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{sig}"


def scoring_cost(runs: list[dict], summary: dict) -> dict | None:
  """Scoring seconds (from the LQS/PDS metadata) against one training epoch over the pool
  (median step time of conventional runs x steps per epoch)."""
  meta = next((r["delt"] for r in runs if r["delt"].get("scoring") in ("lqs", "pds")
               and "seconds" in r["delt"]), None)
  conv = [r for r in runs if r["condition"] == "conventional" and r.get("step_seconds")]
  if meta is None:
    return None
  out = {k: v for k, v in meta.items() if k.startswith("seconds") or k in (
      "example_gradient_passes", "proxy_params", "proxy_steps", "scored_directly", "n")}
  if conv:
    r0 = conv[0]
    spe = -(-r0["pool_examples"] // r0["batch_size"])
    epoch_s = float(np.median([r["step_seconds"] for r in conv])) * spe
    out["epoch_seconds"] = epoch_s
    out["ratio"] = meta["seconds"] / epoch_s
  return out


def report(dirs: list[pathlib.Path], out: pathlib.Path, log=print, command: str | None = None) -> dict:
  runs = load_results(dirs)
  summary = summarize(runs)
  out.mkdir(parents=True, exist_ok=True)
  sets = list(dict.fromkeys(k for r in runs for k in r["eval"]))
  cost = scoring_cost(runs, summary)
  crcs = {}
  for r in runs:
    if r.get("scores_crc32") is not None and "random" not in r["condition"]:
      crcs.setdefault(r["delt"].get("scoring"), set()).add(r["scores_crc32"])
  doc = {"experiment": "delt_fair", "fingerprint": runs[0]["fingerprint"],
         "cards": sorted({r.get("card") or "?" for r in runs}),
         "jax": sorted({r.get("jax") or "?" for r in runs}),
         "commits": sorted({r.get("commit") or "?" for r in runs}),
         "run_commands": sorted({r.get("command") or "?" for r in runs}),
         "results_from": [str(d) for d in dirs], "summary": summary, "scoring_cost": cost,
         "runs": runs}
  (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
  _plot_curves(runs, summary, out / "fair_curves.png")
  _plot_deltas(summary, sets, out / "fair_deltas.png")

  r0 = runs[0]
  cmd = command or ("python experiments/delt/fair.py report "
                    + " ".join(f"--results {d}" for d in dirs) + f" --report-out {out}")
  seeds = sorted({r["seed"] for r in runs})
  L = [
      "# DELT, the fair test: results", "",
      f"Cards: {', '.join(doc['cards'])}; JAX {', '.join(doc['jax'])}; commits "
      f"{', '.join(doc['commits'])}; setup {doc['fingerprint']}. Model {r0['model_params'] / 1e6:.2f}M "
      f"params, batch {r0['batch_size']} x {r0['seq_len']} tokens; proxy "
      f"{r0['proxy_params'] / 1e6:.2f}M params; pool {r0['pool_examples']} examples; seeds {seeds}.",
      "",
      "Loss in nats per token (byte-level) on each held-out set, mean +- sample std over seeds. "
      "Delta: the paired difference from conventional training (same budget and seed; negative = "
      "better) with its 95% t-interval over seeds; * = the interval excludes 0.",
      "",
  ]
  for b, rows in summary.items():
    L += [f"## Budget: {b} epoch{'s' if b != 1 else ''} over the pool", ""]
    head = "| condition | epochs x examples | steps | seeds |"
    rule = "|---|---|---|---|"
    for s in sets:
      head += f" {EVAL_LABELS.get(s, s)} | delta |"
      rule += "---|---|"
    L += [head, rule]
    for c, row in rows.items():
      line = (f"| {row['label']} | {row['epochs']} x {row['examples_per_epoch']} | {row['steps']} | "
              f"{len(row['seeds'])} |")
      for s in sets:
        e = row["sets"].get(s)
        line += (f" {e['mean']:.4f} +- {e['std']:.4f} | {_fmt_delta(e.get('delta'))} |" if e
                 else " | |")
      L.append(line)
    L.append("")
  if cost:
    L += ["## Scoring cost", "",
          f"LQS + PDS from one proxy trajectory ({cost.get('proxy_params', 0) / 1e6:.2f}M-param "
          f"proxy, T = {cost.get('proxy_steps')}), every one of {cost.get('n')} pool examples scored "
          f"directly ({cost.get('scored_directly')}; {cost.get('example_gradient_passes')} "
          "per-example gradients; wall time, compilation included):", "",
          "| phase | seconds |", "|---|---|"]
    for k in ("seconds_pretrain", "seconds_trajectory", "seconds_scoring", "seconds_learned_scorer",
              "seconds"):
      if k in cost:
        L.append(f"| {k[len('seconds_'):] if k != 'seconds' else '**total**'} | {cost[k]:.1f} |")
    if "ratio" in cost:
      L += ["", f"One training epoch over the pool (median conventional step time x steps per "
            f"epoch): {cost['epoch_seconds']:.1f} s, so scoring costs **{cost['ratio']:.1f}x** one "
            "epoch."]
    L.append("")
  val = [r for r in runs if r["condition"] == "conventional" and r.get("score_validity")]
  if val:
    L += ["## Do the LQS scores rank what training fits?", "",
          "Each conventional run's final per-example loss on every pool example (nats / token), "
          "against the example's LQS: Spearman's rho, and the mean loss per LQS decile (lowest "
          "scores first; each Folding sweep and the sorted order run from d1 to d10, and top-50% "
          "selection keeps d6-d10). Mean over seeds.", "",
          "| budget | seeds | rho(LQS, loss) | " + " | ".join(f"d{i + 1}" for i in range(10))
          + " |", "|---|---|---|" + "---|" * 10]
    for b in sorted({r["budget"] for r in val}):
      vb = [r["score_validity"] for r in val if r["budget"] == b]
      rho = np.mean([v["spearman_lqs_vs_loss"] for v in vb])
      dec = np.mean([v["lqs_bin_mean_loss"] for v in vb], axis=0)
      L.append(f"| {b} | {len(vb)} | {rho:+.3f} | " + " | ".join(f"{x:.3f}" for x in dec) + " |")
    L.append("")
  for k, v in crcs.items():
    if len(v) > 1:
      L += [f"Note: the runs used {len(v)} different sets of {k} scores (scored again on another "
            "machine; GPU scoring is not bit-reproducible).", ""]
  comp = out / "composition.json"
  if comp.exists():
    L += _composition_md(json.loads(comp.read_text()))
  L += ["![loss curves](fair_curves.png)", "", "![paired differences](fair_deltas.png)", "",
        "## Regenerate", "", "```bash", cmd]
  L += [f"# runs: {c}" for c in doc["run_commands"]]
  L += ["```", ""]
  (out / "REPORT.md").write_text("\n".join(L))
  log(f"report of {len(runs)} runs in {out / 'REPORT.md'}")
  return doc


def _plot_curves(runs, summary, png):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  budgets = list(summary)
  fig, axes = plt.subplots(2, len(budgets), figsize=(7 * len(budgets), 8), dpi=100, squeeze=False)
  for j, b in enumerate(budgets):
    for i, (key, title) in enumerate((("valid_curve", "held-out pool loss (periodic)"),
                                      ("curve", "training loss"))):
      ax = axes[i][j]
      for k, c in enumerate(summary[b]):
        rc = [r for r in runs if r["budget"] == b and r["condition"] == c and r[key]]
        if not rc:
          continue
        steps = [s for s, _ in rc[0][key]]
        n = min(len(r[key]) for r in rc)
        ys = np.mean([[v for _, v in r[key][:n]] for r in rc], axis=0)
        x = np.array(steps[:n]) * rc[0]["batch_size"] / rc[0]["pool_examples"]
        ax.plot(x, ys, label=c, lw=1.4 if c == "conventional" else 1,
                color="k" if c == "conventional" else f"C{k % 10}",
                ls="--" if "same_epochs" in c else "-")
      ax.set_xlabel("examples seen / pool size (epochs of compute)")
      ax.set_ylabel("loss (nats / token), mean over seeds")
      ax.set_title(f"{b}-epoch budget: {title}")
      ax.grid(alpha=0.3)
      if i == 0:
        ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)


def _plot_deltas(summary, sets, png):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  budgets = list(summary)
  fig, axes = plt.subplots(len(budgets), len(sets), figsize=(5.5 * len(sets), 3.6 * len(budgets)),
                           dpi=100, squeeze=False)
  for i, b in enumerate(budgets):
    for j, s in enumerate(sets):
      ax = axes[i][j]
      rows = [(c, r["sets"][s]["delta"]) for c, r in summary[b].items()
              if s in r["sets"] and "delta" in r["sets"][s]]
      for k, (c, d) in enumerate(rows):
        err = None if math.isnan(d["low"]) else [[d["mean"] - d["low"]], [d["high"] - d["mean"]]]
        ax.errorbar(d["mean"], k, xerr=err, fmt="o", capsize=3,
                    color="C3" if d["mean"] > 0 else "C2")
      ax.axvline(0, color="k", lw=1)
      ax.set_yticks(range(len(rows)), [c for c, _ in rows], fontsize=7)
      ax.set_xlabel("loss - conventional (nats / token), 95% CI")
      ax.set_title(f"{b} epoch{'s' if b != 1 else ''}: {EVAL_LABELS.get(s, s)}")
      ax.invert_yaxis()  # the table's order, top down
      ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)


def cmd_report(args) -> int:
  dirs = [pathlib.Path(d) for d in (args.results or [pathlib.Path(args.out) / "results"])]
  cmd = shlex.join(["python", "experiments/delt/fair.py", *args.argv])
  report(dirs, pathlib.Path(args.report_out or pathlib.Path(args.out) / "report"), command=cmd)
  return 0


# ---------------------------------------------------------------------------------------------
# composition: what the scores select, by a field of the pool's documents


def pool_labels(dcfg, field: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """The pool's examples labelled by a field of the .jsonl documents they come from: (names,
  label int [n] (the value holding most of the example's tokens), share float [n] (that value's
  share of them)). The pool is rebuilt as `load_splits` builds it, with the field carried along,
  and its tokens must equal the pool's: a mismatch is an error, never a silent mislabelling."""
  from effjax.data import load_splits
  from effjax.data.pipeline import split_documents, to_examples
  from effjax.data.sources import load_document_field, load_documents
  from effjax.data.tokenizer import ByteTokenizer

  kw = dict(text_field=dcfg.text_field, root=dcfg.root, max_documents=dcfg.max_documents)
  try:
    values = load_document_field(dcfg.source, field, **kw)
    docs = load_documents(dcfg.source, **kw)
  except (OSError, ValueError) as e:
    raise FairError(f"labelling the pool by {field!r}: {e}") from None
  names = sorted(set(values))
  tok = ByteTokenizer()
  ids = [tok.encode(d) for d in docs]
  labs = [np.full(d.shape[0], names.index(v), np.int32) for d, v in zip(ids, values)]
  train, _ = split_documents(ids, dcfg.valid_fraction, dcfg.seed)
  train_l, _ = split_documents(labs, dcfg.valid_fraction, dcfg.seed)  # same lengths, same cut
  keep = [i for i, d in enumerate(train) if d.shape[0] > 0]
  train, train_l = [train[i] for i in keep], [train_l[i] for i in keep]
  pool = load_splits(dcfg)["train"]
  rebuilt = to_examples(train, dcfg)
  if rebuilt.tokens.shape != pool.tokens.shape or not np.array_equal(rebuilt.tokens, pool.tokens):
    raise FairError("the rebuilt pool differs from the training pool: cannot label it")
  if dcfg.packing == "pad":
    label = np.array([l[0] for l in train_l], np.int32)
    return names, label, np.ones(len(label))
  # pack: BOS doc EOS per document, cut into windows of seq_len + 1 (the short tail dropped)
  L = dcfg.seq_len + 1
  stream = np.concatenate([np.concatenate([l[:1], l, l[:1]]) for l in train_l])
  win = stream[: len(pool) * L].reshape(len(pool), L)
  counts = np.stack([(win == k).sum(1) for k in range(len(names))], 1)
  return names, counts.argmax(1).astype(np.int32), counts.max(1) / L


def composition(names: list[str], label: np.ndarray, scores: dict[str, np.ndarray],
                bins: int = 10) -> dict:
  """Each label's share of the pool, of every score bin (lowest scores first: the order of a
  Folding sweep) and of the top half (what top-50% selection keeps)."""
  k, n = len(names), len(label)
  h = int(math.floor(0.5 * n + 0.5))                  # what top-50% selection keeps
  share = lambda ix: np.bincount(label[ix], minlength=k) / max(len(ix), 1)
  out = {"names": names, "pool_share": share(np.arange(n)).tolist(), "scores": {}}
  orders = {name: np.argsort(s, kind="stable") for name, s in scores.items()}
  for name, order in orders.items():
    out["scores"][name] = {"bin_share": [share(ix).tolist() for ix in np.array_split(order, bins)],
                           "top50_share": share(order[n - h:]).tolist()}
  if "lqs" in scores and "pds" in scores:      # does the learnability factor change the ranking?
    from scipy import stats
    out["lqs_vs_pds"] = {
        "spearman": float(stats.spearmanr(scores["lqs"], scores["pds"]).statistic),
        "top50_overlap": len(np.intersect1d(orders["lqs"][n - h:], orders["pds"][n - h:])) / h}
  return out


def cmd_composition(args) -> int:
  from effjax.config import load_config
  from effjax.data import delt, load_splits
  base, ovs = base_config(args)
  scores_dir = pathlib.Path(args.scores or pathlib.Path(args.out) / "scores")
  try:
    pool = load_splits(base.data)["train"]
  except (OSError, ValueError) as e:
    raise FairError(f"data: {e}") from None
  scores = {}
  for kind in ("lqs", "pds"):
    cfg = load_config(args.config, ovs + [f"delt.scoring={kind}", f"delt.cache_dir={scores_dir}"])
    f = scores_dir / delt._cache_key(cfg, pool) / "scores.npy"
    if f.exists():
      s = np.load(f)
      if s.shape != (len(pool),):
        raise FairError(f"{f} holds {s.shape[0]} scores for a pool of {len(pool)}")
      scores[kind] = s
  if not scores:
    raise FairError(f"no cached LQS / PDS scores of this setup under {scores_dir} (composition "
                    f"never scores: `fair.py run` does)")
  names, label, purity = pool_labels(base.data, args.field)
  doc = {"field": args.field, "examples": int(len(label)),
         "mean_majority_share": float(purity.mean()), **composition(names, label, scores)}
  out = pathlib.Path(args.report_out or pathlib.Path(args.out) / "report") / "composition.json"
  _atomic_json(out, doc)
  print(f"composition of {len(label)} pool examples by {args.field!r} "
        f"({', '.join(scores)} scores) in {out}")
  return 0


def _composition_md(doc: dict) -> list[str]:
  names, pool = doc["names"], doc["pool_share"]
  L = [f"## What the scores select, by `{doc['field']}`", "",
       f"Each pool example labelled by the `{doc['field']}` of the document holding most of its "
       f"tokens (on average {100 * doc['mean_majority_share']:.1f}% of them), then each label's "
       "share of the pool, of each LQS decile (lowest first: the order of a Folding sweep) and of "
       "the top half (what top-50% selection keeps; its ratio to the pool share in brackets).",
       "", "| " + doc["field"] + " | pool | " + " | ".join(f"d{i + 1}" for i in range(10))
       + " | LQS top 50% | PDS top 50% |", "|---|---|" + "---|" * 12]
  lqs, pds = doc["scores"].get("lqs"), doc["scores"].get("pds")
  for j, nm in enumerate(names):
    row = f"| {nm} | {pool[j]:.3f} |"
    row += "".join(f" {b[j]:.3f} |" for b in lqs["bin_share"]) if lqs else " |" * 10
    for s in (lqs, pds):
      row += f" {s['top50_share'][j]:.3f} ({s['top50_share'][j] / max(pool[j], 1e-12):.2f}x) |" \
          if s else " |"
    L.append(row)
  L.append("")
  if "lqs_vs_pds" in doc:
    c = doc["lqs_vs_pds"]
    L += [f"LQS against PDS (the same trajectory without the learnability factor): Spearman's rho "
          f"{c['spearman']:+.4f}; the two top halves share {100 * c['top50_overlap']:.2f}% of "
          "their examples.", ""]
  return L


# ---------------------------------------------------------------------------------------------
# plan: the arithmetic of a study's size


def flops_per_token(mcfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 x params (matmuls incl. the tied output projection) plus causal-
  free attention scores and values (3 x 4 x seq x d_model per layer: forward + backward)."""
  return 6 * mcfg.num_params() + 12 * mcfg.n_layers * seq_len * mcfg.n_heads * mcfg.hd


def cmd_plan(args) -> int:
  base, _ = base_config(args)
  conds, default = make_conditions(args.folds)
  names = args.conditions or default
  if any(x not in conds for x in names):
    raise FairError(f"unknown condition(s) in {', '.join(names)} (known: {', '.join(conds)})")
  n = args.pool_examples
  if n is None:
    from effjax.data import load_splits
    try:
      n = len(load_splits(base.data)["train"])
    except (OSError, ValueError) as e:
      raise FairError(f"data: {e} (or pass --pool-examples N)") from None
  B, T = base.train.batch_size, base.data.seq_len
  half = max(1, int(math.floor(0.5 * n + 0.5)))
  fpt = flops_per_token(base.model, T)
  total_steps = 0
  for b in args.budgets:
    for c in (conds[x] for x in names):
      total_steps += c.epoch_factor * b * -(-(half if c.selection == "top_r" else n) // B)
  runs = len(names) * len(args.budgets) * len(args.seeds)
  tokens = total_steps * len(args.seeds) * B * T
  train_flops = tokens * fpt
  d = base.delt
  p_fpt = flops_per_token(d.proxy, T)
  passes = len(range(0, d.proxy_steps, max(1, int(math.sqrt(d.proxy_steps))))) + 1
  score_flops = (passes * n + d.proxy_pretrain_steps * d.proxy_batch_size
                 + d.proxy_steps * (2 * d.proxy_batch_size + 2 * d.reference_examples
                                    + 2 * d.proxy_batch_size)) * T * p_fpt
  rate = args.tflops * 1e12
  print(f"model {base.model.num_params() / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token; pool {n} "
        f"examples x {T} tokens = {n * T / 1e6:.1f}M tokens/epoch; batch {B} -> {-(-n // B)} "
        f"steps/epoch")
  print(f"{runs} runs ({len(names)} conditions x budgets {args.budgets} x {len(args.seeds)} seeds): "
        f"{total_steps * len(args.seeds)} steps, {tokens / 1e9:.2f}B tokens, "
        f"{train_flops:.3g} FLOP -> {train_flops / rate / 60:.1f} min at {args.tflops:g} TFLOP/s")
  print(f"scoring: proxy {d.proxy.num_params() / 1e6:.2f}M, {passes} per-example passes x {n} "
        f"+ pretraining + trajectory = {score_flops:.3g} FLOP -> {score_flops / rate / 60:.1f} min "
        f"({score_flops / (n * T * fpt):.1f} epochs of training)")
  over = runs * args.overhead_s
  print(f"per-run overhead ~{args.overhead_s:g} s -> {over / 60:.1f} min; total ~"
        f"{(train_flops + score_flops) / rate / 60 + over / 60:.0f} min")
  return 0


# ---------------------------------------------------------------------------------------------


def _parser(cmd: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"fair.py {cmd}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  if cmd in ("run", "plan", "composition"):
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--tiny", action="store_true",
                   help="CPU-sized model, pool and proxy (a full pass in minutes); seeds 0 1")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
  if cmd in ("run", "plan"):
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 3],
                   help="epochs over the whole pool")
    p.add_argument("--folds", type=int, nargs="+", default=[3, 5],
                   help="Folding L values; the first is used with selection")
    p.add_argument("--conditions", nargs="+", default=None)
  if cmd == "run":
    p.add_argument("--out", default=str(ROOT / "runs/delt_fair"))
    p.add_argument("--eval-source", action="append", default=[], metavar="PATH",
                   help="an extra evaluation set: .txt (one document per line) or .jsonl; repeatable")
    p.add_argument("--eval-text-field", default="text", help="the .jsonl field holding the text")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="examples per evaluation set (default 2048; 64 with --tiny)")
    p.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="optim.warmup_steps = this x each run's steps")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no run that would end after this (exit status 3)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoints (deleted once its result is written)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache (default <out>/jax_cache; none = off)")
    p.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests
  elif cmd == "report":
    p.add_argument("--results", action="append", default=None, metavar="DIR",
                   help="a results folder (repeatable; default <out>/results)")
    p.add_argument("--out", default=str(ROOT / "runs/delt_fair"),
                   help="with no --results: the run's --out")
    p.add_argument("--report-out", default=None, help="where the report goes (default <out>/report)")
  elif cmd == "composition":
    p.add_argument("--out", default=str(ROOT / "runs/delt_fair"))
    p.add_argument("--scores", default=None, metavar="DIR",
                   help="the score cache (default <out>/scores)")
    p.add_argument("--field", default="source", help="the .jsonl field to label the pool by")
    p.add_argument("--report-out", default=None,
                   help="where composition.json goes (default <out>/report; `report` reads it)")
  elif cmd == "plan":
    p.add_argument("--pool-examples", type=int, default=None,
                   help="skip loading the pool (83171 for nltk-english-mix at seq 256)")
    p.add_argument("--tflops", type=float, default=120.0, help="assumed sustained TFLOP/s")
    p.add_argument("--overhead-s", type=float, default=5.0,
                   help="assumed seconds per run besides its steps")
  return p


def parse_args(argv: list[str]) -> argparse.Namespace:
  """argv (without the program name, starting with run | report | plan) -> arguments, with the
  defaults that depend on --tiny filled in."""
  # key=value overrides may come anywhere, also after a list option such as --conditions
  overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
  args = _parser(argv[0]).parse_intermixed_args([a for a in argv[1:] if a not in overrides])
  if argv[0] in ("run", "plan", "composition"):
    args.overrides = overrides
  elif overrides:
    raise SystemExit(f"error: {argv[0]} takes no key=value overrides: {' '.join(overrides)}")
  args.cmd = argv[0]
  if args.cmd in ("run", "plan") and args.seeds is None:
    args.seeds = TINY_ARGS["seeds"] if args.tiny else [0, 1, 2, 3, 4]
  if args.cmd == "run" and args.eval_examples is None:
    args.eval_examples = TINY_ARGS["eval_examples"] if args.tiny else 2048
  return args


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in ("run", "report", "plan", "composition"):
    print(__doc__, file=sys.stderr)
    print("error: the first argument must be run, report, plan or composition", file=sys.stderr)
    return 2
  args = parse_args(argv)
  args.argv = argv
  from effjax.config import ConfigError
  try:
    if args.cmd == "run":
      if not 0 <= args.warmup_fraction < 1:
        raise FairError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
      return cmd_run(args)
    if args.cmd == "report":
      return cmd_report(args)
    if args.cmd == "composition":
      return cmd_composition(args)
    return cmd_plan(args)
  except (FairError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
