r"""How the test error falls with the budget: one setting trained to several budgets, a power law fitted on log axes,
and where it would reach the paper's error.

    python -m experiments.budget --root=runs/budget --variant=wsram_q_cv --candidate=warm_decay \
        --budgets=12500,25000,50000,100000,200000 --seeds=1,2 --jobs=2 [--search_root=runs/search] \
        [--results=results/budget]

A candidate of `experiments.search.CANDIDATES` is a function of the budget (its schedule is fractions of it), so
each budget is a run of its own: ``ROOT/VARIANT.CANDIDATE.bBUDGET.sSEEDS``, every seed in one program, evaluated
ten times along the way (`eval_every` = budget / 10). A candidate whose values do not depend on the budget
(``constant``: Adam at a constant rate) trains once, to the largest budget, and each budget's error is read off
that run's evaluations. Runs of `experiments.search` at a budget (``--search_root``) count too, and a budget they
finished for every seed is not trained again.

The report fits ``log error = a + b log budget`` by least squares to every (budget, seed) point and solves it for
the paper's error of the variant (Table 1: 10 million updates); it draws the points, each run's error along its
own training, and the fitted line on log axes. With --report_only it only reads what is there. Started again with
the same flags it resumes every run.

The report never destroys a result (`wsram_jax.report_files`): when no run has finished a budget it writes nothing
and exits with 2, in one line; nor does it replace a RESULTS.json with fewer (budget, seed) points
(`budget_counts`) at the default --results or anywhere in this checkout, unless --force. RESULTS.json, .md and
.png are written atomically, together.
"""
from __future__ import annotations

import glob
import os
import shlex
import sys
from typing import Sequence

import numpy as np
from absl import flags

from experiments import report
from experiments import search
from experiments import sweep
from wsram_jax import errors
from wsram_jax import report_files
from wsram_jax.training import cli
from wsram_jax.training import metric_writers

FLAGS = flags.FLAGS
KEY = "eval/error_sampled"


def budget_free(candidate: str, budgets: Sequence[int]) -> bool:
  """Whether the candidate sets the same values at every budget (then one run to the largest serves all)."""
  values = [search.CANDIDATES[candidate](b) for b in budgets]
  return all(v == values[0] for v in values)


def workdir_name(variant: str, candidate: str, budget: int, seeds: Sequence[int]) -> str:
  return f"{variant}.{candidate}.b{budget}.s{'-'.join(str(s) for s in seeds)}"


def planned_runs(variant: str, candidate: str, budgets: Sequence[int], seeds: Sequence[int],
                 extra=(), search_root: str | None = None) -> dict[str, tuple[int, list[str]]]:
  """workdir name -> (its budget, its `experiments.train` arguments without --workdir); a budget that
  `experiments.search` runs under `search_root` trained for every seed is not planned again."""
  if candidate not in search.CANDIDATES:
    raise errors.ConfigError(f"--candidate: no candidate named {candidate}; the names are "
                             f"{', '.join(search.CANDIDATES)}.")
  trained = [max(budgets)] if budget_free(candidate, budgets) else sorted(budgets)
  runs = {}
  for b in trained:
    if search_root and set(seeds) <= {p["seed"] for p in search_points(search_root, variant, candidate, [b])}:
      continue
    args = search.planned_runs([variant], [candidate], seeds, b, extra)[search.workdir_name(variant, candidate, seeds)]
    every = max(b // 10, 1)
    runs[workdir_name(variant, candidate, b, seeds)] = (b, [*args, f"--config.eval_every={every}",
                                                            f"--config.diag_every={every}"])
  return runs


def points(root: str, variant: str, candidate: str, budgets: Sequence[int],
           search_root: str | None = None) -> list[dict]:
  """Every (budget, seed) error found: from the budget runs (a budget-free candidate's run read at each budget it
  evaluated at) and from `experiments.search` runs at a budget of `budgets`. Each point: budget, seed, error,
  where (the run directory)."""
  out = []
  free = budget_free(candidate, budgets)
  prefix = os.path.join(root, f"{variant}.{candidate}.b")
  for workdir in sorted(glob.glob(glob.escape(prefix) + "*")):
    name = os.path.basename(workdir)
    trained, seeds_part = name[len(os.path.basename(prefix)):].split(".s")
    seeds = [int(s) for s in seeds_part.split("-")]
    for seed, run_dir in zip(seeds, sweep.run_dirs(root, name, seeds)):
      steps, values = metric_writers.series(metric_writers.read_metrics(run_dir), KEY)
      at = dict(zip(steps.tolist(), values.tolist()))
      for b in (budgets if free else [int(trained)]):
        if b in at and b <= int(trained):
          out.append({"budget": b, "seed": seed, "error": at[b], "run": run_dir})
  if search_root:
    out += [p for p in search_points(search_root, variant, candidate, budgets)
            if not any(q["budget"] == p["budget"] and q["seed"] == p["seed"] for q in out)]
  return sorted(out, key=lambda p: (p["budget"], p["seed"]))


def search_points(search_root: str, variant: str, candidate: str, budgets: Sequence[int]) -> list[dict]:
  """The (budget, seed) errors of `experiments.search` runs of the pair that trained exactly a budget of `budgets`."""
  out = []
  for seed, run_dir in search.pair_runs(search_root, variant, candidate):
    final = metric_writers.final_metrics(run_dir)
    for b in budgets:
      v = search.run_verdict(run_dir, b)
      if v["finished"] and final.get("step", 0) == b:
        out.append({"budget": b, "seed": seed, "error": v["error"], "run": run_dir})
  return out


def budget_counts(obj) -> dict[str, int]:
  """What a budget report is measured by (`wsram_jax.report_files`): its (budget, seed) points; from RESULTS.json's
  content."""
  return {"points": len(obj["points"])}


def fit(pts: Sequence[dict], target: float) -> dict | None:
  """Least squares of log error on log budget: ``error = exp(a) * budget ** b``, and the budget at which it
  reaches `target` (None when the fit does not fall). None with fewer than two budgets."""
  budgets = np.array([p["budget"] for p in pts], float)
  errs = np.array([p["error"] for p in pts], float)
  keep = errs > 0
  if len(set(budgets[keep].tolist())) < 2:
    return None
  b, a = np.polyfit(np.log(budgets[keep]), np.log(errs[keep]), 1)
  resid = np.log(errs[keep]) - (a + b * np.log(budgets[keep]))
  reach = float(np.exp((np.log(target) - a) / b)) if b < 0 else None
  return {"intercept": float(a), "slope": float(b), "target": target, "budget_at_target": reach,
          "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))), "points": int(keep.sum())}


def figure(pts: Sequence[dict], trend: dict | None, label: str, path: str, curves: Sequence[str] = ()) -> str:
  """Test error against updates on log axes: each run's evaluations along its training (thin), the error each
  budget ended at (dots), the fitted power law extended to where it meets the paper's error (dashed)."""
  fig, ax = report.subplots(1, 1, figsize=(7, 4.8))
  for i, run_dir in enumerate(curves):
    steps, values = metric_writers.series(metric_writers.read_metrics(run_dir), KEY)
    if steps.size:
      ax.plot(steps, 100 * values, color="0.7", linewidth=0.8, label="each run along its training" if i == 0
              else None)
  ax.scatter([p["budget"] for p in pts], [100 * p["error"] for p in pts], color="C0", zorder=3,
             label=f"{label}: error at the end of a run of that budget")
  if trend:
    top = max(max(p["budget"] for p in pts), trend["budget_at_target"] or 0) * 1.3
    xs = np.geomspace(min(p["budget"] for p in pts), top, 50)
    ax.plot(xs, 100 * np.exp(trend["intercept"]) * xs ** trend["slope"], "--", color="C1",
            label=f"fit: error ∝ updates^{trend['slope']:.2f}")
    ax.axhline(100 * trend["target"], color="C3", linewidth=0.8, label=f"paper ({100 * trend['target']:.2f}%, "
               "10M updates)")
    if trend["budget_at_target"]:
      ax.axvline(trend["budget_at_target"], color="C3", linestyle=":", linewidth=0.8)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("updates (the run's budget)")
  ax.set_ylabel("test error, M samples (%)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return report.save(fig, path, dpi=110)


def markdown(pts, trend, variant: str, candidate: str, cmd: str) -> str:
  lines = [f"Command: `{cmd}`", "", f"{report.LABELS.get(variant, variant)}, candidate `{candidate}`: "
           "`eval/error_sampled` on the 10,000 fixed test canvases at the end of each budget.", "",
           "| budget (updates) | seeds | error per seed | mean |", "|---|---|---|---|"]
  for b in sorted({p["budget"] for p in pts}):
    at = [p for p in pts if p["budget"] == b]
    lines.append(f"| {b:,} | {', '.join(str(p['seed']) for p in at)} | "
                 + ", ".join(f"{100 * p['error']:.2f}%" for p in at) + " | "
                 f"{100 * np.mean([p['error'] for p in at]):.2f}% |")
  if trend:
    reach = trend["budget_at_target"]
    lines += ["", f"Fit over {trend['points']} points: error = {np.exp(trend['intercept']):.3g} x updates^"
              f"{trend['slope']:.3f} (rms residual {trend['rms_log_residual']:.3f} in log error); it reaches the "
              f"paper's {100 * trend['target']:.2f}% at "
              + (f"about {reach:,.0f} updates." if reach else "no budget (the fit does not fall).")]
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("root", "runs/budget", "Directory holding one workdir per budget.")
  flags.DEFINE_string("variant", "wsram_q_cv", "A variant of experiments/configs/mnist.py.")
  flags.DEFINE_string("candidate", "warm_decay", "A candidate of experiments.search.CANDIDATES (warm_decay: the "
                      "default schedule of wsram_q_cv).")
  flags.DEFINE_list("budgets", ["12500", "25000", "50000", "100000", "200000"], "Budgets in updates.")
  flags.DEFINE_list("seeds", ["1", "2"], "Seeds of every budget (one program).")
  flags.DEFINE_integer("jobs", 2, "Processes at a time (each single-threaded when > 1).")
  flags.DEFINE_string("search_root", None, "An experiments.search root whose runs of this pair count too.")
  flags.DEFINE_bool("report_only", False, "Only write the report from the runs' metrics so far.")
  flags.DEFINE_string("results", "results/budget", "Write RESULTS.json, RESULTS.md and RESULTS.png.")
  flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run (e.g. a test's).")
  flags.DEFINE_bool("force", False, report_files.FORCE_HELP)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  try:
    budgets = sorted({int(b) for b in FLAGS.budgets})
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise errors.ConfigError(f"--budgets and --seeds take integers: {e}.") from None
  if not budgets or min(budgets) < 1 or not seeds or FLAGS.jobs < 1:
    raise errors.ConfigError("--budgets must be positive, --seeds non-empty and --jobs at least 1.")
  cmd = "python -m experiments.budget " + shlex.join(sys.argv[1:])
  planned = planned_runs(FLAGS.variant, FLAGS.candidate, budgets, seeds, FLAGS.override, FLAGS.search_root)
  if not FLAGS.report_only:  # the largest budget first: it takes longest, the smaller ones fill the other slots
    order = sorted(planned, key=lambda n: -planned[n][0])
    sweep.run_all({n: planned[n][1] for n in order}, FLAGS.root, seeds, {n: planned[n][0] for n in order},
                  FLAGS.jobs)
  pts = points(FLAGS.root, FLAGS.variant, FLAGS.candidate, budgets, FLAGS.search_root)
  with report_files.Report(force=FLAGS.force, elsewhere="--results") as out:
    out.refuse_empty(len(pts), f"No run under {FLAGS.root} has finished a budget")
    out.guard(FLAGS.results + ".json", budget_counts({"points": pts}),
              lambda p: budget_counts(report_files.read_json(p)),
              default_destination=report_files.is_default(FLAGS.results, FLAGS["results"].default))
    target = report.PAPER_TABLE1[FLAGS.variant] / 100
    trend = fit(pts, target)
    curves = sorted({p["run"] for p in pts})
    figure(pts, trend, report.LABELS.get(FLAGS.variant, FLAGS.variant), out.path(FLAGS.results + ".png"), curves)
    text = markdown(pts, trend, FLAGS.variant, FLAGS.candidate, cmd)
    report.write_results(FLAGS.results, {"command": cmd, "variant": FLAGS.variant, "candidate": FLAGS.candidate,
                                         "points": pts, "fit": trend}, text, out)
  print(text)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
