r"""Benchmarks R runs as one program (`wsram_jax.training.runs`) against R single-run steps, in one process.

    python -m benchmarks.runs [--run_counts=1,2,4,8] [--batch_size=32] [--steps=40] [--rounds=4] \
        [--out=benchmarks/results/runs_cpu_2core]

For each R: the R-run step (`--config.num_runs=R`, seeds 0..R-1; on a CPU its run axis split over one XLA device
per core, as the training binary does) and R separate single-run steps (the standard one-device step, the same
seeds), interleaved in rounds. Reported: updates per second summed over the runs for both and their ratio,
the in-process time to lower and compile the R-run step (in a process that has traced and compiled other steps
before: not the cold compile of `benchmarks.coldcompile`'s one definition, which `python -m benchmarks.compile
--num_runs=R` measures), XLA's memory analysis of it, and the process's peak RSS.
Writes OUT.json and OUT.md when --out is given (atomically; inside this checkout never over results with more
run counts unless --force: `benchmarks.report.write_files`). BENCHMARKS.md has the numbers and how to read them.
"""
import json
import os
import time

from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This binary's flags; defined only when it runs as a program (importing it adds no global absl flags)."""
  flags.DEFINE_list("run_counts", ["1", "2", "4", "8"], "Numbers of runs R to measure.")
  flags.DEFINE_integer("batch_size", 32, "Batch size B of every run.")
  flags.DEFINE_integer("steps", 40, "Timed steps of each kind per R (after warm-up), over the rounds.")
  flags.DEFINE_integer("rounds", 4, "Interleaved rounds.")
  flags.DEFINE_string("variant", "wsram_q_cv", "Config variant of experiments/configs/mnist.py.")
  flags.DEFINE_multi_string("override", [], "KEY=VALUE config overrides (e.g. for a test).")
  flags.DEFINE_string("out", None, "Write OUT.json and OUT.md (directories are created).")
  flags.DEFINE_bool("force", False, "Write --out even over a benchmark with more measurements inside this checkout.")


def measure(run_counts, batch_size, steps, rounds, variant="wsram_q_cv", overrides=(), log=print) -> dict:
  """The measurements (see the module docstring) as a dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import procfs  # pylint: disable=g-import-not-at-top
  from wsram_jax.classifier import train  # pylint: disable=g-import-not-at-top
  from wsram_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  images, labels = common.synthetic_digits(10000)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  results = {"environment": procfs.environment(), "devices": len(jax.local_devices()), "batch_size": batch_size,
             "variant": variant, "rows": []}
  single_config = common.make_config(variant, batch_size, overrides)
  model = train.build_model(single_config)
  optimizer = step_lib.make_optimizer(single_config)
  single = train.make_train_step(single_config, model, optimizer)
  for r in run_counts:
    config = common.make_config(variant, batch_size, tuple(overrides) + (("num_runs", r),))
    multi_state = train.create_train_state(config, model, step_lib.make_optimizer(config))
    multi = train.make_train_step(config, model, step_lib.make_optimizer(config))
    t0 = time.perf_counter()
    lowered = multi.lower(multi_state, images, labels)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    singles = []
    for seed in range(r):
      with single_config.unlocked():
        single_config.seed = seed
      singles.append(train.create_train_state(single_config, model, optimizer))
    holder = {"multi": multi_state, "singles": singles}

    def run_multi():
      holder["multi"], _ = compiled(holder["multi"], images, labels)
      jax.block_until_ready(holder["multi"])

    def run_singles():
      for i in range(r):
        holder["singles"][i], _ = single(holder["singles"][i], images, labels)
      jax.block_until_ready(holder["singles"])

    for _ in range(3):
      run_multi()
      run_singles()
    per_round = max(1, steps // rounds)
    t_multi = t_single = 0.0
    for _ in range(rounds):
      t = time.perf_counter()
      for _ in range(per_round):
        run_multi()
      t_multi += time.perf_counter() - t
      t = time.perf_counter()
      for _ in range(per_round):
        run_singles()
      t_single += time.perf_counter() - t
    n = per_round * rounds
    row = {"runs": r, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
           "updates_per_s": round(r * n / t_multi, 1), "single_updates_per_s": round(r * n / t_single, 1),
           "ratio": round(t_single / t_multi, 2),
           "temp_mb": round(mem.temp_size_in_bytes / 2**20, 1) if mem else None,
           "argument_mb": round(mem.argument_size_in_bytes / 2**20, 1) if mem else None,
           "peak_rss_mb": round(procfs.peak_rss_mb(), 1)}
    results["rows"].append(row)
    log(f"R={r}: {row['updates_per_s']} updates/s in one program against {row['single_updates_per_s']} for "
        f"{r} single-run steps ({row['ratio']}x); compile {row['lower_s']} + {row['compile_s']} s; "
        f"temporaries {row['temp_mb']} MB")
  results["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return results


def runs_counts(results: dict) -> dict[str, int]:
  """What these results are measured by (`benchmarks.report.write_files`): the numbers of runs R timed."""
  return {"run counts timed": len(results["rows"])}


def markdown(results: dict) -> str:
  env = results["environment"]
  lines = [f"{env['cpu']}, {env['cores']} cores, {results['devices']} XLA device(s) for the runs; jax {env['jax']} "
           f"({env['backend']}); B = {results['batch_size']}, {results['variant']}; load average "
           f"{env['loadavg']} at the start, {env.get('loadavg_end')} at the end.", "",
           "| R | updates/s, R runs in one program | updates/s, R single-run steps | ratio | "
           "lower + compile s, in this process (not cold) | "
           "XLA temporaries MB | peak RSS MB |", "|---|---|---|---|---|---|---|"]
  for row in results["rows"]:
    lines.append(f"| {row['runs']} | {row['updates_per_s']} | {row['single_updates_per_s']} | **{row['ratio']}x** | "
                 f"{row['lower_s']} + {row['compile_s']} | {row['temp_mb']} | {row['peak_rss_mb']} |")
  return "\n".join(lines)


def main(argv):
  from wsram_jax import errors  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  try:
    run_counts = tuple(int(r) for r in FLAGS.run_counts)
    overrides = tuple((k, json.loads(v) if v[:1] in "0123456789-[{\"tf" else v)
                      for k, v in (o.split("=", 1) for o in FLAGS.override))
  except ValueError as e:
    raise errors.ConfigError(f"--run_counts takes integers and --override KEY=VALUE: {e}.") from None
  if not run_counts or min(run_counts) < 1 or FLAGS.steps < 1 or FLAGS.rounds < 1:
    raise errors.ConfigError("--run_counts, --steps and --rounds must be positive.")
  results = measure(run_counts, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds, FLAGS.variant, overrides)
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  text = markdown(results)
  report.write_files(results, text + "\n", FLAGS.out, counts=runs_counts, force=FLAGS.force)
  print(text)


if __name__ == "__main__":
  from wsram_jax.training import cli  # pylint: disable=g-import-not-at-top
  from wsram_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # One XLA CPU device per core, set before JAX starts, as the training binary does for several runs.
  jax.config.update("jax_num_cpu_devices", runs_lib.cpu_devices(os.cpu_count() or 1))
  define_flags()
  cli.run_main(main)
