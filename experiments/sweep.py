"""Running a sweep of `experiments.train` programs: one workdir per program (every seed of it as one program,
`--config.num_runs`), a few processes at a time, each skipped when its runs are done and resumed otherwise.

Shared by `experiments.table1` and `experiments.search`.
"""
import os
import shlex
import subprocess
import sys
import time

from experiments import report
from wsram_jax import errors
from wsram_jax.training import metric_writers


def select(runs: dict[str, list[str]], only) -> dict[str, list[str]]:
  """The runs named in `only`, in its order (all of them when it is empty)."""
  unknown = [name for name in only if name not in runs]
  if unknown:
    raise errors.UserError(f"--only: no workdir named {', '.join(unknown)}; the names are {', '.join(runs)}.")
  return {name: runs[name] for name in only} if only else runs


def run_dirs(root: str, name: str, seeds) -> list[str]:
  """The run directories of one workdir's seeds."""
  return [os.path.join(root, name, f"run_{i}") for i in range(len(seeds))] if len(seeds) > 1 else \
      [os.path.join(root, name)]


def done(root: str, name: str, seeds, steps: int) -> bool:
  finals = [metric_writers.final_metrics(d) for d in run_dirs(root, name, seeds)]
  return all(f.get("step", 0) >= steps and "eval/error_sampled" in f for f in finals)


def run_all(runs: dict[str, list[str]], root: str, seeds, steps, jobs: int) -> None:
  """Trains every workdir of `runs` (name -> its `experiments.train` arguments) that has not finished `steps`
  updates (one count for all, or name -> its count), `jobs` processes at a time, in order; each writes its
  command to WORKDIR/command.txt and its output to WORKDIR/log.txt. Raises `errors.UserError` naming the
  workdirs whose process failed, after the others have finished."""
  env = dict(os.environ)
  if jobs > 1:  # Several single-threaded processes use 2 cores better than one two-threaded one here.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
  steps_of = steps if isinstance(steps, dict) else dict.fromkeys(runs, steps)
  pending = [name for name in runs if not done(root, name, seeds, steps_of[name])]
  print(f"{len(runs) - len(pending)} of {len(runs)} runs done; {len(pending)} to go, {jobs} at a time.",
        flush=True)
  active: dict[str, subprocess.Popen] = {}
  failed = []
  while pending or active:
    while pending and len(active) < jobs:
      name = pending.pop(0)
      workdir = os.path.join(root, name)
      os.makedirs(workdir, exist_ok=True)
      cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *runs[name]]
      with open(os.path.join(workdir, "command.txt"), "w", encoding="utf-8") as f:
        f.write(shlex.join(cmd[1:]) + "\n")
      log = open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8")
      active[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
      print(f"started {name}", flush=True)
    time.sleep(5)
    for name, proc in list(active.items()):
      if proc.poll() is not None:
        del active[name]
        status = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see log.txt)"
        print(f"{name} {status}; {len(pending)} waiting, {len(active)} running", flush=True)
        if proc.returncode != 0:
          failed.append(name)
  if failed:
    raise errors.UserError(f"Runs {', '.join(failed)} failed; read their log.txt under {root}.")


