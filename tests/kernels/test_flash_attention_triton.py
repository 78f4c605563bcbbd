"""flash_attention's Pallas Triton kernel: the shared test base (output and SeerAttention's block
target against a float64 loop; ragged lengths, GQA groups 1 / 2 / 3, T not a tile multiple) in
interpret mode on the CPU and compiled under `pytest -m gpu`; tile shapes; the block target
against the XLA reference; its Pallas -> Triton lowering for CUDA on any host."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.dispatch import NotSupported, lowering_for
from pallas_kernels.flash_attention import block_target_reference, flash_attention
from pallas_kernels.flash_attention.pallas_triton import TritonConfig

from ._oracle import TOLERANCES, check_close, generate_from_class, lower_for_cuda
from .test_flash_attention_reference import FlashAttentionBase, rand_qkv

pytest_generate_tests = generate_from_class

# (B, T, N, K, H, block_size, lengths): Triton tiles need H and blocks that are powers of 2 >= 16
CASES = [(2, 45, 4, 2, 16, 16, (45, 20)), (1, 64, 3, 1, 32, 16, (64,)),
         (3, 40, 6, 2, 16, 16, (40, 1, 17))]


class TestPallasTritonInterpret(FlashAttentionBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True
  CASES = CASES
  SMALL_BLOCK, SMALL_H = 16, 16            # Triton tiles: powers of 2 >= 16

  def test_full_lengths_match_causal_attention(self):
    self._full_lengths(jnp.float32)

  @pytest.mark.slow
  def test_full_lengths_bf16(self):
    self._full_lengths(jnp.bfloat16)

  def _full_lengths(self, dtype):
    q, k, v = rand_qkv((2, 40, 4, 2, 16), dtype)
    o = flash_attention(q, k, v, **self.kw)
    check_close(o, np.asarray(causal_attention(q, k, v, implementation="xla"), np.float64), dtype)
    o2, _ = flash_attention(q, k, v, jnp.full((2,), 40, jnp.int32), block_size=16, **self.kw)
    chex.assert_trees_all_close(o, o2, **TOLERANCES[dtype])

  @pytest.mark.parametrize("cfg", [TritonConfig(block_q=16, block_k=32),
                                   TritonConfig(block_q=32, block_k=16),
                                   pytest.param(TritonConfig(block_q=64, num_warps=4,
                                                             num_stages=2),
                                                marks=pytest.mark.slow)],
                           ids=lambda c: f"q{c.block_q}k{c.block_k}")
  def test_tile_shapes(self, cfg):
    """Query tiles larger / smaller than the key tiles (several diagonal tiles per program, or
    one program per part of a key tile), with and without the target."""
    q, k, v = rand_qkv((2, 70, 4, 2, 16), jnp.float32)
    lengths = jnp.asarray([70, 33], jnp.int32)
    want_o, want_t = flash_attention(q, k, v, lengths, block_size=16, implementation="xla")
    o = flash_attention(q, k, v, lengths, config=cfg, **self.kw)
    check_close(o, np.asarray(want_o, np.float64), jnp.float32)
    o, t = flash_attention(q, k, v, lengths, block_size=16,
                           config=TritonConfig(block_q=cfg.block_q), **self.kw)
    check_close(o, np.asarray(want_o, np.float64), jnp.float32)
    chex.assert_trees_all_close(t, want_t, **TOLERANCES[jnp.float32])

  def test_target_equals_the_reference_target(self, dtype):
    q, k, v = rand_qkv((1, 96, 8, 2, 32), dtype)
    lengths = jnp.asarray([90], jnp.int32)
    _, t = flash_attention(q, k, v, lengths, block_size=32, **self.kw)
    chex.assert_trees_all_close(t, block_target_reference(q, k, lengths, 32),
                                **TOLERANCES[jnp.float32])

  @pytest.mark.slow
  def test_output_gradient_runs_the_reference_backward(self):
    q, k, v = rand_qkv((1, 24, 2, 1, 16), jnp.float32)
    lengths = jnp.asarray([20], jnp.int32)
    f = lambda impl: jax.grad(lambda q, k, v: jnp.sum(flash_attention(
        q, k, v, lengths, implementation=impl, interpret=True) ** 2), (0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(f("pallas_triton"), f("xla"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True
  DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

  @pytest.mark.parametrize("H", [64, 128, 256])
  @pytest.mark.parametrize("dt", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
  def test_prefill_scale(self, H, dt):
    """Llama-style GQA (16 / 4 heads), T 1500 ragged, the default tiles and 64-token target
    blocks, against the XLA reference."""
    q, k, v = rand_qkv((2, 1500, 16, 4, H), dt)
    lengths = jnp.asarray([1500, 1111], jnp.int32)
    o, t = flash_attention(q, k, v, lengths, block_size=64, **self.kw)
    want_o, want_t = flash_attention(q, k, v, lengths, block_size=64, implementation="xla")
    chex.assert_trees_all_close(o.astype(jnp.float32), want_o.astype(jnp.float32),
                                **TOLERANCES[dt])
    chex.assert_trees_all_close(t, want_t, rtol=1e-3, atol=1e-5)

  def test_auto_is_the_triton_kernel_on_a_gpu(self):
    q, k, v = rand_qkv((1, 64, 2, 1, 64), jnp.bfloat16)
    lowered = jax.jit(lambda q, k, v: flash_attention(q, k, v, block_size=16)).lower(q, k, v)
    assert "xla.gpu.triton" in lowered.as_text()


def test_refusals_and_the_cpu_default():
  q, k, v = rand_qkv((1, 32, 2, 1, 24), jnp.float32)                 # H=24: no Triton tile
  with pytest.raises(NotSupported, match="head dim H=24"):
    flash_attention(q, k, v, implementation="pallas_triton", interpret=True)
  q, k, v = rand_qkv((1, 32, 2, 1, 16), jnp.float32)
  with pytest.raises(NotSupported, match="block_size=8"):
    flash_attention(q, k, v, block_size=8, implementation="pallas_triton", interpret=True)
  with pytest.raises(ValueError, match="block_k=32 must be None or the target's block_size"):
    flash_attention(q, k, v, block_size=16, implementation="pallas_triton", interpret=True,
                    config=TritonConfig(block_k=32))
  with pytest.raises(ValueError, match="block_q must be"):
    flash_attention(q, k, v, implementation="pallas_triton", interpret=True,
                    config=TritonConfig(block_q=48))
  if jax.default_backend() == "cpu":
    with pytest.raises(NotSupported, match="needs a GPU"):
      flash_attention(q, k, v, implementation="pallas_triton")
    # auto: the kernel refuses the CPU, the reference runs
    chex.assert_trees_all_equal(flash_attention(q, k, v), flash_attention(q, k, v,
                                                                          implementation="xla"))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("H", [64, 128, 256])
def test_kernel_lowers_for_cuda(dtype, H):
  """The compiled path's Pallas -> Triton lowering (checked on CPU, without a GPU), with and
  without the target; `implementation=None` picks the kernel on a GPU, the Mosaic GPU one and
  XLA behind it."""
  S = jax.ShapeDtypeStruct
  q, kv, n = S((1, 300, 8, H), dtype), S((1, 300, 2, H), dtype), S((1,), jnp.int32)
  for bs in (None, 64):
    text = lower_for_cuda(lambda q, k, v, n: flash_attention(
        q, k, v, n, block_size=bs, implementation="pallas_triton"), q, kv, kv, n)
    assert "xla.gpu.triton" in text and 'name = "flash_attention"' in text
  with lowering_for("gpu"):
    from pallas_kernels.flash_attention import _OP
    assert _OP.order(None) == ("pallas_triton", "pallas_mosaic_gpu", "xla")
