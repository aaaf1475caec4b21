r"""An offline caption task that needs scale: MNIST digits of two sizes on one canvas, described in words.

Each example is a black square canvas (``canvas_size``, default 64 px) holding ``num_digits`` (2 or 3) MNIST
digits, each independently *small* (side uniform on ``small_min..small_max``, default 12..16 px) or *large*
(``large_min..large_max``, default 24..30 px), placed by `wsram_jax.data.canvas.place_digit` (uniform position,
bilinear resize; the box is a function of the key alone). Up to ``num_candidates`` layouts (one key per digit
each) are drawn and the first whose boxes pairwise keep a gap of at least ``margin`` px is used; if none does
(none of the first 5,000 test examples with the defaults; `Example.overlap` flags it) the last one is used
anyway, and the canvas takes the pixelwise maximum where boxes overlap.

Caption grammar (every caption a deterministic function of the boxes and labels)::

    caption  := np ( rel np ){num_digits - 1}
    np       := "a" size digit
    size     := "small" | "large"
    digit    := "0" | "1" | ... | "9"
    rel      := "left of" | "above" | "below"

The digits are described from left to right (ascending box-centre column, ties by placement order). Between
consecutive digits A (described first) and B, with centre offsets dx = x_B - x_A >= 0 and dy = y_B - y_A
(rows grow downwards): "left of" if dx >= |dy|, else "above" if dy > 0 (A is higher), else "below". Examples:
"a small 3 left of a large 7", "a large 0 above a small 5 left of a small 9".

Vocabulary (`VOCAB`, 21 tokens): the reserved <pad> <bos> <eos> <unk> (ids 0-3, `vocab.py`), then
``a small large left of above below 0 1 2 3 4 5 6 7 8 9``. A caption has at most 5 * num_digits - 1 words, so
the arrays are ``[T + 1]`` with T = 5 * num_digits decoder steps (`caption_length`).

Why it needs scale and location: the identity of a small digit is legible only at a fine pyramid level, a
large one fits a coarse cell; the order of the noun phrases and the relation need where each digit is.

Training batches are drawn inside the jitted step (`sample_batch`, digits from the MNIST training split);
the test split (`fixed_test_set`) is example j = `make_example(fold_in(key(seed), j), ...)` on the MNIST
*test* digits, a function of the seed alone (independent of how many are taken), stored as uint8.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax.captioning import vocab as vocab_lib
from wsram_jax.data import canvas as canvas_lib
from wsram_jax.errors import ConfigError

__all__ = ["WORDS", "VOCAB", "TaskSpec", "Example", "caption_length", "make_example", "sample_batch",
           "fixed_test_set", "describe"]

DIGIT_WORDS = tuple(str(d) for d in range(10))
WORDS = ("a", "small", "large", "left", "of", "above", "below") + DIGIT_WORDS
VOCAB = vocab_lib.Vocabulary(WORDS)

_ID = {w: VOCAB.id(w) for w in WORDS}
_TINY = jnp.zeros((1, 1), jnp.float32)  # place_digit's box depends on the key only: a 1x1 "digit" is free.


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """The static sizes of the caption task (see the module docstring); hashable, so jit-static."""
  canvas_size: int = 64
  num_digits: int = 2
  small_min: int = 12
  small_max: int = 16
  large_min: int = 24
  large_max: int = 30
  num_candidates: int = 64
  margin: int = 1

  def check(self) -> None:
    """Raises `ConfigError` (one sentence) for sizes that cannot work."""
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ConfigError(f"The caption task's {f.name} must be an integer, got {v!r}.")
    if self.num_digits not in (2, 3):
      raise ConfigError(f"The caption task places 2 or 3 digits, got num_digits={self.num_digits}.")
    canvas_lib.check_sizes(self.canvas_size, self.small_min, self.small_max)
    canvas_lib.check_sizes(self.canvas_size, self.large_min, self.large_max)
    if self.small_max >= self.large_min:
      raise ConfigError(f"'small' and 'large' must not overlap: small_max ({self.small_max}) must be below "
                        f"large_min ({self.large_min}).")
    if self.num_candidates < 1 or self.margin < 0:
      raise ConfigError("The caption task needs num_candidates >= 1 and margin >= 0.")

  @property
  def caption_length(self) -> int:
    return caption_length(self.num_digits)


def caption_length(num_digits: int) -> int:
  """T, the decoder steps: the longest caption's words (5 num_digits - 1) plus <eos>."""
  return 5 * num_digits


class Example(NamedTuple):
  """One canvas (or a batch: a leading B on every field).

  Attributes:
    canvas: ``[H, W, 1]`` float32 in [0, 1] (uint8 in `fixed_test_set`).
    caption: ``[T + 1]`` int32 ids (`vocab.py` convention).
    boxes: ``[n, 4]`` int32 ``(top, left, bottom, right)``, bottom/right exclusive, in placement order.
    digits: ``[n]`` int32 digit classes, in placement order.
    large: ``[n]`` bool, in placement order.
    overlap: ``[]`` bool, whether some digit had to overlap another.
  """
  canvas: chex.Array
  caption: chex.Array
  boxes: chex.Array
  digits: chex.Array
  large: chex.Array
  overlap: chex.Array


def _apart(a: chex.Array, b: chex.Array, margin: int) -> chex.Array:
  """Whether boxes a, b ``[..., 4]`` leave a gap of at least ``margin`` px on some axis."""
  return ((a[..., 2] + margin <= b[..., 0]) | (b[..., 2] + margin <= a[..., 0]) |
          (a[..., 3] + margin <= b[..., 1]) | (b[..., 3] + margin <= a[..., 1]))


def _caption_ids(boxes: chex.Array, digits: chex.Array, large: chex.Array, num_digits: int) -> chex.Array:
  """The grammar of the module docstring as ids ``[T + 1]`` (jit-able)."""
  cy = (boxes[:, 0] + boxes[:, 2]).astype(jnp.float32) / 2
  cx = (boxes[:, 1] + boxes[:, 3]).astype(jnp.float32) / 2
  order = jnp.argsort(cx, stable=True)
  cy, cx, digits, large = cy[order], cx[order], digits[order], large[order]
  pad = vocab_lib.PAD_ID
  slots = []
  for j in range(num_digits):
    if j > 0:
      dx, dy = cx[j] - cx[j - 1], cy[j] - cy[j - 1]
      horizontal = dx >= jnp.abs(dy)
      first = jnp.where(horizontal, _ID["left"], jnp.where(dy > 0, _ID["above"], _ID["below"]))
      slots += [first, jnp.where(horizontal, _ID["of"], pad)]
    slots += [jnp.asarray(_ID["a"]), jnp.where(large[j], _ID["large"], _ID["small"]),
              _ID["0"] + digits[j]]
  slots = jnp.stack([jnp.asarray(s, jnp.int32) for s in slots])  # [5n - 2], with holes
  words = slots[jnp.argsort(slots == pad, stable=True)]  # holes to the end, word order kept
  count = jnp.sum(slots != pad)
  t = caption_length(num_digits)
  caption = jnp.full((t + 1,), pad, jnp.int32).at[0].set(vocab_lib.BOS_ID).at[1:1 + words.shape[0]].set(words)
  return caption.at[1 + count].set(vocab_lib.EOS_ID)


def make_example(key: chex.PRNGKey, images: chex.Array, labels: chex.Array, spec: TaskSpec) -> Example:
  """One canvas and its caption, digits drawn uniformly from ``images [N, h, w]`` / ``labels [N]`` (jit-able;
  ``spec`` static)."""
  n, c = spec.num_digits, spec.canvas_size
  k_index, k_size, k_place = jax.random.split(key, 3)
  index = jax.random.randint(k_index, (n,), 0, images.shape[0])
  large = jax.random.bernoulli(k_size, 0.5, (n,))
  small_kw = dict(canvas_size=c, min_size=spec.small_min, max_size=spec.small_max)
  large_kw = dict(canvas_size=c, min_size=spec.large_min, max_size=spec.large_max)
  # K candidate layouts (all n boxes each, from the key alone); the first whose boxes are pairwise apart wins.
  layout_keys = jax.random.split(k_place, (spec.num_candidates, n))
  box_of = lambda kw: jax.vmap(jax.vmap(lambda k: canvas_lib.place_digit(k, _TINY, **kw)[1]))(layout_keys)
  cand = jnp.where(large[None, :, None], box_of(large_kw), box_of(small_kw))  # [K, n, 4]
  ok = jnp.ones((spec.num_candidates,), bool)
  for i in range(n):
    for j in range(i):
      ok &= _apart(cand[:, i], cand[:, j], spec.margin)
  choice = jnp.where(jnp.any(ok), jnp.argmax(ok), spec.num_candidates - 1)
  overlap = ~jnp.any(ok)
  canvas = jnp.zeros((c, c, 1), jnp.float32)
  boxes = []
  for j in range(n):
    digit = canvas_lib.to_float(images[index[j]])
    img_small, b_small = canvas_lib.place_digit(layout_keys[choice, j], digit, **small_kw)
    img_large, b_large = canvas_lib.place_digit(layout_keys[choice, j], digit, **large_kw)
    canvas = jnp.maximum(canvas, jnp.where(large[j], img_large, img_small))
    boxes.append(jnp.where(large[j], b_large, b_small))
  boxes = jnp.stack(boxes)
  digits = jnp.take(labels, index).astype(jnp.int32)
  return Example(canvas=canvas, caption=_caption_ids(boxes, digits, large, n), boxes=boxes, digits=digits,
                 large=large, overlap=overlap)


@functools.partial(jax.jit, static_argnames=("batch_size", "spec"))
def sample_batch(key: chex.PRNGKey, images: chex.Array, labels: chex.Array, batch_size: int,
                 spec: TaskSpec) -> Example:
  """A training batch of ``batch_size`` examples (fields with a leading B); call inside the jitted step."""
  keys = jax.random.split(key, batch_size)
  return jax.vmap(lambda k: make_example(k, images, labels, spec))(keys)


@functools.partial(jax.jit, static_argnames=("spec",))
def _fixed_chunk(base_key, index, images, labels, spec):
  keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(index)
  ex = jax.vmap(lambda k: make_example(k, images, labels, spec))(keys)
  return ex._replace(canvas=jnp.round(ex.canvas * 255.0).astype(jnp.uint8))


def fixed_test_set(images: np.ndarray, labels: np.ndarray, spec: TaskSpec, *, seed: int = 0, num: int = 1000,
                   chunk_size: int = 500) -> Example:
  """The evaluation split: example j is `make_example(fold_in(key(seed), j), images, labels)`.

  A function of (seed, j, the digit set) only, so every run and every prefix sees the same examples. Canvases
  come back as uint8 (``round(255 x)``); every field is a numpy array with a leading ``num``.
  """
  spec.check()
  if num < 1 or chunk_size < 1:
    raise ConfigError(f"fixed_test_set needs num >= 1 and chunk_size >= 1, got {num} and {chunk_size}.")
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  base_key = jax.random.key(seed)
  chunk = min(chunk_size, num)
  parts = []
  for start in range(0, num, chunk):
    index = jnp.arange(start, start + chunk, dtype=jnp.int32)
    parts.append(jax.device_get(_fixed_chunk(base_key, index, images, labels, spec)))
  return Example(*(np.concatenate(f, axis=0)[:num] for f in zip(*parts)))


def describe(caption_ids) -> str:
  """The caption's words joined by spaces."""
  return " ".join(VOCAB.decode(caption_ids))
