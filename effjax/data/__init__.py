"""Data: byte tokenizer, document sources, packing into examples, orderings, the grain pipeline.

Importing this package needs only numpy; grain is imported when a TrainIterator is built and
tensorflow-datasets when a tfds source is read (or `effjax.data.tfds_text` is imported).
"""

from effjax.data.ordering import ORDERINGS, make_ordering, sequential_order, shuffle_order
from effjax.data.packing import Examples, empty_examples, pack_documents, pad_documents
from effjax.data.pipeline import (TrainIterator, epoch_steps, eval_batches, load_eval_split,
                                  load_splits, split_documents)
from effjax.data.sources import load_documents
from effjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "ByteTokenizer",
    "load_documents",
    "Examples", "empty_examples", "pack_documents", "pad_documents",
    "ORDERINGS", "make_ordering", "sequential_order", "shuffle_order",
    "TrainIterator", "epoch_steps", "eval_batches", "load_eval_split", "load_splits", "split_documents",
]
