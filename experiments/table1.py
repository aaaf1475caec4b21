r"""Reproduces the paper's Table 1 and Figures 2-3 at a CPU budget: a resumable sweep, then the report.

    python -m experiments.table1 --root=runs/table1 --steps=50000 --seeds=0,1,2,3 --jobs=2 \
        [--learning_rates=results/learning_rates.json] [--schedule=constant]

Runs: one `python -m experiments.train` per variant, each training all the seeds as one program
(`--config.num_runs`, `training.runs`; seed s is ROOT/VARIANT/run_i, in --seeds order), --jobs processes at a time:

* Table 1 / Figure 2: the six variants (var, var_cv, wsram, wsram_cv, wsram_q, wsram_q_cv);
* Figure 3: var_cv with the exploration heuristics off, and wsram_q_cv with all of them on and all off, beside
  the Table 1 runs of the same variants (VAR has all three on by default, WS-RAM the entropy bonus alone); and
  var_cv with the coverage bonus (heuristic 2) alone off, and with its location term alone off.

With --learning_rates (the file `python -m experiments.select_lr` writes) each variant trains at the learning
rate chosen for it there (a variant for which no rate of the grid converged keeps its config's default, with a
warning); the Figure 3 runs take their variant's.

`--only=var_cv,wsram_cv` trains just those workdirs, in that order (to spend a session on the comparisons that
matter most first); the report still reads every workdir.

Stop it at any time (or lose the session): started again with the same flags it resumes every run where its
last checkpoint left it. When the runs are done (or with --report_only, from whatever has been written so far)
it writes results/table1.json, results/figure2.png, results/figure3.png, results/glimpses.png (the greedy
glimpse paths of the first seed's WS-RAM+q+c model on test canvases, when its checkpoints are there) and the
Table 1 section of RESULTS.md (with --results elsewhere: RESULTS/table1.md, unless --results_md names the file).
The finished workdirs' metrics (without checkpoints) are kept in git as results/table1_runs/NAME.tar.xz:
`tar xJf results/table1_runs/NAME.tar.xz -C ROOT` restores what the report reads.

The report never destroys a result (`wsram_jax.report_files`): with no run under --root that finished --steps
updates it writes nothing and exits with 2, in one line; nor does it replace a table1.json or a Table 1 section
that counts more finished runs or more updates than its own (`table1_counts`) in a protected place (the default
destinations, or anywhere in this checkout) unless --force. Every file is written to a temporary file and renamed
into place once all are written, so an interrupted report leaves the old one whole.
"""
import json
import logging
import os
import re
import shlex
import sys

from absl import flags

from experiments.configs import mnist as mnist_configs
from experiments import report
from experiments.sweep import run_all, run_dirs, select
from wsram_jax import errors
from wsram_jax import report_files
from wsram_jax.classifier import train
from wsram_jax.training import cli
from wsram_jax.training import config as config_lib
from wsram_jax.training import trainer


_ROOT = flags.DEFINE_string("root", "runs/table1", "Directory holding one workdir per variant.")
_STEPS = flags.DEFINE_integer("steps", 15000, "Updates per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3"], "Seeds of every variant (its runs, in this order).")
_JOBS = flags.DEFINE_integer("jobs", 1, "Processes at a time (each single-threaded when > 1).")
_LEARNING_RATES = flags.DEFINE_string("learning_rates", None,
                                      "A file of experiments.select_lr: each variant at the learning rate chosen.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write the report from the runs' metrics so far.")
_RESULTS = flags.DEFINE_string("results", "results", "Directory for the figures and the JSON summary.")
_RESULTS_MD = flags.DEFINE_string(
    "results_md", "RESULTS.md", "The markdown file whose Table 1 section (between its markers) the report "
    "replaces. Used when given, or when --results is its default; with --results elsewhere and no --results_md "
    "the section is written to RESULTS/table1.md instead.")
_FORCE = flags.DEFINE_bool("force", False, report_files.FORCE_HELP)
_EXTRA = flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run (e.g. for a test).")
_SCHEDULE = flags.DEFINE_string(
    "schedule", None, "Train every variant with this learning-rate schedule of experiments/configs/mnist.py "
    "(SCHEDULES, e.g. constant); by default each variant's own (VARIANT_SCHEDULES).")
_ONLY = flags.DEFINE_list("only", [], "Train only these workdirs (variants or Figure 3 runs), in this order; the "
                          "report still covers every workdir's runs so far.")

TABLE_VARIANTS = ("var", "var_cv", "wsram", "wsram_cv", "wsram_q", "wsram_q_cv")
FIGURE3_RUNS = {"var_cv_heuroff": ("var_cv", mnist_configs.HEURISTICS_OFF),
                "wsram_q_cv_heuron": ("wsram_q_cv", mnist_configs.HEURISTICS_ON),
                "wsram_q_cv_heuroff": ("wsram_q_cv", mnist_configs.HEURISTICS_OFF),
                # Which heuristic pulls VAR+c's later glimpses off the digit: (2), the coverage bonus, alone off.
                "var_cv_nocoverage": ("var_cv", dict(mnist_configs.HEURISTICS_ON, coverage_weight=0.0)),
                # ... and its location term alone off (the bonus for using every scale kept).
                "var_cv_coverage_scales": ("var_cv", dict(mnist_configs.HEURISTICS_ON, coverage_location_weight=0.0))}


def _heuristics_flags(setting: dict) -> list[str]:
  return [f"--config.heuristics.{k}={v}" for k, v in setting.items()]


def read_learning_rates(path) -> dict[str, float]:
  """variant -> learning rate, from the JSON `experiments.select_lr` writes; {} for None.

  A variant the file lists without a converged learning rate (None: no rate of the grid converged) keeps its
  config's default, and a warning says so; a variant the file does not list at all is an error."""
  if not path:
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      chosen = json.load(f)["learning_rates"]
  except (OSError, ValueError, KeyError) as e:
    raise errors.UserError(f"Cannot read the learning rates of {path} ({e}); run experiments.select_lr first.")
  unlisted = [v for v in TABLE_VARIANTS if v not in chosen]
  if unlisted:
    raise errors.UserError(f"{path} has no entry for {', '.join(unlisted)}; run experiments.select_lr for them.")
  for v in TABLE_VARIANTS:
    if chosen[v] is None:
      default = mnist_configs.get_config(v).learning_rate
      logging.warning("%s: no learning rate of the grid converged for %s; it trains at its config's %g.", path, v,
                      default)
  return {v: float(chosen[v]) for v in TABLE_VARIANTS if chosen[v] is not None}


def planned_runs(seeds, steps, extra, learning_rates=None, schedule=None) -> dict[str, list[str]]:
  """workdir name -> its `experiments.train` arguments (without --workdir), in the order they are run: every
  seed of a variant in one program (its runs ROOT/NAME/run_i); every variant with the learning-rate `schedule` of
  `mnist.SCHEDULES` when one is named (else each its own), and its rate of `learning_rates` when listed."""
  learning_rates = learning_rates or {}
  if schedule is not None and schedule not in mnist_configs.SCHEDULES:
    raise errors.ConfigError(f"--schedule: no schedule named {schedule}; the names are "
                             f"{', '.join(mnist_configs.SCHEDULES)}.")
  fixed = mnist_configs.schedule_values(schedule, steps).items() if schedule else ()
  common = [f"--config.num_steps={steps}", f"--config.num_runs={len(seeds)}",
            "--config.runs.seed=" + ",".join(str(s) for s in seeds),
            *(f"--config.{k}={v!r}" for k, v in fixed), *extra]

  def variant(v):
    lr = [f"--config.learning_rate={learning_rates[v]!r}"] if v in learning_rates else []
    return [f"--config=experiments/configs/mnist.py:{v}", *common, *lr]

  runs = {v: variant(v) for v in TABLE_VARIANTS}
  for name, (v, heuristics) in FIGURE3_RUNS.items():
    runs[name] = variant(v) + _heuristics_flags(heuristics)
  return runs


def table1_counts(summary: dict) -> dict[str, int]:
  """What a Table 1 report is measured by (`wsram_jax.report_files`): the runs its cells count (those that finished
  --steps updates) and the updates those runs trained, summed; from ``table1.json``'s content."""
  cells = summary["error_sampled"].values()
  return {"finished runs": sum(int(c["runs"]) for c in cells),
          "updates": sum(int(s) for c in cells for s in c["steps"])}


def section_counts(content: str) -> dict[str, int]:
  """The same measure of RESULTS.md's Table 1 section (in `content`): the runs of its first table's cells
  (``(n=K)``), and those times its "Each run: N updates"; zero when there is no section."""
  text = report.section(content, "table1") or ""
  rows = [line for line in text.splitlines() if line.startswith(("| no c.v. |", "| +c.v. |"))][:2]
  finished = sum(int(n) for line in rows for n in re.findall(r"\(n=(\d+)\)", line))
  each = re.search(r"Each run: (\d+) updates", text)
  return {"finished runs": finished, "updates": finished * int(each.group(1)) if each else 0}


def _section_preview(summaries, steps: int) -> str:
  """The part of the Table 1 section that `section_counts` reads."""
  return (report.table1_markdown(summaries, key_name="eval/error_sampled") +
          f"\n\nEach run: {steps} updates.")


def write_report(runs: dict[str, list[str]], root: str, seeds, results: str, command: str, steps: int = 0, *,
                 results_md: str = "RESULTS.md", force: bool = False, default_results: bool = False,
                 default_results_md: bool = False) -> None:
  """Writes the report of the module docstring: RESULTS/table1.json, figure2.png, figure3.png, glimpses.png (when
  the WS-RAM+q+c checkpoints are there) and the Table 1 section of `results_md`, all or none
  (`wsram_jax.report_files.Report`).

  Refused in one line (`errors.ReportRefused`, exit 2), with nothing written, when no run under `root` has
  finished `steps` updates, or when table1.json or the section in `results_md` holds more finished runs or more
  updates (`table1_counts`, `section_counts`) than this report, unless `force`, where the destination is
  protected (a flag's default, `default_results` and `default_results_md`, or inside this checkout).
  """
  groups = {v: run_dirs(root, v, seeds) for v in TABLE_VARIANTS}
  summaries = report.summarize(groups, key="eval/error_sampled", min_step=steps)
  greedy = report.summarize(groups, key="eval/error_greedy", min_step=steps)
  json_path = os.path.join(results, "table1.json")
  counts = table1_counts({"error_sampled": summaries})
  with report_files.Report(force=force, elsewhere="--results, --results_md") as out:
    out.refuse_empty(counts["finished runs"],
                     f"No run under {root} has finished {steps} updates (ROOT/VARIANT/metrics.jsonl, or "
                     "ROOT/VARIANT/run_i/ for several seeds, of the variants " + ", ".join(TABLE_VARIANTS) + ")")
    out.guard(json_path, counts, lambda p: table1_counts(report_files.read_json(p)),
              default_destination=default_results)
    out.guard(results_md, section_counts(report.between_markers("", "table1", _section_preview(summaries, steps))),
              lambda p: section_counts(report_files.read_text(p)), default_destination=default_results_md)
    glimpse_run = os.path.join(root, "wsram_q_cv")
    state = None
    if os.path.exists(os.path.join(glimpse_run, "config.json")):
      config = config_lib.load_config(glimpse_run)
      try:  # the first seed's model
        _, state, _, config = trainer.restore_run(train.TASK, config, glimpse_run, 0)
      except errors.CheckpointError:  # an archive of the metrics alone (results/table1_runs): no figure
        logging.warning("%s holds no checkpoint; %s is left as it is.", glimpse_run,
                        os.path.join(results, "glimpses.png"))
    if state is not None:
      config.data.num_test = 16
      data = train.load_data(config)
      train.glimpse_figure(config, state.params, data.test_canvases, data.test_labels,
                           out.path(os.path.join(results, "glimpses.png")), boxes=data.test_boxes)
    tests = report.orderings(summaries)
    curve_tests = report.curve_orderings(groups, from_step=steps // 5)
    out.write_json(json_path, {
        "command": command, "error_sampled": summaries, "error_greedy": greedy, "orderings": tests,
        "figure2_orderings": curve_tests,
        "final_metrics": {os.path.relpath(d, root): report.final_metrics(d)
                          for name in runs for d in run_dirs(root, name, seeds)}}, sort_keys=True)
    report.figure2(groups, out.path(os.path.join(results, "figure2.png")))
    report.figure3({
        "VAR+c": {"heuristics on": groups["var_cv"], "heuristics off": run_dirs(root, "var_cv_heuroff", seeds),
                  "coverage bonus off": run_dirs(root, "var_cv_nocoverage", seeds),
                  "coverage of the scales only": run_dirs(root, "var_cv_coverage_scales", seeds)},
        "WS-RAM+q+c": {"heuristics on": run_dirs(root, "wsram_q_cv_heuron", seeds),
                       "heuristics off": run_dirs(root, "wsram_q_cv_heuroff", seeds),
                       "T = 2 + entropy bonus (default)": groups["wsram_q_cv"]},
    }, out.path(os.path.join(results, "figure3.png")))
    text = "\n\n".join([
        "Command: `" + command + "`",
        report.table1_markdown(summaries, key_name="eval/error_sampled"),
        f"Each run: {steps} updates. A cell counts only the runs that completed them.",
        "Prediction from the prior's mean glimpses (`eval/error_greedy`):",
        report.table1_markdown(greedy, key_name="eval/error_greedy"),
        "The orderings the paper claims, tested on `eval/error_sampled`:",
        report.orderings_markdown(tests),
        f"The paper's Figure 2 claims, tested on each run's average of the curve over the last four fifths of "
        f"training (from update {steps // 5:,}; the gradient variance at its `diag_every` measurements):",
        report.curve_orderings_markdown(curve_tests),
    ])
    content = report_files.read_text(results_md) if os.path.exists(results_md) else ""
    out.write_text(results_md, report.between_markers(content, "table1", text))
  print(f"wrote {results}/table1.json, figure2.png, figure3.png and the Table 1 section of {results_md}")


def results_md_path(results: str, results_md_flag) -> tuple[str, bool]:
  """``(path, default_destination)`` of the Table 1 section: --results_md when given; else RESULTS.md (in the
  working directory, beside the default ``results/``) when --results is its default, or RESULTS/table1.md when
  --results points elsewhere (so that a report written elsewhere never edits a RESULTS.md it was not told to)."""
  if results_md_flag.present:
    return results_md_flag.value, report_files.is_default(results_md_flag.value, results_md_flag.default)
  if report_files.is_default(results, _RESULTS.default):
    return results_md_flag.default, True
  return os.path.join(results, "table1.md"), False


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if _STEPS.value < 1 or _JOBS.value < 1:
    raise errors.ConfigError("--steps and --jobs must be at least 1.")
  seeds = [int(s) for s in _SEEDS.value]
  runs = planned_runs(seeds, _STEPS.value, _EXTRA.value, read_learning_rates(_LEARNING_RATES.value),
                      _SCHEDULE.value)
  command = "python -m experiments.table1 " + shlex.join(argv[0:0] + sys.argv[1:])
  if not _REPORT_ONLY.value:
    run_all(select(runs, _ONLY.value), _ROOT.value, seeds, _STEPS.value, _JOBS.value)
  results_md, default_md = results_md_path(_RESULTS.value, flags.FLAGS["results_md"])
  write_report(runs, _ROOT.value, seeds, _RESULTS.value, command, _STEPS.value, results_md=results_md,
               force=_FORCE.value, default_results=report_files.is_default(_RESULTS.value, _RESULTS.default),
               default_results_md=default_md)


if __name__ == "__main__":
  cli.run_main(main)
