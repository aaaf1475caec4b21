r"""Where the train step's time goes: a `jax.profiler` trace of a few steps, summed by kernel.

    python -m benchmarks.profile [--batch_size=128] [--steps=10] [--trace_dir=/tmp/wsram_trace] [--top=25]
    taskset -c 0 python -m benchmarks.profile ...      # one core: kernel times without two threads overlapping

Compiles the paper's step (``wsram_q_cv``, synthetic digits as in `benchmarks.step`), traces ``--steps`` steps and
reads the trace's complete events back: the time per step of every compiled kernel (XLA:CPU names a kernel after
its fusion, e.g. ``ynn_fusion.12`` for a matmul handed to YNNPACK, ``dot.70`` for one run by Eigen,
``copy_pad_fusion``), grouped by kind, and the largest kernels with their shape and the JAX operation they come
from (from the optimised HLO). The trace itself stays in ``--trace_dir`` for TensorBoard's profile plugin or
Perfetto. On two cores two kernels can run at once, so the sum of kernel times can exceed the step's wall time;
under ``taskset -c 0`` it cannot. Also counted: minor page faults per step (memory the kernel had to hand out and
zero-fill; `wsram_jax.cli.keep_freed_memory`, which this binary applies like every other, keeps them few).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import flags

from benchmarks import common
from benchmarks import step as bench
from wsram_jax.training import cli
from wsram_jax import errors

_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size B.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps to trace (after 10 untraced warm-up steps).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/wsram_trace", "Where the trace is written (replaced).")
_TOP = flags.DEFINE_integer("top", 25, "How many of the largest non-matmul kernels to list.")
_VARIANT = flags.DEFINE_string("variant", "wsram_q_cv", "Config variant of experiments/configs/mnist.py.")

# Host-side events of the runtime (not kernels): they contain the kernels or wait for them.
_WRAPPERS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "CommonPjRt", "ParseArguments", "while")


def kind(name: str) -> str:
  """The kind of an XLA:CPU kernel, from its name."""
  if name.startswith("ynn"):
    return "matmul (YNNPACK)"
  if name.startswith(("dot", "xnn", "onednn")):
    return "matmul (Eigen / other library)"
  if "gather" in name:
    return "gather (glimpse windows)"
  if "pad" in name or "copy" in name or "transpose" in name:
    return "copy / pad / transpose"
  return "elementwise, reductions, other"


def hlo_index(hlo: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, the JAX op_name it comes from), from an optimised HLO module."""
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) \w+\(", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (m.group(2), op.group(1) if op else "")
  return out


def kernel_times(trace_dir: str, steps: int) -> dict[str, float]:
  """Kernel name -> milliseconds per step, from the newest trace under `trace_dir`."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not files:
    raise errors.UserError(f"jax.profiler wrote no trace under {trace_dir}; is the profiler plugin installed?")
  with gzip.open(files[-1], "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  totals = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_WRAPPERS) and "Await" not in e["name"]:
      totals[e["name"]] += e["dur"] / 1000.0 / steps  # microseconds -> ms per step
  return dict(totals)


def profile(batch_size: int, steps: int, trace_dir: str, variant: str = "wsram_q_cv") -> dict[str, Any]:
  """Traces `steps` steps of the compiled train step; returns the wall time per step and the kernel times."""
  config = common.make_config(variant, batch_size)
  images, labels = common.synthetic_digits(10000)
  step = bench.build_jax_step(config, images, labels)
  for _ in range(10):
    step.run()
  wall = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(20):
    t = time.perf_counter()
    step.run()
    wall.append(time.perf_counter() - t)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 20
  shutil.rmtree(trace_dir, ignore_errors=True)
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    step.run()
  jax.profiler.stop_trace()
  kernels = kernel_times(trace_dir, steps)
  by_kind = collections.defaultdict(float)
  for name, ms in kernels.items():
    by_kind[kind(name)] += ms
  return {"batch_size": batch_size, "step_ms_untraced": float(np.median(wall)) * 1000.0, "page_faults": faults,
          "kernels_ms": kernels, "by_kind_ms": dict(by_kind), "hlo": hlo_index(step.run.hlo),
          "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def report(result: dict[str, Any], top: int) -> str:
  lines = [f"B={result['batch_size']}, cores {result['affinity']}: step {result['step_ms_untraced']:.1f} ms "
           f"(median, untraced), {result['page_faults']:.0f} page faults per step; kernel time per step by kind:"]
  total = sum(result["by_kind_ms"].values())
  for k, ms in sorted(result["by_kind_ms"].items(), key=lambda kv: -kv[1]):
    lines.append(f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {k}")
  lines.append(f"  {total:8.2f} ms  total kernel time")
  lines.append("largest kernels other than matmuls (ms per step, result shape, JAX op):")
  others = [(n, ms) for n, ms in result["kernels_ms"].items() if not kind(n).startswith("matmul")]
  for name, ms in sorted(others, key=lambda kv: -kv[1])[:top]:
    shape, op = result["hlo"].get(name, ("?", ""))
    lines.append(f"  {ms:7.3f}  {name:28s} {shape[:36]:36s} {op[-60:]}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  if _BATCH.value < 1 or _STEPS.value < 1:
    raise errors.ConfigError("--batch_size and --steps must be positive.")
  print(report(profile(_BATCH.value, _STEPS.value, _TRACE_DIR.value, _VARIANT.value), _TOP.value))


if __name__ == "__main__":
  cli.run_main(main)
