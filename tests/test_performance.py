"""Scale and speed: the data-parallel step on 4 emulated devices, the PyTorch peer's math, the benchmark harness.

Timings are never asserted (the benchmark's numbers live in BENCHMARKS.md). The PyTorch tests are skipped when
torch is not installed (it is the optional 'bench' extra).
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import synthetic_digits, tiny_overrides
from wsram_jax import actions
from wsram_jax import glimpse as glimpse_lib
from wsram_jax.classifier import model as networks
from wsram_jax.classifier import train
from wsram_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY_ARG = json.dumps(tiny_overrides("unused"))  # the last argument of the scripts below

_MESH_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from wsram_jax.data.synthetic import synthetic_digits
from wsram_jax.training.config import apply_overrides
TINY = json.loads(sys.argv[-1])  # the tests' tiny overrides (conftest.tiny_overrides), passed in by the test
from experiments.configs import mnist
from wsram_jax.classifier import train
from wsram_jax.training import step as step_lib

assert jax.device_count() == 4, jax.devices()
images, labels = synthetic_digits(64)
out = {}
for n in (1, 4):
  config = apply_overrides(mnist.get_config("wsram_q_cv"), TINY)
  config.mesh_devices = n
  train.validate_config(config)
  model, optimizer = train.build_model(config), step_lib.make_optimizer(config)
  state = train.create_train_state(config, model, optimizer)
  data = step_lib.replicate(step_lib.make_mesh(config.mesh_devices), (jnp.asarray(images), jnp.asarray(labels)))
  step, loss_and_grads = train.make_train_step(config, model, optimizer), train.make_loss_and_grads(config, model)
  # One program (one compilation) holding the step and the gradients it computes (the same key: step 0).
  both = lambda s, *d: (loss_and_grads(s.params, s.extra, jax.random.fold_in(s.key, s.step), *d), step(s, *d))
  compiled = jax.jit(both).lower(state, *data).compile()
  ((loss, _), grads), (new_state, metrics) = compiled(state, *data)
  hlo = compiled.as_text()
  out[n] = dict(loss=float(loss), step_loss=float(metrics["train/loss"]),
                grads=[np.asarray(g).tolist() for g in jax.tree_util.tree_leaves(grads)],
                params=[np.asarray(p).tolist() for p in jax.tree_util.tree_leaves(new_state.params)],
                sharding=str(new_state.params["core1"]["kernel"].sharding), all_reduce=hlo.count("all-reduce("),
                per_device_rows=(config.batch_size // n) * config.num_samples,
                has_per_device_dot=f"f32[{(config.batch_size // n) * config.num_samples},16]" in hlo)
print(json.dumps(out))
"""


def test_data_parallel_step_equals_single_device():
  # A fresh process: the emulated device count must be set before JAX initialises.
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, _TINY_ARG], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one, four = out["1"], out["4"]
  assert "'data': 4" in four["sharding"] and "SingleDevice" in one["sharding"]
  # The batch really is split: one all-reduce of the gradients, matmuls over B/4 * M rows on each device.
  assert four["all_reduce"] >= 1 and one["all_reduce"] == 0
  assert four["has_per_device_dot"] and one["has_per_device_dot"]
  np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(four["step_loss"], one["loss"], rtol=1e-6, atol=1e-6)
  for g4, g1 in zip(four["grads"], one["grads"]):
    np.testing.assert_allclose(np.asarray(g4), np.asarray(g1), rtol=1e-6, atol=1e-6)
  for p4, p1 in zip(four["params"], one["params"]):
    np.testing.assert_allclose(np.asarray(p4), np.asarray(p1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mesh_devices, match", [(3, "must divide"), (8, "exceeds the 1 devices")])
def test_mesh_devices_validation(tiny_config, mesh_devices, match):
  from wsram_jax import errors  # pylint: disable=g-import-not-at-top
  config = tiny_config("wsram_q_cv", mesh_devices=mesh_devices)  # batch_size 8, one CPU device
  with pytest.raises(errors.ConfigError, match=match) as e:
    train.validate_config(config)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# The PyTorch peer.


@pytest.fixture
def one_torch_thread():
  """PyTorch on one thread: its OpenMP workers spin-wait, which on a loaded 2-core machine costs seconds."""
  torch = pytest.importorskip("torch", reason="PyTorch (the 'bench' extra) is not installed")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _peer_setup(tiny_config, **overrides):
  torch_peer = pytest.importorskip("benchmarks.torch_peer", reason="PyTorch (the 'bench' extra) is not installed")
  config = tiny_config("wsram_q_cv", batch_size=4, model__hidden_size=16, **overrides)
  train.validate_config(config)
  model = train.build_model(config)
  params = networks.init_params(model, jax.random.PRNGKey(0))
  return torch_peer, config, model, params


def _same_noise_batch(config, seed=0):
  """Canvases ``[B, H, W, 1]``, labels, a key, and the noise the JAX rollout draws from that key
  (classifier.loss.make_loss_fn -> batched_rollout -> rollout)."""
  b, m, n = config.batch_size, config.num_samples, config.num_glimpses
  rng = np.random.default_rng(seed)
  size = config.data.canvas_size
  canvases = (rng.uniform(size=(b, size, size, 1)) * (rng.uniform(size=(b, size, size, 1)) < 0.3)).astype(np.float32)
  labels = np.arange(1, b + 1, dtype=np.int32) % config.model.num_classes
  key = jax.random.PRNGKey(3 + seed)
  k_roll, _ = jax.random.split(key)
  noise = jax.vmap(lambda k: actions.draw_noise(k, (m, n)))(jax.random.split(k_roll, b))
  return canvases, labels, key, noise


def _check_peer_against_jax(torch_peer, config, model, params, compile_mode=None):
  """The peer's loss, metrics, sampled actions and gradients against the JAX loss's, given the same noise."""
  import torch  # pylint: disable=g-import-not-at-top
  from wsram_jax import objectives  # pylint: disable=g-import-not-at-top
  from wsram_jax.classifier import loss as loss_lib  # pylint: disable=g-import-not-at-top
  canvases, labels, key, noise = _same_noise_batch(config)
  loss_fn = train.make_loss_fn(config, model)
  batch = (jnp.asarray(canvases), jnp.asarray(labels))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, key, 0.0)
  traj = loss_lib.batched_rollout(
      params, *batch, jax.random.split(key)[0], model=model,
      proposal=objectives.make_proposal(objectives.ObjectiveConfig.from_config(config)),
      num_glimpses=config.num_glimpses,
      num_samples=config.num_samples)
  peer = torch_peer.TorchPeer(torch_peer.PeerConfig.from_config(config, train.canvas_kwargs(config)), params,
                              np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int32), compile_mode=compile_mode)
  args = (torch.tensor(canvases[..., 0]), torch.tensor(labels), torch.tensor(np.asarray(noise.normal)),
          torch.tensor(np.asarray(noise.uniform[..., 0])))
  t_loss, t_metrics = peer.loss_fn(*args)
  t_loss.backward()
  np.testing.assert_allclose(float(t_loss.detach()), float(loss), rtol=1e-5)
  for k in ("ess", "bound", "error", "entropy", "loss_p", "loss_q", "scale_usage_0"):
    np.testing.assert_allclose(float(t_metrics[k]), float(metrics[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(t_metrics["scale"].numpy(), np.asarray(traj.actions.scale))
  np.testing.assert_allclose(t_metrics["loc"].numpy(), np.asarray(traj.actions.loc), rtol=1e-5, atol=1e-6)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = "/".join(p.key for p in path)
    t_grad = peer.params[name].grad
    t_grad = np.zeros(g.shape) if t_grad is None else t_grad.numpy()
    np.testing.assert_allclose(t_grad, np.asarray(g), rtol=1e-4, atol=1e-6 * max(1.0, float(jnp.abs(g).max())),
                               err_msg=name)
  return peer


@pytest.mark.parametrize("overrides", [
    {},  # the default wsram_q_cv: the proposal tempered at T = 2, the entropy bonus
    {"heuristics__coverage_weight": 0.1, "heuristics__coverage_location_weight": 0.5, "p_baseline": "unbiased"},
    {"heuristics__temperature": 1.0, "heuristics__entropy_weight": 0.0},  # q itself as proposal
    {"control_variates": False, "heuristics__temperature": 0.5},
], ids=["default", "coverage_unbiased", "untempered", "no_cv"])
def test_torch_peer_loss_and_gradients_equal_jax(tiny_config, one_torch_thread, overrides):
  torch_peer, config, model, params = _peer_setup(tiny_config, **overrides)
  if not overrides:  # the peer is checked against what the default config turns on
    assert config.heuristics.temperature != 1 and config.heuristics.entropy_weight > 0
  _check_peer_against_jax(torch_peer, config, model, params)


def test_compiled_torch_peer_equals_jax(tiny_config, one_torch_thread, tmp_path, monkeypatch):
  monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing left in the user's cache
  torch_peer, config, model, params = _peer_setup(tiny_config, heuristics__coverage_weight=0.1)
  peer = _check_peer_against_jax(torch_peer, config, model, params, compile_mode="default")
  assert peer.compile_mode == "default" and peer.loss_fn is not peer.loss_and_metrics


def test_torch_peer_update_equals_the_optax_update(tiny_config, one_torch_thread):
  # Clipping, Adam, the policies' learning-rate scale and the warmup and decay factors of four updates, each on
  # the same gradients (JAX's, at the parameters both sides have reached).
  import torch  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  torch_peer, config, model, params = _peer_setup(
      tiny_config, policy_lr_scale=3.0, learning_rate=1e-2, grad_clip_norm=0.05,
      warmup=dict(start=0.2, hold_steps=1, ramp_steps=2), decay=dict(begin=1, steps=4, end=0.5))
  optimizer = step_lib.make_optimizer(config)
  opt_state = optimizer.init(params)
  canvases, labels, key, _ = _same_noise_batch(config, seed=1)
  batch = (jnp.asarray(canvases), jnp.asarray(labels))
  grad_fn = jax.jit(jax.grad(lambda p: train.make_loss_fn(config, model)(p, batch, key, 0.0)[0]))
  peer = torch_peer.TorchPeer(torch_peer.PeerConfig.from_config(config, train.canvas_kwargs(config)), params,
                              np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int32))
  names = ["/".join(p.key for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  for _ in range(4):
    grads = grad_fn(params)
    for name, g in zip(names, jax.tree_util.tree_leaves(grads)):
      peer.params[name].grad = torch.tensor(np.asarray(g))
    norm = peer.apply_gradients()
    np.testing.assert_allclose(float(norm), float(optax.global_norm(grads)), rtol=1e-5)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  assert peer.updates == 4
  for name, v in zip(names, jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(peer.params[name].detach().numpy(), np.asarray(v), rtol=1e-5, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("overrides, match", [
    ({"proposal": "defensive_mixture"}, "proposal=defensive_mixture"),
    ({"model__learn_loc_std": True}, "learned location std"),
    ({"sleep_weight": 0.5}, "sleep phase"),
])
def test_peer_config_refuses_what_the_peer_lacks_in_one_line(tiny_config, overrides, match):
  from benchmarks import peer_config  # pylint: disable=g-import-not-at-top  (no torch needed)
  from wsram_jax import errors  # pylint: disable=g-import-not-at-top
  config = tiny_config("wsram_q_cv", **overrides)
  with pytest.raises(errors.ConfigError, match=match) as e:
    peer_config.PeerConfig.from_config(config, train.canvas_kwargs(config))
  assert "\n" not in str(e.value)
  assert peer_config.unsupported(tiny_config("quick")) is None


def test_torch_peer_trains(tiny_config, one_torch_thread):
  torch = pytest.importorskip("torch", reason="PyTorch (the 'bench' extra) is not installed")
  torch_peer, config, _, params = _peer_setup(tiny_config)
  torch.manual_seed(0)
  cfg = torch_peer.PeerConfig.from_config(config, train.canvas_kwargs(config))
  cfg = dataclasses.replace(cfg, batch_size=16, learning_rate=3e-3)
  peer = torch_peer.TorchPeer(cfg, params, *synthetic_digits(128), seed=0)
  losses = [float(peer.step()["loss"]) for _ in range(100)]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-25:]) < np.mean(losses[:25]) - 0.15, losses  # about 1.97 -> 1.63 with this seed


def test_torch_glimpses_equal_jax(one_torch_thread):
  torch = pytest.importorskip("torch", reason="PyTorch (the 'bench' extra) is not installed")
  from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  b, m, h, size, scales = 3, 4, 37, 6, 3
  canvases = rng.uniform(size=(b, h, h)).astype(np.float32)
  loc = np.clip(rng.uniform(-1.3, 1.3, size=(b, m, 2)), -1, 1).astype(np.float32)
  scale = rng.integers(0, scales, size=(b, m))
  one = functools.partial(glimpse_lib.extract_glimpse, size=size, num_scales=scales)
  expected = np.asarray(jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)))(jnp.asarray(canvases[..., None]),
                                                                       jnp.asarray(loc), jnp.asarray(scale)))[..., 0]
  padded = torch_peer.pad_canvases(torch.tensor(canvases), size=size, num_scales=scales)
  kw = dict(size=size, num_scales=scales, canvas_hw=(h, h))
  for fn in (torch_peer.glimpse, torch_peer.crop_loop_glimpse):
    got = fn(padded, torch.tensor(loc), torch.tensor(scale), **kw).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=fn.__name__)


def test_torch_wsram_losses_equal_the_estimator(one_torch_thread):
  torch = pytest.importorskip("torch", reason="PyTorch (the 'bench' extra) is not installed")
  from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  from wsram_jax import estimators  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  lp_a, lp_y, lq_a = (rng.normal(size=(3, 5)).astype(np.float32) * s for s in (3.0, 1.0, 3.0))
  f = lambda a, y, q: sum(estimators.wsram_losses(a, y, q, control_variates=True))
  value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(*map(jnp.asarray, (lp_a, lp_y, lq_a)))
  t = [torch.tensor(x, requires_grad=True) for x in (lp_a, lp_y, lq_a)]
  t_value = sum(torch_peer.wsram_losses(*t))
  t_value.backward()
  np.testing.assert_allclose(float(t_value.detach()), float(value), rtol=1e-6)
  for tg, g in zip(t, grads):
    np.testing.assert_allclose(tg.grad.numpy(), np.asarray(g), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark harness.


def _tiny_benchmark_overrides():
  return tuple((k, v) for k, v in tiny_overrides("unused").items()
               if k.startswith(("model.", "data.canvas", "data.min", "data.max", "num_")))


def test_benchmark_runs_on_a_tiny_config(tmp_path):
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  from benchmarks import step as bench  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_timing  # pylint: disable=g-import-not-at-top
  # The compiled peer is checked against JAX above; compiling it again here would double the test's time.
  options = bench.BenchmarkOptions(batch_sizes=(4,), steps=2, rounds=2, warmup=1, num_digits=64,
                                   glimpse_repeats=3, torch_threads=(1,), torch_compile_modes=(),
                                   overrides=_tiny_benchmark_overrides())
  results = bench.run(options, log=lambda s: None)
  text = report.write(results, str(tmp_path / "out"))
  entry = results["batch_sizes"]["4"]
  assert entry["jax"]["step"]["n"] == 2 and entry["jax"]["xla_flops"] > 0
  # The step has no loop around a matmul, so XLA's FLOP count covers every dot of the step.
  assert entry["jax"]["hlo"]["dots"] > 0 and entry["jax"]["xla_flops"] >= entry["jax"]["dot_flops"]
  assert entry["matmuls"]["count"] == entry["jax"]["hlo"]["dots"] and entry["utilisation"] > 0
  # Cold compile by the one definition (fresh processes), then a second run that loads the step from the cache.
  cold, second = entry["jax"]["compile_time"]["cold"], entry["jax"]["compile_time"]["second_run"]
  assert cold["total_s"] == pytest.approx(cold["lower_s"] + cold["compile_s"], abs=2e-3) and cold["compile_s"] > 0
  # (No timing is asserted: on a tiny step loading from the cache can take as long as compiling it.)
  assert second["total_s"] == pytest.approx(second["lower_s"] + second["compile_s"], abs=2e-3)
  assert "| JAX ms/step" in text and "JAX cold compile" in text
  assert json.loads((tmp_path / "out.json").read_text())["batch_sizes"]["4"]
  if torch_timing.torch_installed():
    assert entry["torch"]["eager_1t"]["step"]["n"] == 2 and entry["torch_best"] == "eager_1t"
    assert "JAX speed-up over the fastest PyTorch" in text
  if (os.cpu_count() or 1) in (2, 4):  # B = 4 splits over one host device per core, timed in a child process
    dp = entry["jax_data_parallel"]
    assert dp["devices"] == os.cpu_count() and dp["step"]["n"] == 2 and dp["one_device"]["n"] == 2
    assert dp["speedup_over_one_device"] > 0 and "| JAX data parallel" in text


@pytest.mark.parametrize("args, match", [
    (["--variant=var_cv"], "--config.method=var"),
    (["--variant=wsram"], "--config.proposal=prior"),
    (["--variant=nosuch"], "Unknown variant"),
    (["--torch_compile_modes=fastest"], "Unknown --torch_compile_modes fastest"),
    (["--torch_compile_threads=-1"], "--torch_compile_threads >= 0"),
])
def test_benchmark_refuses_in_one_line_what_it_cannot_run(args, match):
  # Before anything compiles, with or without torch installed: the peer lacks what the variant turns on.
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and match in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_benchmarks_do_not_import_the_experiments_package():
  # One direction only: experiments.benchmark is a binary over benchmarks/, which reads the config by its path.
  script = ("import sys\n"
            "import benchmarks.step, benchmarks.compile, benchmarks.runs, benchmarks.coldcompile, benchmarks.report\n"
            "from benchmarks import common\n"
            "config = common.make_config('wsram_q_cv', 32)\n"
            "assert config.heuristics.temperature == 2.0, config.heuristics\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'experiments'))\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_dot_shapes_reads_dimension_numbers():
  from benchmarks import hlo  # pylint: disable=g-import-not-at-top
  f = jax.jit(lambda x, w, g: (x @ w, jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))))
  compiled_hlo = f.lower(jnp.ones((6, 4)), jnp.ones((4, 3)), jnp.ones((6, 5))).compile().as_text()
  dots = sorted(hlo.dot_shapes(compiled_hlo), key=lambda d: d["flops"])
  assert [d["flops"] for d in dots] == [2 * 6 * 4 * 3, 2 * 4 * 5 * 6]
  fn, flops = hlo.matmul_batch(dots)
  fn()
  assert flops == 2 * 6 * 4 * 3 + 2 * 4 * 5 * 6


# ---------------------------------------------------------------------------------------------------------------
# The persistent compilation cache.

_CACHE_SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp
from wsram_jax.data.synthetic import synthetic_digits
from wsram_jax.training.config import apply_overrides
TINY = json.loads(sys.argv[-1])  # the tests' tiny overrides (conftest.tiny_overrides), passed in by the test
from experiments.configs import mnist
from wsram_jax.classifier import train
from wsram_jax.training import cli
from wsram_jax.training import step as step_lib

path = cli.enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the tiny step may compile in under 1 s
config = apply_overrides(mnist.get_config("wsram_q_cv"), TINY)
model, optimizer = train.build_model(config), step_lib.make_optimizer(config)
state = train.create_train_state(config, model, optimizer)
images, labels = synthetic_digits(64)
_, metrics = train.make_train_step(config, model, optimizer)(state, jnp.asarray(images), jnp.asarray(labels))
print(json.dumps({"path": path, "loss": float(metrics["train/loss"]), "entries": sorted(os.listdir(path))}))
"""


def test_compilation_cache_stores_the_step_and_a_second_run_reuses_it(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["WSRAM_JAX_COMPILATION_CACHE"] = str(tmp_path / "xla")
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, _TINY_ARG], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  first, second = runs
  assert first["path"] == str(tmp_path / "xla")
  steps = [e for e in first["entries"] if e.startswith("jit_step")]
  assert len(steps) == 1, first["entries"]
  assert second["entries"] == first["entries"]  # the second run compiled nothing new: it loaded the step
  assert second["loss"] == first["loss"]


@pytest.mark.parametrize("value, expected", [("", None), ("off", None), ("0", None), ("/some/dir", "/some/dir")])
def test_compilation_cache_dir_from_the_environment(monkeypatch, value, expected):
  from wsram_jax.training import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(cli.CACHE_ENV, value)
  assert cli.compilation_cache_dir() == expected
  monkeypatch.delenv(cli.CACHE_ENV)
  assert cli.compilation_cache_dir().endswith(os.path.join(".cache", "wsram_jax", "xla"))


# ---------------------------------------------------------------------------------------------------------------
# Several processes (the multi-host set-up of BUILD.md, on one machine: two CPU processes joined by
# jax.distributed, collectives over gloo).

_DISTRIBUTED_SCRIPT = r"""
import json, sys
import jax
process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)
import jax.numpy as jnp
from wsram_jax.data.synthetic import synthetic_digits
from wsram_jax.training.config import apply_overrides
TINY = json.loads(sys.argv[-1])  # the tests' tiny overrides (conftest.tiny_overrides), passed in by the test
from experiments.configs import mnist
from wsram_jax.classifier import train
from wsram_jax.training import step as step_lib

config = apply_overrides(mnist.get_config("wsram_q_cv"), TINY)
config.mesh_devices = jax.device_count()  # every device of every process
train.validate_config(config)
model, optimizer = train.build_model(config), step_lib.make_optimizer(config)
state = step_lib.replicate(step_lib.make_mesh(config.mesh_devices), train.create_train_state(config, model, optimizer))
images, labels = synthetic_digits(64)
data = step_lib.replicate(step_lib.make_mesh(config.mesh_devices), (jnp.asarray(images), jnp.asarray(labels)))
step = train.make_train_step(config, model, optimizer)
for _ in range(2):
  state, metrics = step(state, *data)
print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                  "loss": float(metrics["train/loss"]), "grad_norm": float(metrics["train/grad_norm"])}))
"""


def test_two_processes_joined_by_jax_distributed_train_like_one():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = lambda pid, n: [sys.executable, "-c", _DISTRIBUTED_SCRIPT, str(pid), str(n), str(port), _TINY_ARG]
  procs = [subprocess.Popen(cmd(pid, 2), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in range(2)]
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=300)
    finally:
      p.kill()
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  single = subprocess.run(cmd(0, 1), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  one = json.loads(single.stdout.strip().splitlines()[-1])
  assert [o["processes"] for o in outs] == [2, 2] and [o["devices"] for o in outs] == [2, 2] and one["devices"] == 1
  for o in outs:  # the second step's loss depends on the first update: the gradients were all-reduced right
    np.testing.assert_allclose(o["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o["grad_norm"], one["grad_norm"], rtol=1e-5, atol=1e-6)


_MALLOC_SCRIPT = r"""
import ctypes, ctypes.util, resource, sys
from wsram_jax.training import cli
applied = cli.keep_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():  # 64 MB allocated, written, freed (as XLA:CPU does with a step's temporaries)
  p = libc.malloc(64 << 20)
  ctypes.memset(p, 1, 64 << 20)
  libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  touch()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_allocations_without_page_faults():
  out = {}
  for flag in ("0", "1"):
    proc = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT, flag], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    applied, faults = proc.stdout.split()
    out[flag] = (applied == "True", float(faults))
  if not out["1"][0]:
    pytest.skip("not glibc")
  # Above glibc's largest default mmap threshold (32 MB) every re-allocation comes as fresh pages from the
  # kernel (at least one fault per 2 MB huge page, one per 4 KB page without them)...
  assert out["0"][1] >= (64 << 20) / (2 << 20)
  assert out["1"][1] < 0.1 * out["0"][1]  # ...unless freed memory stays in the heap


def test_compile_benchmark_runs_on_a_tiny_config(tmp_path):
  from benchmarks import compile as compile_bench  # pylint: disable=g-import-not-at-top
  results = compile_bench.measure(1, 4, 1, 2, 2, overrides=_tiny_benchmark_overrides(), log=lambda s: None)
  for setting in ("ours", "xla"):  # one cold process each, then both timed in one more
    (row,) = results["compile"][setting]
    assert row["compile_s"] > 0 and row["lower_s"] > 0 and row["fusions"] > 0
    assert len(results["steps"][setting]["all"]) == 2
  assert results["step_ratio_ours_over_xla"] > 0
  assert "| XLA's older ones (ours) |" in compile_bench.markdown(results)
