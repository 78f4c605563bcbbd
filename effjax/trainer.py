"""The resumable training loop behind `train.py`: run directory, DELT data order, jitted steps on
a ("data", "fsdp") mesh, evaluation, checkpoints, metrics and the loss plot.

The data iterator's position is saved next to the train state in every checkpoint, so a
restarted run sees exactly the batches it would have seen.
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
import yaml

from effjax import data as data_lib
from effjax import sharding as shd
from effjax.checkpoint import Checkpointer, atomic_write_text
from effjax.config import Config, to_dict
from effjax.data import delt
from effjax.training import (evaluate_loss, init_train_state, lr_schedule, make_eval_step,
                             make_optimizer, make_train_step)


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


class TrainingError(RuntimeError):
  """Training cannot start or had to stop; the message is one line, and no file was lost."""


def _check_resume_config(paths: RunPaths, cfg: Config) -> None:
  """A run directory may only be resumed with the same model/data/optimiser settings."""
  if not paths.config.exists():
    return
  try:
    old = yaml.safe_load(paths.config.read_text())
    if not isinstance(old, dict):
      raise ValueError("not a mapping")
  except (ValueError, yaml.YAMLError) as e:
    raise TrainingError(f"{paths.config} is unreadable ({type(e).__name__}); use another "
                        f"train.out_dir or pass --overwrite to start over") from e
  new = to_dict(cfg)
  for section in ("model", "data", "optim", "delt"):
    if old.get(section) != new.get(section):
      diff = sorted(k for k in set(old.get(section, {})) | set(new[section])
                    if old.get(section, {}).get(k) != new[section].get(k))
      raise TrainingError(
          f"{paths.out} holds a run with different {section} settings ({', '.join(f'{section}.{k}' for k in diff)}); "
          f"use another train.out_dir or pass --overwrite to start over")
  for k in ("batch_size", "grad_accum", "seed", "steps"):
    if k == "steps" and cfg.train.steps == 0 and cfg.data.epochs:
      continue  # derived from data.epochs (compared above) and the data; config.yaml holds it
    if old.get("train", {}).get(k) != new["train"][k]:
      raise TrainingError(f"{paths.out} holds a run with train.{k}={old.get('train', {}).get(k)}, "
                          f"now {new['train'][k]}: exact resume needs the same value")


def _is_run_dir(path: pathlib.Path) -> bool:
  """What --overwrite may delete: an empty directory or one train.py wrote (config.yaml or
  checkpoints/ in it)."""
  return path.is_dir() and (not any(path.iterdir()) or (path / "config.yaml").is_file()
                            or (path / "checkpoints").is_dir())


def _finished_summary(paths: RunPaths, cfg: Config) -> dict | None:
  """The run's summary.json if it records a finished run of cfg.train.steps steps (of
  data.epochs epochs when the steps are derived from them)."""
  try:
    summary = json.loads(paths.summary.read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(summary, dict) or not summary.get("finished"):
    return None
  if cfg.train.steps == 0 and cfg.data.epochs:
    return summary if summary.get("epochs") == cfg.data.epochs else None
  return summary if summary.get("step") == cfg.train.steps else None


def derive_steps(cfg: Config, n_train: int) -> Config:
  """The config a run trains with: unchanged without data.epochs; with data.epochs = E,
  train.steps = E * ceil(n_train / train.batch_size), the epoch-complete iterator's length
  (n_train: the ids one epoch visits, DELT's kept ids). TrainingError when train.steps names
  another count or optim.warmup_steps does not fit."""
  epochs = cfg.data.epochs
  if not epochs:
    return cfg
  steps = data_lib.epoch_steps(n_train, cfg.train.batch_size, epochs)
  if cfg.train.steps not in (0, steps):
    raise TrainingError(f"train.steps={cfg.train.steps}, but data.epochs={epochs} over {n_train} "
                        f"examples in batches of {cfg.train.batch_size} is {steps} steps: set "
                        f"train.steps=0 (derived) or {steps}")
  if cfg.optim.warmup_steps >= steps:
    raise TrainingError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be < the {steps} steps "
                        f"of data.epochs={epochs}")
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops metric lines past `step` (written after the checkpoint we resume from; the resumed
  run writes them again)."""
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  keep = []
  for l in lines:
    try:
      rec = json.loads(l)
    except ValueError:  # a line cut short by a killed process
      continue
    if isinstance(rec, dict) and rec.get("step", 0) <= step:
      keep.append(l)
  if keep != lines:
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def unigram_entropy(tokens: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Entropy (nats) of the empirical token distribution: the loss of the best context-free model."""
  t = tokens if mask is None else tokens[mask > 0]
  counts = np.bincount(t.ravel()).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


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


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


_ALL_FINITE = jax.jit(_all_finite)


def train(cfg: Config, *, overwrite: bool = False, stop_at_step: int | None = None,
          log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) training as configured. `stop_at_step` ends early after saving a checkpoint
  there, as if the run had been killed (used to test resume). Returns the summary dict.

  Nothing is lost: every check (the run directory, the config against a run being resumed, the
  data sources, the tokenizer, the model shapes, the device mesh, the DELT order) runs before
  anything is created or removed; `overwrite` deletes the old run only after they pass. A run
  that has finished says so and leaves its files as they are. A checkpoint that fails
  verification is moved to <out_dir>/rejected_checkpoints/ and the newest one that verifies is
  resumed. A non-finite loss stops training (TrainingError naming the step) before it is
  checkpointed or written as a result; result files are replaced atomically.
  """
  paths = RunPaths(pathlib.Path(cfg.train.out_dir))
  # ---- checks: nothing below writes until they all pass
  if paths.out.exists() and not paths.out.is_dir():
    raise TrainingError(f"train.out_dir {paths.out} exists and is not a directory")
  if paths.out.exists() and not _is_run_dir(paths.out):
    raise TrainingError(f"train.out_dir {paths.out} is a non-empty directory that holds no "
                        f"training run (no config.yaml or checkpoints/): refusing to "
                        f"{'delete' if overwrite else 'write into'} it")
  if not overwrite:
    _check_resume_config(paths, cfg)
    done = _finished_summary(paths, cfg)
    if done is not None:
      valid = done.get("valid_loss")
      log(f"{paths.out} is complete: step {done['step']} of {done.get('total_steps', done['step'])}"
          + (f", valid loss {valid:.4f} nats/token" if isinstance(valid, (int, float)) else "")
          + f" ({paths.summary}); nothing to do (--overwrite starts over)")
      return done

  mesh = shd.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp)
  n_data = shd.batch_devices(mesh)
  micro = cfg.train.batch_size // cfg.train.grad_accum
  if micro % n_data:
    raise ValueError(f"micro-batch train.batch_size/train.grad_accum = {micro} must be divisible by "
                     f"the {n_data} devices a batch is split over (data x fsdp)")

  splits = data_lib.load_splits(cfg.data)
  train_ex, valid_ex = splits["train"], splits["valid"]
  if len(train_ex) == 0:
    raise ValueError(f"data.source {cfg.data.source} gives no training examples of "
                     f"{cfg.data.seq_len} tokens")
  entropy = unigram_entropy(train_ex.tokens[:, 1:], train_ex.mask)

  # The model shapes are checked before DELT scoring runs; the state's shapes do not depend on
  # the schedule's length, which data.epochs may only fix once the DELT order is known.
  probe = make_optimizer(cfg.optim, max(cfg.train.steps, cfg.optim.warmup_steps + 1))
  state_sh = shd.state_shardings(
      jax.eval_shape(lambda rng: init_train_state(cfg, rng, probe), jax.random.key(0)), mesh)
  order, delt_info = delt.prepare_order(cfg, train_ex, log=log, progress=cfg.train.progress)
  n_epoch = len(order) if order is not None else len(train_ex)
  cfg = derive_steps(cfg, n_epoch)  # the steps of data.epochs; saved in config.yaml
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  make_state = lambda rng: init_train_state(cfg, rng, optimizer)

  # ---- act
  if overwrite and paths.out.exists():
    shutil.rmtree(paths.out)
    log(f"--overwrite: deleted the earlier run in {paths.out}")
  created = not paths.out.exists()
  try:
    paths.out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(paths.out, keep=cfg.train.keep_checkpoints)
    start_step, failures = ckpt.latest_verified(log)
    for bad in [s for s in ckpt.steps() if start_step is None or s > start_step]:
      dest = ckpt.set_aside(bad)
      log(f"moved checkpoint {ckpt.step_dir(bad)}, which fails verification, to {dest}")
    if failures:
      log(f"resuming from step {start_step}, the newest checkpoint that verifies"
          if start_step is not None else "no checkpoint verifies: starting from step 0")

    init_fn = jax.jit(make_state, out_shardings=state_sh)
    state = init_fn(jax.random.key(cfg.train.seed))
    data_state = None
    if start_step is not None:
      state, data_state, start_step = ckpt.restore(state, start_step)
      log(f"resuming from checkpoint at step {start_step} in {ckpt.dir}")
    start_step = start_step or 0
  except BaseException:
    if created and paths.out.exists() and not any(ckpt_files(paths.out)):
      shutil.rmtree(paths.out)  # a failed start leaves nothing behind
    raise
  _truncate_metrics(paths.metrics, start_step)
  config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
  if not paths.config.exists() or paths.config.read_text() != config_text:
    atomic_write_text(paths.config, config_text)

  it = data_lib.TrainIterator(train_ex, batch_size=cfg.train.batch_size,
                              ordering_kind=cfg.data.ordering,
                              seed=cfg.data.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed,
                              start_step=start_step, order=order, epochs=cfg.data.epochs or None)
  if data_state is not None:
    it.set_state(data_state)
  if cfg.data.epochs:
    left = n_epoch % cfg.train.batch_size
    log(f"{cfg.data.epochs} epochs x {it.steps_per_epoch} steps = {cfg.train.steps} steps over "
        f"{n_epoch} examples" + (f" (the last batch of each epoch holds {left} examples, padded)"
                                 if left else ""))

  step_fn, eval_fn = _compiled_steps(cfg, optimizer, mesh, state_sh)
  # The valid loss of training and of eval.py: the first eval.max_batches * eval.batch_size
  # examples of the valid split, whatever the device count (batches rounded up to a multiple of
  # the data axis; padding rows carry mask 0).
  n_eval = min(len(valid_ex), cfg.eval.max_batches * cfg.eval.batch_size)

  def run_eval(step, record=True):
    if n_eval == 0:  # data.valid_fraction = 0: nothing held out
      return None
    bs = -(-cfg.eval.batch_size // n_data) * n_data
    batches = data_lib.eval_batches(valid_ex.take(np.arange(n_eval)), bs)
    try:
      r = evaluate_loss(eval_fn, state["params"], batches, mesh)
    except FloatingPointError as e:
      raise TrainingError(f"{e} at step {step}: training stopped; {last_good()}") from e
    r.update(examples=n_eval, of_examples=len(valid_ex))
    if record:
      with paths.metrics.open("a") as f:
        f.write(json.dumps({"step": step, "valid_loss": r["loss"],
                            "valid_bits_per_byte": r["bits_per_byte"],
                            "valid_examples": n_eval, "unigram_entropy": entropy}) + "\n")
    return r

  saved = [start_step] if start_step else []

  def last_good():
    return (f"the last good checkpoint is step {saved[-1]} in {ckpt.dir}" if saved
            else "no checkpoint was saved")

  def check_finite(step, m, params=None):
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
      raise TrainingError(f"the loss became {loss} (gradient norm {gnorm}) at step {step}: "
                          f"training stopped; {last_good()}; lower optim.lr?")
    if params is not None and not bool(_ALL_FINITE(params)):
      raise TrainingError(f"the parameters became non-finite at step {step}: training stopped; "
                          f"{last_good()}; lower optim.lr?")
    return loss

  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  n_params = cfg.model.num_params()
  log(f"model {cfg.name}: {n_params / 1e6:.2f}M params | {len(train_ex.tokens)} train / "
      f"{len(valid_ex.tokens)} valid examples of {cfg.data.seq_len} tokens | mesh data="
      f"{mesh.shape['data']} x fsdp={mesh.shape['fsdp']} "
      f"({jax.default_backend()}) | unigram entropy {entropy:.3f} nats")

  end = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
  pbar = None
  if cfg.train.progress and start_step < end:
    from tqdm.auto import tqdm
    pbar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step",
                dynamic_ncols=True)
  t_last, step_last = time.perf_counter(), start_step
  last_valid = None
  step = start_step
  try:
    with paths.metrics.open("a") as mf:
      while step < end:
        batch = shd.shard_batch(next(it), mesh)
        state, m = step_fn(state, batch)
        step += 1
        save_now = step % cfg.train.checkpoint_every == 0 or step == end
        if step % cfg.train.log_every == 0 or step == end or save_now:
          loss = check_finite(step, m, state["params"] if save_now else None)  # one host sync
          now = time.perf_counter()
          tps = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          rec = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                 "lr": float(lr_schedule(cfg.optim, cfg.train.steps)(step - 1)),
                 "tokens_per_s": tps}
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
            pbar.write(f"step {step}: valid loss {last_valid['loss']:.4f} nats/token "
                       f"({last_valid['bits_per_byte']:.3f} bits/byte, first {n_eval} of "
                       f"{len(valid_ex)} valid examples)")
        if save_now:
          ckpt.save(step, state, it.get_state())
          saved.append(step)
  finally:
    if pbar is not None:
      pbar.close()
    ckpt.close()

  finished = step >= cfg.train.steps
  if finished and last_valid is None:  # resumed at the last step (killed before the summary)
    last_valid = run_eval(step, record=False)
  summary = {"name": cfg.name, "step": step, "finished": finished,
             "params": n_params, "unigram_entropy": entropy,
             "valid_loss": None if last_valid is None else last_valid["loss"],
             "valid_bits_per_byte": None if last_valid is None else last_valid["bits_per_byte"],
             "valid_examples": n_eval, "valid_split_examples": len(valid_ex),
             "checkpoint_dir": str(ckpt.dir), "metrics": str(paths.metrics),
             "train_examples": len(train_ex), "delt": delt_info,
             "epochs": cfg.data.epochs or None, "examples_per_epoch": n_epoch,
             "steps_per_epoch": it.steps_per_epoch if cfg.data.epochs else None,
             "total_steps": cfg.train.steps}
  if finished:
    plot_metrics(paths.metrics, paths.plot, title=f"{cfg.name}: {n_params / 1e6:.2f}M params")
    summary["plot"] = str(paths.plot)
    atomic_write_text(paths.summary, json.dumps(summary, indent=2))
  return summary


def ckpt_files(out: pathlib.Path):
  """Files under a run directory's checkpoints/ (any at all: the run is not an empty start)."""
  d = out / "checkpoints"
  return (p for p in d.rglob("*") if p.is_file()) if d.is_dir() else iter(())
