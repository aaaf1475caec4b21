r"""Tables and figures of finished caption runs (paper Table 2 and Figure 4): BLEU-1..4, training NLL, examples.

    python -m experiments.caption_report --out=results/captions \
        --run=VAR:var_cv:runs/captions/var_cv --run=WS-RAM+q:wsram_q_cv:runs/captions/wsram_q_cv

Each ``--run`` is ``LABEL:VARIANT:WORKDIR`` (VARIANT of experiments/configs/captions.py; the run's recorded
config.json is what is restored); a WORKDIR of several runs (``--config.num_runs``) gives one entry per run,
``LABEL run R``. Writes to ``--out``:

* ``results.json``: per run, the last test BLEU-1..4 and NLL, the series against updates
  (``train/nll``, ``train/bound``, ``train/ess``, ``eval/bleu1..4``, ``eval/nll``) and, for the digit task,
  a word analysis of the greedy test captions (`word_analysis`: accuracy per word class, levels read);
* ``results.md``: the BLEU table (x100, as Table 2) and the training NLL at a few updates (as Figure 4);
* with ``--figures`` (default): ``curves.png`` (training NLL and test BLEU against updates) and
  ``examples_<label>.png`` (greedy captions with each word's glimpse: level and location), and the one of
  ``--examples_run`` (default: the last run) again as ``examples.png``.

A ``--run`` whose WORKDIR holds no trained run (no config.json or no checkpoint), or runs none of which has a test
evaluation, are refused in one line with exit 2 before anything is written; results.json is never replaced by a
report with fewer evaluated runs or fewer updates at their last evaluation (`caption_counts`) at the default
--out or anywhere in this checkout, unless --force. Every file is written to a temporary file and renamed into
place once all are written (`wsram_jax.report_files`), so an interrupted report leaves the old one whole.
"""
import json
import os
import re

from absl import flags
import ml_collections

from experiments import report as report_lib
from wsram_jax.training import cli
from wsram_jax.training import config as config_lib
from wsram_jax import errors
from wsram_jax import report_files
from wsram_jax.training import metric_writers
from wsram_jax.captioning import plots
from wsram_jax.captioning import train

FLAGS = flags.FLAGS
DEFAULT_OUT = "results/captions"


def define_flags() -> None:
  """This binary's flags; defined only when it runs as a program (tests import it beside other binaries)."""
  flags.DEFINE_string("out", DEFAULT_OUT, "Output directory.")
  flags.DEFINE_multi_string("run", [], "LABEL:VARIANT:WORKDIR of a finished run.")
  flags.DEFINE_integer("examples", 8, "Test images per examples figure.")
  flags.DEFINE_bool("figures", True, "Write curves.png and examples_<label>.png.")
  flags.DEFINE_string("examples_run", "", "LABEL of the run whose examples are also written as examples.png "
                      "('' = the last run).")
  flags.DEFINE_bool("force", False, report_files.FORCE_HELP)


SERIES = ("train/nll", "train/bound", "train/ess", "train/nll_per_word", "eval/bleu1", "eval/bleu2",
          "eval/bleu3", "eval/bleu4", "eval/nll", "eval/log_p_y", "eval/exact_match")


def _recorded_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise errors.DataError(f"{workdir} holds no run (no config.json).")
  with open(path, encoding="utf-8") as f:
    values = config_lib.with_added_keys(json.load(f))  # a run recorded before a key existed: its neutral value
  # JSON turned tuples into lists; the encoder channels are a tuple in the config.
  values["model"]["encoder_channels"] = tuple(values["model"]["encoder_channels"])
  return ml_collections.ConfigDict(values)


def word_analysis(restored) -> dict:
  """Digit task only: on the test captions whose greedy caption has the reference's structure (same length),
  the accuracy of each word class (size, digit, relation) and how often each pyramid level was read before it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  task = restored.task
  dec = jax.device_get(restored.decode(restored.state.params, task.test_images))
  classes = {"size": ("small", "large"), "digit": tuple(str(d) for d in range(10)),
             "relation": ("left", "above", "below"), "filler": ("a", "of")}
  right = {c: [] for c in classes}
  levels = {c: [] for c in classes}
  same = 0
  for tokens, scales, refs in zip(dec.tokens, dec.scales, task.test_references):
    hyp, ref = task.vocab.decode(tokens), refs[0]
    if len(hyp) != len(ref):
      continue
    same += 1
    for k, (h, r) in enumerate(zip(hyp, ref)):
      c = next(c for c, words in classes.items() if r in words)
      right[c].append(h == r)
      levels[c].append(int(scales[k]))
  num_levels = restored.model.num_scales
  return {"same_structure": same / len(task.test_references),
          "accuracy": {c: float(np.mean(v)) for c, v in right.items() if v},
          "level_fraction": {c: (np.bincount(v, minlength=num_levels) / len(v)).round(4).tolist()
                             for c, v in levels.items() if v}}


def layout_only_bleu(task, seed: int = 0) -> dict:
  """Digit task: BLEU of the references with every digit word replaced by a uniformly random digit -- what a
  captioner scores that gets the layout (sizes, relations, grammar) right and guesses the digits."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from wsram_jax.captioning import bleu  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  hyps = [[str(rng.integers(10)) if w.isdigit() else w for w in refs[0]] for refs in task.test_references]
  return bleu.corpus_bleu(task.test_references, hyps)


def caption_counts(report: dict) -> dict[str, int]:
  """What a caption report is measured by (`wsram_jax.report_files`): its runs with a test evaluation, and the
  updates at their last one, summed; from results.json's content."""
  evaluated = [e for e in report.values() if "last_step/eval/bleu1" in e]
  return {"evaluated runs": len(evaluated), "updates": sum(int(e["last_step/eval/bleu1"]) for e in evaluated)}


def _slug(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if not FLAGS.run:
    raise errors.ConfigError("Give at least one --run=LABEL:VARIANT:WORKDIR.")
  runs = []
  for spec in FLAGS.run:
    parts = spec.split(":", 2)
    if len(parts) != 3:
      raise errors.ConfigError(f"--run={spec!r} is not LABEL:VARIANT:WORKDIR.")
    runs.append(parts)
  write_report(runs, FLAGS.out, force=FLAGS.force, default_out=report_files.is_default(FLAGS.out, DEFAULT_OUT),
               figures=FLAGS.figures, examples=FLAGS.examples, examples_run=FLAGS.examples_run)


def write_report(runs, out_dir: str, *, force: bool = False, default_out: bool = False, figures: bool = True,
                 examples: int = 8, examples_run: str = "") -> None:
  """The report of the module docstring for `runs` ([(label, variant, workdir)]) in `out_dir`, all files or none;
  refused (`errors.ReportRefused`) as the module docstring says."""
  for _, _, workdir in runs:
    missing = report_lib.no_run(workdir)
    if missing:
      raise errors.ReportRefused(f"{missing}: each --run must name a trained caption run; nothing written.")
  # A workdir of several runs (--config.num_runs) is one report entry per run: its metrics in WORKDIR/run_r, its
  # own model from the stacked checkpoint.
  items = []  # (label, variant, workdir, the directory of its metrics, its run in a sweep or None)
  for label, variant, workdir in runs:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      num_runs = int(json.load(f).get("num_runs", 1))
    items += ([(f"{label} run {r}", variant, workdir, os.path.join(workdir, f"run_{r}"), r) for r in range(num_runs)]
              if num_runs > 1 else [(label, variant, workdir, workdir, None)])
  report = {}
  for label, variant, workdir, metrics_dir, _ in items:
    records = metric_writers.read_metrics(metrics_dir)
    entry = {"variant": variant, "workdir": metrics_dir, "series": {}}
    for name in SERIES:
      steps, values = metric_writers.series(records, name)
      if steps.size:
        entry["series"][name] = {"steps": steps.tolist(), "values": values.tolist()}
        entry[f"last/{name}"] = float(values[-1])
        entry[f"last_step/{name}"] = int(steps[-1])
    report[label] = entry
  counts = caption_counts(report)
  with report_files.Report(force=force, elsewhere="--out") as out:
    out.refuse_empty(counts["evaluated runs"], "No --run has a test evaluation (eval/bleu1 in its metrics.jsonl)")
    results_json = os.path.join(out_dir, "results.json")
    out.guard(results_json, counts, lambda p: caption_counts(report_files.read_json(p)),
              default_destination=default_out)
    reference_row = None
    configs = {}  # workdir -> its recorded config, read once for all its runs
    for label, variant, workdir, _, run in items:
      entry = report[label]
      if workdir not in configs:
        configs[workdir] = _recorded_config(workdir)
      config = configs[workdir]
      restored = train.restore(config, workdir, run=run)
      if config.data.task == "digits":
        entry["words"] = word_analysis(restored)
        reference_row = layout_only_bleu(restored.task)
      if figures:
        names = [f"examples_{_slug(label)}.png"]
        if label == (examples_run or items[-1][0]):
          names.append("examples.png")
        for name in names:
          plots.caption_examples(restored, out.path(os.path.join(out_dir, name)), num=examples,
                                 title=f"{label} ({variant}), step {restored.step}")
    if figures:
      plots.training_curves({item[0]: item[3] for item in items}, out.path(os.path.join(out_dir, "curves.png")),
                            title="Digit captions: training NLL and test BLEU against updates")
    out.write_json(results_json, report, indent=1)
    text = markdown(report, reference_row)
    out.write_text(os.path.join(out_dir, "results.md"), text + "\n")
  print(text)


def markdown(report: dict, reference_row) -> str:
  """results.md: the BLEU table, the training NLL at a few updates and, for the digit task, the word analysis."""
  lines = ["| method | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | test NLL | exact match | updates |",
           "|---|---|---|---|---|---|---|---|"]
  for label, e in report.items():
    bleus = " | ".join(f"{100 * e.get(f'last/eval/bleu{n}', float('nan')):.1f}" for n in (1, 2, 3, 4))
    lines.append(f"| {label} | {bleus} | {e.get('last/eval/nll', float('nan')):.3f} | "
                 f"{100 * e.get('last/eval/exact_match', float('nan')):.1f}% | "
                 f"{e.get('last_step/eval/bleu1', 0)} |")
  if reference_row is not None:
    bleus = " | ".join(f"{100 * reference_row[f'bleu{n}']:.1f}" for n in (1, 2, 3, 4))
    lines.append(f"| (reference: layout right, digits random) | {bleus} | | | |")
  nll_steps = sorted({s for e in report.values() for s in e["series"].get("train/nll", {}).get("steps", [])})
  shown = [s for s in nll_steps if s in (100, 200, 500, 1000, 1500, 2000, 3000, 5000, 10000)] or nll_steps[-5:]
  lines += ["", "Training NLL -log p(y|a) (nats per caption, mean over the log period) against updates:", "",
            "| method | " + " | ".join(str(s) for s in shown) + " |", "|---|" + "---|" * len(shown)]
  for label, e in report.items():
    series = dict(zip(e["series"].get("train/nll", {}).get("steps", []),
                      e["series"].get("train/nll", {}).get("values", [])))
    lines.append(f"| {label} | " + " | ".join(f"{series[s]:.2f}" if s in series else "" for s in shown) + " |")
  if any("words" in e for e in report.values()):
    lines += ["", "Greedy test captions with the reference's structure: accuracy per word class, and the fraction "
              "of those words read at each pyramid level (0 = finest):", "",
              "| method | same structure | size acc. | digit acc. | relation acc. | levels (size) | levels (digit) "
              "| levels (relation) |", "|---|---|---|---|---|---|---|---|"]
    for label, e in report.items():
      if "words" not in e:
        continue
      wa = e["words"]
      lines.append(f"| {label} | {100 * wa['same_structure']:.1f}% | " + " | ".join(
          f"{100 * wa['accuracy'].get(c, float('nan')):.1f}%" for c in ("size", "digit", "relation")) + " | " +
          " | ".join(str(wa["level_fraction"].get(c)) for c in ("size", "digit", "relation")) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
