"""pallas_kernels.dispatch and pallas_kernels.tuned: how every op picks its backend and its
launch parameters, and that every op keeps working when a lowering disappears."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tuned
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.dispatch import NotSupported, Op, lowering_for, platform

from ._oracle import random_inputs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_default_order_ends_at_the_reference_and_names_are_checked():
  op = Op("decode_attention", "pallas_kernels.decode_attention",
          backends={"xla": "reference", "pallas_triton": "pallas_triton"},
          defaults={"gpu": ("pallas_triton",)})
  assert op.order(None) == op.order("auto") == ((("pallas_triton",) if platform() == "gpu" else ())
                                                + ("xla",))
  with lowering_for("gpu"):
    assert op.order(None) == ("pallas_triton", "xla")
  with lowering_for("tpu"):
    assert op.order(None) == ("xla",)
  assert op.order(("pallas_triton", "xla")) == ("pallas_triton", "xla")
  with pytest.raises(ValueError, match="implementation must be one of"):
    op.order("cuda")
  with pytest.raises(ValueError, match="at least one"):
    op.order(())


def test_refusals_are_listed_and_a_named_backend_is_not_replaced():
  """A named backend that refuses raises (no silent fallback); a sequence moves on; when none
  applies the error says why each refused."""
  q, k, v = random_inputs(0, 1, 1, 4, 80, 32, jnp.float32)     # H=80: no Triton tile
  n = jnp.asarray([5], jnp.int32)
  with pytest.raises(NotSupported, match="pallas_triton: head dim H=80"):
    decode_attention(q, k, v, n, implementation="pallas_triton", interpret=True)
  out = decode_attention(q, k, v, n, implementation=("pallas_triton", "xla"), interpret=True)
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(decode_attention(q, k, v, n, implementation="xla")))
  if platform() != "cpu":
    pytest.fail("checks refusals on the CPU; runs in the CPU suite")
  with pytest.raises(NotSupported, match=r"no implementation can take these inputs -- "
                     r"pallas_triton: .*needs a GPU.*; pallas_mosaic_tpu: .*needs a TPU"):
    decode_attention(q, k, v, n, implementation=("pallas_triton", "pallas_mosaic_tpu"),
                     interpret=False)


_WITHOUT_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None     # Pallas Triton removed from JAX
import jax, jax.numpy as jnp
from jax import export
from pallas_kernels.dispatch import lowering_for, NotSupported
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.extend_attention import extend_attention
from pallas_kernels.sparse_decode import sparse_decode_attention
from pallas_kernels.block_topk import block_topk
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.flash_attention import flash_attention
S = jax.ShapeDtypeStruct
q, kv, n = S((2, 2, 4, 128), jnp.bfloat16), S((2, 2, 512, 128), jnp.bfloat16), S((2,), jnp.int32)
idx = S((2, 2, 4), jnp.int32)
ops = {
  "decode": (lambda q, k, v, n: decode_attention(q, k, v, n), (q, kv, kv, n)),
  "extend": (lambda q, k, v, n: extend_attention(q, k, v, n), (S((2, 2, 3, 4, 128), jnp.bfloat16), kv, kv, n)),
  "sparse": (lambda q, k, v, n, i: sparse_decode_attention(q, k, v, n, i, block_size=64), (q, kv, kv, n, idx)),
  "topk": (lambda s, n: block_topk(s, n, block_size=64, k=4), (S((2, 2, 8), jnp.float32), n)),
  # forward and backward (jax.grad through the custom_vjp)
  "prefill_grad": (jax.grad(lambda q, k, v, i: jnp.sum(block_sparse_attention(
      q, k, v, i, block_size=64).astype(jnp.float32)), (0, 1, 2)),
      (S((1, 256, 4, 128), jnp.bfloat16), S((1, 256, 2, 128), jnp.bfloat16),
       S((1, 256, 2, 128), jnp.bfloat16), S((1, 4, 4, 4), jnp.int32))),
  "flash_target": (lambda q, k, v: flash_attention(q, k, v, block_size=64),
      (S((1, 256, 4, 128), jnp.bfloat16), S((1, 256, 2, 128), jnp.bfloat16),
       S((1, 256, 2, 128), jnp.bfloat16))),
}
for name, (fn, args) in ops.items():
  with lowering_for("gpu"):
    text = export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
  assert "xla.gpu.triton" not in text, name
  print(name, "mosaic_gpu" if "mosaic_gpu" in text else "xla")
try:
  decode_attention(jnp.ones((1, 1, 4, 64)), jnp.ones((1, 1, 8, 64)), jnp.ones((1, 1, 8, 64)),
                   jnp.asarray([3]), implementation="pallas_triton", interpret=True)
except NotSupported as e:
  print("named:", e)
"""


def test_every_op_survives_without_pallas_triton():
  """With Pallas Triton gone, every op still lowers for a GPU: the sparse decode op, the
  block-sparse prefill's forward and backward and the flash forward with its block target
  through their Mosaic GPU kernels, the others through the XLA reference; asking for Triton by
  name says why not."""
  r = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  lines = r.stdout.splitlines()
  assert lines[:6] == ["decode xla", "extend xla", "sparse mosaic_gpu", "topk xla",
                       "prefill_grad mosaic_gpu", "flash_target mosaic_gpu"], lines
  assert lines[6].startswith("named: decode_attention: implementation pallas_triton: cannot import")


def test_tuned_lookup_merges_device_over_default(tmp_path, monkeypatch):
  table = json.loads((tuned.DIR / "default.json").read_text())
  base = table["sparse_decode_attention"]["pallas_triton"]
  assert tuned.lookup("sparse_decode_attention", "pallas_triton", kind="no_such_card") == base
  (tmp_path / "default.json").write_text(json.dumps(table))
  (tmp_path / "Test_Card.json").write_text(json.dumps(
      {"sparse_decode_attention": {"pallas_triton": {"num_stages": 5}}}))
  monkeypatch.setattr(tuned, "DIR", tmp_path)
  tuned._table.cache_clear()
  try:
    got = tuned.lookup("sparse_decode_attention", "pallas_triton", kind="Test_Card")
    assert got == {**base, "num_stages": 5}
    with pytest.raises(KeyError, match="no entry"):
      tuned.lookup("no_such_op", "xla")
  finally:
    tuned._table.cache_clear()


def test_every_tuned_entry_belongs_to_an_op_backend():
  """The tuned tables name only real ops and backends (a typo would silently fall back)."""
  import importlib
  for path in tuned.DIR.glob("*.json"):
    for op, backends in json.loads(path.read_text()).items():
      if op.startswith("_") or op == "device":
        continue
      pkg = {"sparse_decode_attention": "sparse_decode",
             "lowbit_decode_attention": "lowbit_decode",
             "lowbit_matmul_int8": "lowbit_matmul"}.get(op, op)
      mod = importlib.import_module(f"pallas_kernels.{pkg}")
      for backend in backends:
        assert backend in mod.IMPLEMENTATIONS, (path.name, op, backend)
