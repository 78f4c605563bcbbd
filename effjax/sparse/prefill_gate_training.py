"""Self-distillation of the prefill gate (`prefill_gate`) from a frozen model.

One dense forward of B sequences yields every layer's post-RoPE q / k / v
(`decoding.forward_layers`); the block-level ground truth of each layer's attention
(`pallas_kernels.flash_attention` with a block_size) is the target, and the loss is
KL(target || softmax(gate logits)), averaged over valid query-block rows and summed over layers.
Only the gate params get gradients.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import decoding
from effjax.config import ModelConfig
from effjax.sparse import prefill_gate as pg
from effjax.sparse.gate import GateConfig
from pallas_kernels.flash_attention import flash_attention


def layer_targets(mcfg: ModelConfig, params, tokens_BT: jax.Array, lengths_B: jax.Array,
                  block_size: int, implementation=None):
  """Per layer: (q_BTNH, k_BTKH, v_BTKH, target float32 [B, N, nQ, nK]) of the frozen model on
  right-padded tokens int32 [B, T] with lengths int32 [B] (padding sits after every real token, so
  causal attention keeps it out of the real positions)."""
  _, qs, ks, vs = decoding.forward_layers(mcfg, jax.lax.stop_gradient(params), tokens_BT)
  out = []
  for q, k, v in zip(qs, ks, vs):
    _, t = flash_attention(q, k, v, lengths_B, block_size=block_size,
                           implementation=implementation)
    out.append((q, k, v, jax.lax.stop_gradient(t)))
  return out


def layer_loss(mcfg: ModelConfig, gcfg: GateConfig, wq_NHD, wk_KCD, q_BTNH, k_BTKH, target_BNQK,
               lengths_B) -> jax.Array:
  """Mean KL over the valid query-block rows of one layer: float32 scalar."""
  logits = pg.gate_logits(wq_NHD, wk_KCD, q_BTNH, k_BTKH, lengths_B, gcfg.block_size,
                          mcfg.rope_theta)
  return pg.kl_loss(target_BNQK, logits, lengths_B, gcfg.block_size)


@partial(jax.jit, static_argnames=("mcfg", "gcfg"))
def prefill_gate_loss(mcfg: ModelConfig, gcfg: GateConfig, gate_params, params,
                      tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """KL distillation loss summed over the layers (the model is frozen): float32 scalar.
  gate_params {"wq": [L, N, H, Dg], "wk": [L, K, 3H, Dg]}; tokens int32 [B, T]; lengths
  int32 [B]."""
  layers = layer_targets(mcfg, params, tokens_BT, lengths_B, gcfg.block_size)
  return sum(layer_loss(mcfg, gcfg, gate_params["wq"][i], gate_params["wk"][i], q, k, t,
                        lengths_B)
             for i, (q, k, _, t) in enumerate(layers))


def train_prefill_gate(mcfg: ModelConfig, gcfg: GateConfig, params, tokens_NT: np.ndarray, *,
                       steps: int, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
                       lengths_N: np.ndarray | None = None, gate_params=None,
                       log=None) -> tuple[dict, list[float]]:
  """Adam on the prefill gate's params only. tokens_NT int32 [N, T] training sequences (right
  padded when lengths_N, int [N] in [1, T], is given); gate_params to continue from (default: a
  fresh `init_prefill_gate_params` from seed). Returns (gate params, per-step losses)."""
  rng = np.random.default_rng(seed)
  gp = gate_params if gate_params is not None else pg.init_prefill_gate_params(
      mcfg, gcfg, jax.random.key(seed))
  N, T = tokens_NT.shape
  lengths_N = np.full((N,), T, np.int32) if lengths_N is None else np.asarray(lengths_N, np.int32)
  opt = optax.adam(lr)
  grad = jax.jit(jax.value_and_grad(prefill_gate_loss, argnums=2),
                 static_argnames=("mcfg", "gcfg"))

  @jax.jit
  def apply_update(gp, st, g):
    u, st = opt.update(g, st, gp)
    return optax.apply_updates(gp, u), st

  st = opt.init(gp)
  losses = []
  for s in range(steps):
    ids = rng.integers(0, N, batch_size)
    loss, g = grad(mcfg, gcfg, gp, params, jnp.asarray(tokens_NT[ids]),
                   jnp.asarray(lengths_N[ids]))
    gp, st = apply_update(gp, st, g)
    losses.append(float(loss))
    if log and (s + 1) % max(1, steps // 10) == 0:
      log(f"prefill gate step {s + 1}/{steps}: KL {np.mean(losses[-10:]):.4f}")
  return gp, losses
