r"""Cold compile time of the train step with XLA:CPU's two fusion emitters, and what each costs per step.

    python -m benchmarks.compile [--repeats=3] [--batch_size=32] [--num_runs=1] [--steps=200] [--rounds=8] \
        [--out=benchmarks/results/compile_cpu_2core]

Two settings of the jitted step (`wsram_jax.training.step.compiler_options`):

* ``ours``: the default, XLA's older loop-fusion emitters (``xla_cpu_use_fusion_emitters=False``);
* ``xla``: XLA's default MLIR fusion emitters (what ``WSRAM_JAX_FUSION_EMITTERS=1`` gives).

Both at LLVM -O1. Cold compile by the one definition (`benchmarks.coldcompile`, which `experiments.benchmark`
uses too): every measurement is a fresh process with an empty persistent compilation cache, the two settings
alternating, timing ``lower`` (tracing and lowering to StableHLO, Python) and ``compile`` (XLA), wall clock and
process CPU time. The price: one more process compiles both programs side by side and times their
steps interleaved in rounds (``--steps`` steps of each per round after one untimed call), reporting the median
ms per step of each and their ratio. ``--num_runs`` > 1 measures the R-run step (`training.runs`; the run axis
split over one XLA device per core, as the training binary does). Synthetic digits stand in for MNIST.
Writes OUT.json and OUT.md when --out is given (atomically; inside this checkout never over results with more
measurements unless --force: `benchmarks.report.write_files`); BENCHMARKS.md ("Compile time") has the numbers.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This binary's flags; defined only when it runs as a program, so that importing it (tests, other binaries
  with a --steps of their own) adds nothing to the global absl flags."""
  flags.DEFINE_integer("repeats", 3, "Cold-compile processes per setting (alternating).")
  flags.DEFINE_integer("batch_size", 32, "Batch size B.")
  flags.DEFINE_integer("num_runs", 1, "Runs R in the step (1: the single-run step).")
  flags.DEFINE_integer("steps", 200, "Timed steps of each setting per round (0: no step timing).")
  flags.DEFINE_integer("rounds", 8, "Interleaved rounds of step timing.")
  flags.DEFINE_string("variant", "wsram_q_cv", "Config variant of experiments/configs/mnist.py.")
  flags.DEFINE_string("out", None, "Write OUT.json and OUT.md (directories are created).")
  flags.DEFINE_string("child", None, "Internal: 'steps', with the spec as JSON in --spec.")
  flags.DEFINE_string("spec", None, "Internal: the child's spec.")
  flags.DEFINE_bool("force", False, "Write --out even over a benchmark with more measurements inside this checkout.")


SETTINGS = {"ours": {}, "xla": {"xla_cpu_use_fusion_emitters": True}}  # compiler options over `compiler_options`


def child_steps(spec: dict) -> dict:
  """Both settings' steps compiled in this process and timed interleaved: ms per step, per round."""
  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import coldcompile  # pylint: disable=g-import-not-at-top

  compiled, states = {}, {}
  for setting in SETTINGS:
    step, state, images, labels = coldcompile.build({**spec, "compiler_options": SETTINGS[setting]})
    compiled[setting] = step.lower(state, images, labels).compile()
    states[setting] = state
  ms = {s: [] for s in SETTINGS}
  for r in range(spec["rounds"]):
    for setting in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
      fn, state = compiled[setting], states[setting]
      state, _ = fn(state, images, labels)
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      for _ in range(spec["steps"]):
        state, _ = fn(state, images, labels)
      jax.block_until_ready(state)
      ms[setting].append(round((time.perf_counter() - t0) / spec["steps"] * 1e3, 3))
      states[setting] = state
  return {"ms_per_step": ms}


def _run_child(spec: dict) -> dict:
  env = dict(os.environ, WSRAM_JAX_COMPILATION_CACHE="off", JAX_PLATFORMS="cpu")
  env.pop("WSRAM_JAX_FUSION_EMITTERS", None)
  proc = subprocess.run([sys.executable, "-m", "benchmarks.compile", "--child=steps", f"--spec={json.dumps(spec)}"],
                        cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"The steps benchmark process failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_range(values) -> dict:
  return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def measure(repeats: int, batch_size: int, num_runs: int, steps: int, rounds: int, variant: str = "wsram_q_cv",
            overrides=(), log=print) -> dict:
  """The measurements of the module docstring, as a dict (`overrides`: (dotted config key, value) pairs)."""
  from benchmarks import coldcompile  # pylint: disable=g-import-not-at-top
  from benchmarks import procfs  # pylint: disable=g-import-not-at-top

  spec = {"variant": variant, "batch_size": batch_size, "num_runs": num_runs, "overrides": list(overrides)}
  results = {"environment": procfs.environment(), "spec": spec, "compile": {s: [] for s in SETTINGS}}
  env = {"JAX_PLATFORMS": "cpu", "WSRAM_JAX_FUSION_EMITTERS": ""}  # the settings' options decide the emitters
  for i in range(repeats):
    for setting in (list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]):
      row = coldcompile.measure({**spec, "compiler_options": SETTINGS[setting]}, env=env)
      row["setting"] = setting
      results["compile"][setting].append(row)
      log(f"  cold compile {i + 1}/{repeats}, {setting}: lower {row['lower_s']} s + compile {row['compile_s']} s "
          f"(CPU {row['compile_cpu_s']} s), {row['fusions']} fusions")
  results["summary"] = {s: {k: _median_range([r[k] for r in rows]) for k in ("lower_s", "compile_s", "total_s")}
                        for s, rows in results["compile"].items()}
  if steps > 0:
    log(f"  timing both steps interleaved: {rounds} rounds of {steps} steps each ...")
    ms = _run_child({**spec, "steps": steps, "rounds": rounds})["ms_per_step"]
    results["steps"] = {s: _median_range(v) | {"all": v} for s, v in ms.items()}
    results["step_ratio_ours_over_xla"] = round(results["steps"]["ours"]["median"] /
                                                results["steps"]["xla"]["median"], 3)
  results["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return results


def compile_counts(results: dict) -> dict[str, int]:
  """What these results are measured by (`benchmarks.report.write_files`): the cold compiles timed, and the
  settings whose steps were timed."""
  return {"cold compiles": sum(len(rows) for rows in results["compile"].values()),
          "settings with timed steps": len(results.get("steps", {}))}


def markdown(results: dict) -> str:
  env, spec = results["environment"], results["spec"]
  fmt = lambda d: f"{d['median']} ({d['min']}-{d['max']})"
  lines = [f"{env['cpu']}, {env['cores']} cores; jax {env['jax']} ({env['backend']}); {spec['variant']}, "
           f"B = {spec['batch_size']}, R = {spec['num_runs']}; load average {env['loadavg']} at the start, "
           f"{env.get('loadavg_end')} at the end. Median (min-max) over the processes.", "",
           "| fusion emitters | lower s | XLA compile s | cold total s | ms per step, interleaved |",
           "|---|---|---|---|---|"]
  for s, name in (("ours", "XLA's older ones (ours)"), ("xla", "XLA's MLIR ones (XLA's default)")):
    summary = results["summary"][s]
    step = fmt(results["steps"][s]) if "steps" in results else "-"
    lines.append(f"| {name} | {fmt(summary['lower_s'])} | {fmt(summary['compile_s'])} | "
                 f"**{fmt(summary['total_s'])}** | {step} |")
  if "step_ratio_ours_over_xla" in results:
    lines += ["", f"Step time, ours / XLA's default: {results['step_ratio_ours_over_xla']}x (medians)."]
  return "\n".join(lines)


def main(argv):
  from wsram_jax import errors  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  if FLAGS.child:
    import jax  # pylint: disable=g-import-not-at-top
    from wsram_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
    spec = json.loads(FLAGS.spec)
    # As the training binary: R > 1 runs split over one XLA CPU device per core (set before JAX starts).
    jax.config.update("jax_num_cpu_devices", runs_lib.cpu_devices(spec["num_runs"]))
    print(json.dumps(child_steps(spec)))
    return
  if FLAGS.repeats < 1 or FLAGS.batch_size < 1 or FLAGS.num_runs < 1 or FLAGS.steps < 0 or FLAGS.rounds < 1:
    raise errors.ConfigError("--repeats, --batch_size, --num_runs and --rounds must be positive, --steps >= 0.")
  results = measure(FLAGS.repeats, FLAGS.batch_size, FLAGS.num_runs, FLAGS.steps, FLAGS.rounds,
                    FLAGS.variant)
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  text = markdown(results)
  report.write_files(results, text + "\n", FLAGS.out, counts=compile_counts, force=FLAGS.force)
  print(text)


if __name__ == "__main__":
  from wsram_jax.training import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  cli.run_main(main)
