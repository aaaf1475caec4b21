"""A third task in one module (`wsram_jax.toy_task`, the enumerable toy) trains through the core as it is: the loop,
its exact evaluation, checkpoints and resume, and a sweep of two runs, each equal to its single-run twin."""
import jax
import ml_collections
import numpy as np
import pytest

from conftest import apply_overrides
from experiments.configs import mnist as mnist_configs
from wsram_jax import errors
from wsram_jax import toy_task
from wsram_jax.training import metric_writers
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import step as step_lib
from wsram_jax.training import trainer

TASK = toy_task.TASK


def toy_config(variant="wsram_q_cv", **overrides) -> ml_collections.ConfigDict:
  """The objective's keys of a Table 1 variant, the core's, and the toy's model and data blocks."""
  c = mnist_configs.method_config(variant)
  c.heuristics = ml_collections.ConfigDict(mnist_configs.HEURISTICS_OFF)
  c.num_samples = 3
  c.model = ml_collections.ConfigDict({"num_locations": 3, "num_classes": 3, "num_features": 3})
  c.data = ml_collections.ConfigDict({"num_train": 256, "num_test": 64, "seed": 0})
  c.update(batch_size=16, learning_rate=0.05, grad_clip_norm=0.0, num_steps=120, log_every=20, eval_every=120,
           checkpoint_every=60, keep_checkpoints=2, diag_every=120, diag_num_estimates=4, jit=True, mesh_devices=1,
           num_runs=1, runs=mnist_configs.runs_config())
  return apply_overrides(c, {k.replace("__", "."): v for k, v in overrides.items()})


def test_the_toy_trains_through_the_core_and_resumes(tmp_path):
  config = toy_config(num_steps=60)
  data = TASK.load_data(config)
  model = TASK.build_model(config, data)
  fresh = trainer.create_train_state(TASK, config, model, step_lib.make_optimizer(config))
  before = TASK.make_evaluator(config, model, data)(fresh.params, {})
  trainer.train_and_evaluate(TASK, config, str(tmp_path))
  config.num_steps = 120  # a longer schedule resumes from the step-60 checkpoint
  last = trainer.train_and_evaluate(TASK, config, str(tmp_path))
  for key in ("train/loss", "train/ess", "train/bound", "train/loss_q", "eval/log_p_y", "eval/kl_q", "eval/error",
              "diag/grad_var/theta", "diag/grad_var/eta"):
    assert key in last, key
  steps, _ = metric_writers.series(metric_writers.read_metrics(str(tmp_path)), "train/loss")
  np.testing.assert_array_equal(steps, [20, 40, 60, 80, 100, 120])
  # Exact numbers: the model learnt (log p(y|I) up) and q moved towards the posterior (KL down).
  assert last["eval/log_p_y"] > before["eval/log_p_y"] + 0.05, (before, last)
  assert last["eval/kl_q"] < before["eval/kl_q"], (before, last)
  assert "exact test log p(y|I)" in TASK.summary(last)
  _, state, step = trainer.restore_latest(TASK, config, str(tmp_path))
  assert step == 120 and int(state.step) == 120


def test_a_sweep_of_the_toy_equals_its_single_run_twins(tmp_path):
  config = toy_config(num_steps=6, num_runs=2, runs__seed=(3, 4), runs__learning_rate=(0.05, 0.1))
  trainer.validate_config(TASK, config)
  runs = runs_lib.from_config(config)
  data = TASK.load_data(config)
  train = (data.images, data.labels)

  def train_steps(cfg):
    model = TASK.build_model(cfg, data)
    optimizer = step_lib.make_optimizer(cfg)
    state = trainer.create_train_state(TASK, cfg, model, optimizer)
    step = trainer.make_train_step(TASK, cfg, model, optimizer, data)
    for _ in range(cfg.num_steps):
      state, metrics = step(state, *train)
    return state, metrics

  state, metrics = train_steps(config)
  assert metrics["train/loss"].shape == (2,)
  for r in range(2):
    alone, alone_metrics = train_steps(runs.config_for(config, r))
    np.testing.assert_allclose(metrics["train/loss"][r], alone_metrics["train/loss"], rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v) + 1e-8: a gradient component near zero moves by up to a step on float noise alone.
    for a, b in zip(jax.tree_util.tree_leaves(runs_lib.unstack(state, r).params),
                    jax.tree_util.tree_leaves(alone.params)):
      assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= runs.values["learning_rate"][r]
  result = trainer.train_and_evaluate(TASK, config, str(tmp_path))
  assert len(result["runs"]) == 2 and "eval/log_p_y" in result["runs"][1]
  assert len(trainer.summary(TASK, result).splitlines()) == 2


@pytest.mark.parametrize("overrides, match", [
    ({"proposal": "defensive_mixture"}, "prior or the inference network"),
    ({"heuristics.entropy_weight": 0.1}, "need a rollout"),
    ({"num_runs": 2, "runs.loc_std": (0.1, 0.2)}, "sweeps only seed, learning_rate"),
    ({"model.num_features": 2}, "num_features must be >= num_classes"),
])
def test_the_toys_bad_settings_are_one_clear_error(overrides, match):
  with pytest.raises(errors.ConfigError, match=match):
    trainer.validate_config(TASK, toy_config(**{k.replace(".", "__"): v for k, v in overrides.items()}))
