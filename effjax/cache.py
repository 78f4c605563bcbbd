"""Typed decoding state: the KV cache and the block summaries sparse decoding selects from.

All are pytrees (`flax.struct.dataclass`), passed into and returned from the jitted steps.

`KVCache` holds one entry per layer plus the per-sequence lengths. A layer entry owns its storage
*and* how attention reads it: `write` stores new tokens, `attend` runs decode (one token) or
extend (several) attention over it, `attend_blocks` block-sparse decode, `keys` the keys block
summaries are computed from. The model only calls these, so another storage format (a packed
low-bit cache with scales, zeros and a full-precision residual window) is another entry class
with the same methods, not another path through the model. `DenseKV` is the bf16 / f32 one.

One buffer per layer, not a stacked [L, ...] array: a decode step writes one token into each
layer's buffer in place (a scatter on a donated / loop-carried buffer) and hands that same buffer
to the attention kernel. With a stacked cache, slicing a layer out for the kernel and stacking the
updated layers back would copy the whole cache every step -- more bytes than attention reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from effjax.config import ModelConfig
from pallas_kernels import decode_attention as decode_lib
from pallas_kernels import extend_attention as extend_lib
from pallas_kernels import sparse_decode as sparse_lib


def _impl_for(implementation, allowed: tuple[str, ...]):
  """A decode implementation name as another op takes it: the same name where that op has it,
  else that op's default (e.g. decode's "pallas_mosaic_tpu" for extend, which has no TPU kernel)."""
  if implementation in (None, "auto") or implementation in allowed:
    return implementation
  return None


@struct.dataclass
class DenseKV:
  """One layer's keys and values in the cache dtype: k, v [B, K, S, H] (S = capacity), stored per
  KV head as [S, H] rows, the layout the decode kernels read."""
  k: jax.Array
  v: jax.Array

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  @property
  def dtype(self):
    return self.k.dtype

  def keys(self) -> jax.Array:
    """[B, K, S, H] keys (what block summaries are computed from)."""
    return self.k

  def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, start_B: jax.Array | None, *,
            lengths_B: jax.Array | None = None) -> "DenseKV":
    """Stores T new tokens per sequence at positions [start_b, start_b + T) (start_B None: at 0
    for every sequence, a prefill of prompts of lengths_B tokens; a dense cache stores all T)."""
    del lengths_B
    if start_B is None:
      put = lambda c, x: jax.lax.dynamic_update_slice(
          c, x.transpose(0, 2, 1, 3).astype(c.dtype), (0, 0, 0, 0))
      return DenseKV(put(self.k, k_BTKH), put(self.v, v_BTKH))
    upd = lambda c, x, p: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, p, 0))
    put = lambda c, x: jax.vmap(upd)(c, x.transpose(0, 2, 1, 3), start_B)
    return DenseKV(put(self.k, k_BTKH), put(self.v, v_BTKH))

  def attend(self, q_BTNH: jax.Array, start_B: jax.Array, implementation=None) -> jax.Array:
    """Causal attention of T new queries at positions [start_b, start_b + T) over this cache
    (which already holds them): `decode_attention` for one token, `extend_attention` for more.
    Returns [B, T, N, H] in q's dtype."""
    B, T, N, H = q_BTNH.shape
    K = self.k.shape[1]
    G = N // K
    if T == 1:
      q_BKGH = q_BTNH[:, 0].reshape(B, K, G, H).astype(self.k.dtype)
      o = decode_lib.decode_attention(q_BKGH, self.k, self.v, start_B + 1,
                                      implementation=implementation)
      return o.reshape(B, 1, N, H).astype(q_BTNH.dtype)
    q_BKTGH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).astype(self.k.dtype)
    o = extend_lib.extend_attention(q_BKTGH, self.k, self.v, start_B.astype(jnp.int32),
                                    implementation=_impl_for(implementation,
                                                             extend_lib.IMPLEMENTATIONS))
    return o.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)

  def attend_blocks(self, q_BKGH: jax.Array, lengths_B: jax.Array, block_indices_BKM: jax.Array,
                    *, block_size: int, num_live_BK=None, implementation=None) -> jax.Array:
    """Block-sparse decode attention of one new token per sequence over the selected blocks
    (`sparse_decode_attention`). Returns [B, K, G, H] in the cache dtype."""
    return sparse_lib.sparse_decode_attention(
        q_BKGH.astype(self.k.dtype), self.k, self.v, lengths_B, block_indices_BKM,
        block_size=block_size, implementation=implementation, num_live_BK=num_live_BK)


@struct.dataclass
class KVCache:
  """The decoding cache: layers, one entry per layer (`DenseKV`, or another storage with its
  methods); lengths int32 [B], the valid tokens per sequence (prompts right-padded)."""
  layers: tuple
  lengths: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> "KVCache":
    """An empty dense cache for `batch` sequences of up to `capacity` tokens."""
    if capacity > cfg.max_seq_len:
      raise ValueError(f"cache capacity {capacity} exceeds model.max_seq_len={cfg.max_seq_len}")
    shape = (batch, cfg.n_kv_heads, capacity, cfg.hd)
    return cls(layers=tuple(DenseKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                            for _ in range(cfg.n_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def capacity(self) -> int:
    """Tokens the cache can hold (S)."""
    return self.layers[0].capacity

  @property
  def dtype(self):
    return self.layers[0].dtype

  def rewrite_needed(self, start_B: jax.Array, T: int) -> jax.Array | None:
    """bool []: whether a write of T tokens at start_B takes its storage's general path in some
    layer whose entry leaves that decision to the step (flush "step" or "loop", e.g.
    `effjax.quant.kv.QuantKV`); None when no layer does (a dense cache). The step then runs its
    layers under one `lax.cond`, writing with path "rewrite" or "append"."""
    needs = [e.rewrite_needed(start_B, T) for e in self.layers
             if getattr(e, "flush", None) in STEP_FLUSH]
    return jnp.any(jnp.stack(needs)) if needs else None

  def loop_flush(self) -> bool:
    """Whether a generation loop should run append-only steps and flush between them (some
    layer's entry has flush "loop")."""
    return any(getattr(e, "flush", None) == "loop" for e in self.layers)

  def flush_needed(self) -> jax.Array:
    """bool []: some "loop" layer's residual is full (`QuantKV.flush_needed`)."""
    return jnp.any(jnp.stack([e.flush_needed(self.lengths) for e in self.layers
                              if getattr(e, "flush", None) == "loop"]))

  def flush_full(self) -> "KVCache":
    """Every "loop" layer's full residual windows packed (`QuantKV.flush_full`)."""
    layers = tuple(e.flush_full(self.lengths) if getattr(e, "flush", None) == "loop" else e
                   for e in self.layers)
    return KVCache(layers=layers, lengths=self.lengths)


# entries whose write path a step decides for all layers at once (`KVCache.rewrite_needed`)
STEP_FLUSH = ("step", "loop")


@struct.dataclass
class BlockMinMax:
  """One layer's Quest summaries: the channel-wise min and max key of every block of the cache,
  kmin / kmax [B, K, Nb, H] in the key dtype (Nb = S / block_size; empty blocks +inf / -inf)."""
  kmin: jax.Array
  kmax: jax.Array


@struct.dataclass
class GateKCache:
  """One layer's K-compression cache of the SeerAttention-R decode gate: one pooled, projected
  and RoPE'd key per block, kc [B, K, Nb, Dg] (bfloat16 by default; float32 or float8_e4m3fn)."""
  kc: jax.Array
