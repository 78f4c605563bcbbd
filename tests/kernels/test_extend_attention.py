"""pallas_kernels.decode_attention.extend_attention (F new tokens per sequence, causal) against a
float64 oracle, and against the XLA path `effjax.decoding` used before the kernel existed."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (DecodeConfig, extend_attention,
                                             extend_attention_reference)

from ._oracle import TOLERANCES, lower_for_cuda, oracle, require_backend

IMPLS = [
    pytest.param("xla", False, id="xla"),
    pytest.param("pallas_triton", True, id="triton-interpret"),
    pytest.param("pallas_triton", False, id="triton-gpu", marks=pytest.mark.gpu),
]

# (B, K, F, G, H, S, starts): ragged starts (0, mid-block, up to the end of the cache), F of 1
# (a decode step), odd F, F x G rows that are not a power of 2, and S not a block multiple.
SHAPES = [
    (2, 2, 1, 4, 64, 128, [5, 127]),
    (3, 2, 5, 4, 64, 300, [0, 37, 295]),
    (2, 1, 8, 2, 128, 256, [100, 248]),
    (1, 2, 32, 4, 64, 192, [150]),
    (2, 2, 3, 1, 128, 160, [1, 157]),
]


def inputs(seed, B, K, F, G, H, S, dtype):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, K, F, G, H), np.float32)
  k = rng.standard_normal((B, K, S, H), np.float32)
  v = rng.standard_normal((B, K, S, H), np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def extend_oracle(q, k, v, starts):
  """Per new token f: the decode oracle over keys [0, start + f]."""
  B, K, F, G, H = q.shape
  S = k.shape[2]
  out = np.zeros((B, K, F, G, H))
  for f in range(F):
    valid = np.arange(S)[None, :] <= (np.asarray(starts) + f)[:, None]
    out[:, :, f] = oracle(q[:, :, f], k, v, np.repeat(valid[:, None], K, axis=1))
  return out


@pytest.mark.parametrize("implementation,interpret", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}K{}F{}G{}H{}S{}".format(*s[:6]))
def test_matches_oracle(implementation, interpret, dtype, shape):
  require_backend(implementation, interpret)
  B, K, F, G, H, S, starts = shape
  q, k, v = inputs(F * 31 + S, B, K, F, G, H, S, dtype)
  out = extend_attention(q, k, v, jnp.asarray(starts, jnp.int32), implementation=implementation,
                         interpret=interpret)
  assert out.shape == (B, K, F, G, H) and out.dtype == dtype
  chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)),
                              extend_oracle(q, k, v, starts).astype(np.float32), **TOLERANCES[dtype])


@pytest.mark.parametrize("implementation,interpret", IMPLS[1:])
@pytest.mark.parametrize("config", [
    DecodeConfig(block_k=16, num_splits=1),
    DecodeConfig(block_k=32, num_splits=5),   # more splits than the short rows have blocks
    DecodeConfig(block_k=128, num_splits=2, num_warps=8),
], ids=lambda c: f"bk{c.block_k}-ns{c.num_splits}")
def test_configs(implementation, interpret, config):
  require_backend(implementation, interpret)
  B, K, F, G, H, S, starts = 2, 2, 6, 4, 64, 224, [10, 200]
  q, k, v = inputs(3, B, K, F, G, H, S, jnp.float32)
  out = extend_attention(q, k, v, jnp.asarray(starts, jnp.int32), implementation=implementation,
                         interpret=interpret, config=config)
  chex.assert_trees_all_close(np.asarray(out), extend_oracle(q, k, v, starts).astype(np.float32),
                              **TOLERANCES[jnp.float32])


def test_one_token_equals_decode_attention():
  """F = 1 at start s is a decode step with length s + 1."""
  from pallas_kernels.decode_attention import decode_attention
  q, k, v = inputs(9, 2, 2, 1, 4, 64, 128, jnp.float32)
  starts = jnp.asarray([3, 127], jnp.int32)
  a = extend_attention(q, k, v, starts, implementation="pallas_triton", interpret=True)[:, :, 0]
  b = decode_attention(q[:, :, 0], k, v, starts + 1, implementation="pallas_triton", interpret=True)
  chex.assert_trees_all_close(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_validates():
  q, k, v = inputs(0, 1, 1, 4, 2, 64, 64, jnp.float32)
  with pytest.raises(ValueError, match="5-D"):
    extend_attention(q[:, :, 0], k, v, jnp.asarray([0]))
  with pytest.raises(ValueError, match="start_B must have shape"):
    extend_attention(q, k, v, jnp.asarray([0, 1]))
  with pytest.raises(ValueError, match=r"start_B must lie in \[0, S - F=60\]"):
    extend_attention(q, k, v, jnp.asarray([61]))
  with pytest.raises(ValueError, match="start_B must be an integer"):
    extend_attention(q, k, v, jnp.asarray([0.0]))
  with pytest.raises(ValueError, match="no TPU kernel"):
    extend_attention(q, k, v, jnp.asarray([0]), implementation="pallas_tpu")


def test_reference_is_jittable_with_traced_starts():
  q, k, v = inputs(1, 2, 1, 3, 2, 64, 96, jnp.float32)
  f = jax.jit(lambda s: extend_attention_reference(q, k, v, s))
  chex.assert_trees_all_close(np.asarray(f(jnp.asarray([4, 90]))),
                              extend_oracle(q, k, v, [4, 90]).astype(np.float32), rtol=1e-5, atol=1e-5)


def test_triton_kernel_lowers_for_cuda():
  q = jax.ShapeDtypeStruct((8, 8, 32, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8, 8, 4096, 128), jnp.bfloat16)
  st = jax.ShapeDtypeStruct((8,), jnp.int32)
  text = lower_for_cuda(lambda q, k, v, s: extend_attention(q, k, v, s, implementation="pallas_triton"),
                        q, kv, kv, st)
  assert "extend_attention" in text
