"""The training loop every task runs: resume, progress, metrics, evaluation, diagnostics, checkpoints, NaN stop.

A task (through `training.trainer`) hands the loop four pure pieces and the loop does the rest:

    init_state()            -> TrainState                 fresh state (used as the restore target too)
    train_step(state)       -> (state, metrics)           jitted; its randomness and its data come from
                                                          fold_in(state.key, state.step), so a resumed run
                                                          repeats an uninterrupted one exactly
    evaluate(state)         -> {name: value}              periodic, on fixed test data
    diagnose(state)         -> {name: value}              periodic and optional (gradient variance, ESS)

The step records the first non-finite step in the state (`state.guarded_update`); the loop looks at it when it
logs and before it saves, and stops with a message naming the step and the last good checkpoint.

Around the loop, `run` keeps the workdir whole whatever happens: one process at a time holds it
(`workdir.WorkdirLock`); config.json is checked before the restore and written (atomically) only after it
succeeds or for a new run (`resume`); a step that cannot fit in memory is refused before training (`memory`);
metric lines of steps after the restored checkpoint are superseded, not rewritten (`metric_writers`); SIGINT and
SIGTERM save the step reached and end in `errors.Interrupted` (`signals`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from wsram_jax import errors
from wsram_jax import objectives
from wsram_jax.training import checkpoints
from wsram_jax.training import memory
from wsram_jax.training import metric_writers
from wsram_jax.training import resume
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import signals
# Some names below are also read from here by users and tests (`loop.TrainState`, `loop.guarded_update`, ...).
from wsram_jax.training.progress import Progress, SanityCheck, mean_metrics
from wsram_jax.training.state import guarded_update  # pylint: disable=unused-import
from wsram_jax.training.state import TrainState, nonfinite_steps, scalar_step
from wsram_jax.training.workdir import WorkdirLock, prepare_workdir

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(*, config, workdir: str, init_state: Callable[[], TrainState],
        train_step: Callable[[TrainState], tuple[TrainState, Mapping[str, jax.Array]]],
        evaluate: Optional[Callable[..., Mapping[str, Any]]] = None,
        diagnose: Optional[Callable[..., Mapping[str, Any]]] = None,
        progress_keys: tuple[str, ...] = ("train/loss",),
        step_memory: Optional[Callable[[TrainState], int]] = None,
        runs: Optional[runs_lib.Runs] = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains to `config.num_steps`, resuming from the newest readable checkpoint in `workdir`.

  Uses config keys: num_steps, log_every, eval_every, checkpoint_every, keep_checkpoints, diag_every,
  and jit (False runs everything op by op, for debugging).

  `step_memory(state)`, if given, is the memory one step needs beyond its arguments
  (`memory.step_bytes(jitted_step, state, *data)`): a step that cannot fit in the memory available is refused
  before training (`memory.check_fits`), and a failed allocation during training is one line
  (`errors.ResourceError`).

  A logged ``train/loss`` or ``train/bound`` beyond +-`progress.SANE_LIMIT` is warned about, once.

  Only one process at a time may run in `workdir` (`WorkdirLock`). SIGINT and SIGTERM are honoured between updates
  (the update in progress, with its logging, evaluation or checkpoint, finishes first): the step reached is saved
  and `errors.Interrupted` raised (`training.signals`).

  Several runs (`runs`, R > 1, `training.runs`): the state and the step's metrics carry a leading run axis; the
  checkpoints hold all the runs (in ``WORKDIR/checkpoints``), and each run r has its own metrics, TensorBoard
  events and evaluations in ``WORKDIR/run_r`` (`evaluate` and `diagnose` are then called as ``fn(state_r, r)``
  with run r's state: `runs.per_run`). A run whose loss or gradients become non-finite is frozen at its last good
  parameters (the step's `guarded_update` does that), said once, and marked by ``train/nonfinite_step`` in its
  metrics; the others train on. Only when every run is frozen does training stop.

  Returns:
    The final state and the last value written of every metric; for several runs, ``{'runs': [one such dict per
    run], 'labels': [each run's label]}``.
  """
  prepare_workdir(workdir)
  several = runs is not None and runs.several
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(WorkdirLock(workdir))  # before anything is read or written there
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    cleanup.callback(ckpt.close)
    resume.check_resume_compatible(workdir, config, ckpt.steps())
    with jax.disable_jit(not config.jit):
      state = init_state()
      restored, restored_step = ckpt.restore_latest(state)
    if restored is not None:
      state = restored
      log.info("Resuming from the checkpoint of step %d in %s.", restored_step, ckpt.directory)
    if step_memory is not None and config.jit and scalar_step(state) < config.num_steps:
      memory.check_fits(step_memory(state))
    labels = [runs.label(r) for r in range(runs.num_runs)] if several else [None]
    dirs = [os.path.join(workdir, f"run_{r}") for r in range(len(labels))] if several else [workdir]
    try:
      resume.record_config(workdir, config)
      records = _Records(config, dirs, labels, restored_step or 0, ckpt)
    except OSError as e:
      if checkpoints.os_error(e) is None:
        raise
      raise _write_failure(e, scalar_step(state), ckpt, f"{workdir}'s config.json or metrics") from None
    cleanup.callback(records.close)
    state = _train(config, state, ckpt, records, train_step, evaluate, diagnose, progress_keys)
    return state, ({"runs": records.last, "labels": labels} if several else records.last[0])


class _Records:
  """What the loop writes per run: one `metric_writers.MetricWriter` per run directory, the last value written of
  every metric, and the runs frozen by a non-finite step."""

  def __init__(self, config, dirs: list[str], labels: list[Optional[str]], start_step: int,
               ckpt: checkpoints.Checkpointer):
    self.several, self.labels, self.ckpt = len(dirs) > 1, labels, ckpt
    self.proposal = config.get("proposal") if hasattr(config, "get") else None
    self.writers = [metric_writers.MetricWriter(d, start_step=start_step) for d in dirs]
    hparams = resume.flatten(resume.config_dict(config))
    # What each run logged up to the restored step, so that a finished run started again reports its results.
    self.last: list[dict[str, Any]] = [{} for _ in dirs]
    for w, done in zip(self.writers, self.last):
      w.write_hparams(hparams)
      for rec in metric_writers.read_metrics(w.workdir):
        done.update({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in rec.items()
                     if k not in ("step", "averaged_steps")})
    # The runs frozen by a non-finite step (run -> that step), as their metrics recorded them before a resume.
    self.frozen = {r: int(done["train/nonfinite_step"]) for r, done in enumerate(self.last)
                   if "train/nonfinite_step" in done}

  def live(self) -> list[int]:
    return [r for r in range(len(self.writers)) if r not in self.frozen]

  def record(self, r: int, step: int, metrics: Mapping[str, Any], averaged_steps: Optional[int] = None) -> None:
    self.writers[r].write_scalars(step, metrics, averaged_steps=averaged_steps)
    self.last[r].update({k: np.asarray(v).tolist() for k, v in metrics.items()})

  def check_finite(self, state: TrainState, step: int) -> None:
    """Stops a single run at its first non-finite step; for several, freezes that run (said once) and stops
    when every run is frozen (`errors.NonFiniteError`)."""
    bad = nonfinite_steps(state)
    if not self.several:
      if bad[0] >= 0:
        raise errors.NonFiniteError(
            f"The loss or gradients became NaN or inf at step {bad[0] + 1}; training stopped, and "
            f"{self.ckpt.last_good()} ({self._suspect(int(bad[0]) + 1)}).")
      return
    for r in np.flatnonzero(bad >= 0):
      if int(r) not in self.frozen:
        self.frozen[int(r)] = int(bad[r]) + 1
        self.record(int(r), step, {"train/nonfinite_step": int(bad[r]) + 1})
        log.warning("%s: the loss or gradients became NaN or inf at step %d; it stays at its last good "
                    "parameters and the other runs train on.", self.labels[r], int(bad[r]) + 1)
    if len(self.frozen) == len(self.writers):
      raise errors.NonFiniteError(
          f"The loss or gradients of every run became NaN or inf (the last at step {max(self.frozen.values())}); "
          f"training stopped, and {self.ckpt.last_good()} ({self._suspect(min(self.frozen.values()))}).")

  def _suspect(self, step: int) -> str:
    """What to try, for a first non-finite step `step`. At step 1 nothing has been updated yet, so the learning rate
    is not the cause: a user's proposal is the first suspect (`objectives.is_user_proposal`), else the
    configuration's values."""
    if step > 1:
      return "try a lower learning rate"
    if objectives.is_user_proposal(self.proposal):
      return (f"at step 1, before any update, so not the learning rate: the proposal {self.proposal} is the first "
              "suspect; check that it returns finite values")
    return "at step 1, before any update, so not the learning rate: check the configuration's values"

  def log_means(self, step: int, means: Mapping[str, np.ndarray], averaged_steps: Optional[int]) -> dict:
    """Records each live run's means; returns what the progress line shows (their mean over the live runs)."""
    live = self.live()
    for r in live:
      self.record(r, step, {k: (v[r] if self.several else v) for k, v in means.items()},
                  averaged_steps=averaged_steps)
    return {k: np.mean(v[live]) if self.several else v for k, v in means.items()}

  def each_run(self, fn: Callable[..., Mapping[str, Any]], state: TrainState, step: int) -> None:
    """Records ``fn(state)`` (one run) or ``fn(state_r, r)`` for each live run r."""
    for r in self.live():
      self.record(r, step, fn(runs_lib.unstack(state, r), r) if self.several else fn(state))

  def close(self) -> None:
    for w in self.writers:
      w.close()


def _due(step: int, every: int, num_steps: int) -> bool:
  return every > 0 and (step % every == 0 or step == num_steps)


def _train(config, state: TrainState, ckpt: checkpoints.Checkpointer, records: _Records, train_step, evaluate,
           diagnose, progress_keys) -> TrainState:
  """The body of `run`, once the workdir is locked, the checkpoint restored and the writers open (one per run)."""
  sane = SanityCheck()
  with jax.disable_jit(not config.jit), signals.StopOnSignals() as stop:
    step = scalar_step(state)
    progress = Progress(config.num_steps)
    history = []
    try:
      while step < config.num_steps:
        # A signal is honoured between updates, never inside one: raised asynchronously, it could tear a
        # progress or metrics line, or leave a lock held that the final save then waits for.
        with stop.deferred():
          state, metrics = train_step(state)
          history.append(metrics)
          step += 1
          if not progress.started:
            jax.block_until_ready(state.params)
            progress.start(step)  # Throughput counts from after this process's first (compiling) step.
          if _due(step, config.log_every, config.num_steps):
            records.check_finite(state, step)
            # Fewer steps than log_every: the first average after a resume, or the last one of the run.
            averaged = len(history) if len(history) < config.log_every else None
            shown = records.log_means(step, mean_metrics(history), averaged)
            history = []
            sane(step, shown)
            progress.line(step, shown, progress_keys, runs=len(records.live()) if records.several else None)
          if evaluate is not None and _due(step, config.eval_every, config.num_steps):
            records.check_finite(state, step)
            records.each_run(evaluate, state, step)
          if diagnose is not None and _due(step, config.diag_every, config.num_steps):
            records.each_run(diagnose, state, step)
          if _due(step, config.checkpoint_every, config.num_steps):
            records.check_finite(state, step)
            ckpt.save(step, state)
    except (signals.StopRequested, KeyboardInterrupt) as e:
      raise _stop(getattr(e, "signum", signal.SIGINT), state, ckpt, stop) from None
    except Exception as e:  # pylint: disable=broad-except
      if not isinstance(e, errors.UserError) and checkpoints.os_error(e) is not None:
        # a metrics line or an event file could not be written (a full disk, ...)
        raise _write_failure(e, step, ckpt, "the run's metrics or TensorBoard events") from None
      if not memory.is_out_of_memory(e):
        raise
      raise errors.ResourceError(
          f"Ran out of memory at step {scalar_step(state) + 1} ({checkpoints.first_line(e, 200)}); "
          f"{ckpt.last_good()}; lower --config.batch_size, --config.num_samples or "
          "--config.data.eval_batch_size.") from None
  return state


def _write_failure(e: BaseException, step: int, ckpt: checkpoints.Checkpointer, what: str) -> errors.ResourceError:
  """The one line for a write the file system refused (`checkpoints.os_error`) at `step`."""
  happened, remedy = checkpoints.write_failure(checkpoints.os_error(e))
  where = getattr(e, "filename", None) or what
  return errors.ResourceError(
      f"Cannot write {where} at step {step}: {happened}; the metric lines written so far are kept, and "
      f"{ckpt.last_good()}; {remedy} and run the same command again to resume (it repeats the steps since that "
      "checkpoint).")


def _stop(signum: int, state: TrainState, ckpt: checkpoints.Checkpointer,
          stop: signals.StopOnSignals) -> errors.Interrupted:
  """Saves `state` (unless it is saved already, untrained or not finite) and returns the one-line error."""
  with stop.deferred(then_raise=False):  # a second signal does not interrupt this save either
    step = scalar_step(state)
    bad = nonfinite_steps(state)
    if np.all(bad >= 0):  # (with several runs, a frozen run keeps its last good parameters: the state is finite)
      what = (f"not saved, as it holds NaN or inf since step {int(bad.max()) + 1}; "
              f"{ckpt.last_good()}")
    elif step == ckpt.latest_step():
      what = f"it is saved in {ckpt.directory}"
    elif step == 0:
      what = "nothing to save yet"
    else:
      ckpt.save(step, state)
      what = f"saved it in {ckpt.directory}"
  return errors.Interrupted(f"Stopped by {signals.signal_name(signum)} at step {step}; {what}; run the same "
                            "command again to resume.", signum)
