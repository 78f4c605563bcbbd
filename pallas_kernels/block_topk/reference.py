"""Plain-XLA top-k block selection (`block_topk`'s `xla` implementation) and the selection rule
every backend and selector shares: which blocks are valid, which are always kept, and what a
budget must hold."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import launch


def output_width(k: int, n_blocks: int) -> int:
  """The width M of every backend's index output: the power of 2 above min(k, N) (at least one
  -1 slot past the k-th; the Triton kernel stores power-of-2 rows)."""
  return launch.next_power_of_2(min(k, n_blocks) + 1)


def forced_blocks_max(block_size: int, local_tokens: int) -> int:
  """The most blocks the rule forces: the first one and those holding the last local_tokens."""
  return 1 + 1 + (local_tokens - 1 + block_size - 1) // block_size


def check_budget(k: int, block_size: int, local_tokens: int) -> None:
  """A budget of k blocks must hold the forced ones (`forced_blocks_max`): a clear ValueError."""
  need = forced_blocks_max(block_size, local_tokens)
  if k < need:
    raise ValueError(f"k={k} blocks cannot hold the {need} forced ones (first block + the last "
                     f"local_tokens={local_tokens} tokens in blocks of {block_size})")


def valid_forced(lengths_B: jax.Array, n: int, block_size: int, local_tokens: int = 1):
  """(valid [B, 1, N], forced [B, 1, N]): blocks below the length; the first one and those
  holding the last local_tokens tokens (1: the current one)."""
  nb = ((lengths_B + block_size - 1) // block_size)[:, None, None]
  first_local = (jnp.maximum(lengths_B - local_tokens, 0) // block_size)[:, None, None]
  ar = jnp.arange(n)[None, None]
  valid = ar < nb
  return valid, valid & ((ar == 0) | (ar >= first_local))


@functools.partial(jax.jit, static_argnames=("block_size", "k", "local_tokens"))
def block_topk_reference(scores_BKN: jax.Array, lengths_B: jax.Array, *, block_size: int,
                         k: int, local_tokens: int = 1) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the N blocks, then a sort of the k winners: (idx int32 [B, K, M], n_live
  int32 [B, K]), M = output_width(k, N). `lax.top_k` with k in the hundreds runs as sorts: ~25
  us of kernel time for 64 rows of 2048 blocks on the H200 (the Triton kernel: ~6 us)."""
  N = scores_BKN.shape[-1]
  kk = min(k, N)
  valid, forced = valid_forced(lengths_B, N, block_size, local_tokens)
  s = jnp.where(jnp.isnan(scores_BKN), -jnp.inf, scores_BKN.astype(jnp.float32))
  # a +inf score must not tie with (and, by a lower id, displace) a forced block
  s = jnp.minimum(s, jnp.finfo(jnp.float32).max)
  s = jnp.where(forced, jnp.inf, jnp.where(valid, s, -jnp.inf))
  _, idx_BKk = lax.top_k(s, kk)  # ties: lower index first
  live = jnp.take_along_axis(jnp.broadcast_to(valid, s.shape), idx_BKk, axis=-1)
  idx_BKk = jnp.sort(jnp.where(live, idx_BKk, N), axis=-1)
  idx_BKk = jnp.where(idx_BKk < N, idx_BKk, -1).astype(jnp.int32)
  pad = output_width(k, N) - kk
  idx_BKM = jnp.pad(idx_BKk, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
  return idx_BKM, jnp.sum(live, axis=-1).astype(jnp.int32)


def block_topk(scores_BKN, lengths_B, *, block_size: int, k: int, local_tokens: int = 1,
               interpret: bool = False):
  """The `xla` implementation (interpret has nothing to interpret)."""
  del interpret
  return block_topk_reference(scores_BKN, lengths_B.astype(jnp.int32), block_size=block_size,
                              k=k, local_tokens=local_tokens)


def prefix_output_width(width: int) -> int:
  """The padded row width the `prefix_topk` Triton kernel stores (a power of 2 with at least one
  slot past `width`); every backend returns `width` columns."""
  return launch.next_power_of_2(width + 1)


@functools.partial(jax.jit, static_argnames=("width",))
def prefix_topk_reference(scores_RN: jax.Array, n_valid_R: jax.Array, count_R: jax.Array, *,
                          width: int) -> jax.Array:
  """`prefix_topk` in XLA: `lax.top_k` of every row (a sort on the GPU for width > 16), then a
  sort of the winners. int32 [R, width]."""
  N = scores_RN.shape[-1]
  ar = jnp.arange(N)
  valid = ar[None] < n_valid_R[:, None]
  s = scores_RN.astype(jnp.float32)
  s = jnp.where(valid & ~jnp.isnan(s), s, -jnp.inf)
  # top_k orders floats totally (-0 below +0): zeros made one value first
  kk = min(width, N)
  order = lax.top_k(jnp.where(s == 0, 0.0, s), kk)[1]               # ties: lower index first
  live = jnp.take_along_axis(valid, order, axis=-1)
  live &= jnp.arange(kk)[None] < jnp.minimum(count_R, width)[:, None]
  idx = jnp.sort(jnp.where(live, order, N), axis=-1)
  idx = jnp.where(idx < N, idx, -1).astype(jnp.int32)
  return jnp.pad(idx, ((0, 0), (0, width - kk)), constant_values=-1)


def prefix_topk(scores_RN, n_valid_R, count_R, *, width: int, interpret: bool = False):
  """The `xla` implementation of `prefix_topk`."""
  del interpret
  return prefix_topk_reference(scores_RN, n_valid_R.astype(jnp.int32), count_R.astype(jnp.int32),
                               width=width)
