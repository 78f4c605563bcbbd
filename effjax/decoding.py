"""KV-cached decoding: jitted `prefill` (in one call, or in chunks: `prefill_chunked`),
`decode_step`, `extend` and an on-device generation loop.

Each is the model's one layer (`effjax.model.block`) with a cache attention strategy: prefill
attends causally over the prompt and stores its K/V; a decode step stores one token and attends
over the cache; extend stores F tokens and attends causally over the cache (ReSA's rectification,
chunked prefill). The cache is an explicit typed pytree (`effjax.cache.KVCache`), right-padded
prompts with per-sequence lengths.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from effjax import model as model_lib
from effjax.cache import STEP_FLUSH, DenseKV, KVCache
from effjax.config import ModelConfig

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


# ----------------------------------------------------------------------------------------------
# attention strategies over the cache


class PrefillAttention:
  """Causal attention over the prompt itself (model.attention_impl; or `sparse`, a
  `effjax.sparse.prefill_sparse.SeerSparseAttention`: SeerAttention's block-sparse prefill),
  storing each layer's K/V at positions [0, T) of the cache. aux: the layer's updated cache
  entry."""

  def __init__(self, cfg: ModelConfig, cache: KVCache, lengths_B: jax.Array | None = None,
               sparse=None):
    self.impl, self.cache, self.lengths, self.sparse = cfg.attention_impl, cache, lengths_B, sparse

  def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
    attend = self.sparse or model_lib.CausalSelfAttention(self.impl)
    o = attend(layer, q_BTNH, k_BTKH, v_BTKH)[0]
    return o, self.cache.layers[layer].write(k_BTKH, v_BTKH, None, lengths_B=self.lengths)


class CachedAttention:
  """T new tokens per sequence at positions [start_b, start_b + T): store their K/V, then attend
  causally over the cache (decode_attention for one token, extend_attention for more). aux: the
  layer's updated cache entry."""

  def __init__(self, cache: KVCache, start_B: jax.Array, implementation=None,
               path: str | None = None):
    self.cache, self.start, self.impl, self.path = cache, start_B, implementation, path

  def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
    entry = self.cache.layers[layer]
    kw = {"path": self.path} if self.path and getattr(entry, "flush", None) in STEP_FLUSH else {}
    entry = entry.write(k_BTKH, v_BTKH, self.start, **kw)
    return entry.attend(q_BTNH, self.start, self.impl), entry


def cached_layers(cfg: ModelConfig, params, x_BTD: jax.Array, cache: KVCache, start_B: jax.Array,
                  decode_impl, path: str | None = None):
  """The layers over T new tokens a sequence at [start_b, start_b + T) with `CachedAttention`:
  (x_BTD, updated layer entries). Where entries leave the write's path to the step
  (`KVCache.rewrite_needed`), one `lax.cond` picks it for all layers; `path` ("append" /
  "rewrite") gives it instead (a caller that knows, e.g. `generate`'s append-only steps)."""
  T = x_BTD.shape[1]
  positions = _positions(start_B, T)
  run = lambda path=None: model_lib.run_layers(cfg, params, x_BTD, positions,
                                               CachedAttention(cache, start_B, decode_impl, path))
  if path is not None:
    return run(path)
  need = cache.rewrite_needed(start_B, T)
  if need is None:
    return run()
  return jax.lax.cond(need, lambda: run("rewrite"), lambda: run("append"))


class RecordQKV:
  """Dense causal attention that also returns each layer's post-RoPE (q, k, v) as aux: what
  prefill caches and what the decode gate distils from."""

  def __init__(self, cfg: ModelConfig):
    self.impl = cfg.attention_impl

  def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
    o = model_lib.CausalSelfAttention(self.impl)(layer, q_BTNH, k_BTKH, v_BTKH)[0]
    return o, (q_BTNH, k_BTKH, v_BTKH)


def _positions(start_B: jax.Array, T: int) -> jax.Array:
  return start_B[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)[None]


def forward_layers(cfg: ModelConfig, params, tokens_BT: jax.Array):
  """Dense causal forward from position 0: (final residual stream [B, T, D], per-layer post-RoPE
  queries [B, T, N, H], keys [B, T, K, H] and values [B, T, K, H])."""
  B, T = tokens_BT.shape
  x = model_lib.embed(cfg, params, tokens_BT)
  x, qkv = model_lib.run_layers(cfg, params, x, _positions(jnp.zeros((B,), jnp.int32), T),
                                RecordQKV(cfg))
  return x, [a[0] for a in qkv], [a[1] for a in qkv], [a[2] for a in qkv]


# ----------------------------------------------------------------------------------------------
# prefill, decode step, extend


@functools.partial(jax.jit, static_argnames=("cfg", "prefill_sparse"), donate_argnames=("cache",))
def prefill(cfg: ModelConfig, params, tokens_BT: jax.Array, lengths_B: jax.Array, cache: KVCache,
            prefill_sparse=None, prefill_gate=None):
  """Runs right-padded prompts (tokens int32 [B, T], lengths int32 [B], 1 <= length <= T) and
  writes their K/V to cache positions [0, T). Returns (logits float32 [B, V] at each sequence's
  last prompt token, cache with lengths = lengths_B). Padding tokens sit after every real token, so
  causal attention keeps them out of the real positions; decode masks them by length.
  prefill_sparse: an `effjax.sparse.prefill_sparse.PrefillSparseConfig` for SeerAttention's
  block-sparse prefill (its gate selector reads `prefill_gate`, the distilled prefill gate
  params); None: dense causal attention."""
  T = tokens_BT.shape[1]
  if T > cache.capacity:
    raise ValueError(f"prompt length {T} exceeds cache capacity {cache.capacity}")
  x, cache = _prefill_layers(cfg, params, tokens_BT, lengths_B, cache, prefill_sparse,
                             prefill_gate)
  return model_lib.logits(cfg, params, _hidden_at(x, lengths_B - 1, 0, None)), cache


def _prefill_layers(cfg: ModelConfig, params, tokens_BT, lengths_B, cache: KVCache,
                    prefill_sparse=None, prefill_gate=None):
  """prefill's layers: (residual stream [B, T, D], cache with lengths = lengths_B)."""
  B, T = tokens_BT.shape
  sparse = None
  if prefill_sparse is not None:
    from effjax.sparse.prefill_sparse import SeerSparseAttention
    sparse = SeerSparseAttention(cfg, prefill_sparse, lengths_B.astype(jnp.int32), prefill_gate)
  x = model_lib.embed(cfg, params, tokens_BT)
  x, layers = model_lib.run_layers(cfg, params, x, _positions(jnp.zeros((B,), jnp.int32), T),
                                   PrefillAttention(cfg, cache, lengths_B, sparse))
  return x, KVCache(layers=tuple(layers), lengths=lengths_B.astype(jnp.int32))


def _hidden_at(x_BTD: jax.Array, pos_B: jax.Array, start: int | jax.Array, prev_BD):
  """x at each sequence's position pos_b of a chunk that starts at position `start`: [B, D];
  where pos_b lies outside the chunk, prev_BD (None: every pos_b lies inside)."""
  T = x_BTD.shape[1]
  i_B = pos_B - start
  x_BD = jnp.take_along_axis(x_BTD, jnp.clip(i_B, 0, T - 1)[:, None, None], axis=1)[:, 0]
  if prev_BD is None:
    return x_BD
  return jnp.where(((i_B >= 0) & (i_B < T))[:, None], x_BD, prev_BD)


@functools.partial(jax.jit, static_argnames=("cfg", "decode_impl", "path"),
                   donate_argnames=("cache",))
def decode_step(cfg: ModelConfig, params, cache: KVCache, token_B: jax.Array,
                decode_impl: str = "auto", path: str | None = None):
  """One new token per sequence (int32 [B]) at position cache.lengths: writes its K/V, attends
  over the cache through `pallas_kernels.decode_attention` (implementation `decode_impl`) and
  returns (logits float32 [B, V], cache with lengths + 1). path: the write path of entries that
  leave it to the step (`cached_layers`; None: decided here)."""
  pos = cache.lengths
  x = model_lib.embed(cfg, params, token_B[:, None])
  x, layers = cached_layers(cfg, params, x, cache, pos, decode_impl, path)
  return model_lib.logits(cfg, params, x[:, 0]), KVCache(layers=tuple(layers), lengths=pos + 1)


@functools.partial(jax.jit, static_argnames=("cfg", "decode_impl"), donate_argnames=("cache",))
def extend(cfg: ModelConfig, params, cache: KVCache, tokens_BF: jax.Array, start_B: jax.Array,
           decode_impl: str = "auto"):
  """Dense forward of F tokens per sequence at positions [start_b, start_b + F) over the cache
  (causal, every earlier cached token visible), overwriting their K/V in every layer. This is
  ReSA's rectification (re-run the last f tokens densely so their cache entries equal a dense
  model's) and a chunked prefill. Returns (logits float32 [B, F, V], cache with lengths =
  max(lengths, start + F)). Attention: `pallas_kernels.extend_attention` (the multi-token
  Triton kernel on a GPU: each layer's cache is read once for all F tokens)."""
  x, cache = _extend_layers(cfg, params, cache, tokens_BF, start_B, decode_impl)
  return model_lib.logits(cfg, params, x), cache


def _extend_layers(cfg: ModelConfig, params, cache: KVCache, tokens_BF, start_B, decode_impl):
  """extend's layers: (residual stream [B, F, D], cache with lengths max(lengths, start + F))."""
  F = tokens_BF.shape[1]
  x = model_lib.embed(cfg, params, tokens_BF)
  x, layers = cached_layers(cfg, params, x, cache, start_B, decode_impl)
  lengths = jnp.maximum(cache.lengths, start_B + F)
  return x, KVCache(layers=tuple(layers), lengths=lengths)


def check_prefill_chunk(prefill_chunk) -> None:
  """Raises ValueError unless prefill_chunk is None or a positive int."""
  if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or
                                    not isinstance(prefill_chunk, int) or prefill_chunk < 1):
    raise ValueError(f"prefill_chunk must be a positive int (tokens per chunk) or None, got "
                     f"{prefill_chunk!r}")


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "decode_impl"),
                   donate_argnames=("cache",))
def prefill_chunked(cfg: ModelConfig, params, tokens_BT: jax.Array, lengths_B: jax.Array,
                    cache: KVCache, chunk: int | None, decode_impl: str = "auto"):
  """`prefill` in chunks of `chunk` tokens (None, or chunk >= T: one `prefill` call), so that
  activations are those of `chunk` tokens per sequence, not T. Same arguments and results as
  `prefill` (logits float32 [B, V] at each sequence's last prompt token, the cache with lengths =
  lengths_B), equal up to float rounding.

  The first chunk is a `prefill` of tokens [0, chunk); every later one an `extend` at [s, s +
  chunk) (attention `decode_impl`: `extend_attention`), the last one shorter where chunk does not
  divide T. Every chunk runs for every sequence, also past its length: the rows of right padding
  are then written as a one-call prefill writes them, and the hidden state for the logits is
  taken from the chunk that holds position length_b - 1.

  Chunks attend to the earlier chunks' K/V in the compute dtype, as the one-call prefill does. A
  dense cache (`DenseKV`) at least as precise as the compute dtype (bf16 with bf16 compute) is
  written in place. Another cache cannot serve as that: a narrower dense one would round the
  earlier chunks' K/V, the low-bit `QuantKV` holds them quantised (and each chunk's write would
  pack padding rows past short prompts). Its chunks therefore run over a dense cache of the T
  prompt rows in the compute dtype (2 * L * B * T * K * H elements more memory while
  prefilling), whose K/V are then written to it once, as the one-call prefill writes them
  (`write(k, v, None, lengths_B=...)`; for `QuantKV`: every full group of each prompt packed,
  the rest in the residual window)."""
  check_prefill_chunk(chunk)
  B, T = tokens_BT.shape
  if chunk is None or chunk >= T:
    return prefill(cfg, params, tokens_BT, lengths_B, cache)
  if T > cache.capacity:
    raise ValueError(f"prompt length {T} exceeds cache capacity {cache.capacity}")
  lengths_B = lengths_B.astype(jnp.int32)
  dt = jnp.dtype(cfg.compute_dtype)
  in_place = all(isinstance(e, DenseKV) and jnp.promote_types(e.dtype, dt) == e.dtype
                 for e in cache.layers)
  if in_place:
    work = cache
  else:
    cap = min(-(-T // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE, cache.capacity)
    work = KVCache.init(cfg, B, cap, dt)
  last_B = lengths_B - 1
  x, work = _prefill_layers(cfg, params, tokens_BT[:, :chunk], jnp.minimum(lengths_B, chunk), work)
  h_BD = _hidden_at(x, last_B, 0, None)

  def run_chunk(start, tokens_BF, work, h_BD):
    x, work = _extend_layers(cfg, params, work, tokens_BF, jnp.full((B,), start, jnp.int32),
                             decode_impl)
    return work, _hidden_at(x, last_B, start, h_BD)

  def body(i, carry):
    start = i * chunk
    return run_chunk(start, jax.lax.dynamic_slice_in_dim(tokens_BT, start, chunk, axis=1), *carry)

  n_full = T // chunk
  work, h_BD = jax.lax.fori_loop(1, n_full, body, (work, h_BD))
  if T % chunk:
    work, h_BD = run_chunk(n_full * chunk, tokens_BT[:, n_full * chunk:], work, h_BD)
  if in_place:
    layers = work.layers
  else:
    rows = lambda x: x[:, :, :T].transpose(0, 2, 1, 3)     # [B, K, S, H] -> [B, T, K, H]
    layers = tuple(e.write(rows(w.k), rows(w.v), None, lengths_B=lengths_B)
                   for e, w in zip(cache.layers, work.layers))
  return model_lib.logits(cfg, params, h_BD), KVCache(layers=layers, lengths=lengths_B)


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


def new_cache(cfg: ModelConfig, batch: int, capacity: int, cache_dtype=jnp.bfloat16,
              kv_cache=None) -> KVCache:
  """An empty cache: dense in cache_dtype, or as `kv_cache` says (an object with
  `init(cfg, batch, capacity)`, e.g. `effjax.quant.kv.KVCacheSpec` for a 4 / 2-bit cache)."""
  if kv_cache is not None:
    return kv_cache.init(cfg, batch, capacity)
  return KVCache.init(cfg, batch, capacity, cache_dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "stop_tokens",
                                             "decode_impl", "cache_dtype", "kv_cache",
                                             "prefill_chunk", "prefill_sparse"),
                   compiler_options=DECODE_COMPILER_OPTIONS)
def generate(cfg: ModelConfig, params, tokens_BT: jax.Array, lengths_B: jax.Array, rng: jax.Array,
             *, max_new_tokens: int, temperature: float | jax.Array = 0.0, top_k: int = 0,
             stop_tokens: tuple[int, ...] = (), pad_id: int = 256, decode_impl: str = "auto",
             cache_dtype: Any = jnp.bfloat16, kv_cache=None, prefill_chunk: int | None = None,
             prefill_sparse=None, prefill_gate=None):
  """Prefill + a `lax.while_loop` of decode steps, all on device.

  tokens_BT: right-padded prompts int32 [B, T]; lengths_B: int32 [B]. Returns (new tokens int32
  [B, max_new_tokens], PAD after a sequence stops; number generated int32 [B], the stop token
  included). The loop ends when every sequence has stopped or max_new_tokens is reached. The cache
  holds `generation_capacity(cfg, T, max_new_tokens)` tokens, dense in cache_dtype or as the
  `kv_cache` spec says (`effjax.quant.kv.KVCacheSpec("int4")`: a 4-bit cache).
  prefill_chunk: None prefills the prompts in one call; a positive int, in chunks of that many
  tokens (`prefill_chunked`: the activations of a chunk instead of the whole prompt).
  prefill_sparse / prefill_gate: SeerAttention's block-sparse prefill (see `prefill`; one call,
  not with prefill_chunk).
  """
  check_prefill_chunk(prefill_chunk)
  if prefill_sparse is not None and prefill_chunk is not None:
    raise ValueError("prefill_sparse runs the prompt in one call: leave prefill_chunk None")
  B, T = tokens_BT.shape
  multiple = getattr(kv_cache, "capacity_multiple", 1)
  cache = new_cache(cfg, B, generation_capacity(cfg, T, max_new_tokens, multiple), cache_dtype,
                    kv_cache)
  if prefill_sparse is not None:
    logits, cache = prefill(cfg, params, tokens_BT, lengths_B, cache, prefill_sparse, prefill_gate)
  else:
    logits, cache = prefill_chunked(cfg, params, tokens_BT, lengths_B, cache, prefill_chunk,
                                    decode_impl)
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)

  def cond(c):
    step, _, _, _, done, _, _ = c
    return (step < max_new_tokens) & ~jnp.all(done)

  loop_flush = cache.loop_flush()

  def body(c):
    step, cache, logits, out, done, n, rng = c
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits, sub, temperature, top_k)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, step].set(tok)
    n = n + (~done).astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    logits, cache = decode_step(cfg, params, cache, jnp.where(done, 0, tok), decode_impl,
                                "append" if loop_flush else None)
    return step + 1, cache, logits, out, done, n, rng

  out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
  init = (jnp.int32(0), cache, logits, out, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), rng)
  if loop_flush:
    # A low-bit cache with flush "loop" (effjax.quant.kv): runs of steps that only append (no
    # conditional in the step) while every residual window has room; a full one ends the run and
    # is packed before the next. Runs last ~R steps, so the flush is amortised over them.
    run = lambda c: jax.lax.while_loop(lambda c: cond(c) & ~c[1].flush_needed(), body, c)
    flush = lambda c: (c[0], c[1].flush_full()) + c[2:]
    _, _, _, out, _, n, _ = jax.lax.while_loop(cond, lambda c: run(flush(c)), init)
  else:
    _, _, _, out, _, n, _ = jax.lax.while_loop(cond, body, init)
  return out, n
