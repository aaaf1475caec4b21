"""Synthetic 'digits' for tests and benchmarks: no download, and a class that can be read from the image.

    images, labels = synthetic_digits(n, seed)        images uint8 [n, 28, 28], labels uint8 [n] in 0..9

Each image holds a vertical bar (rows 6..21, columns 12..15, value 255) and, in row 6 from column 4, a stroke of
2 * label pixels (value 200): the shape MNIST's sources return, small enough to learn in a few steps.
"""
from __future__ import annotations

import numpy as np

__all__ = ["synthetic_digits"]


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`n` 28x28 uint8 'digits' whose class is readable from the image (a bar and a class-length stroke), and their
  labels (uint8); the same for the same `seed`."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  images = np.zeros((n, 28, 28), np.uint8)
  for i, label in enumerate(labels):
    images[i, 6:22, 12:16] = 255
    images[i, 6, 4:4 + 2 * int(label)] = 200
  return images, labels
