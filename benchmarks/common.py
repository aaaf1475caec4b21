"""What every benchmark here shares: the config it measures and timing a call (the synthetic digits the steps train
on are the library's, `wsram_jax.data.synthetic_digits`: a step's cost does not depend on the pixels).

The benchmarks read the experiment config the way the training binary's ``--config=FILE:VARIANT`` does, from the
file (`CONFIG_FILE`, ``experiments/configs/mnist.py``), so that nothing in `benchmarks` imports the `experiments`
package: `experiments.benchmark` is a thin binary over `benchmarks`, and the dependency goes one way.
"""
from __future__ import annotations

import importlib.util
import os
import time
from typing import Any, Callable

import numpy as np

from wsram_jax.data.synthetic import synthetic_digits  # pylint: disable=unused-import (common.synthetic_digits)
from wsram_jax.training import config as config_lib

__all__ = ["REPO_ROOT", "CONFIG_FILE", "load_config", "make_config", "synthetic_digits", "time_calls", "summary"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO_ROOT, "experiments", "configs", "mnist.py")


def load_config(variant: str, config_file: str = CONFIG_FILE):
  """``get_config(variant)`` of `config_file`, loaded by path as ``--config=FILE:VARIANT`` loads it; an unknown
  variant is the file's `errors.ConfigError`-like ValueError, re-raised as `errors.ConfigError` (one line)."""
  from wsram_jax import errors  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_wsram_benchmark_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(variant)
  except ValueError as e:
    raise errors.ConfigError(str(e).strip().splitlines()[0]) from None


def make_config(variant: str, batch_size: int, overrides=(), config_file: str = CONFIG_FILE):
  """The `variant` config at `batch_size` with ``(dotted key, value)`` `overrides`, validated
  (`wsram_jax.classifier.train.validate_config`)."""
  from wsram_jax.classifier import train  # pylint: disable=g-import-not-at-top
  config = load_config(variant, config_file)
  config.batch_size = batch_size
  config_lib.apply_overrides(config, overrides)
  train.validate_config(config)
  return config


def time_calls(fn: Callable[[], Any], n: int) -> list[float]:
  """Wall seconds of `n` calls of `fn` (each waits for its result)."""
  out = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def summary(seconds: list[float]) -> dict[str, float]:
  """Median, 20th and 80th percentiles and minimum in ms, and the count."""
  ms = np.asarray(seconds) * 1000.0
  return {"median_ms": round(float(np.median(ms)), 3), "p20_ms": round(float(np.percentile(ms, 20)), 3),
          "p80_ms": round(float(np.percentile(ms, 80)), 3), "min_ms": round(float(ms.min()), 3), "n": len(ms)}
