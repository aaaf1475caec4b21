"""Shared test settings and fixtures: tests run on the CPU and never reach the network."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA compilation of small programs: skipping LLVM's backend optimisations halves it
# (measured here) and changes nothing the tests assert. Subprocesses started by tests inherit it.
# XLA's older fusion emitters (what the steps use, `training.step.compiler_options`) for every other program too:
# test_runs.py took 149 s with the MLIR emitters everywhere, 104 s with the old ones in the steps only, 96 s here.
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0].lstrip("-") not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pytest  # pylint: disable=g-import-not-at-top

# The library's helpers, imported here by the test modules too (`from conftest import synthetic_digits`).
from wsram_jax.data.synthetic import synthetic_digits  # pylint: disable=g-import-not-at-top
from wsram_jax.training.config import apply_overrides  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory):
  """A directory of IDX files (128 train, 32 test synthetic digits) for `--config.data.source=idx`."""
  from wsram_jax.data import mnist  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("tiny_mnist")
  for split, n, seed in (("train", 128, 0), ("test", 32, 1)):
    mnist.write_idx_split(directory, split, *synthetic_digits(n, seed))
  return directory


def tiny_overrides(data_dir) -> dict:
  """Config overrides that make the MNIST trainer small enough for a test: 40 px canvas, 2 scales, D=16."""
  return {
      "data.source": "idx", "data.data_dir": str(data_dir), "data.canvas_size": 40, "data.min_size": 14,
      "data.max_size": 24, "data.num_test": 32, "data.eval_batch_size": 16, "model.glimpse_size": 6,
      "model.num_scales": 2, "model.lowres_size": 4, "model.hidden_size": 16, "batch_size": 8,
      "num_samples": 3, "num_glimpses": 2, "num_steps": 6, "log_every": 2, "eval_every": 3,
      "checkpoint_every": 3, "diag_every": 3, "diag_num_estimates": 4,
  }


@pytest.fixture
def tiny_config(tiny_mnist_dir):
  """`tiny_config(variant, **overrides)` -> a small MNIST ConfigDict on the synthetic IDX data."""
  from experiments.configs import mnist as mnist_configs  # pylint: disable=g-import-not-at-top

  def make(variant="wsram_q_cv", **overrides):
    config = mnist_configs.get_config(variant)
    apply_overrides(config, tiny_overrides(tiny_mnist_dir))
    return apply_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})

  return make
