"""effjax.quant.kv and its layout: packing, quantisation error, the cache entry's writes (prefill,
decode steps that flush the residual, rewrites of packed rows), attention, and validation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import decoding
from effjax.config import ModelConfig
from effjax.model import forward, init_params
from effjax.quant import QuantKV, init_cache
from effjax.quant.kv import KVCacheSpec
from pallas_kernels.extend_attention.reference import extend_attention_reference
from pallas_kernels.lowbit_decode import layout
from tests.kernels._oracle import TOLERANCES

STATIC = ("bits", "group", "k_mode", "v_group", "dtype")


def random_kv(seed, B, T, K, H, offset=3.0):
  """k, v float32 [B, T, K, H]: normal, keys with per-channel offsets (as real keys have)."""
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((B, T, K, H)) + offset * rng.standard_normal((1, 1, K, H))
  return jnp.asarray(k, jnp.float32), jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)


def bkth(x, dtype):
  """[B, T, K, H] -> float32 numpy [B, K, T, H] of the values as the cache dtype holds them."""
  return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)).transpose(0, 2, 1, 3)


def f32(x):
  return np.asarray(x).astype(np.float32)


@functools.partial(jax.jit, static_argnums=1, static_argnames=STATIC)
def roundtrip(x, which, **kw):
  """(x_hat float32, per-element scale float32, codes) of x [..., T, H] quantised as K / V."""
  words, scale, zero = layout.quantize(x, which, **kw)
  kw.pop("dtype")
  x_hat = layout.dequantize(words, scale, zero, which, **kw)
  rows = layout.row_params(scale, which, group=kw["group"], k_mode=kw["k_mode"])
  s = jnp.repeat(rows, x.shape[-1] // rows.shape[-1], axis=-1).astype(jnp.float32)
  return x_hat, s, layout.unpack_codes(words, kw["bits"])


dequantize_f32 = jax.jit(layout.dequantize_cache, static_argnames=STATIC)


def assert_within_half_step(x, x_hat, s, out_dtype=jnp.float32):
  """|x - x_hat| <= scale / 2 per element, up to float32 rounding (and x_hat's rounding to
  out_dtype: half its relative spacing)."""
  x, x_hat, s = (np.asarray(a, np.float64) for a in (x, x_hat, s))
  slack = 1e-6 * (np.abs(x) + 16 * s) + np.abs(x_hat) * float(jnp.finfo(out_dtype).eps) / 2
  bad = np.abs(x - x_hat) > s / 2 + slack
  assert not bad.any(), f"{bad.sum()} elements off by more than half a step, worst " \
      f"{np.max(np.abs(x - x_hat) - s / 2)}"


# ------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("H", [64, 128, 256])
def test_pack_unpack_exact(bits, H):
  """Random codes round-trip exactly; channel i * W + c sits in word c at bits [i*bits, ...);
  all-ones codes set every bit (the int32 sign bit included)."""
  rng = np.random.default_rng(H + bits)
  codes = rng.integers(0, 2 ** bits, (2, 3, H)).astype(np.int32)
  codes[1, 2] = 2 ** bits - 1
  words = layout.pack_codes(jnp.asarray(codes), bits)
  W = H * bits // 32
  assert words.shape == (2, 3, W) and words.dtype == jnp.int32
  np.testing.assert_array_equal(layout.unpack_codes(words, bits), codes)
  u = np.asarray(words).view(np.uint32)
  for i in range(32 // bits):
    np.testing.assert_array_equal((u >> np.uint32(i * bits)) & np.uint32(2 ** bits - 1),
                                  codes[..., i * W:(i + 1) * W])
  np.testing.assert_array_equal(np.asarray(words[1, 2]), -1)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=str)
def test_dequantised_within_half_step(dtype, bits):
  """K per channel, K per token, V per token: every element within half of its stored step,
  including groups whose range is tiny against their offset (where a zero rounded to nearest in
  bf16 would be off by more than a step)."""
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((2, 2, 256, 64)) * rng.uniform(0.1, 4, (1, 1, 1, 64))
  x[0, 0, :64] = 100 + 0.01 * rng.standard_normal((64, 64))       # small range, large offset
  x[1, 1, :, :8] -= 50                                            # outlier channels
  x = jnp.asarray(x, dtype)
  for which, k_mode, v_group in (("k", "channel", 64), ("k", "token", 32), ("v", "token", 64)):
    x_hat, s, codes = roundtrip(x, which, bits=bits, group=64, k_mode=k_mode, v_group=v_group,
                                dtype=dtype)
    assert x_hat.dtype == jnp.float32 and int(codes.min()) >= 0 and int(codes.max()) < 2 ** bits
    assert_within_half_step(f32(x), x_hat, s)


def test_constant_groups_are_exact_not_nan():
  """A constant group (zero range) has scale 0 and codes 0: no NaN, x_hat == x."""
  x = np.zeros((1, 2, 128, 64), np.float32)
  x[0, 0] = 3.75
  x[0, 1, :, 3] = -1.5                            # one constant channel among zeros
  x = jnp.asarray(x, jnp.bfloat16)
  for which, k_mode in (("k", "channel"), ("k", "token"), ("v", "token")):
    x_hat, _s, codes = roundtrip(x, which, bits=4, group=64, k_mode=k_mode, v_group=64,
                                dtype=jnp.bfloat16)
    assert np.all(np.isfinite(x_hat))
    if k_mode == "channel":
      np.testing.assert_array_equal(x_hat, f32(x))
      assert not np.any(codes)


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
  """Why K is quantised per channel: a few outlier channels set every per-token scale."""
  rng = np.random.default_rng(0)
  k = rng.standard_normal((1, 2, 256, 128))
  k[..., :4] += 20
  k = jnp.asarray(k, jnp.bfloat16)
  err = {}
  for k_mode in ("channel", "token"):
    x_hat, _, _ = roundtrip(k, "k", bits=4, group=128, k_mode=k_mode, v_group=128,
                            dtype=jnp.bfloat16)
    err[k_mode] = np.mean(np.abs(x_hat - f32(k)))
  assert err["channel"] * 3 < err["token"], err


# ------------------------------------------------------------------------------- the entry


@functools.partial(jax.jit, static_argnames=("S", "window") + STATIC)
def direct_entry(k_BTKH, v_BTKH, packed, *, S, window, dtype, **settings):
  """The state a QuantKV must reach, built without its write: every row quantised directly
  (rows past packed_b are never read), residual = rows [packed_b, packed_b + R)."""
  _B, T, _K, _H = k_BTKH.shape
  pad = lambda x: jnp.pad(jnp.asarray(x, dtype).transpose(0, 2, 1, 3),
                          ((0, 0), (0, 0), (0, S + window - T), (0, 0)))
  k, v = pad(k_BTKH), pad(v_BTKH)
  kq = layout.quantize(k[:, :, :S], "k", **settings, dtype=dtype)
  vq = layout.quantize(v[:, :, :S], "v", **settings, dtype=dtype)
  res = jax.vmap(lambda x, p: jax.lax.dynamic_slice_in_dim(x, p, window, axis=1))
  packed = jnp.asarray(packed, jnp.int32)
  return QuantKV(*kq, *vq, res(k, packed), res(v, packed), packed, **settings)


# One shape for most entry tests (each distinct write compiles for a second or two on a CPU):
# B 2, K 2, H 64, S 512, 4 bits, groups of 64, R 128, bfloat16, prompts stored as T = 300 rows.
B, K, G, H, S, g, T, DT = 2, 2, 2, 64, 512, 64, 300, jnp.bfloat16


def prefilled(k, v, lengths=None, **settings):
  """A fresh entry (the shared shape unless settings say otherwise) after a prefill of k, v."""
  st = dict(bits=4, group=g, dtype=DT, **settings)
  e = QuantKV.init(B, K, S, H, **st)
  return e.write(k[:, :T], v[:, :T], None,
                 lengths_B=None if lengths is None else jnp.asarray(lengths, jnp.int32))


def test_prefill_packs_every_full_group():
  lengths = [300, 64]
  k, v = random_kv(0, B, T, K, H)
  e = prefilled(k, v, lengths)
  np.testing.assert_array_equal(e.packed_B, [256, 64])
  k_hat, v_hat = (f32(x) for x in e.dequantize())
  np.testing.assert_array_equal(f32(e.keys()), k_hat)
  kb, vb = bkth(k, DT), bkth(v, DT)
  for b, (n, p) in enumerate(zip(lengths, [256, 64])):
    np.testing.assert_array_equal(k_hat[b, :, p:n], kb[b, :, p:n])    # residual: exact
    np.testing.assert_array_equal(v_hat[b, :, p:n], vb[b, :, p:n])
    assert not np.any(k_hat[b, :, p + e.window:])                     # past the window: zeros
  s_k = np.repeat(f32(e.k_scale), g, axis=2)
  s_v = np.repeat(f32(e.v_scale), H, axis=3)
  assert_within_half_step(kb[0, :, :256], k_hat[0, :, :256], s_k[0, :, :256], DT)
  assert_within_half_step(vb[1, :, :64], v_hat[1, :, :64], s_v[1, :, :64], DT)


@pytest.mark.parametrize("bits,k_mode,dtype", [(4, "channel", DT), (2, "token", jnp.float16)],
                         ids=str)
def test_decode_steps_flush_like_direct_quantisation(bits, k_mode, dtype):
  """Ragged prefill, then one token a step: packed_B advances by R exactly when a residual fills,
  and the entry equals one quantised directly from the same tokens (codes, scales, residual),
  so attention over both agrees."""
  st = {"bits": bits, "group": g, "k_mode": k_mode, "v_group": 32 if k_mode == "token" else H}
  e = QuantKV.init(B, K, S, H, dtype, **st)
  R = e.window
  steps = R + 30
  lengths = np.asarray([100, 37])
  k, v = random_kv(1, B, 400, K, H)       # rows [0, T) prefilled, the next ones fed per step
  e = e.write(k[:, :T], v[:, :T], None, lengths_B=jnp.asarray(lengths, jnp.int32))
  want = lengths // g * g
  np.testing.assert_array_equal(e.packed_B, want)
  step = jax.jit(lambda e, k, v, pos: e.write(k, v, pos))
  k_np, v_np = np.asarray(k), np.asarray(v)
  take = lambda x, pos: x[np.arange(B), pos][:, None]
  flushed = 0
  for _ in range(steps):
    e = step(e, take(k_np, lengths), take(v_np, lengths), lengths.astype(np.int32))
    lengths = lengths + 1
    full = lengths - want >= R
    want = np.where(full, want + R, want)
    flushed += full.sum()
    np.testing.assert_array_equal(e.packed_B, want)
  assert flushed >= 2
  # sequence b holds tokens k[b, :length_b] (the prefill's, then one fed per step)
  d = direct_entry(k, v, want, S=S, window=R, dtype=dtype, **st)
  for b in range(B):
    p, n = want[b], lengths[b]
    kp = p // g if k_mode == "channel" else p
    for name, rows in (("k_packed", p), ("v_packed", p), ("k_scale", kp), ("k_zero", kp),
                       ("v_scale", p), ("v_zero", p)):
      np.testing.assert_array_equal(f32(getattr(e, name)[b, :, :rows]),
                                    f32(getattr(d, name)[b, :, :rows]), err_msg=name)
    for name in ("res_k", "res_v"):
      np.testing.assert_array_equal(f32(getattr(e, name)[b, :, :n - p]),
                                    f32(getattr(d, name)[b, :, :n - p]), err_msg=name)
  q = jnp.asarray(np.random.default_rng(2).standard_normal((B, 1, K * G, H)), dtype)
  pos = jnp.asarray(lengths - 1, jnp.int32)
  out = e.attend(q, pos, "xla")
  chex.assert_trees_all_close(f32(out), f32(d.attend(q, pos, "xla")), **TOLERANCES[dtype])
  # every block selected: the block-sparse form is the dense one
  every = jnp.broadcast_to(jnp.arange(S // 32, dtype=jnp.int32), (B, K, S // 32))
  sparse = e.attend_blocks(q.reshape(B, K, G, H), pos + 1, every, block_size=32)
  chex.assert_trees_all_close(f32(sparse), f32(out).reshape(B, K, G, H), **TOLERANCES[dtype])


def test_rewrites_roll_back_packed_groups_and_requantise():
  """ReSA's rectification rewrites the last f tokens, some of them packed: the groups from the
  first rewritten one on are rolled back -- kept full precision while the window holds fewer than
  R tokens (sequence 0), re-quantised once it holds R or more (sequence 1) --; rows before them
  keep their codes; the extend attention over the result is the masked reference's."""
  lengths, f = np.asarray([300, 200]), 80
  k, v = random_kv(3, B, T, K, H)
  e0 = prefilled(k, v, lengths)
  np.testing.assert_array_equal(e0.packed_B, [256, 192])
  k0, v0 = (f32(x) for x in e0.dequantize())
  start = lengths - f
  # seq 0: from 192 (group of 220), 108 tokens < R: residual; seq 1: from 64 (group of 120),
  # 136 tokens >= R: groups [64, 192) packed again, 8 tokens left in the residual
  p0s, want_packed = [192, 64], [192, 192]
  kn, vn = random_kv(f, B, f, K, H)
  e1 = e0.write(kn, vn, jnp.asarray(start, jnp.int32))
  np.testing.assert_array_equal(e1.packed_B, want_packed)
  k1, v1 = (f32(x) for x in e1.dequantize())
  s_k = np.repeat(f32(e1.k_scale), g, axis=2)
  s_v = np.repeat(f32(e1.v_scale), H, axis=3)
  new_k, new_v = bkth(kn, DT), bkth(vn, DT)
  for b in range(B):
    p0, p, st, n = p0s[b], want_packed[b], start[b], lengths[b]
    np.testing.assert_array_equal(e1.k_packed[b, :, :p0], e0.k_packed[b, :, :p0])
    np.testing.assert_array_equal(k1[b, :, :p0], k0[b, :, :p0])
    for got, old, new, s in ((k1, k0, new_k, s_k), (v1, v0, new_v, s_v)):
      lo = max(p, st)           # new rows from here are residual, exact
      np.testing.assert_array_equal(got[b, :, lo:n], new[b, :, lo - st:])
      if p > st:                # re-quantised new rows
        assert_within_half_step(new[b, :, :p - st], got[b, :, st:p], s[b, :, st:p], DT)
      keep = min(p, st)         # old rows [p0, st): re-quantised below p, kept exactly after
      np.testing.assert_array_equal(got[b, :, max(keep, p0):st], old[b, :, max(keep, p0):st])
      assert_within_half_step(old[b, :, p0:keep], got[b, :, p0:keep], s[b, :, p0:keep], DT)
  q = jnp.asarray(np.random.default_rng(f).standard_normal((B, f, K * G, H)), DT)
  out = e1.attend(q, jnp.asarray(start, jnp.int32), implementation="xla")
  q_BKFGH = q.reshape(B, f, K, G, H).transpose(0, 2, 1, 3, 4)
  kv = dequantize_f32(*e1.arrays(), e1.packed_B, **e1.settings())
  want = extend_attention_reference(q_BKFGH, *kv, jnp.asarray(start, jnp.int32))
  chex.assert_trees_all_close(f32(out), f32(want.transpose(0, 2, 1, 3, 4).reshape(out.shape)),
                              **TOLERANCES[DT])


def test_prefill_without_lengths_rolls_back_on_first_decode():
  """`decoding.prefill` stores all T rows (it does not pass the prompts' lengths): a short
  prompt's padding gets packed, and its first decode step, below packed_b, rolls that group back;
  the rows before the new token keep their dequantised values."""
  k, v = random_kv(5, B, T, K, H)
  e = prefilled(k, v)
  np.testing.assert_array_equal(e.packed_B, [256, 256])
  before = f32(e.keys())
  kn, vn = random_kv(6, B, 1, K, H)
  e = e.write(kn, vn, jnp.asarray([300, 70], jnp.int32))
  np.testing.assert_array_equal(e.packed_B, [256, 64])
  after = f32(e.keys())
  np.testing.assert_array_equal(after[0, :, 300], bkth(kn, DT)[0, :, 0])
  np.testing.assert_array_equal(after[1, :, 70], bkth(kn, DT)[1, :, 0])
  np.testing.assert_array_equal(after[0, :, :300], before[0, :, :300])
  np.testing.assert_array_equal(after[1, :, :70], before[1, :, :70])


def test_model_decodes_on_the_quant_cache():
  """The model runs on a QuantKV cache unchanged (ragged prompts prefilled, decode steps that
  roll back and flush): logits stay close to the uncached forward's."""
  cfg = ModelConfig(vocab_size=259, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                    max_seq_len=64, compute_dtype="float32", attention_impl="xla")
  params = init_params(cfg, jax.random.key(0))
  Tp, extra = 20, 30
  full = np.random.default_rng(0).integers(0, 256, (2, Tp + extra)).astype(np.int32)
  lengths = np.asarray([20, 5], np.int32)
  ref = np.asarray(forward(cfg, params, jnp.asarray(full)))
  cache = init_cache(cfg, 2, 64, jnp.float32, bits=4, group=16, window=32)
  assert isinstance(cache.layers[0], QuantKV) and len(cache.layers) == cfg.n_layers
  logits, cache = decoding.prefill(cfg, params, jnp.asarray(full[:, :Tp]), jnp.asarray(lengths),
                                   cache)
  err = [np.abs(np.asarray(logits) - ref[[0, 1], lengths - 1]).max()]
  for s in range(extra):
    logits, cache = decoding.decode_step(cfg, params, cache, jnp.asarray(full[[0, 1], lengths + s]),
                                         "xla")
    err.append(np.abs(np.asarray(logits) - ref[[0, 1], lengths + s]).max())
  # seq 0: 20 prompt rows (16 packed) + 30 -> 48 packed; seq 1: the padding group rolled back at
  # position 5, then 32 packed when its residual filled
  np.testing.assert_array_equal(cache.layers[0].packed_B, [48, 32])
  assert err[0] < 1e-4 and max(err) < 0.05, err


def test_step_flush_decides_once_and_writes_the_same_cache():
  """flush="step": decode_step / extend run all layers under one lax.cond (the jaxpr has one cond,
  "layer" one per layer) and give bit-for-bit the logits and cache of "layer", across steps that
  only append, steps whose residual fills (one sequence, or both), and an extend whose rows roll
  packed groups back."""
  cfg = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=96, compute_dtype="float32", attention_impl="xla")
  params = init_params(cfg, jax.random.key(1))
  toks = np.random.default_rng(1).integers(0, 256, (2, 80)).astype(np.int32)
  lengths = np.asarray([21, 6], np.int32)

  def run(flush):
    cache = init_cache(cfg, 2, 96, jnp.float32, bits=4, group=16, window=32, flush=flush)
    out, cache = decoding.prefill(cfg, params, jnp.asarray(toks[:, :21]), jnp.asarray(lengths),
                                  cache)
    outs = [out]
    for s in range(40):
      out, cache = decoding.decode_step(cfg, params, cache,
                                        jnp.asarray(toks[[0, 1], lengths + s]), "xla")
      outs.append(out)
    # rewrite the last 5 tokens of each sequence (back across a packed group boundary in one)
    start = cache.lengths - 5
    out, cache = decoding.extend(cfg, params, cache, jnp.asarray(toks[:, 60:65]), start, "xla")
    outs.append(out)
    return outs, cache

  def conds(flush):
    cache = init_cache(cfg, 2, 96, jnp.float32, bits=4, group=16, window=32, flush=flush)
    jaxpr = jax.make_jaxpr(decoding.decode_step.__wrapped__, static_argnums=(0, 4))(
        cfg, params, cache, jnp.zeros((2,), jnp.int32), "xla")

    def count(jx):                      # cond equations, nested jaxprs included (not branches')
      n = 0
      for eqn in jx.eqns:
        n += eqn.primitive.name == "cond"
        for v in eqn.params.values():
          if hasattr(v, "jaxpr") and eqn.primitive.name != "cond":
            n += count(v.jaxpr)
      return n
    return count(jaxpr.jaxpr)

  assert conds("step") == 1 and conds("layer") == cfg.n_layers
  (a, ca), (b, cb) = run("layer"), run("step")
  assert [np.asarray(c.packed_B).tolist() for c in cb.layers] == [[48, 32]] * 2
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="flush must be one of layer, step, loop"):
    init_cache(cfg, 2, 96, bits=4, group=16, flush="token")
  with pytest.raises(ValueError, match="path must be None"):
    cb.layers[0].write(jnp.zeros((2, 1, 2, 16)), jnp.zeros((2, 1, 2, 16)), cb.lengths,
                       path="later")


def test_loop_flush_appends_until_full_then_packs():
  """flush="loop": steps that only append let a residual fill to R tokens, then `flush_full`
  packs it. Against the per-layer path, a host loop of such steps gives bit-for-bit the same
  logits until the first step whose token fills a window (attended in full precision there,
  quantised in the other path), close ones after it, and the same packed first layer (its K / V
  do not depend on attention); `generate` runs that loop on the device (runs of append-only
  steps, a flush between) and produces its greedy tokens."""
  cfg = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=96, compute_dtype="float32", attention_impl="xla")
  params = init_params(cfg, jax.random.key(2))
  toks = np.random.default_rng(2).integers(0, 256, (2, 80)).astype(np.int32)
  lengths = np.asarray([21, 6], np.int32)
  make = lambda flush: decoding.prefill(
      cfg, params, jnp.asarray(toks[:, :21]), jnp.asarray(lengths),
      init_cache(cfg, 2, 96, jnp.float32, bits=4, group=16, window=32, flush=flush))[1]
  ref, loop = make("layer"), make("loop")
  fills, flushes, first_fill = 0, 0, None
  for s in range(40):
    tok = jnp.asarray(toks[[0, 1], lengths + s])
    full = np.asarray(ref.lengths) + 1 - np.asarray(ref.layers[0].packed_B) >= 32   # fills now
    a, ref = decoding.decode_step(cfg, params, ref, tok, "xla")
    b, loop = decoding.decode_step(cfg, params, loop, tok, "xla", "append")
    a, b = np.asarray(a), np.asarray(b)
    if full.any():
      fills += int(full.sum())
      first_fill = s if first_fill is None else first_fill
      assert not np.array_equal(a[full], b[full])
    if first_fill is None:
      np.testing.assert_array_equal(a, b)
    assert np.abs(a - b).max() < 0.05
    if bool(loop.flush_needed()):
      flushes += 1
      loop = loop.flush_full()
      assert not bool(loop.flush_needed())
      L = np.asarray(loop.lengths)
      er, el = ref.layers[0], loop.layers[0]
      np.testing.assert_array_equal(np.asarray(er.packed_B), np.asarray(el.packed_B))
      for xr, xl in zip(er.dequantize(), el.dequantize()):    # what is stored up to each length
        for i in range(2):
          np.testing.assert_array_equal(np.asarray(xr)[i, :, :L[i]], np.asarray(xl)[i, :, :L[i]])
  assert fills == 2 and flushes == 2            # one window filled in each sequence
  # generate: its greedy tokens are those of the same loop fed its own argmax
  out, _ = decoding.generate(cfg, params, jnp.asarray(toks[:, :21]), jnp.asarray(lengths),
                             jax.random.key(0), max_new_tokens=30, decode_impl="xla",
                             kv_cache=KVCacheSpec("int4", group=16, window=32, flush="loop"))
  cache = make("loop")
  logits = decoding.prefill(cfg, params, jnp.asarray(toks[:, :21]), jnp.asarray(lengths),
                            init_cache(cfg, 2, 96, jnp.float32, bits=4, group=16, window=32))[0]
  want = []
  for s in range(30):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    want.append(np.asarray(tok))
    logits, cache = decoding.decode_step(cfg, params, cache, tok, "xla", "append")
    if bool(cache.flush_needed()):
      cache = cache.flush_full()
  np.testing.assert_array_equal(np.asarray(out), np.stack(want, axis=1))


# --------------------------------------------------------------------------------- validation


_BASE = {"batch": 2, "n_kv_heads": 2, "capacity": 512, "head_dim": 64, "dtype": jnp.bfloat16}


@pytest.mark.parametrize("over,match", [
    ({"bits": 3}, "bits must be 4 or 2"),
    ({"bits": 8}, "bits must be 4 or 2"),
    ({"group": 48}, "capacity 512 must be a positive multiple of group=48"),
    ({"group": 0}, "group must be a positive int"),
    ({"group": 64, "window": 96}, "window must be a positive multiple of group=64"),
    ({"group": 128, "window": 64}, "window must be a positive multiple of group=128"),
    ({"head_dim": 20}, "head_dim \\* bits must be a positive multiple of 32"),
    ({"head_dim": 24, "bits": 2}, "head_dim \\* bits must be a positive multiple of 32"),
    ({"dtype": jnp.int8}, "cache dtype must be float32, bfloat16 or float16"),
    ({"k_mode": "tensor"}, "k_mode must be 'channel' or 'token'"),
    ({"v_group": 48}, "v_group must divide head_dim=64"),
    ({"v_group": 16}, "be a multiple of 32"),
])
def test_invalid_settings_raise(over, match):
  with pytest.raises(ValueError, match=match):
    QuantKV.init(**{**_BASE, **over})


def test_bad_calls_raise_before_compute():
  e = QuantKV.init(**_BASE, group=64)
  k, v = random_kv(0, 2, 4, 2, 64)
  with pytest.raises(ValueError, match="block_size must be a positive int dividing group=64"):
    e.attend_blocks(jnp.ones((2, 2, 2, 64), jnp.bfloat16), jnp.asarray([10, 10]),
                    jnp.zeros((2, 2, 1), jnp.int32), block_size=48)
  with pytest.raises(ValueError, match=r"k_BTKH must be \[B=2, T, K=2, H=64\]"):
    e.write(k[:, :, :1], v, None)
  with pytest.raises(ValueError, match="must have one shape"):
    e.write(k, v[:, :2], None)
  with pytest.raises(ValueError, match="start_B must lie in"):
    e.write(k, v, jnp.asarray([0, 510]))
  with pytest.raises(ValueError, match="lengths_B must lie in"):
    e.write(k, v, None, lengths_B=jnp.asarray([5, 1]))
  with pytest.raises(ValueError, match="lengths_B goes with a prefill"):
    e.write(k, v, jnp.asarray([0, 0]), lengths_B=jnp.asarray([4, 4]))
  with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
    init_cache(ModelConfig(max_seq_len=256), 1, 512)
