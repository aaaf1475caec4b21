"""Checkpoints: periodic, atomic, the last k kept, with fallback past an unreadable latest one.

A thin layer over `orbax.checkpoint.CheckpointManager`: orbax writes each step to a temporary directory and
renames it when complete, so a process killed mid-save (even by SIGKILL) leaves the previous checkpoints intact.
On top of it:

* `save` refuses a state with a NaN or inf anywhere in it (no non-finite value is ever checkpointed);
* `restore_latest` tries the newest step first and, if it cannot be read, says so and tries the one before,
  so one corrupt checkpoint costs only the steps since the previous one.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from wsram_jax import errors

log = logging.getLogger(__name__)


def all_finite(tree: Any) -> bool:
  """True when every inexact (float/complex) leaf of `tree` is finite."""
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
  return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.inexact))


class Checkpointer:
  """Saves and restores a pytree state under `directory` (one sub-directory per step)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any) -> None:
    if not all_finite(state):
      raise errors.NonFiniteError(
          f"Refusing to checkpoint step {step}: the state holds a NaN or inf; the last good checkpoint is "
          f"step {self.latest_step()} in {self.directory}.")
    self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, target: Any) -> tuple[Optional[Any], Optional[int]]:
    """Restores the newest readable checkpoint into the structure of `target`.

    Returns:
      `(state, step)`, or `(None, None)` when the directory holds no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none can be read (nothing is deleted).
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # pylint: disable=broad-except
        log.warning("The checkpoint of step %d in %s cannot be read (%s: %s); trying the one before it.",
                    step, self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        continue
      if not all_finite(state):
        log.warning("The checkpoint of step %d in %s holds a NaN or inf; trying the one before it.",
                    step, self.directory)
        continue
      return state, step
    if steps:
      raise errors.CheckpointError(
          f"None of the checkpoints in {self.directory} (steps {steps}) can be read; move that directory "
          "away to start afresh, or point --workdir elsewhere.")
    return None, None

  def close(self) -> None:
    self._manager.close()
