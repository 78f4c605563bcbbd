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

from effjax.checkpoint import CheckpointError, atomic_write_text
from effjax.config import ConfigError, load_config
from effjax.sparse.gate import CACHE_DTYPES
from pallas_kernels.sparse_decode import IMPLEMENTATIONS as SPARSE_KERNELS


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=None, help="YAML config of the run (default: --run's config.yaml)")
  ap.add_argument("--run", default=None, help="run directory (default: the config's train.out_dir)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--out", default=None, help="output JSON (default: <run>/eval.json)")
  ap.add_argument("--seed", type=int, default=0, help="sampling seed")
  dg = ap.add_argument_group("decoding evaluations (KV cache, sparse decoding, ReSA)")
  dg.add_argument("--drift", type=int, default=0, metavar="N",
                  help="N prompts from the valid split: dense vs sparse vs sparse+rectification")
  dg.add_argument("--prompt-len", type=int, default=128)
  dg.add_argument("--new-tokens", type=int, default=96)
  dg.add_argument("--block-size", type=int, default=16)
  dg.add_argument("--budget", type=int, default=None,
                  help="sparse token budget (default: 10%% of prompt+new tokens, i.e. 90%% sparsity)")
  dg.add_argument("--rectify-every", type=int, default=16)
  dg.add_argument("--selector", choices=["quest", "gate"], default="quest")
  dg.add_argument("--gate", default=None, help="gate params .npz (from --train-gate)")
  dg.add_argument("--gate-cache-dtype", choices=list(CACHE_DTYPES), default="bfloat16",
                  help="the gate's K-compression cache storage (SparseConfig.gate_cache_dtype)")
  dg.add_argument("--local-tokens", type=int, default=1, metavar="N",
                  help="always keep the blocks holding the last N tokens (SparseConfig.local_tokens; "
                       "1: the current block only). A window of one block (N = block size) removed "
                       "Quest's excess NLL spike after block boundaries: recommended for Quest at "
                       "budgets of 8+ blocks (experiments/sparse_quality)")
  dg.add_argument("--train-gate", type=int, default=0, metavar="STEPS",
                  help="distil a decode gate for STEPS steps on the train split, save <run>/gate.npz")
  dg.add_argument("--kv-cache", choices=["bf16", "int4", "int2"], default=None,
                  help="the KV cache of the --drift / --retrieval decodings (int4 / int2: K per "
                       "channel in groups of --kv-group tokens, a --kv-window residual; default: "
                       "the config's decode.kv_cache)")
  dg.add_argument("--kv-quality", type=int, default=0, metavar="N",
                  help="N valid examples decoded teacher-forced through a bf16, int4 and int2 KV "
                       "cache (K per channel and per token): the perplexity each cache costs")
  dg.add_argument("--kv-group", type=int, default=None,
                  help="tokens per K scale of the low-bit caches (default: decode.kv_group)")
  dg.add_argument("--kv-window", type=int, default=None,
                  help="full-precision residual window of the low-bit caches (default: "
                       "decode.kv_window, else 128 at 4 bits, 256 at 2, at least the group)")
  dg.add_argument("--retrieval", type=int, default=0, metavar="N", help="N passkey prompts")
  dg.add_argument("--context", type=int, default=None, help="passkey context tokens")
  dg.add_argument("--budgets", type=int, nargs="+", default=None, help="retrieval token budgets")
  dg.add_argument("--decode-impl", default="auto", help="decode kernel implementation")
  dg.add_argument("--sparse-kernel", default="auto",
                  choices=list(SPARSE_KERNELS),
                  help="the block-sparse attention's kernel (SparseConfig.sparse_kernel; auto: "
                       "--decode-impl); pallas_mosaic_gpu: the Hopper TMA + wgmma kernel")
  pg = ap.add_argument_group("SeerAttention block-sparse prefill (perplexity by density)")
  pg.add_argument("--prefill-densities", default=None, metavar="D,D,...",
                  help="perplexity of full valid windows with block-sparse prefill attention at "
                       "these densities (e.g. 1.0,0.5,0.2,0.1), per --prefill-selectors")
  pg.add_argument("--prefill-selectors", default="gate+local,gate,oracle,static",
                  help="gate, gate+local (sink and local blocks kept), oracle, oracle+local, "
                       "oracle_mass (top-k by attention mass), oracle_mass+local, static, recency "
                       "(the nearest blocks at the gate's per-row budget), recency+local")
  pg.add_argument("--prefill-windows", type=int, default=8, help="valid windows evaluated")
  pg.add_argument("--prefill-block-size", type=int, default=64)
  pg.add_argument("--prefill-topk-impl", default=None,
                  help="the selectors' top-k: xla or pallas_triton (default: prefix_topk's)")
  pg.add_argument("--prefill-gate", default=None, help="prefill gate params .npz")
  pg.add_argument("--train-prefill-gate", type=int, default=0, metavar="STEPS",
                  help="distil a prefill gate for STEPS steps on the train split, save "
                       "<run>/prefill_gate.npz")
  ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides (e.g. eval.*)")
  args = ap.parse_intermixed_args(argv)  # options may follow the key=value overrides
  check_decoding_args(ap, args)
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
    cfg = apply_kv_args(cfg, args)
  except (ConfigError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  run = pathlib.Path(args.run or cfg.train.out_dir)

  from effjax import evaluation
  out = pathlib.Path(args.out) if args.out else run / "eval.json"
  try:
    if not out.parent.is_dir():
      raise FileNotFoundError(f"--out {out}: directory {out.parent} does not exist")
    params, step = evaluation.load_params(cfg, run, args.step)
    results = evaluation.evaluate_splits(cfg, params)
  except FloatingPointError as e:
    print(f"error: {e} (checkpoint step {step} of {run}); nothing written", file=sys.stderr)
    return 2
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, r in results.items():
    print(f"{name:>24}: loss {r['loss']:.4f} nats/token | ppl {r['ppl']:.3f} | "
          f"{r['bits_per_byte']:.4f} bits/byte | {int(r['tokens'])} tokens of the first "
          f"{r['examples']} of {r['of_examples']} examples")
  samples = []
  if cfg.eval.num_samples:
    samples = evaluation.sample(cfg, params, cfg.eval.prompt, cfg.eval.num_samples,
                                cfg.eval.sample_len, cfg.eval.temperature, cfg.eval.top_k, args.seed)
    for i, s in enumerate(samples):
      print(f"--- sample {i} (temperature {cfg.eval.temperature}, top-k {cfg.eval.top_k}) ---\n{s}")
  decoding_results = run_decoding_evals(args, cfg, params, run)
  decoding_results.update(run_prefill_evals(args, cfg, params, run))
  atomic_write_text(out, json.dumps({"run": str(run), "step": step, "splits": results, "samples": samples,
                             **decoding_results,
                             "sampling": {"prompt": cfg.eval.prompt, "temperature": cfg.eval.temperature,
                                          "top_k": cfg.eval.top_k, "seed": args.seed}}, indent=2))
  print(f"wrote {out}")
  return 0


def apply_kv_args(cfg, args):
  """--kv-cache / --kv-group / --kv-window override the config's decode section (checked like a
  config key, before any compute); args.kv_* then hold the settings in force."""
  import dataclasses
  d = cfg.decode
  decode = dataclasses.replace(d, kv_cache=args.kv_cache or d.kv_cache,
                               kv_group=args.kv_group or d.kv_group,
                               kv_window=args.kv_window or d.kv_window)
  cfg = dataclasses.replace(cfg, decode=decode)
  args.kv_cache, args.kv_group, args.kv_window = decode.kv_cache, decode.kv_group, decode.kv_window
  return cfg


def drift_budget(args) -> int:
  """--budget, or 10% of prompt + new tokens in whole blocks (at least 2)."""
  total = args.prompt_len + args.new_tokens
  return args.budget or max(2 * args.block_size, total // 10 // args.block_size * args.block_size)


def check_decoding_args(ap, args) -> None:
  """Budgets that cannot hold the forced blocks fail here, before any compute; so do bad
  prefill densities and selectors."""
  from pallas_kernels.block_topk import forced_blocks_max
  if args.prefill_densities is not None:
    try:
      args.prefill_density_list = [float(x) for x in args.prefill_densities.split(",") if x]
    except ValueError:
      ap.error(f"--prefill-densities: want numbers like 1.0,0.5,0.1, got {args.prefill_densities!r}")
    if not args.prefill_density_list or not all(0 < d <= 1 for d in args.prefill_density_list):
      ap.error(f"--prefill-densities must be in (0, 1], got {args.prefill_densities!r}")
    from effjax.sparse.prefill_sparse import NAMES as known
    args.prefill_selector_list = [x for x in args.prefill_selectors.split(",") if x]
    if not args.prefill_selector_list or any(x not in known for x in args.prefill_selector_list):
      ap.error(f"--prefill-selectors: choose from {', '.join(known)}; got {args.prefill_selectors!r}")
    if (any(x.startswith("gate") for x in args.prefill_selector_list)
        and not (args.prefill_gate or args.train_prefill_gate)):
      ap.error("gate selectors need --prefill-gate PATH or --train-prefill-gate STEPS")
    if args.prefill_windows < 1 or args.prefill_block_size < 1:
      ap.error("--prefill-windows and --prefill-block-size must be >= 1")
    from pallas_kernels.block_topk import PREFIX_IMPLEMENTATIONS
    if args.prefill_topk_impl not in (None, *PREFIX_IMPLEMENTATIONS):
      ap.error(f"--prefill-topk-impl: choose from {', '.join(PREFIX_IMPLEMENTATIONS)}; got "
               f"{args.prefill_topk_impl!r}")
  if args.prefill_gate and not pathlib.Path(args.prefill_gate).is_file():
    ap.error(f"--prefill-gate {args.prefill_gate}: no such file")
  if args.local_tokens < 1:
    ap.error(f"--local-tokens must be >= 1, got {args.local_tokens}")
  need = forced_blocks_max(args.block_size, args.local_tokens)
  budgets = ([drift_budget(args)] if args.drift else []) + (
      (args.budgets or [4 * args.block_size, 8 * args.block_size]) if args.retrieval else [])
  for b in budgets:
    if b // args.block_size < need:
      ap.error(f"a budget of {b} tokens keeps {b // args.block_size} blocks of {args.block_size}, "
               f"fewer than the {need} forced ones (the first block and those the last "
               f"--local-tokens {args.local_tokens} tokens span)")


def run_decoding_evals(args, cfg, params, run: pathlib.Path) -> dict:
  """--train-gate / --drift / --retrieval; returns their results for eval.json."""
  import numpy as np
  from effjax import evaluation
  from effjax.sparse import gate as gate_lib
  from effjax.sparse import gate_training, resa
  out: dict = {}
  gate_params = None
  gcfg = gate_lib.GateConfig(block_size=args.block_size, d_gate=64)
  from effjax.quant.kv import KVCacheSpec
  kv_cache = KVCacheSpec.from_config(cfg.decode)
  if kv_cache is not None:
    out["kv_cache"] = {"kind": kv_cache.kind, "group": kv_cache.group, "window": kv_cache.window,
                       "k_mode": kv_cache.k_mode, "v_group": kv_cache.v_group}
  if args.train_gate:
    ex = evaluation.split_examples(cfg, "train")
    gate_params, losses = gate_training.train_gate(
        cfg.model, gcfg, params, ex.tokens[:, :-1], steps=args.train_gate, log=print)
    np.savez(run / "gate.npz", **{k: np.asarray(v) for k, v in gate_params.items()})
    out["gate_training"] = {"steps": args.train_gate, "first_kl": losses[0], "last_kl": losses[-1],
                            "path": str(run / "gate.npz")}
    print(f"gate: KL {losses[0]:.4f} -> {losses[-1]:.4f}, saved {run / 'gate.npz'}")
  elif args.gate:
    gate_params = dict(np.load(args.gate))
  if args.selector == "gate" and gate_params is None and (args.drift or args.retrieval):
    raise ValueError("--selector gate needs --gate PATH or --train-gate STEPS")
  if args.drift:
    ex = evaluation.split_examples(cfg, "valid")
    n = min(args.drift, len(ex))
    prompts = ex.tokens[:n, :args.prompt_len]
    lengths = np.full((n,), prompts.shape[1], np.int32)
    total = prompts.shape[1] + args.new_tokens
    budget = drift_budget(args)
    scfg = resa.SparseConfig(selector=args.selector, block_size=args.block_size,
                             budget_tokens=budget, rectify_every=args.rectify_every,
                             d_gate=gcfg.d_gate, gate_cache_dtype=args.gate_cache_dtype,
                             local_tokens=args.local_tokens, sparse_kernel=args.sparse_kernel)
    d = evaluation.drift_eval(cfg, params, prompts, lengths, new_tokens=args.new_tokens, scfg=scfg,
                              gate_params=gate_params, decode_impl=args.decode_impl,
                              kv_cache=kv_cache)
    out["drift"] = {"prompts": n, "prompt_len": int(prompts.shape[1]), "new_tokens": args.new_tokens,
                    "budget_tokens": budget, "sparsity_at_end": 1 - budget / total,
                    "selector": args.selector, "results": d}
    print(f"drift ({n} prompts, {args.new_tokens} new tokens, budget {budget} of {total} tokens):")
    for name, r in d.items():
      print(f"  {name:>24}: dense-model NLL {r['nll']:.4f} | agreement with dense {r['agreement_with_dense']:.3f}")
    if ex.tokens.shape[1] >= total:   # the valid examples' own continuations, teacher-forced
      tf = evaluation.teacher_forced_drift(cfg, params, prompts, lengths,
                                           ex.tokens[:n, prompts.shape[1]:total],
                                           evaluation.drift_runs(scfg, gate_params),
                                           decode_impl=args.decode_impl, kv_cache=kv_cache)
      out["drift"]["teacher_forced"] = tf
      print("teacher-forced (the valid text's own continuation, fed to every decoding):")
      for name, r in tf.items():
        print(f"  {name:>24}: NLL {r['nll']:.4f} (excess {r['excess_nll']:+.4f}) | "
              f"greedy choice as dense {r['agreement_with_dense']:.3f}")
    else:
      print(f"teacher-forced drift skipped: valid examples hold {ex.tokens.shape[1]} tokens, "
            f"fewer than prompt + new tokens = {total}")
  if args.kv_quality:
    ex = evaluation.split_examples(cfg, "valid")
    n = min(args.kv_quality, len(ex))
    total = args.prompt_len + args.new_tokens
    if ex.tokens.shape[1] < total:
      raise ValueError(f"--kv-quality needs valid examples of prompt + new tokens = {total} "
                       f"tokens; they hold {ex.tokens.shape[1]} (lower --prompt-len / --new-tokens)")
    prompts = ex.tokens[:n, :args.prompt_len]
    lengths = np.full((n,), prompts.shape[1], np.int32)
    g = args.kv_group
    specs = {"bf16": KVCacheSpec("bf16")}
    for kind in ("int4", "int2"):
      w = args.kv_window or -(-(128 if kind == "int4" else 256) // g) * g
      for mode in ("channel", "token"):
        specs[f"{kind} K per {mode}"] = KVCacheSpec(kind, group=g, window=w, k_mode=mode)
    r = evaluation.kv_cache_quality(cfg, params, prompts, lengths,
                                    ex.tokens[:n, args.prompt_len:total], specs,
                                    decode_impl=args.decode_impl)
    out["kv_quality"] = {"prompts": n, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         "group": g, "results": r}
    print(f"KV cache quality ({n} valid examples, {args.prompt_len} + {args.new_tokens} tokens, "
          f"K groups of {g} tokens):")
    for name, x in r.items():
      print(f"  {name:>20}: NLL {x['nll']:.4f} | ppl {x['ppl']:.3f} ({100 * x['ppl_increase']:+.2f}%) | "
            f"greedy as bf16 {x['agreement_with_reference']:.3f}")
  if args.retrieval:
    context = args.context or cfg.model.max_seq_len - 8
    budgets = args.budgets or [4 * args.block_size, 8 * args.block_size]
    selectors = {"quest": ("quest", None, {"local_tokens": args.local_tokens,
                                           "sparse_kernel": args.sparse_kernel})}
    if gate_params is not None:
      selectors["gate"] = ("gate", gate_params, {"gate_cache_dtype": args.gate_cache_dtype,
                                                 "local_tokens": args.local_tokens,
                                                 "sparse_kernel": args.sparse_kernel})
    r = evaluation.retrieval_eval(cfg, params, n=args.retrieval, context_tokens=context,
                                  budgets=budgets, selectors=selectors, block_size=args.block_size,
                                  decode_impl=args.decode_impl, kv_cache=kv_cache)
    out["retrieval"] = {"n": args.retrieval, "context_tokens": context, "accuracy": r}
    print("passkey accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
  return out


def run_prefill_evals(args, cfg, params, run: pathlib.Path) -> dict:
  """--train-prefill-gate / --prefill-densities; returns their results for eval.json."""
  import jax.numpy as jnp
  import numpy as np
  from effjax import evaluation
  from effjax.sparse import prefill_sparse as ps
  from effjax.sparse.gate import GateConfig
  from effjax.sparse.prefill_gate_training import train_prefill_gate
  out: dict = {}
  seq = cfg.data.seq_len
  gate = None
  if args.train_prefill_gate:
    gcfg = GateConfig(block_size=args.prefill_block_size, d_gate=64)
    train = evaluation.full_windows(evaluation.split_examples(cfg, "train"), seq, 512)
    gate, losses = train_prefill_gate(cfg.model, gcfg, params, train,
                                      steps=args.train_prefill_gate, batch_size=4, log=print)
    path = run / "prefill_gate.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in gate.items()})
    out["prefill_gate_training"] = {"steps": args.train_prefill_gate, "first_kl": losses[0],
                                    "last_kl": losses[-1], "path": str(path)}
    print(f"prefill gate: KL {losses[0]:.4f} -> {losses[-1]:.4f}, saved {path}")
  elif args.prefill_gate:
    gate = {k: jnp.asarray(v) for k, v in np.load(args.prefill_gate).items()}
  if args.prefill_densities is not None:
    toks = evaluation.full_windows(evaluation.split_examples(cfg, "valid"), seq,
                                   args.prefill_windows)
    r = ps.evaluate_densities(cfg.model, params, toks, densities=args.prefill_density_list,
                              selectors=args.prefill_selector_list,
                              block_size=args.prefill_block_size, gate_params=gate,
                              topk_implementation=args.prefill_topk_impl)
    out["prefill_sparse"] = {"windows": len(toks), "seq": seq,
                             "block_size": args.prefill_block_size, "results": r}
    print(f"block-sparse prefill ({len(toks)} valid windows of {seq} tokens), dense ppl "
          f"{r['dense']['ppl']:.3f}:")
    for name, x in r.items():
      if name != "dense":
        print(f"  {name:>20}: ppl {x['ppl']:.3f} ({100 * x['ppl_increase']:+.2f}%) | "
              f"density {x['density']:.3f}")
  return out


if __name__ == "__main__":
  sys.exit(main())
