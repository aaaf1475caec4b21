"""Entry-point helpers shared by the experiment binaries.

A binary's `main` raises `wsram_jax.errors.UserError` for anything the person running it can fix (bad flags,
missing data, ...). `run_main(main)` runs it under absl and turns such an error into its one-sentence message on
stderr and the error's `exit_code`, without a traceback. Any other exception is a bug and keeps its traceback.
"""
import functools
import sys
from typing import Any, Callable, Sequence, TypeVar

from wsram_jax.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def report_user_errors(fn: F) -> F:
  """Wraps `fn` so that a `UserError` prints `error: <message>` to stderr and exits with its `exit_code`."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(e.exit_code)

  return wrapped  # type: ignore[return-value]


def run_main(main: Callable[[Sequence[str]], Any]) -> None:
  """`absl.app.run(main)`, with `UserError`s reported as one sentence and an exit code (see module docstring)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  app.run(report_user_errors(main))
