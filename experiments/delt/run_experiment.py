#!/usr/bin/env python3
"""DELT on real data: the same model, steps and data budget under six data organisations.

  python experiments/delt/run_experiment.py [--seeds 0 1 2] [--out DIR] [key.sub=value ...]

Pool: nltk-english-mix under the data root (data.root or $EFFJAX_DATA_ROOT; mixed quality).
Reference ("quality") set: the first half of WikiText-2 validation (wikitext-2/valid.txt there). Evaluation: the second half of WikiText-2 validation, and held-out pool
documents (data.valid_fraction). Conditions (configs/delt_lqs_folding.yaml as the base):

  conventional       shuffle every epoch (no scores)
  sorted             LQS, ascending
  folding_random     random scores, Folding (L=3)
  folding_lqs        LQS, Folding
  lqs_top50_folding  LQS, keep the top 50%, Folding
  pds_folding        PDS, Folding

The pool, its held-out documents and the scores are the same for every seed (scores are computed
once per method, LQS and PDS from one proxy trajectory, and cached); a seed varies the model init
and the shuffle; the random-score condition draws new scores per seed.
Writes <out>/results.json, <out>/REPORT.md and <out>/delt_experiment.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np

CONDITIONS = {
    "conventional": ["delt.scoring=none", "delt.selection=none", "delt.ordering=none",
                     "data.ordering=shuffle"],
    "sorted": ["delt.scoring=lqs", "delt.selection=none", "delt.ordering=sorted_asc"],
    "folding_random": ["delt.scoring=random", "delt.selection=none", "delt.ordering=folding"],
    "folding_lqs": ["delt.scoring=lqs", "delt.selection=none", "delt.ordering=folding"],
    "lqs_top50_folding": ["delt.scoring=lqs", "delt.selection=top_r", "delt.select_value=0.5",
                          "delt.ordering=folding"],
    "pds_folding": ["delt.scoring=pds", "delt.selection=none", "delt.ordering=folding"],
}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=str(ROOT / "configs/delt_lqs_folding.yaml"))
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS))
  ap.add_argument("--out", default=str(ROOT / "experiments/delt/results"))
  ap.add_argument("--eval-examples", type=int, default=2048)
  ap.add_argument("--merge", nargs="+", default=None,
                  help="only rebuild the table/report from these results_partial.json files "
                       "(runs split over several device calls)")
  ap.add_argument("--card", default=None, help="with --merge: the card the runs ran on")
  ap.add_argument("--jax-version", default=None, help="with --merge: the JAX version they ran with")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  if args.merge:
    return merge(args)

  import jax
  from effjax import sharding as shd
  from effjax.config import load_config
  from effjax.data import delt, eval_batches, load_splits
  from effjax.evaluation import load_params
  from effjax.trainer import train
  from effjax.training import evaluate_loss, make_eval_step

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  base = load_config(args.config, args.overrides)
  splits = load_splits(base.data)
  _, wiki_heldout = delt.reference_split(base)
  evals = {"wikitext_heldout": wiki_heldout, "pool_heldout": splits["valid"]}
  evals = {k: v.take(np.arange(min(len(v), args.eval_examples))) for k, v in evals.items()}
  print(f"pool {len(splits['train'])} train examples; eval sets: "
        + ", ".join(f"{k} {len(v)}" for k, v in evals.items()), flush=True)
  mesh = shd.make_mesh(1)
  eval_fn = jax.jit(make_eval_step(base.model))

  runs = []
  t_all = time.perf_counter()
  # seeds outermost: an interrupted experiment still has every condition for the seeds it finished
  for seed in args.seeds:
    for cond in args.conditions:
      ovs = args.overrides + CONDITIONS[cond] + [
          f"train.seed={seed}", f"data.shuffle_seed={seed}", "train.progress=false",
          f"train.out_dir={out}/runs/{cond}/seed{seed}"]
      if cond == "folding_random":
        ovs.append(f"delt.seed={seed}")
      cfg = load_config(args.config, ovs)
      t0 = time.perf_counter()
      s = train(cfg, overwrite=True, log=lambda m: print("   ", m, flush=True))
      params, _ = load_params(cfg, cfg.train.out_dir)
      res = {name: evaluate_loss(eval_fn, params, eval_batches(ex, 64), mesh)["loss"]
             for name, ex in evals.items()}
      metrics = [json.loads(l) for l in pathlib.Path(s["metrics"]).read_text().splitlines()]
      curve = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
      run = {"condition": cond, "seed": seed, "train_seconds": time.perf_counter() - t0,
             "final_train_loss": curve[-1][1], "curve": curve[::5], "kept": s["train_examples"]
             if not s["delt"] else s["delt"]["kept"], "delt": {k: v for k, v in s["delt"].items()
                                                             if k not in ("lam_norms",)}, **res}
      runs.append(run)
      (out / "results_partial.json").write_text(json.dumps(runs))
      print(f"{cond:>18} seed {seed}: wikitext {res['wikitext_heldout']:.4f}  pool "
            f"{res['pool_heldout']:.4f}  ({run['train_seconds']:.0f} s)", flush=True)

  doc = {
      "experiment": "delt", "config": args.config, "overrides": args.overrides,
      "seeds": args.seeds, "card": jax.devices()[0].device_kind, "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "total_seconds": time.perf_counter() - t_all, "steps": base.train.steps,
      "batch_size": base.train.batch_size, "seq_len": base.data.seq_len,
      "model_params": base.model.num_params(), "proxy_params": base.delt.proxy.num_params(),
      "eval_examples": {k: len(v) for k, v in evals.items()}, "table": make_table(runs), "runs": runs,
  }
  (out / "results.json").write_text(json.dumps(doc, indent=2))
  write_report(doc, out)
  print((out / "REPORT.md").read_text())


def make_table(runs: list[dict]) -> dict:
  table = {}
  for cond in [c for c in CONDITIONS if any(r["condition"] == c for r in runs)]:
    rs = [r for r in runs if r["condition"] == cond]
    table[cond] = {k: {"mean": float(np.mean([r[k] for r in rs])),
                       "std": float(np.std([r[k] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
                       "n": len(rs), "seeds": sorted(r["seed"] for r in rs)}
                   for k in ("wikitext_heldout", "pool_heldout")}
  return table


def merge(args) -> None:
  from effjax.config import load_config
  base = load_config(args.config, args.overrides)
  runs = [r for f in args.merge for r in json.loads(pathlib.Path(f).read_text())]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  doc = {
      "experiment": "delt", "config": args.config, "overrides": args.overrides,
      "seeds": sorted({r["seed"] for r in runs}), "card": args.card, "jax": args.jax_version,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "merged_from": [pathlib.Path(f).name for f in args.merge], "steps": base.train.steps,
      "batch_size": base.train.batch_size, "seq_len": base.data.seq_len,
      "model_params": base.model.num_params(), "proxy_params": base.delt.proxy.num_params(),
      "eval_examples": {"wikitext_heldout": args.eval_examples, "pool_heldout": args.eval_examples},
      "table": make_table(runs), "runs": runs,
  }
  (out / "results.json").write_text(json.dumps(doc, indent=2))
  write_report(doc, out)
  print((out / "REPORT.md").read_text())


def write_report(doc: dict, out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  table, conds = doc["table"], list(doc["table"])
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
  for ax, key, title in ((axes[0], "wikitext_heldout", "WikiText-2 held-out half"),
                         (axes[1], "pool_heldout", "held-out pool documents")):
    m = [table[c][key]["mean"] for c in conds]
    e = [table[c][key]["std"] for c in conds]
    ax.bar(range(len(conds)), m, yerr=e, capsize=4,
           color=["gray" if c == "conventional" else "C0" for c in conds])
    ax.set_xticks(range(len(conds)), conds, rotation=30, ha="right", fontsize=8)
    lo, hi = min(m) - 2 * max(e + [1e-3]), max(m) + 2 * max(e + [1e-3])
    ax.set_ylim(lo, hi)
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
  for c in conds:
    rs = [r for r in doc["runs"] if r["condition"] == c]
    steps = [s for s, _ in rs[0]["curve"]]
    mean = np.mean([[l for _, l in r["curve"]] for r in rs], axis=0)
    axes[2].plot(steps, mean, label=c, lw=1)
  axes[2].set_xlabel("step")
  axes[2].set_ylabel("train loss (mean over seeds)")
  axes[2].set_title("training curves")
  axes[2].legend(fontsize=7)
  axes[2].grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "delt_experiment.png")
  plt.close(fig)

  conv = table.get("conventional")
  lines = [
      "# DELT on real data: results",
      "",
      f"Card: {doc['card']} (JAX {doc['jax']}), {doc['date']}. Model {doc['model_params'] / 1e6:.1f}M "
      f"params, {doc['steps']} steps x batch {doc['batch_size']} x seq {doc['seq_len']} bytes "
      f"(identical steps and tokens for every condition); proxy {doc['proxy_params'] / 1e6:.1f}M "
      f"params. Seeds {doc['seeds']}. Held-out loss in nats per byte, mean +- std over seeds "
      f"(eval examples: {doc['eval_examples']}).",
      "",
      "| condition | seeds | WikiText-2 held-out | vs conventional | held-out pool | vs conventional |",
      "|---|---|---|---|---|---|",
  ]
  for c in table:
    w, p = table[c]["wikitext_heldout"], table[c]["pool_heldout"]
    dw = "" if conv is None else f"{w['mean'] - conv['wikitext_heldout']['mean']:+.4f}"
    dp = "" if conv is None else f"{p['mean'] - conv['pool_heldout']['mean']:+.4f}"
    lines.append(f"| {c} | {w.get('n', '')} | {w['mean']:.4f} +- {w['std']:.4f} | {dw} | {p['mean']:.4f} +- "
                 f"{p['std']:.4f} | {dp} |")
  lines += ["", "![results](delt_experiment.png)", ""]
  (out / "REPORT.md").write_text("\n".join(lines))


if __name__ == "__main__":
  main()
