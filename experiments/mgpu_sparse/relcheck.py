import dataclasses, jax, jax.numpy as jnp, numpy as np
from effjax.config import ModelConfig
from effjax.model import init_params
from effjax import decoding
from effjax.cache import KVCache
from effjax.sparse import resa
def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64); return np.linalg.norm(a - b) / np.linalg.norm(b)
cfg = ModelConfig(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=1024, compute_dtype="bfloat16")
params = init_params(cfg, jax.random.key(0))
toks = jax.random.randint(jax.random.key(1), (2, 500), 0, 256)
lengths = jnp.asarray([500, 321])
def run(scfg, impl, steps=8):
  cache = KVCache.init(cfg, 2, 640, jnp.bfloat16)
  _, cache = decoding.prefill(cfg, params, toks, lengths, cache)
  summ = resa.init_summaries(cfg, scfg, cache)
  outs = []
  fed = jax.random.randint(jax.random.key(2), (8, 2), 0, 256)
  for t in range(steps):
    logits, cache, summ = resa.sparse_decode_step(cfg, scfg, params, cache, summ, fed[t], decode_impl=impl)
    outs.append(logits)
  return jnp.stack(outs)
base = resa.SparseConfig(selector="quest", block_size=64, budget_tokens=256)
mg = dataclasses.replace(base, sparse_kernel="pallas_mosaic_gpu")
x, t, m = run(base, "xla"), run(base, "pallas_triton"), run(mg, "pallas_triton")
for i in range(8):
  print(i, "triton-xla %.4f mgpu-xla %.4f mgpu-triton %.4f" % (_rel(t[i], x[i]), _rel(m[i], x[i]), _rel(m[i], t[i])))
print("all", _rel(t, x), _rel(m, x), _rel(m, t))
