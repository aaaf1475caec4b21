"""The enumerable toy attention model (`wsram_jax.toy`) as a task of the training core: a third task in one module.

    trainer.train_and_evaluate(toy_task.TASK, config, workdir)

Everything `training.task.Task` asks for, and nothing else: the core adds sweeps (``config.num_runs``), resume,
signals, the NaN guard, metrics, checkpoints and the gradient-variance diagnostics. The config holds the
objective's keys (``method``, ``proposal``, ``num_samples``, ... as `objectives.ObjectiveConfig` reads them),
the core's (batch size, optimiser, schedule, ``seed``, ``mesh_devices``, ``num_runs``, ``runs``) and two blocks:
``model`` (`toy.ToyConfig`'s ``num_locations`` K, ``num_classes`` C, ``num_features`` D) and ``data``
(``num_train``, ``num_test``, ``seed``).

Data: ``images [N, K, D]`` (`toy.make_image`: the object's cell points at its class) and ``labels [N]``, random
classes. The loss draws M glimpse sequences per image from the proposal (the prior, or q(.|y) for
``proposal='inference_network'``) and hands their log-probabilities ``[B, M]`` to `objectives.method_loss`
(Eqns 5, 8, 14, 16-19, VIMCO). Parameters: ``{'theta': the prior and classifier tables, 'inference': eta}``
(`attention.param_labels` then tells theta from eta).

Evaluation is exact, by enumerating the K^2 sequences: ``eval/log_p_y`` the mean log p(y|I) (Eqn 1),
``eval/kl_q`` the mean KL(p(a|y,I) || q(a|y,I)) (Eqn 12), ``eval/error`` the error of argmax_y p(y|I).
The exploration heuristics and the sleep phase need a rollout's trajectory and are not offered; nor is a
learned baseline (the toy has no baseline head).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax import attention
from wsram_jax import estimators
from wsram_jax import objectives
from wsram_jax import toy
from wsram_jax.training import config as config_lib
from wsram_jax.training import task as task_lib
from wsram_jax.training import trainer

__all__ = ["Data", "TASK"]

require, require_int = config_lib.require, config_lib.require_int

# The swept numbers the toy reads (`training.runs.SWEEPABLE`); the others need a rollout it does not have.
SWEEPABLE = ("seed", "learning_rate")


class Data(NamedTuple):
  """``images [N, K, D]`` float32 and ``labels [N]`` int32 to train on; ``test_images``, ``test_labels`` likewise."""
  images: np.ndarray
  labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def validate(config) -> None:
  """The toy's own checks (`Task.validate`)."""
  m, d = config.model, config.data
  for name in ("num_locations", "num_classes", "num_features"):
    require_int(f"model.{name}", m[name], 2)
  require(m.num_features >= m.num_classes, "--config.model.num_features must be >= num_classes (feature c points "
                                           "at class c).")
  require_int("data.num_train", d.num_train)
  require_int("data.num_test", d.num_test)
  cfg = objectives.ObjectiveConfig.from_config(config)
  require(cfg.proposal in ("prior", "inference_network"),
          f"The toy's proposal is the prior or the inference network, got {cfg.proposal!r}.")
  require(cfg.baseline in ("none", "moving", "loo"),
          f"The toy has no baseline head: --config.baseline must be none, moving or loo, got {cfg.baseline!r}.")
  require(cfg.sleep_weight == 0 and cfg.temperature == 1 and cfg.coverage_weight == 0 and cfg.entropy_weight == 0,
          "The sleep phase and the exploration heuristics need a rollout; the toy has none (set them off).")
  swept = [name for name in config.runs if config.runs[name] and name not in SWEEPABLE]
  require(not swept, f"The toy sweeps only {', '.join(SWEEPABLE)}; --config.runs sets {', '.join(swept)}.")


def load_data(config) -> Data:
  """Random classes, and images with the object in a random cell (`toy.make_image`), from ``data.seed``."""
  model = build_model(config)

  def draw(key, n):
    k_label, k_image = jax.random.split(key)
    labels = jax.random.randint(k_label, (n,), 0, model.num_classes)
    images = jax.vmap(lambda k, y: toy.make_image(k, model, y))(jax.random.split(k_image, n), labels)
    return np.asarray(images, np.float32), np.asarray(labels, np.int32)

  k_train, k_test = jax.random.split(jax.random.PRNGKey(config.data.seed))
  return Data(*draw(k_train, config.data.num_train), *draw(k_test, config.data.num_test))


def build_model(config, data=None) -> toy.ToyConfig:
  del data
  m = config.model
  return toy.ToyConfig(num_locations=int(m.num_locations), num_classes=int(m.num_classes),
                       num_features=int(m.num_features))


def init_params(config, model: toy.ToyConfig, key: jax.Array) -> dict[str, Any]:
  del config
  theta, eta = toy.init_params(key, model)
  return {"theta": theta, attention.INFERENCE_KEY: eta}


def make_sampler(config, data=None):
  """``sample(key, images, labels) -> (images [B, K, D], labels [B])``, B examples drawn with replacement."""
  del data
  batch_size = config.batch_size

  def sample(key, images, labels):
    index = jax.random.randint(key, (batch_size,), 0, images.shape[0])
    return images[index], labels[index]

  return sample


def make_loss(config, model: toy.ToyConfig):
  """``loss_fn(params, batch, key, baseline_value, hyper)``: M sequences per image from the proposal, their
  ``log_p_a``, ``log_p_y``, ``log_q_a`` ``[B, M]`` (`toy.sample_log_probs`) into `objectives.method_loss`."""
  cfg = objectives.ObjectiveConfig.from_config(config)
  proposal = "prior" if cfg.proposal == "prior" else "q"
  sg = jax.lax.stop_gradient

  def loss_fn(params, batch, key, baseline_value=0.0, hyper=None):
    images, labels = batch
    theta, eta = params["theta"], params[attention.INFERENCE_KEY]
    draw = lambda k, image, y: toy.sample_log_probs(k, theta, eta, image, y, model, cfg.num_samples, proposal)[1]
    log_p_a, log_p_y, log_q_a = jax.vmap(draw)(jax.random.split(key, labels.shape[0]), images, labels)
    loss, metrics = objectives.method_loss(cfg, log_p_a, log_p_y, log_q_a, baseline_value=baseline_value,
                                           hyper=hyper)
    log_w = estimators.log_importance_weights(sg(log_p_a), sg(log_p_y), sg(log_q_a))
    metrics.update(loss=loss, reward=jnp.mean(sg(log_p_y)), ess=jnp.mean(estimators.effective_sample_size(log_w)),
                   bound=jnp.mean(estimators.log_marginal_bound(log_w)))
    return loss, metrics

  return loss_fn


def make_evaluator(config, model: toy.ToyConfig, data: Data):
  """``evaluate(params, hyper)``: the exact test metrics of the module docstring."""

  def build():
    classes = jnp.arange(model.num_classes)

    @jax.jit
    def exact(params, images, labels):
      theta, eta = params["theta"], params[attention.INFERENCE_KEY]
      log_p = jax.vmap(lambda im: jax.vmap(lambda y: toy.log_marginal(theta, im, y, model))(classes))(images)
      kl = jax.vmap(lambda im, y: toy.kl_posterior_to_proposal(theta, eta, im, y, model))(images, labels)
      return {"log_p_y": jnp.mean(jnp.take_along_axis(log_p, labels[:, None], 1)), "kl_q": jnp.mean(kl),
              "error": jnp.mean((jnp.argmax(log_p, -1) != labels).astype(jnp.float32))}

    return exact

  exact = trainer.cached("toy/evaluate", config, build)
  return lambda params, hyper: {f"eval/{k}": float(v) for k, v in
                                exact(params, data.test_images, data.test_labels).items()}


def summary(last: dict) -> str:
  """One run's line: the exact test log-likelihood, q's KL to the posterior, the error."""
  parts = [f"{name} {fmt.format(last[key])}" for name, key, fmt in (
      ("exact test log p(y|I)", "eval/log_p_y", "{:.4f}"), ("KL(posterior || q)", "eval/kl_q", "{:.4f}"),
      ("test error", "eval/error", "{:.1%}")) if key in last]
  return "; ".join(parts)


TASK = task_lib.Task(
    name="toy", validate=validate, load_data=load_data, train_arrays=lambda data: (data.images, data.labels),
    make_sampler=make_sampler, build_model=build_model, init_params=init_params, make_loss=make_loss,
    make_evaluator=make_evaluator, summary=summary,
    baseline_init=lambda config: -float(np.log(config.model.num_classes)),
    progress_keys=("train/loss", "train/ess", "train/bound"))
