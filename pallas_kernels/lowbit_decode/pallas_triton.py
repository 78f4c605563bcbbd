"""Low-bit decode attention as a Pallas Triton kernel (`lowbit_decode_attention`'s
`pallas_triton`): dequantisation fused into split-K decode attention.

Grid (B, K, num_splits). Program (b, k, j) walks its share of the token tiles of (b, k) -- every
tile below the length (dense), or the selected blocks (block-sparse, `block_indices_BKM`). A tile
of T tokens starting at t0 is either packed (t0 < packed_b: T rows of W int32 words, unpacked in
registers by one shift and mask per sub-word into the [T, H] codes, scaled by the group's K scale
row / the tokens' V scales, plus zeros) or residual (a [T, H] slice of the full-precision window
at t0 - packed_b). Both loads are predicated on that one scalar, so a tile reads only the bytes it
needs; T divides the group, so no tile straddles the two. The tiles then go through the shared
online softmax (`pallas_kernels.online_softmax`) and the split partials through `combine_splits`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch, online_softmax, triton_splitk, tuned
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.lowbit_decode import layout
from pallas_kernels.sparse_decode.reference import live_slots


@dataclasses.dataclass(frozen=True)
class TritonConfig(triton_splitk.SplitKConfig):
  """Launch parameters of the low-bit Triton decode kernel; None takes the tuned value.
  block_k: tokens per tile in the dense form (a power of 2 >= 16 dividing the group); the sparse
  form's tile is its block size.
  magic: the magic-number path (`_magic_kernel`) where it applies (`magic_applies`: K per
  channel, V per token, bf16 / f16); the default False takes the general `_kernel` (codes
  converted with `astype`), measured faster on the H100 (B8 S128K int4: 1.80 against 1.96 ms):
  the conversions are not what bounds the kernel."""
  block_k: int | None = None
  magic: bool = False

  def validate(self) -> None:
    super().validate()
    if self.block_k is not None and (not isinstance(self.block_k, int)
                                     or not launch.is_power_of_2(self.block_k) or self.block_k < 16):
      raise ValueError(f"config.block_k must be a power of 2 >= 16 or None, got {self.block_k!r}")


CONFIG = TritonConfig


def _expand_groups(x_TN: jax.Array, head_dim: int) -> jax.Array:
  """[T, n] per-group values -> [T, H], each repeated over its H / n channels."""
  T, n = x_TN.shape
  if n == 1:
    return jnp.broadcast_to(x_TN, (T, head_dim))
  return jnp.broadcast_to(x_TN[:, :, None], (T, n, head_dim // n)).reshape(T, head_dim)


def _unpack(words_TW: jax.Array, bits: int, dtype) -> jax.Array:
  """int32 [T, W] words -> [T, H] codes in `dtype`, channel h = i * W + c from bits [i*bits, ...)
  of word c (layout.py): one shift and mask per sub-word, then a reshape (no shuffles)."""
  T, W = words_TW.shape
  P = 32 // bits
  shifts_P = lax.broadcasted_iota(jnp.int32, (1, P, 1), 1) * bits
  codes_TPW = lax.shift_right_logical(words_TW[:, None, :], shifts_P) & layout.levels(bits)
  return codes_TPW.reshape(T, P * W).astype(dtype)


def _kernel(*refs, sparse: bool, tile: int, bits: int, group: int, k_mode: str, num_splits: int,
            scale: float, precision, n_rows: int):
  """Program (b, k, j). Refs: len / packed int32 [] (+ nslots int32 [], idx int32 [M] when
  sparse); q [R, H]; kp / vp int32 [S, W]; ks / kz [S // group or S, nk]; vs / vz [S, nv];
  rk / rv [Rw, H]; out o f32 [R, H], m / l f32 [R]."""
  if sparse:
    (len_ref, packed_ref, nslots_ref, idx_ref, q_ref, kp_ref, ks_ref, kz_ref, vp_ref, vs_ref,
     vz_ref, rk_ref, rv_ref, o_ref, m_ref, l_ref) = refs
  else:
    (len_ref, packed_ref, q_ref, kp_ref, ks_ref, kz_ref, vp_ref, vs_ref, vz_ref, rk_ref, rv_ref,
     o_ref, m_ref, l_ref) = refs
  H = q_ref.shape[-1]
  W = kp_ref.shape[-1]
  length, packed = len_ref[()], packed_ref[()]
  dtype = rk_ref.dtype
  offsets_T = lax.broadcasted_iota(jnp.int32, (tile,), 0)
  fold = k_mode == "channel" and vs_ref.shape[-1] == 1
  q_RH = triton_splitk.load_query(q_ref, n_rows)

  def tile_of(block):
    t0 = pl.multiple_of(jnp.maximum(block, 0) * tile, tile)
    is_packed = t0 < packed
    r0 = pl.multiple_of(jnp.maximum(t0 - packed, 0), tile)
    mask_w = jnp.full((tile, W), is_packed)
    kw = plgpu.load(kp_ref.at[pl.ds(t0, tile), :], mask=mask_w, other=0)
    vw = plgpu.load(vp_ref.at[pl.ds(t0, tile), :], mask=mask_w, other=0)
    mask_h = jnp.full((tile, H), jnp.logical_not(is_packed))
    rk = plgpu.load(rk_ref.at[pl.ds(r0, tile), :], mask=mask_h, other=0)
    rv = plgpu.load(rv_ref.at[pl.ds(r0, tile), :], mask=mask_h, other=0)
    valid_T = (block >= 0) & (t0 + offsets_T < length)
    return t0, is_packed, kw, vw, rk, rv, valid_T

  def dequant_tile(block):
    """(k [T, H], v [T, H], valid [T]) in the cache dtype: the general path (per-token K
    scales, V scales per channel group)."""
    t0, is_packed, kw, vw, rk, rv, valid_T = tile_of(block)
    if k_mode == "channel":
      g0 = t0 // group
      ks = ks_ref[pl.ds(g0, 1), :].astype(jnp.float32)            # [1, H]
      kz = kz_ref[pl.ds(g0, 1), :].astype(jnp.float32)
    else:
      ks = _expand_groups(ks_ref[pl.ds(t0, tile), :].astype(jnp.float32), H)
      kz = _expand_groups(kz_ref[pl.ds(t0, tile), :].astype(jnp.float32), H)
    vs = _expand_groups(vs_ref[pl.ds(t0, tile), :].astype(jnp.float32), H)
    vz = _expand_groups(vz_ref[pl.ds(t0, tile), :].astype(jnp.float32), H)
    k_hat = (_unpack(kw, bits, jnp.float32) * ks + kz).astype(dtype)
    v_hat = (_unpack(vw, bits, jnp.float32) * vs + vz).astype(dtype)
    return jnp.where(is_packed, k_hat, rk), jnp.where(is_packed, v_hat, rv), valid_T

  def folded_step(block, state):
    """One tile with the scales folded out of the [T, H] tiles (K per channel, V per token):
    q . (c * ks + kz) = (q * ks) . c + q . kz and p @ (c * vs + vz) = (p * vs) @ c + p . vz, so
    the codes go to the dots as they are (small integers, exact in bf16 / f16) and only [R, H]
    and [R, T] operands are scaled."""
    acc_RH, m_R, l_R = state
    t0, is_packed, kw, vw, rk, rv, valid_T = tile_of(block)
    g0 = t0 // group
    ks = ks_ref[pl.ds(g0, 1), :].astype(jnp.float32)              # [1, H]
    kz = kz_ref[pl.ds(g0, 1), :].astype(jnp.float32)
    vs = vs_ref[pl.ds(t0, tile), :].astype(jnp.float32)           # [T, 1]
    vz = vz_ref[pl.ds(t0, tile), :].astype(jnp.float32)
    qf = q_RH.astype(jnp.float32)
    q_op = jnp.where(is_packed, (qf * ks).astype(dtype), q_RH)
    k_op = jnp.where(is_packed, _unpack(kw, bits, dtype), rk)
    s_RT = jnp.dot(q_op, k_op.T, preferred_element_type=jnp.float32, precision=precision)
    s_RT = (s_RT + jnp.where(is_packed, jnp.sum(qf * kz, axis=1, keepdims=True), 0.0)) * scale
    s_RT = jnp.where(valid_T[None, :], s_RT, online_softmax.MASK_VALUE)
    m_new_R = jnp.maximum(m_R, jnp.max(s_RT, axis=1))
    p_RT = jnp.where(valid_T[None, :], jnp.exp(s_RT - m_new_R[:, None]), 0.0)
    corr_R = jnp.exp(m_R - m_new_R)
    l_new_R = corr_R * l_R + jnp.sum(p_RT, axis=1)
    p_op = jnp.where(is_packed, p_RT * vs.T, p_RT).astype(dtype)
    v_op = jnp.where(is_packed, _unpack(vw, bits, dtype), rv)
    pv_RH = jnp.dot(p_op, v_op, preferred_element_type=jnp.float32, precision=precision)
    bias_R = jnp.where(is_packed, jnp.sum(p_RT * vz.T, axis=1), 0.0)
    return corr_R[:, None] * acc_RH + pv_RH + bias_R[:, None], m_new_R, l_new_R

  split = pl.program_id(2)
  if sparse:
    n_units = nslots_ref[()]
    unit_block = lambda u: idx_ref[u]
  else:
    n_units = pl.cdiv(length, tile)
    unit_block = lambda u: u
  per_split = pl.cdiv(n_units, num_splits)
  start = split * per_split
  end = jnp.minimum(start + per_split, n_units)
  if fold:
    body = lambda u, state: folded_step(unit_block(u), state)
  else:
    def body(u, state):
      k_TH, v_TH, valid_T = dequant_tile(unit_block(u))
      return online_softmax.attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale,
                                         precision=precision)
  state = lax.fori_loop(start, end, body, online_softmax.init_state(q_RH.shape[0], H))
  triton_splitk.write_partial(o_ref, m_ref, l_ref, state, n_rows)


# The bit patterns of 2^e with a mantissa step of 1: 0x4300 is bfloat16 128 (7 mantissa bits),
# 0x6400 float16 1024 (10 bits). OR-ing a code c < 2^bits into the low mantissa bits gives
# exactly MAGIC + c, with no integer -> float conversion.
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


def magic_applies(dtype, k_mode: str, n_v: int) -> bool:
  """Whether `_magic_kernel` serves a cache: K per channel, V per token, bf16 / f16 tiles."""
  return jnp.dtype(dtype) in _MAGIC and k_mode == "channel" and n_v == 1


def magic_halves(words_TW: jax.Array, bits: int, dtype) -> tuple[jax.Array, jax.Array]:
  """int32 [T, W] words -> (lo, hi) [T, H / 2] in `dtype` holding OFF + code, OFF = 128 (bf16) /
  1024 (f16): channels [0, H / 2) and [H / 2, H). Sub-words i and i + P / 2 (P = 32 / bits) of a
  word sit 16 bits apart, so one shift and one mask-and-or of the word make both 16-bit halves
  the bit patterns of OFF + code; truncation and a same-width bitcast read them out. About one
  integer op per code, against two conversions per code for `astype`."""
  T, W = words_TW.shape
  half = 16 // bits
  magic, _ = _MAGIC[jnp.dtype(dtype)]
  mask = layout.levels(bits) * 0x10001
  shifts = lax.broadcasted_iota(jnp.int32, (1, half, 1), 1) * bits
  x = (lax.shift_right_logical(words_TW[:, None, :], shifts) & mask) | (magic * 0x10001)
  lo = lax.bitcast_convert_type(x.astype(jnp.int16), dtype)
  hi = lax.bitcast_convert_type(lax.shift_right_logical(x, 16).astype(jnp.int16), dtype)
  return lo.reshape(T, half * W), hi.reshape(T, half * W)


def _magic_kernel(*refs, sparse: bool, tile: int, bits: int, group: int, num_splits: int,
                  scale: float, precision, n_rows: int):
  """The fast path (`magic_applies`): K per channel, V per token, bf16 / f16. Codes reach the
  dots as OFF + code (`magic_halves`, no conversion), the scales are folded out of the tiles --
  q . (c * ks + kz) = (q * ks) . (OFF + c) + q . kz - OFF * sum(q * ks), and p @ (c * vs + vz) =
  (p * vs) @ (OFF + c) + p . vz - OFF * sum(p * vs) -- and each product is two dots over the
  channel halves, so no tile is concatenated. A packed tile and a residual tile are the two
  branches of one `lax.cond` on its first token (one uniform branch per tile, no per-element
  select, no masked loads; an outer one skips a -1 slot or a block past the length), so block indices
  may come in any order. Refs as `_kernel`."""
  if sparse:
    (len_ref, packed_ref, nslots_ref, idx_ref, q_ref, kp_ref, ks_ref, kz_ref, vp_ref, vs_ref,
     vz_ref, rk_ref, rv_ref, o_ref, m_ref, l_ref) = refs
  else:
    (len_ref, packed_ref, q_ref, kp_ref, ks_ref, kz_ref, vp_ref, vs_ref, vz_ref, rk_ref, rv_ref,
     o_ref, m_ref, l_ref) = refs
  R, H = q_ref.shape
  h2 = H // 2
  length, packed = len_ref[()], packed_ref[()]
  dtype = rk_ref.dtype
  _, off = _MAGIC[jnp.dtype(dtype)]
  offsets_T = lax.broadcasted_iota(jnp.int32, (tile,), 0)
  live_R = lax.broadcasted_iota(jnp.int32, (R, 1), 0) < n_rows
  q_lo, q_hi = (plgpu.load(q_ref.at[:, pl.ds(c0, h2)], mask=jnp.broadcast_to(live_R, (R, h2)),
                           other=0) for c0 in (0, h2))
  qf_lo, qf_hi = q_lo.astype(jnp.float32), q_hi.astype(jnp.float32)

  def softmax_update(s_RT, valid_T, m_R, l_R):
    s_RT = jnp.where(valid_T[None, :], s_RT * scale, online_softmax.MASK_VALUE)
    m_new_R = jnp.maximum(m_R, jnp.max(s_RT, axis=1))
    p_RT = jnp.where(valid_T[None, :], jnp.exp(s_RT - m_new_R[:, None]), 0.0)
    corr_R = jnp.exp(m_R - m_new_R)
    return p_RT, corr_R, m_new_R, corr_R * l_R + jnp.sum(p_RT, axis=1)

  dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)

  def packed_step(t0, state):
    acc_lo, acc_hi, m_R, l_R = state
    t0 = pl.multiple_of(t0, tile)
    g0 = t0 // group
    k_lo, k_hi = magic_halves(kp_ref[pl.ds(t0, tile), :], bits, dtype)
    qs = [(qf * ks_ref[pl.ds(g0, 1), pl.ds(c0, h2)].astype(jnp.float32)).astype(dtype)
          for qf, c0 in ((qf_lo, 0), (qf_hi, h2))]
    bias_R1 = (jnp.sum(qf_lo * kz_ref[pl.ds(g0, 1), pl.ds(0, h2)].astype(jnp.float32), axis=1,
                       keepdims=True)
               + jnp.sum(qf_hi * kz_ref[pl.ds(g0, 1), pl.ds(h2, h2)].astype(jnp.float32), axis=1,
                         keepdims=True)
               - off * jnp.sum(qs[0].astype(jnp.float32) + qs[1].astype(jnp.float32), axis=1,
                               keepdims=True))
    s_RT = dot(qs[0], k_lo.T) + dot(qs[1], k_hi.T) + bias_R1
    valid_T = t0 + offsets_T < length
    p_RT, corr_R, m_new, l_new = softmax_update(s_RT, valid_T, m_R, l_R)
    vs_T1 = vs_ref[pl.ds(t0, tile), :].astype(jnp.float32)                # [T, 1]
    vz_T1 = vz_ref[pl.ds(t0, tile), :].astype(jnp.float32)
    p_op = (p_RT * vs_T1.T).astype(dtype)
    vbias_R1 = (jnp.sum(p_RT * vz_T1.T, axis=1, keepdims=True)
                - off * jnp.sum(p_op.astype(jnp.float32), axis=1, keepdims=True))
    v_lo, v_hi = magic_halves(vp_ref[pl.ds(t0, tile), :], bits, dtype)
    corr = corr_R[:, None]
    return (corr * acc_lo + dot(p_op, v_lo) + vbias_R1, corr * acc_hi + dot(p_op, v_hi) + vbias_R1,
            m_new, l_new)

  def residual_step(t0, state):
    acc_lo, acc_hi, m_R, l_R = state
    r0 = pl.multiple_of(t0 - packed, tile)
    rows = pl.ds(r0, tile)
    s_RT = (dot(q_lo, rk_ref[rows, pl.ds(0, h2)].T) + dot(q_hi, rk_ref[rows, pl.ds(h2, h2)].T))
    valid_T = t0 + offsets_T < length
    p_RT, corr_R, m_new, l_new = softmax_update(s_RT, valid_T, m_R, l_R)
    p_op = p_RT.astype(dtype)
    corr = corr_R[:, None]
    return (corr * acc_lo + dot(p_op, rv_ref[rows, pl.ds(0, h2)]),
            corr * acc_hi + dot(p_op, rv_ref[rows, pl.ds(h2, h2)]), m_new, l_new)

  split = pl.program_id(2)
  if sparse:
    n_units = nslots_ref[()]
    unit_block = lambda u: idx_ref[u]
  else:
    n_units = pl.cdiv(length, tile)
    unit_block = lambda u: u
  per_split = pl.cdiv(n_units, num_splits)
  start = split * per_split
  end = jnp.minimum(start + per_split, n_units)

  def body(u, state):
    block = unit_block(u)
    t0 = jnp.maximum(block, 0) * tile
    return lax.cond((block >= 0) & (t0 < length),
                    lambda st: lax.cond(t0 < packed, packed_step, residual_step, t0, st),
                    lambda st: st, state)

  state = (jnp.zeros((R, h2), jnp.float32), jnp.zeros((R, h2), jnp.float32),
           jnp.full((R,), online_softmax.MASK_VALUE, jnp.float32), jnp.zeros((R,), jnp.float32))
  acc_lo, acc_hi, m_R, l_R = lax.fori_loop(start, end, body, state)
  live = jnp.broadcast_to(live_R, (R, h2))
  plgpu.store(o_ref.at[:, pl.ds(0, h2)], acc_lo, mask=live)
  plgpu.store(o_ref.at[:, pl.ds(h2, h2)], acc_hi, mask=live)
  live_1 = lax.broadcasted_iota(jnp.int32, (R,), 0) < n_rows
  plgpu.store(m_ref, m_R, mask=live_1)
  plgpu.store(l_ref, l_R, mask=live_1)


@functools.partial(jax.jit, static_argnames=("bits", "group", "k_mode", "tile", "sparse",
                                             "num_splits", "num_warps", "num_stages", "magic",
                                             "interpret"))
def _lowbit_decode(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
                   lengths_B, packed_B, block_indices_BKM, num_live_BK, *, bits: int, group: int,
                   k_mode: str, tile: int, sparse: bool, num_splits: int | None, num_warps: int,
                   num_stages: int, magic: bool, interpret: bool):
  B, K, G, H = q_BKGH.shape
  S, W = k_packed.shape[2:]
  Rw = res_k.shape[2]
  R = launch.dot_rows(G)
  lengths_B = lengths_B.astype(jnp.int32)
  packed_B = packed_B.astype(jnp.int32)
  t = tuned.lookup("lowbit_decode_attention", "pallas_triton")
  if sparse:
    M = block_indices_BKM.shape[-1]
    block_indices_BKM = block_indices_BKM.astype(jnp.int32)
    nslots_BK = (live_slots(block_indices_BKM, lengths_B, tile) if num_live_BK is None
                 else num_live_BK.astype(jnp.int32))
    units = M
  else:
    units = -(-S // tile)
  num_splits = num_splits or launch.default_num_splits(B * K, units,
                                                       launch.target_programs(t["programs_per_sm"]))
  sq = triton_splitk.SQUEEZED
  whole = lambda *shape: pl.BlockSpec((sq, sq) + shape, lambda b, k, j: (b, k) + (0,) * len(shape))
  prefix_specs = [pl.BlockSpec((sq,), lambda b, k, j: (b,)),
                  pl.BlockSpec((sq,), lambda b, k, j: (b,))]
  prefix_args = [lengths_B, packed_B]
  magic = magic and magic_applies(res_k.dtype, k_mode, v_scale.shape[-1])
  if sparse:
    prefix_specs += [pl.BlockSpec((sq, sq), lambda b, k, j: (b, k)), whole(M)]
    prefix_args += [nslots_BK, block_indices_BKM]
  common = dict(sparse=sparse, tile=tile, bits=bits, group=group, num_splits=num_splits,
                scale=H ** -0.5, precision=launch.dot_precision(q_BKGH.dtype), n_rows=G)
  kernel = (functools.partial(_magic_kernel, **common) if magic
            else functools.partial(_kernel, k_mode=k_mode, **common))
  o_BKNRH, m_BKNR, l_BKNR = pl.pallas_call(
      kernel,
      grid=(B, K, num_splits),
      in_specs=prefix_specs + [
          pl.BlockSpec((sq, sq, R, H), lambda b, k, j: (b, k, 0, 0)),
          whole(S, W), whole(*k_scale.shape[2:]), whole(*k_zero.shape[2:]),
          whole(S, W), whole(*v_scale.shape[2:]), whole(*v_zero.shape[2:]),
          whole(Rw, H), whole(Rw, H)],
      out_specs=[
          pl.BlockSpec((sq, sq, sq, R, H), lambda b, k, j: (b, k, j, 0, 0)),
          pl.BlockSpec((sq, sq, sq, R), lambda b, k, j: (b, k, j, 0)),
          pl.BlockSpec((sq, sq, sq, R), lambda b, k, j: (b, k, j, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, K, num_splits, R, H), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R), jnp.float32),
      ],
      compiler_params=triton_splitk.compiler_params(num_warps, num_stages, tile, H,
                                                    res_k.dtype),
      interpret=interpret,
      name="lowbit_decode_attention",
  )(*prefix_args, q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v)
  return triton_splitk.merge_partials(o_BKNRH, m_BKNR, l_BKNR, G, q_BKGH.dtype,
                                      interpret=interpret)


def lowbit_decode_attention(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                            res_v, lengths_B, packed_B, *, bits: int, group: int, k_mode: str,
                            v_group: int, block_indices_BKM=None, block_size=None,
                            num_live_BK=None, interpret: bool = False,
                            config: TritonConfig | None = None):
  """Arguments as `pallas_kernels.lowbit_decode.lowbit_decode_attention` (checked there)."""
  del v_group  # in the scale shapes
  require_platform("gpu", interpret, "the Pallas Triton low-bit decode kernel")
  H = q_BKGH.shape[-1]
  triton_splitk.triton_supported(H)
  n_k, n_v = k_scale.shape[-1], v_scale.shape[-1]
  if not (launch.is_power_of_2(n_k) and launch.is_power_of_2(n_v)):
    raise NotSupported(f"scale groups per row ({n_k}, {n_v}) must be powers of 2 for Triton tiles")
  config = config or TritonConfig()
  config.validate()
  t = tuned.lookup("lowbit_decode_attention", "pallas_triton")
  sparse = block_indices_BKM is not None
  if sparse:
    tile = int(block_size)
    if not launch.is_power_of_2(tile) or tile < 16:
      raise NotSupported(f"block_size={tile} must be a power of 2 >= 16 for Triton tiles")
  else:
    tile = min(config.block_k or t["block_k"], group)
    if group % tile:
      raise NotSupported(f"block_k={tile} must divide group={group}")
  return _lowbit_decode(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
                        res_v, lengths_B, packed_B, block_indices_BKM, num_live_BK, bits=bits,
                        group=group, k_mode=k_mode, tile=tile, sparse=sparse,
                        num_splits=config.num_splits, num_warps=config.num_warps or t["num_warps"],
                        num_stages=config.num_stages or t["num_stages"],
                        magic=bool(config.magic), interpret=bool(interpret))
