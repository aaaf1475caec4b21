r"""Reproduces the paper's Table 1 and Figures 2-3 at a CPU budget: a resumable sweep, then the report.

    python -m experiments.table1 --root=runs/table1 --steps=15000 --seeds=0,1 --jobs=2

Runs (each `python -m experiments.train` in its own workdir under --root, so each resumes by itself):

* Table 1 / Figure 2: the six variants (var, var_cv, wsram, wsram_cv, wsram_q, wsram_q_cv) for every seed;
* Figure 3: var_cv with the exploration heuristics off and wsram_q_cv with them on (seed 0), beside the
  Table 1 runs of the same variants (VAR has them on by default, WS-RAM off).

Stop it at any time (or lose the session): started again with the same flags it resumes every run where its
last checkpoint left it. When the runs are done (or with --report_only, from whatever has been written so far)
it writes results/table1.json, results/figure2.png, results/figure3.png, results/glimpses.png (the greedy
glimpse paths of the first seed's WS-RAM+q+c model on test canvases) and the Table 1 section of RESULTS.md.
"""
import os
import shlex
import subprocess
import sys
import time

from absl import flags

from experiments.configs import mnist as mnist_configs
from wsram_jax.training import cli
from wsram_jax import errors
from wsram_jax.training import report
from wsram_jax.classifier import train

_ROOT = flags.DEFINE_string("root", "runs/table1", "Directory holding one workdir per run.")
_STEPS = flags.DEFINE_integer("steps", 15000, "Updates per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the Table 1 runs.")
_JOBS = flags.DEFINE_integer("jobs", 2, "Runs at a time (each single-threaded when > 1).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write the report from the runs' metrics so far.")
_RESULTS = flags.DEFINE_string("results", "results", "Directory for the figures and the JSON summary.")
_EXTRA = flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run (e.g. for a test).")

TABLE_VARIANTS = ("var", "var_cv", "wsram", "wsram_cv", "wsram_q", "wsram_q_cv")


def _heuristics_flags(setting: dict) -> list[str]:
  return [f"--config.heuristics.{k}={v}" for k, v in setting.items()]


def planned_runs(seeds, steps, extra) -> dict[str, list[str]]:
  """run name -> its `experiments.train` arguments (without --workdir), in the order they are run: the first
  seed's Table 1 runs and the two Figure 3 runs first, so a sweep cut short still gives a whole report."""
  common = [f"--config.num_steps={steps}", *extra]
  table = lambda v, seed: [f"--config=experiments/configs/mnist.py:{v}", f"--config.seed={seed}", *common]
  first = seeds[0]
  runs = {f"{v}_s{first}": table(v, first) for v in TABLE_VARIANTS}
  runs[f"var_cv_heuroff_s{first}"] = table("var_cv", first) + _heuristics_flags(mnist_configs.HEURISTICS_OFF)
  runs[f"wsram_q_cv_heuron_s{first}"] = table("wsram_q_cv", first) + _heuristics_flags(mnist_configs.HEURISTICS_ON)
  for seed in seeds[1:]:
    runs.update({f"{v}_s{seed}": table(v, seed) for v in TABLE_VARIANTS})
  return runs


def _done(workdir: str, steps: int) -> bool:
  final = report.final_metrics(workdir)
  return final.get("step", 0) >= steps and "eval/error_sampled" in final


def run_all(runs: dict[str, list[str]], root: str, steps: int, jobs: int) -> None:
  env = dict(os.environ)
  if jobs > 1:  # Several single-threaded processes use 2 cores better than one two-threaded one here.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
  pending = [name for name in runs if not _done(os.path.join(root, name), steps)]
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


def write_report(runs: dict[str, list[str]], root: str, seeds, results: str, command: str,
                 steps: int = 0) -> None:
  wd = lambda name: os.path.join(root, name)
  groups = {v: [wd(f"{v}_s{s}") for s in seeds] for v in TABLE_VARIANTS}
  summaries = report.summarize(groups, key="eval/error_sampled", min_step=steps)
  greedy = report.summarize(groups, key="eval/error_greedy", min_step=steps)
  glimpse_run = wd(f"wsram_q_cv_s{seeds[0]}")
  if os.path.exists(os.path.join(glimpse_run, "config.json")):
    config = train.load_config(glimpse_run)
    config.data.num_test = 16
    state = train.restore_state(config, glimpse_run)
    data = train.load_data(config)
    train.glimpse_figure(config, state.params, data.test_canvases, data.test_labels,
                         os.path.join(results, "glimpses.png"), boxes=data.test_boxes)
  report.write_json(os.path.join(results, "table1.json"), {
      "command": command, "error_sampled": summaries, "error_greedy": greedy,
      "final_metrics": {name: report.final_metrics(wd(name)) for name in runs}})
  report.figure2(groups, os.path.join(results, "figure2.png"))
  first = seeds[0]
  report.figure3({
      "VAR+c": {"heuristics on": [wd(f"var_cv_s{first}")], "heuristics off": [wd(f"var_cv_heuroff_s{first}")]},
      "WS-RAM+q+c": {"heuristics on": [wd(f"wsram_q_cv_heuron_s{first}")],
                     "heuristics off": [wd(f"wsram_q_cv_s{first}")]},
  }, os.path.join(results, "figure3.png"))
  text = "\n\n".join([
      "Command: `" + command + "`",
      report.table1_markdown(summaries, key_name="eval/error_sampled"),
      f"Each run: {steps} updates. A cell counts only the runs that completed them.",
      "Prediction from the prior's mean glimpses (`eval/error_greedy`):",
      report.table1_markdown(greedy, key_name="eval/error_greedy"),
  ])
  report.write_between_markers("RESULTS.md", "table1", text)
  print(f"wrote {results}/table1.json, figure2.png, figure3.png and the Table 1 section of RESULTS.md")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if _STEPS.value < 1 or _JOBS.value < 1:
    raise errors.ConfigError("--steps and --jobs must be at least 1.")
  seeds = [int(s) for s in _SEEDS.value]
  runs = planned_runs(seeds, _STEPS.value, _EXTRA.value)
  command = "python -m experiments.table1 " + shlex.join(argv[0:0] + sys.argv[1:])
  if not _REPORT_ONLY.value:
    run_all(runs, _ROOT.value, _STEPS.value, _JOBS.value)
  write_report(runs, _ROOT.value, seeds, _RESULTS.value, command, _STEPS.value)


if __name__ == "__main__":
  cli.run_main(main)
