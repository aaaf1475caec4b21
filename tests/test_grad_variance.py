"""experiments.grad_variance: VAR's baselines compared at a trained run's parameters."""
import pytest

from experiments import grad_variance
from wsram_jax import errors
from wsram_jax.classifier import train


def test_baselines_are_compared_at_each_runs_checkpoint(tiny_config, tmp_path):
  config = tiny_config("var_cv", num_runs=2)  # baseline nvil, seeds 0 and 1 as one program
  train.train_and_evaluate(config, str(tmp_path))
  results = grad_variance.measure(str(tmp_path), ["nvil", "none"], batches=2, estimates=3, log=lambda s: None)
  assert results["trained_baseline"] == "nvil"
  assert [(r["seed"], r["step"]) for r in results["runs"]] == [(0, 6), (1, 6)]
  for row in results["runs"]:
    assert row["nvil"]["theta"] > 0 and row["none"]["theta"] > 0 and row["nvil"]["theta"] != row["none"]["theta"]
    assert row["nvil"]["baseline"] > 0 and row["none"]["baseline"] == 0  # no baseline: its head gets no gradient
  assert "| none / nvil |" in grad_variance.markdown(results)


def test_a_run_of_another_method_is_refused(tiny_config, tmp_path):
  config = tiny_config("wsram_q_cv", num_steps=1, eval_every=1, checkpoint_every=1, diag_every=0)
  train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(errors.ConfigError, match="method var"):
    grad_variance.measure(str(tmp_path), ["none"], batches=1, estimates=2)
