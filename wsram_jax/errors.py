"""Errors meant for the person running the code.

A `UserError` carries one sentence that says what is wrong and what to do. The experiment binaries catch it,
print ``error: <sentence>`` (no traceback) and exit with `exit_code`:

* 2 (`ConfigError`): bad input that the person can fix before anything runs: flags, config values and files,
  a --workdir that is a file or that another process is using, a step too large for the memory there is; and
  (`ReportRefused`) a report whose inputs hold no finished run, or that would replace a more complete one;
* 1: a failure: missing or corrupt data, a NaN during training, no readable checkpoint, running out of memory;
* 130 and 143 (`Interrupted`): stopped by SIGINT (Ctrl-C) or SIGTERM after saving the step reached (128 + the
  signal's number, as a shell reports it).

`exit_with_message(error)` is what a binary does with a `UserError` (`training.cli`, `data.fetch`).
"""
import sys
from typing import NoReturn


class UserError(Exception):
  """An error whose message is one sentence for the user."""

  exit_code = 1
  label = "error"  # what the binaries print before the sentence


class ConfigError(UserError, ValueError):
  """An invalid configuration value or flag; reported before anything compiles. Also a `ValueError`, so library
  code that validates its arguments (e.g. `objectives.ObjectiveConfig`) raises what Python callers expect."""

  exit_code = 2


class DataError(UserError):
  """A data source is missing, truncated or fails its integrity check."""


class ModelFileError(DataError):
  """A saved model file (`classifier.pretrained`) is missing, truncated or corrupt, or does not match its
  recorded config, parameter shapes or sha256 hashes."""


class CheckpointError(UserError):
  """No usable checkpoint could be restored."""


class NonFiniteError(UserError):
  """A NaN or inf appeared in the loss or gradients during training."""


class ResourceError(UserError):
  """The machine ran out of memory during training."""


class ReportRefused(UserError):
  """A report not written: its inputs hold no finished run, or it would replace a more complete one
  (`report_files`). Nothing was written; exit code 2, as for any input refused before work starts."""

  exit_code = 2


class Interrupted(UserError):
  """Training was stopped by a signal after saving the step it had reached; exit code 128 + the signal's number
  (130 for SIGINT, 143 for SIGTERM)."""

  label = "stopped"

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + int(signum)


def exit_with_message(error: UserError) -> NoReturn:
  """Prints ``<label>: <sentence>`` on stderr (no traceback) and exits with the error's `exit_code`."""
  print(f"{error.label}: {error}", file=sys.stderr)
  sys.exit(error.exit_code)
