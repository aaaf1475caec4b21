"""Translated and scaled MNIST (paper Section 5.1): each digit resized and pasted on a black square canvas.

The paper places each MNIST digit "in a 100x100 black background image at a random location and scale" and gives
no scale range. Here a digit image `[h, w]` (28x28 for MNIST, border included) is resized to a square of side `s`
pixels, `s` uniform on the integers `min_size..max_size`, and placed with its top-left corner uniform over all
positions that keep it fully inside the canvas. Each canvas pixel is the bilinear interpolation of the digit at
the pre-image of the pixel's centre under the affine map: for canvas row `i` the digit row coordinate is
`u = (i - top + 0.5) * h / s - 0.5`, weights `max(0, 1 - |u - k|)` on digit rows `k` (zero outside the digit:
identical to `jax.scipy.ndimage.map_coordinates(digit, ..., order=1, mode='constant')`). Bilinear weights are
separable, so a canvas is `R_y @ digit @ R_x^T` with `R_y [H, h]`, `R_x [W, w]`: two small matmuls of static
shape per canvas. Rows and columns of the interpolation matrices outside the pasted square are zeroed, so the
digit's mass lies exactly inside its box.

Default size range, `21..56` px on a 100x100 canvas (28 * [0.75, 2]; the paper states none): our glimpses
(experiments/configs/mnist.py) read windows of 12, 24 and 48 px. MNIST ink fills about the central 20x20 of the
28x28 image, so the ink spans about 15 px for the smallest digit (inside one 24 px glimpse, only partly in a
12 px one) and about 40 px for the largest (only the 48 px glimpse sees it whole). No single scale suits every
digit, so the scale action matters; and even the largest digit leaves 100 - 56 = 44 px of translation on each
axis, so the location matters too. Smaller digits would drop below MNIST's own resolution (blurry strokes under
bilinear downsampling); larger ones would leave little room to search.

Boxes are `(top, left, bottom, right)` int32 canvas pixels with exclusive `bottom`/`right` (NumPy slice ends):
`canvas[top:bottom, left:right]` is the pasted square, `bottom - top == right - left == s`.

Shapes: B = batch, H = W = canvas_size, h x w = digit size.
"""
import functools
from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax.errors import ConfigError

DEFAULT_CANVAS_SIZE = 100
DEFAULT_MIN_SIZE = 21  # round(0.75 * 28)
DEFAULT_MAX_SIZE = 56  # 2 * 28

_HIGHEST = jax.lax.Precision.HIGHEST


def check_sizes(canvas_size: int, min_size: int, max_size: int) -> None:
  """Raises ConfigError unless `1 <= min_size <= max_size <= canvas_size` (all Python ints)."""
  for name, v in (("canvas_size", canvas_size), ("min_size", min_size), ("max_size", max_size)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise ConfigError(f"The canvas {name} must be an integer number of pixels, got {v!r}.")
  if not 1 <= min_size <= max_size <= canvas_size:
    raise ConfigError(f"The digit sizes must satisfy 1 <= min_size <= max_size <= canvas_size, got "
                      f"min_size={min_size}, max_size={max_size}, canvas_size={canvas_size}.")


def _interpolation_matrix(start: chex.Array, side: chex.Array, out_len: int, in_len: int) -> chex.Array:
  """Bilinear weights `[out_len, in_len]` resizing `in_len` pixels to `side` pixels placed at `start`.

  Output pixel i (centre i + 0.5) maps to the input coordinate u_i = (i - start + 0.5) * in_len / side - 0.5
  (pixel centres at integers); its weight on input pixel k is max(0, 1 - |u_i - k|). Rows with i outside
  [start, start + side) are zero.
  """
  i = jnp.arange(out_len, dtype=jnp.float32)
  u = (i - start + 0.5) * (in_len / side.astype(jnp.float32)) - 0.5
  k = jnp.arange(in_len, dtype=jnp.float32)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(u[:, None] - k[None, :]))
  inside = (i >= start) & (i < start + side)
  return jnp.where(inside[:, None], weights, 0.0)


def _placement_from_bits(bits: chex.Array, canvas_size: int, min_size: int, max_size: int
                         ) -> Tuple[chex.Array, chex.Array, chex.Array]:
  """int32 scalars (side, top, left) from three uint32 words ``bits [3]``: side uniform on min_size..max_size, then
  top and left uniform on 0..canvas_size - side, each word reduced modulo its range (bias below
  canvas_size / 2**32)."""
  side = min_size + (bits[0] % jnp.uint32(max_size - min_size + 1)).astype(jnp.int32)
  room = (canvas_size - side + 1).astype(jnp.uint32)
  return side, (bits[1] % room).astype(jnp.int32), (bits[2] % room).astype(jnp.int32)


def _sample_placement(key: chex.PRNGKey, canvas_size: int, min_size: int, max_size: int
                      ) -> Tuple[chex.Array, chex.Array, chex.Array]:
  """int32 scalars (side, top, left), see `_placement_from_bits`.

  One draw of three uint32 words reduced modulo the range sizes: a third of the compile time of three `randint`
  calls, which matters in tests and on CPU.
  """
  return _placement_from_bits(jax.random.bits(key, (3,), jnp.uint32), canvas_size, min_size, max_size)


def to_float(images: chex.Array) -> chex.Array:
  """uint8 0..255 -> float32 in [0, 1]; float arrays are returned as float32 unchanged."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _place(digit: chex.Array, side: chex.Array, top: chex.Array, left: chex.Array, canvas_size: int
           ) -> Tuple[chex.Array, chex.Array]:
  """`digit [h, w]` resized to `side x side` with its top-left corner at (top, left): (canvas `[H, W, 1]`, box)."""
  rows = _interpolation_matrix(top, side, canvas_size, digit.shape[0])
  cols = _interpolation_matrix(left, side, canvas_size, digit.shape[1])
  canvas = jnp.matmul(jnp.matmul(rows, to_float(digit), precision=_HIGHEST), cols.T, precision=_HIGHEST)
  box = jnp.stack([top, left, top + side, left + side]).astype(jnp.int32)
  return jnp.clip(canvas, 0.0, 1.0)[..., None], box


def place_digit(key: chex.PRNGKey, digit: chex.Array, *, canvas_size: int = DEFAULT_CANVAS_SIZE,
                min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE
                ) -> Tuple[chex.Array, chex.Array]:
  """One digit `[h, w]` -> (canvas float32 `[H, W, 1]` in [0, 1], box int32 `[4]`); see the module docstring."""
  chex.assert_rank(digit, 2)
  side, top, left = _sample_placement(key, canvas_size, min_size, max_size)
  return _place(digit, side, top, left, canvas_size)


@functools.partial(jax.jit, static_argnames=("canvas_size", "min_size", "max_size"))
def translate_and_scale(key: chex.PRNGKey, digits: chex.Array, *, canvas_size: int = DEFAULT_CANVAS_SIZE,
                        min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE
                        ) -> Tuple[chex.Array, chex.Array]:
  """Pastes each digit at a random size and location on a black canvas (paper Section 5.1).

  Pure, deterministic in `key` and vmap-able; jitted with the sizes static (one compilation per digit shape when
  called eagerly; inlined when called inside another jit).

  Args:
    key: PRNG key, split into one key per digit.
    digits: `[B, h, w]`, uint8 0..255 or float in [0, 1].
    canvas_size: H = W of the canvas.
    min_size, max_size: the digit image is resized to `s x s`, `s` uniform on `min_size..max_size`.

  Returns:
    canvases: float32 `[B, H, W, 1]` in [0, 1].
    boxes: int32 `[B, 4]`, `(top, left, bottom, right)`, bottom/right exclusive, inside the canvas; all the
      digit's mass lies in `canvas[top:bottom, left:right]`.
  """
  chex.assert_rank(digits, 3)
  check_sizes(canvas_size, min_size, max_size)
  keys = jax.random.split(key, digits.shape[0])
  place = functools.partial(place_digit, canvas_size=canvas_size, min_size=min_size, max_size=max_size)
  return jax.vmap(place)(keys, digits)


@functools.partial(jax.jit, static_argnames=("batch_size", "canvas_size", "min_size", "max_size"))
def sample_batch(key: chex.PRNGKey, images: chex.Array, labels: chex.Array, batch_size: int, *,
                 canvas_size: int = DEFAULT_CANVAS_SIZE, min_size: int = DEFAULT_MIN_SIZE,
                 max_size: int = DEFAULT_MAX_SIZE) -> Tuple[chex.Array, chex.Array, chex.Array]:
  """A training batch: `batch_size` digits drawn uniformly (with replacement), translated and scaled.

  Meant to run inside the jitted train step with the whole training set as device arrays (60,000 x 28 x 28
  uint8 = 47 MB); `batch_size` and the sizes are static Python ints (this function is jitted with them static).

  Args:
    key: PRNG key (consumed: one draw of four uint32 words per canvas).
    images: `[N, h, w]` uint8 (or float in [0, 1]).
    labels: `[N]` integer.
    batch_size: B.
    canvas_size, min_size, max_size: as in `translate_and_scale`.

  Returns:
    canvases float32 `[B, H, W, 1]`, labels int32 `[B]`, boxes int32 `[B, 4]`.
  """
  chex.assert_rank([images, labels], [3, 1])
  check_sizes(canvas_size, min_size, max_size)
  # One PRNG call for the whole batch (on the CPU each call is a loop in the compiled step): per canvas four
  # uint32 words, the digit's index (modulo the training-set size: bias below N / 2**32) and its placement.
  bits = jax.random.bits(key, (batch_size, 4), jnp.uint32)
  index = (bits[:, 0] % jnp.uint32(images.shape[0])).astype(jnp.int32)
  side, top, left = jax.vmap(lambda b: _placement_from_bits(b, canvas_size, min_size, max_size))(bits[:, 1:])
  place = functools.partial(_place, canvas_size=canvas_size)
  canvases, boxes = jax.vmap(place)(jnp.take(images, index, axis=0), side, top, left)
  return canvases, jnp.take(labels, index, axis=0).astype(jnp.int32), boxes


@functools.partial(jax.jit, static_argnames=("canvas_size", "min_size", "max_size"))
def _fixed_chunk(base_key, index, digits, *, canvas_size, min_size, max_size):
  """Canvases of `digits[j]` with key `fold_in(base_key, index[j])`, quantised to uint8."""
  keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(index)
  place = functools.partial(place_digit, canvas_size=canvas_size, min_size=min_size, max_size=max_size)
  canvases, boxes = jax.vmap(place)(keys, digits)
  return jnp.round(canvases * 255.0).astype(jnp.uint8), boxes


def fixed_test_set(images: np.ndarray, labels: np.ndarray, *, seed: int = 0, num: Optional[int] = None,
                   chunk_size: int = 1000, canvas_size: int = DEFAULT_CANVAS_SIZE,
                   min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The evaluation canvases: the first `num` digits, each at a size and place fixed by `seed`.

  Canvas j depends only on `(seed, j, images[j])` (its key is `fold_in(key(seed), j)`), not on `num` or
  `chunk_size`, so every run, and every prefix of the set, evaluates on the same canvases. They are generated on
  the device `chunk_size` at a time (one compilation; the last chunk is padded) and stored on the host as uint8
  (`round(255 * x)`, 10 KB per 100x100 canvas, 100 MB for all 10,000 test digits instead of 400 MB of float32);
  `to_float` turns a batch back into float32 in [0, 1], within 1/510 of the float canvas. Across backends
  (CPU/GPU) a pixel can differ by one uint8 step where a float value lies at a rounding boundary.

  Args:
    images: `[N, h, w]` uint8 (or float in [0, 1]).
    labels: `[N]` integer.
    seed: fixes every size and location.
    num: how many digits, from the start; None means all N.
    chunk_size: canvases per device call.
    canvas_size, min_size, max_size: as in `translate_and_scale`.

  Returns:
    canvases uint8 `[num, H, W, 1]`, labels int32 `[num]`, boxes int32 `[num, 4]` (numpy arrays).
  """
  check_sizes(canvas_size, min_size, max_size)
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ConfigError(f"fixed_test_set needs images [N, h, w] and labels [N], got {images.shape} and "
                      f"{labels.shape}.")
  total = images.shape[0]
  num = total if num is None else num
  if not 0 <= num <= total:
    raise ConfigError(f"fixed_test_set cannot take num={num} canvases from {total} digits.")
  if chunk_size < 1:
    raise ConfigError(f"fixed_test_set needs chunk_size >= 1, got {chunk_size}.")
  chunk = min(chunk_size, max(num, 1))
  base_key = jax.random.key(seed)
  canvases = np.zeros((num, canvas_size, canvas_size, 1), np.uint8)
  boxes = np.zeros((num, 4), np.int32)
  for start in range(0, num, chunk):
    stop = min(start + chunk, num)
    index = np.arange(start, start + chunk, dtype=np.int32)
    digits = images[np.minimum(index, num - 1)]  # the last chunk repeats its last digit as padding.
    c, b = _fixed_chunk(base_key, index, digits, canvas_size=canvas_size, min_size=min_size, max_size=max_size)
    canvases[start:stop], boxes[start:stop] = np.asarray(c)[:stop - start], np.asarray(b)[:stop - start]
  return canvases, labels[:num].astype(np.int32), boxes
