"""A cheaper adaptive k-th-largest search for `block_topk`, as plain JAX written the way the
Triton kernel would run it (commit e2e026a; not built into the kernel, not timed). Each pass
places only TWO thresholds, with fixed 16-bit count packing (no bit-length chain):
- if the bracket's ends are finite values, by linear interpolation in rank between them;
- otherwise from the row's normal model (32 sampled scores): two log / sqrt evaluations.
A model pass that does not halve the keys in the bracket is followed by one ternary key-split
pass. After MODEL_PASSES model passes it falls back to the key split, and it finishes r = 1 with
one max pass. Exact by construction, like `adaptive_jax.py`, whose helpers it reuses. The point
is a pass of ~60 scalar operations instead of 1,077 (../../benchmarks/results/NVIDIA_H200/
topk_adaptive_experiment/README.md); `kernel_passes.py --search interp2` counts its passes.
"""

import jax.numpy as jnp
from jax import lax

from adaptive_jax import INT32_MIN, _key_of, _value_of, _z_upper  # noqa: F401

MODEL_PASSES = 6


def _interp2_search(key, lo, hi, count_lo, count_hi, k, stats, n_forced, n_finite):
  mu, sd, stats_ok = stats
  nf = jnp.maximum(n_finite, 1).astype(jnp.float32)
  kf = jnp.float32(k)

  def more(c):
    lo, hi, count_lo, count_hi = c[:4]
    return (count_lo != k) & (hi - lo != 1) & (k - count_hi != 1)

  def step(c):
    lo, hi, count_lo, count_hi, g, n_model, split_next, passes = c
    m = count_lo - count_hi
    r = k - count_hi
    mf, rf = m.astype(jnp.float32), r.astype(jnp.float32)
    clo_f, chi_f = count_lo.astype(jnp.float32), count_hi.astype(jnp.float32)
    vlo, vhi = _value_of(lo), _value_of(hi)
    closed = jnp.isfinite(vlo) & jnp.isfinite(vhi)
    use_model = (n_model < MODEL_PASSES) & ~split_next & (closed | (stats_ok & (sd > 0)))
    spread = g * jnp.sqrt(jnp.maximum(rf * (mf - rf), 1.0) / mf)
    du = jnp.where(closed, 2.0, 8.0) * spread
    c1 = jnp.clip(kf - 0.5 + du, chi_f + 0.5, clo_f - 0.5)   # more keys above: the lower value
    c2 = jnp.clip(kf - 0.5 - du, chi_f + 0.5, clo_f - 0.5)
    # closed: linear in rank between (vlo, count_lo) and (vhi, count_hi)
    span = (vhi - vlo) / mf
    v1c, v2c = vhi - (c1 - chi_f) * span, vhi - (c2 - chi_f) * span
    # open: the normal model, anchored at the finite end if there is one
    def zc(c):
      return _z_upper(jnp.clip((c - n_forced.astype(jnp.float32)) / nf, 0.5 / nf, 1.0 - 0.5 / nf))
    z1, z2 = zc(c1), zc(c2)
    base = jnp.where(jnp.isfinite(vlo), vlo - zc(clo_f) * sd,
                     jnp.where(jnp.isfinite(vhi), vhi - zc(chi_f) * sd, mu))
    v1 = jnp.where(closed, v1c, base + z1 * sd)
    v2 = jnp.where(closed, v2c, base + z2 * sd)
    # key split (ternary), the fallback
    half = lax.shift_right_logical(hi - lo, 1)
    third = jnp.maximum(half // 3 + half // 3, 1)
    s1, s2 = lo + third, lo + third + third
    k1 = jnp.where(use_model, _key_of(v1), s1)
    k2 = jnp.where(use_model, _key_of(v2), s2)
    k1 = jnp.minimum(jnp.maximum(k1, lo + 1), hi - 1)
    k2 = jnp.minimum(jnp.maximum(k2, k1), hi - 1)             # k1 <= k2
    inb = (key >= lo) & (key < hi)
    packed = jnp.sum(jnp.where(inb & (key >= k1), 1, 0)
                     + jnp.where(inb & (key >= k2), 1 << 16, 0))
    n1 = count_hi + (packed & 0xFFFF)
    n2 = count_hi + lax.shift_right_logical(packed, 16)
    new_lo = jnp.where(n2 >= k, k2, jnp.where(n1 >= k, k1, lo))
    new_clo = jnp.where(n2 >= k, n2, jnp.where(n1 >= k, n1, count_lo))
    new_hi = jnp.where(n2 >= k, hi, jnp.where(n1 >= k, k2, k1))
    new_chi = jnp.where(n2 >= k, count_hi, jnp.where(n1 >= k, n2, n1))
    outer = (n2 >= k) | (n1 < k)
    g = jnp.where(use_model & outer, g * 4.0, jnp.float32(1.0))
    split_next = use_model & ((new_clo - new_chi) * 2 > m)
    return (new_lo, new_hi, new_clo, new_chi, g, n_model + use_model.astype(jnp.int32),
            split_next, passes + 1)

  init = (lo, hi, count_lo, count_hi, jnp.float32(1.0), jnp.int32(0), count_hi != count_hi,
          jnp.int32(0))
  lo, hi, count_lo, count_hi, *_, passes = lax.while_loop(more, step, init)

  def max_pass(c):
    lo, hi, count_lo, count_hi, go = c
    t = jnp.max(jnp.where((key >= lo) & (key < hi), key, INT32_MIN))
    return t, t + 1, count_hi - count_hi - 1, count_hi, go & (t != t)

  go = (count_lo != k) & (hi - lo != 1) & (k - count_hi == 1)
  lo, hi, count_lo, count_hi, _ = lax.while_loop(lambda c: c[4], max_pass,
                                                 (lo, hi, count_lo, count_hi, go))
  return lo, hi, count_lo, count_hi, passes + go.astype(jnp.int32)
