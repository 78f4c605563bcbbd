"""flash_attention's Pallas Mosaic TPU kernel in the TPU interpreter: the shared test base (output
and SeerAttention's block target against a float64 loop; ragged lengths, GQA groups 1 / 2 / 3, T
not a block multiple), the target against the XLA reference, the output's gradient through the
reference backward, and the block-size refusal."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.dispatch import NotSupported
from pallas_kernels.flash_attention import block_target_reference, flash_attention

from ._oracle import TOLERANCES, check_close, generate_from_class
from .test_flash_attention_reference import FlashAttentionBase, rand_qkv

pytest_generate_tests = generate_from_class


class TestPallasMosaicTPUInterpret(FlashAttentionBase):
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_tpu", True
  # (B, T, N, K, H, block_size, lengths): blocks a multiple of 8
  CASES = [(2, 21, 4, 2, 16, 8, (21, 10)), (1, 32, 3, 1, 8, 16, (32,)),
           (3, 27, 6, 2, 8, 8, (27, 1, 9))]
  SMALL_BLOCK = 8                          # the TPU's sublane tile

  def test_full_lengths_match_causal_attention(self, dtype):
    """Without a block size the tiles are DEFAULT_BLOCK tokens; with one, block_size: both are
    causal attention."""
    q, k, v = rand_qkv((2, 24, 4, 2, 16), dtype)
    want = np.asarray(causal_attention(q, k, v, implementation="xla"), np.float64)
    check_close(flash_attention(q, k, v, **self.kw), want, dtype)
    o, _ = flash_attention(q, k, v, jnp.full((2,), 24, jnp.int32), block_size=8, **self.kw)
    check_close(o, want, dtype)

  def test_target_equals_the_reference_target(self):
    q, k, v = rand_qkv((1, 96, 8, 2, 32), jnp.float32)
    lengths = jnp.asarray([90], jnp.int32)
    _, t = flash_attention(q, k, v, lengths, block_size=16, **self.kw)
    chex.assert_trees_all_close(t, block_target_reference(q, k, lengths, 16),
                                **TOLERANCES[jnp.float32])

  def test_output_gradient_runs_the_reference_backward(self):
    q, k, v = rand_qkv((1, 24, 2, 1, 16), jnp.float32)
    lengths = jnp.asarray([20], jnp.int32)
    f = lambda impl: jax.grad(lambda q, k, v: jnp.sum(flash_attention(
        q, k, v, lengths, implementation=impl, interpret=True) ** 2), (0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(f("pallas_mosaic_tpu"), f("xla"), rtol=1e-5, atol=1e-5)


def test_block_size_not_a_multiple_of_8_is_refused():
  q, k, v = rand_qkv((1, 12, 2, 1, 8), jnp.float32)
  with pytest.raises(NotSupported, match="multiple of 8"):
    flash_attention(q, k, v, block_size=4, implementation="pallas_mosaic_tpu", interpret=True)
  with pytest.raises(NotSupported, match="TPU"):
    flash_attention(q, k, v, block_size=8, implementation="pallas_mosaic_tpu")
