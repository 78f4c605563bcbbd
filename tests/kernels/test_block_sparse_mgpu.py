"""The Pallas Mosaic GPU block-sparse attention forward (`pallas_mosaic_gpu`): in the Mosaic GPU
interpreter (producer and consumer warpgroups, TMA copies and barriers; dots in place of the
wgmmas) against the float64 loop, its lse against the masked log-sum-exp, odd numbers of query
blocks, ragged lengths, per-head and per-group indices, rows that see no key; gradients through
the Triton backward and through the Mosaic GPU backward kernels (`pallas_mosaic_gpu_bwd`, also
against the reference gradients directly); the compiled paths lowered for CUDA on the CPU;
refusals. The schedule
options (`overlap_qk`, `pingpong`) the same ways, with the two consumers of a program given very
different step counts (the ping-pong's empty meetings), under a watchdog that fails a run
that deadlocks (the interpreter would wait forever). `pair_blocks` (two key blocks a step) alone
and with each schedule, with odd and even live-slot counts, unequal K / V rings, and shared
memory that starts as NaN (an odd count's empty half must not reach the output). On a GPU
(`pytest -m gpu`): the wgmma kernels against the XLA backend at scale, and each schedule
against the default and XLA."""

import contextlib
import faulthandler
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (block_sparse_attention,
                                                   block_sparse_attention_reference)
from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu as mgpu
from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu_bwd as mbwd
from pallas_kernels.dispatch import NotSupported, lowering_for

from .test_block_sparse_attention import check_at_scale, oracle, rand_qkv, random_indices

BS = 64
# (overlap_qk, pingpong): the schedule options of MosaicGPUConfig
SCHEDULES = [(True, False), (False, True), (True, True)]
SCHEDULE_IDS = ["overlap_qk", "pingpong", "overlap_qk+pingpong"]
# (overlap_qk, pingpong) with pair_blocks: alone and with each schedule
PAIR_SCHEDULES = [(False, False), *SCHEDULES]
PAIR_IDS = ["pair_blocks", *(f"pair_blocks+{name}" for name in SCHEDULE_IDS)]


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


def edge_indices(seed, B, Hi, nb):
  """Random sparse block sets (some above the diagonal) with, in the first row of the first
  sequence, a query block that sees only a block above the diagonal (no key), and a query
  block with no live slot beside one with every causal block (a pair whose step counts differ
  most)."""
  idx = random_indices(seed, B, Hi, nb, nb)
  idx[0, 0, 1] = -1
  idx[0, 0, 1, 0] = 2                           # only a block above the diagonal: no key
  idx[0, 0, nb - 2] = -1                        # no live slot ...
  idx[0, 0, nb - 1] = np.arange(nb)             # ... beside every causal block
  return idx


def assert_matches_loop(q, k, v, idx, lengths, o, lse):
  """o and lse of a forward over `edge_indices` sets against the float64 loop; the rows with no
  key are 0 (o) and +inf (lse)."""
  T, nb = q.shape[1], idx.shape[2]
  want = oracle(q, k, v, idx, lengths, BS)
  np.testing.assert_allclose(o, want, atol=2e-2, rtol=2e-2)
  assert np.all(o[0, BS:2 * BS, 0] == 0) and np.all(o[0, (nb - 2) * BS:(nb - 1) * BS, 0] == 0)
  ref = lse_reference(q, k, idx, lengths, BS)
  fin = np.isfinite(ref)
  assert np.array_equal(np.isfinite(lse[..., :T]), fin)
  np.testing.assert_allclose(lse[..., :T][fin], ref[fin], atol=2e-2, rtol=1e-2)


_CASE_A = (1, 250, 4, 2, 64, False, (237,), 2)     # 4 query blocks (two pairs), ragged, GQA
_CASE_B = (2, 150, 2, 1, 128, True, (150, 70), 1)  # 3 (an odd pair), per-group rows, one buffer


@pytest.mark.parametrize("overlap_qk,pingpong,B,T,N,K,H,per_group,lengths,depth", [
    # the default suite runs both schedules together; each alone is slow-marked
    *(pytest.param(*sched, *_CASE_A, id=f"{name}-A",
                   marks=() if sched == (True, True) else pytest.mark.slow)
      for sched, name in zip(SCHEDULES, SCHEDULE_IDS)),
    # one buffer (the prefetch waits): slow-marked too, the GPU tests run it compiled
    pytest.param(True, False, *_CASE_B, id="overlap_qk-B", marks=pytest.mark.slow),
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
  idx = edge_indices(T + B, B, K if per_group else N, nb)
  lengths = np.asarray(lengths, np.int32)
  with deadlock_guard():
    o, lse = mgpu.forward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=BS,
                          depth=depth, overlap_qk=overlap_qk, pingpong=pingpong, interpret=True)
    o, lse = np.asarray(o, np.float32), np.asarray(lse)
  assert_matches_loop(q, k, v, idx, lengths, o, lse)


def pair_cases():
  """(overlap_qk, pingpong, case, K depth, V depth) of the pair_blocks interpreter tests: case A
  with unequal rings (one V buffer, or with overlap_qk + pingpong one K buffer, the deadlock-free
  way round), case B with the rings `fit_depths` gives H=128."""
  for (ov, pp), name in zip(PAIR_SCHEDULES, PAIR_IDS):
    kd, vd = (1, 2) if ov and pp else (2, 1)
    # the default suite runs pair_blocks with both schedules (plain pair_blocks against the loop:
    # test_interpret_pair_blocks_read_no_uninitialised_memory)
    fast = ov and pp
    yield pytest.param(ov, pp, *_CASE_A[:-1], kd, vd, id=f"{name}-A",
                       marks=() if fast else pytest.mark.slow)
    kd, vd = mgpu.fit_depths(128, BS, 2, jnp.bfloat16, keep_v=ov and pp)
    yield pytest.param(ov, pp, *_CASE_B[:-1], kd, vd, id=f"{name}-B", marks=pytest.mark.slow)


def pair_indices(seed, B, Hi, nb):
  """Random sparse sets (test_interpret_schedules_match_the_loop's rows) and in row 1 of the
  first sequence fixed odd and even live counts: 1 slot (the diagonal), 2, then an odd count
  ending below the diagonal, and 3 ending on it (the last pair half empty)."""
  idx = edge_indices(seed, B, Hi, nb)
  if Hi > 1:
    for i, row in enumerate([[0], [0, 1], [1], [0, 2, 3]][:nb]):
      idx[0, 1, i] = -1
      idx[0, 1, i, :len(row)] = row
  return idx


@pytest.mark.parametrize("overlap_qk,pingpong,B,T,N,K,H,per_group,lengths,depth,v_depth",
                         list(pair_cases()))
def test_interpret_pair_blocks_match_the_loop(overlap_qk, pingpong, B, T, N, K, H, per_group,
                                              lengths, depth, v_depth):
  """pair_blocks (alone and with each schedule) against the float64 loop, o and lse: the
  schedule tests' random sets and empty / full rows, and odd and even live counts (an odd one's
  last step copies its block into both halves and masks the second)."""
  q, k, v = rand_qkv(T + H + 2, B, T, N, K, H, jnp.bfloat16)
  nb = -(-T // BS)
  idx = pair_indices(T + B + 1, B, K if per_group else N, nb)
  lengths = np.asarray(lengths, np.int32)
  with deadlock_guard():
    o, lse = mgpu.forward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=BS,
                          depth=depth, v_depth=v_depth, overlap_qk=overlap_qk,
                          pingpong=pingpong, pair_blocks=True, interpret=True)
    o, lse = np.asarray(o, np.float32), np.asarray(lse)
  assert_matches_loop(q, k, v, idx, lengths, o, lse)


@pytest.mark.parametrize("overlap_qk,pingpong", [
    (False, False),
    pytest.param(True, True, marks=pytest.mark.slow)],
    ids=["pair_blocks", "pair_blocks+overlap_qk+pingpong"])
def test_interpret_pair_blocks_read_no_uninitialised_memory(monkeypatch, overlap_qk, pingpong):
  """With shared memory allocated as NaN and reads past a buffer refused (T a multiple of the
  block, so no TMA read is ragged), the output is finite and the loop's: every row's odd last
  step fills its empty half with a real block, and no buffer is read before a copy lands."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  from pallas_kernels import mgpu_util
  poisoned = InterpretGPUParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
  monkeypatch.setattr(mgpu_util, "interpret_params", lambda interpret: poisoned)
  mgpu.forward.clear_cache()                    # no trace made with the zero-filled settings
  B, T, N, K, H = 1, 192, 2, 1, 64
  q, k, v = rand_qkv(41, B, T, N, K, H, jnp.bfloat16)
  idx = np.full((B, N, 3, 3), -1, np.int32)
  idx[0, 0] = [[0, -1, -1], [0, -1, -1], [0, 1, 2]]     # odd counts, one in the first step
  idx[0, 1] = [[0, -1, -1], [0, 1, -1], [1, 2, -1]]     # 1, 2, 2
  lengths = np.asarray([181], np.int32)
  try:
    with deadlock_guard():
      o, lse = mgpu.forward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=BS,
                            depth=1, v_depth=2, overlap_qk=overlap_qk, pingpong=pingpong,
                            pair_blocks=True, interpret=True)
      o, lse = np.asarray(o, np.float32), np.asarray(lse)
  finally:
    mgpu.forward.clear_cache()
  assert np.all(np.isfinite(o))
  np.testing.assert_allclose(o, oracle(q, k, v, idx, lengths, BS), atol=2e-2, rtol=2e-2)
  ref = lse_reference(q, k, idx, lengths, BS)
  fin = np.isfinite(ref)
  assert np.array_equal(np.isfinite(lse), fin)
  np.testing.assert_allclose(lse[fin], ref[fin], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("pair_blocks", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["schedules", "pair_blocks"])   # both set overlap_qk and pingpong
def test_interpret_config_reaches_the_kernel(pair_blocks):
  """MosaicGPUConfig's schedule options through `block_sparse_attention` (the custom_vjp's
  static launch tuple, pair_blocks' ring depths) give the loop's output."""
  B, T, N, K, H = 1, 130, 2, 1, 64
  q, k, v = rand_qkv(11, B, T, N, K, H, jnp.bfloat16)
  idx = random_indices(12, B, N, 3, 3, causal_only=True)
  lengths = np.asarray([130], np.int32)
  cfg = mgpu.MosaicGPUConfig(overlap_qk=True, pingpong=True, pair_blocks=pair_blocks)
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


def reference_grads(q, k, v, idx, lengths, do):
  """float32 (dq, dk, dv) of the masked dense reference for the cotangent do."""
  f = lambda q, k, v: block_sparse_attention_reference(q, k, v, jnp.asarray(idx),
                                                       jnp.asarray(lengths), block_size=BS)
  _, vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in (q, k, v)))
  return vjp(do.astype(jnp.float32))


@pytest.mark.parametrize("B,T,N,K,H,per_group,lengths,depth", [
    (1, 130, 2, 1, 64, False, (121,), 2),       # 3 query blocks (an odd pair), GQA, ragged
    pytest.param(1, 250, 4, 2, 64, False, (237,), 2, marks=pytest.mark.slow),   # 4 blocks
    pytest.param(2, 150, 2, 1, 128, True, (150, 70), 1, marks=pytest.mark.slow),
])
def test_interpret_mosaic_backward_matches_the_reference(B, T, N, K, H, per_group, lengths,
                                                         depth):
  """The Mosaic GPU dq and dk / dv kernels, from the forward's o and lse, against the gradients
  of the masked dense reference: rows with no key (a block above the diagonal only, a query
  block with no live slot beside one with every causal block), ragged lengths, GQA sums over
  the group, per-head and per-group index rows, one and two ring buffers."""
  q, k, v = rand_qkv(T + H + 1, B, T, N, K, H, jnp.bfloat16)
  nb = -(-T // BS)
  idx = edge_indices(B + H, B, K if per_group else N, nb)
  lengths = np.asarray(lengths, np.int32)
  do = jnp.asarray(np.random.default_rng(T).standard_normal((B, T, N, H)), jnp.bfloat16)
  o, lse = mgpu.forward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), block_size=BS,
                        depth=2, interpret=True)
  with deadlock_guard():
    got = mbwd.backward(q, k, v, jnp.asarray(idx), jnp.asarray(lengths), o, lse, do,
                        block_size=BS, depth=depth, interpret=True)
  for name, a, b in zip(("dq", "dk", "dv"), got, reference_grads(q, k, v, idx, lengths, do)):
    assert a.shape == b.shape and a.dtype == jnp.bfloat16, name
    a, b = np.asarray(a, np.float32), np.asarray(b)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 1e-2, (name, rel)
    np.testing.assert_allclose(a, b, atol=3e-2, rtol=3e-2, err_msg=name)


@pytest.mark.slow
def test_interpret_gradients_through_the_mosaic_backward():
  """`mosaic_backward` reaches the custom_vjp: jax.grad through the public entry point."""
  B, T, N, K, H = 1, 128, 2, 1, 64
  q, k, v = rand_qkv(3, B, T, N, K, H, jnp.bfloat16)
  idx = random_indices(4, B, N, 2, 2, causal_only=True)
  lengths = np.asarray([120], np.int32)
  w = jnp.asarray(np.random.default_rng(5).standard_normal((B, T, N, H)), jnp.bfloat16)
  cfg = mgpu.MosaicGPUConfig(mosaic_backward=True)
  f = lambda q, k, v: block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(lengths),
                                             block_size=BS, implementation="pallas_mosaic_gpu",
                                             interpret=True, config=cfg)
  got = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)
                                         * w.astype(jnp.float32)), (0, 1, 2))(q, k, v)
  for a, b in zip(got, reference_grads(q, k, v, idx, lengths, w)):
    rel = np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b)) / np.linalg.norm(b)
    assert rel < 1e-2, rel


def test_backward_choice_and_refusals(monkeypatch):
  bf16 = jnp.bfloat16
  assert mbwd.bwd_depth(64, BS, bf16) == 4 and mbwd.bwd_depth(128, BS, bf16) == 2
  assert mbwd.bwd_smem_bytes(128, BS, 2, bf16) <= 227 * 1024
  assert "H=256" in mbwd.bwd_supported(256, BS, bf16)
  assert "float32" in mbwd.bwd_supported(128, BS, jnp.float32)
  assert "block_size=128" in mbwd.bwd_supported(128, 128, bf16)
  with pytest.raises(ValueError, match="backward_depth"):
    mgpu.MosaicGPUConfig(backward_depth=0).validate()
  with pytest.raises(ValueError, match="mosaic_backward"):
    mgpu.MosaicGPUConfig(mosaic_backward=1).validate()
  on = mgpu.MosaicGPUConfig(mosaic_backward=True)
  assert mgpu._backward_launch(on, BS, 128, bf16, True) == ("pallas_mosaic_gpu", 2)
  assert mgpu._backward_launch(on, BS, 256, bf16, True)[0] == "pallas_triton"   # refused: H 256
  assert mgpu._backward_launch(mgpu.MosaicGPUConfig(), BS, 128, bf16, True)[0] == "pallas_triton"
  # without Pallas Triton the Mosaic GPU kernels run regardless, where they take the shapes
  monkeypatch.setitem(sys.modules, "pallas_kernels.block_sparse_attention.pallas_triton", None)
  assert mgpu._backward_launch(mgpu.MosaicGPUConfig(), BS, 64, bf16, True)[0] == "pallas_mosaic_gpu"
  with pytest.raises(NotSupported, match="Pallas Triton ones are missing"):
    mgpu._backward_launch(mgpu.MosaicGPUConfig(), BS, 256, bf16, True)


@pytest.mark.parametrize("H", [64, 128])
def test_backward_lowers_for_cuda_with_no_loop_barrier(H):
  """Both backward kernels lowered for CUDA on the CPU (layouts, transforms, Mosaic's own
  shared-memory check at the picked depth); no warpgroup barrier in either main loop (no
  shared-memory store there: Pallas adds none)."""
  from ._oracle import loop_barriers, mosaic_gpu_modules
  S = jax.ShapeDtypeStruct
  B, T, N, K = 1, 1000, 8, 2
  nb = -(-T // BS)
  bf16 = jnp.bfloat16
  args = (S((B, T, N, H), bf16), S((B, T, K, H), bf16), S((B, T, K, H), bf16),
          S((B, N, nb, 6), jnp.int32), S((B,), jnp.int32), S((B, T, N, H), bf16),
          S((B, N, nb * BS), jnp.float32), S((B, T, N, H), bf16))
  depth = mbwd.bwd_depth(H, BS, bf16)
  mods = mosaic_gpu_modules(jax.jit(lambda *a: mbwd.backward(*a, block_size=BS, depth=depth)),
                            *args)
  assert len(mods) == 2
  for text in mods:
    assert text.count("wgmma") >= 4
    assert loop_barriers(text) == 0


@pytest.mark.parametrize("pair_blocks", [False, True], ids=["", "pair_blocks"])
@pytest.mark.parametrize("overlap_qk,pingpong", [(False, False), *SCHEDULES],
                         ids=["default", *SCHEDULE_IDS])
@pytest.mark.parametrize("H", [64, 128, 256])
def test_compiled_kernel_lowers_for_cuda(H, overlap_qk, pingpong, pair_blocks):
  """The wgmma / TMA kernel's Pallas -> Mosaic GPU lowering (layouts, barriers, transforms,
  and Mosaic's own shared-memory check at the depths the wrapper picks), checked on the CPU,
  with each schedule option, alone and with pair_blocks; only its compilation to PTX is left
  for `pytest -m gpu`."""
  from jax import export
  S = jax.ShapeDtypeStruct
  B, T, N, K = 1, 1000, 8, 2
  nb = -(-T // BS)
  args = (S((B, T, N, H), jnp.bfloat16), S((B, T, K, H), jnp.bfloat16),
          S((B, T, K, H), jnp.bfloat16), S((B, N, nb, 6), jnp.int32), S((B,), jnp.int32))
  depth = v_depth = mgpu.fit_depth(H, BS, {64: 4, 128: 2, 256: 1}[H], jnp.bfloat16)
  fit = (depth, v_depth)
  if pair_blocks:
    fit = mgpu.fit_depths(H, BS, {64: 4, 128: 2, 256: 1}[H], jnp.bfloat16,
                          keep_v=overlap_qk and pingpong)
  if fit is None or (overlap_qk and pingpong and fit[1] < 2):
    # a combination that cannot fit or would deadlock: the public entry point refuses it
    # before anything is built (test_shared_memory_and_refusals checks the messages)
    q, k, v = rand_qkv(2, 1, 64, 2, 1, H, jnp.bfloat16)
    cfg = mgpu.MosaicGPUConfig(overlap_qk=overlap_qk, pingpong=pingpong, pair_blocks=pair_blocks)
    with pytest.raises(NotSupported):
      mgpu.block_sparse_attention(q, k, v, jnp.zeros((1, 2, 1, 1), jnp.int32),
                                  jnp.asarray([64], jnp.int32), block_size=BS, interpret=True,
                                  config=cfg)
    return
  depth, v_depth = fit
  fn = jax.jit(lambda q, k, v, i, n: mgpu.forward(q, k, v, i, n, block_size=BS, depth=depth,
                                                  v_depth=v_depth, overlap_qk=overlap_qk,
                                                  pingpong=pingpong, pair_blocks=pair_blocks))
  with lowering_for("gpu"):
    text = export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args).mlir_module()
  assert "mosaic_gpu" in text


def test_auto_on_a_gpu_is_the_mosaic_forward_where_it_applies():
  """`auto` lowered for CUDA: the Mosaic GPU forward for bf16 64-token blocks; the Triton
  kernels for 16-token blocks and float32, which the Mosaic forward refuses."""
  from jax import export
  idx = jnp.asarray(random_indices(13, 1, 2, 2, 2))
  for dtype, bs, T, kernel in ((jnp.bfloat16, 64, 128, "mosaic"), (jnp.bfloat16, 16, 32, "triton"),
                               (jnp.float32, 64, 128, "triton")):
    q, k, v = rand_qkv(12, 1, T, 2, 1, 64, dtype)
    fn = jax.jit(lambda q, k, v, bs=bs: block_sparse_attention(q, k, v, idx, block_size=bs))
    with lowering_for("gpu"):
      text = export.export(fn, platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"),
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, k, v).mlir_module()
    assert ("mosaic_gpu" in text) == (kernel == "mosaic"), (dtype, bs)
    assert ("xla.gpu.triton" in text) == (kernel == "triton"), (dtype, bs)


def test_shared_memory_and_refusals():
  bf16 = jnp.bfloat16
  assert mgpu.fit_depth(64, 64, 4, bf16) == 4
  # 2 x 16 KB Q + 2 x 2 x 2 x 16 KB K / V; 3 buffers (232,656 bytes as Mosaic GPU lowers it,
  # with its 2 KiB reduction scratch and the barriers) exceed the SM's 232,448
  assert mgpu.fit_depth(128, 64, 4, bf16) == 2
  assert mgpu.smem_bytes(128, 64, 2, bf16) <= 227 * 1024 < mgpu.smem_bytes(128, 64, 3, bf16)
  assert mgpu.fit_depth(256, 64, 4, bf16) == 1
  # pair_blocks: [128, H] buffers, no reduction scratch; H=128 fits 2 + 1 (or 1 + 2) buffers
  assert mgpu.fit_depths(64, 64, 4, bf16) == (3, 3)
  assert mgpu.fit_depths(128, 64, 2, bf16) == (2, 1)
  assert mgpu.fit_depths(128, 64, 2, bf16, keep_v=True) == (1, 2)
  assert mgpu.fit_depths(256, 64, 1, bf16) is None
  assert (mgpu.smem_bytes(128, 64, 2, bf16, v_depth=1, blocks_per_step=2) <= 227 * 1024
          < mgpu.smem_bytes(128, 64, 2, bf16, v_depth=2, blocks_per_step=2))
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
  with pytest.raises(ValueError, match="pair_blocks"):
    mgpu.MosaicGPUConfig(pair_blocks="yes").validate()
  assert mgpu.MosaicGPUConfig() == mgpu.MosaicGPUConfig(overlap_qk=False, pingpong=False,
                                                        pair_blocks=False)
  # H=256 has one buffer a consumer: the overlap's prefetch and the ping-pong would deadlock
  q2, k2, v2 = rand_qkv(1, 1, 64, 2, 1, 256, bf16)
  with pytest.raises(NotSupported, match="pipeline_depth >= 2"):
    mgpu.block_sparse_attention(q2, k2, v2, jnp.zeros((1, 2, 1, 1), jnp.int32), n,
                                block_size=64, interpret=True,
                                config=mgpu.MosaicGPUConfig(overlap_qk=True, pingpong=True))
  # pair_blocks: H=256's [128, 256] K and V buffers do not fit; one V buffer with both schedules
  with pytest.raises(NotSupported, match="pair_blocks with H=256"):
    mgpu.block_sparse_attention(q2, k2, v2, jnp.zeros((1, 2, 1, 1), jnp.int32), n,
                                block_size=64, interpret=True,
                                config=mgpu.MosaicGPUConfig(pair_blocks=True))
  q1, k1, v1 = (x.astype(bf16) for x in (q, k, v))
  with pytest.raises(NotSupported, match="pipeline_depth >= 2"):
    mgpu.forward(q1, k1, v1, idx, n, block_size=64, depth=2, v_depth=1, overlap_qk=True,
                 pingpong=True, pair_blocks=True, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_forward_and_gradients_at_scale(H):
  """As the Triton kernel's test_prefill_scale: forward and gradients (the Triton backward from
  this kernel's o and lse) against the XLA backend in float32."""
  check_at_scale("pallas_mosaic_gpu", H, BS)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_mosaic_backward_at_scale(H):
  """The Mosaic GPU backward compiled: forward and gradients against the XLA backend in
  float32, as test_gpu_forward_and_gradients_at_scale."""
  check_at_scale("pallas_mosaic_gpu", H, BS, config=mgpu.MosaicGPUConfig(mosaic_backward=True))


@pytest.mark.gpu
@pytest.mark.parametrize("overlap_qk,pingpong,pair_blocks", [
    *((*sched, False) for sched in SCHEDULES), *((*sched, True) for sched in PAIR_SCHEDULES)],
    ids=[*SCHEDULE_IDS, *PAIR_IDS])
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_schedules_match_the_default_and_xla(H, overlap_qk, pingpong, pair_blocks):
  """Each schedule option compiled (wgmma, async groups, the rendezvous barrier; pair_blocks'
  [64, 128] scores, K = 128 PV and unequal rings) against the default schedule (o and lse
  within bf16 rounding; pair_blocks sums the same keys in another order) and the XLA backend in
  float32 (2% relative L2), at 2 x 2000 ragged tokens, 16 / 4 heads, random causal block sets
  of 0..all blocks per query block (step counts, odd and even, differing within a pair)."""
  B, T, N, K = 2, 2000, 16, 4
  q, k, v = rand_qkv(H + 7, B, T, N, K, H, jnp.bfloat16)
  nb = -(-T // BS)
  idx = jnp.asarray(random_indices(H, B, N, nb, nb, causal_only=True))
  lengths = jnp.asarray([2000, 1337], jnp.int32)
  depth = mgpu.fit_depth(H, BS, {64: 4, 128: 2}[H], jnp.bfloat16)
  base_o, base_lse = mgpu.forward(q, k, v, idx, lengths, block_size=BS, depth=depth)
  v_depth = depth
  if pair_blocks:
    depth, v_depth = mgpu.fit_depths(H, BS, {64: 4, 128: 2}[H], jnp.bfloat16,
                                     keep_v=overlap_qk and pingpong)
  o, lse = mgpu.forward(q, k, v, idx, lengths, block_size=BS, depth=depth, v_depth=v_depth,
                        overlap_qk=overlap_qk, pingpong=pingpong, pair_blocks=pair_blocks)
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(base_o, np.float32),
                             atol=1e-2, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(base_lse), atol=1e-3, rtol=1e-3)
  want = block_sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), idx, lengths,
                                block_size=BS, implementation="xla")
  rel = (np.linalg.norm(np.asarray(o, np.float32) - np.asarray(want))
         / np.linalg.norm(np.asarray(want)))
  assert rel < 2e-2, rel
