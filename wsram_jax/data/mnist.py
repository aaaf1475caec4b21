"""MNIST digits from three sources, as uint8 images `[N, 28, 28]` and int32 labels `[N]`.

`load_mnist(split, source=...)` returns the original MNIST split ('train': 60,000 digits, 'test': 10,000) from:

- 'offline' (default): the classic `mnist.pkl.gz` that `python -m wsram_jax.data.fetch` (`make data`) puts in the
  data cache. Its sha256 is checked *before* it is unpickled, and it is unpickled by an `Unpickler` that admits
  only the three numpy globals an ndarray needs, so a tampered file can neither run code nor pass as MNIST. The
  pickle holds (train 50k, valid 10k, test 10k) float32 pixels k/256; train + valid in order is the original 60k
  training set and `round(x * 256)` recovers the uint8 pixels exactly (checked). The decoded arrays are cached as
  `.npy` files next to the pickle (loaded with `allow_pickle=False` and checked against known sha256s), which
  turns a ~2 s decode into a few tens of milliseconds.
- 'idx': a directory of the standard IDX files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
  `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`, gzipped or plain), read by the generic `read_idx`,
  so Fashion-MNIST or KMNIST in that format load the same way.
- 'tfds': a `tensorflow_datasets` 'mnist' already prepared in the array_record format, read through
  `tfds.data_source(..., download=False)`, which needs no tensorflow and makes no network call.

A missing, truncated or tampered source raises `DataError` (one sentence naming the source, the path and how to
get the data); an unknown source or split raises `ConfigError`.
"""
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import struct
import tempfile
import zlib
from typing import Dict, Optional, Tuple, Union

from absl import logging
import numpy as np

from wsram_jax.data import fetch
from wsram_jax.errors import ConfigError, DataError

PathLike = Union[str, os.PathLike]
Arrays = Tuple[np.ndarray, np.ndarray]

SOURCES = ("offline", "idx", "tfds")
SPLITS = ("train", "test")
SPLIT_SIZES = {"train": 60_000, "test": 10_000}

# sha256 of the C-order bytes of the decoded arrays (uint8 [N,28,28] images, int32 [N] labels); they guard the
# .npy cache and double-check the decode.
_DECODED_SHA256 = {
    ("train", "images"): "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    ("train", "labels"): "ba2e26c82ab7a46fbcd5ec6de8eee4d541cf3829f5050669177da23b515defeb",
    ("test", "images"): "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    ("test", "labels"): "52aa149c856ca033d02e1d2e5cc61033b4c56ed4a56f0edc328206a178c42126",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32,
               0x0E: np.float64}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


# ---------------------------------------------------------------------------------------------------------------
# 'offline': the verified pickle.


def _numpy_reconstruct():
  try:
    from numpy._core.multiarray import _reconstruct  # pylint: disable=g-import-not-at-top  # numpy >= 2
  except ImportError:  # pragma: no cover  (numpy 1.x)
    from numpy.core.multiarray import _reconstruct  # pylint: disable=g-import-not-at-top
  return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
  """An Unpickler whose `find_class` admits only what plain numpy arrays need, so no pickle can run code.

  Allowed globals: `numpy.core.multiarray._reconstruct` (and its numpy 2 name `numpy._core.multiarray`),
  `numpy.ndarray`, `numpy.dtype`. Anything else raises `pickle.UnpicklingError`.
  """

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
      ("numpy", "ndarray"): lambda: np.ndarray,
      ("numpy", "dtype"): lambda: np.dtype,
  }

  def find_class(self, module, name):
    resolve = self._ALLOWED.get((module, name))
    if resolve is None:
      raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")
    return resolve()

  def persistent_load(self, pid):
    raise pickle.UnpicklingError("refusing a persistent id")


def _offline_path(data_dir: Optional[PathLike]) -> pathlib.Path:
  base = pathlib.Path(data_dir).expanduser() if data_dir is not None else fetch.default_data_dir()
  return base / fetch.PICKLE_NAME


def _to_uint8(pixels: np.ndarray, path: pathlib.Path, block: int = 10_000) -> np.ndarray:
  """float32 k/256 pixels [N, 784] -> uint8 k [N, 28, 28], checking the round trip is exact (blockwise)."""
  out = np.empty(pixels.shape, np.uint8)
  for start in range(0, pixels.shape[0], block):
    x = pixels[start:start + block]
    scaled = x * np.float32(256)  # exact: a power of two
    rounded = np.round(scaled)
    if rounded.min() < 0 or rounded.max() > 255 or not np.array_equal(rounded, scaled):
      raise DataError(f"The offline MNIST pickle {path} holds pixels that are not multiples of 1/256 in "
                      f"[0, 1); move it away and run `make data` again.")
    out[start:start + block] = rounded
  return out.reshape(-1, 28, 28)


def _check_pickle_layout(obj, path: pathlib.Path) -> None:
  sizes = (50_000, 10_000, 10_000)
  ok = isinstance(obj, (tuple, list)) and len(obj) == 3
  if ok:
    for pair, n in zip(obj, sizes):
      ok = ok and isinstance(pair, (tuple, list)) and len(pair) == 2
      ok = ok and all(isinstance(a, np.ndarray) for a in pair)
      ok = ok and pair[0].shape == (n, 784) and pair[0].dtype == np.float32 and pair[1].shape == (n,)
      ok = ok and np.issubdtype(pair[1].dtype, np.integer)
      if not ok:
        break
  if not ok:
    raise DataError(f"The offline MNIST pickle {path} does not hold (train 50k, valid 10k, test 10k) float32 "
                    f"[n, 784] images with integer labels; move it away and run `make data` again.")


def decode_offline_pickle(path: PathLike) -> Dict[str, Arrays]:
  """Verifies and decodes the offline pickle into {'train': (images, labels), 'test': (images, labels)}.

  The sha256 is checked before unpickling; unpickling uses `NumpyOnlyUnpickler`.
  """
  path = pathlib.Path(path)
  how = "run `make data` (or `python -m wsram_jax.data.fetch`)"
  if not path.is_file():
    raise DataError(f"The offline MNIST source {path} does not exist; {how}.")
  raw = path.read_bytes()
  digest = hashlib.sha256(raw).hexdigest()
  if digest != fetch.PICKLE_SHA256:
    raise DataError(f"The offline MNIST source {path} has sha256 {digest}, not the expected "
                    f"{fetch.PICKLE_SHA256}, so it is truncated or altered; move it away and {how}.")
  try:
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:  # streamed: no 220 MB decompressed copy
      obj = NumpyOnlyUnpickler(stream, encoding="latin1").load()
  except (pickle.UnpicklingError, EOFError, OSError, ValueError, zlib.error) as e:
    raise DataError(f"The offline MNIST source {path} cannot be unpickled ({e}); move it away and {how}.") from None
  _check_pickle_layout(obj, path)
  (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = obj
  return {
      "train": (_to_uint8(np.concatenate([train_x, valid_x]), path),
                np.concatenate([train_y, valid_y]).astype(np.int32)),
      "test": (_to_uint8(test_x, path), test_y.astype(np.int32)),
  }


def _cache_path(pickle_path: pathlib.Path, split: str, kind: str) -> pathlib.Path:
  return pickle_path.with_name(f"mnist-{split}-{kind}.npy")


def _array_sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _read_npy_cache(pickle_path: pathlib.Path, split: str) -> Optional[Arrays]:
  """The cached decoded split, or None when a cache file is absent, unreadable or fails its sha256."""
  out = []
  for kind in ("images", "labels"):
    path = _cache_path(pickle_path, split, kind)
    if not path.is_file():
      return None
    try:
      a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      logging.warning("Ignoring the unreadable MNIST cache file %s (%s).", path, e)
      return None
    if _array_sha256(a) != _DECODED_SHA256[(split, kind)]:
      logging.warning("Ignoring the MNIST cache file %s: its contents fail the sha256 check.", path)
      return None
    out.append(a)
  return out[0], out[1]


def _write_npy_atomic(path: pathlib.Path, a: np.ndarray) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, a, allow_pickle=False)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _write_npy_cache(pickle_path: pathlib.Path, decoded: Dict[str, Arrays]) -> None:
  """Caches every decoded split next to the pickle; a read-only directory just means no cache."""
  try:
    for split, arrays in decoded.items():
      for kind, a in zip(("images", "labels"), arrays):
        _write_npy_atomic(_cache_path(pickle_path, split, kind), a)
  except OSError as e:
    logging.info("Not caching decoded MNIST next to %s (%s).", pickle_path, e)


def _load_offline(split: str, data_dir: Optional[PathLike]) -> Tuple[Arrays, pathlib.Path]:
  path = _offline_path(data_dir)
  cached = _read_npy_cache(path, split)
  if cached is not None:
    return cached, f"{path} (decoded cache {_cache_path(path, split, 'images').name})"
  decoded = decode_offline_pickle(path)
  for s, arrays in decoded.items():
    for kind, a in zip(("images", "labels"), arrays):
      if _array_sha256(a) != _DECODED_SHA256[(s, kind)]:  # Cannot happen for a pickle that passed its sha256.
        raise DataError(f"Decoding the offline MNIST source {path} gave unexpected {s} {kind}; this is a bug, "
                        f"please report it.")
  _write_npy_cache(path, decoded)
  return decoded[split], path


# ---------------------------------------------------------------------------------------------------------------
# 'idx': the generic IDX format.


def _read_maybe_gzip(path: pathlib.Path) -> bytes:
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    return gzip.decompress(raw)
  return raw


def write_idx(path: PathLike, array: np.ndarray) -> None:
  """Writes `array` as one IDX file (the inverse of `read_idx`), gzipped if `path` ends in '.gz'.

  For exporting canvases or labels, and for tests that need an IDX dataset (`write_idx_split`).
  """
  a = np.asarray(array)
  codes = {np.dtype(t): c for c, t in _IDX_DTYPES.items()}
  if a.dtype not in codes:
    raise ValueError(f"IDX cannot store dtype {a.dtype}; use one of {sorted(str(d) for d in codes)}.")
  data = bytes([0, 0, codes[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
  data += a.astype(a.dtype.newbyteorder(">")).tobytes()
  path = os.fspath(path)
  with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
    f.write(data)


def write_idx_split(directory: PathLike, split: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes `images [N, h, w]` and `labels [N]` as the gzipped IDX files of `split` that `load_mnist` reads."""
  os.makedirs(directory, exist_ok=True)
  prefix = _IDX_PREFIX[split]
  write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), np.asarray(images, np.uint8))
  write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), np.asarray(labels, np.uint8))


def read_idx(path: PathLike) -> np.ndarray:
  """Reads one IDX file (gzipped or plain) into a native-endian numpy array.

  The IDX format: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
  0x0E float64), the number of dimensions d, then d big-endian uint32 sizes and the big-endian data in C order.

  Args:
    path: the file; gzip is detected from its first bytes, not its name.

  Returns:
    An array of the file's shape and dtype (e.g. uint8 [N, 28, 28] for MNIST images, uint8 [N] for labels).

  Raises:
    DataError: the file is missing, not IDX, or truncated (or has trailing bytes).
  """
  path = pathlib.Path(path)
  try:
    data = _read_maybe_gzip(path)
  except FileNotFoundError:
    raise DataError(f"The IDX file {path} does not exist.") from None
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"The IDX file {path} cannot be read or decompressed ({e}); it is probably truncated, "
                    f"download it again.") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise DataError(f"The file {path} is not an IDX file (bad magic number); point the idx source at the "
                    f"IDX files of MNIST or a dataset in the same format.")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f"The IDX file {path} is truncated inside its header; download it again.")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  dtype = np.dtype(_IDX_DTYPES[data[2]]).newbyteorder(">")
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise DataError(f"The IDX file {path} holds {len(data) - header} data bytes where its header {shape} "
                    f"promises {expected}, so it is truncated or corrupt; download it again.")
  return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(directory: pathlib.Path, split: str, kind: str) -> pathlib.Path:
  ndim = 3 if kind == "images" else 1
  stem = f"{_IDX_PREFIX[split]}-{kind}"
  names = [f"{stem}-idx{ndim}-ubyte.gz", f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte"]
  for name in names:
    if (directory / name).is_file():
      return directory / name
  raise DataError(f"The idx source finds no {names[0]} (or {names[1]}) in {directory}; download the IDX files "
                  f"of MNIST (or Fashion-MNIST, KMNIST) there, or use --source=offline after `make data`.")


def _load_idx(split: str, data_dir: Optional[PathLike]) -> Tuple[Arrays, pathlib.Path]:
  if data_dir is None:
    raise ConfigError("The idx source needs data_dir (--data_dir), the directory holding the IDX files.")
  directory = pathlib.Path(data_dir).expanduser()
  images_path = _find_idx_file(directory, split, "images")
  labels_path = _find_idx_file(directory, split, "labels")
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(f"The IDX file {images_path} holds {images.dtype} {images.shape}, not uint8 images "
                    f"[N, H, W].")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"The IDX file {labels_path} holds {labels.dtype} {labels.shape}, not {images.shape[0]} "
                    f"integer labels matching {images_path}.")
  return (images, labels.astype(np.int32)), directory


# ---------------------------------------------------------------------------------------------------------------
# 'tfds': a prepared tensorflow_datasets 'mnist' (array_record), without tensorflow.


def _load_tfds(split: str, data_dir: Optional[PathLike]) -> Tuple[Arrays, str]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError("The tfds source needs tensorflow-datasets; install it with `pip install "
                    "tensorflow-datasets` or use --source=offline after `make data`.") from None
  where = str(data_dir) if data_dir is not None else "the default tfds data_dir (~/tensorflow_datasets)"
  try:
    source = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
    n = len(source)
    examples = [source[i] for i in range(n)]
  except Exception as e:  # pylint: disable=broad-except  # tfds raises many kinds; all mean "not usable here".
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"The tfds source cannot read a prepared 'mnist' {split} split in {where} ({first_line}); "
                    f"prepare it with `tfds build mnist --file_format=array_record` or use --source=offline "
                    f"after `make data`.") from None
  if n == 0:
    raise DataError(f"The tfds source's 'mnist' {split} split in {where} is empty; prepare it again with "
                    f"`tfds build mnist --file_format=array_record`.")
  images = np.stack([np.asarray(ex["image"]) for ex in examples])
  labels = np.asarray([ex["label"] for ex in examples]).astype(np.int32)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(f"The tfds source's 'mnist' in {where} gave {images.dtype} {images.shape} images, not "
                    f"uint8 [N, 28, 28].")
  return (images, labels), where


# ---------------------------------------------------------------------------------------------------------------


def load_mnist(split: str, *, source: str = "offline", data_dir: Optional[PathLike] = None,
               num_classes: Optional[int] = None) -> Arrays:
  """Loads an MNIST split.

  Args:
    split: 'train' (60,000 digits) or 'test' (10,000 digits).
    source: 'offline' (the verified pickle in the data cache), 'idx' (a directory of IDX files) or 'tfds' (a
      prepared tensorflow_datasets 'mnist'); see the module docstring.
    data_dir: where the source lives: for 'offline' the directory holding mnist.pkl.gz (default
      `$WSRAM_DATA_DIR` or ~/.cache/wsram_jax), for 'idx' the directory of IDX files (required), for 'tfds'
      the tfds data_dir (default tfds's own).
    num_classes: if given, every label must lie in 0..num_classes-1 (an IDX directory may hold other data).

  Returns:
    `(images, labels)`: uint8 `[N, 28, 28]` with values 0..255 and int32 `[N]` with values 0..9 ('idx' returns
    whatever size the files hold).

  Raises:
    ConfigError: unknown split or source, or 'idx' without data_dir.
    DataError: the source is missing, truncated or fails its integrity check, the split is empty, or a label
      lies outside 0..num_classes-1.
  """
  if split not in SPLITS:
    raise ConfigError(f"Unknown MNIST split {split!r}; use one of {', '.join(SPLITS)}.")
  if source == "offline":
    (images, labels), where = _load_offline(split, data_dir)
  elif source == "idx":
    (images, labels), where = _load_idx(split, data_dir)
  elif source == "tfds":
    (images, labels), where = _load_tfds(split, data_dir)
  else:
    raise ConfigError(f"Unknown MNIST source {source!r}; use one of {', '.join(SOURCES)}.")
  if len(labels) == 0:
    raise DataError(f"The {split} split of the {source} source at {where} holds no digits; point the source at a "
                    f"complete copy of the data.")
  if num_classes is not None:
    outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if outside.size:
      raise DataError(f"The {split} labels of the {source} source at {where} include "
                      f"{', '.join(str(int(v)) for v in outside[:5])}, outside 0..{num_classes - 1}: use data with "
                      f"{num_classes} classes, or set the number of classes to match.")
  logging.info("Loaded MNIST %s: %d digits from the %s source at %s.", split, len(labels), source, where)
  return images, labels
