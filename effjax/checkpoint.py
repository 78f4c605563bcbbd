"""Verified Orbax checkpoints: train state (params, optimiser state, step) + the data iterator
position.

Layout: <out_dir>/checkpoints/<step>/{state, data, effjax_manifest.json}. Orbax writes a step to
a temporary directory and renames it when complete; after that, `Checkpointer.save` writes a
manifest (size and SHA-256 of every file of the step) with a temporary file and a rename. A step
without a complete manifest is incomplete (the process died before the save finished) and is
never restored; a step whose files do not match their manifest (a flipped byte, a truncated or a
missing file) is corrupt and is never read as numbers.

Errors are `CheckpointError` with a one-line message naming the checkpoint and the cause.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

MANIFEST = "effjax_manifest.json"
_FORMAT = "effjax-checkpoint-manifest/1"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupt or unreadable."""


def one_line(e: BaseException, limit: int = 240) -> str:
  """`Type: first line of the message`, at most `limit` characters (Orbax / TensorStore errors
  carry multi-line spec dumps)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  first = lines[0] if lines else ""
  if len(first) > limit and ". " in first:  # the first sentence carries the cause
    first = first[:first.index(". ") + 1]
  msg = f"{type(e).__name__}: {first}".rstrip(": ")
  return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def sha256_file(path: pathlib.Path, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def atomic_write_text(path: str | pathlib.Path, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, flushes it to disk, then renames it over
  `path`: readers see the old file or the new one, never a partial one."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: pathlib.Path) -> None:
  """Records size and SHA-256 of every file of a finished save (the last thing a save does)."""
  files = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
           for p in _files(step_dir)}
  atomic_write_text(step_dir / MANIFEST, json.dumps({"format": _FORMAT, "files": files}, indent=1))


def verify(step_dir: pathlib.Path) -> None:
  """Raises CheckpointError (one line, naming the file) unless every file of the checkpoint
  matches its manifest."""
  mpath = step_dir / MANIFEST
  if not step_dir.is_dir():
    raise CheckpointError(f"checkpoint {step_dir} does not exist")
  if not mpath.is_file():
    raise CheckpointError(f"checkpoint {step_dir} is incomplete: it has no {MANIFEST} (its save "
                          f"did not finish)")
  try:
    manifest = json.loads(mpath.read_text())
    files = manifest["files"]
    if manifest.get("format") != _FORMAT or not isinstance(files, dict) or not files:
      raise ValueError("unknown format")
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"checkpoint {step_dir} is incomplete: its manifest {mpath} is "
                          f"unreadable ({one_line(e)})") from e
  for rel, want in files.items():
    p = step_dir / rel
    if not p.is_file():
      raise CheckpointError(f"checkpoint {step_dir} is corrupt: file {p} is missing")
    size = p.stat().st_size
    if size != want["bytes"]:
      raise CheckpointError(f"checkpoint {step_dir} is corrupt: file {p} has {size} bytes, "
                            f"{want['bytes']} were written")
    if sha256_file(p) != want["sha256"]:
      raise CheckpointError(f"checkpoint {step_dir} is corrupt: file {p} does not match its "
                            f"checksum")
  extra = [str(p.relative_to(step_dir)) for p in _files(step_dir) if str(p.relative_to(step_dir))
           not in files]
  if extra:
    raise CheckpointError(f"checkpoint {step_dir} is corrupt: {len(extra)} file(s) not written by "
                          f"its save, e.g. {step_dir / extra[0]}")


def _manager(ckpt_dir: pathlib.Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(ckpt_dir.absolute(), options=options,
                               item_names=("state", "data"))


def _restore_step(mngr: ocp.CheckpointManager, step_dir: pathlib.Path, step: int,
                  abstract_state: Any, verified: bool = False) -> tuple[Any, dict, int]:
  if not verified:
    verify(step_dir)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     data=ocp.args.JsonRestore()))
  except Exception as e:  # orbax / tensorstore raise many types, with multi-line messages
    raise CheckpointError(f"checkpoint {step_dir} cannot be restored into this model config: "
                          f"{one_line(e)}") from e
  return out.state, dict(out.data), step


class Checkpointer:
  """Saves and restores verified (train_state, data_state) pairs under `<out_dir>/checkpoints`.
  Constructing one creates that directory: validate everything else first."""

  def __init__(self, out_dir: str | pathlib.Path, keep: int = 3):
    self.out = pathlib.Path(out_dir)
    self.dir = self.out / "checkpoints"
    self._mngr = _manager(self.dir, keep)

  def step_dir(self, step: int) -> pathlib.Path:
    return self.dir / str(step)

  def steps(self) -> list[int]:
    """Every step Orbax finished writing, newest first (verified or not)."""
    return sorted(self._mngr.all_steps(), reverse=True)

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Saves, waits for Orbax to finish, then writes the manifest that makes the step complete."""
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  data=ocp.args.JsonSave(data_state)), force=True)
    self._mngr.wait_until_finished()
    write_manifest(self.step_dir(step))

  def latest_verified(self, log: Callable[[str], None] = print) -> tuple[int | None, list[str]]:
    """(newest step that verifies or None, one line per newer step that failed)."""
    failures = []
    for step in self.steps():
      try:
        verify(self.step_dir(step))
        return step, failures
      except CheckpointError as e:
        failures.append(str(e))
        log(f"warning: {e}")
    return None, failures

  def set_aside(self, step: int) -> pathlib.Path:
    """Moves a failed step out of the checkpoint directory, bytes untouched, to
    `<out_dir>/rejected_checkpoints/<step>[.n]` (a new save of that step needs its name)."""
    dest_root = self.out / "rejected_checkpoints"
    dest_root.mkdir(exist_ok=True)
    dest, n = dest_root / str(step), 1
    while dest.exists():
      dest, n = dest_root / f"{step}.{n}", n + 1
    shutil.move(str(self.step_dir(step)), str(dest))
    self._mngr.reload()
    return dest

  def restore(self, abstract_state: Any, step: int) -> tuple[Any, dict, int]:
    """Verifies then restores `step` into the structure / shardings of `abstract_state`."""
    return _restore_step(self._mngr, self.step_dir(step), step, abstract_state)

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore(ckpt_dir: str | pathlib.Path, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, dict, int]:
  """Returns (state, data_state, step) of `step` (default: the newest) after verifying it; a
  corrupt or incomplete checkpoint is refused (CheckpointError naming the file), never read."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  if not ckpt_dir.is_dir():
    raise CheckpointError(f"no checkpoint directory at {ckpt_dir}")
  mngr = _manager(ckpt_dir, create=False)
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise CheckpointError(f"no checkpoint found in {ckpt_dir}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {ckpt_dir} (have {steps})")
    try:
      verify(ckpt_dir / str(step))
    except CheckpointError as e:
      others = [s for s in steps if s != step]
      raise CheckpointError(f"{e}" + (f" (other checkpoints: steps {others}; pick one with "
                                      f"--step)" if others else "")) from e
    return _restore_step(mngr, ckpt_dir / str(step), step, abstract_state, verified=True)
  finally:
    mngr.close()
