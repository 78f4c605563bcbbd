#!/usr/bin/env python3
"""Launch (or resume) a training run.

  python train.py --config configs/tiny.yaml [key.sub=value ...] [--overwrite]

Re-running the same command after an interruption resumes from the last checkpoint in
train.out_dir with the same data order.
"""

from __future__ import annotations

import argparse
import json
import sys

from effjax.checkpoint import CheckpointError
from effjax.config import ConfigError, load_config


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/tiny.yaml", help="YAML experiment config")
  ap.add_argument("--overwrite", action="store_true", help="start over: delete the run in train.out_dir (after every check passes)")
  ap.add_argument("--stop-at", type=int, default=None,
                  help="stop after this step (checkpointed), as if interrupted")
  ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
  args = ap.parse_intermixed_args(argv)  # options may follow the key=value overrides
  try:
    cfg = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from effjax.trainer import TrainingError, train  # after config validation: nothing heavy before it
  try:
    summary = train(cfg, overwrite=args.overwrite, stop_at_step=args.stop_at)
  except (CheckpointError, TrainingError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  if summary.get("valid_loss") is not None:
    print(f"final valid loss {summary['valid_loss']:.4f} nats/token vs unigram entropy "
          f"{summary['unigram_entropy']:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
