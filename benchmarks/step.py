"""Measures the jitted train step against its PyTorch peers, eager and compiled, in one process
(`python -m experiments.benchmark`).

For each batch size B of the default model (``wsram_q_cv``: M = 5, N = 4, 100 x 100 canvas, 3 scales, with the
exploration heuristics its config turns on):

* compile time by the one definition (`benchmarks.coldcompile`): lower + compile of the step in a fresh process
  with an empty persistent cache (cold), then in a fresh process whose cache holds it (second run);
* data parallel: the same step on a ``data`` mesh over the host's CPU devices (``config.mesh_devices``), in a
  child process with one XLA:CPU device per core, each device rolling out B / n canvases on its own core;
* ms per step: the median over many steps after warm-up, with images/s (B per step) and glimpses/s (B M N);
* memory: XLA's buffer assignment of the step (`compiled.memory_analysis()`) and the process's peak resident set
  (`benchmarks.procfs`);
* FLOPs: XLA's cost analysis of the compiled step (exact here: the step has no loop around a matmul) and the
  FLOPs of its dots read from the optimised HLO (`benchmarks.hlo`). Divided by the step time, and by the FLOP/s
  of a jitted batch of exactly the step's dots timed in the same rounds, this is the step's utilisation of the
  machine's practical matmul peak;
* the PyTorch peer (`benchmarks.torch_peer`, when torch is installed: `benchmarks.torch_timing`), eager at 1
  thread and at all cores, and under ``torch.compile`` in each mode asked for, with its compile time (the first
  step). The headline is JAX against the fastest PyTorch of them all;
* the glimpse alone: the JAX extraction, the peer's vectorised one, and a per-example crop loop.

The step, the peers and the matmul batch are timed interleaved, in rounds, so that all of them see the same machine
load (each round drops its first call of every timer, which runs with another framework's data in the caches);
the load average and the core count are recorded with the results. Synthetic digits stand in for MNIST (the
cost of a step does not depend on the pixels), so no data is needed. `benchmarks.report` writes the tables.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import coldcompile
from benchmarks import common
from benchmarks import hlo as hlo_lib
from benchmarks import procfs
from benchmarks import torch_timing
from wsram_jax import glimpse as glimpse_lib
from wsram_jax.classifier import train
from wsram_jax.training import step as step_lib

__all__ = ["BenchmarkOptions", "check_options", "build_jax_step", "run"]


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
  batch_sizes: tuple[int, ...] = (32, 128)
  steps: int = 60  # timed steps per framework and batch size (after warm-up), split over `rounds`
  rounds: int = 6
  warmup: int = 5
  variant: str = "wsram_q_cv"
  torch: bool = True  # time the PyTorch peers when torch is installed
  torch_threads: tuple[int, ...] = (1, 0)  # eager peers; 0 = torch's default (all cores)
  # compiled peers (`peer_config.COMPILE_MODES`); on a CPU "reduce-overhead" and "max-autotune" only add CUDA graphs
  torch_compile_modes: tuple[str, ...] = ("default", "max-autotune-no-cudagraphs")
  torch_compile_threads: tuple[int, ...] = (0,)  # compiled peers' threads; 0 = torch's default (all cores)
  num_digits: int = 10000  # synthetic training set
  glimpse_repeats: int = 30
  overrides: tuple[tuple[str, Any], ...] = ()  # (dotted config key, value) pairs, e.g. for a small test config
  settle_s: float = 0.2  # pause before each framework's turn in a round
  data_parallel: int = 0  # devices of the data-parallel step (a child process): 0 = one per CPU core, 1 = off
  compile_repeats: int = 1  # cold-compile processes per batch size (`benchmarks.coldcompile`); 0 = none


def check_options(options: BenchmarkOptions) -> None:
  """Raises `errors.ConfigError` (one sentence) for a config the benchmark cannot run, before anything compiles:
  an invalid one, or, with ``options.torch``, one whose features the PyTorch peer lacks."""
  from benchmarks import peer_config  # pylint: disable=g-import-not-at-top
  from wsram_jax import errors  # pylint: disable=g-import-not-at-top
  unknown = [m for m in options.torch_compile_modes if m not in peer_config.COMPILE_MODES]
  if unknown:
    raise errors.ConfigError(f"Unknown --torch_compile_modes {', '.join(unknown)}; choose among "
                             f"{', '.join(peer_config.COMPILE_MODES)}.")
  for b in options.batch_sizes:
    config = common.make_config(options.variant, b, options.overrides)
    if options.torch:
      peer_config.PeerConfig.from_config(config, train.canvas_kwargs(config))


# ---------------------------------------------------------------------------------------------------------------
# The JAX step.


@dataclasses.dataclass
class JaxStep:
  config: Any
  run: Callable[[], None]
  info: dict[str, Any]


def build_jax_step(config, images: np.ndarray, labels: np.ndarray) -> JaxStep:
  """Compiles the train step in this process (loaded from the persistent cache when it holds it) and returns a
  closure that runs one step and waits for it, with XLA's cost and memory analysis and the HLO's statistics."""
  model = train.build_model(config)
  optimizer = step_lib.make_optimizer(config)
  state = train.create_train_state(config, model, optimizer)
  images, labels = step_lib.replicate(step_lib.make_mesh(config.mesh_devices),
                                      (jnp.asarray(images), jnp.asarray(labels)))
  t0 = time.perf_counter()
  compiled = train.make_train_step(config, model, optimizer).lower(state, images, labels).compile()
  in_process_s = round(time.perf_counter() - t0, 3)
  hlo = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  dots = hlo_lib.dot_shapes(hlo)
  info = {
      "in_process_lower_and_compile_s": in_process_s, "mesh_devices": int(config.mesh_devices),
      "xla_flops": float(cost.get("flops", float("nan"))),
      "xla_bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "dot_flops": float(sum(d["flops"] for d in dots)),
      "memory_mb": {k: round(getattr(mem, f"{k}_size_in_bytes") / 2**20, 2)
                    for k in ("argument", "output", "temp", "alias", "generated_code")} if mem else None,
      "hlo": hlo_lib.hlo_stats(hlo),
  }
  holder = {"state": state}

  def run():
    new_state, metrics = compiled(holder["state"], images, labels)
    jax.block_until_ready((new_state, metrics))
    holder["state"] = new_state

  run.dots = dots  # type: ignore[attr-defined]
  run.hlo = hlo  # type: ignore[attr-defined]
  run.holder = holder  # type: ignore[attr-defined]
  return JaxStep(config=config, run=run, info=info)


def _glimpse_timers(config, seed: int = 0) -> dict[str, Callable[[], None]]:
  """Closures that extract B x M glimpses (one per sample) from B canvases: JAX, and the torch peer's two ways."""
  b, m = config.batch_size, config.num_samples
  size, scales, hw = config.model.glimpse_size, config.model.num_scales, config.data.canvas_size
  rng = np.random.default_rng(seed)
  canvases = rng.uniform(size=(b, hw, hw)).astype(np.float32)
  loc = np.clip(rng.uniform(-1.2, 1.2, size=(b, m, 2)), -1, 1).astype(np.float32)
  scale = rng.integers(0, scales, size=(b, m)).astype(np.int32)

  @jax.jit
  def jax_glimpses(canvases, loc, scale):
    prepared = jax.vmap(lambda c: glimpse_lib.prepare_canvas(c[..., None], size=size, num_scales=scales))(canvases)
    one = lambda p, l, s: glimpse_lib.extract_prepared(p, l, s, size=size, num_scales=scales, canvas_hw=(hw, hw))
    return jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)))(prepared, loc, scale)

  args = tuple(jnp.asarray(x) for x in (canvases, loc, scale))
  return {"jax": lambda: jax.block_until_ready(jax_glimpses(*args)),
          **torch_timing.glimpse_timers(canvases, loc, scale, size=size, num_scales=scales)}


# ---------------------------------------------------------------------------------------------------------------
# The run.


def _cold_compile(options: BenchmarkOptions, b: int, log) -> dict[str, Any]:
  """`coldcompile` for B = `b`: `options.compile_repeats` cold processes, each followed by a second run."""
  spec = {"variant": options.variant, "batch_size": b, "overrides": [list(o) for o in options.overrides]}
  rows = []
  for i in range(options.compile_repeats):
    rows.append(coldcompile.cold_and_second_run(spec))
    c, s = rows[-1]["cold"], rows[-1]["second_run"]
    log(f"  cold compile {i + 1}/{options.compile_repeats}: lower {c['lower_s']} s + compile {c['compile_s']} s "
        f"= {c['total_s']} s; second run (cache): {s['total_s']} s")
  med = lambda kind, k: round(float(np.median([r[kind][k] for r in rows])), 3)
  return {"runs": rows, **{kind: {k: med(kind, k) for k in ("lower_s", "compile_s", "total_s", "lower_cpu_s",
                                                              "compile_cpu_s")} for kind in ("cold", "second_run")}}


def run(options: BenchmarkOptions = BenchmarkOptions(), log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark; returns a JSON-able dict (see the module docstring). `check_options` first."""
  check_options(options)
  env = procfs.environment()
  log(f"{env['cpu']}, {env['cores']} cores, load average {env['loadavg']}; jax {env['jax']}, torch {env['torch']}")
  images, labels = common.synthetic_digits(options.num_digits)
  results = {"environment": env, "options": dataclasses.asdict(options), "batch_sizes": {}}
  for b in options.batch_sizes:
    config = common.make_config(options.variant, b, options.overrides)
    log(f"B={b}: cold compile of the JAX step (fresh processes, benchmarks.coldcompile) ...")
    compile_time = _cold_compile(options, b, log) if options.compile_repeats > 0 else None
    rss = {}
    reset = procfs.reset_peak_rss()
    rss["before_compile"] = procfs.current_rss_mb()
    step = build_jax_step(config, images, labels)
    rss["compile_peak"] = procfs.peak_rss_mb()
    reset = procfs.reset_peak_rss() and reset
    rss["before_jax_steps"] = procfs.current_rss_mb()
    for _ in range(options.warmup):
      step.run()
    rss["jax_steps_peak"] = procfs.peak_rss_mb()
    matmuls, matmul_flops = hlo_lib.matmul_batch(step.run.dots)
    for _ in range(options.warmup):
      matmuls()
    reset = procfs.reset_peak_rss() and reset
    rss["before_torch"] = procfs.current_rss_mb()
    peers, peer_info = torch_timing.peers(
        config, images, labels, threads=options.torch_threads, compile_modes=options.torch_compile_modes,
        compile_threads=options.torch_compile_threads, warmup=options.warmup, log=log) if options.torch else ({}, {})
    rss["torch_steps_peak"] = procfs.peak_rss_mb() if peers else None
    rss["peak_reset_supported"] = reset
    timers = {"jax": step.run, **peers, "matmuls": matmuls}
    times = {k: [] for k in timers}
    per_round = max(1, options.steps // options.rounds)
    loads = []
    for r in range(options.rounds):
      for name, fn in timers.items():
        time.sleep(options.settle_s)  # let the other framework's worker threads stop spinning first
        # The first call after a switch runs with the other framework's data in the caches: steady state (what a
        # training loop sees) is the calls after it, so every timer drops its first call of each round.
        times[name] += common.time_calls(fn, per_round + 1)[1:]
      loads.append(os.getloadavg()[0])
      log(f"  round {r + 1}/{options.rounds}: " + ", ".join(
          f"{k} {1000 * np.median(v[-per_round:]):.1f} ms" for k, v in times.items()) + f" (load {loads[-1]:.2f})")
    glimpse_timers = _glimpse_timers(config)
    glimpse_times = {k: [] for k in glimpse_timers}
    for fn in glimpse_timers.values():
      fn()
    for _ in range(3):
      for name, fn in glimpse_timers.items():
        glimpse_times[name] += common.time_calls(fn, max(1, options.glimpse_repeats // 3))

    jax_s = float(np.median(times["jax"]))
    matmul_s = float(np.median(times["matmuls"]))
    matmul_rate = matmul_flops / matmul_s
    m, n = config.num_samples, config.num_glimpses
    entry = {
        "jax": {**step.info, "compile_time": compile_time, "step": common.summary(times["jax"]),
                "images_per_s": round(b / jax_s, 1), "glimpses_per_s": round(b * m * n / jax_s, 1),
                "achieved_gflops": round(step.info["xla_flops"] / jax_s / 1e9, 2)},
        "matmuls": {"count": len(step.run.dots), "flops": matmul_flops, "batch": common.summary(times["matmuls"]),
                    "gflops": round(matmul_rate / 1e9, 2)},
        "utilisation": round(step.info["xla_flops"] / jax_s / matmul_rate, 3),
        "dot_utilisation": round(step.info["dot_flops"] / jax_s / matmul_rate, 3),
        "torch": {}, "torch_failed": {k: v["error"] for k, v in peer_info.items() if "error" in v},
        "glimpse": {k: common.summary(v) for k, v in glimpse_times.items()},
        "loadavg_during": [round(min(loads), 2), round(max(loads), 2)], "rss_mb": rss,
    }
    for name in peers:
      t = float(np.median(times[name]))
      entry["torch"][name] = {**peer_info[name], "step": common.summary(times[name]), "images_per_s": round(b / t, 1),
                              "glimpses_per_s": round(b * m * n / t, 1), "speedup_of_jax": round(t / jax_s, 3)}
    n_dp = (os.cpu_count() or 1) if options.data_parallel == 0 else options.data_parallel
    if n_dp > 1 and b % n_dp == 0:
      log(f"  data parallel over {n_dp} host devices, in a child process ...")
      dp = data_parallel_child(options, b, n_dp)
      entry["jax_data_parallel"] = dp
      log(f"  data parallel: {dp['step']['median_ms']} ms/step vs one device {dp['one_device']['median_ms']} ms in "
          f"the same process: {dp['speedup_over_one_device']}x")
    if peers:
      for kind in ("eager", "compiled"):
        of_kind = [k for k in peers if entry["torch"][k]["kind"] == kind]
        if of_kind:
          entry[f"torch_best_{kind}"] = min(of_kind, key=lambda k: np.median(times[k]))
      best = min(peers, key=lambda k: np.median(times[k]))
      entry["torch_best"] = best
      entry["speedup_of_jax_over_best_torch"] = entry["torch"][best]["speedup_of_jax"]
      if "jax_data_parallel" in entry:
        # The child measures data parallel against one device under its own load; chained with this
        # process's one-device-vs-PyTorch ratio.
        entry["speedup_of_data_parallel_over_best_torch"] = round(
            entry["speedup_of_jax_over_best_torch"] * entry["jax_data_parallel"]["speedup_over_one_device"], 3)
    results["batch_sizes"][str(b)] = entry
    log(f"  B={b}: JAX {entry['jax']['step']['median_ms']} ms/step" + (
        f", fastest PyTorch ({entry['torch_best']}) {entry['torch'][entry['torch_best']]['step']['median_ms']} ms, "
        f"JAX {entry['speedup_of_jax_over_best_torch']}x faster" if peers else "") +
        f"; utilisation {entry['utilisation']:.0%} of {entry['matmuls']['gflops']} GFLOP/s")
  results["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return results


def _child(spec: dict[str, Any]) -> dict[str, Any]:
  """In a process with `spec['devices']` host devices: the one-device and the data-parallel step, interleaved."""
  options = BenchmarkOptions(**{**spec["options"], "batch_sizes": tuple(spec["options"]["batch_sizes"]),
                                "torch_threads": tuple(spec["options"]["torch_threads"]),
                                "torch_compile_modes": tuple(spec["options"]["torch_compile_modes"]),
                                "torch_compile_threads": tuple(spec["options"]["torch_compile_threads"]),
                                "overrides": tuple(tuple(o) for o in spec["options"]["overrides"])})
  b, n = spec["batch_size"], spec["devices"]
  images, labels = common.synthetic_digits(options.num_digits)
  one = build_jax_step(common.make_config(options.variant, b, options.overrides), images, labels)
  dp = build_jax_step(common.make_config(options.variant, b, options.overrides + (("mesh_devices", n),)), images,
                      labels)
  timers = {"one": one.run, "dp": dp.run}
  for fn in timers.values():
    for _ in range(options.warmup):
      fn()
  times = {k: [] for k in timers}
  per_round = max(1, options.steps // options.rounds)
  for _ in range(options.rounds):
    for name, fn in timers.items():
      times[name] += common.time_calls(fn, per_round + 1)[1:]
  m_, n_ = one.config.num_samples, one.config.num_glimpses
  t = float(np.median(times["dp"]))
  return {"devices": n, "in_process_lower_and_compile_s": dp.info["in_process_lower_and_compile_s"],
          "step": common.summary(times["dp"]), "one_device": common.summary(times["one"]),
          "images_per_s": round(b / t, 1), "glimpses_per_s": round(b * m_ * n_ / t, 1),
          "speedup_over_one_device": round(float(np.median(times["one"])) / t, 3), "hlo": dp.info["hlo"]}


def data_parallel_child(options: BenchmarkOptions, batch_size: int, devices: int) -> dict[str, Any]:
  """Times the data-parallel step over `devices` host devices in a fresh process (the device count is fixed when
  a process starts XLA, and a second XLA:CPU device's threads in this process would slow PyTorch's)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")) +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  spec = {"options": dataclasses.asdict(options), "batch_size": batch_size, "devices": devices}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.step", json.dumps(spec)], cwd=common.REPO_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"The data-parallel benchmark process failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the data-parallel child process (`data_parallel_child`)
  from wsram_jax.training import cli  # pylint: disable=g-import-not-at-top
  cli.keep_freed_memory()  # as in the parent (`cli.run_main`)
  print(json.dumps(_child(json.loads(sys.argv[1]))))
