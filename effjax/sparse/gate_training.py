"""Self-distillation of the decode gate from a frozen model, and how much attention a block choice
keeps (recall), for comparing the gate with Quest.

Every position of a dense forward is a decode query over the keys before it, so one forward pass
of B sequences of T tokens yields B x P training queries (P sampled positions) per layer.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import decoding
from effjax.config import ModelConfig
from effjax.sparse import gate as gate_lib


def _pad_keys(k_BTKH: jax.Array, block_size: int) -> jax.Array:
  """[B, T, K, H] -> [B, K, S, H] with S rounded up to a block multiple (zeros beyond T)."""
  B, T, K, H = k_BTKH.shape
  S = -(-T // block_size) * block_size
  return jnp.pad(k_BTKH, ((0, 0), (0, S - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def layer_loss(mcfg: ModelConfig, gcfg: gate_lib.GateConfig, wq, wk, q_BTNH, k_BTKH, pos_P):
  """Mean KL over sampled query positions pos_P (int32 [P]) of one layer."""
  B, T, N, H = q_BTNH.shape
  K, G = mcfg.n_kv_heads, N // mcfg.n_kv_heads
  k_BKSH = _pad_keys(k_BTKH.astype(jnp.float32), gcfg.block_size)

  def one(p):
    lengths = jnp.full((B,), p + 1, jnp.int32)
    q = q_BTNH[:, p].astype(jnp.float32).reshape(B, K, G, H)
    target = gate_lib.distill_target(q, k_BKSH, lengths, gcfg.block_size)
    kc = gate_lib.compress_blocks(wk, k_BKSH, lengths, gcfg.block_size, mcfg.rope_theta)
    logits = gate_lib.gate_logits(wq, q, kc, jnp.full((B,), p, jnp.int32), mcfg.rope_theta)
    return gate_lib.kl_loss(target, gate_lib.masked_softmax(logits, lengths, gcfg.block_size))

  return jnp.mean(jax.vmap(one)(pos_P))


@partial(jax.jit, static_argnames=("mcfg", "gcfg"))
def gate_loss(mcfg: ModelConfig, gcfg: gate_lib.GateConfig, gate_params, params, tokens_BT, pos_P):
  """Distillation loss of all layers' gates on a batch of sequences (the model is frozen)."""
  _, qs, ks, _ = decoding.forward_layers(mcfg, jax.lax.stop_gradient(params), tokens_BT)
  losses = [layer_loss(mcfg, gcfg, gate_params["wq"][i], gate_params["wk"][i], qs[i], ks[i], pos_P)
            for i in range(mcfg.n_layers)]
  return jnp.mean(jnp.stack(losses))


def train_gate(mcfg: ModelConfig, gcfg: gate_lib.GateConfig, params, tokens_NT: np.ndarray, *,
               steps: int, batch_size: int = 8, queries: int = 16, lr: float = 3e-3, seed: int = 0,
               log=None) -> tuple[dict, list[float]]:
  """Adam on the gate parameters only. tokens_NT: int32 [N, T] training sequences. Query positions
  are drawn from the second half of each window, where there are blocks to choose between."""
  rng = np.random.default_rng(seed)
  gp = gate_lib.init_gate_params(mcfg, gcfg, jax.random.key(seed))
  opt = optax.adam(lr)
  st = opt.init(gp)
  T = tokens_NT.shape[1]
  grad = jax.jit(jax.value_and_grad(gate_loss, argnums=2), static_argnames=("mcfg", "gcfg"))

  @jax.jit
  def apply_update(gp, st, g):
    u, st = opt.update(g, st, gp)
    return optax.apply_updates(gp, u), st

  losses = []
  for s in range(steps):
    ids = rng.integers(0, len(tokens_NT), batch_size)
    pos = rng.integers(T // 2, T, queries).astype(np.int32)
    loss, g = grad(mcfg, gcfg, gp, params, jnp.asarray(tokens_NT[ids]), jnp.asarray(pos))
    gp, st = apply_update(gp, st, g)
    losses.append(float(loss))
    if log and (s + 1) % max(1, steps // 10) == 0:
      log(f"gate step {s + 1}/{steps}: KL {np.mean(losses[-10:]):.4f}")
  return gp, losses


def attention_recall(q_BKGH, k_BKSH, lengths_B, block_indices_BKM, block_size: int) -> jax.Array:
  """Share of dense attention probability (mean over the group's heads) that falls in the chosen
  blocks: float32 [B, K], 1.0 for dense attention."""
  B, K, S, H = k_BKSH.shape
  p = gate_lib.dense_probs(q_BKGH, k_BKSH, lengths_B)
  nb = S // block_size
  chosen = jnp.zeros((B, K, nb + 1), bool).at[
      jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None],
      jnp.where(block_indices_BKM >= 0, block_indices_BKM, nb)].set(True)[..., :nb]
  tok_chosen = jnp.repeat(chosen, block_size, axis=-1)[:, :, None, :]
  return jnp.mean(jnp.sum(jnp.where(tok_chosen, p, 0.0), -1), axis=2)
