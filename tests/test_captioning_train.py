"""The caption trainer: a whole run on a tiny config, resume, Flickr8k end to end, bad configs."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import message_lines, run_all, stop_running_binary, tiny_caption_overrides, write_flickr_fixture
from wsram_jax import errors
from wsram_jax.training import memory
from wsram_jax.training import step as step_lib
from wsram_jax.training import metric_writers
from wsram_jax.captioning import encoders
from wsram_jax.captioning import plots
from wsram_jax.captioning import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_resume_and_plots(tiny_caption_config, tmp_path):
  config = tiny_caption_config("wsram_q_cv")
  last = train.train_and_evaluate(config, str(tmp_path))
  for key in ("train/loss", "train/nll", "train/bound", "train/ess", "train/loss_q", "train/scale_usage_1",
              "eval/bleu1", "eval/bleu4", "eval/nll", "eval/log_p_y", "eval/exact_match"):
    assert key in last, key
  assert 1.0 <= last["train/ess"] <= config.num_samples + 1e-5
  assert 0.0 <= last["eval/bleu4"] <= last["eval/bleu1"] <= 1.0
  assert last["eval/log_p_y"] <= 0.0 and last["eval/nll"] > 0
  assert "test BLEU-1..4" in train.summary(last)
  steps, _ = metric_writers.series(metric_writers.read_metrics(str(tmp_path)), "train/nll")
  np.testing.assert_array_equal(steps, [2, 4])

  # Resume: a longer schedule continues from the step-4 checkpoint (no step is repeated).
  config.num_steps = 6
  train.train_and_evaluate(config, str(tmp_path))
  steps, _ = metric_writers.series(metric_writers.read_metrics(str(tmp_path)), "train/nll")
  np.testing.assert_array_equal(steps, [2, 4, 6])
  records = metric_writers.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if "train/nll" in r] == [2, 4, 6]

  # Restore and plot the greedy captions with their glimpses; and the curves.
  restored = train.restore(config, str(tmp_path))
  assert restored.step == 6
  out = plots.caption_examples(restored, tmp_path / "examples.png", num=2)
  assert out.exists() and out.stat().st_size > 0
  curves = plots.training_curves({"wsram_q_cv": str(tmp_path)}, tmp_path / "curves.png")
  assert curves.exists()

  # A changed model on resume is one clear error.
  config.model.hidden_size = 16
  with pytest.raises(errors.ConfigError, match="different configuration"):
    train.train_and_evaluate(config, str(tmp_path))


def test_a_step_too_large_for_the_memory_is_refused_in_one_line(tiny_caption_config, tmp_path, monkeypatch):
  monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
  with pytest.raises(errors.ConfigError, match=r"needs about .* only 1000 B are available"):
    train.train_and_evaluate(tiny_caption_config("wsram_q_cv"), str(tmp_path))


def test_flickr8k_task_and_pretrained_encoder(tiny_caption_config, tmp_path, caplog):
  json_path, image_dir = write_flickr_fixture(tmp_path / "flickr")
  config = tiny_caption_config(
      "var_cv", **{"data.task": "flickr8k", "data.flickr8k_json": str(json_path),
                   "data.flickr8k_images": str(image_dir), "data.image_size": 16, "data.max_words": 4,
                   "data.min_word_count": 1, "model.freeze_encoder": True})
  train.validate_config(config)
  task = train.load_task(config)
  assert task.caption_length == 5 and task.test_images.shape == (1, 16, 16, 3)
  assert "--config.data.num_test=6 asks for more than the 1 Flickr8k test images" in caplog.text
  assert task.test_references == [[["a", "dog", "sits"], ["the", "dog"], ["a", "red", "ball"]]]
  images, captions = jax.jit(task.sample, static_argnums=2)(jax.random.PRNGKey(0), task.train, 8)
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.float32 and captions.shape == (8, 6)
  assert np.all(captions[:, 0] == 1) and np.all(np.any(captions == 2, axis=1))
  # The sampler only draws existing references: image 1 ("b.jpg") has one, so never the all-<pad> row.
  assert np.all(captions[:, 1] != 0)
  # Pretrained encoder weights replace the initial ones.
  model = train.build_model(config, len(task.vocab))
  optimizer = step_lib.make_optimizer(config)
  fresh = train.create_train_state(config, model, optimizer).params
  other = jax.tree_util.tree_map(lambda x: x + 1.0, fresh["encoder"])
  config.model.encoder_weights = str(encoders.save_encoder_params(tmp_path / "enc.npz", other))
  loaded = train.create_train_state(config, model, optimizer).params
  jax.tree_util.tree_map(np.testing.assert_allclose, loaded["encoder"], other)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["lstm"], fresh["lstm"])
  config.model.encoder_weights = str(tmp_path / "missing.npz")
  with pytest.raises(errors.DataError, match="does not exist"):
    train.create_train_state(config, model, optimizer)


@pytest.mark.parametrize("overrides, match", [
    ({"num_samples": 0}, "num_samples"),
    ({"method": "reinforce"}, "Unknown --config.method"),
    ({"method": "var"}, "samples from the prior"),
    ({"baseline": "moving"}, "VAR's control variate"),
    ({"model.num_scales": 4}, "cannot exceed the number of encoder blocks"),
    ({"model.q_word": "caption"}, "q_word"),
    ({"model.encoder_channels": (4, 4, 4, 4, 4, 4)}, "halve"),
    ({"data.task": "coco"}, "Unknown --config.data.task"),
    ({"data.task": "flickr8k"}, "flickr8k_json"),
    ({"data.small_max": 20}, "must not overlap"),
    ({"bleu_smoothing": "laplace"}, "bleu_smoothing"),
    ({"model.loc_std": 1e-8}, r"loc_std must be at least 0.0001"),
    ({"heuristics.temperature": 0.0}, "temperature must be positive"),
    ({"method": "vimco", "proposal": "prior", "heuristics.temperature": 1.5}, "untempered prior"),
])
def test_invalid_config_is_one_clear_error(tiny_caption_config, overrides, match):
  config = tiny_caption_config("wsram_q_cv", **overrides)
  with pytest.raises(errors.ConfigError, match=match):
    train.validate_config(config)


def test_binary_sigint_saves_the_step_reached(tiny_mnist_dir, tiny_caption_config, tmp_path):
  overrides = {**tiny_caption_overrides(tiny_mnist_dir), "num_steps": 100000, "checkpoint_every": 50000,
               "eval_every": 100000, "log_every": 2}
  cmd = [sys.executable, "-m", "experiments.train_captions", "--config=experiments/configs/captions.py:wsram_q_cv",
         f"--workdir={tmp_path}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  rc, stderr = stop_running_binary([c.replace(" ", "") for c in cmd], tmp_path, signal.SIGINT)
  assert rc == 130, stderr[-2000:]
  lines = message_lines(stderr)
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
  assert lines[0].startswith("stopped: Stopped by SIGINT at step ") and "saved it in" in lines[0]
  step = int(lines[0].split(" at step ")[1].split(";")[0])
  restored = train.restore(tiny_caption_config("wsram_q_cv", num_steps=100000, checkpoint_every=50000,
                                               eval_every=100000, log_every=2), str(tmp_path))
  assert restored.step == step and int(restored.state.step) == step


def test_binary_bad_config_files_are_one_line_and_exit_2(tmp_path):
  (tmp_path / "notes.txt").write_text("hello\n")
  cmd = lambda config: [sys.executable, "-m", "experiments.train_captions", f"--config={config}",
                        f"--workdir={tmp_path / 'w'}"]
  for rc, stderr in run_all([cmd(tmp_path / "missing.py"), cmd(tmp_path / "notes.txt")]):
    lines = message_lines(stderr)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("error: ") and str(tmp_path) in lines[0]


def test_binary_rejects_bad_config_with_exit_code_2(tmp_path):
  cmd = [sys.executable, "-m", "experiments.train_captions", "--config=experiments/configs/captions.py:var",
         f"--workdir={tmp_path / 'w'}", "--config.model.q_word=caption"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "q_word" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()
