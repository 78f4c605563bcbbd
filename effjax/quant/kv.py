"""The low-bit KV cache of BitDecoding / KIVI: 4 or 2-bit keys and values plus a full-precision
residual window, as one layer's cache entry (`QuantKV`, the same methods as `effjax.cache.DenseKV`,
so the model runs on it unchanged).

Quantisation (KIVI): asymmetric min/max integers, x_hat = code * scale + zero, code in
[0, 2^bits - 1]. Keys are quantised **per channel** over groups of `group` consecutive tokens
(key outliers sit in fixed channels, so a per-token scale would be set by the outlier channel and
crush the others; `k_mode="token"` is kept to show that); values **per token**, one scale per
`v_group` channels (default the whole head). Scales and zeros are stored in the cache dtype, zero
rounded down and scale up so |x - x_hat| <= scale / 2 holds for what is stored
(`pallas_kernels.lowbit_decode.layout`).

Packed layout: int32 words, token-major like the dense cache, k_packed / v_packed [B, K, S, W]
with W = H * bits / 32 words per token row (16 words at H 128 / 4 bits, 8 at 2 bits). Channel
h = i * W + c is stored in word c at bits [i * bits, (i + 1) * bits), i = 0 .. 32 / bits - 1.
  - Why this order: one logical shift and mask of a [T, W] tile of words yields sub-word i of
    every word, which is the *contiguous* channel slice [i * W, (i + 1) * W) of those T tokens.
    A kernel rebuilds a [T, H] tile by concatenating 32 / bits such slices, or runs 32 / bits
    partial dots against contiguous slices of q -- no shuffles, no gathers. (BitDecoding's
    interleaved 16-bit words suit lop3 conversions in CUDA registers; a Pallas kernel works with
    whole-tile shifts, for which contiguous slices are the cheap form.)
  - Why token rows: a token block is a contiguous [block, W] slab at rows [j * block, (j + 1) *
    block), so block-sparse decode addresses blocks exactly as in the dense cache, and a decode
    step writes whole rows.
  - Why int32 words: the widest integer every Pallas backend loads and shifts; uint32 semantics
    come from logical shifts (the top code's bit is the sign bit).

The fold that makes the kernel cheap (no dequantised tile is materialised): for the tokens t of
one K group (per-channel scale s_h, zero z_h), q . k_hat_t = sum_h (q_h s_h) code_th + sum_h q_h
z_h, i.e. one dot of the scaled query (q * s, once per group) with the raw codes plus a constant
per group; for per-token V (v_group = H), p @ v_hat = (p * v_scale) @ codes + sum_t p_t v_zero_t.
`block_size` must divide `group` so a sparse block never straddles two K scales or the
packed / residual boundary.

Residual window (KIVI): the newest tokens stay in full precision in res_k / res_v [B, K, R, H],
R = `window` (a multiple of group; default 128 at 4 bits, 256 at 2). Per sequence `packed_B` [B]
counts packed tokens (a multiple of group): positions [0, packed_b) are packed, [packed_b,
length_b) are residual slots [0, length_b - packed_b), always fewer than R after a write.

`write(k, v, start_B)` keeps that invariant for any T new tokens at [start_b, start_b + T), the
new end of the sequence (decode, chunked prefill, and ReSA's rectification, which rewrites the
last f tokens):
  - rows already packed that the write touches are rolled back: the groups from the one holding
    start_b onward are dequantised into a full-precision window with the old residual and the
    new rows, and packed_b drops to that group's start;
  - if that window then holds R tokens or more, all of its full groups are (re-)quantised into
    the packed region and packed_b advances past them; the rest is the new residual. One token a
    step therefore packs exactly R tokens when the residual fills (KIVI's flush); the groups a
    rectification rewrote are re-quantised at once if the window reaches R, else they wait in
    full precision for the next flush.
  - a prefill (start_B None) packs every full group of each prompt and keeps the tail (< group
    tokens) in the residual. Its lengths come from `lengths_B=` (default: all T rows); without
    them padding rows of short prompts may be packed, and the first decode step at a position
    below packed_b rolls that group back (correct; the rolled-back rows carry the error of a scale
    fitted with the padding).
Under jit each sequence takes its own branch through selects; the common decode step (no rollback,
no flush in the whole batch) only writes its rows into the residual. Who decides (`flush`):
  - "layer" (`QuantKV.init` / `init_cache`'s default): each layer's write decides for itself
    (`lax.cond` on the batch).
  - "step": `decoding.decode_step` / `extend` ask every layer's entry `rewrite_needed` once and
    run the whole step's layers under one `lax.cond`: every layer appends, or every layer takes
    the general path. An XLA:GPU conditional copies its predicate to the host and waits for it,
    so this is one wait a step instead of one a layer; but XLA copies each layer's scales and
    zeros around that conditional (seen on XLA:GPU and XLA:CPU).
  - "loop" (`KVCacheSpec`'s and the config's default): as "step" for a lone `decode_step` /
    `extend`; `decoding.generate`'s loop runs decode
    steps that only append (no conditional at all) while every residual has room, letting a
    window fill to R tokens, and packs full windows (`flush_full`) between such runs. The token that
    fills a window is attended in full precision in its own step (quantised from the next step
    on), where the other modes attend it quantised: that step's logits, and the deeper layers'
    K / V of its token, differ slightly from theirs (tests/test_quant_kv.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from effjax.cache import KVCache
from effjax.config import ModelConfig
from pallas_kernels import checks
from pallas_kernels import lowbit_decode as lowbit_lib
from pallas_kernels.lowbit_decode import layout


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _impl_for(implementation, allowed: tuple[str, ...]):
  """A decode implementation name as the low-bit ops take it: the same name where they have it,
  else their default (e.g. "pallas_triton" chosen for the dense ops)."""
  if implementation in (None, "auto") or implementation in allowed:
    return implementation
  return None


@struct.dataclass
class QuantKV:
  """One layer's low-bit keys and values (module docstring; shapes as `layout.py`):
  k_packed, v_packed int32 [B, K, S, W]; k_scale, k_zero [B, K, S // group, H] (k_mode "channel")
  or [B, K, S, H // v_group] ("token"); v_scale, v_zero [B, K, S, H // v_group]; res_k, res_v
  [B, K, R, H]; packed_B int32 [B]. Scales, zeros and the residual in the cache dtype. bits, group,
  k_mode and v_group are static."""
  k_packed: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  v_packed: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array
  res_k: jax.Array
  res_v: jax.Array
  packed_B: jax.Array
  bits: int = struct.field(pytree_node=False)
  group: int = struct.field(pytree_node=False)
  k_mode: str = struct.field(pytree_node=False)
  v_group: int = struct.field(pytree_node=False)
  flush: str = struct.field(pytree_node=False, default="layer")

  @classmethod
  def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.bfloat16,
           bits: int = 4, group: int = 128, window: int | None = None, k_mode: str = "channel",
           v_group: int | None = None, flush: str = "layer") -> QuantKV:
    """An empty entry for `batch` sequences of up to `capacity` tokens (a multiple of group).
    window: residual tokens R (None: 128 at 4 bits, 256 at 2, rounded up to a multiple of group);
    v_group: channels per V scale (None: head_dim); flush: who decides a write's path, "layer",
    "step" or "loop" (module docstring). Invalid settings raise ValueError."""
    check_flush(flush)
    v_group = head_dim if v_group is None else v_group
    if bits in layout.BITS and isinstance(group, int) and group > 0 and window is None:
      window = layout.default_window(bits, group)
    layout.check_settings(bits=bits, group=group, k_mode=k_mode, v_group=v_group,
                          head_dim=head_dim, capacity=capacity, window=window, dtype=dtype)
    B, K, S, H = batch, n_kv_heads, capacity, head_dim
    W = layout.words_per_row(H, bits)
    k_params = (B, K, S // group, H) if k_mode == "channel" else (B, K, S, H // v_group)
    v_params = (B, K, S, H // v_group)
    words = lambda: jnp.zeros((B, K, S, W), jnp.int32)
    return cls(words(), jnp.zeros(k_params, dtype), jnp.zeros(k_params, dtype),
               words(), jnp.zeros(v_params, dtype), jnp.zeros(v_params, dtype),
               jnp.zeros((B, K, window, H), dtype), jnp.zeros((B, K, window, H), dtype),
               jnp.zeros((B,), jnp.int32), bits=bits, group=group, k_mode=k_mode,
               v_group=v_group, flush=flush)

  # ------------------------------------------------------------------------------ properties

  @property
  def capacity(self) -> int:
    return self.k_packed.shape[2]

  @property
  def window(self) -> int:
    """R, the residual window's tokens."""
    return self.res_k.shape[2]

  @property
  def dtype(self):
    """The cache dtype (residual, scales, zeros)."""
    return self.res_k.dtype

  def settings(self) -> dict:
    """The static layout settings as the `lowbit_decode` ops take them."""
    return {"bits": self.bits, "group": self.group, "k_mode": self.k_mode, "v_group": self.v_group}

  def arrays(self) -> tuple:
    """(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v): the ops' cache
    arguments, in order."""
    return (self.k_packed, self.k_scale, self.k_zero, self.v_packed, self.v_scale, self.v_zero,
            self.res_k, self.res_v)

  # ------------------------------------------------------------------------------ reading

  def dequantize(self) -> tuple[jax.Array, jax.Array]:
    """(k, v) [B, K, S, H] in the cache dtype: dequantised below packed_b, the residual window
    after it, zeros past the window."""
    return _dequantize_cache(*self.arrays(), self.packed_B, **self.settings(), dtype=self.dtype)

  def keys(self) -> jax.Array:
    """[B, K, S, H] keys in the cache dtype (as `dequantize`; what block summaries read)."""
    return _keys(self.k_packed, self.k_scale, self.k_zero, self.res_k, self.packed_B,
                 **self.settings(), dtype=self.dtype)

  # ------------------------------------------------------------------------------ writing

  def rewrite_needed(self, start_B: jax.Array, T: int) -> jax.Array:
    """bool []: whether a write of T tokens at start_B takes the general path in some sequence
    (it rolls packed rows back, or its window reaches R tokens); False: every sequence only
    appends to its residual."""
    if T >= self.window:
      return jnp.bool_(True)
    start_B = start_B.astype(jnp.int32)
    return jnp.any((start_B < self.packed_B) | (start_B + T - self.packed_B >= self.window))

  def flush_needed(self, lengths_B: jax.Array) -> jax.Array:
    """bool []: whether some sequence's residual window is full (holds R tokens; only after
    appends with flush "loop")."""
    return jnp.any(lengths_B.astype(jnp.int32) - self.packed_B >= self.window)

  def flush_full(self, lengths_B: jax.Array) -> QuantKV:
    """Packs the full groups of every sequence whose residual holds R tokens (positions up to
    lengths_b); other sequences are unchanged. The general write with no new rows."""
    B, K, _, _ = self.k_packed.shape
    H = self.res_k.shape[3]
    end = lengths_B.astype(jnp.int32)
    none = jnp.zeros((B, K, 1, H), self.dtype)      # one row, never taken (start = end)
    return self._rewrite(none, none, end, end, fresh=False)

  def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, start_B: jax.Array | None, *,
            lengths_B: jax.Array | None = None, path: str | None = None) -> QuantKV:
    """Stores T new tokens per sequence at positions [start_b, start_b + T), which become the
    sequence's last (module docstring: rows already packed are rolled back and re-quantised; a
    window of R tokens or more is packed). start_B None: a prefill from position 0 whose prompts
    hold lengths_B (int [B] in [1, T]; None: T) tokens; every full group is packed.
    k_BTKH, v_BTKH: [B, T, K, H], any float dtype (stored in the cache dtype).
    path (with start_B): None decides here (`lax.cond`); "rewrite" takes the general path (always
    correct); "append" only writes the residual, for a caller that checked `rewrite_needed` is
    False (or, flush "loop", that the residual has room: it may then hold R tokens until
    `flush_full`)."""
    if path not in (None, "rewrite", "append"):
      raise ValueError(f"path must be None, 'rewrite' or 'append', got {path!r}")
    B, K, S, _ = self.k_packed.shape
    H = self.res_k.shape[3]
    for name, x in (("k_BTKH", k_BTKH), ("v_BTKH", v_BTKH)):
      shape = getattr(x, "shape", None)
      if shape is None or len(shape) != 4 or (shape[0], shape[2], shape[3]) != (B, K, H):
        raise ValueError(f"{name} must be [B={B}, T, K={K}, H={H}], got {shape}")
    if k_BTKH.shape != v_BTKH.shape:
      raise ValueError(f"k_BTKH {k_BTKH.shape} and v_BTKH {v_BTKH.shape} must have one shape")
    T = k_BTKH.shape[1]
    if not 1 <= T <= S:
      raise ValueError(f"write needs 1 <= T <= capacity {S} new tokens, got T={T}")
    if start_B is None:
      if lengths_B is None:
        end_B = jnp.full((B,), T, jnp.int32)
      else:
        checks.check_positions("lengths_B", lengths_B, B, T, "T")
        end_B = lengths_B.astype(jnp.int32)
      return _store(self, k_BTKH, v_BTKH, jnp.zeros((B,), jnp.int32), end_B, fresh=True)
    if lengths_B is not None:
      raise ValueError("lengths_B goes with a prefill (start_B None); a write at start_B ends "
                       "at start_B + T")
    checks.check_positions("start_B", start_B, B, S - T, "S - T")
    start_B = start_B.astype(jnp.int32)
    return _store(self, k_BTKH, v_BTKH, start_B, start_B + T, fresh=False, path=path)

  def _append(self, k_BKTH, v_BKTH, start_B) -> QuantKV:
    """Rows into residual slots [start_b - packed_b, + T) (the caller checked they fit)."""
    put = jax.vmap(lambda r, x, s: lax.dynamic_update_slice_in_dim(r, x, s, axis=1))
    slot_B = start_B - self.packed_B
    return self.replace(res_k=put(self.res_k, k_BKTH, slot_B),
                        res_v=put(self.res_v, v_BKTH, slot_B))

  def _rewrite(self, k_BKTH, v_BKTH, start_B, end_B, *, fresh: bool) -> QuantKV:
    """The general write: per sequence, a full-precision window of rows from p0 = min(packed_b,
    start_b's group start) -- old packed rows dequantised, the old residual, the new rows --
    then its full groups packed if it holds R tokens or more (always, for a prefill)."""
    g, R, S = self.group, self.window, self.capacity
    T = k_BKTH.shape[2]
    n_rows = _round_up(T if fresh else R + T, g)     # covers end - p0 (< R + T, or <= T fresh)
    dt, kw = self.dtype, self.settings()
    channel = self.k_mode == "channel"

    def one(kp, ks, kz, vp, vs, vz, rk, rv, packed, knew, vnew, start, end):
      p0 = jnp.int32(0) if fresh else jnp.minimum(packed, start // g * g)
      j = jnp.arange(n_rows, dtype=jnp.int32)
      pos = p0 + j
      is_new = ((pos >= start) & (pos < end))[None, :, None]
      new_idx = jnp.clip(pos - start, 0, T - 1)

      def window(new, words, scale, zero, res, per_group):
        x_new = jnp.take(new, new_idx, axis=1, mode="clip")
        if fresh:
          return x_new
        rows = jnp.clip(pos, 0, S - 1)
        p_rows = jnp.clip(pos // g, 0, S // g - 1) if per_group else rows
        take = lambda x, i: jnp.take(x, i, axis=1, mode="clip")   # indices are in range
        old = layout.decode_rows(layout.unpack_codes(take(words, rows), self.bits),
                                 take(scale, p_rows), take(zero, p_rows))
        in_res = take(res, jnp.clip(pos - packed, 0, R - 1))
        old = jnp.where((pos < packed)[None, :, None], old.astype(dt), in_res)
        return jnp.where(is_new, x_new, old)

      xk = window(knew, kp, ks, kz, rk, channel)
      xv = window(vnew, vp, vs, vz, rv, False)
      n = end - p0
      n_pack = n // g * g
      if not fresh:
        n_pack = jnp.where(n >= R, n_pack, 0)
      # Only the window's first n_pack rows (whole groups) are stored; the rest index past the
      # end and are dropped. Packed rows at or past the new packed_b are never read.
      row_to = jnp.where(j < n_pack, pos, S)
      gj = jnp.arange(n_rows // g, dtype=jnp.int32)
      group_to = jnp.where(gj * g < n_pack, p0 // g + gj, S // g)
      wk, sk, zk = layout.quantize(xk, "k", **kw, dtype=dt)
      wv, sv, zv = layout.quantize(xv, "v", **kw, dtype=dt)
      k_to = group_to if channel else row_to
      put = lambda buf, x, to: buf.at[:, to].set(x, mode="drop")
      pad = jnp.zeros((xk.shape[0], R, xk.shape[2]), dt)
      tail = lambda x: lax.dynamic_slice_in_dim(jnp.concatenate([x, pad], axis=1), n_pack, R, 1)
      return (put(kp, wk, row_to), put(ks, sk, k_to), put(kz, zk, k_to),
              put(vp, wv, row_to), put(vs, sv, row_to), put(vz, zv, row_to),
              tail(xk), tail(xv), p0 + n_pack)

    out = jax.vmap(one)(*self.arrays(), self.packed_B, k_BKTH, v_BKTH, start_B, end_B)
    return self.replace(k_packed=out[0], k_scale=out[1], k_zero=out[2], v_packed=out[3],
                        v_scale=out[4], v_zero=out[5], res_k=out[6], res_v=out[7],
                        packed_B=out[8].astype(jnp.int32))

  # ------------------------------------------------------------------------------ attention

  def attend(self, q_BTNH: jax.Array, start_B: jax.Array, implementation=None) -> jax.Array:
    """Causal attention of T new queries at positions [start_b, start_b + T) over this cache
    (which already holds them): `lowbit_decode_attention` for one token,
    `lowbit_extend_attention` for more. Returns [B, T, N, H] in q's dtype."""
    B, T, N, H = q_BTNH.shape
    K = self.k_packed.shape[1]
    G = N // K
    start_B = start_B.astype(jnp.int32)
    if T == 1:
      q_BKGH = q_BTNH[:, 0].reshape(B, K, G, H).astype(self.dtype)
      o = lowbit_lib.lowbit_decode_attention(
          q_BKGH, *self.arrays(), start_B + 1, self.packed_B, **self.settings(),
          implementation=_impl_for(implementation, lowbit_lib.IMPLEMENTATIONS))
      return o.reshape(B, 1, N, H).astype(q_BTNH.dtype)
    q_BKTGH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).astype(self.dtype)
    o = lowbit_lib.lowbit_extend_attention(
        q_BKTGH, *self.arrays(), start_B, self.packed_B, **self.settings(),
        implementation=_impl_for(implementation, lowbit_lib.EXTEND_IMPLEMENTATIONS))
    return o.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)

  def attend_blocks(self, q_BKGH: jax.Array, lengths_B: jax.Array, block_indices_BKM: jax.Array,
                    *, block_size: int, num_live_BK=None, implementation=None) -> jax.Array:
    """Block-sparse decode attention of one new token per sequence over the selected blocks
    (block_size must divide group). Returns [B, K, G, H] in the cache dtype."""
    return lowbit_lib.lowbit_decode_attention(
        q_BKGH.astype(self.dtype), *self.arrays(), lengths_B, self.packed_B, **self.settings(),
        block_indices_BKM=block_indices_BKM, block_size=block_size, num_live_BK=num_live_BK,
        implementation=_impl_for(implementation, lowbit_lib.IMPLEMENTATIONS))


# jitted so that eager use (tests, notebooks) runs one program, not hundreds of small ones; inside
# a jitted step they are inlined.
@functools.partial(jax.jit, static_argnames=("fresh", "path"))
def _store(entry: QuantKV, k_BTKH, v_BTKH, start_B, end_B, *, fresh: bool,
           path: str | None = None) -> QuantKV:
  k_BKTH = k_BTKH.transpose(0, 2, 1, 3).astype(entry.dtype)
  v_BKTH = v_BTKH.transpose(0, 2, 1, 3).astype(entry.dtype)
  T = k_BKTH.shape[2]
  if fresh or T >= entry.window or path == "rewrite":
    return entry._rewrite(k_BKTH, v_BKTH, start_B, end_B, fresh=fresh)
  if path == "append":
    return entry._append(k_BKTH, v_BKTH, start_B)
  # The common step: every sequence's rows land in its residual without filling it.
  return lax.cond(entry.rewrite_needed(start_B, T),
                  lambda e: e._rewrite(k_BKTH, v_BKTH, start_B, end_B, fresh=False),
                  lambda e: e._append(k_BKTH, v_BKTH, start_B),
                  entry)


_SETTINGS = ("bits", "group", "k_mode", "v_group", "dtype")
_dequantize_cache = jax.jit(layout.dequantize_cache, static_argnames=_SETTINGS)


@functools.partial(jax.jit, static_argnames=_SETTINGS)
def _keys(k_packed, k_scale, k_zero, res_k, packed_B, **kw):
  k = layout.dequantize(k_packed, k_scale, k_zero, "k", **kw)
  return layout.splice_residual(k, res_k, packed_B)


def check_flush(flush) -> None:
  if flush not in FLUSH:
    raise ValueError(f"flush must be one of {', '.join(FLUSH)}, got {flush!r}")


FLUSH = ("layer", "step", "loop")


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16, *, bits: int = 4,
               group: int = 128, window: int | None = None, k_mode: str = "channel",
               v_group: int | None = None, flush: str = "layer") -> KVCache:
  """An empty low-bit `KVCache` (one `QuantKV` per layer) for `batch` sequences of up to
  `capacity` tokens; settings as `QuantKV.init`."""
  if capacity > cfg.max_seq_len:
    raise ValueError(f"cache capacity {capacity} exceeds model.max_seq_len={cfg.max_seq_len}")
  entry = lambda: QuantKV.init(batch, cfg.n_kv_heads, capacity, cfg.hd, dtype, bits=bits,
                               group=group, window=window, k_mode=k_mode, v_group=v_group,
                               flush=flush)
  return KVCache(layers=tuple(entry() for _ in range(cfg.n_layers)),
                 lengths=jnp.zeros((batch,), jnp.int32))


KV_CACHE_KINDS = ("bf16", "float32", "int4", "int2")


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
  """How a generation stores its KV cache (hashable: a static argument of the jitted loops).

  kind: "bf16" / "float32" (a dense `DenseKV` cache) or "int4" / "int2" (`QuantKV`: K per channel
  in groups of `group` tokens, or per token with k_mode "token"; V per token in groups of
  `v_group` channels (None: the head); a full-precision residual window of `window` tokens (None:
  128 at 4 bits, 256 at 2); scales, zeros and the window in bfloat16). flush: who decides a
  write's path, "layer", "step" or "loop" (module docstring)."""
  kind: str = "bf16"
  group: int = 128
  window: int | None = None
  k_mode: str = "channel"
  v_group: int | None = None
  flush: str = "loop"

  def __post_init__(self):
    if self.kind not in KV_CACHE_KINDS:
      raise ValueError(f"kv cache must be one of {', '.join(KV_CACHE_KINDS)}, got {self.kind!r}")
    check_flush(self.flush)
    if self.bits:
      layout.check_settings(bits=self.bits, group=self.group, k_mode=self.k_mode,
                            v_group=self.v_group or 128, head_dim=128, window=self.window)

  @property
  def bits(self) -> int | None:
    return {"int4": 4, "int2": 2}.get(self.kind)

  @classmethod
  def from_config(cls, decode) -> "KVCacheSpec | None":
    """The spec of a config's decode section (`effjax.config.DecodeConfig`); None for bf16."""
    if decode.kv_cache == "bf16":
      return None
    return cls(decode.kv_cache, group=decode.kv_group, window=decode.kv_window,
               k_mode=decode.kv_k_mode, v_group=decode.kv_v_group, flush=decode.kv_flush)

  @property
  def capacity_multiple(self) -> int:
    """Cache capacities must be multiples of this (the K group of a low-bit cache)."""
    return self.group if self.bits else 1

  def init(self, cfg: ModelConfig, batch: int, capacity: int) -> KVCache:
    if not self.bits:
      return KVCache.init(cfg, batch, capacity, jnp.bfloat16 if self.kind == "bf16" else jnp.float32)
    return init_cache(cfg, batch, capacity, jnp.bfloat16, bits=self.bits, group=self.group,
                      window=self.window, k_mode=self.k_mode, v_group=self.v_group,
                      flush=self.flush)
