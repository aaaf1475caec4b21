"""The MNIST trainer: a whole run on a tiny config, exact resume after SIGKILL, and bad input."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import kill_after_first_checkpoint, message_lines, run_all, stop_running_binary, train_cmd
from wsram_jax.training import checkpoints
from wsram_jax.training import loop
from wsram_jax.training import memory
from wsram_jax.training import step as step_lib
from wsram_jax import errors
from wsram_jax.training import metric_writers
from wsram_jax.classifier import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_and_evaluate_smoke(tiny_config, tmp_path):
  config = tiny_config("wsram_q_cv")
  last = train.train_and_evaluate(config, str(tmp_path))
  for key in ("train/loss", "train/ess", "train/bound", "train/error", "train/scale_usage_0",
              "eval/error_greedy", "eval/error_sampled", "eval/log_p_y", "diag/grad_var/theta",
              "diag/grad_var/eta", "diag/grad_var_normalized/theta", "diag/ess/mean"):
    assert key in last, key
  assert 1.0 <= last["train/ess"] <= config.num_samples + 1e-5
  assert 0.0 <= last["eval/error_greedy"] <= 1.0
  assert last["eval/log_p_y"] <= 0.0
  steps, _ = metric_writers.series(metric_writers.read_metrics(str(tmp_path)), "train/loss")
  np.testing.assert_array_equal(steps, [2, 4, 6])
  assert "test error" in train.summary(last)


def test_a_step_too_large_for_the_memory_is_refused_in_one_line(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
  with pytest.raises(errors.ConfigError, match=r"needs about [\d.]+ MB .* only 1\.0 MB are available"):
    train.train_and_evaluate(tiny_config("wsram_q_cv", num_samples=64), str(tmp_path))


def test_evaluation_is_deterministic(tiny_config):
  config = tiny_config("var_cv")
  data = train.load_data(config)
  model = train.build_model(config)
  state = train.create_train_state(config, model, step_lib.make_optimizer(config))
  evaluate = train.make_evaluator(config, model, data.test_canvases, data.test_labels, data.test_boxes)
  first = evaluate(state)
  assert first == evaluate(state)
  n = config.num_glimpses
  for name in ["on_digit/later", "outside_canvas"] + [f"{k}/g{i}" for i in range(1, n + 1) for k in (
      "on_digit", "overlap", "box_coverage", "ablation_error")]:
    assert 0.0 <= first[f"eval/{name}"] <= 1.0, name
  usage = [first[f"eval/scale_usage/s{s}"] for s in range(config.model.num_scales)]
  np.testing.assert_allclose(sum(usage), 1.0, rtol=1e-5)


def test_the_nvil_baseline_tracks_the_residual_of_the_learned_one(tiny_config):
  """With ``baseline='nvil'`` the step's moving average follows the batch's mean log p(y|a) - b(I), not its mean
  log p(y|a): after two updates its (debiased) value is the decay-weighted mean of the two batches' residuals."""
  config = tiny_config("var_cv", baseline="nvil")
  data = train.load_data(config)
  model = train.build_model(config)
  optimizer = step_lib.make_optimizer(config)
  state = train.create_train_state(config, model, optimizer)
  step = train.make_train_step(config, model, optimizer)
  targets, rewards = [], []
  for _ in range(2):
    state, metrics = step(state, data.images, data.labels)
    targets.append(float(metrics["train/baseline_target"]))
    rewards.append(float(metrics["train/reward"]))
  value, _ = train.baseline_transform(config).update(np.zeros(()), state.extra)
  d = config.baseline_decay
  np.testing.assert_allclose(value, (d * targets[0] + targets[1]) / (1 + d), rtol=1e-5)
  # The head starts at b(I) = 0 and has moved after one update: the residual is not the reward any more.
  assert abs(targets[1] - rewards[1]) > 1e-4


@pytest.mark.parametrize("overrides, match", [
    ({"num_samples": 0}, "num_samples"),
    ({"model.glimpse_size": 25}, "largest glimpse window"),
    ({"method": "reinforce"}, "Unknown --config.method"),
    ({"proposal": "oracle"}, "Unknown --config.proposal"),
    ({"learning_rate": -1e-3}, "learning_rate must be positive"),
    ({"learning_rate": float("inf")}, "learning_rate must be positive and finite"),
    ({"grad_clip_norm": float("nan")}, "grad_clip_norm must be"),
    ({"warmup.start": 0.0}, r"warmup.start is the first updates' learning-rate multiplier, in \(0, 1\]"),
    ({"warmup.start": 0.5, "warmup.ramp_steps": -1}, "warmup.ramp_steps must be an integer >= 0"),
    ({"decay.end": 1.5}, r"decay.end is the last updates' learning-rate multiplier, in \[0, 1\]"),
    ({"decay.begin": -1}, "decay.begin must be an integer >= 0"),
    ({"model.loc_std": 1e-8}, r"loc_std must be at least 0.0001"),
    ({"model.learn_loc_std": True, "model.min_loc_std": 1e-8}, r"min_loc_std must be at least 0.0001"),
    ({"method": "var", "proposal": "inference_network"}, "samples from the prior"),
    ({"baseline": "moving"}, "VAR's control variate"),
    ({"heuristics.temperature": 0.0}, "temperature must be positive"),
    ({"data.source": "s3"}, "Unknown --config.data.source"),
    ({"method": "vimco", "proposal": "prior", "heuristics.temperature": 2.0}, "untempered prior"),
])
def test_invalid_config_is_one_clear_error(tiny_config, overrides, match):
  config = tiny_config("wsram_q_cv", **{k.replace(".", "__"): v for k, v in overrides.items()})
  with pytest.raises(errors.ConfigError, match=match):
    train.validate_config(config)


def test_load_data_checks_the_labels_and_says_when_it_caps_num_test(tiny_config, caplog):
  with pytest.raises(errors.DataError, match=r"outside 0\.\.4"):
    train.load_data(tiny_config("var", model__num_classes=5))
  data = train.load_data(tiny_config("var", data__num_test=1000))
  assert data.test_canvases.shape[0] == data.test_boxes.shape[0] == 32
  assert "--config.data.num_test=1000" in caplog.text and "32" in caplog.text


def test_binary_rejects_bad_config_with_exit_code_2(tiny_mnist_dir, tmp_path):
  for extra, match in (("--config.num_samples=0", "num_samples"),
                       ("--config.no_such_key=1", "no_such_key")):
    proc = subprocess.run(train_cmd(tmp_path / "w", tiny_mnist_dir, extra), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert match in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()  # Nothing was started.


def test_binary_bad_command_lines_are_one_line_and_exit_2(tmp_path):
  (tmp_path / "notes.txt").write_text("hello\n")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  base = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'w'}"]
  config = "--config=experiments/configs/mnist.py:wsram_q_cv"
  cases = [
      ([f"--config={tmp_path / 'missing.py'}"], [str(tmp_path / "missing.py"), "No such file"]),
      ([f"--config={tmp_path / 'notes.txt'}"], [str(tmp_path / "notes.txt"), "line 1", "NameError"]),
      ([f"--config={tmp_path / 'broken.py'}:x"], [str(tmp_path / "broken.py"), "line 1", "SyntaxError"]),
      ([config, "extra"], ["Unexpected arguments: extra"]),
      ([config, "--config.nosuchkey=1"], ["--config.nosuchkey", "no key", "closest"]),
      (["--config.leaning_rate=1"], ["--config.leaning_rate", "learning_rate"]),
      ([config, "--config.model.hiden_size=3"], ["--config.model.hiden_size", "model.hidden_size"]),
  ]
  for (extra, expected), (rc, stderr) in zip(cases, run_all([base + extra for extra, _ in cases])):
    lines = message_lines(stderr)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, (extra, stderr[-3000:])
    assert lines[0].startswith("error: ") and all(e in lines[0] for e in expected), (extra, lines[0])
  assert not (tmp_path / "w").exists()


def test_binary_reports_missing_data_in_one_sentence(tmp_path):
  proc = subprocess.run(train_cmd(tmp_path / "w", tmp_path / "nowhere"), cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_binary_refuses_a_busy_or_unusable_workdir_in_one_line(tiny_mnist_dir, tmp_path):
  busy = tmp_path / "busy"
  os.makedirs(busy)
  with loop.WorkdirLock(str(busy)):  # as if another training process held it
    proc = subprocess.run(train_cmd(busy, tiny_mnist_dir), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = message_lines(proc.stderr)
  assert len(lines) == 1 and f"in use by process {os.getpid()} on " in lines[0], proc.stderr[-2000:]
  (tmp_path / "file").write_text("")
  proc = subprocess.run(train_cmd(tmp_path / "file", tiny_mnist_dir), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  lines = message_lines(proc.stderr)
  assert len(lines) == 1 and "it is a file" in lines[0], proc.stderr[-2000:]


def test_sigterm_saves_the_step_reached_and_it_resumes(tiny_mnist_dir, tmp_path):
  long_run = ["--config.num_steps=100000", "--config.checkpoint_every=50000", "--config.eval_every=100000",
              "--config.log_every=5", "--config.diag_every=0"]
  workdir = tmp_path / "w"
  rc, stderr = stop_running_binary(train_cmd(workdir, tiny_mnist_dir, *long_run), workdir, signal.SIGTERM)
  assert rc == 143, stderr[-2000:]
  assert "Traceback" not in stderr
  lines = message_lines(stderr)
  assert len(lines) == 1, stderr[-2000:]
  saved = checkpoints.Checkpointer(str(workdir / "checkpoints")).steps()
  assert len(saved) == 1 and saved[0] >= 5  # the step reached: no periodic checkpoint was due
  assert lines[0] == (f"stopped: Stopped by SIGTERM at step {saved[0]}; saved it in {workdir / 'checkpoints'}; "
                      "run the same command again to resume.")
  resumed = subprocess.run(train_cmd(workdir, tiny_mnist_dir, *long_run[1:], f"--config.num_steps={saved[0] + 2}"),
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert checkpoints.Checkpointer(str(workdir / "checkpoints")).latest_step() == saved[0] + 2


def _final_params(config, workdir):
  model = train.build_model(config)
  target = train.create_train_state(config, model, step_lib.make_optimizer(config))
  state, step = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(target)
  return state, step


def test_sigkill_and_resume_gives_bit_identical_parameters(tiny_config, tiny_mnist_dir, tmp_path):
  extra = ["--config.num_steps=400", "--config.checkpoint_every=20", "--config.eval_every=400",
           "--config.log_every=20", "--config.diag_every=0"]
  # Uninterrupted reference run.
  ref = subprocess.run(train_cmd(tmp_path / "ref", tiny_mnist_dir, *extra), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-2000:]
  # The same run, killed with SIGKILL once it has written a checkpoint, then started again.
  killed_dir = tmp_path / "killed"
  kill_after_first_checkpoint(train_cmd(killed_dir, tiny_mnist_dir, *extra), killed_dir)
  steps_at_kill = checkpoints.Checkpointer(str(killed_dir / "checkpoints")).steps()
  assert steps_at_kill and steps_at_kill[-1] < 400
  resumed = subprocess.run(train_cmd(killed_dir, tiny_mnist_dir, *extra), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]

  config = tiny_config("wsram_q_cv", num_steps=400)
  a, step_a = _final_params(config, str(tmp_path / "ref"))
  b, step_b = _final_params(config, str(killed_dir))
  assert step_a == step_b == 400
  for x, y in zip(*(__import__("jax").tree_util.tree_leaves(s) for s in (a, b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_compiler_options_leave_what_xla_flags_names_to_xla_flags(monkeypatch):
  monkeypatch.delenv(step_lib.FUSION_EMITTERS_ENV, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert step_lib.compiler_options() == {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  assert step_lib.compiler_options() == {"xla_cpu_use_fusion_emitters": False}
  monkeypatch.setenv(step_lib.FUSION_EMITTERS_ENV, "1")
  assert step_lib.compiler_options() == {}
