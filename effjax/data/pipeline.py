"""From a DataConfig to train/valid Examples, and a grain iterator whose position resumes exactly.

Two ways to walk the data, both a pure function of (examples, ordering, B, step), so the
iterator's whole state is the step number:

- endless (`epochs=None`, train.steps governs): the stream is epoch 0's permutation of example
  ids, then epoch 1's, ...; batch s takes stream items [s*B, (s+1)*B) and may straddle an epoch
  boundary.
- epoch-complete (`epochs=E`, data.epochs): exactly E passes, each one permutation of the n ids
  (the ordering applied within every epoch), cut into ceil(n / B) batches. Epoch boundaries are
  batch boundaries; the last batch of an epoch holds the n mod B leftover examples and is filled
  up with PAD rows whose loss_mask is 0 (the loss is a token mean over the mask, so they add
  nothing). Every example is seen exactly once per epoch, none is dropped, and the run is
  `epoch_steps(n, B, E)` = E * ceil(n / B) steps long.

    splits = load_splits(cfg.data)
    it = TrainIterator(splits["train"], batch_size=32, ordering_kind="shuffle", seed=0)
    batch = next(it)            # {"inputs": int32 [B, T], "targets": int32 [B, T], "loss_mask": f32 [B, T]}
    it = TrainIterator(splits["train"], 32, order=folding, epochs=3)   # 3 * ceil(n / 32) batches
    state = it.get_state()      # JSON-able; TrainIterator(..., start_step=state["step"]) continues
"""

from __future__ import annotations

import dataclasses

import sys
import threading
import zlib
from typing import Any, Iterator, Optional

import numpy as np

from effjax.config import DataConfig
from effjax.data import ordering as ordering_lib
from effjax.data.packing import Examples, pack_documents, pad_documents
from effjax.data.sources import load_documents
from effjax.data.tokenizer import PAD_ID, ByteTokenizer

Batch = dict[str, np.ndarray]

# The document holdout has its own rng stream (salted), so changing data.ordering or the training
# shuffle never moves documents between train and valid.
_HOLDOUT_SALT = 0x5EED_0DD5
# Below this many documents a per-document holdout is too coarse; split each text instead.
MIN_DOCS_FOR_DOC_HOLDOUT = 20


def to_examples(docs_ids: list[np.ndarray], cfg: DataConfig) -> Examples:
  """Token-id documents (int [L] each) -> Examples per cfg.packing (pack | pad) and cfg.seq_len."""
  docs_ids = [d for d in docs_ids if d.shape[0] > 0]
  if cfg.packing == "pack":
    return pack_documents(docs_ids, cfg.seq_len)
  if cfg.packing == "pad":
    return pad_documents(docs_ids, cfg.seq_len)
  raise ValueError(f"unknown packing {cfg.packing!r} (expected pack|pad)")


def split_documents(docs_ids: list[np.ndarray], valid_fraction: float,
                    seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Holds out valid_fraction of the data -> (train docs, valid docs), each a list of int [L].

  >= 20 documents: a seeded random valid_fraction of the documents (at least one when
  valid_fraction > 0), both sides in corpus order. Fewer: every document is cut at byte
  (1 - valid_fraction) * L and its tail is held out, as nanoGPT does for tinyshakespeare.
  """
  n = len(docs_ids)
  if valid_fraction <= 0:
    return list(docs_ids), []
  if n >= MIN_DOCS_FOR_DOC_HOLDOUT:
    n_valid = min(n - 1, max(1, int(round(valid_fraction * n))))
    rng = np.random.default_rng((seed, _HOLDOUT_SALT))
    is_valid = np.zeros(n, bool)
    is_valid[rng.permutation(n)[:n_valid]] = True
    return ([d for d, v in zip(docs_ids, is_valid) if not v],
            [d for d, v in zip(docs_ids, is_valid) if v])
  train, valid = [], []
  for d in docs_ids:
    cut = int(d.shape[0] * (1.0 - valid_fraction))
    train.append(d[:cut])
    valid.append(d[cut:])
  return train, valid


def load_splits(cfg: DataConfig) -> dict[str, Examples]:
  """cfg.source -> {"train": Examples, "valid": Examples}, cut per cfg.packing / cfg.seq_len.

  Train and valid never share a document (or, below 20 documents, a byte). "valid" has 0 rows when
  cfg.valid_fraction == 0. Only the fields that shape the examples key an in-process cache (runs of
  an experiment share one load); callers must not modify the returned arrays.
  """
  key = dataclasses.replace(cfg, ordering="shuffle", shuffle_seed=None, epochs=0)
  if key not in _SPLIT_CACHE:
    _SPLIT_CACHE.clear()  # keep one corpus in memory at most
    _SPLIT_CACHE[key] = _load_splits(cfg)
  return dict(_SPLIT_CACHE[key])


_SPLIT_CACHE: dict = {}


def _load_splits(cfg: DataConfig) -> dict[str, Examples]:
  docs = load_documents(cfg.source, text_field=cfg.text_field, tfds_data_dir=cfg.tfds_data_dir,
                        root=cfg.root,
                        max_documents=cfg.max_documents)
  tok = ByteTokenizer()
  docs_ids = [tok.encode(d) for d in docs]
  train, valid = split_documents(docs_ids, cfg.valid_fraction, cfg.seed)
  return {"train": to_examples(train, cfg), "valid": to_examples(valid, cfg)}


def load_eval_split(path_or_source: str, cfg: DataConfig) -> Examples:
  """A whole source (any `load_documents` source, e.g. a local .txt/.jsonl) as Examples, no holdout.

  Uses cfg.seq_len, cfg.packing, cfg.text_field and cfg.tfds_data_dir; ignores cfg.max_documents.
  """
  docs = load_documents(path_or_source, text_field=cfg.text_field, tfds_data_dir=cfg.tfds_data_dir,
                        root=cfg.root)
  tok = ByteTokenizer()
  return to_examples([tok.encode(d) for d in docs], cfg)


def epoch_steps(n: int, batch_size: int, epochs: int) -> int:
  """Steps of an epoch-complete run: epochs * ceil(n / batch_size) (the last batch of each epoch
  padded, see the module docstring)."""
  if n <= 0 or batch_size <= 0 or epochs <= 0:
    raise ValueError(f"epoch_steps needs n, batch_size, epochs > 0, got {n}, {batch_size}, {epochs}")
  return epochs * -(-n // batch_size)


def _batch_dict(tokens: np.ndarray, mask: np.ndarray) -> Batch:
  return {"inputs": np.ascontiguousarray(tokens[:, :-1]),
          "targets": np.ascontiguousarray(tokens[:, 1:]),
          "loss_mask": np.ascontiguousarray(mask, dtype=np.float32)}


class _BatchAt:
  """step -> batch, a pure function; grain maps it over range(steps). Thread-safe (grain prefetches
  with threads); keeps the few most recent epochs' permutations, since consecutive steps reuse them."""

  def __init__(self, examples: Examples, batch_size: int, ordering_kind: str, seed: int,
               order: Optional[np.ndarray], epochs: Optional[int] = None):
    self.examples, self.batch_size = examples, batch_size
    self.ordering_kind, self.seed, self.order = ordering_kind, seed, order
    self.epoch_len = len(order) if order is not None else len(examples)
    self.epochs = epochs
    self.steps_per_epoch = -(-self.epoch_len // batch_size)
    self.total_steps = None if epochs is None else epochs * self.steps_per_epoch
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def epoch_order(self, epoch: int) -> np.ndarray:
    if self.order is not None:
      return self.order
    with self._lock:
      perm = self._cache.get(epoch)
    if perm is None:
      perm = ordering_lib.make_ordering(self.ordering_kind, len(self.examples), self.seed, epoch)
      with self._lock:
        self._cache[epoch] = perm
        for old in sorted(self._cache)[:-4]:  # prefetch threads may still be one epoch behind
          del self._cache[old]
    return perm

  def ids(self, step: int) -> np.ndarray:
    """Example ids of batch `step`: int64 [B]. Endless: may straddle an epoch boundary.
    Epoch-complete: within one epoch; -1 marks the padding rows of an epoch's last batch."""
    if self.epochs is not None:
      if not 0 <= step < self.total_steps:
        raise IndexError(f"step {step} is outside the {self.total_steps} steps of {self.epochs} "
                         f"epochs")
      epoch, k = divmod(step, self.steps_per_epoch)
      chunk = self.epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
      out = np.full(self.batch_size, -1, np.int64)
      out[:len(chunk)] = chunk
      return out
    items = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
    epochs, pos = np.divmod(items, self.epoch_len)
    out = np.empty_like(items)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.epoch_order(int(e))[pos[sel]]
    return out

  def __call__(self, step: int) -> Batch:
    ids = self.ids(int(step))
    tokens, mask = self.examples.tokens[ids], self.examples.mask[ids]
    pad = ids < 0
    if pad.any():  # fancy indexing copied the rows: safe to overwrite
      tokens[pad], mask[pad] = PAD_ID, 0.0
    return _batch_dict(tokens, mask)


class TrainIterator:
  """Exactly resumable iterator of training batches, run by grain (threads + prefetch).

  examples: the training Examples (N rows, seq_len T). ordering_kind: a name in
  `ordering.ORDERINGS` ("shuffle": a new permutation per epoch from (seed, epoch); "sequential").
  order: an explicit int array of example ids (e.g. a DELT folding order, possibly a selection);
  it overrides ordering_kind and is repeated every epoch. epochs: None = endless; E = exactly E
  epochs of `steps_per_epoch` = ceil(n / B) batches each, then StopIteration (see the module
  docstring for the padded last batch of an epoch). Yields {"inputs": int32 [B, T],
  "targets": int32 [B, T], "loss_mask": float32 [B, T]}.

  State (`get_state`): {"step", "batch_size", "num_examples", "ordering", "seed", "order_crc32",
  "epochs"}. `set_state` needs only "step"; the other keys, when present, must match this iterator
  (a resumed run that changed its data would silently see other batches otherwise).
  """

  def __init__(self, examples: Examples, batch_size: int, ordering_kind: str = "shuffle",
               seed: int = 0, start_step: int = 0, order: Optional[np.ndarray] = None, *,
               epochs: Optional[int] = None, num_threads: int = 2, prefetch: int = 8):
    import grain  # lazy: effjax.data's tokenizer/packing stay importable without grain

    if batch_size <= 0:
      raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if order is not None:
      order = np.asarray(order)
      if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"order must be a 1-D integer array of example ids, got {order.dtype} "
                         f"{order.shape}")
      order = order.astype(np.int64)
      if order.size and (order.min() < 0 or order.max() >= len(examples)):
        raise ValueError(f"order holds ids outside [0, {len(examples)}): "
                         f"min {order.min()}, max {order.max()}")
    elif ordering_kind not in ordering_lib.ORDERINGS:
      raise ValueError(f"unknown ordering {ordering_kind!r} "
                       f"(known: {', '.join(sorted(ordering_lib.ORDERINGS))})")
    if epochs is not None and (isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1):
      raise ValueError(f"epochs must be None or an integer >= 1, got {epochs!r}")
    self._fn = _BatchAt(examples, batch_size, ordering_kind, seed, order,
                        None if epochs is None else int(epochs))
    if self._fn.epoch_len < batch_size:
      what = "the explicit order holds" if order is not None else "the data has"
      raise ValueError(f"too little training data: {what} {self._fn.epoch_len} examples but one "
                       f"batch needs batch_size={batch_size}; use more data, a smaller batch, "
                       "or a shorter seq_len")
    self.batch_size, self.seed = batch_size, seed
    self.ordering = "explicit" if order is not None else ordering_kind
    self.num_examples = len(examples)
    self.epochs = self._fn.epochs
    self._order_crc = int(zlib.crc32(order.tobytes())) if order is not None else None
    # A step-indexed MapDataset: grain owns iteration, prefetching and the position ("next_index").
    stop = sys.maxsize if self._fn.total_steps is None else self._fn.total_steps
    self._dataset = grain.MapDataset.range(0, stop).map(self._fn).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    self._it = iter(self._dataset)
    if start_step:
      self.set_state({"step": start_step})

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    return next(self._it)

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch: ceil(n / B) (epoch-complete) -- the stream's n / B otherwise."""
    return self._fn.steps_per_epoch

  @property
  def total_steps(self) -> Optional[int]:
    """epochs * steps_per_epoch, or None for an endless iterator."""
    return self._fn.total_steps

  @property
  def examples_per_epoch(self) -> int:
    """n: the ids one epoch visits (the explicit order's length, else every example)."""
    return self._fn.epoch_len

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The permutation (int64 [n]) of example ids that epoch `epoch` visits."""
    return self._fn.epoch_order(epoch)

  @property
  def step(self) -> int:
    """The global step of the batch the next `next()` returns."""
    return int(self._it.get_state()["next_index"])

  def batch_at(self, step: int) -> Batch:
    """Batch `step` computed directly (no grain, no state change)."""
    return self._fn(step)

  def ids_at(self, step: int) -> np.ndarray:
    """Example ids (int64 [B]) of batch `step`."""
    return self._fn.ids(step)

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "batch_size": self.batch_size, "num_examples": self.num_examples,
            "ordering": self.ordering, "seed": self.seed, "order_crc32": self._order_crc,
            "epochs": self.epochs}

  def set_state(self, state: dict[str, Any]) -> None:
    mine = self.get_state()
    for key in ("batch_size", "num_examples", "ordering", "seed", "order_crc32", "epochs"):
      if key in state and state[key] != mine[key]:
        raise ValueError(f"data iterator state mismatch: checkpoint has {key}={state[key]!r}, this "
                         f"run has {key}={mine[key]!r}; resuming would not replay the same batches")
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"data iterator step must be >= 0, got {step}")
    if self.total_steps is not None and step > self.total_steps:
      raise ValueError(f"data iterator step {step} is past the end of its {self.epochs} epochs "
                       f"({self.total_steps} steps)")
    self._it.set_state({"next_index": step})


def eval_batches(examples: Examples, batch_size: int,
                 max_batches: Optional[int] = None) -> Iterator[Batch]:
  """Examples 0, 1, 2, ... in order, in batches of batch_size (at most max_batches of them).

  Yields the same dicts as TrainIterator. Every batch has batch_size rows so a jitted eval step
  compiles once: the last one is filled up with PAD rows whose loss_mask is 0.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size}")
  n = len(examples)
  if max_batches is not None:
    n = min(n, max_batches * batch_size)
  for start in range(0, n, batch_size):
    stop = min(n, start + batch_size)
    tokens, mask = examples.tokens[start:stop], examples.mask[start:stop]
    if stop - start < batch_size:
      fill = batch_size - (stop - start)
      tokens = np.concatenate([tokens, np.full((fill, tokens.shape[1]), PAD_ID, np.int32)])
      mask = np.concatenate([mask, np.zeros((fill, mask.shape[1]), np.float32)])
    yield _batch_dict(tokens, mask)
