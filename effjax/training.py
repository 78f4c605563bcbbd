"""The optimiser, the loss and the train / eval steps as pure functions (jitted by the caller).

State is an explicit pytree `{"step", "params", "opt_state"}`. The resumable loop behind
`train.py` is `effjax.trainer`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import model as model_lib
from effjax import sharding as shd
from effjax.config import Config, ModelConfig, OptimConfig
from effjax.data.tokenizer import NUM_BYTES

TrainState = dict  # {"step": int32[], "params": pytree, "opt_state": pytree}


# ----------------------------------------------------------------------------------------------
# optimiser


def lr_schedule(ocfg: OptimConfig, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=ocfg.lr, warmup_steps=ocfg.warmup_steps,
      decay_steps=total_steps, end_value=ocfg.lr * ocfg.min_lr_ratio)


def _decay_mask(params):
  # Decay matrices (kernels, embeddings); never norm scales.
  def is_matrix(path, _):
    return getattr(path[-1], "key", None) in ("kernel", "embed", "unembed")
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(ocfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if ocfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(ocfg.grad_clip))
  parts.append(optax.adamw(lr_schedule(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                           weight_decay=ocfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# loss and steps


def token_losses(mcfg: ModelConfig, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Summed masked next-token cross-entropy (nats, float32) and the number of target tokens."""
  logits_BTV = model_lib.forward(mcfg, params, batch["inputs"])
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


def init_train_state(cfg: Config, rng: jax.Array, optimizer: optax.GradientTransformation) -> TrainState:
  params = model_lib.init_params(cfg.model, rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def make_train_step(cfg: Config, optimizer: optax.GradientTransformation) -> Callable:
  """(state, batch) -> (state, metrics). batch arrays are [B, T]; with grad_accum = A the batch is
  split into A micro-batches of B/A whose summed gradients equal the full-batch gradient."""
  mcfg, accum = cfg.model, cfg.train.grad_accum

  def sum_loss(params, micro):
    s, n = token_losses(mcfg, params, micro)
    return s, n

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def step(state: TrainState, batch: dict):
    params = state["params"]
    if accum == 1:
      (loss_sum, count), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

      def body(carry, mb):
        (s, n), g = grad_fn(params, mb)
        cs, cn, cg = carry
        return (cs + s, cn + n, jax.tree.map(jnp.add, cg, g)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss_sum, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss_sum / count, "grad_norm": _global_norm(grads), "tokens": count}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def _global_norm(tree):
  # optax >= 0.2.5 moved this to optax.tree.norm; keep both JAX environments working
  tree_ns = getattr(optax, "tree", None)
  return tree_ns.norm(tree) if tree_ns is not None and hasattr(tree_ns, "norm") else optax.global_norm(tree)


def make_eval_step(mcfg: ModelConfig) -> Callable:
  """(params, batch) -> (summed NLL in nats, target tokens, target bytes): the loss mask's tokens,
  and those of them that are bytes of text (byte tokenizer ids < 256; BOS / EOS are not)."""
  def eval_step(params, batch):
    nll, n_tokens = token_losses(mcfg, params, batch)
    is_byte = (batch["targets"] < NUM_BYTES) & (batch["loss_mask"] > 0)
    return nll, n_tokens, jnp.sum(is_byte.astype(jnp.float32))
  return eval_step


def evaluate_loss(eval_step, params, batches, mesh) -> dict:
  """The one definition of a reported loss, used by training's periodic evaluation and eval.py:
  {"loss": summed NLL / target tokens (nats per token), "bits_per_byte": summed NLL / ln 2 /
  target bytes (the NLL of EOS tokens counted, their bytes not: the cost of the text's bytes),
  "tokens", "bytes"}. Raises FloatingPointError if the loss is not finite."""
  tot, cnt, nbytes = 0.0, 0.0, 0.0
  for b in batches:
    n = shd.batch_devices(mesh)
    rows = b["inputs"].shape[0]
    if rows % n:  # pad the last partial batch with masked rows so it shards evenly
      pad = n - rows % n
      b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
    s, c, nb = eval_step(params, shd.shard_batch(b, mesh))
    tot, cnt, nbytes = tot + float(s), cnt + float(c), nbytes + float(nb)
  loss = tot / max(cnt, 1.0)
  if not math.isfinite(loss):
    raise FloatingPointError(f"evaluation loss is {loss}")
  return {"loss": loss, "bits_per_byte": tot / math.log(2) / max(nbytes, 1.0), "tokens": cnt,
          "bytes": nbytes}
