"""flash_attention's Pallas Mosaic GPU kernel (the block-sparse forward over every causal block,
writing its row maxima for SeerAttention's block target): in the Mosaic GPU interpreter against
the XLA reference (output, target, gradients through the block-sparse backward), ragged lengths
and GQA; refusals; the compiled path lowered for CUDA on the CPU; compiled under `pytest -m gpu`
against the XLA reference and the Triton kernel."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention.pallas_mosaic_gpu import MosaicGPUConfig
from pallas_kernels.dispatch import NotSupported, lowering_for
from pallas_kernels.flash_attention import (block_target_reference, flash_attention,
                                            flash_attention_reference)
from pallas_kernels.flash_attention import pallas_mosaic_gpu as fmgpu

from ._oracle import loop_barriers, mosaic_gpu_modules
from .test_flash_attention_reference import rand_qkv

BS = 64


def check_against_reference(q, k, v, lengths, *, interpret, config=None, o_tol=2e-2):
  """Output and target against the float32 reference; the output's gradients (through the
  block-sparse backward) within 2% relative L2."""
  kw = dict(implementation="pallas_mosaic_gpu", interpret=interpret, config=config)
  o, target = flash_attention(q, k, v, lengths, block_size=BS, **kw)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  np.testing.assert_allclose(np.asarray(o, np.float32),
                             np.asarray(flash_attention_reference(*f32, lengths)),
                             atol=o_tol, rtol=o_tol)
  want = np.asarray(block_target_reference(f32[0], f32[1], lengths, BS))
  assert target.shape == want.shape and target.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(target), want, atol=1e-4, rtol=1e-3)
  return kw, f32


@pytest.mark.parametrize("B,T,N,K,H,lengths", [
    (1, 150, 2, 1, 64, (131,)),                # 3 query blocks (an odd pair), ragged
    pytest.param(2, 150, 2, 1, 64, (150, 70), marks=pytest.mark.slow),
    pytest.param(1, 250, 4, 2, 128, (237,), marks=pytest.mark.slow),
])
def test_interpret_output_and_target_match_the_reference(B, T, N, K, H, lengths):
  q, k, v = rand_qkv((B, T, N, K, H), jnp.bfloat16)
  check_against_reference(q, k, v, jnp.asarray(lengths, jnp.int32), interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("mosaic_backward", [False, True], ids=["triton_bwd", "mosaic_bwd"])
def test_interpret_gradients_through_the_block_sparse_backward(mosaic_backward):
  q, k, v = rand_qkv((1, 130, 4, 2, 64), jnp.bfloat16)
  lengths = jnp.asarray([121], jnp.int32)
  w = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
  cfg = MosaicGPUConfig(mosaic_backward=mosaic_backward)
  got = jax.grad(lambda q, k, v: jnp.sum(flash_attention(
      q, k, v, lengths, implementation="pallas_mosaic_gpu", interpret=True,
      config=cfg).astype(jnp.float32) * w), (0, 1, 2))(q, k, v)
  want = jax.grad(lambda q, k, v: jnp.sum(flash_attention_reference(q, k, v, lengths) * w),
                  (0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for a, b in zip(got, want):
    rel = np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b)) / np.linalg.norm(b)
    assert rel < 1e-2, rel


def test_refusals():
  q, k, v = rand_qkv((1, 128, 2, 1, 64), jnp.bfloat16)
  kw = dict(implementation="pallas_mosaic_gpu", interpret=True)
  with pytest.raises(NotSupported, match="block_size=32"):
    flash_attention(q, k, v, block_size=32, **kw)
  with pytest.raises(NotSupported, match="bfloat16 / float16"):
    flash_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
  with pytest.raises(NotSupported, match="default schedule only"):
    flash_attention(q, k, v, block_size=BS, config=MosaicGPUConfig(pingpong=True), **kw)
  if jax.default_backend() == "cpu":
    with pytest.raises(NotSupported, match="needs a GPU"):
      flash_attention(q, k, v, implementation="pallas_mosaic_gpu")
  with lowering_for("gpu"):
    from pallas_kernels.flash_attention import _OP
    assert _OP.order(None) == ("pallas_triton", "pallas_mosaic_gpu", "xla")


@pytest.mark.parametrize("H", [64, 128, 256])
def test_kernel_with_the_target_lowers_for_cuda(H):
  """The compiled path lowered for CUDA on the CPU, with the target (the row-max ring's stores
  and copies; Mosaic's own shared-memory check at the picked depth): the row-max store adds the
  barriers Pallas puts around a shared-memory store, and the forward without a target keeps
  none in its loop."""
  S = jax.ShapeDtypeStruct
  q, kv, n = (S((1, 1000, 8, H), jnp.bfloat16), S((1, 1000, 2, H), jnp.bfloat16),
              S((1,), jnp.int32))
  counts = {}
  for bs in (None, BS):
    fn = jax.jit(lambda q, k, v, n, bs=bs: flash_attention(
        q, k, v, n, block_size=bs, implementation="pallas_mosaic_gpu"))
    mods = mosaic_gpu_modules(fn, q, kv, kv, n)
    assert len(mods) == 1
    counts[bs] = loop_barriers(mods[0])
  assert counts[None] == 0 and 0 < counts[BS] <= 4, counts


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_against_the_reference_and_the_triton_kernel(H):
  """Compiled: 2 x 1500 ragged tokens, 16 / 4 heads, output and target against the XLA
  reference and the Triton kernel, gradients against the reference."""
  q, k, v = rand_qkv((2, 1500, 16, 4, H), jnp.bfloat16)
  lengths = jnp.asarray([1500, 1111], jnp.int32)
  kw, f32 = check_against_reference(q, k, v, lengths, interpret=False)
  o, t = flash_attention(q, k, v, lengths, block_size=BS, **kw)
  o2, t2 = flash_attention(q, k, v, lengths, block_size=BS, implementation="pallas_triton")
  chex.assert_trees_all_close(o.astype(jnp.float32), o2.astype(jnp.float32), atol=1e-2,
                              rtol=1e-2)
  chex.assert_trees_all_close(t, t2, rtol=1e-3, atol=1e-5)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  got = jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v, lengths, **kw)
                                         .astype(jnp.float32) * w), (0, 1, 2))(q, k, v)
  want = jax.grad(lambda q, k, v: jnp.sum(flash_attention_reference(q, k, v, lengths) * w),
                  (0, 1, 2))(*f32)
  for a, b in zip(got, want):
    rel = np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b)) / np.linalg.norm(b)
    assert rel < 2e-2, rel


def test_causal_rows():
  rows = np.asarray(fmgpu.causal_rows(1, 1, 3))[0, 0]
  np.testing.assert_array_equal(rows, [[0, -1, -1], [0, 1, -1], [0, 1, 2]])
