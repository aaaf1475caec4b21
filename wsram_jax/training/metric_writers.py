"""Metric writers: one JSON line per logged step in `WORKDIR/metrics.jsonl`, and TensorBoard event files.

Names are prefixed by their stream (`train/loss`, `eval/error_greedy`, `diag/grad_var/theta`), as in
CommonLoopUtils. `write_scalars(step, {...})` appends one line per call; `read_metrics(workdir)` reads them
back for plots and tables.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
      return str(value)  # JSON has no NaN/inf; keep the line parseable.
    return value
  return value.tolist()


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and, if tensorboardX is importable, to TensorBoard event files."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError:  # pragma: no cover - tensorboardX is a dependency; be lenient anyway.
        SummaryWriter = None
      if SummaryWriter is not None:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self._tb is not None:
      self._tb.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items())), 0)

  def flush(self) -> None:
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Returns the records of `WORKDIR/metrics.jsonl` in order; a torn last line (a killed run) is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if not os.path.exists(path):
    return records
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def series(records: list[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric; for a resumed run the last value written for a step wins."""
  by_step = {}
  for r in records:
    if name in r:
      try:
        by_step[r["step"]] = float(r[name])
      except (TypeError, ValueError):
        continue
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)
