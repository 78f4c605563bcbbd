"""Fault injection: effjax never destroys a run's files and never reports garbage as a result.

Each case damages a run (or its inputs) the way a crash, a disk or a user can, runs train.py /
eval.py, and checks for a one-line error or a correct fall-back, and that no earlier checkpoint
or result file changed (SHA-256 of every file before and after).
"""

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from effjax import trainer as trainer_lib
from effjax.checkpoint import MANIFEST, CheckpointError, Checkpointer, restore, verify
from effjax.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8", "optim.warmup_steps=2",
         "train.log_every=1", "train.progress=false", "eval.max_batches=2", "train.mesh_data=1",
         "train.steps=6", "train.checkpoint_every=2", "train.eval_every=3", "eval.num_samples=0"]


def _load(script: str):
  spec = importlib.util.spec_from_file_location(f"cli_{script[:-3]}", ROOT / script)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


TRAIN, EVAL = _load("train.py"), _load("eval.py")


def train_cli(run, *extra):
  return TRAIN.main(["--config", str(ROOT / "configs/tiny.yaml"), *SMALL,
                     f"train.out_dir={run}", *extra])


def eval_cli(run, *extra):
  return EVAL.main(["--run", str(run), *extra])


def cfg_for(run, *extra):
  return load_config(ROOT / "configs/tiny.yaml", SMALL + [f"train.out_dir={run}", *extra])


def snapshot(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def metric_lines(run):
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
  for r in rows:
    r.pop("tokens_per_s", None)  # wall time
  return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A finished run (checkpoints 2, 4, 6, summary.json, eval.json) and a run stopped at step 4."""
  base = tmp_path_factory.mktemp("runs")
  assert train_cli(base / "finished") == 0
  assert eval_cli(base / "finished") == 0
  trainer_lib.train(cfg_for(base / "partial"), stop_at_step=4, log=lambda *_: None)
  return base


def copy_of(runs, name, tmp_path) -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(runs / name, dst)
  return dst


def array_file(run, step) -> pathlib.Path:
  """The largest array data file of a checkpoint's state."""
  files = [p for p in (run / "checkpoints" / str(step) / "state").rglob("*")
           if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


# -- validate, then act ---------------------------------------------------------------------------

def test_unreadable_source_against_a_run_changes_nothing(runs, tmp_path, capsys):
  run = copy_of(runs, "finished", tmp_path)
  before = snapshot(run)
  assert train_cli(run, "data.source=/nonexistent.txt") == 2
  assert "different data settings" in one_error_line(capsys)
  assert train_cli(run, "--overwrite", "data.source=/nonexistent.txt") == 2
  assert "/nonexistent.txt" in one_error_line(capsys)
  assert snapshot(run) == before  # --overwrite deleted nothing: the check failed first


def test_failed_start_leaves_no_directory(tmp_path, capsys):
  assert train_cli(tmp_path / "fresh", "data.source=/nonexistent.txt") == 2
  one_error_line(capsys)
  assert not (tmp_path / "fresh").exists()
  assert train_cli(tmp_path / "a" / "b", "model.n_heads=3") == 2  # bad shapes: config check
  one_error_line(capsys)
  assert not (tmp_path / "a").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
  d = tmp_path / "notes"
  d.mkdir()
  (d / "thesis.tex").write_text("years of work")
  assert train_cli(d, "--overwrite") == 2
  assert "holds no training run" in one_error_line(capsys)
  assert (d / "thesis.tex").read_text() == "years of work"


def test_changed_config_on_resume_is_refused(runs, tmp_path, capsys):
  run = copy_of(runs, "partial", tmp_path)
  before = snapshot(run)
  assert train_cli(run, "model.d_model=64") == 2
  assert "model.d_model" in one_error_line(capsys)
  assert train_cli(run, "train.seed=5") == 2
  assert "train.seed" in one_error_line(capsys)
  (run / "config.yaml").write_text("{{{ not yaml")
  before["config.yaml"] = snapshot(run)["config.yaml"]
  assert train_cli(run) == 2
  assert "config.yaml is unreadable" in one_error_line(capsys)
  assert snapshot(run) == before


def test_rerunning_a_finished_run_changes_nothing(runs, tmp_path, capsys):
  run = copy_of(runs, "finished", tmp_path)
  before = snapshot(run)
  assert train_cli(run) == 0
  out = capsys.readouterr().out
  assert "is complete: step 6 of 6, valid loss" in out
  assert snapshot(run) == before


# -- verified checkpoints -------------------------------------------------------------------------

def _damage(run, step, how):
  f = array_file(run, step)
  if how == "flip":
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
  elif how == "random4k":  # garbled, same size
    n = f.stat().st_size
    f.write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
  elif how == "truncate":
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif how == "no_manifest":
    (run / "checkpoints" / str(step) / MANIFEST).unlink()
  elif how == "bad_manifest":
    (run / "checkpoints" / str(step) / MANIFEST).write_text('{"format": "effjax-check')
  elif how == "extra_file":
    (f.parent / "stray").write_bytes(b"\x00" * 16)
  elif how == "missing_file":
    f.unlink()
  return f


DAMAGE = {"flip": "does not match its checksum", "random4k": "does not match its checksum",
          "truncate": "bytes, ", "no_manifest": "incomplete", "bad_manifest": "unreadable",
          "extra_file": "not written by its save", "missing_file": "is missing"}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_eval_refuses_a_damaged_checkpoint(runs, tmp_path, capsys, how):
  run = copy_of(runs, "finished", tmp_path)
  _damage(run, 6, how)
  before = snapshot(run)
  assert eval_cli(run) == 2
  line = one_error_line(capsys)
  assert "checkpoints/6" in line and DAMAGE[how] in line and "steps [2, 4]" in line, line
  assert snapshot(run) == before  # eval.json kept: nothing was written
  assert eval_cli(run, "--step", "4", "--out", str(tmp_path / "e4.json")) == 0  # others still fine


@pytest.mark.parametrize("how", ["flip", "truncate", "no_manifest"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(runs, tmp_path, how):
  """Damage the latest checkpoint of an unfinished run: resume moves it aside (bytes intact),
  restarts from the one before, and ends exactly as an undisturbed run."""
  run = copy_of(runs, "partial", tmp_path)
  _damage(run, 4, how)
  before = snapshot(run)
  msgs = []
  summary = trainer_lib.train(cfg_for(run), log=msgs.append)
  assert summary["finished"]
  assert any("fails verification" in m and "rejected_checkpoints/4" in m for m in msgs), msgs
  assert any("resuming from step 2, the newest checkpoint that verifies" in m for m in msgs)
  after = snapshot(run)
  for k, h in before.items():  # the earlier checkpoint untouched, the damaged one kept aside
    if k.startswith("checkpoints/2/"):
      assert after[k] == h, k
    if k.startswith("checkpoints/4/"):
      assert after["rejected_checkpoints/4/" + k[len("checkpoints/4/"):]] == h, k
  assert metric_lines(run) == metric_lines(runs / "finished")  # the same run, step for step
  ref = json.loads((runs / "finished" / "summary.json").read_text())
  assert summary["valid_loss"] == ref["valid_loss"]


def test_deleted_checkpoints(runs, tmp_path, capsys):
  run = copy_of(runs, "partial", tmp_path)
  shutil.rmtree(run / "checkpoints" / "4")
  msgs = []
  assert trainer_lib.train(cfg_for(run), log=msgs.append)["finished"]
  assert any("resuming from checkpoint at step 2" in m for m in msgs)
  assert metric_lines(run) == metric_lines(runs / "finished")
  fin = copy_of(runs, "finished", tmp_path)
  shutil.rmtree(fin / "checkpoints")
  before = snapshot(fin)
  assert eval_cli(fin) == 2
  assert "no checkpoint directory" in one_error_line(capsys)
  assert eval_cli(runs / "finished", "--step", "5") == 2
  assert "no checkpoint for step 5" in one_error_line(capsys)
  assert train_cli(fin) == 0  # finished: says so, does not retrain over its results
  assert "is complete" in capsys.readouterr().out
  assert snapshot(fin) == before


def test_restore_errors_are_one_line(runs, tmp_path, capsys):
  run = copy_of(runs, "finished", tmp_path)
  assert eval_cli(run, "model.d_model=64") == 2  # a checkpoint of another shape
  line = one_error_line(capsys)
  assert "cannot be restored into this model config: ValueError: Requested shape" in line, line
  assert len(line) < 300 + len(str(run)), line


_KILL = """
import os, signal, sys
sys.path.insert(0, {root!r})
from effjax import checkpoint, trainer
from effjax.config import load_config
where = {where!r}
real_save, real_replace = checkpoint.Checkpointer.save, checkpoint.os.replace
def save(self, step, state, data_state):
  if step == 4 and where == "before_manifest":  # every Orbax file written, the manifest not
    self._mngr.save(step, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardSave(state),
        data=checkpoint.ocp.args.JsonSave(data_state)), force=True)
    self._mngr.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
  real_save(self, step, state, data_state)
def replace(src, dst):  # the manifest written to its temporary file, not yet renamed
  if where == "mid_manifest" and str(dst).endswith("/4/" + checkpoint.MANIFEST):
    os.kill(os.getpid(), signal.SIGKILL)
  real_replace(src, dst)
checkpoint.Checkpointer.save = save
checkpoint.os.replace = replace
trainer.train(load_config({root!r} + "/configs/tiny.yaml", {overrides!r}), log=print)
"""


@pytest.mark.parametrize("where", ["before_manifest", "mid_manifest"])
def test_sigkill_during_a_checkpoint_save(runs, tmp_path, capsys, where):
  run = tmp_path / "killed"
  code = _KILL.format(root=str(ROOT), where=where, overrides=SMALL + [f"train.out_dir={run}"])
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
  with pytest.raises(CheckpointError, match="incomplete"):
    verify(run / "checkpoints" / "4")
  step2 = {k: v for k, v in snapshot(run).items() if k.startswith("checkpoints/2/")}
  assert eval_cli(run) == 2
  assert "checkpoints/4 is incomplete" in one_error_line(capsys)
  msgs = []
  assert trainer_lib.train(cfg_for(run), log=msgs.append)["finished"]
  assert any("resuming from step 2" in m for m in msgs), msgs
  assert {k: v for k, v in snapshot(run).items() if k.startswith("checkpoints/2/")} == step2
  assert metric_lines(run) == metric_lines(runs / "finished")


# -- never a garbage result -----------------------------------------------------------------------

@pytest.mark.parametrize("what", ["loss", "params"])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(runs, tmp_path, monkeypatch, what):
  """A NaN in the loss (step 5), or in the parameters after a checkpoint step's update (step 4,
  whose reported loss is still finite): training stops naming the step; nothing non-finite is
  saved or written."""
  run = copy_of(runs, "partial", tmp_path) if what == "loss" else tmp_path / "fresh"
  real = trainer_lib.make_train_step

  def poisoned(cfg, optimizer):
    step_fn = real(cfg, optimizer)

    def step(state, batch):
      new, m = step_fn(state, batch)
      hit = new["step"] == (5 if what == "loss" else 4)
      if what == "loss":
        m = {**m, "loss": jnp.where(hit, jnp.nan, m["loss"])}
      else:
        new = {**new, "params": jax_tree_map(lambda x: jnp.where(hit, jnp.nan, x), new["params"])}
      return new, m
    return step

  monkeypatch.setattr(trainer_lib, "make_train_step", poisoned)
  monkeypatch.setattr(trainer_lib, "_STEP_CACHE", {})
  before = snapshot(run) if run.exists() else {}
  with pytest.raises(trainer_lib.TrainingError) as e:
    trainer_lib.train(cfg_for(run), log=lambda *_: None)
  msg = str(e.value)
  if what == "loss":
    assert "loss became nan" in msg and "at step 5" in msg and "last good checkpoint is step 4" in msg
  else:
    assert "parameters became non-finite at step 4" in msg and "last good checkpoint is step 2" in msg
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
  assert steps == ([2, 4] if what == "loss" else [2])
  assert not (run / "summary.json").exists()
  after = snapshot(run)
  # metrics.jsonl gains the lines of steps 5 / 6; config.yaml names this copy's train.out_dir
  assert all(after[k] == h for k, h in before.items() if k not in ("metrics.jsonl", "config.yaml")), \
      [k for k, h in before.items() if after.get(k) != h]


def jax_tree_map(f, tree):
  import jax
  return jax.tree.map(f, tree)


def test_eval_of_non_finite_parameters_writes_nothing(runs, tmp_path, capsys):
  run = copy_of(runs, "finished", tmp_path)
  cfg = cfg_for(run)
  from effjax.training import init_train_state, make_optimizer
  import jax
  opt = make_optimizer(cfg.optim, cfg.train.steps)
  abstract = jax.eval_shape(lambda: init_train_state(cfg, jax.random.key(0), opt))
  state, data_state, _ = restore(run / "checkpoints", abstract, 6)
  state["params"] = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), state["params"])
  ck = Checkpointer(run, keep=10)
  ck.save(8, state, data_state)  # a checkpoint that verifies, holding inf
  ck.close()
  before = snapshot(run)
  assert eval_cli(run) == 2
  line = one_error_line(capsys)
  assert "evaluation loss is" in line and "'valid'" in line and "nothing written" in line, line
  assert snapshot(run) == before


def test_result_files_are_written_atomically(tmp_path, monkeypatch):
  """A failure while a result file is written leaves the old file whole."""
  from effjax import checkpoint
  p = tmp_path / "summary.json"
  p.write_text('{"good": true}')

  def fail(*_):
    raise OSError("disk full")
  monkeypatch.setattr(checkpoint.os, "replace", fail)
  with pytest.raises(OSError):
    checkpoint.atomic_write_text(p, '{"good": fal')
  assert p.read_text() == '{"good": true}' and list(tmp_path.iterdir()) == [p]


# -- one definition of the reported loss ----------------------------------------------------------

def test_training_and_eval_report_the_same_valid_loss(runs):
  run = runs / "finished"
  summary = json.loads((run / "summary.json").read_text())
  ev = json.loads((run / "eval.json").read_text())["splits"]["valid"]
  assert summary["valid_loss"] == pytest.approx(ev["loss"], rel=1e-6)
  assert summary["valid_bits_per_byte"] == pytest.approx(ev["bits_per_byte"], rel=1e-6)
  assert summary["valid_examples"] == ev["examples"] == 32
  assert summary["valid_split_examples"] == ev["of_examples"]
  assert ev["bits_per_byte"] == pytest.approx(ev["loss"] * ev["tokens"] / np.log(2) / ev["bytes"])


def test_bits_per_byte_counts_bytes_not_tokens():
  """EOS / BOS targets cost bits but are not bytes of text; masked targets count for neither."""
  import jax
  from effjax import sharding as shd
  from effjax.data.tokenizer import BOS_ID, EOS_ID
  from effjax.model import init_params
  from effjax.training import evaluate_loss, make_eval_step, token_losses
  cfg = cfg_for("unused")
  params = init_params(cfg.model, jax.random.key(0))
  rng = np.random.default_rng(0)
  t = rng.integers(0, 256, (4, 33)).astype(np.int32)
  t[0, 10], t[1, 20], t[2, 5] = EOS_ID, EOS_ID, BOS_ID
  mask = np.ones((4, 32), np.float32)
  mask[3, 16:] = 0
  batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": mask}
  r = evaluate_loss(jax.jit(make_eval_step(cfg.model)), params, [batch], shd.make_mesh(1))
  nll, n = token_losses(cfg.model, params, batch)
  assert r["tokens"] == 4 * 32 - 16 and r["bytes"] == r["tokens"] - 3
  assert r["loss"] == pytest.approx(float(nll) / float(n), rel=1e-4)  # jit vs eager bf16
  assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / np.log(2) / r["bytes"],
                                             rel=1e-12)
