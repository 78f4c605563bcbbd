"""KV-cached decoding: jitted `prefill`, `decode_step` and an on-device generation loop.

The cache is an explicit pytree:
    {"k": (L arrays [B, K, S, H]), "v": (L arrays [B, K, S, H])  (cache dtype, S = capacity),
     "lengths": int32 [B]                                          (valid tokens per sequence)}
Keys/values are stored per kv head as [S, H] rows ([B, K, S, H] per layer), the layout the decode
kernels in `pallas_kernels` read. Prompts are right-padded with per-sequence lengths.

One buffer per layer, not a stacked [L, ...] array: a decode step writes one token into each
layer's buffer in place (a scatter on a donated / loop-carried buffer) and hands that same buffer to
the attention kernel. With a stacked cache, slicing a layer out for the kernel and stacking the
updated layers back would copy the whole cache every step -- more bytes than attention reads.

The decode path evaluates the same parameters as `effjax.model.Transformer` (unrolled `layers_i`
or scan-stacked `layers`), through the same linear modules, so a decode step after a prefill
reproduces the full forward's logits.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.model.attention import attention
from effjax.model.linear import make_linear
from effjax.model.transformer import apply_rope, rms_norm, rope_tables

Cache = dict

# XLA options of the generation loops (`generate` here, `resa.generate` / `score_continuation`).
# At batch 1 a linear layer is a vector x matrix dot, which XLA:GPU's `dot-strength-reduction`
# pass (JAX 0.11) rewrites to broadcast-multiply + reduce for matrices under 10M elements -- and
# then writes the bf16 product x * W ([d_in, d_out], as large as the weight) to memory and reads it
# back in a separate reduction: three times a weight's bytes, and the products rounded to bf16
# before the f32 sum. In the 350M model's 32K-context decode step on the H200 that was ~1.2 of
# 2.1 ms (benchmarks/results/NVIDIA_H200/generate_b1_trace_strength_reduced.json). Without the pass
# the dot stays a GEMM (Triton GEMM fusion / cuBLAS).
# - JAX takes compiler options only on a top-level jit, so `decode_step`, `extend` and
#   `resa.sparse_decode_step` (which the loops nest) do not carry them; a host loop of single
#   steps at batch 1 gets them with
#     step = jax.jit(decoding.decode_step.__wrapped__, static_argnames=("cfg", "decode_impl"),
#                    donate_argnames=("cache",), compiler_options=decoding.DECODE_COMPILER_OPTIONS)
# - Without the pass XLA:GPU cannot compile a (batched) vector . vector dot (RET_CHECK in
#   matmul_indexing_utils), and compiles a batched matrix . vector one (the gate's query and
#   scores) as a slower Triton GEMM; `effjax.sparse.gate` writes those as product + sum.
# - `EFFJAX_DECODE_XLA_OPTIONS` changes the options at import (A/B runs).
def _decode_compiler_options() -> dict:
  """The defaults, updated by `EFFJAX_DECODE_XLA_OPTIONS="name=value;..."` at import (for A/B
  runs: a value `default` drops the option, true / false become booleans)."""
  opts = {"xla_disable_hlo_passes": "dot-strength-reduction"}
  for item in filter(None, os.environ.get("EFFJAX_DECODE_XLA_OPTIONS", "").split(";")):
    name, sep, value = item.partition("=")
    if not sep or not name.startswith("xla_"):
      raise ValueError(f"EFFJAX_DECODE_XLA_OPTIONS: expected xla_name=value items, got {item!r}")
    if value == "default":
      opts.pop(name, None)
    else:
      opts[name] = {"true": True, "false": False}.get(value.lower(), value)
  return opts


DECODE_COMPILER_OPTIONS = _decode_compiler_options()


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> Cache:
  """An empty cache for `batch` sequences of up to `capacity` tokens."""
  if capacity > cfg.max_seq_len:
    raise ValueError(f"cache capacity {capacity} exceeds model.max_seq_len={cfg.max_seq_len}")
  shape = (batch, cfg.n_kv_heads, capacity, cfg.hd)
  return {"k": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
          "v": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
          "lengths": jnp.zeros((batch,), jnp.int32)}


def capacity(cache: Cache) -> int:
  """Tokens the cache can hold (S)."""
  return cache["k"][0].shape[2]


# ----------------------------------------------------------------------------------------------
# parameter access shared by prefill and decode


def _layer(params, cfg: ModelConfig, i: int):
  if "layers" in params:  # nn.scan-stacked
    return jax.tree.map(lambda x: x[i], params["layers"])
  return params[f"layers_{i}"]


def _linear(cfg: ModelConfig, p, x, features: int):
  dt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
  mod = make_linear(cfg.linear_impl)(features, dtype=dt, param_dtype=pdt)
  return mod.apply({"params": p}, x)


def _embed(cfg: ModelConfig, params, tokens):
  dt = jnp.dtype(cfg.compute_dtype)
  return jnp.take(params["embed"], tokens, axis=0).astype(dt)


def _logits(cfg: ModelConfig, params, x):
  dt = jnp.dtype(cfg.compute_dtype)
  x = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps, dt)
  out = params["embed"].T if cfg.tie_embeddings else params["unembed"]
  return jnp.dot(x, out.astype(dt), preferred_element_type=jnp.float32)


def _qkv(cfg: ModelConfig, lp, x_BTD, positions_BT):
  B, T, _ = x_BTD.shape
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.hd
  h = rms_norm(x_BTD, lp["attn_norm"]["scale"], cfg.norm_eps, x_BTD.dtype)
  q = _linear(cfg, lp["wq"], h, N * H).reshape(B, T, N, H)
  k = _linear(cfg, lp["wk"], h, K * H).reshape(B, T, K, H)
  v = _linear(cfg, lp["wv"], h, K * H).reshape(B, T, K, H)
  cos, sin = rope_tables(positions_BT, H, cfg.rope_theta)
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _finish_block(cfg: ModelConfig, lp, x_BTD, o_BTNH):
  B, T = x_BTD.shape[:2]
  x_BTD = x_BTD + _linear(cfg, lp["wo"], o_BTNH.reshape(B, T, -1), cfg.d_model).astype(x_BTD.dtype)
  h = rms_norm(x_BTD, lp["mlp_norm"]["scale"], cfg.norm_eps, x_BTD.dtype)
  g = _linear(cfg, lp["w_gate"], h, cfg.ff)
  u = _linear(cfg, lp["w_up"], h, cfg.ff)
  return x_BTD + _linear(cfg, lp["w_down"], jax.nn.silu(g) * u, cfg.d_model).astype(x_BTD.dtype)


# ----------------------------------------------------------------------------------------------
# prefill and decode


def forward_layers(cfg: ModelConfig, params, tokens_BT: jax.Array):
  """Dense causal forward from position 0: (final hidden [B, T, D], per-layer post-RoPE queries
  [B, T, N, H], keys [B, T, K, H] and values [B, T, K, H]) -- what prefill caches and what the
  gate distils from."""
  B, T = tokens_BT.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x = _embed(cfg, params, tokens_BT)
  qs, ks, vs = [], [], []
  for i in range(cfg.n_layers):
    lp = _layer(params, cfg, i)
    q, k, v = _qkv(cfg, lp, x, positions)
    o = attention(q, k, v, causal=True, implementation=cfg.attention_impl)
    x = _finish_block(cfg, lp, x, o)
    qs.append(q)
    ks.append(k)
    vs.append(v)
  return x, qs, ks, vs


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(cfg: ModelConfig, params, tokens_BT: jax.Array, lengths_B: jax.Array, cache: Cache):
  """Runs right-padded prompts (tokens int32 [B, T], lengths int32 [B], 1 <= length <= T) and
  writes their K/V to cache positions [0, T). Returns (logits float32 [B, V] at each sequence's
  last prompt token, cache with lengths = lengths_B). Padding tokens sit after every real token, so
  causal attention keeps them out of the real positions; decode masks them by length."""
  B, T = tokens_BT.shape
  if T > capacity(cache):
    raise ValueError(f"prompt length {T} exceeds cache capacity {capacity(cache)}")
  x, _, ks, vs = forward_layers(cfg, params, tokens_BT)

  def put(dst_BKSH, new_BTKH):  # [B, K, T, H] into positions [0, T)
    new = new_BTKH.transpose(0, 2, 1, 3).astype(dst_BKSH.dtype)
    return jax.lax.dynamic_update_slice(dst_BKSH, new, (0, 0, 0, 0))

  k_all = tuple(put(c, k) for c, k in zip(cache["k"], ks))
  v_all = tuple(put(c, v) for c, v in zip(cache["v"], vs))
  last = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return _logits(cfg, params, last), {"k": k_all, "v": v_all, "lengths": lengths_B.astype(jnp.int32)}


def _write_token(cache_BKSH, new_BKH, pos_B):
  """cache[b, :, pos[b]] = new[b] for every sequence b."""
  upd = lambda c, x, p: jax.lax.dynamic_update_slice(c, x[:, None, :].astype(c.dtype), (0, p, 0))
  return jax.vmap(upd)(cache_BKSH, new_BKH, pos_B)


@functools.partial(jax.jit, static_argnames=("cfg", "decode_impl"), donate_argnames=("cache",))
def decode_step(cfg: ModelConfig, params, cache: Cache, token_B: jax.Array,
                decode_impl: str = "auto"):
  """One new token per sequence (int32 [B]) at position cache["lengths"]: writes its K/V, attends
  over the cache through `pallas_kernels.decode_attention` (implementation `decode_impl`) and
  returns (logits float32 [B, V], cache with lengths + 1)."""
  from pallas_kernels.decode_attention import decode_attention
  pos = cache["lengths"]
  B = token_B.shape[0]
  K, G, H = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.hd
  x = _embed(cfg, params, token_B[:, None])
  ks, vs = [], []
  for i in range(cfg.n_layers):
    lp = _layer(params, cfg, i)
    q, k, v = _qkv(cfg, lp, x, pos[:, None])
    k_cache = _write_token(cache["k"][i], k[:, 0], pos)
    v_cache = _write_token(cache["v"][i], v[:, 0], pos)
    q_BKGH = q[:, 0].reshape(B, K, G, H).astype(k_cache.dtype)
    o = decode_attention(q_BKGH, k_cache, v_cache, pos + 1, implementation=decode_impl)
    x = _finish_block(cfg, lp, x, o.reshape(B, 1, K * G, H).astype(x.dtype))
    ks.append(k_cache)
    vs.append(v_cache)
  new = {"k": tuple(ks), "v": tuple(vs), "lengths": pos + 1}
  return _logits(cfg, params, x[:, 0]), new


def _write_tokens(cache_BKSH, new_BKFH, start_B):
  """cache[b, :, start[b]:start[b]+F] = new[b] for every sequence b."""
  upd = lambda c, x, p: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, p, 0))
  return jax.vmap(upd)(cache_BKSH, new_BKFH, start_B)


def _dense_cached_attention(q_BFNH, k_BKSH, v_BKSH, start_B, upcast: bool | None = None):
  """F queries [B, F, N, H] at positions start_b + i over the cache [B, K, S, H], causal: scores
  and softmax in float32, dots on the cache dtype's operands with float32 accumulation (no f32
  copy of the cache: at 32K x B8 with bf16 K/V that copy is ~1 GB per layer). Returns [B, F, N, H]
  in q's dtype.

  upcast (None = only on the CPU backend) casts the operands to float32 first: XLA:CPU has lacked
  a bf16 x bf16 -> f32 batched dot inside some loops."""
  B, F, N, H = q_BFNH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  if upcast is None:
    upcast = jax.default_backend() == "cpu"
  dt = jnp.float32 if upcast else k_BKSH.dtype
  q = q_BFNH.astype(dt).reshape(B, F, K, N // K, H)
  s = jnp.einsum("bfkgh,bksh->bkgfs", q, k_BKSH.astype(dt),
                 preferred_element_type=jnp.float32) * (H ** -0.5)
  q_pos = start_B[:, None] + jnp.arange(F)[None]                          # [B, F]
  mask = jnp.arange(S)[None, None, :] <= q_pos[:, :, None]                # [B, F, S]
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  # probabilities in the value dtype for the second dot, as flash attention does
  o = jnp.einsum("bkgfs,bksh->bfkgh", p.astype(dt), v_BKSH.astype(dt),
                 preferred_element_type=jnp.float32)
  return o.reshape(B, F, N, H).astype(q_BFNH.dtype)


def _extend_impl(decode_impl: str, head_dim: int, dtype) -> str:
  """The attention `extend` uses: the Triton multi-token kernel where decode steps would use
  Triton, else the XLA path (no TPU kernel for F tokens yet)."""
  from pallas_kernels import _splitk
  if decode_impl == "auto":
    decode_impl = _splitk.auto_implementation(head_dim, dtype, tpu_available=False)
  return "pallas_triton" if decode_impl == "pallas_triton" else "xla"


@functools.partial(jax.jit, static_argnames=("cfg", "decode_impl"), donate_argnames=("cache",))
def extend(cfg: ModelConfig, params, cache: Cache, tokens_BF: jax.Array, start_B: jax.Array,
           decode_impl: str = "auto"):
  """Dense forward of F tokens per sequence at positions [start_b, start_b + F) over the cache
  (causal, every earlier cached token visible), overwriting their K/V in every layer. This is
  ReSA's rectification (re-run the last f tokens densely so their cache entries equal a dense
  model's) and a chunked prefill. Returns (logits float32 [B, F, V], cache with lengths =
  max(lengths, start + F)).

  decode_impl "auto" / "pallas_triton" on a GPU attends with
  `pallas_kernels.decode_attention.extend_attention` (reads each layer's cache once for all F
  tokens, no [F, S] scores); "xla" (and the CPU) with `_dense_cached_attention`."""
  B, F = tokens_BF.shape
  K, G, H = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.hd
  positions = start_B[:, None] + jnp.arange(F, dtype=jnp.int32)[None]
  x = _embed(cfg, params, tokens_BF)
  impl = _extend_impl(decode_impl, H, cache["k"][0].dtype)
  ks, vs = [], []
  for i in range(cfg.n_layers):
    lp = _layer(params, cfg, i)
    q, k, v = _qkv(cfg, lp, x, positions)
    k_cache = _write_tokens(cache["k"][i], k.transpose(0, 2, 1, 3), start_B)
    v_cache = _write_tokens(cache["v"][i], v.transpose(0, 2, 1, 3), start_B)
    if impl == "pallas_triton":
      from pallas_kernels.decode_attention import extend_attention
      q_BKFGH = q.reshape(B, F, K, G, H).transpose(0, 2, 1, 3, 4).astype(k_cache.dtype)
      o = extend_attention(q_BKFGH, k_cache, v_cache, start_B.astype(jnp.int32),
                           implementation="pallas_triton")
      o = o.transpose(0, 2, 1, 3, 4).reshape(B, F, K * G, H)
    else:
      o = _dense_cached_attention(q.astype(k_cache.dtype), k_cache, v_cache, start_B)
    x = _finish_block(cfg, lp, x, o.astype(x.dtype))
    ks.append(k_cache)
    vs.append(v_cache)
  lengths = jnp.maximum(cache["lengths"], start_B + F)
  return _logits(cfg, params, x), {"k": tuple(ks), "v": tuple(vs), "lengths": lengths}


# ----------------------------------------------------------------------------------------------
# generation


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int) -> jax.Array:
  """Greedy when temperature == 0, else temperature / top-k sampling (top_k 0 = off): int32 [B]."""
  logits_BV = logits_BV.astype(jnp.float32)
  if top_k > 0:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  greedy = jnp.argmax(logits_BV, axis=-1)
  sampled = jax.random.categorical(rng, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


# The dense Triton decode kernel zero-pads the cache to a multiple of its key block (64 or 128) on
# every call whose capacity is not one -- a copy of every layer's K/V per step. Generation caches
# are therefore sized in multiples of this.
CAPACITY_MULTIPLE = 128


def generation_capacity(cfg: ModelConfig, prompt_len: int, max_new_tokens: int,
                        multiple: int = 1) -> int:
  """Cache capacity for prompts of `prompt_len` tokens plus `max_new_tokens`: the need rounded up
  to a multiple of lcm(multiple, CAPACITY_MULTIPLE), or, where that exceeds model.max_seq_len, the
  largest multiple of `multiple` within it (correct, at the price of the kernel's padding). Raises
  ValueError when the need does not fit."""
  need = prompt_len + max_new_tokens
  step = math.lcm(multiple, CAPACITY_MULTIPLE)
  cap = -(-need // step) * step
  if cap > cfg.max_seq_len:
    cap = cfg.max_seq_len // multiple * multiple
  if cap < need:
    raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {need} tokens "
                     f"do not fit model.max_seq_len={cfg.max_seq_len}"
                     + (f" in whole blocks of {multiple}" if multiple > 1 else ""))
  return cap


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "stop_tokens",
                                             "decode_impl", "cache_dtype"),
                   compiler_options=DECODE_COMPILER_OPTIONS)
def generate(cfg: ModelConfig, params, tokens_BT: jax.Array, lengths_B: jax.Array, rng: jax.Array,
             *, max_new_tokens: int, temperature: float | jax.Array = 0.0, top_k: int = 0,
             stop_tokens: tuple[int, ...] = (), pad_id: int = 256, decode_impl: str = "auto",
             cache_dtype: Any = jnp.bfloat16):
  """Prefill + a `lax.while_loop` of decode steps, all on device.

  tokens_BT: right-padded prompts int32 [B, T]; lengths_B: int32 [B]. Returns (new tokens int32
  [B, max_new_tokens], PAD after a sequence stops; number generated int32 [B], the stop token
  included). The loop ends when every sequence has stopped or max_new_tokens is reached. The cache
  holds `generation_capacity(cfg, T, max_new_tokens)` tokens.
  """
  B, T = tokens_BT.shape
  cache = init_cache(cfg, B, generation_capacity(cfg, T, max_new_tokens), cache_dtype)
  logits, cache = prefill(cfg, params, tokens_BT, lengths_B, cache)
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)

  def cond(c):
    step, _, _, _, done, _, _ = c
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(c):
    step, cache, logits, out, done, n, rng = c
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits, sub, temperature, top_k)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, step].set(tok)
    n = n + (~done).astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    logits, cache = decode_step(cfg, params, cache, jnp.where(done, 0, tok), decode_impl)
    return step + 1, cache, logits, out, done, n, rng

  out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
  init = (jnp.int32(0), cache, logits, out, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), rng)
  _, _, _, out, _, n, _ = jax.lax.while_loop(cond, body, init)
  return out, n
