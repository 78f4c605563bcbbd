"""Decode attention over a packed 4 / 2-bit KV cache with a full-precision residual window
(BitDecoding): dequantisation belongs inside the attention, so a kernel reads bits, not bf16.

    o_BKGH = lowbit_decode_attention(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
                                     res_k, res_v, lengths_B, packed_B, bits=4, group=128,
                                     k_mode="channel", v_group=H)

The layout (packed words, scales / zeros, residual, packed_B) is `layout.py`'s; tokens [0,
packed_b) are read packed, [packed_b, length_b) from the residual. With block_indices_BKM only the
selected token blocks are read (as `sparse_decode_attention`: int32 ids of `block_size`-token
blocks, ascending, -1 padded); block_size divides group, so a block is wholly packed or wholly
residual. `lowbit_extend_attention` is the multi-token (causal) form.

Implementations (pallas_kernels.dispatch): `xla` (reference.py: dequantise, splice, masked
reference: what dequantise-then-attend costs) and, for the decode op, `pallas_mosaic_gpu` (the
GPU default where it applies: bf16 / f16, 4-bit H 128 / 256 and 2-bit H 256, K per channel, V per
token, dense or over 64-token blocks; TMA loads of the packed words, dequantisation in registers
into swizzled tiles, wgmmas, the residual window as an XLA partial; pallas_mosaic_gpu.py),
`pallas_triton` (the GPU fallback for every other setting: split-K with the dequantisation fused
into the tile loads, dense or over the selected blocks, pallas_triton.py) and `pallas_mosaic_tpu`
(a scalar-prefetched block list, TPU interpreter only so far). On the H100 at S 128K int4
(docs/results/lowbit_kv_cache.md) the Mosaic GPU kernel takes 0.86-0.96x the time of cuDNN bf16
against the Triton kernel's 0.75x, and 7.7-8.0x with 90% of the blocks at B 8 / 16 (Triton
6.4-6.6x); at B 1 with 90% of the blocks Triton is faster (37 against 46 us), so `auto` over
block selections tries Triton first below `SPARSE_MOSAIC_MIN_PAIRS` (sequence, KV head) pairs.
The extend op has the reference only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import checks, dispatch
from pallas_kernels.dispatch import Op
from pallas_kernels.lowbit_decode import layout
from pallas_kernels.lowbit_decode.reference import (
  lowbit_decode_attention_reference,
  lowbit_extend_attention_reference,
)

_OP = Op("lowbit_decode_attention", __name__,
         backends={"xla": "reference", "pallas_triton": "pallas_triton",
                   "pallas_mosaic_gpu": "pallas_mosaic_gpu",
                   "pallas_mosaic_tpu": "pallas_mosaic_tpu"},
         defaults={"gpu": ("pallas_mosaic_gpu", "pallas_triton"), "tpu": ("pallas_mosaic_tpu",)})
_EXTEND_OP = Op("lowbit_extend_attention", __name__, backends={"xla": "reference"}, defaults={})
IMPLEMENTATIONS = _OP.implementations
EXTEND_IMPLEMENTATIONS = _EXTEND_OP.implementations

__all__ = ["EXTEND_IMPLEMENTATIONS", "IMPLEMENTATIONS", "check_cache_args", "layout",
           "lowbit_decode_attention", "lowbit_decode_attention_reference",
           "lowbit_extend_attention", "lowbit_extend_attention_reference"]


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else None


def check_cache_args(q_BKRH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
                     packed_B, *, bits, group, k_mode, v_group) -> None:
  """ValueError naming the first bad argument: q [B, K, R, H] in the cache dtype; the layout's
  shapes and dtypes (`layout.py`); settings valid for H, S and the window; packed_B int [B] in [0,
  S] (when concrete: multiples of group)."""
  for name, x in (("q", q_BKRH), ("res_k", res_k), ("res_v", res_v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D, got shape {_shape(x)}")
    if jnp.dtype(x.dtype) not in layout.FLOAT_DTYPES:
      raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  B, K, _, H = q_BKRH.shape
  dt = res_k.dtype
  if res_k.shape != res_v.shape or res_k.shape[:2] != (B, K) or res_k.shape[3] != H:
    raise ValueError(f"res_k {res_k.shape} and res_v {res_v.shape} must be [B={B}, K={K}, R, "
                     f"H={H}]")
  if not q_BKRH.dtype == dt == res_v.dtype:
    raise ValueError(f"q, res_k and res_v must share the cache dtype, got {q_BKRH.dtype}, "
                     f"{res_k.dtype}, {res_v.dtype}")
  if getattr(k_packed, "ndim", None) != 4:
    raise ValueError(f"k_packed must be 4-D [B, K, S, W], got shape {_shape(k_packed)}")
  S, R = k_packed.shape[2], res_k.shape[2]
  layout.check_settings(bits=bits, group=group, k_mode=k_mode, v_group=v_group, head_dim=H,
                        capacity=S, window=R, dtype=dt)
  W = layout.words_per_row(H, bits)
  for name, x in (("k_packed", k_packed), ("v_packed", v_packed)):
    if _shape(x) != (B, K, S, W) or x.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32 [B, K, S, H * bits / 32]={(B, K, S, W)}, got "
                       f"{getattr(x, 'dtype', None)} {_shape(x)}")
  k_params = (B, K, S // group, H) if k_mode == "channel" else (B, K, S, H // v_group)
  v_params = (B, K, S, H // v_group)
  for name, x, shape in (("k_scale", k_scale, k_params), ("k_zero", k_zero, k_params),
                         ("v_scale", v_scale, v_params), ("v_zero", v_zero, v_params)):
    if _shape(x) != shape or x.dtype != dt:
      raise ValueError(f"{name} must be {jnp.dtype(dt).name} {shape} (k_mode={k_mode!r}, "
                       f"group={group}, v_group={v_group}), got {getattr(x, 'dtype', None)} "
                       f"{_shape(x)}")
  checks.check_positions("packed_B", packed_B, B, S, "S")
  if checks.is_concrete(packed_B) and np.any(np.asarray(packed_B) % group):
    raise ValueError(f"packed_B must hold multiples of group={group}, got "
                     f"{np.asarray(packed_B).tolist()}")


def _check_within_window(name, end_B, packed_B, R) -> None:
  """When concrete: every token below end_b is packed or in the residual window."""
  if checks.is_concrete(end_B) and checks.is_concrete(packed_B):
    over = np.asarray(end_B) - np.asarray(packed_B)
    if np.any(over > R):
      raise ValueError(f"{name} - packed_B must be <= the window R={R}, got {over.tolist()}")


# Below this many (sequence, KV head) pairs `auto` tries the Triton kernel first for block
# selections: at B1 (8 pairs) S128K with 10% of the blocks it took 37.4 us against the Mosaic
# GPU kernel's 46.4 (whose residual window is a separate XLA partial); from B8 (64 pairs) on the
# Mosaic kernel is faster (178.5 against 212.5 us). H100, docs/results/lowbit_kv_cache.md.
SPARSE_MOSAIC_MIN_PAIRS = 64


def _auto_order(implementation, pairs: int, sparse: bool):
  """`auto` on a GPU for few (sequence, KV head) pairs over block selections: Triton first."""
  if ((implementation is None or implementation == dispatch.AUTO) and sparse
      and dispatch.platform() == "gpu" and pairs < SPARSE_MOSAIC_MIN_PAIRS):
    return ("pallas_triton", "pallas_mosaic_gpu", "xla")
  return implementation


def lowbit_decode_attention(q_BKGH: jax.Array, k_packed: jax.Array, k_scale: jax.Array,
                            k_zero: jax.Array, v_packed: jax.Array, v_scale: jax.Array,
                            v_zero: jax.Array, res_k: jax.Array, res_v: jax.Array,
                            lengths_B: jax.Array, packed_B: jax.Array, *, bits: int, group: int,
                            k_mode: str = "channel", v_group: int | None = None,
                            block_indices_BKM: jax.Array | None = None,
                            block_size: int | None = None, num_live_BK: jax.Array | None = None,
                            implementation=None, interpret: bool = False,
                            config=None) -> jax.Array:
  """Decode attention (one query token per sequence) over a packed low-bit KV cache.

  Args:
    q_BKGH: [B, K, G, H] in the cache dtype (float32 / bfloat16 / float16).
    k_packed, v_packed: int32 [B, K, S, W], W = H * bits / 32 (layout.py).
    k_scale, k_zero: cache dtype, [B, K, S // group, H] (k_mode "channel") or [B, K, S,
      H // v_group] ("token"). v_scale, v_zero: cache dtype [B, K, S, H // v_group].
    res_k, res_v: [B, K, R, H] cache dtype, the residual window (R a multiple of group).
    lengths_B: int [B] valid tokens, in [0, S], at most packed_b + R.
    packed_B: int [B] packed tokens (multiples of group); tokens [packed_b, length_b) are
      residual slots [0, length_b - packed_b).
    bits: 4 or 2. group: tokens per K scale (k_mode "channel"). k_mode: "channel" | "token".
    v_group: channels per V scale (and per K scale in "token" mode); None: H.
    block_indices_BKM: optional int32 [B, K, M] selected blocks of block_size tokens (ascending,
      -1 padded; `sparse_decode_attention`'s form); None: every token below the length.
    block_size: tokens per block (dividing group); needed with block_indices_BKM.
    num_live_BK: optional int32 [B, K] leading live slots (trusted; kernels may use it).
    implementation: None | "xla" | a sequence (pallas_kernels.dispatch). interpret: Pallas
      interpret mode. config: the chosen backend's config.

  Returns:
    o_BKGH [B, K, G, H] in q's dtype: softmax (scale H ** -0.5, float32) attention over the
    dequantised cache; zeros where no token is valid.
  """
  H = getattr(q_BKGH, "shape", (None,))[-1]
  v_group = H if v_group is None else v_group
  check_cache_args(q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k, res_v,
                   packed_B, bits=bits, group=group, k_mode=k_mode, v_group=v_group)
  B, K = q_BKGH.shape[:2]
  S, R = k_packed.shape[2], res_k.shape[2]
  checks.check_positions("lengths_B", lengths_B, B, S, "S")
  _check_within_window("lengths_B", lengths_B, packed_B, R)
  if block_indices_BKM is None:
    if block_size is not None or num_live_BK is not None:
      raise ValueError("block_size and num_live_BK go with block_indices_BKM")
  else:
    if not isinstance(block_size, (int, np.integer)) or block_size < 1 or group % block_size:
      raise ValueError(f"block_size must be a positive int dividing group={group} (a block is "
                       f"then wholly packed or wholly residual), got {block_size!r}")
    checks.check_block_indices(q_BKGH, S, block_indices_BKM, int(block_size))
    if num_live_BK is not None and _shape(num_live_BK) != (B, K):
      raise ValueError(f"num_live_BK must have shape [B, K]={(B, K)}, got {_shape(num_live_BK)}")
    block_size = int(block_size)
  implementation = _auto_order(implementation, B * K, block_indices_BKM is not None)
  return _OP(implementation, q_BKGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, res_k,
             res_v, lengths_B, packed_B, bits=int(bits), group=int(group), k_mode=k_mode,
             v_group=int(v_group), block_indices_BKM=block_indices_BKM, block_size=block_size,
             num_live_BK=num_live_BK, interpret=interpret, config=config)


def lowbit_extend_attention(q_BKFGH: jax.Array, k_packed: jax.Array, k_scale: jax.Array,
                            k_zero: jax.Array, v_packed: jax.Array, v_scale: jax.Array,
                            v_zero: jax.Array, res_k: jax.Array, res_v: jax.Array,
                            start_B: jax.Array, packed_B: jax.Array, *, bits: int, group: int,
                            k_mode: str = "channel", v_group: int | None = None,
                            implementation=None, interpret: bool = False,
                            config=None) -> jax.Array:
  """Causal attention of F new tokens per sequence over a packed low-bit cache that already holds
  them (ReSA's rectification, chunked prefill).

  Args:
    q_BKFGH: [B, K, F, G, H] in the cache dtype: query heads of new token f at start_b + f.
    start_B: int [B], position of each sequence's first new token (start_b + F <= S, and
      start_b + F - packed_b <= R).
    The cache arguments and settings as `lowbit_decode_attention`.

  Returns:
    [B, K, F, G, H] in q's dtype; token f attends to keys [0, start_b + f].
  """
  if getattr(q_BKFGH, "ndim", None) != 5:
    raise ValueError(f"q_BKFGH must be 5-D [B, K, F, G, H], got shape {_shape(q_BKFGH)}")
  B, K, F, G, H = q_BKFGH.shape
  v_group = H if v_group is None else v_group
  check_cache_args(q_BKFGH.reshape(B, K, F * G, H), k_packed, k_scale, k_zero, v_packed, v_scale,
                   v_zero, res_k, res_v, packed_B, bits=bits, group=group, k_mode=k_mode,
                   v_group=v_group)
  S, R = k_packed.shape[2], res_k.shape[2]
  checks.check_positions("start_B", start_B, B, S - F, "S - F")
  if checks.is_concrete(start_B):
    _check_within_window("start_B + F", np.asarray(start_B) + F, packed_B, R)
  return _EXTEND_OP(implementation, q_BKFGH, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
                    res_k, res_v, start_B, packed_B, bits=int(bits), group=int(group),
                    k_mode=k_mode, v_group=int(v_group), interpret=interpret, config=config)
