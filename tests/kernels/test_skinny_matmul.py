"""pallas_kernels.skinny_matmul: the Triton kernel against a float64 oracle and the XLA reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import (SkinnyMatmulConfig, _plan, skinny_matmul,
                                          skinny_matmul_reference)

from ._oracle import lower_for_cuda, require_backend

IMPLS = [
    pytest.param("xla", False, id="xla"),
    pytest.param("pallas_triton", True, id="triton-interpret"),
    pytest.param("pallas_triton", False, id="triton-gpu", marks=pytest.mark.gpu),
]
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(seed, M, K, N, dtype):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((M, K), np.float32)
  w = rng.standard_normal((K, N), np.float32) / np.sqrt(K)
  return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _oracle(x, w):
  return (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
          @ np.asarray(jnp.asarray(w, jnp.float32), np.float64))


# (M, K, N, config): M 1 / odd / 16; N and K multiples of different tile sizes; several splits
CASES = [
    (1, 256, 384, None),
    (3, 192, 96, None),
    (16, 128, 256, SkinnyMatmulConfig(block_n=64, block_k=32, num_splits=2)),
    (5, 512, 128, SkinnyMatmulConfig(block_k=64, num_splits=8)),
    (8, 96, 48, SkinnyMatmulConfig(block_n=16, block_k=32, num_splits=3)),
]


@pytest.mark.parametrize("implementation,interpret", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}".format(*c[:3]))
def test_matches_oracle(implementation, interpret, dtype, case):
  require_backend(implementation, interpret)
  M, K, N, cfg = case
  x, w = _inputs(M * 7 + K, M, K, N, dtype)
  y = skinny_matmul(x, w, implementation=implementation, interpret=interpret, config=cfg)
  assert y.shape == (M, N) and y.dtype == x.dtype
  chex.assert_trees_all_close(np.asarray(y, np.float32), _oracle(x, w).astype(np.float32), **TOL[dtype])


def test_plan_splits_divide_the_k_tiles():
  # 3584 x 1024 (a 350m w_down): 8 column tiles of 128, 28 K tiles -> the largest divisor of 28
  # within 2 * 132 / 8 = 33 programs per column tile
  assert _plan(1, 3584, 1024, SkinnyMatmulConfig()) == (128, 128, 28)
  assert _plan(1, 1024, 3584, SkinnyMatmulConfig()) == (128, 128, 8)
  assert isinstance(_plan(17, 128, 128, SkinnyMatmulConfig()), str)
  assert isinstance(_plan(1, 128, 259, SkinnyMatmulConfig()), str)


def test_auto_falls_back_to_xla_where_the_kernel_cannot_go():
  x, w = _inputs(0, 2, 64, 259, jnp.float32)          # N = 259 (a byte vocabulary)
  chex.assert_trees_all_equal(skinny_matmul(x, w), skinny_matmul_reference(x, w))


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=jnp.ones((2, 3, 4)), w=jnp.ones((4, 16))), "must be \\[M, K\\]"),
    (dict(x=jnp.ones((2, 8)), w=jnp.ones((4, 16))), "contracting sizes differ"),
    (dict(x=jnp.ones((2, 16)), w=jnp.ones((16, 16), jnp.bfloat16)), "share a float dtype"),
    (dict(x=jnp.ones((2, 16), jnp.int32), w=jnp.ones((16, 16), jnp.int32)), "share a float dtype"),
    (dict(x=jnp.ones((2, 16)), w=jnp.ones((16, 16)), implementation="cuda"), "implementation must be"),
    (dict(x=jnp.ones((20, 16)), w=jnp.ones((16, 16)), implementation="pallas_triton"), "exceed 16"),
    (dict(x=jnp.ones((2, 16)), w=jnp.ones((16, 16)), config=SkinnyMatmulConfig(block_n=24)),
     "power of 2"),
    (dict(x=jnp.ones((2, 64)), w=jnp.ones((64, 16)), implementation="pallas_triton",
          config=SkinnyMatmulConfig(block_k=16, num_splits=3)), "does not divide"),
])
def test_bad_inputs_raise(kwargs, match):
  x, w = kwargs.pop("x"), kwargs.pop("w")
  with pytest.raises(ValueError, match=match):
    skinny_matmul(x, w, **kwargs)


def test_triton_kernel_lowers_for_cuda():
  x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024, 3584), jnp.bfloat16)
  text = lower_for_cuda(lambda a, b: skinny_matmul(a, b, implementation="pallas_triton"), x, w)
  assert 'name = "skinny_matmul"' in text
