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

Every write happens in the caller's thread, so a failed one (a full disk) raises `OSError` there, where the loop
turns it into one line. The TensorBoard events are written synchronously too (`_EventFile`, with tensorboardX's
records and protos): tensorboardX's own `SummaryWriter` writes from a thread that dies on the first failed
write, after which its queue fills and the next `add_scalar` blocks forever (a full disk hung a run that way).
A line whose write failed may be left torn in `metrics.jsonl`: readers skip it, and a resume ends it first.
"""
from __future__ import annotations

import json
import math
import os
import time
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


class _EventFile:
  """A TensorBoard event file written in the caller's thread: scalars, text, and the marker of a resume (events of
  later steps are dropped: TensorBoard's purge, as `tensorboardX.SummaryWriter(purge_step=...)` writes it). Flushed
  (with fsync) every `FLUSH_SECS` and on close."""

  FLUSH_SECS = 60
  _opened = 0  # event files opened by this process

  def __init__(self, logdir: str, *, purge_step: Optional[int] = None):
    # pylint: disable=g-import-not-at-top
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    from tensorboardX import summary
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary = event_pb2, summary
    os.makedirs(logdir, exist_ok=True)
    # The file is named by the second it was opened in and the host; the process and a count keep a second
    # writer of the same second (a quick resume) from truncating the first's file.
    _EventFile._opened += 1
    self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix=f".{os.getpid()}.{self._opened}")
    self._flushed = time.time()
    if purge_step is not None:
      self._writer.write_event(event_pb2.Event(step=purge_step, file_version="brain.Event:2"))
      self._writer.write_event(event_pb2.Event(
          step=purge_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _write(self, step: int, summary) -> None:
    self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    if time.time() - self._flushed > self.FLUSH_SECS:
      self.flush()

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._write(step, self._summary.scalar(tag, float(value)))

  def add_text(self, tag: str, text: str, step: int) -> None:
    self._write(step, self._summary.text(tag, text))

  def flush(self) -> None:
    self._writer.flush()
    self._flushed = time.time()

  def close(self) -> None:
    self._writer.close()


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
        import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
      except ImportError:  # pragma: no cover - tensorboardX is a dependency; be lenient anyway.
        tensorboardX = None
      if tensorboardX is not None:
        self._tb = _EventFile(os.path.join(workdir, "tensorboard"),
                              purge_step=int(start_step) + 1 if resumed else None)

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, averaged_steps: Optional[int] = None) -> None:
    """Appends one line: `step`, the scalars and, if given, ``averaged_steps`` (how many steps the values
    average, for a partial average; not sent to TensorBoard). A failed write raises `OSError`."""
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
    """Closes the files. What a failed write left unwritten is dropped (closing does not raise `OSError`): the
    error was raised, and reported, by the write."""
    for close in (self._jsonl.close, self._tb.close if self._tb is not None else None):
      if close is None:
        continue
      try:
        close()
      except OSError:
        pass


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
