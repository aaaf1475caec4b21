"""The attention classifier on translated and scaled MNIST (paper Sec. 5.1) as a task of the training core.

    train_and_evaluate(config, workdir) -> final metrics       (`training.trainer.train_and_evaluate(TASK, ...)`)

`TASK` (`training.task.Task`) is everything the core needs from the classifier: its config checks, data (the
training digits and the fixed test canvases), model, loss (`classifier.loss`), batch sampler, evaluator and
summary. One update is the core's (`training.step.build_step`), all inside one `jax.jit`:

    key_t              = fold_in(state.key, t)                  the data order and the samples of step t
    canvases, labels   = data.canvas.sample_batch(key_t, ...)   digits drawn from the device-resident train set
    loss, grads        = value_and_grad(classifier.loss)(...)   rollout [B, M, N] + estimator
    state              = state.guarded_update(state, ...)       Adam (after global-norm clipping), unless non-finite

Sweeps (``config.num_runs``), the data-parallel mesh (``config.mesh_devices``), resume, the NaN guard and the
gradient-variance diagnostics are the core's. The functions below the task's are the classifier's public
entry points (tests, binaries, benchmarks), each the core's with `TASK`.

Evaluation (`make_task_evaluator`) uses the fixed test canvases (`data.canvas.fixed_test_set`, a function of
`config.data.test_seed`) and forms the prediction two ways:

* ``eval/error_greedy``: one trajectory taking the prior's most probable action at each glimpse (the location
  mean and the most probable scale), classified after the last glimpse;
* ``eval/error_sampled``: M trajectories sampled from the prior; the class with the highest average
  probability over the M (a fixed evaluation key, so the number is a deterministic function of the params).

``eval/log_p_y`` is the mean Eqn 9 bound with the prior as proposal, a lower bound on log p(y | I).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax import attention
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
from wsram_jax.training import state as state_lib
from wsram_jax.training import step as step_lib
from wsram_jax.training import task as task_lib
from wsram_jax.training import trainer

require, require_int = config_lib.require, config_lib.require_int


# ---------------------------------------------------------------------------------------------------------------
# Configuration.


def canvas_kwargs(config) -> dict[str, int]:
  """The canvas generator's sizes; 0 in the config means the generator's documented default."""
  d = config.data
  return dict(canvas_size=int(d.canvas_size),
              min_size=int(d.min_size) or min(canvas_lib.DEFAULT_MIN_SIZE, int(d.canvas_size)),
              max_size=int(d.max_size) or min(canvas_lib.DEFAULT_MAX_SIZE, int(d.canvas_size)))


def validate(config) -> None:
  """The classifier's own checks (`Task.validate`): the model block, the canvas, the evaluation; one
  `errors.ConfigError` sentence for the first invalid value."""
  require_int("num_glimpses", config.num_glimpses)
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


# ---------------------------------------------------------------------------------------------------------------
# Data, model, sampler, loss.


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


def train_arrays(data: Data) -> tuple[np.ndarray, np.ndarray]:
  """What the step draws its batches from: the training digits and their labels."""
  return data.images, data.labels


def make_sampler(config, data=None) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``sample(key, images, labels) -> (canvases float32 [B, H, W, 1], labels [B])``: B digits of the training set
  on random canvases (`data.canvas.sample_batch`)."""
  del data  # the sampler reads the arrays it is given
  sizes, batch_size = canvas_kwargs(config), config.batch_size

  def sample(key, images, labels):
    canvases, ys, _ = canvas_lib.sample_batch(key, images, labels, batch_size, **sizes)
    return canvases, ys

  return sample


def build_model(config, data=None) -> model_lib.AttentionModel:
  """`AttentionModel(**config.model)`: every key of the block is a field of the model, and the reverse."""
  del data
  return model_lib.AttentionModel(**config.model)


def init_params(config, model, key):
  """Fresh parameters of `model` (`classifier.model.init_params`)."""
  del config
  return model_lib.init_params(model, key)


def make_loss_fn(config, model):
  """``loss_fn(params, batch, key, baseline_value, hyper)``: the classifier's loss for `config`
  (`classifier.loss.make_loss_fn`)."""
  return loss_lib.make_loss_fn(objectives.ObjectiveConfig.from_config(config), model,
                               num_glimpses=config.num_glimpses)


def baseline_init(config) -> float:
  """VAR's moving-average baseline starts at log(1/C), the reward of a uniform classifier."""
  return -float(np.log(config.model.num_classes))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.


def make_eval_batch(config, model) -> Callable[..., dict]:
  """`(params, canvases uint8 [E, H, W, 1], labels [E], boxes [E, 4], mask [E], key, hyper) -> sums` for the
  evaluator (jitted; see `make_task_evaluator` for what is summed; ``hyper``, ``{}`` or a run's own numbers in a
  sweep, may set the model's ``loc_std``)."""
  m_, n_ = config.num_samples, config.num_glimpses
  roll = functools.partial(loss_lib.batched_rollout, proposal=proposals.prior, num_glimpses=n_)
  on_box = jax.vmap(jax.vmap(functools.partial(glimpse_lib.window_on_box, size=model.glimpse_size,
                                               num_scales=model.num_scales,
                                               canvas_hw=(config.data.canvas_size,) * 2),
                             in_axes=(0, 0, None)))  # over E, then over the N glimpses

  @functools.partial(jax.jit, compiler_options=step_lib.compiler_options())
  def eval_batch(params, canvases, labels, boxes, mask, key, hyper):
    canvases = canvas_lib.to_float(canvases)
    net = attention.model_for_run(model, hyper)
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


def make_task_evaluator(config, model, data: Data) -> Callable[..., dict]:
  """``evaluate(params, hyper)`` on the fixed test canvases in batches of `config.data.eval_batch_size` (the last
  one padded); ``hyper`` is the run's own numbers (``{}`` for a single run; one compiled function for all runs).

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
  """
  eval_batch = trainer.cached("classifier/eval_batch", config, lambda: make_eval_batch(config, model))
  canvases, labels, boxes = data.test_canvases, data.test_labels, data.test_boxes
  e = config.data.eval_batch_size
  n = canvases.shape[0]
  key = jax.random.PRNGKey(config.data.test_seed + 1)

  def evaluate(params, hyper):
    totals = {}
    for start in range(0, n, e):
      index = np.minimum(np.arange(start, start + e), n - 1)
      mask = (np.arange(start, start + e) < n).astype(np.float32)
      out = eval_batch(params, canvases[index], labels[index], boxes[index], mask, jax.random.fold_in(key, start),
                       hyper)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + v
    return {f"eval/{k}": float(v) / n for k, v in totals.items()}

  return evaluate


# ---------------------------------------------------------------------------------------------------------------
# The classifier's entry points: the core's, with `TASK` (defined at the end of the module).


def validate_config(config) -> None:
  """Raises `errors.ConfigError` (one sentence) for any invalid value, before anything is compiled
  (`training.trainer.validate_config`)."""
  trainer.validate_config(TASK, config)


def baseline_transform(config) -> baselines.BaselineTransform:
  """VAR's moving-average baseline, starting at log(1/C), or none (`training.trainer.baseline_transform`)."""
  return trainer.baseline_transform(TASK, config)


def create_train_state(config, model, optimizer) -> state_lib.TrainState:
  """Fresh parameters and optimiser state (replicated over the mesh when `config.mesh_devices` > 1); for
  ``config.num_runs`` = R > 1, the R runs' states stacked on a leading run axis (`training.runs`)."""
  return trainer.create_train_state(TASK, config, model, optimizer)


def make_loss_and_grads(config, model) -> step_lib.LossAndGrads:
  """`(params, extra, key, images, labels, hyper={}) -> ((loss, metrics), grads)` for the step with PRNG key
  `key` (not jitted): draws the batch, shards it over the mesh's ``data`` axis when `config.mesh_devices` > 1, and
  differentiates the loss (`training.trainer.make_loss_and_grads`)."""
  return trainer.make_loss_and_grads(TASK, config, model)


def make_train_step(config, model, optimizer) -> Callable[..., tuple[state_lib.TrainState, dict]]:
  """`step(state, images, labels) -> (state, metrics)`, jitted; images uint8 [N, 28, 28], labels [N]
  (`training.trainer.make_train_step`: one run or ``config.num_runs`` runs, on ``config.mesh_devices``)."""
  return trainer.make_train_step(TASK, config, model, optimizer)


def make_evaluator(config, model, test_canvases, test_labels, test_boxes) -> Callable[..., dict]:
  """``evaluate(state)`` on the given test canvases (uint8 [E, H, W, 1]), labels [E] and boxes [E, 4]: the
  metrics of `make_task_evaluator` with the single run's numbers."""
  evaluate = make_task_evaluator(config, model, Data(None, None, test_canvases, test_labels, test_boxes))
  return lambda state: evaluate(state.params, {})


def diagnostic_batch(config, images, labels, seed: int) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """``((canvases, labels), key)``: the fixed minibatch of B canvases that the diagnostics of seed `seed` measure,
  and the key of their estimates (`training.trainer.diagnostic_batch`)."""
  return trainer.diagnostic_batch(TASK, config, None, seed, train=(images, labels))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run) and returns the last value of every metric."""
  return trainer.train_and_evaluate(TASK, config, workdir)


def restore_state(config, workdir: str) -> state_lib.TrainState:
  """The newest readable checkpoint of the run in `workdir` (raises CheckpointError if there is none)."""
  return trainer.restore_latest(TASK, config, workdir)[1]


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
  """One line with the numbers a run ends on (one per run, labelled, for several runs; `run_summary`)."""
  return trainer.summary(TASK, last)


def run_summary(last: dict[str, Any]) -> str:
  """One run's line: test errors, where the later glimpses go, log-likelihood bound, ESS (the diagnostics', else
  the last logged training batches'), gradient variance."""
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


TASK = task_lib.Task(
    name="classifier", validate=validate, load_data=load_data, train_arrays=train_arrays,
    make_sampler=make_sampler, build_model=build_model, init_params=init_params, make_loss=make_loss_fn,
    make_evaluator=make_task_evaluator, summary=run_summary, baseline_init=baseline_init,
    progress_keys=("train/loss", "train/error", "train/ess"))
