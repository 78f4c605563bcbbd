"""The adaptive k-th-largest search of block_topk(search="adaptive") at commit
18b1fa6, kept here as plain JAX after it was removed from the kernel: on the H200 it needed ~3
passes on Gaussian rows against ~10 for the ternary search, but took 16.6 against 5.8 us
(README.md). Used by kernel_passes.py to count passes."""

import jax.numpy as jnp
import numpy as np
from jax import lax

INT32_MIN = np.int32(-2**31)
INT32_MAX_POSITIVE = np.int32(2**31 - 1)
KEY_ABOVE_ALL = np.int32(0x7F800001)

# ----------------------------------------------------------------------------------------------
# The adaptive search (`search="adaptive"`): thresholds placed by a model of the row instead of by
# thirds of the key range. experiments/topk_search/ simulated it ("AD-sample dyn": ~3 passes on
# Gaussian rows, 5 on Cauchy, never more than the ternary search's worst case) against ~10 for
# the ternary search. Exactness never depends on the model: every threshold is clamped into the
# bracket (lo, hi) and counted exactly, so a bad model only costs passes.
NMAX = 8            # thresholds per pass at most (8 fields of 4 bits: keys in the bracket < 16)
MODEL_PASSES = 4    # model-placed passes before the key-split fallback (keeps the worst case)


def _key_of(v):
  """float32 -> its int32 order key (NaN -> above +inf: clamped away by the caller)."""
  bits = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ INT32_MAX_POSITIVE, bits)


def _value_of(key):
  """int32 order key -> float32 (keys past +-inf give NaN: `jnp.isfinite` then says no)."""
  bits = jnp.where(key < 0, key ^ INT32_MAX_POSITIVE, key)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _z_upper(p):
  """z with P(Z > z) = p for a standard normal (Abramowitz-Stegun 26.2.23, |err| < 4.5e-4)."""
  p = jnp.clip(p, 1e-7, 1.0 - 1e-7)
  q = jnp.minimum(p, 1.0 - p)
  t = jnp.sqrt(-2.0 * jnp.log(q))
  z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (
      1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
  return jnp.where(p < 0.5, z, -z)


def _bit_length(m):
  """bit_length of a scalar int32 in [0, 2^16]: the field width that holds counts up to m."""
  b = jnp.int32(0)
  for t in range(17):
    b = b + (m >= (1 << t)).astype(jnp.int32)
  return jnp.maximum(b, 1)


def _adaptive_search(key, lo, hi, count_lo, count_hi, k, stats, n_forced, n_finite):
  """Bracket search with model-placed thresholds; returns (lo, hi, count_lo, count_hi) in the
  ternary search's convention. `stats` = (mu, sd, ok) of the row's finite scores."""
  mu, sd, stats_ok = stats
  nf = jnp.maximum(n_finite, 1).astype(jnp.float32)

  def zc(c):       # a count of keys >= v -> the z of v under the row's normal model
    p = (c - n_forced.astype(jnp.float32)) / nf
    return _z_upper(jnp.clip(p, 0.5 / nf, 1.0 - 0.5 / nf))

  def more(c):
    lo, hi, count_lo, count_hi = c[:4]
    # r = k - count_hi == 1 is finished by one max pass after the loop
    return (count_lo != k) & (hi - lo != 1) & (k - count_hi != 1)

  def step(c):
    lo, hi, count_lo, count_hi, g, n_model, split_next = c
    m = count_lo - count_hi                          # keys in [lo, hi)
    r = k - count_hi                                 # rank of the k-th largest among them
    b = _bit_length(m)
    n = jnp.minimum(32 // b, NMAX)                   # thresholds this pass (>= 2)
    mf, rf = m.astype(jnp.float32), r.astype(jnp.float32)
    vlo, vhi = _value_of(lo), _value_of(hi)
    fin_lo, fin_hi = jnp.isfinite(vlo), jnp.isfinite(vhi)
    closed = fin_lo & fin_hi
    zl, zh = zc(count_lo.astype(jnp.float32)), zc(count_hi.astype(jnp.float32))
    spread = g * jnp.sqrt(jnp.maximum(rf * (mf - rf), 1.0) / mf)
    use_model = (n_model < MODEL_PASSES) & ~split_next & (closed | (stats_ok & (sd > 0)))
    # key split: n thresholds evenly over [lo, hi) (width as unsigned: compare with != only)
    half = lax.shift_right_logical(hi - lo, 1)
    kstep = jnp.maximum((half // (n + 1)) * 2, 1)
    nm1 = jnp.maximum(n - 1, 1).astype(jnp.float32)
    cands = []
    for j in range(NMAX):
      jf = jnp.float32(j)
      t = (jf - (n.astype(jnp.float32) - 1.0) / 2.0) / (nm1 / 2.0)   # -1 .. 1 over the n
      u = jnp.where(closed, 2.0 * t, 8.0 * t * jnp.sqrt(jnp.abs(t)))
      cnt = jnp.clip(k - 0.5 + spread * u, count_hi.astype(jnp.float32) + 0.5,
                     count_lo.astype(jnp.float32) - 0.5)
      z = zc(cnt)
      v_closed = jnp.where(zh - zl > 1e-6, vlo + (z - zl) / (zh - zl) * (vhi - vlo),
                           vhi - (cnt - count_hi.astype(jnp.float32)) / mf * (vhi - vlo))
      v_open = jnp.where(fin_lo, vlo + (z - zl) * sd,
                         jnp.where(fin_hi, vhi - (zh - z) * sd, mu + z * sd))
      c_model = _key_of(jnp.where(closed, v_closed, v_open))
      c_model = jnp.where(c_model != c_model, hi - 1, c_model)       # (no NaN keys; kept total)
      c_split = lo + jnp.int32(j + 1) * kstep
      cj = jnp.where(use_model, c_model, c_split)
      # into the bracket: lo < c <= hi - 1 (as signed keys; the bracket never wraps)
      cj = jnp.minimum(jnp.maximum(cj, lo + 1), hi - 1)
      cands.append(jnp.where(j < n, cj, cands[0] if cands else cj))
    # one packed count of the keys in [lo, hi) at or above each threshold (fields of b bits)
    inb = (key >= lo) & (key < hi)
    acc = jnp.zeros_like(key)
    for j in range(NMAX):
      sh = jnp.where(j < n, jnp.int32(j) * b, 0)
      acc = acc + jnp.where(inb & (key >= cands[j]) & (j < n), lax.shift_left(jnp.int32(1), sh), 0)
    packed = jnp.sum(acc)
    mask = lax.shift_left(jnp.int32(1), b) - 1
    new_lo, new_hi, new_clo, new_chi = lo, hi, count_lo, count_hi
    for j in range(NMAX):
      sh = jnp.where(j < n, jnp.int32(j) * b, 0)
      nj = count_hi + (lax.shift_right_logical(packed, sh) & mask)
      ge = nj >= k
      new_lo = jnp.where(ge, jnp.maximum(new_lo, cands[j]), new_lo)
      new_clo = jnp.where(ge, jnp.minimum(new_clo, nj), new_clo)
      new_hi = jnp.where(ge, new_hi, jnp.minimum(new_hi, cands[j]))
      new_chi = jnp.where(ge, new_chi, jnp.maximum(new_chi, nj))
    new_m = new_clo - new_chi
    outer = (new_lo == lo) | (new_hi == hi)          # the k-th key fell outside the thresholds
    g = jnp.where(use_model & outer, g * 4.0, jnp.float32(1.0))
    split_next = use_model & (new_m * 2 > m)          # a model pass that did not halve m
    n_model = n_model + use_model.astype(jnp.int32)
    return (new_lo, new_hi, new_clo, new_chi, g, n_model,
            split_next)

  def counted(c):
    return step(c[:-1]) + (c[-1] + 1,)

  init = (lo, hi, count_lo, count_hi, jnp.float32(1.0), jnp.int32(0), jnp.bool_(False),
          jnp.int32(0))
  out = lax.while_loop(lambda c: more(c[:-1]), counted, init)
  lo, hi, count_lo, count_hi, passes = *out[:4], out[-1]

  # r == 1: the k-th key is the largest in [lo, hi) -- one max pass (at most one iteration)
  def max_more(c):
    return c[4]

  def max_pass(c):
    lo, hi, count_lo, count_hi, go = c
    t = jnp.max(jnp.where((key >= lo) & (key < hi), key, INT32_MIN))
    # #(key > t) = count_hi (t is the largest key below hi): the ties to take are k - count_hi.
    # (Loop outputs derived from traced values: Pallas-Triton cannot yield a literal.)
    return t, t + 1, count_hi - count_hi - 1, count_hi, go & (t != t)

  go = (count_lo != k) & (hi - lo != 1) & (k - count_hi == 1)
  lo, hi, count_lo, count_hi, _ = lax.while_loop(max_more, max_pass,
                                                 (lo, hi, count_lo, count_hi, go))
  return lo, hi, count_lo, count_hi, passes + go.astype(jnp.int32)


def _sample_stats(x, use):
  """(mean, sd, usable) of the sampled scores x [32] where `use`."""
  w = use.astype(jnp.float32)
  n_s = jnp.sum(w)
  mu = jnp.sum(jnp.where(use, x, 0.0)) / jnp.maximum(n_s, 1.0)
  var = jnp.sum(jnp.where(use, (x - mu) * (x - mu), 0.0)) / jnp.maximum(n_s - 1.0, 1.0)
  sd = jnp.sqrt(var)
  return mu, sd, (n_s >= 2.0) & (jnp.abs(mu) < jnp.inf) & (jnp.abs(sd) < jnp.inf)


def _sample_at(nvalid):
  """The 32 evenly spaced valid block ids the adaptive search samples."""
  j32 = lax.broadcasted_iota(jnp.int32, (32,), 0)
  return ((2 * j32 + 1) * nvalid) // 64
