"""Image encoders for the captioner, and pretrained encoder weights from a file.

The encoder is pluggable: `CaptionModel(encoder=...)` takes any flax module mapping an image ``[H, W, C]`` to
a tuple of S feature maps ``[h_s, w_s, C_s]``, finest first (the model projects each to ``feature_dim``). By
default it is `model.ConvPyramid`, trained with the rest of the model from random initialisation.

Pretrained weights file format (`save_encoder_params` writes it, `load_encoder_params` reads it): a NumPy
``.npz`` archive with one array per parameter of the encoder, keyed by its path inside the encoder's parameter
tree joined with ``/`` -- for `ConvPyramid` ``conv_0/kernel`` ``[3, 3, C_in, C_0]`` (HWIO, flax's layout),
``conv_0/bias`` ``[C_0]``, ``conv_1/kernel``, ... . Every key of the model's encoder must be present with the
same shape; arrays are cast to float32; extra keys are refused (a sign of a different architecture). Weights
from another framework convert by transposing to these layouts (e.g. a PyTorch conv weight ``[O, I, kh, kw]``
is ``w.transpose(2, 3, 1, 0)``). With ``--config.model.freeze_encoder`` the loaded weights stay fixed.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Union

import flax
import jax
import numpy as np

from wsram_jax.captioning import model as model_lib
from wsram_jax.errors import DataError

__all__ = ["save_encoder_params", "load_encoder_params", "replace_encoder"]

PathLike = Union[str, os.PathLike]


def _flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def save_encoder_params(path: PathLike, params: dict[str, Any]) -> pathlib.Path:
  """Writes ``params[ENCODER_KEY]`` (or an encoder tree itself, if ``params`` has no such key) as an .npz."""
  tree = params.get(model_lib.ENCODER_KEY, params)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **_flat(jax.device_get(tree)))
  return path


def load_encoder_params(path: PathLike, template: dict[str, Any]) -> dict[str, Any]:
  """Reads an encoder .npz (format in the module docstring) into the structure of ``template`` (the model's
  encoder parameters); `DataError` naming the file and the first problem otherwise."""
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise DataError(f"The encoder weights file {path} does not exist.") from None
  except (OSError, ValueError) as e:
    raise DataError(f"Cannot read the encoder weights {path} as an .npz archive ({e}).") from None
  want = _flat(template)
  missing = sorted(set(want) - set(arrays))
  extra = sorted(set(arrays) - set(want))
  if missing or extra:
    raise DataError(f"The encoder weights {path} do not match the model's encoder (missing: {missing[:4]}, "
                    f"unexpected: {extra[:4]}).")
  for k, v in want.items():
    if arrays[k].shape != v.shape:
      raise DataError(f"The encoder weights {path} give {k} the shape {arrays[k].shape}; the model's encoder "
                      f"needs {v.shape}.")
  flat = {tuple(k.split("/")): np.asarray(arrays[k], np.float32) for k in want}
  return flax.traverse_util.unflatten_dict(flat)


def replace_encoder(params: dict[str, Any], path: PathLike) -> dict[str, Any]:
  """``params`` with its encoder parameters loaded from ``path``."""
  params = dict(flax.core.unfreeze(params))
  params[model_lib.ENCODER_KEY] = jax.tree_util.tree_map(
      jax.numpy.asarray, load_encoder_params(path, params[model_lib.ENCODER_KEY]))
  return params
