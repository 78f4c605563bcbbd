"""Shared helpers for the decode-attention kernel tests: a float64 numpy oracle, random inputs and
the implementations every test body is parametrised over."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# (implementation, interpret): the XLA reference, the Triton kernel interpreted on CPU, the same
# kernel compiled on a GPU (`pytest -m gpu` on the device machine), and the Mosaic TPU kernel in
# the TPU interpreter.
IMPLEMENTATIONS = [
    pytest.param("xla", False, id="xla"),
    pytest.param("pallas_triton", True, id="triton-interpret"),
    pytest.param("pallas_triton", False, id="triton-gpu", marks=pytest.mark.gpu),
    pytest.param("pallas_tpu", True, id="tpu-interpret"),
]

# chex tolerances per dtype: f32 kernels differ from float64 only by summation order; bf16 by the
# bf16 rounding of the probabilities fed to the PV dot and of the output.
TOLERANCES = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def require_backend(implementation: str, interpret: bool) -> None:
  """A compiled Triton kernel needs a GPU; fail loudly rather than skip if run elsewhere."""
  if implementation == "pallas_triton" and not interpret and jax.default_backend() != "gpu":
    pytest.fail("compiled pallas_triton tests need a GPU backend (run `pytest -m gpu` on the device)")


def random_inputs(seed: int, B: int, K: int, G: int, H: int, S: int, dtype):
  """Standard-normal q [B, K, G, H], k / v [B, K, S, H] in dtype (never zeros)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, K, G, H), np.float32)
  k = rng.standard_normal((B, K, S, H), np.float32)
  v = rng.standard_normal((B, K, S, H), np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def oracle(q_BKGH, k_BKSH, v_BKSH, valid_BKS) -> np.ndarray:
  """float64 loop over (b, k): softmax(q k^T / sqrt(H)) v over the valid keys; zeros if none."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q_BKGH, k_BKSH, v_BKSH))
  B, K, G, H = q.shape
  out = np.zeros((B, K, G, H))
  for b in range(B):
    for h in range(K):
      keep = np.asarray(valid_BKS[b, h], bool)
      if not keep.any():
        continue
      s = q[b, h] @ k[b, h, keep].T / np.sqrt(H)
      p = np.exp(s - s.max(axis=-1, keepdims=True))
      out[b, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[b, h, keep]
  return out


def length_valid(lengths, K: int, S: int) -> np.ndarray:
  """bool [B, K, S]: position < length."""
  valid = np.arange(S)[None, :] < np.asarray(lengths)[:, None]
  return np.repeat(valid[:, None, :], K, axis=1)


def lower_for_cuda(fn, *args) -> str:
  """StableHLO text of fn lowered for CUDA, built on any host (no GPU needed).

  This runs the whole Pallas -> Triton IR lowering, so unsupported primitives and non-power-of-2
  tiles fail on CPU CI already; only Triton's own compilation to PTX is left for `pytest -m gpu`.
  """
  from jax import export
  triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton_call])(*args)
  return exported.mlir_module()
