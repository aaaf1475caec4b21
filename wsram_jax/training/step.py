"""One update for any task's loss, and what a run needs around it: optimiser, state, mesh, diagnostics, restore.

    loss_fn(params, batch, key, baseline_value, hyper) -> (loss, metrics)   a task's loss (classifier.loss, ...)
    sample(key, *data) -> batch                                             a task's batch sampler (jit-able)

    loss_and_grads = build_loss_and_grads(loss_fn, btx, sample)
    step = build_step(loss_and_grads, btx, optimizer)       step(state, hyper, *data) -> (state, metrics)

``hyper`` is the run's own numbers (``{name: scalar}``; ``{}`` for a single run, `training.runs`), always passed;
`training.runs.bind` turns the step into ``step(state, *data)`` for one run or R runs, and `jit` compiles it.
`build_step` is, inside that one `jax.jit`:

    key_t            = fold_in(state.key, t)                   the batch and the samples of step t
    batch            = sample(split(key_t)[0], *data)
    loss, grads      = value_and_grad(loss_fn)(params, batch, split(key_t)[1], b, hyper)   b: the baseline's value
    state            = state.guarded_update(state, ...)        the optimiser (after global-norm clipping),
                                                               skipped if the loss or gradients are not finite

Data parallel (`make_mesh(n)`, n > 1): the same step on a `jax.sharding.Mesh` of n devices with one axis
``data``; the batch is sharded over it (`shard_batch`), parameters, optimiser state and data are replicated
(`replicate`), and XLA inserts the cross-device sum of the gradients. Several hosts: call
`jax.distributed.initialize()` first (BUILD.md).

`make_diagnose` draws K independent gradient estimates of one fixed minibatch at the current parameters
(Figure 2's gradient variance, per parameter group theta / eta) and the ESS of that minibatch.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wsram_jax import attention
from wsram_jax import baselines
from wsram_jax import diagnostics
from wsram_jax import errors
from wsram_jax.training import checkpoints
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import state as state_lib

__all__ = ["DATA_AXIS", "NO_HYPER", "compiler_options", "make_optimizer", "create_train_state",
           "build_loss_and_grads", "build_step", "jit", "make_mesh", "replicate", "shard_batch", "diagnostic_key",
           "make_diagnose", "restore_latest"]

DATA_AXIS = "data"  # The mesh axis the batch is sharded over.

LossAndGrads = Callable[..., tuple[tuple[jax.Array, dict], Any]]
NO_HYPER: dict = {}  # the numbers of a single run that sweeps nothing (never written to)


# XLA:CPU options of the jitted steps, each with what it buys (BENCHMARKS.md, "Compile time").
_CPU_COMPILER_OPTIONS = {
    # LLVM at -O1: the step's ~500 kernels compile 25% faster than at XLA's default level and run as fast (its
    # matmuls are library calls, its other kernels memory-bound).
    "xla_backend_optimization_level": 1,
    # XLA's older loop-fusion emitters instead of its MLIR ones: at B = 32 the step compiles 30% faster (XLA
    # 3.2-3.5 s instead of 4.6-4.9 s for the paper's configuration on 2 cores) and runs 1.6% slower; at B = 128
    # one measurement found no faster compile and an 8% slower step (BENCHMARKS.md, `benchmarks.compile`).
    "xla_cpu_use_fusion_emitters": False,
}
FUSION_EMITTERS_ENV = "WSRAM_JAX_FUSION_EMITTERS"  # "1": keep XLA's default (MLIR) fusion emitters.


def compiler_options() -> dict[str, Any]:
  """XLA options for the jitted steps (`_CPU_COMPILER_OPTIONS` on the CPU, none elsewhere). An option named in
  XLA_FLAGS (the tests set --xla_backend_optimization_level=0) is left to XLA_FLAGS; ``WSRAM_JAX_FUSION_EMITTERS=1``
  keeps XLA's default fusion emitters."""
  if jax.default_backend() != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in _CPU_COMPILER_OPTIONS.items() if k not in flags}
  if os.environ.get(FUSION_EMITTERS_ENV, "") == "1":
    options.pop("xla_cpu_use_fusion_emitters", None)
  return options


def make_optimizer(config, *, swept_learning_rate: bool = False) -> optax.GradientTransformation:
  """Adam at ``config.learning_rate`` after global-norm clipping at ``config.grad_clip_norm`` (0: no clipping).

  With `swept_learning_rate` (each run of a sweep has its own, `training.runs`; read off ``config.runs`` when not
  given), Adam without its last step,
  ``scale(-learning_rate)``, which `build_step` applies with the run's value: ``optax.adam(lr)`` is
  ``chain(scale_by_adam(), scale(-lr))``, so a run computes the same numbers as alone.

  ``config.policy_lr_scale`` (default 1) multiplies the step of the attention policies' own parameters
  (`attention.policy_mask`: the prior's head and the inference network): their learning rate is
  ``policy_lr_scale * learning_rate``, the rest's ``learning_rate``.

  ``config.warmup`` (off by default) multiplies every step by a factor that holds at ``warmup.start`` for
  ``warmup.hold_steps`` updates and then rises linearly to 1 over ``warmup.ramp_steps`` (``optax.linear_schedule``;
  a ramp of 0 steps counts as 1). ``config.decay`` (off by default) multiplies it by a factor that falls linearly
  from 1 at update ``decay.begin`` to ``decay.end`` at update ``decay.begin + decay.steps`` and stays there (in
  updates, not in fractions of ``num_steps``, so that extending a run does not change the steps it already took).
  """
  swept_learning_rate = swept_learning_rate or "learning_rate" in runs_lib.from_config(config).values
  adam = optax.scale_by_adam() if swept_learning_rate else optax.adam(config.learning_rate)
  chain = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
  chain.append(adam)
  policy_lr_scale = float(config.get("policy_lr_scale", 1.0))
  if policy_lr_scale != 1.0:
    chain.append(optax.masked(optax.scale(policy_lr_scale), attention.policy_mask))
  multiplier = learning_rate_multiplier(config)
  if multiplier is not None:
    chain.append(optax.scale_by_schedule(multiplier))
  return optax.chain(*chain) if len(chain) > 1 else adam


def learning_rate_multiplier(config) -> Optional[optax.Schedule]:
  """``config.warmup`` times ``config.decay`` as one schedule of the update count (see `make_optimizer`); None
  when both are off (``warmup.start == 1`` and ``decay.end == 1``), so that such a run's optimiser state is plain
  Adam's."""
  factors = []
  warmup = config.get("warmup")
  if warmup is not None and float(warmup.start) != 1.0:
    factors.append(optax.linear_schedule(float(warmup.start), 1.0, transition_steps=max(int(warmup.ramp_steps), 1),
                                         transition_begin=int(warmup.hold_steps)))
  decay = config.get("decay")
  if decay is not None and float(decay.end) != 1.0:
    factors.append(optax.linear_schedule(1.0, float(decay.end), transition_steps=max(int(decay.steps), 1),
                                         transition_begin=int(decay.begin)))
  return (lambda count: math.prod(f(count) for f in factors)) if factors else None


def create_train_state(seed: int, init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                       btx: baselines.BaselineTransform) -> state_lib.TrainState:
  """A fresh `state.TrainState`: ``PRNGKey(seed)`` split in two, the first for `init_params(key) -> params`, the
  second the run's base key (step t draws from ``fold_in(key, t)``)."""
  k_init, k_run = jax.random.split(jax.random.PRNGKey(seed))
  params = init_params(k_init)
  return state_lib.TrainState.create(params=params, opt_state=optimizer.init(params), key=k_run, extra=btx.init())


def build_loss_and_grads(loss_fn, btx: baselines.BaselineTransform, sample: Callable[..., Any]) -> LossAndGrads:
  """`(params, extra, key, *data, hyper={}) -> ((loss, metrics), grads)` (not jitted), for any task's
  `loss_fn(params, batch, key, baseline_value, hyper) -> (loss, metrics)`: splits `key` in two, draws the batch
  with the first (`sample(key, *data) -> batch`) and differentiates `loss_fn` with the second, at the value of the
  baseline `btx` before this batch (`extra` is its state), with the run's numbers `hyper`. The first half of
  `build_step`."""

  def loss_and_grads(params, extra, key, *data, hyper=NO_HYPER):
    k_data, k_loss = jax.random.split(key)
    batch = sample(k_data, *data)
    # The baseline's value before this batch does not depend on the rewards passed here.
    value, _ = btx.update(jnp.zeros(()), extra)
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, k_loss, value, hyper)

  return loss_and_grads


def build_step(loss_and_grads: LossAndGrads, btx: baselines.BaselineTransform,
               optimizer: optax.GradientTransformation) -> Callable[..., tuple[state_lib.TrainState, dict]]:
  """`step(state, hyper, *data) -> (state, metrics)` (not jitted), one update of one run for any task: the
  gradients of step t from `loss_and_grads(params, extra, fold_in(state.key, t), *data, hyper=hyper)`
  (`build_loss_and_grads`), the baseline `btx` updated with the batch's ``baseline_target`` (or its ``reward``
  where the loss gives none), then `optimizer` through `state.guarded_update` (no update if the loss or the
  gradients are not finite). Metrics: the loss's, prefixed ``train/``, and ``train/grad_norm``.

  ``hyper`` holds the run's own numbers (scalars; `training.runs`), passed to the loss; a swept
  ``learning_rate`` scales the update of an optimiser built by `make_optimizer` for that config (which then
  leaves out Adam's last step, ``scale(-learning_rate)``)."""

  def step(state: state_lib.TrainState, hyper, *data):
    key = jax.random.fold_in(state.key, state.step)
    (loss, metrics), grads = loss_and_grads(state.params, state.extra, key, *data, hyper=hyper)
    # The baseline state tracks what the loss names: its ``baseline_target`` if it has one, else its ``reward``.
    _, new_extra = btx.update(metrics.get("baseline_target", metrics["reward"]), state.extra)

    def apply(params, opt_state):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      updates = runs_lib.apply_learning_rate(updates, hyper)  # a swept learning rate, after the optimiser
      return optax.apply_updates(params, updates), opt_state

    metrics = {f"train/{k}": v for k, v in metrics.items()}
    grad_norm = metrics["train/grad_norm"] = optax.global_norm(grads)
    return state_lib.guarded_update(state, grads, apply, loss, new_extra, grad_norm=grad_norm), metrics

  return step


def make_mesh(num_devices: int) -> Optional[Mesh]:
  """The data-parallel mesh: the first `num_devices` devices on one axis named ``data``; None for one device
  (then nothing is sharded and the step is exactly the single-device one)."""
  if num_devices == 1:
    return None
  return Mesh(np.asarray(jax.devices()[:num_devices]), (DATA_AXIS,))


def replicate(mesh: Optional[Mesh], tree):
  """`tree` placed on every device of `mesh` (parameters, optimiser state, the training set); unchanged for
  None (one device)."""
  return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(mesh: Optional[Mesh], batch):
  """Inside the jitted step: `batch` (arrays with a leading B) sharded over the mesh's ``data`` axis, so each
  device rolls out its slice of the batch; unchanged for None."""
  if mesh is None:
    return batch
  return jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def jit(step, out_sharding=None):
  """`step` (``step(state, *data)``, `training.runs.bind`) jitted with `compiler_options`, the new state left with
  `out_sharding` (`training.runs.state_sharding`; None: where the inputs lie)."""
  return jax.jit(step, out_shardings=out_sharding, compiler_options=compiler_options())


def diagnostic_key(seed: int) -> jax.Array:
  """The key of a run's diagnostics (its fixed minibatch and its estimates), apart from its training keys."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), 2 ** 30)


def make_diagnose(loss_fn, btx: baselines.BaselineTransform, *, num_estimates: int,
                  uses_inference_network: bool) -> Callable[..., dict]:
  """`diagnose(state, batch, key, hyper) -> {name: value}`: the variance of `num_estimates` independent
  gradient estimates of the fixed minibatch `batch` at the state's parameters (`diagnostics.gradient_variance`,
  per parameter group: theta, eta, the baseline head, all), and the ESS of that minibatch (``diag/ess/mean``).
  Estimate k of step t uses ``fold_in(key, t)`` split K ways; ``hyper`` is the run's own numbers (`training.runs`;
  ``{}`` for a single run). One compiled function serves every run. Without an inference network eta gets no
  gradient; its (zero) group is then left out rather than reported."""

  @functools.partial(jax.jit, compiler_options=compiler_options())
  def diagnose_jit(state, batch, key, hyper):
    value, _ = btx.update(jnp.zeros(()), state.extra)
    loss = lambda p, b, k: loss_fn(p, b, k, value, hyper)
    grad_fn = lambda p, b, k: jax.grad(lambda q: loss(q, b, k)[0])(p)
    labels = attention.param_labels(state.params, baseline="baseline")
    out = diagnostics.gradient_variance(grad_fn, state.params, batch, jax.random.fold_in(key, state.step),
                                        num_estimates=num_estimates, labels=labels)
    _, metrics = loss(state.params, batch, jax.random.fold_in(key, 2 ** 31))
    out["ess/mean"] = metrics["ess"]
    return out

  drop = () if uses_inference_network else ("/eta",)

  def diagnose(state, batch, key, hyper):
    out = jax.device_get(diagnose_jit(state, batch, key, hyper))
    return {f"diag/{k}": v for k, v in out.items() if not k.endswith(drop)}

  return diagnose


def restore_latest(target: state_lib.TrainState, workdir: str) -> tuple[state_lib.TrainState, int]:
  """The newest readable checkpoint of the run in `workdir`, in the structure of `target` (a fresh state).

  Raises:
    CheckpointError: `workdir` holds no checkpoint, or none that can be read.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f"{workdir} holds no checkpoint; train a model there first.")
  # Read-only: it may run while a training process writes there, whose saves it must leave alone.
  ckpt = checkpoints.Checkpointer(directory, read_only=True)
  try:
    state, step = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  if state is None:
    raise errors.CheckpointError(f"{workdir} holds no checkpoint; train a model there first.")
  return state, int(step)
