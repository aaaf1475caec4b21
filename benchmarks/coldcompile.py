"""Cold compile time of the train step: the one definition, used by `python -m experiments.benchmark` and
`python -m benchmarks.compile`.

**Cold compile** = the wall time of lowering the jitted train step (``step.lower(state, images, labels)``:
tracing the model and emitting StableHLO, Python) plus XLA compiling it (``lowered.compile()``), in a fresh Python
process (no trace or executable cached in memory) whose persistent compilation cache is on, as in every binary
here, but empty (a fresh directory: what the first run of a configuration pays, writing the cache entry
included). The model, its initial state and the data are built first and not counted; importing JAX and the
package is not counted. Reported as ``lower_s + compile_s = total_s`` (wall) with the process CPU time of each.

**Second run** = the same in a fresh process whose persistent cache holds the step (the cold process's
directory): lowering plus loading the executable, what a resumed run or a second run of the configuration pays.

`measure` runs one such process (``python -m benchmarks.coldcompile SPEC``) and returns its JSON. ``spec``:
``variant``, ``batch_size``, ``overrides`` (``[dotted key, value]`` pairs), optionally ``num_runs`` (R > 1: the
run axis split over one XLA CPU device per core, as the training binary does), ``compiler_options`` (XLA
options over `wsram_jax.training.step.compiler_options`, e.g. the fusion emitters) and ``config_file``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional

__all__ = ["measure", "cold_and_second_run", "build"]


def _cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def build(spec: dict[str, Any]):
  """``(jitted step, state, images, labels)`` for `spec` (`make_train_step` with the spec's compiler options)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from wsram_jax.classifier import train  # pylint: disable=g-import-not-at-top
  from wsram_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  overrides = tuple(tuple(o) for o in spec.get("overrides", ())) + (("num_runs", int(spec.get("num_runs", 1))),)
  config = common.make_config(spec["variant"], spec["batch_size"], overrides,
                              spec.get("config_file", common.CONFIG_FILE))
  model = train.build_model(config)
  optimizer = step_lib.make_optimizer(config)
  state = train.create_train_state(config, model, optimizer)
  images, labels = common.synthetic_digits(10000)
  defaults = step_lib.compiler_options
  extra = spec.get("compiler_options") or {}
  step_lib.compiler_options = lambda: {**defaults(), **extra}
  try:
    step = train.make_train_step(config, model, optimizer)
  finally:
    step_lib.compiler_options = defaults
  return step, state, jnp.asarray(images), jnp.asarray(labels)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
  """In a fresh process: build the step, then time its lowering and compilation (see the module docstring)."""
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from wsram_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_num_cpu_devices", runs_lib.cpu_devices(int(spec.get("num_runs", 1))))
  if spec.get("cache_dir"):
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the step, however fast it compiles
  step, state, images, labels = build(spec)
  t0, c0 = time.perf_counter(), _cpu_s()
  lowered = step.lower(state, images, labels)
  t1, c1 = time.perf_counter(), _cpu_s()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), _cpu_s()
  return {"lower_s": round(t1 - t0, 3), "lower_cpu_s": round(c1 - c0, 3), "compile_s": round(t2 - t1, 3),
          "compile_cpu_s": round(c2 - c1, 3), "total_s": round(t2 - t0, 3),
          "fusions": compiled.as_text().count(" fusion(")}


def measure(spec: dict[str, Any], *, cache_dir: Optional[str] = None,
            env: Optional[dict[str, str]] = None) -> dict[str, Any]:
  """Lowers and compiles the step of `spec` in a fresh process with the persistent cache in `cache_dir` (a fresh
  temporary directory when None: cold) and returns the times (see the module docstring). `env`: variables set
  for the process on top of this one's."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory(prefix="wsram_jax_cold_") as fresh:
    spec = {**spec, "cache_dir": cache_dir or fresh}
    child_env = {**os.environ, **(env or {}), "WSRAM_JAX_COMPILATION_CACHE": spec["cache_dir"]}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.coldcompile", json.dumps(spec)], cwd=root,
                          env=child_env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"The compile-time process failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_and_second_run(spec: dict[str, Any], *, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
  """``{'cold': ..., 'second_run': ...}``: `measure` in a fresh cache directory, then again in the same one."""
  with tempfile.TemporaryDirectory(prefix="wsram_jax_cold_") as cache:
    cold = measure(spec, cache_dir=cache, env=env)
    second = measure(spec, cache_dir=cache, env=env)
  return {"cold": cold, "second_run": second}


if __name__ == "__main__":  # the fresh process of `measure`
  print(json.dumps(_child(json.loads(sys.argv[1]))))
