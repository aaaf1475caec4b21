"""Configuration checks shared by every task's binary, and reading a run's recorded configuration.

A task's `validate_config(config)` calls `validate_common(config)` (the method and its settings, through
`objectives.ObjectiveConfig`, the batch size, the optimiser and the loop's schedule), then checks its own keys;
each check raises `errors.ConfigError` with one sentence naming the ``--config.`` key, before anything is loaded
or compiled.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from wsram_jax import errors
from wsram_jax import objectives
from wsram_jax.training import runs as runs_lib

__all__ = ["require", "require_int", "model_fields", "check_model_block", "validate_common", "load_config"]


def require(ok: bool, message: str) -> None:
  """Raises `errors.ConfigError(message)` unless `ok`."""
  if not ok:
    raise errors.ConfigError(message)


def require_int(name: str, value, minimum: int = 1) -> None:
  """Raises `errors.ConfigError` unless ``--config.<name>`` = `value` is an integer (not a bool) >= `minimum`."""
  require(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum,
          f"--config.{name} must be an integer >= {minimum}, got {value!r}.")


def model_fields(model_cls, *, derived=()) -> set[str]:
  """The fields of a flax module (a dataclass) that a config sets, without flax's own (``parent``, ``name``) and
  those in `derived` (set from the data, e.g. the vocabulary size)."""
  return {f.name for f in dataclasses.fields(model_cls)} - {"parent", "name"} - set(derived)


def check_model_block(block, model_cls, *, derived=(), extra=()) -> None:
  """Raises `errors.ConfigError` unless the keys of ``config.model`` are exactly the fields of `model_cls`
  (`model_fields`) plus `extra` (keys read elsewhere): a key that nothing reads, or a setting that no flag
  reaches, is a mistake in the config file."""
  fields, keys = model_fields(model_cls, derived=derived), set(block)
  unknown, missing = sorted(keys - fields - set(extra)), sorted(fields - keys)
  require(not unknown, f"--config.model has keys that {model_cls.__name__} does not have: {', '.join(unknown)}.")
  require(not missing, f"--config.model lacks the {model_cls.__name__} settings {', '.join(missing)}; add them "
                       "to the config file.")


def validate_common(config) -> objectives.ObjectiveConfig:
  """The checks every task shares: the objective (`objectives.ObjectiveConfig.from_config`: method, proposal,
  baseline, M, heuristics and their combinations), the batch size, the loop's schedule and the optimiser.
  Returns the objective's config. Raises `errors.ConfigError` (one sentence) for the first invalid value."""
  require_int("num_samples", config.num_samples)
  cfg = objectives.ObjectiveConfig.from_config(config)
  require_int("batch_size", config.batch_size)
  require_int("num_steps", config.num_steps, 0)
  for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    require_int(name, config[name])
  require_int("diag_every", config.diag_every, 0)
  require(float(config.learning_rate) > 0, f"--config.learning_rate must be positive, got {config.learning_rate}.")
  require(float(config.grad_clip_norm) >= 0, f"--config.grad_clip_norm must be >= 0, got {config.grad_clip_norm}.")
  runs_lib.from_config(config)
  return cfg


def load_config(workdir: str):
  """The configuration a run in `workdir` was started with (its config.json), as a ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = f"{workdir}/config.json"
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise errors.UserError(f"Cannot read the run's configuration {path} ({e}); is {workdir} a run directory?")
