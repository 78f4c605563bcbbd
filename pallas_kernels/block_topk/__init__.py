"""Top-k block selection for sparse decoding, one small kernel per decode step and layer.

    idx_BKM, n_live_BK = block_topk(scores_BKN, lengths_B, block_size=64, k=205)

Per (sequence, KV head) row: the first and the current block (the one holding token length - 1)
are always kept -- with `local_tokens` > 1, every block holding one of the last local_tokens
tokens -- then the highest-scoring other valid blocks (block n is valid iff n * block_size <
length), k blocks in all, ties to the lower block index, NaN scores treated as -inf (and +inf as the largest finite score, below the forced blocks). The result
is what `pallas_kernels.sparse_decode` consumes: ascending block ids padded with -1 (`idx_BKM`
int32 [B, K, M], M = `output_width(k, N)` for every backend) and the number of live ids per row
(`n_live_BK` int32 [B, K]), so the attention kernel needs no extra pass to count them.

Implementations (pallas_kernels.dispatch): `xla` (reference.py: `lax.top_k` + sort),
`pallas_triton` (an exact bracket search on the float bits, one program per row; the GPU
default). Both give identical integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_topk.reference import (block_topk_reference, check_budget,
                                                 forced_blocks_max, output_width,
                                                 prefix_topk_reference, valid_forced)
from pallas_kernels.dispatch import Op

_OP = Op("block_topk", __name__,
         backends={"xla": "reference", "pallas_triton": "pallas_triton"},
         defaults={"gpu": ("pallas_triton",)})
IMPLEMENTATIONS = _OP.implementations
# prefix_topk's GPU default is the Triton kernel: on the H100 it selects the nz-ratio rows of a
# 32K prefill (32 heads, 512 blocks a row) in 88 us against XLA's sort-based 346 us, taking
# SeerAttention's gated forward from 2.67 to 2.39 ms (docs/results/seer_prefill.md).
_PREFIX_OP = Op("prefix_topk", __name__,
                backends={"xla": "reference", "pallas_triton": "pallas_triton"},
                defaults={"gpu": ("pallas_triton",)})
PREFIX_IMPLEMENTATIONS = _PREFIX_OP.implementations

__all__ = ["IMPLEMENTATIONS", "PREFIX_IMPLEMENTATIONS", "block_topk", "block_topk_reference",
           "check_budget", "forced_blocks_max", "output_width", "prefix_topk",
           "prefix_topk_reference", "valid_forced"]


def _check(scores_BKN, lengths_B, block_size: int, k: int, local_tokens: int) -> None:
  if getattr(scores_BKN, "ndim", None) != 3:
    raise ValueError(f"scores_BKN must be 3-D [B, K, N], got shape "
                     f"{getattr(scores_BKN, 'shape', None)}")
  if not jnp.issubdtype(scores_BKN.dtype, jnp.floating):
    raise ValueError(f"scores_BKN must be floating point, got {scores_BKN.dtype}")
  if getattr(lengths_B, "shape", None) != (scores_BKN.shape[0],):
    raise ValueError(f"lengths_B must have shape [B]=({scores_BKN.shape[0]},), got "
                     f"{getattr(lengths_B, 'shape', None)}")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"k must be an int >= 2 (first + current block), got {k!r}")
  if not isinstance(local_tokens, (int, np.integer)) or local_tokens < 1:
    raise ValueError(f"local_tokens must be an int >= 1, got {local_tokens!r}")
  check_budget(k, block_size, local_tokens)


def block_topk(scores_BKN: jax.Array, lengths_B: jax.Array, *, block_size: int, k: int,
               local_tokens: int = 1, implementation=None, interpret: bool = False,
               config=None) -> tuple[jax.Array, jax.Array]:
  """Top-k block selection (see the module docstring).

  Args:
    scores_BKN: float [B, K, N] block scores (gate logits or Quest bounds), N = cache blocks.
    lengths_B: int [B] valid tokens per sequence (block n is valid iff n * block_size < length).
    block_size: tokens per block. k: blocks to keep per row (>= 2), capped at N.
    local_tokens: the blocks holding the last local_tokens tokens are always kept (1: the
      current block); k must hold them and the first block (`forced_blocks_max`).
    implementation / interpret: as every op (pallas_kernels.dispatch).
    config: `pallas_triton.TritonConfig` (num_warps).

  Returns:
    (idx int32 [B, K, M], n_live int32 [B, K]): ascending selected block ids, -1 padded, M =
    output_width(k, N); and how many are live per row.
  """
  _check(scores_BKN, lengths_B, block_size, k, local_tokens)
  return _OP(implementation, scores_BKN, lengths_B, block_size=int(block_size), k=int(k),
             local_tokens=int(local_tokens), interpret=interpret, config=config)


def prefix_topk(scores_RN: jax.Array, n_valid_R: jax.Array, count_R: jax.Array, *, width: int,
                implementation=None, interpret: bool = False, config=None) -> jax.Array:
  """Per row, the count_R[r] highest of the first n_valid_R[r] scores (ties to the lower index;
  NaN as -inf; +inf ranks above every finite score, so a caller forces blocks by setting them to
  +inf and clipping the others), as ascending ids padded with -1: int32 [R, width]. count_R is
  capped at width; a row keeps min(count, n_valid) ids. The prefill selectors' top-k
  (`effjax.sparse.prefill_selection.select_nz_ratio`): there the valid prefix is the causally
  visible blocks j <= i.

  Implementations: `xla` (`lax.top_k` + a sort of the winners) and `pallas_triton` (the decode
  kernel's exact bracket search, one program per row; the GPU default); identical integers."""
  if getattr(scores_RN, "ndim", None) != 2 or not jnp.issubdtype(scores_RN.dtype, jnp.floating):
    raise ValueError(f"scores_RN must be floating [R, N], got "
                     f"{getattr(scores_RN, 'dtype', None)} {getattr(scores_RN, 'shape', None)}")
  R = scores_RN.shape[0]
  for name, a in (("n_valid_R", n_valid_R), ("count_R", count_R)):
    if getattr(a, "shape", None) != (R,) or not jnp.issubdtype(a.dtype, jnp.integer):
      raise ValueError(f"{name} must be integer [R]=({R},), got {getattr(a, 'dtype', None)} "
                       f"{getattr(a, 'shape', None)}")
  if not isinstance(width, (int, np.integer)) or width < 1:
    raise ValueError(f"width must be a positive int, got {width!r}")
  return _PREFIX_OP(implementation, scores_RN, n_valid_R, count_R, width=int(width),
                    interpret=interpret, config=config)
