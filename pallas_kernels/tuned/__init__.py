"""Tuned launch parameters as data: one JSON file per device kind, one lookup.

    params = tuned.lookup("sparse_decode_attention", "pallas_triton")   # {"num_stages": 3, ...}

`default.json` is the heuristic fallback for any device (and the CPU, where kernels are
interpreted); `<device_kind>.json` (spaces as underscores, e.g. `NVIDIA_H200.json`) overrides it
key by key for that card. Kernel autotuning writes its winners into these files; every kernel
reads its launch defaults through `lookup` and nowhere else. A backend's config dataclass fields
left at None take these values.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax

DIR = pathlib.Path(__file__).resolve().parent


def device_kind() -> str:
  """The default device's kind as a file stem: "NVIDIA_H200", "cpu", ..."""
  try:
    return jax.devices()[0].device_kind.replace(" ", "_")
  except Exception:  # no device info (some plugins): the heuristics apply
    return "unknown"


@functools.lru_cache(maxsize=None)
def _table(stem: str) -> dict:
  path = DIR / f"{stem}.json"
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"tuned parameters {path} are not valid JSON: {e}") from e


def lookup(op: str, backend: str, kind: str | None = None) -> dict:
  """Launch parameters of (op, backend): default.json's entry updated by the device's file."""
  base = dict(_table("default").get(op, {}).get(backend, {}))
  base.update(_table(kind or device_kind()).get(op, {}).get(backend, {}))
  if not base:
    raise KeyError(f"pallas_kernels/tuned/default.json has no entry for {op} / {backend}")
  return base
