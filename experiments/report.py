"""Tables and figures of the classifier's experiments: our Table 1 beside the paper's, Figures 2 and 3, one run's
curves, and writing the results (JSON, markdown, RESULTS.md's marked sections).

Every number comes from the runs' own `metrics.jsonl` (`metric_writers.read_metrics`, `final_metrics`); nothing
is typed in except the paper's published Table 1 and claims, which are shown beside ours and labelled as the
paper's. Figures are drawn on matplotlib's Agg canvas (no pyplot, no global backend).

A run is a directory; runs of one variant over several seeds are averaged (mean and standard deviation of the
final test error; curves averaged step by step over the seeds that reached the step).
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Iterable, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from wsram_jax import report_files
from wsram_jax.training import metric_writers
from wsram_jax.training.metric_writers import final_metrics  # pylint: disable=unused-import  (read from here too)

# The paper's Table 1: test error (%) after 10 million updates with 5 samples.
PAPER_TABLE1 = {"var": 3.11, "var_cv": 1.81, "wsram": 4.23, "wsram_cv": 1.85, "wsram_q": 2.59,
                "wsram_q_cv": 1.62}
TABLE1_ROWS = (("no c.v.", ("var", "wsram", "wsram_q")), ("+c.v.", ("var_cv", "wsram_cv", "wsram_q_cv")))
TABLE1_COLUMNS = ("VAR", "WS-RAM", "WS-RAM + q")
LABELS = {"var": "VAR", "var_cv": "VAR+c", "wsram": "WS-RAM", "wsram_cv": "WS-RAM+c", "wsram_q": "WS-RAM+q",
          "wsram_q_cv": "WS-RAM+q+c"}


def _step_of(final: dict, key: str) -> int:
  return int(final.get("step_of", {}).get(key, final.get("step", 0)))


def summarize(groups: Mapping[str, Sequence[str]], key: str = "eval/error_sampled", *,
              min_step: int = 0) -> dict[str, dict]:
  """For each group (variant -> its runs' workdirs): mean/std of `key` at each run's end, steps, seeds.

  Only runs that logged `key` at step `min_step` or later count, so an unfinished run's early value never
  enters the table.
  """
  out = {}
  for name, workdirs in groups.items():
    finals = [final_metrics(w) for w in workdirs]
    finals = [f for f in finals if key in f and _step_of(f, key) >= min_step]
    values = np.array([float(f[key]) for f in finals])
    out[name] = {
        "mean": float(values.mean()) if values.size else None,
        "std": float(values.std(ddof=1)) if values.size > 1 else None,
        "values": values.tolist(),
        "steps": [_step_of(f, key) for f in finals],
        "runs": len(finals),
    }
  return out


def _cell(summary: Optional[dict]) -> str:
  if not summary or summary["mean"] is None:
    return "not run"
  text = f"{100 * summary['mean']:.2f}%"
  if summary["std"] is not None:
    text += f" ± {100 * summary['std']:.2f}"
  return text + f" (n={summary['runs']})"


def table1_markdown(summaries: Mapping[str, dict], *, key_name: str) -> str:
  """Our Table 1 and the paper's, side by side, as markdown."""
  lines = [f"| test error | " + " | ".join(f"{c} (ours)" for c in TABLE1_COLUMNS) + " | "
           + " | ".join(f"{c} (paper)" for c in TABLE1_COLUMNS) + " |",
           "|---" * (1 + 2 * len(TABLE1_COLUMNS)) + "|"]
  for row_name, variants in TABLE1_ROWS:
    ours = [_cell(summaries.get(v)) for v in variants]
    paper = [f"{PAPER_TABLE1[v]:.2f}%" for v in variants]
    lines.append(f"| {row_name} | " + " | ".join(ours) + " | " + " | ".join(paper) + " |")
  lines.append("")
  lines.append(f"Ours: `{key_name}` on the 10,000 fixed test canvases at the end of each run, mean ± standard "
               "deviation over seeds (n runs). Paper: after 10 million updates.")
  return "\n".join(lines)


# The orderings of Table 1 the paper claims, as (lower, higher, what it tests): control variates lower every
# method's error, the inference network lowers WS-RAM's, and WS-RAM+q+c beats the variational method.
PAPER_ORDERINGS = (("var_cv", "var", "control variates help VAR"),
                   ("wsram_cv", "wsram", "control variates help WS-RAM"),
                   ("wsram_q_cv", "wsram_q", "control variates help WS-RAM+q"),
                   ("wsram_q", "wsram", "the inference network helps WS-RAM"),
                   ("wsram_q_cv", "wsram_cv", "the inference network helps WS-RAM+c"),
                   ("wsram_q_cv", "var_cv", "WS-RAM+q+c beats VAR+c"))


def permutation_p_value(lower: Sequence[float], higher: Sequence[float]) -> float:
  """One-sided exact permutation test of "`lower` has the smaller mean": the fraction of the C(n_a + n_b, n_a)
  ways to split the pooled values into groups of these sizes whose first group's mean minus the second's is at
  most the observed difference (the observed split included). With 4 seeds each the smallest value is 1/70."""
  lower, higher = np.asarray(lower, float), np.asarray(higher, float)
  pooled, n = np.concatenate([lower, higher]), lower.size
  observed = lower.mean() - higher.mean()
  total = pooled.sum()
  count = 0
  for idx in itertools.combinations(range(pooled.size), n):
    first = pooled[list(idx)].sum()
    count += first / n - (total - first) / (pooled.size - n) <= observed + 1e-12
  return count / math.comb(pooled.size, n)


def orderings(summaries: Mapping[str, dict], claims=PAPER_ORDERINGS) -> list[dict]:
  """Each claimed ordering (lower, higher) tested on the runs' final values (`summarize`): the two means,
  whether ours has them in the paper's order, and the one-sided `permutation_p_value`. A claim with a variant of
  fewer than two finished runs keeps only its names and the paper's numbers (no ``p_value``)."""
  out = []
  for lower, higher, claim in claims:
    a, b = summaries.get(lower), summaries.get(higher)
    row = {"claim": claim, "lower": lower, "higher": higher, "paper": [PAPER_TABLE1[lower], PAPER_TABLE1[higher]]}
    if a and b and a["runs"] >= 2 and b["runs"] >= 2:
      row.update(means=[a["mean"], b["mean"]], runs=[a["runs"], b["runs"]], holds=bool(a["mean"] < b["mean"]),
                 p_value=permutation_p_value(a["values"], b["values"]))
    out.append(row)
  return out


def _ordering_table(rows: Sequence[dict], header: str, context, ours, missing: str) -> list[str]:
  """Tested orderings as markdown lines: claim | ordering | context(row) | ours(row) | holds | p, or `missing` in
  place of the last three for a row without a test."""
  lines = [header, "|---|---|---|---|---|---|"]
  for r in rows:
    cells = [r["claim"], f"{LABELS[r['lower']]} < {LABELS[r['higher']]}", context(r)]
    cells += ([ours(r), "yes" if r["holds"] else "no", f"{r['p_value']:.3f}"] if "p_value" in r
              else [missing, "", ""])
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def orderings_markdown(rows: Sequence[dict]) -> str:
  """`orderings` as a markdown table."""
  lines = _ordering_table(
      rows, "| the paper's claim | ordering | paper | ours (mean over seeds) | in the paper's order | one-sided "
      "permutation p |", lambda r: f"{r['paper'][0]:.2f} < {r['paper'][1]:.2f}%",
      lambda r: f"{100 * r['means'][0]:.2f} vs {100 * r['means'][1]:.2f}% (n={r['runs'][0]}, {r['runs'][1]})",
      "not enough finished runs")
  lines.append("")
  lines.append("p: the fraction of the ways to split the pooled final errors of both variants into groups of their "
               "sizes whose mean difference is at most ours (exact; 1/70 = 0.014 is the smallest possible with 4 "
               "seeds each). p < 0.05 is the evidence we accept for an ordering; a larger p means these seeds "
               "do not separate the two.")
  return "\n".join(lines)


# The paper's Figure 2 claims (Section 5.1): "Using the inference network reduced the variances in gradient
# estimation, although this improvement did not reflect itself in the ESS. Control variates improved both
# metrics." Each as (lower, higher, metric, claim): the claim is that `lower` has the smaller mean.
FIGURE2_CLAIMS = (("wsram_q", "wsram", "diag/grad_var/theta",
                   "the inference network lowers WS-RAM's gradient variance"),
                  ("wsram_q_cv", "wsram_cv", "diag/grad_var/theta",
                   "the inference network lowers WS-RAM+c's gradient variance"),
                  ("wsram", "wsram_q", "train/ess",
                   "the inference network raises WS-RAM's ESS (the paper: it does not)"),
                  ("wsram_cv", "wsram_q_cv", "train/ess",
                   "the inference network raises WS-RAM+c's ESS (the paper: it does not)"),
                  ("wsram_cv", "wsram", "diag/grad_var/theta", "control variates lower WS-RAM's gradient variance"),
                  ("wsram_q_cv", "wsram_q", "diag/grad_var/theta",
                   "control variates lower WS-RAM+q's gradient variance"),
                  ("wsram", "wsram_cv", "train/ess", "control variates raise WS-RAM's ESS"),
                  ("wsram_q", "wsram_q_cv", "train/ess", "control variates raise WS-RAM+q's ESS"))


def run_average(workdir: str, key: str, from_step: int) -> Optional[float]:
  """The mean of `key` over the steps >= `from_step` at which the run logged it (None if it logged none)."""
  steps, values = metric_writers.series(metric_writers.read_metrics(workdir), key)
  values = values[steps >= from_step]
  return float(values.mean()) if values.size else None


def curve_orderings(groups: Mapping[str, Sequence[str]], *, from_step: int,
                    claims=FIGURE2_CLAIMS) -> list[dict]:
  """Each claimed ordering of a training curve tested on the runs' `run_average` from `from_step` on: the two
  means over runs, the runs' values, and the one-sided `permutation_p_value` (absent when a variant has fewer
  than two runs that logged the metric)."""
  out = []
  for lower, higher, key, claim in claims:
    values = [[v for v in (run_average(w, key, from_step) for w in groups.get(name, ())) if v is not None]
              for name in (lower, higher)]
    row = {"claim": claim, "lower": lower, "higher": higher, "metric": key, "from_step": from_step}
    if min(len(v) for v in values) >= 2:
      row.update(means=[float(np.mean(v)) for v in values], values=values,
                 holds=bool(np.mean(values[0]) < np.mean(values[1])),
                 p_value=permutation_p_value(values[0], values[1]))
    out.append(row)
  return out


def curve_orderings_markdown(rows: Sequence[dict]) -> str:
  """`curve_orderings` as a markdown table."""
  return "\n".join(_ordering_table(
      rows, "| the claim | ordering | metric (run average) | ours (mean over seeds) | in that order | one-sided "
      "permutation p |", lambda r: f"`{r['metric']}` from update {r['from_step']:,}",
      lambda r: f"{r['means'][0]:.3g} vs {r['means'][1]:.3g} (n={len(r['values'][0])}, {len(r['values'][1])})",
      "not enough runs"))


def subplots(nrows: int, ncols: int, *, figsize: tuple[float, float], **kwargs):
  """A figure on an Agg canvas and its grid of Axes (`Figure.subplots`)."""
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig, path: str, *, dpi: int) -> str:
  """Writes `fig` to `path` atomically (`report_files.replacing`; its directory is created); returns `path`."""
  fig.tight_layout()
  with report_files.replacing(path) as tmp:
    fig.savefig(tmp, dpi=dpi)
  return path


def _across_runs(workdirs: Iterable[str], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, mean, lowest, highest)`` of `key` at each step any run logged it, over the runs that did; all
  ``[T]``, empty when no run logged `key`."""
  per_run = [metric_writers.series(metric_writers.read_metrics(w), key) for w in workdirs]
  per_run = [dict(zip(s.tolist(), v.tolist())) for s, v in per_run if s.size]
  steps = sorted(set().union(*per_run)) if per_run else []
  values = [[run[step] for run in per_run if step in run] for step in steps]
  return (np.array(steps), np.array([np.mean(v) for v in values]), np.array([min(v) for v in values]),
          np.array([max(v) for v in values]))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or values.size < window:
    return values
  kernel = np.ones(window) / window
  padded = np.concatenate([np.full(window - 1, values[0]), values])
  return np.convolve(padded, kernel, mode="valid")


def figure2(groups: Mapping[str, Sequence[str]], path: str, *, smooth: int = 5) -> str:
  """Figure 2: training error, test error, gradient variance (theta) and ESS against thousands of updates.

  Each line is the mean over a method's runs (seeds); the band around it spans the lowest to the highest run at
  each step, smoothed like the line (training metrics over `smooth` logged points). The training error is that
  of the trajectories the loss was computed on, drawn from the proposal: for the +q variants the inference
  network, which sees the label. The test-error panel (the prior's samples on the
  fixed test canvases) compares every method on the same footing.
  """
  panels = (("train/error", "training error (samples from the proposal)"),
            ("eval/error_sampled", "test error (M samples from the prior)"),
            ("diag/grad_var/theta", "gradient variance (theta)"),
            ("train/ess", "effective sample size (max = M)"))
  fig, axes = subplots(1, len(panels), figsize=(19, 4.2))
  for ax, (key, title) in zip(axes, panels):
    for name, workdirs in groups.items():
      steps, mean, lowest, highest = _across_runs(workdirs, key)
      if steps.size:
        window = smooth if key.startswith("train/") else 1
        label = LABELS.get(name, name) + (f" ({len(workdirs)} seeds)" if len(workdirs) > 1 else "")
        (line,) = ax.plot(steps / 1000, _smooth(mean, window), label=label,
                          marker="." if key.startswith("eval/") else None)
        if np.any(highest > lowest):
          ax.fill_between(steps / 1000, _smooth(lowest, window), _smooth(highest, window), color=line.get_color(),
                          alpha=0.2, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel("thousands of updates")
    if key.startswith("diag/"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  return save(fig, path, dpi=110)


def _final_scale_usage_per_run(workdirs: Iterable[str], num_scales: int) -> list[np.ndarray]:
  """Per run that has a last evaluation with them, ``[N, S]``: each glimpse's use of each scale there (the prior's
  greedy glimpses, ``eval/scale_usage/g{n}_s{s}``)."""
  per_run = []
  for w in workdirs:
    final = final_metrics(w)
    glimpses = sorted({int(k.split("/g")[1].split("_")[0]) for k in final if k.startswith("eval/scale_usage/g")})
    if glimpses:
      per_run.append(np.asarray([[final.get(f"eval/scale_usage/g{n}_s{s}", 0.0) for s in range(num_scales)]
                                 for n in glimpses], float))
  return per_run


def _final_scale_usage(workdirs: Iterable[str], num_scales: int) -> Optional[np.ndarray]:
  """``[N, S]``: `_final_scale_usage_per_run` averaged over the runs; None when no run has it (or they differ in
  N)."""
  per_run = _final_scale_usage_per_run(workdirs, num_scales)
  if not per_run or len({u.shape for u in per_run}) > 1:
    return None
  return np.mean(per_run, axis=0)


def dominant_scale_share(workdirs: Iterable[str], num_scales: int) -> list[float]:
  """Per run, the share of its greedy glimpses (all glimpses at the last evaluation) at its most-used scale: 1.0
  when the run collapsed onto one scale, 1/S when it uses every scale equally. A mean over seeds of the scale
  usage hides a collapse whose seeds chose different scales; this does not."""
  return [float(u.mean(axis=0).max()) for u in _final_scale_usage_per_run(workdirs, num_scales)]


def _legend(ax, fontsize: int) -> None:
  """A legend, unless nothing was drawn on `ax` (a setting whose runs are not there yet)."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=fontsize)


def figure3(pairs: Mapping[str, Mapping[str, Sequence[str]]], path: str, *, num_scales: int = 3,
            smooth: int = 5) -> str:
  """Figure 3: each method with the exploration heuristics on and off: training error, and each scale's use.

  Top row: the training error, and per method the fraction of the proposal's glimpses at each scale against
  updates (mean over seeds). Bottom row: each seed's `dominant_scale_share` per method and setting; per method,
  each glimpse's scale usage at the last evaluation (the prior's greedy glimpses on the test canvases, mean over
  seeds), one stacked bar per glimpse and setting.

  Args:
    pairs: method label -> {setting label: workdirs}, e.g. {'heuristics on': [...], 'heuristics off': [...]};
      a method's settings are drawn solid, dashed, dotted, in this order.
  """
  styles = ("-", "--", ":", "-.")
  hatches = ("", "//", "..", "xx")
  fig, axes = subplots(2, 1 + len(pairs), figsize=(5 * (1 + len(pairs)), 8.2), squeeze=False)
  ax = axes[0, 0]
  for method, settings in pairs.items():
    for i, (setting, workdirs) in enumerate(settings.items()):
      steps, values = _across_runs(workdirs, "train/error")[:2]
      if steps.size:
        ax.plot(steps / 1000, _smooth(values, smooth), label=f"{method}, {setting}",
                linestyle=styles[i % len(styles)])
  ax.set_title("training error")
  ax.set_xlabel("thousands of updates")
  ax.grid(alpha=0.3)
  _legend(ax, 8)
  ax = axes[1, 0]  # one dot per seed: the collapse onto one scale, which the means over seeds can hide
  names = []
  for method, settings in pairs.items():
    for setting, workdirs in settings.items():
      shares = dominant_scale_share(workdirs, num_scales)
      ax.scatter(np.full(len(shares), len(names)), shares, color="k", s=14, zorder=3)
      names.append(f"{method}\n{setting}")
  ax.set_xticks(np.arange(len(names)))
  ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
  ax.set_ylim(1 / num_scales - 0.02, 1.02)
  ax.set_title("each seed's share of its most-used scale at the end\n(greedy glimpses; 1 = one scale only)",
               fontsize=9)
  ax.grid(alpha=0.3)
  for col, (method, settings) in enumerate(pairs.items(), start=1):
    ax = axes[0, col]
    for i, (setting, workdirs) in enumerate(settings.items()):
      for s in range(num_scales):
        steps, values = _across_runs(workdirs, f"train/scale_usage_{s}")[:2]
        if steps.size:
          ax.plot(steps / 1000, _smooth(values, smooth), color=f"C{s}",
                  linestyle=styles[i % len(styles)], label=f"scale {s}, {setting}")
    ax.set_title(f"{method}: fraction of glimpses at each scale (mean over seeds)", fontsize=10)
    ax.set_xlabel("thousands of updates")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    _legend(ax, 7)
    ax = axes[1, col]
    width = 0.8 / max(len(settings), 1)
    for i, (setting, workdirs) in enumerate(settings.items()):
      usage = _final_scale_usage(workdirs, num_scales)
      if usage is None:
        continue
      ax.set_xticks(np.arange(1, usage.shape[0] + 1))
      x = np.arange(1, usage.shape[0] + 1) + (i - (len(settings) - 1) / 2) * width
      bottom = np.zeros(usage.shape[0])
      for s in range(num_scales):
        ax.bar(x, usage[:, s], width * 0.95, bottom=bottom, color=f"C{s}", hatch=hatches[i % len(hatches)],
               edgecolor="k", linewidth=0.4, label=f"scale {s}" if i == 0 else None)
        bottom += usage[:, s]
    ax.set_title(f"{method}: scale of each greedy glimpse at the end\nbars left to right: "
                 + ",\n".join(settings), fontsize=9)
    ax.set_xlabel("glimpse")
    ax.set_ylim(0, 1)
    _legend(ax, 7)
  return save(fig, path, dpi=110)


def training_curves(workdir: str, path: str, *, smooth: int = 5) -> str:
  """One run's curves: training loss and error, test errors, ESS and gradient variance against updates (a panel
  whose metrics the run did not log, e.g. the gradient variance without diagnostics, is left out)."""
  records = metric_writers.read_metrics(workdir)
  panels = ((("train/loss",), "training loss"),
            (("train/error", "eval/error_greedy", "eval/error_sampled"), "error"),
            (("train/ess", "diag/ess/mean"), "effective sample size"),
            (("diag/grad_var/theta", "diag/grad_var/eta"), "gradient variance"))
  curves = []  # (the panel's [(key, steps, values)] with data, its title)
  for keys, title in panels:
    lines = [(key, *metric_writers.series(records, key)) for key in keys]
    lines = [line for line in lines if line[1].size]
    if lines:
      curves.append((lines, title))
  curves = curves or [([], "training loss")]
  fig, axes = subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), squeeze=False)
  for ax, (panel, title) in zip(axes[0], curves):
    for key, steps, values in panel:
      ax.plot(steps, _smooth(values, smooth if key.startswith("train/") else 1), marker="." if
              steps.size < 20 else None, label=key)
    if title == "gradient variance":
      ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("updates")
    ax.grid(alpha=0.3)
    if panel:
      ax.legend(fontsize=7)
  return save(fig, path, dpi=100)


def no_run(workdir: str) -> Optional[str]:
  """Why `workdir` holds no trained run a report can restore (it does not exist, has no config.json, or no
  checkpoint), as a phrase; None when it holds one."""
  if not os.path.isdir(workdir):
    return f"{workdir} does not exist"
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return f"{workdir} holds no run (no config.json)"
  checkpoints = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))):
    return f"{workdir} holds no checkpoint (no {checkpoints}/<step>)"
  return None


def between_markers(content: str, name: str, text: str) -> str:
  """`content` with the text between `<!-- name:begin -->` and `<!-- name:end -->` replaced by `text` (the block
  appended if absent)."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  block = f"{begin}\n{text.rstrip()}\n{end}"
  if begin in content and end in content:
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail
  return content.rstrip() + ("\n\n" if content else "") + block + "\n"


def section(content: str, name: str) -> Optional[str]:
  """The text between `<!-- name:begin -->` and `<!-- name:end -->` in `content`, or None."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  if begin not in content or end not in content.split(begin, 1)[1]:
    return None
  return content.split(begin, 1)[1].split(end, 1)[0]


def write_json(path: str, obj) -> None:
  """`obj` as JSON (indented, keys sorted), written atomically."""
  report_files.write_json(path, obj, sort_keys=True)


def write_results(prefix: str, obj, text: str, out: Optional[report_files.Report] = None) -> None:
  """An experiment's results: `obj` as ``PREFIX.json`` (keys sorted) and the markdown `text` as ``PREFIX.md``,
  staged in `out` (a `report_files.Report`: written with its other files) or each written atomically now."""
  if out is None:
    write_json(prefix + ".json", obj)
    report_files.write_text(prefix + ".md", text + "\n")
  else:
    out.write_json(prefix + ".json", obj, sort_keys=True)
    out.write_text(prefix + ".md", text + "\n")
