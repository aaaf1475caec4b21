"""The sweep report: Table 1 beside the paper's, Figures 2 and 3, from the runs' metrics files."""
import json
import warnings

import numpy as np
import pytest

from experiments import report
from experiments import table1
from wsram_jax import errors
from wsram_jax.training import metric_writers


def _fake_run(workdir, final_error, steps=(100, 200)):
  writer = metric_writers.MetricWriter(str(workdir), tensorboard=False)
  for s in steps:
    writer.write_scalars(s, {"train/error": 0.5, "train/ess": 3.0, "train/scale_usage_0": 0.2,
                             "train/scale_usage_1": 0.3, "train/scale_usage_2": 0.5})
    writer.write_scalars(s, {"diag/grad_var/theta": 1e-4})
  writer.write_scalars(steps[-1], {"eval/error_sampled": final_error, "eval/error_greedy": final_error + 0.01})
  # The greedy glimpses' scales at the end: glimpse 1 at scale 2, glimpse 2 split between scales 1 and 2.
  writer.write_scalars(steps[-1], {"eval/scale_usage/g1_s0": 0.0, "eval/scale_usage/g1_s1": 0.0,
                                   "eval/scale_usage/g1_s2": 1.0, "eval/scale_usage/g2_s0": 0.0,
                                   "eval/scale_usage/g2_s1": final_error, "eval/scale_usage/g2_s2": 1 - final_error})
  writer.close()


def test_summarize_means_over_seeds(tmp_path):
  _fake_run(tmp_path / "a", 0.10)
  _fake_run(tmp_path / "b", 0.20)
  s = report.summarize({"var": [str(tmp_path / "a"), str(tmp_path / "b")]})["var"]
  assert np.isclose(s["mean"], 0.15) and np.isclose(s["std"], np.std([0.1, 0.2], ddof=1))
  assert s["runs"] == 2 and s["steps"] == [200, 200]
  _fake_run(tmp_path / "c", 0.5, steps=(100,))  # An unfinished run does not count.
  s = report.summarize({"var": [str(tmp_path / w) for w in "abc"]}, min_step=200)["var"]
  assert s["runs"] == 2 and np.isclose(s["mean"], 0.15)


def test_permutation_p_value_is_exact():
  # Four seeds each, every value of the first below every value of the second: only the observed split of the
  # C(8, 4) = 70 is that extreme.
  assert np.isclose(report.permutation_p_value([1, 2, 3, 4], [5, 6, 7, 8]), 1 / 70)
  # The reverse order: every split is at most the observed (largest) difference.
  assert report.permutation_p_value([5, 6, 7, 8], [1, 2, 3, 4]) == 1.0
  # Groups of 2 and 1 by hand: the splits {0, 1 | 3}, {0, 3 | 1}, {1, 3 | 0} differ by -2.5, 0.5 and 2.0 in
  # mean, and the observed split is the lowest.
  assert np.isclose(report.permutation_p_value([0, 1], [3]), 1 / 3)


def test_orderings_test_the_papers_claims_on_finished_runs():
  summaries = {"var_cv": {"mean": 0.02, "values": [0.01, 0.02, 0.02, 0.03], "runs": 4},
               "var": {"mean": 0.06, "values": [0.05, 0.06, 0.06, 0.07], "runs": 4},
               "wsram_q_cv": {"mean": 0.05, "values": [0.05], "runs": 1}}
  rows = {(r["lower"], r["higher"]): r for r in report.orderings(summaries)}
  assert rows[("var_cv", "var")]["holds"] and np.isclose(rows[("var_cv", "var")]["p_value"], 1 / 70)
  assert "p_value" not in rows[("wsram_q_cv", "var_cv")]  # one finished run: not tested
  text = report.orderings_markdown(list(rows.values()))
  assert "| control variates help VAR | VAR+c < VAR | 1.81 < 3.11% | 2.00 vs 6.00% (n=4, 4) | yes | 0.014 |" in text
  assert "not enough finished runs" in text


def test_curve_orderings_test_the_figure2_claims_on_each_runs_average_from_a_step(tmp_path):
  def run(name, grad_var_late, grad_var_early=1.0):
    writer = metric_writers.MetricWriter(str(tmp_path / name), tensorboard=False)
    writer.write_scalars(100, {"diag/grad_var/theta": grad_var_early})  # before from_step: left out
    for step, value in ((200, grad_var_late), (300, 3 * grad_var_late)):  # run average: 2 * grad_var_late
      writer.write_scalars(step, {"diag/grad_var/theta": value})
    writer.close()
    return str(tmp_path / name)

  groups = {"wsram_cv": [run(f"c{i}", 1e-5 * (i + 1)) for i in range(4)],
            "wsram": [run(f"n{i}", 1e-3 * (i + 1), grad_var_early=0.0) for i in range(4)],
            "wsram_q": [run("q0", 1e-3)]}
  assert np.isclose(report.run_average(groups["wsram"][0], "diag/grad_var/theta", 200), 2e-3)
  assert report.run_average(groups["wsram"][0], "train/ess", 200) is None
  rows = {(r["lower"], r["higher"], r["metric"]): r for r in report.curve_orderings(groups, from_step=200)}
  row = rows[("wsram_cv", "wsram", "diag/grad_var/theta")]
  assert row["holds"] and np.isclose(row["p_value"], 1 / 70)  # every +c run below every plain one
  np.testing.assert_allclose(row["means"], [2 * 2.5e-5, 2 * 2.5e-3])
  assert "p_value" not in rows[("wsram_q", "wsram", "diag/grad_var/theta")]  # one wsram_q run: not tested
  assert "p_value" not in rows[("wsram", "wsram_cv", "train/ess")]  # no run logged it
  text = report.curve_orderings_markdown(list(rows.values()))
  assert ("| control variates lower WS-RAM's gradient variance | WS-RAM+c < WS-RAM | `diag/grad_var/theta` from "
          "update 200 | 5e-05 vs 0.005 (n=4, 4) | yes | 0.014 |") in text
  assert "not enough runs" in text


def test_final_scale_usage_per_glimpse_is_the_mean_over_seeds(tmp_path):
  _fake_run(tmp_path / "a", 0.2)
  _fake_run(tmp_path / "b", 0.4)
  usage = report._final_scale_usage([str(tmp_path / "a"), str(tmp_path / "b")], 3)
  np.testing.assert_allclose(usage, [[0.0, 0.0, 1.0], [0.0, 0.3, 0.7]])
  # Seed a: glimpses [0, 0, 1] and [0, 0.2, 0.8], so 90% of its glimpses at scale 2; seed b: 80%.
  np.testing.assert_allclose(report.dominant_scale_share([str(tmp_path / "a"), str(tmp_path / "b")], 3), [0.9, 0.8])
  assert report._final_scale_usage([str(tmp_path / "missing")], 3) is None


def test_planned_runs_train_every_seed_of_a_variant_as_one_program(tmp_path):
  (tmp_path / "lr.json").write_text(json.dumps({"learning_rates": {v: 3e-4 for v in table1.TABLE_VARIANTS}}))
  runs = table1.planned_runs([0, 1, 2], 500, [], table1.read_learning_rates(str(tmp_path / "lr.json")))
  assert set(runs) == set(table1.TABLE_VARIANTS) | set(table1.FIGURE3_RUNS)
  assert "--config.num_runs=3" in runs["var"] and "--config.runs.seed=0,1,2" in runs["var"]
  assert "--config.learning_rate=0.0003" in runs["wsram_q_cv_heuron"]
  assert table1.run_dirs("root", "var", [0, 1, 2])[2].endswith("var/run_2")
  assert list(table1.select(runs, ["wsram_cv", "var_cv_heuroff"])) == ["wsram_cv", "var_cv_heuroff"]
  assert table1.select(runs, []) == runs
  with pytest.raises(errors.UserError, match="no workdir named wsram_x"):
    table1.select(runs, ["wsram_x"])
  # A variant with no converged rate keeps its config's default; one the file does not list is an error.
  (tmp_path / "lr.json").write_text(json.dumps({"learning_rates": {**{v: 3e-4 for v in table1.TABLE_VARIANTS},
                                                                    "var": None}}))
  runs = table1.planned_runs([0], 500, [], table1.read_learning_rates(str(tmp_path / "lr.json")))
  assert not any(a.startswith("--config.learning_rate") for a in runs["var"])
  assert "--config.learning_rate=0.0003" in runs["var_cv"]
  (tmp_path / "lr.json").write_text(json.dumps({"learning_rates": {"var": 1e-3}}))
  with pytest.raises(errors.UserError, match="no entry for var_cv"):
    table1.read_learning_rates(str(tmp_path / "lr.json"))


def test_planned_runs_with_one_schedule_for_every_variant():
  runs = table1.planned_runs([0], 50000, [], schedule="constant")
  for name in ("wsram_q_cv", "var", "wsram_q_cv_heuroff"):  # wsram_q_cv's own schedule is not constant
    assert "--config.learning_rate=0.0003" in runs[name] and "--config.warmup.start=1.0" in runs[name]
  own = table1.planned_runs([0], 50000, [])
  assert not any(a.startswith("--config.warmup") for a in own["wsram_q_cv"])  # its config's schedule
  with pytest.raises(errors.ConfigError, match="no schedule named"):
    table1.planned_runs([0], 500, [], schedule="cosine")


def test_figure2_draws_each_method_as_its_seeds_mean_with_their_range(tmp_path):
  for seed, (error, late_step) in enumerate(((0.4, 300), (0.6, None))):  # seed 1 stopped before step 300
    writer = metric_writers.MetricWriter(str(tmp_path / f"s{seed}"), tensorboard=False)
    for step in (100, 200, late_step):
      if step:
        writer.write_scalars(step, {"train/error": error, "train/ess": 3.0, "diag/grad_var/theta": 1e-4 * (seed + 1)})
    writer.close()
  runs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  steps, mean, lowest, highest = report._across_runs(runs, "train/error")  # pylint: disable=protected-access
  np.testing.assert_array_equal(steps, [100, 200, 300])
  np.testing.assert_allclose(mean, [0.5, 0.5, 0.4])  # step 300: only seed 0 logged it
  np.testing.assert_allclose(lowest, [0.4, 0.4, 0.4])
  np.testing.assert_allclose(highest, [0.6, 0.6, 0.4])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    path = report.figure2({"var_cv": runs}, str(tmp_path / "figure2.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_report_fills_results(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "RESULTS.md").write_text(
      "# Results\n\nintro\n\n<!-- table1:begin -->\nold\n<!-- table1:end -->\n\ntail\n")
  seeds = [0, 1]
  runs = table1.planned_runs(seeds, 200, [])
  for i, name in enumerate(runs):
    for j, run_dir in enumerate(table1.run_dirs(str(tmp_path / "runs"), name, seeds)):
      _fake_run(run_dir, 0.01 * (i + 1) + 0.02 * j)
  table1.write_report(runs, str(tmp_path / "runs"), seeds, str(tmp_path / "results"),
                      "python -m experiments.table1", 200)
  text = (tmp_path / "RESULTS.md").read_text()
  assert "intro" in text and "tail" in text and "old" not in text
  assert "2.00% ± 1.41 (n=2)" in text  # var: its two seeds ended at 1% and 3%.
  assert "3.11%" in text  # The paper's number beside ours.
  for name in ("figure2.png", "figure3.png", "table1.json"):
    assert (tmp_path / "results" / name).exists()
  summary = json.loads((tmp_path / "results" / "table1.json").read_text())
  assert np.isclose(summary["error_sampled"]["wsram_q_cv"]["mean"], 0.07)
  assert "The orderings the paper claims" in text and len(summary["orderings"]) == len(report.PAPER_ORDERINGS)
  assert "The paper's Figure 2 claims" in text
  assert len(summary["figure2_orderings"]) == len(report.FIGURE2_CLAIMS)


def test_training_curves_leave_out_panels_the_run_did_not_log(tmp_path):
  # No training loss and no gradient variance logged: two panels (error, ESS), each with a legend, no warning.
  writer = metric_writers.MetricWriter(str(tmp_path), tensorboard=False)
  for s in (100, 200):
    writer.write_scalars(s, {"train/error": 0.5, "train/ess": 3.0})
  writer.close()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    path = report.training_curves(str(tmp_path), str(tmp_path / "curves.png"))
  header = open(path, "rb").read(24)
  assert header[:8] == b"\x89PNG\r\n\x1a\n"
  assert int.from_bytes(header[16:20], "big") == round(2 * 4.2 * 100)  # width: two panels of 4.2 in at 100 dpi
