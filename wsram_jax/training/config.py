"""Configuration checks shared by every task, setting keys by their dotted names, and reading a run's recorded
configuration.

The core's `training.trainer.validate_config(task, config)` calls `validate_common(config)` (the method and its
settings, through `objectives.ObjectiveConfig`, the batch size, the optimiser and the loop's schedule), then the
task's own checks; each check raises `errors.ConfigError` with one sentence naming the ``--config.`` key, before
anything is loaded or compiled.

    apply_overrides(config, {"model.hidden_size": 16, "batch_size": 8})     dotted keys, as on the command line
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Iterable, Mapping, Union

import numpy as np

from wsram_jax import errors
from wsram_jax import objectives

__all__ = ["MIN_LOC_STD", "NO_WARMUP", "NO_DECAY", "ADDED_KEYS", "require", "require_int", "require_loc_std",
           "model_fields", "check_model_block", "validate_common", "capped", "with_added_keys", "load_config",
           "get_value", "set_value", "apply_overrides"]

log = logging.getLogger(__name__)


def require(ok: bool, message: str) -> None:
  """Raises `errors.ConfigError(message)` unless `ok`."""
  if not ok:
    raise errors.ConfigError(message)


def require_int(name: str, value, minimum: int = 1) -> None:
  """Raises `errors.ConfigError` unless ``--config.<name>`` = `value` is an integer (not a bool) >= `minimum`."""
  require(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum,
          f"--config.{name} must be an integer >= {minimum}, got {value!r}.")


# The learning-rate schedules' blocks when off (`config.warmup`, `config.decay`; `training.step.make_optimizer`):
# every multiplier 1. The configs start from them, and a recorded run from before the blocks existed reads as
# holding them (`ADDED_KEYS`).
NO_WARMUP = {"start": 1.0, "hold_steps": 0, "ramp_steps": 0}
NO_DECAY = {"begin": 0, "steps": 0, "end": 1.0}

# Keys added to the configurations after runs had been recorded, with the value under which a run computes what it
# computed before the key existed: a recorded config.json that lacks one reads as holding that value, so that such
# a run resumes under today's defaults and is refused under any other value.
ADDED_KEYS = {f"{block}.{k}": v for block, neutral in (("warmup", NO_WARMUP), ("decay", NO_DECAY))
              for k, v in neutral.items()}
# One device (no data-parallel mesh): what a captioner run recorded before the captioner had the key.
ADDED_KEYS["mesh_devices"] = 1

# The smallest Gaussian location std a run accepts, in the [-1, 1] units of glimpse locations.
MIN_LOC_STD = 1e-4


def require_loc_std(name: str, value) -> None:
  """Raises `errors.ConfigError` unless ``--config.<name>`` (a location std) is finite and >= `MIN_LOC_STD`.

  Why refuse rather than warn: below that the log-densities every estimator weighs are meaningless, whatever else the
  run does. A location is sampled as mu + std * eps in float32, which resolves locations near 1 to 6e-8, so the eps
  that log N(a; mu, std) recovers is off by about 6e-8 / std: 0.06% at 1e-4, but many units at 1e-8, where log p(a)
  and log q(a) become noise scaled by (Delta / std)^2 -- losses near 1e16 and an ESS of 1 (measured when such stds
  were still accepted; `tests/test_loop.py` imitates it). 1e-4 is also 1/200 of a pixel of a 100 px canvas: a policy
  that precise is deterministic for every purpose. What is left (a std that is valid but still makes the weights
  degenerate, a learning rate that diverges) is caught at run time: the loop warns once when the loss or the bound
  leaves a sane range (`training.progress.SANE_LIMIT`).
  """
  require(MIN_LOC_STD <= float(value) < math.inf,
          f"--config.{name} must be at least {MIN_LOC_STD} (and finite), got {value}: a smaller location std "
          "makes the log-densities of the glimpse locations meaningless in float32.")


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
  baseline, M, heuristics and their combinations), the batch size, the loop's schedule and the optimiser (the
  runs block and the mesh: `training.trainer.validate_config`).
  Returns the objective's config. Raises `errors.ConfigError` (one sentence) for the first invalid value."""
  require_int("num_samples", config.num_samples)
  cfg = objectives.ObjectiveConfig.from_config(config)
  require_int("batch_size", config.batch_size)
  require_int("num_steps", config.num_steps, 0)
  for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    require_int(name, config[name])
  require_int("diag_every", config.diag_every, 0)
  require(0 < float(config.learning_rate) < math.inf,
          f"--config.learning_rate must be positive and finite, got {config.learning_rate}.")
  require(0 < float(config.get("policy_lr_scale", 1.0)) < math.inf,
          f"--config.policy_lr_scale must be positive and finite, got {config.get('policy_lr_scale')}.")
  warmup = config.get("warmup")
  if warmup is not None:
    require(0 < float(warmup.start) <= 1,
            f"--config.warmup.start is the first updates' learning-rate multiplier, in (0, 1], got {warmup.start}.")
    require_int("warmup.hold_steps", warmup.hold_steps, 0)
    require_int("warmup.ramp_steps", warmup.ramp_steps, 0)
  decay = config.get("decay")
  if decay is not None:
    require(0 <= float(decay.end) <= 1,
            f"--config.decay.end is the last updates' learning-rate multiplier, in [0, 1], got {decay.end}.")
    require_int("decay.begin", decay.begin, 0)
    require_int("decay.steps", decay.steps, 0)
  require(0 <= float(config.grad_clip_norm) < math.inf,
          f"--config.grad_clip_norm must be >= 0 and finite (0: no clipping), got {config.grad_clip_norm}.")
  return cfg


def capped(name: str, requested: int, available: int, what: str) -> int:
  """``min(requested, available)``, saying so (a warning naming ``--config.<name>``) when that is less than asked
  for: e.g. `capped("data.num_test", 10000, 32, "test digits")`."""
  if requested > available:
    log.warning("--config.%s=%d asks for more than the %d %s there are; using %d.", name, requested, available, what,
                available)
  return min(int(requested), int(available))


def with_added_keys(recorded: dict) -> dict:
  """A recorded configuration (config.json's dict) with every key of `ADDED_KEYS` it lacks set to its neutral
  value, in place; returns it."""
  for dotted, value in ADDED_KEYS.items():
    *path, last = dotted.split(".")
    node = recorded
    for part in path:
      node = node.setdefault(part, {})
    node.setdefault(last, value)
  return recorded


def load_config(workdir: str):
  """The configuration a run in `workdir` was started with (its config.json, `with_added_keys`), as a
  ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = f"{workdir}/config.json"
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(with_added_keys(json.load(f)))
  except (OSError, ValueError) as e:
    raise errors.UserError(f"Cannot read the run's configuration {path} ({e}); is {workdir} a run directory?")


def get_value(config, dotted: str) -> Any:
  """``config['a']['b']['c']`` for `dotted` = ``'a.b.c'``."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def set_value(config, dotted: str, value: Any) -> None:
  """Sets the key `dotted` (``'model.hidden_size'``) of `config` (a ConfigDict or nested dicts) to `value`; the
  blocks on its path must exist."""
  *path, last = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def apply_overrides(config, overrides: Union[Mapping[str, Any], Iterable[tuple[str, Any]]]):
  """Sets every ``dotted key -> value`` of `overrides` (a mapping or ``(key, value)`` pairs), as
  ``--config.KEY=VALUE`` flags would; returns `config`."""
  for dotted, value in (overrides.items() if isinstance(overrides, Mapping) else overrides):
    set_value(config, dotted, value)
  return config
