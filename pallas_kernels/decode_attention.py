"""Dense decode attention: one new query token per sequence against a ragged KV cache.

  o_BKGH = decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, implementation="auto")

GQA heads are packed per KV head (q_BKGH [B, K, G, H]), the cache is [B, K, S, H] with S the
capacity, and keys at positions >= lengths_B[b] are ignored. Implementations:

- `xla`: `decode_attention_reference`, plain jnp (f32 softmax, HIGHEST-precision matmuls).
- `pallas_triton`: split-K flash decoding. Grid (B, K, num_splits); program (b, k, j) takes the
  j-th share of the live key blocks of sequence b (the live blocks, cdiv(length, block_k), are
  divided among splits at run time so ragged lengths balance), runs an online softmax over them
  and writes an (acc, max, sum) partial; `_splitk.splitk_call` merges the partials (in XLA, or
  by `_combine.py` from 8 splits).
- `auto`: pallas_triton on GPU, xla elsewhere (no TPU kernel yet).

`extend_attention` is the same split-K kernel for F consecutive new tokens per sequence (ReSA's
rectification, chunked prefill): the F x G query rows of a KV head share every K/V block load,
each row masked causally at its own position, so the cache is read once for all F tokens and no
[F, S] score matrix is ever materialised.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _splitk


@dataclasses.dataclass(frozen=True)
class DecodeConfig(_splitk.SplitKConfig):
  """Launch parameters of the dense Triton decode kernel.

  block_k: keys per loop step (power of 2, >= 16); None picks 64 (tuned with about one program
  per SM: benchmarks/tune_decode.py; 4 pipeline stages by default since the H200 sweep, where 4
  beat 3 by 3-5% at B1 S128K, B8 S128K, B1 S32K and B16 S8K: results/NVIDIA_H200/tune_2.json).
  num_splits / num_warps / num_stages: see `_splitk.SplitKConfig`.
  """
  block_k: int | None = None

  def validate(self) -> None:
    super().validate()
    bk = self.block_k
    if bk is not None and (not isinstance(bk, int) or not _splitk.is_power_of_2(bk) or bk < 16):
      raise ValueError(f"config.block_k must be a power of 2 >= 16 or None, got {bk!r}")

  def resolved_block_k(self, dtype) -> int:
    if self.block_k is not None:
      return self.block_k
    return 64


# ------------------------------------------------------------------------------------ reference


def masked_decode_reference(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                            valid_BKS: jax.Array) -> jax.Array:
  """Softmax attention of q over the keys where valid_BKS is True (f32 softmax).

  q_BKGH [B, K, G, H], k_BKSH / v_BKSH [B, K, S, H], valid_BKS bool [B, K, S]; returns
  [B, K, G, H] in q's dtype, zeros for rows with no valid key. Shared by the dense and the
  block-sparse references, which differ only in the mask.
  """
  hi = lax.Precision.HIGHEST
  scale = q_BKGH.shape[-1] ** -0.5
  # preferred_element_type instead of upcasting K: the bf16 x bf16 products are exact in f32,
  # and a f32 copy of a long cache would double the reference's memory.
  s_BKGS = jnp.einsum("bkgh,bksh->bkgs", q_BKGH, k_BKSH, precision=hi,
                      preferred_element_type=jnp.float32) * scale
  valid_BK1S = valid_BKS[:, :, None, :]
  s_BKGS = jnp.where(valid_BK1S, s_BKGS, -jnp.inf)
  m_BKG = jnp.max(s_BKGS, axis=-1, keepdims=True)
  m_BKG = jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0)
  p_BKGS = jnp.where(valid_BK1S, jnp.exp(s_BKGS - m_BKG), 0.0)
  l_BKG = jnp.sum(p_BKGS, axis=-1, keepdims=True)
  o_BKGH = jnp.einsum("bkgs,bksh->bkgh", p_BKGS, v_BKSH.astype(jnp.float32), precision=hi)
  return (o_BKGH / jnp.where(l_BKG > 0, l_BKG, 1.0)).astype(q_BKGH.dtype)


def length_mask(lengths_B: jax.Array, n_heads: int, seq: int) -> jax.Array:
  """bool [B, K, S]: token s of sequence b is valid iff s < lengths_B[b]."""
  valid_BS = jnp.arange(seq)[None, :] < lengths_B[:, None]
  return jnp.broadcast_to(valid_BS[:, None, :], (lengths_B.shape[0], n_heads, seq))


@jax.jit
def decode_attention_reference(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                               lengths_B: jax.Array) -> jax.Array:
  """Plain-jnp decode attention (the `xla` implementation); shapes as `decode_attention`."""
  valid_BKS = length_mask(lengths_B, k_BKSH.shape[1], k_BKSH.shape[2])
  return masked_decode_reference(q_BKGH, k_BKSH, v_BKSH, valid_BKS)


# ------------------------------------------------------------------------- Pallas Triton kernel


def _split_range(n_keys, block_k: int, num_splits: int):
  """This program's share [first, end) of the cdiv(n_keys, block_k) key blocks (split = program
  axis 2), decided at run time so ragged lengths balance across the splits."""
  n_blocks = pl.cdiv(n_keys, block_k)
  per_split = pl.cdiv(n_blocks, num_splits)
  first = pl.program_id(2) * per_split
  return first, jnp.minimum(first + per_split, n_blocks)


def _resolve_config(config) -> DecodeConfig:
  """The config argument: None -> defaults; anything but a valid DecodeConfig -> ValueError."""
  config = DecodeConfig() if config is None else config
  if not isinstance(config, DecodeConfig):
    raise ValueError(f"config must be a DecodeConfig, got {type(config).__name__}")
  config.validate()
  return config


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_k: int,
                   num_splits: int, scale: float, precision: lax.Precision, n_rows: int):
  """Program (b, k, j). len_ref: int32 []; q_ref [R, H]; k_ref / v_ref [S, H] (the whole cache of
  this (b, k), so the split boundaries can follow the run-time length); o_ref f32 [R, H];
  m_ref / l_ref f32 [R]."""
  length = len_ref[()]
  start, end = _split_range(length, block_k, num_splits)
  offsets_T = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

  def load_block(i):
    t0 = pl.multiple_of(i * block_k, block_k)
    # Only the last block of a sequence is partial, but one compare per key is cheaper than
    # a branch, and the kernel is bound by the K/V bytes anyway.
    return (k_ref[pl.ds(t0, block_k), :], v_ref[pl.ds(t0, block_k), :],
            t0 + offsets_T < length)

  _splitk.attend_range(q_ref, o_ref, m_ref, l_ref, start, end, load_block, scale=scale,
                       precision=precision, n_rows=n_rows)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _decode_triton(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, lengths_B: jax.Array,
                   config: DecodeConfig, interpret: bool) -> jax.Array:
  B, K, G, H = q_BKGH.shape
  block_k = config.resolved_block_k(q_BKGH.dtype)
  # Capacity padded to whole blocks so a block load never runs past the buffer; a no-op (no copy)
  # for the usual power-of-2 capacities.
  k_BKSH = _splitk.pad_axis(k_BKSH, 2, block_k)
  v_BKSH = _splitk.pad_axis(v_BKSH, 2, block_k)
  S = k_BKSH.shape[2]
  num_splits = config.num_splits or _splitk.default_num_splits(
      B * K, S // block_k, _splitk.target_programs(_splitk.DENSE_PROGRAMS_PER_SM))
  kernel = functools.partial(_decode_kernel, block_k=block_k, num_splits=num_splits,
                             scale=H ** -0.5, precision=_splitk.dot_precision(q_BKGH.dtype))
  return _splitk.splitk_call(
      kernel, [pl.BlockSpec((_splitk.SQUEEZED,), lambda b, k, j: (b,))],
      [lengths_B.astype(jnp.int32)], q_BKGH, k_BKSH, v_BKSH, num_splits=num_splits,
      tile_rows=block_k, config=config, interpret=interpret, name="decode_attention",
      default_stages=4)


# ------------------------------------------------------------- F new tokens per sequence (extend)


def extend_attention_reference(q_BKFGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                               start_B: jax.Array) -> jax.Array:
  """Plain-jnp causal attention of F new tokens per sequence at positions start_b + f over a
  cache that already holds them: token f sees keys [0, start_b + f]. Shapes as
  `extend_attention`; f32 softmax, HIGHEST-precision dots."""
  B, K, F, G, H = q_BKFGH.shape
  S = k_BKSH.shape[2]
  hi = lax.Precision.HIGHEST
  s = jnp.einsum("bkfgh,bksh->bkfgs", q_BKFGH, k_BKSH, precision=hi,
                 preferred_element_type=jnp.float32) * H ** -0.5
  q_pos_BF = start_B[:, None] + jnp.arange(F)[None]
  valid = (jnp.arange(S)[None, None, :] <= q_pos_BF[:, :, None])[:, None, :, None, :]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkfgs,bksh->bkfgh", p, v_BKSH.astype(jnp.float32), precision=hi)
  return (o / jnp.where(l > 0, l, 1.0)).astype(q_BKFGH.dtype)


def _extend_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_k: int,
                   num_splits: int, group: int, n_tokens: int, scale: float,
                   precision: lax.Precision, n_rows: int):
  """Program (b, k, j). start_ref int32 []; q_ref [R, H]: row r is query head r % group of new
  token r // group (rows from n_tokens * group on are padding); the rest as `_decode_kernel`."""
  start = start_ref[()]
  rows_R = lax.broadcasted_iota(jnp.int32, (q_ref.shape[0],), 0)
  # keys visible to each row: its token's position + 1 (padding rows: the last token's)
  row_len_R = start + jnp.minimum(rows_R // group, n_tokens - 1) + 1
  first, end = _split_range(start + n_tokens, block_k, num_splits)
  offsets_T = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

  def load_block(i):
    t0 = pl.multiple_of(i * block_k, block_k)
    return (k_ref[pl.ds(t0, block_k), :], v_ref[pl.ds(t0, block_k), :],
            (t0 + offsets_T)[None, :] < row_len_R[:, None])

  _splitk.attend_range(q_ref, o_ref, m_ref, l_ref, first, end, load_block, scale=scale,
                       precision=precision, n_rows=n_rows)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _extend_triton(q_BKFGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, start_B: jax.Array,
                   config: DecodeConfig, interpret: bool) -> jax.Array:
  B, K, F, G, H = q_BKFGH.shape
  block_k = config.resolved_block_k(q_BKFGH.dtype)
  k_BKSH = _splitk.pad_axis(k_BKSH, 2, block_k)
  v_BKSH = _splitk.pad_axis(v_BKSH, 2, block_k)
  S = k_BKSH.shape[2]
  rows = F * G
  if config.num_warps == DecodeConfig().num_warps and _splitk.dot_rows(rows) >= 64:
    # [R, H] accumulators of 64+ rows: twice the warps keep them in registers
    config = dataclasses.replace(config, num_warps=8)
  num_splits = config.num_splits or _splitk.default_num_splits(
      B * K, S // block_k, _splitk.target_programs(_splitk.DENSE_PROGRAMS_PER_SM))
  kernel = functools.partial(_extend_kernel, block_k=block_k, num_splits=num_splits, group=G,
                             n_tokens=F, scale=H ** -0.5,
                             precision=_splitk.dot_precision(q_BKFGH.dtype))
  o = _splitk.splitk_call(
      kernel, [pl.BlockSpec((_splitk.SQUEEZED,), lambda b, k, j: (b,))],
      [start_B.astype(jnp.int32)], q_BKFGH.reshape(B, K, rows, H), k_BKSH, v_BKSH,
      num_splits=num_splits, tile_rows=block_k, config=config, interpret=interpret,
      name="extend_attention", default_stages=2)
  return o.reshape(B, K, F, G, H)


def extend_attention(q_BKFGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     start_B: jax.Array, *, implementation: str = "auto", interpret: bool = False,
                     config: DecodeConfig | None = None) -> jax.Array:
  """Causal attention of F new tokens per sequence over a cache that already holds their K/V.

  Args:
    q_BKFGH: [B, K, F, G, H]: the G query heads of KV head k for new token f of sequence b,
      at position start_B[b] + f.
    k_BKSH, v_BKSH: [B, K, S, H] cache (same dtype as q) holding at least start_b + F tokens.
    start_B: int [B], position of each sequence's first new token (start_b + F <= S).
    implementation: "auto" (pallas_triton on GPU, else xla) | "xla" | "pallas_triton".
    config: DecodeConfig for the Triton kernel; a num_warps left at its default (4) becomes 8
      when F x G is 33 rows or more (the [rows, H] accumulators need the registers).

  Returns:
    [B, K, F, G, H] in q's dtype; token f attends to keys [0, start_b + f] (f32 softmax).
  """
  _splitk.check_implementation(implementation)
  if q_BKFGH.ndim != 5:
    raise ValueError(f"q_BKFGH must be 5-D [B, K, F, G, H], got shape {q_BKFGH.shape}")
  B, K, F, G, H = q_BKFGH.shape
  _splitk.check_decode_args(q_BKFGH.reshape(B, K, F * G, H), k_BKSH, v_BKSH, None)
  _splitk.check_positions("start_B", start_B, B, k_BKSH.shape[2] - F, "S - F")
  config = _resolve_config(config)
  if implementation == "auto":
    implementation = _splitk.auto_implementation(H, q_BKFGH.dtype, tpu_available=False)
  if implementation == "pallas_tpu":
    raise ValueError("extend_attention has no TPU kernel yet: use implementation='xla'")
  if implementation == "xla":
    return extend_attention_reference(q_BKFGH, k_BKSH, v_BKSH, start_B.astype(jnp.int32))
  why = _splitk.triton_supported(H, q_BKFGH.dtype)
  if why is not None:
    raise ValueError(f"implementation='pallas_triton': {why}")
  return _extend_triton(q_BKFGH, k_BKSH, v_BKSH, start_B, config, bool(interpret))


# ------------------------------------------------------------------------------------ dispatch


def decode_attention(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     lengths_B: jax.Array, *, implementation: str = "auto",
                     interpret: bool = False, config: DecodeConfig | None = None) -> jax.Array:
  """Attention of one new query token per sequence over a ragged KV cache.

  Args:
    q_BKGH: [B, K, G, H] float32 / bfloat16 / float16, G query heads per KV head.
    k_BKSH, v_BKSH: [B, K, S, H], same dtype as q; S is the cache capacity.
    lengths_B: int [B], valid cached tokens per sequence, in [0, S]; keys at positions
      >= length are ignored.
    implementation: "auto" | "xla" | "pallas_triton" | "pallas_tpu".
    interpret: run the Pallas kernel in interpret mode (CPU testing).
    config: DecodeConfig for the Triton kernel; None uses the defaults.

  Returns:
    o_BKGH [B, K, G, H] in q's dtype; softmax scale H ** -0.5, softmax in float32; rows of a
    sequence with length 0 are zeros.
  """
  _splitk.check_implementation(implementation)
  _splitk.check_decode_args(q_BKGH, k_BKSH, v_BKSH, lengths_B)
  config = _resolve_config(config)
  H = q_BKGH.shape[-1]
  if implementation == "auto":
    implementation = _splitk.auto_implementation(H, q_BKGH.dtype, tpu_available=True)
  if implementation == "xla":
    return decode_attention_reference(q_BKGH, k_BKSH, v_BKSH, lengths_B.astype(jnp.int32))
  if implementation == "pallas_tpu":
    from pallas_kernels import _tpu_decode
    block_k = config.resolved_block_k(q_BKGH.dtype)
    idx, n_live = _tpu_decode.dense_block_list(lengths_B, k_BKSH.shape[1], k_BKSH.shape[2], block_k)
    return _tpu_decode.block_list_decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, idx, n_live,
                                         block_size=block_k,
                                         interpret=_tpu_decode.tpu_interpret(interpret))
  why = _splitk.triton_supported(H, q_BKGH.dtype)
  if why is not None:
    raise ValueError(f"implementation='pallas_triton': {why}")
  return _decode_triton(q_BKGH, k_BKSH, v_BKSH, lengths_B, config, bool(interpret))
