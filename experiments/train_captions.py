r"""Trains and evaluates the multi-scale hard-attention captioner (paper Section 5.2).

    python -m experiments.train_captions --config=experiments/configs/captions.py:wsram_q_cv --workdir=/tmp/cap \
        [--config.num_steps=3000 --config.data.task=flickr8k --config.data.flickr8k_json=... ...]

Starting again with the same --workdir resumes the run from its newest readable checkpoint. `--nojit` runs
everything op by op (slow; for debugging). The logic lives in `wsram_jax.captioning.train.train_and_evaluate`;
logging, checkpoints, resume and error handling come from the training core (`wsram_jax.training`).
"""
from wsram_jax.captioning import train
from wsram_jax.training import cli

run = cli.training_binary("experiments/configs/captions.py:wsram_q_cv", train.train_and_evaluate, train.summary)

if __name__ == "__main__":
  run()
