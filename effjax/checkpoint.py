"""Orbax checkpoints: train state (params, optimiser state, step) + the data iterator position.

Layout: <out_dir>/checkpoints/<step>/{state,data}. Orbax writes to a temporary directory and
renames on completion, so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete or unreadable."""


def _manager(ckpt_dir: pathlib.Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(ckpt_dir.absolute(), options=options,
                               item_names=("state", "data"))


class Checkpointer:
  """Saves and restores (train_state, data_state) pairs under `<out_dir>/checkpoints`."""

  def __init__(self, out_dir: str | pathlib.Path, keep: int = 3):
    self.dir = pathlib.Path(out_dir) / "checkpoints"
    self._mngr = _manager(self.dir, keep)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_state: dict, wait: bool = True) -> None:
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  data=ocp.args.JsonSave(data_state)), force=True)
    if wait:
      self._mngr.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores into the structure/shardings of `abstract_state` (arrays or ShapeDtypeStructs)."""
    return restore(self.dir, abstract_state, step, mngr=self._mngr)

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore(ckpt_dir: str | pathlib.Path, abstract_state: Any, step: int | None = None,
            mngr: ocp.CheckpointManager | None = None) -> tuple[Any, dict, int]:
  """Returns (state, data_state, step); raises CheckpointError naming the path on any problem."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  if not ckpt_dir.is_dir():
    raise CheckpointError(f"no checkpoint directory at {ckpt_dir}")
  own = mngr is None
  mngr = mngr or _manager(ckpt_dir, create=False)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint found in {ckpt_dir}")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {ckpt_dir} (have {sorted(steps)})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for truncated/corrupt files
      raise CheckpointError(f"checkpoint {ckpt_dir / str(step)} is corrupt or incompatible with "
                            f"this model config: {type(e).__name__}: {e}") from e
    return out.state, dict(out.data), step
  finally:
    if own:
      mngr.close()
