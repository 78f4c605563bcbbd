"""Which shapes does the compiled Mosaic GPU sparse kernel get wrong? (the G=5 case failed on the
H200). Prints the max abs error against the XLA reference for a grid of small shapes."""
import itertools
import jax
import jax.numpy as jnp
import numpy as np
from pallas_kernels.sparse_decode import sparse_decode_attention
from pallas_kernels.sparse_decode.pallas_mosaic_gpu import MosaicGPUConfig

rng = np.random.default_rng(0)
for (B, K, G, H, S, L, ns) in [
    (2, 2, 5, 64, 450, [450, 3], None), (2, 2, 5, 64, 512, [512, 512], None),
    (2, 4, 5, 64, 512, [512, 512], None), (2, 2, 5, 64, 512, [512, 512], 1),
    (2, 2, 4, 64, 450, [450, 3], None), (2, 2, 6, 64, 512, [512, 512], 1),
    (2, 2, 3, 64, 512, [512, 512], 1), (1, 1, 5, 64, 512, [512], 1), (1, 1, 5, 128, 512, [512], 1),
    (1, 1, 4, 64, 512, [512], 1), (1, 1, 8, 64, 512, [512], 1), (1, 1, 7, 64, 512, [512], 1),
    (1, 1, 16, 64, 512, [512], 1), (1, 1, 12, 64, 512, [512], 1)]:
  q = jnp.asarray(rng.standard_normal((B, K, G, H)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.bfloat16)
  nb = -(-S // 64)
  idx = jnp.asarray(np.broadcast_to(np.arange(nb, dtype=np.int32), (B, K, nb)))
  n = jnp.asarray(L, jnp.int32)
  cfg = MosaicGPUConfig(num_splits=ns)
  out = sparse_decode_attention(q, k, v, n, idx, block_size=64, implementation="pallas_mosaic_gpu", config=cfg)
  ref = sparse_decode_attention(q, k, v, n, idx, block_size=64, implementation="xla")
  err = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
  bad_rows = np.argwhere(err.max(-1) > 0.02)
  print(dict(B=B, K=K, G=G, H=H, S=S, splits=ns), "max err %.4f" % err.max(),
        "bad (b,k,g):", bad_rows.tolist()[:12], flush=True)
