r"""Writes one run of a trained classifier as a model file (`wsram_jax.classifier.pretrained`).

    python -m experiments.export_model --workdir=WORKDIR [--run=0] [--out=models/wsram_q_cv.npz]

Restores the newest readable checkpoint of WORKDIR (read-only: a run may still be training there), takes run
--run of a several-run job (`--config.num_runs`; its seed and swept values go into the file's config), keeps
the parameters only, and records

* ``metrics.training``: every metric the run logged at the checkpoint's step (``eval/error_sampled`` and the
  rest of the evaluation on ``config.data.num_test`` canvases, the training averages, the diagnostics);
* ``metrics.test_check``: `pretrained.evaluate` on the first 2,000 fixed test canvases (all of them when the
  data holds fewer; what ``tests/test_pretrained.py`` measures again);

and where it came from (workdir, run, seed, step, the training command in WORKDIR/command.txt when there is one).
The file is read back with `pretrained.load` before the binary reports its size and hashes. The shipped model,
``models/wsram_q_cv.npz``, is this binary's output for the default WS-RAM+q+c run that ``source`` in it names.
"""
import math
import os
import shlex
import sys
from typing import Sequence

from absl import flags

from wsram_jax import errors
from wsram_jax.classifier import pretrained
from wsram_jax.training import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This binary's flags (defined only when it runs as a program)."""
  flags.DEFINE_string("workdir", None, "A classifier training workdir (one run, or several as one program).")
  flags.DEFINE_integer("run", 0, "Which run of a several-run workdir (0-based; seed = config.runs.seed[run]).")
  flags.DEFINE_string("out", str(pretrained.DEFAULT_PATH.relative_to(pretrained.DEFAULT_PATH.parents[1])),
                      "The model file to write.")


def _finite(value):
  """A metric as JSON takes it (NaN and inf as strings, as metrics.jsonl writes them)."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def logged_at(run_dir: str, step: int) -> dict:
  """Every metric the run in `run_dir` logged at `step` (later lines of that step win)."""
  from wsram_jax.training import metric_writers  # pylint: disable=g-import-not-at-top
  out = {}
  for record in metric_writers.read_metrics(run_dir):
    if record["step"] == step:
      out.update({k: _finite(v) for k, v in record.items() if k != "step"})
  return out


def export(workdir: str, run: int, out: str, *, command: str = "", log=print) -> pretrained.TrainedModel:
  """Writes run `run` of `workdir`'s newest checkpoint to `out` (module docstring) and returns it, loaded."""
  import jax  # pylint: disable=g-import-not-at-top
  from wsram_jax.classifier import train  # pylint: disable=g-import-not-at-top
  from wsram_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from wsram_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
  from wsram_jax.training import trainer  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(workdir)
  several = runs_lib.from_config(config).num_runs > 1
  _, state, _, config = trainer.restore_run(train.TASK, config, workdir, run)
  run_dir = os.path.join(workdir, f"run_{run}") if several else workdir
  step = int(state.step)
  params = jax.device_get(state.params)
  training = {"step": step, **logged_at(run_dir, step)}
  if not any(k.startswith("eval/") for k in training):
    log(f"warning: run {run} logged no evaluation at step {step}; the file records the "
        f"{pretrained.NUM_CHECK_CANVASES:,}-canvas numbers only.")
  canvas = train.canvas_kwargs(config)
  unchecked = pretrained.TrainedModel(params=params, model=train.build_model(config), config=config,
                                      canvas=canvas, metrics={}, source={}, sha256="", path="")
  check = pretrained.evaluate(unchecked, *unchecked.test_set(pretrained.NUM_CHECK_CANVASES))
  train_command = ""
  if os.path.exists(os.path.join(workdir, "command.txt")):
    with open(os.path.join(workdir, "command.txt"), encoding="utf-8") as f:
      train_command = f.read().strip()
  source = {"workdir": os.path.abspath(workdir), "run": run, "seed": int(config.seed), "step": step,
            "training_command": train_command, "export_command": command, "jax": jax.__version__}
  pretrained.save(out, params, config, canvas=canvas, metrics={"training": training, "test_check": check},
                  source=source)
  model = pretrained.load(out)
  log(f"wrote {out} ({os.path.getsize(out) / 2**20:.2f} MiB): run {run} (seed {config.seed}) of {workdir} at "
      f"update {step:,}; on {check['num_canvases']:,} test canvases error {check['error_sampled']:.2%} (M = "
      f"{model.num_samples} samples), {check['error_greedy']:.2%} (greedy), log p(y|I) >= {check['log_p_y']:.4f}; "
      f"parameters' sha256 {model.sha256}")
  return model


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  if not FLAGS.workdir:
    raise errors.UserError("--workdir is required: the workdir of a trained classifier run.")
  export(FLAGS.workdir, FLAGS.run, FLAGS.out,
         command="python -m experiments.export_model " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
