"""Training and evaluation of the attention classifier on translated and scaled MNIST (paper Sec. 5.1).

    train_and_evaluate(config, workdir) -> final metrics

One update (`make_train_step`), all inside one `jax.jit`:

    key_t              = fold_in(state.key, t)                  the data order and the samples of step t
    canvases, labels   = data.canvas.sample_batch(key_t, ...)   digits drawn from the device-resident train set
    loss, grads        = value_and_grad(objectives loss)(...)   rollout [B, M, N] + estimator
    state              = loop.guarded_update(state, ...)        Adam (after global-norm clipping), unless non-finite

`build_loss_and_grads` and `build_step` are this update for any task's loss and batch sampler (the captioner's,
`captioning.train`, too); `validate_common` the configuration checks the two tasks share.

Data parallel (`config.mesh_devices` = n > 1, `make_mesh`): the same step on a `jax.sharding.Mesh` of n devices
with one axis ``data``; the batch is sharded over it (`with_sharding_constraint`), parameters, optimiser state and
the training set are replicated, and XLA inserts the cross-device sum of the gradients. Several hosts: call
`jax.distributed.initialize()` first (BUILD.md).

Evaluation (`make_evaluator`) uses the fixed test canvases (`data.canvas.fixed_test_set`, a function of
`config.data.test_seed`) and forms the prediction two ways:

* ``eval/error_greedy``: one trajectory taking the prior's most probable action at each glimpse (the location
  mean and the most probable scale), classified after the last glimpse;
* ``eval/error_sampled``: M trajectories sampled from the prior; the class with the highest average
  probability over the M (a fixed evaluation key, so the number is a deterministic function of the params).

``eval/log_p_y`` is the mean Eqn 9 bound with the prior as proposal, a lower bound on log p(y | I).

Diagnostics (`make_diagnose`) draw K independent gradient estimates of one fixed minibatch at the current
parameters (Figure 2's gradient variance, per parameter group theta / eta) and the ESS of that minibatch.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wsram_jax import baselines
from wsram_jax import diagnostics
from wsram_jax import errors
from wsram_jax import estimators
from wsram_jax import loop
from wsram_jax import networks
from wsram_jax import objectives
from wsram_jax import proposals
from wsram_jax.data import canvas as canvas_lib
from wsram_jax.data import mnist

log = logging.getLogger(__name__)

DATA_AXIS = "data"  # The mesh axis the batch is sharded over.


# ---------------------------------------------------------------------------------------------------------------
# Configuration.


def require(ok: bool, message: str) -> None:
  """Raises `errors.ConfigError(message)` unless `ok`."""
  if not ok:
    raise errors.ConfigError(message)


def require_int(name: str, value, minimum: int = 1) -> None:
  """Raises `errors.ConfigError` unless ``--config.<name>`` = `value` is an integer (not a bool) >= `minimum`."""
  require(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum,
          f"--config.{name} must be an integer >= {minimum}, got {value!r}.")


def canvas_kwargs(config) -> dict[str, int]:
  """The canvas generator's sizes; 0 in the config means the generator's documented default."""
  d = config.data
  return dict(canvas_size=int(d.canvas_size),
              min_size=int(d.min_size) or min(canvas_lib.DEFAULT_MIN_SIZE, int(d.canvas_size)),
              max_size=int(d.max_size) or min(canvas_lib.DEFAULT_MAX_SIZE, int(d.canvas_size)))


def validate_common(config) -> None:
  """The checks of `validate_config` that the captioner's (`captioning.train.validate_config`) shares: the method,
  proposal and baseline and their combinations, M, the batch size, the loop's schedule, the optimiser and the
  exploration heuristics. Raises `errors.ConfigError` (one sentence) for the first invalid value."""
  require(config.method in objectives.METHODS,
          f"Unknown --config.method {config.method!r}; choose one of {', '.join(objectives.METHODS)}.")
  require(config.proposal in objectives.PROPOSALS,
          f"Unknown --config.proposal {config.proposal!r}; choose one of {', '.join(objectives.PROPOSALS)}.")
  require(config.baseline in objectives.BASELINES,
          f"Unknown --config.baseline {config.baseline!r}; choose one of {', '.join(objectives.BASELINES)}.")
  require_int("num_samples", config.num_samples)
  require_int("batch_size", config.batch_size)
  require_int("num_steps", config.num_steps, 0)
  for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    require_int(name, config[name])
  require_int("diag_every", config.diag_every, 0)
  require(float(config.learning_rate) > 0, f"--config.learning_rate must be positive, got {config.learning_rate}.")
  require(float(config.grad_clip_norm) >= 0, f"--config.grad_clip_norm must be >= 0, got {config.grad_clip_norm}.")
  if config.method != "wsram":
    require(config.proposal == "prior",
            f"--config.method={config.method} samples from the prior; set --config.proposal=prior "
            "(use --config.heuristics.temperature to temper it).")
  if config.method != "var":
    require(config.baseline == "none",
            f"--config.baseline={config.baseline} is VAR's control variate; with --config.method="
            f"{config.method} set it to none (WS-RAM's control variates are --config.control_variates).")
  if config.method == "vimco" or config.baseline == "loo":
    require(config.num_samples >= 2, "VIMCO and the leave-one-out baseline need --config.num_samples >= 2.")
  h = config.heuristics
  require(float(h.temperature) > 0, f"--config.heuristics.temperature must be positive, got {h.temperature}.")
  if config.method == "vimco":
    require(float(h.temperature) == 1.0,
            "VIMCO's learning signal assumes samples from the untempered prior; set "
            "--config.heuristics.temperature=1.")
  require(float(h.coverage_weight) >= 0 and float(h.entropy_weight) >= 0,
          "The heuristic weights --config.heuristics.coverage_weight and entropy_weight must be >= 0.")
  require(0.0 <= float(config.mixture_alpha) <= 1.0,
          f"--config.mixture_alpha must be in [0, 1], got {config.mixture_alpha}.")
  require(0.0 <= float(config.baseline_decay) < 1.0,
          f"--config.baseline_decay must be in [0, 1), got {config.baseline_decay}.")


def validate_config(config) -> None:
  """Raises `errors.ConfigError` (one sentence) for any invalid value, before anything is compiled."""
  validate_common(config)
  require_int("num_glimpses", config.num_glimpses)
  if config.diag_every > 0:
    require_int("diag_num_estimates", config.diag_num_estimates, 2)
  m = config.model
  require_int("model.glimpse_size", m.glimpse_size)
  require_int("model.num_scales", m.num_scales)
  require_int("model.lowres_size", m.lowres_size)
  require_int("model.hidden_size", m.hidden_size)
  require_int("model.num_classes", m.num_classes, 2)
  require(float(m.loc_std) > 0, f"--config.model.loc_std must be positive, got {m.loc_std}.")
  d = config.data
  require(d.source in mnist.SOURCES if hasattr(mnist, "SOURCES") else d.source in ("offline", "idx", "tfds"),
          f"Unknown --config.data.source {d.source!r}; choose offline, idx or tfds.")
  require_int("data.canvas_size", d.canvas_size)
  window = m.glimpse_size * 2 ** (m.num_scales - 1)
  require(window <= d.canvas_size,
          f"The largest glimpse window ({m.glimpse_size} * 2^{m.num_scales - 1} = {window} px) is larger than "
          f"the {d.canvas_size} px canvas; lower --config.model.glimpse_size or --config.model.num_scales.")
  require(m.lowres_size <= d.canvas_size,
          f"--config.model.lowres_size ({m.lowres_size}) cannot exceed the canvas size ({d.canvas_size}).")
  canvas_lib.check_sizes(**canvas_kwargs(config))
  require_int("data.num_test", d.num_test)
  require_int("data.eval_batch_size", d.eval_batch_size)
  require_int("mesh_devices", config.mesh_devices)
  require(config.batch_size % config.mesh_devices == 0,
          f"--config.mesh_devices={config.mesh_devices} must divide --config.batch_size={config.batch_size}.")
  if config.mesh_devices > 1:  # (asking for the devices initialises JAX's backend: only when it matters)
    require(config.mesh_devices <= jax.device_count(),
            f"--config.mesh_devices={config.mesh_devices} exceeds the {jax.device_count()} devices JAX sees "
            f"({jax.devices()[0].platform}).")


# ---------------------------------------------------------------------------------------------------------------
# Model, optimiser, state.


def build_model(config) -> networks.AttentionModel:
  m = config.model
  return networks.AttentionModel(
      num_classes=m.num_classes, glimpse_size=m.glimpse_size, num_scales=m.num_scales,
      lowres_size=m.lowres_size, hidden_size=m.hidden_size, loc_std=m.loc_std, learn_loc_std=m.learn_std)


def make_optimizer(config) -> optax.GradientTransformation:
  adam = optax.adam(config.learning_rate)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adam)
  return adam


def baseline_transform(config) -> baselines.BaselineTransform:
  if config.method == "var" and config.baseline == "moving":
    return baselines.moving_average(config.baseline_decay, init_value=-float(np.log(config.model.num_classes)))
  return baselines.no_baseline()


def make_mesh(config) -> Optional[Mesh]:
  """The data-parallel mesh: the first `config.mesh_devices` devices on one axis named ``data``; None for one
  device (then nothing is sharded and the step is exactly the single-device one)."""
  if config.mesh_devices == 1:
    return None
  return Mesh(np.asarray(jax.devices()[:config.mesh_devices]), (DATA_AXIS,))


def replicate(config, tree):
  """`tree` placed on every device of `make_mesh(config)` (parameters, optimiser state, the training set);
  unchanged for one device."""
  mesh = make_mesh(config)
  return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def create_train_state(config, model, optimizer) -> loop.TrainState:
  """Fresh parameters and optimiser state (replicated over the mesh when `config.mesh_devices` > 1)."""
  key = jax.random.PRNGKey(config.seed)
  k_init, k_run = jax.random.split(key)
  params = networks.init_params(model, k_init)
  state = loop.TrainState.create(params=params, opt_state=optimizer.init(params), key=k_run,
                                 extra=baseline_transform(config).init())
  return replicate(config, state)


# ---------------------------------------------------------------------------------------------------------------
# Steps.


def compiler_options() -> dict[str, Any]:
  """XLA options for the jitted steps. On the CPU, LLVM at -O1: the step's ~500 kernels compile 25% faster (6.4 s
  instead of 8.6 s for the paper's configuration on 2 cores) and the step runs as fast (its matmuls are library
  calls, its other kernels memory-bound; BENCHMARKS.md). An explicit --xla_backend_optimization_level in
  XLA_FLAGS (the tests use 0) is left alone."""
  if jax.default_backend() != "cpu" or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
    return {}
  return {"xla_backend_optimization_level": 1}


def build_loss_and_grads(loss_fn, btx: baselines.BaselineTransform,
                         sample: Callable[..., Any]) -> Callable[..., tuple[tuple[jax.Array, dict], Any]]:
  """`(params, extra, key, *data) -> ((loss, metrics), grads)` (not jitted), for any task's
  `loss_fn(params, batch, key, baseline_value) -> (loss, metrics)`: splits `key` in two, draws the batch with
  the first (`sample(key, *data) -> batch`) and differentiates `loss_fn` with the second, at the value of the
  baseline `btx` before this batch (`extra` is its state). The first half of `build_step`."""

  def loss_and_grads(params, extra, key, *data):
    k_data, k_loss = jax.random.split(key)
    batch = sample(k_data, *data)
    # The baseline's value before this batch does not depend on the rewards passed here.
    value, _ = btx.update(jnp.zeros(()), extra)
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, k_loss, value)

  return loss_and_grads


def build_step(loss_and_grads: Callable[..., tuple[tuple[jax.Array, dict], Any]], btx: baselines.BaselineTransform,
               optimizer: optax.GradientTransformation) -> Callable[..., tuple[loop.TrainState, dict]]:
  """`step(state, *data) -> (state, metrics)` (not jitted), one update for any task: the gradients of step t
  from `loss_and_grads(params, extra, fold_in(state.key, t), *data)` (`build_loss_and_grads`), the baseline `btx`
  updated with the batch's ``reward``, then `optimizer` through `loop.guarded_update` (no update if the loss or
  the gradients are not finite). Metrics: the loss's, prefixed ``train/``, and ``train/grad_norm``."""

  def step(state: loop.TrainState, *data):
    key = jax.random.fold_in(state.key, state.step)
    (loss, metrics), grads = loss_and_grads(state.params, state.extra, key, *data)
    _, new_extra = btx.update(metrics["reward"], state.extra)

    def apply(params, opt_state):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    metrics = {f"train/{k}": v for k, v in metrics.items()}
    grad_norm = metrics["train/grad_norm"] = optax.global_norm(grads)
    return loop.guarded_update(state, grads, apply, loss, new_extra, grad_norm=grad_norm), metrics

  return step


def make_loss_and_grads(config, model) -> Callable[..., tuple[tuple[jax.Array, dict], Any]]:
  """`(params, extra, key, images, labels) -> ((loss, metrics), grads)` for the step with PRNG key `key`
  (not jitted): draws the batch (`data.canvas.sample_batch`), shards it over the mesh's ``data`` axis when
  `config.mesh_devices` > 1, and differentiates the objective. The first half of `make_train_step`."""
  loss_fn = objectives.make_loss_fn(objectives.ObjectiveConfig.from_config(config), model)
  sizes = canvas_kwargs(config)
  mesh = make_mesh(config)

  def sample(key, images, labels):
    canvases, ys, _ = canvas_lib.sample_batch(key, images, labels, config.batch_size, **sizes)
    if mesh is not None:  # Data parallel: each device rolls out its slice of the batch; XLA sums the gradients.
      batch = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
      canvases, ys = jax.lax.with_sharding_constraint((canvases, ys), batch)
    return canvases, ys

  return build_loss_and_grads(loss_fn, baseline_transform(config), sample)


def make_train_step(config, model, optimizer) -> Callable[..., tuple[loop.TrainState, dict]]:
  """`step(state, images, labels) -> (state, metrics)`, jitted; images uint8 [N, 28, 28], labels [N].

  With `config.mesh_devices` = n > 1 the step runs on `make_mesh(config)`: the batch sharded over the ``data``
  axis (each device rolls out B / n canvases), parameters, optimiser state and training set replicated (pass a
  state from `create_train_state` and the data through `replicate`), gradients summed across devices by XLA.
  No pmap: the same program, partitioned by the compiler (`jax.sharding`).
  """
  step = build_step(make_loss_and_grads(config, model), baseline_transform(config), optimizer)
  mesh = make_mesh(config)
  if mesh is None:
    return jax.jit(step, compiler_options=compiler_options())
  return jax.jit(step, out_shardings=NamedSharding(mesh, PartitionSpec()), compiler_options=compiler_options())


def make_eval_batch(config, model) -> Callable[..., dict]:
  """`(params, canvases uint8 [E, H, W, 1], labels [E], mask [E], key) -> sums` for the evaluator (jitted)."""
  m_ = config.num_samples

  @functools.partial(jax.jit, compiler_options=compiler_options())
  def eval_batch(params, canvases, labels, mask, key):
    canvases = canvas_lib.to_float(canvases)
    greedy = objectives.batched_rollout(params, canvases, labels, key, model=model, proposal=proposals.prior,
                                        num_glimpses=config.num_glimpses, num_samples=1, greedy=True)
    sampled = objectives.batched_rollout(params, canvases, labels, key, model=model,
                                         proposal=proposals.prior, num_glimpses=config.num_glimpses,
                                         num_samples=m_)
    mean_probs = jnp.mean(jax.nn.softmax(sampled.logits), axis=1)  # [E, C]
    wrong_greedy = (jnp.argmax(greedy.logits[:, 0], -1) != labels).astype(jnp.float32)
    wrong_sampled = (jnp.argmax(mean_probs, -1) != labels).astype(jnp.float32)
    # Prior proposal: log w = log p(y|a), so Eqn 9 is log mean_m p(y|a^m).
    bound = estimators.log_marginal_bound(sampled.log_p_y)
    return {"error_greedy": jnp.sum(wrong_greedy * mask), "error_sampled": jnp.sum(wrong_sampled * mask),
            "log_p_y": jnp.sum(bound * mask)}

  return eval_batch


def make_evaluator(config, model, test_canvases, test_labels) -> Callable[[loop.TrainState], dict]:
  """Evaluates on the fixed test canvases in batches of `config.data.eval_batch_size` (the last one padded)."""
  eval_batch = make_eval_batch(config, model)
  e = config.data.eval_batch_size
  n = test_canvases.shape[0]
  key = jax.random.PRNGKey(config.data.test_seed + 1)

  def evaluate(state):
    totals = {}
    for start in range(0, n, e):
      stop = min(start + e, n)
      index = np.minimum(np.arange(start, start + e), n - 1)
      mask = (np.arange(start, start + e) < n).astype(np.float32)
      out = eval_batch(state.params, test_canvases[index], test_labels[index], mask,
                       jax.random.fold_in(key, start))
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + v
      del stop
    return {f"eval/{k}": float(v) / n for k, v in totals.items()}

  return evaluate


def make_diagnose(config, model, images, labels) -> Callable[[loop.TrainState], dict]:
  """Gradient variance over `config.diag_num_estimates` estimates of one fixed minibatch, and its ESS."""
  loss_fn = objectives.make_loss_fn(objectives.ObjectiveConfig.from_config(config), model)
  btx = baseline_transform(config)
  diag_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2 ** 30)
  canvases, ys, _ = canvas_lib.sample_batch(diag_key, images, labels, config.batch_size,
                                            **canvas_kwargs(config))
  batch = (canvases, ys)

  @functools.partial(jax.jit, compiler_options=compiler_options())
  def diagnose_jit(state):
    value, _ = btx.update(jnp.zeros(()), state.extra)
    grad_fn = lambda p, b, k: jax.grad(lambda q: loss_fn(q, b, k, value)[0])(p)
    labels_tree = networks.param_labels(state.params, baseline="baseline")
    out = diagnostics.gradient_variance(grad_fn, state.params, batch, jax.random.fold_in(diag_key, state.step),
                                        num_estimates=config.diag_num_estimates, labels=labels_tree)
    _, metrics = loss_fn(state.params, batch, jax.random.fold_in(diag_key, 2 ** 31), value)
    out["ess/mean"] = metrics["ess"]
    return out

  # Without an inference network eta gets no gradient; leave its (zero) group out rather than report it.
  drop = () if objectives.ObjectiveConfig.from_config(config).uses_inference_network else ("/eta",)

  def diagnose(state):
    out = jax.device_get(diagnose_jit(state))
    return {f"diag/{k}": v for k, v in out.items() if not k.endswith(drop)}

  return diagnose


# ---------------------------------------------------------------------------------------------------------------
# The whole run.


def load_data(config):
  """(train images, train labels, test canvases uint8, test labels) for `config.data`."""
  d = config.data
  data_dir = d.data_dir or None
  images, labels = mnist.load_mnist("train", source=d.source, data_dir=data_dir)
  test_images, test_labels = mnist.load_mnist("test", source=d.source, data_dir=data_dir)
  num_test = min(int(d.num_test), test_images.shape[0])
  test_canvases, test_labels, _ = canvas_lib.fixed_test_set(test_images, test_labels, seed=d.test_seed,
                                                            num=num_test, **canvas_kwargs(config))
  return images, labels, test_canvases, test_labels


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run) and returns the last value of every metric."""
  validate_config(config)
  images, labels, test_canvases, test_labels = load_data(config)
  model = build_model(config)
  optimizer = make_optimizer(config)
  step = make_train_step(config, model, optimizer)
  images_dev, labels_dev = replicate(config, (jnp.asarray(images), jnp.asarray(labels)))
  _, last = loop.run(
      config=config, workdir=workdir,
      init_state=functools.partial(create_train_state, config, model, optimizer),
      train_step=lambda state: step(state, images_dev, labels_dev),
      evaluate=make_evaluator(config, model, test_canvases, test_labels),
      diagnose=(make_diagnose(config, model, images_dev, labels_dev) if config.diag_every > 0 else None),
      progress_keys=("train/loss", "train/error", "train/ess"))
  return last


def load_config(workdir: str):
  """The configuration a run in `workdir` was started with (its config.json), as a ConfigDict."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = f"{workdir}/config.json"
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise errors.UserError(f"Cannot read the run's configuration {path} ({e}); is {workdir} a run directory?")


def restore_state(config, workdir: str) -> loop.TrainState:
  """The newest readable checkpoint of the run in `workdir` (raises CheckpointError if there is none)."""
  from wsram_jax import checkpoints  # pylint: disable=g-import-not-at-top
  model = build_model(config)
  target = create_train_state(config, model, make_optimizer(config))
  ckpt = checkpoints.Checkpointer(f"{workdir}/checkpoints", max_to_keep=config.keep_checkpoints)
  state, step = ckpt.restore_latest(target)
  ckpt.close()
  if state is None:
    raise errors.CheckpointError(f"{workdir} holds no checkpoint; train a model there first.")
  return state


def glimpse_figure(config, params, canvases, labels, path: str, *, num: int = 16) -> str:
  """Draws the glimpse paths of the prior's mean glimpses (the greedy policy) on `num` test canvases."""
  from wsram_jax import plots  # pylint: disable=g-import-not-at-top
  model = build_model(config)
  canvases, labels = canvases[:num], labels[:num]
  traj = jax.jit(functools.partial(objectives.batched_rollout, model=model, proposal=proposals.prior,
                                   num_glimpses=config.num_glimpses, num_samples=1, greedy=True))(
                                       params, canvas_lib.to_float(canvases), jnp.asarray(labels),
                                       jax.random.PRNGKey(0))
  predicted = np.asarray(jnp.argmax(traj.logits[:, 0], -1))
  titles = [f"label {int(y)}, predicted {int(p)}" for y, p in zip(labels, predicted)]
  return plots.glimpse_paths(np.asarray(canvases), np.asarray(traj.locations[:, 0]),
                             np.asarray(traj.scales[:, 0]), glimpse_size=config.model.glimpse_size, path=path,
                             labels=titles, title="greedy glimpse paths (1 = first glimpse)")


def summary(last: dict[str, Any]) -> str:
  """One line with the numbers a run ends on: test errors, log-likelihood bound, ESS, gradient variance."""
  parts = []
  for name, key, fmt in (("test error (greedy)", "eval/error_greedy", "{:.2%}"),
                         ("test error (M samples)", "eval/error_sampled", "{:.2%}"),
                         ("test log p(y|I) >=", "eval/log_p_y", "{:.4f}"),
                         ("ESS", "diag/ess/mean", "{:.2f}"),
                         ("grad var (theta)", "diag/grad_var/theta", "{:.3g}"),
                         ("grad var (eta)", "diag/grad_var/eta", "{:.3g}")):
    if key in last:
      parts.append(f"{name} {fmt.format(last[key])}")
  return "; ".join(parts)
