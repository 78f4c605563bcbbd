#!/usr/bin/env python3
"""Evaluate a training run's checkpoint: loss / perplexity / bits-per-byte on named splits, and
text samples.

  python eval.py --config configs/tiny.yaml [--step N] [--out FILE] [eval.splits=[valid,path.txt] ...]

The run directory is the config's train.out_dir (or --run DIR, whose saved config.yaml is used).
Splits: 'valid' (held-out part of data.source), 'train', or paths to local .txt / .jsonl files.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from effjax.checkpoint import CheckpointError
from effjax.config import ConfigError, load_config


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=None, help="YAML config of the run (default: --run's config.yaml)")
  ap.add_argument("--run", default=None, help="run directory (default: the config's train.out_dir)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--out", default=None, help="output JSON (default: <run>/eval.json)")
  ap.add_argument("--seed", type=int, default=0, help="sampling seed")
  ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides (e.g. eval.*)")
  args = ap.parse_args(argv)
  try:
    if args.config is None and args.run is None:
      args.config = "configs/tiny.yaml"
    if args.config is None:
      cfg_path = pathlib.Path(args.run) / "config.yaml"
      if not cfg_path.exists():
        raise CheckpointError(f"{args.run} has no config.yaml: is it a training run directory?")
    else:
      cfg_path = args.config
    cfg = load_config(cfg_path, args.overrides)
  except (ConfigError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  run = pathlib.Path(args.run or cfg.train.out_dir)

  from effjax import evaluation
  try:
    params, step = evaluation.load_params(cfg, run, args.step)
    results = evaluation.evaluate_splits(cfg, params)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, r in results.items():
    print(f"{name:>24}: loss {r['loss']:.4f} nats/token | ppl {r['ppl']:.3f} | "
          f"{r['bpb']:.4f} bits/byte | {int(r['tokens'])} tokens")
  samples = []
  if cfg.eval.num_samples:
    samples = evaluation.sample(cfg, params, cfg.eval.prompt, cfg.eval.num_samples,
                                cfg.eval.sample_len, cfg.eval.temperature, cfg.eval.top_k, args.seed)
    for i, s in enumerate(samples):
      print(f"--- sample {i} (temperature {cfg.eval.temperature}, top-k {cfg.eval.top_k}) ---\n{s}")
  out = pathlib.Path(args.out) if args.out else run / "eval.json"
  out.write_text(json.dumps({"run": str(run), "step": step, "splits": results, "samples": samples,
                             "sampling": {"prompt": cfg.eval.prompt, "temperature": cfg.eval.temperature,
                                          "top_k": cfg.eval.top_k, "seed": args.seed}}, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
