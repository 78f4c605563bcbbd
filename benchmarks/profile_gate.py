"""Where SeerAttention's prefill gate spends its time: the profiler's kernels of the gate (scores +
nz-ratio top-k), of the gated forward, and of formulations of its two costly steps, each on the
same inputs, so that the layouts XLA chooses for them can be compared in one run.

    python -m benchmarks profile_gate [--seq 32768] [--heads 32] [--kv-heads 8] [--density 0.1]
                                      [--impl pallas_mosaic_gpu] [--out FILE.json]

Rows (each the profiler's kernels of one jitted call, largest first):
  gate, gated      the gate as `select_nz_ratio(gate_logits(...))`, and with the attention after it
  select           the selection alone, on precomputed scores
  select_triton, gated_triton  (on a GPU) the same with the top-k as the Pallas Triton
                   `prefix_topk` kernel (an exact bracket search per row, no sort)
  topk             `lax.top_k` of the row width the selection uses (XLA lowers k > 16 to a sort)
  topk_int32_keys  the same top-k over one int32 key a block (the score's order-preserving bits,
                   the block index in the low bits): one sorted operand instead of two
  pool_q           `prefill_gate.pool_queries`: the mean of each query block, the bf16 values
                   summed into f32 (a reduction of a [B, nQ, bs, N * H] view)
  pool_q_f32_copy  the earlier form: q converted to f32, then summed
  pool_q_dot       the same sums as a batched contraction with the valid-token weights
  pool_k           `gate.pool_blocks`: max / min in the keys' dtype (exact), the mean's sum
                   accumulated in f32
  pool_k_f32_copy  the earlier form: the keys converted to f32, then reduced
(An H100 run at commit 786e317 named today's pool_q and pool_k "pool_q_sum" and "pool_k_bf16",
and the earlier forms "pool_q" and "pool_k".)
The formulations compute the same numbers (checked here before timing; the int32-key top-k
agrees up to near-ties).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seq", type=int, default=32768)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--d-gate", type=int, default=64)
  ap.add_argument("--density", type=float, default=0.1)
  ap.add_argument("--impl", default=None, help="block-sparse attention backend of the gated row")
  ap.add_argument("--top", type=int, default=12, help="kernels listed per row")
  from benchmarks import common
  common.add_output_args(ap)
  args = ap.parse_args(argv)
  B, S, N, K = args.batch, args.seq, args.heads, args.kv_heads
  H, bs = args.head_dim, args.block_size
  if S % bs or N % K or not 0 < args.density <= 1:
    ap.error(f"need --seq a multiple of --block-size, --heads a multiple of --kv-heads and "
             f"--density in (0, 1]; got {S}, {bs}, {N}, {K}, {args.density}")

  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.devtime import trace_summary
  from effjax.config import ModelConfig
  from effjax.sparse.gate import GateConfig, pool_blocks
  from effjax.sparse.prefill_gate import gate_logits, init_prefill_gate_params, pool_queries
  from effjax.sparse.prefill_selection import nz_ratio_width, select_nz_ratio
  from pallas_kernels.block_sparse_attention import block_sparse_attention

  nq = S // bs
  key = jax.random.key(0)
  q = jax.random.normal(key, (B, S, N, H), jnp.bfloat16)
  k = jax.random.normal(jax.random.fold_in(key, 1), (B, S, K, H), jnp.bfloat16)
  v = jax.random.normal(jax.random.fold_in(key, 2), (B, S, K, H), jnp.bfloat16)
  lengths = jnp.full((B,), S, jnp.int32)
  gp = init_prefill_gate_params(ModelConfig(d_model=N * H, n_heads=N, n_kv_heads=K, head_dim=H),
                                GateConfig(block_size=bs, d_gate=args.d_gate),
                                jax.random.fold_in(key, 7))
  wq, wk = gp["wq"][0], gp["wk"][0]
  width = nz_ratio_width(nq, args.density)
  valid_tok = (jnp.arange(S) < lengths[:, None]).reshape(B, nq, bs)

  def scores(q, k):
    return gate_logits(wq, wk, q, k, lengths, bs, 10000.0)

  def topk_int32_keys(s):
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    mono = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)       # int32 order == float order
    low = max(1, (nq - 1).bit_length())
    ids = nq - 1 - jnp.arange(nq, dtype=jnp.int32)             # ties: the lower block first
    keys = (mono & ~((1 << low) - 1)) | ids
    return nq - 1 - (jax.lax.top_k(keys, width)[0] & ((1 << low) - 1))

  def pool_q_dot(q):
    w = valid_tok.astype(q.dtype)
    tot = jnp.einsum("bqtx,bqt->bqx", q.reshape(B, nq, bs, N * H), w,
                     preferred_element_type=jnp.float32)
    cnt = jnp.maximum(jnp.sum(w, -1, dtype=jnp.float32), 1)
    return (tot.reshape(B, nq, N, H) / cnt[..., None, None]).transpose(0, 2, 1, 3)

  def pool_q_f32_copy(q):
    x = jnp.where(valid_tok[..., None, None], q.reshape(B, nq, bs, N, H).astype(jnp.float32), 0.0)
    cnt = jnp.maximum(jnp.sum(valid_tok, -1), 1).astype(jnp.float32)
    return (jnp.sum(x, axis=2) / cnt[..., None, None]).transpose(0, 2, 1, 3)

  def pool_k_f32_copy(k):
    x = k.reshape(B, nq, bs, K, H).astype(jnp.float32)
    m = valid_tok[..., None, None]
    cnt = jnp.maximum(jnp.sum(valid_tok, -1), 1).astype(jnp.float32)[..., None, None]
    pooled = jnp.concatenate([jnp.max(jnp.where(m, x, -jnp.inf), axis=2),
                              jnp.min(jnp.where(m, x, jnp.inf), axis=2),
                              jnp.sum(jnp.where(m, x, 0.0), axis=2) / cnt], axis=-1)
    return pooled.transpose(0, 2, 1, 3)

  s0 = jax.jit(scores)(q, k)
  rows = [("gate", lambda q, k: select_nz_ratio(scores(q, k), lengths, bs, args.density), (q, k)),
          ("gated", lambda q, k, v: block_sparse_attention(
              q, k, v, select_nz_ratio(scores(q, k), lengths, bs, args.density), lengths,
              block_size=bs, implementation=args.impl), (q, k, v)),
          ("select", lambda s: select_nz_ratio(s, lengths, bs, args.density), (s0,)),
          ("topk", lambda s: jax.lax.top_k(s, width)[1], (s0,)),
          ("topk_int32_keys", topk_int32_keys, (s0,)),
          ("pool_q", lambda q: pool_queries(q, lengths, bs), (q,)),
          ("pool_q_f32_copy", pool_q_f32_copy, (q,)), ("pool_q_dot", pool_q_dot, (q,)),
          ("pool_k", lambda k: pool_blocks(k, lengths, bs, token_major=True), (k,)),
          ("pool_k_f32_copy", pool_k_f32_copy, (k,))]
  if jax.default_backend() == "gpu":
    tri = dict(implementation="pallas_triton")
    rows[3:3] = [
        ("select_triton", lambda s: select_nz_ratio(s, lengths, bs, args.density, **tri), (s0,)),
        ("gated_triton", lambda q, k, v: block_sparse_attention(
            q, k, v, select_nz_ratio(scores(q, k), lengths, bs, args.density, **tri), lengths,
            block_size=bs, implementation=args.impl), (q, k, v))]
  fns = {name: jax.jit(fn) for name, fn, _ in rows}
  if "select_triton" in fns:
    np.testing.assert_array_equal(np.asarray(fns["select_triton"](s0)),
                                  np.asarray(fns["select"](s0)), err_msg="select_triton")

  # the formulations agree before anything is timed
  ref_q = np.asarray(fns["pool_q"](q))
  for name in ("pool_q_dot", "pool_q_f32_copy"):
    np.testing.assert_allclose(np.asarray(fns[name](q)), ref_q, rtol=1e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(np.asarray(fns["pool_k_f32_copy"](k)), np.asarray(fns["pool_k"](k)),
                             rtol=1e-5, atol=1e-6, err_msg="pool_k_f32_copy")
  agree = float(np.mean(np.asarray(fns["topk"](s0)) == np.asarray(fns["topk_int32_keys"](s0))))

  results = []
  for name, _, inputs in rows:
    fn = fns[name]
    jax.block_until_ready(fn(*inputs))
    t = trace_summary(fn, inputs, 1, top=args.top)
    results.append({"row": name, "busy_us": t["busy_us_per_call"], "span_us": t["span_us_per_call"],
                    "device": t["device"],
                    "kernels": [[e["name"], e["per_call_us"], e["count"]] for e in t["events"]]})
    print(f"== {name}: busy {t['busy_us_per_call']:.1f} us, span {t['span_us_per_call']:.1f} us",
          flush=True)
    for e in t["events"][:args.top]:
      print(f"  {e['per_call_us']:9.1f} us  x{e['count']:<3g} {e['name'][:100]}")
  meta = common.meta(shape={"B": B, "S": S, "Hq": N, "Hkv": K, "d": H, "block_size": bs,
                            "d_gate": args.d_gate, "density": args.density, "top_k_width": width},
                     timing="profiler kernel time of one call of each jitted row",
                     topk_int32_keys_agreement=agree)
  return common.finish(common.output_path(args, "profile_gate.json"), meta, results)


if __name__ == "__main__":
  sys.exit(main())
