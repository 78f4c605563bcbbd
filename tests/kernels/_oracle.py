"""Shared helpers of the kernel tests: float64 numpy oracles, random inputs (never zeros), chex
tolerances per dtype, and `BackendBase`: each op's test base subclasses it, and each backend
subclasses the op's base once (interpreted on CPU; compiled under `pytest -m gpu`)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import lowering_for

# chex tolerances per dtype: f32 kernels differ from float64 only by summation order; bf16 by the
# bf16 rounding of the probabilities fed to the PV dot and of the output.
TOLERANCES = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=1e-2, atol=1e-2),
              jnp.float16: dict(rtol=1e-2, atol=1e-2)}


def generate_from_class(metafunc) -> None:
  """pytest_generate_tests for the per-op test bases: a test argument named like a class
  attribute in CLASS_PARAMS is parametrised over that attribute of the (backend) subclass, so each
  backend lists the shapes and dtypes it supports.

  An interpreted backend (CPU, the default suite) whose test takes both `dtype` and `case` runs
  each case in one dtype, the dtypes taken in turn down the cases (every dtype still meets several
  ragged shapes; the interpreter is what makes the full product slow). Compiled backends, and
  `pytest --full-grid`, run the full product."""
  cls = metafunc.cls
  if cls is None:
    return
  args = {arg: getattr(cls, attr) for arg, attr in CLASS_PARAMS.items()
          if arg in metafunc.fixturenames and hasattr(cls, attr)}
  dtypes, cases = args.get("dtype"), args.get("case")
  if (getattr(cls, "INTERPRET", False) and dtypes is not None and cases is not None
      and len(cases) >= len(dtypes) > 1 and not metafunc.config.getoption("full_grid", False)):
    pairs = [(dtypes[i % len(dtypes)], c) for i, c in enumerate(cases)]
    metafunc.parametrize("dtype,case", pairs, ids=[f"{_id(d)}-{_id(c)}" for d, c in pairs])
    del args["dtype"], args["case"]
  for arg, values in args.items():
    metafunc.parametrize(arg, values, ids=[_id(v) for v in values])


CLASS_PARAMS = {"dtype": "DTYPES", "case": "CASES", "block_size": "BLOCK_SIZES"}


def _id(v) -> str:
  if isinstance(v, tuple):
    return "-".join(_id(x) for x in v)
  if isinstance(v, list):
    return "L" + ".".join(str(x) for x in v)
  try:
    return jnp.dtype(v).name
  except TypeError:
    return str(v)


class BackendBase:
  """What every per-op test base shares: which backend runs, whether interpreted, and a check
  that a compiled GPU backend really has a GPU (a failure, not a skip, elsewhere)."""
  IMPLEMENTATION = "xla"
  INTERPRET = False
  GPU = False          # compiled on a GPU: the subclass is marked `pytest.mark.gpu`

  def setup_method(self):
    if self.GPU and jax.default_backend() != "gpu":
      pytest.fail(f"compiled {self.IMPLEMENTATION} tests need a GPU backend (run `pytest -m gpu` "
                  "on the device)")

  @property
  def kw(self) -> dict:
    return dict(implementation=self.IMPLEMENTATION, interpret=self.INTERPRET)


def check_close(out, want, dtype) -> None:
  chex.assert_trees_all_close(np.asarray(jnp.asarray(out).astype(jnp.float32)),
                              np.asarray(want, np.float64).astype(np.float32), **TOLERANCES[dtype])


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
  with lowering_for("gpu"):
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton_call])(*args)
  return exported.mlir_module()


def mosaic_gpu_modules(fn, *args) -> list[str]:
  """The MLIR text of every Mosaic GPU kernel in fn (jitted) lowered for CUDA on any host: the
  modules as Mosaic GPU hands them to its compiler (thread-level ops: arithmetic, shared-memory
  loads / stores, inline PTX such as `bar.sync`), captured at their serialisation."""
  from jax import export
  from jax.experimental.mosaic.gpu import core
  if not hasattr(core, "_run_serde_pass"):
    raise AssertionError("jax.experimental.mosaic.gpu.core._run_serde_pass is gone: update "
                         "mosaic_gpu_modules to capture the kernels elsewhere")
  texts, serde = [], core._run_serde_pass

  def capture(module, *a, **k):
    texts.append(module.operation.get_asm(enable_debug_info=False))
    return serde(module, *a, **k)

  core._run_serde_pass = capture
  try:
    with lowering_for("gpu"):
      export.export(fn, platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args)
  finally:
    core._run_serde_pass = serde
  return texts


def loop_barriers(text: str) -> int:
  """Warpgroup barriers (`bar.sync`) in the body of the longest `scf.for` of a Mosaic GPU module
  (a pipelined kernel's main loop): what every loop iteration synchronises on."""
  lines = text.splitlines()
  best = (0, 0)
  for i, line in enumerate(lines):
    if "scf.for" not in line:
      continue
    depth, j = 0, i
    while True:
      depth += lines[j].count("{") - lines[j].count("}")
      j += 1
      if depth <= 0 and j > i + 1:
        break
    body = lines[i:j]
    best = max(best, (len(body), sum(l.count("bar.sync") for l in body)))
  return best[1]
