"""The train step of `experiments/configs/mnist.py:wsram_q_cv` computes what it computed before the restructuring.

`pinned_wsram_q_cv_step.json` holds the loss, every metric and, per parameter array, the sum and the absolute sum
of the gradient, as the code at commit 86db9bb (before the training core, the classifier and the captioner were
separated) computed them for the config's fresh parameters (seed 0), 256 synthetic digits and key 7, with the
variant's settings of that time (no exploration heuristics; the learning rate does not enter the step). A change
that alters what the step computes, rather than how the code is arranged, fails here; a deliberate change of the
model or the estimators updates the file, and says so in its commit.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from conftest import synthetic_digits
from experiments.configs import mnist
from wsram_jax.classifier import train
from wsram_jax.training import step as step_lib

PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pinned_wsram_q_cv_step.json")


def _path_name(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def test_wsram_q_cv_loss_metrics_and_gradients_are_pinned():
  with open(PINNED, encoding="utf-8") as f:
    pinned = json.load(f)
  config = mnist.get_config("wsram_q_cv")
  config.heuristics.update(mnist.HEURISTICS_OFF)  # the settings the pin was made with (defaults since changed)
  images, labels = synthetic_digits(256, seed=3)
  model = train.build_model(config)
  state = train.create_train_state(config, model, step_lib.make_optimizer(config))
  loss_and_grads = jax.jit(train.make_loss_and_grads(config, model))
  (loss, metrics), grads = loss_and_grads(state.params, state.extra, jax.random.PRNGKey(7), jnp.asarray(images),
                                          jnp.asarray(labels))
  np.testing.assert_allclose(float(loss), pinned["loss"], rtol=1e-5)
  assert set(pinned["metrics"]) <= set(metrics)  # diagnostics may be added; these must not change
  for name, value in pinned["metrics"].items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-7, err_msg=name)
  flat = {_path_name(path): g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert set(flat) == set(pinned["grads"])
  for name, g in flat.items():
    want = pinned["grads"][name]
    np.testing.assert_allclose(float(jnp.sum(jnp.abs(g))), want["abs_sum"], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(float(jnp.sum(g)), want["sum"], atol=1e-4 * want["abs_sum"] + 1e-9, err_msg=name)
