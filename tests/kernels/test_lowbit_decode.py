"""pallas_kernels.lowbit_decode: one test base, subclassed once per backend, against a float64
oracle over a cache dequantised by an independent numpy unpacker."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention.reference import masked_attention_reference
from pallas_kernels.lowbit_decode import (
  layout,
  lowbit_decode_attention,
  lowbit_decode_attention_reference,
  lowbit_extend_attention,
)

from ._oracle import BackendBase, check_close, generate_from_class, length_valid, oracle

pytest_generate_tests = generate_from_class


@functools.partial(jax.jit, static_argnames=("bits", "group", "k_mode", "v_group", "dtype"))
def quantize_kv(k, v, **kw):
  """(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero) of dense k / v [B, K, S, H]; jitted:
  one compile per shape instead of eager op-by-op dispatch."""
  return (*layout.quantize(k, "k", **kw), *layout.quantize(v, "v", **kw))


# (B, K, G, H, S, lengths, packed, bits, group, window, k_mode, v_group): ragged lengths that are
# not group multiples, residual windows empty / partly full / full (length - packed = R), an empty
# sequence, packed rows past the length (a prefill that packed padding), H 64 / 128 / 256, both
# k_modes, both bit widths, channel groups of V.
CASES = [
    (2, 2, 2, 64, 512, [300, 77], [256, 64], 4, 64, 128, "channel", 64),
    (2, 2, 2, 128, 512, [512, 130], [384, 128], 2, 128, 256, "channel", 128),
    (1, 2, 4, 256, 512, [450], [384], 4, 128, 128, "token", 128),
    (3, 1, 2, 128, 256, [0, 256, 100], [0, 128, 128], 4, 64, 128, "channel", 32),
    (1, 1, 2, 64, 256, [193], [192], 2, 64, 256, "token", 32),
]
# (case, block_size, M): block sizes dividing the group, M past the number of blocks too.
SPARSE_CASES = [(CASES[0], 16, 9), (CASES[1], 64, 4), (CASES[2], 128, 6), (CASES[3], 32, 3),
                (CASES[4], 64, 2)]


def unpack_np(words, bits):
  """Independent numpy unpacker: channel i * W + c = bits [i * bits, (i + 1) * bits) of word c."""
  u = np.asarray(words).view(np.uint32)
  per = 32 // bits
  parts = [(u >> np.uint32(i * bits)) & np.uint32((1 << bits) - 1) for i in range(per)]
  return np.concatenate(parts, axis=-1).astype(np.float64)


def dequant_np(cache, lengths, packed, bits, group, k_mode, v_group):
  """(k, v) float64 [B, K, S, H]: packed rows below packed_b, residual rows [packed_b, length_b)."""
  kp, ks, kz, vp, vs, vz, rk, rv = (np.asarray(x) for x in cache)
  H = rk.shape[-1]

  def deq(words, scale, zero, per_channel):
    c = unpack_np(words, bits)
    if per_channel:
      s, z = np.repeat(scale, group, axis=-2), np.repeat(zero, group, axis=-2)
    else:
      r = H // scale.shape[-1]
      s, z = np.repeat(scale, r, axis=-1), np.repeat(zero, r, axis=-1)
    return c * s.astype(np.float32).astype(np.float64) + z.astype(np.float32).astype(np.float64)

  k = deq(kp, ks, kz, k_mode == "channel")
  v = deq(vp, vs, vz, False)
  for b, (n, p) in enumerate(zip(lengths, packed)):
    if n > p:
      k[b, :, p:n] = rk[b, :, :n - p].astype(np.float32)
      v[b, :, p:n] = rv[b, :, :n - p].astype(np.float32)
  return k, v


def random_cache(seed, B, K, S, H, R, bits, group, k_mode, v_group, dtype):
  """A packed cache of random keys / values (keys with per-channel offsets, as real keys have)
  quantised over all S rows, plus a random residual window: rows the op must not read (packed
  rows past packed_b, residual slots past the length) hold real-looking garbage, never zeros."""
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((B, K, S, H)) + 3 * rng.standard_normal((1, K, 1, H))
  v = rng.standard_normal((B, K, S, H))
  kw = {"bits": bits, "group": group, "k_mode": k_mode, "v_group": v_group, "dtype": dtype}
  res = [jnp.asarray(rng.standard_normal((B, K, R, H)), dtype) for _ in range(2)]
  return (*quantize_kv(jnp.asarray(k, dtype), jnp.asarray(v, dtype), **kw), *res)


def make_case(case, dtype, seed=0):
  B, K, G, H, S, _lengths, _packed, bits, group, R, k_mode, v_group = case
  cache = random_cache(seed + S + H, B, K, S, H, R, bits, group, k_mode, v_group, dtype)
  q = jnp.asarray(np.random.default_rng(seed).standard_normal((B, K, G, H)), dtype)
  settings = {"bits": bits, "group": group, "k_mode": k_mode, "v_group": v_group}
  return q, cache, settings


def random_blocks(seed, B, K, n_blocks, M):
  """int32 [B, K, M]: per (b, k) a random ascending set of distinct blocks, -1 padded."""
  rng = np.random.default_rng(seed)
  out = np.full((B, K, M), -1, np.int32)
  for b in range(B):
    for k in range(K):
      n = rng.integers(0, min(M, n_blocks) + 1)
      out[b, k, :n] = np.sort(rng.choice(n_blocks, n, replace=False))
  return out


def block_valid(idx, lengths, block_size, S):
  B, K, _ = idx.shape
  sel = np.zeros((B, K, S), bool)
  for b in range(B):
    for k in range(K):
      for j in idx[b, k]:
        if j >= 0:
          sel[b, k, j * block_size:(j + 1) * block_size] = True
  return sel & length_valid(lengths, K, S)


class LowbitDecodeBase(BackendBase):
  """What every implementation of lowbit_decode_attention must do."""
  CASES = CASES
  SPARSE_CASES = SPARSE_CASES
  DTYPES = (jnp.bfloat16, jnp.float16)

  def run(self, q, cache, lengths, packed, settings, **kw):
    return lowbit_decode_attention(q, *cache, jnp.asarray(lengths, jnp.int32),
                                   jnp.asarray(packed, jnp.int32), **settings, **self.kw, **kw)

  def test_dense_matches_oracle(self, dtype, case):
    """Every token below the length: packed rows dequantised, the residual after them."""
    q, cache, st = make_case(case, dtype)
    lengths, packed = case[5], case[6]
    out = self.run(q, cache, lengths, packed, st)
    assert out.shape == q.shape and out.dtype == dtype
    k, v = dequant_np(cache, lengths, packed, **st)
    check_close(out, oracle(q, k, v, length_valid(lengths, q.shape[1], k.shape[2])), dtype)

  def test_sparse_matches_oracle(self):
    """Selected blocks only (some past the length, -1 padded, rows with nothing selected)."""
    dtype = self.DTYPES[0]
    for i, (case, bs, M) in enumerate(self.SPARSE_CASES):
      q, cache, st = make_case(case, dtype, seed=i)
      lengths, packed = case[5], case[6]
      B, K, S = q.shape[0], q.shape[1], case[4]
      idx = random_blocks(i + bs, B, K, S // bs, M)
      out = self.run(q, cache, lengths, packed, st, block_indices_BKM=jnp.asarray(idx),
                     block_size=bs)
      k, v = dequant_np(cache, lengths, packed, **st)
      check_close(out, oracle(q, k, v, block_valid(idx, lengths, bs, S)), dtype)

  def test_close_to_dense_cache(self):
    """Against attention over the unquantised cache, the error is the quantisation's: i.i.d.
    normal keys / values are the hard case (no structure, near-uniform attention), where the
    relative L2 error measured 0.13 at 4 bits and 0.90 at 2 bits (per-token V steps of ~1.8
    sigma); it must shrink ~4x per 2 bits."""
    B, K, G, H, S, R, g, dtype = 2, 2, 4, 128, 512, 128, 128, jnp.bfloat16
    rng = np.random.default_rng(0)
    k = rng.standard_normal((B, K, S, H)) + 2 * rng.standard_normal((1, K, 1, H))
    k = jnp.asarray(k, dtype)
    v = jnp.asarray(rng.standard_normal((B, K, S, H)), dtype)
    q = jnp.asarray(rng.standard_normal((B, K, G, H)), dtype)
    lengths, packed = jnp.asarray([500, 300], jnp.int32), jnp.asarray([384, 256], jnp.int32)
    # the residual holds the unquantised rows [packed_b, packed_b + R)
    window = jax.jit(jax.vmap(lambda x, p: jax.lax.dynamic_slice_in_dim(x, p, R, axis=1)))
    want = jax.jit(masked_attention_reference)(q, k, v, length_valid(lengths, K, S))
    want = np.asarray(want, np.float32)
    err = {}
    for bits in (4, 2):
      st = {"bits": bits, "group": g, "k_mode": "channel", "v_group": H}
      kv = quantize_kv(k, v, **st, dtype=dtype)
      out = self.run(q, (*kv, window(k, packed), window(v, packed)), lengths, packed, st)
      err[bits] = np.linalg.norm(np.asarray(out, np.float32) - want) / np.linalg.norm(want)
    assert err[4] < 0.2 and err[2] < 1.0 and err[4] < err[2] / 4, err

  def test_under_jit_with_traced_positions(self):
    """The decode step calls it inside jit: lengths, packed counts and indices are traced."""
    dtype, case = self.DTYPES[0], self.CASES[0]
    q, cache, st = make_case(case, dtype, seed=3)
    lengths, packed = case[5], case[6]
    idx = random_blocks(3, q.shape[0], q.shape[1], case[4] // 64, 4)
    fn = jax.jit(lambda q, c, n, p, i: lowbit_decode_attention(
        q, *c, n, p, **st, block_indices_BKM=i, block_size=64, **self.kw))
    out = fn(q, cache, jnp.asarray(lengths, jnp.int32), jnp.asarray(packed, jnp.int32),
             jnp.asarray(idx))
    k, v = dequant_np(cache, lengths, packed, **st)
    check_close(out, oracle(q, k, v, block_valid(idx, lengths, 64, case[4])), dtype)

  def test_extend_matches_oracle(self):
    """F new tokens, token f sees [0, start_b + f]: the causal multi-token form."""
    dtype, case = self.DTYPES[-1], self.CASES[1]
    B, K, G, H, S, lengths, packed = case[:7]
    F = 5
    _, cache, st = make_case(case, dtype, seed=4)
    q = jnp.asarray(np.random.default_rng(4).standard_normal((B, K, F, G, H)), dtype)
    start = np.asarray(lengths) - F
    out = lowbit_extend_attention(q, *cache, jnp.asarray(start, jnp.int32),
                                  jnp.asarray(packed, jnp.int32), **st, **self.kw)
    assert out.shape == q.shape and out.dtype == dtype
    k, v = dequant_np(cache, lengths, packed, **st)
    for f in range(F):
      want = oracle(q[:, :, f], k, v, length_valid(start + f + 1, K, S))
      check_close(out[:, :, f], want, dtype)


class TestPallasTritonInterpret(LowbitDecodeBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True
  # lowbit_extend_attention has no Triton backend (its reference is tested in TestXla)
  test_extend_matches_oracle = None

  @pytest.mark.parametrize("num_splits,block_k,magic", [(1, 16, False), (3, 32, False),
                                                        (8, 64, False), (3, 32, True),
                                                        (2, 64, True)])
  def test_splits_and_tiles(self, num_splits, block_k, magic):
    """More splits than tiles, uneven shares, tiles smaller than the group; both Triton paths
    (the magic-number path where it applies: K per channel, V per token), dense and sparse
    (random ascending blocks; also with every slot declared live, -1 padding included)."""
    from pallas_kernels.lowbit_decode.pallas_triton import TritonConfig
    magic_case = (2, 2, 4, 128, 512, [300, 77], [256, 64], 4, 64, 128, "channel", 128)
    dtype, case = jnp.bfloat16, magic_case if magic else CASES[3]
    q, cache, st = make_case(case, dtype, seed=num_splits)
    lengths, packed = case[5], case[6]
    cfg = TritonConfig(num_splits=num_splits, block_k=block_k, magic=magic)
    out = self.run(q, cache, lengths, packed, st, config=cfg)
    k, v = dequant_np(cache, lengths, packed, **st)
    check_close(out, oracle(q, k, v, length_valid(lengths, q.shape[1], k.shape[2])), dtype)
    if magic:
      idx = random_blocks(5, q.shape[0], q.shape[1], case[4] // 64, 4)
      want = oracle(q, k, v, block_valid(idx, lengths, 64, case[4]))
      out = self.run(q, cache, lengths, packed, st, config=cfg,
                     block_indices_BKM=jnp.asarray(idx), block_size=64)
      check_close(out, want, dtype)
      # every slot declared live: the -1 padding and blocks past the length are skipped in-kernel
      out = self.run(q, cache, lengths, packed, st, config=cfg,
                     block_indices_BKM=jnp.asarray(idx), block_size=64,
                     num_live_BK=jnp.full(idx.shape[:2], idx.shape[2], jnp.int32))
      check_close(out, want, dtype)

  def test_magic_halves_are_offset_codes(self):
    """The magic-number unpacking gives exactly OFF + code for every code, both bit widths and
    both half-precision dtypes, channel for channel as the layout says."""
    from pallas_kernels.lowbit_decode.pallas_triton import magic_halves
    rng = np.random.default_rng(3)
    for bits, dtype, off in ((4, jnp.bfloat16, 128), (2, jnp.bfloat16, 128), (4, jnp.float16, 1024),
                             (2, jnp.float16, 1024)):
      words = jnp.asarray(rng.integers(-2**31, 2**31, size=(16, 128 * bits // 32)), jnp.int32)
      lo, hi = jax.jit(magic_halves, static_argnums=(1, 2))(words, bits, dtype)
      got = np.concatenate([np.asarray(lo, np.float64), np.asarray(hi, np.float64)], axis=-1)
      np.testing.assert_array_equal(got - off, unpack_np(words, bits))

  def test_bad_config_raises(self):
    from pallas_kernels.lowbit_decode.pallas_triton import TritonConfig
    q, cache, st = make_case(CASES[0], jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k must be a power of 2"):
      self.run(q, cache, CASES[0][5], CASES[0][6], st, config=TritonConfig(block_k=24))


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True


class TestPallasMosaicTPUInterpret(LowbitDecodeBase):
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_tpu", True
  # lowbit_extend_attention has no TPU backend (its reference is tested in TestXla)
  test_extend_matches_oracle = None


def test_triton_lowers_for_cuda():
  """The whole Pallas -> Triton IR lowering, dense and sparse, on any host."""
  from ._oracle import lower_for_cuda
  case = CASES[1]
  q, cache, st = make_case(case, jnp.bfloat16)
  n, p = jnp.asarray(case[5], jnp.int32), jnp.asarray(case[6], jnp.int32)
  idx = jnp.asarray(random_blocks(0, q.shape[0], q.shape[1], case[4] // 64, 3))
  for kw in ({}, {"block_indices_BKM": idx, "block_size": 64}):
    text = lower_for_cuda(lambda q, c, n, p: lowbit_decode_attention(
        q, *c, n, p, **st, **kw, implementation="pallas_triton"), q, cache, n, p)
    assert "xla.gpu.triton" in text and 'name = "lowbit_decode_attention"' in text


class TestXla(LowbitDecodeBase):
  def test_reference_is_the_xla_implementation(self):
    q, cache, st = make_case(CASES[0], jnp.float32)
    n, p = jnp.asarray([300, 77], jnp.int32), jnp.asarray([256, 64], jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(lowbit_decode_attention_reference(q, *cache, n, p, **st)),
        np.asarray(lowbit_decode_attention(q, *cache, n, p, **st, implementation="xla")))

  def test_float32_cache(self):
    q, cache, st = make_case(CASES[3], jnp.float32)
    lengths, packed = CASES[3][5], CASES[3][6]
    out = self.run(q, cache, lengths, packed, st)
    k, v = dequant_np(cache, lengths, packed, **st)
    check_close(out, oracle(q, k, v, length_valid(lengths, q.shape[1], k.shape[2])), jnp.float32)
    assert not np.any(np.asarray(out[0]))     # length 0: zeros, not NaN


# --------------------------------------------------------------------------------- bad inputs


def _args(**over):
  """A valid call (B 2, K 1, G 2, H 64, S 256, 4 bits, group 64, R 128), with `over` replaced."""
  q, cache, st = make_case((2, 1, 2, 64, 256, [200, 70], [128, 64], 4, 64, 128, "channel", 64),
                           jnp.bfloat16)
  names = ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero", "res_k", "res_v")
  args = dict(q_BKGH=q, **dict(zip(names, cache)), lengths_B=jnp.asarray([200, 70], jnp.int32),
              packed_B=jnp.asarray([128, 64], jnp.int32), **st)
  args.update(over)
  return args


_BF = jnp.bfloat16


@pytest.mark.parametrize("over,match", [
    ({"bits": 3}, "bits must be 4 or 2"),
    ({"k_mode": "tensor"}, "k_mode must be"),
    ({"group": 48}, "capacity 256 must be a positive multiple of group=48"),
    ({"group": 256}, "window must be a positive multiple of group=256"),
    ({"v_group": 16}, "v_group must divide head_dim=64 and be a multiple of 32"),
    ({"q_BKGH": jnp.ones((2, 1, 2, 64), jnp.float32)}, "must share the cache dtype"),
    ({"q_BKGH": jnp.ones((2, 1, 2, 64), jnp.int8)}, "q must be float32, bfloat16 or float16"),
    ({"q_BKGH": jnp.ones((2, 1, 64), _BF)}, "q must be 4-D"),
    ({"res_k": jnp.ones((2, 1, 100, 64), _BF), "res_v": jnp.ones((2, 1, 100, 64), _BF)},
     "window must be a positive multiple of group=64"),
    ({"res_v": jnp.ones((2, 1, 128, 32), _BF)}, "res_k .* and res_v .* must be"),
    ({"k_packed": jnp.ones((2, 1, 256, 16), jnp.int32)},
     r"k_packed must be int32 .*=\(2, 1, 256, 8\)"),
    ({"v_packed": jnp.ones((2, 1, 256, 8), jnp.uint32)}, "v_packed must be int32"),
    ({"k_scale": jnp.ones((2, 1, 256, 64), _BF)}, r"k_scale must be bfloat16 \(2, 1, 4, 64\)"),
    ({"v_zero": jnp.ones((2, 1, 256, 1), jnp.float32)}, "v_zero must be bfloat16"),
    ({"packed_B": jnp.asarray([128, 32], jnp.int32)}, "packed_B must hold multiples of group=64"),
    ({"packed_B": jnp.asarray([128, 320], jnp.int32)}, "packed_B must lie in"),
    ({"lengths_B": jnp.asarray([257, 70], jnp.int32)}, "lengths_B must lie in"),
    ({"lengths_B": jnp.asarray([256, 70], jnp.int32), "packed_B": jnp.asarray([64, 64], jnp.int32)},
     "lengths_B - packed_B must be <= the window R=128"),
    ({"block_indices_BKM": jnp.zeros((2, 1, 2), jnp.int32), "block_size": 48},
     "block_size must be a positive int dividing group=64"),
    ({"block_indices_BKM": jnp.asarray([[[0, 9]], [[1, -1]]], jnp.int32), "block_size": 32},
     r"must be -1 or in \[0, 8\)"),
    ({"block_size": 32}, "block_size and num_live_BK go with block_indices_BKM"),
    ({"implementation": "cudnn"}, "implementation must be one of"),
])
def test_bad_inputs_raise(over, match):
  with pytest.raises(ValueError, match=match):
    lowbit_decode_attention(**_args(**over))


def test_extend_bad_inputs_raise():
  a = _args()
  q5 = jnp.ones((2, 1, 3, 2, 64), _BF)
  del a["q_BKGH"], a["lengths_B"]
  with pytest.raises(ValueError, match="q_BKFGH must be 5-D"):
    lowbit_extend_attention(jnp.ones((2, 1, 2, 64), _BF), start_B=jnp.asarray([0, 0]), **a)
  with pytest.raises(ValueError, match="start_B must lie in"):
    lowbit_extend_attention(q5, start_B=jnp.asarray([254, 0], jnp.int32), **a)
  with pytest.raises(ValueError, match=r"start_B \+ F - packed_B must be <= the window"):
    lowbit_extend_attention(q5, start_B=jnp.asarray([0, 250], jnp.int32), **a)
