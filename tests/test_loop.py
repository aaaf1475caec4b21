"""The shared training loop and checkpoints, on a tiny noisy quadratic (no model needed)."""
import gc
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from wsram_jax.training import checkpoints
from wsram_jax import errors
from wsram_jax.training import loop
from wsram_jax.training import memory
from wsram_jax.training import metric_writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(
      num_steps=20, log_every=5, eval_every=10, checkpoint_every=5, keep_checkpoints=2, diag_every=0,
      jit=True, lr=0.1, poison_at=-1))
  c.update(overrides)
  return c


def _task(config):
  opt = optax.adam(config.lr)

  def init_state():
    params = {"w": jnp.ones((3,))}
    return loop.TrainState.create(params=params, opt_state=opt.init(params), key=jax.random.PRNGKey(0))

  @jax.jit
  def train_step(state):
    key = jax.random.fold_in(state.key, state.step)
    target = jax.random.normal(key, (3,))

    def loss_fn(p):
      loss = jnp.sum((p["w"] - target) ** 2)
      return jnp.where(state.step == config.poison_at, jnp.nan, loss)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)

    def apply(params, opt_state):
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return loop.guarded_update(state, grads, apply, loss), {"train/loss": loss}

  evaluate = lambda state: {"eval/w_norm": jnp.linalg.norm(state.params["w"])}
  return dict(init_state=init_state, train_step=train_step, evaluate=evaluate)


def test_runs_and_writes_metrics(tmp_path):
  config = _config()
  state, last = loop.run(config=config, workdir=str(tmp_path), **_task(config))
  assert int(state.step) == 20
  records = metric_writers.read_metrics(str(tmp_path))
  steps, _ = metric_writers.series(records, "train/loss")
  np.testing.assert_array_equal(steps, [5, 10, 15, 20])
  assert "eval/w_norm" in last
  assert glob.glob(str(tmp_path / "tensorboard" / "events*"))


def test_resume_is_bit_identical(tmp_path):
  config = _config()
  full, _ = loop.run(config=config, workdir=str(tmp_path / "a"), **_task(config))
  half = _config(num_steps=10)
  loop.run(config=half, workdir=str(tmp_path / "b"), **_task(half))
  resumed, _ = loop.run(config=config, workdir=str(tmp_path / "b"), **_task(config))
  np.testing.assert_array_equal(full.params["w"], resumed.params["w"])
  np.testing.assert_array_equal(full.opt_state[0].mu["w"], resumed.opt_state[0].mu["w"])


def test_a_resume_supersedes_the_metrics_of_the_lost_steps(tmp_path):
  config = _config(num_steps=20, log_every=4, checkpoint_every=10, eval_every=10)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  # As if killed after logging steps 11..20 but before the checkpoint of step 20, in the middle of a line:
  shutil.rmtree(tmp_path / "checkpoints" / "20")
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 24, "train/lo')
  before = metric_writers.read_metrics(str(tmp_path))
  loop.run(config=config, workdir=str(tmp_path), **_task(config))  # resumes from step 10
  records = metric_writers.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12, 16, 20]
  assert [r["step"] for r in records if "eval/w_norm" in r] == [10, 20]
  # The first average after the resume covers steps 11 and 12 only, and says so.
  assert {r["step"]: r.get("averaged_steps") for r in records if "train/loss" in r} == {
      4: None, 8: None, 12: 2, 16: None, 20: None}
  # Nothing was deleted: the lines of the first process stay in the file, superseded.
  assert len(open(tmp_path / "metrics.jsonl", encoding="utf-8").read().splitlines()) > len(records)
  # Evaluation repeats exactly; the readers see the resumed run's values.
  old_eval = [r["eval/w_norm"] for r in before if "eval/w_norm" in r]
  assert [r["eval/w_norm"] for r in records if "eval/w_norm" in r] == old_eval
  steps, _ = metric_writers.series(records, "train/loss")
  np.testing.assert_array_equal(steps, [4, 8, 12, 16, 20])
  assert metric_writers.final_metrics(str(tmp_path))["step_of"]["train/loss"] == 20


def _signalling(task, at_step, signum):
  """`task` whose step sends `signum` to this process once the state reaches `at_step`."""
  step = task["train_step"]

  def train_step(state):
    state, metrics = step(state)
    if int(state.step) == at_step:
      os.kill(os.getpid(), signum)
    return state, metrics

  return {**task, "train_step": train_step}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_the_run_resumes_exactly(tmp_path, signum):
  config = _config(num_steps=20, checkpoint_every=5)
  full, _ = loop.run(config=config, workdir=str(tmp_path / "full"), **_task(config))
  with pytest.raises(errors.Interrupted) as stopped:
    loop.run(config=config, workdir=str(tmp_path / "w"), **_signalling(_task(config), 7, signum))
  assert stopped.value.exit_code == 128 + signum
  saved = checkpoints.Checkpointer(str(tmp_path / "w" / "checkpoints")).latest_step()
  assert saved in (6, 7)  # the step reached when the signal arrived, not the last periodic checkpoint (5)
  assert str(stopped.value) == (f"Stopped by {signal.Signals(signum).name} at step {saved}; saved it in "
                                f"{tmp_path / 'w' / 'checkpoints'}; run the same command again to resume.")
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the loop's handlers are gone
  resumed, _ = loop.run(config=config, workdir=str(tmp_path / "w"), **_task(config))
  np.testing.assert_array_equal(full.params["w"], resumed.params["w"])


def test_a_signal_during_a_progress_line_waits_for_the_update_to_end(tmp_path, monkeypatch):
  """A signal that arrives while a line is being written is honoured after the update, not inside the write
  (raised there, it left the line without its end, and the binary's one-line message was glued onto it)."""
  written = []

  class SignallingStream:
    def write(self, text):
      if not written:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the first progress line
      written.append(text)

    def flush(self):
      pass

  progress = loop.Progress
  monkeypatch.setattr(loop, "Progress", lambda num_steps: progress(num_steps, out=SignallingStream()))
  config = _config(num_steps=20, checkpoint_every=20)
  with pytest.raises(errors.Interrupted, match=r"Stopped by SIGTERM at step 5; saved it in"):
    loop.run(config=config, workdir=str(tmp_path), **_task(config))
  assert "".join(written).startswith("step 5/20 |") and "".join(written).endswith("\n")
  records = metric_writers.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if "train/loss" in r] == [5]


def test_a_signal_during_a_save_lets_the_save_finish(tmp_path, monkeypatch):
  save = checkpoints.Checkpointer.save

  def save_and_get_interrupted(self, step, state):
    os.kill(os.getpid(), signal.SIGINT)  # arrives while the save is in progress
    save(self, step, state)

  monkeypatch.setattr(checkpoints.Checkpointer, "save", save_and_get_interrupted)
  config = _config(num_steps=20, checkpoint_every=5)
  with pytest.raises(errors.Interrupted, match=r"Stopped by SIGINT at step 5; it is saved in") as stopped:
    loop.run(config=config, workdir=str(tmp_path), **_task(config))
  assert stopped.value.exit_code == 130
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.steps() == [5] and sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
  state, _ = ckpt.restore_latest(_task(config)["init_state"]())
  assert int(state.step) == 5


def test_rerunning_a_finished_run_reports_its_results(tmp_path):
  config = _config()
  _, first = loop.run(config=config, workdir=str(tmp_path), **_task(config))
  state, again = loop.run(config=config, workdir=str(tmp_path), **_task(config))  # nothing left to train
  assert int(state.step) == 20
  assert again["eval/w_norm"] == first["eval/w_norm"] and again["train/loss"] == first["train/loss"]


def test_changed_config_is_refused_on_resume(tmp_path):
  config = _config(num_steps=5)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  other = _config(num_steps=10, lr=0.5)
  with pytest.raises(errors.ConfigError, match="lr"):
    loop.run(config=other, workdir=str(tmp_path), **_task(other))
  longer = _config(num_steps=10)  # A schedule key may change: the run continues.
  state, _ = loop.run(config=longer, workdir=str(tmp_path), **_task(longer))
  assert int(state.step) == 10


def test_a_key_added_since_reads_as_its_neutral_value_on_resume(tmp_path):
  # A run recorded before `decay` existed resumes with decay off, and is refused with decay on.
  config = _config(num_steps=5)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  later = _config(num_steps=10)
  later.decay = ml_collections.ConfigDict({"begin": 0, "steps": 0, "end": 1.0})
  changed = _config(num_steps=10)
  changed.decay = ml_collections.ConfigDict({"begin": 0, "steps": 5, "end": 0.5})
  with pytest.raises(errors.ConfigError, match="decay.end, decay.steps"):
    loop.run(config=changed, workdir=str(tmp_path), **_task(changed))
  state, _ = loop.run(config=later, workdir=str(tmp_path), **_task(later))
  assert int(state.step) == 10


def test_a_failed_resume_leaves_the_workdir_as_it_was(tmp_path):
  config = _config(num_steps=5)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  recorded = (tmp_path / "config.json").read_text()
  # Checkpoints but no config.json: refused (the method they were trained with is unknown), nothing written.
  (tmp_path / "config.json").unlink()
  other = _config(num_steps=10, lr=0.5)
  with pytest.raises(errors.ConfigError, match="no config.json"):
    loop.run(config=other, workdir=str(tmp_path), **_task(other))
  assert not (tmp_path / "config.json").exists()
  # A restore that fails writes nothing either.
  (tmp_path / "config.json").write_text(recorded)
  for f in glob.glob(str(tmp_path / "checkpoints" / "5" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      os.truncate(f, 3)
  longer = _config(num_steps=10)
  with pytest.raises(errors.CheckpointError):
    loop.run(config=longer, workdir=str(tmp_path), **_task(longer))
  assert (tmp_path / "config.json").read_text() == recorded
  assert not glob.glob(str(tmp_path / "*.tmp"))


def test_a_garbage_config_json_is_one_clear_error(tmp_path):
  config = _config(num_steps=5)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(errors.ConfigError, match=r"config.json cannot be read"):
    loop.run(config=config, workdir=str(tmp_path), **_task(config))
  assert (tmp_path / "config.json").read_text() == "{not json"  # kept as it was, for the user to fix


def test_a_workdir_without_checkpoints_takes_another_config(tmp_path):
  # A run that stopped on a NaN before its first checkpoint leaves nothing to protect.
  config = _config(poison_at=1, checkpoint_every=100)
  with pytest.raises(errors.NonFiniteError, match="no checkpoint has been written"):
    loop.run(config=config, workdir=str(tmp_path), **_task(config))
  other = _config(lr=0.01)
  state, _ = loop.run(config=other, workdir=str(tmp_path), **_task(other))
  assert int(state.step) == 20
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.01


_HOLD_LOCK = """
import sys, time
from wsram_jax.training import loop
lock = loop.WorkdirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_one_process_per_workdir_and_kill_9_frees_it(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})
  try:
    assert holder.stdout.readline().strip() == "locked"
    config = _config(num_steps=5)
    with pytest.raises(errors.ConfigError, match=rf"in use by process {holder.pid} on "):
      loop.run(config=config, workdir=str(tmp_path), **_task(config))
    assert not (tmp_path / "metrics.jsonl").exists()  # the refused process wrote nothing
  finally:
    holder.kill()  # SIGKILL: the OS releases the lock
    holder.wait()
  state, _ = loop.run(config=config, workdir=str(tmp_path), **_task(config))
  assert int(state.step) == 5


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_an_unusable_workdir_is_one_clear_error(tmp_path, where):
  (tmp_path / "f").write_text("")
  workdir = tmp_path / "f" if where == "a_file" else tmp_path / "f" / "run"
  config = _config(num_steps=5)
  with pytest.raises(errors.ConfigError, match="cannot be used as --workdir"):
    loop.run(config=config, workdir=str(workdir), **_task(config))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_workdir_is_one_clear_error(tmp_path):
  os.chmod(tmp_path, 0o500)
  try:
    config = _config(num_steps=5)
    with pytest.raises(errors.ConfigError, match="cannot be used as --workdir"):
      loop.run(config=config, workdir=str(tmp_path / "run"), **_task(config))
  finally:
    os.chmod(tmp_path, 0o700)


def test_a_step_larger_than_the_memory_is_refused_before_training(tmp_path, monkeypatch):
  config = _config(num_steps=5)
  task = _task(config)
  step_bytes = lambda state: memory.step_bytes(task["train_step"], state)
  assert step_bytes(task["init_state"]()) > 0  # XLA's estimate: the new state, at least
  monkeypatch.setattr(memory, "available_bytes", lambda: 100)
  with pytest.raises(errors.ConfigError,
                     match=r"needs about [\d.]+ [KMG]?B \(XLA's estimate\) but only 100 B are available"):
    loop.run(config=config, workdir=str(tmp_path), step_memory=step_bytes, **task)
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
  assert not (tmp_path / "metrics.jsonl").exists()
  monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 40)
  state, _ = loop.run(config=config, workdir=str(tmp_path), step_memory=step_bytes, **task)
  assert int(state.step) == 5


@pytest.mark.parametrize("oom", [MemoryError(), jax.errors.JaxRuntimeError(
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.")])
def test_running_out_of_memory_is_one_line(tmp_path, oom):
  config = _config(num_steps=20, checkpoint_every=5)
  task = _task(config)
  step = task["train_step"]

  def train_step(state):
    if int(state.step) == 7:
      raise oom
    return step(state)

  with pytest.raises(errors.ResourceError, match=r"Ran out of memory at step 8 .*last good checkpoint is step 5"):
    loop.run(config=config, workdir=str(tmp_path), **{**task, "train_step": train_step})


def test_a_loss_far_outside_a_sane_range_is_said_once(tmp_path, caplog):
  config = _config(num_steps=20, log_every=2)
  task = _task(config)
  step = task["train_step"]

  def huge(state):  # what a location std of 1e-8 does to the log-densities
    state, metrics = step(state)
    return state, {"train/loss": metrics["train/loss"] * 1e12 + 1e9}

  loop.run(config=config, workdir=str(tmp_path), **{**task, "train_step": huge})
  warnings = [r for r in caplog.records if "outside a sane range" in r.getMessage()]
  assert len(warnings) == 1 and "train/loss" in warnings[0].getMessage()


def test_nan_stops_the_run_and_is_never_checkpointed(tmp_path):
  config = _config(poison_at=7)  # The 8th update's loss is NaN.
  with pytest.raises(errors.NonFiniteError, match=r"at step 8;.*last good checkpoint is step 5"):
    loop.run(config=config, workdir=str(tmp_path), **_task(config))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.steps() == [5]
  state, _ = ckpt.restore_latest(_task(config)["init_state"]())
  assert checkpoints.all_finite(state)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  config = _config(num_steps=10)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  ckpt_dir = tmp_path / "checkpoints"
  # Corrupt every file of the newest step (10).
  for f in glob.glob(str(ckpt_dir / "10" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  ckpt = checkpoints.Checkpointer(str(ckpt_dir))
  state, step = ckpt.restore_latest(_task(config)["init_state"]())
  assert step == 5 and int(state.step) == 5
  assert "cannot be read" in caplog.text


def _truncate_data_files(step_dir):
  for f in glob.glob(str(step_dir / "**" / "d" / "*"), recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(7)


def _save_nan_checkpoint(ckpt_dir, step, state):
  """Writes a checkpoint of `step` holding a NaN, past the Checkpointer's refusal (as a bad disk could)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  bad = state.replace(params={"w": jnp.array([1.0, jnp.nan, 0.0])}, step=jnp.asarray(step, jnp.int32))
  manager = ocp.CheckpointManager(str(ckpt_dir))
  manager.save(step, args=ocp.args.StandardSave(bad), force=True)
  manager.wait_until_finished()
  manager.close()


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_bad_latest_checkpoint_is_moved_aside_and_the_run_finishes(tmp_path, caplog, damage):
  config = _config(num_steps=10)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  ckpt_dir = tmp_path / "checkpoints"
  if damage == "truncated":
    _truncate_data_files(ckpt_dir / "10")
  else:
    shutil.rmtree(ckpt_dir / "10")
    _save_nan_checkpoint(ckpt_dir, 10, _task(config)["init_state"]())
  longer = _config(num_steps=15)
  state, _ = loop.run(config=longer, workdir=str(tmp_path), **_task(longer))  # falls back to 5, re-saves 10
  assert int(state.step) == 15
  assert checkpoints.Checkpointer(str(ckpt_dir)).steps() == [10, 15]
  assert (ckpt_dir / "10.unreadable").is_dir()  # kept for inspection, out of the way
  assert "moved it aside to" in caplog.text and "10.unreadable; using step 5" in caplog.text
  # The run is healthy again: a rerun (and another fallback) works too.
  state, _ = loop.run(config=_config(num_steps=20), workdir=str(tmp_path), **_task(longer))
  assert int(state.step) == 20
  # ... and it is the same run as one that never met a bad checkpoint.
  clean, _ = loop.run(config=_config(num_steps=20), workdir=str(tmp_path / "clean"), **_task(longer))
  np.testing.assert_array_equal(clean.params["w"], state.params["w"])


def test_all_checkpoints_unreadable_is_one_line_without_library_noise(tmp_path, capfd, caplog):
  config = _config(num_steps=10)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  for step in (5, 10):
    _truncate_data_files(tmp_path / "checkpoints" / str(step))
  capfd.readouterr()
  with pytest.raises(errors.CheckpointError, match="can be read"):
    loop.run(config=config, workdir=str(tmp_path), **_task(config))
  gc.collect()  # orbax's failed reads leave asyncio tasks whose exceptions are logged when collected
  time.sleep(0.5)
  gc.collect()
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Traceback" not in err
  assert "never retrieved" not in caplog.text
  # Nothing is moved when no checkpoint can be read (a wrong structure is not a damaged checkpoint).
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]


def test_all_checkpoints_corrupt_is_one_clear_error(tmp_path):
  config = _config(num_steps=5)
  loop.run(config=config, workdir=str(tmp_path), **_task(config))
  for f in glob.glob(str(tmp_path / "checkpoints" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(errors.CheckpointError, match="can be read"):
    loop.run(config=config, workdir=str(tmp_path), **_task(config))


def test_refuses_to_save_nonfinite_state(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  with pytest.raises(errors.NonFiniteError):
    ckpt.save(1, {"w": jnp.array([1.0, jnp.nan])})
  assert ckpt.steps() == []
