r"""The search for better defaults at a fixed budget: the same candidate settings, tried on each method over the same
seeds, kept or rejected by what they measure.

    python -m experiments.search --root=runs/search --steps=50000 --seeds=1,2,3,4 --jobs=2 \
        [--variants=wsram_q_cv,wsram_cv,var_cv] [--candidates=decay,warm_decay] [--results=results/search]

Each (variant, candidate) pair is one `python -m experiments.train` program training every seed
(`--config.num_runs`), in ``ROOT/VARIANT.CANDIDATE.sSEEDS`` (seeds joined by '-', e.g. ``wsram_q_cv.decay.s1-2-3-4``),
--jobs processes at a time; started again with the same flags it resumes. A later call with other seeds
(``--seeds=5,6,7,8``) adds a workdir beside it, and the report pools every seed of a pair.

`CANDIDATES` are functions of the budget: each sets a learning-rate schedule of `experiments/configs/mnist.py`
(`SCHEDULES`: fractions of the budget, so that a candidate means the same at any budget) and maybe a heuristic,
whatever the variant's default is, so that a run's meaning does not change when the defaults do. ``constant`` (Adam
at 3e-4 throughout, every variant's default before this search) is the baseline: the report (also with --report_only)
compares each candidate with it per variant (exact one-sided permutation test of "the candidate errs less", on
`eval/error_sampled` at the budget), applies the attention test of a good default to each run (`run_verdict`), names
each variant's best candidate (the lowest mean error on the search seeds), and tests the paper's two central
comparisons at equal tuning (`central`): WS-RAM+q+c against VAR+c and against WS-RAM+c, both methods of each at
their best among the candidates finished on the search seeds for both (`choose`: the same list and seeds, so that
neither is chosen from a setting the other was not tried with), over every seed found and over the seeds the choice
did not see. Writes RESULTS.json, RESULTS.md and RESULTS.png (`figure`: each seed's error and attention by
pair).

The report never destroys a result (`wsram_jax.report_files`): with no run finished at the budget it writes
nothing and exits with 2, in one line; nor does it replace a RESULTS.json with more finished runs
(`search_counts`) at the default --results or anywhere in this checkout, unless --force. The three files are
written atomically, together.
"""
from __future__ import annotations

import glob
import os
import shlex
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import flags

from experiments import sweep
from experiments import report
from experiments.configs import mnist
from wsram_jax import errors
from wsram_jax import report_files
from wsram_jax.training import cli
from wsram_jax.training import metric_writers

FLAGS = flags.FLAGS

SEARCHED = ("wsram_q_cv", "wsram_cv", "var_cv")

# The coverage bonus (heuristic 2) with its scale term alone: reward using every scale, not every location.
COVERAGE_SCALES = {"heuristics.coverage_weight": 0.1, "heuristics.coverage_location_weight": 0.0}

# name -> the config values it sets, given the budget in updates: a schedule, and maybe the coverage bonus's scale
# term.
CANDIDATES: dict[str, Callable[[int], dict[str, Any]]] = {
    "constant": lambda steps: mnist.schedule_values("constant", steps),
    "decay": lambda steps: mnist.schedule_values("decay", steps),
    "warm_decay": lambda steps: mnist.schedule_values("warm_decay", steps),
    "coverage_scales": lambda steps: {**mnist.schedule_values("constant", steps), **COVERAGE_SCALES},
    "decay_coverage_scales": lambda steps: {**mnist.schedule_values("decay", steps), **COVERAGE_SCALES},
    "warm_decay_coverage_scales": lambda steps: {**mnist.schedule_values("warm_decay", steps), **COVERAGE_SCALES},
}
BASELINE = "constant"  # every candidate is tested against it

# The paper's central comparisons (lower, higher, claim), each variant at its best candidate.
CENTRAL = (("wsram_q_cv", "var_cv", "WS-RAM+q+c beats VAR+c"),
           ("wsram_q_cv", "wsram_cv", "the inference network helps WS-RAM+c"))

# The test of a good default (every seed): the sampled test error at most MAX_ERROR, greedy glimpses 2-N on the
# digit at least MIN_ON_DIGIT of the time, at least two scales each used by at least MIN_SCALE_SHARE of all greedy
# glimpses, and no collapse of the bound (train/bound never below MIN_BOUND after update BOUND_FROM).
MAX_ERROR, MIN_ON_DIGIT, MIN_SCALE_SHARE, MIN_BOUND, BOUND_FROM = 0.03, 0.8, 0.1, -20.0, 1000


def workdir_name(variant: str, candidate: str, seeds: Sequence[int]) -> str:
  return f"{variant}.{candidate}.s{'-'.join(str(s) for s in seeds)}"


def planned_runs(variants, candidates, seeds, steps: int, extra=()) -> dict[str, list[str]]:
  """workdir name -> its `experiments.train` arguments (without --workdir): every seed of a pair in one program."""
  unknown = [c for c in candidates if c not in CANDIDATES]
  if unknown:
    raise errors.ConfigError(f"--candidates: no candidate named {', '.join(unknown)}; the names are "
                             f"{', '.join(CANDIDATES)}.")
  runs = {}
  for v in variants:
    for c in candidates:
      values = [f"--config.{k}={val!r}" for k, val in CANDIDATES[c](steps).items()]
      runs[workdir_name(v, c, seeds)] = [
          f"--config=experiments/configs/mnist.py:{v}", f"--config.num_steps={steps}",
          f"--config.num_runs={len(seeds)}", "--config.runs.seed=" + ",".join(str(s) for s in seeds),
          *values, *extra]
  return runs


def pair_runs(root: str, variant: str, candidate: str) -> list[tuple[int, str]]:
  """(seed, run directory) of every seed of a pair found under `root`, in seed order."""
  out = []
  prefix = os.path.join(root, f"{variant}.{candidate}.s")
  for workdir in glob.glob(glob.escape(prefix) + "*"):
    seeds = [int(s) for s in workdir[len(prefix):].split("-")]
    out += zip(seeds, sweep.run_dirs(root, os.path.basename(workdir), seeds))
  return sorted(out)


def run_verdict(run_dir: str, steps: int) -> dict[str, Any]:
  """One run at the budget: its errors, attention, scale use and lowest bound, and which tests of a good
  default it passes (`passes` is None until it has an evaluation at `steps`)."""
  final = metric_writers.final_metrics(run_dir)
  if "eval/error_sampled" not in final or final["step_of"].get("eval/error_sampled", 0) < steps:
    return {"finished": False, "step": int(final.get("step", 0))}
  records = metric_writers.read_metrics(run_dir)
  bound_steps, bounds = metric_writers.series(records, "train/bound")
  bounds = bounds[bound_steps > BOUND_FROM]
  scales = sorted(k for k in final if k.startswith("eval/scale_usage/s"))
  usage = [float(final[k]) for k in scales]
  v = {"finished": True, "error": float(final["eval/error_sampled"]),
       "error_greedy": float(final.get("eval/error_greedy", np.nan)),
       "on_digit_later": float(final.get("eval/on_digit/later", np.nan)), "scale_usage": usage,
       "lowest_bound": float(bounds.min()) if bounds.size else None,
       "nonfinite": "train/nonfinite_step" in final}
  v["tests"] = {"error": v["error"] <= MAX_ERROR, "on_digit": v["on_digit_later"] >= MIN_ON_DIGIT,
                "two_scales": sum(u >= MIN_SCALE_SHARE for u in usage) >= 2,
                "bound": v["lowest_bound"] is not None and v["lowest_bound"] >= MIN_BOUND and not v["nonfinite"]}
  v["passes"] = all(v["tests"].values())
  return v


def evaluate(root: str, variants, candidates, steps: int) -> dict[str, Any]:
  """Every pair's runs (`run_verdict` by seed), its summary over the finished seeds, and its test against the
  variant's `BASELINE` run."""
  out = {}
  for v in variants:
    out[v] = {}
    for c in candidates:
      verdicts = {seed: run_verdict(d, steps) for seed, d in pair_runs(root, v, c)}
      done = {s: r for s, r in verdicts.items() if r["finished"]}
      errs = [r["error"] for r in done.values()]
      out[v][c] = {"runs": verdicts, "seeds": sorted(done), "errors": errs,
                   "mean": float(np.mean(errs)) if errs else None,
                   "std": float(np.std(errs, ddof=1)) if len(errs) > 1 else None,
                   "greedy_mean": float(np.mean([r["error_greedy"] for r in done.values()])) if done else None,
                   "on_digit_mean": float(np.mean([r["on_digit_later"] for r in done.values()])) if done else None,
                   "all_pass": bool(done) and all(r["passes"] for r in done.values())}
    base = out[v].get(BASELINE)
    for c, s in out[v].items():
      if c != BASELINE and base and len(base["errors"]) >= 2 and len(s["errors"]) >= 2:
        s["p_below_baseline"] = report.permutation_p_value(s["errors"], base["errors"])
  return out


def search_counts(obj: Mapping[str, Any]) -> dict[str, int]:
  """What a search report is measured by (`wsram_jax.report_files`): its (variant, candidate, seed) runs finished at
  the budget; from RESULTS.json's content."""
  return {"finished runs": sum(len(s["errors"]) for per in obj["results"].values() for s in per.values())}


def best(per_candidate: Mapping[str, dict], num_seeds: int, among=None) -> str | None:
  """The candidate with the lowest mean error among those with at least `num_seeds` seeds finished (and in
  `among`, when given)."""
  ready = {c: s for c, s in per_candidate.items()
           if len(s["errors"]) >= num_seeds and (among is None or c in among)}
  return min(ready, key=lambda c: ready[c]["mean"]) if ready else None


def _errors_on(s: Mapping[str, Any], seeds, *, inside: bool = True) -> list[float]:
  """The finished runs' errors of one pair on `seeds` (or, with inside=False, on the seeds not in `seeds`)."""
  return [r["error"] for seed, r in s["runs"].items() if r["finished"] and (seed in seeds) == inside]


def choose(results: Mapping[str, Mapping[str, dict]], search_seeds: Sequence[int], variants=None):
  """Each of `variants` (default: all) at its best candidate under their equal search: the candidates with every
  search seed finished for each of them (the same list and seeds for all), judged on the search seeds only.
  Returns (variant -> its best or None, the equal search's candidates in `CANDIDATES` order). With one variant it
  is that variant's own best over every candidate it finished."""
  variants = [v for v in (results if variants is None else variants) if v in results]
  on = {v: {c: dict(s, errors=_errors_on(s, search_seeds)) for c, s in results[v].items()} for v in variants}
  complete = [{c for c, s in per.items() if len(s["errors"]) >= len(search_seeds)} for per in on.values()]
  equal = [c for c in CANDIDATES if complete and all(c in done for done in complete)]
  return {v: best(per, len(search_seeds), equal) for v, per in on.items()}, equal


def _test(a: Sequence[float], b: Sequence[float]) -> dict | None:
  """Means, counts, whether a's mean is the lower and the one-sided exact permutation p of "a errs less"."""
  if len(a) < 2 or len(b) < 2:
    return None
  return {"means": [float(np.mean(a)), float(np.mean(b))], "runs": [len(a), len(b)],
          "holds": bool(np.mean(a) < np.mean(b)), "p_value": report.permutation_p_value(a, b)}


def central(results: Mapping[str, Mapping[str, dict]], search_seeds: Sequence[int]) -> list[dict]:
  """The paper's two central comparisons at equal tuning: for each, both variants at their best under the equal
  search of the two (`choose`), compared over every seed finished (``means``, ``runs``, ``holds``, ``p_value``),
  and again on the seeds the choice did not see (``held_out``: seeds outside `search_seeds`) when both have at
  least two."""
  rows = []
  for lower, higher, claim in CENTRAL:
    chosen, equal = choose(results, search_seeds, [lower, higher])
    row = {"claim": claim, "lower": lower, "higher": higher, "equal_search": equal,
           "settings": [chosen.get(lower), chosen.get(higher)]}
    if None not in row["settings"]:
      a, b = results[lower][chosen[lower]], results[higher][chosen[higher]]
      row.update(_test(a["errors"], b["errors"]) or {})
      held_out = _test(_errors_on(a, search_seeds, inside=False), _errors_on(b, search_seeds, inside=False))
      if held_out:
        row["held_out"] = held_out
    rows.append(row)
  return rows


def figure(results: Mapping[str, Mapping[str, dict]], chosen: Mapping[str, str | None], path: str) -> str:
  """Every finished (variant, candidate) pair: each seed's test error and share of later greedy glimpses on the
  digit (dots), their mean (bar), the thresholds of the test of a good default (dashed); the variant's best
  candidate (its own best on the search seeds) starred."""
  pairs = [(v, c) for v, per in results.items() for c, s in per.items() if s["errors"]]
  fig, axes = report.subplots(1, 2, figsize=(11, 0.42 * len(pairs) + 1.6), sharey=True)
  for ax, key, scale, limit, title in ((axes[0], "error", 100, MAX_ERROR, "test error, M samples (%)"),
                                       (axes[1], "on_digit_later", 100, MIN_ON_DIGIT,
                                        "greedy glimpses 2-N on the digit (%)")):
    for y, (v, c) in enumerate(pairs):
      values = [scale * r[key] for r in results[v][c]["runs"].values() if r["finished"]]
      color = f"C{list(results).index(v)}"
      ax.scatter(values, [y] * len(values), color=color, s=18, zorder=3)
      ax.plot([np.mean(values)] * 2, [y - 0.3, y + 0.3], color=color, linewidth=2)
    ax.axvline(scale * limit, color="0.4", linestyle="--", linewidth=0.8)
    ax.set_xlabel(title)
    ax.grid(alpha=0.3, axis="x")
  axes[0].set_yticks(range(len(pairs)))
  axes[0].set_yticklabels([f"{report.LABELS.get(v, v)}, {c}" + (" *" if chosen.get(v) == c else "")
                           for v, c in pairs], fontsize=8)
  axes[0].invert_yaxis()
  axes[0].set_title("* the variant's best; dashed: the test of a good default", fontsize=8)
  return report.save(fig, path, dpi=110)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def markdown(results, chosen, rows, steps: int, search_seeds, cmd: str) -> str:
  lines = [f"Command: `{cmd}`", "",
           f"Each cell: `eval/error_sampled` on the 10,000 fixed test canvases after {steps:,} updates, mean ± sd "
           "over the seeds finished (n), the greedy error, the mean share of greedy glimpses 2-N on the digit, "
           "how many seeds pass the test of a good default (error at most "
           f"{MAX_ERROR:.0%}, glimpses 2-N on the digit at least {MIN_ON_DIGIT:.0%}, two scales each at least "
           f"{MIN_SCALE_SHARE:.0%} of all greedy glimpses, train/bound never below {MIN_BOUND:g} after update "
           f"{BOUND_FROM:,}), and the one-sided exact permutation p of \"errs less than {BASELINE}\".", "",
           f"| variant | candidate | error (sampled) | greedy | on digit | pass | p vs {BASELINE} |",
           "|---|---|---|---|---|---|---|"]
  for v, per in results.items():
    for c, s in per.items():
      if not s["runs"]:
        continue
      cell = _pct(s["mean"]) + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else "") + f" (n={len(s['errors'])})"
      passed = sum(1 for r in s["runs"].values() if r.get("passes"))
      p = s.get("p_below_baseline")
      mark = "**" if chosen.get(v) == c else ""
      lines.append(f"| {v} | {mark}{c}{mark} | {cell} | {_pct(s['greedy_mean'])} | {_pct(s['on_digit_mean'])} | "
                   f"{passed} of {len(s['errors'])} | {'-' if p is None else f'{p:.3f}'} |")
  lines += ["", f"Bold: the variant's own best candidate (the lowest mean error on the search seeds "
                f"{','.join(map(str, search_seeds))} among its candidates with all of them finished).", "",
            "Per seed (sampled error / greedy glimpses 2-N on the digit / share of each scale / lowest bound):", ""]
  for v, per in results.items():
    for c, s in per.items():
      parts = []
      for seed, r in s["runs"].items():
        if r["finished"]:
          parts.append(f"seed {seed}: {_pct(r['error'])} / {100 * r['on_digit_later']:.0f}% / "
                       + ":".join(f"{100 * u:.0f}" for u in r["scale_usage"])
                       + f" / {r['lowest_bound']:.2f}" + ("" if r["passes"] else " (fails: " + ", ".join(
                           k for k, ok in r["tests"].items() if not ok) + ")"))
        else:
          parts.append(f"seed {seed}: at update {r['step']:,}")
      if parts:
        lines.append(f"- {v}, {c}: " + "; ".join(parts))
  lines += ["", "The paper's central comparisons at equal tuning: both variants at their best among the candidates "
                "finished on the search seeds for both (the equal search), over every seed finished, and on the "
                "seeds the choice did not see (held out):", "",
            "| the paper's claim | ordering | equal search | settings | ours (mean over seeds) | in the paper's order "
            "| one-sided permutation p | held out: means, p |", "|---|---|---|---|---|---|---|---|"]

  def cell(t):
    return (f"{100 * t['means'][0]:.2f} vs {100 * t['means'][1]:.2f}% (n={t['runs'][0]}, {t['runs'][1]})", t)

  for r in rows:
    order = f"{report.LABELS[r['lower']]} < {report.LABELS[r['higher']]}"
    settings = " vs ".join(str(s) for s in r["settings"])
    equal = ", ".join(r["equal_search"]) or "none yet"
    if "p_value" in r:
      held = r.get("held_out")
      held_text = f"{cell(held)[0]}, p = {held['p_value']:.4f}" if held else "-"
      lines.append(f"| {r['claim']} | {order} | {equal} | {settings} | {cell(r)[0]} | "
                   f"{'yes' if r['holds'] else 'no'} | {r['p_value']:.4f} | {held_text} |")
    else:
      lines.append(f"| {r['claim']} | {order} | {equal} | {settings} | not enough finished runs | | | |")
  return "\n".join(lines)


def define_flags() -> None:
  """This binary's flags; defined only when it runs as a program (tests import it beside other binaries)."""
  flags.DEFINE_string("root", "runs/search", "Directory holding one workdir per (variant, candidate, seeds).")
  flags.DEFINE_list("variants", list(SEARCHED), "Variants of experiments/configs/mnist.py.")
  flags.DEFINE_list("candidates", list(CANDIDATES), "Candidates to train (`CANDIDATES`).")
  flags.DEFINE_list("seeds", ["1", "2", "3", "4"], "Seeds of every pair (one program).")
  flags.DEFINE_list("search_seeds", ["1", "2", "3", "4"], "The seeds the best candidate is chosen on.")
  flags.DEFINE_integer("steps", 50000, "Updates per run (the budget).")
  flags.DEFINE_integer("jobs", 2, "Processes at a time (each single-threaded when > 1).")
  flags.DEFINE_bool("report_only", False, "Only write the report from the runs' metrics so far.")
  flags.DEFINE_string("results", "results/search", "Write RESULTS.json and RESULTS.md.")
  flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run (e.g. a test's).")
  flags.DEFINE_list("only", [], "Train only these pairs (VARIANT.CANDIDATE), in this order; the report still "
                    "covers every pair of --variants and `CANDIDATES`.")
  flags.DEFINE_bool("force", False, report_files.FORCE_HELP)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
    search_seeds = [int(s) for s in FLAGS.search_seeds]
  except ValueError as e:
    raise errors.ConfigError(f"--seeds and --search_seeds take integers: {e}.") from None
  if FLAGS.steps < 1 or FLAGS.jobs < 1 or not seeds:
    raise errors.ConfigError("--steps and --jobs must be at least 1, and --seeds non-empty.")
  cmd = "python -m experiments.search " + shlex.join(sys.argv[1:])
  runs = planned_runs(FLAGS.variants, FLAGS.candidates, seeds, FLAGS.steps, FLAGS.override)
  if not FLAGS.report_only:
    bad = [pair for pair in FLAGS.only if pair.count(".") != 1]
    if bad:
      raise errors.ConfigError(f"--only takes VARIANT.CANDIDATE pairs (e.g. wsram_q_cv.decay), got {', '.join(bad)}.")
    only = [workdir_name(*pair.split("."), seeds) for pair in FLAGS.only]
    sweep.run_all(sweep.select(runs, only), FLAGS.root, seeds, FLAGS.steps, FLAGS.jobs)
  results = evaluate(FLAGS.root, FLAGS.variants, list(CANDIDATES), FLAGS.steps)
  counts = search_counts({"results": results})
  out = report_files.Report(force=FLAGS.force, elsewhere="--results")
  out.refuse_empty(counts["finished runs"], f"No run under {FLAGS.root} has finished {FLAGS.steps} updates")
  out.guard(FLAGS.results + ".json", counts, lambda p: search_counts(report_files.read_json(p)),
            default_destination=report_files.is_default(FLAGS.results, FLAGS["results"].default))
  chosen = {v: choose(results, search_seeds, [v])[0][v] for v in results}
  rows = central(results, search_seeds)
  text = markdown(results, chosen, rows, FLAGS.steps, search_seeds, cmd)
  with out:
    figure(results, chosen, out.path(FLAGS.results + ".png"))
    report.write_results(FLAGS.results, {"command": cmd, "steps": FLAGS.steps, "search_seeds": search_seeds,
                                         "chosen": chosen, "central": rows,
                                         "results": results}, text, out)
  print(text)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
