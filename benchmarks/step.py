"""Measures the jitted train step and its PyTorch eager peer in one process (`python -m experiments.benchmark`).

For each batch size B of the paper's configuration (``wsram_q_cv``: M = 5, N = 4, 100 x 100 canvas, 3 scales):

* compile time: ``lower`` and ``compile`` of the jitted step, wall clock and process CPU time (cold: a fresh
  process and an empty persistent compilation cache), and again from the warm cache (what a second run pays);
* data parallel: the same step on a ``data`` mesh over the host's CPU devices (``config.mesh_devices``; the
  binary exposes one XLA:CPU device per core), each device rolling out B / n canvases on its own core;
* ms per step: the median over many steps after warm-up, with images/s (B per step) and glimpses/s (B M N);
* memory: XLA's buffer assignment of the step (`compiled.memory_analysis()`) and the process's peak resident set
  (VmHWM, reset before each phase where the kernel allows it, else the high-water mark so far);
* FLOPs: XLA's cost analysis of the compiled step (`compiled.cost_analysis()['flops']`; exact here because the
  step has no loop around a matmul) and, separately, the FLOPs of the step's dot instructions read from the
  optimised HLO. Divided by the step time, and by the FLOP/s of a jitted batch of matmuls with exactly the step's
  dot shapes and dimension numbers timed in the same run, this is the step's utilisation of the machine's
  practical matmul peak;
* the PyTorch eager peer (`benchmarks.torch_peer`, when torch is installed), at 1 thread and at all cores;
* the glimpse alone: the JAX extraction, the peer's vectorised one, and a per-example crop loop.

The step, the peer and the matmul batch are timed interleaved, in rounds, so that all of them see the same machine
load (each round drops its first call of every timer, which runs with the other framework's data in the caches);
the load average and the core count are recorded with the results. Synthetic digits stand in for MNIST (the
cost of a step does not depend on the pixels), so no data is needed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax import glimpse as glimpse_lib
from wsram_jax.training import step as step_lib
from wsram_jax.classifier import train

__all__ = ["BenchmarkOptions", "run", "markdown", "write", "write_files", "dot_shapes", "hlo_stats", "environment"]


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
  batch_sizes: tuple[int, ...] = (32, 128)
  steps: int = 60  # timed steps per framework and batch size (after warm-up), split over `rounds`
  rounds: int = 6
  warmup: int = 5
  variant: str = "wsram_q_cv"
  torch: bool = True  # time the PyTorch peer when torch is installed
  torch_threads: tuple[int, ...] = (1, 0)  # 0 = torch's default (all cores)
  num_digits: int = 10000  # synthetic training set
  glimpse_repeats: int = 30
  overrides: tuple[tuple[str, Any], ...] = ()  # (dotted config key, value) pairs, e.g. for a small test config
  settle_s: float = 0.2  # pause before each framework's turn in a round
  data_parallel: int = 0  # devices of the data-parallel step (a child process): 0 = one per CPU core, 1 = off


# ---------------------------------------------------------------------------------------------------------------
# Helpers.


def _now():
  return time.perf_counter(), time.process_time()


def _since(t0):
  w, c = _now()
  return {"wall_s": round(w - t0[0], 3), "cpu_s": round(c - t0[1], 3)}


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS counter of this process (Linux: ``echo 5 > /proc/self/clear_refs``)."""
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


def _peak_rss_mb() -> float:
  """The process's peak resident set since the last `_reset_peak_rss` (or since it started), MB."""
  peak = _status_mb("VmHWM")
  return peak if peak is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _current_rss_mb() -> Optional[float]:
  return _status_mb("VmRSS")


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``n`` random 28 x 28 uint8 'digits' (sparse strokes) and labels."""
  rng = np.random.default_rng(seed)
  images = (rng.uniform(size=(n, 28, 28)) < 0.2) * rng.integers(0, 256, size=(n, 28, 28))
  return images.astype(np.uint8), rng.integers(0, 10, n).astype(np.int32)


def environment() -> dict[str, Any]:
  """Versions, core count, CPU model, XLA flags and the load average (1, 5, 15 min)."""
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  env = {
      "python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jax.lib.__version__,
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "cpu": cpu,
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


# ---------------------------------------------------------------------------------------------------------------
# The compiled HLO: dot shapes, statistics.

_INSTR = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"= \w+\[[\d,]*\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\), (.*)")


def _dims(text: str, name: str) -> tuple[int, ...]:
  m = re.search(name + r"=\{([\d,]*)\}", text)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def dot_shapes(hlo: str) -> list[dict[str, Any]]:
  """Every dot of an optimised HLO module (also inside fusions): operand shapes, dimension numbers, FLOPs."""
  shapes = {}
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if m:
      shapes[m.group(1)] = tuple(int(x) for x in m.group(3).split(",") if x)
  dots = []
  for line in hlo.splitlines():
    m = _DOT.search(line)
    if not m or m.group(1) not in shapes or m.group(2) not in shapes:
      continue
    lhs, rhs, rest = shapes[m.group(1)], shapes[m.group(2)], m.group(3)
    lc, rc = _dims(rest, "lhs_contracting_dims"), _dims(rest, "rhs_contracting_dims")
    lb, rb = _dims(rest, "lhs_batch_dims"), _dims(rest, "rhs_batch_dims")
    out = [lhs[i] for i in lb] + [d for i, d in enumerate(lhs) if i not in lc + lb] + \
        [d for i, d in enumerate(rhs) if i not in rc + rb]
    flops = 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod([lhs[i] for i in lc], dtype=np.int64))
    dots.append(dict(lhs=lhs, rhs=rhs, dims=((lc, rc), (lb, rb)), flops=flops))
  return dots


def hlo_stats(hlo: str) -> dict[str, int]:
  """Counts in the optimised HLO: fusions (compiled kernels and library calls), while loops, dots, gathers."""
  return {"fusions": hlo.count(" fusion("), "while_loops": hlo.count(" while("), "dots": len(dot_shapes(hlo)),
          "gathers": hlo.count(" gather("), "scatters": hlo.count(" scatter("), "lines": hlo.count("\n")}


def matmul_batch(dots: list[dict[str, Any]], seed: int = 0) -> tuple[Callable[[], Any], int]:
  """A jitted function running every dot in ``dots`` once on random operands, and its FLOPs."""
  rng = np.random.default_rng(seed)
  lhs = [jnp.asarray(rng.standard_normal(d["lhs"]), jnp.float32) for d in dots]
  rhs = [jnp.asarray(rng.standard_normal(d["rhs"]), jnp.float32) for d in dots]
  dims = [d["dims"] for d in dots]

  @jax.jit
  def run_all(lhs, rhs):
    return [jax.lax.dot_general(a, b, dn) for a, b, dn in zip(lhs, rhs, dims)]

  return (lambda: jax.block_until_ready(run_all(lhs, rhs))), sum(d["flops"] for d in dots)


# ---------------------------------------------------------------------------------------------------------------
# The JAX step.


def make_config(variant: str, batch_size: int, overrides=()):
  from experiments.configs import mnist as mnist_configs  # pylint: disable=g-import-not-at-top
  config = mnist_configs.get_config(variant)
  config.batch_size = batch_size
  for dotted, value in overrides:
    *path, last = dotted.split(".")
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  train.validate_config(config)
  return config


@dataclasses.dataclass
class JaxStep:
  config: Any
  run: Callable[[], None]
  info: dict[str, Any]


def build_jax_step(config, images: np.ndarray, labels: np.ndarray) -> JaxStep:
  """Compiles the train step (timed) and returns a closure that runs one step and waits for it.

  When JAX's persistent compilation cache is on (`wsram_jax.cli.enable_compilation_cache`), the in-memory caches
  are then cleared and the step lowered and compiled again: ``info['cached']`` is what a second run of the same
  configuration pays."""
  model = train.build_model(config)
  optimizer = step_lib.make_optimizer(config)
  state = train.create_train_state(config, model, optimizer)
  images, labels = step_lib.replicate(step_lib.make_mesh(config.mesh_devices),
                                      (jnp.asarray(images), jnp.asarray(labels)))
  step = train.make_train_step(config, model, optimizer)
  t0 = _now()
  lowered = step.lower(state, images, labels)
  lower_time = _since(t0)
  t0 = _now()
  compiled = lowered.compile()
  compile_time = _since(t0)
  cached = None
  if jax.config.jax_compilation_cache_dir:
    jax.clear_caches()
    t0 = _now()
    step = train.make_train_step(config, model, optimizer)
    compiled = step.lower(state, images, labels).compile()
    cached = _since(t0)
  hlo = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  dots = dot_shapes(hlo)
  info = {
      "lower": lower_time, "compile": compile_time, "cached": cached, "mesh_devices": int(config.mesh_devices),
      "xla_flops": float(cost.get("flops", float("nan"))),
      "xla_bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "dot_flops": float(sum(d["flops"] for d in dots)),
      "memory_mb": {k: round(getattr(mem, f"{k}_size_in_bytes") / 2**20, 2)
                    for k in ("argument", "output", "temp", "alias", "generated_code")} if mem else None,
      "hlo": hlo_stats(hlo),
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


# ---------------------------------------------------------------------------------------------------------------
# Glimpses alone.


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
  timers = {"jax": lambda: jax.block_until_ready(jax_glimpses(*args))}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return timers
  tc, tl, ts = torch.tensor(canvases), torch.tensor(loc), torch.tensor(scale, dtype=torch.long)
  kw = dict(size=size, num_scales=scales, canvas_hw=(hw, hw))

  def vectorised():
    torch_peer.glimpse(torch_peer.pad_canvases(tc, size=size, num_scales=scales), tl, ts, **kw)

  def crop_loop():
    torch_peer.crop_loop_glimpse(torch_peer.pad_canvases(tc, size=size, num_scales=scales), tl, ts, **kw)

  timers["torch_vectorised"] = vectorised
  timers["torch_crop_loop"] = crop_loop
  return timers


# ---------------------------------------------------------------------------------------------------------------
# The run.


def _time(fn: Callable[[], Any], n: int) -> list[float]:
  out = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def _summary(seconds: list[float]) -> dict[str, float]:
  ms = np.asarray(seconds) * 1000.0
  return {"median_ms": round(float(np.median(ms)), 3), "p20_ms": round(float(np.percentile(ms, 20)), 3),
          "p80_ms": round(float(np.percentile(ms, 80)), 3), "min_ms": round(float(ms.min()), 3), "n": len(ms)}


def _torch_peers(config, images, labels, threads: tuple[int, ...], warmup: int, log) -> dict[str, Callable]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  except ImportError:
    log("PyTorch is not installed: no peer (pip install torch==2.13.0, the 'bench' extra).")
    return {}
  from wsram_jax.classifier import model as networks  # pylint: disable=g-import-not-at-top
  default_threads = torch.get_num_threads()
  params = networks.init_params(train.build_model(config), jax.random.PRNGKey(config.seed))
  peer = torch_peer.TorchPeer(torch_peer.PeerConfig.from_config(config, train.canvas_kwargs(config)), params,
                              images, labels, seed=config.seed)
  runs = {}
  for t in dict.fromkeys(t or default_threads for t in threads):
    def run(t=t):
      torch.set_num_threads(t)
      peer.step()
    for _ in range(warmup):
      run()
    runs[f"torch_{t}t"] = run
  torch.set_num_threads(default_threads)
  return runs


def run(options: BenchmarkOptions = BenchmarkOptions(), log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark; returns a JSON-able dict (see the module docstring)."""
  env = environment()
  log(f"{env['cpu']}, {env['cores']} cores, load average {env['loadavg']}; jax {env['jax']}, torch {env['torch']}")
  images, labels = synthetic_digits(options.num_digits)
  results = {"environment": env, "options": dataclasses.asdict(options), "batch_sizes": {}}
  for b in options.batch_sizes:
    config = make_config(options.variant, b, options.overrides)
    rss = {}
    reset = _reset_peak_rss()
    rss["before_compile"] = _current_rss_mb()
    log(f"B={b}: compiling the JAX step ...")
    step = build_jax_step(config, images, labels)
    rss["compile_peak"] = _peak_rss_mb()
    log(f"  compiled in {step.info['compile']['wall_s']} s ({step.info['compile']['cpu_s']} s CPU); warm-up")
    reset = _reset_peak_rss() and reset
    rss["before_jax_steps"] = _current_rss_mb()
    for _ in range(options.warmup):
      step.run()
    rss["jax_steps_peak"] = _peak_rss_mb()
    matmuls, matmul_flops = matmul_batch(step.run.dots)
    for _ in range(options.warmup):
      matmuls()
    reset = _reset_peak_rss() and reset
    rss["before_torch"] = _current_rss_mb()
    peers = _torch_peers(config, images, labels, options.torch_threads, options.warmup, log) if options.torch \
        else {}
    rss["torch_steps_peak"] = _peak_rss_mb() if peers else None
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
        times[name] += _time(fn, per_round + 1)[1:]
      loads.append(os.getloadavg()[0])
      log(f"  round {r + 1}/{options.rounds}: " + ", ".join(
          f"{k} {1000 * np.median(v[-per_round:]):.1f} ms" for k, v in times.items()) + f" (load {loads[-1]:.2f})")
    glimpse_timers = _glimpse_timers(config)
    glimpse_times = {k: [] for k in glimpse_timers}
    for fn in glimpse_timers.values():
      fn()
    for _ in range(3):
      for name, fn in glimpse_timers.items():
        glimpse_times[name] += _time(fn, max(1, options.glimpse_repeats // 3))

    jax_s = float(np.median(times["jax"]))
    matmul_s = float(np.median(times["matmuls"]))
    matmul_rate = matmul_flops / matmul_s
    m, n = config.num_samples, config.num_glimpses
    entry = {
        "jax": {**step.info, "step": _summary(times["jax"]), "images_per_s": round(b / jax_s, 1),
                "glimpses_per_s": round(b * m * n / jax_s, 1),
                "achieved_gflops": round(step.info["xla_flops"] / jax_s / 1e9, 2),
                },
        "matmuls": {"count": len(step.run.dots), "flops": matmul_flops, "batch": _summary(times["matmuls"]),
                    "gflops": round(matmul_rate / 1e9, 2)},
        "utilisation": round(step.info["xla_flops"] / jax_s / matmul_rate, 3),
        "dot_utilisation": round(step.info["dot_flops"] / jax_s / matmul_rate, 3),
        "torch": {}, "glimpse": {k: _summary(v) for k, v in glimpse_times.items()},
        "loadavg_during": [round(min(loads), 2), round(max(loads), 2)], "rss_mb": rss,
    }
    for name in peers:
      t = float(np.median(times[name]))
      entry["torch"][name] = {"step": _summary(times[name]), "images_per_s": round(b / t, 1),
                              "glimpses_per_s": round(b * m * n / t, 1), "speedup_of_jax": round(t / jax_s, 3)}
    n_dp = (os.cpu_count() or 1) if options.data_parallel == 0 else options.data_parallel
    if n_dp > 1 and b % n_dp == 0:
      log(f"  data parallel over {n_dp} host devices, in a child process ...")
      dp = data_parallel_child(options, b, n_dp)
      entry["jax_data_parallel"] = dp
      log(f"  data parallel: {dp['step']['median_ms']} ms/step vs one device {dp['one_device']['median_ms']} ms in "
          f"the same process: {dp['speedup_over_one_device']}x")
    if peers:
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
        f", best torch ({entry['torch_best']}) {entry['torch'][entry['torch_best']]['step']['median_ms']} ms, "
        f"JAX {entry['speedup_of_jax_over_best_torch']}x faster" if peers else "") +
        f"; utilisation {entry['utilisation']:.0%} of {entry['matmuls']['gflops']} GFLOP/s")
  results["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return results


def _child(spec: dict[str, Any]) -> dict[str, Any]:
  """In a process with `spec['devices']` host devices: the one-device and the data-parallel step, interleaved."""
  options = BenchmarkOptions(**{**spec["options"], "batch_sizes": tuple(spec["options"]["batch_sizes"]),
                                "torch_threads": tuple(spec["options"]["torch_threads"]),
                                "overrides": tuple(tuple(o) for o in spec["options"]["overrides"])})
  b, n = spec["batch_size"], spec["devices"]
  images, labels = synthetic_digits(options.num_digits)
  one = build_jax_step(make_config(options.variant, b, options.overrides), images, labels)
  dp = build_jax_step(make_config(options.variant, b, options.overrides + (("mesh_devices", n),)), images, labels)
  timers = {"one": one.run, "dp": dp.run}
  for fn in timers.values():
    for _ in range(options.warmup):
      fn()
  times = {k: [] for k in timers}
  per_round = max(1, options.steps // options.rounds)
  for _ in range(options.rounds):
    for name, fn in timers.items():
      times[name] += _time(fn, per_round + 1)[1:]
  m_, n_ = one.config.num_samples, one.config.num_glimpses
  t = float(np.median(times["dp"]))
  return {"devices": n, "compile": dp.info["compile"], "lower": dp.info["lower"], "step": _summary(times["dp"]),
          "one_device": _summary(times["one"]), "images_per_s": round(b / t, 1),
          "glimpses_per_s": round(b * m_ * n_ / t, 1),
          "speedup_over_one_device": round(float(np.median(times["one"])) / t, 3), "hlo": dp.info["hlo"]}


def data_parallel_child(options: BenchmarkOptions, batch_size: int, devices: int) -> dict[str, Any]:
  """Times the data-parallel step over `devices` host devices in a fresh process (the device count is fixed when
  a process starts XLA, and a second XLA:CPU device's threads in this process would slow PyTorch's)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")) +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  spec = {"options": dataclasses.asdict(options), "batch_size": batch_size, "devices": devices}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.step", json.dumps(spec)], cwd=root, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"The data-parallel benchmark process failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: dict[str, Any]) -> str:
  """The results as markdown tables."""
  env = results["environment"]
  lines = [f"{env['cpu']}, {env['cores']} cores; jax {env['jax']} ({env['backend']}), torch {env['torch']}; "
           f"load average {env['loadavg']} at the start, {env.get('loadavg_end')} at the end.", ""]
  lines += ["| | " + " | ".join(f"B={b}" for b in results["batch_sizes"]) + " |",
            "|---|" + "---|" * len(results["batch_sizes"])]
  rows = []

  def row(name, fn):
    cells = []
    for e in results["batch_sizes"].values():
      try:
        cells.append(fn(e))
      except (KeyError, TypeError):
        cells.append("-")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")

  row("JAX compile: lower + compile, wall (CPU) s",
      lambda e: f"{e['jax']['lower']['wall_s']:.1f} + {e['jax']['compile']['wall_s']:.1f} "
                f"({e['jax']['lower']['cpu_s']:.1f} + {e['jax']['compile']['cpu_s']:.1f})")
  row("JAX second run (persistent compilation cache): lower + load, wall s",
      lambda e: f"{e['jax']['cached']['wall_s']:.1f}")
  row("JAX ms/step, median (p20-p80)",
      lambda e: f"**{e['jax']['step']['median_ms']:.1f}** ({e['jax']['step']['p20_ms']:.1f}-"
                f"{e['jax']['step']['p80_ms']:.1f})")
  row("JAX data parallel over n host devices (one per core; child process): n, ms/step (p20-p80); one device "
      "there", lambda e: f"{e['jax_data_parallel']['devices']}, **{e['jax_data_parallel']['step']['median_ms']:.1f}**"
                         f" ({e['jax_data_parallel']['step']['p20_ms']:.1f}-"
                         f"{e['jax_data_parallel']['step']['p80_ms']:.1f}); "
                         f"{e['jax_data_parallel']['one_device']['median_ms']:.1f}")
  peers = sorted({k for e in results["batch_sizes"].values() for k in e["torch"]})
  for p in peers:
    row(f"PyTorch eager ({p.split('_')[1].replace('t', ' thread(s)')}) ms/step",
        lambda e, p=p: f"{e['torch'][p]['step']['median_ms']:.1f} ({e['torch'][p]['step']['p20_ms']:.1f}-"
                       f"{e['torch'][p]['step']['p80_ms']:.1f})")
  if peers:
    row("JAX speed-up over the best PyTorch", lambda e: f"**{e['speedup_of_jax_over_best_torch']:.2f}x**")
    row("JAX data parallel over the best PyTorch (the two ratios chained)",
        lambda e: f"**{e['speedup_of_data_parallel_over_best_torch']:.2f}x**")
  row("JAX images/s, glimpses/s", lambda e: f"{e['jax']['images_per_s']:.0f}, {e['jax']['glimpses_per_s']:.0f}")
  row("XLA GFLOP/step (cost analysis; dots only)",
      lambda e: f"{e['jax']['xla_flops'] / 1e9:.3f} ({e['jax']['dot_flops'] / 1e9:.3f})")
  row("achieved GFLOP/s", lambda e: f"{e['jax']['achieved_gflops']:.1f}")
  row("the step's matmuls alone, GFLOP/s", lambda e: f"{e['matmuls']['gflops']:.1f} ({e['matmuls']['count']} dots)")
  row("utilisation of that rate", lambda e: f"**{e['utilisation']:.0%}** (dots only {e['dot_utilisation']:.0%})")
  row("XLA buffers: arguments, temporaries MB",
      lambda e: f"{e['jax']['memory_mb']['argument']:.1f}, {e['jax']['memory_mb']['temp']:.1f}")
  row("process RSS MB: before; peak while compiling; peak in JAX steps; peak in PyTorch steps",
      lambda e: f"{e['rss_mb']['before_compile']:.0f}; {e['rss_mb']['compile_peak']:.0f}; "
                f"{e['rss_mb']['jax_steps_peak']:.0f}; " + (f"{e['rss_mb']['torch_steps_peak']:.0f}"
                                                            if e['rss_mb'].get('torch_steps_peak') else "-"))
  row("compiled step: fusions, while loops, dots",
      lambda e: f"{e['jax']['hlo']['fusions']}, {e['jax']['hlo']['while_loops']}, {e['jax']['hlo']['dots']}")
  row("glimpses alone (B x M), ms: JAX / torch vectorised / torch crop loop",
      lambda e: " / ".join(f"{e['glimpse'][k]['median_ms']:.2f}" if k in e["glimpse"] else "-"
                           for k in ("jax", "torch_vectorised", "torch_crop_loop")))
  row("load average during the rounds (min-max)", lambda e: f"{e['loadavg_during'][0]}-{e['loadavg_during'][1]}")
  return "\n".join(lines + rows) + "\n"


def write_files(results: dict[str, Any], text: str, out: Optional[str]) -> None:
  """Writes `results` to ``out.json`` and `text` to ``out.md`` (directories created) when ``out`` is given; the
  benchmarks' one writer."""
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1, default=str)
    with open(out + ".md", "w", encoding="utf-8") as f:
      f.write(text)


def write(results: dict[str, Any], out: Optional[str]) -> str:
  """Writes ``out.json`` and ``out.md`` (when ``out`` is given); returns the markdown."""
  text = markdown(results)
  write_files(results, text, out)
  return text


if __name__ == "__main__":  # the data-parallel child process (`data_parallel_child`)
  from wsram_jax.training import cli  # pylint: disable=g-import-not-at-top
  cli.keep_freed_memory()  # as in the parent (`cli.run_main`)
  print(json.dumps(_child(json.loads(sys.argv[1]))))
