"""Block-sparse decoding with ReSA rectification.

Each decode step, per layer and GQA group, a selector scores the KV blocks from a small summary
cache -- Quest's per-block key min/max, or the SeerAttention-R gate's K-compression cache -- picks
blocks under a token budget (or a gate-probability threshold), and the block-sparse kernel attends
only to them. Summaries are kept incrementally: after a token is written, only its block's summary
is recomputed (O(block_size)), so a filled block's entry is written once when it fills.

Sparse steps make the new tokens' K/V approximate (they were computed from sparse attention in the
layers below), and the error compounds. ReSA's rectification re-runs the last f generated tokens
densely at their positions every f steps (`decoding.extend`), overwriting their cache entries with
what a dense model would have stored, then refreshes the summaries of the blocks it rewrote.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from effjax import decoding
from effjax import model as model_lib
from effjax.cache import STEP_FLUSH, BlockMinMax, GateKCache, KVCache
from effjax.config import ModelConfig
from effjax.sparse import gate as gate_lib
from effjax.sparse import selection
from pallas_kernels import block_topk as block_topk_lib
from pallas_kernels.sparse_decode import IMPLEMENTATIONS as SPARSE_KERNELS


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  selector: str = "quest"          # quest | gate
  block_size: int = 64
  budget_tokens: int = 4096        # blocks kept = budget_tokens // block_size (incl. first + current)
  threshold: float = 0.0           # gate only: > 0 selects by gate probability (capped by the budget)
  rectify_every: int = 32          # ReSA f; 0 = never rectify
  d_gate: int = 64
  gate_cache_dtype: str = "bfloat16"  # K-compression cache storage: bfloat16 | float32 |
                                      # float8_e4m3fn (saturating at +-448). bf16 halves the bytes a
                                      # step's gate scores read (scores still in float32); same
                                      # recall and retrieval as f32 on the 9000-step model
  local_tokens: int = 1            # always keep the blocks holding the last local_tokens tokens
                                   # (1: the current block). Right after a block boundary the
                                   # current block holds one or two tokens; Quest then often
                                   # drops the previous block (model #7: excess NLL 0.26-0.28 at
                                   # those positions against 0.044 elsewhere). For Quest use
                                   # block_size: -35% / -13% excess NLL on models #8 / #9,
                                   # retrieval within 1 of 16 prompts; the gate gains ~nothing
                                   # (experiments/sparse_quality, README)
  rectify_logits: str = "dense"    # after a rectification the next token comes from: "dense" the
                                   # rectifying forward's last logits (ReSA: that forward computes
                                   # them anyway, so with f = 1 decoding is dense); "sparse" the
                                   # last sparse step's logits (a diagnostic: rectification then
                                   # changes only the cache; f = 1 gives a dense-exact cache before
                                   # every sparse step)
  sparse_kernel: str = "auto"      # the block-sparse attention's implementation: "auto" follows
                                   # the call's decode_impl; or one of sparse_decode's, e.g.
                                   # "pallas_mosaic_gpu" (Hopper TMA + wgmma kernel) while dense
                                   # steps and rectification keep decode_impl

  def __post_init__(self):
    if self.gate_cache_dtype not in gate_lib.CACHE_DTYPES:
      raise ValueError(f"gate_cache_dtype must be {'|'.join(gate_lib.CACHE_DTYPES)}, "
                       f"got {self.gate_cache_dtype!r}")
    if self.selector not in ("quest", "gate"):
      raise ValueError(f"selector must be quest|gate, got {self.selector!r}")
    if self.rectify_every < 0:
      raise ValueError(f"rectify_every must be >= 0, got {self.rectify_every}")
    if self.local_tokens < 1:
      raise ValueError(f"local_tokens must be >= 1, got {self.local_tokens}")
    forced = block_topk_lib.forced_blocks_max(self.block_size, self.local_tokens)   # 2 for local_tokens = 1
    if self.budget_blocks < forced:
      raise ValueError(f"budget_tokens={self.budget_tokens} keeps {self.budget_blocks} blocks of "
                       f"{self.block_size}, fewer than the {forced} always kept (the first block "
                       f"and those the last local_tokens={self.local_tokens} tokens span)")
    if self.rectify_logits not in ("dense", "sparse"):
      raise ValueError(f"rectify_logits must be dense|sparse, got {self.rectify_logits!r}")
    if self.sparse_kernel not in SPARSE_KERNELS:
      raise ValueError(f"sparse_kernel must be one of {SPARSE_KERNELS}, got "
                       f"{self.sparse_kernel!r}")

  @property
  def budget_blocks(self) -> int:
    return self.budget_tokens // self.block_size

  @property
  def gate(self) -> gate_lib.GateConfig:
    return gate_lib.GateConfig(block_size=self.block_size, d_gate=self.d_gate)

  def check_gate_params(self, cfg: ModelConfig, gate_params) -> None:
    """For selector='gate': gate_params must fit the model and d_gate (a clear ValueError)."""
    if self.selector == "gate":
      gate_lib.check_params(cfg, self.d_gate, gate_params)


def _summaries(cfg: ModelConfig, scfg: SparseConfig, k_BKSH, lengths_B, wk=None,
               first_block_B=None):
  """One layer's summaries of the blocks of k_BKSH -- the cache's keys, or a slice of them that
  starts at block first_block_B (lengths then count from the slice start): `BlockMinMax` (Quest;
  the key dtype) or `GateKCache` (gate; scfg.gate_cache_dtype)."""
  if scfg.selector == "quest":
    return BlockMinMax(*selection.block_minmax(k_BKSH, lengths_B, scfg.block_size))
  kc = gate_lib.compress_blocks(wk, k_BKSH, lengths_B, scfg.block_size, cfg.rope_theta,
                                first_block_B=first_block_B)
  return GateKCache(gate_lib.to_cache_dtype(kc, scfg.gate_cache_dtype))


def _layer_gate(gate_params, i: int, name: str):
  return None if gate_params is None else gate_params[name][i]


def init_summaries(cfg: ModelConfig, scfg: SparseConfig, cache: KVCache,
                   gate_params=None) -> tuple:
  """Summaries of every block of a (prefilled) cache, one per layer like the cache: a tuple of
  L `BlockMinMax` (Quest) or `GateKCache` (gate)."""
  scfg.check_gate_params(cfg, gate_params)
  return tuple(_summaries(cfg, scfg, entry.keys(), cache.lengths, _layer_gate(gate_params, i, "wk"))
               for i, entry in enumerate(cache.layers))


def _refresh_window(cfg: ModelConfig, scfg: SparseConfig, summ_l, k_BKSH, lengths_B, first_B,
                    nb: int, wk=None):
  """One layer's summaries with blocks [first_b, first_b + nb) of each sequence recomputed from
  the cache (the rest kept)."""
  bs = scfg.block_size
  window = jax.vmap(lambda c, b: jax.lax.dynamic_slice_in_dim(c, b * bs, nb * bs, axis=1))
  put = jax.vmap(lambda d, n, b: jax.lax.dynamic_update_slice_in_dim(d, n.astype(d.dtype), b, axis=1))
  rel_B = lengths_B - first_B * bs               # valid tokens counted from the window start
  new = _summaries(cfg, scfg, window(k_BKSH, first_B), rel_B, wk, first_B)
  return jax.tree.map(lambda d, n: put(d, n, first_B), summ_l, new)


def refresh_summaries(cfg: ModelConfig, scfg: SparseConfig, summ: tuple, cache: KVCache,
                      start_B: jax.Array, n_tokens: int, gate_params=None) -> tuple:
  """Summaries after positions [start_b, start_b + n_tokens) of every layer were rewritten (a
  rectification): recomputes only the blocks holding them -- ceil(n_tokens / block_size) + 1
  blocks per sequence at per-sequence offsets -- instead of every block (`init_summaries` reads
  all of K). Same layout as `init_summaries`; equal to it on every block the window covers."""
  bs = scfg.block_size
  nb_all = cache.capacity // bs
  nb = min(-(-n_tokens // bs) + 1, nb_all)       # a span of n tokens touches at most this many
  # window start: the block of each sequence's first rewritten token, clamped so the window stays
  # inside the cache (it then still covers every rewritten block)
  first_B = jnp.clip(start_B // bs, 0, nb_all - nb).astype(jnp.int32)
  return tuple(_refresh_window(cfg, scfg, summ[i], entry.keys(), cache.lengths, first_B, nb,
                               _layer_gate(gate_params, i, "wk"))
               for i, entry in enumerate(cache.layers))


def _select(scfg: SparseConfig, cfg: ModelConfig, summ_l, q_BKGH, lengths_B, wq=None,
            decode_impl: str = "auto"):
  """Block ids [B, K, M] (ascending, -1 padded) and live ids per row [B, K] (None: let the
  attention kernel count them)."""
  topk_impl = decode_impl if decode_impl in block_topk_lib.IMPLEMENTATIONS else None
  if scfg.selector == "quest":
    scores = selection.quest_scores(q_BKGH, summ_l.kmin, summ_l.kmax)
  else:
    scores = gate_lib.gate_logits(wq, q_BKGH, summ_l.kc, lengths_B - 1, cfg.rope_theta)
    if scfg.threshold > 0:
      probs = gate_lib.masked_softmax(scores, lengths_B, scfg.block_size)
      return selection.select_threshold(probs, lengths_B, scfg.block_size, scfg.threshold,
                                        scfg.budget_blocks, scfg.local_tokens), None
  return block_topk_lib.block_topk(scores, lengths_B, block_size=scfg.block_size,
                                   k=scfg.budget_blocks, implementation=topk_impl,
                                   local_tokens=scfg.local_tokens)


class SparseAttention:
  """The sparse decode step's attention strategy (one new token per sequence): store the token's
  K/V, refresh its block's summary (O(block_size): a filled block's summary is written once, when
  it fills), select blocks from the summaries and attend to them only. aux: (the layer's cache
  entry, its summaries)."""

  def __init__(self, cfg: ModelConfig, scfg: SparseConfig, cache: KVCache, summ: tuple,
               gate_params, decode_impl: str, path: str | None = None):
    self.cfg, self.scfg, self.cache, self.summ = cfg, scfg, cache, summ
    self.gate_params, self.decode_impl, self.path = gate_params, decode_impl, path

  def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
    cfg, scfg = self.cfg, self.scfg
    pos = self.cache.lengths
    B, _, N, H = q_BTNH.shape
    K = cfg.n_kv_heads
    entry = self.cache.layers[layer]
    kw = {"path": self.path} if self.path and getattr(entry, "flush", None) in STEP_FLUSH else {}
    entry = entry.write(k_BTKH, v_BTKH, pos, **kw)
    blk = (pos // scfg.block_size).astype(jnp.int32)          # the block of the new token
    s_l = _refresh_window(cfg, scfg, self.summ[layer], entry.keys(), pos + 1, blk, 1,
                          _layer_gate(self.gate_params, layer, "wk"))
    q_BKGH = q_BTNH[:, 0].reshape(B, K, N // K, H)
    idx, n_live = _select(scfg, cfg, s_l, q_BKGH, pos + 1,
                          _layer_gate(self.gate_params, layer, "wq"), self.decode_impl)
    impl = self.decode_impl if scfg.sparse_kernel == "auto" else scfg.sparse_kernel
    o = entry.attend_blocks(q_BKGH, pos + 1, idx, block_size=scfg.block_size,
                            num_live_BK=n_live, implementation=impl)
    return o.reshape(B, 1, N, H).astype(q_BTNH.dtype), (entry, s_l)


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "decode_impl"),
                   donate_argnames=("cache", "summ"))
def sparse_decode_step(cfg: ModelConfig, scfg: SparseConfig, params, cache: KVCache, summ: tuple,
                       token_B: jax.Array, gate_params=None, decode_impl: str = "auto"):
  """decode_step with block-sparse attention: returns (logits [B, V], cache, summaries)."""
  scfg.check_gate_params(cfg, gate_params)
  pos = cache.lengths
  x = model_lib.embed(cfg, params, token_B[:, None])
  run = lambda path=None: model_lib.run_layers(
      cfg, params, x, pos[:, None],
      SparseAttention(cfg, scfg, cache, summ, gate_params, decode_impl, path))
  need = cache.rewrite_needed(pos, 1)     # one write decision a step (QuantKV flush step / loop)
  x, aux = run() if need is None else jax.lax.cond(need, lambda: run("rewrite"),
                                                   lambda: run("append"))
  cache = KVCache(layers=tuple(a[0] for a in aux), lengths=pos + 1)
  return model_lib.logits(cfg, params, x[:, 0]), cache, tuple(a[1] for a in aux)


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "max_new_tokens", "top_k",
                                             "stop_tokens", "decode_impl", "cache_dtype", "sparse",
                                             "kv_cache", "rectify_impl", "prefill_chunk"),
                   compiler_options=decoding.DECODE_COMPILER_OPTIONS)
def generate(cfg: ModelConfig, scfg: SparseConfig, params, tokens_BT, lengths_B, rng, gate_params=None,
             *, max_new_tokens: int, temperature=0.0, top_k: int = 0, stop_tokens: tuple = (),
             pad_id: int = 256, decode_impl: str = "auto", cache_dtype=jnp.bfloat16, sparse: bool = True,
             rectify_impl: str | None = None, kv_cache=None, prefill_chunk: int | None = None):
  """Generation on device: sparse decode steps (dense when `sparse` is False) with a dense
  rectification of the last f = scfg.rectify_every tokens after every f steps. Returns (tokens
  int32 [B, max_new_tokens], number generated int32 [B]) like `decoding.generate`.
  kv_cache: the cache's storage spec (None: dense in cache_dtype; `effjax.quant.kv.KVCacheSpec`:
  a 4 / 2-bit cache, whose rectification re-quantises the rows it rewrites).
  rectify_impl: the attention of the rectification (`decoding.extend`'s decode_impl); None
  follows decode_impl (on a GPU: the multi-token Triton kernel).
  prefill_chunk: as `decoding.generate` (None: one prefill call; else chunks of that many tokens,
  `decoding.prefill_chunked` with decode_impl).

  Loop structure: a first inner `lax.while_loop` of up to f sparse steps, then an outer
  `lax.while_loop` whose body rectifies unconditionally (`decoding.extend` + `refresh_summaries`)
  and runs the next up to f steps. A per-step `lax.cond(rectify, identity)` made XLA copy every
  layer's K/V on the steps that did not rectify (seen in XLA:CPU's HLO). The price: the step
  appears in two loops, so it is compiled twice.

  A rectification runs only where a token is sampled after it: after steps f, 2f, ... below
  max_new_tokens, while some sequence has not stopped. The steps after the last one -- a partial
  last chunk when f does not divide max_new_tokens, or a last full chunk -- are left unrectified:
  rectifying them could change only the cache, which is not returned. So f >= max_new_tokens never
  rectifies, and a run whose sequences all stop early does no rectification after they stop."""
  decoding.check_prefill_chunk(prefill_chunk)
  c = _decode_loop(cfg, scfg, params, tokens_BT, lengths_B, rng, gate_params, max_new_tokens,
                   temperature, top_k, stop_tokens, pad_id, decode_impl, cache_dtype, sparse,
                   rectify_impl, None, kv_cache, prefill_chunk)
  return c[4], c[7]


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "decode_impl", "cache_dtype", "sparse",
                                             "rectify_impl", "kv_cache"),
                   compiler_options=decoding.DECODE_COMPILER_OPTIONS)
def score_continuation(cfg: ModelConfig, scfg: SparseConfig, params, tokens_BT, lengths_B,
                       cont_BN, gate_params=None, *, decode_impl: str = "auto",
                       cache_dtype=jnp.bfloat16, sparse: bool = True, rectify_impl: str | None = None,
                       kv_cache=None):
  """Teacher-forced decoding: the decode steps `generate` runs (sparse, rectified every
  scfg.rectify_every steps; dense when `sparse` is False), fed the given continuation instead of
  sampled tokens. So every K/V entry of the continuation is written by those steps -- sparse
  attention in the layers below, rectified or not -- while the tokens stay the same in every run,
  which makes runs comparable position by position (free-running runs part ways after the first
  differing token).
  cont_BN: int32 [B, N], fed after each prompt (prompts of lengths_B tokens).
  Returns (logprob float32 [B, N]: log p(cont[:, s] | prompt, cont[:, :s]) from the logits the
  run had before feeding token s; argmax int32 [B, N]: the token greedy decoding would have
  picked there)."""
  if cont_BN.ndim != 2 or cont_BN.shape[0] != tokens_BT.shape[0]:
    raise ValueError(f"cont_BN must be [B={tokens_BT.shape[0]}, N], got {cont_BN.shape}")
  c = _decode_loop(cfg, scfg, params, tokens_BT, lengths_B, jax.random.key(0), gate_params,
                   cont_BN.shape[1], 0.0, 0, (), 256, decode_impl, cache_dtype, sparse,
                   rectify_impl, cont_BN.astype(jnp.int32), kv_cache)
  return c[9]


def per_layer(gate_params):
  """Stacked gate parameters {"wq": [L, ...], "wk": [L, ...]} as tuples of per-layer arrays (as
  the cache holds its layers), sliced once before the decode loops: indexing the stacked arrays
  inside a loop body made XLA:GPU copy every layer's slices on every step (two device-to-device
  memcpy launches per layer, 76 us of a 1.76 ms step at B1, generate.json's gate row)."""
  if gate_params is None:
    return None
  return {name: tuple(w[i] for i in range(w.shape[0])) if hasattr(w, "shape") else w
          for name, w in gate_params.items()}


def _decode_loop(cfg, scfg, params, tokens_BT, lengths_B, rng, gate_params, N, temperature, top_k,
                 stop_tokens, pad_id, decode_impl, cache_dtype, sparse, rectify_impl, forced_BN,
                 kv_cache=None, prefill_chunk=None):
  """generate's loop (forced_BN None) or score_continuation's (forced_BN [B, N]: fed instead of
  the sampled tokens; carry[9] collects (logprob, argmax) of each step). Returns the final carry."""
  B, T = tokens_BT.shape
  if sparse:
    scfg.check_gate_params(cfg, gate_params)
  gate_params = per_layer(gate_params)
  multiple = math.lcm(scfg.block_size, getattr(kv_cache, "capacity_multiple", 1))
  cap = decoding.generation_capacity(cfg, T, N, multiple=multiple)
  cache = decoding.new_cache(cfg, B, cap, cache_dtype, kv_cache)
  logits, cache = decoding.prefill_chunked(cfg, params, tokens_BT, lengths_B, cache, prefill_chunk,
                                           decode_impl)
  summ = init_summaries(cfg, scfg, cache, gate_params) if sparse else ()   # dense: none needed
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)
  f = scfg.rectify_every if sparse else 0

  # carry: (step, cache, summaries, logits, out [B, N], fed [B, N], done, n, rng, scored); `fed`
  # holds the tokens actually fed (0 after a stop), what a rectification must re-run; `scored` is
  # (logprob [B, N], argmax [B, N]) when forced, else ()
  def step_fn(c):
    step, cache, summ, logits, out, fed, done, n, rng, scored = c
    rng, sub = jax.random.split(rng)
    if forced_BN is None:
      tok = decoding.sample_logits(logits, sub, temperature, top_k)
    else:
      tok = jax.lax.dynamic_index_in_dim(forced_BN, step, axis=1, keepdims=False)
      lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      scored = (scored[0].at[:, step].set(jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]),
                scored[1].at[:, step].set(jnp.argmax(logits, axis=-1).astype(jnp.int32)))
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, step].set(tok)
    n = n + (~done).astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    feed = jnp.where(done, 0, tok)
    fed = fed.at[:, step].set(feed)
    if sparse:
      logits, cache, summ = sparse_decode_step(cfg, scfg, params, cache, summ, feed, gate_params,
                                               decode_impl)
    else:
      logits, cache = decoding.decode_step(cfg, params, cache, feed, decode_impl)
    return step + 1, cache, summ, logits, out, fed, done, n, rng, scored

  def run_until(c, end):
    return jax.lax.while_loop(lambda c: (c[0] < end) & ~jnp.all(c[6]), step_fn, c)

  def rectify_then_run(c):   # entered at step = k * f < N, k >= 1
    step, cache, summ, logits, out, fed, done, n, rng, scored = c
    start = cache.lengths - f
    last = jax.lax.dynamic_slice_in_dim(fed, step - f, f, axis=1)
    lg, cache = decoding.extend(cfg, params, cache, last, start,
                                decode_impl if rectify_impl is None else rectify_impl)
    summ = refresh_summaries(cfg, scfg, summ, cache, start, f, gate_params)
    logits = lg[:, -1] if scfg.rectify_logits == "dense" else logits
    return run_until((step, cache, summ, logits, out, fed, done, n, rng, scored),
                     jnp.minimum(step + f, N))

  out = jnp.full((B, N), pad_id, jnp.int32)
  scored = () if forced_BN is None else (jnp.zeros((B, N), jnp.float32), jnp.zeros((B, N), jnp.int32))
  c = (jnp.int32(0), cache, summ, logits, out, jnp.zeros((B, N), jnp.int32), jnp.zeros((B,), bool),
       jnp.zeros((B,), jnp.int32), rng, scored)
  c = run_until(c, min(f, N) if f else N)
  if 0 < f < N:
    c = jax.lax.while_loop(lambda c: (c[0] < N) & ~jnp.all(c[6]), rectify_then_run, c)
  return c
