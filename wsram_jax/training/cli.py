"""Entry-point helpers shared by the experiment binaries.

A binary's `main` raises `wsram_jax.errors.UserError` for anything the person running it can fix (bad flags,
missing data, ...). `run_main(main)` runs it under absl and turns such an error into its one-sentence message on
stderr and the error's `exit_code`, without a traceback. Any other exception is a bug and keeps its traceback.

`run_main` also turns on JAX's persistent compilation cache (`enable_compilation_cache`): the train step of a
configuration compiles once (5-8 s of XLA compilation on 2 CPU cores) and later runs load it in about 0.4 s;
and, with glibc, keeps freed memory in the heap (`keep_freed_memory`), which spares the CPU step thousands of
page faults.
"""
import functools
import logging
import os
import signal
import sys
from typing import Any, Callable, Optional, Sequence, TypeVar

from wsram_jax.errors import ConfigError, UserError
from wsram_jax.training import signals

F = TypeVar("F", bound=Callable[..., Any])


def report_user_errors(fn: F) -> F:
  """Wraps `fn` so that a `UserError` prints `error: <message>` to stderr and exits with its `exit_code`, and
  so that SIGINT or SIGTERM outside the training loop (which saves and raises `errors.Interrupted` itself)
  prints one line and exits with 128 + the signal's number (`training.signals`)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    # Orbax and jax log every checkpoint write and backend probe at INFO through absl; keep the console for
    # progress lines and warnings.
    for name in ("absl", "jax"):
      logging.getLogger(name).setLevel(logging.WARNING)
    try:
      with signals.StopOnSignals():
        return fn(*args, **kwargs)
    except UserError as e:
      print(f"{e.label}: {e}", file=sys.stderr)
      sys.exit(e.exit_code)
    except (signals.StopRequested, KeyboardInterrupt) as e:
      signum = getattr(e, "signum", signal.SIGINT)
      print(f"stopped: Stopped by {signals.signal_name(signum)} outside the training loop; the checkpoints "
            "written so far are intact.", file=sys.stderr)
      sys.exit(128 + signum)

  return wrapped  # type: ignore[return-value]


def _flag_error(e: BaseException) -> None:
  message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
  print(f"error: invalid flags: {message}", file=sys.stderr)
  sys.exit(2)


def define_config_file(name: str, default: str, help_string: str, **kwargs):
  """`ml_collections.config_flags.DEFINE_config_file`, with a bad default or override reported in one line.

  When no `--config=` is given, ml_collections loads the default and applies `--config.KEY=VALUE` overrides
  while the flag is being defined, before absl parses anything; a wrong key would then end in a traceback.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    _flag_error(e)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override (`--config.nope=1`, an unknown config variant, a
  value of the wrong type) reported as `error: <message>` and exit code 2 instead of a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
    _flag_error(e)


CACHE_ENV = "WSRAM_JAX_COMPILATION_CACHE"
_OFF = ("", "0", "off", "false", "no")  # environment values that turn a setting off


def compilation_cache_dir() -> Optional[str]:
  """The persistent compilation cache's directory: ``$WSRAM_JAX_COMPILATION_CACHE`` if set (``''``, ``0`` or
  ``off`` turn the cache off: None), else ``~/.cache/wsram_jax/xla``."""
  value = os.environ.get(CACHE_ENV)
  if value is None:
    return os.path.join(os.path.expanduser("~"), ".cache", "wsram_jax", "xla")
  return None if value.strip().lower() in _OFF else value


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `path` (default `compilation_cache_dir()`); returns the
  directory, or None when it is off or cannot be created (then every run compiles, as without a cache).

  Entries are keyed by the program, the compile options, the XLA flags and the jax/jaxlib versions, so a changed
  model or flag compiles afresh. Call before the first compilation.
  """
  import jax  # pylint: disable=g-import-not-at-top

  path = compilation_cache_dir() if path is None else path
  if not path:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.getLogger(__name__).warning("No compilation cache (%s); every run compiles its step afresh.", e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # the steps, not every small helper
  return path


def keep_freed_memory() -> bool:
  """With glibc, serves every allocation below 1 GiB from the heap and keeps freed memory there (`mallopt`:
  M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB - 1), and has JAX run CPU computations on the thread that calls
  them (``jax_cpu_enable_async_dispatch`` off); returns whether the `mallopt` calls applied. Call it before JAX
  starts.

  Why: XLA:CPU allocates a step's temporaries afresh on every execution (35 MB for the paper's step at B = 128).
  glibc serves an allocation above its mmap threshold (at most 32 MB) with new pages from the kernel, which
  zero-fills each on first touch: about 9,600 page faults per step at B = 128, 15-25% of the step's time
  (benchmarks.profile counted them as a slow `pad`). Kept in the heap, the same memory is reused step after step.
  Which heap: with asynchronous dispatch a worker thread runs the step and allocates from its own arena, whose
  extra 64 MB heaps glibc unmaps as soon as they empty, so some runs still page-faulted thousands of times per
  step (measured: 2 to 9,600 from run to run); on the calling thread the main heap serves them (0 to 2 per step).
  A single arena for all threads (M_ARENA_MAX 1) also stopped the faults but made the B = 32 step 3 ms slower
  (lock contention). The step's own work does not overlap with Python either way (each step needs the last).
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import ctypes.util  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
  return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def run_main(main: Callable[[Sequence[str]], Any]) -> None:
  """`absl.app.run(main)`, with `UserError`s reported as one sentence and an exit code (see module docstring),
  the persistent compilation cache on (`enable_compilation_cache`) and freed memory kept (`keep_freed_memory`;
  ``WSRAM_JAX_KEEP_FREED_MEMORY=0`` leaves glibc and JAX at their defaults, to measure what it changes)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def main_with_cache(argv):
    if os.environ.get("WSRAM_JAX_KEEP_FREED_MEMORY", "1").strip().lower() not in _OFF:
      keep_freed_memory()
    enable_compilation_cache()
    return main(argv)

  app.run(report_user_errors(main_with_cache), flags_parser=parse_flags)


def training_binary(default_config: str, train_and_evaluate: Callable[[Any, str], Any],
                    summary: Callable[[Any], str]) -> Callable[[], None]:
  """Defines the flags of a training binary (--config, --workdir, --jit) and returns its `run()`.

  `run()` trains `--config` in `--workdir` with `train_and_evaluate(config, workdir)` (which resumes a run
  found there) and prints `summary(result)`; user errors are one line and an exit code (`run_main`).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  config_flag = define_config_file("config", default_config, "Experiment configuration (file.py:variant).",
                                   lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
  jit_flag = flags.DEFINE_bool("jit", True, "Compile with jax.jit; --nojit runs op by op for debugging.")

  def main(argv):
    if len(argv) > 1:
      raise UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
    if not workdir_flag.value:
      raise ConfigError("--workdir is required: the directory for checkpoints and metrics.")
    config = config_flag.value
    with config.unlocked():
      config.jit = config.jit and jit_flag.value
    absl_logging.info("Configuration:\n%s", config)
    print(summary(train_and_evaluate(config, workdir_flag.value)))

  return lambda: run_main(main)
