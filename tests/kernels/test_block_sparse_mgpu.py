"""The Pallas Mosaic GPU block-sparse attention forward (`pallas_mosaic_gpu`): in the Mosaic GPU
interpreter (producer and consumer warpgroups, TMA copies and barriers; dots in place of the
wgmmas) against the float64 loop, its lse against the masked log-sum-exp, odd numbers of query
blocks, ragged lengths, per-head and per-group indices, rows that see no key; gradients through
the Triton backward; the compiled path lowered for CUDA on the CPU; refusals. The schedule
options (`overlap_qk`, `pingpong`) the same ways, with the two consumers of a program given very
different step counts (the ping-pong's empty meetings), under a watchdog that fails a run
that deadlocks (the interpreter would wait forever). On a GPU (`pytest -m gpu`): the wgmma
kernel against the XLA backend at scale, and each schedule against the default and XLA."""

import contextlib
import faulthandler

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (block_sparse_attention,
                                                   block_sparse_attention_reference)
from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu as mgpu
from pallas_kernels.dispatch import NotSupported, lowering_for

from .test_block_sparse_attention import check_at_scale, oracle, rand_qkv, random_indices

BS = 64
# (overlap_qk, pingpong): the schedule options of MosaicGPUConfig
SCHEDULES = [(True, False), (False, True), (True, True)]
SCHEDULE_IDS = ["overlap_qk", "pingpong", "overlap_qk+pingpong"]


@contextlib.contextmanager
def deadlock_guard(seconds=600):
  """Ends the test process with every thread's traceback if the body runs past `seconds`: a
  kernel whose barriers can never all complete hangs the interpreter instead of failing."""
  faulthandler.dump_traceback_later(seconds, exit=True)
  try:
    yield
  finally:
    faulthandler.cancel_dump_traceback_later()


def lse_reference(q, k, idx, lengths, bs):
  """float64 [B, N, T]: log-sum-exp of each valid row's visible selected logits (+inf for rows
  past the length or seeing no key)."""
  q, k = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k))
  B, T, N, H = q.shape
  G, hG = N // k.shape[2], N // idx.shape[1]
  out = np.full((B, N, T), np.inf)
  for b in range(B):
    for n in range(N):
      for t in range(min(int(lengths[b]), T)):
        keys = [s for j in idx[b, n // hG, t // bs] if j >= 0
                for s in range(j * bs, (j + 1) * bs) if s <= t]
        if keys:
          s = k[b, keys, n // G] @ q[b, t, n] / np.sqrt(H)
          out[b, n, t] = s.max() + np.log(np.exp(s - s.max()).sum())
  return out


@pytest.mark.parametrize("B,T,N,K,H,per_group,lengths", [
    (1, 150, 2, 1, 64, False, (131,)),          # 3 query blocks (an odd pair), ragged
    pytest.param(2, 256, 4, 2, 128, True, (256, 70), marks=pytest.mark.slow),
])
def test_interpret_forward_matches_the_loop(B, T, N, K, H, per_group, lengths):
  q, k, v = rand_qkv(T + H, B, T, N, K, H, jnp.bfloat16)
  nb = -(-T // BS)
  idx = random_indices(B + T, B, K if per_group else N, nb, 3)
  idx[0, 0, 1] = [2, -1, -1]                    # only a block above the diagonal: no key
  lengths = np.asarray(lengths, np.int32)
  o, lse = mgpu.forward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=BS, depth=2,
                        interpret=True)
  assert o.shape == (B, T, N, H) and o.dtype == jnp.bfloat16 and lse.shape == (B, N, nb * BS)
  want = oracle(q, k, v, idx, lengths, BS)
  np.testing.assert_allclose(np.asarray(o, np.float32), want, atol=2e-2, rtol=2e-2)
  assert np.all(np.asarray(o, np.float32)[0, BS:2 * BS, 0] == 0)      # the row with no key
  got = np.asarray(lse)[..., :T]
  ref = lse_reference(q, k, idx, lengths, BS)
  fin = np.isfinite(ref)
  assert np.array_equal(np.isfinite(got), fin)
  np.testing.assert_allclose(got[fin], ref[fin], atol=2e-2, rtol=1e-2)


_CASE_A = (1, 250, 4, 2, 64, False, (237,), 2)     # 4 query blocks (two pairs), ragged, GQA
_CASE_B = (2, 150, 2, 1, 128, True, (150, 70), 1)  # 3 (an odd pair), per-group rows, one buffer


@pytest.mark.parametrize("overlap_qk,pingpong,B,T,N,K,H,per_group,lengths,depth", [
    *(pytest.param(*sched, *_CASE_A, id=f"{name}-A") for sched, name in zip(SCHEDULES,
                                                                           SCHEDULE_IDS)),
    pytest.param(True, False, *_CASE_B, id="overlap_qk-B"),     # one buffer: the prefetch waits
    *(pytest.param(*sched, *_CASE_B, id=f"{name}-B", marks=pytest.mark.slow)
      for sched, name in zip(SCHEDULES[1:], SCHEDULE_IDS[1:])),
])
def test_interpret_schedules_match_the_loop(overlap_qk, pingpong, B, T, N, K, H, per_group,
                                            lengths, depth):
  """Each schedule option against the float64 loop (o and lse): random sparse block sets
  (some above the diagonal), a query block with no live slot beside one with every causal
  block (a pair whose step counts differ most), a row with no visible key, and a query block
  past the last (odd pairs)."""
  if overlap_qk and pingpong and depth < 2:
    depth = 2                                   # one buffer is refused (test_shared_memory...)
  q, k, v = rand_qkv(T + H + 1, B, T, N, K, H, jnp.bfloat16)
  nb = -(-T // BS)
  idx = random_indices(T + B, B, K if per_group else N, nb, nb)
  idx[0, 0, 1] = -1
  idx[0, 0, 1, 0] = 2                           # only a block above the diagonal: no key
  idx[0, 0, nb - 2] = -1                        # no live slot ...
  idx[0, 0, nb - 1] = np.arange(nb)             # ... beside every causal block
  lengths = np.asarray(lengths, np.int32)
  with deadlock_guard():
    o, lse = mgpu.forward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=BS,
                          depth=depth, overlap_qk=overlap_qk, pingpong=pingpong, interpret=True)
    o, lse = np.asarray(o, np.float32), np.asarray(lse)
  want = oracle(q, k, v, idx, lengths, BS)
  np.testing.assert_allclose(o, want, atol=2e-2, rtol=2e-2)
  assert np.all(o[0, BS:2 * BS, 0] == 0) and np.all(o[0, (nb - 2) * BS:(nb - 1) * BS, 0] == 0)
  ref = lse_reference(q, k, idx, lengths, BS)
  fin = np.isfinite(ref)
  assert np.array_equal(np.isfinite(lse[..., :T]), fin)
  np.testing.assert_allclose(lse[..., :T][fin], ref[fin], atol=2e-2, rtol=1e-2)


def test_interpret_config_reaches_the_kernel():
  """MosaicGPUConfig's schedule options through `block_sparse_attention` (the custom_vjp's
  static launch tuple) give the loop's output."""
  B, T, N, K, H = 1, 130, 2, 1, 64
  q, k, v = rand_qkv(11, B, T, N, K, H, jnp.bfloat16)
  idx = random_indices(12, B, N, 3, 3, causal_only=True)
  lengths = np.asarray([130], np.int32)
  cfg = mgpu.MosaicGPUConfig(overlap_qk=True, pingpong=True)
  with deadlock_guard():
    o = block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=BS,
                               implementation="pallas_mosaic_gpu", interpret=True, config=cfg)
    o = np.asarray(o, np.float32)
  np.testing.assert_allclose(o, oracle(q, k, v, idx, lengths, BS), atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_interpret_gradients_through_the_triton_backward():
  B, T, N, K, H = 1, 128, 2, 1, 64
  q, k, v = rand_qkv(3, B, T, N, K, H, jnp.bfloat16)
  idx = jnp.asarray(random_indices(4, B, N, 2, 2, causal_only=True))
  lengths = jnp.asarray([120], jnp.int32)
  w = jnp.asarray(np.random.default_rng(5).standard_normal((B, T, N, H)), jnp.float32)

  def grads(f, *x):
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w), (0, 1, 2))(*x)

  got = grads(lambda q, k, v: block_sparse_attention(
      q, k, v, idx, lengths, block_size=BS, implementation="pallas_mosaic_gpu", interpret=True),
      q, k, v)
  want = grads(lambda q, k, v: block_sparse_attention_reference(q, k, v, idx, lengths,
                                                                block_size=BS),
               *(x.astype(jnp.float32) for x in (q, k, v)))
  for a, b in zip(got, want):
    rel = np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b)) / np.linalg.norm(b)
    assert rel < 3e-2, rel


@pytest.mark.parametrize("overlap_qk,pingpong", [(False, False), *SCHEDULES],
                         ids=["default", *SCHEDULE_IDS])
@pytest.mark.parametrize("H", [64, 128, 256])
def test_compiled_kernel_lowers_for_cuda(H, overlap_qk, pingpong):
  """The wgmma / TMA kernel's Pallas -> Mosaic GPU lowering (layouts, barriers, transforms),
  checked on the CPU, with each schedule option; only its compilation to PTX is left for
  `pytest -m gpu`."""
  from jax import export
  S = jax.ShapeDtypeStruct
  B, T, N, K = 1, 1000, 8, 2
  nb = -(-T // BS)
  args = (S((B, T, N, H), jnp.bfloat16), S((B, T, K, H), jnp.bfloat16),
          S((B, T, K, H), jnp.bfloat16), S((B, N, nb, 6), jnp.int32), S((B,), jnp.int32))
  depth = mgpu.fit_depth(H, BS, {64: 4, 128: 2, 256: 1}[H], jnp.bfloat16)
  if overlap_qk and pingpong and depth < 2:
    pytest.skip("refused with one buffer (test_shared_memory_and_refusals)")
  fn = jax.jit(lambda q, k, v, i, n: mgpu.forward(q, k, v, i, n, block_size=BS, depth=depth,
                                                  overlap_qk=overlap_qk, pingpong=pingpong))
  with lowering_for("gpu"):
    text = export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args).mlir_module()
  assert "mosaic_gpu" in text


def test_shared_memory_and_refusals():
  bf16 = jnp.bfloat16
  assert mgpu.fit_depth(64, 64, 4, bf16) == 4
  assert mgpu.fit_depth(128, 64, 4, bf16) == 3      # 2 x 16 KB Q + 2 x 2 x 3 x 16 KB K / V
  assert mgpu.smem_bytes(128, 64, 3, bf16) <= 227 * 1024 < mgpu.smem_bytes(128, 64, 4, bf16)
  assert mgpu.fit_depth(256, 64, 4, bf16) == 1
  q, k, v = rand_qkv(0, 1, 64, 2, 1, 64, jnp.float32)
  idx, n = jnp.zeros((1, 2, 1, 1), jnp.int32), jnp.asarray([64], jnp.int32)
  with pytest.raises(NotSupported, match="bfloat16 / float16"):
    mgpu.block_sparse_attention(q, k, v, idx, n, block_size=64, interpret=True)
  with pytest.raises(NotSupported, match="block_size=32"):
    mgpu.block_sparse_attention(q.astype(bf16), k.astype(bf16), v.astype(bf16),
                                jnp.zeros((1, 2, 2, 1), jnp.int32), n, block_size=32,
                                interpret=True)
  with pytest.raises(ValueError, match="pipeline_depth"):
    mgpu.MosaicGPUConfig(pipeline_depth=0).validate()
  with pytest.raises(ValueError, match="pingpong"):
    mgpu.MosaicGPUConfig(pingpong=1).validate()
  assert mgpu.MosaicGPUConfig() == mgpu.MosaicGPUConfig(overlap_qk=False, pingpong=False)
  # H=256 has one buffer a consumer: the overlap's prefetch and the ping-pong would deadlock
  q2, k2, v2 = rand_qkv(1, 1, 64, 2, 1, 256, bf16)
  with pytest.raises(NotSupported, match="pipeline_depth >= 2"):
    mgpu.block_sparse_attention(q2, k2, v2, jnp.zeros((1, 2, 1, 1), jnp.int32), n,
                                block_size=64, interpret=True,
                                config=mgpu.MosaicGPUConfig(overlap_qk=True, pingpong=True))


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_forward_and_gradients_at_scale(H):
  """As the Triton kernel's test_prefill_scale: forward and gradients (the Triton backward from
  this kernel's o and lse) against the XLA backend in float32."""
  check_at_scale("pallas_mosaic_gpu", H, BS)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap_qk,pingpong", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_schedules_match_the_default_and_xla(H, overlap_qk, pingpong):
  """Each schedule option compiled (wgmma, async groups, the rendezvous barrier) against the
  default schedule (same products and softmax steps: o and lse within bf16 rounding) and the
  XLA backend in float32 (2% relative L2), at 2 x 2000 ragged tokens, 16 / 4 heads, random
  causal block sets of 0..all blocks per query block (step counts differing within a pair)."""
  B, T, N, K = 2, 2000, 16, 4
  q, k, v = rand_qkv(H + 7, B, T, N, K, H, jnp.bfloat16)
  nb = -(-T // BS)
  idx = jnp.asarray(random_indices(H, B, N, nb, nb, causal_only=True))
  lengths = jnp.asarray([2000, 1337], jnp.int32)
  depth = mgpu.fit_depth(H, BS, {64: 4, 128: 2}[H], jnp.bfloat16)
  base_o, base_lse = mgpu.forward(q, k, v, idx, lengths, block_size=BS, depth=depth)
  o, lse = mgpu.forward(q, k, v, idx, lengths, block_size=BS, depth=depth,
                        overlap_qk=overlap_qk, pingpong=pingpong)
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(base_o, np.float32),
                             atol=1e-2, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(base_lse), atol=1e-3, rtol=1e-3)
  want = block_sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), idx, lengths,
                                block_size=BS, implementation="xla")
  rel = (np.linalg.norm(np.asarray(o, np.float32) - np.asarray(want))
         / np.linalg.norm(np.asarray(want)))
  assert rel < 2e-2, rel
