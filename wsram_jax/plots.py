"""PNG figures for inspecting data and runs, drawn with matplotlib's Agg canvas (no pyplot, no global backend).

- `canvas_grid`: translated-scaled MNIST canvases with their labels and digit boxes.
"""
import math
import os
import pathlib
from typing import Optional, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
import numpy as np

from wsram_jax.errors import ConfigError


def canvas_grid(canvases, labels, boxes, path: Union[str, os.PathLike], *, ncols: int = 8,
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
  num = canvases.shape[0]
  ncols = min(ncols, max(num, 1))
  nrows = max(1, math.ceil(num / ncols))
  fig = Figure(figsize=(1.6 * ncols, 1.75 * nrows + (0.4 if title else 0.0)), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for j, ax in enumerate(axes.flat):
    ax.set_xticks([])
    ax.set_yticks([])
    if j >= num:
      ax.set_axis_off()
      continue
    ax.imshow(canvases[j], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    top, left, bottom, right = (int(v) for v in boxes[j])
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor="red",
                           linewidth=1.0))
    ax.set_title(f"{int(labels[j])}", fontsize=9)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path
