"""R independent runs of one configuration as one program: seeds, learning rates and other numbers swept at once.

    --config.num_runs=4                                    four seeds: config.seed, seed + 1, ...
    --config.num_runs=4 --config.runs.seed=0,1,2,3         the same, named
    --config.num_runs=3 --config.runs.learning_rate=1e-3,3e-4,1e-4   one run per learning rate

Each run has its own seed (its parameters and its PRNG stream), optimiser state and baseline state, and its own
value of every swept number (`SWEEPABLE`: the learning rate, the model's location std and the objective's
`objectives.HYPER`; none of them changes a shape). A run's numbers reach the step, the loss, the evaluation and
the diagnostics as ``hyper`` (``{name: scalar}``, `Runs.hyper_of`), always: ``{}`` for a single run without a
runs block. This module is the one place that tells one run from several:

* the state of R > 1 runs is the single run's `TrainState` with a leading run axis ``[R, ...]`` (`create_states`,
  `stack`, `unstack`; a single run's has none, so that its checkpoints are those of a run trained alone);
* the step of one run, ``step(state, hyper, *data)`` (`training.step.build_step`), becomes ``step(state, *data)``
  with the runs' numbers bound (`bind`): for R > 1 `jax.vmap` of it over the run axis with ``hyper`` ``{name:
  [R]}``, so run r computes what it would compute alone (up to the float reassociation of batched matmuls;
  tests check it);
* what the loop calls per run (evaluation, diagnostics) gets run r's state and numbers (`per_run`).

On a CPU the run axis is sharded over one XLA device per core (`cpu_devices`, set before JAX starts by the
binaries; `make_mesh`, `run_sharding`), so the runs share the cores instead of taking turns.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wsram_jax import objectives
from wsram_jax.errors import ConfigError
from wsram_jax.training import config as config_lib

__all__ = ["SWEEPABLE", "RUN_AXIS", "Runs", "from_config", "create_states", "bind", "state_sharding",
           "apply_learning_rate", "per_run", "stack", "unstack", "make_mesh", "run_sharding", "cpu_devices",
           "use_cpu_cores"]

RUN_AXIS = "runs"

# The swept numbers and where each lives in a config.
SWEEPABLE = {"learning_rate": "learning_rate", "loc_std": "model.loc_std",
             **{name: ("mixture_alpha" if name == "mixture_alpha" else f"heuristics.{name}")
                for name in objectives.HYPER}}


@dataclasses.dataclass(frozen=True)
class Runs:
  """The runs of a config: ``seeds`` (one per run) and ``values`` (swept name -> one value per run)."""
  seeds: tuple[int, ...]
  values: dict[str, tuple[float, ...]]

  @property
  def num_runs(self) -> int:
    return len(self.seeds)

  def hyper(self) -> dict[str, jax.Array]:
    """``{name: float32 [R]}``, the step's per-run ``hyper`` argument."""
    return {name: jnp.asarray(v, jnp.float32) for name, v in self.values.items()}

  def hyper_of(self, r: int) -> dict[str, jax.Array]:
    """Run r's own numbers, ``{name: float32 scalar}``, as the step passes them to one run's loss (``{}`` when
    nothing is swept)."""
    return {name: v[r] for name, v in self.hyper().items()}

  @property
  def several(self) -> bool:
    """Whether the state carries a run axis (R > 1)."""
    return self.num_runs > 1

  def label(self, r: int) -> str:
    """``'run 2 (seed 3, learning_rate 0.0003)'``."""
    parts = [f"seed {self.seeds[r]}"] + [f"{name} {v[r]:g}" for name, v in self.values.items()]
    return f"run {r} ({', '.join(parts)})"

  def config_for(self, config, r: int):
    """The config of run r trained alone (its single-run twin): its seed and swept values set, one run."""
    single = config.copy_and_resolve_references()
    with single.unlocked():
      single.seed = self.seeds[r]
      single.num_runs = 1
      for name in single.runs:
        single.runs[name] = ()
      for name, v in self.values.items():
        key = SWEEPABLE[name]
        config_lib.set_value(single, key, type(config_lib.get_value(single, key))(v[r]))
    return single


def from_config(config) -> Runs:
  """The `Runs` of ``config.num_runs`` and the ``config.runs`` block (``seed`` and the `SWEEPABLE` names: each
  empty, or one value per run). Raises `errors.ConfigError` for a bad block."""
  r = config.num_runs
  if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
    raise ConfigError(f"--config.num_runs must be an integer >= 1, got {r!r}.")
  unknown = sorted(set(config.runs) - {"seed"} - set(SWEEPABLE))
  if unknown:
    raise ConfigError(f"--config.runs has keys that cannot be swept: {', '.join(unknown)}; the sweepable ones "
                      f"are seed, {', '.join(SWEEPABLE)}.")

  def values(name):
    v = tuple(config.runs[name])
    if v and len(v) != r:
      raise ConfigError(f"--config.runs.{name} has {len(v)} values for --config.num_runs={r}; give one per run "
                        "(or none).")
    return v

  seeds = values("seed") or tuple(int(config.seed) + i for i in range(r))
  if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds):
    raise ConfigError(f"--config.runs.seed takes integers, got {seeds}.")
  swept = {}
  for name in SWEEPABLE:
    v = values(name)
    if v:
      if any(isinstance(x, bool) or not isinstance(x, (int, float, np.number)) for x in v):
        raise ConfigError(f"--config.runs.{name} takes numbers, got {v}.")
      swept[name] = tuple(float(x) for x in v)
  return Runs(seeds=tuple(int(s) for s in seeds), values=swept)


def create_states(runs: Runs, create: Callable[[int], Any], mesh: Optional[Mesh] = None) -> Any:
  """The fresh state of the runs from ``create(seed)`` (a run's state as it is made alone): a single run's, placed
  on the data-parallel `mesh` (replicated) or committed to the first local device, as a restored one is (jit keys
  its cache on that, so a fresh and a restored state share the compiled step); for R > 1 the R states stacked
  along a leading run axis and split over `make_mesh`'s devices."""
  if not runs.several:
    state = create(runs.seeds[0])
    return jax.device_put(state, jax.local_devices()[0] if mesh is None else replicated(mesh))
  state = stack([create(seed) for seed in runs.seeds])
  sharding = run_sharding(make_mesh(runs.num_runs))
  return state if sharding is None else jax.device_put(state, sharding)


def bind(step: Callable[..., Any], runs: Runs) -> Callable[..., Any]:
  """``step(state, hyper, *data) -> (state, metrics)`` of one run as ``step(state, *data)`` for `runs`: run 0's
  numbers bound for a single run; for R > 1, `jax.vmap` over the state's run axis with each run's numbers
  (metrics ``[R]``; the data is shared). Not jitted (`training.step.jit`; `state_sharding` says where the new
  state lies)."""
  if not runs.several:
    numbers = runs.hyper_of(0)

    def step_of_one(state, *data):
      return step(state, numbers, *data)

    return _named_step(step_of_one)
  numbers = runs.hyper()

  def step_of_runs(state, *data):
    # Behind a barrier the numbers are values, not constants XLA could fold into the arithmetic (a division by a
    # constant becomes a multiplication): the program computes what it computed when they were arguments.
    return jax.vmap(lambda s, h: step(s, h, *data))(state, jax.lax.optimization_barrier(numbers))

  return _named_step(step_of_runs)


def _named_step(fn):
  fn.__name__ = fn.__qualname__ = "step"  # the compiled program's name (``jit_step``), whatever the runs
  return fn


def state_sharding(runs: Runs, mesh: Optional[Mesh] = None):
  """Where the step leaves the new state: replicated over the data-parallel `mesh`, or for R > 1 runs split over
  `make_mesh`'s devices; None (where its inputs lie) otherwise."""
  return run_sharding(make_mesh(runs.num_runs)) if runs.several else replicated(mesh)


def apply_learning_rate(updates: Any, hyper) -> Any:
  """The optimiser's `updates` times minus the run's own learning rate when the sweep varies it (the optimiser of
  such a config leaves out Adam's last step, ``scale(-learning_rate)``: `training.step.make_optimizer`); the
  updates unchanged otherwise."""
  if "learning_rate" not in hyper:
    return updates
  return jax.tree_util.tree_map(lambda u: -hyper["learning_rate"] * u, updates)


def per_run(fn: Callable[[Any, int], Any], runs: Runs) -> Callable[..., Any]:
  """``fn(state_r, r)`` as the loop calls it (`training.loop.run`): ``fn(state, 0)`` for a single run, ``fn(state_r,
  r)`` with run r's state for several."""
  return fn if runs.several else (lambda state: fn(state, 0))


def stack(states: list[Any]) -> Any:
  """R pytrees of the same structure -> one with a leading run axis."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def unstack(state: Any, r: int) -> Any:
  """Run r of a stacked pytree.

  A leaf sharded over several devices (`run_sharding`) is read from the one shard that holds run r, on that
  shard's device: indexing the global array instead compiles a program for every device with a cross-device
  collective, and a run of Table 1 aborted when one such all-reduce's rendezvous passed XLA:CPU's 40 s timeout
  (most likely several of them, dispatched back to back, held every thread of the shared pool while waiting
  for each other)."""
  return jax.tree_util.tree_map(lambda x: _take_run(x, r), state)


def _take_run(x, r: int):
  if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
    for shard in x.addressable_shards:
      rows = shard.index[0] if shard.index else slice(None)
      start, stop, _ = rows.indices(x.shape[0])
      if start <= r < stop:
        return shard.data[r - start]
  return x[r]


def make_mesh(num_runs: int) -> Optional[Mesh]:
  """A mesh with one axis ``runs`` over the local devices that divide the runs evenly (the most that do), or None
  for one run or one device."""
  devices = jax.local_devices()
  n = max(d for d in range(1, len(devices) + 1) if num_runs % d == 0)
  return None if num_runs == 1 or n == 1 else Mesh(np.asarray(devices[:n]), (RUN_AXIS,))


def run_sharding(mesh: Optional[Mesh]):
  """How a stacked state lies on `mesh`: the run axis split over its devices (None: one device)."""
  return None if mesh is None else NamedSharding(mesh, PartitionSpec(RUN_AXIS))


def replicated(mesh: Optional[Mesh]):
  return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def cpu_devices(num_runs: int) -> int:
  """How many XLA CPU devices R runs should be split over: one per core, at most R (1 for one run). The binaries
  set it (``jax_num_cpu_devices``) before JAX starts; it has no effect on a GPU or TPU."""
  if num_runs <= 1:
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(num_runs, cores))


def use_cpu_cores(config) -> int:
  """For several runs (``config.num_runs`` > 1), one XLA CPU device per core (at most one per run, `cpu_devices`),
  so that the runs share the cores; call it before JAX starts (nothing changes on a GPU or TPU, nor once JAX has
  started). Returns the number of CPU devices asked for."""
  num_runs = config.get("num_runs", 1)
  devices = cpu_devices(num_runs if isinstance(num_runs, int) else 1)
  if devices > 1:
    try:
      jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError as e:  # JAX has started already: the runs then share one device
      logging.getLogger(__name__).warning("Cannot split the runs over %d CPU devices (%s).", devices, e)
      return 1
  return devices
