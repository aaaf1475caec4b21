r"""Benchmarks the train step: compile time, ms/step, throughput, memory, FLOP utilisation, and the PyTorch peer.

    python -m experiments.benchmark [--batch_sizes=32,128] [--steps=60] [--rounds=6] [--out=benchmarks/results]

The data-parallel step (one XLA:CPU device per core, ``--xla_force_host_platform_device_count``) is timed in a
child process against the one-device step there. Compile times are cold: the persistent compilation cache is a
fresh temporary directory.

Writes OUT.json and OUT.md (a markdown table, also printed). The PyTorch eager peer runs in the same process,
interleaved with the JAX step, when torch is installed (`pip install torch==2.13.0`, the 'bench' extra). The logic
lives in `benchmarks.step`; see BENCHMARKS.md for the numbers and how to read them.
"""
import os
import tempfile

from absl import flags

from benchmarks import step as bench
from wsram_jax.training import cli
from wsram_jax import errors

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "128"], "Batch sizes B to measure.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per framework and batch size, after warm-up.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "The timed steps are split into this many interleaved rounds.")
_OUT = flags.DEFINE_string("out", None, "Write OUT.json and OUT.md (directories are created).")
_VARIANT = flags.DEFINE_string("variant", "wsram_q_cv", "Config variant of experiments/configs/mnist.py.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch eager peer (if torch is installed).")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["1", "0"], "PyTorch intra-op threads to try (0 = all cores).")
_DATA_PARALLEL = flags.DEFINE_integer(
    "data_parallel", 0, "Devices for the data-parallel step: 0 = one per CPU core, 1 = no data-parallel step.")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  try:
    batch_sizes = tuple(int(b) for b in _BATCH_SIZES.value)
    threads = tuple(int(t) for t in _TORCH_THREADS.value)
  except ValueError as e:
    raise errors.ConfigError(f"--batch_sizes and --torch_threads take integers: {e}.") from None
  if not batch_sizes or min(batch_sizes) < 1 or _STEPS.value < 1 or _ROUNDS.value < 1 or min(threads) < 0:
    raise errors.ConfigError("--batch_sizes, --steps and --rounds must be positive and --torch_threads >= 0.")
  if _DATA_PARALLEL.value < 0:
    raise errors.ConfigError("--data_parallel must be >= 0 (0 = one device per core, 1 = off).")
  options = bench.BenchmarkOptions(batch_sizes=batch_sizes, steps=_STEPS.value, rounds=_ROUNDS.value,
                                   variant=_VARIANT.value, torch=_TORCH.value, torch_threads=threads,
                                   data_parallel=_DATA_PARALLEL.value)
  with tempfile.TemporaryDirectory(prefix="wsram_jax_xla_cache_") as cache:
    cli.enable_compilation_cache(cache)  # cold compiles, then the same step from this (warm) cache
    results = bench.run(options, log=lambda s: print(s, flush=True))
  print(bench.write(results, _OUT.value))


if __name__ == "__main__":
  cli.run_main(main)
