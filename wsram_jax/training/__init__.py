"""The training core every task runs on (it imports no task; docs/ARCHITECTURE.md), one concern per module, each
importing only those listed before it:

* `signals`: SIGINT and SIGTERM as an exception, held back while a checkpoint is written.
* `checkpoints`, `metric_writers`: orbax checkpoints with fallback; metrics.jsonl and TensorBoard, read back.
* `memory`: the step's XLA estimate against the memory that is free; running out of it in one line.
* `config`: the configuration checks every task shares; setting keys by dotted name; a run's recorded config.
* `state`: `TrainState` (exactly a checkpoint) and `guarded_update` (the NaN guard).
* `workdir`: making the workdir, and its lock (one process at a time).
* `progress`: the progress line, the logged averages, the warning when the numbers leave a sane range.
* `resume`: which configuration may continue a workdir's checkpoints; recording the one that does.
* `task`: the `Task` interface a task implements (model, init, loss, sampler, data, evaluation, summary).
* `runs`: R runs of one configuration as one program (sweeps): the one place that tells one run from several.
* `step`: one update for any task's loss (clipping, Adam, the baseline's state, the NaN guard), the optimiser, the
  data-parallel mesh, the gradient-variance diagnostics, restoring a checkpoint.
* `loop`: `run`: resume, progress lines, evaluation, diagnostics, checkpoints, stopping on NaN or a signal.
* `trainer`: a `Task` trained and evaluated: the pieces above assembled, compiled functions cached.
* `cli`: the binaries' main (one-line errors and exit codes, the compilation cache, heap reuse).
"""
