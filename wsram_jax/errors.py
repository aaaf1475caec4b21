"""Errors meant for the person running the code.

A `UserError` carries one sentence that says what is wrong and what to do. The experiment binaries catch it,
print the sentence (no traceback) and exit with `exit_code`: 2 for bad configuration or flags, 1 for everything
else (missing or corrupt data, a NaN during training, an unreadable checkpoint).
"""


class UserError(Exception):
  """An error whose message is one sentence for the user."""

  exit_code = 1


class ConfigError(UserError, ValueError):
  """An invalid configuration value or flag; reported before anything compiles. Also a `ValueError`, so library
  code that validates its arguments (e.g. `objectives.ObjectiveConfig`) raises what Python callers expect."""

  exit_code = 2


class DataError(UserError):
  """A data source is missing, truncated or fails its integrity check."""


class CheckpointError(UserError):
  """No usable checkpoint could be restored."""


class NonFiniteError(UserError):
  """A NaN or inf appeared in the loss or gradients during training."""
