"""The packed low-bit KV layout (BitDecoding / KIVI style): the one place that quantises, packs,
unpacks and dequantises it. `effjax.quant.kv` (the cache entry) and the kernels both use these.

Per layer, for B sequences, K KV heads, capacity S, head dim H, `bits` in {4, 2}:

  k_packed, v_packed  int32 [B, K, S, W], W = H * bits / 32 words per token row. Channel
                      h = i * W + c of a token lives in word c at bits [i * bits, (i + 1) * bits),
                      i = 0 .. 32 / bits - 1 (sub-word i of the W words = channels [i*W, (i+1)*W)).
  k_scale, k_zero     k_mode "channel": [B, K, S // group, H] -- one per (group of `group` tokens,
                      channel); k_mode "token": [B, K, S, H // v_group] like V.
  v_scale, v_zero     [B, K, S, H // v_group] -- one per (token, group of v_group channels).
  res_k, res_v        [B, K, R, H] full precision: the newest tokens, not yet packed.
  packed_B            int32 [B]: token positions [0, packed_b) are packed (a multiple of group),
                      [packed_b, length_b) are residual slots [0, length_b - packed_b).

Scales and zeros are stored in the cache dtype (bfloat16 / float16 / float32). Asymmetric
min/max quantisation: code = clip(round((x - zero) / scale), 0, 2^bits - 1), x_hat = code * scale
+ zero, with zero = the group minimum rounded *down* to the cache dtype and scale = (max - zero) /
(2^bits - 1) rounded *up*, and codes computed from those stored values: codes 0 .. 2^bits - 1
then span [min, max] as stored, so |x - x_hat| <= scale / 2 (up to float32 rounding) for what is
stored. (Plain rounding to nearest of a bfloat16 zero can move it by |min| * 2^-9, more than half a
step when a group's range is small against its offset.) A constant group has scale 0 and codes 0.

Why this layout, the fold it allows and the residual policy: `effjax/quant/kv.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BITS = (2, 4)
K_MODES = ("channel", "token")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Channel groups (v_group) narrower than this would cost about as many bytes in scale + zero as in
# codes (16 channels at 2 bits = one bf16 scale + zero).
MIN_V_GROUP = 32


def levels(bits: int) -> int:
  """The largest code, 2^bits - 1."""
  return (1 << bits) - 1


def words_per_row(head_dim: int, bits: int) -> int:
  """W: int32 words holding one token row of H codes."""
  return head_dim * bits // 32


def default_window(bits: int, group: int) -> int:
  """Residual window R: 128 tokens at 4 bits, 256 at 2 bits (KIVI / BitDecoding), rounded up to
  a multiple of the group."""
  base = 128 if bits == 4 else 256
  return -(-base // group) * group


def check_settings(*, bits, group, k_mode: str, v_group, head_dim: int,
                   capacity: int | None = None, window: int | None = None, dtype=None) -> None:
  """ValueError naming the first bad setting (before any compute): bits in {2, 4}; group a
  positive int dividing capacity and window; k_mode "channel" | "token"; head_dim * bits a
  multiple of 32; v_group a multiple of 32 dividing head_dim (or head_dim itself); window >= group;
  dtype float32 / bfloat16 / float16."""
  if bits not in BITS or isinstance(bits, bool):
    raise ValueError(f"bits must be 4 or 2, got {bits!r}")
  if k_mode not in K_MODES:
    raise ValueError(f"k_mode must be 'channel' or 'token', got {k_mode!r}")
  if not isinstance(head_dim, (int, np.integer)) or head_dim < 1 or head_dim * bits % 32:
    raise ValueError(f"head_dim * bits must be a positive multiple of 32 (whole int32 words per "
                     f"token row), got head_dim={head_dim}, bits={bits}")
  if not isinstance(group, (int, np.integer)) or group < 1:
    raise ValueError(f"group must be a positive int (tokens per K scale), got {group!r}")
  if (not isinstance(v_group, (int, np.integer)) or v_group < 1 or head_dim % v_group
      or (v_group % MIN_V_GROUP and v_group != head_dim)):
    raise ValueError(f"v_group must divide head_dim={head_dim} and be a multiple of "
                     f"{MIN_V_GROUP} (or head_dim itself), got {v_group!r}")
  if capacity is not None and (capacity < 1 or capacity % group):
    raise ValueError(f"capacity {capacity} must be a positive multiple of group={group}")
  if window is not None and (not isinstance(window, (int, np.integer)) or window < group
                             or window % group):
    raise ValueError(f"window must be a positive multiple of group={group}, got {window!r}")
  if dtype is not None and jnp.dtype(dtype) not in FLOAT_DTYPES:
    raise ValueError(f"cache dtype must be float32, bfloat16 or float16, got {jnp.dtype(dtype)}")


# ---------------------------------------------------------------------------------- packing


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes [..., H] in [0, 2^bits) into int32 words [..., H * bits / 32]: channel
  i * W + c into word c at bits [i * bits, (i + 1) * bits)."""
  per = 32 // bits
  *lead, H = codes.shape
  if H % per:
    raise ValueError(f"codes' last dim {H} must be a multiple of 32 / bits = {per}")
  c = codes.astype(jnp.uint32).reshape(*lead, per, H // per)
  shifts = (np.arange(per, dtype=np.uint32) * bits)[:, None]
  words = lax.reduce(c << shifts, np.uint32(0), lax.bitwise_or, (len(lead),))
  return lax.bitcast_convert_type(words, jnp.int32)


def unpack_codes(words: jax.Array, bits: int) -> jax.Array:
  """int32 words [..., W] -> int32 codes [..., W * 32 / bits] (inverse of `pack_codes`). One
  logical shift and a mask per sub-word; sub-word i is the contiguous channel slice
  [i * W, (i + 1) * W)."""
  *lead, W = words.shape
  per = 32 // bits
  shifts = (np.arange(per, dtype=np.uint32) * bits)[:, None]
  # uint32: a logical shift, so the sign bit of the int32 word is an ordinary code bit
  u = lax.bitcast_convert_type(words, jnp.uint32)
  codes = (u[..., None, :] >> shifts) & np.uint32(levels(bits))
  return codes.astype(jnp.int32).reshape(*lead, per * W)


# ----------------------------------------------------------------------- scales and codes


def scale_zero(lo: jax.Array, hi: jax.Array, bits: int, dtype) -> tuple[jax.Array, jax.Array]:
  """Stored (scale, zero) in `dtype` of groups with float32 minimum lo and maximum hi: zero = lo
  rounded down, scale = (hi - zero) / (2^bits - 1) rounded up (so the codes span [lo, hi])."""
  dt = jnp.dtype(dtype)
  lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
  zero = lo.astype(dt)
  zero = jnp.where(zero.astype(jnp.float32) > lo, jnp.nextafter(zero, jnp.asarray(-jnp.inf, dt)),
                   zero)
  step = (hi - zero.astype(jnp.float32)) / levels(bits)
  scale = step.astype(dt)
  scale = jnp.where(scale.astype(jnp.float32) < step,
                    jnp.nextafter(scale, jnp.asarray(jnp.inf, dt)), scale)
  return scale, zero


def encode(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """int32 codes clip(round((x - zero) / scale), 0, 2^bits - 1) from the stored scale / zero
  (broadcast against x); 0 where scale is 0 (a constant group: x_hat = zero = x)."""
  s, z = scale.astype(jnp.float32), zero.astype(jnp.float32)
  q = jnp.round((x.astype(jnp.float32) - z) / jnp.where(s > 0, s, 1.0))
  return jnp.where(s > 0, jnp.clip(q, 0, levels(bits)), 0).astype(jnp.int32)


def _expand(p_TG: jax.Array, H: int) -> jax.Array:
  """Per-row channel-group parameters [..., T, Gs] -> [..., T, H] (group j = channels
  [j * H / Gs, (j + 1) * H / Gs))."""
  return jnp.repeat(p_TG, H // p_TG.shape[-1], axis=-1) if p_TG.shape[-1] != H else p_TG


def decode_rows(codes: jax.Array, scale_rows: jax.Array, zero_rows: jax.Array) -> jax.Array:
  """float32 x_hat [..., T, H] = codes * scale + zero, with per-row parameters [..., T, Gs] (Gs =
  H: per channel; Gs < H: one per group of H / Gs contiguous channels)."""
  H = codes.shape[-1]
  return (codes.astype(jnp.float32) * _expand(scale_rows, H).astype(jnp.float32)
          + _expand(zero_rows, H).astype(jnp.float32))


def _grouping(which: str, *, group: int, k_mode: str, v_group: int) -> tuple[str, int]:
  """(axis, size): K in "channel" mode groups `group` tokens per channel; K in "token" mode and V
  group v_group channels per token."""
  if which == "k" and k_mode == "channel":
    return "tokens", group
  return "channels", v_group


def quantize(x: jax.Array, which: str, *, bits: int, group: int, k_mode: str, v_group: int,
             dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Quantises and packs K (which="k") or V (which="v") rows x [..., T, H].

  Returns (words int32 [..., T, W], scale, zero) with scale / zero in `dtype`: [..., T // group,
  H] for K in "channel" mode (T a multiple of group), else [..., T, H // v_group]."""
  axis, size = _grouping(which, group=group, k_mode=k_mode, v_group=v_group)
  *lead, T, H = x.shape
  x = x.astype(jnp.float32)
  if axis == "tokens":
    xg = x.reshape(*lead, T // size, size, H)
    scale, zero = scale_zero(xg.min(axis=-2), xg.max(axis=-2), bits, dtype)
    codes = encode(xg, scale[..., None, :], zero[..., None, :], bits).reshape(*lead, T, H)
  else:
    xg = x.reshape(*lead, T, H // size, size)
    scale, zero = scale_zero(xg.min(axis=-1), xg.max(axis=-1), bits, dtype)
    codes = encode(xg, scale[..., None], zero[..., None], bits).reshape(*lead, T, H)
  return pack_codes(codes, bits), scale, zero


def row_params(scale: jax.Array, which: str, *, group: int, k_mode: str) -> jax.Array:
  """Stored scale (or zero) -> one row per token [..., T, Gs] (K "channel" scales repeated over
  their group's tokens)."""
  if which == "k" and k_mode == "channel":
    return jnp.repeat(scale, group, axis=-2)
  return scale


def dequantize(words: jax.Array, scale: jax.Array, zero: jax.Array, which: str, *, bits: int,
               group: int, k_mode: str, v_group: int, dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize` up to the rounding: x_hat [..., T, H] in `dtype`."""
  del v_group  # the parameters' shape says it
  row = lambda p: row_params(p, which, group=group, k_mode=k_mode)
  return decode_rows(unpack_codes(words, bits), row(scale), row(zero)).astype(dtype)


def splice_residual(x_BKSH: jax.Array, res_BKRH: jax.Array, packed_B: jax.Array) -> jax.Array:
  """Cache positions [0, packed_b) from x (the dequantised packed rows), [packed_b, packed_b + R)
  from the residual window, zeros past it. [B, K, S, H] in x's dtype."""
  S, R = x_BKSH.shape[2], res_BKRH.shape[2]
  r_BS = jnp.arange(S, dtype=jnp.int32)[None, :] - packed_B.astype(jnp.int32)[:, None]
  res_BKSH = jnp.take_along_axis(res_BKRH.astype(x_BKSH.dtype),
                                 jnp.clip(r_BS, 0, R - 1)[:, None, :, None], axis=2)
  out = jnp.where((r_BS >= 0)[:, None, :, None], res_BKSH, x_BKSH)
  return jnp.where((r_BS < R)[:, None, :, None], out, 0)


def dequantize_cache(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
                     packed_B, *, bits: int, group: int, k_mode: str, v_group: int,
                     dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """The whole cache as dense (k, v) [B, K, S, H] in `dtype`: dequantised packed rows below
  packed_b, the residual window after them, zeros past the window."""
  kw = {"bits": bits, "group": group, "k_mode": k_mode, "v_group": v_group, "dtype": dtype}
  k = dequantize(k_packed, k_scale, k_zero, "k", **kw)
  v = dequantize(v_packed, v_scale, v_zero, "v", **kw)
  return splice_residual(k, res_k, packed_B), splice_residual(v, res_v, packed_B)
