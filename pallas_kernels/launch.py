"""Launch-shape helpers shared by the kernels: power-of-2 arithmetic, padding, SM counts and the
split-count heuristic of the split-K decode kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import tuned

# Tensor-core dots (mma) need at least 16 rows; Triton also needs power-of-2 tile shapes.
MIN_DOT_ROWS = 16


def is_power_of_2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def prev_power_of_2(x: int) -> int:
  """The largest power of 2 <= x (x >= 1)."""
  return 1 << (x.bit_length() - 1)


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
  """Query rows a Triton program works on: G padded to a power of 2 and at least MIN_DOT_ROWS."""
  return max(MIN_DOT_ROWS, next_power_of_2(g))


def dot_precision(dtype) -> lax.Precision:
  """f32 inputs ask for IEEE f32 dots: Triton's default for f32 is TF32 (~1e-3 error)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def sm_count() -> int:
  """Streaming multiprocessors of the default GPU (the tuned default when unknown, e.g. on CPU)."""
  try:
    n = int(getattr(jax.devices()[0], "core_count", 0))
  except Exception:  # no device info
    n = 0
  return n or tuned.lookup("device", "gpu")["sm_count"]


def target_programs(per_sm: int) -> int:
  return per_sm * sm_count()


def default_num_splits(programs_per_split: int, work_units: int, target: int) -> int:
  """Splits per (batch, kv head) so that the grid has about (at most) `target` programs, rounded
  down to a power of 2 (split counts that do not divide the power-of-2 block counts leave ragged
  tails: B8 S128K on the H100, 2 splits 1.415 ms, 3 splits 1.533 ms).

  programs_per_split: B * K. work_units: blocks (or block slots) per (batch, kv head); more
  splits than units would only launch empty programs.
  """
  want = max(1, target // max(programs_per_split, 1))
  want = prev_power_of_2(want)
  return int(max(1, min(want, work_units)))
