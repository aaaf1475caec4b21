"""Metric writers: one JSON line per logged step in `WORKDIR/metrics.jsonl`, and TensorBoard event files.

Names are prefixed by their stream (`train/loss`, `eval/error_greedy`, `diag/grad_var/theta`), as in
CommonLoopUtils. `write_scalars(step, {...})` appends one line per call; `read_metrics(workdir)` reads them
back for plots and tables, `series` one metric's curve, `final_metrics` the last value of each.

A resumed run (`MetricWriter(workdir, start_step=s)`, s the restored checkpoint's step) repeats the steps after s
that an interrupted process may have logged already. It appends a marker line ``{"step": s, "resumed": true}``:
every line before it of a step after s is superseded (kept in the file, for the record, but `read_metrics`
drops it, and with it `series` and every report built on them); TensorBoard is told the same (`purge_step`).
A train line that averages fewer steps than the others (the first after a resume, or the last of a run whose
length is not a multiple of ``log_every``) carries ``"averaged_steps": n``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

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
  """Writes scalars to `metrics.jsonl` and, if tensorboardX is importable, to TensorBoard event files.

  `start_step`: the step the run starts from; lines already in the file for later steps are superseded (see the
  module docstring).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, start_step: int = 0):
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    path = os.path.join(workdir, "metrics.jsonl")
    resumed = os.path.exists(path) and os.path.getsize(path) > 0
    self._jsonl = open(path, "a", encoding="utf-8")
    if resumed:
      with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b"\n"
      # A killed process may have left half a line: end it, so that the marker starts a line of its own.
      self._jsonl.write(("\n" if torn else "") + json.dumps({"step": int(start_step), "resumed": True}) + "\n")
      self._jsonl.flush()
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError:  # pragma: no cover - tensorboardX is a dependency; be lenient anyway.
        SummaryWriter = None
      if SummaryWriter is not None:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=int(start_step) + 1 if resumed else None)

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, averaged_steps: Optional[int] = None) -> None:
    """Appends one line: `step`, the scalars and, if given, ``averaged_steps`` (how many steps the values
    average, for a partial average; not sent to TensorBoard)."""
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    if averaged_steps is not None:
      record["averaged_steps"] = int(averaged_steps)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k in scalars:
        if isinstance(record[k], (int, float)):
          self._tb.add_scalar(k, record[k], int(step))

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
  """Returns the records of `WORKDIR/metrics.jsonl` in order, without those a resume superseded (module
  docstring) and without the resume markers; a torn line (a killed run) is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if not os.path.exists(path):
    return records
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        continue
      if record.get("resumed") is True:
        records = [r for r in records if r["step"] <= record["step"]]
      else:
        records.append(record)
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


def final_metrics(workdir: str) -> dict:
  """The last value written of every metric of one run, plus 'step' (the last step logged) and, under
  'step_of', the step at which each metric was last written."""
  last, step_of = {}, {}
  for record in read_metrics(workdir):
    last.update(record)
    step_of.update({k: record["step"] for k in record if k != "step"})
  last["step_of"] = step_of
  return last
