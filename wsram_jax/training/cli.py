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
import re
import signal
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

from wsram_jax.errors import ConfigError, UserError, exit_with_message
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
      exit_with_message(e)
    except (signals.StopRequested, KeyboardInterrupt) as e:
      signum = getattr(e, "signum", signal.SIGINT)
      print(f"stopped: Stopped by {signals.signal_name(signum)} outside the training loop; the checkpoints "
            "written so far are intact.", file=sys.stderr)
      sys.exit(128 + signum)

  return wrapped  # type: ignore[return-value]


# The config-file flags `define_config_file` defined: name -> default ("file.py:variant").
_CONFIG_FLAGS: dict[str, str] = {}


def _flag_error(message: str) -> NoReturn:
  print(f"error: invalid flags: {message}", file=sys.stderr)
  sys.exit(2)


def _config_arg(name: str, argv: Sequence[str]) -> str:
  """The value of ``--<name>=`` in `argv` (the last one), else the flag's default."""
  value = _CONFIG_FLAGS.get(name, "")
  for arg in argv[1:]:
    if arg.startswith((f"--{name}=", f"-{name}=")):
      value = arg.split("=", 1)[1]
  return value


def _flat_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for k in config.keys():
    keys.append(prefix + k)
    if hasattr(config[k], "keys"):
      keys += _flat_keys(config[k], prefix + k + ".")
  return keys


def _unknown_override(argv: Sequence[str]) -> Optional[str]:
  """For an override of a key that its config lacks (``--config.nosuchkey=1``): a sentence naming the key and
  the closest keys the config has; None when no override in `argv` is of an unknown key."""
  import difflib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top

  def load(arg):  # what ml_collections does with --config=FILE:ARG
    path, *variant = arg.split(":", 1)
    spec = importlib.util.spec_from_file_location("_config_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*variant)

  for name in _CONFIG_FLAGS:
    overrides = [a.lstrip("-").split("=", 1)[0][len(name) + 1:] for a in argv[1:]
                 if a.lstrip("-").startswith(name + ".")]
    if not overrides:
      continue
    path = _config_arg(name, argv)
    try:
      keys = _flat_keys(load(path))
    except Exception:  # pylint: disable=broad-except  # then the generic message will do
      return None
    for key in overrides:
      if key not in keys:
        closest = (difflib.get_close_matches(key, keys, n=3, cutoff=0.6) or
                   difflib.get_close_matches(key, keys, n=3, cutoff=0.0))
        return (f"--{name}.{key}: {path} has no key {key}; the closest it has: "
                f"{', '.join(closest) or 'none'}.")
  return None


# What a config file must be, for the messages that say it is not one.
CONFIG_FILE_CONTRACT = ("a Python file defining get_config() (taking the text after ':' when given) that returns "
                        "an ml_collections.ConfigDict")


def _config_path(name: str, argv: Sequence[str]) -> str:
  return _config_arg(name, argv).split(":", 1)[0]


def _in_config_file(e: BaseException, argv: Sequence[str]) -> Optional[str]:
  """For an error raised while a config file was executed: "FILE, line N: Type: message"; else None.

  ml_collections re-raises a TypeError or ValueError from the file as a new exception whose message holds the
  original traceback as text; the file's frame is read from that text then."""
  files = {os.path.abspath(_config_path(name, argv)) for name in _CONFIG_FLAGS}
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) in files:
    return f"{e.filename}, line {e.lineno}: SyntaxError: {e.msg}"
  text = str(e).strip()
  for frame in reversed(traceback.extract_tb(e.__traceback__)):
    if os.path.abspath(frame.filename) in files:
      return f"{frame.filename}, line {frame.lineno}: {type(e).__name__}: {text.splitlines()[0] if text else ''}"
  frames = re.findall(r'File "([^"]+)", line (\d+)', text)
  for filename, lineno in reversed(frames):
    if os.path.abspath(filename) in files:
      return f"{filename}, line {lineno}: {text.splitlines()[-1].strip()}"
  return None


def _not_a_config_file(e: BaseException, argv: Sequence[str]) -> Optional[str]:
  """For a config file without get_config (ml_collections loads FILE as the module ``<flag>_config`` and reads its
  attribute): one sentence naming the file and what it must define; else None."""
  found = re.search(r"module '(\w+)_config' has no attribute 'get_config'", str(e))
  if not found or found.group(1) not in _CONFIG_FLAGS:
    return None
  name = found.group(1)
  path = _config_path(name, argv)
  hint = "" if path.endswith(".py") else f" ({os.path.basename(path)} is not a .py file)"
  return (f"--{name}={_config_arg(name, argv)}: {path} defines no get_config(){hint}; a config file is "
          f"{CONFIG_FILE_CONTRACT}.")


def _report_flag_error(e: BaseException, argv: Sequence[str]) -> NoReturn:
  """One line for an exception raised while the flags were parsed (and the config file executed), exit 2."""
  message = _unknown_override(argv) or _not_a_config_file(e, argv) or _in_config_file(e, argv)
  if message is None:
    text = str(e).strip()
    message = text.splitlines()[-1] if text else type(e).__name__
  _flag_error(message)


def define_config_file(name: str, default: str, help_string: str, **kwargs):
  """`ml_collections.config_flags.DEFINE_config_file`, with a bad default or override reported in one line.

  When no `--config=` is given, ml_collections loads the default and applies `--config.KEY=VALUE` overrides
  while the flag is being defined, before absl parses anything; a wrong key would then end in a traceback.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG_FLAGS[name] = default
  # ml_collections warns that get_config() returned None before anything uses it; `parse_flags` says it in its
  # one line instead.
  logging.getLogger("absl").addFilter(lambda record: "get_config() returned None" not in record.getMessage())
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # whatever the config file raises is bad input
    _report_flag_error(e, sys.argv)


def _check_config_loaded(name: str, argv: Sequence[str]) -> None:
  """ml_collections defers the error of a config file that cannot be opened until the config is first used, and
  takes whatever get_config() returns; report either now, in one line."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  path = _config_path(name, argv)
  value = flags.FLAGS[name].value
  try:
    getattr(value, "keys", None)
  except OSError as e:
    reason = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    _flag_error(f"--{name}: cannot load the config file {path} ({reason}).")
  if not isinstance(value, ml_collections.ConfigDict):
    _flag_error(f"--{name}={_config_arg(name, argv)}: get_config() in {path} returned "
                f"{'None' if value is None else 'a ' + type(value).__name__}, not an ml_collections.ConfigDict; "
                f"a config file is {CONFIG_FILE_CONTRACT}.")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override (`--config.nope=1`, an unknown config variant, a
  value of the wrong type) or a config file that is missing or fails to run reported as `error: <message>`
  and exit code 2 instead of a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # flags and config files are all the user's input
    _report_flag_error(e, argv)
  for name in _CONFIG_FLAGS:
    if name in flags.FLAGS:
      _check_config_loaded(name, argv)
  return rest


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
      raise ConfigError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
    if not workdir_flag.value:
      raise ConfigError("--workdir is required: the directory for checkpoints and metrics.")
    config = config_flag.value
    with config.unlocked():
      config.jit = config.jit and jit_flag.value
    absl_logging.info("Configuration:\n%s", config)
    from wsram_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top  (JAX not started yet)
    runs_lib.use_cpu_cores(config)
    print(summary(train_and_evaluate(config, workdir_flag.value)))

  return lambda: run_main(main)
