"""Dense decode attention on a TPU: the block-list kernel of `sparse_decode.pallas_mosaic_tpu`
over the list 0 .. cdiv(length, block_k) - 1 (`decode_attention`'s `pallas_mosaic_tpu`).
Tested in the TPU interpreter; not yet run on a TPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import tuned
from pallas_kernels.dispatch import require_platform
from pallas_kernels.sparse_decode import pallas_mosaic_tpu as block_list


@dataclasses.dataclass(frozen=True)
class MosaicTPUConfig:
  """block_k: keys per grid step (None: tuned)."""
  block_k: int | None = None


CONFIG = MosaicTPUConfig


def dense_block_list(lengths_B: jax.Array, K: int, S: int, block_size: int):
  """The dense op as a block list: (indices int32 [B, K, cdiv(S, block)], n_live int32 [B, K])."""
  nb = -(-S // block_size)
  B = lengths_B.shape[0]
  idx = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, K, nb))
  n_live = jnp.broadcast_to(((lengths_B + block_size - 1) // block_size)[:, None], (B, K))
  return idx, n_live


def decode_attention(q_BKGH, k_BKSH, v_BKSH, lengths_B, *, interpret: bool = False,
                     config: MosaicTPUConfig | None = None):
  """Shapes as `pallas_kernels.decode_attention`."""
  require_platform("tpu", interpret, "the Mosaic TPU decode kernel")
  block_k = (config or MosaicTPUConfig()).block_k or tuned.lookup(
      "decode_attention", "pallas_mosaic_tpu")["block_k"]
  lengths_B = lengths_B.astype(jnp.int32)
  idx, n_live = dense_block_list(lengths_B, k_BKSH.shape[1], k_BKSH.shape[2], block_k)
  return block_list.block_list_decode(q_BKGH, k_BKSH, v_BKSH, lengths_B, idx, n_live,
                                      block_size=block_k, interpret=interpret)
