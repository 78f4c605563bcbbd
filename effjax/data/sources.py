"""Where documents come from: the bundled corpus, local .txt/.jsonl files, or a prepared tfds dataset.

Every source becomes a `list[str]` of documents; tokenizing and cutting into examples happen later
(`effjax.data.pipeline`).

    load_documents("bundled:tinyshakespeare")          # data/tinyshakespeare/*.txt, one doc per file
    load_documents("corpus.jsonl", text_field="text")  # one JSON object per line
    load_documents("notes.txt")                        # one doc per non-empty line
    load_documents("corpus/*.jsonl")                   # a glob (or a directory) of such files
    load_documents("tfds:effjax_local_text:train", tfds_data_dir="/tmp/tfds")
    load_documents("root:wikitext-2/valid.txt", root="/data")   # under the data root

`root:<path>` names a file, directory or glob under the data root: the `root` argument
(`data.root` in configs) or else the environment variable EFFJAX_DATA_ROOT. Configs name external
corpora this way, so they work from any checkout: set the root once per machine.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
from typing import Iterator, Optional

# repo root = parent of the `effjax/` package; `data/` sits beside it in a source checkout.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BUNDLED_DIR = REPO_ROOT / "data"

_FILE_SUFFIXES = (".txt", ".jsonl")
# Files in a bundled corpus folder that describe the data rather than being data.
_META_PREFIXES = ("license", "source", "readme")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]*):")
_TFDS_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
ROOT_ENV = "EFFJAX_DATA_ROOT"


def data_root(root: Optional[str] = None) -> Optional[str]:
  """The data root: `root` if given, else $EFFJAX_DATA_ROOT, else None."""
  return root or os.environ.get(ROOT_ENV) or None


def resolve_source(source: str, root: Optional[str] = None) -> str:
  """`root:<path>` -> <data root>/<path>; any other source unchanged. A clear ValueError when no
  root is set or it is not a directory."""
  if not source.startswith("root:"):
    return source
  base = data_root(root)
  if base is None:
    raise ValueError(f"data source {source!r} is under the data root, but none is set: pass "
                     f"data.root=DIR or set {ROOT_ENV}=DIR")
  if not pathlib.Path(base).expanduser().is_dir():
    raise FileNotFoundError(f"data source {source!r}: the data root {base!r} is not a directory")
  return str(pathlib.Path(base).expanduser() / source[len("root:"):])


def load_documents(source: str, *, text_field: str = "text", tfds_data_dir: Optional[str] = None,
                   max_documents: Optional[int] = None, root: Optional[str] = None) -> list[str]:
  """Reads the documents of `source` (see module docstring) -> list of non-empty str.

  Raises FileNotFoundError when the source does not exist and ValueError for an unknown scheme, an
  unsupported file type, a malformed file or an empty corpus; the message names the source.
  """
  if max_documents is not None and max_documents <= 0:
    raise ValueError(f"max_documents must be > 0, got {max_documents}")
  source = resolve_source(source, root)
  m = _SCHEME.match(source)
  scheme = m.group(1) if m else None
  if scheme == "bundled":
    docs = list(_bundled(source[len("bundled:"):], source, text_field))
  elif scheme == "tfds":
    docs = _tfds(source[len("tfds:"):], source, text_field, tfds_data_dir, max_documents)
  elif scheme is not None and len(scheme) > 1 and not pathlib.Path(source).exists():
    # len > 1 lets Windows drive letters through as paths.
    raise ValueError(f"unknown data source scheme {scheme!r} in {source!r} "
                     "(expected bundled:<name>, tfds:<name>[:split], or a .txt/.jsonl path)")
  else:
    docs = list(_take(_local(source, text_field), max_documents))
  if max_documents is not None:
    docs = docs[:max_documents]
  if not docs:
    raise ValueError(f"data source {source!r} holds no (non-empty) documents")
  return docs


def _take(it: Iterator[str], n: Optional[int]) -> Iterator[str]:
  for i, doc in enumerate(it):
    if n is not None and i >= n:
      return
    yield doc


# ---------------------------------------------------------------------------------------------
# local files


def read_text_file(path: str | pathlib.Path) -> Iterator[str]:
  """One document per non-empty line of a UTF-8 .txt file (undecodable bytes become U+FFFD)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.rstrip("\r\n")
      if line.strip():
        yield line


def read_jsonl_file(path: str | pathlib.Path, text_field: str = "text") -> Iterator[str]:
  """One document per line of a .jsonl file, taken from `text_field`; empty texts are skipped."""
  for _, _, text in _jsonl_records(path, text_field):
    yield text


def _jsonl_records(path, text_field: str) -> Iterator[tuple[int, dict, str]]:
  """(line number, object, text) of every document of a .jsonl file (empty texts skipped)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
      if text_field not in obj:
        raise ValueError(f"{path}, line {lineno}: no field {text_field!r} "
                         f"(fields: {', '.join(sorted(obj)) or 'none'}); set data.text_field")
      text = obj[text_field]
      if not isinstance(text, str):
        raise ValueError(f"{path}, line {lineno}: field {text_field!r} is "
                         f"{type(text).__name__}, expected a string")
      if text.strip():
        yield lineno, obj, text


def load_document_field(source: str, field: str, *, text_field: str = "text",
                        max_documents: Optional[int] = None,
                        root: Optional[str] = None) -> list[str]:
  """`field` of each document `load_documents` returns for the same arguments, in the same order
  (str of the value), for local .jsonl sources: e.g. the `source` of every document of a mixed
  corpus. A ValueError names the file and line of a document without the field, and any source
  that is not .jsonl files."""
  files = _local_files(resolve_source(source, root))
  if any(f.suffix.lower() != ".jsonl" for f in files):
    raise ValueError(f"data source {source!r}: document fields need .jsonl files")
  out = []
  for f in files:
    for lineno, obj, _ in _jsonl_records(f, text_field):
      if max_documents is not None and len(out) >= max_documents:
        return out
      if field not in obj:
        raise ValueError(f"{f}, line {lineno}: no field {field!r}")
      out.append(str(obj[field]))
  return out


def read_file(path: str | pathlib.Path, text_field: str = "text") -> Iterator[str]:
  """Dispatches on the suffix: .txt -> lines, .jsonl -> JSON objects."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == ".txt":
    return read_text_file(path)
  if suffix == ".jsonl":
    return read_jsonl_file(path, text_field)
  raise ValueError(f"unsupported data file {str(path)!r}: expected a .txt or .jsonl file")


def _local(source: str, text_field: str) -> Iterator[str]:
  for f in _local_files(source):
    yield from read_file(f, text_field)


def _local_files(source: str) -> list[pathlib.Path]:
  """The .txt / .jsonl files of a local source (a file, a directory or a glob), in read order."""
  path = pathlib.Path(source).expanduser()
  if any(c in source for c in "*?[") and not path.exists():
    files = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True))
    files = [p for p in files if p.is_file() and p.suffix.lower() in _FILE_SUFFIXES]
    if not files:
      raise FileNotFoundError(f"data source {source!r}: the glob matches no .txt/.jsonl files")
  elif path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FILE_SUFFIXES)
    if not files:
      raise FileNotFoundError(f"data source {source!r}: the directory holds no .txt/.jsonl files")
  elif path.is_file():
    files = [path]
  else:
    raise FileNotFoundError(f"data source {source!r}: no such file or directory")
  return files


# ---------------------------------------------------------------------------------------------
# bundled corpora


def _bundled(name: str, source: str, text_field: str) -> Iterator[str]:
  """data/<name>/: each .txt file is ONE document (a corpus like tinyshakespeare is one long text);
  .jsonl files hold one document per line. LICENSE/SOURCE/README files are skipped."""
  if not name or "/" in name or name.startswith("."):
    raise ValueError(f"data source {source!r}: expected bundled:<name>, a folder of {BUNDLED_DIR}")
  if not BUNDLED_DIR.is_dir():
    raise FileNotFoundError(
        f"data source {source!r}: the bundled data folder {BUNDLED_DIR} does not exist. Bundled "
        "corpora live in the repository's data/ folder, which a non-editable install does not "
        "carry: install with `pip install -e .`, run from the repository (PYTHONPATH=.), or point "
        "data.source at a file path.")
  folder = BUNDLED_DIR / name
  if not folder.is_dir():
    have = sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir())
    raise FileNotFoundError(f"data source {source!r}: no bundled corpus {name!r} in {BUNDLED_DIR} "
                            f"(available: {', '.join(have) or 'none'})")
  files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _FILE_SUFFIXES
                 and not p.name.lower().startswith(_META_PREFIXES))
  if not files:
    raise FileNotFoundError(f"data source {source!r}: {folder} holds no .txt/.jsonl data files")
  for f in files:
    if f.suffix.lower() == ".txt":
      # Read bytes and decode ourselves: text mode would rewrite \r\n and change the byte stream.
      text = f.read_bytes().decode("utf-8", "replace")
      if text.strip():
        yield text
    else:
      yield from read_jsonl_file(f, text_field)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets


def parse_tfds_source(spec: str) -> tuple[str, str]:
  """'name[/config][:version][:split]' -> (name incl. config/version, split); split defaults to train.

  The split may carry a tfds slice, e.g. 'train[:10%]' (whose colon is not a separator).
  """
  head, slice_ = spec, ""
  if spec.endswith("]") and "[" in spec:
    i = spec.rindex("[")
    head, slice_ = spec[:i], spec[i:]
  name, split = head, "train"
  if ":" in head:
    pre, tail = head.rsplit(":", 1)
    # tfds itself uses 'name:1.0.0' for versions; a version-shaped tail is not a split.
    if not _TFDS_VERSION.match(tail):
      name, split = pre, tail
  if slice_:
    if split == "train" and name == head and ":" not in head:
      raise ValueError(f"tfds source {spec!r}: a slice needs a split, e.g. <name>:train[:10%]")
    split += slice_
  return name, split


def _tfds(spec: str, source: str, text_field: str, data_dir: Optional[str],
          max_documents: Optional[int]) -> list[str]:
  try:
    import tensorflow_datasets as tfds  # lazy: heavy, and only this source needs it
  except ImportError as e:
    raise ImportError(f"data source {source!r} needs tensorflow-datasets (and importlib_resources): "
                      "pip install tensorflow-datasets importlib_resources") from e
  name, split = parse_tfds_source(spec)
  if not name:
    raise ValueError(f"data source {source!r}: expected tfds:<name>[:split]")
  try:
    # download=False: runs are offline; a dataset must be prepared into data_dir beforehand
    # (effjax.data.tfds_text.build_local_tfds for local files, or `tfds build`).
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ...)
    # tfds' not-found message lists every registered dataset; keep only the explanatory lines.
    why = " ".join(l.strip() for l in str(e).splitlines()
                   if l.strip() and not l.strip().startswith("-"))[-600:]
    raise FileNotFoundError(f"data source {source!r}: could not open tfds dataset {name!r} split "
                            f"{split!r} in data_dir={data_dir!r} ({type(e).__name__}: {why}). Prepare "
                            "it first, e.g. with effjax.data.tfds_text.build_local_tfds.") from e
  n = len(ds) if max_documents is None else min(len(ds), max_documents)
  docs: list[str] = []
  chunk = 1024  # batched reads: one array_record call per chunk instead of per document
  for start in range(0, n, chunk):
    ids = list(range(start, min(n, start + chunk)))
    rows = ds.__getitems__(ids) if hasattr(ds, "__getitems__") else [ds[i] for i in ids]
    for i, row in zip(ids, rows):
      if text_field not in row:
        raise ValueError(f"data source {source!r}: example {i} has no feature {text_field!r} "
                         f"(features: {', '.join(sorted(row))}); set data.text_field")
      text = row[text_field]
      if hasattr(text, "item") and not isinstance(text, (bytes, str)):
        text = text.item()  # numpy scalar
      if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
      if not isinstance(text, str):
        raise ValueError(f"data source {source!r}: feature {text_field!r} is "
                         f"{type(text).__name__}, expected text")
      if text.strip():
        docs.append(text)
  return docs
