"""Data: MNIST sources (`mnist`), the offline-copy fetcher (`fetch`), the translated-scaled canvases (`canvas`) and
synthetic digits for tests and benchmarks (`synthetic`).

The public names below are imported on first use (PEP 562), so `python -m wsram_jax.data.fetch`, which `make data`
runs before every `make run`/`make test`, does not pay for importing jax.
"""
import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "load_mnist": "mnist",
    "read_idx": "mnist",
    "NumpyOnlyUnpickler": "mnist",
    "fetch_mnist": "fetch",
    "default_data_dir": "fetch",
    "translate_and_scale": "canvas",
    "place_digit": "canvas",
    "sample_batch": "canvas",
    "fixed_test_set": "canvas",
    "to_float": "canvas",
    "DEFAULT_CANVAS_SIZE": "canvas",
    "DEFAULT_MIN_SIZE": "canvas",
    "DEFAULT_MAX_SIZE": "canvas",
    "synthetic_digits": "synthetic",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from wsram_jax.data.canvas import (DEFAULT_CANVAS_SIZE, DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, fixed_test_set,
                                     place_digit, sample_batch, to_float, translate_and_scale)
  from wsram_jax.data.fetch import default_data_dir, fetch_mnist
  from wsram_jax.data.mnist import NumpyOnlyUnpickler, load_mnist, read_idx
  from wsram_jax.data.synthetic import synthetic_digits


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
