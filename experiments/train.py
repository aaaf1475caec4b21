r"""Trains and evaluates an attention classifier on translated and scaled MNIST.

    python -m experiments.train --config=experiments/configs/mnist.py:wsram_q_cv --workdir=/tmp/run \
        [--config.num_samples=5 ...]

Starting again with the same --workdir resumes the run from its newest readable checkpoint. `--nojit` runs
everything op by op (slow; for debugging). The logic lives in
`wsram_jax.classifier.train.train_and_evaluate`.
"""
from wsram_jax.training import cli
from wsram_jax.classifier import train

run = cli.training_binary("experiments/configs/mnist.py:wsram_q_cv", train.train_and_evaluate, train.summary)

if __name__ == "__main__":
  run()
