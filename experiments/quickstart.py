r"""The README's main job: a short real WS-RAM+q+c training run on translated and scaled MNIST.

    python -m experiments.quickstart --workdir=runs/quickstart [--config.num_steps=3000 ...]

Writes to --workdir: canvases.png (the first fixed test canvases with labels and boxes), the run itself
(metrics.jsonl, TensorBoard events, checkpoints), curves.png (training curves) and glimpses.png (the trained
model's glimpse paths on test canvases), then prints the test error, where the later glimpses went and the ESS.
Running it again resumes the run (and only redraws the figures once it is complete). The config is
`experiments/configs/mnist.py:quick`; any value can be overridden with --config.KEY=VALUE.
"""
import os
import pathlib
from typing import Optional, Sequence

from absl import flags

from experiments import report
from wsram_jax.training import cli
from wsram_jax import data
from wsram_jax import errors
from wsram_jax import plots
from wsram_jax.classifier import train

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this binary's flags; called only when it runs as a program, so that importing it (tests, other
  binaries defining their own --workdir) adds nothing to the global absl flags."""
  cli.define_config_file("config", "experiments/configs/mnist.py:quick", "Experiment configuration.")
  flags.DEFINE_string("workdir", "runs/quickstart", "Directory for the outputs.")


def make_canvas_preview(workdir, *, num: int = 32, seed: int = 0, source: str = "offline",
                        data_dir: Optional[str] = None, sizes: Optional[dict] = None) -> pathlib.Path:
  """Writes `workdir/canvases.png`: the first `num` evaluation canvases for `seed`, labels and boxes drawn.

  Raises:
    ConfigError: num < 1 or more than the test split holds, or a bad source.
    DataError: the MNIST source is missing or corrupt.
  """
  if num < 1:
    raise errors.ConfigError(f"--num must be at least 1, got {num}.")
  images, labels = data.load_mnist("test", source=source, data_dir=data_dir)
  if num > len(labels):
    raise errors.ConfigError(f"--num={num} is more than the {len(labels)} test digits.")
  sizes = sizes or dict(canvas_size=data.DEFAULT_CANVAS_SIZE, min_size=data.DEFAULT_MIN_SIZE,
                        max_size=data.DEFAULT_MAX_SIZE)
  canvases, labels, boxes = data.fixed_test_set(images, labels, seed=seed, num=num, **sizes)
  return plots.canvas_grid(canvases, labels, boxes, pathlib.Path(workdir) / "canvases.png",
                           title=f"translated-scaled MNIST, seed {seed}, sizes {sizes['min_size']}-"
                                 f"{sizes['max_size']} px on {sizes['canvas_size']}x{sizes['canvas_size']}")


def run_quickstart(config, workdir: str) -> str:
  """Preview, train (resuming), plot; returns the summary line (test error, glimpses on the digit, ESS)."""
  train.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  d = config.data
  make_canvas_preview(workdir, num=min(32, d.num_test), seed=d.test_seed, source=d.source,
                      data_dir=d.data_dir or None, sizes=train.canvas_kwargs(config))
  last = train.train_and_evaluate(config, workdir)
  report.training_curves(workdir, os.path.join(workdir, "curves.png"))
  data = train.load_data(config)
  state = train.restore_state(config, workdir)
  train.glimpse_figure(config, state.params, data.test_canvases, data.test_labels,
                       os.path.join(workdir, "glimpses.png"), boxes=data.test_boxes)
  return train.summary(last)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  line = run_quickstart(FLAGS.config, FLAGS.workdir)
  print(f"Wrote {FLAGS.workdir}/canvases.png, curves.png, glimpses.png.")
  print(line)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
