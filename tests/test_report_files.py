"""Report writers cannot destroy a result: no report from inputs without a finished run (one line, exit 2), never a
less complete report over a more complete one in a protected place without --force, every file written atomically
(`wsram_jax.report_files`), for every binary that writes into tracked files."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import compile as bench_compile
from benchmarks import report as bench_report
from benchmarks import runs as bench_runs
from experiments import budget
from experiments import caption_report
from experiments import grad_variance
from experiments import search
from experiments import select_lr
from experiments import table1
from wsram_jax import errors
from wsram_jax import report_files
from wsram_jax.training import metric_writers

from conftest import REPO, message_lines


def _fake_run(workdir, final_error, steps=(100, 200)):
  """A run's metrics: training curves and a final evaluation at its last step."""
  writer = metric_writers.MetricWriter(str(workdir), tensorboard=False)
  for s in steps:
    writer.write_scalars(s, {"train/error": 0.5, "train/ess": 3.0, "diag/grad_var/theta": 1e-4})
  writer.write_scalars(steps[-1], {"eval/error_sampled": final_error, "eval/error_greedy": final_error + 0.01})
  writer.close()


def _table1_root(root, seeds, steps=200):
  runs = table1.planned_runs(seeds, steps, [])
  for i, name in enumerate(runs):
    for j, run_dir in enumerate(table1.run_dirs(str(root), name, seeds)):
      _fake_run(run_dir, 0.01 * (i + 1) + 0.02 * j, steps=(steps // 2, steps))
  return runs


def _snapshot(directory):
  """Every file under `directory` -> its bytes."""
  out = {}
  for base, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(base, f)
      out[os.path.relpath(path, directory)] = open(path, "rb").read()
  return out


# ---------------------------------------------------------------------------------------------------------------
# The helper.


def test_a_report_is_written_all_together_or_not_at_all(tmp_path):
  (tmp_path / "a.json").write_text("old a")
  with report_files.Report() as out:
    out.write_text(str(tmp_path / "a.json"), "new a")
    out.write_json(str(tmp_path / "sub" / "b.json"), {"x": 1})
    staged = out.path(str(tmp_path / "c.png"))
    assert staged.endswith(".png") and os.path.dirname(staged) == str(tmp_path)  # beside it, its extension kept
    open(staged, "w").write("png")
    assert (tmp_path / "a.json").read_text() == "old a"  # nothing in place before the block ends
  assert (tmp_path / "a.json").read_text() == "new a" and json.loads((tmp_path / "sub" / "b.json").read_text()) == {
      "x": 1} and (tmp_path / "c.png").read_text() == "png"
  with pytest.raises(RuntimeError):
    with report_files.Report() as out:
      out.write_text(str(tmp_path / "a.json"), "newer a")
      raise RuntimeError("interrupted while drawing a figure")
  assert (tmp_path / "a.json").read_text() == "new a"  # the old file whole
  assert sorted(os.listdir(tmp_path)) == ["a.json", "c.png", "sub"]  # no temporary file left
  with pytest.raises(KeyboardInterrupt):
    with report_files.replacing(str(tmp_path / "c.png")) as tmp:
      open(tmp, "w").write("half a fig")
      raise KeyboardInterrupt
  assert (tmp_path / "c.png").read_text() == "png" and sorted(os.listdir(tmp_path)) == ["a.json", "c.png", "sub"]


def test_a_less_complete_report_is_refused_where_it_is_protected(tmp_path, monkeypatch):
  path = str(tmp_path / "r.json")
  report_files.write_json(path, {"n": 4, "steps": 100})
  read = lambda p: {"finished runs": report_files.read_json(p)["n"], "updates": report_files.read_json(p)["steps"]}
  # Outside the checkout and not a flag's default: the user's own scratch file.
  report_files.Report().guard(path, {"finished runs": 1, "updates": 1}, read, default_destination=False)
  with pytest.raises(errors.ReportRefused, match=r"holds 4 finished runs and 100 updates, this report only 3 "
                                                 r"finished runs and 100 updates.*--force"):
    report_files.Report().guard(path, {"finished runs": 3, "updates": 100}, read, default_destination=True)
  with pytest.raises(errors.ReportRefused, match="updates"):  # more runs, fewer updates: still less complete
    report_files.Report().guard(path, {"finished runs": 9, "updates": 99}, read, default_destination=True)
  report_files.Report().guard(path, {"finished runs": 4, "updates": 100}, read, default_destination=True)
  report_files.Report(force=True).guard(path, {"finished runs": 0, "updates": 0}, read, default_destination=True)
  monkeypatch.setattr(report_files, "checkout_root", lambda: str(tmp_path))  # inside the checkout: protected
  with pytest.raises(errors.ReportRefused):
    report_files.Report().guard(path, {"finished runs": 3, "updates": 100}, read, default_destination=False)
  (tmp_path / "r.json").write_text("not a report")  # unreadable as a report: nothing to protect
  report_files.Report().guard(path, {"finished runs": 1, "updates": 1}, read, default_destination=True)
  with pytest.raises(errors.ReportRefused, match="^nothing here; nothing written.$"):
    report_files.Report().refuse_empty(0, "nothing here")


def test_the_checkout_and_the_defaults_are_protected(tmp_path):
  assert report_files.is_default("results/", "results") and report_files.is_default("./results", "results")
  assert not report_files.is_default("/tmp/results", "results")
  assert report_files.protected(str(tmp_path / "x.json"), default_destination=True)
  assert not report_files.protected(str(tmp_path / "x.json"), default_destination=False)
  if report_files.checkout_root() is None:
    pytest.skip("not a git checkout (an installed package): only the defaults are protected")
  assert report_files.protected(os.path.join(REPO, "results", "table1.json"), default_destination=False)


# ---------------------------------------------------------------------------------------------------------------
# Each writer: its measure, and a less complete report refused.


def test_table1_never_replaces_a_more_complete_table(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "RESULTS.md").write_text("# Results\n\n<!-- table1:begin -->\nold\n<!-- table1:end -->\n\ntail\n")
  runs = _table1_root(tmp_path / "full", [0, 1])
  table1.write_report(runs, str(tmp_path / "full"), [0, 1], "results", "cmd", 200, default_results=True,
                      default_results_md=True)
  written = json.loads((tmp_path / "results" / "table1.json").read_text())
  assert table1.table1_counts(written) == {"finished runs": 12, "updates": 2400}
  assert table1.section_counts((tmp_path / "RESULTS.md").read_text()) == {"finished runs": 12, "updates": 2400}
  before = _snapshot(tmp_path / "results")
  md = (tmp_path / "RESULTS.md").read_text()
  # One seed finished, the other stopped half way: 6 finished runs where the files have 12.
  runs = _table1_root(tmp_path / "half", [0, 1])
  for name in runs:
    second = table1.run_dirs(str(tmp_path / "half"), name, [0, 1])[1]
    shutil.rmtree(second)
    _fake_run(second, 0.5, steps=(100,))
  with pytest.raises(errors.ReportRefused, match="holds 12 finished runs and 2,400 updates, this report only 6"):
    table1.write_report(runs, str(tmp_path / "half"), [0, 1], "results", "cmd", 200, default_results=True,
                        default_results_md=True)
  assert _snapshot(tmp_path / "results") == before and (tmp_path / "RESULTS.md").read_text() == md
  # The same runs reported at a tenth of the updates: as many runs, fewer updates.
  with pytest.raises(errors.ReportRefused, match="updates"):
    table1.write_report(runs, str(tmp_path / "full"), [0, 1], "results", "cmd", 20, default_results=True,
                        default_results_md=True)
  # RESULTS.md alone is protected too (its section's own count), whatever --results is.
  with pytest.raises(errors.ReportRefused, match="RESULTS.md holds 12 finished runs"):
    table1.write_report(runs, str(tmp_path / "half"), [0, 1], str(tmp_path / "elsewhere"), "cmd", 200,
                        default_results_md=True)
  assert not (tmp_path / "elsewhere").exists()
  table1.write_report(runs, str(tmp_path / "half"), [0, 1], "results", "cmd", 200, force=True,
                      default_results=True, default_results_md=True)
  assert table1.table1_counts(json.loads((tmp_path / "results" / "table1.json").read_text()))["finished runs"] == 6
  assert "tail" in (tmp_path / "RESULTS.md").read_text()


def test_table1_writes_results_md_only_where_it_is_told(tmp_path):
  class Flag:  # what absl gives for --results_md
    def __init__(self, value=None):
      self.present, self.default = value is not None, "RESULTS.md"
      self.value = value or self.default

  assert table1.results_md_path("results", Flag()) == ("RESULTS.md", True)
  assert table1.results_md_path("results/", Flag()) == ("RESULTS.md", True)
  # --results elsewhere: the section goes beside the other files, not into the working directory's RESULTS.md.
  assert table1.results_md_path("/tmp/r", Flag()) == (os.path.join("/tmp/r", "table1.md"), False)
  assert table1.results_md_path("/tmp/r", Flag("/tmp/R.md")) == ("/tmp/R.md", False)
  assert table1.results_md_path("/tmp/r", Flag("RESULTS.md")) == ("RESULTS.md", True)


def test_each_writer_measures_its_report_the_same_way_on_disk():
  """Every measure reads the committed file of its kind (the one it protects)."""
  def committed(path):
    return json.loads(open(os.path.join(REPO, path), encoding="utf-8").read())

  assert table1.table1_counts(committed("results/table1.json"))["finished runs"] >= 24
  assert table1.section_counts(open(os.path.join(REPO, "RESULTS.md"), encoding="utf-8").read())[
      "finished runs"] >= 24
  assert select_lr.lr_counts(committed("results/learning_rates.json"))["judged runs"] > 0
  assert grad_variance.gv_counts(committed("results/grad_variance/var_10k.json"))["measurements"] > 0
  assert caption_report.caption_counts(committed("results/captions/results.json"))["evaluated runs"] == 4
  assert all(bench_report.step_counts(committed(f"benchmarks/results/{name}.json"))["batch sizes timed"] >= 2
             for name in ("cpu_2core", "step_gpu_h200"))
  assert bench_compile.compile_counts(committed("benchmarks/results/compile_cpu_2core.json"))["cold compiles"] > 0
  assert bench_runs.runs_counts(committed("benchmarks/results/runs_cpu_2core.json"))["run counts timed"] == 4


def test_select_lr_judges_finished_and_nonfinite_runs(tmp_path):
  _fake_run(tmp_path / "done", 0.1, steps=(100,))
  _fake_run(tmp_path / "half", 0.1, steps=(50,))
  writer = metric_writers.MetricWriter(str(tmp_path / "nan"), tensorboard=False)
  writer.write_scalars(10, {"train/nonfinite_step": 7})
  writer.close()
  verdicts = {name: select_lr.converged(str(tmp_path / name), 100, 0.5) for name in ("done", "half", "nan", "none")}
  assert [select_lr.judged(verdicts[n]) for n in ("done", "half", "nan", "none")] == [True, False, True, False]
  assert select_lr.judged({"finished_finite": False, "train_error": 0.3})  # a file from before "nonfinite"
  choices = {"var": {"learning_rate": None, "runs": {"0.1": {"0": verdicts["half"], "1": verdicts["nan"]}}}}
  assert select_lr.lr_counts({"details": choices}) == {"judged runs": 1}
  text = select_lr.markdown(choices, [0.1], [0, 1], 100, 0.5, "cmd")
  assert "at update 50, NaN" in text  # an unfinished run is not shown as NaN


def test_the_benchmarks_never_replace_more_measurements_in_the_checkout(tmp_path, monkeypatch):
  monkeypatch.setattr(report_files, "checkout_root", lambda: str(tmp_path))
  full = {"batch_sizes": {"32": {"jax": {"step": {}}, "torch": {"eager": {}}}, "128": {"jax": {"step": {}},
                                                                                    "torch": {}}}}
  bench_report.write_files(full, "full\n", str(tmp_path / "cpu"))
  fewer = {"batch_sizes": {"32": {"jax": {"step": {}}, "torch": {}}}}  # --notorch, one batch size
  with pytest.raises(errors.ReportRefused, match="holds 2 batch sizes timed and 1 PyTorch peers timed"):
    bench_report.write_files(fewer, "fewer\n", str(tmp_path / "cpu"))
  assert (tmp_path / "cpu.md").read_text() == "full\n"
  with pytest.raises(errors.ReportRefused, match="timed nothing"):
    bench_report.write_files({"batch_sizes": {}}, "", str(tmp_path / "other"))
  assert not (tmp_path / "other.json").exists()
  bench_report.write_files(fewer, "fewer\n", str(tmp_path / "cpu"), force=True)
  assert (tmp_path / "cpu.md").read_text() == "fewer\n"
  with pytest.raises(errors.ReportRefused):
    bench_report.write_files({"rows": []}, "", str(tmp_path / "runs"), counts=bench_runs.runs_counts)


def test_search_and_budget_measure_their_finished_runs(tmp_path):
  for i, e in enumerate([0.03, 0.04]):
    _fake_run(os.path.join(tmp_path, search.workdir_name("var_cv", "default", [1, 2]), f"run_{i}"), e,
              steps=(100, 200))
  results = search.evaluate(str(tmp_path), ["var_cv"], ["default", "decay"], 200)
  assert search.search_counts({"results": results}) == {"finished runs": 2}
  assert search.search_counts({"results": search.evaluate(str(tmp_path), ["var_cv"], ["default"], 400)}) == {
      "finished runs": 0}
  assert budget.budget_counts({"points": [{}, {}, {}]}) == {"points": 3}


# ---------------------------------------------------------------------------------------------------------------
# The binaries, on empty inputs, run from a checkout holding committed results: one line, exit 2, nothing changed.


def _git(cwd, *args):
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git, to show that the checkout stays clean")
def test_report_writers_with_empty_inputs_exit_2_in_one_line_and_leave_git_clean(tmp_path):
  """From a directory holding committed results at every writer's default destination, each writer given inputs
  without a finished run (a mistyped --root, a workdir without a run) refuses in one line with exit 2 and leaves
  `git status` clean (nothing written, not even a directory)."""
  repo = tmp_path / "checkout"
  for name, content in {"RESULTS.md": "<!-- table1:begin -->\n| no c.v. | 1% (n=4) |\n<!-- table1:end -->\n",
                        "results/table1.json": json.dumps({"error_sampled": {"var": {"runs": 4, "steps": [1] * 4}}}),
                        "results/figure2.png": "png", "results/learning_rates.json": "{}",
                        "results/learning_rates.md": "lr", "results/search.json": "{}",
                        "results/budget.json": "{}", "results/captions/results.json": "{}"}.items():
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(content)
  _git(repo, "init", "-q")
  _git(repo, "add", "-A")
  _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "results")
  (tmp_path / "run_without_checkpoint").mkdir()
  (tmp_path / "run_without_checkpoint" / "config.json").write_text("{}")
  empty = str(tmp_path / "EMPTY")
  commands = [
      ["experiments.table1", "--report_only", f"--root={empty}"],
      ["experiments.select_lr", "--report_only", f"--root={empty}"],
      ["experiments.search", "--report_only", f"--root={empty}"],
      ["experiments.budget", "--report_only", f"--root={empty}"],
      ["experiments.caption_report", f"--run=VAR:var_cv:{empty}"],
      ["experiments.caption_report", f"--run=VAR:var_cv:{tmp_path / 'run_without_checkpoint'}"],
      ["experiments.grad_variance", f"--workdir={empty}", "--out=results/grad_variance/var"],
  ]
  env = {**os.environ, "PYTHONPATH": REPO, "WSRAM_JAX_COMPILATION_CACHE": "0"}
  procs = [subprocess.Popen([sys.executable, "-m", *c], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  for cmd, proc in zip(commands, procs):
    _, stderr = proc.communicate(timeout=300)
    lines = message_lines(stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, (cmd, stderr[-3000:])
    assert lines[0].startswith("error: ") and "nothing" in lines[0], (cmd, lines[0])
  assert _git(repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_caption_report_refuses_runs_without_an_evaluation(tmp_path):
  """A run restored for nothing: a workdir with a checkpoint but no test evaluation yet is not a report."""
  run = tmp_path / "run"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  _fake_run(run, 0.5)  # metrics without eval/bleu1
  with pytest.raises(errors.ReportRefused, match="No --run has a test evaluation"):
    caption_report.write_report([("A", "var", str(run))], str(tmp_path / "out"), default_out=True)
  (tmp_path / "untrained").mkdir()
  (tmp_path / "untrained" / "config.json").write_text("{}")
  with pytest.raises(errors.ReportRefused, match="untrained holds no checkpoint"):
    caption_report.write_report([("A", "var", str(run)), ("B", "var", str(tmp_path / "untrained"))],
                                str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
