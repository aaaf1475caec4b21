"""The benchmarks' results as markdown (`markdown`, for `benchmarks.step`'s results) and the one writer of their
files (`write_files`: OUT.json and OUT.md).

The files are written atomically and together, and never replace a more complete benchmark inside this checkout
(where benchmarks/results/ lives) unless told to (`wsram_jax.report_files`): each benchmark measures its results by
what it timed (`step_counts` here, `benchmarks.compile.compile_counts`, `benchmarks.runs.runs_counts`); results
that timed nothing are not written (exit 2)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from wsram_jax import report_files

__all__ = ["markdown", "step_counts", "write_files", "write"]


def _peer_label(peer: dict[str, Any]) -> str:
  threads = f"{peer['threads']} thread{'s' if peer['threads'] != 1 else ''}"
  if peer["kind"] == "compiled":
    return f"PyTorch compiled (torch.compile mode={peer['mode']}, {threads}) ms/step"
  return f"PyTorch eager ({threads}) ms/step"


def markdown(results: dict[str, Any]) -> str:
  """`benchmarks.step.run`'s results as a markdown table (a column per batch size)."""
  env = results["environment"]
  lines = [f"{env['cpu']}, {env['cores']} cores; jax {env['jax']} ({env['backend']}), torch {env['torch']}; "
           f"{results['options']['variant']}; load average {env['loadavg']} at the start, {env.get('loadavg_end')} "
           "at the end.", ""]
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
    if any(c != "-" for c in cells):  # a row that no batch size has (no data parallel, no torch) is left out
      rows.append(f"| {name} | " + " | ".join(cells) + " |")

  ms = lambda s: f"{s['median_ms']:.1f} ({s['p20_ms']:.1f}-{s['p80_ms']:.1f})"
  row("JAX ms/step, median (p20-p80)", lambda e: f"**{e['jax']['step']['median_ms']:.1f}** "
                                                 f"({e['jax']['step']['p20_ms']:.1f}-{e['jax']['step']['p80_ms']:.1f})")
  peers = {}
  for e in results["batch_sizes"].values():
    for k, v in e["torch"].items():
      peers.setdefault(k, v)
  for name in sorted(peers, key=lambda k: (peers[k].get("kind") != "eager", k)):
    row(_peer_label(peers[name]), lambda e, k=name: ms(e["torch"][k]["step"]))
  if peers:
    row("PyTorch compile: first compiled step, s (the run's first in a fresh Inductor cache; later ones reuse its "
        "kernels)",
        lambda e: ", ".join(f"{e['torch'][k]['mode']} ({e['torch'][k]['threads']}t) {e['torch'][k]['compile_s']:.0f}"
                            for k in e["torch"]
                            if e["torch"][k].get("kind") == "compiled") or "-")
    row("**JAX speed-up over the fastest PyTorch** (which)",
        lambda e: f"**{e['speedup_of_jax_over_best_torch']:.2f}x** ({e['torch_best']})")
    row("JAX speed-up over the fastest eager / compiled PyTorch",
        lambda e: " / ".join(f"{e['torch'][e[f'torch_best_{kind}']]['speedup_of_jax']:.2f}x"
                             if f"torch_best_{kind}" in e else "-" for kind in ("eager", "compiled")))
  failed = sorted({k for e in results["batch_sizes"].values() for k in e.get("torch_failed", {})})
  for name in failed:
    row(f"{name}: failed", lambda e, k=name: e["torch_failed"][k])
  row("JAX data parallel over n host devices (one per core; child process): n, ms/step (p20-p80); one device "
      "there", lambda e: f"{e['jax_data_parallel']['devices']}, **{e['jax_data_parallel']['step']['median_ms']:.1f}**"
                         f" ({e['jax_data_parallel']['step']['p20_ms']:.1f}-"
                         f"{e['jax_data_parallel']['step']['p80_ms']:.1f}); "
                         f"{e['jax_data_parallel']['one_device']['median_ms']:.1f}")
  if peers:
    row("JAX data parallel over the fastest PyTorch (the two ratios chained)",
        lambda e: f"**{e['speedup_of_data_parallel_over_best_torch']:.2f}x**")
  def cold(e):
    c = e["jax"]["compile_time"]["cold"]
    return (f"{c['lower_s']:.1f} + {c['compile_s']:.1f} = **{c['total_s']:.1f}** "
            f"({c['lower_cpu_s']:.1f} + {c['compile_cpu_s']:.1f})")

  row("JAX cold compile (benchmarks.coldcompile): lower + compile = total, wall s (CPU s)", cold)
  row("JAX second run (persistent cache): lower + load, wall s",
      lambda e: f"{e['jax']['compile_time']['second_run']['total_s']:.1f}")
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


def step_counts(results: dict[str, Any]) -> dict[str, int]:
  """What `benchmarks.step`'s results are measured by: the batch sizes whose JAX step was timed, and the PyTorch
  peers timed over them."""
  sizes = results["batch_sizes"].values()
  return {"batch sizes timed": sum("step" in e.get("jax", {}) for e in sizes),
          "PyTorch peers timed": sum(len(e.get("torch", {})) for e in sizes)}


def write_files(results: dict[str, Any], text: str, out: Optional[str], *,
                counts: Callable[[dict[str, Any]], Mapping[str, int]] = step_counts, force: bool = False) -> None:
  """Writes `results` to ``out.json`` and `text` to ``out.md`` (directories created), atomically and together, when
  ``out`` is given; the benchmarks' one writer. Refused (`errors.ReportRefused`, nothing written) when `counts` of
  the results are all 0, or fall short of an ``out.json`` inside this checkout (unless `force`)."""
  if not out:
    return
  measured = dict(counts(results))
  with report_files.Report(force=force, elsewhere="--out") as files:
    files.refuse_empty(sum(measured.values()), "The benchmark timed nothing")
    files.guard(out + ".json", measured, lambda p: counts(report_files.read_json(p)), default_destination=False)
    files.write_json(out + ".json", results, indent=1, default=str)
    files.write_text(out + ".md", text)


def write(results: dict[str, Any], out: Optional[str], *, force: bool = False) -> str:
  """Writes ``out.json`` and ``out.md`` (when ``out`` is given; `write_files`); returns the markdown."""
  text = markdown(results)
  write_files(results, text, out, force=force)
  return text
