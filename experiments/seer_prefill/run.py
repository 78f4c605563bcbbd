#!/usr/bin/env python3
"""SeerAttention prefill on a trained model: distil the prefill AttnGate from the frozen model,
then the perplexity at densities 1.0 / 0.5 / 0.2 / 0.1 for the learned gate, the oracle (true
top-k of the block-level attention) and the static pattern (sink + local window), in the layout
of SeerAttention's PG19 table.

  python experiments/seer_prefill/run.py --run RUN_DIR --out DIR [--gate-steps N] [--seq T]
      [--eval-source PATH ...] [--densities 1.0,0.5,0.2,0.1] [--block-size 64]

RUN_DIR is any training run (config.yaml + checkpoints), e.g. the long-context model of
experiments/sparse_quality (`<its --out>/train`). The gate trains on the run's train split and is
evaluated on its valid split plus every --eval-source (a .txt with one document per line, or a
.jsonl; each reported separately), on full windows of --seq tokens (default: the run's
data.seq_len). Phases resume: <out>/gate.npz is reused when its settings match, and
<out>/results.json keeps each evaluated set; <out>/REPORT.md is rewritten after each set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def check_sources(ap, args) -> None:
  """--run holds a config.yaml and every --eval-source is a .txt / .jsonl file, or ap.error."""
  run = pathlib.Path(args.run)
  if not (run / "config.yaml").is_file():
    ap.error(f"--run {run}: no config.yaml (is it a training run directory?)")
  for p in args.eval_source:
    path = pathlib.Path(p)
    if not path.is_file():
      ap.error(f"--eval-source {p}: no such file")
    if path.suffix not in (".txt", ".jsonl"):
      ap.error(f"--eval-source {p}: want a .txt (one document per line) or .jsonl file")


def open_log(out: pathlib.Path):
  """A log function printing timestamped lines and appending them to <out>/run.log."""
  log_f = (out / "run.log").open("a")

  def log(msg):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    log_f.write(line + "\n")
    log_f.flush()
  return log


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", required=True, help="training run directory (config.yaml + checkpoints)")
  ap.add_argument("--out", required=True, help="results directory")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--d-gate", type=int, default=64)
  ap.add_argument("--gate-steps", type=int, default=500)
  ap.add_argument("--gate-batch", type=int, default=4)
  ap.add_argument("--gate-lr", type=float, default=3e-3)
  ap.add_argument("--gate-seqs", type=int, default=512, help="training windows the gate samples")
  ap.add_argument("--seq", type=int, default=None, help="tokens per evaluated window")
  ap.add_argument("--n-eval", type=int, default=32, help="windows per evaluated set")
  ap.add_argument("--eval-batch", type=int, default=2)
  ap.add_argument("--densities", default="1.0,0.5,0.2,0.1")
  ap.add_argument("--selectors", default="gate,oracle,static,gate+local,recency+local",
                  help="comma-separated: gate, oracle, static, oracle_mass (top-k by attention "
                       "mass: the full map), recency (the nearest blocks, each row's budget as "
                       "the gate's), gate+local, oracle+local, oracle_mass+local, recency+local "
                       "(+local: the first --sink-blocks and the --local-blocks ending at the "
                       "diagonal always kept, the scores filling the rest of the row's budget)")
  ap.add_argument("--local-blocks", type=int, default=2)
  ap.add_argument("--sink-blocks", type=int, default=1)
  ap.add_argument("--dense-rows", type=int, default=0)
  ap.add_argument("--eval-source", action="append", default=[], metavar="PATH",
                  help="an extra held-out set (.txt one document per line, or .jsonl); repeatable")
  ap.add_argument("--eval-packing", choices=("pack", "pad"), default="pack",
                  help="how --eval-source documents fill the windows: pack (concatenated, so short "
                       "documents count) or pad (one document per window, as the run's own data)")
  ap.add_argument("--repeat-eval", action="store_true",
                  help="also evaluate every set as repeated text: each window's first half twice, "
                       "scored on the second copy only (retrieval: the answer is half a window "
                       "back, which a local pattern cannot see)")
  ap.add_argument("--implementation", default=None, help="block-sparse attention backend")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  check_sources(ap, args)
  try:
    args.density_list = [float(x) for x in args.densities.split(",") if x]
  except ValueError:
    ap.error(f"--densities {args.densities!r}: want comma-separated numbers in (0, 1]")
  if not args.density_list or any(not 0 < d <= 1 for d in args.density_list):
    ap.error(f"--densities {args.densities!r}: want comma-separated numbers in (0, 1]")
  args.selector_list = [s for s in args.selectors.split(",") if s]
  from effjax.sparse.prefill_sparse import NAMES as known
  bad = [s for s in args.selector_list if s not in known]
  if bad or not args.selector_list:
    ap.error(f"--selectors: choose from {', '.join(known)}; got {args.selectors!r}")
  if args.local_blocks < 1 or args.sink_blocks < 0:
    ap.error("--local-blocks must be >= 1 and --sink-blocks >= 0")
  for name in ("block_size", "gate_batch", "gate_seqs", "n_eval", "eval_batch", "d_gate"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.gate_steps < 0 or args.dense_rows < 0:
    ap.error("--gate-steps and --dense-rows must be >= 0")
  return args


def repeat_halves(tokens_NT):
  """Each window's first half, twice: [N, T] -> [N, 2 (T // 2)]. The second copy's tokens are
  predictable exactly from T // 2 positions back."""
  import numpy as np
  half = tokens_NT[:, :tokens_NT.shape[1] // 2]
  return np.concatenate([half, half], axis=1)


def table(results: dict, densities, selectors) -> str:
  """Markdown, one table per evaluated set: a row per selector (dense first), a column per
  density (SeerAttention's PG19 table has methods as rows and sparsity settings as columns)."""
  parts = []
  for name, r in results.items():
    head = ["selector"] + [f"density {d:g}" for d in densities]
    lines = [f"**{name}** (dense perplexity {r['dense']['ppl']:.3f})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in selectors:
      cells = [s]
      for d in densities:
        x = r.get(f"{s}@{d}")
        cells.append("" if x is None else f"{x['ppl']:.3f} ({100 * x['ppl_increase']:+.1f}%, "
                                          f"d {x['density']:.2f})")
      lines.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def plot(results: dict, densities, selectors, path: pathlib.Path) -> bool:
  """Perplexity increase over dense against density, a line per selector, a panel per set
  (log-spaced densities); False if matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  sets = list(results)
  fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), squeeze=False)
  for ax, name in zip(axes[0], sets):
    r = results[name]
    for sel in selectors:
      pts = [(r[f"{sel}@{d}"]["density"], 100 * r[f"{sel}@{d}"]["ppl_increase"])
             for d in densities if f"{sel}@{d}" in r]
      if pts:
        ax.plot(*zip(*sorted(pts)), marker="o", label=sel)
    ax.set_xscale("log")
    ax.set_xlabel("measured density")
    ax.set_title(name)
    ax.axhline(0, color="gray", lw=0.5)
  axes[0][0].set_ylabel("perplexity increase over dense (%)")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from effjax import evaluation
  from effjax.checkpoint import atomic_write_text
  from effjax.config import load_config
  from effjax.sparse import prefill_sparse as ps
  from effjax.sparse.gate import GateConfig
  from effjax.sparse.prefill_gate_training import train_prefill_gate

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = open_log(out)

  cfg = load_config(pathlib.Path(args.run) / "config.yaml")
  mcfg = cfg.model
  seq = args.seq or cfg.data.seq_len
  params, step = evaluation.load_params(cfg, args.run, args.step)
  log(f"model {args.run} step {step}: {mcfg.num_params() / 1e6:.1f}M params, eval windows of "
      f"{seq} tokens, blocks of {args.block_size}")
  gcfg = GateConfig(block_size=args.block_size, d_gate=args.d_gate)

  # gate: distilled once per (run, step, settings); reused when they match
  gate_meta = {"run": str(args.run), "step": step, "block_size": args.block_size,
               "d_gate": args.d_gate, "steps": args.gate_steps, "batch": args.gate_batch,
               "lr": args.gate_lr, "seqs": args.gate_seqs, "seq": seq, "seed": args.seed}
  gate_path, meta_path = out / "gate.npz", out / "gate.json"
  gate = None
  if any(s.startswith("gate") for s in args.selector_list):
    if (gate_path.exists() and meta_path.exists()
        and json.loads(meta_path.read_text()).get("settings") == gate_meta):
      gate = {k: jnp.asarray(v) for k, v in np.load(gate_path).items()}
      log(f"gate: reusing {gate_path}")
    else:
      train = evaluation.full_windows(evaluation.split_examples(cfg, "train"), seq,
                                      args.gate_seqs)
      t0 = time.time()
      gate, losses = train_prefill_gate(mcfg, gcfg, params, train, steps=args.gate_steps,
                                        batch_size=args.gate_batch, lr=args.gate_lr,
                                        seed=args.seed, log=log)
      np.savez(gate_path, **{k: np.asarray(v) for k, v in gate.items()})
      atomic_write_text(meta_path, json.dumps({"settings": gate_meta, "first_kl": losses[0],
                                               "last_kl": losses[-1], "seconds": time.time() - t0},
                                              indent=2))
      log(f"gate: KL {losses[0]:.4f} -> {losses[-1]:.4f} in {time.time() - t0:.0f} s")

  res_path = out / "results.json"
  saved = json.loads(res_path.read_text()) if res_path.exists() else {}
  settings = {**gate_meta, "n_eval": args.n_eval, "densities": args.density_list,
              "selectors": args.selector_list, "dense_rows": args.dense_rows,
              "eval_packing": args.eval_packing, "local_blocks": args.local_blocks,
              "sink_blocks": args.sink_blocks}
  results = saved.get("results", {}) if saved.get("settings") == settings else {}
  sets = [("valid", "valid")] + [(pathlib.Path(p).name, p) for p in args.eval_source]
  for name, src in sets:
    if name in results and (not args.repeat_eval or f"{name} repeated" in results):
      log(f"{name}: done earlier")
      continue
    scfg = cfg if src == "valid" else dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, packing=args.eval_packing))
    toks = evaluation.full_windows(evaluation.split_examples(scfg, src), seq, args.n_eval)
    variants = [(name, toks, 0)]
    if args.repeat_eval:
      half = seq // 2
      variants.append((f"{name} repeated", repeat_halves(toks), half))
    for vname, vtoks, score_from in variants:
      if vname in results:
        continue
      log(f"{vname}: {len(vtoks)} windows" + (f", scored from token {score_from}"
                                              if score_from else ""))
      results[vname] = ps.evaluate_densities(
          mcfg, params, vtoks, densities=args.density_list, selectors=args.selector_list,
          block_size=args.block_size, dense_rows=args.dense_rows, gate_params=gate,
          batch_size=args.eval_batch, implementation=args.implementation,
          local_blocks=args.local_blocks, sink_blocks=args.sink_blocks, score_from=score_from,
          log=log)
    atomic_write_text(res_path, json.dumps({"settings": settings, "results": results}, indent=2))
    cmd = "python3 experiments/seer_prefill/run.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
    report = (f"# SeerAttention prefill: perplexity by density\n\nModel: `{args.run}` step {step} "
              f"({mcfg.num_params() / 1e6:.1f}M parameters), {seq}-token windows, blocks of "
              f"{args.block_size}, {jax.devices()[0].device_kind}, "
              f"{time.strftime('%Y-%m-%d')}.\n\nCommand: `{cmd}`\n\n"
              f"Perplexity (increase over dense, measured density over the causal triangle):\n\n"
              + table(results, args.density_list, args.selector_list) + "\n")
    if plot(results, args.density_list, args.selector_list, out / "density.png"):
      report += "\n![perplexity increase by density](density.png)\n"
    atomic_write_text(out / "REPORT.md", report)
  log(f"wrote {res_path} and {out / 'REPORT.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
