"""Resuming a workdir: which configuration may continue its checkpoints, and recording the one that does.

`run` (`training.loop`) checks the configuration against WORKDIR/config.json before it restores anything
(`check_resume_compatible`: only the schedule, `SCHEDULE_KEYS`, may change; a key added to the configs after a
run was recorded reads as its neutral value, `ADDED_KEYS`) and writes config.json atomically only for a new run or
after a successful restore (`record_config`), so that a failed start never changes what the workdir records.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from wsram_jax import errors
from wsram_jax.training import config as config_lib

__all__ = ["SCHEDULE_KEYS", "ADDED_KEYS", "flatten", "config_dict", "check_resume_compatible", "record_config"]

log = logging.getLogger(__name__)

# Config keys that may change when a run is resumed; any other difference is refused.
SCHEDULE_KEYS = frozenset({
    "num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "diag_every", "jit",
    "progress"})

ADDED_KEYS = config_lib.ADDED_KEYS  # (keys added after runs had been recorded: `training.config`)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in config.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + k + "."))
    else:
      out[prefix + k] = v
  return out


def config_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def _read_recorded_config(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
    raise errors.ConfigError(
        f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); put back the "
        "configuration the run was started with, or choose a new --workdir.") from None
  if not isinstance(recorded, dict):
    raise errors.ConfigError(f"{path} holds no configuration (a JSON object); put back the configuration the run "
                             "was started with, or choose a new --workdir.")
  return recorded


def _changed_keys(recorded: Mapping[str, Any], config) -> list[str]:
  a, b = flatten(recorded), flatten(config_dict(config))
  a.update({k: v for k, v in ADDED_KEYS.items() if k in b and k not in a})
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k.split(".")[-1] not in SCHEDULE_KEYS)


def check_resume_compatible(workdir: str, config, checkpoint_steps) -> None:
  """Refuses to resume the checkpoints in `workdir` under a configuration that changes the run; writes nothing.

  With checkpoints (`checkpoint_steps` non-empty) WORKDIR/config.json must exist, be readable and agree with
  `config` on everything but the schedule keys (`SCHEDULE_KEYS`: step counts, logging periods; a key of
  `ADDED_KEYS` that config.json lacks counts as holding its neutral value); otherwise
  `errors.ConfigError` (one sentence). Without checkpoints there is nothing to protect: any configuration may
  start there (a run that stopped before its first checkpoint, e.g. on a NaN, can be rerun with another).
  """
  path = os.path.join(workdir, "config.json")
  if not checkpoint_steps:
    if os.path.exists(path):
      try:
        changed = _changed_keys(_read_recorded_config(path), config)
      except errors.ConfigError:
        changed = ["all"]
      if changed:
        log.warning("%s holds no checkpoint, so this configuration replaces the one its config.json records.",
                    workdir)
    return
  if not os.path.exists(path):
    raise errors.ConfigError(
        f"{workdir} holds checkpoints (steps {list(checkpoint_steps)}) but no config.json, so the configuration "
        "they were trained with is unknown; put its config.json back, or choose a new --workdir.")
  changed = _changed_keys(_read_recorded_config(path), config)
  if changed:
    raise errors.ConfigError(
        f"{workdir} holds a run with a different configuration ({', '.join(changed[:6])} differ); "
        "resume it with the same configuration or choose a new --workdir.")


def record_config(workdir: str, config) -> None:
  """Writes `config` to WORKDIR/config.json atomically (a new file renamed over the old one): called for a new run
  and after a successful restore, so that a failed start never changes what the workdir records."""
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(config_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
