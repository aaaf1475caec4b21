"""Flickr8k for users who have it: Karpathy's split file and an image folder (paper Sec. 5.2, ref. [28]).

Inputs (not downloaded by this project):

* ``dataset_flickr8k.json`` (Karpathy & Fei-Fei's split, from their "neuraltalk" release): an object with
  ``images``, a list of ``{"filename": "...jpg", "split": "train" | "val" | "test",
  "sentences": [{"tokens": ["a", "dog", ...], ...}, ...]}`` (other fields ignored). Its standard split is
  6,000 train / 1,000 val / 1,000 test images with 5 captions each; a ``"restval"`` split, if present, counts
  as training data.
* ``image_dir``: the folder holding the ``filename``s (``Flicker8k_Dataset/`` of the original archive).

`load_flickr8k` reads every image of the requested splits with PIL (a dependency of matplotlib), converts it to
RGB and resizes it to ``image_size x image_size`` (bilinear, aspect ratio not kept), as uint8; tokens are
lower-cased and, for training, cut to ``max_words`` (the BLEU references keep every word); the vocabulary is
built from the *training* captions (words seen at least ``min_count`` times; the rest map to <unk>). A missing
or malformed file raises `DataError` naming it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from wsram_jax.captioning import vocab as vocab_lib
from wsram_jax.errors import DataError

__all__ = ["Split", "Flickr8k", "read_split_file", "load_flickr8k", "SPLITS"]

PathLike = Union[str, os.PathLike]
SPLITS = ("train", "val", "test")


class Split(NamedTuple):
  """One split, every array with a leading N (images).

  Attributes:
    images: ``[N, S, S, 3]`` uint8.
    captions: ``[N, R, T + 1]`` int32 ids (`vocab.py` convention), R = the most captions of any image;
      rows beyond an image's ``num_refs`` are all <pad>.
    num_refs: ``[N]`` int32, captions per image (>= 1).
    references: per image, its tokenised captions (lower-cased, whole: not cut), the BLEU references.
    filenames: per image, its file name.
  """
  images: np.ndarray
  captions: np.ndarray
  num_refs: np.ndarray
  references: list
  filenames: list


class Flickr8k(NamedTuple):
  vocab: vocab_lib.Vocabulary
  splits: dict


def read_split_file(json_path: PathLike) -> list[dict]:
  """The ``images`` entries of a Karpathy split file, checked: each has a filename, a split and >= 1 sentence
  with a token list."""
  path = pathlib.Path(json_path)
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise DataError(f"The Flickr8k split file {path} does not exist; set --config.data.flickr8k_json to "
                    "Karpathy's dataset_flickr8k.json.") from None
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"Cannot read the Flickr8k split file {path} as JSON ({e}).") from None
  images = obj.get("images") if isinstance(obj, dict) else None
  if not isinstance(images, list) or not images:
    raise DataError(f"{path} has no 'images' list; expected Karpathy's dataset_flickr8k.json format.")
  for i, im in enumerate(images):
    ok = (isinstance(im, dict) and isinstance(im.get("filename"), str) and isinstance(im.get("split"), str)
          and isinstance(im.get("sentences"), list) and im["sentences"]
          and all(isinstance(s, dict) and isinstance(s.get("tokens"), list) for s in im["sentences"]))
    if not ok:
      raise DataError(f"{path}: images[{i}] lacks a filename, a split or sentences with tokens.")
  return images


def _load_image(path: pathlib.Path, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top  (PIL comes with matplotlib)
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((size, size), Image.BILINEAR)
      return np.asarray(im, np.uint8)
  except FileNotFoundError:
    raise DataError(f"The Flickr8k image {path} does not exist; set --config.data.flickr8k_images to the "
                    "folder of the split file's filenames.") from None
  except OSError as e:
    raise DataError(f"Cannot read the Flickr8k image {path} ({e}).") from None


def _split_of(entry: dict) -> str:
  return "train" if entry["split"] == "restval" else entry["split"]


def load_flickr8k(json_path: PathLike, image_dir: PathLike, *, image_size: int = 128, max_words: int = 16,
                  min_count: int = 5, splits: Sequence[str] = SPLITS,
                  vocab: Optional[vocab_lib.Vocabulary] = None) -> Flickr8k:
  """Loads the requested splits (see the module docstring).

  Args:
    json_path: the Karpathy split file.
    image_dir: the image folder.
    image_size: S, the side images are resized to.
    max_words: captions are cut to this many words (T = max_words + 1 decoder steps, for <eos>).
    min_count: a training word needs this many occurrences to enter the vocabulary.
    splits: which splits to load (each must have at least one image).
    vocab: a given vocabulary instead of one built from the training captions.

  Returns:
    `Flickr8k(vocab, {split: Split})`.
  """
  entries = read_split_file(json_path)
  image_dir = pathlib.Path(image_dir)
  if not image_dir.is_dir():
    raise DataError(f"The Flickr8k image folder {image_dir} does not exist; set --config.data.flickr8k_images.")

  def tokens(s, cut=True):
    words = [str(t).lower() for t in s["tokens"]]
    return words[:max_words] if cut else words

  if vocab is None:
    train_sentences = [tokens(s) for e in entries if _split_of(e) == "train" for s in e["sentences"]]
    if not train_sentences:
      raise DataError(f"{json_path} has no training images to build the vocabulary from.")
    vocab = vocab_lib.build_vocabulary(train_sentences, min_count=min_count)
  length = max_words + 2
  out = {}
  for split in splits:
    chosen = [e for e in entries if _split_of(e) == split]
    if not chosen:
      raise DataError(f"{json_path} has no images in the {split!r} split.")
    refs = [[tokens(s, cut=False) for s in e["sentences"]] for e in chosen]
    r = max(len(x) for x in refs)
    captions = np.zeros((len(chosen), r, length), np.int32)
    for i, rs in enumerate(refs):
      for j, words in enumerate(rs):
        captions[i, j] = vocab.encode(words, length)  # cut to max_words
    images = np.stack([_load_image(image_dir / e["filename"], image_size) for e in chosen])
    out[split] = Split(images=images, captions=captions, num_refs=np.array([len(x) for x in refs], np.int32),
                       references=refs, filenames=[e["filename"] for e in chosen])
  return Flickr8k(vocab=vocab, splits=out)
