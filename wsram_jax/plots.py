"""PNG figures for inspecting data and runs, drawn with matplotlib's Agg canvas (no pyplot, no global backend).

- `canvas_grid`: translated-scaled MNIST canvases with their labels and digit boxes.
- `glimpse_paths`: glimpse sequences drawn on their canvases.
- `figure_grid`, `save_figure`: the grid of panels and the writing of a figure, for these and the captioner's
  figures (`wsram_jax.captioning.plots`).
"""
import math
import os
import pathlib
from typing import Optional, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
import numpy as np

from wsram_jax import report_files
from wsram_jax.errors import ConfigError

PathLike = Union[str, os.PathLike]


def figure_grid(num: int, ncols: int, panel_size: tuple[float, float], *,
                title: Optional[str] = None) -> tuple[Figure, list]:
  """A figure (on an Agg canvas) with a grid of panels for `num` items, `ncols` a row (fewer if `num` is smaller,
  at least one); each panel `panel_size` = (width, height) inches, 0.4 more in height for a `title`.

  Returns:
    The `Figure` and its first `num` Axes in row-major order; the spare panels of the last row are switched off.
  """
  ncols = max(1, min(ncols, num))
  nrows = max(1, math.ceil(num / ncols))
  fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + (0.4 if title else 0.0)), dpi=100)
  FigureCanvasAgg(fig)
  axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
  for ax in axes[num:]:
    ax.set_axis_off()
  return fig, axes[:num]


def save_figure(fig: Figure, path: PathLike, **savefig_kwargs) -> pathlib.Path:
  """Writes `fig` to `path` atomically (a temporary file renamed into place, `report_files.replacing`: an
  interrupted write leaves the old figure whole; its directory is created; `savefig_kwargs` go to
  `Figure.savefig`); returns the path."""
  path = pathlib.Path(path)
  with report_files.replacing(str(path)) as tmp:
    fig.savefig(tmp, **savefig_kwargs)
  return path


def canvas_grid(canvases, labels, boxes, path: PathLike, *, ncols: int = 8,
                title: Optional[str] = None) -> pathlib.Path:
  """Writes a PNG grid of canvases, each titled with its label and with its box drawn in red.

  Args:
    canvases: `[B, H, W, 1]` or `[B, H, W]`, uint8 0..255 or float in [0, 1].
    labels: `[B]` integer.
    boxes: `[B, 4]` `(top, left, bottom, right)` pixels, bottom/right exclusive (as `data.canvas` returns).
    path: the PNG to write; its directory is created.
    ncols: canvases per row.
    title: optional figure title.

  Returns:
    The path written.
  """
  canvases, labels, boxes = np.asarray(canvases), np.asarray(labels), np.asarray(boxes)
  if canvases.ndim == 4 and canvases.shape[-1] == 1:
    canvases = canvases[..., 0]
  if canvases.ndim != 3 or labels.shape != canvases.shape[:1] or boxes.shape != (canvases.shape[0], 4):
    raise ConfigError(f"canvas_grid needs canvases [B, H, W(, 1)], labels [B] and boxes [B, 4], got "
                      f"{canvases.shape}, {labels.shape} and {boxes.shape}.")
  if ncols < 1:
    raise ConfigError(f"canvas_grid needs ncols >= 1, got {ncols}.")
  vmax = 255 if np.issubdtype(canvases.dtype, np.integer) else 1.0
  fig, axes = figure_grid(canvases.shape[0], ncols, (1.6, 1.75), title=title)
  for j, ax in enumerate(axes):
    ax.set_xticks([])
    ax.set_yticks([])
    ax.imshow(canvases[j], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    top, left, bottom, right = (int(v) for v in boxes[j])
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor="red",
                           linewidth=1.0))
    ax.set_title(f"{int(labels[j])}", fontsize=9)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, path, format="png")


def _glimpse_window(loc, scale, canvas_hw, glimpse_size):
  """(top, left, side) in pixels of the window `wsram_jax.glimpse.extract_glimpse` reads (same clipping and
  rounding: first pixel `floor((clip(loc) + 1) / 2 * (H, W) - side / 2 + 1/2)`)."""
  side = glimpse_size * 2**int(scale)
  loc = np.clip(np.asarray(loc, np.float32), np.float32(-1), np.float32(1))
  centre = (loc + np.float32(1)) * np.float32(0.5) * np.asarray(canvas_hw, np.float32)
  top, left = (int(v) for v in np.floor(centre - np.float32(side / 2) + np.float32(0.5)))
  return top, left, side


def _draw_glimpse_path(ax, canvas, locations, scales, glimpse_size, vmax, cmap, label, box=None):
  ax.imshow(canvas, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
  h, w = canvas.shape
  if box is not None:
    top, left, bottom, right = (int(v) for v in box)
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor="cyan",
                           linewidth=0.8, linestyle="--"))
  num = locations.shape[0]
  colours = [cmap(0.15 + 0.7 * n / max(num - 1, 1)) for n in range(num)]
  centres = []
  for n in range(num):
    top, left, side = _glimpse_window(locations[n], scales[n], (h, w), glimpse_size)
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False, edgecolor=colours[n], linewidth=1.2))
    # The number sits in the window's top-left corner, moved inside the canvas when the corner is outside it.
    ax.text(min(max(left, 0), w - 4) + 0.5, min(max(top, 0), h - 6) + 0.5, str(n + 1), color=colours[n],
            fontsize=7, ha="left", va="top", fontweight="bold", clip_on=True)
    loc = np.clip(locations[n], -1, 1)
    centres.append(((loc[1] + 1) / 2 * w - 0.5, (loc[0] + 1) / 2 * h - 0.5))
  xs, ys = zip(*centres) if centres else ((), ())
  ax.plot(xs, ys, color="white", linewidth=0.6, alpha=0.7)
  ax.scatter(xs, ys, c=colours, s=6, zorder=3)
  ax.set_xlim(-0.5, w - 0.5)
  ax.set_ylim(h - 0.5, -0.5)
  ax.set_xticks([])
  ax.set_yticks([])
  if label is not None:
    ax.set_title(str(label), fontsize=9)


def glimpse_paths(canvases, locations, scales, *, glimpse_size: int, path: Optional[PathLike] = None,
                  ax=None, labels=None, ncols: int = 4, title: Optional[str] = None, cmap: str = "autumn",
                  boxes=None):
  """Draws glimpse sequences on their canvases: one square per glimpse, numbered in order, joined by a line.

  Each square is the window `wsram_jax.glimpse.extract_glimpse` reads: side `glimpse_size * 2**scale` pixels,
  centred at the (clipped) location, with the same rounding; colours run along `cmap` from the first glimpse
  to the last. The window may extend past the canvas (zero padding), and the axes are clipped to the canvas.

  Args:
    canvases: `[B, H, W(, 1)]` (or one canvas `[H, W(, 1)]`), uint8 0..255 or float in [0, 1].
    locations: `[B, N, 2]` (or `[N, 2]`) `(y, x)` in [-1, 1], e.g. `Trajectory.locations` for one sample m.
    scales: `[B, N]` (or `[N]`) int scales.
    glimpse_size: the glimpse side at scale 0 (`AttentionModel.glimpse_size`).
    path: write a PNG grid there (its directory is created) and return the path.
    ax: draw on these matplotlib Axes instead of a new figure: one Axes for one canvas, or an array of at least B
      Axes (e.g. from `plt.subplots`), one per canvas in order; spare Axes are switched off.
    labels: optional `[B]` titles (class labels).
    ncols: canvases per row of the grid.
    title: optional figure title.
    cmap: matplotlib colormap name for the glimpse order.
    boxes: optional `[B, 4]` `(top, left, bottom, right)` boxes (e.g. the digits'), drawn dashed.

  Returns:
    `ax` if given; else the path written if `path` is given; else the matplotlib `Figure`.
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top

  canvases, locations, scales = np.asarray(canvases), np.asarray(locations), np.asarray(scales)
  if locations.ndim == 2:
    canvases, locations, scales = canvases[None], locations[None], scales[None]
  if canvases.ndim == 4 and canvases.shape[-1] == 1:
    canvases = canvases[..., 0]
  if (canvases.ndim != 3 or locations.ndim != 3 or locations.shape[-1] != 2
      or locations.shape[0] != canvases.shape[0] or scales.shape != locations.shape[:2]):
    raise ConfigError(f"glimpse_paths needs canvases [B, H, W(, 1)], locations [B, N, 2] and scales [B, N], got "
                      f"{canvases.shape}, {locations.shape} and {scales.shape}.")
  num = canvases.shape[0]
  if labels is not None:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != (num,):
      raise ConfigError(f"glimpse_paths needs one label per canvas, got {labels.shape[0]} for {num} canvases.")
  if boxes is not None:
    boxes = np.asarray(boxes)
    if boxes.shape != (num, 4):
      raise ConfigError(f"glimpse_paths needs one box [4] per canvas, got {boxes.shape} for {num} canvases.")
  vmax = 255 if np.issubdtype(canvases.dtype, np.integer) else 1.0
  colour_map = colormaps[cmap]
  if ax is not None:
    axes = np.asarray(ax, dtype=object).reshape(-1)
    if axes.size < num:
      raise ConfigError(f"glimpse_paths got {axes.size} axes for {num} canvases; pass one Axes per canvas.")
    for j, a in enumerate(axes):
      if j >= num:
        a.set_axis_off()
        continue
      _draw_glimpse_path(a, canvases[j], locations[j], scales[j], glimpse_size, vmax, colour_map,
                         None if labels is None else labels[j], None if boxes is None else boxes[j])
    return ax
  if ncols < 1:
    raise ConfigError(f"glimpse_paths needs ncols >= 1, got {ncols}.")
  fig, axes = figure_grid(num, ncols, (2.2, 2.35), title=title)
  for j, a in enumerate(axes):
    _draw_glimpse_path(a, canvases[j], locations[j], scales[j], glimpse_size, vmax, colour_map,
                       None if labels is None else labels[j], None if boxes is None else boxes[j])
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  if path is None:
    return fig
  return save_figure(fig, path, format="png")
