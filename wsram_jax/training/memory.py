"""Memory: what a compiled step needs, what the machine has left, and running out of it in one line.

`training.loop.run(step_memory=...)` compares, before the first step, XLA's estimate of the step (`step_bytes`,
from the compiled program's `memory_analysis()`: temporaries and outputs, the arguments being resident
already) with what is available (`available_bytes`) and refuses a step that cannot fit with one sentence
(`check_fits`, `errors.ConfigError`, exit 2); a step that takes more than half of it gets a warning. An
allocation that fails anyway (the evaluation, another process taking memory meanwhile) becomes
`errors.ResourceError` in the loop (`is_out_of_memory`).

The estimate compiles the step once; the first call reuses that executable, so it costs no second compilation.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import jax

from wsram_jax import errors

__all__ = ["step_bytes", "available_bytes", "format_bytes", "check_fits", "is_out_of_memory"]

log = logging.getLogger(__name__)


def step_bytes(jitted: Callable[..., Any], *args) -> int:
  """XLA's estimate of the memory one call `jitted(*args)` allocates beyond its arguments: its temporaries, its
  outputs (less those aliased to donated arguments) and its generated code. `jitted` is a `jax.jit` function."""
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:  # a backend without the analysis
    return 0
  return int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.generated_code_size_in_bytes)


def _read_int(path: str) -> Optional[int]:
  try:
    with open(path, encoding="ascii") as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None


def _host_available() -> Optional[int]:
  """The kernel's MemAvailable, or less when a cgroup (v2 or v1) limits this process's memory."""
  available = None
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          available = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    if limit is not None and usage is not None and limit < (1 << 60):  # v1 writes ~2^63 for "no limit"
      available = max(limit - usage, 0) if available is None else min(available, max(limit - usage, 0))
  return available


def available_bytes() -> Optional[int]:
  """Memory a step may still take on the first local device: for an accelerator, its allocator's limit less
  what is in use; for the CPU, the host's available memory (`_host_available`). None when unknown."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return _host_available() if os.name == "posix" else None


def format_bytes(n: int) -> str:
  for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def check_fits(needed: int) -> None:
  """Raises `errors.ConfigError` when a step that needs `needed` bytes cannot fit in `available_bytes()`; warns
  when it takes more than half of it."""
  available = available_bytes()
  if available is None:
    return
  where = jax.local_devices()[0].platform.upper()
  if needed > available:
    raise errors.ConfigError(
        f"One training step needs about {format_bytes(needed)} (XLA's estimate) but only "
        f"{format_bytes(available)} are available on the {where}; lower --config.batch_size or "
        "--config.num_samples.")
  if needed > available / 2:
    log.warning("One training step needs about %s of the %s available on the %s (XLA's estimate).",
                format_bytes(needed), format_bytes(available), where)


def is_out_of_memory(e: BaseException) -> bool:
  """Whether `e` is a failed allocation: a MemoryError, or XLA's RESOURCE_EXHAUSTED / out-of-memory error."""
  if isinstance(e, MemoryError):
    return True
  text = str(e)
  return isinstance(e, RuntimeError) and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)
