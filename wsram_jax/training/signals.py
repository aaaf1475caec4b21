"""Stopping on SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job) cleanly.

    with StopOnSignals() as stop:        # in the main thread, SIGINT and SIGTERM raise StopRequested ...
      ...
      with stop.deferred():              # ... except in here: a signal waits until the block has ended
        state = update(state)            #     (the training loop defers each whole update: a signal raised
        ckpt.save(step, state)           #     inside library code could tear a line or leave a lock held)

`StopRequested` derives from BaseException, as KeyboardInterrupt does, so that library code that catches
`Exception` lets it through to the one place that handles it: `training.loop.run`, which saves the step reached
and raises `errors.Interrupted`, or, outside the loop, `training.cli`, which prints one line. Either way the
process exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process
that the signal ended. Outside the main thread (where Python cannot set handlers) the guard does nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

__all__ = ["SIGNALS", "StopRequested", "StopOnSignals", "signal_name"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


class StopRequested(BaseException):
  """A SIGINT or SIGTERM arrived; `signum` says which."""

  def __init__(self, signum: int):
    super().__init__(signal_name(signum))
    self.signum = signum


class StopOnSignals:
  """While active, SIGINT and SIGTERM raise `StopRequested` in the main thread, except inside `deferred()`.

  Re-entrant in the sense that an inner guard replaces the handlers and `__exit__` puts back whatever was
  there before (the default handlers, or an outer guard's).
  """

  def __init__(self):
    self._previous: dict[int, object] = {}
    self._deferring = 0
    self._pending: Optional[int] = None

  def __enter__(self) -> "StopOnSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self._deferring:
      self._pending = self._pending or signum
      return
    raise StopRequested(signum)

  @contextlib.contextmanager
  def deferred(self, *, then_raise: bool = True) -> Iterator[None]:
    """A block that no signal interrupts; one that arrived meanwhile raises `StopRequested` when the block ends
    normally (`then_raise`), or is dropped (`then_raise=False`: the caller is stopping anyway)."""
    self._deferring += 1
    try:
      yield
    finally:
      self._deferring -= 1
      pending = self._pending if not self._deferring else None
      if pending is not None:
        self._pending = None
    if pending is not None and then_raise:
      raise StopRequested(pending)
