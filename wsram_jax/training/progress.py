"""Progress: the line a run prints every ``log_every`` steps, the averages it logs, and the one warning when the
numbers leave a sane range.

    step 200/5000 | loss 1.234 | error 0.25 | ess 2.1 | 10.3 steps/s | ETA 0:07:46
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

__all__ = ["SANE_LIMIT", "SANE_KEYS", "Progress", "SanityCheck", "mean_metrics"]

log = logging.getLogger(__name__)

# A logged training loss or bound beyond +-SANE_LIMIT (in nats) means the log-densities have stopped meaning
# anything (a location std far too small, a learning rate that diverges): the loop says so once, and goes on.
SANE_LIMIT = 1e6
SANE_KEYS = ("train/loss", "train/bound")


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def mean_metrics(history: list[Mapping[str, jax.Array]]) -> dict[str, np.ndarray]:
  """The mean of each metric over the steps of `history`: scalars, or ``[R]`` arrays for several runs."""
  if not history:
    return {}
  stacked = jax.device_get(history)
  return {k: np.mean(np.stack([np.asarray(h[k], np.float64) for h in stacked]), axis=0) for k in stacked[0]}


@dataclasses.dataclass
class Progress:
  """Prints a progress line (steps/s, ETA, a few metrics) and measures throughput after compilation."""
  num_steps: int
  out: Any = sys.stderr
  _t0: Optional[float] = None
  _s0: int = 0

  @property
  def started(self) -> bool:
    return self._t0 is not None

  def start(self, step: int) -> None:
    self._t0, self._s0 = time.perf_counter(), step

  def line(self, step: int, metrics: Mapping[str, float], keys: tuple[str, ...],
           runs: Optional[int] = None) -> str:
    """The line; with `runs` (several runs), the metrics are their mean and the rate counts every run's updates."""
    elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
    rate = (step - self._s0) / elapsed if elapsed > 0 and step > self._s0 else float("nan")
    eta = (self.num_steps - step) / rate if rate == rate and rate > 0 else float("nan")
    shown = " | ".join(f"{k.split('/', 1)[-1]} {float(metrics[k]):.4g}" for k in keys if k in metrics)
    speed = f"{rate:.1f} steps/s" if runs is None else f"{rate:.1f} steps/s x {runs} runs (mean over the runs)"
    text = (f"step {step}/{self.num_steps} | {shown} | {speed} | "
            f"ETA {_format_eta(eta) if eta == eta else '?'}")
    self.out.write(text + "\n")  # one write: the line and its end are never separated
    self.out.flush()
    return text


class SanityCheck:
  """Warns once when a logged ``train/loss`` or ``train/bound`` (`SANE_KEYS`) leaves +-`SANE_LIMIT`."""

  def __init__(self):
    self.insane: Optional[str] = None  # the first metric that left the sane range, once it has

  def __call__(self, step: int, means: Mapping[str, Any]) -> None:
    for key in SANE_KEYS:
      value = means.get(key)
      value = None if value is None else float(np.max(np.abs(value)))
      if self.insane is None and value is not None and value > SANE_LIMIT:
        self.insane = key
        log.warning("At step %d %s is %.3g, far outside a sane range (|x| > %.0g): the log-densities dominate "
                    "everything (a location std too small? a learning rate too high?); the run goes on, and this "
                    "is said once.", step, key, value, SANE_LIMIT)
