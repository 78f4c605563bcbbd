"""Causal flash attention as a Pallas Triton kernel (`flash_attention`'s `pallas_triton`, the GPU
default), emitting SeerAttention's block-level target in the same pass.

One program per (query tile, batch, query head); it streams the key tiles up to the diagonal
through a base-2 online softmax. The tiles wholly below the diagonal and the length run without a
mask; only the diagonal / length-crossing tiles pay for one (FlashAttention-2's split, as
FlexAttention's full / partial block lists). Query tiles run heaviest first (the last tile of a
causal head sees every key), so the grid's tail is short programs.

The target without the [T, T] map: with a block_size the key tiles are the target's key blocks,
and each program stores, per (query row t, key block j), the block's largest logit m_tj (base 2)
into an [nK, T] float32 buffer -- one [block_q] row per tile, coalesced. Once the pass knows the
row's log-sum-exp, max_prob_tj = 2 ** (m_tj - lse_t / ln 2); an XLA epilogue (one fused
exp + max-reduce over each query block's rows, reading the buffer once) pools and normalises it
(reference.py). The buffer is T * T / block_size floats per head (T x T / 64: 1/64 of the map).

The pieces every jnp-in-kernel flash program shares (`fold_tile`, `finish`, `recompute_probs`)
live here; `block_sparse_attention`'s Triton kernels run them over selected blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import launch, online_softmax, triton_splitk, tuned
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.flash_attention.reference import (block_target_from_row_max,
                                                      flash_attention_reference)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SQUEEZED = pl.squeezed
MAX_BLOCK = 128         # key / query tiles beyond this overflow shared memory at H=256


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch parameters; None takes the tuned value (`tuned.lookup("flash_attention",
  "pallas_triton")`, by head dim).

  block_q / block_k: query rows per program and keys per loop step (powers of 2 in [16, 128]);
  with a block_size the key tiles are the target's blocks and block_k must be None or equal it.
  num_warps / num_stages: Triton launch parameters (ignored in interpret mode).
  """
  block_q: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def validate(self) -> None:
    for name in ("block_q", "block_k"):
      b = getattr(self, name)
      if b is not None and (not isinstance(b, int) or not launch.is_power_of_2(b)
                            or not 16 <= b <= MAX_BLOCK):
        raise ValueError(f"config.{name} must be None or a power of 2 in [16, {MAX_BLOCK}], "
                         f"got {b!r}")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"config.num_warps must be a power of 2 in [1, 16], got {self.num_warps!r}")
    if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
      raise ValueError(f"config.num_stages must be a positive int or None, got {self.num_stages!r}")


CONFIG = TritonConfig


def launch_params(op: str, head_dim: int) -> dict:
  """The tuned entry of (op, pallas_triton) with its `large_head_*` keys applied from
  `large_head_dim` on (H=256 tiles need half the rows and fewer stages to fit)."""
  t = tuned.lookup(op, "pallas_triton")
  if head_dim >= t.get("large_head_dim", 1 << 30):
    t = dict(t, **{k[len("large_head_"):]: v for k, v in t.items()
                   if k.startswith("large_head_") and k != "large_head_dim"})
  return t


def supported(head_dim: int, block: int | None, what: str, dtype) -> None:
  """NotSupported unless H and the block fit Triton tiles and one pipeline stage (a K and a V
  tile) fits the shared-memory budget."""
  if not launch.is_power_of_2(head_dim) or not 16 <= head_dim <= 256:
    raise NotSupported(f"head dim H={head_dim} must be a power of 2 in [16, 256] for Triton tiles")
  if block is not None and (not launch.is_power_of_2(block) or not 16 <= block <= MAX_BLOCK):
    raise NotSupported(f"{what}={block} must be a power of 2 in [16, {MAX_BLOCK}] for Triton "
                       "tiles")
  stage = 2 * (block or 64) * head_dim * jnp.dtype(dtype).itemsize
  if stage > tuned.lookup("device", "gpu")["shared_memory_budget"]:
    raise NotSupported(f"{what}={block} x H={head_dim} {jnp.dtype(dtype).name} K/V tiles "
                       f"({stage} bytes) exceed the shared-memory budget")


# -- the flash program's pieces (base 2: logits carry log2(e) / sqrt(H), so every exp is exp2) --

def init_state(rows: int, head_dim: int):
  return online_softmax.init_state(rows, head_dim)


def fold_tile(q_RH, k_TH, v_TH, state, *, scale2: float, precision, mask_RT=None):
  """Folds one key tile into the base-2 online-softmax state (acc f32 [R, H], m f32 [R],
  l f32 [R]); mask_RT (bool [R, T]) only for diagonal / length-crossing tiles. Returns
  (state, m_tile f32 [R]: the tile's largest logit per row, base 2, MASK_VALUE where a row sees
  none of it)."""
  acc_RH, m_R, l_R = state
  s_RT = jnp.dot(q_RH, k_TH.T, preferred_element_type=jnp.float32, precision=precision) * scale2
  if mask_RT is not None:
    s_RT = jnp.where(mask_RT, s_RT, online_softmax.MASK_VALUE)
  m_tile_R = jnp.max(s_RT, axis=1)
  m_new_R = jnp.maximum(m_R, m_tile_R)
  p_RT = jnp.exp2(s_RT - m_new_R[:, None])
  if mask_RT is not None:
    # a row with no visible key yet has m = MASK_VALUE and exp2(0) = 1 on its masked entries
    p_RT = jnp.where(mask_RT, p_RT, 0.0)
  corr_R = jnp.exp2(m_R - m_new_R)
  l_new_R = corr_R * l_R + jnp.sum(p_RT, axis=1)
  pv_RH = jnp.dot(p_RT.astype(v_TH.dtype), v_TH, preferred_element_type=jnp.float32,
                  precision=precision)
  return (corr_R[:, None] * acc_RH + pv_RH, m_new_R, l_new_R), m_tile_R


def finish(state, row_ok_R):
  """(o f32 [R, H], lse f32 [R], natural log): rows that are padding or saw no key give o = 0
  and lse = +inf (so a backward pass recomputes probability 0 for them)."""
  acc_RH, m_R, l_R = state
  ok_R = row_ok_R & (l_R > 0)
  l_safe = jnp.where(ok_R, l_R, 1.0)
  o_RH = jnp.where(ok_R[:, None], acc_RH / l_safe[:, None], 0.0)
  lse_R = jnp.where(ok_R, (m_R + jnp.log2(l_safe)) * LN2, jnp.inf)
  return o_RH, lse_R


def recompute_probs(q_RH, k_TH, lse_R, *, scale2: float, precision, mask_RT=None):
  """The backward pass's probabilities f32 [R, T] of one tile from the saved lse (natural log;
  +inf rows give 0)."""
  s_RT = jnp.dot(q_RH, k_TH.T, preferred_element_type=jnp.float32, precision=precision) * scale2
  p_RT = jnp.exp2(s_RT - (lse_R * LOG2E)[:, None])
  return p_RT if mask_RT is None else jnp.where(mask_RT, p_RT, 0.0)


def causal_mask(rows_R, cols_T, length):
  """bool [R, T]: key col visible from query row (col <= row, col < length)."""
  return (cols_T[None, :] <= rows_R[:, None]) & (cols_T < length)[None, :]


def compiler_params(num_warps: int, num_stages: int, tile_rows: int, head_dim: int, dtype):
  """Triton launch parameters, stages lowered until a K and a V tile per stage fit the shared
  memory budget (`triton_splitk.compiler_params`: H=256 with 128-key tiles gets one)."""
  return triton_splitk.compiler_params(num_warps, num_stages, tile_rows, head_dim, dtype)


# -- dense causal flash attention --

def _flash_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *mt_refs, block_q: int,
                  block_k: int, n_q_tiles: int, scale2: float, precision):
  """Program (query tile, b, n). len_ref int32 []; q_ref [block_q, H]; k_ref / v_ref [Tp, H]
  (the KV head's whole sequence, sliced per tile); o_ref [block_q, H]; lse_ref f32 [block_q];
  mt_refs: () or (f32 [nK, block_q]: the tile row maxima for the target)."""
  i = n_q_tiles - 1 - pl.program_id(0)          # heaviest tiles first
  length = len_ref[()]
  q0 = i * block_q
  rows_R = q0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  offsets_T = lax.broadcasted_iota(jnp.int32, (block_k,), 0)
  # tiles [0, n_full) lie below the tile's first row and the length: no mask
  n_end = jnp.where(q0 < length,
                    jnp.minimum((q0 + block_q + block_k - 1) // block_k,
                                (length + block_k - 1) // block_k), 0)
  n_full = jnp.minimum(jnp.minimum((q0 + 1) // block_k, length // block_k), n_end)
  q_RH = q_ref[...]

  def tile(j, state, masked):
    t0 = pl.multiple_of(j * block_k, block_k)
    k_TH, v_TH = k_ref[pl.ds(t0, block_k), :], v_ref[pl.ds(t0, block_k), :]
    mask = causal_mask(rows_R, t0 + offsets_T, length) if masked else None
    state, m_tile = fold_tile(q_RH, k_TH, v_TH, state, scale2=scale2, precision=precision,
                              mask_RT=mask)
    if mt_refs:
      mt_refs[0][j, :] = m_tile
    return state

  state = init_state(block_q, q_RH.shape[1])
  state = lax.fori_loop(0, n_full, functools.partial(tile, masked=False), state)
  state = lax.fori_loop(n_full, n_end, functools.partial(tile, masked=True), state)
  o_RH, lse_R = finish(state, rows_R < length)
  o_ref[...] = o_RH.astype(o_ref.dtype)
  lse_ref[...] = lse_R


@functools.partial(jax.jit, static_argnames=("block_size", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def flash_forward(q_BTNH, k_BTKH, v_BTKH, lengths_B, *, block_size: int | None, block_q: int,
                  block_k: int, num_warps: int, num_stages: int, interpret: bool):
  """(o [B, T, N, H] in q's dtype, lse f32 [B, N, T] natural log (+inf on padding rows),
  target f32 [B, N, nQ, nK] or None). With a block_size, block_k must equal it."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  assert block_size is None or block_size == block_k
  tile = max(block_q, block_k)
  q_p, k_p, v_p = (launch.pad_axis(x, 1, tile) for x in (q_BTNH, k_BTKH, v_BTKH))
  Tp = q_p.shape[1]
  n_q_tiles, nK = Tp // block_q, Tp // block_k
  rev = lambda p: n_q_tiles - 1 - p
  sq = SQUEEZED
  out_specs = [pl.BlockSpec((sq, block_q, sq, H), lambda p, b, n: (b, rev(p), n, 0)),
               pl.BlockSpec((sq, sq, block_q), lambda p, b, n: (b, n, rev(p)))]
  out_shape = [jax.ShapeDtypeStruct((B, Tp, N, H), q_BTNH.dtype),
               jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)]
  if block_size is not None:
    out_specs.append(pl.BlockSpec((sq, sq, nK, block_q), lambda p, b, n: (b, n, 0, rev(p))))
    out_shape.append(jax.ShapeDtypeStruct((B, N, nK, Tp), jnp.float32))
  kernel = functools.partial(_flash_kernel, block_q=block_q, block_k=block_k,
                             n_q_tiles=n_q_tiles, scale2=H ** -0.5 * LOG2E,
                             precision=launch.dot_precision(q_BTNH.dtype))
  outs = pl.pallas_call(
      kernel,
      grid=(n_q_tiles, B, N),
      in_specs=[pl.BlockSpec((sq,), lambda p, b, n: (b,)),
                pl.BlockSpec((sq, block_q, sq, H), lambda p, b, n: (b, rev(p), n, 0)),
                pl.BlockSpec((sq, Tp, sq, H), lambda p, b, n: (b, 0, n // G, 0)),
                pl.BlockSpec((sq, Tp, sq, H), lambda p, b, n: (b, 0, n // G, 0))],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params(num_warps, num_stages, block_k, H, q_BTNH.dtype),
      interpret=interpret,
      name="flash_attention",
  )(lengths_B.astype(jnp.int32), q_p, k_p, v_p)
  o, lse = outs[0][:, :T], outs[1][..., :T]
  if block_size is None:
    return o, lse, None
  return o, lse, block_target_from_row_max(outs[2], outs[1], lengths_B, T, block_size)


def resolve(config: TritonConfig | None, head_dim: int, block_size: int | None) -> dict:
  """Launch parameters of `flash_forward` from the config and the tuned defaults."""
  config = config or TritonConfig()
  config.validate()
  if block_size is not None and config.block_k not in (None, block_size):
    raise ValueError(f"config.block_k={config.block_k} must be None or the target's block_size "
                     f"{block_size} (the key tiles are the target's blocks)")
  t = launch_params("flash_attention", head_dim)
  return dict(block_q=config.block_q or t["block_q"],
              block_k=block_size or config.block_k or t["block_k"],
              num_warps=config.num_warps or t["num_warps"],
              num_stages=config.num_stages or t["num_stages"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size, params):
  o, _, target = flash_forward(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size=block_size,
                               **dict(params))
  return o, target


def _attention_fwd(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size, params):
  return (_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, block_size, params),
          (q_BTNH, k_BTKH, v_BTKH, lengths_B))


def _attention_bwd(block_size, params, res, cotangents):
  """The output's gradient through the XLA reference (O(T^2) memory, as the `xla`
  implementation); the target is a distillation target and passes none."""
  del block_size, params
  q, k, v, lengths_B = res
  _, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, lengths_B), q, k, v)
  return (*vjp(cotangents[0]), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, *, block_size: int | None,
                    interpret: bool = False, config: TritonConfig | None = None):
  """Shapes as `pallas_kernels.flash_attention`. The kernel is a forward pass; differentiating
  the output runs the XLA reference's backward."""
  require_platform("gpu", interpret, "the Pallas Triton flash attention kernel")
  supported(q_BTNH.shape[-1], block_size, "block_size", q_BTNH.dtype)
  B, T = q_BTNH.shape[:2]
  if lengths_B is None:
    lengths_B = jnp.full((B,), T, jnp.int32)
  params = tuple(sorted(resolve(config, q_BTNH.shape[-1], block_size).items()))
  o, target = _attention(q_BTNH, k_BTKH, v_BTKH, lengths_B.astype(jnp.int32), block_size,
                         params + (("interpret", bool(interpret)),))
  return o if block_size is None else (o, target)
