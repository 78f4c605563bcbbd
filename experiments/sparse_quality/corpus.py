"""The sparse-quality experiment's training corpus: real text cut into fixed-length documents,
passkey documents (a real-text haystack with a needle at a random depth, ending with the question
and its answer) in exactly the format of `effjax.evaluation.passkey_prompts`, and copy documents
(text with copies of its own earlier stretches at random distances).

Every document is seq_len - 1 characters of ASCII text, so with the byte tokenizer it is seq_len - 1
tokens and BOS + document + EOS is exactly one training row of seq_len + 1 tokens: a passkey
document is never cut in two by packing, and its answer is always the last thing the row predicts.

    docs = read_documents(["root:nltk-english-mix"])       # under $EFFJAX_DATA_ROOT
    train_text, heldout_text = split_text(docs, heldout_fraction=0.03, seed=0)
    meta = write_corpus(out_dir, train_text, seq_len=4096, n_docs=32064, passkey_fraction=0.2,
                        synthetic_filler_fraction=0.25, copy_fraction=0.2, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import unicodedata

import numpy as np

# Salts: each random stream of the corpus has its own seed sequence, so changing one knob (say the
# passkey fraction) does not reshuffle the others.
_SPLIT_SALT = 0x5917
_LAYOUT_SALT = 0x1A70
_PASSKEY_SALT = 0x9A55
_EVAL_SALT = 0xE7A1
_DRIFT_SALT = 0xD21F

# passkey_prompts' answer follows its question directly; the document ends with the key and a dot.
_ANSWER_SUFFIX = "."
_KEY_DIGITS = 5


def ascii_text(text: str) -> str:
  """Folds text to ASCII (NFKD; characters without an ASCII form are dropped), so that one character
  is one byte-tokenizer token and lengths counted in characters are lengths in tokens."""
  return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def read_documents(paths: list[str]) -> list[str]:
  """The documents of every source in `paths` (any `effjax.data.load_documents` source: a .txt or
  .jsonl file, or a directory of them), folded to ASCII, empty ones dropped."""
  from effjax.data import load_documents
  docs = []
  for p in paths:
    docs += [d for d in (ascii_text(x) for x in load_documents(p)) if d.strip()]
  if not docs:
    raise ValueError(f"no text in corpus sources {paths}")
  return docs


def split_text(docs: list[str], heldout_fraction: float, seed: int) -> tuple[str, str]:
  """Holds out heldout_fraction of the text -> (train text, held-out text). With >= 20 documents:
  a seeded random share of the documents, each side in a seeded random order joined by blank
  lines (one stream, so fixed-length windows mix domains). Fewer (e.g. one long text): the tail
  heldout_fraction of every document."""
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
  if len(docs) < 20:
    cut = [int(len(d) * (1 - heldout_fraction)) for d in docs]
    return ("\n\n".join(d[:c] for d, c in zip(docs, cut)),
            "\n\n".join(d[c:] for d, c in zip(docs, cut)))
  rng = np.random.default_rng([seed, _SPLIT_SALT])
  order = rng.permutation(len(docs))
  n_held = min(len(docs) - 1, max(1, int(round(heldout_fraction * len(docs)))))
  held, train = order[:n_held], order[n_held:]
  return "\n\n".join(docs[i] for i in train), "\n\n".join(docs[i] for i in held)


def window(text: str, length: int, rng: np.random.Generator) -> str:
  """A window of `length` characters of `text` at a random offset."""
  if len(text) < length:
    raise ValueError(f"text of {len(text)} characters is shorter than a window of {length}: "
                     "use more text or a shorter seq_len / context")
  start = int(rng.integers(0, len(text) - length + 1))
  return text[start:start + length]


_CODE_CHARS = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))


def copy_document(text: str, length: int, rng: np.random.Generator, span: tuple[int, int] = (16, 128),
                  copy_prob: float = 0.5, code_prob: float = 0.5) -> str:
  """`length` characters built piece by piece (span[0]..span[1] characters each): with probability
  copy_prob a copy of a random earlier stretch of the document, else new material -- with
  probability code_prob a random lowercase/digit string set off by spaces (a "code": only a copy
  predicts it, as only retrieval predicts a pass key), else the next stretch of a window of `text`.
  The copies sit at every distance, so predicting them needs content-based look-up (induction
  heads), the mechanism passkey retrieval runs on; a fixed-offset repeat (a text followed by
  itself) is learnt as "copy from T/2 back" and does not transfer."""
  src = window(text, length, rng)
  out, used, n = [], 0, 0
  while n < length:
    m = int(rng.integers(span[0], span[1] + 1))
    if n >= 2 * span[0] and rng.random() < copy_prob:
      doc = "".join(out)
      m = min(m, n)
      start = int(rng.integers(0, n - m + 1))
      piece = doc[start:start + m]
    elif rng.random() < code_prob:
      piece = " " + "".join(rng.choice(_CODE_CHARS, max(1, m // 4))) + " "
    else:
      piece = src[used:used + m]
      used += m
    out.append(piece)
    n += len(piece)
  return "".join(out)[:length]


def passkey_prompt_text(context_tokens: int, seed, filler: str | None) -> tuple[str, str]:
  """One passkey_prompts prompt as text (no BOS): context_tokens - 1 characters ending
  ' What is the pass key? The pass key is '. filler None: passkey_prompts' own repetitive filler;
  else a real-text haystack (at least as long as the prompt, so no repetition). Returns (text, key)."""
  from effjax.data import ByteTokenizer
  from effjax.evaluation import passkey_prompts
  prompts, lengths, keys = passkey_prompts(1, context_tokens, seed=seed, filler=filler)
  text = ByteTokenizer().decode(prompts[0, 1:lengths[0]])  # drop BOS
  return text, keys[0]


def passkey_document(seq_len: int, seed, filler: str | None) -> tuple[str, str]:
  """A training document of seq_len - 1 characters: a passkey prompt + its key + '.'.
  Returns (text, key)."""
  text, key = passkey_prompt_text(seq_len - _KEY_DIGITS - len(_ANSWER_SUFFIX), seed, filler)
  doc = text + key + _ANSWER_SUFFIX
  if len(doc) != seq_len - 1 or len(key) != _KEY_DIGITS:
    raise AssertionError(f"passkey document of {len(doc)} characters (key {key!r}), expected "
                         f"{seq_len - 1}: has passkey_prompts' format changed?")
  return doc, key


def write_corpus(out_dir: str | pathlib.Path, train_text: str, *, seq_len: int, n_docs: int,
                 passkey_fraction: float, synthetic_filler_fraction: float, seed: int,
                 copy_fraction: float = 0.0) -> dict:
  """Writes <out_dir>/train.jsonl: n_docs documents {"text", "kind"} of seq_len - 1 characters in a
  seeded random order; round(passkey_fraction * n_docs) are passkey documents (kind "passkey"),
  round(copy_fraction * n_docs) real text with copies of its own earlier stretches at random
  distances (kind "copy", `copy_document`: a dense signal for the content-based long-range copying
  that retrieval needs), the rest windows of train_text at random offsets (kind "text"). A passkey document's haystack is a window of train_text, or with
  probability synthetic_filler_fraction passkey_prompts' repetitive filler (the haystack
  `effjax.evaluation.retrieval_eval` tests with). Returns the metadata (also written to
  <out_dir>/meta.json), with the file's sha256."""
  if seq_len < 128:
    raise ValueError(f"seq_len={seq_len} leaves no room for a passkey haystack (need >= 128)")
  for name, frac in (("passkey_fraction", passkey_fraction), ("copy_fraction", copy_fraction),
                     ("synthetic_filler_fraction", synthetic_filler_fraction)):
    if not 0 <= frac <= 1:
      raise ValueError(f"{name} must be in [0, 1], got {frac}")
  if passkey_fraction + copy_fraction > 1:
    raise ValueError("passkey_fraction + copy_fraction must be <= 1")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  layout = np.random.default_rng([seed, _LAYOUT_SALT])
  n_pk = int(round(passkey_fraction * n_docs))
  n_copy = min(n_docs - n_pk, int(round(copy_fraction * n_docs)))
  kinds = np.array(["text"] * n_docs, dtype=object)
  perm = layout.permutation(n_docs)
  kinds[perm[:n_pk]] = "passkey"
  kinds[perm[n_pk:n_pk + n_copy]] = "copy"
  synthetic = layout.random(n_docs) < synthetic_filler_fraction
  path = out_dir / "train.jsonl"
  digest = hashlib.sha256()
  n_synth = 0
  with path.open("w") as f:
    for i in range(n_docs):
      if kinds[i] == "passkey":
        filler = None if synthetic[i] else window(train_text, seq_len, layout)
        n_synth += filler is None
        doc, _ = passkey_document(seq_len, [seed, _PASSKEY_SALT, i], filler)
      elif kinds[i] == "copy":
        doc = copy_document(train_text, seq_len - 1, layout)
      else:
        doc = window(train_text, seq_len - 1, layout)
      line = json.dumps({"text": doc, "kind": kinds[i]}) + "\n"
      digest.update(line.encode())
      f.write(line)
  meta = {"path": str(path), "docs": n_docs, "passkey_docs": n_pk, "copy_docs": n_copy,
          "synthetic_filler_docs": n_synth, "seq_len": seq_len, "doc_chars": seq_len - 1,
          "train_text_chars": len(train_text), "passkey_fraction": passkey_fraction,
          "copy_fraction": copy_fraction,
          "synthetic_filler_fraction": synthetic_filler_fraction, "seed": seed,
          "sha256": digest.hexdigest()}
  (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
  return meta


def read_corpus_tokens(path: str | pathlib.Path, n: int, seq_len: int) -> np.ndarray:
  """The first n documents of a train.jsonl as training rows' inputs, BOS + document: int32
  [n, seq_len] (the gate distils on these)."""
  from effjax.data import ByteTokenizer
  tok = ByteTokenizer()
  rows = []
  with open(path) as f:
    for line in f:
      if len(rows) == n:
        break
      rows.append(tok.encode(json.loads(line)["text"], add_bos=True)[:seq_len])
  if not rows or any(r.shape[0] != seq_len for r in rows):
    raise ValueError(f"{path}: expected documents of {seq_len - 1} characters")
  return np.stack(rows).astype(np.int32)


def real_passkey_prompts(n: int, context_tokens: int, text: str, seed: int):
  """passkey_prompts with a different real-text haystack (a random window of `text`) per prompt:
  (prompts int32 [n, context_tokens], lengths int32 [n], keys list[str]), the layout
  `effjax.evaluation.passkey_prompts` returns."""
  from effjax.data import ByteTokenizer
  tok = ByteTokenizer()
  rng = np.random.default_rng([seed, _EVAL_SALT])
  prompts, keys = [], []
  for i in range(n):
    body, key = passkey_prompt_text(context_tokens, [seed, _EVAL_SALT, i],
                                    window(text, context_tokens, rng))
    prompts.append(tok.encode(body, add_bos=True))
    keys.append(key)
  if any(len(p) != context_tokens for p in prompts):
    raise AssertionError("a real-filler passkey prompt is not context_tokens long")
  return np.stack(prompts).astype(np.int32), np.full((n,), context_tokens, np.int32), keys


def text_prompts(n: int, prompt_len: int, new_tokens: int, text: str, seed: int):
  """Drift prompts from held-out text: (prompts int32 [n, prompt_len] = BOS + prompt_len - 1
  characters, the true continuations int32 [n, new_tokens])."""
  from effjax.data import ByteTokenizer
  tok = ByteTokenizer()
  rng = np.random.default_rng([seed, _DRIFT_SALT])
  prompts, conts = [], []
  for _ in range(n):
    w = window(text, prompt_len - 1 + new_tokens, rng)
    prompts.append(tok.encode(w[:prompt_len - 1], add_bos=True))
    conts.append(tok.encode(w[prompt_len - 1:]))
  return np.stack(prompts).astype(np.int32), np.stack(conts).astype(np.int32)
