"""What the benchmarks read from the operating system (Linux's /proc, else `resource`): the process's resident set
and its peak, the CPU model, and the machine's load, with the library versions (`environment`)."""
from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any, Optional

__all__ = ["reset_peak_rss", "peak_rss_mb", "current_rss_mb", "environment"]


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS counter of this process (Linux: ``echo 5 > /proc/self/clear_refs``); whether it
  could."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _status_mb(field: str) -> Optional[float]:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return round(int(line.split()[1]) / 1024, 1)
  except OSError:
    pass
  return None


def peak_rss_mb() -> float:
  """The process's peak resident set since the last `reset_peak_rss` (or since it started), MB."""
  peak = _status_mb("VmHWM")
  return peak if peak is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mb() -> Optional[float]:
  """The process's resident set now, MB (None where /proc is not there)."""
  return _status_mb("VmRSS")


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return cpu


def environment() -> dict[str, Any]:
  """Versions (Python, jax, jaxlib, torch when installed), devices, core count, CPU model, XLA flags and the load
  average (1, 5, 15 min)."""
  import jax  # pylint: disable=g-import-not-at-top
  env = {
      "python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jax.lib.__version__,
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "cpu": cpu_model(),
      "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top
    env["torch"] = torch.__version__
    env["torch_default_threads"] = torch.get_num_threads()
  except ImportError:
    env["torch"] = None
  return env
