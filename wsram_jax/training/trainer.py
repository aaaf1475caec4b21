"""Any task (`training.task.Task`) trained and evaluated by the core: the pieces a run is made of, and the run.

    last = train_and_evaluate(task, config, workdir)      trains (resuming), returns the last value of every metric
    print(summary(task, last))                            one line, or one labelled line per run of a sweep

What it assembles, each also usable alone (the tasks' modules and the tests call them):

    validate_config(task, config)                          the shared checks, the runs block, the mesh, the task's
    create_train_state(task, config, model, optimizer)     fresh state: one run, or R runs stacked [R, ...]
    make_loss_and_grads(task, config, model, data)         (params, extra, key, *train, hyper={}) -> ((loss, metrics),
                                                           grads): the batch drawn by the task's sampler, sharded
                                                           over the data mesh
    make_train_step(task, config, model, optimizer, data)  step(state, *train) -> (state, metrics), jitted, for one
                                                           run or R runs (`training.runs.bind`)
    make_evaluate / make_diagnose(task, config, model, data, ...)   what the loop calls per run
    restore_latest(task, config, workdir, data)            the newest readable checkpoint of a run
    restore_run(task, config, workdir, run, data)          one run of it, unstacked from a sweep

Compiled functions are cached per task and configuration (`cached`): a resumed run, a restore or a second
evaluation in the same process reuses them instead of compiling fresh closures (jit caches per function object).
"""
from __future__ import annotations

import collections
import functools
import json
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from wsram_jax import baselines
from wsram_jax import errors
from wsram_jax import objectives
from wsram_jax.training import config as config_lib
from wsram_jax.training import loop
from wsram_jax.training import memory
from wsram_jax.training import resume
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import state as state_lib
from wsram_jax.training import step as step_lib
from wsram_jax.training.task import Task

__all__ = ["validate_config", "baseline_transform", "create_train_state", "make_loss_and_grads", "make_train_step",
           "make_evaluate", "diagnostic_batch", "make_diagnose", "train_and_evaluate", "restore_latest", "restore_run",
           "summary", "cached"]

require, require_int = config_lib.require, config_lib.require_int


def validate_config(task: Task, config) -> None:
  """Raises `errors.ConfigError` (one sentence) for any invalid value, before anything is loaded or compiled: the
  checks every task shares (`training.config.validate_common`, the runs block), the task's own (`task.validate`),
  the data-parallel mesh, and each run of a sweep as its single-run twin would be checked."""
  config_lib.validate_common(config)
  runs = runs_lib.from_config(config)
  task.validate(config)
  if config.diag_every > 0:
    require_int("diag_num_estimates", config.diag_num_estimates, 2)
  require_int("mesh_devices", config.mesh_devices)
  if runs.several:
    require(config.mesh_devices == 1, "--config.num_runs > 1 and --config.mesh_devices > 1 do not combine; split "
                                      "the runs or the batch over the devices, not both.")
    for r in range(runs.num_runs):  # each run's own values, as its single-run twin would be checked
      validate_config(task, runs.config_for(config, r))
  require(config.batch_size % config.mesh_devices == 0,
          f"--config.mesh_devices={config.mesh_devices} must divide --config.batch_size={config.batch_size}.")
  if config.mesh_devices > 1:  # (asking for the devices initialises JAX's backend: only when it matters)
    require(config.mesh_devices <= jax.device_count(),
            f"--config.mesh_devices={config.mesh_devices} exceeds the {jax.device_count()} devices JAX sees "
            f"({jax.devices()[0].platform}).")


def baseline_transform(task: Task, config) -> baselines.BaselineTransform:
  """VAR's moving-average baseline (`objectives.baseline_transform`), starting at `task.baseline_init(config)`,
  or none."""
  return objectives.baseline_transform(objectives.ObjectiveConfig.from_config(config),
                                       init_value=task.baseline_init(config))


_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_CACHE_SIZE = 8


def cached(kind: str, config, build: Callable[[], Any]) -> Any:
  """``build()`` once per (kind, configuration, compiler options), the most recent `_CACHE_SIZE` kept. The key is
  the configuration without the loop's schedule keys (`resume.SCHEDULE_KEYS`), which compiled functions do not
  read; what `build` closes over must be a function of that configuration (a model built from it, not data)."""
  values = {k: v for k, v in resume.config_dict(config).items() if k not in resume.SCHEDULE_KEYS}
  key = (kind, json.dumps(values, sort_keys=True), json.dumps(step_lib.compiler_options(), sort_keys=True))
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  fn = _CACHE[key] = build()
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return fn


def create_train_state(task: Task, config, model, optimizer) -> state_lib.TrainState:
  """Fresh parameters (`task.init_params`), optimiser and baseline state: for one run placed on the data mesh
  (``config.mesh_devices``), for ``config.num_runs`` = R > 1 the R runs' states stacked on a leading run axis
  (`training.runs.create_states`; each run's as it is made alone, with its own seed)."""
  init = functools.partial(task.init_params, config, model)
  btx = baseline_transform(task, config)
  return runs_lib.create_states(runs_lib.from_config(config),
                                lambda seed: step_lib.create_train_state(seed, init, optimizer, btx),
                                mesh=step_lib.make_mesh(config.mesh_devices))


def make_loss_and_grads(task: Task, config, model, data=None) -> step_lib.LossAndGrads:
  """`(params, extra, key, *train, hyper={}) -> ((loss, metrics), grads)` for the step with PRNG key `key` (not
  jitted): draws the batch (`task.make_sampler`), shards it over the mesh's ``data`` axis when
  ``config.mesh_devices`` > 1, and differentiates the task's loss (`training.step.build_loss_and_grads`)."""
  mesh = step_lib.make_mesh(config.mesh_devices)
  draw = task.make_sampler(config, data)
  sample = lambda key, *train: step_lib.shard_batch(mesh, draw(key, *train))
  return step_lib.build_loss_and_grads(task.make_loss(config, model), baseline_transform(task, config), sample)


def make_train_step(task: Task, config, model, optimizer, data=None) -> Callable[..., Any]:
  """``step(state, *train) -> (state, metrics)``, jitted (one per configuration: `cached`), ``train`` the arrays of
  `task.train_arrays`.

  With ``config.mesh_devices`` = n > 1 the step runs on `training.step.make_mesh(n)`: the batch sharded over the
  ``data`` axis, parameters, optimiser state and training set replicated (a state from `create_train_state`, the
  data through `training.step.replicate`), gradients summed across devices by XLA. With ``config.num_runs`` = R > 1
  it trains the R runs of `training.runs` at once (metrics ``[R]``)."""
  frozen = config.copy_and_resolve_references()  # a later change to `config` cannot leak into a retrace

  def build():
    runs = runs_lib.from_config(frozen)
    step = step_lib.build_step(make_loss_and_grads(task, frozen, model, data),
                               baseline_transform(task, frozen), optimizer)
    return step_lib.jit(runs_lib.bind(step, runs),
                        runs_lib.state_sharding(runs, step_lib.make_mesh(frozen.mesh_devices)))

  return cached(f"{task.name}/train_step", frozen, build)


def make_evaluate(task: Task, config, model, data) -> Callable[..., dict]:
  """The loop's ``evaluate(state)`` (or ``evaluate(state_r, r)`` for several runs): `task.make_evaluator`'s
  ``evaluate(params, hyper)`` with the run's parameters and numbers."""
  runs = runs_lib.from_config(config)
  evaluate = task.make_evaluator(config, model, data)
  return runs_lib.per_run(lambda state, r: evaluate(state.params, runs.hyper_of(r)), runs)


def diagnostic_batch(task: Task, config, data, seed: int, train: Optional[tuple] = None) -> tuple[Any, jax.Array]:
  """``(batch, key)``: the fixed minibatch that the diagnostics of seed `seed` measure (drawn by the task's sampler
  from `train`, default ``task.train_arrays(data)``) and the key of their estimates (`step.diagnostic_key`)."""
  key = step_lib.diagnostic_key(seed)
  train = task.train_arrays(data) if train is None else train
  return task.make_sampler(config, data)(key, *train), key


def make_diagnose(task: Task, config, model, data, train: Optional[tuple] = None) -> Callable[..., dict]:
  """The loop's ``diagnose(state)`` (or ``diagnose(state_r, r)``): the gradient variance over
  ``config.diag_num_estimates`` estimates of one fixed minibatch per run (from its seed) and its ESS
  (`training.step.make_diagnose`, one compiled function for every run)."""
  runs = runs_lib.from_config(config)

  def build():
    return step_lib.make_diagnose(task.make_loss(config, model), baseline_transform(task, config),
                                  num_estimates=config.diag_num_estimates,
                                  uses_inference_network=objectives.ObjectiveConfig.from_config(
                                      config).uses_inference_network)

  diagnose = cached(f"{task.name}/diagnose", config, build)
  inputs = [diagnostic_batch(task, config, data, seed, train) for seed in runs.seeds]
  return runs_lib.per_run(lambda state, r: diagnose(state, *inputs[r], runs.hyper_of(r)), runs)


def train_and_evaluate(task: Task, config, workdir: str, data=None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run) and returns the last value of every metric (for
  several runs ``{'runs': [...], 'labels': [...]}``, `training.loop.run`). `data` (default
  ``task.load_data(config)``) saves loading it again."""
  validate_config(task, config)
  data = task.load_data(config) if data is None else data
  model = task.build_model(config, data)
  optimizer = step_lib.make_optimizer(config)
  step = make_train_step(task, config, model, optimizer, data)
  mesh = step_lib.make_mesh(config.mesh_devices)
  train = step_lib.replicate(mesh, jax.tree_util.tree_map(jnp.asarray, tuple(task.train_arrays(data))))
  _, last = loop.run(
      config=config, workdir=workdir,
      init_state=functools.partial(create_train_state, task, config, model, optimizer),
      train_step=lambda state: step(state, *train),
      evaluate=make_evaluate(task, config, model, data),
      diagnose=make_diagnose(task, config, model, data, train) if config.diag_every > 0 else None,
      progress_keys=task.progress_keys,
      step_memory=lambda state: memory.step_bytes(step, state, *train),
      runs=runs_lib.from_config(config))
  return last


def restore_latest(task: Task, config, workdir: str, data=None) -> tuple[Any, state_lib.TrainState, int]:
  """``(model, state, step)``: the newest readable checkpoint of the run in `workdir` (all its runs, stacked, for
  a sweep). Raises `errors.CheckpointError` if there is none."""
  model = task.build_model(config, data)
  target = create_train_state(task, config, model, step_lib.make_optimizer(config))
  state, step = step_lib.restore_latest(target, workdir)
  return model, state, step


def restore_run(task: Task, config, workdir: str, run: int, data=None) -> tuple[Any, state_lib.TrainState, int, Any]:
  """``(model, state, step, config)`` of run `run` of the job checkpointed in `workdir`: for a sweep
  (``config.num_runs`` > 1) that run's state unstacked, with its own config (`runs.Runs.config_for`) and model; for
  a single run (`run` 0) the run as it is. `errors.ConfigError` for a run the job does not hold,
  `errors.CheckpointError` if there is no checkpoint."""
  runs = runs_lib.from_config(config)
  if not 0 <= run < runs.num_runs:
    raise errors.ConfigError(f"Run {run} was asked for, but {workdir} holds {runs.num_runs} run(s): use 0 to "
                             f"{runs.num_runs - 1}.")
  model, state, step = restore_latest(task, config, workdir, data)
  if runs.num_runs > 1:
    config = runs.config_for(config, run)
    state, model = runs_lib.unstack(state, run), task.build_model(config, data)
  return model, state, step, config


def summary(task: Task, last: dict[str, Any]) -> str:
  """`task.summary` of what `train_and_evaluate` returned: one line, or for several runs one line per run, each
  after the run's label."""
  if "runs" in last:
    return "\n".join(f"{label}: {task.summary(run)}" for label, run in zip(last["labels"], last["runs"]))
  return task.summary(last)
