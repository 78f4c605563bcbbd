"""Counting passes of the adaptive search as it ran in the kernel (`adaptive_jax.py`,
the code of block_topk(search="adaptive") at commit 18b1fa6, run as plain JAX on the CPU over
whole rows) against the ternary search (`sim.strat_ternary`) on the same rows; the selection is
checked against the reference.

  cd experiments/topk_search && JAX_PLATFORMS=cpu python3 kernel_passes.py [ROWS] [adaptive|interp2]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np

import adaptive_jax as bt
import interp2_jax
from sim import Search, gen, strat_ternary

N, K_LIST = 2048, (64, 205)
ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
SEARCH = {"adaptive": bt._adaptive_search, "interp2": interp2_jax._interp2_search}[
    sys.argv[2] if len(sys.argv) > 2 else "adaptive"]


@jax.jit
def passes(s_rows, k):
  def one(s):
    n = s.shape[0]
    ar = jnp.arange(n)
    forced = (ar == 0) | (ar == n - 1)
    x = jnp.where(s != s, -jnp.inf, s)
    x = jnp.where(forced, jnp.inf, x)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    key = jnp.where(bits < 0, bits ^ bt.INT32_MAX_POSITIVE, bits)
    at = bt._sample_at(jnp.int32(n))
    xs = s[at]
    use = (at != 0) & (at < n - 1) & (jnp.abs(xs) < jnp.inf)
    out = SEARCH(key, bt.INT32_MIN, jnp.int32(bt.KEY_ABOVE_ALL), jnp.int32(n),
                              jnp.int32(0), k, bt._sample_stats(xs, use), jnp.int32(2),
                              jnp.int32(n - 2))
    return out
  return jax.vmap(one)(s_rows)


rng = np.random.default_rng(0)
for d in ["gauss", "exp", "cauchy", "bf16", "uniform", "bimodal", "ties90", "offset", "nasty"]:
  for k in K_LIST:
    rows = np.stack([gen(d, N, rng) for _ in range(ROWS)])
    lo, hi, clo, chi, p = [np.asarray(a) for a in passes(jnp.asarray(rows), k)]
    tern, bad = [], 0
    for i, r in enumerate(rows):
      S = Search(r, N, k)
      strat_ternary(S)
      tern.append(S.npass)
      # the kernel's final selection from (lo, count_lo, count_hi)
      need = k if clo[i] == k else k - chi[i]
      key = S.key
      above, tie = key > lo[i], key == lo[i]
      sel = np.nonzero(above | (tie & (np.cumsum(tie) <= need)))[0]
      bad += not np.array_equal(sel, S.reference())
    print(f"{d:8s} k={k:3d}  {sys.argv[2] if len(sys.argv) > 2 else 'adaptive'} {p.mean():5.2f} / max {p.max():2d}   ternary "
          f"{np.mean(tern):5.2f} / max {np.max(tern):2d}   mismatches {bad}", flush=True)
