"""What every benchmark suite shares: where results go and the metadata they carry.

Results go to the untracked `out/<card>/<file>` unless `--update-results` is given, which writes
the curated `benchmarks/results/<card>/<file>` (the current result of that suite on that card;
git history keeps the ones it replaces). Every result file carries the card, date, commit, JAX
version and the command that made it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys

import jax

from benchmarks import devtime

ROOT = pathlib.Path(__file__).resolve().parents[1]


def card() -> str:
  d = jax.devices()[0]
  return d.device_kind.replace(" ", "_") if d.platform != "cpu" else "cpu"


def add_output_args(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--out", default=None, help="result JSON path (default: out/<card>/<suite file>)")
  ap.add_argument("--update-results", action="store_true",
                  help="write the curated benchmarks/results/<card>/<suite file> instead of out/")


def output_path(args, filename: str) -> pathlib.Path:
  if args.out:
    path = pathlib.Path(args.out)
  elif getattr(args, "update_results", False):
    path = ROOT / "benchmarks" / "results" / card() / filename
  else:
    path = ROOT / "out" / card() / filename
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def commit() -> str:
  """The commit of this tree (with "+changes" when it differs from it); $EFFJAX_COMMIT, if set,
  names it instead (a copy of the tree whose git metadata is not its own, e.g. on a GPU host)."""
  if os.environ.get("EFFJAX_COMMIT"):
    return os.environ["EFFJAX_COMMIT"]
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return (rev + ("+changes" if dirty else "")) if rev else "unknown"
  except (OSError, subprocess.SubprocessError):  # no git (an exported tree)
    return "unknown"


def meta(**extra) -> dict:
  """Card, backend, date, commit, versions and the command line of this run."""
  import jaxlib
  return {"card": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
          "commit": commit(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "command": " ".join(sys.argv), **extra}


def write_json(path: pathlib.Path, meta_: dict, results: list) -> pathlib.Path:
  path.write_text(json.dumps({"meta": meta_, "results": results}, indent=1))
  return path


def finish(path: pathlib.Path, meta_: dict, results: list) -> int:
  """Writes the results, then the exit code of the suite: 1 (naming the rows) when a row beats
  its byte floor (the harness let calls share work), else 0."""
  write_json(path, meta_, results)
  print(f"wrote {path}")
  bad = devtime.floor_violations(results)
  if bad:
    print("error: rows faster than their byte floor:\n  " + "\n  ".join(bad), file=sys.stderr)
    return 1
  return 0


def parse_fields(text: str, cls, flag: str, *, names=(), skip=(), base=None):
  """'key=value,...' -> cls(**fields), or `base` with those fields replaced; validated. Values:
  0 / 1 / true / false for the bool fields, strings for `names`, 'none' for None, ints for the
  rest; `skip` names fields that take no value here. Bad items exit naming `flag`."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  allowed = sorted(k for k in fields if k not in skip)
  kw = {}
  for item in text.split(","):
    key, sep, value = (v.strip() for v in item.partition("="))
    if not sep or key not in allowed:
      raise SystemExit(f"{flag}: bad item {item!r}: want key=value with key in {allowed}")
    low = value.lower()
    if low == "none":
      kw[key] = None
    elif key in names:
      kw[key] = value
    elif "bool" in str(fields[key].type):
      if low not in ("0", "1", "true", "false"):
        raise SystemExit(f"{flag}: {key} wants 0 / 1 / true / false, got {value!r}")
      kw[key] = low in ("1", "true")
    else:
      try:
        kw[key] = int(value)
      except ValueError:
        raise SystemExit(f"{flag}: {key} wants an int, got {value!r}") from None
  cfg = cls(**kw) if base is None else dataclasses.replace(base, **kw)
  try:
    cfg.validate()
  except ValueError as e:
    raise SystemExit(f"{flag}: {e}") from None
  return cfg
