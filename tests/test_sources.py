import json

import pytest

from effjax.data.sources import (BUNDLED_DIR, load_document_field, load_documents,
                                 parse_tfds_source)


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


def test_bundled_tinyshakespeare_is_one_document():
  docs = load_documents("bundled:tinyshakespeare")
  assert len(docs) == 1
  raw = (BUNDLED_DIR / "tinyshakespeare" / "input.txt").read_bytes()
  assert docs[0].encode("utf-8") == raw
  assert docs[0].startswith("First Citizen:")


def test_bundled_unknown_name():
  with pytest.raises(FileNotFoundError, match="nosuchcorpus.*tinyshakespeare"):
    load_documents("bundled:nosuchcorpus")


def test_txt_one_document_per_nonempty_line(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text("first line\n\n   \nsecond é line\r\nthird\n", encoding="utf-8")
  assert load_documents(str(p)) == ["first line", "second é line", "third"]
  assert load_documents(str(p), max_documents=2) == ["first line", "second é line"]


def test_jsonl(tmp_path):
  p = _write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "src": "x"}, {"text": ""},
                                          {"text": "two ☃"}])
  assert load_documents(str(p)) == ["one", "two ☃"]
  q = _write_jsonl(tmp_path / "b.jsonl", [{"body": "alpha"}, {"body": "beta"}])
  assert load_documents(str(q), text_field="body") == ["alpha", "beta"]


def test_document_field_follows_the_documents(tmp_path):
  """One value per document load_documents returns (empty texts skipped on both sides), files
  of a directory in the same order, max_documents alike; a document without the field, and
  .txt sources, are errors."""
  _write_jsonl(tmp_path / "b.jsonl", [{"text": "b1", "src": "web"}, {"text": " ", "src": "x"},
                                      {"text": "b2", "src": 3}])
  _write_jsonl(tmp_path / "a.jsonl", [{"text": "a1", "src": "news"}])
  assert load_documents(str(tmp_path)) == ["a1", "b1", "b2"]
  assert load_document_field(str(tmp_path), "src") == ["news", "web", "3"]
  assert load_document_field(str(tmp_path), "src", max_documents=2) == ["news", "web"]
  _write_jsonl(tmp_path / "c.jsonl", [{"text": "c1"}])
  with pytest.raises(ValueError, match=r"c\.jsonl, line 1: no field 'src'"):
    load_document_field(str(tmp_path), "src")
  (tmp_path / "d.txt").write_text("plain\n")
  with pytest.raises(ValueError, match="need .jsonl files"):
    load_document_field(str(tmp_path), "src")


def test_jsonl_bad_line_names_file_and_line(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"text": "ok"}\n\n{"text": "ok2"}\n{"text": broken\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl, line 4: invalid JSON"):
    load_documents(str(p))


def test_jsonl_missing_field_names_line(tmp_path):
  p = _write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"content": "b"}])
  with pytest.raises(ValueError, match=r"m\.jsonl, line 2: no field 'text' \(fields: content\)"):
    load_documents(str(p))
  q = _write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
  with pytest.raises(ValueError, match="line 1: field 'text' is int"):
    load_documents(str(q))


def test_missing_file_unknown_scheme_empty(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_documents(missing)
  with pytest.raises(ValueError, match="unknown data source scheme 'hf'"):
    load_documents("hf:wikitext")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="empty.txt.*no \\(non-empty\\) documents"):
    load_documents(str(empty))
  other = tmp_path / "x.csv"
  other.write_text("a,b\n")
  with pytest.raises(ValueError, match="x.csv"):
    load_documents(str(other))


def test_directory_and_glob(tmp_path):
  (tmp_path / "sub").mkdir()
  _write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
  (tmp_path / "a.txt").write_text("a1\na2\n")
  (tmp_path / "notes.md").write_text("ignored\n")
  assert load_documents(str(tmp_path)) == ["a1", "a2", "b1", "b2"]
  assert load_documents(str(tmp_path / "**" / "*.jsonl")) == ["b1", "b2"]
  with pytest.raises(FileNotFoundError, match="matches no"):
    load_documents(str(tmp_path / "*.parquet"))


def test_parse_tfds_source():
  assert parse_tfds_source("foo") == ("foo", "train")
  assert parse_tfds_source("foo:validation") == ("foo", "validation")
  assert parse_tfds_source("foo:1.0.0") == ("foo:1.0.0", "train")
  assert parse_tfds_source("foo/cfg:1.0.0:test[:10%]") == ("foo/cfg:1.0.0", "test[:10%]")
  assert parse_tfds_source("foo:train[10:20]") == ("foo", "train[10:20]")


def test_tfds_local_dataset(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from effjax.data.tfds_text import build_local_tfds

  texts = [f"document {i}: naïve ☃ {'x' * i}" for i in range(25)]
  src = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
  held = _write_jsonl(tmp_path / "held.jsonl", [{"text": "held out"}])
  data_dir = tmp_path / "tfds"
  source = build_local_tfds({"train": str(src), "validation": str(held)}, data_dir)
  assert source == "tfds:effjax_local_text"
  # Read back through the generic tfds path (read-only builder from the prepared files).
  assert load_documents(source, tfds_data_dir=str(data_dir)) == texts
  assert load_documents(source + ":validation", tfds_data_dir=str(data_dir)) == ["held out"]
  assert load_documents(source, tfds_data_dir=str(data_dir), max_documents=3) == texts[:3]
  assert load_documents(source + ":train[:5]", tfds_data_dir=str(data_dir)) == texts[:5]
  # A second dataset under another name in the same data_dir; a .txt source.
  txt = tmp_path / "lines.txt"
  txt.write_text("l1\nl2\n")
  s2 = build_local_tfds(str(txt), data_dir, name="my_lines")
  assert load_documents(s2, tfds_data_dir=str(data_dir)) == ["l1", "l2"]
  with pytest.raises(FileNotFoundError, match="tfds:not_prepared"):
    load_documents("tfds:not_prepared", tfds_data_dir=str(data_dir))
  with pytest.raises(FileNotFoundError, match="Unknown split"):
    load_documents(source + ":nosplit", tfds_data_dir=str(data_dir))


def test_root_sources_resolve_under_the_data_root(tmp_path, monkeypatch):
  """root:<path> names a file, directory or glob under the data root: the `root` argument, else
  $EFFJAX_DATA_ROOT; without either (or with a root that is no directory) a clear error."""
  from effjax.data.sources import ROOT_ENV, data_root, resolve_source
  monkeypatch.delenv(ROOT_ENV, raising=False)
  base = tmp_path / "data"
  (base / "wikitext-2").mkdir(parents=True)
  (base / "wikitext-2" / "valid.txt").write_text("v1\nv2\n")
  _write_jsonl(base / "wikitext-2" / "extra.jsonl", [{"text": "j1"}])
  want = load_documents(str(base / "wikitext-2" / "valid.txt"))
  assert want == ["v1", "v2"]
  assert load_documents("root:wikitext-2/valid.txt", root=str(base)) == want
  assert load_documents("root:wikitext-2", root=str(base)) == ["j1", "v1", "v2"]   # a directory
  assert load_documents("root:wikitext-2/*.jsonl", root=str(base)) == ["j1"]        # a glob
  assert resolve_source("root:a/b.txt", str(base)) == str(base / "a" / "b.txt")
  assert resolve_source("bundled:tinyshakespeare", str(base)) == "bundled:tinyshakespeare"
  assert resolve_source(str(base / "x.txt")) == str(base / "x.txt")
  # no root anywhere: the message says how to set one
  assert data_root() is None
  with pytest.raises(ValueError, match=r"data\.root.*EFFJAX_DATA_ROOT"):
    load_documents("root:wikitext-2/valid.txt")
  # the environment variable; an explicit root wins over it
  monkeypatch.setenv(ROOT_ENV, str(base))
  assert data_root() == str(base)
  assert load_documents("root:wikitext-2/valid.txt") == want
  other = tmp_path / "other"
  (other / "wikitext-2").mkdir(parents=True)
  (other / "wikitext-2" / "valid.txt").write_text("o1\n")
  assert load_documents("root:wikitext-2/valid.txt", root=str(other)) == ["o1"]
  # a root that is not a directory; a path missing under the root
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load_documents("root:wikitext-2/valid.txt", root=str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    load_documents("root:wikitext-2/missing.txt", root=str(base))
