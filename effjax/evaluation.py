"""Perplexity / bits-per-byte on named splits and text sampling from a trained checkpoint.

(KV-cached decoding lives in `decoding.py`; sampling here re-runs the full window each token,
which is fine for the few hundred tokens of an evaluation sample.)
"""

from __future__ import annotations

import math
import pathlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from effjax import model as model_lib
from effjax import sharding as shd
from effjax.checkpoint import CheckpointError, restore
from effjax.config import Config, ModelConfig
from effjax.decoding import sample_logits
from effjax.training import evaluate_loss, make_eval_step


def load_params(cfg: Config, run_dir: str | pathlib.Path, step: int | None = None):
  """Restores params (fp32 pytree) of the checkpoint at `step` (default latest) of a run."""
  run_dir = pathlib.Path(run_dir)
  if not run_dir.is_dir():
    raise CheckpointError(f"run directory {run_dir} does not exist")
  ckpt_dir = run_dir / "checkpoints"
  # Only the params are needed, but orbax restores the saved tree as a whole: build the abstract
  # train state from the same optimiser the run used.
  from effjax.training import init_train_state, make_optimizer
  opt = make_optimizer(cfg.optim, cfg.train.steps)
  abstract = jax.eval_shape(lambda: init_train_state(cfg, jax.random.key(0), opt))
  state, data_state, step = restore(ckpt_dir, abstract, step)
  return state["params"], step


def split_examples(cfg: Config, name: str):
  """'valid' / 'train': the run's own held-out / training part of data.source; else a local file
  path or source string, evaluated whole."""
  from effjax import data as data_lib
  if name in ("valid", "train"):
    return data_lib.load_splits(cfg.data)[name]
  return data_lib.load_eval_split(name, cfg.data)


def evaluate_splits(cfg: Config, params, splits=None) -> dict:
  """{split: {"loss" (nats/token), "ppl", "bpb", "tokens"}}; bpb = bits per byte for the byte
  tokenizer (each target token is a byte or an EOS)."""
  from effjax import data as data_lib
  mesh = shd.make_mesh(1)
  eval_fn = jax.jit(make_eval_step(cfg.model))
  out = {}
  for name in (splits or cfg.eval.splits):
    ex = split_examples(cfg, name)
    batches = data_lib.eval_batches(ex, cfg.eval.batch_size, cfg.eval.max_batches)
    r = evaluate_loss(eval_fn, params, batches, mesh)
    r["ppl"] = math.exp(r["loss"])
    out[name] = r
  return out


@partial(jax.jit, static_argnames=("mcfg", "total_len", "top_k"))
def _sample_loop(mcfg: ModelConfig, params, buf_BL, prompt_len, rng, temperature, total_len: int,
                 top_k: int):
  # Condition on at most max_seq_len tokens: a window sliding over the fixed-size buffer.
  W = min(total_len, mcfg.max_seq_len)

  def body(pos, carry):
    buf, rng = carry
    start = jnp.maximum(pos - W, 0)
    window = jax.lax.dynamic_slice_in_dim(buf, start, W, axis=1)
    logits_BTV = model_lib.apply(mcfg, params, window)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, pos - start - 1, axis=1,
                                             keepdims=False).astype(jnp.float32)
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits_BV, sub, temperature, top_k).astype(buf.dtype)
    return buf.at[:, pos].set(tok), rng

  buf, _ = jax.lax.fori_loop(prompt_len, total_len, body, (buf_BL, rng))
  return buf


def sample(cfg: Config, params, prompt: str, num: int, length: int, temperature: float,
           top_k: int, seed: int = 0) -> list[str]:
  """Samples `num` continuations of `length` tokens after `prompt` (temperature 0 = greedy)."""
  from effjax.data import ByteTokenizer
  tok = ByteTokenizer()
  ids = tok.encode(prompt, add_bos=True)
  if len(ids) > cfg.model.max_seq_len:  # keep the prompt's end: the model sees max_seq_len tokens
    ids = ids[-cfg.model.max_seq_len:]
  total = len(ids) + length
  buf = np.zeros((num, total), np.int32)
  buf[:, :len(ids)] = ids
  out = _sample_loop(cfg.model, params, jnp.asarray(buf), len(ids), jax.random.key(seed),
                     jnp.float32(temperature), total, top_k)
  return [tok.decode(np.asarray(row[len(ids):])) for row in out]
