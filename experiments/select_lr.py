r"""The paper's learning-rate protocol: per method, "the highest value that allowed the model to successfully converge".

    python -m experiments.select_lr --root=runs/lr --learning_rates=3e-3,1e-3,3e-4,1e-4 --seeds=0,1,2 \
        --steps=5000 [--variants=var,var_cv,...] [--max_error=0.5] [--min_on_digit=0.5] \
        [--results=results/learning_rates]

For each variant of Table 1, one process trains every (learning rate, seed) pair as one program
(`--config.num_runs`, `training.runs`) for --steps updates, in ROOT/VARIANT (it resumes). A run *converged* when
it never produced a non-finite loss or gradient and its training error, averaged over the last logged window
(`train/error`, the error of the trajectories the loss was computed on), is at most --max_error at the end, and
its policy is "a sensible attention policy" (the paper's words): in the evaluation at the end, at least
--min_on_digit of the greedy glimpses 2-N have their centre inside the digit's box (`eval/on_digit/later`; the
boxes are used to measure, never to train; 0 turns the test off). A learning rate that trains a classifier
which looks once and parks its later glimpses off the digit has not converged by this test. The variant's
learning rate is the highest one whose runs all converged. Writes RESULTS.json (the choice and every
run's numbers), which `python -m experiments.table1 --learning_rates=RESULTS.json` reads, and RESULTS.md.

The report never destroys a result (`wsram_jax.report_files`): when no run has been judged (finished --steps
updates, or stopped by a non-finite step) it writes nothing and exits with 2, in one line; nor does it replace a
RESULTS.json with fewer judged runs (`lr_counts`) at the default --results or anywhere in this checkout, unless
--force. Both files are written atomically, together.
"""
import os
import shlex
import subprocess
import sys

from absl import flags

from experiments import report
from wsram_jax import errors
from wsram_jax import report_files
from wsram_jax.training import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this binary's flags; called only when it runs as a program, so that importing it (tests, other
  binaries defining their own --root) adds nothing to the global absl flags."""
  flags.DEFINE_string("root", "runs/lr", "Directory holding one workdir per variant.")
  flags.DEFINE_list("variants", ["var", "var_cv", "wsram", "wsram_cv", "wsram_q", "wsram_q_cv"],
                    "Variants of experiments/configs/mnist.py.")
  flags.DEFINE_list("learning_rates", ["3e-3", "1e-3", "3e-4", "1e-4"], "The grid of learning rates.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per learning rate.")
  flags.DEFINE_integer("steps", 5000, "Updates per run.")
  flags.DEFINE_float("max_error", 0.5, "A converged run's training error at the end is at most this.")
  flags.DEFINE_float("min_on_digit", 0.5,
                     "A converged run's greedy glimpses 2-N are on the digit at least this often.")
  flags.DEFINE_string("results", "results/learning_rates", "Write RESULTS.json and RESULTS.md.")
  flags.DEFINE_bool("report_only", False, "Only choose from the runs' metrics so far.")
  flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every variant (e.g. a test's).")
  flags.DEFINE_bool("force", False, report_files.FORCE_HELP)


def grid(learning_rates, seeds) -> list[tuple[float, int]]:
  """The (learning rate, seed) of each run, in run order."""
  return [(lr, seed) for lr in learning_rates for seed in seeds]


def command(variant: str, workdir: str, learning_rates, seeds, steps: int, extra) -> list[str]:
  runs = grid(learning_rates, seeds)
  return [sys.executable, "-m", "experiments.train", f"--config=experiments/configs/mnist.py:{variant}",
          f"--workdir={workdir}", f"--config.num_steps={steps}", f"--config.num_runs={len(runs)}",
          "--config.runs.learning_rate=" + ",".join(repr(lr) for lr, _ in runs),
          "--config.runs.seed=" + ",".join(str(s) for _, s in runs), "--config.diag_every=0", *extra]


def converged(run_dir: str, steps: int, max_error: float, min_on_digit: float = 0.0) -> dict:
  """One run's verdict: its last logged training error, whether it reached `steps` finite, whether a non-finite
  step stopped it, where its greedy later glimpses went, whether it converged, and its last logged step."""
  final = report.final_metrics(run_dir)
  error = final.get("train/error")
  on_digit = final.get("eval/on_digit/later")
  nonfinite = "train/nonfinite_step" in final
  finite = not nonfinite and final.get("step", 0) >= steps
  attends = min_on_digit <= 0 or (on_digit is not None and float(on_digit) >= min_on_digit)
  ok = bool(finite and error is not None and float(error) <= max_error and attends)
  return {"train_error": None if error is None else float(error), "finished_finite": finite,
          "nonfinite": nonfinite, "step": int(final.get("step", 0)),
          "on_digit_later": None if on_digit is None else float(on_digit), "converged": ok}


def judged(verdict: dict) -> bool:
  """Whether a run's verdict is final: it finished finite, or a non-finite step stopped it. (A verdict of a file
  written before verdicts recorded ``nonfinite`` counts as judged: select_lr wrote such files only after its sweep
  had finished.)"""
  return bool(verdict["finished_finite"] or verdict.get("nonfinite", "step" not in verdict))


def lr_counts(obj: dict) -> dict[str, int]:
  """What a select_lr report is measured by (`wsram_jax.report_files`): its judged runs; from RESULTS.json's
  content."""
  return {"judged runs": sum(judged(v) for c in obj["details"].values() for per_lr in c["runs"].values()
                             for v in per_lr.values())}


def choose(variant_dir: str, learning_rates, seeds, steps: int, max_error: float,
           min_on_digit: float = 0.0) -> dict:
  """The highest learning rate whose runs all converged (None if none did), with every run's verdict."""
  per_lr = {}
  for r, (lr, seed) in enumerate(grid(learning_rates, seeds)):
    per_lr.setdefault(repr(lr), {})[str(seed)] = converged(os.path.join(variant_dir, f"run_{r}"), steps, max_error,
                                                           min_on_digit)
  good = [lr for lr in learning_rates if all(v["converged"] for v in per_lr[repr(lr)].values())]
  return {"learning_rate": max(good) if good else None, "runs": per_lr}


def markdown(choices: dict, learning_rates, seeds, steps: int, max_error: float, cmd: str,
             min_on_digit: float = 0.0) -> str:
  attends = (f", and at least {min_on_digit:.0%} of its greedy glimpses 2-N were on the digit" if min_on_digit > 0
             else "")
  lines = [f"Command: `{cmd}`", "",
           f"A run converged when it stayed finite for {steps} updates, its training error at the end was at "
           f"most {max_error:.0%}{attends}; the learning rate is the highest whose {len(seeds)} seeds all "
           "converged.", "",
           "| variant | " + " | ".join(f"lr {lr:g}" for lr in learning_rates) + " | chosen |",
           "|---|" + "---|" * (len(learning_rates) + 1)]
  for variant, c in choices.items():
    cells = []
    for lr in learning_rates:
      runs = c["runs"][repr(lr)].values()
      errs = ", ".join("NaN" if v.get("nonfinite", not v["finished_finite"]) else
                       f"at update {v['step']:,}" if not v["finished_finite"] else
                       ("-" if v["train_error"] is None else f"{100 * v['train_error']:.1f}%") +
                       ("" if v.get("on_digit_later") is None else f" ({100 * v['on_digit_later']:.0f}%)")
                       for v in runs)
      cells.append(("**" if all(v["converged"] for v in runs) else "") + errs +
                   ("**" if all(v["converged"] for v in runs) else ""))
    chosen = "none" if c["learning_rate"] is None else f"{c['learning_rate']:g}"
    lines.append(f"| {variant} | " + " | ".join(cells) + f" | {chosen} |")
  lines += ["", "Cells: the training error of each seed at the end, in brackets the fraction of its greedy glimpses "
                "2-N on the digit (bold: all converged)."]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  try:
    learning_rates = sorted({float(x) for x in FLAGS.learning_rates}, reverse=True)
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise errors.ConfigError(f"--learning_rates takes numbers and --seeds integers: {e}.") from None
  if not learning_rates or not seeds or min(learning_rates) <= 0 or FLAGS.steps < 1:
    raise errors.ConfigError("--learning_rates must be positive, --seeds non-empty and --steps >= 1.")
  if not 0 <= FLAGS.min_on_digit <= 1:
    raise errors.ConfigError(f"--min_on_digit is a fraction in [0, 1], got {FLAGS.min_on_digit}.")
  cmd = "python -m experiments.select_lr " + shlex.join(sys.argv[1:])
  for variant in FLAGS.variants:
    workdir = os.path.join(FLAGS.root, variant)
    if FLAGS.report_only:
      continue
    print(f"{variant}: {len(learning_rates) * len(seeds)} runs in one program in {workdir}", flush=True)
    proc = subprocess.run(command(variant, workdir, learning_rates, seeds, FLAGS.steps, FLAGS.override),
                          check=False)
    if proc.returncode != 0:
      raise errors.UserError(f"The {variant} sweep failed (exit {proc.returncode}); its output is above.")
  choices = {v: choose(os.path.join(FLAGS.root, v), learning_rates, seeds, FLAGS.steps, FLAGS.max_error,
                       FLAGS.min_on_digit) for v in FLAGS.variants}
  text = markdown(choices, learning_rates, seeds, FLAGS.steps, FLAGS.max_error, cmd, FLAGS.min_on_digit)
  results = {"command": cmd, "steps": FLAGS.steps, "max_error": FLAGS.max_error, "min_on_digit": FLAGS.min_on_digit,
             "learning_rates": {v: c["learning_rate"] for v, c in choices.items()}, "details": choices}
  counts = lr_counts(results)
  with report_files.Report(force=FLAGS.force, elsewhere="--results") as out:
    out.refuse_empty(counts["judged runs"], f"No run under {FLAGS.root} has finished {FLAGS.steps} updates or "
                                            f"stopped on a non-finite step (variants {', '.join(FLAGS.variants)})")
    out.guard(FLAGS.results + ".json", counts, lambda p: lr_counts(report_files.read_json(p)),
              default_destination=report_files.is_default(FLAGS.results, FLAGS["results"].default))
    report.write_results(FLAGS.results, results, text, out)
  print(text)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
