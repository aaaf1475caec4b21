"""Shared test settings, fixtures and helpers: tests run on the CPU and never reach the network.

Test modules import nothing from each other; what several of them use lives here (fixtures, and helpers imported
as ``from conftest import ...``): tiny configs of both tasks, the Flickr8k fixture, running the binaries.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA compilation of small programs: skipping LLVM's backend optimisations halves it
# (measured here) and changes nothing the tests assert. Subprocesses started by tests inherit it.
# XLA's older fusion emitters (what the steps use, `training.step.compiler_options`) for every other program too:
# test_runs.py took 149 s with the MLIR emitters everywhere, 104 s with the old ones in the steps only, 96 s here.
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0].lstrip("-") not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# The library's helpers, imported here by the test modules too (`from conftest import synthetic_digits`).
from wsram_jax.data.synthetic import synthetic_digits  # pylint: disable=g-import-not-at-top
from wsram_jax.training.config import apply_overrides  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory):
  """A directory of IDX files (128 train, 32 test synthetic digits) for `--config.data.source=idx`."""
  from wsram_jax.data import mnist  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("tiny_mnist")
  for split, n, seed in (("train", 128, 0), ("test", 32, 1)):
    mnist.write_idx_split(directory, split, *synthetic_digits(n, seed))
  return directory


def tiny_overrides(data_dir) -> dict:
  """Config overrides that make the MNIST trainer small enough for a test: 40 px canvas, 2 scales, D=16; and Adam at
  a constant 3e-4 (the tests of the core and the tasks do not depend on a variant's schedule; `test_search` checks
  the defaults')."""
  from experiments.configs import mnist as mnist_configs  # pylint: disable=g-import-not-at-top
  return {**mnist_configs.schedule_values("constant", 0),
      "data.source": "idx", "data.data_dir": str(data_dir), "data.canvas_size": 40, "data.min_size": 14,
      "data.max_size": 24, "data.num_test": 32, "data.eval_batch_size": 16, "model.glimpse_size": 6,
      "model.num_scales": 2, "model.lowres_size": 4, "model.hidden_size": 16, "batch_size": 8,
      "num_samples": 3, "num_glimpses": 2, "num_steps": 6, "log_every": 2, "eval_every": 3,
      "checkpoint_every": 3, "diag_every": 3, "diag_num_estimates": 4,
  }


@pytest.fixture
def tiny_config(tiny_mnist_dir):
  """`tiny_config(variant, **overrides)` -> a small MNIST ConfigDict on the synthetic IDX data."""
  from experiments.configs import mnist as mnist_configs  # pylint: disable=g-import-not-at-top

  def make(variant="wsram_q_cv", **overrides):
    config = mnist_configs.get_config(variant)
    apply_overrides(config, tiny_overrides(tiny_mnist_dir))
    return apply_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})

  return make


# ---------------------------------------------------------------------------------------------------------------
# The captioner's tiny config and the Flickr8k fixture.


def tiny_caption_overrides(data_dir) -> dict:
  """A 32 px canvas, a 3-block encoder with 2 levels, D = 8: small enough to compile in seconds."""
  return {
      "data.source": "idx", "data.data_dir": str(data_dir), "data.canvas_size": 32, "data.small_min": 8,
      "data.small_max": 10, "data.large_min": 14, "data.large_max": 16, "data.num_test": 6,
      "data.eval_batch_size": 4, "model.encoder_channels": (4, 4, 4), "model.num_scales": 2,
      "model.feature_dim": 4, "model.embed_dim": 4, "model.hidden_size": 8, "model.glimpse_hidden": 4,
      "model.attention_hidden": 8, "model.context_dim": 4, "model.lowres_size": 4, "batch_size": 4,
      "num_samples": 2, "num_steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 2,
  }


@pytest.fixture
def tiny_caption_config(tiny_mnist_dir):
  """`tiny_caption_config(variant, **{dotted key: value})` -> a small caption ConfigDict on the synthetic IDX data."""
  from experiments.configs import captions as caption_configs  # pylint: disable=g-import-not-at-top

  def make(variant="wsram_q_cv", **overrides):
    config = caption_configs.get_config(variant)
    apply_overrides(config, tiny_caption_overrides(tiny_mnist_dir))
    return apply_overrides(config, overrides)

  return make


def write_flickr_fixture(root):
  """A Karpathy-format split file and 4 tiny images (PNG and JPEG) under `root`; returns (json, image_dir)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image_dir = root / "images"
  image_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  entries = []
  specs = [("a.png", "train", [["A", "dog", "runs"], ["a", "dog"]]),
           ("b.jpg", "restval", [["a", "cat", "sits", "on", "a", "mat"]]),
           ("c.png", "test", [["a", "dog", "sits"], ["the", "dog"], ["a", "red", "ball"]]),
           ("d.png", "val", [["a", "cat"]])]
  for name, split, sentences in specs:
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(image_dir / name)
    entries.append({"filename": name, "split": split, "imgid": len(entries),
                    "sentences": [{"tokens": t, "raw": " ".join(t)} for t in sentences]})
  json_path = root / "dataset_flickr8k.json"
  json_path.write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
  return json_path, image_dir


# ---------------------------------------------------------------------------------------------------------------
# Running the binaries.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(workdir, data_dir, *extra):
  flags = [f"--config.{k}={v}" for k, v in tiny_overrides(data_dir).items()]
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/mnist.py:wsram_q_cv",
          f"--workdir={workdir}", *flags, *extra]


def run_all(cmds, timeout=300):
  """Runs the commands side by side; returns their CompletedProcess-like (returncode, stderr) pairs."""
  procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for c in cmds]
  out = []
  for p in procs:
    try:
      _, stderr = p.communicate(timeout=timeout)
    finally:
      p.kill()
    out.append((p.returncode, stderr))
  return out


def message_lines(stderr: str) -> list[str]:
  """The lines of a binary's stderr other than progress lines and absl's log lines (``I1128 12:00:00...``)."""
  return [l for l in stderr.splitlines()
          if l.strip() and not l.startswith("step ") and not re.match(r"[IWE]\d{4} ", l)]


def stop_running_binary(cmd, workdir, signum):
  """Starts `cmd`, sends it `signum` once it has logged a training line; returns (returncode, stderr)."""
  env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT then prints every thread's stack
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if any('"train/' in line for line in _lines(workdir / "metrics.jsonl")):
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal; make it longer"
    proc.send_signal(signum)
    try:
      _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGABRT)
      _, stderr = proc.communicate(timeout=60)
      raise AssertionError(f"the run did not stop within 120 s of the signal; its stacks:\n{stderr[-6000:]}")
  finally:
    proc.kill()
  return proc.returncode, stderr


def _lines(path):
  try:
    return path.read_text().splitlines()
  except FileNotFoundError:
    return []


def kill_after_first_checkpoint(cmd, workdir, timeout=400):
  """Starts `cmd` (a training binary on `workdir`) and kills it with SIGKILL once it has written a checkpoint."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  ckpt_dir = workdir / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
