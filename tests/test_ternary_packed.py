"""A bitlinear model packed into ternary formats (effjax/quant/convert.py) computes what was
trained, saves and loads with a verified manifest, and decodes through the KV-cache path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import decoding
from effjax.checkpoint import CheckpointError
from effjax.config import Config, ModelConfig
from effjax.model import forward, init_params
from effjax.quant.convert import load_packed, pack_model, save_packed

MCFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                   linear_impl="bitlinear", sub_norm=True, compute_dtype="float32")


@pytest.fixture(scope="module")
def model():
  cfg = Config(model=MCFG)
  params = init_params(MCFG, jax.random.key(0))
  # weights far from init's near-equal magnitudes, so every ternary code occurs
  params = jax.tree.map(lambda x: x * (1 + jax.random.uniform(jax.random.key(1), x.shape)), params)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)), jnp.int32)
  return cfg, params, toks


@pytest.mark.parametrize("fmt", ["i2_s", "i2_t", "tl1", "tl2", "bitplanes"])
def test_packed_forward_equals_the_trained_forward(model, fmt):
  cfg, params, toks = model
  pcfg, pparams = pack_model(cfg, params, fmt)
  assert pcfg.model.linear_impl == "ternary_packed"
  want = forward(cfg.model, params, toks)
  got = forward(pcfg.model, pparams, toks)
  # The same integers and scales; float sums in another order can move an activation across a
  # rounding boundary of its int8 code, which shifts a few logits by about one code step.
  diff = np.abs(np.asarray(got) - np.asarray(want))
  assert diff.max() < 2e-2 and np.mean(diff > 1e-3) < 0.01, (diff.max(), np.mean(diff > 1e-3))


@pytest.mark.parametrize("fmt", ["i2_s", "i2_t"])
def test_save_load_and_decode(model, tmp_path, fmt):
  cfg, params, toks = model
  pcfg, pparams = pack_model(cfg, params, fmt)
  out = save_packed(tmp_path / "packed", pcfg, pparams)
  cfg2, params2 = load_packed(out)
  assert cfg2.model == pcfg.model
  np.testing.assert_array_equal(np.asarray(forward(cfg2.model, params2, toks)),
                                np.asarray(forward(pcfg.model, pparams, toks)))
  lengths = jnp.asarray([40, 23], jnp.int32)
  got, n = decoding.generate(cfg2.model, params2, toks, lengths, jax.random.key(0),
                             max_new_tokens=8, decode_impl="xla")
  want, _ = decoding.generate(cfg.model, params, toks, lengths, jax.random.key(0),
                              max_new_tokens=8, decode_impl="xla")
  assert np.all(np.asarray(n) == 8) and np.mean(np.asarray(got) == np.asarray(want)) >= 0.75
  with pytest.raises(FileExistsError, match="already holds a packed model"):
    save_packed(out, pcfg, pparams)
  w = out / "weights.npz"
  b = bytearray(w.read_bytes())
  b[len(b) // 2] ^= 1
  w.write_bytes(bytes(b))
  with pytest.raises(CheckpointError, match="does not match its checksum"):
    load_packed(out)


def test_fused_projections_equal_the_separate_ones(model, tmp_path):
  """pack_model(fuse=True): q / k / v and gate / up as one i2_t weight each with per-column
  scales give the same logits bit for bit, save and load, and decode the same tokens."""
  cfg, params, toks = model
  pcfg, sep = pack_model(cfg, params, "i2_t")
  _, fused = pack_model(cfg, params, "i2_t", fuse=True)
  lp = fused["layers_0"]
  assert {"wqkv", "w_gate_up"} <= set(lp) and not {"wq", "wk", "wv", "w_gate", "w_up"} & set(lp)
  H, N, K, F = MCFG.hd, MCFG.n_heads, MCFG.n_kv_heads, MCFG.ff
  assert lp["wqkv"].shape == (MCFG.d_model, (N + 2 * K) * H)
  assert lp["w_gate_up"].shape == (MCFG.d_model, 2 * F)
  want = np.asarray(forward(pcfg.model, sep, toks))
  np.testing.assert_array_equal(np.asarray(forward(pcfg.model, fused, toks)), want)
  cfg2, loaded = load_packed(save_packed(tmp_path / "fused", pcfg, fused))
  np.testing.assert_array_equal(np.asarray(forward(cfg2.model, loaded, toks)), want)
  lengths = jnp.asarray([40, 23], jnp.int32)
  run = lambda p: decoding.generate(pcfg.model, p, toks, lengths, jax.random.key(0),
                                    max_new_tokens=6, decode_impl="xla")[0]
  np.testing.assert_array_equal(np.asarray(run(loaded)), np.asarray(run(sep)))
  with pytest.raises(ValueError, match="i2_t"):
    pack_model(cfg, params, "i2_s", fuse=True)


def test_only_bitlinear_models_pack():
  with pytest.raises(ValueError, match="only a bitlinear model"):
    pack_model(Config(model=ModelConfig()), {}, "i2_s")
  with pytest.raises(ValueError, match="format must be one of"):
    pack_model(Config(model=MCFG), {}, "i3")


def test_lowbit_impl_chooses_the_packed_matmul_backends(model):
  """model.lowbit_impl names the backends tried in order: a chain whose first kernel does not
  take the shape here (no GPU) gives XLA's result; bad names fail when the config is made."""
  import dataclasses
  from effjax.config import ConfigError
  cfg, params, toks = model
  pcfg, pparams = pack_model(cfg, params, "i2_s")
  want = forward(pcfg.model, pparams, toks)
  chained = dataclasses.replace(pcfg.model, lowbit_impl="pallas_mosaic_gpu,xla")
  np.testing.assert_array_equal(np.asarray(forward(chained, pparams, toks)), np.asarray(want))
  for bad in ("cublas", "auto,xla"):
    with pytest.raises(ConfigError, match="model.lowbit_impl"):
      dataclasses.replace(pcfg.model, lowbit_impl=bad)
