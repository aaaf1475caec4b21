"""experiments/quickstart.py, wsram_jax.plots.canvas_grid and wsram_jax.cli."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from experiments import quickstart
from wsram_jax.classifier import train as classifier_train
from wsram_jax.training import cli
from wsram_jax.training import metric_writers
from wsram_jax import plots
from wsram_jax.errors import ConfigError, DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx_test_split(directory, n=12):
  """A tiny MNIST test split in IDX format: digit i is a bar whose length depends on its label."""
  directory.mkdir(parents=True, exist_ok=True)
  images = np.zeros((n, 28, 28), np.uint8)
  labels = (np.arange(n) % 10).astype(np.uint8)
  for i, label in enumerate(labels):
    images[i, 6:22, 12:16] = 255
    images[i, 6, 8:8 + 2 * int(label)] = 200
  for name, a in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    (directory / name).write_bytes(gzip.compress(header + a.tobytes()))
  return directory


def test_make_canvas_preview_writes_png(tmp_path):
  data_dir = write_idx_test_split(tmp_path / "idx")
  path = quickstart.make_canvas_preview(tmp_path / "work", num=8, seed=0, source="idx", data_dir=data_dir)
  assert path == tmp_path / "work" / "canvases.png"
  assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_make_canvas_preview_errors(tmp_path):
  data_dir = write_idx_test_split(tmp_path / "idx", n=4)
  with pytest.raises(ConfigError, match="num"):
    quickstart.make_canvas_preview(tmp_path, num=5, source="idx", data_dir=data_dir)
  with pytest.raises(ConfigError, match="num"):
    quickstart.make_canvas_preview(tmp_path, num=0, source="idx", data_dir=data_dir)
  with pytest.raises(DataError, match="make data"):
    quickstart.make_canvas_preview(tmp_path, num=4, data_dir=tmp_path / "nowhere")


def test_canvas_grid_accepts_float_and_uint8(tmp_path):
  rng = np.random.default_rng(0)
  boxes = np.array([[0, 0, 10, 10], [5, 3, 25, 23], [1, 1, 30, 30]], np.int32)
  labels = np.array([1, 2, 3])
  floats = rng.uniform(size=(3, 30, 30, 1)).astype(np.float32)
  p1 = plots.canvas_grid(floats, labels, boxes, tmp_path / "a" / "f.png", ncols=2, title="floats")
  p2 = plots.canvas_grid((floats[..., 0] * 255).astype(np.uint8), labels, boxes, tmp_path / "u.png")
  for p in (p1, p2):
    assert p.read_bytes()[:8] == PNG_MAGIC
  with pytest.raises(ConfigError):
    plots.canvas_grid(floats, labels[:2], boxes, tmp_path / "bad.png")


def test_report_user_errors_prints_one_sentence_and_exits_with_its_code(capsys):
  def bad_flag():
    raise ConfigError("The flag --x is wrong.")

  def bad_data():
    raise DataError("The data is missing; run `make data`.")

  for fn, code in ((bad_flag, 2), (bad_data, 1)):
    with pytest.raises(SystemExit) as e:
      cli.report_user_errors(fn)()
    assert e.value.code == code
  err = capsys.readouterr().err.splitlines()
  assert err == ["error: The flag --x is wrong.", "error: The data is missing; run `make data`."]


def test_report_user_errors_passes_results_and_bugs_through():
  assert cli.report_user_errors(lambda x: x + 1)(1) == 2
  with pytest.raises(ZeroDivisionError):
    cli.report_user_errors(lambda: 1 / 0)()


def test_binary_reports_config_error_without_traceback(tmp_path):
  """End to end through absl: a bad config value is one line and exit code 2, before anything trains."""
  for flag, message in (("--config.data.source=idx", "The idx source needs data_dir"),
                        ("--config.num_samples=0", "num_samples must be an integer >= 1"),
                        ("--config.no_such_key=3", "invalid flags")):
    proc = subprocess.run([sys.executable, "-m", "experiments.quickstart", f"--workdir={tmp_path}", flag],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_run_quickstart_trains_and_draws(tiny_config, tmp_path):
  config = tiny_config("quick")
  line = quickstart.run_quickstart(config, str(tmp_path))
  for name in ("canvases.png", "curves.png", "glimpses.png", "metrics.jsonl"):
    assert (tmp_path / name).exists(), name
  assert (tmp_path / "glimpses.png").read_bytes()[:8] == PNG_MAGIC
  assert "test error" in line and "on the digit" in line and "ESS" in line and "grad var" in line
  # Without the diagnostics (the quick config's default) the ESS is the last training batches': the same run's
  # summary from its metrics less the diagnostics' (training it again without them would only repeat the above).
  logged = {k: v for k, v in metric_writers.final_metrics(str(tmp_path)).items() if not k.startswith("diag/")}
  line = classifier_train.summary(logged)
  assert "ESS of the last training batches" in line and "grad var" not in line
