"""Causal flash attention as a Pallas Mosaic TPU kernel (`flash_attention`'s `pallas_mosaic_tpu`,
the TPU default), emitting SeerAttention's block-level target in the same pass.

Grid (B, N, nQ, nK): program (b, n, i, j) folds key block j into query block i's online softmax
(VMEM scratch across the sequential last axis). Key blocks above the diagonal (j > i) compute
nothing, and their index map repeats block i, which the pipeline does not fetch again; no index
list is needed, so nothing grows in SMEM with the sequence.

The target without the [T, T] map (as the Triton kernel): a [block, nK] float32 scratch keeps
each query row's largest logit per key block, written into column j by a one-hot select (no
dynamic lane slicing). At the last step, with the rows' log-sum-exp known, the largest
probability of block j in row t is exp(m_tj - lse_t); its max over the block's rows (rows past
the length have lse = +inf and give 0), normalised over j, is row i of the target, written as
[1, nK] (the output is [B, N, nQ, 1, nK]: a block whose last two dimensions are the array's).

The kernel is a forward pass; differentiating the output runs the XLA reference's backward (as
the Triton kernel). Tested in the TPU interpreter; not yet run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import launch, online_softmax
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.flash_attention.reference import flash_attention_reference, num_blocks

_LANES = 128
DEFAULT_BLOCK = 128     # query / key tile without a target block size


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *rest, bs: int, nk: int, scale: float,
            precision, target: bool):
  if target:
    t_ref, m_sc, l_sc, acc_sc, mx_sc = rest
  else:
    m_sc, l_sc, acc_sc = rest
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = len_ref[b]

  @pl.when(j == 0)
  def _init():
    online_softmax.scratch_init(m_sc, l_sc, acc_sc)
    if target:
      mx_sc[...] = jnp.full(mx_sc.shape, online_softmax.MASK_VALUE, jnp.float32)

  @pl.when(j <= i)
  def _attend():
    qpos = i * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
    kpos = j * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
    valid = (kpos <= qpos) & (kpos < length) & (qpos < length)
    q, k = q_ref[...], k_ref[...]
    online_softmax.scratch_attend(q, k, v_ref[...], valid, m_sc, l_sc, acc_sc, scale=scale,
                                  precision=precision)
    if target:
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32) * scale
      row_max = jnp.max(jnp.where(valid, s, online_softmax.MASK_VALUE), axis=1, keepdims=True)
      col = lax.broadcasted_iota(jnp.int32, mx_sc.shape, 1)
      mx_sc[...] = jnp.where(col == j, row_max, mx_sc[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    online_softmax.scratch_finish(o_ref, l_sc, acc_sc)
    if target:
      l, m = l_sc[:, :1], m_sc[:, :1]
      lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
      p = jnp.exp(mx_sc[...] - lse)                       # 0 for masked blocks and dead rows
      col = lax.broadcasted_iota(jnp.int32, mx_sc.shape, 1)
      pooled = jnp.max(jnp.where(col < nk, p, 0.0), axis=0, keepdims=True)     # [1, nKp]
      total = jnp.sum(pooled, axis=1, keepdims=True)
      t_ref[...] = pooled / jnp.where(total > 0, total, 1.0)


@functools.partial(jax.jit, static_argnames=("block_size", "target", "interpret"))
def forward(q_BTNH, k_BTKH, v_BTKH, lengths_B, *, block_size: int, target: bool,
            interpret: bool):
  """(o [B, T, N, H] in q's dtype, target float32 [B, N, nQ, nK] or None)."""
  B, T, N, H = q_BTNH.shape
  K, bs = k_BTKH.shape[2], block_size
  G, nb = N // K, num_blocks(T, block_size)
  q, k, v = (launch.pad_axis(x, 1, bs).transpose(0, 2, 1, 3) for x in (q_BTNH, k_BTKH, v_BTKH))
  nkp = launch.round_up(nb, _LANES)
  q_map = lambda b, n, i, j, *_: (b, n, i, 0)
  kv_map = lambda b, n, i, j, *_: (b, n // G, jnp.minimum(j, i), 0)   # j > i: block i again
  tile = (None, None, bs, H)
  out_specs = [pl.BlockSpec(tile, q_map)]
  out_shape = [jax.ShapeDtypeStruct((B, N, nb * bs, H), q.dtype)]
  scratch = [pltpu.VMEM((bs, _LANES), jnp.float32), pltpu.VMEM((bs, _LANES), jnp.float32),
             pltpu.VMEM((bs, H), jnp.float32)]
  if target:
    out_specs.append(pl.BlockSpec((None, None, None, 1, nkp), lambda b, n, i, j, *_:
                                  (b, n, i, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, N, nb, 1, nkp), jnp.float32))
    scratch.append(pltpu.VMEM((bs, nkp), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_kernel, bs=bs, nk=nb, scale=H ** -0.5,
                        precision=launch.dot_precision(q.dtype), target=target),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, N, nb, nb),
          in_specs=[pl.BlockSpec(tile, q_map), pl.BlockSpec(tile, kv_map),
                    pl.BlockSpec(tile, kv_map)],
          out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      # our boolean `interpret` -> the TPU interpreter on CPU
      interpret=pltpu.InterpretParams() if interpret else False,
      name="flash_attention_tpu",
  )(lengths_B, q, k, v)
  o = outs[0].transpose(0, 2, 1, 3)[:, :T]
  return o, (outs[1][:, :, :, 0, :nb] if target else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, lengths_B, block_size, target, interpret):
  return forward(q, k, v, lengths_B, block_size=block_size, target=target, interpret=interpret)


def _attention_fwd(q, k, v, lengths_B, block_size, target, interpret):
  return _attention(q, k, v, lengths_B, block_size, target, interpret), (q, k, v, lengths_B)


def _attention_bwd(block_size, target, interpret, res, cotangents):
  """The output's gradient through the XLA reference (O(T^2) memory, as the `xla`
  implementation); the target is a distillation target and passes none."""
  del block_size, target, interpret
  q, k, v, lengths_B = res
  _, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, lengths_B), q, k, v)
  return (*vjp(cotangents[0]), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q_BTNH, k_BTKH, v_BTKH, lengths_B, *, block_size: int | None,
                    interpret: bool = False):
  """Shapes as `pallas_kernels.flash_attention`. Query / key tiles of block_size tokens (a
  multiple of 8, the sublane tile; DEFAULT_BLOCK without a target)."""
  require_platform("tpu", interpret, "the Mosaic TPU flash attention kernel")
  bs = DEFAULT_BLOCK if block_size is None else block_size
  if bs % 8:
    raise NotSupported(f"block_size={bs}: the [block_size, H] tiles need a multiple of 8 rows "
                       "(the TPU's sublane tile)")
  B, T = q_BTNH.shape[:2]
  if lengths_B is None:
    lengths_B = jnp.full((B,), T, jnp.int32)
  o, target = _attention(q_BTNH, k_BTKH, v_BTKH, lengths_B.astype(jnp.int32), int(bs),
                         block_size is not None, bool(interpret))
  return o if block_size is None else (o, target)
