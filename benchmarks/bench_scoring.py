"""LQS scoring throughput for a proxy model vs the time of one training epoch of the same model.

  python -m benchmarks scoring --config configs/base.yaml --seq 1024 [--chunk 8] [--proj 8192]

Measures, as device-bound wall time of back-to-back jitted calls on random tokens (median of
windows): examples/s of the per-example-gradient pass (`vmap(grad)`, norms and dots with lambda;
exact and count-sketch projected), of the train step (AdamW, the "epoch" baseline), of the
mean-pooled encoder forward the learned scorer uses, and the per-proxy-step fixed costs (SGD step,
HVP, reference gradient). LQS with T proxy steps makes int(T / sqrt(T)) + 1 passes over the scored
examples (10 checkpoints + theta_T for T = 100). Reports the cost of scoring N examples relative to
one training epoch over N, both scoring all N directly and scoring a sample of N / 8 with the proxy
plus the learned scorer's forward pass over all N.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time


import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from effjax import training
from effjax.config import from_dict, load_config, to_dict
from effjax.data import scoring
from effjax.data.packing import Examples


def bench(fn, args_list, windows=3, reps=None):
  """Median seconds per call over windows of back-to-back calls (inputs rotate)."""
  reps = reps or len(args_list)
  out = fn(*args_list[0])
  jax.block_until_ready(out)
  ts = []
  for _ in range(windows):
    t0 = time.perf_counter()
    for i in range(reps):
      out = fn(*args_list[i % len(args_list)])
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / reps)
  return statistics.median(ts)


def mem_gib(jitted, *args):
  try:
    m = jitted.lower(*args).compile().memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**30
  except Exception:  # not every backend reports it
    return None


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/base.yaml")
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--chunk", type=int, default=8)
  ap.add_argument("--train-batch", type=int, default=32)
  ap.add_argument("--proj", type=int, default=8192)
  ap.add_argument("--skip", default="", help="comma list of parts already measured: train,exact,proj")
  ap.add_argument("--proxy-steps", type=int, default=100)
  ap.add_argument("--hvp-chunk", type=int, default=8, help="ScoringFns.hvp_chunk (micro-batch)")
  ap.add_argument("--n", type=int, default=100_000, help="corpus size for the fixed-cost share")
  common.add_output_args(ap)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  d = to_dict(load_config(args.config, args.overrides))
  d["data"]["seq_len"] = args.seq
  d["train"]["batch_size"] = args.train_batch
  cfg = from_dict(d)
  mc = cfg.model
  kind = jax.devices()[0].device_kind
  rng = np.random.default_rng(0)

  def rand_tokens(b):
    return jnp.asarray(rng.integers(0, 256, (b, args.seq + 1), dtype=np.int32))

  ones = lambda b: jnp.ones((b, args.seq), jnp.float32)
  res = {"card": kind, "jax": jax.__version__, "config": args.config, "seq": args.seq,
         "params": mc.num_params(), "compute_dtype": mc.compute_dtype, "chunk": args.chunk,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "timing": "wall time of back-to-back async jitted calls, median of 3 windows"}

  # training epoch baseline
  opt = training.make_optimizer(cfg.optim, cfg.train.steps)
  state = jax.jit(lambda r: training.init_train_state(cfg, r, opt))(jax.random.key(0))
  params = jax.tree.map(lambda x: x.copy(), state["params"])
  step = jax.jit(training.make_train_step(cfg, opt), donate_argnums=0)
  batches = []
  for _ in range(3):
    t = rand_tokens(args.train_batch)
    batches.append({"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": ones(args.train_batch)})
  holder = {"s": state}

  def train_call(b):
    holder["s"], m = step(holder["s"], b)
    return m["loss"]
  skip = set(args.skip.split(","))
  t_train = bench(train_call, [(b,) for b in batches], reps=6 if "train" not in skip else 1,
                  windows=3 if "train" not in skip else 1)
  res["train_examples_per_s"] = args.train_batch / t_train
  print(f"train step: {t_train * 1e3:.1f} ms / {args.train_batch} ex -> {res['train_examples_per_s']:.1f} ex/s", flush=True)
  holder.clear()  # free the train state before the scoring passes
  del batches, state

  lam = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, jnp.float32) * 1e-3, params)
  chunks = [(params, rand_tokens(args.chunk), ones(args.chunk), lam) for _ in range(3)]
  for proj in (0, args.proj):
    if ("exact" if proj == 0 else "proj") in skip:
      continue
    fns = scoring.ScoringFns(mc, projection_dim=proj, projection_seed=0)
    try:
      t = bench(fns.example_stats, chunks, reps=6)
      key = "exact" if proj == 0 else f"proj{proj}"
      res[f"score_{key}_examples_per_s"] = args.chunk / t
      res[f"score_{key}_memory_gib"] = mem_gib(fns.example_stats, *chunks[0])
      print(f"per-example grads ({key}): {t * 1e3:.1f} ms / {args.chunk} ex -> {args.chunk / t:.1f} ex/s, "
            f"mem {res[f'score_{key}_memory_gib']}", flush=True)
    except Exception as e:
      res[f"score_proj{proj}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print("error", res[f"score_proj{proj}_error"], flush=True)

  fns = scoring.ScoringFns(mc, hvp_chunk=args.hvp_chunk)
  pb = [(params, rand_tokens(32), ones(32)) for _ in range(2)]
  t_sgd = bench(lambda p, t, m: fns.sgd_step(p, t, m, 0.01), pb, reps=4)
  t_hvp = bench(lambda p, t, m: fns.hvp(p, t, m, lam), pb, reps=4)
  t_ref = bench(fns.batch_grad, pb, reps=4) * 256 / 32  # a 256-example reference set
  res.update(sgd_step_s=t_sgd, hvp_s=t_hvp, hvp_chunk=args.hvp_chunk, ref_grad_256_s=t_ref)
  print(f"proxy step: sgd {t_sgd * 1e3:.1f} ms, hvp {t_hvp * 1e3:.1f} ms, ref grad {t_ref * 1e3:.1f} ms", flush=True)

  emb_batch = 64
  ex = Examples(np.asarray(rand_tokens(emb_batch * 4)), np.ones((emb_batch * 4, args.seq), np.float32))
  t0 = time.perf_counter()
  scoring.embed_examples(mc, params, ex.take(np.arange(emb_batch)), chunk=emb_batch)  # compile
  t0 = time.perf_counter()
  scoring.embed_examples(mc, params, ex, chunk=emb_batch)
  res["embed_examples_per_s"] = len(ex) / (time.perf_counter() - t0)
  print(f"encoder forward: {res['embed_examples_per_s']:.1f} ex/s", flush=True)

  passes = scoring.scoring_passes(args.proxy_steps)
  n = args.n
  epoch_s = n / res["train_examples_per_s"]
  fixed_s = args.proxy_steps * (t_sgd * 2 + t_hvp + 2 * t_ref)  # trajectory + replay + adjoint
  for key in ("exact", f"proj{args.proj}"):
    eps = res.get(f"score_{key}_examples_per_s")
    if not eps:
      continue
    direct = passes * n / eps
    sampled = passes * (n / 8) / eps + n / res["embed_examples_per_s"]
    res[f"ratio_direct_{key}"] = direct / epoch_s
    res[f"ratio_direct_{key}_with_fixed"] = (direct + fixed_s) / epoch_s
    res[f"ratio_sample8_{key}_with_fixed"] = (sampled + fixed_s) / epoch_s
  res.update(passes=passes, n=n, epoch_s=epoch_s, fixed_s=fixed_s)
  out = common.output_path(args, "scoring.json")
  out.write_text(json.dumps({"meta": common.meta(), **res}, indent=2))
  print(json.dumps({k: v for k, v in res.items() if k.startswith("ratio")}, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
