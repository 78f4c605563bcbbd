"""pallas_kernels.extend_attention (F new tokens per sequence over a cache): one test base,
subclassed once per backend, against a float64 per-token causal oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.extend_attention import extend_attention, extend_attention_reference
from pallas_kernels.extend_attention.pallas_triton import TritonConfig

from ._oracle import BackendBase, check_close, generate_from_class, lower_for_cuda, oracle

pytest_generate_tests = generate_from_class

# (B, K, F, G, H, S, starts): ragged starts (0, mid-block, up to the end of the cache), F of 1
# (a decode step), odd F, F x G rows that are not a power of 2, and S not a block multiple.
CASES = [
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


class ExtendAttentionBase(BackendBase):
  CASES = CASES
  DTYPES = (jnp.float32, jnp.bfloat16)
  CONFIGS = ()

  def run(self, q, k, v, starts, **kw):
    return extend_attention(q, k, v, jnp.asarray(starts, jnp.int32), **self.kw, **kw)

  def test_matches_oracle(self, dtype, case):
    B, K, F, G, H, S, starts = case
    q, k, v = inputs(F * 31 + S, B, K, F, G, H, S, dtype)
    out = self.run(q, k, v, starts)
    assert out.shape == (B, K, F, G, H) and out.dtype == dtype
    check_close(out, extend_oracle(q, k, v, starts), dtype)

  def test_configs_change_only_summation_order(self):
    B, K, F, G, H, S, starts = 2, 2, 6, 4, 64, 224, [10, 200]
    q, k, v = inputs(3, B, K, F, G, H, S, jnp.float32)
    want = extend_oracle(q, k, v, starts)
    for config in self.CONFIGS:
      check_close(self.run(q, k, v, starts, config=config), want, jnp.float32)

  def test_one_token_equals_decode_attention(self):
    """F = 1 at start s is a decode step with length s + 1."""
    q, k, v = inputs(9, 2, 2, 1, 4, 64, 128, jnp.float32)
    starts = jnp.asarray([3, 127], jnp.int32)
    a = self.run(q, k, v, starts)[:, :, 0]
    b = decode_attention(q[:, :, 0], k, v, starts + 1, implementation="xla")
    check_close(a, np.asarray(b, np.float64), jnp.float32)

  def test_under_jit_with_traced_starts(self):
    q, k, v = inputs(1, 2, 1, 3, 2, 64, 96, jnp.float32)
    f = jax.jit(lambda s: extend_attention(q, k, v, s, **self.kw))
    check_close(f(jnp.asarray([4, 90], jnp.int32)), extend_oracle(q, k, v, [4, 90]), jnp.float32)


class TestXla(ExtendAttentionBase):
  def test_reference_is_the_xla_implementation(self):
    q, k, v = inputs(1, 2, 1, 3, 2, 64, 96, jnp.float32)
    s = jnp.asarray([4, 90], jnp.int32)
    np.testing.assert_array_equal(np.asarray(extend_attention_reference(q, k, v, s)),
                                  np.asarray(extend_attention(q, k, v, s, implementation="xla")))


class TestPallasTritonInterpret(ExtendAttentionBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True
  CONFIGS = (TritonConfig(block_k=16, num_splits=1),
             TritonConfig(block_k=32, num_splits=5),   # more splits than the short rows have blocks
             TritonConfig(block_k=128, num_splits=2, num_warps=8))


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True


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
  with pytest.raises(ValueError, match="implementation must be one of"):
    extend_attention(q, k, v, jnp.asarray([0]), implementation="pallas_mosaic_tpu")


def test_triton_kernel_lowers_for_cuda():
  q = jax.ShapeDtypeStruct((8, 8, 32, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8, 8, 4096, 128), jnp.bfloat16)
  st = jax.ShapeDtypeStruct((8,), jnp.int32)
  text = lower_for_cuda(lambda q, k, v, s: extend_attention(q, k, v, s, implementation="pallas_triton"),
                        q, kv, kv, st)
  assert "extend_attention" in text
