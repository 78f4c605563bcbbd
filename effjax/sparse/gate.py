"""SeerAttention-R decode gate: which KV blocks a new token's GQA group should attend to.

Per layer and kv head (one decision per GQA group, no query pooling):
  gate query  q_g = RoPE(concat_G(q heads of the group) @ Wq)          [Dg], at the token position
  block key   k_g = RoPE(concat(max, min, mean of the block's keys) @ Wk)  [Dg], at the block start
  score       s_n = q_g . k_g[n] / sqrt(Dg);  probabilities = softmax over the valid blocks
The pooled-and-projected block keys form the **K-compression cache**: one [Dg] row per filled block,
written once when a block fills (`compress_blocks`), so a decode step costs one gate matvec per
group over Nb = S / block_size rows instead of a pass over S keys.

Training is self-distillation from the frozen model: the target for a query token is the 1-D block
max of its attention row (max attention probability over each block's tokens, then max over the
group's G heads), normalised to sum 1 over blocks; the loss is KL(target || gate probabilities).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.model.layers import apply_rope, rope_tables


@dataclasses.dataclass(frozen=True)
class GateConfig:
  block_size: int = 64
  d_gate: int = 64

  def __post_init__(self):
    if self.block_size <= 0 or self.d_gate <= 0 or self.d_gate % 2:
      raise ValueError(f"gate: block_size > 0 and an even d_gate > 0 needed, got {self}")


# Storage dtypes of the K-compression cache (resa.SparseConfig.gate_cache_dtype). Scores are
# always computed in float32 from it.
CACHE_DTYPES = ("bfloat16", "float32", "float8_e4m3fn")
FLOAT8_MAX = 448.0   # float8_e4m3fn's largest finite value; it has no inf


def to_cache_dtype(kc: jax.Array, dtype) -> jax.Array:
  """kc as stored in the K-compression cache. float8_e4m3fn saturates at +-448: that format has
  no inf, and XLA converts anything past ~464 to NaN, which would poison a block's score."""
  dt = jnp.dtype(dtype)
  if dt.name not in CACHE_DTYPES:
    raise ValueError(f"gate cache dtype must be one of {'|'.join(CACHE_DTYPES)}, got {dt.name}")
  if dt == jnp.float8_e4m3fn:
    kc = jnp.clip(kc, -FLOAT8_MAX, FLOAT8_MAX)
  return kc.astype(dt)


# compress_blocks projects up to this many blocks as a product and sum (see gate_logits), more
# (a prefill's whole cache) with an einsum, a real matrix product.
SMALL_PROJECTION_ROWS = 8


def init_gate_params(mcfg: ModelConfig, gcfg: GateConfig, rng: jax.Array) -> dict:
  """{"wq": [L, K, G*H, Dg], "wk": [L, K, 3H, Dg]} float32, scaled for unit-variance scores."""
  L, K, G, H, D = mcfg.n_layers, mcfg.n_kv_heads, mcfg.n_heads // mcfg.n_kv_heads, mcfg.hd, gcfg.d_gate
  kq, kk = jax.random.split(rng)
  return {"wq": jax.random.normal(kq, (L, K, G * H, D), jnp.float32) * (G * H) ** -0.5,
          "wk": jax.random.normal(kk, (L, K, 3 * H, D), jnp.float32) * (3 * H) ** -0.5}


def check_params(mcfg: ModelConfig, d_gate: int, gate_params) -> None:
  """Raises a ValueError naming the problem unless gate_params is a decode gate for this model:
  {"wq": [L, K, G*H, Dg], "wk": [L, K, 3H, Dg]} with Dg = d_gate, stacked over layers or (as
  `resa.per_layer` makes them) a tuple of L per-layer arrays. Shapes only: safe under jit."""
  if gate_params is None:
    raise ValueError("selector='gate' needs gate_params: {'wq', 'wk'} from "
                     "gate_training.train_gate or init_gate_params (got None)")
  if not isinstance(gate_params, dict) or not {"wq", "wk"} <= set(gate_params):
    got = sorted(gate_params) if isinstance(gate_params, dict) else type(gate_params).__name__
    raise ValueError(f"gate_params must be a dict with 'wq' and 'wk', got {got}")
  L, K, G, H = mcfg.n_layers, mcfg.n_kv_heads, mcfg.n_heads // mcfg.n_kv_heads, mcfg.hd
  want = {"wq": (K, G * H, d_gate), "wk": (K, 3 * H, d_gate)}
  for name, per_layer_shape in want.items():
    w = gate_params[name]
    if isinstance(w, (tuple, list)):
      shapes = {tuple(x.shape) for x in w}
      ok = len(w) == L and shapes == {per_layer_shape}
      got = f"{len(w)} layers of {sorted(shapes)}"
    else:
      ok = tuple(getattr(w, "shape", ())) == (L, *per_layer_shape)
      got = str(tuple(getattr(w, "shape", ())))
    if not ok:
      raise ValueError(f"gate_params['{name}'] must be [L={L}, K={K}, {per_layer_shape[1]}, "
                       f"d_gate={d_gate}] for this model and SparseConfig, got {got}")


def pool_blocks(k_BKSH: jax.Array, lengths_B: jax.Array, block_size: int,
                token_major: bool = False) -> jax.Array:
  """max / min / mean of each block's valid keys, concatenated: float32 [B, K, Nb, 3H]. Empty
  blocks give zeros (they are masked from scores).

  k_BKSH is the cache layout [B, K, S, H]; with token_major, the prompt's [B, S, K, H] (a
  prefill's keys), pooled where they lie: the reductions run over a middle axis of the array as
  it is, so the keys are read once and never transposed (a transpose of the whole prompt's keys
  to the cache layout was its own kernel); only the pooled blocks are transposed."""
  if token_major:
    B, S, K, H = k_BKSH.shape
  else:
    B, K, S, H = k_BKSH.shape
  if S % block_size:
    raise ValueError(f"cache capacity {S} must be a multiple of block_size {block_size}")
  nb = S // block_size
  tok = jnp.arange(S).reshape(nb, block_size)[None] < lengths_B[:, None, None]    # [B, Nb, bs]
  if token_major:
    # heads and channels as one axis: the [B, Nb, bs, K * H] form was measured on the GPU
    k = k_BKSH.reshape(B, nb, block_size, K * H)
    valid, axis = tok[:, :, :, None], 2
  else:
    k = k_BKSH.reshape(B, K, nb, block_size, H)
    valid, axis = tok[:, None, :, :, None], 3
  # max / min in the keys' dtype (exact) and the sum accumulated in float32, without a float32
  # copy of the keys: converting first made XLA on the GPU lay a prompt's keys out anew (a
  # transpose fusion 3.4x the reductions' time on an H100 at 32K tokens)
  cnt = jnp.maximum(jnp.sum(valid, axis=axis), 1)
  kmax = jnp.max(jnp.where(valid, k, -jnp.inf), axis=axis).astype(jnp.float32)
  kmin = jnp.min(jnp.where(valid, k, jnp.inf), axis=axis).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, k, 0), axis=axis, dtype=jnp.float32) / cnt
  any_valid = jnp.any(valid, axis=axis)
  if token_major:
    kmax, kmin, mean = (x.reshape(B, nb, K, H) for x in (kmax, kmin, mean))
    any_valid = any_valid[..., None]
  pooled = jnp.where(any_valid, jnp.concatenate([kmax, kmin, mean], axis=-1), 0.0)
  return pooled.transpose(0, 2, 1, 3) if token_major else pooled


def project_blocks(wk_KCD: jax.Array, pooled_BKNC: jax.Array, block_size: int, rope_theta: float,
                   first_block_B: jax.Array | None = None) -> jax.Array:
  """Pooled blocks [B, K, Nb, 3H] -> projected, RoPE'd block keys float32 [B, K, Nb, Dg], RoPE at
  each block's absolute start (blocks counted from first_block_B)."""
  if pooled_BKNC.shape[2] <= SMALL_PROJECTION_ROWS:   # a decode step's window of a block or two
    kc = jnp.sum(pooled_BKNC[..., :, None] * wk_KCD[None, :, None], axis=-2)
  else:
    kc = jnp.einsum("bknc,kcd->bknd", pooled_BKNC, wk_KCD)
  B, nb = kc.shape[0], kc.shape[2]
  first = jnp.zeros((B,), jnp.int32) if first_block_B is None else first_block_B
  starts = (first[:, None] + jnp.arange(nb, dtype=jnp.int32)[None]) * block_size
  cos, sin = rope_tables(starts, kc.shape[-1], rope_theta)                  # [B, Nb, 1, Dg/2]
  # apply_rope expects [B, T, N, H]: blocks play T, kv heads play N
  return apply_rope(kc.transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)


def compress_blocks(wk_KCD: jax.Array, k_BKSH: jax.Array, lengths_B: jax.Array, block_size: int,
                    rope_theta: float, first_block_B: jax.Array | None = None) -> jax.Array:
  """The K-compression cache of one layer: projected, RoPE'd block keys float32 [B, K, Nb, Dg].
  k_BKSH may be a slice of the cache starting at block first_block_B (lengths then count from the
  slice start); RoPE uses the absolute block start positions."""
  return project_blocks(wk_KCD, pool_blocks(k_BKSH, lengths_B, block_size), block_size,
                        rope_theta, first_block_B)


def gate_logits(wq_KCD: jax.Array, q_BKGH: jax.Array, kc_BKND: jax.Array, pos_B: jax.Array,
                rope_theta: float) -> jax.Array:
  """Gate scores of one layer for one new token per sequence: float32 [B, K, Nb]."""
  r1, r2 = _gate_query_halves(wq_KCD, q_BKGH, pos_B, rope_theta)
  h = r1.shape[-1]
  kc = kc_BKND.astype(jnp.float32)
  # Products and one sum, not an einsum: a [Dg] . [Nb, Dg] matrix-vector product per row, which
  # XLA:GPU compiles into one reduction kernel only through its dot-strength-reduction pass. The
  # decode loops turn that pass off (decoding.DECODE_COMPILER_OPTIONS); the einsum then became a
  # Triton GEMM: 7.7 instead of 6.1 us at B8 S128K, 2.9 instead of 2.0 us at B1 (H200,
  # results/NVIDIA_H200/gate_query_decode_options.json). The query's two RoPE halves meet the
  # cache's halves inside that one sum: with the halves concatenated first, XLA ran the RoPE as a
  # separate 1.1-1.3 us kernel; this form saves 0.85 us at B8 and 1.0 us at B1 (S128K, scores +
  # block_topk, H200, results/NVIDIA_H200/gate_scores_forms.json).
  return jnp.sum(r1[:, :, None] * kc[..., :h] + r2[:, :, None] * kc[..., h:], axis=-1)


def _gate_query_halves(wq_KCD: jax.Array, q_BKGH: jax.Array, pos_B: jax.Array,
                       rope_theta: float) -> tuple[jax.Array, jax.Array]:
  """gate_query as its two rotate-half halves, each float32 [B, K, Dg/2]."""
  B, K, G, H = q_BKGH.shape
  # product and sum for the same reason as the scores (gate_logits): under the decode options the
  # einsum was a Triton GEMM, 2.3 against 1.1 us at B1 (gate_query_decode_options.json)
  qg = jnp.sum(q_BKGH.astype(jnp.float32).reshape(B, K, G * H, 1) * wq_KCD[None], axis=-2)
  # The 1/sqrt(Dg) scale goes on the [B, K, Dg] query, not on the [B, K, Nb] scores: on the GPU
  # XLA does not fuse a multiply into the reduction's output, and the separate pass over the
  # scores cost 1.7 us of a 4K-budget step at B8 S128K (H200).
  qg = qg * qg.shape[-1] ** -0.5
  cos, sin = rope_tables(pos_B[:, None], qg.shape[-1], rope_theta)          # [B, 1, 1, Dg/2]
  cos, sin = cos[:, 0], sin[:, 0]                                           # [B, 1, Dg/2]
  x1, x2 = jnp.split(qg, 2, axis=-1)
  return x1 * cos - x2 * sin, x2 * cos + x1 * sin                           # apply_rope's pairs


def gate_query(wq_KCD: jax.Array, q_BKGH: jax.Array, pos_B: jax.Array,
               rope_theta: float) -> jax.Array:
  """The gate query of one new token per sequence: projected, RoPE'd at its position and scaled
  by 1/sqrt(Dg), float32 [B, K, Dg] (scores = gate_query . kc)."""
  return jnp.concatenate(_gate_query_halves(wq_KCD, q_BKGH, pos_B, rope_theta), axis=-1)


def masked_softmax(logits_BKN: jax.Array, lengths_B: jax.Array, block_size: int) -> jax.Array:
  nb = (lengths_B + block_size - 1) // block_size
  valid = jnp.arange(logits_BKN.shape[-1])[None, None] < nb[:, None, None]
  return jax.nn.softmax(jnp.where(valid, logits_BKN, -jnp.inf), axis=-1)


def dense_probs(q_BKGH: jax.Array, k_BKSH: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """Dense attention probabilities of each new token over the cache, zero past the length:
  float32 [B, K, G, S]."""
  H, S = q_BKGH.shape[-1], k_BKSH.shape[2]
  s = jnp.einsum("bkgh,bksh->bkgs", q_BKGH.astype(jnp.float32), k_BKSH.astype(jnp.float32)) * H ** -0.5
  valid = jnp.arange(S)[None, None, None] < lengths_B[:, None, None, None]
  return jnp.where(valid, jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1), 0.0)


def distill_target(q_BKGH: jax.Array, k_BKSH: jax.Array, lengths_B: jax.Array,
                   block_size: int) -> jax.Array:
  """1-D block max of the dense attention row of each new token, max over the group's heads,
  normalised over blocks: float32 [B, K, Nb] (zero on invalid blocks)."""
  B, K, S, H = k_BKSH.shape
  p = dense_probs(q_BKGH, k_BKSH, lengths_B)
  blockmax = jnp.max(p.reshape(B, K, -1, S // block_size, block_size), axis=-1)   # [B, K, G, Nb]
  t = jnp.max(blockmax, axis=2)
  return t / jnp.maximum(jnp.sum(t, axis=-1, keepdims=True), 1e-30)


def kl_loss(target_BKN: jax.Array, probs_BKN: jax.Array) -> jax.Array:
  """Mean over (B, K) of KL(target || probs); blocks with zero target contribute nothing."""
  t = target_BKN
  kl = jnp.sum(jnp.where(t > 0, t * (jnp.log(jnp.maximum(t, 1e-30)) - jnp.log(jnp.maximum(probs_BKN, 1e-30))), 0.0), -1)
  return jnp.mean(kl)
