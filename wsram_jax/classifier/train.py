"""Training and evaluation of the attention classifier on translated and scaled MNIST (paper Sec. 5.1).

    train_and_evaluate(config, workdir) -> final metrics

One update (`make_train_step`) is the training core's (`training.step.build_step`), all inside one `jax.jit`:

    key_t              = fold_in(state.key, t)                  the data order and the samples of step t
    canvases, labels   = data.canvas.sample_batch(key_t, ...)   digits drawn from the device-resident train set
    loss, grads        = value_and_grad(classifier.loss)(...)   rollout [B, M, N] + estimator
    state              = loop.guarded_update(state, ...)        Adam (after global-norm clipping), unless non-finite

Data parallel (`config.mesh_devices` = n > 1): the same step on a mesh of n devices (`training.step.make_mesh`),
the batch sharded over it, everything else replicated.

Evaluation (`make_evaluator`) uses the fixed test canvases (`data.canvas.fixed_test_set`, a function of
`config.data.test_seed`) and forms the prediction two ways:

* ``eval/error_greedy``: one trajectory taking the prior's most probable action at each glimpse (the location
  mean and the most probable scale), classified after the last glimpse;
* ``eval/error_sampled``: M trajectories sampled from the prior; the class with the highest average
  probability over the M (a fixed evaluation key, so the number is a deterministic function of the params).

``eval/log_p_y`` is the mean Eqn 9 bound with the prior as proposal, a lower bound on log p(y | I).

Diagnostics (`training.step.make_diagnose`) draw K independent gradient estimates of one fixed minibatch at the
current parameters (Figure 2's gradient variance, per parameter group theta / eta) and the ESS of that minibatch.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax import baselines
from wsram_jax import estimators
from wsram_jax import glimpse as glimpse_lib
from wsram_jax import objectives
from wsram_jax import proposals
from wsram_jax.classifier import loss as loss_lib
from wsram_jax.classifier import model as model_lib
from wsram_jax.data import canvas as canvas_lib
from wsram_jax.data import mnist
from wsram_jax.training import config as config_lib
from wsram_jax.training import loop
from wsram_jax.training import memory
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import step as step_lib

log = logging.getLogger(__name__)

require, require_int = config_lib.require, config_lib.require_int


# ---------------------------------------------------------------------------------------------------------------
# Configuration.


def canvas_kwargs(config) -> dict[str, int]:
  """The canvas generator's sizes; 0 in the config means the generator's documented default."""
  d = config.data
  return dict(canvas_size=int(d.canvas_size),
              min_size=int(d.min_size) or min(canvas_lib.DEFAULT_MIN_SIZE, int(d.canvas_size)),
              max_size=int(d.max_size) or min(canvas_lib.DEFAULT_MAX_SIZE, int(d.canvas_size)))


def objective_config(config) -> objectives.ObjectiveConfig:
  """The loss settings of `config` (`objectives.ObjectiveConfig.from_config`)."""
  return objectives.ObjectiveConfig.from_config(config)


def validate_config(config) -> None:
  """Raises `errors.ConfigError` (one sentence) for any invalid value, before anything is compiled."""
  config_lib.validate_common(config)
  require_int("num_glimpses", config.num_glimpses)
  if config.diag_every > 0:
    require_int("diag_num_estimates", config.diag_num_estimates, 2)
  m = config.model
  config_lib.check_model_block(m, model_lib.AttentionModel)
  require_int("model.glimpse_size", m.glimpse_size)
  require_int("model.num_scales", m.num_scales)
  require_int("model.lowres_size", m.lowres_size)
  require_int("model.hidden_size", m.hidden_size)
  require_int("model.num_classes", m.num_classes, 2)
  require_int("model.glimpse_hidden", m.glimpse_hidden)
  require_int("model.inference_hidden", m.inference_hidden)
  require(m.channels == 1, f"--config.model.channels must be 1: MNIST canvases are grayscale, got {m.channels}.")
  config_lib.require_loc_std("model.loc_std", m.loc_std)
  if m.learn_loc_std:
    config_lib.require_loc_std("model.min_loc_std", m.min_loc_std)
    require(0 < float(m.min_loc_std) <= float(m.loc_std) <= float(m.max_loc_std),
            f"A learned location std needs 0 < --config.model.min_loc_std <= loc_std <= max_loc_std, got "
            f"{m.min_loc_std}, {m.loc_std}, {m.max_loc_std}.")
  require(float(m.head_init_scale) >= 0 and float(m.recurrent_scale) >= 0,
          "--config.model.head_init_scale and recurrent_scale must be >= 0.")
  d = config.data
  require(d.source in mnist.SOURCES,
          f"Unknown --config.data.source {d.source!r}; choose one of {', '.join(mnist.SOURCES)}.")
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
  runs = runs_lib.from_config(config)
  if runs.num_runs > 1:
    require(config.mesh_devices == 1, "--config.num_runs > 1 and --config.mesh_devices > 1 do not combine; split "
                                      "the runs or the batch over the devices, not both.")
    for r in range(runs.num_runs):  # each run's own values, as its single-run twin would be checked
      validate_config(runs.config_for(config, r))
  require(config.batch_size % config.mesh_devices == 0,
          f"--config.mesh_devices={config.mesh_devices} must divide --config.batch_size={config.batch_size}.")
  if config.mesh_devices > 1:  # (asking for the devices initialises JAX's backend: only when it matters)
    require(config.mesh_devices <= jax.device_count(),
            f"--config.mesh_devices={config.mesh_devices} exceeds the {jax.device_count()} devices JAX sees "
            f"({jax.devices()[0].platform}).")


# ---------------------------------------------------------------------------------------------------------------
# Model, state.


def build_model(config) -> model_lib.AttentionModel:
  """`AttentionModel(**config.model)`: every key of the block is a field of the model, and the reverse."""
  return model_lib.AttentionModel(**config.model)


def baseline_transform(config) -> baselines.BaselineTransform:
  """VAR's moving-average baseline, starting at log(1/C) (the reward of a uniform classifier), or none."""
  return objectives.baseline_transform(objective_config(config),
                                       init_value=-float(np.log(config.model.num_classes)))


def create_train_state(config, model, optimizer) -> loop.TrainState:
  """Fresh parameters and optimiser state (replicated over the mesh when `config.mesh_devices` > 1); for
  ``config.num_runs`` = R > 1, the R runs' states stacked on a leading run axis (`training.runs`)."""
  init = functools.partial(model_lib.init_params, model)
  runs = runs_lib.from_config(config)
  if runs.num_runs > 1:
    return step_lib.create_run_states(runs, init, optimizer, baseline_transform(config))
  state = step_lib.create_train_state(config.seed, init, optimizer, baseline_transform(config))
  return step_lib.replicate(step_lib.make_mesh(config.mesh_devices), state)


# ---------------------------------------------------------------------------------------------------------------
# Steps.


def make_loss_fn(config, model):
  """The classifier's loss for `config` (`classifier.loss.make_loss_fn`)."""
  return loss_lib.make_loss_fn(objective_config(config), model, num_glimpses=config.num_glimpses)


def make_loss_and_grads(config, model) -> step_lib.LossAndGrads:
  """`(params, extra, key, images, labels) -> ((loss, metrics), grads)` for the step with PRNG key `key`
  (not jitted): draws the batch (`data.canvas.sample_batch`), shards it over the mesh's ``data`` axis when
  `config.mesh_devices` > 1, and differentiates the loss. The first half of `make_train_step`."""
  sizes = canvas_kwargs(config)
  mesh = step_lib.make_mesh(config.mesh_devices)

  def sample(key, images, labels):
    canvases, ys, _ = canvas_lib.sample_batch(key, images, labels, config.batch_size, **sizes)
    return step_lib.shard_batch(mesh, (canvases, ys))

  return step_lib.build_loss_and_grads(make_loss_fn(config, model), baseline_transform(config), sample)


def make_train_step(config, model, optimizer) -> Callable[..., tuple[loop.TrainState, dict]]:
  """`step(state, images, labels) -> (state, metrics)`, jitted; images uint8 [N, 28, 28], labels [N].

  With `config.mesh_devices` = n > 1 the step runs on `training.step.make_mesh(n)`: the batch sharded over the
  ``data`` axis (each device rolls out B / n canvases), parameters, optimiser state and training set replicated
  (pass a state from `create_train_state` and the data through `training.step.replicate`), gradients summed
  across devices by XLA. No pmap: the same program, partitioned by the compiler (`jax.sharding`).

  With ``config.num_runs`` = R > 1 the step trains the R runs of `training.runs` at once (state from
  `create_train_state`, metrics ``[R]``).
  """
  step = step_lib.build_step(make_loss_and_grads(config, model), baseline_transform(config), optimizer)
  runs = runs_lib.from_config(config)
  if runs.num_runs > 1:
    return step_lib.jit_runs(step, runs, num_data=2)
  return step_lib.jit_step(step, step_lib.make_mesh(config.mesh_devices))


def make_eval_batch(config, model) -> Callable[..., dict]:
  """`(params, canvases uint8 [E, H, W, 1], labels [E], boxes [E, 4], mask [E], key, hyper) -> sums` for the
  evaluator (jitted; see `make_evaluator` for what is summed; ``hyper``, ``{}`` or a run's own numbers in a sweep,
  may set the model's ``loc_std``)."""
  m_, n_ = config.num_samples, config.num_glimpses
  roll = functools.partial(loss_lib.batched_rollout, proposal=proposals.prior, num_glimpses=n_)
  on_box = jax.vmap(jax.vmap(functools.partial(glimpse_lib.window_on_box, size=model.glimpse_size,
                                               num_scales=model.num_scales,
                                               canvas_hw=(config.data.canvas_size,) * 2),
                             in_axes=(0, 0, None)))  # over E, then over the N glimpses

  @functools.partial(jax.jit, compiler_options=step_lib.compiler_options())
  def eval_batch(params, canvases, labels, boxes, mask, key, hyper):
    canvases = canvas_lib.to_float(canvases)
    net = runs_lib.model_for(model, hyper)
    greedy = roll(params, canvases, labels, key, num_samples=1, greedy=True, model=net)
    sampled = roll(params, canvases, labels, key, num_samples=m_, model=net)
    mean_probs = jnp.mean(jax.nn.softmax(sampled.logits), axis=1)  # [E, C]
    wrong = lambda logits: (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
    # Prior proposal: log w = log p(y|a), so Eqn 9 is log mean_m p(y|a^m).
    bound = estimators.log_marginal_bound(sampled.log_p_y)
    sums = {"error_greedy": wrong(greedy.logits[:, 0]), "error_sampled": wrong(mean_probs), "log_p_y": bound}
    # Where the greedy glimpses go: on the digit's box (measurement only; nothing in training sees the boxes).
    inside, overlaps, coverage = on_box(greedy.locations[:, 0], greedy.scales[:, 0], boxes)  # [E, N] each
    scales = jax.nn.one_hot(greedy.scales[:, 0], model.num_scales)  # [E, N, S]
    for n in range(n_):
      sums[f"on_digit/g{n + 1}"] = inside[:, n]
      sums[f"overlap/g{n + 1}"] = overlaps[:, n]
      sums[f"box_coverage/g{n + 1}"] = coverage[:, n]
      for s in range(model.num_scales):
        sums[f"scale_usage/g{n + 1}_s{s}"] = scales[:, n, s]
    if n_ > 1:
      sums["on_digit/later"] = jnp.mean(inside[:, 1:], axis=1)
    for s in range(model.num_scales):
      sums[f"scale_usage/s{s}"] = jnp.mean(scales[:, :, s], axis=1)
    sums["outside_canvas"] = jnp.mean(jnp.any(jnp.abs(sampled.actions.loc) > 1.0, -1).astype(jnp.float32),
                                      axis=(1, 2))
    # Glimpse ablation: the greedy glimpses again with glimpse n's patch replaced by zeros, for n = 1..N in a
    # loop (`lax.map`: one rollout compiled, not N).
    def ablated_error(patch_mask):
      ablated = roll(params, canvases, labels, key, num_samples=1, actions=greedy.actions, model=net,
                     patch_mask=patch_mask)
      return wrong(ablated.logits[:, 0])

    ablation = jax.lax.map(ablated_error, 1.0 - jnp.eye(n_))  # [N, E]
    for n in range(n_):
      sums[f"ablation_error/g{n + 1}"] = ablation[n]
    return {k: jnp.sum(v * mask) for k, v in sums.items()}

  return eval_batch


def make_evaluator(config, model, test_canvases, test_labels, test_boxes) -> Callable[..., dict]:
  """Evaluates on the fixed test canvases in batches of `config.data.eval_batch_size` (the last one padded).

  Metrics (means over the test canvases; ``g{n}``: glimpse n = 1..N):

  * ``eval/error_greedy``, ``eval/error_sampled``, ``eval/log_p_y``: see the module docstring;
  * where the greedy glimpses go, measured against the digit's box (which nothing in training sees):
    ``eval/on_digit/g{n}`` the fraction whose window's centre lies inside the box, ``eval/on_digit/later`` the
    same over glimpses 2..N, ``eval/overlap/g{n}`` the fraction whose window shares a pixel with the box,
    ``eval/box_coverage/g{n}`` the mean fraction of the box inside the window;
  * ``eval/scale_usage/g{n}_s{s}`` and ``eval/scale_usage/s{s}``: the greedy glimpses' scales, per glimpse and
    over all glimpses;
  * ``eval/outside_canvas``: the fraction of the M sampled locations outside the canvas;
  * ``eval/ablation_error/g{n}``: the greedy test error when glimpse n's patch is replaced by zeros (the
    glimpses kept where they were): how much the classifier uses glimpse n.

  ``evaluate(state)``; for several runs ``evaluate(state_r, r)``, with run r's own numbers (one compiled
  function for all).
  """
  eval_batch = make_eval_batch(config, model)
  e = config.data.eval_batch_size
  n = test_canvases.shape[0]
  key = jax.random.PRNGKey(config.data.test_seed + 1)

  runs = runs_lib.from_config(config)

  def evaluate(state, r=None):
    run_hyper = {} if r is None else runs.hyper_of(r)
    totals = {}
    for start in range(0, n, e):
      index = np.minimum(np.arange(start, start + e), n - 1)
      mask = (np.arange(start, start + e) < n).astype(np.float32)
      out = eval_batch(state.params, test_canvases[index], test_labels[index], test_boxes[index], mask,
                       jax.random.fold_in(key, start), run_hyper)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + v
    return {f"eval/{k}": float(v) / n for k, v in totals.items()}

  return evaluate


def diagnostic_batch(config, images, labels, seed: int) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """``((canvases, labels), key)``: the fixed minibatch of B canvases that the diagnostics of seed `seed` measure,
  and the key of their estimates (`training.step.diagnostic_key`)."""
  key = step_lib.diagnostic_key(seed)
  canvases, ys, _ = canvas_lib.sample_batch(key, images, labels, config.batch_size, **canvas_kwargs(config))
  return (canvases, ys), key


def make_diagnose(config, model, images, labels) -> Callable[..., dict]:
  """Gradient variance over `config.diag_num_estimates` estimates of one fixed minibatch, and its ESS
  (`training.step.make_diagnose`): ``diagnose(state)``, or for several runs ``diagnose(state_r, r)`` (each run
  its own minibatch and key, from its seed, and its own numbers; one compiled function for all)."""
  runs = runs_lib.from_config(config)
  diagnose = step_lib.make_diagnose(make_loss_fn(config, model), baseline_transform(config),
                                    num_estimates=config.diag_num_estimates,
                                    uses_inference_network=objective_config(config).uses_inference_network)

  inputs = functools.partial(diagnostic_batch, config, images, labels)
  if runs.num_runs == 1:
    batch, key = inputs(config.seed)
    return lambda state: diagnose(state, batch, key)
  per_run = [inputs(seed) for seed in runs.seeds]
  return lambda state, r: diagnose(state, *per_run[r], runs.hyper_of(r))


# ---------------------------------------------------------------------------------------------------------------
# The whole run.


class Data(NamedTuple):
  """What a run trains and evaluates on: the training set (``images [N, 28, 28]`` uint8, ``labels [N]``) and the
  fixed test canvases (``test_canvases [E, H, W, 1]`` uint8, ``test_labels [E]``, ``test_boxes [E, 4]``, the
  digits' boxes, for measuring where the glimpses go)."""
  images: np.ndarray
  labels: np.ndarray
  test_canvases: np.ndarray
  test_labels: np.ndarray
  test_boxes: np.ndarray


def load_data(config) -> Data:
  """The `Data` of `config.data`."""
  d = config.data
  data_dir = d.data_dir or None
  classes = int(config.model.num_classes)
  images, labels = mnist.load_mnist("train", source=d.source, data_dir=data_dir, num_classes=classes)
  test_images, test_labels = mnist.load_mnist("test", source=d.source, data_dir=data_dir, num_classes=classes)
  num_test = config_lib.capped("data.num_test", int(d.num_test), test_images.shape[0], "test digits")
  test_canvases, test_labels, test_boxes = canvas_lib.fixed_test_set(test_images, test_labels, seed=d.test_seed,
                                                                     num=num_test, **canvas_kwargs(config))
  return Data(images, labels, test_canvases, test_labels, test_boxes)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run) and returns the last value of every metric."""
  validate_config(config)
  data = load_data(config)
  model = build_model(config)
  optimizer = step_lib.make_optimizer(config)
  step = make_train_step(config, model, optimizer)
  mesh = step_lib.make_mesh(config.mesh_devices)
  images_dev, labels_dev = step_lib.replicate(mesh, (jnp.asarray(data.images), jnp.asarray(data.labels)))
  _, last = loop.run(
      config=config, workdir=workdir,
      init_state=functools.partial(create_train_state, config, model, optimizer),
      train_step=lambda state: step(state, images_dev, labels_dev),
      evaluate=make_evaluator(config, model, data.test_canvases, data.test_labels, data.test_boxes),
      diagnose=(make_diagnose(config, model, images_dev, labels_dev) if config.diag_every > 0 else None),
      progress_keys=("train/loss", "train/error", "train/ess"),
      step_memory=lambda state: memory.step_bytes(step, state, images_dev, labels_dev),
      runs=runs_lib.from_config(config))
  return last


def restore_state(config, workdir: str) -> loop.TrainState:
  """The newest readable checkpoint of the run in `workdir` (raises CheckpointError if there is none)."""
  model = build_model(config)
  target = create_train_state(config, model, step_lib.make_optimizer(config))
  return step_lib.restore_latest(target, workdir)[0]


def glimpse_figure(config, params, canvases, labels, path: str, *, boxes=None, num: int = 16) -> str:
  """Draws the glimpse paths of the prior's mean glimpses (the greedy policy) on `num` test canvases, each window
  at its scale, and the digits' boxes (dashed) when `boxes` are given."""
  from wsram_jax import plots  # pylint: disable=g-import-not-at-top
  model = build_model(config)
  canvases, labels = canvases[:num], labels[:num]
  traj = jax.jit(functools.partial(loss_lib.batched_rollout, model=model, proposal=proposals.prior,
                                   num_glimpses=config.num_glimpses, num_samples=1, greedy=True))(
                                       params, canvas_lib.to_float(canvases), jnp.asarray(labels),
                                       jax.random.PRNGKey(0))
  predicted = np.asarray(jnp.argmax(traj.logits[:, 0], -1))
  titles = [f"label {int(y)}, predicted {int(p)}" for y, p in zip(labels, predicted)]
  return plots.glimpse_paths(np.asarray(canvases), np.asarray(traj.locations[:, 0]),
                             np.asarray(traj.scales[:, 0]), glimpse_size=config.model.glimpse_size, path=path,
                             labels=titles, boxes=None if boxes is None else np.asarray(boxes)[:num],
                             title="greedy glimpse paths (1 = first glimpse; dashed: the digit's box)"
                             if boxes is not None else "greedy glimpse paths (1 = first glimpse)")


def summary(last: dict[str, Any]) -> str:
  """One line with the numbers a run ends on: test errors, where the later glimpses go, log-likelihood bound, ESS
  (the diagnostics', else the last logged training batches'), gradient variance (one line per run, labelled, for
  several runs)."""
  if "runs" in last:
    return "\n".join(f"{label}: {summary(run)}" for label, run in zip(last["labels"], last["runs"]))
  parts = []
  ess = ("ESS", "diag/ess/mean") if "diag/ess/mean" in last else ("ESS of the last training batches", "train/ess")
  for name, key, fmt in (("test error (greedy)", "eval/error_greedy", "{:.2%}"),
                         ("test error (M samples)", "eval/error_sampled", "{:.2%}"),
                         ("greedy glimpses 2-N on the digit", "eval/on_digit/later", "{:.1%}"),
                         ("test log p(y|I) >=", "eval/log_p_y", "{:.4f}"),
                         (*ess, "{:.2f}"),
                         ("grad var (theta)", "diag/grad_var/theta", "{:.3g}"),
                         ("grad var (eta)", "diag/grad_var/eta", "{:.3g}")):
    if key in last:
      parts.append(f"{name} {fmt.format(last[key])}")
  return "; ".join(parts)

