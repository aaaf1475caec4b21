"""The training core every task runs on (it imports no task; docs/ARCHITECTURE.md).

* `step`: one update for any task's loss and batch sampler (`build_loss_and_grads`, `build_step`: clipping, Adam,
  the baseline's state, the NaN guard), the optimiser, a fresh state, the data-parallel mesh, the
  gradient-variance diagnostics, restoring a run.
* `loop`: `TrainState`, `guarded_update` and `run` (resume, progress lines, evaluation, diagnostics, checkpoints,
  the workdir's lock).
* `signals`: SIGINT and SIGTERM as an exception, held back while a checkpoint is written.
* `checkpoints`, `metric_writers`: orbax checkpoints with fallback; metrics.jsonl and TensorBoard.
* `config`: the configuration checks every task shares; reading a run's recorded configuration.
* `cli`: the binaries' main (one-line errors and exit codes, the compilation cache, heap reuse).
* `report`: tables and figures from runs' metrics.
"""
