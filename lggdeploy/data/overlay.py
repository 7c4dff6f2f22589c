"""Overlays: a slice's FLAIR in grey with the predicted (red) and true (green) tumor contours. Numpy only."""

from __future__ import annotations

import numpy as np


def contour(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of a 2-D mask."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """FLAIR in grey with the predicted contour in red and the ground-truth contour in green."""
    flair = image[..., 1]
    rgb = np.repeat(flair[..., None], 3, axis=2).astype(np.uint8)
    if truth is not None:
        rgb[contour(truth)] = (0, 220, 0)
    rgb[contour(predicted)] = (255, 40, 40)
    return rgb
