"""Translated-scaled canvases (wsram_jax.data.canvas)."""
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsram_jax.data import canvas
from wsram_jax.errors import ConfigError

CANVAS = canvas.DEFAULT_CANVAS_SIZE


def blob_digits(n, size=28, seed=0):
  """uint8 [n, size, size]: smooth random blobs, some touching the image border (the worst case for boxes)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  out = []
  for _ in range(n):
    cy, cx = rng.uniform(0, size - 1, 2)
    r = rng.uniform(3, 9)
    out.append(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
  out = np.stack(out).round().astype(np.uint8)
  out[0, :, 0] = 255  # ink on the border
  return out


@jax.jit
def _map_coordinates_resize(digit, top, left, side):
  i = jnp.arange(CANVAS, dtype=jnp.float32)
  u = (i - top + 0.5) * digit.shape[0] / side - 0.5
  v = (i - left + 0.5) * digit.shape[1] / side - 0.5
  uu, vv = jnp.meshgrid(u, v, indexing="ij")
  return jax.scipy.ndimage.map_coordinates(digit.astype(jnp.float32) / 255, [uu, vv], order=1, mode="constant",
                                           cval=0.0)


def reference_canvas(digit, box):
  """The same resampling via jax.scipy.ndimage.map_coordinates (bilinear, zeros outside), masked to the box."""
  top, left, bottom, right = (int(v) for v in box)
  out = np.asarray(_map_coordinates_resize(jnp.asarray(digit), top, left, float(bottom - top)))
  mask = np.zeros((CANVAS, CANVAS), bool)
  mask[top:bottom, left:right] = True
  return np.where(mask, out, 0.0)


class TranslateAndScaleTest(parameterized.TestCase):

  def test_shapes_ranges_boxes_and_mass(self):
    digits = blob_digits(8)
    canvases, boxes = canvas.translate_and_scale(jax.random.key(0), digits)
    chex.assert_shape(canvases, (8, CANVAS, CANVAS, 1))
    chex.assert_shape(boxes, (8, 4))
    chex.assert_type([canvases, boxes], [jnp.float32, jnp.int32])
    canvases, boxes = np.asarray(canvases), np.asarray(boxes)
    assert canvases.min() >= 0.0 and canvases.max() <= 1.0
    top, left, bottom, right = boxes.T
    side = bottom - top
    np.testing.assert_array_equal(right - left, side)
    assert (top >= 0).all() and (left >= 0).all() and (bottom <= CANVAS).all() and (right <= CANVAS).all()
    assert (side >= canvas.DEFAULT_MIN_SIZE).all() and (side <= canvas.DEFAULT_MAX_SIZE).all()
    for c, (t, l, b, r), d in zip(canvases[..., 0], boxes, digits):
      inside = c[t:b, l:r].sum()
      outside = c.copy()
      outside[t:b, l:r] = 0.0
      assert not outside.any()  # no mass at all outside the box
      # Resizing by s/28 scales the mass by about (s/28)^2.
      assert inside == pytest.approx(d.sum() / 255 * ((b - t) / 28) ** 2, rel=0.1)

  def test_jit_equals_no_jit(self):
    digits = blob_digits(8)
    key = jax.random.key(3)
    jitted = canvas.translate_and_scale(key, digits)  # jitted by its decorator
    with jax.disable_jit():
      eager = canvas.translate_and_scale(key, digits[:2])
    chex.assert_trees_all_close(eager[0], jitted[0][:2], atol=1e-6)
    chex.assert_trees_all_equal(eager[1], jitted[1][:2])

  def test_matches_map_coordinates_reference(self):
    digits = blob_digits(8)
    canvases, boxes = canvas.translate_and_scale(jax.random.key(1), digits)
    for c, b, d in zip(np.asarray(canvases)[..., 0], np.asarray(boxes), digits):
      np.testing.assert_allclose(c, reference_canvas(d, b), atol=1e-5)

  def test_deterministic_in_key(self):
    digits = blob_digits(8)
    a = canvas.translate_and_scale(jax.random.key(7), digits)
    b = canvas.translate_and_scale(jax.random.key(7), digits)
    c = canvas.translate_and_scale(jax.random.key(8), digits)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a[1], c[1])

  def test_sizes_and_positions_span_their_ranges(self):
    n = 1000
    _, boxes = jax.jit(canvas.translate_and_scale)(jax.random.key(0), jnp.zeros((n, 28, 28), jnp.uint8))
    top, left, bottom, right = np.asarray(boxes).T
    side = bottom - top
    assert side.min() == canvas.DEFAULT_MIN_SIZE and side.max() == canvas.DEFAULT_MAX_SIZE
    assert len(np.unique(side)) == canvas.DEFAULT_MAX_SIZE - canvas.DEFAULT_MIN_SIZE + 1
    assert top.min() == 0 and left.min() == 0 and bottom.max() == CANVAS and right.max() == CANVAS

  def test_custom_sizes_float_digits_and_vmap(self):
    digits = jnp.asarray(blob_digits(6, size=8), jnp.float32).reshape(2, 3, 8, 8) / 255
    keys = jax.random.split(jax.random.key(0), 2)
    fn = lambda k, d: canvas.translate_and_scale(k, d, canvas_size=20, min_size=4, max_size=12)
    canvases, boxes = jax.vmap(fn)(keys, digits)
    chex.assert_shape(canvases, (2, 3, 20, 20, 1))
    side = np.asarray(boxes[..., 2] - boxes[..., 0])
    assert ((side >= 4) & (side <= 12)).all()
    assert float(canvases.max()) <= 1.0

  @parameterized.parameters(
      dict(canvas_size=100, min_size=0, max_size=10),
      dict(canvas_size=100, min_size=30, max_size=20),
      dict(canvas_size=50, min_size=20, max_size=56),
      dict(canvas_size=100, min_size=21.5, max_size=56),
  )
  def test_bad_sizes_are_config_errors(self, **sizes):
    with pytest.raises(ConfigError):
      canvas.translate_and_scale(jax.random.key(0), jnp.zeros((1, 28, 28)), **sizes)


def test_sample_batch_under_jit_pairs_digits_with_their_labels():
  n = 10
  images = jnp.asarray(np.broadcast_to((np.arange(n) * 25)[:, None, None], (n, 28, 28)), jnp.uint8)
  labels = jnp.arange(n, dtype=jnp.int32)
  step = jax.jit(canvas.sample_batch, static_argnames=("batch_size",))
  canvases, got_labels, boxes = step(jax.random.key(0), images, labels, batch_size=32)
  chex.assert_shape([canvases, got_labels, boxes], [(32, CANVAS, CANVAS, 1), (32,), (32, 4)])
  chex.assert_type(got_labels, jnp.int32)
  # Image i is constant 25 i, so the canvas interior equals 25 label / 255.
  for c, label, (t, l, b, r) in zip(np.asarray(canvases)[..., 0], np.asarray(got_labels), np.asarray(boxes)):
    mid_y, mid_x = (t + b) // 2, (l + r) // 2
    assert c[mid_y, mid_x] == pytest.approx(25 * label / 255, abs=1e-5)
  assert len(np.unique(np.asarray(got_labels))) > 3
  again = step(jax.random.key(0), images, labels, batch_size=32)
  chex.assert_trees_all_equal(again, (canvases, got_labels, boxes))


def test_fixed_test_set_is_a_fixed_function_of_seed_and_index():
  digits = blob_digits(11)
  labels = np.arange(11) % 10
  full, full_labels, full_boxes = canvas.fixed_test_set(digits, labels, seed=5, chunk_size=4)  # padded chunk
  assert full.dtype == np.uint8 and full.shape == (11, CANVAS, CANVAS, 1)
  assert full_labels.dtype == np.int32 and full_boxes.dtype == np.int32
  np.testing.assert_array_equal(full_labels, labels)
  prefix, _, prefix_boxes = canvas.fixed_test_set(digits, labels, seed=5, num=6, chunk_size=4)  # pads 2 not 1
  prefix, prefix_boxes = prefix[:5], prefix_boxes[:5]
  np.testing.assert_array_equal(prefix, full[:5])
  np.testing.assert_array_equal(prefix_boxes, full_boxes[:5])
  other, _, other_boxes = canvas.fixed_test_set(digits, labels, seed=6, num=5, chunk_size=4)
  assert not np.array_equal(other_boxes, prefix_boxes)
  # Canvas j is place_digit with key fold_in(key(seed), j), rounded to uint8.
  key = jax.random.fold_in(jax.random.key(5), 7)
  c, b = jax.jit(canvas.place_digit)(key, digits[7])
  np.testing.assert_array_equal(full_boxes[7], b)
  assert np.abs(canvas.to_float(full[7]) - np.asarray(c)).max() <= 0.5 / 255 + 1e-6


def test_fixed_test_set_rejects_bad_num():
  with pytest.raises(ConfigError, match="num"):
    canvas.fixed_test_set(np.zeros((3, 28, 28), np.uint8), np.zeros(3), num=4)
