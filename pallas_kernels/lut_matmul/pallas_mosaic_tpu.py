"""T-MAC / LUT Tensor Core table-lookup mpGEMM as a Pallas Mosaic TPU kernel: `lut_matmul` on a
TPU, y = x @ W_hat over bit-plane weights (int32 words [bits, rows / 32, N], layout.py), N on the
128 lanes as the planes lie.

A K step takes ws = 8 plane words (256 rows: one int32 tile of words), or all the words of a K of
at most 256 rows; a ragged last step reads its words past the array as zero activations. The TPU has no vector gather, and tables along the words would need x
transposed onto the sublanes, so the lookups take the one-hot form of the Triton kernel's GEMM
path, on the MXU:
- Prologue, fused: the tables of the step's x slice as one small matmul, T [bm, 64 ws] = x [bm,
  32 ws] @ S, S a constant sign matrix (block diagonal: rows 32 w + 4c + i of word w feed its
  columns 64 w + 8c + j with s_i(j), reference.SIGNS_IJ) -- LUT Tensor Core's table precompute
  as a GEMM. int8 x runs it on bfloat16 operands (exact: |H| <= 508), bfloat16 x likewise (exact
  products, float32 sums), float32 / float16 x in float32 at HIGHEST. int8 tables round T per
  (row, group) scale here (kernel_math.quantize_entry; the scales, one reduction over x, come from
  outside as in the Triton kernel).
- Selection: sel [64 ws, bn], row 64 w + 8c + j = sum_p +-2^p [entry of nibble c of word w's
  plane p == j] (sign: the nibble's flip bit, kernel_math.flip_words): each word row broadcast
  over its 64 (c, j) sublanes with per-sublane shifts, the words' [64, bn] pieces concatenated
  along tile-aligned sublanes -- no lane shuffle.
- Lookups: T @ sel on the MXU in bfloat16 pieces of T against the exact bfloat16 selection (|sel|
  <= 2^bits - 1): integer tables 2 pieces (exact; float32 sums exact while a group's |sum| <
  2^24, checked), int8 tables 1, float32 tables 2 (16-bit x) or 3 (float32 x).
Groups: a step holds whole weight groups (groups of 32, 64, 128 or 256 rows: each takes its
columns of T, masked, and folds into y at once) or lies inside one (groups of a multiple of 256
rows: the group's sums accumulate in VMEM across its steps and fold at its last), always by the
reference's epilogue (kernel_math.group_share), so the integer path's group sums are exact.

Grid (N tiles, M tiles, K steps), K last and "arbitrary"; y accumulates in VMEM and the last step
applies the activation scales and the cast. Tested here in TPU interpret mode
(`interpret=pltpu.InterpretParams()`) and lowered to Mosaic on any host; not yet run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tuned
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.lowbit_matmul import layout
from pallas_kernels.lut_matmul.kernel_math import (
  flip_words,
  group_share,
  quantize_entry,
  table_kind,
  table_scales,
)
from pallas_kernels.lut_matmul.reference import ENTRIES, LUT_ROWS, SIGNS_IJ

WORDS = 8                                          # plane words a K step (one int32 tile)
SLOTS = layout.PLANE_WORD // LUT_ROWS              # nibbles a word
COLS = SLOTS * ENTRIES                             # table columns (c, j) a word: 64
LANES = 128
EXACT_F32 = 1 << 24


@dataclasses.dataclass(frozen=True)
class TPUConfig:
  """Launch parameters of the TPU LUT matmul; None takes the tuned value (pallas_kernels/tuned).

  block_m: rows a tile when M is larger (a multiple of 32; M <= block_m is one whole-M tile).
  block_n: columns a tile when N is larger (a multiple of 128).
  """
  block_m: int | None = None
  block_n: int | None = None

  def validate(self) -> None:
    for name, unit in (("block_m", 32), ("block_n", LANES)):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < unit
                            or v % unit):
        raise ValueError(f"config.{name} must be a positive multiple of {unit} or None, got "
                         f"{v!r}")


CONFIG = TPUConfig


@dataclasses.dataclass(frozen=True)
class _Plan:
  kind: str
  bm: int
  bn: int
  ws: int          # words a step
  hg: int          # whole groups a step (1 when a group spans steps)
  spg: int         # steps a group (1 when a step holds whole groups)


def sign_matrix(ws: int) -> np.ndarray:
  """float32 [32 ws, 64 ws]: S[32 w + 4c + i, 64 w + 8c + j] = s_i(j), so x @ S is the tables
  (columns (w, c, j)) of the words' rows."""
  s = np.zeros((ws, SLOTS, LUT_ROWS, ws, SLOTS, ENTRIES), np.float32)
  for w in range(ws):
    for c in range(SLOTS):
      s[w, c, :, w, c, :] = SIGNS_IJ
  return s.reshape(ws * layout.PLANE_WORD, ws * COLS)


def _kernel(x_ref, s_ref, w_ref, sc_ref, z_ref, *refs, plan: _Plan, P: int, W: int, G: int,
            gw: int, int8_x: bool, pieces: int, precision):
  """Program (n, m, k). x [bm, 32 ws]; S [32 ws, 64 ws]; w int32 [P, ws, bn]; scale / zero f32
  [G, bn]; ts f32 [G, bm, 1] ("q8"); xs f32 [bm, 1] (int8 x); out y [bm, bn]; scratch: the
  group's sums acc [bm, bn] f32 and x sum [bm, 1], y [bm, bn] f32."""
  refs = list(refs)
  ts_ref = refs.pop(0) if plan.kind == "q8" else None
  xs_ref = refs.pop(0) if int8_x else None
  o_ref, acc_ref, xsum_ref, y_ref = refs
  ws, hg, spg = plan.ws, plan.hg, plan.spg
  bn = w_ref.shape[-1]
  k = pl.program_id(2)
  L = layout.levels(P)

  @pl.when(k == 0)
  def _init():
    y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
    xsum_ref[...] = jnp.zeros(xsum_ref.shape, xsum_ref.dtype)

  x = x_ref[...]
  if W % ws:                      # the last step's words past W: x read past the array, as 0
    word = lax.broadcasted_iota(jnp.int32, (1, ws * layout.PLANE_WORD), 1) >> 5   # // 32
    x = jnp.where(word < W - k * ws, x, jnp.zeros_like(x))
  x_sum_dt = jnp.int32 if int8_x else jnp.float32
  xv = x.astype(x_sum_dt)
  table = jnp.dot(x.astype(s_ref.dtype), s_ref[...], preferred_element_type=jnp.float32,
                  precision=precision)                                  # [bm, 64 ws]
  cols = ws * COLS
  # the group (within the step) of each table column and x column; gw a power of 2 here, and
  # shifts, not divisions (Mosaic's vector integer division asks for the TPU's generation)
  lg = max(gw.bit_length() - 1, 0)
  t_grp = lax.broadcasted_iota(jnp.int32, (1, cols), 1) >> (6 + lg)          # // (64 gw)
  x_grp = lax.broadcasted_iota(jnp.int32, (1, ws * layout.PLANE_WORD), 1) >> (5 + lg)
  g0 = k * hg if spg == 1 else lax.div(k, jnp.int32(spg))     # k >= 0: truncation = floor
  # group g0 + h of the step (clamped: a ragged last step's groups past G read G - 1, add 0)
  grp = [jnp.minimum(g0 + h, G - 1) for h in range(hg)]
  if plan.kind == "q8":
    if hg > 1:
      ts = sum(jnp.where(t_grp == h, ts_ref[grp[h]], 0.0) for h in range(hg))
    else:
      ts = ts_ref[g0]
    table = quantize_entry(table, jnp.where(ts > 0, ts, 1.0)).astype(jnp.float32)

  # the selection: rows (w, c, j); sublane r of a word's 64 reads nibble r // 8, entry r % 8
  r = lax.broadcasted_iota(jnp.int32, (COLS, 1), 0)
  shift, entry = (r >> 3) << 2, r & 7               # 4 (r // 8), r % 8
  vf = [flip_words(w_ref[p]) for p in range(P)]                          # [ws, bn] each
  words = []
  for w in range(ws):
    sel = None
    for p, (v, flip) in enumerate(vf):
      vw = jnp.broadcast_to(v[w:w + 1, :], (COLS, bn))
      fw = jnp.broadcast_to(flip[w:w + 1, :], (COLS, bn))
      idx = lax.shift_right_logical(vw, shift) & 7
      neg = (lax.shift_right_logical(fw, shift) & 1) == 1
      term = jnp.where(idx == entry, jnp.where(neg, -(1 << p), 1 << p), 0)
      sel = term if sel is None else sel + term
    words.append(sel)
  sel = (jnp.concatenate(words, axis=0) if ws > 1 else words[0]).astype(jnp.bfloat16)

  parts, rest = [], table
  for _ in range(pieces):          # bfloat16 pieces of the tables: exact against the selection
    part = rest.astype(jnp.bfloat16)
    parts.append(part)
    rest = rest - part.astype(jnp.float32)

  def lookups(mask):
    acc = None
    for part in parts:
      a = part if mask is None else jnp.where(mask, part, jnp.zeros_like(part))
      d = jnp.dot(a, sel, preferred_element_type=jnp.float32)
      acc = d if acc is None else acc + d
    return acc

  def share(acc, xsum, g, ts):
    return group_share(plan.kind, acc, xsum, ts, sc_ref[pl.ds(g, 1), :], z_ref[pl.ds(g, 1), :],
                       L)

  if hg > 1:                      # whole groups: each folds at once
    y = y_ref[...]
    for h in range(hg):
      xsum = jnp.sum(jnp.where(x_grp == h, xv, 0), axis=1, keepdims=True)
      ts_h = ts_ref[grp[h]] if plan.kind == "q8" else None
      part = share(lookups(t_grp == h), xsum, grp[h], ts_h)
      if W % ws:
        part = jnp.where(g0 + h < G, part, 0.0)
      y = y + part
    y_ref[...] = y
  else:
    acc_ref[...] += lookups(None)
    xsum_ref[...] += jnp.sum(xv, axis=1, keepdims=True).astype(xsum_ref.dtype)

    @pl.when(lax.rem(k + 1, jnp.int32(spg)) == 0)
    def _fold():
      ts_g = ts_ref[g0] if plan.kind == "q8" else None
      y_ref[...] += share(acc_ref[...], xsum_ref[...], g0, ts_g)
      acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
      xsum_ref[...] = jnp.zeros(xsum_ref.shape, xsum_ref.dtype)

  @pl.when(k == pl.num_programs(2) - 1)
  def _finish():
    y = y_ref[...]
    if xs_ref is not None:
      y = y * xs_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


def _plan(M: int, packed: layout.PackedWeight, kind: str, config: TPUConfig) -> _Plan:
  t = tuned.lookup("lut_matmul", "pallas_mosaic_tpu")
  pick = lambda name: t[name] if getattr(config, name) is None else getattr(config, name)
  W = packed.rows // layout.PLANE_WORD
  gw = packed.block // layout.PLANE_WORD
  ws = WORDS if W >= WORDS else W
  if ws % gw == 0:
    hg, spg = ws // gw, 1
  elif gw % ws == 0:
    hg, spg = 1, gw // ws
  else:
    raise NotSupported(f"weight groups of {packed.block} rows neither divide nor are divided by a "
                       f"K step of {ws * 32} rows (the TPU LUT kernel takes groups of 32, 64, 128 "
                       "or a multiple of 256 rows)")
  if kind != "float":
    top = 4 * 127 if kind == "int" else 127
    bound = packed.block // LUT_ROWS * top * layout.levels(packed.bits)
    if bound >= EXACT_F32:
      raise NotSupported(f"the TPU LUT kernel sums integer tables in float32, exact below 2^24; "
                         f"a weight group of {packed.block} rows and {packed.bits} bits can reach "
                         f"{bound}")
  bm = M if M <= pick("block_m") else pick("block_m")
  N = packed.shape[1]
  bn = N if N <= pick("block_n") else pick("block_n")
  return _Plan(kind=kind, bm=bm, bn=bn, ws=ws, hg=hg, spg=spg)


@functools.partial(jax.jit, static_argnames=("plan", "block", "N", "table_scale", "out_dtype",
                                             "interpret"))
def _lut_matmul(x_MK, x_scale_M, planes, scale_GN, zero_GN, *, plan: _Plan, block: int, N: int,
                table_scale: str, out_dtype, interpret: bool):
  M, K = x_MK.shape
  P, W, _ = planes.shape
  rows = W * layout.PLANE_WORD
  G = rows // block
  p = plan
  int8_x = x_MK.dtype == jnp.int8
  x = jnp.pad(x_MK, ((0, 0), (0, rows - K)))
  if x.dtype in (jnp.int8, jnp.bfloat16):
    s_dtype, precision = jnp.bfloat16, None
  else:
    s_dtype, precision = jnp.float32, lax.Precision.HIGHEST
  pieces = {"int": 2, "q8": 1}.get(p.kind, 3 if x_MK.dtype == jnp.float32 else 2)
  xw = p.ws * layout.PLANE_WORD
  in_specs = [pl.BlockSpec((p.bm, xw), lambda n, m, k: (m, k)),
              pl.BlockSpec((xw, p.ws * COLS), lambda n, m, k: (0, 0)),
              pl.BlockSpec((P, p.ws, p.bn), lambda n, m, k: (0, k, n)),
              pl.BlockSpec((G, p.bn), lambda n, m, k: (0, n)),
              pl.BlockSpec((G, p.bn), lambda n, m, k: (0, n))]
  args = [x, jnp.asarray(sign_matrix(p.ws), s_dtype), planes, scale_GN, zero_GN]
  if p.kind == "q8":
    in_specs.append(pl.BlockSpec((G, p.bm, 1), lambda n, m, k: (0, m, 0)))
    args.append(table_scales(x_MK, rows, block, table_scale)[:, :, None])
  if int8_x:
    in_specs.append(pl.BlockSpec((p.bm, 1), lambda n, m, k: (m, 0)))
    args.append(x_scale_M.astype(jnp.float32).reshape(M, 1))
  return pl.pallas_call(
      functools.partial(_kernel, plan=p, P=P, W=W, G=G, gw=block // layout.PLANE_WORD,
                        int8_x=bool(int8_x), pieces=pieces, precision=precision),
      grid=(pl.cdiv(N, p.bn), pl.cdiv(M, p.bm), pl.cdiv(W, p.ws)),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((p.bm, p.bn), lambda n, m, k: (m, n)),
      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
      scratch_shapes=[pltpu.VMEM((p.bm, p.bn), jnp.float32),
                      pltpu.VMEM((p.bm, 1), jnp.int32 if int8_x else jnp.float32),
                      pltpu.VMEM((p.bm, p.bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="lut_matmul_tpu",
  )(*args)


def lut_matmul(x_MK, x_scale_M, packed, out_dtype, *, table_dtype, table_scale: str,
               interpret: bool = False, config: TPUConfig | None = None):
  """Arguments as `pallas_kernels.lut_matmul.lut_matmul` (checked there)."""
  require_platform("tpu", interpret, "the Mosaic TPU lut_matmul kernel")
  config = config or TPUConfig()
  config.validate()
  plan = _plan(x_MK.shape[0], packed, table_kind(x_MK.dtype, table_dtype), config)
  return _lut_matmul(x_MK, x_scale_M, packed.packed, packed.scale, packed.zero, plan=plan,
                     block=packed.block, N=packed.shape[1], table_scale=table_scale,
                     out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret))
