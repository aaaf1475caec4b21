"""Quickstart: a preview of the translated-scaled MNIST canvases (paper Section 5.1).

    python -m experiments.quickstart --workdir=DIR [--num=32] [--seed=0] [--source=offline] [--data_dir=...]

Loads the MNIST test split, builds the first `num` evaluation canvases of `data.fixed_test_set` (the same ones
every run evaluates on for this seed), writes DIR/canvases.png and prints its path. The logic is the importable
`make_canvas_preview`; this binary only parses flags.
"""
import pathlib
from typing import Optional, Sequence

from absl import app
from absl import flags

from wsram_jax import cli
from wsram_jax import data
from wsram_jax import plots
from wsram_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this binary's flags; called only when it runs as a program, so that importing it (tests, other
  binaries defining their own --workdir) adds nothing to the global absl flags."""
  flags.DEFINE_string("workdir", None, "Directory for the outputs.")
  flags.DEFINE_integer("num", 32, "Number of canvases to draw.")
  flags.DEFINE_integer("seed", 0, "Seed of the fixed evaluation canvases.")
  flags.DEFINE_enum("source", "offline", ["offline", "idx", "tfds"], "MNIST source (see wsram_jax.data.mnist).")
  flags.DEFINE_string("data_dir", None, "Directory of the MNIST source; default: the source's own.")


def make_canvas_preview(workdir, *, num: int = 32, seed: int = 0, source: str = "offline",
                        data_dir: Optional[str] = None) -> pathlib.Path:
  """Writes `workdir/canvases.png`: the first `num` evaluation canvases for `seed`, labels and boxes drawn.

  Raises:
    ConfigError: num < 1 or more than the test split holds, or a bad source.
    DataError: the MNIST source is missing or corrupt.
  """
  if num < 1:
    raise ConfigError(f"--num must be at least 1, got {num}.")
  images, labels = data.load_mnist("test", source=source, data_dir=data_dir)
  if num > len(labels):
    raise ConfigError(f"--num={num} is more than the {len(labels)} test digits.")
  canvases, labels, boxes = data.fixed_test_set(images, labels, seed=seed, num=num)
  return plots.canvas_grid(canvases, labels, boxes, pathlib.Path(workdir) / "canvases.png",
                           title=f"translated-scaled MNIST, seed {seed}, sizes {data.DEFAULT_MIN_SIZE}-"
                                 f"{data.DEFAULT_MAX_SIZE} px on {data.DEFAULT_CANVAS_SIZE}x"
                                 f"{data.DEFAULT_CANVAS_SIZE}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required: the directory for the outputs.")
  path = make_canvas_preview(FLAGS.workdir, num=FLAGS.num, seed=FLAGS.seed, source=FLAGS.source,
                             data_dir=FLAGS.data_dir)
  print(path)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
