r"""VAR's control variates compared at the same parameters: the gradient variance of a trained run's checkpoint.

    python -m experiments.grad_variance --workdir=runs/table1/var_cv_nocoverage --baselines=nvil,none \
        [--batches=4] [--estimates=16] [--out=results/grad_variance_var_cv]

Figure 2 (RESULTS.md) compares the gradient variance of runs, each measured at its own parameters: a method
whose policy has collapsed may have less left to vary, whatever its estimator. This binary holds the parameters
fixed instead. For every run of WORKDIR (each seed of a several-run job) at its newest checkpoint, and for each
VAR baseline of --baselines (`wsram_jax.baselines`: none, moving, learned, nvil, loo), it draws --estimates
independent gradient estimates of each of --batches fixed minibatches (the diagnostics of Figure 2,
`training.step.make_diagnose`, with that baseline in the loss) and reports their variance per parameter group,
averaged over the minibatches. The baseline the run trained with keeps its trained state (a moving average's
value); another stateful one starts from its initial state; a learned baseline's head is in the parameters.
The minibatches are the same for every baseline and run (seeds 1,000,000 + i of `classifier.train.
diagnostic_batch`). Writes OUT.json and OUT.md when --out is given.

A WORKDIR without a trained run (no config.json or no checkpoint) is refused in one line with exit 2, before
anything is measured or written; OUT.json is never replaced by one with fewer measurements (`gv_counts`) inside
this checkout unless --force, and OUT.json and OUT.md are written atomically, together (`wsram_jax.report_files`).
"""
import shlex
import sys
from typing import Sequence

import numpy as np
from absl import flags

from experiments import report
from wsram_jax import errors
from wsram_jax import report_files
from wsram_jax.classifier import train
from wsram_jax.training import cli
from wsram_jax.training import config as config_lib
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import step as step_lib

FLAGS = flags.FLAGS
GROUPS = ("theta", "baseline", "all")
BATCH_SEED = 1_000_000  # minibatch i is diagnostic_batch(seed = BATCH_SEED + i), apart from every run's own


def define_flags() -> None:
  """This binary's flags (defined only when it runs as a program)."""
  flags.DEFINE_string("workdir", None, "A VAR run's workdir (one run, or several as one program).")
  flags.DEFINE_list("baselines", ["nvil", "none"], "VAR baselines to compare (the run's own first, say).")
  flags.DEFINE_integer("batches", 4, "Fixed minibatches per run.")
  flags.DEFINE_integer("estimates", 16, "Gradient estimates per minibatch.")
  flags.DEFINE_string("out", None, "Write OUT.json and OUT.md (directories are created).")
  flags.DEFINE_bool("force", False, report_files.FORCE_HELP)


def measure(workdir: str, baselines: Sequence[str], batches: int, estimates: int, log=print) -> dict:
  """The measurements of the module docstring: ``{'runs': [{'seed', 'step', baseline: {name: value}}], ...}``."""
  config = config_lib.load_config(workdir)
  if config.method != "var":
    raise errors.ConfigError(f"{workdir} trained method {config.method!r}; the baselines are VAR's (method var).")
  state = train.restore_state(config, workdir)
  runs = runs_lib.from_config(config)
  with config.unlocked():
    config.data.num_test = 1  # the test canvases are not used
  data = train.load_data(config)
  images, labels = data.images, data.labels
  results = {"workdir": workdir, "trained_baseline": config.baseline, "baselines": list(baselines),
             "batches": batches, "estimates": estimates, "runs": []}
  states = [runs_lib.unstack(state, r) if runs.several else state for r in range(runs.num_runs)]
  results["runs"] = [{"seed": int(seed), "step": int(st.step)} for seed, st in zip(runs.seeds, states)]
  # The same minibatches for every baseline and run (they depend on the batch size and the canvas only).
  inputs = [train.diagnostic_batch(config, images, labels, BATCH_SEED + i) for i in range(batches)]
  model = train.build_model(config)
  for b in baselines:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.baseline = b
    train.validate_config(cfg)
    btx = train.baseline_transform(cfg)
    # One compiled function per baseline for every run, each run with its own swept numbers (`hyper`; {} for one).
    diagnose = step_lib.make_diagnose(train.make_loss_fn(cfg, model), btx, num_estimates=estimates,
                                      uses_inference_network=False)
    for r, (st, row) in enumerate(zip(states, results["runs"])):
      st = st if b == config.baseline else st.replace(extra=btx.init())
      measured = [diagnose(st, batch, key, runs.hyper_of(r)) for batch, key in inputs]
      row[b] = {g: float(np.mean([m[f"diag/grad_var/{g}"] for m in measured])) for g in GROUPS
                if f"diag/grad_var/{g}" in measured[0]}
      log(f"run {r} (seed {row['seed']}, update {row['step']}), baseline {b}: "
          + ", ".join(f"{g} {v:.3g}" for g, v in row[b].items()))
  return results


def gv_counts(results: dict) -> dict[str, int]:
  """What a grad_variance report is measured by (`wsram_jax.report_files`): its (run, baseline) measurements; from
  OUT.json's content."""
  return {"measurements": sum(b in row for row in results["runs"] for b in results["baselines"])}


def markdown(results: dict) -> str:
  bs = results["baselines"]
  lines = [f"`{results['workdir']}` (trained with baseline {results['trained_baseline']}): the variance of the "
           f"gradient of theta, {results['estimates']} estimates on each of {results['batches']} fixed "
           "minibatches, at each run's newest checkpoint.", "",
           "| seed | update | " + " | ".join(f"baseline {b}" for b in bs) +
           "".join(f" | {b} / {bs[0]}" for b in bs[1:]) + " |",
           "|---|---|" + "---|" * (2 * len(bs) - 1)]
  for row in results["runs"]:
    theta = [row[b]["theta"] for b in bs]
    lines.append(f"| {row['seed']} | {row['step']:,} | " + " | ".join(f"{v:.3g}" for v in theta) +
                 "".join(f" | {v / theta[0]:.2f}x" for v in theta[1:]) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  if not FLAGS.workdir:
    raise errors.UserError("--workdir is required: the workdir of a trained VAR run.")
  if FLAGS.batches < 1 or FLAGS.estimates < 2 or not FLAGS.baselines:
    raise errors.ConfigError("--batches must be at least 1, --estimates at least 2, --baselines not empty.")
  missing = report.no_run(FLAGS.workdir)
  if missing:
    raise errors.ReportRefused(f"{missing}: --workdir must be a trained VAR run; nothing measured or written.")
  results = measure(FLAGS.workdir, FLAGS.baselines, FLAGS.batches, FLAGS.estimates)
  results["command"] = "python -m experiments.grad_variance " + shlex.join(sys.argv[1:])
  text = f"Command: `{results['command']}`\n\n" + markdown(results)
  if FLAGS.out:
    with report_files.Report(force=FLAGS.force, elsewhere="--out") as out:
      out.guard(FLAGS.out + ".json", gv_counts(results), lambda p: gv_counts(report_files.read_json(p)),
                default_destination=False)
      report.write_results(FLAGS.out, results, text, out)
  print(text)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
