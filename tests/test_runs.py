"""Several runs as one program (`training.runs`): run r computes what it computes alone; a diverging run is frozen
and leaves the others alone; the runs block is checked."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import kill_after_first_checkpoint, synthetic_digits, train_cmd
from wsram_jax import errors
from wsram_jax.classifier import train
from wsram_jax.training import metric_writers
from wsram_jax.training import runs as runs_lib
from wsram_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _train(config, images, labels, steps=STEPS):
  model = train.build_model(config)
  optimizer = step_lib.make_optimizer(config)
  state = train.create_train_state(config, model, optimizer)
  step = train.make_train_step(config, model, optimizer)
  for _ in range(steps):
    state, metrics = step(state, images, labels)
  return state, metrics


@pytest.fixture(scope="module")
def data():
  images, labels = synthetic_digits(64)
  return jnp.asarray(images), jnp.asarray(labels)


def _assert_params_close(got, want, learning_rate):
  """Adam's step divides by sqrt(v) + 1e-8: a gradient component near 1e-8 moves by a fraction of the learning
  rate on float noise alone (the batched matmuls of several runs add up in another order). So: every parameter
  within one step size of its twin's, and nearly all within float tolerance."""
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert diff.max() <= learning_rate, diff.max()
    assert np.mean(diff > 1e-5 + 1e-4 * np.abs(np.asarray(b))) < 0.01


def test_each_run_equals_its_single_run_twin(tiny_config, data):
  config = tiny_config("wsram_q_cv", num_runs=3, runs__seed=(4, 5, 6), runs__learning_rate=(1e-3, 3e-3, 1e-2),
                       runs__loc_std=(0.1, 0.15, 0.3), runs__entropy_weight=(0.0, 0.01, 0.1),
                       runs__temperature=(1.0, 1.5, 1.0))
  train.validate_config(config)
  runs = runs_lib.from_config(config)
  model = train.build_model(config)
  fresh = train.create_train_state(config, model, step_lib.make_optimizer(config))
  # The first step's loss and gradients, run r inside the vmapped program against its twin alone: float
  # tolerance.
  loss_and_grads = train.make_loss_and_grads(config, model)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(fresh.key)
  (losses, _), grads = jax.jit(jax.vmap(lambda p, e, k, h: loss_and_grads(p, e, k, *data, hyper=h)))(
      fresh.params, fresh.extra, keys, runs.hyper())
  state, metrics = _train(config, *data)
  assert metrics["train/loss"].shape == (3,)
  for r in range(3):
    twin = runs.config_for(config, r)
    assert twin.num_runs == 1 and twin.seed == 4 + r and twin.model.loc_std == (0.1, 0.15, 0.3)[r]
    twin_model = train.build_model(twin)
    twin_fresh = train.create_train_state(twin, twin_model, step_lib.make_optimizer(twin))
    (loss, _), twin_grads = jax.jit(train.make_loss_and_grads(twin, twin_model))(
        twin_fresh.params, twin_fresh.extra, jax.random.fold_in(twin_fresh.key, 0), *data)
    np.testing.assert_allclose(losses[r], loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(runs_lib.unstack(grads, r)), jax.tree_util.tree_leaves(twin_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (float(np.max(np.abs(b))) + 1e-9))
    alone, alone_metrics = _train(twin, *data)
    _assert_params_close(runs_lib.unstack(state, r).params, alone.params, runs.values["learning_rate"][r])
    np.testing.assert_allclose(metrics["train/loss"][r], alone_metrics["train/loss"], rtol=1e-4, atol=1e-5)


def test_a_diverging_run_is_frozen_and_the_others_train_on(tiny_config, data):
  config = tiny_config("wsram_q_cv", num_runs=3, runs__learning_rate=(1e-3, 1e30, 1e-3), grad_clip_norm=0.0)
  runs = runs_lib.from_config(config)
  state, _ = _train(config, *data, steps=4)
  bad = np.asarray(state.nonfinite_step)
  assert bad[1] >= 0 and bad[0] == -1 and bad[2] == -1, bad
  for leaf in jax.tree_util.tree_leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  alone, _ = _train(runs.config_for(config, 2), *data, steps=4)
  for a, b in zip(jax.tree_util.tree_leaves(runs_lib.unstack(state, 2).params),
                  jax.tree_util.tree_leaves(alone.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam magnifies float noise


@pytest.mark.parametrize("overrides, match", [
    ({"num_runs": 0}, "num_runs must be an integer >= 1"),
    ({"num_runs": 2, "runs__learning_rate": (1e-3,)}, "1 values for --config.num_runs=2"),
    ({"num_runs": 2, "runs__temperature": (1.0, 0.0)}, "temperature must be positive"),
    ({"num_runs": 2, "mesh_devices": 2, "batch_size": 8}, "do not combine"),
    ({"num_runs": 2, "runs__seed": (1.5, 2.5)}, "takes integers"),
])
def test_bad_runs_block_is_one_clear_error(tiny_config, overrides, match):
  with pytest.raises(errors.ConfigError, match=match):
    train.validate_config(tiny_config("wsram_q_cv", **overrides))


# ---------------------------------------------------------------------------------------------------------------
# Through the loop and the binary.


def test_four_runs_through_the_loop_one_diverging(tiny_config, tmp_path):
  """One of four runs made to diverge: the other three train to the end, are evaluated and diagnosed, and the
  checkpoint holds only finite numbers; every run has its own metrics."""
  config = tiny_config("wsram_q_cv", num_runs=4, runs__learning_rate=(1e-3, 1e30, 1e-3, 3e-3), grad_clip_norm=0.0)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert len(result["runs"]) == 4 and result["labels"][1].startswith("run 1 (seed 1, learning_rate 1e+30")
  for r in (0, 2, 3):
    final = result["runs"][r]
    assert "eval/error_sampled" in final and "diag/grad_var/theta" in final and "train/nonfinite_step" not in final
    steps, _ = metric_writers.series(metric_writers.read_metrics(str(tmp_path / f"run_{r}")), "train/loss")
    np.testing.assert_array_equal(steps, [2, 4, 6])
  assert result["runs"][1]["train/nonfinite_step"] >= 1
  state = train.restore_state(config, str(tmp_path))
  assert np.asarray(state.step).tolist() == [6, 6, 6, 6]
  for leaf in jax.tree_util.tree_leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  text = train.summary(result)
  assert len(text.splitlines()) == 4 and "test error" in text


def test_every_run_diverging_stops_with_one_clear_error(tiny_config, tmp_path):
  config = tiny_config("wsram_q_cv", num_runs=2, runs__learning_rate=(1e30, 1e30), grad_clip_norm=0.0)
  with pytest.raises(errors.NonFiniteError, match="every run"):
    train.train_and_evaluate(config, str(tmp_path))


def test_sigkill_and_resume_of_several_runs_is_bit_identical(tiny_config, tiny_mnist_dir, tmp_path):
  extra = ["--config.num_steps=300", "--config.checkpoint_every=20", "--config.eval_every=300",
           "--config.log_every=20", "--config.diag_every=0", "--config.num_runs=2",
           "--config.runs.learning_rate=1e-3,3e-3"]
  ref = subprocess.run(train_cmd(tmp_path / "ref", tiny_mnist_dir, *extra), cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-2000:]
  assert len(ref.stdout.strip().splitlines()) == 2 and "2 runs" in ref.stderr  # one summary line per run
  killed_dir = tmp_path / "killed"
  kill_after_first_checkpoint(train_cmd(killed_dir, tiny_mnist_dir, *extra), killed_dir)
  resumed = subprocess.run(train_cmd(killed_dir, tiny_mnist_dir, *extra), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  config = tiny_config("wsram_q_cv", num_steps=300, num_runs=2, runs__learning_rate=(1e-3, 3e-3))
  a = train.restore_state(config, str(tmp_path / "ref"))
  b = train.restore_state(config, str(killed_dir))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for r in range(2):
    steps, _ = metric_writers.series(metric_writers.read_metrics(str(killed_dir / f"run_{r}")), "train/loss")
    assert steps[-1] == 300


def test_learning_rate_selection_command(tiny_mnist_dir, tmp_path):
  """experiments.select_lr trains each variant's grid as one program and picks the highest learning rate whose
  seeds all converged; a diverging learning rate is never picked."""
  from conftest import tiny_overrides  # pylint: disable=g-import-not-at-top
  overrides = {k: v for k, v in tiny_overrides(tiny_mnist_dir).items() if k != "num_steps"}
  overrides.update({"grad_clip_norm": 0.0, "eval_every": 4})
  cmd = [sys.executable, "-m", "experiments.select_lr", f"--root={tmp_path / 'lr'}", "--variants=wsram_q_cv",
         "--learning_rates=1e30,1e-3", "--seeds=0,1", "--steps=4", "--max_error=1.0", "--min_on_digit=0",
         f"--results={tmp_path / 'results' / 'learning_rates'}",
         *[f"--override=--config.{k}={v}" for k, v in overrides.items()]]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  chosen = json.loads((tmp_path / "results" / "learning_rates.json").read_text())
  assert chosen["learning_rates"] == {"wsram_q_cv": 1e-3}
  runs = chosen["details"]["wsram_q_cv"]["runs"]
  assert not any(v["converged"] for v in runs[repr(1e30)].values())
  assert all(v["converged"] for v in runs[repr(1e-3)].values())
  assert "| wsram_q_cv |" in (tmp_path / "results" / "learning_rates.md").read_text()


def test_a_run_that_parks_its_later_glimpses_has_not_converged(tmp_path):
  """select_lr's verdict: finite and below --max_error is not enough when --min_on_digit asks for a policy
  whose later greedy glimpses land on the digit (the paper's "sensible attention policy")."""
  from experiments import select_lr  # pylint: disable=g-import-not-at-top
  for name, on_digit in (("parks", 0.0), ("attends", 0.9)):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w", encoding="utf-8") as f:
      f.write(json.dumps({"step": 100, "train/error": 0.1}) + "\n")
      f.write(json.dumps({"step": 100, "eval/error_sampled": 0.1, "eval/on_digit/later": on_digit}) + "\n")
  assert select_lr.converged(str(tmp_path / "parks"), 100, 0.5)["converged"]  # the attention test off
  assert not select_lr.converged(str(tmp_path / "parks"), 100, 0.5, min_on_digit=0.5)["converged"]
  verdict = select_lr.converged(str(tmp_path / "attends"), 100, 0.5, min_on_digit=0.5)
  assert verdict["converged"] and verdict["on_digit_later"] == 0.9
  assert not select_lr.converged(str(tmp_path / "attends"), 200, 0.5)["converged"]  # did not reach the budget


_UNSTACK_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from wsram_jax.training import runs as runs_lib
mesh = runs_lib.make_mesh(4)
assert mesh is not None and mesh.size == 2
def put(x, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))
tree = {"w": put(jnp.arange(24.).reshape(4, 6), P(runs_lib.RUN_AXIS)),
        "step": put(jnp.arange(4), P(runs_lib.RUN_AXIS)), "replicated": put(jnp.ones((4, 2)), P())}
for r in range(4):
  got = runs_lib.unstack(tree, r)
  np.testing.assert_array_equal(got["w"], np.arange(24.).reshape(4, 6)[r])
  assert int(got["step"]) == r
  np.testing.assert_array_equal(got["replicated"], np.ones(2))
  # Read on one device: no program spans both, so no cross-device collective.
  assert all(len(v.sharding.device_set) == 1 for v in got.values()), r
print("ok")
"""


def test_unstack_reads_a_run_from_its_own_shard():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _UNSTACK_SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("ok")
