r"""Tables and figures of finished caption runs (paper Table 2 and Figure 4): BLEU-1..4, training NLL, examples.

    python -m experiments.caption_report --out=results/captions \
        --run=VAR:var_cv:/tmp/cap_var --run=WS-RAM+q:wsram_q_cv:/tmp/cap_wsram [--config.x=... overrides]

Each ``--run`` is ``LABEL:VARIANT:WORKDIR`` (VARIANT of experiments/configs/captions.py; the run's recorded
config.json is what is restored). Writes to ``--out``:

* ``results.json``: per run, the last test BLEU-1..4 and NLL, and the series against updates
  (``train/nll``, ``train/bound``, ``train/ess``, ``eval/bleu1..4``, ``eval/nll``);
* ``results.md``: the BLEU table (x100, as Table 2) and the training NLL at a few updates (as Figure 4);
* ``curves.png`` (training NLL and test BLEU against updates) and ``examples_<label>.png`` (greedy captions
  with each word's glimpse: level and location).
"""
import json
import os
import re

from absl import flags
import ml_collections

from wsram_jax import cli
from wsram_jax import errors
from wsram_jax import metric_writers
from wsram_jax.captioning import plots
from wsram_jax.captioning import train

_OUT = flags.DEFINE_string("out", "results/captions", "Output directory.")
_RUNS = flags.DEFINE_multi_string("run", [], "LABEL:VARIANT:WORKDIR of a finished run.")
_EXAMPLES = flags.DEFINE_integer("examples", 8, "Test images per examples figure.")

SERIES = ("train/nll", "train/bound", "train/ess", "train/nll_per_word", "eval/bleu1", "eval/bleu2",
          "eval/bleu3", "eval/bleu4", "eval/nll", "eval/log_p_y", "eval/exact_match")


def _recorded_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise errors.DataError(f"{workdir} holds no run (no config.json).")
  with open(path, encoding="utf-8") as f:
    values = json.load(f)
  # JSON turned tuples into lists; the encoder channels are a tuple in the config.
  values["model"]["encoder_channels"] = tuple(values["model"]["encoder_channels"])
  return ml_collections.ConfigDict(values)


def _slug(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if not _RUNS.value:
    raise errors.ConfigError("Give at least one --run=LABEL:VARIANT:WORKDIR.")
  runs = []
  for spec in _RUNS.value:
    parts = spec.split(":", 2)
    if len(parts) != 3:
      raise errors.ConfigError(f"--run={spec!r} is not LABEL:VARIANT:WORKDIR.")
    runs.append(parts)
  os.makedirs(_OUT.value, exist_ok=True)
  report = {}
  for label, variant, workdir in runs:
    records = metric_writers.read_metrics(workdir)
    entry = {"variant": variant, "workdir": workdir, "series": {}}
    for name in SERIES:
      steps, values = metric_writers.series(records, name)
      if steps.size:
        entry["series"][name] = {"steps": steps.tolist(), "values": values.tolist()}
        entry[f"last/{name}"] = float(values[-1])
        entry[f"last_step/{name}"] = int(steps[-1])
    report[label] = entry
    config = _recorded_config(workdir)
    restored = train.restore(config, workdir)
    plots.caption_examples(restored, os.path.join(_OUT.value, f"examples_{_slug(label)}.png"),
                           num=_EXAMPLES.value, title=f"{label} ({variant}), step {restored.step}")
  plots.training_curves({label: wd for label, _, wd in runs}, os.path.join(_OUT.value, "curves.png"),
                        title="Digit captions: training NLL and test BLEU against updates")
  with open(os.path.join(_OUT.value, "results.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)

  lines = ["| method | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | test NLL | exact match | updates |",
           "|---|---|---|---|---|---|---|---|"]
  for label, e in report.items():
    bleus = " | ".join(f"{100 * e.get(f'last/eval/bleu{n}', float('nan')):.1f}" for n in (1, 2, 3, 4))
    lines.append(f"| {label} | {bleus} | {e.get('last/eval/nll', float('nan')):.3f} | "
                 f"{100 * e.get('last/eval/exact_match', float('nan')):.1f}% | "
                 f"{e.get('last_step/eval/bleu1', 0)} |")
  nll_steps = sorted({s for e in report.values() for s in e["series"].get("train/nll", {}).get("steps", [])})
  shown = [s for s in nll_steps if s in (100, 200, 500, 1000, 1500, 2000, 3000, 5000, 10000)] or nll_steps[-5:]
  lines += ["", "Training NLL -log p(y|a) (nats per caption, mean over the log period) against updates:", "",
            "| method | " + " | ".join(str(s) for s in shown) + " |", "|---|" + "---|" * len(shown)]
  for label, e in report.items():
    series = dict(zip(e["series"].get("train/nll", {}).get("steps", []),
                      e["series"].get("train/nll", {}).get("values", [])))
    lines.append(f"| {label} | " + " | ".join(f"{series[s]:.2f}" if s in series else "" for s in shown) + " |")
  with open(os.path.join(_OUT.value, "results.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  cli.run_main(main)
