#!/usr/bin/env python3
"""Long-context fine-tuning with SeerAttention (its second use): a model trained at context T0 is
extended to factor * T0 with YaRN RoPE scaling and fine-tuned there, once with dense attention
and once with block-sparse attention chosen by the prefill gate (model and gate trained together:
`prefill_sparse.sparse_training_loss`), for the same steps on the same batches. Both are then
evaluated at the extended context, dense and sparse, and every model against the --selectors
(the gate, the static sink + window pattern, recency, the oracle) at --density.

  python experiments/seer_prefill/yarn.py --run RUN_DIR --out DIR [--factor 4] [--steps 200]
      [--density 0.1] [--source SRC] [--eval-source PATH ...]

RUN_DIR is a training run (config.yaml + checkpoints), e.g. `train.py --config
configs/longctx.yaml`. Training windows of factor * T0 tokens come from --source (default: the
run's data.source), packed; evaluation on its valid split and every --eval-source (packed too).

Phases (each kept in <out>/results.json and skipped when its settings match, so a killed run
resumes): `baselines` (the T0 model at the long context without YaRN, and with YaRN before any
fine-tuning, dense; the second also sparse with a gate distilled on it), `gate` (that gate, the
sparse arm's starting point: <out>/gate0.npz), `dense` and `sparse` (the fine-tuning arms:
<out>/<arm>.npz params, loss curves), `selectors` (rerun alone when --selectors changes), `report`
(REPORT.md and loss.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from run import check_sources, open_log  # noqa: E402  (the sibling experiment script)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", required=True, help="training run directory (config.yaml + checkpoints)")
  ap.add_argument("--out", required=True, help="results directory")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  ap.add_argument("--factor", type=float, default=4.0, help="context extension (YaRN's s)")
  ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each arm")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--lr", type=float, default=1e-4, help="model learning rate (peak)")
  ap.add_argument("--gate-lr", type=float, default=3e-3,
                  help="the gate's learning rate, in its distillation and in the sparse arm")
  ap.add_argument("--warmup", type=int, default=None, help="default: a tenth of --steps")
  ap.add_argument("--kl-weight", type=float, default=1.0)
  ap.add_argument("--density", type=float, default=0.1, help="sparse arm: nz ratio per row")
  ap.add_argument("--local-blocks", type=int, default=2)
  ap.add_argument("--sink-blocks", type=int, default=1)
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--d-gate", type=int, default=64)
  ap.add_argument("--gate-steps", type=int, default=100, help="distillation of the starting gate")
  ap.add_argument("--source", default=None, help="training text (default: the run's data.source)")
  ap.add_argument("--train-windows", type=int, default=2048, help="training windows sampled from")
  ap.add_argument("--eval-source", action="append", default=[], metavar="PATH",
                  help="an extra held-out set (.txt one document per line, or .jsonl); repeatable")
  ap.add_argument("--n-eval", type=int, default=8, help="windows per evaluated set")
  ap.add_argument("--eval-batch", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--selectors", default="gate+local,static,recency+local,oracle+local",
                  help="selectors compared at --density on the models at the extended context "
                       "(gate ones where the model has a gate; '' for none)")
  args = ap.parse_args(argv)
  check_sources(ap, args)
  if args.factor < 1:
    ap.error(f"--factor must be >= 1, got {args.factor}")
  if not 0 < args.density <= 1:
    ap.error(f"--density must be in (0, 1], got {args.density}")
  if min(args.steps, args.batch, args.n_eval, args.eval_batch, args.train_windows) < 1:
    ap.error("--steps, --batch, --n-eval, --eval-batch and --train-windows must be >= 1")
  if args.gate_steps < 0 or args.local_blocks < 1 or args.sink_blocks < 0:
    ap.error("--gate-steps >= 0, --local-blocks >= 1 and --sink-blocks >= 0 are needed")
  from effjax.sparse.prefill_sparse import NAMES
  args.selector_list = [x for x in args.selectors.split(",") if x]
  if any(x not in NAMES for x in args.selector_list):
    ap.error(f"--selectors: choose from {', '.join(NAMES)}; got {args.selectors!r}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from effjax import evaluation
  from effjax.checkpoint import atomic_write_text
  from effjax.config import load_config
  from effjax.model import transformer as model_lib
  from effjax.sparse import prefill_sparse as ps
  from effjax.sparse.gate import GateConfig
  from effjax.sparse.prefill_gate import init_prefill_gate_params
  from effjax.sparse.prefill_gate_training import train_prefill_gate

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = open_log(out)

  cfg = load_config(pathlib.Path(args.run) / "config.yaml")
  base = cfg.model
  T0 = cfg.data.seq_len
  T = int(round(args.factor * T0))
  params0, step = evaluation.load_params(cfg, args.run, args.step)
  plain = dataclasses.replace(base, max_seq_len=T, rope_scaling="none")
  yarn = dataclasses.replace(base, max_seq_len=T, rope_scaling="yarn", rope_factor=args.factor,
                             rope_original_max_seq_len=T0)
  log(f"model {args.run} step {step} ({base.num_params() / 1e6:.1f}M params), trained at {T0} "
      f"tokens; YaRN x{args.factor:g} -> {T}")
  gcfg = GateConfig(block_size=args.block_size, d_gate=args.d_gate)
  sparse_eval = ps.PrefillSparseConfig("gate", args.block_size, density=args.density,
                                       keep_local_blocks=args.local_blocks,
                                       keep_sink_blocks=args.sink_blocks)

  # data: packed windows of T tokens
  def data_cfg(source):                           # windows of T > the trained max_seq_len
    return dataclasses.replace(cfg, model=plain, data=dataclasses.replace(
        cfg.data, source=source, packing="pack", seq_len=T))

  src_cfg = data_cfg(args.source or cfg.data.source)
  def windows(dcfg, split, n):
    return evaluation.full_windows(evaluation.split_examples(dcfg, split), T, n)

  train = windows(src_cfg, "train", args.train_windows)
  sets = {"valid": windows(src_cfg, "valid", args.n_eval)}
  for p in args.eval_source:
    sets[pathlib.Path(p).name] = windows(data_cfg(p), p, args.n_eval)
  log(f"{len(train)} training windows; eval sets " +
      ", ".join(f"{k} ({len(v)})" for k, v in sets.items()))

  res_path = out / "results.json"
  # the selector table is its own phase: changing --selectors reruns only that
  settings = {k: v for k, v in vars(args).items()
              if k not in ("out", "selectors", "selector_list")} | {"step": step, "T": T}
  saved = json.loads(res_path.read_text()) if res_path.exists() else {}
  res = saved.get("phases", {}) if saved.get("settings") == settings else {}

  def save():
    atomic_write_text(res_path, json.dumps({"settings": settings, "phases": res}, indent=2))

  dense_nll = jax.jit(lambda mcfg, p, toks: _nll(model_lib, mcfg, p, toks), static_argnums=0)

  def evaluate(mcfg, params, gate=None):
    rows = {}
    for name, toks in sets.items():
      tot = 0.0
      for i in range(0, len(toks), args.eval_batch):
        tot += float(dense_nll(mcfg, params, jnp.asarray(toks[i:i + args.eval_batch]))) * len(
            toks[i:i + args.eval_batch])
      row = {"dense": math.exp(tot / len(toks))}
      if gate is not None:
        tot = cnt = dens = 0.0
        for i in range(0, len(toks), args.eval_batch):
          b = jnp.asarray(toks[i:i + args.eval_batch])
          t, n, d = ps.sparse_nll(mcfg, sparse_eval, params, b,
                                  jnp.full((len(b),), T, jnp.int32), gate)
          tot, cnt, dens = tot + float(t), cnt + int(n), dens + float(d) * len(b)
        row["sparse"], row["sparse_density"] = math.exp(tot / cnt), dens / len(toks)
      rows[name] = row
    return rows

  def params_file(name):
    return out / f"{name}.npz"

  def save_tree(name, tree):
    flat, _ = jax.tree.flatten_with_path(tree)
    np.savez(params_file(name), **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})

  def load_tree(name, like):
    data = np.load(params_file(name))
    flat, treedef = jax.tree.flatten_with_path(like)
    return jax.tree.unflatten(treedef, [jnp.asarray(data[jax.tree_util.keystr(k)])
                                        for k, _ in flat])

  # the gate the sparse arm starts from: distilled on the YaRN model before fine-tuning
  if "gate" in res and params_file("gate0").exists():
    gate0 = load_tree("gate0", init_prefill_gate_params(yarn, gcfg, jax.random.key(args.seed)))
    log("gate: reusing gate0.npz")
  else:
    t0 = time.time()
    gate0, losses = train_prefill_gate(yarn, gcfg, params0, train, steps=args.gate_steps,
                                       batch_size=args.batch, lr=args.gate_lr,
                                       seed=args.seed, log=log)
    save_tree("gate0", gate0)
    res["gate"] = {"kl_first": losses[0] if losses else None,
                   "kl_last": losses[-1] if losses else None, "seconds": time.time() - t0}
    save()
  if "baselines" not in res:
    t0 = time.time()
    res["baselines"] = {"no_yarn": evaluate(plain, params0),
                        "yarn": evaluate(yarn, params0, gate0), "seconds": time.time() - t0}
    log(f"baselines: {json.dumps(res['baselines'])}")
    save()

  warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)

  def schedule(lr):
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(args.steps, warmup + 1),
                                              lr * 0.1)

  def fine_tune(arm):
    rng = np.random.default_rng(args.seed)          # the same batches for both arms
    if arm == "dense":
      trainable = params0
      opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule(args.lr)))

      def loss_fn(t, toks):
        nll = _nll(model_lib, yarn, t, toks)
        return nll, (nll, jnp.zeros(()), jnp.ones(()))
    else:
      trainable = {"model": params0, "gate": gate0}
      opt = optax.multi_transform(
          {"model": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule(args.lr))),
           "gate": optax.adam(schedule(args.gate_lr))}, {"model": "model", "gate": "gate"})
      def loss_fn(t, toks):
        return ps.sparse_training_loss(yarn, sparse_eval, t, toks,
                                       jnp.full((toks.shape[0],), T, jnp.int32), args.kl_weight)

    @jax.jit
    def step_fn(t, st, toks):
      (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(t, toks)
      u, st = opt.update(g, st, t)
      return optax.apply_updates(t, u), st, loss, aux

    st = opt.init(trainable)
    curve, t0 = [], time.time()
    for s in range(args.steps):
      toks = jnp.asarray(train[rng.integers(0, len(train), args.batch)])
      trainable, st, loss, (nll, kl, dens) = step_fn(trainable, st, toks)
      curve.append([s + 1, float(nll), float(kl), float(dens)])
      if (s + 1) % max(1, args.steps // 10) == 0:
        log(f"{arm} step {s + 1}/{args.steps}: nll {float(nll):.4f} kl {float(kl):.4f} "
            f"density {float(dens):.3f} ({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    return trainable, {"curve": curve, "seconds": seconds, "step_s": seconds / args.steps}

  for arm in ("dense", "sparse"):
    if arm in res and params_file(arm).exists():
      log(f"{arm}: done earlier")
      continue
    trainable, info = fine_tune(arm)
    save_tree(arm, trainable)
    model = trainable if arm == "dense" else trainable["model"]
    info["eval"] = evaluate(yarn, model, None if arm == "dense" else trainable["gate"])
    res[arm] = info
    log(f"{arm}: {json.dumps(info['eval'])} in {info['seconds']:.0f} s")
    save()

  # the selectors at --density on each model: the learned gate against the static pattern
  if args.selector_list and res.get("selectors", {}).get("names") != args.selector_list:
    t0 = time.time()
    sparse_arm = load_tree("sparse", {"model": params0, "gate": gate0})
    models = {"YaRN, no fine-tuning": (params0, gate0),
              "YaRN + dense fine-tuning": (load_tree("dense", params0), None),   # no gate of its own
              "YaRN + sparse fine-tuning": (sparse_arm["model"], sparse_arm["gate"])}
    table = {}
    for name, (params, gate) in models.items():
      table[name] = {}
      for set_name, toks in sets.items():
        table[name][set_name] = ps.evaluate_densities(
            yarn, params, toks, densities=(args.density,), selectors=args.selector_list,
            block_size=args.block_size, gate_params=gate, batch_size=args.eval_batch,
            local_blocks=args.local_blocks, sink_blocks=args.sink_blocks,
            log=lambda m, name=name, set_name=set_name: log(f"{name}, {set_name}: {m}"))
    res["selectors"] = {"names": args.selector_list, "table": table,
                        "seconds": time.time() - t0}
    save()

  report(args, res, base, step, T0, T, out, argv)
  log(f"wrote {res_path} and {out / 'REPORT.md'}")
  return 0


def _nll(model_lib, mcfg, params, toks):
  """Mean next-token NLL (nats/token) of full windows toks [B, T], dense causal attention."""
  import jax
  import jax.numpy as jnp
  logp = jax.nn.log_softmax(model_lib.forward(mcfg, params, toks)[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))


def selector_table(sel: dict, d: str, T: int) -> str:
  """The selector phase as markdown: perplexity at T tokens per model and selector at nz ratio d
  (increase over that model's dense perplexity, measured density), one column a set."""
  models = list(sel["table"])
  sets = list(sel["table"][models[0]])
  lines = [f"\nSelectors at nz ratio {d} on each model at {T} tokens (perplexity; increase over "
           f"the model's dense perplexity, measured density over the causal triangle; `static` is "
           f"the sink + local window whose density is closest, `recency+local` the nearest blocks "
           f"at exactly the `+local` selectors' density):\n",
           "| model | selector | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
  for m in models:
    keys = list(sel["table"][m][sets[0]])
    for k in keys:
      cells = []
      for s in sets:
        row = sel["table"][m][s][k]
        cells.append(f"{row['ppl']:.3f}" if k == "dense" else
                     f"{row['ppl']:.3f} ({100 * row['ppl_increase']:+.1f}%, d {row['density']:.2f})")
      lines.append(f"| {m} | {k.replace('@', ' @ ')} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def report(args, res, base, step, T0, T, out, argv) -> None:
  import jax

  from effjax.checkpoint import atomic_write_text
  d = f"{args.density:g}"
  cmd = "python3 experiments/seer_prefill/yarn.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv)
  sets = list(res["baselines"]["no_yarn"])
  rows = [("no YaRN, no fine-tuning", "dense", res["baselines"]["no_yarn"], "dense"),
          ("YaRN, no fine-tuning", "dense", res["baselines"]["yarn"], "dense"),
          ("YaRN, no fine-tuning", f"gate+local @ {d} (distilled gate)",
           res["baselines"]["yarn"], "sparse"),
          ("YaRN + dense fine-tuning", "dense", res["dense"]["eval"], "dense"),
          ("YaRN + sparse fine-tuning (model + gate)", f"gate+local @ {d}", res["sparse"]["eval"],
           "sparse"),
          ("YaRN + sparse fine-tuning (model + gate)", "dense", res["sparse"]["eval"], "dense")]
  lines = ["| model | attention at evaluation | " + " | ".join(sets) + " |",
           "|---|---|" + "---|" * len(sets)]
  for name, att, ev, key in rows:
    cells = [f"{ev[s][key]:.3f}" + (f" (d {ev[s]['sparse_density']:.2f})" if key == "sparse"
                                     else "") for s in sets]
    lines.append(f"| {name} | {att} | " + " | ".join(cells) + " |")
  text = (f"# Long-context fine-tuning: YaRN x{args.factor:g}, dense vs SeerAttention sparse\n\n"
          f"Model: `{args.run}` step {step} ({base.num_params() / 1e6:.1f}M parameters) trained "
          f"at {T0} tokens, extended to {T} tokens; {args.steps} fine-tuning steps of batch "
          f"{args.batch} per arm on the same windows; {jax.devices()[0].device_kind}, "
          f"{time.strftime('%Y-%m-%d')}. Sparse arm: gate nz ratio {d} with the first "
          f"{args.sink_blocks} and the {args.local_blocks} blocks ending at the diagonal kept, "
          f"KL weight {args.kl_weight:g}, blocks of {args.block_size}.\n\n"
          f"Command: `{cmd}`\n\nPerplexity at {T} tokens (bytes; measured density over the causal "
          f"triangle):\n\n" + "\n".join(lines) + "\n\n"
          f"Step time: dense {res['dense']['step_s'] * 1e3:.0f} ms, sparse "
          f"{res['sparse']['step_s'] * 1e3:.0f} ms (first steps include compilation).\n")
  if "selectors" in res:
    text += selector_table(res["selectors"], d, T)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm in ("dense", "sparse"):
      c = res[arm]["curve"]
      ax.plot([r[0] for r in c], [r[1] for r in c], label=f"{arm} fine-tuning (LM NLL)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    text += "\n![loss](loss.png)\n"
  except ImportError:
    pass
  atomic_write_text(out / "REPORT.md", text)


if __name__ == "__main__":
  sys.exit(main())
