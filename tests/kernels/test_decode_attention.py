"""pallas_kernels.decode_attention: one test base, subclassed once per backend, against a float64
oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_attention.pallas_mosaic_tpu import MosaicTPUConfig
from pallas_kernels.decode_attention.pallas_triton import TritonConfig

from ._oracle import (BackendBase, check_close, generate_from_class, length_valid,
                      lower_for_cuda, oracle, random_inputs)

pytest_generate_tests = generate_from_class

# (B, K, G, H, S, lengths): ragged lengths that are not block multiples, a length-0 sequence,
# a length of 1, full caches, and capacities S that are not multiples of block_k (300, 160).
CASES = [
    (1, 1, 1, 64, 128, [128]),
    (3, 2, 4, 64, 300, [300, 37, 1]),
    (2, 2, 8, 128, 256, [200, 129]),
    (3, 1, 8, 64, 192, [0, 191, 65]),
    (2, 2, 1, 128, 160, [17, 160]),
]


class DecodeAttentionBase(BackendBase):
  """What every implementation of decode_attention must do."""
  CASES = CASES
  DTYPES = (jnp.float32, jnp.bfloat16)
  CONFIGS = ()          # backend configs that must change only the summation order

  def run(self, q, k, v, lengths, **kw):
    return decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32), **self.kw, **kw)

  def test_matches_oracle(self, dtype, case):
    B, K, G, H, S, lengths = case
    q, k, v = random_inputs(S + G, B, K, G, H, S, dtype)
    out = self.run(q, k, v, lengths)
    assert out.shape == (B, K, G, H) and out.dtype == dtype
    check_close(out, oracle(q, k, v, length_valid(lengths, K, S)), dtype)
    if 0 in lengths:
      assert not np.any(np.asarray(out)[lengths.index(0)]), "length 0 must give zeros"

  def test_configs_change_only_summation_order(self):
    B, K, G, H, S, lengths = 2, 2, 4, 64, 224, [223, 50]
    q, k, v = random_inputs(7, B, K, G, H, S, jnp.float32)
    want = oracle(q, k, v, length_valid(lengths, K, S))
    for config in self.CONFIGS:
      check_close(self.run(q, k, v, lengths, config=config), want, jnp.float32)

  def test_under_jit_with_traced_lengths(self):
    """The decode step calls the op inside jit with traced lengths (no value checks possible)."""
    q, k, v = random_inputs(3, 2, 2, 4, 64, 128, jnp.bfloat16)
    lengths = [100, 3]
    fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, **self.kw))
    out = fn(q, k, v, jnp.asarray(lengths, jnp.int32))
    check_close(out, oracle(q, k, v, length_valid(lengths, 2, 128)), jnp.bfloat16)


class TestXla(DecodeAttentionBase):
  def test_reference_is_the_xla_implementation(self):
    q, k, v = random_inputs(1, 2, 1, 4, 64, 96, jnp.float32)
    n = jnp.asarray([96, 40], jnp.int32)
    np.testing.assert_array_equal(np.asarray(decode_attention_reference(q, k, v, n)),
                                  np.asarray(decode_attention(q, k, v, n, implementation="xla")))


class TestPallasTritonInterpret(DecodeAttentionBase):
  IMPLEMENTATION, INTERPRET = "pallas_triton", True
  CONFIGS = (TritonConfig(block_k=16, num_splits=1), TritonConfig(block_k=32, num_splits=3),
             TritonConfig(block_k=64, num_splits=7),   # more splits than some rows have blocks
             TritonConfig(block_k=128, num_splits=2, num_warps=8, num_stages=3))

  @pytest.mark.parametrize("config,match", [
      (TritonConfig(block_k=48), "block_k must be a power of 2"),
      (TritonConfig(num_splits=0), "num_splits"),
      (TritonConfig(num_warps=3), "num_warps"),
      (object(), "is not the pallas_triton backend's config"),
  ])
  def test_bad_config_raises(self, config, match):
    q, k, v = random_inputs(0, 2, 2, 4, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match=match):
      self.run(q, k, v, [10, 64], config=config)

  def test_non_power_of_2_head_dim_is_not_supported(self):
    q, k, v = random_inputs(0, 1, 1, 4, 80, 32, jnp.float32)
    with pytest.raises(ValueError, match="head dim H=80 must be a power of 2"):
      self.run(q, k, v, [5])


@pytest.mark.gpu
class TestPallasTritonGPU(TestPallasTritonInterpret):
  INTERPRET, GPU = False, True


class TestPallasMosaicTPUInterpret(DecodeAttentionBase):
  IMPLEMENTATION, INTERPRET = "pallas_mosaic_tpu", True
  CASES = CASES[1:4]
  CONFIGS = (MosaicTPUConfig(block_k=16), MosaicTPUConfig(block_k=128))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_kernel_lowers_for_cuda(dtype):
  """The compiled path's Pallas -> Triton lowering succeeds (checked on CPU, without a GPU)."""
  q = jax.ShapeDtypeStruct((2, 2, 4, 128), dtype)
  kv = jax.ShapeDtypeStruct((2, 2, 300, 128), dtype)
  n = jax.ShapeDtypeStruct((2,), jnp.int32)
  text = lower_for_cuda(lambda *a: decode_attention(*a, implementation="pallas_triton"), q, kv, kv, n)
  assert "xla.gpu.triton" in text and 'name = "decode_attention"' in text


def test_default_on_cpu_is_the_reference():
  if jax.default_backend() != "cpu":
    pytest.fail("checks the CPU dispatch; runs in the CPU suite")
  q, k, v = random_inputs(2, 1, 1, 4, 64, 64, jnp.float32)
  n = jnp.asarray([50], jnp.int32)
  np.testing.assert_array_equal(np.asarray(decode_attention(q, k, v, n)),
                                np.asarray(decode_attention(q, k, v, n, implementation="xla")))


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


def test_unknown_implementation_raises():
  with pytest.raises(ValueError, match="implementation must be one of"):
    decode_attention(**_args(), implementation="cudnn")
