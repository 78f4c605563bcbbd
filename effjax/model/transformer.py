"""Llama-style decoder LM as a functional Flax module: params are a pytree passed to `apply`.

Shapes: B batch, T sequence, D model width, N query heads, K kv heads, H head dim, F MLP width,
V vocabulary, L layers. Layers are stacked with `nn.scan` (params carry a leading [L] axis), which
keeps compile time flat in depth and lets later work shard or remat per layer.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.model.attention import attention
from effjax.model.linear import make_linear


def _dtype(name: str):
  return jnp.dtype(name)


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float, dtype) -> jax.Array:
  """RMSNorm in float32, cast to `dtype`."""
  x = x_BTD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * scale_D).astype(dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x_BTD):
    scale_D = self.param("scale", nn.initializers.ones, (x_BTD.shape[-1],), jnp.float32)
    return rms_norm(x_BTD, scale_D, self.eps, self.dtype)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float):
  """cos/sin tables [B, T, 1, H/2] (float32) for rotary embeddings at integer positions."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x_BTNH: jax.Array, cos, sin) -> jax.Array:
  """Rotate-half RoPE: pairs (x[i], x[i + H/2]) rotate by position * freq_i."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, rope):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
    Linear = functools.partial(make_linear(cfg.linear_impl), dtype=dt, param_dtype=pdt,
                               init_std=cfg.init_std)
    # GPT-2 style: residual-branch output projections scaled by 1/sqrt(2L) keep the residual
    # stream's variance flat in depth at init.
    OutLinear = functools.partial(make_linear(cfg.linear_impl), dtype=dt, param_dtype=pdt,
                                  init_std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
    B, T, _ = x_BTD.shape
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.hd
    cos, sin = rope

    h = RMSNorm(cfg.norm_eps, dt, name="attn_norm")(x_BTD)
    q_BTNH = Linear(N * H, name="wq")(h).reshape(B, T, N, H)
    k_BTKH = Linear(K * H, name="wk")(h).reshape(B, T, K, H)
    v_BTKH = Linear(K * H, name="wv")(h).reshape(B, T, K, H)
    q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
    o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, causal=True, implementation=cfg.attention_impl)
    x_BTD = x_BTD + OutLinear(cfg.d_model, name="wo")(o_BTNH.reshape(B, T, N * H)).astype(x_BTD.dtype)

    h = RMSNorm(cfg.norm_eps, dt, name="mlp_norm")(x_BTD)
    gate_BTF = Linear(cfg.ff, name="w_gate")(h)
    up_BTF = Linear(cfg.ff, name="w_up")(h)
    mlp_BTD = OutLinear(cfg.d_model, name="w_down")(nn.silu(gate_BTF) * up_BTF)
    return x_BTD + mlp_BTD.astype(x_BTD.dtype), None


class Transformer(nn.Module):
  """tokens [B, T] int32 (+ optional positions [B, T]) -> logits [B, T, V] float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               return_hidden: bool = False):
    cfg = self.cfg
    dt = _dtype(cfg.compute_dtype)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embed_VD = self.param("embed", nn.initializers.normal(cfg.init_std),
                          (cfg.vocab_size, cfg.d_model), _dtype(cfg.param_dtype))
    # The residual stream stays in compute dtype; norms and softmax upcast internally.
    onehot = cfg.embed_lookup == "onehot" or (cfg.embed_lookup == "auto" and cfg.vocab_size <= 4096)
    if onehot:
      # Small vocabularies (bytes): a one-hot matmul. Its backward is a matmul too, where a gather's
      # backward is a scatter-add of every token onto a few hundred rows (heavy atomic contention).
      x_BTD = jnp.dot(jax.nn.one_hot(tokens_BT, cfg.vocab_size, dtype=dt), embed_VD.astype(dt))
    else:
      x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(dt)
    rope = rope_tables(positions_BT, cfg.hd, cfg.rope_theta)

    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast,), length=cfg.n_layers)
      x_BTD, _ = layers(cfg, name="layers")(x_BTD, rope)
    else:
      for i in range(cfg.n_layers):
        x_BTD, _ = block(cfg, name=f"layers_{i}")(x_BTD, rope)

    x_BTD = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x_BTD)
    if return_hidden:  # final normed hidden states [B, T, D] (e.g. a mean-pooled encoder)
      return x_BTD
    if cfg.tie_embeddings:
      out_DV = embed_VD.T
    else:
      out_DV = self.param("unembed", nn.initializers.normal(cfg.init_std),
                          (cfg.d_model, cfg.vocab_size), _dtype(cfg.param_dtype))
    return jnp.dot(x_BTD, out_DV.astype(dt), preferred_element_type=jnp.float32)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """fp32 master params pytree for `cfg`."""
  model = Transformer(cfg)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, tokens)["params"]


def apply(cfg: ModelConfig, params, tokens_BT, positions_BT=None, return_hidden: bool = False):
  """Forward pass: logits [B, T, V] float32 (or final hidden states [B, T, D] in compute dtype)."""
  return Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, return_hidden)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (fwd + bwd = 3x fwd), PaLM-appendix style: 6 * N_matmul +
  12 * L * H_total * T for causal attention scores+values (counted over the full square, the usual
  MFU convention; halve for the causal half actually computed)."""
  n = cfg.num_params(include_embedding=False)
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.d_model  # the tied unembedding is still a matmul
  return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.hd * seq_len
