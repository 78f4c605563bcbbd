"""GPU-only checks (run on the device machine with `pytest -m gpu`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig, load_config
from effjax.model import apply, attention, init_params

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_gpu():
  if jax.default_backend() != "gpu":
    pytest.fail("gpu tests need a GPU backend (run them on the device machine)")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("shape", [(2, 1000, 8, 4, 128), (1, 2048, 16, 4, 64), (3, 257, 8, 8, 64)])
def test_cudnn_attention_matches_reference(shape):
  B, T, N, K, H = shape
  kq, kk, kv, kg = jax.random.split(jax.random.key(T), 4)
  q = jax.random.normal(kq, (B, T, N, H), jnp.bfloat16)
  k = jax.random.normal(kk, (B, T, K, H), jnp.bfloat16)
  v = jax.random.normal(kv, (B, T, K, H), jnp.bfloat16)
  ref = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                  implementation="xla")
  out = attention(q, k, v, implementation="cudnn")
  assert out.dtype == jnp.bfloat16
  assert _rel(out, ref) < 1e-2
  # gradients too: the train step differentiates through cuDNN
  g = jax.random.normal(kg, out.shape, jnp.float32)
  f = lambda impl, *x: jnp.sum(attention(*x, implementation=impl).astype(jnp.float32) * g)
  g_ref = jax.grad(lambda *x: f("xla", *x), argnums=(0, 1, 2))(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  g_out = jax.grad(lambda *x: f("cudnn", *x), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_out, g_ref):
    assert _rel(a, b) < 2e-2


def test_auto_picks_cudnn_for_bf16_on_gpu():
  from effjax.model.attention import resolve_implementation
  assert resolve_implementation("auto", jnp.bfloat16) == "cudnn"
  assert resolve_implementation("auto", jnp.float32) == "xla"


def test_model_cudnn_matches_xla_logits():
  base = dict(d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512,
              compute_dtype="bfloat16")
  params = init_params(ModelConfig(**base), jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 384), 0, 259)
  lx = apply(ModelConfig(**base, attention_impl="xla"), params, toks)
  lc = apply(ModelConfig(**base, attention_impl="cudnn"), params, toks)
  assert _rel(lc, lx) < 2e-2


def test_short_training_run_on_gpu(tmp_path):
  from effjax.training import train
  cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path}/run", "train.steps=150",
                                          "train.progress=false", "train.eval_every=150",
                                          "train.checkpoint_every=150"])
  s = train(cfg, log=lambda *_: None)
  assert s["finished"] and s["valid_loss"] < s["unigram_entropy"] - 0.5


def test_decode_and_sparse_steps_with_triton_kernels_match_xla():
  """The model's decode path through the compiled Pallas-Triton kernels equals the XLA reference."""
  from effjax import decoding
  from effjax.sparse import resa
  cfg = ModelConfig(d_model=256, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=1024,
                    compute_dtype="bfloat16")
  params = init_params(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 500), 0, 256)
  lengths = jnp.asarray([500, 321])

  def run(impl, sparse):
    cache = decoding.init_cache(cfg, 2, 640, jnp.bfloat16)
    logits, cache = decoding.prefill(cfg, params, toks, lengths, cache)
    scfg = resa.SparseConfig(selector="quest", block_size=64, budget_tokens=256)
    summ = resa.init_summaries(cfg, scfg, cache)
    outs = []
    fed = jax.random.randint(jax.random.key(2), (8, 2), 0, 256)  # teacher-forced: same tokens
    for t in range(8):
      tok = fed[t]
      if sparse:
        logits, cache, summ = resa.sparse_decode_step(cfg, scfg, params, cache, summ, tok,
                                                      decode_impl=impl)
      else:
        logits, cache = decoding.decode_step(cfg, params, cache, tok, decode_impl=impl)
      outs.append(logits)
    return jnp.stack(outs)

  for sparse in (False, True):
    a, b = run("xla", sparse), run("pallas_triton", sparse)
    assert _rel(b, a) < 2e-2, (sparse, _rel(b, a))
