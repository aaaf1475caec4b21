"""PNG figures for caption runs, drawn with matplotlib's Agg canvas (no pyplot, no global backend).

- `caption_examples`: test images with their greedy captions; before each word the glimpse the prior chose,
  drawn as a square at its location whose side is the area the read covers at its level (``read_size`` cells of
  that level's stride), numbered by word and coloured by level.
- `training_curves`: training NLL -log p(y|a) against updates (the paper's Figure 4) and test BLEU-1..4 against
  updates, one line per run.
"""
from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from wsram_jax.training import metric_writers
from wsram_jax import plots
from wsram_jax.data import canvas as canvas_lib

__all__ = ["caption_examples", "training_curves", "LEVEL_COLORS"]

PathLike = plots.PathLike
LEVEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def caption_examples(restored, path: PathLike, *, num: int = 8, ncols: int = 4, start: int = 0,
                     title: str = "") -> pathlib.Path:
  """Greedy captions of test images ``start..start+num-1`` of a `captioning.train.Restored` run, with glimpses.

  Each panel: the image; for word k a square at the glimpse read before it (its side: ``read_size`` cells of
  the chosen level, in image pixels), labelled k and coloured by level; below, the caption as ``word[level]``.
  """
  task, model, params = restored.task, restored.model, restored.state.params
  images = task.test_images[start:start + num]
  num = images.shape[0]
  dec = jax.device_get(restored.decode(params, images))
  h, w = images.shape[1:3]
  enc = model.apply({"params": params}, canvas_lib.to_float(images[0]), method=model.encode)
  strides = [(h / f.shape[0], w / f.shape[1]) for f in enc.levels]
  fig, axes = plots.figure_grid(num, ncols, (3.2, 3.9), title=title)
  for j, ax in enumerate(axes):
    ax.set_xticks([])
    ax.set_yticks([])
    img = images[j]
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    length = int(dec.length[j])
    words = [task.vocab.tokens[int(t)] for t in dec.tokens[j][:length]]
    steps = length + (1 if length < dec.tokens.shape[1] else 0)  # the <eos> step took a glimpse too
    labels = []
    for k in range(steps):
      y, x = dec.locations[j, k]
      s = int(dec.scales[j, k])
      sy, sx = strides[s][0] * model.read_size, strides[s][1] * model.read_size
      cy, cx = (y + 1) / 2 * h - 0.5, (x + 1) / 2 * w - 0.5
      color = LEVEL_COLORS[s % len(LEVEL_COLORS)]
      ax.add_patch(Rectangle((cx - sx / 2, cy - sy / 2), sx, sy, fill=False, edgecolor=color, linewidth=1.2,
                             alpha=0.9))
      ax.text(cx, cy, str(k + 1), color=color, fontsize=7, ha="center", va="center", fontweight="bold")
      labels.append(f"{words[k] if k < length else '<eos>'}[{s}]")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    lines, line = [], ""
    for lab in labels:
      if len(line) + len(lab) > 30:
        lines.append(line)
        line = ""
      line += (" " if line else "") + lab
    lines.append(line)
    ax.set_xlabel("\n".join(lines), fontsize=8)
  legend = "  ".join(f"level {s}: {'fine' if s == 0 else 'coarse' if s == len(strides) - 1 else 'mid'}"
                     for s in range(len(strides)))
  fig.suptitle((title + "\n" if title else "") + f"word[level]; {legend}", fontsize=9)
  fig.tight_layout()
  return plots.save_figure(fig, path)


def training_curves(runs: Mapping[str, str], path: PathLike, *, title: str = "",
                    bleu_orders: Sequence[int] = (1, 4)) -> pathlib.Path:
  """Training NLL (``train/nll``) and test BLEU-n (``eval/bleu<n>``, x100) against updates, one line per run
  (``runs``: label -> workdir)."""
  fig = Figure(figsize=(10, 3.8), dpi=100)
  FigureCanvasAgg(fig)
  ax_nll, ax_bleu = fig.subplots(1, 2)
  styles = ("-", "--", ":", "-.")
  for i, (label, workdir) in enumerate(runs.items()):
    records = metric_writers.read_metrics(workdir)
    steps, nll = metric_writers.series(records, "train/nll")
    line, = ax_nll.plot(steps, nll, label=label)
    for n, style in zip(bleu_orders, styles):
      s, b = metric_writers.series(records, f"eval/bleu{n}")
      ax_bleu.plot(s, 100 * b, style, color=line.get_color(), marker="o", markersize=3,
                   label=f"{label} BLEU-{n}")
    del i
  ax_nll.set_xlabel("updates")
  ax_nll.set_ylabel("training NLL  -log p(y|a)  (nats / caption)")
  ax_nll.legend()
  ax_bleu.set_xlabel("updates")
  ax_bleu.set_ylabel("test BLEU (x100)")
  ax_bleu.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return plots.save_figure(fig, path)
