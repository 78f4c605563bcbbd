"""T-MAC / LUT Tensor Core table-lookup mpGEMM as a Pallas Triton kernel: `lut_matmul` on a GPU,
y = x @ W_hat over bit-plane weights (int32 words [bits, rows / 32, N], layout.py).

Prologue, fused. Each program builds the tables of its own x slice in registers: for the LUT group
of rows 4c .. 4c + 3, the 8 symmetrised entries H_c[j] = s0 x0 + s1 x1 + s2 x2 + x3 (s_i = +-1 the
bits of j, s3 = +1: reference.py), 20 adds a group, shared by all bn columns and all planes. int8
tables (`table_dtype=int8`) round H / ts to [-127, 127] here too; only their scale ts = max|H| /
127 over a row (or a (row, weight group)) is one reduction over x outside the kernel, since a
"row" scale spans the whole K and a split-K program sees a slice (max_j |H_c[j]| = sum_i |x_i|,
so it needs no tables). The activations are read with stride 32: row 32 w + 4c' + i of a plane
word w is bit 4c' + i, so nibble slot c' of a [ws, bn] word tile pairs with the strided x slice
x[32 w + 4c' + i], w in the tile -- the tile is never shuffled.

Symmetry. A nibble e with its top bit clear reads -H[7 - e] = -H[(e ^ 15) & 7]. On a whole word
that is flip = ~(u >> 3) & 0x11111111 (1 in each nibble whose top bit is clear) and v = u ^ flip *
15: five ops per word give all eight nibbles their entry index (the low three bits of v's nibble)
and their sign (flip's bit).

Lookup: there is no register or shared-memory gather in Pallas Triton (a pointer gather would need
the tables in global memory, so a pass and a barrier between writing and reading them), so two
forms, by the rows M:
- "select" (GEMV, M <= select_max_rows): a 3-level select tree on the entry index's bits picks
  H[j] per (row, nibble, column): 7 selects (8 masked selects would take 8 compares, 8 selects and
  7 adds; the bit masks are built once per nibble and shared by the rows), then a sign select and
  an add, in int32 (exact) or float32. Plane p reads tables pre-scaled by 2^p, so the planes share
  one accumulator [ws, bn] a row, reduced over the words once per weight group.
- "onehot" (more rows, GEMM): the lookups of a step as one MMA, [bm, 64 ws] tables times a signed,
  plane-weighted one-hot selection [64 ws, bn] (sum_p +-2^p [j_p == j], |.| <= 2^bits - 1: the
  reference's contraction) -- what LUT Tensor Core's table-lookup unit does in hardware, on the
  tensor cores. The 64 pieces (8 nibble slots x 8 entries) are stacked by one binary tree of
  joins on both operands, so their order matches. int8 tables: int8 x int8 -> int32. Exact
  tables of int8 x (|H| <= 508): float16 (exact), float32 sums, exact while a weight group's
  |sum| < 2^24 (checked; else NotSupported). float32 tables: two (16-bit x) or three (float32 x)
  bfloat16 pieces of H against the exact bfloat16 selection.
On a GPU without table hardware both forms cost more than the arithmetic they replace (H[j] is
itself the dot of x with the bits): this kernel realises LUT Tensor Core's dataflow -- fused
table precompute, symmetrised (and int8) tables, bit-serial lookups -- for study and as a second
exact implementation; `lowbit_matmul`'s dequantising paths are the fast peers.

Exactness. Exact tables (int8 x) give the reference's integer sums exactly. int8 tables round
H / ts as the reference does, but a quotient within an ulp of a rounding tie may round the other
way (XLA may divide by a broadcast scale as a reciprocal multiply, Triton divides with
div.full.f32), moving y by one table step ts at that entry, inside `table_error_bound`.

Groups. A step covers ws words (32 ws rows) of one weight group (ws a power of 2 dividing the
group's words); a program walks its steps group by group and folds each group's part into y by
the reference's epilogue: (acc + (2^bits - 1) X) / 2 (an exact shift for integer tables: the sum
is even for any set of whole LUT groups), then (. - zero X) * scale. The integer sums of a group
are therefore exact, and so is y wherever the scales make it an integer.

Grid (N tiles, M tiles, K splits) as the dequant kernel, the splits towards the tuned programs
per SM (GEMV: many; GEMM: usually one). With one split the program finishes y (the activation
scales, the cast); with several each writes its float32 partial (its groups' shares of y) and
one XLA fusion sums them and scales.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch, tuned
from pallas_kernels.dispatch import NotSupported, require_platform
from pallas_kernels.lowbit_matmul import layout
from pallas_kernels.lut_matmul.kernel_math import (
  bit_set,
  flip_words,
  group_share,
  quantize_entry,
  table_entries,
  table_kind,
  table_scales,
)
from pallas_kernels.lut_matmul.reference import ENTRIES, LUT_ROWS

LOOKUPS = ("select", "onehot")
SLOTS = layout.PLANE_WORD // LUT_ROWS     # nibbles (LUT groups) a plane word
EXACT_F32 = 1 << 24
MAX_ABS_ENTRY = 4 * 127                   # |H| of int8 x
SQ = pl.squeezed


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch parameters of the Triton LUT matmul; None takes the tuned value of the regime
  ("select", or "gemv" / "gemm" for "onehot" by M <= max_gemv_rows; pallas_kernels/tuned).

  lookup: "select" (select tree per row) or "onehot" (one MMA a step); None: "select" for M <=
    select_max_rows.
  block_m: rows a tile ("onehot": a power of 2 >= 16; "select": any, the rows are a static loop).
  block_n: columns a tile (a power of 2 >= 16).
  words_per_step: plane words a K step (a power of 2; lowered to the largest power of 2 dividing
    the weight group's words).
  num_splits: K splits (None: towards the tuned programs per SM).
  num_warps / num_stages: Triton launch parameters (ignored in interpret mode).
  """
  lookup: str | None = None
  block_m: int | None = None
  block_n: int | None = None
  words_per_step: int | None = None
  num_splits: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def validate(self) -> None:
    if self.lookup is not None and self.lookup not in LOOKUPS:
      raise ValueError(f"config.lookup must be one of {LOOKUPS} or None, got {self.lookup!r}")
    if self.block_n is not None and (not isinstance(self.block_n, int)
                                     or not launch.is_power_of_2(self.block_n)
                                     or self.block_n < 16):
      raise ValueError(f"config.block_n must be a power of 2 >= 16 or None, got {self.block_n!r}")
    if self.words_per_step is not None and (
        isinstance(self.words_per_step, bool) or not isinstance(self.words_per_step, int)
        or not launch.is_power_of_2(self.words_per_step)):
      raise ValueError(f"config.words_per_step must be a power of 2 or None, got "
                       f"{self.words_per_step!r}")
    for name in ("block_m", "num_splits", "num_stages"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"config.{name} must be a positive int or None, got {v!r}")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"config.num_warps must be a power of 2 in [1, 16], got {self.num_warps!r}")


CONFIG = TritonConfig


# ------------------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static launch shape of one call. kind: "int" (int8 x, exact int32 tables), "q8" (int8
  tables), "float" (float32 tables)."""
  lookup: str
  kind: str
  bm: int
  bn: int
  ws: int
  splits: int
  per_split: int
  num_warps: int
  num_stages: int


def _kernel(*refs, plan: _Plan, P: int, M: int, N: int, G: int, spg: int, steps: int,
            int8_x: bool, fused: bool, pieces: int):
  """Program (n, m, s): steps [s per_split, ...) of the K walk (ws words each, spg a weight group).
  Refs: x [bm, rows] (M tile, padded), w int32 [P, rows / 32, bn], scale / zero f32 [G, bn],
  ts f32 [G, bm] ("q8"), xs f32 [bm] (fused, int8 x); out: y [bm, bn] (fused) or the split's
  float32 partial [bm, bn]."""
  refs = list(refs)
  x_ref, w_ref, sc_ref, z_ref = (refs.pop(0) for _ in range(4))
  ts_ref = refs.pop(0) if plan.kind == "q8" else None
  xs_ref = refs.pop(0) if fused and int8_x else None
  (o_ref,) = refs
  bm, bn, ws = plan.bm, plan.bn, plan.ws
  n_id, m_id, s_id = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  L = layout.levels(P)
  x_dt = jnp.int32 if int8_x else jnp.float32
  cols_ok = (n_id * bn + lax.broadcasted_iota(jnp.int32, (bn,), 0) < N) if N % bn else None
  select = plan.lookup == "select"
  acc_dt = jnp.float32 if plan.kind == "float" or (not select and plan.kind == "int") \
      else jnp.int32

  def load_cols(ref_row):            # a [bn] row of a [., bn] block
    if cols_ok is None:
      return ref_row[...]
    return plgpu.load(ref_row, mask=cols_ok, other=0)

  def load_words(p, w0):             # int32 [ws, bn]
    # (static indices as 1-slices: interpret mode discharges an int index of a strided or
    # masked load into a gather with constants, which a loop body cannot hold)
    src = w_ref.at[pl.ds(p, 1), pl.ds(w0, ws), :]
    if cols_ok is None:
      return src[...].reshape(ws, bn)
    return plgpu.load(src, mask=jnp.broadcast_to(cols_ok[None, None, :], (1, ws, bn)),
                      other=0).reshape(ws, bn)

  def load_x(rows, w0, c, i):        # rows 32 w + 4c + i of the step, [ws] / [bm, ws]
    col = pl.ds(w0 * layout.PLANE_WORD + LUT_ROWS * c + i, ws, stride=layout.PLANE_WORD)
    if rows is None:
      return x_ref[:, col].astype(x_dt)
    return x_ref[pl.ds(rows, 1), col].reshape(ws).astype(x_dt)

  def ts_of(g, r=None):              # "q8": the tables' scale, [1] (row r) or [bm] (the tile)
    return ts_ref[g, :] if r is None else ts_ref[g, pl.ds(r, 1)]

  def entries(xi, ts):               # 8 table entries: int32 / float32, or int8 values as int32
    h = table_entries(*xi)
    if plan.kind == "q8":
      ts_safe = jnp.where(ts > 0, ts, 1.0)
      h = [quantize_entry(e.astype(jnp.float32), ts_safe) for e in h]
    return h

  # -------------------------------------------------------------------------- select lookups

  def select_step(t, carry):
    accs, xsums, g = carry
    w0 = t * ws
    vf = [flip_words(load_words(p, w0)) for p in range(P)]
    accs, xsums = list(accs), list(xsums)
    for c in range(SLOTS):
      masks = [(tuple(bit_set(v, LUT_ROWS * c + b) for b in range(3)),
                bit_set(flip, LUT_ROWS * c)) for v, flip in vf]
      for r in range(bm):
        xi = [load_x(r, w0, c, i) for i in range(LUT_ROWS)]
        xsums[r] = xsums[r] + jnp.sum(xi[0] + xi[1] + xi[2] + xi[3])
        h = entries(xi, ts_of(g, r) if plan.kind == "q8" else None)
        for p, ((m0, m1, m2), neg) in enumerate(masks):
          hp = [(e << p) if acc_dt == jnp.int32 else e * float(1 << p) for e in h]
          hp = [e[:, None] for e in hp]
          l1 = [jnp.where(m0, hp[2 * k + 1], hp[2 * k]) for k in range(4)]
          l2 = [jnp.where(m1, l1[2 * k + 1], l1[2 * k]) for k in range(2)]
          val = jnp.where(m2, l2[1], l2[0])
          accs[r] = accs[r] + jnp.where(neg, -val, val)
    return tuple(accs), tuple(xsums), g

  # -------------------------------------------------------------------------- one-hot lookups

  def onehot_step(t, carry):
    acc, xsum, g = carry
    w0 = t * ws
    ts = ts_of(g)[:, None] if plan.kind == "q8" else None
    vf = [flip_words(load_words(p, w0).T) for p in range(P)]       # [bn, ws]
    tables, sels = [], []
    for c in range(SLOTS):
      xi = [load_x(None, w0, c, i) for i in range(LUT_ROWS)]
      xsum = xsum + jnp.sum(xi[0] + xi[1] + xi[2] + xi[3], axis=1)
      tables += entries(xi, ts)
      shift = jnp.int32(LUT_ROWS * c)
      idx_sgn = [(lax.shift_right_logical(v, shift) & 7,
                  jnp.where(bit_set(flip, LUT_ROWS * c), -(1 << p), 1 << p))
                 for p, (v, flip) in enumerate(vf)]
      for j in range(ENTRIES):
        sel = None
        for idx, sgn in idx_sgn:
          term = jnp.where(idx == j, sgn, 0)
          sel = term if sel is None else sel + term
        sels.append(sel)
    table, sel = stack_pieces(tables), stack_pieces(sels)      # [bm, 64 ws], [bn, 64 ws]
    if plan.kind == "q8":
      acc = acc + _dot_t(sel.astype(jnp.int8), table.astype(jnp.int8), jnp.int32)
    elif plan.kind == "int":
      acc = acc + _dot_t(sel.astype(jnp.float16), table.astype(jnp.float16), jnp.float32)
    else:
      sel = sel.astype(jnp.bfloat16)
      rest = table
      for _ in range(pieces):
        part = rest.astype(jnp.bfloat16)
        acc = acc + _dot_t(sel, part, jnp.float32)
        rest = rest - part.astype(jnp.float32)
    return acc, xsum, g

  # ------------------------------------------------------------------------- group epilogue

  def fold(acc, xsum, ts, g):
    """One weight group's part -> its float32 share of y (kernel_math.group_share)."""
    return group_share(plan.kind, acc, xsum, ts, load_cols(sc_ref.at[g, :]),
                       load_cols(z_ref.at[g, :]), L)

  lo = s_id * plan.per_split
  hi = jnp.minimum(lo + plan.per_split, steps)

  def group(g, y):
    a = jnp.maximum(lo, g * spg)
    b = jnp.minimum(hi, (g + 1) * spg)
    if select:
      zeros = tuple(jnp.zeros((ws, bn), acc_dt) for _ in range(bm))
      xz = tuple(jnp.zeros((), x_dt) for _ in range(bm))
      accs, xsums, _ = lax.fori_loop(a, b, select_step, (zeros, xz, g))
      return tuple(y[r] + fold(jnp.sum(accs[r], axis=0), xsums[r],
                               ts_of(g, r) if plan.kind == "q8" else None, g)
                   for r in range(bm))
    acc0 = jnp.zeros((bn, bm), acc_dt)
    acc, xsum, _ = lax.fori_loop(a, b, onehot_step, (acc0, jnp.zeros((bm,), x_dt), g))
    return y + fold(acc.T, xsum[:, None], ts_of(g)[:, None] if plan.kind == "q8" else None, g)

  g_lo = lo // spg
  g_hi = (hi - 1) // spg + 1
  if select:
    y0 = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm))
  else:
    y0 = jnp.zeros((bm, bn), jnp.float32)
  y = lax.fori_loop(g_lo, g_hi, group, y0)
  rows_live = None if M % bm == 0 else M - m_id * bm      # rows of this tile below M

  if select:
    for r in range(bm):
      yr = y[r]
      if xs_ref is not None:
        yr = yr * xs_ref[pl.ds(r, 1)]
      mask = cols_ok
      if rows_live is not None:
        live = jnp.broadcast_to(r < rows_live, (bn,))
        mask = live if mask is None else mask & live
      dst, yr = o_ref.at[pl.ds(r, 1), :], yr.astype(o_ref.dtype).reshape(1, bn)
      if mask is None:
        dst[...] = yr
      else:
        plgpu.store(dst, yr, mask=mask.reshape(1, bn))
    return
  if xs_ref is not None:
    y = y * xs_ref[...][:, None]
  mask = None if cols_ok is None else jnp.broadcast_to(cols_ok[None, :], (bm, bn))
  if rows_live is not None:
    live = jnp.broadcast_to((lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < rows_live), (bm, bn))
    mask = live if mask is None else mask & live
  if mask is None:
    o_ref[...] = y.astype(o_ref.dtype)
  else:
    plgpu.store(o_ref, y.astype(o_ref.dtype), mask=mask)


def _dot_t(sel_NK, table_MK, acc_dt):
  """[bn, K'] x [bm, K'] -> [bn, bm] (the selection as the left operand)."""
  return lax.dot_general(sel_NK, table_MK, (((1,), (1,)), ((), ())),
                         preferred_element_type=acc_dt)


def stack_pieces(pieces: list):
  """Pieces [R, w] (a power-of-2 count) -> [R, count * w] by a binary tree of last-axis joins
  (Triton's join + reshape; Pallas Triton concatenates only [..., 1] pairs). Any two lists of the
  same length and piece width come out in the same order, which is all a contraction needs."""
  while len(pieces) > 1:
    pieces = [jnp.stack([a, b], axis=-1).reshape(a.shape[0], 2 * a.shape[1])
              for a, b in zip(pieces[0::2], pieces[1::2])]
  return pieces[0]


# ------------------------------------------------------------------------------------ launch


def _plan(M: int, packed: layout.PackedWeight, kind: str, config: TritonConfig) -> _Plan:
  t = tuned.lookup("lut_matmul", "pallas_triton")
  lookup = config.lookup or ("select" if M <= t["select_max_rows"] else "onehot")
  regime = "select" if lookup == "select" else ("gemv" if M <= t["max_gemv_rows"] else "gemm")
  pick = lambda name: (t[f"{regime}_{name}"] if getattr(config, name) is None
                       else getattr(config, name))
  N = packed.shape[1]
  if lookup == "select":
    bm = min(M, pick("block_m"))
  else:
    bm = max(launch.MIN_DOT_ROWS, min(launch.next_power_of_2(pick("block_m")),
                                      launch.next_power_of_2(M)))
  bn = min(pick("block_n"), max(16, launch.next_power_of_2(N)))
  gw = packed.block // layout.PLANE_WORD
  ws = min(pick("words_per_step"), gw & -gw)        # the largest power of 2 dividing gw
  steps = packed.rows // layout.PLANE_WORD // ws
  tiles = -(-N // bn) * -(-M // bm)
  if config.num_splits is None:
    target = launch.target_programs(t[f"{regime}_programs_per_sm"])
    splits = launch.default_num_splits(tiles, steps, target)
  else:
    splits = min(config.num_splits, steps)
  per_split = -(-steps // splits)
  splits = -(-steps // per_split)
  return _Plan(lookup=lookup, kind=kind, bm=bm, bn=bn, ws=ws, splits=splits, per_split=per_split,
               num_warps=pick("num_warps"), num_stages=pick("num_stages"))


@functools.partial(jax.jit, static_argnames=("plan", "block", "N", "table_scale", "out_dtype",
                                             "interpret"))
def _lut_matmul(x_MK, x_scale_M, planes, scale_GN, zero_GN, *, plan: _Plan, block: int, N: int,
                table_scale: str, out_dtype, interpret: bool):
  M, K = x_MK.shape
  P, words, _ = planes.shape
  rows = words * layout.PLANE_WORD
  G = rows // block
  p = plan
  Mp = launch.round_up(M, p.bm)
  x = jnp.pad(x_MK, ((0, Mp - M), (0, rows - K)))   # zero rows / columns: zero entries
  int8_x = x_MK.dtype == jnp.int8
  fused = p.splits == 1
  grid = (-(-N // p.bn), Mp // p.bm, p.splits)
  in_specs = [pl.BlockSpec((p.bm, rows), lambda n, m, s: (m, 0)),
              pl.BlockSpec((P, words, p.bn), lambda n, m, s: (0, 0, n)),
              pl.BlockSpec((G, p.bn), lambda n, m, s: (0, n)),
              pl.BlockSpec((G, p.bn), lambda n, m, s: (0, n))]
  args = [x, planes, scale_GN, zero_GN]
  if p.kind == "q8":
    ts = jnp.pad(table_scales(x_MK, rows, block, table_scale), ((0, 0), (0, Mp - M)))
    in_specs.append(pl.BlockSpec((G, p.bm), lambda n, m, s: (0, m)))
    args.append(ts)
  if fused and int8_x:
    in_specs.append(pl.BlockSpec((p.bm,), lambda n, m, s: (m,)))
    args.append(jnp.pad(x_scale_M.astype(jnp.float32), (0, Mp - M)))
  if fused:
    out_spec = pl.BlockSpec((p.bm, p.bn), lambda n, m, s: (m, n))
    out_shape = jax.ShapeDtypeStruct((M, N), out_dtype)
  else:
    out_spec = pl.BlockSpec((SQ, p.bm, p.bn), lambda n, m, s: (s, m, n))
    out_shape = jax.ShapeDtypeStruct((p.splits, M, N), jnp.float32)
  kernel = functools.partial(
      _kernel, plan=p, P=P, M=M, N=N, G=G, spg=block // layout.PLANE_WORD // p.ws,
      steps=rows // layout.PLANE_WORD // p.ws, int8_x=bool(int8_x), fused=fused,
      pieces=3 if x_MK.dtype == jnp.float32 else 2)
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages),
      interpret=interpret,
      name="lut_matmul",
  )(*args)
  if fused:
    return out
  y = jnp.sum(out, axis=0)
  if int8_x:
    y = y * x_scale_M.astype(jnp.float32)[:, None]
  return y.astype(out_dtype)


def _prepare(x_MK, packed: layout.PackedWeight, table_dtype, config, interpret: bool) -> _Plan:
  """NotSupported for what this kernel does not take; the launch plan otherwise."""
  require_platform("gpu", interpret, "the Pallas Triton lut_matmul kernel")
  config = config or TritonConfig()
  config.validate()
  kind = table_kind(x_MK.dtype, table_dtype)
  plan = _plan(x_MK.shape[0], packed, kind, config)
  if plan.lookup == "onehot" and kind == "int":
    bound = packed.block // LUT_ROWS * MAX_ABS_ENTRY * layout.levels(packed.bits)
    if bound >= EXACT_F32:
      raise NotSupported(
          f"lookup='onehot' sums exact int8-x tables in float32, exact below 2^24; a weight "
          f"group of {packed.block} rows and {packed.bits} bits can reach {bound} (use "
          f"lookup='select', int8 tables, or smaller groups)")
  return plan


def lut_matmul(x_MK, x_scale_M, packed, out_dtype, *, table_dtype, table_scale: str,
               interpret: bool = False, config: TritonConfig | None = None):
  """Arguments as `pallas_kernels.lut_matmul.lut_matmul` (checked there)."""
  plan = _prepare(x_MK, packed, table_dtype, config, interpret)
  return _lut_matmul(x_MK, x_scale_M, packed.packed, packed.scale, packed.zero, plan=plan,
                     block=packed.block, N=packed.shape[1], table_scale=table_scale,
                     out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret))
