"""A trained attention classifier as one file: its parameters, its config and the metrics it reached.

    trained = pretrained.load("models/wsram_q_cv.npz")   # or pretrained.load() for the shipped model
    trained.params, trained.model, trained.config, trained.metrics, trained.num_glimpses, trained.num_samples
    canvases, labels, boxes = trained.test_set(64)        # the fixed test canvases it was evaluated on

The repository ships one model, `DEFAULT_PATH` (``models/wsram_q_cv.npz``): the default WS-RAM+q+c
(`experiments/configs/mnist.py:wsram_q_cv`, Eqns 16-19) after its training run. It is written from a training
workdir by

    python -m experiments.export_model --workdir=WORKDIR --run=R --out=models/wsram_q_cv.npz

(run R of a several-run job; `experiments/export_model.py`), which restores the newest checkpoint, keeps the
parameters only (no optimiser state), records the metrics the run logged at that step and measures the test
error and the Eqn 9 bound on the first `NUM_CHECK_CANVASES` fixed test canvases (`evaluate`).

File format (``FORMAT``): a compressed NumPy archive (``np.savez_compressed``, read with ``allow_pickle=False``)
holding one float32 array ``params/<path>`` per parameter of `AttentionModel` (``params/core1/kernel``, ...) and
``metadata``, the UTF-8 bytes (uint8) of a JSON object:

    format       FORMAT
    config       the run's training config (the single-run config of run R: its seed and swept values set)
    canvas       canvas_size, min_size, max_size of its canvases (`data.canvas`; the generator's defaults resolved)
    metrics      "training": what the run logged at the exported step (``eval/error_sampled``, ...);
                 "test_check": `evaluate` at export on the first 2,000 fixed test canvases (``num_canvases``)
    source       workdir, run, seed, step, the training and export commands
    sha256       "params": `params_sha256` of the parameters; "metadata": of the canonical JSON of the above

`load` checks the file before handing anything out: the archive (a truncated or corrupt file), the format, the
metadata's hash, the config keys it needs (the ``model`` block must be exactly `AttentionModel`'s fields), the
parameter names and shapes against those the config's model initialises, and the parameters' hash. A file that
fails any of these is refused with `errors.ModelFileError`, one sentence naming the file and what is wrong.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import zipfile
import zlib
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wsram_jax.classifier import model as model_lib
from wsram_jax.classifier import train
from wsram_jax.data import canvas as canvas_lib
from wsram_jax.data import mnist
from wsram_jax.errors import ModelFileError

__all__ = ["FORMAT", "DEFAULT_PATH", "NUM_CHECK_CANVASES", "TrainedModel", "load", "save", "params_sha256",
           "evaluate", "test_set"]

PathLike = Union[str, os.PathLike]

FORMAT = "wsram_jax.classifier.pretrained/1"
# The shipped model, in the repository's models/ directory (next to the package in a clone or editable install).
DEFAULT_PATH = pathlib.Path(__file__).resolve().parents[2] / "models" / "wsram_q_cv.npz"
# The test canvases `evaluate` measures at export and tests/test_pretrained.py measures again.
NUM_CHECK_CANVASES = 2000
EXPORT_COMMAND = "python -m experiments.export_model --workdir=WORKDIR --run=R --out=PATH"

_PARAMS = "params/"
_METADATA = "metadata"
# The config keys `load` and the notebooks read (beyond the `model` block, checked field by field).
_REQUIRED = ("num_glimpses", "num_samples", "method", "proposal", "data.test_seed", "data.source")
_CANVAS_KEYS = ("canvas_size", "min_size", "max_size")


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A checked model file (`load`).

  Attributes:
    params: the ``'params'`` collection of `model` (nested dict of float32 jax arrays).
    model: `AttentionModel(**config.model)`.
    config: the run's training config (an ``ml_collections.ConfigDict``; `objectives.ObjectiveConfig.from_config`
      reads its method).
    canvas: ``{'canvas_size', 'min_size', 'max_size'}`` of its canvases (keyword arguments of `data.canvas`).
    metrics: ``{'training': {...}, 'test_check': {...}}`` (module docstring).
    source: where it was exported from (workdir, run, seed, step, commands).
    sha256: `params_sha256(params)`.
    path: the file it was loaded from.
  """
  params: Any
  model: model_lib.AttentionModel
  config: Any
  canvas: dict
  metrics: dict
  source: dict
  sha256: str
  path: str

  @property
  def num_glimpses(self) -> int:
    return int(self.config.num_glimpses)

  @property
  def num_samples(self) -> int:
    """M of its training (and of ``eval/error_sampled``)."""
    return int(self.config.num_samples)

  def test_set(self, num: int, *, data_dir: Optional[PathLike] = None):
    """The first `num` fixed test canvases of its config (`test_set`; ``data_dir`` defaults to the config's)."""
    return test_set(self.config, self.canvas, num, data_dir=data_dir or self.config.data.get("data_dir") or None)


def params_sha256(params) -> str:
  """sha256 over the parameters in sorted path order: for each, ``"<path>:<dtype>:<shape>\\n"`` and its
  C-order bytes."""
  h = hashlib.sha256()
  for name, x in sorted(traverse_util.flatten_dict(params, sep="/").items()):
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f"{name}:{x.dtype.str}:{x.shape}\n".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def _canonical(obj) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _config_dict(config) -> dict:
  to_dict = getattr(config, "to_dict", None)
  return json.loads(json.dumps(to_dict() if to_dict else dict(config)))  # tuples -> lists, plain types


def save(path: PathLike, params, config, *, canvas: dict, metrics: dict, source: dict) -> pathlib.Path:
  """Writes a model file (module docstring) atomically and returns its path; `load` it to check it.

  Args:
    path: the ``.npz`` to write (its directory is created).
    params: the ``'params'`` collection (no optimiser state).
    config: the run's single-run config (ConfigDict or dict).
    canvas: ``{'canvas_size', 'min_size', 'max_size'}``, ints.
    metrics: JSON-able ``{'training': {...}, 'test_check': {...}}``.
    source: JSON-able provenance.
  """
  path = pathlib.Path(path)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  body = {"format": FORMAT, "config": _config_dict(config), "canvas": {k: int(canvas[k]) for k in _CANVAS_KEYS},
          "metrics": metrics, "source": source}
  body = json.loads(_canonical(body))
  body["sha256"] = {"params": params_sha256(params), "metadata": hashlib.sha256(_canonical(body)).hexdigest()}
  arrays = {_PARAMS + name: x for name, x in traverse_util.flatten_dict(params, sep="/").items()}
  arrays[_METADATA] = np.frombuffer(json.dumps(body, sort_keys=True, indent=1).encode(), np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(tmp, path)
  return path


def _refuse(path, why: str):
  return ModelFileError(f"{path} is not a usable model file: {why}; regenerate it with `{EXPORT_COMMAND}`.")


def _read(path) -> tuple[dict, dict]:
  """(metadata, flat params) of the archive; ModelFileError when it cannot be read."""
  try:
    raw = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise ModelFileError(f"Cannot read the model file {path} ({e.strerror or e}); the shipped one is "
                         f"{DEFAULT_PATH.name} in the repository's models/ directory.") from None
  if not raw.startswith(b"PK\x03\x04"):
    raise _refuse(path, "it is not a NumPy .npz archive (a zip file)")
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
      names = list(archive.files)
      if _METADATA not in names:
        raise _refuse(path, "it is a NumPy archive without the model's metadata")
      arrays = {name: archive[name] for name in names}  # reads (and CRC-checks) every member now
  except ModelFileError:
    raise
  except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, KeyError) as e:
    raise _refuse(path, f"it cannot be read as a NumPy archive, truncated or corrupt ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
  meta = arrays.pop(_METADATA)
  try:
    if meta.dtype != np.uint8 or meta.ndim != 1:
      raise ValueError(f"metadata of dtype {meta.dtype} and shape {meta.shape}")
    metadata = json.loads(meta.tobytes().decode("utf-8"))
    if not isinstance(metadata, dict):
      raise ValueError("the metadata is not a JSON object")
  except (ValueError, UnicodeDecodeError) as e:
    raise _refuse(path, f"its metadata is not a JSON object ({e})") from None
  unexpected = sorted(n for n in arrays if not n.startswith(_PARAMS))
  if unexpected:
    raise _refuse(path, f"it holds arrays that are not parameters: {', '.join(unexpected[:3])}")
  return metadata, {name[len(_PARAMS):]: a for name, a in arrays.items()}


def _get(config: dict, dotted: str):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def _check_config(path, metadata: dict) -> model_lib.AttentionModel:
  config, canvas = metadata.get("config"), metadata.get("canvas")
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise _refuse(path, "its metadata has no config with a model block")
  missing = [k for k in _REQUIRED if _get_or_none(config, k) is None]
  if missing:
    raise _refuse(path, f"its config lacks {', '.join(missing)}")
  fields = {f.name for f in dataclasses.fields(model_lib.AttentionModel)} - {"parent", "name"}
  block = config["model"]
  unknown, absent = sorted(set(block) - fields), sorted(fields - set(block))
  if unknown or absent:
    parts = ([f"unknown keys {', '.join(unknown)}"] if unknown else []) + (
        [f"no {', '.join(absent)}"] if absent else [])
    raise _refuse(path, f"its config's model block is not that of this AttentionModel ({'; '.join(parts)})")
  if not isinstance(canvas, dict) or any(not isinstance(canvas.get(k), int) for k in _CANVAS_KEYS):
    raise _refuse(path, f"its metadata has no canvas sizes ({', '.join(_CANVAS_KEYS)})")
  for key in ("num_glimpses", "num_samples"):
    if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
      raise _refuse(path, f"its config's {key} is {config[key]!r}, not a positive integer")
  try:
    return model_lib.AttentionModel(**block)
  except (TypeError, ValueError) as e:
    raise _refuse(path, f"its config's model block does not build an AttentionModel ({e})") from None


def _get_or_none(config: dict, dotted: str):
  try:
    return _get(config, dotted)
  except KeyError:
    return None


def _expected_shapes(model: model_lib.AttentionModel) -> dict[str, tuple]:
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, model), jax.random.PRNGKey(0))
  return {name: tuple(s.shape) for name, s in traverse_util.flatten_dict(shapes, sep="/").items()}


def load(path: PathLike = DEFAULT_PATH, *, sha256: Optional[str] = None) -> TrainedModel:
  """Reads and checks a model file (module docstring): the shipped one by default.

  Args:
    path: the ``.npz`` written by `save` (`experiments/export_model.py`).
    sha256: if given, the parameters' `params_sha256` must equal it (to pin one particular model).

  Returns:
    A `TrainedModel`.

  Raises:
    ModelFileError: one sentence: the file is missing, truncated or corrupt, of another format, its config lacks
      a key or its model block is not `AttentionModel`'s, a parameter is missing, extra or of another shape than
      the config's model has, or a hash does not match.
  """
  metadata, flat = _read(path)
  if metadata.get("format") != FORMAT:
    raise _refuse(path, f"its format is {metadata.get('format')!r}, not {FORMAT!r}")
  recorded = metadata.get("sha256")
  if not isinstance(recorded, dict):
    raise _refuse(path, "its metadata records no sha256")
  body = {k: v for k, v in metadata.items() if k != "sha256"}
  try:
    metadata_ok = hashlib.sha256(_canonical(body)).hexdigest() == recorded.get("metadata")
  except ValueError:
    metadata_ok = False
  if not metadata_ok:
    raise _refuse(path, "its metadata (config, metrics or source) does not match its recorded sha256")
  model = _check_config(path, metadata)
  expected = _expected_shapes(model)
  missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or extra:
    parts = ([f"lacks {', '.join(missing[:3])}"] if missing else []) + (
        [f"has unknown {', '.join(extra[:3])}"] if extra else [])
    raise _refuse(path, f"its parameters are not those of its config's model (it {' and '.join(parts)})")
  for name, shape in sorted(expected.items()):
    if flat[name].shape != shape or flat[name].dtype != np.float32:
      raise _refuse(path, f"parameter {name} is {flat[name].dtype} {flat[name].shape}, but its config's model "
                          f"has float32 {shape}")
  params = traverse_util.unflatten_dict(flat, sep="/")
  digest = params_sha256(params)
  if digest != recorded.get("params"):
    raise _refuse(path, "its parameters do not match their recorded sha256")
  if sha256 is not None and digest != sha256:
    raise ModelFileError(f"{path} holds another model than the one asked for: its parameters' sha256 is "
                         f"{digest[:12]}..., not {sha256[:12]}....")
  import ml_collections  # pylint: disable=g-import-not-at-top
  return TrainedModel(params=jax.tree_util.tree_map(jnp.asarray, params), model=model,
                      config=ml_collections.ConfigDict(metadata["config"]), canvas=dict(metadata["canvas"]),
                      metrics=metadata.get("metrics", {}), source=metadata.get("source", {}), sha256=digest,
                      path=str(path))


def test_set(config, canvas: dict, num: int, *, data_dir: Optional[PathLike] = None):
  """The first `num` fixed test canvases of `config` (`data.canvas.fixed_test_set` with seed
  ``config.data.test_seed`` on the MNIST test digits of ``config.data.source``), or all of them when the source
  holds fewer digits: uint8 ``[E, H, W, 1]``, labels int32 ``[E]``, boxes int32 ``[E, 4]``, ``E = min(num,
  digits)``. Raises `errors.DataError` when MNIST is missing (`make data`).
  """
  source = config.data.source
  images, labels = mnist.load_mnist("test", source=source, data_dir=data_dir,
                                    num_classes=int(config.model.num_classes))
  return canvas_lib.fixed_test_set(images, labels, seed=int(config.data.test_seed), num=min(num, len(labels)),
                                   **{k: int(canvas[k]) for k in _CANVAS_KEYS})


def evaluate(model: TrainedModel, canvases, labels, boxes) -> dict[str, float]:
  """The training run's evaluation on these canvases: `classifier.train.make_task_evaluator`, the function the
  trainer evaluates with (its batches of ``config.data.eval_batch_size`` and keys), so on a prefix of the fixed
  test set the numbers are those the trainer computes on it. Among them:

  * ``error_greedy``: one trajectory of the prior's most probable actions, classified after the last glimpse;
  * ``error_sampled``: M = ``num_samples`` trajectories from the prior, the class of highest mean probability;
  * ``log_p_y``: the mean Eqn 9 bound with the prior as proposal (M samples), a lower bound on log p(y | I);
  * where the greedy glimpses go (``on_digit/g1``, ...; measured against `boxes`), glimpse ablations.

  Args:
    model: a `TrainedModel`.
    canvases: uint8 ``[E, H, W, 1]``.
    labels: ``[E]`` int.
    boxes: ``[E, 4]`` int, the digits' boxes (`test_set`'s third array).

  Returns:
    The evaluator's metrics without their ``eval/`` prefix, and ``num_canvases``.
  """
  test = train.Data(None, None, np.asarray(canvases), np.asarray(labels, np.int32), np.asarray(boxes, np.int32))
  out = train.make_task_evaluator(model.config, model.model, test)(model.params, {})
  return {**{k.removeprefix("eval/"): v for k, v in out.items()}, "num_canvases": int(canvases.shape[0])}
