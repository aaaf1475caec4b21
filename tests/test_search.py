"""The defaults search and the budget experiment: run names, the test of a good default, the pooled seeds, the
central comparisons and the power-law fit, on runs whose metrics are written by hand."""
import os

import numpy as np
import pytest

from experiments import budget
from experiments import search
from experiments.configs import mnist
from wsram_jax import errors
from wsram_jax.training import config as config_lib
from wsram_jax.training import metric_writers


def _run(run_dir, error, *, step=50000, on_digit=0.9, usage=(0.2, 0.4, 0.4), bound=-2.4, extra_steps=()):
  """A finished run's metrics: the bound along training, and an evaluation at `step` (and at `extra_steps`)."""
  writer = metric_writers.MetricWriter(str(run_dir), tensorboard=False)
  for s in (500, 2000, step):
    writer.write_scalars(s, {"train/bound": bound if s > 1000 else -40.0})
  for s, e in [*extra_steps, (step, error)]:
    writer.write_scalars(s, {"eval/error_sampled": e, "eval/error_greedy": e + 0.01, "eval/on_digit/later": on_digit,
                             **{f"eval/scale_usage/s{k}": u for k, u in enumerate(usage)}})
  writer.close()


def test_candidates_scale_with_the_budget_and_name_their_workdirs():
  runs = search.planned_runs(["wsram_q_cv"], ["decay", "warm_decay"], [1, 2], 50000)
  args = runs["wsram_q_cv.decay.s1-2"]
  assert "--config.decay.begin=20000" in args and "--config.decay.steps=30000" in args
  assert "--config.num_runs=2" in args and "--config.runs.seed=1,2" in args
  warm = runs["wsram_q_cv.warm_decay.s1-2"]
  assert "--config.warmup.hold_steps=2000" in warm and "--config.decay.begin=4000" in warm
  assert "--config.decay.begin=40000" in search.planned_runs(["var_cv"], ["decay"], [1], 100000)["var_cv.decay.s1"]
  with pytest.raises(errors.ConfigError, match="no candidate named"):
    search.planned_runs(["var_cv"], ["nope"], [1], 100)


def test_a_candidate_means_the_same_whatever_the_variants_default():
  # wsram_q_cv's default is the warm-decay schedule; its constant candidate still sets the constant 3e-4 in full.
  constant = search.planned_runs(["wsram_q_cv"], ["constant"], [1], 50000)["wsram_q_cv.constant.s1"]
  for flag in ("--config.learning_rate=0.0003", "--config.warmup.start=1.0", "--config.decay.end=1.0"):
    assert flag in constant
  config = config_lib.apply_overrides(mnist.get_config("wsram_q_cv"), search.CANDIDATES["constant"](50000))
  assert config.learning_rate == 3e-4 and config.warmup.start == 1.0 and config.decay.end == 1.0


@pytest.mark.parametrize("variant, schedule", [("wsram_q_cv", "warm_decay"), ("var_cv", "constant")])
def test_the_default_schedule_is_fractions_of_the_budget(variant, schedule):
  config = mnist.get_config(variant)
  for steps in (50000, 200000, 7):  # as --config.num_steps=STEPS sets it, after get_config
    config_lib.set_value(config, "num_steps", steps)
    got = {k: config_lib.get_value(config, k) for k in mnist.schedule_values(schedule, steps)}
    assert got == mnist.schedule_values(schedule, steps)
  assert mnist.schedule_values("warm_decay", 50000) == {
      "learning_rate": 1e-3, "warmup.start": 0.3, "warmup.hold_steps": 2000, "warmup.ramp_steps": 2000,
      "decay.begin": 4000, "decay.steps": 46000, "decay.end": 0.0}


def test_run_verdict_applies_each_test_of_a_good_default(tmp_path):
  _run(tmp_path / "good", 0.025)
  v = search.run_verdict(str(tmp_path / "good"), 50000)
  assert v["passes"] and v["lowest_bound"] == -2.4  # the bound before update 1,000 does not count
  _run(tmp_path / "bad", 0.04, on_digit=0.5, usage=(0.95, 0.05, 0.0), bound=-30.0)
  v = search.run_verdict(str(tmp_path / "bad"), 50000)
  assert not any(v["tests"].values()) and not v["passes"]
  _run(tmp_path / "short", 0.02, step=1000)
  assert not search.run_verdict(str(tmp_path / "short"), 50000)["finished"]


def test_seeds_of_a_pair_pool_across_workdirs_and_the_comparisons_use_each_variants_best(tmp_path):
  root = str(tmp_path)
  errs = {("wsram_q_cv", "constant"): [0.045, 0.046, 0.042, 0.041],
          ("wsram_q_cv", "decay"): [0.03, 0.031, 0.029, 0.028],
          ("var_cv", "constant"): [0.05, 0.04, 0.05, 0.045], ("var_cv", "decay"): [0.06, 0.06, 0.07, 0.06]}
  for (v, c), values in errs.items():
    for i, e in enumerate(values):
      _run(os.path.join(root, search.workdir_name(v, c, [1, 2, 3, 4]), f"run_{i}"), e)
  for i, e in enumerate([0.027, 0.03]):  # two more seeds of the best WS-RAM+q+c, a workdir of their own
    _run(os.path.join(root, search.workdir_name("wsram_q_cv", "decay", [5, 6]), f"run_{i}"), e)
  results = search.evaluate(root, ["wsram_q_cv", "var_cv"], ["constant", "decay"], 50000)
  assert results["wsram_q_cv"]["decay"]["seeds"] == [1, 2, 3, 4, 5, 6]
  assert np.isclose(results["wsram_q_cv"]["decay"]["p_below_baseline"], 1 / 210)  # C(10, 4)
  chosen, equal = search.choose(results, [1, 2, 3, 4])
  assert chosen == {"wsram_q_cv": "decay", "var_cv": "constant"} and equal == ["constant", "decay"]
  rows = search.central(results, [1, 2, 3, 4])
  assert rows[0]["settings"] == ["decay", "constant"] and rows[0]["holds"] and rows[0]["runs"] == [6, 4]
  assert "held_out" not in rows[0]  # VAR+c has no seed outside the search's
  assert "means" not in rows[1]  # WS-RAM+c has no runs here
  text = search.markdown(results, chosen, rows, 50000, [1, 2, 3, 4], "cmd")
  assert "| wsram_q_cv | **decay** |" in text and "not enough finished runs" in text
  for i, e in enumerate([0.05, 0.052]):  # two held-out seeds of VAR+c's best
    _run(os.path.join(root, search.workdir_name("var_cv", "constant", [5, 6]), f"run_{i}"), e)
  rows = search.central(search.evaluate(root, ["wsram_q_cv", "var_cv"], ["constant", "decay"], 50000), [1, 2, 3, 4])
  held = rows[0]["held_out"]
  assert held["runs"] == [2, 2] and held["holds"] and np.isclose(held["p_value"], 1 / 6)  # C(4, 2)
  assert rows[0]["runs"] == [6, 6]


def test_the_best_candidate_is_chosen_only_among_settings_every_method_was_tried_with(tmp_path):
  root = str(tmp_path)
  errs = {("wsram_q_cv", "constant"): [0.045] * 4, ("wsram_q_cv", "decay"): [0.04] * 4,
          ("var_cv", "constant"): [0.05] * 4, ("var_cv", "decay"): [0.048] * 4,
          ("var_cv", "coverage_scales"): [0.03] * 4,  # tried on VAR+c only: outside the equal search
          ("wsram_q_cv", "coverage_scales"): [0.02, 0.02]}  # two seeds of four: not finished on the search seeds
  for (v, c), values in errs.items():
    for i, e in enumerate(values):
      _run(os.path.join(root, search.workdir_name(v, c, [1, 2, 3, 4]), f"run_{i}"), e)
  results = search.evaluate(root, ["wsram_q_cv", "var_cv"], list(search.CANDIDATES), 50000)
  chosen, equal = search.choose(results, [1, 2, 3, 4])
  assert equal == ["constant", "decay"] and chosen == {"wsram_q_cv": "decay", "var_cv": "decay"}
  assert search.choose(results, [1, 2, 3, 4], ["var_cv"])[0] == {"var_cv": "coverage_scales"}  # its own best
  rows = search.central(results, [1, 2, 3, 4])
  assert rows[0]["equal_search"] == ["constant", "decay"] and rows[0]["settings"] == ["decay", "decay"]
  text = search.markdown(results, {"wsram_q_cv": "decay", "var_cv": "coverage_scales"}, rows, 50000, [1, 2, 3, 4],
                         "cmd")
  assert "| var_cv | **coverage_scales** |" in text and "| constant, decay | decay vs decay |" in text
  assert os.path.getsize(search.figure(results, chosen, str(tmp_path / "search.png"))) > 0


def test_budget_reads_a_constant_rate_run_at_every_budget_and_fits_the_power_law(tmp_path):
  root = str(tmp_path)
  assert budget.budget_free("constant", [100, 200]) and not budget.budget_free("decay", [100, 200])
  planned = budget.planned_runs("wsram_q_cv", "constant", [100, 200, 400], [1, 2], ())
  assert list(planned) == ["wsram_q_cv.constant.b400.s1-2"]  # one run to the largest budget serves all three
  assert "--config.eval_every=40" in planned["wsram_q_cv.constant.b400.s1-2"][1]
  assert set(budget.planned_runs("wsram_q_cv", "decay", [100, 200], [1], ())) == {
      "wsram_q_cv.decay.b100.s1", "wsram_q_cv.decay.b200.s1"}
  law = lambda b: 2.0 * b ** -0.5  # error = 2 / sqrt(updates)
  for i in range(2):
    _run(os.path.join(root, "wsram_q_cv.constant.b400.s1-2", f"run_{i}"), law(400), step=400,
         extra_steps=[(100, law(100)), (200, law(200))])
  pts = budget.points(root, "wsram_q_cv", "constant", [100, 200, 400])
  assert [(p["budget"], p["seed"]) for p in pts] == [(100, 1), (100, 2), (200, 1), (200, 2), (400, 1), (400, 2)]
  trend = budget.fit(pts, 0.01)
  assert np.isclose(trend["slope"], -0.5) and np.isclose(trend["budget_at_target"], 40000)
  assert budget.fit(pts[:2], 0.01) is None  # one budget: no trend
  path = budget.figure(pts, trend, "WS-RAM+q+c", str(tmp_path / "budget.png"), [p["run"] for p in pts])
  assert os.path.getsize(path) > 0


def test_budget_does_not_train_again_a_budget_the_search_finished_and_counts_its_runs(tmp_path):
  search_root, root = str(tmp_path / "search"), str(tmp_path / "budget")
  for i, e in enumerate([0.033, 0.034]):
    _run(os.path.join(search_root, search.workdir_name("wsram_q_cv", "warm_decay", [1, 2]), f"run_{i}"), e)
  planned = budget.planned_runs("wsram_q_cv", "warm_decay", [25000, 50000], [1, 2], (), search_root)
  assert list(planned) == ["wsram_q_cv.warm_decay.b25000.s1-2"]
  assert len(budget.planned_runs("wsram_q_cv", "warm_decay", [25000, 50000], [1, 2, 3], (), search_root)) == 2
  pts = budget.points(root, "wsram_q_cv", "warm_decay", [25000, 50000], search_root)
  assert [(p["budget"], p["seed"], p["error"]) for p in pts] == [(50000, 1, 0.033), (50000, 2, 0.034)]
