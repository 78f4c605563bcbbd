"""Typed, frozen experiment configs: YAML files plus `key.sub=value` overrides.

Every experiment is a YAML file in `configs/` that validates into `Config`. Unknown keys, wrong types
and impossible values raise `ConfigError` naming the dotted key, before any compute happens.

    cfg = load_config("configs/tiny.yaml", ["model.n_layers=4", "train.steps=100"])
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
  """A config key is unknown, has the wrong type, or an impossible value."""


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config key '{key}': {msg}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama-style decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP."""
  vocab_size: int = 259               # byte tokenizer: 256 bytes + PAD/BOS/EOS
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: Optional[int] = None      # default d_model // n_heads
  d_ff: Optional[int] = None          # default: 8/3 * d_model rounded up to a multiple of 64
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: str = "none"          # none | yarn (context extension: effjax/model/layers.py)
  rope_factor: float = 1.0            # yarn: s, the context extension factor
  rope_original_max_seq_len: Optional[int] = None   # yarn: the context the model was trained on
  rope_beta_fast: float = 32.0        # yarn: pairs turning more often than this keep their frequency
  rope_beta_slow: float = 1.0         # yarn: pairs turning less often than this are interpolated
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  init_std: float = 0.02
  attention_impl: str = "auto"        # auto | xla | cudnn
  linear_impl: str = "dense"          # dense | bitlinear (BitNet b1.58: ternary weights, int8
                                      # activations, straight-through; effjax/quant/ternary.py)
                                      # | ternary_packed (inference on packed weights:
                                      # effjax/quant/convert.py)
  lowbit_impl: str = "auto"           # ternary_packed: the packed matmul's backends, tried in
                                      # order (e.g. "pallas_mosaic_gpu,xla": the kernel where it
                                      # takes the shape, XLA for the rest, such as prefill)
  sub_norm: bool = False              # SubLN: RMSNorm before the attention output and the MLP
                                      # down projection (BitNet)
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: bool = False                 # rematerialise each block in the backward pass
  scan_layers: bool = False           # nn.scan-stacked layers (flat compile time; on the H100 the
                                      # 350m step ran 1.37x slower than unrolled) or unrolled
  embed_lookup: str = "auto"          # gather | onehot | auto (onehot matmul for vocab <= 4096)

  def __post_init__(self):
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
      _check(getattr(self, k) > 0, f"model.{k}", f"must be > 0, got {getattr(self, k)}")
    if self.head_dim is None:
      _check(self.d_model % self.n_heads == 0, "model.n_heads",
             f"n_heads={self.n_heads} must divide d_model={self.d_model} (or set model.head_dim)")
    else:
      _check(self.head_dim > 0, "model.head_dim", f"must be > 0, got {self.head_dim}")
    _check(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads",
           f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query attention)")
    _check(self.hd % 2 == 0, "model.head_dim", f"head dim {self.hd} must be even for RoPE")
    if self.d_ff is not None:
      _check(self.d_ff > 0, "model.d_ff", f"must be > 0, got {self.d_ff}")
    _check(self.attention_impl in ("auto", "xla", "cudnn"), "model.attention_impl",
           f"must be one of auto|xla|cudnn, got {self.attention_impl!r}")
    _check(self.linear_impl in ("dense", "bitlinear", "ternary_packed"), "model.linear_impl",
           f"must be dense|bitlinear|ternary_packed, got {self.linear_impl!r}")
    from pallas_kernels.lowbit_matmul import INT8_IMPLEMENTATIONS
    names = self.lowbit_impl.split(",")
    bad = [n for n in names if n not in INT8_IMPLEMENTATIONS or (n == "auto" and len(names) > 1)]
    _check(not bad, "model.lowbit_impl",
           f"must be auto, or comma-separated names of "
           f"{', '.join(n for n in INT8_IMPLEMENTATIONS if n != 'auto')}, got {self.lowbit_impl!r}")
    for k in ("compute_dtype", "param_dtype"):
      _check(getattr(self, k) in ("float32", "bfloat16", "float16"), f"model.{k}",
             f"must be float32|bfloat16|float16, got {getattr(self, k)!r}")
    _check(self.embed_lookup in ("auto", "gather", "onehot"), "model.embed_lookup",
           f"must be auto|gather|onehot, got {self.embed_lookup!r}")
    _check(self.init_std > 0, "model.init_std", "must be > 0")
    _check(self.rope_theta > 0, "model.rope_theta", "must be > 0")
    _check(self.rope_scaling in ("none", "yarn"), "model.rope_scaling",
           f"must be none|yarn, got {self.rope_scaling!r}")
    if self.rope_scaling == "yarn":
      _check(self.rope_factor >= 1, "model.rope_factor",
             f"yarn needs a factor >= 1, got {self.rope_factor}")
      _check(self.rope_original_max_seq_len is not None and self.rope_original_max_seq_len > 0,
             "model.rope_original_max_seq_len",
             f"yarn needs the original training context (> 0), got {self.rope_original_max_seq_len}")
      _check(0 < self.rope_beta_slow < self.rope_beta_fast, "model.rope_beta_fast",
             f"yarn needs 0 < rope_beta_slow < rope_beta_fast, got {self.rope_beta_slow}, "
             f"{self.rope_beta_fast}")

  @property
  def hd(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def ff(self) -> int:
    if self.d_ff is not None:
      return self.d_ff
    return int(math.ceil(8 * self.d_model / 3 / 64) * 64)

  def num_params(self, include_embedding: bool = True) -> int:
    d, hd = self.d_model, self.hd
    attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
    mlp = 3 * d * self.ff
    per_layer = attn + mlp + 2 * d + (self.n_heads * hd + self.ff if self.sub_norm else 0)
    n = self.n_layers * per_layer + d
    if include_embedding:
      n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    elif not self.tie_embeddings:
      n += self.vocab_size * d  # the output projection is a matmul that costs FLOPs
    return n


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where examples come from and how they are cut and ordered."""
  source: str = "bundled:tinyshakespeare"  # bundled:<name> | path.txt | path.jsonl | tfds:<name>[:split]
                                           # | root:<path> (under data.root)
  root: Optional[str] = None               # the data root of root:<path> sources (default: the
                                           # EFFJAX_DATA_ROOT environment variable)
  tfds_data_dir: Optional[str] = None
  text_field: str = "text"                 # jsonl field holding the document text
  seq_len: int = 128
  packing: str = "pack"                    # pack | pad
  valid_fraction: float = 0.05             # held-out share of the source (by document, or by bytes)
  ordering: str = "shuffle"                # shuffle | sequential
  seed: int = 0                            # the held-out split (and the shuffle, by default)
  shuffle_seed: Optional[int] = None       # the training shuffle's seed; default data.seed
  max_documents: Optional[int] = None
  epochs: int = 0                          # 0: train.steps steps over an endless stream of
                                           # epochs; E > 0: exactly E passes over the training ids
                                           # (DELT's kept ids), E * ceil(n / batch) steps, the
                                           # last batch of each epoch padded (effjax/data/pipeline.py);
                                           # train.steps then 0 (derived) or that count

  def __post_init__(self):
    _check(bool(self.source), "data.source", "must be non-empty")
    _check(self.epochs >= 0, "data.epochs", f"must be >= 0 (0 = train.steps decides), got {self.epochs}")
    _check(self.seq_len > 0, "data.seq_len", f"must be > 0, got {self.seq_len}")
    _check(self.packing in ("pack", "pad"), "data.packing", f"must be pack|pad, got {self.packing!r}")
    _check(0.0 <= self.valid_fraction < 1.0, "data.valid_fraction",
           f"must be in [0, 1), got {self.valid_fraction}")
    _check(self.ordering in ("shuffle", "sequential"), "data.ordering",
           f"must be shuffle|sequential, got {self.ordering!r}")
    if self.max_documents is not None:
      _check(self.max_documents > 0, "data.max_documents", "must be > 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay to min_lr_ratio * lr."""
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 50
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0                   # global-norm clip; 0 disables

  def __post_init__(self):
    _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
    _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1", "b1 and b2 must be in [0, 1)")
    _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 32                     # global batch (examples per optimiser step)
  grad_accum: int = 1                      # micro-batches per step; batch_size must divide evenly
  seed: int = 0
  out_dir: str = "runs/tiny"
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  eval_every: int = 200
  log_every: int = 10
  mesh_data: int = -1                      # data-parallel devices; -1 = all visible devices / fsdp
  mesh_fsdp: int = 1                       # devices params + optimiser state are sharded over
  progress: bool = True

  def __post_init__(self):
    _check(self.steps >= 0, "train.steps", f"must be > 0 (or 0 with data.epochs), got {self.steps}")
    _check(self.batch_size > 0, "train.batch_size", f"must be > 0, got {self.batch_size}")
    _check(self.grad_accum > 0, "train.grad_accum", f"must be > 0, got {self.grad_accum}")
    _check(self.batch_size % self.grad_accum == 0, "train.grad_accum",
           f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
    _check(self.checkpoint_every > 0, "train.checkpoint_every", "must be > 0")
    _check(self.keep_checkpoints > 0, "train.keep_checkpoints", "must be > 0")
    _check(self.eval_every > 0, "train.eval_every", "must be > 0")
    _check(self.log_every > 0, "train.log_every", "must be > 0")
    _check(self.mesh_data == -1 or self.mesh_data > 0, "train.mesh_data", "must be -1 or > 0")
    _check(self.mesh_fsdp > 0, "train.mesh_fsdp", f"must be > 0, got {self.mesh_fsdp}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  splits: tuple[str, ...] = ("valid",)     # 'valid' (held-out part of data.source) or local file paths
  batch_size: int = 16
  max_batches: int = 64                    # the valid loss (training and eval.py): the first
                                           # max_batches * batch_size examples of a split
  num_samples: int = 2
  sample_len: int = 200
  prompt: str = "\n"
  temperature: float = 0.8
  top_k: int = 40

  def __post_init__(self):
    _check(len(self.splits) > 0, "eval.splits", "must name at least one split")
    _check(self.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(self.max_batches > 0, "eval.max_batches", "must be > 0")
    _check(self.num_samples >= 0, "eval.num_samples", "must be >= 0")
    _check(self.sample_len >= 0, "eval.sample_len", "must be >= 0")
    _check(self.temperature >= 0, "eval.temperature", "must be >= 0 (0 = greedy)")
    _check(self.top_k >= 0, "eval.top_k", "must be >= 0 (0 = no top-k)")


KV_CACHES = ("bf16", "float32", "int4", "int2")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How generation stores its KV cache: eval.py's decoding evaluations (--drift, --retrieval);
  `effjax.quant.kv.KVCacheSpec.from_config(cfg.decode)` for any generate call."""
  kv_cache: str = "bf16"                   # bf16 | float32 | int4 | int2 (packed, BitDecoding-style)
  kv_group: int = 128                      # int4 / int2: tokens per K scale (K per channel)
  kv_window: Optional[int] = None          # full-precision residual window (None: 128 at 4 bits, 256 at 2)
  kv_k_mode: str = "channel"               # channel (K per channel, per group of tokens) | token
  kv_v_group: Optional[int] = None         # V channels per scale (None: the whole head)
  kv_flush: str = "loop"                   # who decides a write's path: loop | step | layer (effjax.quant.kv)

  def __post_init__(self):
    _check(self.kv_cache in KV_CACHES, "decode.kv_cache",
           f"must be one of {'|'.join(KV_CACHES)}, got {self.kv_cache!r}")
    _check(self.kv_group > 0, "decode.kv_group", f"must be > 0, got {self.kv_group}")
    _check(self.kv_k_mode in ("channel", "token"), "decode.kv_k_mode",
           f"must be channel|token, got {self.kv_k_mode!r}")
    _check(self.kv_flush in ("layer", "step", "loop"), "decode.kv_flush",
           f"must be layer|step|loop, got {self.kv_flush!r}")

  def check_head(self, head_dim: int) -> None:
    """ConfigError for low-bit settings that do not fit a head of `head_dim` channels (bits x
    head_dim in whole words, window >= group, V channel groups); nothing for bf16 / float32.
    `effjax.quant.kv.KVCacheSpec.from_config` makes the cache spec."""
    bits = {"int4": 4, "int2": 2}.get(self.kv_cache)
    if bits is None:
      return
    from pallas_kernels.lowbit_decode import layout
    try:
      layout.check_settings(bits=bits, group=self.kv_group, k_mode=self.kv_k_mode,
                            v_group=self.kv_v_group or head_dim, head_dim=head_dim,
                            window=self.kv_window)
    except ValueError as e:
      raise ConfigError(f"config key 'decode': {e}") from None


@dataclasses.dataclass(frozen=True)
class DeltConfig:
  """DELT data efficacy: score -> select -> order, before training (effjax/data/delt.py)."""
  scoring: str = "none"                    # none | lqs | pds | loss | random
  selection: str = "none"                  # none | top_r | top_k | threshold
  select_value: float = 1.0                # r (fraction), k (count) or the score threshold
  ordering: str = "none"                   # none (= data.ordering) | sorted_asc | sorted_desc | folding | zigzag | shuffle
  folds: int = 3                           # L for folding / zigzag
  reference_source: str = ""               # the quality reference set (e.g. WikiText-2 valid)
  reference_fraction: float = 0.5          # its first fraction of documents is the reference set
  reference_examples: int = 256            # at most this many reference examples
  proxy: ModelConfig = ModelConfig()       # proxy model (byte vocabulary)
  proxy_pretrain_steps: int = 200          # AdamW warm-up of the proxy before its SGD trajectory
  proxy_steps: int = 100                   # T: SGD steps scored (checkpoints every int(sqrt(T)))
  proxy_lr: float = 0.05                   # constant SGD lr of the trajectory (and the adjoint)
  proxy_batch_size: int = 32
  score_sample: int = 0                    # 0: score every example with the proxy; else score this
                                           # many and regress a learned scorer for the rest
  projection_dim: int = 0                  # 0: exact gradients; else count-sketch dimension
  hvp_chunk: int = 0                       # HVP micro-batch (sequences); 0: the whole proxy batch
  chunk_size: int = 16                     # examples per vmapped per-example-gradient chunk
  seed: int = 0
  cache_dir: str = "runs/delt_cache"

  def __post_init__(self):
    _check(self.scoring in ("none", "lqs", "pds", "loss", "random"), "delt.scoring",
           f"must be none|lqs|pds|loss|random, got {self.scoring!r}")
    _check(self.selection in ("none", "top_r", "top_k", "threshold"), "delt.selection",
           f"must be none|top_r|top_k|threshold, got {self.selection!r}")
    _check(self.ordering in ("none", "sorted_asc", "sorted_desc", "folding", "zigzag", "shuffle"),
           "delt.ordering", f"must be none|sorted_asc|sorted_desc|folding|zigzag|shuffle, got {self.ordering!r}")
    if self.selection == "top_r":
      _check(0 < self.select_value <= 1, "delt.select_value", f"top_r needs a fraction in (0, 1], got {self.select_value}")
    if self.selection == "top_k":
      _check(self.select_value >= 1 and float(self.select_value).is_integer(), "delt.select_value",
             f"top_k needs a positive integer count, got {self.select_value}")
    needs_scores = self.selection != "none" or self.ordering not in ("none", "shuffle")
    _check(not needs_scores or self.scoring != "none", "delt.scoring",
           f"delt.selection={self.selection!r} / delt.ordering={self.ordering!r} need scores: set delt.scoring")
    _check(self.folds >= 1, "delt.folds", f"must be >= 1, got {self.folds}")
    if self.scoring in ("lqs", "pds"):
      _check(bool(self.reference_source), "delt.reference_source",
             f"scoring={self.scoring!r} needs a reference set source")
    _check(0 < self.reference_fraction <= 1, "delt.reference_fraction", "must be in (0, 1]")
    _check(self.reference_examples > 0, "delt.reference_examples", "must be > 0")
    _check(self.proxy_pretrain_steps >= 0, "delt.proxy_pretrain_steps", "must be >= 0")
    _check(self.proxy_steps >= 1, "delt.proxy_steps", "must be >= 1")
    _check(self.proxy_lr > 0, "delt.proxy_lr", "must be > 0")
    _check(self.proxy_batch_size > 0, "delt.proxy_batch_size", "must be > 0")
    _check(self.score_sample >= 0, "delt.score_sample", "must be >= 0")
    _check(self.projection_dim >= 0, "delt.projection_dim", "must be >= 0")
    _check(self.hvp_chunk >= 0, "delt.hvp_chunk", "must be >= 0")
    _check(self.chunk_size > 0, "delt.chunk_size", "must be > 0")


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "tiny"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  decode: DecodeConfig = DecodeConfig()
  delt: DeltConfig = DeltConfig()

  def __post_init__(self):
    self.decode.check_head(self.model.hd)  # low-bit settings checked when the config loads
    _check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
           f"seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
    _check(self.delt.proxy.vocab_size == self.model.vocab_size, "delt.proxy.vocab_size",
           "the proxy must share the model's tokenizer/vocabulary")
    if self.delt.scoring in ("lqs", "pds", "loss"):  # the scorings that run the proxy model
      _check(self.data.seq_len <= self.delt.proxy.max_seq_len, "delt.proxy.max_seq_len",
             f"must be >= data.seq_len={self.data.seq_len} (delt.scoring={self.delt.scoring!r} "
             "runs the proxy on the training examples)")
    if self.data.epochs == 0:
      _check(self.train.steps > 0, "train.steps",
             f"must be > 0, got {self.train.steps} (0 derives it from data.epochs, which is 0)")
    if self.train.steps > 0:  # with data.epochs and train.steps 0, checked once the data is known
      _check(self.optim.warmup_steps < self.train.steps, "optim.warmup_steps",
             f"warmup_steps={self.optim.warmup_steps} must be < train.steps={self.train.steps}")


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(value, inner[0], key)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
    return _from_dict(tp, value, key + ".")
  if origin is tuple:
    (elem, *_rest) = typing.get_args(tp)
    if isinstance(value, str):
      value = [value]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__}")
    return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    return value
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value
  raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _from_dict(cls: type, d: dict, prefix: str = "") -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  for k in d:
    if k not in names:
      raise ConfigError(f"unknown config key '{prefix}{k}' (valid keys under "
                        f"'{prefix.rstrip('.') or '<top>'}': {', '.join(sorted(names))})")
  kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in d.items()}
  return cls(**kwargs)


# Keys earlier versions wrote into a run's config.yaml: dropped when read, so old runs stay
# readable. train.eval_batches: the periodic valid loss now uses eval.max_batches like eval.py.
_RETIRED = {("train", "eval_batches")}


def from_dict(d: dict) -> Config:
  """Validates a nested dict (as read from YAML) into a `Config`."""
  if not isinstance(d, dict):
    raise ConfigError(f"a config must be a mapping at the top level, got {type(d).__name__}")
  for section, key in _RETIRED:
    if isinstance(d.get(section), dict) and key in d[section]:
      d = {**d, section: {k: v for k, v in d[section].items() if k != key}}
  return _from_dict(Config, d)


def to_dict(cfg: Any) -> dict:
  """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
  def conv(x):
    if dataclasses.is_dataclass(x):
      return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple):
      return [conv(v) for v in x]
    return x
  return conv(cfg)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
  """Applies `a.b=value` strings (value parsed as YAML) to a nested dict, returning a new dict."""
  import copy
  d = copy.deepcopy(d)
  for ov in overrides:
    if "=" not in ov:
      raise ConfigError(f"override {ov!r} must look like key.sub=value")
    key, raw = ov.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    value = yaml.safe_load(raw) if raw.strip() != "" else ""
    node, cls = d, Config
    for i, p in enumerate(parts):
      fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
      if p not in fields:
        raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}' in override {ov!r}")
      ftype = typing.get_type_hints(cls)[p]
      if i == len(parts) - 1:
        node[p] = value
      else:
        if not dataclasses.is_dataclass(ftype):
          raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is not a section")
        node = node.setdefault(p, {})
        cls = ftype
  return d


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | None = None) -> Config:
  """Reads a YAML config (or the defaults when `path` is None) and applies overrides."""
  d: dict = {}
  if path is not None:
    p = pathlib.Path(path)
    if not p.is_file():
      raise ConfigError(f"config file not found: {p}")
    try:
      d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
  d = apply_overrides(d, list(overrides or []))
  return from_dict(d)
