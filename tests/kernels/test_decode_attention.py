"""pallas_kernels.decode_attention: every implementation against a float64 oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (DecodeConfig, decode_attention,
                                             decode_attention_reference)

from ._oracle import (IMPLEMENTATIONS, TOLERANCES, length_valid, lower_for_cuda, oracle, random_inputs,
                      require_backend)

# (B, K, G, H, S, lengths): ragged lengths that are not block multiples, a length-0 sequence,
# a length of 1, full caches, and capacities S that are not multiples of block_k (300, 160).
SHAPES = [
    (1, 1, 1, 64, 128, [128]),
    (3, 2, 4, 64, 300, [300, 37, 1]),
    (2, 2, 8, 128, 256, [200, 129]),
    (3, 1, 8, 64, 192, [0, 191, 65]),
    (2, 2, 1, 128, 160, [17, 160]),
]


@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}K{}G{}H{}S{}".format(*s[:5]))
def test_matches_oracle(implementation, interpret, dtype, shape):
  require_backend(implementation, interpret)
  B, K, G, H, S, lengths = shape
  q, k, v = random_inputs(S + G, B, K, G, H, S, dtype)
  lengths_B = jnp.asarray(lengths, jnp.int32)
  out = decode_attention(q, k, v, lengths_B, implementation=implementation, interpret=interpret)
  assert out.shape == (B, K, G, H) and out.dtype == dtype
  want = oracle(q, k, v, length_valid(lengths, K, S))
  chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)), want.astype(np.float32),
                              **TOLERANCES[dtype])
  if 0 in lengths:
    assert not np.any(np.asarray(out)[lengths.index(0)]), "length 0 must give zeros"


@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS[1:])
@pytest.mark.parametrize("config", [
    DecodeConfig(block_k=16, num_splits=1),
    DecodeConfig(block_k=32, num_splits=3),
    DecodeConfig(block_k=64, num_splits=7),   # more splits than some rows have blocks
    DecodeConfig(block_k=128, num_splits=2, num_warps=8, num_stages=3),
], ids=lambda c: f"bk{c.block_k}-ns{c.num_splits}")
def test_configs(implementation, interpret, config):
  """Split counts and block sizes change only the order of summation, never the result."""
  require_backend(implementation, interpret)
  B, K, G, H, S, lengths = 2, 2, 4, 64, 224, [223, 50]
  q, k, v = random_inputs(7, B, K, G, H, S, jnp.float32)
  out = decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32), implementation=implementation,
                         interpret=interpret, config=config)
  want = oracle(q, k, v, length_valid(lengths, K, S))
  chex.assert_trees_all_close(np.asarray(out), want.astype(np.float32), **TOLERANCES[jnp.float32])


@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS)
def test_under_jit_with_traced_lengths(implementation, interpret):
  """The decode step calls the op inside jit with traced lengths (no value checks possible)."""
  require_backend(implementation, interpret)
  q, k, v = random_inputs(3, 2, 2, 4, 64, 128, jnp.bfloat16)
  lengths = [100, 3]
  fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, implementation=implementation,
                                                   interpret=interpret))
  out = fn(q, k, v, jnp.asarray(lengths, jnp.int32))
  want = oracle(q, k, v, length_valid(lengths, 2, 128))
  chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)), want.astype(np.float32),
                              **TOLERANCES[jnp.bfloat16])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_kernel_lowers_for_cuda(dtype):
  """The compiled path's Pallas -> Triton lowering succeeds (checked on CPU, without a GPU)."""
  q = jax.ShapeDtypeStruct((2, 2, 4, 128), dtype)
  kv = jax.ShapeDtypeStruct((2, 2, 300, 128), dtype)
  n = jax.ShapeDtypeStruct((2,), jnp.int32)
  text = lower_for_cuda(lambda *a: decode_attention(*a, implementation="pallas_triton"), q, kv, kv, n)
  assert "xla.gpu.triton" in text and 'name = "decode_attention"' in text


def test_reference_is_xla_implementation():
  q, k, v = random_inputs(1, 2, 1, 4, 64, 96, jnp.float32)
  n = jnp.asarray([96, 40], jnp.int32)
  chex.assert_trees_all_equal(decode_attention_reference(q, k, v, n),
                              decode_attention(q, k, v, n, implementation="xla"))


def test_auto_on_cpu_is_xla():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU dispatch")
  q, k, v = random_inputs(2, 1, 1, 4, 64, 64, jnp.float32)
  n = jnp.asarray([50], jnp.int32)
  chex.assert_trees_all_equal(decode_attention(q, k, v, n),
                              decode_attention(q, k, v, n, implementation="xla"))


def _args(**over):
  q, k, v = random_inputs(0, 2, 2, 4, 64, 64, jnp.float32)
  args = dict(q_BKGH=q, k_BKSH=k, v_BKSH=v, lengths_B=jnp.asarray([10, 64], jnp.int32))
  args.update(over)
  return args


@pytest.mark.parametrize("over,match", [
    (dict(q_BKGH=jnp.ones((2, 2, 64), jnp.float32)), "q_BKGH must be 4-D"),
    (dict(k_BKSH=jnp.ones((2, 2, 64, 32), jnp.float32), v_BKSH=jnp.ones((2, 2, 64, 32), jnp.float32)),
     r"k_BKSH .* must be \[B, K, S, H\]"),
    (dict(v_BKSH=jnp.ones((2, 2, 32, 64), jnp.float32)), "same shape"),
    (dict(k_BKSH=jnp.ones((2, 2, 64, 64), jnp.bfloat16)), "share a dtype"),
    (dict(q_BKGH=jnp.ones((2, 2, 4, 64), jnp.int32)), "q_BKGH must be float32"),
    (dict(lengths_B=jnp.asarray([10], jnp.int32)), "lengths_B must have shape"),
    (dict(lengths_B=jnp.asarray([10.0, 3.0])), "lengths_B must be an integer"),
    (dict(lengths_B=jnp.asarray([10, 65], jnp.int32)), r"lengths_B must lie in \[0, S=64\]"),
    (dict(lengths_B=jnp.asarray([-1, 5], jnp.int32)), "lengths_B must lie in"),
])
def test_bad_inputs_raise(over, match):
  with pytest.raises(ValueError, match=match):
    decode_attention(**_args(**over), implementation="xla")


@pytest.mark.parametrize("kwargs,match", [
    (dict(implementation="cudnn"), "implementation must be one of"),
    (dict(implementation="pallas_triton", config=DecodeConfig(block_k=48)), "block_k must be a power of 2"),
    (dict(implementation="pallas_triton", config=DecodeConfig(num_splits=0)), "num_splits"),
    (dict(implementation="pallas_triton", config=DecodeConfig(num_warps=3)), "num_warps"),
    (dict(implementation="pallas_triton", config=object()), "config must be a DecodeConfig"),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    decode_attention(**_args(), interpret=True, **kwargs)


def test_triton_rejects_non_power_of_2_head_dim():
  q, k, v = random_inputs(0, 1, 1, 4, 80, 32, jnp.float32)
  with pytest.raises(ValueError, match="head dim H=80 must be a power of 2"):
    decode_attention(q, k, v, jnp.asarray([5], jnp.int32), implementation="pallas_triton",
                     interpret=True)
