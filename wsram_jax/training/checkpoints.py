"""Checkpoints: periodic, atomic, the last k kept, with fallback past an unreadable latest one.

A thin layer over `orbax.checkpoint.CheckpointManager`: orbax writes each step to a temporary directory and
renames it when complete, so a process killed mid-save (even by SIGKILL) leaves the previous checkpoints intact.
On top of it:

* `save` refuses a state with a NaN or inf anywhere in it (no non-finite value is ever checkpointed);
* `restore_latest` tries the newest step first and, if it cannot be read (a truncated file, a NaN), says so and
  tries the one before, so one corrupt checkpoint costs only the steps since the previous one. The run that
  restores (not a `read_only` reader) then moves every bad step newer than the restored one aside, renamed
  ``<step>.unreadable`` (kept for inspection, never deleted; orbax ignores the name), so that the run can save
  those steps again and finish. When no step can be read nothing is moved: that is more likely a checkpoint of
  another structure than damage everywhere.

A failed read in orbax leaves asyncio tasks and TensorStore callbacks behind that print hundreds of lines of
tracebacks ("Task exception was never retrieved", "Event loop is closed") when they are collected, after the
failure has been reported in one line; `quiet_failed_reads` filters exactly those two messages.

A save that the file system refuses (a full disk, a quota, a directory made read-only) is one line,
`errors.ResourceError` (exit 1): the step, the directory, the OS's reason and the last good checkpoint; the
partial ``<step>.orbax-checkpoint-tmp`` is removed, and the error records orbax logs from its threads on the way
are dropped (any other failure keeps them, and its traceback). `os_error` finds the OS's error in what orbax and
TensorStore raise.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
import sys
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from wsram_jax import errors

log = logging.getLogger(__name__)


def all_finite(tree: Any) -> bool:
  """True when every inexact (float/complex) leaf of `tree` is finite."""
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
  return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.inexact))


def first_line(e: BaseException, limit: int = 300) -> str:
  """"Type: the first line of the message" of `e`, cut at `limit` characters (TensorStore's run to thousands)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _FailedReadNoise(logging.Filter):
  """Drops asyncio's "Task/Future exception was never retrieved" for orbax's abandoned reads of a bad
  checkpoint (TensorStore errors)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    ours = "orbax" in message or "tensorstore" in message
    return not ("exception was never retrieved" in message and ours)


_quiet = False


def quiet_failed_reads() -> None:
  """Keeps the debris of a failed checkpoint read off the console (once per process): asyncio's log records of
  orbax's abandoned read tasks and futures, and the "Event loop is closed" errors that TensorStore's late
  callbacks raise (reported through `sys.unraisablehook`). Every other record and unraisable error passes."""
  global _quiet
  if _quiet:
    return
  _quiet = True
  logging.getLogger("asyncio").addFilter(_FailedReadNoise())
  previous = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error(e: BaseException) -> Optional[int]:
  """The OS error number behind `e`, when `e` (or an exception it was raised from) is a failed file operation: an
  `OSError`, or a TensorStore error as orbax re-raises it (``... [os_error_code='28']``); else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    found = re.search(r"\[os_error_code='(\d+)'\]", str(e))
    if found:
      return int(found.group(1))
    e = e.__cause__ or e.__context__
  return None


def write_failure(code: int) -> tuple[str, str]:
  """(what happened, what to do) for OS error `code` during a write: the disk or quota is full, or the file
  system refuses."""
  if code in DISK_FULL:
    return f"the disk is full ({os.strerror(code)})", "free space"
  return f"the file system refused ({os.strerror(code)})", "make it writable"


class _HeldOrbaxErrors(logging.Filter):
  """Holds the ERROR records that orbax logs (through absl) while active, for `Checkpointer.save` to drop once
  the failure they belong to is reported in one line, or to let through otherwise."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
      self.held.append(record)
      return False
    return True


@contextlib.contextmanager
def _holding_orbax_errors() -> Iterator[_HeldOrbaxErrors]:
  logger = logging.getLogger("absl")
  held = _HeldOrbaxErrors()
  logger.addFilter(held)
  try:
    yield held
  finally:
    logger.removeFilter(held)


class Checkpointer:
  """Saves and restores a pytree state under `directory` (one sub-directory per step).

  A `read_only` checkpointer (for a process that only restores, e.g. to plot a run while it trains) creates
  nothing, leaves the in-progress save of a training process alone and moves no bad step aside.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def last_good(self) -> str:
    """A phrase for messages: "the last good checkpoint is step S in DIR", or that there is none yet."""
    latest = self.latest_step()
    if latest is None:
      return f"no checkpoint has been written in {self.directory} yet"
    return f"the last good checkpoint is step {latest} in {self.directory}"

  def save(self, step: int, state: Any) -> None:
    if not all_finite(state):
      raise errors.NonFiniteError(
          f"Refusing to checkpoint step {step}: the state holds a NaN or inf; {self.last_good()}.")
    with _holding_orbax_errors() as held:
      try:
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        code = os_error(e)
        if code is None:
          for record in held.held:
            logging.getLogger("absl").handle(record)
          raise
        quiet_failed_reads()  # the abandoned writes' tasks report "exception was never retrieved" when collected
        self._remove_partial(step)
        happened, remedy = write_failure(code)
        raise errors.ResourceError(
            f"Cannot save the checkpoint of step {step}: {happened} in {self.directory}; {self.last_good()}; "
            f"{remedy} and run the same command again to resume.") from None

  def _remove_partial(self, step: int) -> None:
    """Removes what a failed save of `step` left (orbax's ``<step>.orbax-checkpoint-tmp*``)."""
    for partial in glob.glob(os.path.join(glob.escape(self.directory), f"{int(step)}.orbax-checkpoint-tmp*")):
      shutil.rmtree(partial, ignore_errors=True)
    try:
      self._manager.reload()
    except Exception:  # pylint: disable=broad-except  (the directory is what it is; the error is said already)
      pass

  def restore_latest(self, target: Any) -> tuple[Optional[Any], Optional[int]]:
    """Restores the newest readable checkpoint into the structure of `target`.

    Steps newer than the one restored could not be read; unless `read_only`, they are moved aside
    (`move_aside`), so that the run can save those steps again.

    Returns:
      `(state, step)`, or `(None, None)` when the directory holds no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none can be read (nothing is moved or deleted).
    """
    steps = self.steps()
    bad = []  # (step, why), newest first
    for step in reversed(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # pylint: disable=broad-except
        quiet_failed_reads()
        bad.append((step, f"cannot be read ({first_line(e)})"))
        continue
      if not all_finite(state):
        bad.append((step, "holds a NaN or inf"))
        continue
      for b, why in bad:
        where = "" if self.read_only else f"; moved it aside to {self.move_aside(b)}"
        log.warning("The checkpoint of step %d in %s %s%s; using step %d.", b, self.directory, why, where, step)
      return state, step
    for b, why in bad:
      log.warning("The checkpoint of step %d in %s %s.", b, self.directory, why)
    if steps:
      raise errors.CheckpointError(
          f"None of the checkpoints in {self.directory} (steps {steps}) can be read; move that directory "
          "away to start afresh, or point --workdir elsewhere.")
    return None, None

  def move_aside(self, step: int) -> str:
    """Renames the checkpoint of `step` to ``<step>.unreadable`` (``.unreadable.2``, ... if taken) in the same
    directory, where orbax no longer sees it; returns the new path."""
    source = os.path.join(self.directory, str(step))
    target, n = f"{source}.unreadable", 1
    while os.path.exists(target):
      n += 1
      target = f"{source}.unreadable.{n}"
    os.rename(source, target)
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()
