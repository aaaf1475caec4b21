"""Word vocabularies and the caption array convention shared by every caption task.

A caption is stored as int32 ids ``[T + 1]``::

    <bos> w_1 ... w_L <eos> <pad> ... <pad>            (L + 2 <= T + 1)

The decoder runs T steps: step t reads ``caption[t]`` (the previous word; <bos> at t = 0) and predicts
``caption[t + 1]``; steps whose target is <pad> are masked out of every log-probability. So <eos> is predicted
(it ends the caption) and <bos> never is.

Reserved ids, the same in every vocabulary: <pad> = 0, <bos> = 1, <eos> = 2, <unk> = 3 (a word not in the
vocabulary, e.g. a Flickr8k word seen fewer than ``min_count`` times in the training captions).
"""
from __future__ import annotations

import collections
from typing import Iterable, Sequence

import numpy as np

from wsram_jax.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
RESERVED = (PAD, BOS, EOS, UNK)

__all__ = ["Vocabulary", "PAD", "BOS", "EOS", "UNK", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "RESERVED",
           "build_vocabulary"]


class Vocabulary:
  """An immutable list of words: the four reserved tokens first, then ``words`` in the given order."""

  def __init__(self, words: Iterable[str]):
    words = list(words)
    dup = [w for w, c in collections.Counter(words).items() if c > 1 or w in RESERVED]
    if dup:
      raise ConfigError(f"Vocabulary words must be unique and not reserved; got {dup[:5]}.")
    self.tokens: tuple[str, ...] = RESERVED + tuple(words)
    self._index = {w: i for i, w in enumerate(self.tokens)}

  def __len__(self) -> int:
    return len(self.tokens)

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and self.tokens == other.tokens

  def __hash__(self) -> int:
    return hash(self.tokens)

  def __repr__(self) -> str:
    return f"Vocabulary({len(self)} tokens: {' '.join(self.tokens[:12])}{' ...' if len(self) > 12 else ''})"

  def id(self, word: str) -> int:
    """The id of ``word``; <unk> for an unknown word."""
    return self._index.get(word, UNK_ID)

  def encode(self, words: Sequence[str], length: int) -> np.ndarray:
    """``[length]`` int32: <bos> words <eos> <pad>...; words beyond ``length - 2`` are cut (then no <eos>
    fits only if ``length < 2``, which is refused)."""
    if length < 2:
      raise ConfigError(f"A caption array needs length >= 2 (<bos> and <eos>), got {length}.")
    ids = [self.id(w) for w in list(words)[:length - 2]]
    out = np.full((length,), PAD_ID, np.int32)
    out[0] = BOS_ID
    out[1:1 + len(ids)] = ids
    out[1 + len(ids)] = EOS_ID
    return out

  def decode(self, ids: Sequence[int]) -> list[str]:
    """The words of an id sequence: a leading <bos> skipped, stopping at the first <eos> or <pad>."""
    words = []
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if ids and ids[0] == BOS_ID:
      ids = ids[1:]
    for i in ids:
      if i in (EOS_ID, PAD_ID):
        break
      words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
    return words


def build_vocabulary(sentences: Iterable[Sequence[str]], *, min_count: int = 1) -> Vocabulary:
  """Words seen at least ``min_count`` times, most frequent first (ties alphabetical), after the reserved ids."""
  if min_count < 1:
    raise ConfigError(f"min_count must be >= 1, got {min_count}.")
  counts = collections.Counter(w for s in sentences for w in s if w not in RESERVED)
  words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  return Vocabulary(words)
