"""Glimpse extraction against a loop-based numpy reference; padding, window sides, low-res input."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from wsram_jax import glimpse


def reference_glimpse(canvas, loc, scale, size):
  """Plain loops: the window of side size*2**scale whose first pixel is round-half-up(centre - w/2)."""
  h, w_, c = canvas.shape
  loc = np.clip(np.asarray(loc, np.float32), np.float32(-1), np.float32(1))
  f = 2**int(scale)
  w = size * f
  centre = (loc + np.float32(1)) * np.float32(0.5) * np.asarray([h, w_], np.float32)
  y0, x0 = (int(v) for v in np.floor(centre - np.float32(w / 2) + np.float32(0.5)))
  out = np.zeros((size, size, c), np.float64)
  for k in range(size):
    for l in range(size):
      for i in range(f):
        for j in range(f):
          y, x = y0 + k * f + i, x0 + l * f + j
          if 0 <= y < h and 0 <= x < w_:
            out[k, l] += canvas[y, x]
  return out / (f * f)


class GlimpseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((5, 3, 2, 0), (4, 3, 3, 1))
  def test_matches_reference_at_random_locations(self, size, num_scales, channels, seed):
    rng = np.random.default_rng(seed)
    canvas = rng.uniform(size=(23, 31, channels)).astype(np.float32)
    fn = self.variant(functools.partial(glimpse.extract_glimpse, size=size, num_scales=num_scales))
    for _ in range(12):
      loc = rng.uniform(-1.3, 1.3, size=2).astype(np.float32)  # some outside [-1, 1]: clipped
      scale = int(rng.integers(num_scales))
      got = np.asarray(fn(jnp.asarray(canvas), jnp.asarray(loc), jnp.asarray(scale)))
      np.testing.assert_allclose(got, reference_glimpse(canvas, loc, scale, size), atol=1e-5)

  def test_vmap_matches_loop(self):
    rng = np.random.default_rng(3)
    canvas = jnp.asarray(rng.uniform(size=(16, 16, 1)), jnp.float32)
    locs = jnp.asarray(rng.uniform(-1, 1, size=(7, 2)), jnp.float32)
    scales = jnp.asarray(rng.integers(0, 2, size=7), jnp.int32)
    fn = jax.jit(functools.partial(glimpse.extract_glimpse, size=4, num_scales=2))
    batched = jax.vmap(fn, in_axes=(None, 0, 0))(canvas, locs, scales)
    chex.assert_shape(batched, (7, 4, 4, 1))
    for i in range(7):
      np.testing.assert_allclose(batched[i], fn(canvas, locs[i], scales[i]), atol=1e-6)

  @parameterized.parameters(0, 1, 2)
  def test_zero_padding_at_every_edge_and_corner(self, scale):
    # A constant canvas: a window centred on a corner sees one quarter canvas, on an edge midpoint one half.
    size, h = 4, 32
    canvas = jnp.ones((h, h, 1), jnp.float32)
    fn = functools.partial(glimpse.extract_glimpse, size=size, num_scales=3)
    half = size // 2
    for y in (-1.0, 0.0, 1.0):
      for x in (-1.0, 0.0, 1.0):
        g = np.asarray(fn(canvas, jnp.asarray([y, x]), scale))[..., 0]
        expected = np.ones((size, size))
        if y == -1.0:
          expected[:half] = 0
        if y == 1.0:
          expected[half:] = 0
        if x == -1.0:
          expected[:, :half] = 0
        if x == 1.0:
          expected[:, half:] = 0
        np.testing.assert_allclose(g, expected, atol=1e-6, err_msg=f"loc=({y}, {x}) scale={scale}")
        np.testing.assert_allclose(g.mean(), expected.mean(), atol=1e-6)

  @parameterized.parameters(0, 1, 2)
  def test_window_side_per_scale(self, scale):
    # Slide the window centre over every pixel boundary; a single bright pixel is seen from exactly w = size*2**s
    # positions per axis, with pooled value 1/4**s.
    size, h, r = 3, 40, 17
    canvas = np.zeros((h, h, 1), np.float32)
    canvas[r, r] = 1.0
    fn = jax.jit(jax.vmap(functools.partial(glimpse.extract_glimpse, size=size, num_scales=3),
                          in_axes=(None, 0, None)))
    centres = np.arange(h + 1)  # continuous positions of pixel boundaries
    locs = np.stack([np.full(h + 1, 2 * r / h - 1 + 1 / h), 2 * centres / h - 1], -1).astype(np.float32)
    g = np.asarray(fn(jnp.asarray(canvas), jnp.asarray(locs), scale))
    seen = g.reshape(h + 1, -1).max(-1)
    w = size * 2**scale
    self.assertEqual(int((seen > 0).sum()), w)
    np.testing.assert_allclose(seen[seen > 0], 1.0 / 4**scale, rtol=1e-6)
    # The positions that see it are exactly those with r - w/2 < centre <= r + w/2.
    np.testing.assert_array_equal(np.nonzero(seen > 0)[0], np.arange(h + 1)[(centres > r - w / 2) &
                                                                          (centres <= r + w / 2)])

  def test_corner_coordinates(self):
    # (-1, -1) is the canvas's top-left corner: the scale-0 window there has the top-left pixel at its centre-right.
    canvas = np.zeros((10, 10, 1), np.float32)
    canvas[0, 0] = 1.0
    canvas[9, 9] = 2.0
    g = glimpse.extract_glimpse(jnp.asarray(canvas), jnp.asarray([-1.0, -1.0]), 0, size=2, num_scales=1)
    np.testing.assert_allclose(np.asarray(g)[..., 0], [[0, 0], [0, 1]])
    g = glimpse.extract_glimpse(jnp.asarray(canvas), jnp.asarray([1.0, 1.0]), 0, size=2, num_scales=1)
    np.testing.assert_allclose(np.asarray(g)[..., 0], [[2, 0], [0, 0]])

  def test_no_gradient_through_extraction(self):
    canvas = jnp.ones((8, 8, 1))
    grad = jax.grad(lambda l: glimpse.extract_glimpse(canvas, l, 0, size=2, num_scales=2).sum())(jnp.zeros(2))
    np.testing.assert_array_equal(grad, 0.0)

  def test_lowres_block_average(self):
    rng = np.random.default_rng(0)
    canvas = rng.uniform(size=(20, 20, 2)).astype(np.float32)
    got = np.asarray(glimpse.lowres(jnp.asarray(canvas), 5))
    expected = canvas.reshape(5, 4, 5, 4, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    odd = glimpse.lowres(jnp.asarray(canvas), 6)  # non-divisible: resized
    chex.assert_shape(odd, (6, 6, 2))
    np.testing.assert_allclose(np.asarray(odd).mean(), canvas.mean(), atol=0.05)

  def test_window_starts(self):
    starts = glimpse.window_starts(jnp.asarray([0.0, -1.0]), (100, 100), size=12, num_scales=3)
    np.testing.assert_array_equal(starts, [[44, -6], [38, -12], [26, -24]])
    self.assertEqual(glimpse.pad_width(12, 3), 24)


if __name__ == "__main__":
  pytest.main([__file__])


def test_glimpse_paths_draws_the_extracted_windows(tmp_path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top

  from wsram_jax import plots  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  locs = rng.uniform(-1.2, 1.2, size=(2, 3, 2)).astype(np.float32)
  scales = rng.integers(0, 3, size=(2, 3))
  starts = np.stack([np.asarray(glimpse.window_starts(jnp.asarray(l), (40, 40), size=4, num_scales=3))
                     for l in locs.reshape(-1, 2)]).reshape(2, 3, 3, 2)
  canvases = rng.uniform(size=(2, 40, 40, 1)).astype(np.float32)
  fig = Figure()
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3)
  assert plots.glimpse_paths(canvases, locs, scales, glimpse_size=4, ax=axes, labels=[3, 5]) is axes
  for b in range(2):
    rects = [p for p in axes[b].patches if isinstance(p, Rectangle)]
    assert len(rects) == 3
    for n, r in enumerate(rects):
      top, left = starts[b, n, scales[b, n]]
      side = 4 * 2**scales[b, n]
      assert (r.get_y(), r.get_x(), r.get_width(), r.get_height()) == (top - 0.5, left - 0.5, side, side)
  assert not axes[2].axison  # the spare Axes is switched off
  path = plots.glimpse_paths(canvases, locs, scales, glimpse_size=4, path=tmp_path / "paths.png", ncols=2)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert isinstance(plots.glimpse_paths(canvases[0], locs[0], scales[0], glimpse_size=4), Figure)


def test_window_on_box():
  # A 40 px canvas, glimpses of 6 px at scales 0 and 1 (windows of 6 and 12 px); the box covers rows and columns
  # 10..19. The centre (15, 15) is at loc -0.25: the 12 px window [9, 21) holds the whole box, the 6 px window
  # [12, 18) holds 6 x 6 of its 100 pixels.
  on_box = functools.partial(glimpse.window_on_box, canvas_hw=(40, 40), size=6, num_scales=2)
  box = jnp.asarray([10, 10, 20, 20])
  loc = jnp.asarray([-0.25, -0.25])
  np.testing.assert_allclose(on_box(loc, 1, box), (1.0, 1.0, 1.0))
  np.testing.assert_allclose(on_box(loc, 0, box), (1.0, 1.0, 0.36))
  # Far away: the centre at (39, 39), the window [33, 45) misses the box.
  np.testing.assert_allclose(on_box(jnp.asarray([0.95, 0.95]), 1, box), (0.0, 0.0, 0.0))
  # Centre just outside (row 20 is past the box's exclusive end), window overlapping its edge: rows 14..25.
  np.testing.assert_allclose(on_box(jnp.asarray([0.0, -0.25]), 1, box), (0.0, 1.0, 0.6))


def test_glimpse_works_in_float64_under_jax_enable_x64():
  """A gradient check in float64 (`jax.enable_x64`) can extract glimpses: the slice starts share one int dtype."""
  canvas = np.random.default_rng(0).uniform(size=(20, 20, 1))
  with jax.enable_x64(True):
    g = jax.jit(functools.partial(glimpse.extract_glimpse, size=4, num_scales=3))(
        jnp.asarray(canvas, jnp.float64), jnp.asarray([0.1, -0.3]), jnp.asarray(1))
    assert g.dtype == jnp.float64 and g.shape == (4, 4, 1)
  ref = glimpse.extract_glimpse(jnp.asarray(canvas, jnp.float32), jnp.asarray([0.1, -0.3]), jnp.asarray(1), size=4,
                                num_scales=3)
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-6)
