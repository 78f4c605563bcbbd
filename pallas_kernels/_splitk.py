"""Shared pieces of the split-K decode-attention kernels (dense and block-sparse).

Both kernels run one Pallas program per (batch, kv head, split); each program folds its share of
key blocks into an online-softmax state (unnormalised accumulator, running max, running sum) and
writes it out as a partial. The partials are merged by a log-sum-exp combine: in XLA here, or
from TRITON_COMBINE_MIN_SPLITS splits by one Triton kernel (`_combine.py`).

Everything that the two kernels would otherwise duplicate lives once in this module: the
online-softmax block update, the combine, argument validation, padding and the config base.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Finite stand-in for -inf: a fully masked row then gives exp(MASK - MASK) = 1 instead of NaN
# from (-inf) - (-inf); the explicit `where(valid, ., 0)` below zeroes those weights.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# Tensor-core dots (mma) need at least 16 rows; Triton also needs power-of-2 tile shapes.
MIN_DOT_ROWS = 16

# Programs per SM that the split heuristics aim for (H100: 132 SMs), from the launch-grid sweeps
# in benchmarks/tune_decode.py (results/<card>/tune_decode*.json): the dense kernel is best with
# about one program per SM, each streaming a long contiguous range through a 3-stage pipeline
# (B1 S128K: 87% of the byte floor vs 84% at 4 per SM; B8 S128K: 2 splits 1.415 ms, 3 splits
# 1.533 ms -- split counts that do not divide the power-of-2 block counts leave ragged tails, so
# counts are rounded down to a power of 2). The sparse kernel, whose loads are gathered blocks
# behind an index load, wants more programs: 4 per SM at small batch, 2 per SM from B * K >= 64.
DENSE_PROGRAMS_PER_SM = 1
SPARSE_PROGRAMS_PER_SM = 4
SPARSE_PROGRAMS_PER_SM_LARGE = 2
DEFAULT_SM_COUNT = 132


def sm_count() -> int:
  """Streaming multiprocessors of the default GPU (132 when unknown, e.g. on CPU)."""
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or DEFAULT_SM_COUNT
  except Exception:  # no device info: the H100 number
    return DEFAULT_SM_COUNT


def target_programs(per_sm: int) -> int:
  return per_sm * sm_count()

# From this many splits the partials are merged by one Triton kernel (`_combine`) instead of
# XLA, which compiles a long split axis into three small kernels: H200, kernel time, B1 K8 G4
# 64 splits 2.2 us vs 5.0 us; with a few splits XLA fuses the merge into one loop (~1 us).
TRITON_COMBINE_MIN_SPLITS = 8

# Pallas-Triton stages each loaded tile whole, once per pipeline stage; Hopper has 227 KB of
# shared memory per block, some of which Triton needs for layout conversions.
SHARED_MEMORY_BUDGET = 160 * 1024

# A block dimension squeezed out of the kernel's ref (explicit rather than `None`).
SQUEEZED = pl.squeezed

IMPLEMENTATIONS = ("auto", "xla", "pallas_triton", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class SplitKConfig:
  """Launch parameters shared by the split-K decode kernels.

  num_splits: programs per (batch, kv head); None picks `default_num_splits`.
  num_warps / num_stages: Triton launch parameters (ignored in interpret mode); num_stages None
  picks each kernel's tuned default.
  """
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int | None = None

  def validate(self) -> None:
    if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
      raise ValueError(f"config.num_splits must be a positive int or None, got {self.num_splits!r}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"config.num_warps must be a power of 2 in [1, 16], got {self.num_warps!r}")
    if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
      raise ValueError(f"config.num_stages must be a positive int or None, got {self.num_stages!r}")


def triton_compiler_params(config: SplitKConfig, tile_rows: int, head_dim: int, dtype,
                           default_stages: int = 2):
  """Triton launch parameters, with num_stages lowered until a K tile and a V tile of
  [tile_rows, head_dim] per stage fit SHARED_MEMORY_BUDGET (f32 128 x 128 tiles fit one stage).

  Imported lazily so CPU-only installs never need the GPU plugin.
  """
  from jax.experimental.pallas import triton as plgpu
  stage_bytes = 2 * tile_rows * head_dim * jnp.dtype(dtype).itemsize
  want = default_stages if config.num_stages is None else config.num_stages
  stages = max(1, min(want, SHARED_MEMORY_BUDGET // stage_bytes))
  return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=stages)


def is_power_of_2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pads `axis` of x up to a multiple of `multiple` (no-op, no copy, when it already is)."""
  pad = round_up(x.shape[axis], multiple) - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def dot_rows(g: int) -> int:
  """Query rows a program works on: G padded to a power of 2 and at least MIN_DOT_ROWS."""
  return max(MIN_DOT_ROWS, next_power_of_2(g))


def default_num_splits(programs_per_split: int, work_units: int, target_programs: int) -> int:
  """Splits per (batch, kv head) so that the grid has about (at most) `target_programs` programs,
  rounded down to a power of 2.

  programs_per_split: B * K. work_units: blocks (or block slots) per (batch, kv head); more
  splits than units would only launch empty programs.
  """
  want = max(1, target_programs // max(programs_per_split, 1))
  want = 1 << (want.bit_length() - 1)
  return int(max(1, min(want, work_units)))


def dot_precision(dtype) -> lax.Precision:
  """f32 inputs ask for IEEE f32 dots: Triton's default for f32 is TF32 (~1e-3 error)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def init_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Empty online-softmax state: (acc f32 [rows, H], max f32 [rows], sum f32 [rows])."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def attend_block(q_RH: jax.Array, k_TH: jax.Array, v_TH: jax.Array, valid_T: jax.Array,
                 state: tuple[jax.Array, jax.Array, jax.Array], *, scale: float,
                 precision: lax.Precision) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Folds one block of T keys into the online-softmax state (FlashAttention-2 update).

  q_RH [R, H], k_TH / v_TH [T, H] (same dtype), valid_T bool [T] or [R, T]; state = (acc f32 [R, H],
  m f32 [R], l f32 [R]). Runs inside Pallas kernels (Triton lowering and interpret mode).
  """
  acc_RH, m_R, l_R = state
  s_RT = jnp.dot(q_RH, k_TH.T, preferred_element_type=jnp.float32, precision=precision) * scale
  # valid_T [T] (one mask for every row) or [R, T] (per-row masks: causal multi-token queries)
  valid_1T = valid_T[None, :] if valid_T.ndim == 1 else valid_T
  s_RT = jnp.where(valid_1T, s_RT, MASK_VALUE)
  m_new_R = jnp.maximum(m_R, jnp.max(s_RT, axis=1))
  # Masked keys get weight exactly 0, so a block (or a whole split) with no valid key leaves
  # l = 0 and acc = 0 however the running max sits.
  p_RT = jnp.where(valid_1T, jnp.exp(s_RT - m_new_R[:, None]), 0.0)
  corr_R = jnp.exp(m_R - m_new_R)
  l_new_R = corr_R * l_R + jnp.sum(p_RT, axis=1)
  # Probabilities in the cache dtype so that the PV product is a bf16 tensor-core dot.
  pv_RH = jnp.dot(p_RT.astype(v_TH.dtype), v_TH, preferred_element_type=jnp.float32,
                  precision=precision)
  return corr_R[:, None] * acc_RH + pv_RH, m_new_R, l_new_R


def splitk_call(kernel, prefix_specs: list, prefix_args: list, q_BKGH: jax.Array, k_BKSH: jax.Array,
                v_BKSH: jax.Array, *, num_splits: int, tile_rows: int, config: SplitKConfig,
                interpret: bool, name: str, default_stages: int = 2) -> jax.Array:
  """The pallas_call both decode kernels share: grid (b, k, split); per-(b, k) scalar or index
  inputs first (`prefix_specs` / `prefix_args`), then the query rows (read as `dot_rows` rows) and the
  whole [S, H] K and V of the (b, k) (the kernel loads `tile_rows`-token slices of them); outputs
  are the per-split partial (o, m, l), combined here (`_combine.combine_splits_triton` from
  TRITON_COMBINE_MIN_SPLITS splits, else `combine_splits`). The kernel gets `n_rows=G` (the real rows:
  `write_partial` stores only those; the padding rows of a partial stay unwritten and the
  combine never reads them). Returns o [B, K, G, H] in q's dtype."""
  B, K, G, H = q_BKGH.shape
  S = k_BKSH.shape[2]
  R = dot_rows(G)
  # The query block is R rows of the unpadded [B, K, G, H] array, where padding in XLA was a
  # separate kernel (0.2 us a call at B8). Pallas-Triton does not mask a block that overhangs the
  # array (found 2026-11-30: its lowering applies only the mask a load is given), so the kernels
  # read it with `load_query`, which masks the rows past G to zero. A padding row's dot products,
  # softmax and output stay in that row, and `write_partial` never stores it.
  sq = SQUEEZED  # grid dims (b, k, j) are squeezed out of every ref
  o_BKNRH, m_BKNR, l_BKNR = pl.pallas_call(
      functools.partial(kernel, n_rows=G),
      grid=(B, K, num_splits),
      in_specs=list(prefix_specs) + [
          pl.BlockSpec((sq, sq, R, H), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((sq, sq, S, H), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((sq, sq, S, H), lambda b, k, j: (b, k, 0, 0)),
      ],
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
      compiler_params=triton_compiler_params(config, tile_rows, H, q_BKGH.dtype, default_stages),
      interpret=interpret,
      name=name,
  )(*prefix_args, q_BKGH, k_BKSH, v_BKSH)
  from pallas_kernels import _combine
  if (num_splits >= TRITON_COMBINE_MIN_SPLITS
      and _combine.triton_combine_supported(G, R, H) is None):
    return _combine.combine_splits_triton(o_BKNRH, m_BKNR, l_BKNR, G, q_BKGH.dtype,
                                          interpret=interpret)
  return combine_splits(o_BKNRH, m_BKNR, l_BKNR, G, q_BKGH.dtype)


def load_query(q_ref, n_rows: int) -> jax.Array:
  """The [R, H] query block with its rows past n_rows (the padding up to `dot_rows`, which lie
  past the (b, k)'s G rows of the unpadded array) masked to zero: no read past the query buffer,
  and in interpret mode no NaN fill either."""
  R = q_ref.shape[0]
  if n_rows >= R:
    return q_ref[...]
  from jax.experimental.pallas import triton as plgpu
  live = lax.broadcasted_iota(jnp.int32, (R, 1), 0) < n_rows
  return plgpu.load(q_ref, mask=jnp.broadcast_to(live, q_ref.shape), other=0)


def attend_range(q_ref, o_ref, m_ref, l_ref, start, end, load_block, *, scale: float,
                 precision, n_rows: int) -> None:
  """A split's loop, shared by the Triton kernels: online softmax over blocks i in [start, end),
  where load_block(i) -> (k_TH, v_TH, valid_T); writes the split's partial (o, m, l) (its first
  n_rows rows, `write_partial`)."""
  q_RH = load_query(q_ref, n_rows)

  def body(i, state):
    k_TH, v_TH, valid_T = load_block(i)
    return attend_block(q_RH, k_TH, v_TH, valid_T, state, scale=scale, precision=precision)

  state = lax.fori_loop(start, end, body, init_state(q_RH.shape[0], q_RH.shape[1]))
  write_partial(o_ref, m_ref, l_ref, state, n_rows)


def write_partial(o_ref, m_ref, l_ref, state, n_rows: int) -> None:
  """Stores a split's online-softmax state (acc [R, H], m [R], l [R]), only its first n_rows
  rows: the dot's padding rows (R = dot_rows(G) >= 16 for G = 4) would be 3/4 of the partial
  bytes written and read back by the combine -- at B1 S128K, 4 MB against the 54 MB of K/V a
  90%-sparse step reads."""
  acc_RH, m_R, l_R = state
  R = acc_RH.shape[0]
  if n_rows >= R:
    o_ref[...] = acc_RH
    m_ref[...] = m_R
    l_ref[...] = l_R
    return
  from jax.experimental.pallas import triton as plgpu
  live_R = lax.broadcasted_iota(jnp.int32, (R,), 0) < n_rows
  plgpu.store(o_ref, acc_RH, mask=jnp.broadcast_to(live_R[:, None], acc_RH.shape))
  plgpu.store(m_ref, m_R, mask=live_R)
  plgpu.store(l_ref, l_R, mask=live_R)


def combine_splits(o_BKNRH: jax.Array, m_BKNR: jax.Array, l_BKNR: jax.Array, g: int,
                   out_dtype) -> jax.Array:
  """Log-sum-exp merge of split partials into the attention output.

  o_BKNRH f32 [B, K, n_split, R, H] (unnormalised), m_BKNR / l_BKNR f32 [B, K, n_split, R];
  returns [B, K, g, H] in out_dtype (the first g of the R padded rows). Rows with no valid key in
  any split (l = 0 everywhere) come out as zeros, not NaN.
  """
  # Drop the padding rows first, so the merge reads only the g real rows of each partial.
  o_BKNGH, m_BKNG, l_BKNG = o_BKNRH[:, :, :, :g], m_BKNR[:, :, :, :g], l_BKNR[:, :, :, :g]
  m_BKG = jnp.max(m_BKNG, axis=2)
  w_BKNG = jnp.exp(m_BKNG - m_BKG[:, :, None])
  l_BKG = jnp.sum(w_BKNG * l_BKNG, axis=2)
  o_BKGH = jnp.sum(w_BKNG[..., None] * o_BKNGH, axis=2)
  o_BKGH = o_BKGH / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]
  return o_BKGH.astype(out_dtype)


def check_implementation(implementation: str, allowed: tuple[str, ...] = IMPLEMENTATIONS) -> None:
  """implementation must be one of `allowed` (an op's own list: the block-sparse op adds its
  Mosaic GPU kernel to IMPLEMENTATIONS)."""
  if implementation not in allowed:
    raise ValueError(f"implementation must be one of {allowed}, got {implementation!r}")


def check_decode_args(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                      lengths_B: jax.Array | None) -> None:
  """Shape / dtype checks shared by the decode ops (work on tracers; only static properties,
  plus value checks when lengths_B is concrete; lengths_B None skips them)."""
  for name, x in (("q_BKGH", q_BKGH), ("k_BKSH", k_BKSH), ("v_BKSH", v_BKSH)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D [B, K, ., H], got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                  jnp.dtype(jnp.float16)):
      raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if k_BKSH.shape != v_BKSH.shape:
    raise ValueError(f"k_BKSH {k_BKSH.shape} and v_BKSH {v_BKSH.shape} must have the same shape")
  if not (q_BKGH.dtype == k_BKSH.dtype == v_BKSH.dtype):
    raise ValueError("q_BKGH, k_BKSH and v_BKSH must share a dtype, got "
                     f"{q_BKGH.dtype}, {k_BKSH.dtype}, {v_BKSH.dtype}")
  B, K, G, H = q_BKGH.shape
  if (k_BKSH.shape[0], k_BKSH.shape[1], k_BKSH.shape[3]) != (B, K, H):
    raise ValueError(f"k_BKSH {k_BKSH.shape} must be [B, K, S, H] matching q_BKGH {q_BKGH.shape}")
  if min(B, K, G, H, k_BKSH.shape[2]) < 1:
    raise ValueError(f"empty dimension: q_BKGH {q_BKGH.shape}, k_BKSH {k_BKSH.shape}")
  if lengths_B is not None:
    check_positions("lengths_B", lengths_B, B, k_BKSH.shape[2], "S")


def check_positions(name: str, x_B, batch: int, high: int, high_name: str) -> None:
  """x_B: an integer [batch] array; when concrete, every entry in [0, high] (high_name says what
  high is in the message, e.g. "S" or "S - F")."""
  if getattr(x_B, "shape", None) != (batch,):
    raise ValueError(f"{name} must have shape [B]={batch,}, got {getattr(x_B, 'shape', None)}")
  if not jnp.issubdtype(x_B.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got {x_B.dtype}")
  if not isinstance(x_B, jax.core.Tracer):
    xv = np.asarray(x_B)
    if xv.min() < 0 or xv.max() > high:
      raise ValueError(f"{name} must lie in [0, {high_name}={high}], got {xv.tolist()}")


def triton_supported(head_dim: int, dtype) -> str | None:
  """Why the Triton kernel can't take these inputs, or None if it can."""
  if not is_power_of_2(head_dim) or head_dim < 16:
    return f"head dim H={head_dim} must be a power of 2 >= 16 for Triton tiles"
  return None


def auto_implementation(head_dim: int, dtype, tpu_available: bool) -> str:
  """`auto`: Pallas-Triton on GPU, Pallas TPU on TPU (when implemented), else the XLA reference."""
  backend = jax.default_backend()
  if backend == "gpu" and triton_supported(head_dim, dtype) is None:
    return "pallas_triton"
  if backend == "tpu" and tpu_available:
    return "pallas_tpu"
  return "xla"
