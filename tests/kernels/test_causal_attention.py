"""pallas_kernels.causal_attention (training / prefill layout): one test base, subclassed once per
backend, against a float64 loop over heads."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.causal_attention import causal_attention

from ._oracle import BackendBase, check_close, generate_from_class

pytest_generate_tests = generate_from_class


def naive_attention(q, k, v):
  """Causal GQA softmax attention in float64 numpy, one head at a time."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  K = k.shape[2]
  out = np.zeros((B, T, N, H))
  for n in range(N):
    kv = n // (N // K)
    s = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, kv]) / np.sqrt(H)
    s = np.where(np.arange(T)[None, :] <= np.arange(T)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, :, n] = np.einsum("bts,bsh->bth", p / p.sum(-1, keepdims=True), v[:, :, kv])
  return out


class CausalAttentionBase(BackendBase):
  # (B, T, N, K, H): odd lengths, GQA groups of 2 / 4 / 6, one KV head
  CASES = [(2, 13, 4, 2, 16), (1, 33, 8, 2, 64), (3, 7, 6, 1, 32)]
  DTYPES = (jnp.float32, jnp.bfloat16)

  def test_matches_oracle(self, dtype, case):
    B, T, N, K, H = case
    rng = np.random.default_rng(sum(case))
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype)
               for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    out = causal_attention(q, k, v, implementation=self.IMPLEMENTATION)
    assert out.shape == (B, T, N, H) and out.dtype == dtype
    # bf16: the probabilities meet V in bf16 (as flash attention does)
    check_close(out, naive_attention(q, k, v), dtype)


class TestXla(CausalAttentionBase):
  pass


@pytest.mark.gpu
class TestCudnnGPU(CausalAttentionBase):
  IMPLEMENTATION, GPU = "cudnn", True
  DTYPES = (jnp.bfloat16, jnp.float16)
  CASES = [(2, 13, 4, 2, 64), (1, 256, 8, 2, 128), (3, 7, 6, 1, 64)]


def test_cudnn_refuses_float32_and_the_default_falls_back():
  q = jnp.ones((1, 4, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match="cudnn"):
    causal_attention(q, q[:, :, :1], q[:, :, :1], implementation="cudnn")
  out = causal_attention(q, q[:, :, :1], q[:, :, :1])     # default order ends at the reference
  np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)


def test_rejects_bad_shapes():
  q = jnp.ones((1, 4, 6, 8))
  with pytest.raises(ValueError, match="must divide"):
    causal_attention(q, jnp.ones((1, 4, 4, 8)), jnp.ones((1, 4, 4, 8)))
  with pytest.raises(ValueError, match="implementation"):
    causal_attention(q, jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), implementation="flash9")
