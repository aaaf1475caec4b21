"""The training loop shared by every experiment: resume, progress, metrics, evaluation, checkpoints, NaN stop.

A task hands the loop four pure pieces and the loop does the rest:

    init_state()            -> TrainState                 fresh state (used as the restore target too)
    train_step(state)       -> (state, metrics)           jitted by the task; its randomness and its data
                                                          come from fold_in(state.key, state.step), so a
                                                          resumed run repeats an uninterrupted one exactly
    evaluate(state)         -> {name: value}              periodic, on fixed test data
    diagnose(state)         -> {name: value}              periodic and optional (gradient variance, ESS)

`TrainState.nonfinite_step` is set by the task's step to the first step whose loss or gradients were not
finite; that step and all after it leave the parameters unchanged. The loop looks at it when it logs and
before it saves, and stops with a message naming the step and the last good checkpoint: no NaN is ever
checkpointed and no host round-trip is added to every step.

Around the loop, `run` keeps the workdir whole whatever happens: one process at a time holds it
(`WorkdirLock`); config.json is checked before the restore and written (atomically) only after it succeeds or
for a new run (`check_resume_compatible`, `record_config`); a step that cannot fit in memory is refused before
training (`memory`); metric lines of steps after the restored checkpoint are superseded, not rewritten
(`metric_writers`); SIGINT and SIGTERM save the step reached and end in `errors.Interrupted` (`signals`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax.training import checkpoints
from wsram_jax.training import config as config_lib
from wsram_jax import errors
from wsram_jax.training import memory
from wsram_jax.training import metric_writers
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import signals

log = logging.getLogger(__name__)

# A logged training loss or bound beyond +-SANE_LIMIT (in nats) means the log-densities have stopped meaning
# anything (a location std far too small, a learning rate that diverges): the loop says so once, and goes on.
SANE_LIMIT = 1e6
SANE_KEYS = ("train/loss", "train/bound")

# Config keys that may change when a run is resumed; any other difference is refused.
SCHEDULE_KEYS = frozenset({
    "num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "diag_every", "jit",
    "progress"})

# Keys added to the configurations after runs had been recorded, with the value under which a run computes what it
# computed before the key existed: a recorded config.json that lacks one reads as holding that value, so that such
# a run resumes under today's defaults and is refused under any other value.
ADDED_KEYS = {f"{block}.{k}": v for block, neutral in (("warmup", config_lib.NO_WARMUP), ("decay", config_lib.NO_DECAY))
              for k, v in neutral.items()}


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: the checkpoint is exactly this pytree.

  Attributes:
    step: [] int32, the number of updates applied.
    params: model parameters (theta and eta).
    opt_state: optax state.
    extra: task state beyond the optimiser (e.g. a moving-average baseline); any pytree.
    key: [2] uint32, the run's base PRNG key; step t uses fold_in(key, t).
    nonfinite_step: [] int32, the first step whose loss or gradients were not finite, or -1.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any
  key: jax.Array
  nonfinite_step: jax.Array

  @classmethod
  def create(cls, *, params, opt_state, key, extra=()):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, extra=extra,
               key=key, nonfinite_step=jnp.full((), -1, jnp.int32))


def guarded_update(state: TrainState, grads: Any, apply_updates: Callable[[Any, Any], tuple[Any, Any]],
                   loss: jax.Array, new_extra: Any = None, *, grad_norm: Optional[jax.Array] = None) -> TrainState:
  """Applies `apply_updates(params, opt_state) -> (params, opt_state)` only if loss and grads are finite.

  Records the first non-finite step in `nonfinite_step`; from then on the state stays as it was (except for
  `step`), so what the loop may later save is the last good state. For use inside a jitted step.

  The gradients count as finite when their global norm is (pass it as `grad_norm` if the step computes it
  anyway, e.g. for clipping): one reduction instead of a finiteness test per parameter array, which on the CPU
  saves dozens of compiled kernels. A gradient so large that its squared norm overflows float32 (about 1.8e19)
  counts as non-finite too.
  """
  if grad_norm is None:
    grad_norm = sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  ok = finite & (state.nonfinite_step < 0)
  params, opt_state = apply_updates(state.params, state.opt_state)
  extra = state.extra if new_extra is None else new_extra
  pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  return state.replace(
      step=state.step + 1,
      params=pick(params, state.params),
      opt_state=pick(opt_state, state.opt_state),
      extra=pick(extra, state.extra),
      nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step))


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in config.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + k + "."))
    else:
      out[prefix + k] = v
  return out


def _config_dict(config) -> dict[str, Any]:
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
  a, b = _flatten(recorded), _flatten(_config_dict(config))
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
      json.dump(_config_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


class WorkdirLock:
  """One process per workdir: an exclusive `fcntl.flock` on WORKDIR/.lock, held from `acquire` to `release`.

  The OS drops the lock when the process ends, however it ends (`kill -9` included), so a stale lock cannot
  block the next run. The holder writes its PID, host and start time into the file; a second process reads
  them back into its one-line refusal (`errors.ConfigError`). On a file system without flock the run goes on
  unlocked, with a warning.
  """

  NAME = ".lock"

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, self.NAME)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "another process"
      os.close(fd)
      raise errors.ConfigError(
          f"{self.workdir} is in use by {holder}; wait for it to end (or stop it), or choose another "
          "--workdir.") from None
    except OSError as e:  # e.g. ENOLCK: a file system without locks
      log.warning("Cannot lock %s (%s); nothing stops a second process from using it.", self.path, e)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"process {os.getpid()} on {socket.gethostname()} (since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the file drops the lock
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` if needed; `errors.ConfigError` (one sentence) when it is a file, lies under one or
  cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise PermissionError(f"no permission to write in {workdir}")
  except OSError as e:
    why = e.strerror or str(e)
    if isinstance(e, FileExistsError) or (os.path.exists(workdir) and not os.path.isdir(workdir)):
      why = "it is a file, not a directory"
    elif isinstance(e, NotADirectoryError):
      why = "part of its path is a file, not a directory"
    raise errors.ConfigError(f"{workdir} cannot be used as --workdir: {why}; choose another.") from None


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _mean_metrics(history: list[Mapping[str, jax.Array]]) -> dict[str, np.ndarray]:
  """The mean of each metric over the steps of `history`: scalars, or ``[R]`` arrays for several runs."""
  if not history:
    return {}
  stacked = jax.device_get(history)
  return {k: np.mean(np.stack([np.asarray(h[k], np.float64) for h in stacked]), axis=0) for k in stacked[0]}


def _nonfinite_steps(state: TrainState) -> np.ndarray:
  """``state.nonfinite_step`` on the host, ``[R]`` (one entry for a single run): -1 for a run that is finite."""
  return np.asarray(jax.device_get(state.nonfinite_step)).reshape(-1)


def _scalar_step(state: TrainState) -> int:
  """The number of updates applied (the same for every run of a stacked state)."""
  return int(np.max(np.asarray(jax.device_get(state.step))))


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

  A logged ``train/loss`` or ``train/bound`` beyond +-`SANE_LIMIT` is warned about, once.

  Only one process at a time may run in `workdir` (`WorkdirLock`). SIGINT and SIGTERM are honoured between updates
  (the update in progress, with its logging, evaluation or checkpoint, finishes first): the step reached is saved
  and `errors.Interrupted` raised (`training.signals`).

  Several runs (`runs`, R > 1, `training.runs`): the state and the step's metrics carry a leading run axis; the
  checkpoints hold all the runs (in ``WORKDIR/checkpoints``), and each run r has its own metrics, TensorBoard
  events and evaluations in ``WORKDIR/run_r`` (`evaluate` and `diagnose` are then called as ``fn(state_r, r)``
  with run r's state). A run whose loss or gradients become non-finite is frozen at its last good parameters
  (the step's `guarded_update` does that), said once, and marked by ``train/nonfinite_step`` in its metrics; the
  others train on. Only when every run is frozen does training stop.

  Returns:
    The final state and the last value written of every metric; for several runs, ``{'runs': [one such dict per
    run], 'labels': [each run's label]}``.
  """
  prepare_workdir(workdir)
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(WorkdirLock(workdir))  # before anything is read or written there
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    cleanup.callback(ckpt.close)
    check_resume_compatible(workdir, config, ckpt.steps())
    with jax.disable_jit(not config.jit):
      state = init_state()
      restored, restored_step = ckpt.restore_latest(state)
    if restored is not None:
      state = restored
      log.info("Resuming from the checkpoint of step %d in %s.", restored_step, ckpt.directory)
    if step_memory is not None and config.jit and _scalar_step(state) < config.num_steps:
      memory.check_fits(step_memory(state))
    record_config(workdir, config)
    several = runs is not None and runs.num_runs > 1
    run_dirs = [os.path.join(workdir, f"run_{r}") for r in range(runs.num_runs)] if several else [workdir]
    writers = []
    for run_dir in run_dirs:
      writers.append(metric_writers.MetricWriter(run_dir, start_step=restored_step or 0))
      cleanup.callback(writers[-1].close)
    labels = [runs.label(r) for r in range(runs.num_runs)] if several else [None]
    state, last = _train(config, state, ckpt, writers, labels, train_step, evaluate, diagnose, progress_keys)
    return state, ({"runs": last, "labels": labels} if several else last[0])


def _train(config, state, ckpt, writers, labels, train_step, evaluate, diagnose, progress_keys):
  """The body of `run`, once the workdir is locked, the checkpoint restored and the writers open (one per run)."""
  several = len(writers) > 1
  run_of = (lambda tree, r: runs_lib.unstack(tree, r)) if several else (lambda tree, r: tree)
  for w in writers:
    w.write_hparams(_flatten(_config_dict(config)))
  # What each run logged up to the restored step, so that a finished run started again reports its results.
  last: list[dict[str, Any]] = [{} for _ in writers]
  for r, w in enumerate(writers):
    for rec in metric_writers.read_metrics(w.workdir):
      last[r].update({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in rec.items()
                      if k not in ("step", "averaged_steps")})
  # The runs frozen by a non-finite step (run -> that step), as their metrics recorded them before a resume.
  frozen = {r: int(done["train/nonfinite_step"]) for r, done in enumerate(last) if "train/nonfinite_step" in done}

  insane: list[str] = []  # the first metric that left the sane range, once it has

  def check_sane(step, means):
    for key in SANE_KEYS:
      value = means.get(key)
      value = None if value is None else float(np.max(np.abs(value)))
      if not insane and value is not None and value > SANE_LIMIT:
        insane.append(key)
        log.warning("At step %d %s is %.3g, far outside a sane range (|x| > %.0g): the log-densities dominate "
                    "everything (a location std too small? a learning rate too high?); the run goes on, and this "
                    "is said once.", step, key, value, SANE_LIMIT)

  def record(r, step, metrics, averaged_steps=None):
    writers[r].write_scalars(step, metrics, averaged_steps=averaged_steps)
    last[r].update({k: np.asarray(v).tolist() for k, v in metrics.items()})

  def check_finite(state, step):
    bad = _nonfinite_steps(state)
    if not several:
      if bad[0] >= 0:
        raise errors.NonFiniteError(
            f"The loss or gradients became NaN or inf at step {bad[0] + 1}; training stopped, and "
            f"{ckpt.last_good()} (try a lower learning rate).")
      return
    for r in np.flatnonzero(bad >= 0):
      if int(r) not in frozen:
        frozen[int(r)] = int(bad[r]) + 1
        record(int(r), step, {"train/nonfinite_step": int(bad[r]) + 1})
        log.warning("%s: the loss or gradients became NaN or inf at step %d; it stays at its last good "
                    "parameters and the other runs train on.", labels[r], int(bad[r]) + 1)
    if len(frozen) == len(writers):
      raise errors.NonFiniteError(
          f"The loss or gradients of every run became NaN or inf (the last at step {max(frozen.values())}); "
          f"training stopped, and {ckpt.last_good()} (try a lower learning rate).")

  def each_run(fn, step):
    for r in range(len(writers)):
      if r not in frozen:
        record(r, step, fn(run_of(state, r), r) if several else fn(state))

  with jax.disable_jit(not config.jit), signals.StopOnSignals() as stop:
    step = _scalar_step(state)
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
          if step % config.log_every == 0 or step == config.num_steps:
            check_finite(state, step)
            means = _mean_metrics(history)
            # Fewer steps than log_every: the first average after a resume, or the last one of the run.
            averaged = len(history) if len(history) < config.log_every else None
            history = []
            live = [r for r in range(len(writers)) if r not in frozen]
            for r in live:
              record(r, step, {k: (v[r] if several else v) for k, v in means.items()}, averaged_steps=averaged)
            shown = {k: np.mean(v[live]) if several else v for k, v in means.items()}
            check_sane(step, shown)
            progress.line(step, shown, progress_keys, runs=len(live) if several else None)
          if evaluate is not None and (step % config.eval_every == 0 or step == config.num_steps):
            check_finite(state, step)
            each_run(evaluate, step)
          if diagnose is not None and config.diag_every > 0 and (
              step % config.diag_every == 0 or step == config.num_steps):
            each_run(diagnose, step)
          if step % config.checkpoint_every == 0 or step == config.num_steps:
            check_finite(state, step)
            ckpt.save(step, state)
    except (signals.StopRequested, KeyboardInterrupt) as e:
      raise _stop(getattr(e, "signum", signal.SIGINT), state, ckpt, stop) from None
    except Exception as e:  # pylint: disable=broad-except
      if not memory.is_out_of_memory(e):
        raise
      raise errors.ResourceError(
          f"Ran out of memory at step {_scalar_step(state) + 1} ({checkpoints.first_line(e, 200)}); "
          f"{ckpt.last_good()}; lower --config.batch_size, --config.num_samples or "
          "--config.data.eval_batch_size.") from None
  return state, last


def _stop(signum: int, state: TrainState, ckpt: checkpoints.Checkpointer,
          stop: signals.StopOnSignals) -> errors.Interrupted:
  """Saves `state` (unless it is saved already, untrained or not finite) and returns the one-line error."""
  with stop.deferred(then_raise=False):  # a second signal does not interrupt this save either
    step = _scalar_step(state)
    bad = _nonfinite_steps(state)
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
