"""YaRN scaling of the model's RoPE: frequencies against a per-pair numpy transcription of the
authors' formula, the attention scale, config checks, and "off" being the plain RoPE bit for bit."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ConfigError, ModelConfig
from effjax.model import (forward, init_params, model_rope_tables, rope_tables,
                          yarn_attention_scale, yarn_inv_freq)


def yarn_numpy(head_dim, theta, s, L, beta_fast, beta_slow):
  """One pair at a time, as YaRN's reference code (find_correction_range with truncation, a
  linear ramp over pair indices, inv_freq = interp * (1 - mask) + extrap * mask)."""
  def corr(rot):
    return head_dim * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(theta))
  low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), head_dim - 1)
  if low == high:
    high += 0.001
  out = []
  for d in range(head_dim // 2):
    base = theta ** (2 * d / head_dim)
    ramp = min(max((d - low) / (high - low), 0.0), 1.0)
    mask = 1.0 - ramp
    out.append((1.0 / (s * base)) * (1.0 - mask) + (1.0 / base) * mask)
  return np.array(out)


@pytest.mark.parametrize("head_dim,theta,s,L,bf,bs", [
    (64, 10000.0, 4.0, 2048, 32.0, 1.0), (128, 500000.0, 8.0, 8192, 32.0, 1.0),
    (32, 10000.0, 2.5, 512, 16.0, 2.0), (16, 1e6, 16.0, 64, 32.0, 1.0)])
def test_frequencies_match_the_formula(head_dim, theta, s, L, bf, bs):
  got = yarn_inv_freq(head_dim, theta, s, L, bf, bs)
  assert got.shape == (head_dim // 2,) and got.dtype == np.float32
  chex.assert_trees_all_close(got.astype(np.float64), yarn_numpy(head_dim, theta, s, L, bf, bs),
                              rtol=1e-6, atol=0)


def test_frequency_regimes_and_factor_one():
  H, theta, s, L = 64, 10000.0, 4.0, 2048
  plain = 1.0 / theta ** (np.arange(0, H, 2) / H)
  got = yarn_inv_freq(H, theta, s, L)
  rot = L * plain / (2 * np.pi)                   # turns over the original context
  # pairs 0..8 turn > 32 times: kept (extrapolated); pairs 21.. turn < 1 time: divided by s
  np.testing.assert_allclose(got[:9], plain[:9], rtol=1e-6)
  np.testing.assert_allclose(got[21:], plain[21:] / s, rtol=1e-6)
  assert rot[8] > 32 and rot[21] < 1
  assert np.all((got[9:21] < plain[9:21]) & (got[9:21] > plain[9:21] / s))
  np.testing.assert_allclose(yarn_inv_freq(H, theta, 1.0, L), plain, rtol=1e-6)


def test_attention_scale_and_tables():
  assert yarn_attention_scale(1.0) == 1.0 and yarn_attention_scale(0.5) == 1.0
  np.testing.assert_allclose(yarn_attention_scale(8.0), 0.1 * np.log(8.0) + 1.0)
  cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, rope_scaling="yarn", rope_factor=8.0,
                    rope_original_max_seq_len=128)
  pos = jnp.asarray([[0, 5, 300], [7, 1000, 4095]])
  cos, sin = model_rope_tables(cfg, pos)
  assert cos.shape == (2, 3, 1, 8) and cos.dtype == jnp.float32
  m = 0.1 * np.log(8.0) + 1.0
  np.testing.assert_allclose(np.asarray(cos ** 2 + sin ** 2), m * m, rtol=1e-5)
  ang = np.asarray(pos, np.float32)[..., None] * yarn_inv_freq(16, 10000.0, 8.0, 128)
  np.testing.assert_allclose(np.asarray(cos[:, :, 0]), m * np.cos(ang), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin[:, :, 0]), m * np.sin(ang), rtol=1e-5, atol=1e-5)


def test_off_is_the_plain_rope_bit_for_bit():
  cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2)
  assert cfg.rope_scaling == "none"
  pos = jnp.asarray([[0, 3, 77, 2047]])
  for a, b in zip(model_rope_tables(cfg, pos), rope_tables(pos, cfg.hd, cfg.rope_theta)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_yarn_model_runs_and_changes_logits():
  base = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64,
              compute_dtype="float32")
  cfg, ycfg = ModelConfig(**base), ModelConfig(**base, rope_scaling="yarn", rope_factor=4.0,
                                                 rope_original_max_seq_len=16)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 40), 0, 256)
  fwd = jax.jit(forward, static_argnums=0)
  a, b = fwd(cfg, params, toks), fwd(ycfg, params, toks)
  assert np.all(np.isfinite(np.asarray(b)))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_config_checks():
  with pytest.raises(ConfigError, match="rope_scaling"):
    ModelConfig(rope_scaling="ntk")
  with pytest.raises(ConfigError, match="rope_original_max_seq_len"):
    ModelConfig(rope_scaling="yarn", rope_factor=4.0)
  with pytest.raises(ConfigError, match="rope_factor"):
    ModelConfig(rope_scaling="yarn", rope_factor=0.5, rope_original_max_seq_len=128)
  with pytest.raises(ConfigError, match="rope_beta_fast"):
    ModelConfig(rope_scaling="yarn", rope_factor=2.0, rope_original_max_seq_len=128,
                rope_beta_fast=1.0, rope_beta_slow=2.0)
