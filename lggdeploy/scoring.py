"""Scoring any Runner on slices: per-patient rows plus aggregates. numpy only (runtime, bench, gate, eval share it)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from lggdeploy.data.arrays import SliceArrays
from lggdeploy.data.transforms import Normalization, logits_to_masks, preprocess
from lggdeploy.metrics import SegmentationScores, confusion_counts, dice_from_counts
from lggdeploy.common.progress import progress_bar


class NonFiniteOutput(ValueError):
    """The engine produced NaN or Inf logits: it must be flagged, not scored."""


def score_runner(
    runner,
    slices: SliceArrays,
    img_size: int,
    normalization: Normalization,
    batch_size: int = 16,
    threshold: float = 0.5,
    show_progress: bool = True,
    description: str = "evaluating",
    on_logits: Callable[[np.ndarray, slice], None] | None = None,
    largest_component: bool = False,
) -> dict:
    """Metrics of `runner` on `slices`, scored at the native 256x256.

    `on_logits(logits, batch)` sees each batch's logits, for extra figures from the same pass (validation loss).
    `largest_component` also scores each patient after keeping only the largest 3-D connected component of its
    predicted volume (Buda et al.'s post-processing): `dice_largest_component` per patient, and its mean.
    """
    scores = SegmentationScores()
    kept: list[np.ndarray] = []
    with progress_bar(show_progress) as bar:
        task = bar.add_task(description, total=len(slices), info="")
        for start in range(0, len(slices), batch_size):
            stop = min(start + batch_size, len(slices))
            logits = runner.infer(preprocess(slices.images[start:stop], img_size, normalization))
            if not np.isfinite(logits).all():
                raise NonFiniteOutput(f"non-finite logits (NaN/Inf) in slices {start}..{stop - 1}")
            masks = logits_to_masks(logits, threshold=threshold)
            scores.add(masks, slices.masks[start:stop], slices.patients[start:stop])
            if largest_component:
                kept.append(masks)
            if on_logits:
                on_logits(logits, slice(start, stop))
            bar.advance(task, stop - start)
    summary = scores.summary()
    if largest_component:
        add_largest_component(summary, np.concatenate(kept), slices)
    return summary


def add_largest_component(summary: dict, predicted: np.ndarray, slices: SliceArrays) -> dict:
    """Score each patient again after keeping the largest 3-D component of its predicted volume: per-patient
    `dice_largest_component` and their mean, added to `summary` (rows in the order of `slices`' patients)."""
    for row in summary["per_patient"]:
        sel = slices.patients == row["patient"]
        counts = confusion_counts(largest_connected_component(predicted[sel]), slices.masks[sel]).sum(axis=0)
        row["dice_largest_component"] = float(dice_from_counts(*counts[:3]))
    summary["aggregates"]["mean_patient_dice_largest_component"] = float(np.mean([r["dice_largest_component"] for r in summary["per_patient"]]))
    return summary


def largest_connected_component(volume: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected 3-D component of a (slices, H, W) mask (Buda et al.'s post-processing).

    Label propagation on the foreground's bounding box: every voxel takes the largest label among itself and
    its 6 neighbours until nothing changes; numpy only, so the runtime needs no SciPy.
    """
    volume = np.asarray(volume, bool)
    if not volume.any():
        return volume.copy()
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(volume))
    fg = volume[box]
    labels = np.where(fg, np.arange(1, fg.size + 1).reshape(fg.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        best = labels.copy()
        for axis in range(3):
            for shift in (-1, 1):
                neighbour = np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
                best = np.maximum(best, neighbour)
        best = np.where(fg, best, 0)
        if np.array_equal(best, labels):
            break
        labels = best
    ids, counts = np.unique(labels[fg], return_counts=True)
    keep = ids[np.argmax(counts)]
    out = np.zeros_like(volume)
    out[box] = labels == keep
    return out
