r"""Benchmarks the train step of the default model against PyTorch, eager and compiled: ms/step, compile time,
throughput, memory, FLOP utilisation.

    python -m experiments.benchmark [--batch_sizes=32,128] [--steps=60] [--rounds=6] [--out=benchmarks/results/X]
        [--torch_compile_modes=default,max-autotune-no-cudagraphs] [--torch_compile_threads=0]
        [--torch_threads=1,0] [--compile_repeats=1] [--notorch] [--variant=wsram_q_cv]

The PyTorch peers (`benchmarks/torch_peer.py`: the same model and step, eager at each thread count and under
``torch.compile``) run in the same process, interleaved with the JAX step, when torch is installed (``make
bench`` installs it and runs this). A ``--variant`` whose features the peer lacks is refused (``--notorch`` times
the JAX step alone). The data-parallel step (one XLA:CPU device per core) is timed in a child process, and cold
compile time in fresh processes by the one definition of `benchmarks.coldcompile`. Inductor compiles into a fresh
temporary cache (``TORCHINDUCTOR_CACHE_DIR``): the first compiled peer's compile time is cold, later ones reuse
the kernels it built.

Writes OUT.json and OUT.md (a markdown table, also printed), atomically; inside this checkout never over a
benchmark that timed more batch sizes or PyTorch peers, unless --force (`benchmarks.report.write_files`). A thin
binary over `benchmarks.step` (which does not import this package); BENCHMARKS.md has the numbers and how to read
them.
"""
import os
import tempfile

from absl import flags

from benchmarks import report
from benchmarks import step as bench
from wsram_jax import errors
from wsram_jax.training import cli

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "128"], "Batch sizes B to measure.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per framework and batch size, after warm-up.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "The timed steps are split into this many interleaved rounds.")
_OUT = flags.DEFINE_string("out", None, "Write OUT.json and OUT.md (directories are created).")
_FORCE = flags.DEFINE_bool("force", False,
                           "Write --out even over a benchmark with more measurements inside this checkout.")
_VARIANT = flags.DEFINE_string("variant", "wsram_q_cv", "Config variant of experiments/configs/mnist.py.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch peers (if torch is installed).")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["1", "0"], "Eager PyTorch's intra-op threads (0 = all cores).")
_COMPILE_MODES = flags.DEFINE_list(
    "torch_compile_modes", ["default", "max-autotune-no-cudagraphs"],
    "torch.compile modes of the compiled peers (empty: none); on a CPU reduce-overhead is default's and max-autotune "
    "max-autotune-no-cudagraphs' (CUDA graphs need a GPU).")
_COMPILE_THREADS = flags.DEFINE_list("torch_compile_threads", ["0"],
                                    "Compiled PyTorch's intra-op threads, each compiled apart (0 = all cores).")
_COMPILE_REPEATS = flags.DEFINE_integer("compile_repeats", 1, "Cold-compile processes per batch size (0: none).")
_DATA_PARALLEL = flags.DEFINE_integer(
    "data_parallel", 0, "Devices for the data-parallel step: 0 = one per CPU core, 1 = no data-parallel step.")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  try:
    batch_sizes = tuple(int(b) for b in _BATCH_SIZES.value)
    threads = tuple(int(t) for t in _TORCH_THREADS.value)
    compile_threads = tuple(int(t) for t in _COMPILE_THREADS.value)
  except ValueError as e:
    raise errors.ConfigError(
        f"--batch_sizes, --torch_threads and --torch_compile_threads take integers: {e}.") from None
  if (not batch_sizes or min(batch_sizes) < 1 or _STEPS.value < 1 or _ROUNDS.value < 1
      or min(threads + compile_threads, default=0) < 0):
    raise errors.ConfigError("--batch_sizes, --steps and --rounds must be positive and --torch_threads and "
                             "--torch_compile_threads >= 0.")
  if _DATA_PARALLEL.value < 0 or _COMPILE_REPEATS.value < 0:
    raise errors.ConfigError("--data_parallel (0 = one device per core, 1 = off) and --compile_repeats must be >= 0.")
  options = bench.BenchmarkOptions(batch_sizes=batch_sizes, steps=_STEPS.value, rounds=_ROUNDS.value,
                                   variant=_VARIANT.value, torch=_TORCH.value, torch_threads=threads,
                                   torch_compile_modes=tuple(m for m in _COMPILE_MODES.value if m),
                                   torch_compile_threads=compile_threads,
                                   data_parallel=_DATA_PARALLEL.value, compile_repeats=_COMPILE_REPEATS.value)
  bench.check_options(options)  # a bad variant or one the peer lacks: one line, before anything compiles
  with tempfile.TemporaryDirectory(prefix="wsram_jax_bench_") as tmp:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")  # cold torch.compile
    cli.enable_compilation_cache(os.path.join(tmp, "xla"))  # nothing read from or left in the user's cache
    results = bench.run(options, log=lambda s: print(s, flush=True))
  print(report.write(results, _OUT.value, force=_FORCE.value))


if __name__ == "__main__":
  cli.run_main(main)
