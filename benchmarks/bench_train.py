"""Train-step throughput and model-FLOPs utilisation (MFU) of the jitted train step.

  python -m benchmarks train --config configs/350m.yaml --seq 2048 --batch 16 [--batch 32 ...]

Inputs are random tokens (the step's cost does not depend on the data). Steps are dispatched
back-to-back without host syncs, so the device queue never drains and wall time per step equals
device time per step (a step is ~100x the ~0.1 ms dispatch cost); the median over several windows
is reported. The attention share is the device time of the same attention fwd+bwd (all layers'
worth) timed alone, as a fraction of the step.

MFU = model FLOPs per step / step time / peak. Model FLOPs: 6 * N_matmul per token plus attention
scores and values, 12 * L * N_heads * H * T per token (the PaLM convention, full square) -- we also
report the causal-halved count, which is what a causal flash kernel actually computes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from effjax import training
from effjax.config import from_dict, load_config, to_dict
from effjax.model import train_flops_per_token
from pallas_kernels.causal_attention import causal_attention

PEAK_BF16 = {  # dense bf16 tensor-core peak, TFLOP/s (datasheet)
    "H100": 989.4, "H200": 989.4, "A100": 312.0,
}


def card_name() -> str:
  d = jax.devices()[0]
  return d.device_kind if d.platform != "cpu" else f"cpu-{platform.machine()}"


def peak_tflops(kind: str) -> float | None:
  for k, v in PEAK_BF16.items():
    if k in kind:
      return v
  return None


def time_steps(fn, state, batches, n_steps: int, windows: int):
  """Median seconds per step over `windows` windows of `n_steps` back-to-back steps."""
  times = []
  for _ in range(windows):
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(n_steps):
      state, m = fn(state, batches[i % len(batches)])
    jax.block_until_ready((state, m))
    times.append((time.perf_counter() - t0) / n_steps)
  return statistics.median(times), times, state, m


def attention_time(cfg, batch: int, seq: int, reps: int = 10) -> float:
  """Device seconds for one layer's attention fwd+bwd at the training shape (median of windows)."""
  mc = cfg.model
  dt = jnp.dtype(mc.compute_dtype)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (reps, batch, seq, mc.n_heads, mc.hd), dt)
  k = jax.random.normal(keys[1], (reps, batch, seq, mc.n_kv_heads, mc.hd), dt)
  v = jax.random.normal(keys[2], (reps, batch, seq, mc.n_kv_heads, mc.hd), dt)

  def one(q, k, v):
    return causal_attention(q, k, v, implementation=mc.attention_impl).astype(jnp.float32).sum()

  grad = jax.grad(one, argnums=(0, 1, 2))

  @jax.jit
  def many(q, k, v):
    # a scan over `reps` different inputs: nothing can be hoisted, one dispatch for all
    def body(c, x):
      g = grad(*x)
      return c + sum(jnp.sum(t[0, 0, 0].astype(jnp.float32)) for t in g), None
    return jax.lax.scan(body, 0.0, (q, k, v))[0]

  many(q, k, v).block_until_ready()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    many(q, k, v).block_until_ready()
    ts.append((time.perf_counter() - t0) / reps)
  return statistics.median(ts)


def run_one(cfg, batch: int, seq: int, n_steps: int, windows: int) -> dict:
  d = to_dict(cfg)
  d["train"]["batch_size"] = batch
  d["data"]["seq_len"] = seq
  cfg = from_dict(d)
  opt = training.make_optimizer(cfg.optim, cfg.train.steps)
  state = jax.jit(lambda r: training.init_train_state(cfg, r, opt))(jax.random.key(0))
  step = jax.jit(training.make_train_step(cfg, opt), donate_argnums=0)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    t = rng.integers(0, 256, (batch, seq + 1), dtype=np.int32)
    batches.append(jax.device_put({"inputs": t[:, :-1], "targets": t[:, 1:],
                                   "loss_mask": np.ones((batch, seq), np.float32)}))
  t0 = time.perf_counter()
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  sec, all_t, state, m = time_steps(step, state, batches, n_steps, windows)
  tokens = batch * seq
  f_tok = train_flops_per_token(cfg.model, seq)
  attn_full = 12.0 * cfg.model.n_layers * cfg.model.n_heads * cfg.model.hd * seq
  f_tok_causal = f_tok - attn_full / 2
  kind = card_name()
  peak = peak_tflops(kind)
  att = attention_time(cfg, batch, seq) * cfg.model.n_layers
  mem_an = step.lower(state, batches[0]).compile().memory_analysis()
  step_gib = None if mem_an is None else (
      mem_an.temp_size_in_bytes + mem_an.argument_size_in_bytes + mem_an.output_size_in_bytes
      - mem_an.alias_size_in_bytes) / 2**30
  out = {
      "batch": batch, "seq": seq, "tokens_per_step": tokens, "step_ms": sec * 1e3,
      "step_ms_windows": [t * 1e3 for t in all_t], "tokens_per_s": tokens / sec,
      "model_tflops_per_step": f_tok * tokens / 1e12,
      "achieved_tflops": f_tok * tokens / sec / 1e12,
      "achieved_tflops_causal": f_tok_causal * tokens / sec / 1e12,
      "mfu": None if peak is None else f_tok * tokens / sec / 1e12 / peak,
      "mfu_causal_flops": None if peak is None else f_tok_causal * tokens / sec / 1e12 / peak,
      "attention_ms_per_step": att * 1e3, "attention_share": att / sec,
      "compile_s": compile_s, "final_loss": float(m["loss"]),
      "step_memory_gib": step_gib,  # compiled step: arguments + outputs + temporaries
      "remat": cfg.model.remat, "attention_impl": cfg.model.attention_impl,
  }
  del state
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/350m.yaml")
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--batch", type=int, action="append", default=None)
  ap.add_argument("--steps", type=int, default=10, help="steps per timing window")
  ap.add_argument("--windows", type=int, default=3)
  common.add_output_args(ap)
  ap.add_argument("--variant", action="append", default=None,
                  help="LABEL=key=value,key=value: extra config overrides timed as one variant")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  cfg = load_config(args.config, args.overrides)
  kind = card_name()
  variants = [("default", [])]
  if args.variant:
    variants = []
    for v in args.variant:
      label, _, ovs = v.partition("=")
      variants.append((label, [o for o in ovs.split(",") if o]))
  results = []
  for label, ovs in variants:
    vcfg = load_config(args.config, args.overrides + ovs)
    for b in args.batch or [16]:
      try:
        r = run_one(vcfg, b, args.seq, args.steps, args.windows)
      except Exception as e:  # e.g. out of memory at a large batch: record it, keep going
        r = {"batch": b, "seq": args.seq, "error": f"{type(e).__name__}: {str(e)[:300]}"}
      r = {"variant": label, "variant_overrides": ovs, **r}
      results.append(r)
      print(json.dumps(r), flush=True)
  ok = [r for r in results if "error" not in r]
  best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
  meta = common.meta(
      benchmark="train_step", config=args.config, overrides=args.overrides,
      peak_bf16_tflops=peak_tflops(kind), params=cfg.model.num_params(), best=best,
      timing="wall time of back-to-back async steps (device-bound), median of windows")
  out = common.write_json(common.output_path(args, "train.json"), meta, results)
  print(f"\n{'variant':>12} {'batch':>5} {'step ms':>9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFUc':>6} {'attn':>6} {'GiB':>6}")
  for r in results:
    if "error" in r:
      print(f"{r['variant']:>12} {r['batch']:>5}  error: {r['error'][:80]}")
      continue
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    mfuc = "n/a" if r["mfu_causal_flops"] is None else f"{r['mfu_causal_flops']:.1%}"
    print(f"{r['variant']:>12} {r['batch']:>5} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} {r['achieved_tflops']:>8.1f} "
          f"{mfu:>6} {mfuc:>6} {r['attention_share']:>6.1%} {(r['step_memory_gib'] or 0):>6.1f}")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
