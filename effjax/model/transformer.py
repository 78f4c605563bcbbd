"""Llama-style decoder LM as pure functions over a params pytree.

Shapes: B batch, T sequence, D model width, N query heads, K kv heads, H head dim, F MLP width,
V vocabulary, L layers.

The transformer layer exists once, in `block`. Every path runs it: the training forward
(`forward`), prefill, the decode step, the multi-token extend (rectification) and the sparse
decode step (`effjax.decoding`, `effjax.sparse.resa`). What differs between them is only the
attention, passed in as a strategy:

    attention(layer, q_BTNH, k_BTKH, v_BTKH) -> (o_BTNH, aux)

(post-RoPE queries and keys; `aux` is whatever the strategy wants back per layer, e.g. the
layer's updated KV cache). Projections go through the config's `Linear` (model/linear.py).

Params: {"embed": [V, D], "layers_<i>" (or, with model.scan_layers, one "layers" stacked over a
leading [L] axis): {"attn_norm": {"scale": [D]}, "wq", "wk", "wv", "wo", "mlp_norm",
"w_gate", "w_up", "w_down"} (+ "attn_sub_norm" [N*H], "mlp_sub_norm" [F] with model.sub_norm;
a packed ternary model may hold "wqkv" and "w_gate_up" instead, effjax.quant.convert),
"final_norm": {"scale": [D]}, "unembed": [D, V] unless tied}.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.model.layers import apply_rope, model_rope_tables, rms_norm
from effjax.model.linear import make_linear
from pallas_kernels.causal_attention import causal_attention

Params = dict
Attention = Callable[[int, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


# ----------------------------------------------------------------------------------------------
# parameters


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Master params (model.param_dtype) for `cfg`: weights N(0, init_std), the residual branches'
  output projections (wo, w_down) N(0, init_std / sqrt(2L)) -- GPT-2 style, which keeps the
  residual stream's variance flat in depth at init -- norm scales 1."""
  lin = make_linear(cfg)
  D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.ff
  pdt = jnp.dtype(cfg.param_dtype)
  std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
  ones = lambda n: {"scale": jnp.ones((n,), jnp.float32)}

  def layer(key):
    ks = jax.random.split(key, 7)
    lp = {"attn_norm": ones(D), "wq": lin.init(ks[0], D, N * H, std),
          "wk": lin.init(ks[1], D, K * H, std), "wv": lin.init(ks[2], D, K * H, std),
          "wo": lin.init(ks[3], N * H, D, out_std), "mlp_norm": ones(D),
          "w_gate": lin.init(ks[4], D, F, std), "w_up": lin.init(ks[5], D, F, std),
          "w_down": lin.init(ks[6], F, D, out_std)}
    if cfg.sub_norm:
      lp.update(attn_sub_norm=ones(N * H), mlp_sub_norm=ones(F))
    return lp

  k_embed, k_out, k_layers = jax.random.split(rng, 3)
  keys = jax.random.split(k_layers, cfg.n_layers)
  params = {"embed": jax.random.normal(k_embed, (cfg.vocab_size, D), pdt) * std}
  if cfg.scan_layers:
    params["layers"] = jax.vmap(layer)(keys)
  else:
    params.update({f"layers_{i}": layer(keys[i]) for i in range(cfg.n_layers)})
  params["final_norm"] = ones(D)
  if not cfg.tie_embeddings:
    params["unembed"] = jax.random.normal(k_out, (D, cfg.vocab_size), pdt) * std
  return params


def layer_params(params: Params, i: int) -> Params:
  """Layer i's params, from either layout (unrolled `layers_i` or scan-stacked `layers`)."""
  if "layers" in params:
    return jax.tree.map(lambda x: x[i], params["layers"])
  return params[f"layers_{i}"]


# ----------------------------------------------------------------------------------------------
# the one layer


def block(cfg: ModelConfig, lp: Params, x_BTD: jax.Array, rope, attention: Attention,
          layer: int = 0) -> tuple[jax.Array, Any]:
  """The transformer layer: x + Wo attention(RoPE(Wq h), RoPE(Wk h), Wv h) with h = norm(x),
  then x + W_down (silu(W_gate h) * W_up h) with h = norm(x) (with model.sub_norm, the
  attention output and the MLP activation are RMS-normalised before Wo / W_down: SubLN). Returns (x_BTD, aux of the
  attention strategy)."""
  lin = make_linear(cfg)
  dt = jnp.dtype(cfg.compute_dtype)
  B, T, _ = x_BTD.shape
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.hd
  cos, sin = rope
  h = rms_norm(x_BTD, lp["attn_norm"]["scale"], cfg.norm_eps, dt)
  if "wqkv" in lp:   # q / k / v packed as one weight (effjax.quant.convert, fuse=True)
    q, k, v = jnp.split(lin(lp["wqkv"], h), [N * H, (N + K) * H], axis=-1)
  else:
    q, k, v = lin(lp["wq"], h), lin(lp["wk"], h), lin(lp["wv"], h)
  q_BTNH, k_BTKH, v_BTKH = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
  q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
  o_BTNH, aux = attention(layer, q_BTNH, k_BTKH, v_BTKH)
  o = o_BTNH.reshape(B, T, N * H)
  if cfg.sub_norm:   # SubLN (BitNet): normalise what the output projection quantises
    o = rms_norm(o, lp["attn_sub_norm"]["scale"], cfg.norm_eps, dt)
  x_BTD = x_BTD + lin(lp["wo"], o).astype(x_BTD.dtype)
  h = rms_norm(x_BTD, lp["mlp_norm"]["scale"], cfg.norm_eps, dt)
  if "w_gate_up" in lp:
    gate, up = jnp.split(lin(lp["w_gate_up"], h), 2, axis=-1)
  else:
    gate, up = lin(lp["w_gate"], h), lin(lp["w_up"], h)
  act = jax.nn.silu(gate) * up
  if cfg.sub_norm:
    act = rms_norm(act, lp["mlp_sub_norm"]["scale"], cfg.norm_eps, dt)
  mlp_BTD = lin(lp["w_down"], act)
  return x_BTD + mlp_BTD.astype(x_BTD.dtype), aux


def run_layers(cfg: ModelConfig, params: Params, x_BTD: jax.Array, positions_BT: jax.Array,
               attention: Attention, remat: bool = False) -> tuple[jax.Array, list]:
  """The L layers over the residual stream: (x_BTD, [aux of each layer]). Scan-stacked params
  run as a `lax.scan` when the strategy is stateless (aux None), else as a Python loop over
  layer slices, like unrolled params; `remat` rematerialises each layer in the backward pass
  (the training forward passes model.remat)."""
  rope = model_rope_tables(cfg, positions_BT)

  def one(lp, x, i):
    return block(cfg, lp, x, rope, attention, i)

  if remat:
    one = jax.checkpoint(one, prevent_cse=False, static_argnums=(2,))
  if "layers" in params and attention_is_stateless(attention):
    def body(x, lp):
      x, _ = one(lp, x, 0)
      return x, None
    x_BTD, _ = jax.lax.scan(body, x_BTD, params["layers"])
    return x_BTD, [None] * cfg.n_layers
  auxes = []
  for i in range(cfg.n_layers):
    x_BTD, aux = one(layer_params(params, i), x_BTD, i)
    auxes.append(aux)
  return x_BTD, auxes


def attention_is_stateless(attention) -> bool:
  """Strategies that neither need the layer index nor return state (scan-able over layers)."""
  return getattr(attention, "stateless", False)


class CausalSelfAttention:
  """The training / full-sequence strategy: causal GQA attention over the T tokens themselves
  (`pallas_kernels.causal_attention`, implementation model.attention_impl). aux: None."""
  stateless = True

  def __init__(self, implementation: str = "auto"):
    self.implementation = implementation

  def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
    del layer
    return causal_attention(q_BTNH, k_BTKH, v_BTKH, implementation=self.implementation), None


# ----------------------------------------------------------------------------------------------
# embedding and output


def embed(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, lookup: str = "gather"):
  """Token embeddings [B, T, D] in the compute dtype. lookup "onehot" is a one-hot matmul: its
  backward is a matmul too, where a gather's backward is a scatter-add of every token onto a few
  hundred rows (heavy atomic contention for byte vocabularies); "auto" picks it for vocabularies
  up to 4096 (training); decode steps gather."""
  dt = jnp.dtype(cfg.compute_dtype)
  if lookup == "auto":
    lookup = "onehot" if cfg.vocab_size <= 4096 else "gather"
  if lookup == "onehot":
    return jnp.dot(jax.nn.one_hot(tokens_BT, cfg.vocab_size, dtype=dt), params["embed"].astype(dt))
  return jnp.take(params["embed"], tokens_BT, axis=0).astype(dt)


def final_hidden(cfg: ModelConfig, params: Params, x_BTD: jax.Array) -> jax.Array:
  """The final RMSNorm of the residual stream, compute dtype."""
  return rms_norm(x_BTD, params["final_norm"]["scale"], cfg.norm_eps,
                  jnp.dtype(cfg.compute_dtype))


def logits(cfg: ModelConfig, params: Params, x_BTD: jax.Array) -> jax.Array:
  """float32 logits [..., V] of the (un-normed) residual stream."""
  dt = jnp.dtype(cfg.compute_dtype)
  out_DV = params["embed"].T if cfg.tie_embeddings else params["unembed"]
  return jnp.dot(final_hidden(cfg, params, x_BTD), out_DV.astype(dt),
                 preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# training forward


def forward(cfg: ModelConfig, params: Params, tokens_BT: jax.Array,
            positions_BT: jax.Array | None = None, return_hidden: bool = False) -> jax.Array:
  """tokens [B, T] int32 (+ optional positions [B, T]) -> logits [B, T, V] float32, or the final
  normed hidden states [B, T, D] (compute dtype) with return_hidden (e.g. a mean-pooled
  encoder)."""
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  x_BTD = embed(cfg, params, tokens_BT, cfg.embed_lookup)
  # The residual stream stays in compute dtype; norms and softmax upcast internally.
  x_BTD, _ = run_layers(cfg, params, x_BTD, positions_BT, CausalSelfAttention(cfg.attention_impl),
                        remat=cfg.remat)
  if return_hidden:
    return final_hidden(cfg, params, x_BTD)
  return logits(cfg, params, x_BTD)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (fwd + bwd = 3x fwd), PaLM-appendix style: 6 * N_matmul +
  12 * L * H_total * T for causal attention scores+values (counted over the full square, the usual
  MFU convention; halve for the causal half actually computed)."""
  n = cfg.num_params(include_embedding=False)
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.d_model  # the tied unembedding is still a matmul
  return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.hd * seq_len
