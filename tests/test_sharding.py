"""Data-parallel and FSDP meshes: the same losses on 1, 2, 4 and 8 (fake CPU) devices, state really
sharded, and a checkpoint restored onto a different mesh."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from jax.sharding import PartitionSpec as P

from effjax.sharding import param_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_param_spec_rule():
  assert param_spec((259, 128), 1) == P()
  assert param_spec((259, 128), 8) == P(None, "fsdp")        # 259 not divisible: the other dim
  assert param_spec((2, 64, 384), 4) == P(None, None, "fsdp")  # the largest divisible dim
  assert param_spec((128, 128), 4) == P("fsdp", None)          # tie: the first
  assert param_spec((6,), 4) == P() and param_spec((), 4) == P()


SCRIPT = r"""
import json, sys
sys.path.insert(0, ROOT)
import jax, numpy as np
assert len(jax.devices()) == 8, jax.devices()
from effjax.config import load_config
from effjax.trainer import train
from effjax.training import init_train_state, make_optimizer
from effjax import sharding as shd
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=16", "optim.warmup_steps=2",
         "train.log_every=1", "train.progress=false", "eval.max_batches=2", "train.steps=6",
         "train.eval_every=6", "train.checkpoint_every=3", "model.compute_dtype=float32"]
def run(tag, data, fsdp, stop=None):
  cfg = load_config(ROOT + "/configs/tiny.yaml", SMALL + [f"train.mesh_data={data}",
      f"train.mesh_fsdp={fsdp}", f"train.out_dir={TMP}/{tag}"])
  s = train(cfg, stop_at_step=stop, log=lambda *_: None)
  rows = [json.loads(l) for l in open(f"{TMP}/{tag}/metrics.jsonl")]
  return {"loss": [r["loss"] for r in rows if "loss" in r], "valid": s["valid_loss"]}
# data parallel, hybrid and pure FSDP (2- and 4-way data parallel ran here until 2026-11-30: the
# 8-way and the 2 x 4 meshes cover them, and CI time is short)
out = {f"{d}x{f}": run(f"m{d}x{f}", d, f) for d, f in [(1, 1), (8, 1), (2, 4), (1, 8)]}
# interrupted on 8-way data parallel, resumed on a 2 x 4 FSDP mesh
run("moved", 8, 1, stop=3)
out["moved"] = run("moved", 2, 4)
# the FSDP mesh really shards: per-device bytes of the state
cfg = load_config(ROOT + "/configs/tiny.yaml", SMALL)
opt = make_optimizer(cfg.optim, 6)
make = lambda r: init_train_state(cfg, r, opt)
mesh = shd.make_mesh(1, 8)
st = jax.jit(make, out_shardings=shd.state_shardings(jax.eval_shape(make, jax.random.key(0)), mesh))(jax.random.key(0))
full = sum(x.size for x in jax.tree.leaves(st["params"]))
local = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in jax.tree.leaves(st["params"]))
out["param_fraction_per_device"] = local / full
# a checkpoint saved from the 2 x 4 FSDP mesh loads for evaluation on one device
from effjax.evaluation import load_params
cfg_m = load_config(ROOT + "/configs/tiny.yaml", SMALL + ["train.mesh_data=2", "train.mesh_fsdp=4",
                                                          f"train.out_dir={TMP}/m2x4"])
p, step = load_params(cfg_m, f"{TMP}/m2x4")
out["eval_restore_step"] = step
out["eval_restore_devices"] = len(jax.tree.leaves(p)[0].sharding.device_set)
print("RESULT" + json.dumps(out))
"""


def test_meshes_match_one_device_and_restore_on_another_mesh(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  code = SCRIPT.replace("ROOT", repr(str(ROOT))).replace("TMP", repr(str(tmp_path)))
  code = code.replace("ROOT + ", repr(str(ROOT)) + " + ")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.split("RESULT")[-1])
  ref = res["1x1"]
  assert len(ref["loss"]) == 6
  for mesh in ("8x1", "2x4", "1x8", "moved"):
    np.testing.assert_allclose(res[mesh]["loss"], ref["loss"], rtol=2e-5, err_msg=mesh)
    np.testing.assert_allclose(res[mesh]["valid"], ref["valid"], rtol=2e-5, err_msg=mesh)
  # most parameters are split 8 ways (norm scales and the odd-sized embedding rows aside)
  assert res["param_fraction_per_device"] < 0.3, res["param_fraction_per_device"]
  assert res["eval_restore_step"] == 6 and res["eval_restore_devices"] == 1


SCORING = r"""
import sys
sys.path.insert(0, ROOT)
import jax, numpy as np
from effjax.config import ModelConfig
from effjax.data import scoring
from effjax.data.packing import Examples
from effjax.model import init_params
from effjax import sharding as shd
cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32, compute_dtype="float32")
params = init_params(cfg, jax.random.key(0))
rng = np.random.default_rng(0)
ex = Examples(rng.integers(0, 256, (20, 17)).astype(np.int32), np.ones((20, 16), np.float32))
lam = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
fns = scoring.ScoringFns(cfg)
n1, d1 = scoring.example_stats(fns, params, ex, lam, chunk=8)
n8, d8 = scoring.example_stats(fns, params, ex, lam, chunk=8, mesh=shd.make_mesh(-1, 1))
np.testing.assert_allclose(n8, n1, rtol=1e-5)
np.testing.assert_allclose(d8, d1, rtol=1e-4, atol=1e-6)
print("OK")
"""


def test_per_example_scoring_sharded_over_examples():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SCORING.replace("ROOT", repr(str(ROOT)))], env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
