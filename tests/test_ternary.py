"""BitNet b1.58 (effjax/quant/ternary.py): the quantisers, the straight-through gradient, and a
ternary model that trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig, load_config
from effjax.model import forward, init_params
from effjax.model.linear import BitLinear
from effjax.quant.ternary import absmax_int8, absmean_ternary, ste


def test_absmean_ternary():
  w = jax.random.normal(jax.random.key(0), (64, 48)) * 0.3
  codes, scale = absmean_ternary(w)
  assert set(np.unique(np.asarray(codes)).tolist()) <= {-1.0, 0.0, 1.0}
  np.testing.assert_allclose(float(scale), float(jnp.mean(jnp.abs(w))), rtol=1e-6)
  # round(w / scale) clipped: a weight above 1.5 scales is +1, below 0.5 scales in size is 0
  wn = np.asarray(w) / float(scale)
  c = np.asarray(codes)
  assert np.all(c[np.abs(wn) < 0.5] == 0) and np.all(c[wn > 0.5] == 1) and np.all(c[wn < -0.5] == -1)


def test_absmax_int8_per_token():
  x = jax.random.normal(jax.random.key(1), (3, 5, 32)) * jnp.arange(1, 4)[:, None, None]
  codes, scale = absmax_int8(x)
  c = np.asarray(codes)
  assert c.min() >= -127 and c.max() <= 127 and np.all(c == np.round(c))
  assert np.all(np.abs(c).max(axis=-1) == 127)          # each token's largest entry maps to 127
  np.testing.assert_allclose(np.asarray(codes * scale), np.asarray(x),
                             atol=float(jnp.max(scale)) / 2 + 1e-6)


def test_straight_through_gradient():
  """d/dW of the quantised layer is the full-precision gradient of its quantised forward: for
  L = sum(c * y), y = Q(x) @ Q(W): dL/dW = Q(x)^T c and dL/dx = c Q(W)^T, exactly."""
  lin = BitLinear(dtype="float32")
  kx, kw, kc = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (6, 32))
  p = {"kernel": jax.random.normal(kw, (32, 16)) * 0.1}
  c = jax.random.normal(kc, (6, 16))
  gx, gp = jax.grad(lambda x, p: jnp.sum(c * lin(p, x)), argnums=(0, 1))(x, p)
  xc, sx = absmax_int8(x)
  wc, sw = absmean_ternary(p["kernel"])
  np.testing.assert_allclose(np.asarray(gp["kernel"]), np.asarray((xc * sx).T @ c), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(c @ (wc * sw).T), rtol=1e-5, atol=1e-6)
  # and the forward is the integer product, rescaled
  y = lin(p, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray((xc @ wc) * sx * sw), rtol=1e-5, atol=1e-5)
  assert float(ste(jnp.float32(0.3), jnp.float32(1.0))) == 1.0


def test_bitnet_model_trains():
  """The ternary model (BitLinear in every projection, SubLN) lowers its loss in a few steps."""
  import optax
  from effjax.training import token_losses
  cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                    linear_impl="bitlinear", sub_norm=True, compute_dtype="float32")
  params = init_params(cfg, jax.random.key(0))
  assert "attn_sub_norm" in params["layers_0"] and "mlp_sub_norm" in params["layers_0"]
  rng = np.random.default_rng(0)
  t = jnp.asarray(np.tile(rng.integers(0, 256, (1, 33)), (8, 1)), jnp.int32)  # one repeated row
  batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": jnp.ones((8, 32))}
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(lambda p: token_losses(cfg, p, batch)[0] / 256)(params)
    upd, state = opt.update(g, state)
    return optax.apply_updates(params, upd), state, loss

  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def test_config():
  cfg = load_config("configs/bitnet_small.yaml")
  assert cfg.model.linear_impl == "bitlinear" and cfg.model.sub_norm
  with pytest.raises(Exception, match="dense|bitlinear"):
    load_config("configs/tiny.yaml", ["model.linear_impl=ternary"])
  x = jnp.zeros((1, 8), jnp.int32)
  assert forward(cfg.model, init_params(cfg.model, jax.random.key(0)), x).shape == (1, 8, 259)
