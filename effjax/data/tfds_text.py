"""A tfds dataset built from local .txt/.jsonl files, so `tfds:<name>` sources work offline.

tensorflow-datasets 4.9 needs no TensorFlow for this: the builder writes array_record shards and
`tfds.data_source` reads them back as a random-access source (it needs `importlib_resources`).

    source = build_local_tfds("corpus.jsonl", "/tmp/tfds")     # -> "tfds:effjax_local_text"
    load_documents(source, tfds_data_dir="/tmp/tfds")

Importing this module imports tensorflow_datasets; nothing else in effjax.data does so eagerly.
"""

from __future__ import annotations

import pathlib
import re
import shutil
from typing import Iterator, Mapping, Optional

import tensorflow_datasets as tfds

from effjax.data import sources

DEFAULT_NAME = "effjax_local_text"


class EffjaxLocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of local files -> examples {"text": Text}, in file order, one split per file set.

  skip_registration: reading goes through tfds' read-only builder (from the prepared files in
  data_dir), so the class never has to be importable by name, and re-importing it cannot collide.
  """

  name = DEFAULT_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local text documents."}

  def __init__(self, *, splits: Optional[Mapping[str, str]] = None, text_field: str = "text",
               **kwargs):
    """splits: split name -> .txt/.jsonl path, directory or glob (only needed to prepare)."""
    self._splits = dict(splits or {})
    self._text_field = text_field
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not dataset_info_from_configs: the latter reads metadata files from the
    # builder's package directory, which this module does not ship.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text documents (effjax).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        # Keep source order: tfds otherwise shuffles records by a hash of their keys.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    if not self._splits:
      raise ValueError(f"{self.name}: no source files given; pass splits={{'train': path}}")
    return {split: self._generate_examples(src) for split, src in self._splits.items()}

  def _generate_examples(self, src: str) -> Iterator[tuple[int, dict]]:
    docs = sources.load_documents(src, text_field=self._text_field)
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def _builder_class(name: str) -> type[EffjaxLocalText]:
  if name == DEFAULT_NAME:
    return EffjaxLocalText
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"tfds dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
  # A same-shaped builder under another name, so several local corpora can share one data_dir.
  cls_name = "".join(p.capitalize() for p in name.split("_"))
  return type(cls_name, (EffjaxLocalText,), {"name": name}, skip_registration=True)


def build_local_tfds(src: str | Mapping[str, str], data_dir: str | pathlib.Path, *,
                     name: str = DEFAULT_NAME, text_field: str = "text",
                     overwrite: bool = False) -> str:
  """Prepares local files as tfds dataset `name` (array_record) in data_dir; returns 'tfds:<name>'.

  src: a .txt/.jsonl path, directory or glob (becomes split "train"), or {split: path}. An already
  prepared dataset is reused unless overwrite=True.
  """
  splits = {"train": str(src)} if isinstance(src, (str, pathlib.Path)) else dict(src)
  builder = _builder_class(name)(splits=splits, text_field=text_field, data_dir=str(data_dir))
  if overwrite and pathlib.Path(builder.data_dir).exists():
    shutil.rmtree(builder.data_dir)
    builder = _builder_class(name)(splits=splits, text_field=text_field, data_dir=str(data_dir))
  builder.download_and_prepare()
  return f"tfds:{name}"
