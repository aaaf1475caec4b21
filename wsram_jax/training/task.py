"""The task interface: what the training core (`training.trainer`) needs from a task, as pure functions.

A task is one module that builds a `Task` (the classifier: `classifier.train.TASK`; the captioner:
`captioning.train.TASK`); `trainer.train_and_evaluate(task, config, workdir)` then trains it with everything the
core has for every task: the shared config checks, sweeps of R runs as one program (`training.runs`), the
data-parallel mesh (``config.mesh_devices``), resume, signals, the NaN guard, the workdir lock, metrics, the
gradient-variance diagnostics and the cache of compiled functions.

    field                                        what it is
    name                                         the task's name (a key of the compiled-function cache)
    validate(config)                             raises `errors.ConfigError` (one sentence) for a bad value of
                                                 the task's own keys (the shared ones: `trainer.validate_config`)
    load_data(config) -> data                    whatever the functions below read: the training set, the fixed
                                                 test set, a vocabulary
    train_arrays(data) -> (array, ...)           the arrays (pytrees) the jitted step draws its batches from;
                                                 the core places them on the device(s)
    make_sampler(config, data) -> sample         ``sample(key, *train_arrays) -> batch`` (jit-able; every leaf
                                                 of the batch has a leading axis B, which the mesh shards)
    build_model(config, data) -> model           the network; ``model.clone(loc_std=...)`` when a sweep varies
                                                 its location std (`attention.model_for_run`)
    init_params(config, model, key) -> params    fresh parameters (`attention.param_labels` names their groups)
    make_loss(config, model) -> loss_fn          ``loss_fn(params, batch, key, baseline_value, hyper) -> (loss,
                                                 metrics)``, a scalar to minimise; metrics hold ``reward`` (what
                                                 a moving-average baseline tracks) and ``ess``
    make_evaluator(config, model, data)          ``evaluate(params, hyper) -> {'eval/...': float}`` on the fixed
                                                 test set (deterministic)
    summary(last) -> str                         one run's line from the last value of every metric
                                                 (`trainer.summary`: one per run of a sweep)
    baseline_init(config) -> float               a moving-average baseline's value before any batch
    progress_keys                                the metrics the progress line shows

``hyper`` is the run's own numbers (``{name: scalar}``, `training.runs`; ``{}`` for a single run): the loss and
the evaluation read a swept value from it instead of the config's (`objectives.make_proposal`,
`objectives.with_heuristics`, `attention.model_for_run`). Every function is pure in the sense that matters for
the cache: what it builds depends only on its arguments (`config` as it is when the function is called).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

__all__ = ["Task", "LossFn", "Sampler", "Evaluate"]

# loss_fn(params, batch, key, baseline_value, hyper) -> (loss [], metrics {name: []})
LossFn = Callable[[Any, Any, jax.Array, jax.Array, Mapping[str, jax.Array]], tuple[jax.Array, dict]]
# sample(key, *train_arrays) -> batch
Sampler = Callable[..., Any]
# evaluate(params, hyper) -> {"eval/...": float}
Evaluate = Callable[[Any, Mapping[str, jax.Array]], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Task:
  """A task for the training core (see the module docstring for every field's signature)."""
  name: str
  validate: Callable[[Any], None]
  load_data: Callable[[Any], Any]
  train_arrays: Callable[[Any], tuple]
  make_sampler: Callable[[Any, Any], Sampler]
  build_model: Callable[[Any, Any], Any]
  init_params: Callable[[Any, Any, jax.Array], Any]
  make_loss: Callable[[Any, Any], LossFn]
  make_evaluator: Callable[[Any, Any, Any], Evaluate]
  summary: Callable[[dict], str]
  baseline_init: Callable[[Any], float] = lambda config: 0.0
  progress_keys: tuple[str, ...] = ("train/loss",)
