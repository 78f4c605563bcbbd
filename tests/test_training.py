"""Training loop: exact resume, checkpoints, gradient accumulation, data-parallel mesh, CLIs."""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from effjax.checkpoint import CheckpointError
from effjax.config import load_config
from effjax.trainer import TrainingError, train
from effjax.training import make_optimizer, make_train_step, init_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A model small enough that a dozen steps take seconds on 2 CPU cores.
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8", "optim.warmup_steps=2",
         "train.log_every=1", "train.progress=false", "eval.max_batches=2", "train.mesh_data=1"]


def cfg_for(out_dir, *extra):
  return load_config(ROOT / "configs/tiny.yaml", SMALL + [f"train.out_dir={out_dir}", *extra])


def losses(out_dir):
  rows = [json.loads(l) for l in (pathlib.Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def quiet(*_):
  pass


def test_resume_is_bit_identical(tmp_path):
  common = ["train.steps=12", "train.checkpoint_every=4", "train.eval_every=100"]
  full = train(cfg_for(tmp_path / "full", *common), log=quiet)
  assert full["finished"]
  # interrupted after step 6 (checkpointed there), then the same command again
  part = train(cfg_for(tmp_path / "resumed", *common), stop_at_step=6, log=quiet)
  assert not part["finished"] and part["step"] == 6
  msgs = []
  rest = train(cfg_for(tmp_path / "resumed", *common), log=msgs.append)
  assert rest["finished"] and any("resuming from checkpoint at step 6" in m for m in msgs)
  a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for s in range(1, 13):
    assert a[s] == b[s], (s, a[s], b[s])   # bit-identical, not merely close
  assert full["valid_loss"] == rest["valid_loss"]


def test_killed_process_resumes_with_same_losses(tmp_path):
  """SIGKILL a real train.py between checkpoints; rerunning the command continues exactly."""
  args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
          *SMALL, "train.steps=40", "train.checkpoint_every=5", "train.eval_every=100"]
  ref = train(cfg_for(tmp_path / "ref", "train.steps=40", "train.checkpoint_every=5",
                      "train.eval_every=100"), log=quiet)
  out = tmp_path / "killed"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  p = subprocess.Popen(args + [f"train.out_dir={out}"], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline:
    if (out / "metrics.jsonl").exists() and max(losses(out) or {0: 0}) >= 12:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = max(losses(out))
  assert killed_at < 40, "the run finished before it could be killed"
  r = subprocess.run(args + [f"train.out_dir={out}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming from checkpoint" in r.stdout + r.stderr
  a, b = losses(tmp_path / "ref"), losses(out)
  assert sorted(b) == list(range(1, 41))
  assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:3]
  assert ref["valid_loss"] == json.loads((out / "summary.json").read_text())["valid_loss"]


def test_corrupt_and_missing_checkpoints_give_clear_errors(tmp_path):
  cfg = cfg_for(tmp_path / "run", "train.steps=4", "train.checkpoint_every=4", "train.eval_every=100")
  train(cfg, log=quiet)
  from effjax.evaluation import load_params
  params, step = load_params(cfg, tmp_path / "run")
  assert step == 4
  with pytest.raises(CheckpointError, match="does not exist"):
    load_params(cfg, tmp_path / "nope")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    load_params(cfg, tmp_path / "empty")
  with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
    load_params(cfg, tmp_path / "run", step=3)
  # corrupt every array data file of the saved state: refused, never read as numbers
  files = [f for f in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*") if f.is_file()
           and f.stat().st_size > 0 and f.suffix not in (".json",) and "METADATA" not in f.name]
  assert files
  for f in files:
    f.write_bytes(b"\x00garbage" * 3)
  with pytest.raises(CheckpointError, match="is corrupt: file .* has 24 bytes"):
    load_params(cfg, tmp_path / "run")


def test_resume_with_changed_model_is_refused(tmp_path):
  train(cfg_for(tmp_path / "run", "train.steps=3", "train.eval_every=100"), log=quiet)
  with pytest.raises(TrainingError, match=r"model\.d_model"):
    train(cfg_for(tmp_path / "run", "train.steps=3", "train.eval_every=100", "model.d_model=64"),
          log=quiet)


def test_grad_accumulation_matches_full_batch(tmp_path):
  cfg1 = cfg_for(tmp_path, "model.compute_dtype=float32", "train.steps=5")
  cfg4 = cfg_for(tmp_path, "model.compute_dtype=float32", "train.steps=5", "train.grad_accum=4")
  opt = make_optimizer(cfg1.optim, 5)
  s1 = init_train_state(cfg1, jax.random.key(0), opt)
  s4 = jax.tree.map(lambda x: x, s1)
  f1, f4 = jax.jit(make_train_step(cfg1, opt)), jax.jit(make_train_step(cfg4, opt))
  rng = np.random.default_rng(0)
  for _ in range(3):
    t = rng.integers(0, 256, (8, 33)).astype(np.int32)
    mask = (rng.random((8, 32)) > 0.2).astype(np.float32)  # uneven masks across micro-batches
    b = {"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": mask}
    s1, m1 = f1(s1, b)
    s4, m4 = f4(s4, b)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  chex.assert_trees_all_close(s1["params"], s4["params"], rtol=1e-5, atol=1e-6)


def test_train_and_eval_cli(tmp_path, capsys):
  run = tmp_path / "cli"
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", *SMALL,
                      "train.steps=4", "train.eval_every=4", f"train.out_dir={run}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  for f in ("metrics.jsonl", "loss.png", "summary.json", "config.yaml"):
    assert (run / f).exists(), f
  txt = tmp_path / "extra.txt"
  txt.write_text("a held out line of text\nanother line, here.\n" * 40)
  r = subprocess.run([sys.executable, "eval.py", "--run", str(run), "eval.sample_len=20",
                      f"eval.splits=[valid, {txt}]", "eval.max_batches=2"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads((run / "eval.json").read_text())
  assert set(res["splits"]) == {"valid", str(txt)} and res["step"] == 4
  for s in res["splits"].values():
    assert np.isfinite(s["loss"]) and s["tokens"] > 0 and abs(s["ppl"] - np.exp(s["loss"])) < 1e-6
  assert len(res["samples"]) == 2 and all(len(s) > 0 for s in res["samples"])
  # clear errors, exit code 2, before any compute
  r = subprocess.run([sys.executable, "train.py", "model.n_layerz=3"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and "unknown config key 'model.n_layerz'" in r.stderr
  r = subprocess.run([sys.executable, "eval.py", "--run", str(tmp_path / "missing")], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "config.yaml" in r.stderr
  r = subprocess.run([sys.executable, "eval.py", "--run", str(run), "--drift", "2", "--block-size",
                      "16", "--budget", "32", "--local-tokens", "16"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and "fewer than the 3 forced ones" in r.stderr, r.stderr[-500:]
  eval_cli = importlib.import_module("eval")       # argument errors, in process (no compute)
  for flags, msg in ((["--prefill-densities", "0.5,2"], "--prefill-densities must be in"),
                     (["--prefill-densities", "0.5"], "need --prefill-gate"),
                     (["--prefill-densities", "0.5", "--prefill-selectors", "topk"],
                      "--prefill-selectors: choose")):
    with pytest.raises(SystemExit) as e:
      eval_cli.main(["--run", str(run), *flags])
    assert e.value.code == 2 and msg in capsys.readouterr().err
  r = subprocess.run([sys.executable, "eval.py", "--run", str(run), "decode.kv_cache=int3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "decode.kv_cache" in r.stderr, r.stderr[-500:]
  # the config's decode section chooses the decodings' KV cache; --kv-group overrides it
  r = subprocess.run([sys.executable, "eval.py", "--run", str(run), "--drift", "1", "--prompt-len",
                      "32", "--new-tokens", "8", "--block-size", "16", "--budget", "32",
                      "--kv-group", "16", "decode.kv_cache=int4", "eval.num_samples=0",
                      "eval.max_batches=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads((run / "eval.json").read_text())
  assert res["kv_cache"]["kind"] == "int4" and res["kv_cache"]["group"] == 16
  assert all(np.isfinite(x["nll"]) for x in res["drift"]["results"].values())


def test_sampling_beyond_context_and_greedy_determinism(tmp_path):
  """Samples longer than max_seq_len slide the window; greedy sampling equals argmax decoding."""
  import jax.numpy as jnp
  from effjax import evaluation
  from effjax.data import ByteTokenizer
  from effjax.model import forward, init_params
  cfg = cfg_for(tmp_path, "model.max_seq_len=32")
  params = init_params(cfg.model, jax.random.key(0))
  prompt = "the quick brown fox jumps over the lazy dog"   # 44 tokens: longer than the context
  out = evaluation.sample(cfg, params, prompt, num=2, length=24, temperature=0.0, top_k=0)
  assert len(out) == 2 and out[0] == out[1]
  # reproduce greedy decoding step by step on the host, always on the last 32 tokens
  ids = list(ByteTokenizer().encode(prompt, add_bos=True))
  n0 = len(ids)
  step = jax.jit(lambda w: jnp.argmax(forward(cfg.model, params, w)[0, -1]))
  for _ in range(24):
    ids.append(int(step(jnp.asarray([ids[-32:]], jnp.int32))))
  assert out[0] == ByteTokenizer().decode(ids[n0:])
  hot = evaluation.sample(cfg, params, "ab", num=3, length=20, temperature=1.0, top_k=5, seed=1)
  assert len(set(hot)) > 1  # different rows sample differently


def test_unigram_entropy():
  from effjax.trainer import unigram_entropy
  t = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
  p = np.array([0.25, 0.25, 0.5])
  np.testing.assert_allclose(unigram_entropy(t), -(p * np.log(p)).sum(), rtol=1e-12)
  mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])
  np.testing.assert_allclose(unigram_entropy(t, mask), np.log(2), rtol=1e-12)
  assert unigram_entropy(np.full((3, 5), 7)) == 0.0
