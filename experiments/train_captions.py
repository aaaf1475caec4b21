r"""Trains and evaluates the multi-scale hard-attention captioner (paper Section 5.2).

    python -m experiments.train_captions --config=experiments/configs/captions.py:wsram_q_cv --workdir=/tmp/cap \
        [--config.num_steps=3000 --config.data.task=flickr8k --config.data.flickr8k_json=... ...]

Starting again with the same --workdir resumes the run from its newest readable checkpoint. `--nojit` runs
everything op by op (slow; for debugging). The logic lives in `wsram_jax.captioning.train.train_and_evaluate`;
logging, checkpoints, resume and error handling are the classifier's (`wsram_jax.loop`, `wsram_jax.cli`).
"""
from absl import flags
from absl import logging
from ml_collections import config_flags

from wsram_jax import cli
from wsram_jax import errors
from wsram_jax.captioning import train

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/captions.py:wsram_q_cv",
                                          "Experiment configuration (file.py:variant).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_JIT = flags.DEFINE_bool("jit", True, "Compile with jax.jit; --nojit runs op by op for debugging.")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  if not _WORKDIR.value:
    raise errors.ConfigError("--workdir is required: the directory for checkpoints and metrics.")
  config = _CONFIG.value
  with config.unlocked():
    config.jit = config.jit and _JIT.value
  logging.info("Configuration:\n%s", config)
  last = train.train_and_evaluate(config, _WORKDIR.value)
  print(train.summary(last))


if __name__ == "__main__":
  cli.run_main(main)
