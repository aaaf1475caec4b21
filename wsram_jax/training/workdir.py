"""The workdir: made (or refused in one line) before a run starts, and held by one process at a time.

`prepare_workdir` creates it or says why it cannot be used; `WorkdirLock` is an exclusive `flock` on
WORKDIR/.lock that the OS drops when the process ends, however it ends, so a stale lock never blocks the next run.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from typing import Optional

from wsram_jax import errors

__all__ = ["WorkdirLock", "prepare_workdir"]

log = logging.getLogger(__name__)


class WorkdirLock:
  """One process per workdir: an exclusive `fcntl.flock` on WORKDIR/.lock, held from `acquire` to `release`.

  The OS drops the lock when the process ends, however it ends (`kill -9` included), so a stale lock cannot
  block the next run. The holder writes its PID, host and start time into the file; a second process reads
  them back into its one-line refusal (`errors.ConfigError`). On a file system without flock the run goes on
  unlocked, with a warning.
  """

  NAME = ".lock"

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, self.NAME)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "another process"
      os.close(fd)
      raise errors.ConfigError(
          f"{self.workdir} is in use by {holder}; wait for it to end (or stop it), or choose another "
          "--workdir.") from None
    except OSError as e:  # e.g. ENOLCK: a file system without locks
      log.warning("Cannot lock %s (%s); nothing stops a second process from using it.", self.path, e)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"process {os.getpid()} on {socket.gethostname()} (since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the file drops the lock
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` if needed; `errors.ConfigError` (one sentence) when it is a file, lies under one or
  cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise PermissionError(f"no permission to write in {workdir}")
  except OSError as e:
    why = e.strerror or str(e)
    if isinstance(e, FileExistsError) or (os.path.exists(workdir) and not os.path.isdir(workdir)):
      why = "it is a file, not a directory"
    elif isinstance(e, NotADirectoryError):
      why = "part of its path is a file, not a directory"
    raise errors.ConfigError(f"{workdir} cannot be used as --workdir: {why}; choose another.") from None
