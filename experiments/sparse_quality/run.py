#!/usr/bin/env python3
"""Sparse decoding quality on a model trained for it: drift of dense vs block-sparse vs
block-sparse + ReSA-rectified decoding at 90% sparsity, and passkey retrieval by token budget for
the SeerAttention-R gate vs Quest.

  python experiments/sparse_quality/run.py [key.sub=value ...] [--out DIR] [--steps N --batch B
                                           --seq T] [--train-seconds S] [--smoke]

(Config overrides go first: a list-valued flag such as --budgets would swallow them.)

Phases (each skipped when its outputs exist in --out, so re-running resumes; --force PHASE redoes
it and every later one):
  data    <out>/data/train.jsonl: documents of exactly seq-1 bytes (one document = one training
          row): windows of real text, 30% passkey documents (a real-text haystack, the needle at a
          random depth, the question and the answer at the end) and 30% copy documents (real text
          and random codes with copies of their own earlier stretches at random distances: a dense
          signal for the content-based look-up retrieval needs); <out>/data/heldout.txt: held-out
          real text (drift prompts, real-text haystacks for retrieval).
  train   configs/longctx.yaml on that corpus (effjax.trainer.train, resumable). --train-seconds
          caps the phase's wall time: a first chunk measures the step time, then it trains to the
          last step that fits (--resume-later: and a later call continues); with --auto-steps a
          throwaway calibration run measures it and the run gets the steps that fit, with a
          complete learning-rate schedule.
  gate    distils the decode gate (effjax.sparse.gate_training.train_gate) -> <out>/gate.npz.
  eval    passkey accuracy by budget on real-text haystacks and on evaluation.retrieval_eval's
          repetitive filler; drift at 90% sparsity; attention recall of the block choices.
  kv      with --kv-caches int4,int2: the same model over low-bit KV caches (effjax.quant.kv):
          teacher-forced perplexity increase over the bf16 cache (evaluation.kv_cache_quality) with
          K quantised per channel and per token, then drift and passkey retrieval (dense and
          --kv-selectors) over bf16 and each low-bit cache (K per channel) -> <out>/kv.json.
  report  <out>/results.json, REPORT.md, retrieval.png, drift.png, loss.png (also copied to
          --results-dir when given).

--smoke runs tiny sizes end to end in about a minute on CPU (test_sparse_quality.py here:
`pytest -m experiment experiments/sparse_quality`).

Evaluating again without training: a call with the same --out and the same data / training flags
reuses the data, the trained model (train/train_done.json; a killed run resumes from its last
checkpoint) and the gate, and redoes only evaluations whose settings changed. --kv-only runs only
the low-bit evaluations (the data and train phases still run, or are reused; the gate only if a
--kv-selectors row needs it; the eval phase is skipped and its earlier results, if any, stay in
the report).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np

PHASES = ("data", "train", "gate", "eval", "kv", "report")
KV_KINDS = ("int4", "int2")
# --gate-variants: K-compression cache dtype -> the selector's row name
GATE_VARIANTS = {"float32": "gate-f32", "float8_e4m3fn": "gate-f8"}

# Defaults sized for one H100 (see README.md), and the --smoke sizes (2 CPU cores, ~1 minute).
FULL = dict(steps=9000, batch=16, seq=4096, valid_docs=64, gate_steps=300,
            gate_batch=8, gate_queries=16, gate_seqs=1024, block_size=64, d_gate=64,
            budgets=[128, 256, 512, 1024], retrieval_n=64, drift_n=16, new_tokens=512,
            rectify=[32, 16], recall_n=8)
SMOKE = dict(steps=24, batch=4, seq=256, valid_docs=8, gate_steps=4, gate_batch=2,
             gate_queries=4, gate_seqs=16, block_size=16, d_gate=16, budgets=[48],
             retrieval_n=4, drift_n=2, new_tokens=48, rectify=[16], recall_n=2)
SMOKE_MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
               "model.d_ff=128", "model.compute_dtype=float32", "train.log_every=4",
               "eval.batch_size=4"]


def default_corpus() -> list[str]:
  """nltk-english-mix + WikiText-2 valid under the data root ($EFFJAX_DATA_ROOT, as the configs'
  root:<path> sources), else under the repo's git-ignored shared_data/ copy."""
  from effjax.data.sources import data_root
  bases = [pathlib.Path(r).expanduser().resolve() for r in (data_root(),) if r]
  for base in bases + [ROOT / "shared_data"]:
    if (base / "nltk-english-mix").is_dir():
      paths = [base / "nltk-english-mix", base / "wikitext-2" / "valid.txt"]
      return [str(p) for p in paths if p.exists()]
  return []


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=str(ROOT / "runs" / "sparse_quality"), help="run directory")
  ap.add_argument("--results-dir", default=None,
                  help="also copy results.json, REPORT.md, the plots and the logs here")
  ap.add_argument("--config", default=str(ROOT / "configs" / "longctx.yaml"))
  ap.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU end-to-end check")
  ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
  ap.add_argument("--force", nargs="+", choices=PHASES, default=[],
                  help="redo these phases (and every later one) even if their outputs exist")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--decode-impl", default="auto", help="decode kernels: auto | xla | pallas_triton")
  ap.add_argument("--no-jax-cache", action="store_true",
                  help="no persistent compilation cache in <out>/jax_cache (it makes re-runs compile faster)")
  g = ap.add_argument_group("data")
  g.add_argument("--corpus", nargs="+", default=None,
                 help="real-text sources (default: nltk-english-mix and wikitext-2/valid.txt "
                      "under $EFFJAX_DATA_ROOT, else shared_data/)")
  g.add_argument("--passkey-frac", type=float, default=0.3, help="share of passkey documents")
  g.add_argument("--copy-frac", type=float, default=0.3,
                 help="share of documents of real text with copies of its own earlier stretches")
  g.add_argument("--synthetic-filler-frac", type=float, default=0.25,
                 help="share of passkey documents whose haystack is passkey_prompts' repetitive filler")
  g.add_argument("--heldout-frac", type=float, default=0.03, help="real text held out for the evals")
  g.add_argument("--valid-docs", type=int, default=None, help="corpus documents held out by train()")
  g = ap.add_argument_group("train")
  g.add_argument("--steps", type=int, default=None)
  g.add_argument("--batch", type=int, default=None)
  g.add_argument("--seq", type=int, default=None, help="training length = model.max_seq_len")
  g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
  g.add_argument("--warmup", type=int, default=None, help="warmup steps (default: min(config, steps/10))")
  g.add_argument("--train-seconds", type=float, default=None,
                 help="wall-time cap of the train phase: stop at the last step that fits")
  g.add_argument("--calib-steps", type=int, default=None,
                 help="with --train-seconds: steps that measure the step time (the first chunk, or "
                      "with --auto-steps a throwaway run)")
  g.add_argument("--resume-later", action="store_true",
                 help="with --train-seconds: a run stopped by the cap is paused, not finished: the "
                      "later phases are skipped and the next call continues training")
  g.add_argument("--auto-steps", action="store_true",
                 help="with --train-seconds: train as many steps as fit (at most --steps) with a "
                      "complete schedule, measured by a throwaway calibration run")
  g = ap.add_argument_group("gate")
  g.add_argument("--gate-steps", type=int, default=None)
  g.add_argument("--gate-batch", type=int, default=None)
  g.add_argument("--gate-queries", type=int, default=None, help="query positions per sequence and step")
  g.add_argument("--gate-seqs", type=int, default=None, help="corpus documents the gate trains on")
  g.add_argument("--gate-lr", type=float, default=3e-3)
  g.add_argument("--d-gate", type=int, default=None)
  g = ap.add_argument_group("eval")
  g.add_argument("--block-size", type=int, default=None)
  g.add_argument("--sparsity", type=float, default=0.9, help="drift: budget = (1 - sparsity) of its tokens")
  g.add_argument("--rectify", type=int, nargs="+", default=None, help="drift: ReSA rectification periods f")
  g.add_argument("--rectify-cache-only", type=int, nargs="*", default=[],
                 help="drift: diagnostic runs rectified every f steps whose tokens still come from "
                      "the sparse steps' logits (only the cache is rectified; f = 1: every step "
                      "sparse over a dense-exact cache)")
  g.add_argument("--local-tokens", type=int, nargs="*", default=[],
                 help="retrieval and drift: extra rows 'quest-lN' / 'gate-lN' that always keep the "
                      "blocks holding the last N tokens (SparseConfig.local_tokens; the plain rows "
                      "keep the current block only)")
  g.add_argument("--drift-n", type=int, default=None, help="drift prompts")
  g.add_argument("--new-tokens", type=int, default=None, help="drift: greedy tokens after each prompt")
  g.add_argument("--retrieval-n", type=int, default=None, help="passkey prompts per haystack kind")
  g.add_argument("--context", type=int, default=None, help="passkey prompt tokens (default seq - block)")
  g.add_argument("--budgets", type=int, nargs="+", default=None, help="retrieval token budgets")
  g.add_argument("--recall-n", type=int, default=None, help="sequences for attention recall (0 = skip)")
  g.add_argument("--skip-synthetic", action="store_true",
                 help="skip retrieval_eval's repetitive-filler table")
  g.add_argument("--gate-variants", nargs="*", choices=list(GATE_VARIANTS), default=["float32"],
                 help="further K-compression cache dtypes for the same gate in retrieval and drift: "
                      "'gate-f32' (float32), 'gate-f8' (float8_e4m3fn); 'gate' keeps "
                      "SparseConfig.gate_cache_dtype's default, bfloat16. Recall scores all three.")
  g.add_argument("--no-gate-f32", dest="gate_variants", action="store_const", const=[],
                 help="no extra gate rows (same as --gate-variants with no values)")
  g = ap.add_argument_group("kv (low-bit KV caches)")
  g.add_argument("--kv-caches", default="",
                 help="comma-separated low-bit caches to evaluate, e.g. int4,int2 (default: none)")
  g.add_argument("--kv-only", action="store_true",
                 help="run only the low-bit evaluations: skip the eval phase (and the gate phase "
                      "unless a --kv-selectors row needs the gate)")
  g.add_argument("--kv-group", type=int, default=None,
                 help="tokens per K scale (default: KVCacheSpec's, 128; a multiple of --block-size)")
  g.add_argument("--kv-window", type=int, default=None,
                 help="full-precision residual tokens (default: KVCacheSpec's, 128 at int4 / 256 at int2)")
  g.add_argument("--kv-selectors", nargs="*", default=["quest"],
                 help="sparse rows of the low-bit drift and retrieval (names as in the eval phase: "
                      "quest, gate, gate-f32, gate-f8, quest-lN, gate-lN)")
  g.add_argument("--kv-budgets", type=int, nargs="+", default=None,
                 help="retrieval budgets of the low-bit rows (default: the largest of --budgets)")
  g.add_argument("--kv-rectify", type=int, nargs="*", default=[],
                 help="drift over the low-bit caches: ReSA rectification periods (default: none)")
  ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides (applied last)")
  args = ap.parse_args(argv)
  for k, v in (SMOKE if args.smoke else FULL).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.kv_caches = [k.strip() for k in args.kv_caches.split(",") if k.strip()]
  if args.kv_budgets is None:
    args.kv_budgets = [max(args.budgets)]
  if args.corpus is None:
    args.corpus = ["bundled:tinyshakespeare"] if args.smoke else default_corpus()
    if not args.corpus:
      ap.error("no corpus found under $EFFJAX_DATA_ROOT or shared_data/: set EFFJAX_DATA_ROOT "
               "or pass --corpus")
  check_args(ap, args)
  return args


def drift_budget(a) -> int:
  """The drift's token budget: (1 - --sparsity) of --seq, in whole blocks (at least 2)."""
  return max(2 * a.block_size, int((1 - a.sparsity) * a.seq) // a.block_size * a.block_size)


def check_args(ap, a) -> None:
  """Impossible sizes fail here, before any compute, naming the flag."""
  bs = a.block_size
  if a.seq % bs:
    ap.error(f"--seq {a.seq} must be a multiple of --block-size {bs}")
  if a.context is None:
    a.context = a.seq - bs
  if a.context + 5 > a.seq or -(-(a.context + 5) // bs) * bs > a.seq:
    ap.error(f"--context {a.context}: the prompt, 5 answer tokens and block rounding must fit in --seq {a.seq}")
  if a.new_tokens >= a.seq - 2 * bs:
    ap.error(f"--new-tokens {a.new_tokens} leaves no prompt in --seq {a.seq}")
  for b in a.budgets:
    if b % bs or b < 2 * bs:
      ap.error(f"--budgets: {b} must be a multiple of --block-size {bs} and >= 2 blocks")
  if not 0 < a.sparsity < 1:
    ap.error("--sparsity must be in (0, 1)")
  if any(f <= 0 for f in a.rectify) or any(f <= 0 for f in a.rectify_cache_only):
    ap.error("--rectify / --rectify-cache-only periods must be > 0")
  from pallas_kernels.block_topk import forced_blocks_max
  for n in a.local_tokens:
    if n < 2:
      ap.error(f"--local-tokens {n}: must be >= 2 (1 is the plain rows' rule)")
    for b in a.budgets + [drift_budget(a)]:
      if b // bs < forced_blocks_max(bs, n):
        ap.error(f"--local-tokens {n}: a budget of {b} tokens cannot hold the forced blocks")
  check_kv_args(ap, a)
  if (a.auto_steps or a.resume_later) and a.train_seconds is None:
    ap.error("--auto-steps and --resume-later need --train-seconds")
  if a.auto_steps and a.resume_later:
    ap.error("--auto-steps fits the steps to the time: --resume-later has nothing to resume")
  if a.calib_steps is None:  # a throwaway calibration is kept short; a first chunk need not be
    a.calib_steps = 8 if a.smoke else (30 if a.auto_steps else 100)
  if a.steps < 1 or a.batch < 1 or a.valid_docs < 1:
    ap.error("--steps, --batch and --valid-docs must be > 0")
  if a.steps * a.batch + a.valid_docs < 20:
    # below 20 documents effjax.data.split_documents holds out the tail of every document instead
    ap.error("the corpus needs >= 20 documents (--steps x --batch + --valid-docs)")


def selector_names(a) -> list[str]:
  """The selector rows the eval phase builds (`make_selectors`)."""
  return (["quest", "gate"] + [GATE_VARIANTS[dt] for dt in a.gate_variants]
          + [f"{s}-l{n}" for n in a.local_tokens for s in ("quest", "gate")])


def check_kv_args(ap, a) -> None:
  """The low-bit flags: known kinds, caches whose K groups hold whole blocks, known selectors."""
  for k in a.kv_caches:
    if k not in KV_KINDS:
      ap.error(f"--kv-caches: {k!r} is not one of {', '.join(KV_KINDS)}")
  if len(set(a.kv_caches)) != len(a.kv_caches):
    ap.error("--kv-caches: a cache is named twice")
  if a.kv_only and not a.kv_caches:
    ap.error("--kv-only needs --kv-caches (e.g. --kv-caches int4,int2)")
  if not a.kv_caches:
    return
  import evals
  try:
    specs = evals.kv_specs(a.kv_caches, group=a.kv_group, window=a.kv_window)
  except ValueError as e:
    ap.error(f"--kv-group / --kv-window: {e}")
  group = specs[f"{a.kv_caches[0]} K per channel"].group
  if group % a.block_size:
    ap.error(f"--kv-group {group} must be a multiple of --block-size {a.block_size} (a sparse block "
             "may not straddle two K scales)")
  known = selector_names(a)
  for s in a.kv_selectors:
    if s not in known:
      ap.error(f"--kv-selectors: {s!r} is not one of {', '.join(known)}")
  from pallas_kernels.block_topk import forced_blocks_max
  for b in a.kv_budgets:
    if b % a.block_size or b < 2 * a.block_size:
      ap.error(f"--kv-budgets: {b} must be a multiple of --block-size {a.block_size} and >= 2 blocks")
    for s in a.kv_selectors:
      n = int(s.rsplit("-l", 1)[1]) if "-l" in s else 1
      if b // a.block_size < forced_blocks_max(a.block_size, n):
        ap.error(f"--kv-budgets: {b} tokens cannot hold the blocks {s} always keeps")
  if any(f <= 0 for f in a.kv_rectify):
    ap.error("--kv-rectify periods must be > 0")


# ----------------------------------------------------------------------------------------------
# bookkeeping


class Run:
  """The run directory: logging to stdout and <out>/run.log, per-phase timings, JSON files."""

  def __init__(self, out: pathlib.Path):
    self.out = out
    out.mkdir(parents=True, exist_ok=True)
    self._log = (out / "run.log").open("a")
    self.timings = self.read("timings.json") or {}

  def log(self, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    self._log.write(line + "\n")
    self._log.flush()

  def read(self, name: str):
    p = self.out / name
    return json.loads(p.read_text()) if p.exists() else None

  def write(self, name: str, obj) -> None:
    p = self.out / name
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(p)

  def timed(self, phase: str, seconds: float) -> None:
    self.timings[phase] = seconds
    self.write("timings.json", self.timings)


def make_config(args, run: Run):
  """configs/longctx.yaml with the experiment's corpus and sizes (then the CLI overrides)."""
  from effjax.config import load_config
  n_docs = args.steps * args.batch + args.valid_docs
  base = load_config(args.config)
  warmup = args.warmup if args.warmup is not None else min(base.optim.warmup_steps, args.steps // 10)
  ovs = [f"data.source={run.out / 'data' / 'train.jsonl'}", f"data.seq_len={args.seq}",
         "data.packing=pad", f"data.valid_fraction={args.valid_docs / n_docs!r}",
         "data.ordering=shuffle", f"data.seed={args.seed}",
         f"model.max_seq_len={args.seq}",
         f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.seed={args.seed}",
         f"train.out_dir={run.out / 'train'}", "train.progress=false",
         f"train.checkpoint_every={max(1, args.steps // 4)}", "train.keep_checkpoints=2",
         f"train.eval_every={args.steps}", f"optim.warmup_steps={warmup}"]
  if args.lr is not None:
    ovs.append(f"optim.lr={args.lr!r}")
  if args.smoke:
    ovs += SMOKE_MODEL
  return load_config(args.config, ovs + list(args.overrides))


# ----------------------------------------------------------------------------------------------
# phases


def phase_data(args, run: Run) -> dict:
  import corpus
  want = {"corpus": args.corpus, "seq": args.seq, "docs": args.steps * args.batch + args.valid_docs,
          "passkey_frac": args.passkey_frac, "copy_frac": args.copy_frac,
          "synthetic_filler_frac": args.synthetic_filler_frac,
          "heldout_frac": args.heldout_frac, "seed": args.seed}
  meta = run.read("data/meta.json")
  if meta is not None and meta.get("request") == want:
    run.log(f"data: reusing {run.out / 'data'} ({meta['docs']} documents, sha256 {meta['sha256'][:12]})")
    return meta
  if meta is not None:
    raise SystemExit(f"error: {run.out / 'data'} was made with other settings ({meta.get('request')}); "
                     f"pass --force data (retrains everything) or use another --out")
  t0 = time.perf_counter()
  docs = corpus.read_documents(args.corpus)
  train_text, heldout_text = corpus.split_text(docs, args.heldout_frac, args.seed)
  (run.out / "data").mkdir(parents=True, exist_ok=True)
  (run.out / "data" / "heldout.txt").write_text(heldout_text)
  meta = corpus.write_corpus(run.out / "data", train_text, seq_len=args.seq, n_docs=want["docs"],
                             passkey_fraction=args.passkey_frac, copy_fraction=args.copy_frac,
                             synthetic_filler_fraction=args.synthetic_filler_frac, seed=args.seed)
  meta.update(request=want, source_documents=len(docs), heldout_chars=len(heldout_text))
  run.write("data/meta.json", meta)
  run.timed("data", time.perf_counter() - t0)
  run.log(f"data: {meta['docs']} documents of {args.seq - 1} bytes ({meta['passkey_docs']} passkey, "
          f"{meta['synthetic_filler_docs']} of them with the repetitive filler; {meta['copy_docs']} "
          f"copy documents) from "
          f"{len(docs)} source documents; {len(heldout_text)} held-out characters; "
          f"{run.timings['data']:.1f} s")
  return meta


def _metrics(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


class _Progress(threading.Thread):
  """Logs the latest metrics.jsonl record every `every` seconds while training runs."""

  def __init__(self, run: Run, path: pathlib.Path, total: int, tokens_per_step: int, every: float):
    super().__init__(daemon=True)
    self.r, self.path, self.total, self.tps, self.every = run, path, total, tokens_per_step, every
    self.stop = threading.Event()

  def run(self):
    last = None
    while not self.stop.wait(self.every):
      rows = [r for r in _metrics(self.path) if "loss" in r]
      if rows and rows[-1]["step"] != last:
        r = rows[-1]
        last = r["step"]
        eta = (self.total - r["step"]) * self.tps / max(r["tokens_per_s"], 1.0)
        self.r.log(f"train: step {r['step']}/{self.total} loss {r['loss']:.3f} "
                   f"{r['tokens_per_s']:,.0f} tokens/s, {eta:.0f} s to step {self.total}")


def _step_rate(metrics_path: pathlib.Path, tokens_per_step: int) -> tuple[float, float]:
  """(seconds per step, start-up seconds) from a run's metrics.jsonl: the first logged interval of
  a process holds the compile, the median of the others is the step time."""
  rows = [r for r in _metrics(metrics_path) if "tokens_per_s" in r]
  if not rows:
    return 0.0, 0.0
  sec = tokens_per_step / float(np.median([r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]))
  first = rows[0]["step"] * tokens_per_step / rows[0]["tokens_per_s"]
  return sec, max(0.0, first - rows[0]["step"] * sec)


def _with_steps(cfg, steps: int, out_dir: str | None = None, warmup_fixed: bool = False):
  """cfg with another train.steps (and the schedule, checkpoint and eval intervals that follow)."""
  import dataclasses as dc
  warmup = cfg.optim.warmup_steps if warmup_fixed else min(cfg.optim.warmup_steps, steps // 10)
  return dc.replace(
      cfg, optim=dc.replace(cfg.optim, warmup_steps=min(warmup, steps - 1)),
      train=dc.replace(cfg.train, steps=steps, checkpoint_every=max(1, steps // 4), eval_every=steps,
                       out_dir=out_dir or cfg.train.out_dir))


def _auto_steps(args, cfg, run: Run, t0: float, log) -> int:
  """--auto-steps: a throwaway run of --calib-steps measures the step and compile time, then the
  step count that fills --train-seconds (a full cosine schedule, at most --steps)."""
  from effjax.trainer import train
  calib_dir = run.out / "calib"
  shutil.rmtree(calib_dir, ignore_errors=True)
  ccfg = _with_steps(cfg, args.calib_steps, out_dir=str(calib_dir))
  # no checkpoints inside the timed steps: at steps // 4 a 30-step run saved every 7 steps, and the
  # saves made the H100 calibration read 199 ms/step where training ran at 49 ms/step
  import dataclasses as dc
  ccfg = dc.replace(ccfg, train=dc.replace(ccfg.train, checkpoint_every=args.calib_steps))
  train(ccfg, log=log)
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  sec, startup = _step_rate(calib_dir / "metrics.jsonl", tokens_per_step)
  shutil.rmtree(calib_dir, ignore_errors=True)
  # the real run compiles again (another schedule) and ends with a save and the valid eval
  left = args.train_seconds - (time.perf_counter() - t0) - startup - 10.0
  steps = int(min(cfg.train.steps, max(args.calib_steps, left / sec if sec > 0 else cfg.train.steps)))
  run.log(f"train: calibration {tokens_per_step / sec:,.0f} tokens/s = {sec * 1e3:.0f} ms/step, "
          f"{startup:.0f} s start-up; {left:.0f} s left -> {steps} steps (at most {cfg.train.steps})")
  return steps


def phase_train(args, cfg, run: Run) -> dict:
  import yaml
  from effjax.checkpoint import Checkpointer
  from effjax.config import to_dict
  from effjax.trainer import plot_metrics, train
  want = {"steps": cfg.train.steps, "batch": cfg.train.batch_size, "seq": cfg.data.seq_len,
          "model": to_dict(cfg.model), "optim": to_dict(cfg.optim), "auto_steps": args.auto_steps}
  done = run.read("train/train_done.json")
  if done is not None:
    if done.get("request") != want:
      raise SystemExit(f"error: {run.out / 'train'} holds a run with other settings; pass --force train "
                       "(then gate and eval are redone too) or use another --out")
    run.log(f"train: done earlier ({done['steps_done']} steps), skipping")
    return done
  t0 = time.perf_counter()
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  metrics_path = pathlib.Path(cfg.train.out_dir) / "metrics.jsonl"
  ck = Checkpointer(cfg.train.out_dir)
  start = ck.latest_verified(log=lambda m: run.log(f"train: {m}"))[0] or 0
  ck.close()
  log = lambda m: run.log(f"train: {m}")
  run.log(f"train: {cfg.model.num_params() / 1e6:.2f}M params, batch {cfg.train.batch_size} x "
          f"{cfg.data.seq_len} tokens, " + (f"steps fitted to {args.train_seconds:.0f} s (at most "
                                            f"{cfg.train.steps})" if args.auto_steps else
                                            f"{cfg.train.steps} steps") +
          (f", resuming at step {start}" if start else "")
          + (f", capped at {args.train_seconds:.0f} s" if args.train_seconds and not args.auto_steps else ""))
  if args.auto_steps:
    if start:  # resume the interrupted run with the step count it was started with
      saved = yaml.safe_load((pathlib.Path(cfg.train.out_dir) / "config.yaml").read_text())
      steps = int(saved["train"]["steps"])
    else:
      steps = _auto_steps(args, cfg, run, t0, log)
    cfg = _with_steps(cfg, steps, warmup_fixed=args.warmup is not None)
  steps = cfg.train.steps
  progress = _Progress(run, metrics_path, steps, tokens_per_step, every=30.0)
  progress.start()
  try:
    if args.train_seconds is None or args.auto_steps or start >= steps:
      summary = train(cfg, log=log)
    else:
      summary = {"step": start}
      if start < args.calib_steps or not metrics_path.exists():  # else: time the earlier steps
        summary = train(cfg, stop_at_step=min(steps, max(start, args.calib_steps)), log=log)
      sec, _ = _step_rate(metrics_path, tokens_per_step)
      # the second train() call's set-up (unigram entropy, init, restore) and final save + eval
      left = args.train_seconds - (time.perf_counter() - t0) - 15.0
      fit = int(left / sec) if sec > 0 else steps
      target = min(steps, summary["step"] + max(0, fit))
      run.log(f"train: {sec * 1e3:.0f} ms/step; {left:.0f} s left -> training to step {target} of {steps}")
      if target > summary["step"]:
        summary = train(cfg, stop_at_step=target, log=log)
  finally:
    progress.stop.set()
  if args.resume_later and summary["step"] < steps:
    run.log(f"train: paused at step {summary['step']} of {steps} after {time.perf_counter() - t0:.0f} s "
            "(--resume-later): run the same command again to continue")
    return None
  rows = _metrics(metrics_path)
  loss_rows = [r for r in rows if "loss" in r]
  tps = [r["tokens_per_s"] for r in loss_rows[1:]] or [r["tokens_per_s"] for r in loss_rows]
  valid = [r for r in rows if "valid_loss" in r]
  plot_metrics(metrics_path, pathlib.Path(cfg.train.out_dir) / "loss.png",
               title=f"{cfg.name}: {cfg.model.num_params() / 1e6:.2f}M params")
  done = {"request": want, "steps_done": summary["step"], "steps_planned": steps,
          "truncated": summary["step"] < steps, "seconds": time.perf_counter() - t0,
          "tokens": summary["step"] * tokens_per_step,
          "tokens_per_s": float(np.median(tps)) if tps else None,
          "final_loss": loss_rows[-1]["loss"] if loss_rows else None,
          "valid_loss": valid[-1]["valid_loss"] if valid else None,
          "curve": [(r["step"], r["loss"]) for r in loss_rows]}
  run.write("train/train_done.json", done)
  run.timed("train", done["seconds"])
  run.log(f"train: {done['steps_done']} steps in {done['seconds']:.0f} s, final loss "
          f"{done['final_loss']:.3f}" + (", STOPPED EARLY by --train-seconds" if done["truncated"] else ""))
  return done


def gate_request(args, run: Run) -> dict:
  """What a gate is made from: its settings and the model it distils (the training run's end)."""
  train = run.read("train/train_done.json") or {}
  return {"steps": args.gate_steps, "batch": args.gate_batch, "queries": args.gate_queries,
          "seqs": args.gate_seqs, "lr": args.gate_lr, "block_size": args.block_size,
          "d_gate": args.d_gate, "seed": args.seed, "model_step": train.get("steps_done"),
          "model_loss": train.get("final_loss")}


def phase_gate(args, cfg, run: Run) -> dict:
  import corpus
  from effjax.evaluation import load_params
  from effjax.sparse import gate as gate_lib
  from effjax.sparse.gate_training import train_gate
  want = gate_request(args, run)
  done = run.read("gate.json")
  if done is not None and (run.out / "gate.npz").exists():
    if done.get("request") == want:
      run.log(f"gate: done earlier (KL {done['first_kl']:.4f} -> {done['last_kl']:.4f}), skipping")
      return done
    run.log("gate: settings or model changed, distilling again")
  t0 = time.perf_counter()
  params, step = load_params(cfg, cfg.train.out_dir)
  tokens = corpus.read_corpus_tokens(run.out / "data" / "train.jsonl", args.gate_seqs, cfg.data.seq_len)
  gcfg = gate_lib.GateConfig(block_size=args.block_size, d_gate=args.d_gate)
  run.log(f"gate: distilling {args.gate_steps} steps (batch {args.gate_batch} x {args.gate_queries} "
          f"queries, {len(tokens)} sequences of {tokens.shape[1]}) from the step-{step} model")
  gp, losses = train_gate(cfg.model, gcfg, params, tokens, steps=args.gate_steps,
                          batch_size=args.gate_batch, queries=args.gate_queries, lr=args.gate_lr,
                          seed=args.seed, log=lambda m: run.log(f"gate: {m}"))
  np.savez(run.out / "gate.npz", **{k: np.asarray(v) for k, v in gp.items()})
  k = max(1, min(10, len(losses) // 4))
  done = {"request": want, "steps": args.gate_steps, "block_size": args.block_size, "d_gate": args.d_gate,
          "first_kl": float(np.mean(losses[:k])), "last_kl": float(np.mean(losses[-k:])),
          "kl_curve": [float(x) for x in losses], "seconds": time.perf_counter() - t0,
          "model_step": int(step)}
  run.write("gate.json", done)
  run.timed("gate", done["seconds"])
  run.log(f"gate: KL {done['first_kl']:.4f} -> {done['last_kl']:.4f} in {done['seconds']:.0f} s")
  return done


def make_selectors(args, gp) -> dict:
  """The sparse rows: name -> (selector kind, gate params or None[, further SparseConfig
  fields]) (`evals.drift`, `evaluation.passkey_accuracy`); gp None leaves out the gate rows."""
  selectors = {"quest": ("quest", None), "gate": ("gate", gp)}
  for dt in args.gate_variants:  # the same gate, its K-compression cache stored in another dtype
    selectors[GATE_VARIANTS[dt]] = ("gate", gp, {"gate_cache_dtype": dt})
  for n in args.local_tokens:    # a local window across the block boundary
    selectors[f"quest-l{n}"] = ("quest", None, {"local_tokens": n})
    selectors[f"gate-l{n}"] = ("gate", gp, {"local_tokens": n})
  assert list(selectors) == selector_names(args)
  return {k: v for k, v in selectors.items() if v[0] == "quest" or gp is not None}


def kv_needs_gate(args) -> bool:
  return bool(args.kv_caches) and any(s.startswith("gate") for s in args.kv_selectors)


def phase_eval(args, cfg, run: Run, on_partial=None) -> dict:
  """The evaluations, each saved to eval_partial.json when done (and passed to on_partial, which
  writes the report so far: a call killed mid-eval still leaves the finished tables)."""
  import corpus
  import evals
  import jax.numpy as jnp
  from effjax.data import ByteTokenizer
  from effjax.evaluation import load_params, retrieval_eval
  want = {k: getattr(args, k) for k in ("block_size", "budgets", "retrieval_n", "context", "drift_n",
                                         "new_tokens", "rectify", "sparsity", "recall_n", "seed",
                                         "skip_synthetic", "decode_impl", "gate_variants",
                                         "rectify_cache_only", "local_tokens")}
  want["gate"] = gate_request(args, run)
  done = run.read("eval.json")
  if done is not None and done.get("request") == want:
    run.log("eval: done earlier, skipping")
    return done
  t_phase = time.perf_counter()
  res = run.read("eval_partial.json") or {}
  if res and res.get("request") != want:
    run.log("eval: settings or gate changed since the partial results, starting over")
    res = {}
  res["request"] = want
  params, step = load_params(cfg, cfg.train.out_dir)
  gp = {k: jnp.asarray(v) for k, v in np.load(run.out / "gate.npz").items()}
  heldout = (run.out / "data" / "heldout.txt").read_text()
  selectors = make_selectors(args, gp)
  bs, log = args.block_size, (lambda m: run.log(f"eval: {m}"))
  kw = dict(block_size=bs, decode_impl=args.decode_impl)
  res["model_step"] = int(step)
  real = corpus.real_passkey_prompts(args.retrieval_n, args.context, heldout, args.seed)

  def save(key, value, t0):
    value["seconds_total"] = time.perf_counter() - t0
    res[key] = value
    run.write("eval_partial.json", res)
    if on_partial is not None:
      on_partial(res)
    log(f"{key} done in {value['seconds_total']:.0f} s")

  if "retrieval_real" not in res:
    t0 = time.perf_counter()
    log(f"passkey retrieval, real-text haystacks: {args.retrieval_n} prompts of {args.context} tokens")
    r = evals.retrieval(cfg, params, *real, budgets=args.budgets, selectors=selectors, log=log, **kw)
    save("retrieval_real", {"n": args.retrieval_n, "context_tokens": args.context,
                            "budgets": args.budgets, "selectors": list(selectors), **r}, t0)
  if "retrieval_synthetic" not in res and not args.skip_synthetic:
    t0 = time.perf_counter()
    log("passkey retrieval, repetitive filler (evaluation.retrieval_eval)")
    acc = retrieval_eval(cfg, params, n=args.retrieval_n, context_tokens=args.context,
                         budgets=args.budgets, selectors=selectors, seed=args.seed, **kw)
    log("  " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    save("retrieval_synthetic", {"n": args.retrieval_n, "context_tokens": args.context,
                                 "budgets": args.budgets, "selectors": list(selectors),
                                 "accuracy": acc}, t0)
  prompt_len = args.seq - args.new_tokens
  total = prompt_len + args.new_tokens
  budget = drift_budget(args)
  text_prompts, text_true = corpus.text_prompts(args.drift_n, prompt_len, args.new_tokens, heldout, args.seed)
  if "drift" not in res:
    t0 = time.perf_counter()
    log(f"drift: {args.drift_n} prompts of {prompt_len} tokens + {args.new_tokens} greedy tokens, "
        f"budget {budget} tokens (sparsity {1 - budget / total:.1%} at the end)")
    d = evals.drift(cfg, params, text_prompts, text_true, budget=budget, rectify=args.rectify,
                    rectify_cache_only=args.rectify_cache_only, selectors=selectors, log=log, **kw)
    save("drift", {"prompts": args.drift_n, "prompt_len": prompt_len, "new_tokens": args.new_tokens,
                   "budget_tokens": budget, "sparsity_at_end": 1 - budget / total,
                   "sparsity_at_start": 1 - budget / prompt_len, "rectify": args.rectify,
                   "rectify_cache_only": args.rectify_cache_only, **d}, t0)
  if "recall" not in res and args.recall_n > 0:
    t0 = time.perf_counter()
    n = args.recall_n
    text = np.concatenate([text_prompts[:n], text_true[:n]], axis=1)
    T = text.shape[1]
    pos_text = np.linspace(T // 2, T - 1, 8).astype(int).tolist()
    tok = ByteTokenizer()
    keys = np.stack([tok.encode(k) for k in real[2][:n]])
    pk = np.concatenate([real[0][:n], keys], axis=1)
    # the queries that decode digits 2..5 (digit 1 comes from the dense prefill)
    pos_pk = list(range(args.context, args.context + 4))
    log(f"attention recall: {n} held-out sequences x {len(pos_text)} positions, {n} passkey answers")
    rc = {"budgets": args.budgets,
          "text": evals.recall(cfg.model, params, gp, text, pos_text, block_size=bs, budgets=args.budgets,
                               kc_stats=True),
          "passkey": evals.recall(cfg.model, params, gp, pk, pos_pk, block_size=bs, budgets=args.budgets)}
    for where in ("text", "passkey"):
      log(f"  recall {where}: " + "; ".join(
          f"{s} " + " ".join(f"{b}:{rc[where][s][str(b)]:.3f}" for b in args.budgets)
          for s in evals.RECALL_SELECTORS))
    save("recall", rc, t0)
  run.write("eval.json", res)
  run.timed("eval", time.perf_counter() - t_phase)
  return res


def kv_request(args, run: Run) -> dict:
  """What the kv phase's results are made from: its settings and the model (and gate) they
  evaluate."""
  train = run.read("train/train_done.json") or {}
  want = {k: getattr(args, k) for k in ("kv_caches", "kv_group", "kv_window", "kv_selectors",
                                         "kv_budgets", "kv_rectify", "block_size", "retrieval_n",
                                         "context", "drift_n", "new_tokens", "sparsity", "seed",
                                         "skip_synthetic", "decode_impl")}
  want["model"] = {"step": train.get("steps_done"), "loss": train.get("final_loss")}
  if kv_needs_gate(args):
    want["gate"] = gate_request(args, run)
  return want


def phase_kv(args, cfg, run: Run, on_partial=None) -> dict:
  """The low-bit KV cache evaluations (module docstring), each part saved to kv_partial.json when
  done (a re-run continues after the last finished part) and passed to on_partial."""
  import corpus
  import evals
  import jax.numpy as jnp
  from effjax.evaluation import load_params, passkey_prompts
  want = kv_request(args, run)
  done = run.read("kv.json")
  if done is not None and done.get("request") == want:
    run.log("kv: done earlier, skipping")
    return done
  t_phase = time.perf_counter()
  res = run.read("kv_partial.json") or {}
  if res and res.get("request") != want:
    run.log("kv: settings or model changed since the partial results, starting over")
    res = {}
  res["request"] = want
  params, step = load_params(cfg, cfg.train.out_dir)
  res["model_step"] = int(step)
  gp = None
  if kv_needs_gate(args):
    gp = {k: jnp.asarray(v) for k, v in np.load(run.out / "gate.npz").items()}
  selectors = {k: v for k, v in make_selectors(args, gp).items() if k in args.kv_selectors}
  specs = evals.kv_specs(args.kv_caches, group=args.kv_group, window=args.kv_window)
  # drift and retrieval over bf16 (the reference) and each low-bit cache with K per channel
  # (the bf16 spec, not None, so the dense teacher-forced runs reuse kv_quality's compiled programs)
  caches = {"bf16": specs["bf16"], **{k: specs[f"{k} K per channel"] for k in args.kv_caches}}
  res["specs"] = {name: {"kind": s.kind, "group": s.group if s.bits else None,
                         "window": (s.window or layout_window(s)) if s.bits else None,
                         "k_mode": s.k_mode if s.bits else None} for name, s in specs.items()}
  heldout = (run.out / "data" / "heldout.txt").read_text()
  bs, log = args.block_size, (lambda m: run.log(f"kv: {m}"))
  kw = dict(block_size=bs, decode_impl=args.decode_impl)
  prompt_len = args.seq - args.new_tokens
  text_prompts, text_true = corpus.text_prompts(args.drift_n, prompt_len, args.new_tokens, heldout,
                                                args.seed)

  def save(key, value, t0):   # parts done cache by cache add up their seconds
    value["seconds_total"] = value.get("seconds_total", 0.0) + time.perf_counter() - t0
    res[key] = value
    run.write("kv_partial.json", res)
    if on_partial is not None:
      on_partial(res)
    log(f"{key} done in {value['seconds_total']:.0f} s")

  if "quality" not in res:
    t0 = time.perf_counter()
    log(f"perplexity through the caches: {args.drift_n} held-out prompts of {prompt_len} tokens + "
        f"{args.new_tokens} true tokens, teacher-forced; " + ", ".join(specs))
    q = evals.kv_quality(cfg, params, text_prompts, text_true, specs, decode_impl=args.decode_impl)
    for name, r in q["rows"].items():
      se = r["ppl_increase_se"]
      log(f"  {name}: NLL {r['nll']:.4f}, ppl {r['ppl']:.4f} ({100 * r['ppl_increase']:+.2f}%"
          + (f" +- {100 * se:.2f}%" if se is not None else "") + f"), greedy as bf16 "
          f"{r['agreement_with_reference']:.3f}")
    save("quality", {"prompts": args.drift_n, "prompt_len": prompt_len, "new_tokens": args.new_tokens,
                     **q}, t0)
  budget = drift_budget(args)
  total = prompt_len + args.new_tokens
  d = res.get("drift") or {"prompts": args.drift_n, "prompt_len": prompt_len,
                           "new_tokens": args.new_tokens, "budget_tokens": budget,
                           "sparsity_at_end": 1 - budget / total, "rectify": args.kv_rectify,
                           "selectors": list(selectors), "by_cache": {}}
  ref_path = run.out / "kv_drift_reference.npy"   # the bf16 dense continuation, for a resumed call
  reference = np.load(ref_path) if "bf16" in d["by_cache"] and ref_path.exists() else None
  if reference is None:
    d["by_cache"] = {}
  for name, spec in caches.items():
    if name in d["by_cache"]:
      continue
    t0 = time.perf_counter()
    log(f"drift over the {name} cache: {args.drift_n} prompts of {prompt_len} tokens + "
        f"{args.new_tokens} greedy tokens, dense and {', '.join(selectors)} at {budget} tokens")
    r, conts = evals.drift(cfg, params, text_prompts, text_true, budget=budget, rectify=args.kv_rectify,
                           selectors=selectors, log=log, kv_cache=spec, reference_BN=reference,
                           return_continuations=True, **kw)
    if name == "bf16":
      reference = conts["dense"]
      np.save(ref_path, reference)
      r["rows"] = {k: {**v, "agreement_with_reference": v["agreement_with_dense"],
                       "first_divergence_from_reference": v["first_divergence"]}
                   for k, v in r["rows"].items()}
    r["seconds_total"] = time.perf_counter() - t0
    d["by_cache"][name] = r
    save("drift", d, t0)
  for key, title in (("retrieval_real", "real-text haystacks"),
                     ("retrieval_synthetic", "repetitive filler")):
    if key == "retrieval_synthetic" and args.skip_synthetic:
      continue
    if key == "retrieval_real":
      prompts = corpus.real_passkey_prompts(args.retrieval_n, args.context, heldout, args.seed)
    else:   # evaluation.retrieval_eval's prompts
      prompts = passkey_prompts(args.retrieval_n, args.context, args.seed)
    r = res.get(key) or {"n": args.retrieval_n, "context_tokens": args.context,
                         "budgets": args.kv_budgets, "selectors": list(selectors), "by_cache": {}}
    for name, spec in caches.items():
      if name in r["by_cache"]:
        continue
      t0 = time.perf_counter()
      log(f"passkey retrieval over the {name} cache, {title}: {args.retrieval_n} prompts of "
          f"{args.context} tokens")
      r["by_cache"][name] = evals.retrieval(cfg, params, *prompts, budgets=args.kv_budgets,
                                            selectors=selectors, log=log, kv_cache=spec, **kw)
      save(key, r, t0)
  run.write("kv.json", res)
  run.timed("kv", time.perf_counter() - t_phase)
  return res


def layout_window(spec) -> int:
  """The residual window a low-bit spec gets when its window is None."""
  from pallas_kernels.lowbit_decode import layout
  return layout.default_window(spec.bits, spec.group)


def phase_report(args, cfg, run: Run, data: dict, train: dict | None, gate: dict | None,
                 ev: dict | None, quiet: bool = False, kv: dict | None = None) -> dict:
  import jax
  import report
  from effjax.config import to_dict
  m = cfg.model
  doc = {
      "experiment": "sparse_quality", "args": {k: v for k, v in vars(args).items()},
      "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "model": {"params": m.num_params(), "d_model": m.d_model, "n_layers": m.n_layers,
                "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "head_dim": m.hd,
                "compute_dtype": m.compute_dtype},
      "config": to_dict(cfg), "data": {k: v for k, v in data.items() if k != "request"},
      "train": train, "gate": gate, "eval": ev, "kv": kv, "timings_s": dict(run.timings),
  }
  run.write("results.json", doc)
  report.write_markdown(doc, run.out)
  files = ["results.json", "REPORT.md", "run.log"] + report.write_plots(doc, run.out)
  loss_png = pathlib.Path(cfg.train.out_dir) / "loss.png"
  if loss_png.exists():
    shutil.copy(loss_png, run.out / "loss.png")
    files.append("loss.png")
  if args.results_dir:
    dst = pathlib.Path(args.results_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
      shutil.copy(run.out / f, dst / f)
    metrics = pathlib.Path(cfg.train.out_dir) / "metrics.jsonl"
    if metrics.exists():
      shutil.copy(metrics, dst / "train_metrics.jsonl")
    if not quiet:
      run.log(f"report: copied {', '.join(files)} and train_metrics.jsonl to {dst}")
  if not quiet:
    run.log(f"report: {run.out / 'REPORT.md'}")
  return doc


def main(argv=None) -> int:
  args = parse_args(argv)
  run = Run(pathlib.Path(args.out))
  t_all = time.perf_counter()
  import jax
  if not args.no_jax_cache:
    jax.config.update("jax_compilation_cache_dir", str(run.out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from effjax.config import ConfigError
  try:
    cfg = make_config(args, run)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  phases = list(args.phases)
  if args.kv_only:   # the low-bit evaluations only: no eval phase, no gate unless a kv row needs it
    phases = [p for p in phases if p != "eval" and (p != "gate" or kv_needs_gate(args))]
  if not args.kv_caches:
    phases = [p for p in phases if p != "kv"]
  run.log(f"sparse_quality: {jax.devices()[0].device_kind} ({jax.default_backend()}), JAX "
          f"{jax.__version__}, out {run.out}, phases {' '.join(phases)}")
  force = set()
  for p in args.force:
    force |= set(PHASES[PHASES.index(p):])
  for p, files in (("data", ["data/meta.json"]), ("train", ["train/train_done.json"]),
                   ("gate", ["gate.json", "gate.npz"]), ("eval", ["eval.json", "eval_partial.json"]),
                   ("kv", ["kv.json", "kv_partial.json", "kv_drift_reference.npy"])):
    if p in force:
      for f in files:
        (run.out / f).unlink(missing_ok=True)
      if p == "train" and (run.out / "train").exists():
        shutil.rmtree(run.out / "train")
  data = phase_data(args, run) if "data" in phases else run.read("data/meta.json")
  train = phase_train(args, cfg, run) if "train" in phases else run.read("train/train_done.json")
  if train is None and "train" in phases:
    return 0  # paused by --resume-later
  gate = phase_gate(args, cfg, run) if "gate" in phases else run.read("gate.json")
  if "report" in phases and data is None:
    print("error: no data phase output to report on", file=sys.stderr)
    return 2
  for p, needs in (("eval", "gate.npz"), ("kv", "gate.npz" if kv_needs_gate(args) else None)):
    if p in phases and needs and not (run.out / needs).exists():
      print(f"error: the {p} phase needs {run.out / needs} (run the gate phase)", file=sys.stderr)
      return 2
  # the report is rewritten after every finished part of eval and kv (a killed call keeps its tables)
  ev, kv = run.read("eval.json"), run.read("kv.json")   # finished earlier (phases not run now)
  report_now = (lambda: phase_report(args, cfg, run, data, train, gate, ev, quiet=True, kv=kv)) \
      if "report" in phases else (lambda: None)
  if "eval" in phases:
    ev = None

    def on_eval(part):
      nonlocal ev
      ev = part
      report_now()
    ev = phase_eval(args, cfg, run, on_eval)
  if "kv" in phases:
    kv = None

    def on_kv(part):
      nonlocal kv
      kv = part
      report_now()
    kv = phase_kv(args, cfg, run, on_kv)
  if "report" in phases:
    phase_report(args, cfg, run, data, train, gate, ev, kv=kv)
  run.log(f"sparse_quality: finished in {time.perf_counter() - t_all:.0f} s "
          f"(phase seconds: {', '.join(f'{k} {v:.0f}' for k, v in run.timings.items())})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
