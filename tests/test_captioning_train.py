"""The caption trainer: a whole run on a tiny config, resume, Flickr8k end to end, bad configs."""
import json
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


# ---------------------------------------------------------------------------------------------------------------
# What the core gives every task: several runs as one program, the data-parallel mesh.


def test_each_captioner_run_equals_its_single_run_twin(tiny_caption_config, tmp_path):
  from wsram_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
  config = tiny_caption_config("wsram_q_cv", **{"num_runs": 2, "runs.seed": (4, 5), "runs.learning_rate": (1e-3, 3e-3),
                                                "runs.loc_std": (0.1, 0.2), "runs.entropy_weight": (0.0, 0.01)})
  train.validate_config(config)
  runs = runs_lib.from_config(config)
  task = train.load_task(config)

  def train_steps(cfg, steps=3):
    model = train.build_model(cfg, len(task.vocab))
    optimizer = step_lib.make_optimizer(cfg)
    state = train.create_train_state(cfg, model, optimizer)
    step = train.make_train_step(cfg, model, optimizer, task)
    for _ in range(steps):
      state, metrics = step(state, task.train)
    return state, metrics

  state, metrics = train_steps(config)
  assert metrics["train/loss"].shape == (2,)
  for r in range(2):
    twin = runs.config_for(config, r)
    assert twin.num_runs == 1 and twin.seed == 4 + r and twin.model.loc_std == (0.1, 0.2)[r]
    alone, alone_metrics = train_steps(twin)
    np.testing.assert_allclose(metrics["train/loss"][r], alone_metrics["train/loss"], rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v) + 1e-8: a gradient component near zero moves by up to a step on float noise alone.
    for a, b in zip(jax.tree_util.tree_leaves(runs_lib.unstack(state, r).params),
                    jax.tree_util.tree_leaves(alone.params)):
      diff = np.abs(np.asarray(a) - np.asarray(b))
      assert diff.max() <= runs.values["learning_rate"][r], diff.max()
      assert np.mean(diff > 1e-5 + 1e-4 * np.abs(np.asarray(b))) < 0.01
  # Through the loop: each run its own metrics, evaluation (BLEU, NLL under its own loc_std) and summary line.
  result = train.train_and_evaluate(config, str(tmp_path))
  assert len(result["runs"]) == 2 and all("eval/bleu1" in run and "eval/nll" in run for run in result["runs"])
  assert result["runs"][0]["eval/nll"] != result["runs"][1]["eval/nll"]
  for r in range(2):
    steps, _ = metric_writers.series(metric_writers.read_metrics(str(tmp_path / f"run_{r}")), "train/nll")
    np.testing.assert_array_equal(steps, [2, 4])
  lines = train.summary(result).splitlines()
  assert len(lines) == 2 and lines[1].startswith("run 1 (seed 5, ") and "test BLEU-1..4" in lines[1]
  stacked = train.restore(config, str(tmp_path))
  assert np.asarray(stacked.state.step).tolist() == [4, 4]
  # One run of the sweep alone (trainer.restore_run), and the caption report's one entry per run.
  one = train.restore(config, str(tmp_path), run=1)
  assert int(one.state.step) == 4
  for a, b in zip(jax.tree_util.tree_leaves(one.state.params),
                  jax.tree_util.tree_leaves(runs_lib.unstack(stacked.state, 1).params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(errors.ConfigError, match="holds 2 run"):
    train.restore(config, str(tmp_path), run=2)
  from experiments import caption_report  # pylint: disable=g-import-not-at-top
  caption_report.write_report([("WS", "wsram_q_cv", str(tmp_path))], str(tmp_path / "report"), figures=False)
  got = json.loads((tmp_path / "report" / "results.json").read_text())
  assert list(got) == ["WS run 0", "WS run 1"] and got["WS run 1"]["workdir"].endswith("run_1")
  assert got["WS run 1"]["last/eval/bleu1"] == pytest.approx(float(result["runs"][1]["eval/bleu1"]), rel=1e-6)


_MESH_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from experiments.configs import captions
from wsram_jax.captioning import train
from wsram_jax.training import config as config_lib
from wsram_jax.training import step as step_lib
from wsram_jax.training import trainer

overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[-1]).items()}
assert jax.device_count() == 2, jax.devices()
out = {}
for n in (1, 2):
  config = config_lib.apply_overrides(captions.get_config("wsram_q_cv"), overrides)
  config.mesh_devices = n
  train.validate_config(config)
  task = train.load_task(config)
  model, optimizer = train.build_model(config, len(task.vocab)), step_lib.make_optimizer(config)
  state = train.create_train_state(config, model, optimizer)
  data = step_lib.replicate(step_lib.make_mesh(n), (task.train,))
  step = train.make_train_step(config, model, optimizer, task)
  loss_and_grads = trainer.make_loss_and_grads(train.TASK, config, model, task)
  both = lambda s, *d: (loss_and_grads(s.params, s.extra, jax.random.fold_in(s.key, s.step), *d), step(s, *d))
  compiled = jax.jit(both).lower(state, *data).compile()
  ((loss, _), grads), (new_state, metrics) = compiled(state, *data)
  out[n] = dict(loss=float(loss), step_loss=float(metrics["train/loss"]),
                grads=[np.asarray(g).tolist() for g in jax.tree_util.tree_leaves(grads)],
                params=[np.asarray(p).tolist() for p in jax.tree_util.tree_leaves(new_state.params)],
                sharding=str(jax.tree_util.tree_leaves(new_state.params)[0].sharding),
                all_reduce=compiled.as_text().count("all-reduce("))
print(json.dumps(out))
"""


def test_the_captioner_trains_on_a_two_device_mesh(tiny_mnist_dir):
  """``mesh_devices=2``: the batch split over two (emulated) devices, the gradients summed across them; the same
  loss, gradients and update as on one device."""
  import json  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, json.dumps(tiny_caption_overrides(tiny_mnist_dir))],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one, two = out["1"], out["2"]
  assert "'data': 2" in two["sharding"] and "SingleDevice" in one["sharding"]
  assert two["all_reduce"] >= 1 and one["all_reduce"] == 0
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(two["step_loss"], one["loss"], rtol=1e-6, atol=1e-6)
  for g2, g1 in zip(two["grads"], one["grads"]):
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-5, atol=1e-6)
  for p2, p1 in zip(two["params"], one["params"]):
    np.testing.assert_allclose(np.asarray(p2), np.asarray(p1), rtol=1e-5, atol=1e-6)
