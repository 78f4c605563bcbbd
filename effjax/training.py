"""Jitted train step, optimiser, and the resumable training loop behind `train.py`.

State is an explicit pytree `{"step", "params", "opt_state"}`; the data iterator's position is saved
next to it in every checkpoint, so a restarted run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from effjax import model as model_lib
from effjax import sharding as shd
from effjax.checkpoint import Checkpointer, CheckpointError
from effjax.config import Config, ModelConfig, OptimConfig, to_dict

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
  logits_BTV = model_lib.apply(mcfg, params, batch["inputs"])
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
  def eval_step(params, batch):
    return token_losses(mcfg, params, batch)
  return eval_step


# ----------------------------------------------------------------------------------------------
# the training loop


_STEP_CACHE: dict = {}


def _compiled_steps(cfg: Config, optimizer, mesh, state_sh):
  """Jitted (train_step, eval_step), shared by runs with the same model / optimiser / schedule /
  mesh in one process (e.g. an experiment's seeds), so each compiles once. state_sh: the train
  state's shardings (params and optimiser state sharded over fsdp)."""
  key = (cfg.model, cfg.optim, cfg.train.steps, cfg.train.grad_accum, mesh)
  if key not in _STEP_CACHE:
    repl, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    _STEP_CACHE[key] = (
        jax.jit(make_train_step(cfg, optimizer), in_shardings=(state_sh, bsh),
                out_shardings=(state_sh, repl), donate_argnums=0),
        jax.jit(make_eval_step(cfg.model), in_shardings=(state_sh["params"], bsh)))
  return _STEP_CACHE[key]


@dataclasses.dataclass
class RunPaths:
  out: pathlib.Path

  @property
  def metrics(self): return self.out / "metrics.jsonl"
  @property
  def config(self): return self.out / "config.yaml"
  @property
  def plot(self): return self.out / "loss.png"
  @property
  def summary(self): return self.out / "summary.json"


def _check_resume_config(paths: RunPaths, cfg: Config) -> None:
  """A run directory may only be resumed with the same model/data/optimiser settings."""
  if not paths.config.exists():
    return
  old = yaml.safe_load(paths.config.read_text())
  new = to_dict(cfg)
  for section in ("model", "data", "optim", "delt"):
    if old.get(section) != new.get(section):
      diff = sorted(k for k in set(old.get(section, {})) | set(new[section])
                    if old.get(section, {}).get(k) != new[section].get(k))
      raise CheckpointError(
          f"{paths.out} holds a run with different {section} settings ({', '.join(f'{section}.{k}' for k in diff)}); "
          f"use another train.out_dir or pass --overwrite to start over")
  for k in ("batch_size", "grad_accum", "seed", "steps"):
    if old["train"].get(k) != new["train"][k]:
      raise CheckpointError(f"{paths.out} holds a run with train.{k}={old['train'].get(k)}, "
                            f"now {new['train'][k]}: exact resume needs the same value")


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops metric lines past `step` (written after the checkpoint we resume from)."""
  if not path.exists():
    return
  keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
  path.write_text("".join(l + "\n" for l in keep))


def unigram_entropy(tokens: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Entropy (nats) of the empirical token distribution: the loss of the best context-free model."""
  t = tokens if mask is None else tokens[mask > 0]
  counts = np.bincount(t.ravel()).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def evaluate_loss(eval_step, params, batches, mesh) -> dict:
  """Mean masked NLL over `batches` -> {"loss" (nats/token), "bpb" (bits per target token), "tokens"}."""
  tot, cnt = 0.0, 0.0
  for b in batches:
    n = shd.batch_devices(mesh)
    rows = b["inputs"].shape[0]
    if rows % n:  # pad the last partial batch with masked rows so it shards evenly
      pad = n - rows % n
      b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
    s, c = eval_step(params, shd.shard_batch(b, mesh))
    tot, cnt = tot + float(s), cnt + float(c)
  loss = tot / max(cnt, 1.0)
  return {"loss": loss, "bpb": loss / math.log(2), "tokens": cnt}


def plot_metrics(metrics_path: pathlib.Path, out_png: pathlib.Path, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
  tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  va = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  if tr:
    ax.plot(*zip(*tr), label="train loss", lw=1.2)
  if va:
    ax.plot(*zip(*va), "o-", label="valid loss", lw=1.5)
  unigram = [r["unigram_entropy"] for r in rows if "unigram_entropy" in r]
  if unigram:
    ax.axhline(unigram[-1], ls="--", c="gray", label=f"unigram entropy ({unigram[-1]:.2f})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png)
  plt.close(fig)


def train(cfg: Config, *, overwrite: bool = False, stop_at_step: int | None = None,
          log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) training as configured. `stop_at_step` ends early after saving a checkpoint
  there, as if the run had been killed (used to test resume). Returns the summary dict."""
  from effjax import data as data_lib  # the data stack (grain) is only needed for real runs

  paths = RunPaths(pathlib.Path(cfg.train.out_dir))
  if overwrite and paths.out.exists():
    shutil.rmtree(paths.out)
  paths.out.mkdir(parents=True, exist_ok=True)
  _check_resume_config(paths, cfg)

  mesh = shd.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp)
  n_data = shd.batch_devices(mesh)
  micro = cfg.train.batch_size // cfg.train.grad_accum
  if micro % n_data:
    raise ValueError(f"micro-batch train.batch_size/train.grad_accum = {micro} must be divisible by "
                     f"the {n_data} devices a batch is split over (data x fsdp)")

  splits = data_lib.load_splits(cfg.data)
  train_ex, valid_ex = splits["train"], splits["valid"]
  entropy = unigram_entropy(train_ex.tokens[:, 1:], train_ex.mask)

  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  make_state = lambda rng: init_train_state(cfg, rng, optimizer)
  state_sh = shd.state_shardings(jax.eval_shape(make_state, jax.random.key(0)), mesh)
  init_fn = jax.jit(make_state, out_shardings=state_sh)
  state = init_fn(jax.random.key(cfg.train.seed))

  ckpt = Checkpointer(paths.out, keep=cfg.train.keep_checkpoints)
  start_step, data_state = 0, None
  if ckpt.latest_step() is not None:
    state, data_state, start_step = ckpt.restore(state)
    log(f"resuming from checkpoint at step {start_step} in {ckpt.dir}")
  _truncate_metrics(paths.metrics, start_step)
  paths.config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

  from effjax.data import delt
  order, delt_info = delt.prepare_order(cfg, train_ex, log=log, progress=cfg.train.progress)
  it = data_lib.TrainIterator(train_ex, batch_size=cfg.train.batch_size,
                              ordering_kind=cfg.data.ordering,
                              seed=cfg.data.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed,
                              start_step=start_step, order=order)
  if data_state is not None:
    it.set_state(data_state)

  step_fn, eval_fn = _compiled_steps(cfg, optimizer, mesh, state_sh)

  def run_eval(step):
    if len(valid_ex) == 0:  # data.valid_fraction = 0: nothing held out
      return None
    # The same examples whatever the device count: the first eval_batches * eval.batch_size, in
    # batches rounded up to a multiple of the data axis (padding rows carry mask 0).
    n_eval = min(len(valid_ex), cfg.train.eval_batches * cfg.eval.batch_size)
    bs = -(-cfg.eval.batch_size // n_data) * n_data
    batches = data_lib.eval_batches(valid_ex.take(np.arange(n_eval)), bs)
    r = evaluate_loss(eval_fn, state["params"], batches, mesh)
    with paths.metrics.open("a") as f:
      f.write(json.dumps({"step": step, "valid_loss": r["loss"], "valid_bpb": r["bpb"],
                          "unigram_entropy": entropy}) + "\n")
    return r

  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  n_params = cfg.model.num_params()
  log(f"model {cfg.name}: {n_params / 1e6:.2f}M params | {len(train_ex.tokens)} train / "
      f"{len(valid_ex.tokens)} valid examples of {cfg.data.seq_len} tokens | mesh data="
      f"{mesh.shape['data']} x fsdp={mesh.shape['fsdp']} "
      f"({jax.default_backend()}) | unigram entropy {entropy:.3f} nats")

  end = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
  pbar = None
  if cfg.train.progress:
    from tqdm.auto import tqdm
    pbar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step",
                dynamic_ncols=True)
  t_last, step_last = time.perf_counter(), start_step
  last_valid = None
  step = start_step
  with paths.metrics.open("a") as mf:
    while step < end:
      batch = shd.shard_batch(next(it), mesh)
      state, m = step_fn(state, batch)
      step += 1
      if step % cfg.train.log_every == 0 or step == end:
        loss = float(m["loss"])  # the one host sync per log interval
        if not math.isfinite(loss):
          raise FloatingPointError(f"loss became {loss} at step {step}; lower optim.lr?")
        now = time.perf_counter()
        tps = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        rec = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
               "lr": float(lr_schedule(cfg.optim, cfg.train.steps)(step - 1)), "tokens_per_s": tps}
        mf.write(json.dumps(rec) + "\n")
        mf.flush()
        if pbar is not None:
          pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
      if pbar is not None:
        pbar.update(1)
      if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
        mf.flush()
        last_valid = run_eval(step) or last_valid
        if pbar is not None and last_valid is not None:
          pbar.write(f"step {step}: valid loss {last_valid['loss']:.4f} nats "
                     f"({last_valid['bpb']:.3f} bits/token)")
      if step % cfg.train.checkpoint_every == 0 or step == end:
        ckpt.save(step, state, it.get_state())
  if pbar is not None:
    pbar.close()
  ckpt.close()

  summary = {"name": cfg.name, "step": step, "finished": step >= cfg.train.steps,
             "params": n_params, "unigram_entropy": entropy,
             "valid_loss": None if last_valid is None else last_valid["loss"],
             "valid_bpb": None if last_valid is None else last_valid["bpb"],
             "checkpoint_dir": str(ckpt.dir), "metrics": str(paths.metrics),
             "train_examples": len(train_ex), "delt": delt_info}
  if summary["finished"]:
    plot_metrics(paths.metrics, paths.plot, title=f"{cfg.name}: {n_params / 1e6:.2f}M params")
    summary["plot"] = str(paths.plot)
    paths.summary.write_text(json.dumps(summary, indent=2))
  return summary
