"""Scoring any Runner on slices: per-patient rows plus aggregates. numpy only (runtime, bench, gate, eval share it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from lggdeploy.common.progress import progress_bar
from lggdeploy.data.arrays import SliceArrays
from lggdeploy.data.transforms import Normalization, logits_to_masks, masks_and_probabilities, preprocess
from lggdeploy.metrics import SegmentationScores, confusion_counts, dice_from_counts, summarize
from lggdeploy.postprocess import LARGEST, PostProcess


class NonFiniteOutput(ValueError):
    """The engine produced NaN or Inf logits: it must be flagged, not scored."""


def infer_batches(
    runner, images: np.ndarray, img_size: int, normalization: Normalization, batch_size: int = 16
) -> Iterator[tuple[slice, np.ndarray]]:
    """The one batch-inference loop (eval, the gate, bench, pack and the runtime): uint8 slices (N, 256, 256, 3) in
    batches, preprocessed as the model was trained, through any Runner; yields (which slices, logits), each batch
    checked finite (NonFiniteOutput names the slices otherwise)."""
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        logits = runner.infer(preprocess(images[start:stop], img_size, normalization))
        if not np.isfinite(logits).all():
            raise NonFiniteOutput(f"non-finite logits (NaN/Inf) in slices {start}..{stop - 1}")
        yield slice(start, stop), logits


def segment(
    runner,
    images: np.ndarray,
    img_size: int,
    normalization: Normalization,
    threshold: float,
    postprocess: PostProcess,
    batch_size: int = 16,
) -> np.ndarray:
    """Masks at native size for a stack of uint8 slices, post-processed as one volume: what a deployment computes
    end to end (bench times exactly this)."""
    probabilities: list[np.ndarray] | None = [] if postprocess.needs_probabilities else None
    masks = [
        thresholded(out, threshold, probabilities, postprocess.needs_images)
        for _, out in infer_batches(runner, images, img_size, normalization, batch_size)
    ]
    return postprocess.apply(
        np.concatenate(masks), np.concatenate(probabilities) if probabilities else None, np.asarray(images)
    )


def thresholded(
    logits: np.ndarray, threshold: float, probabilities: list[np.ndarray] | None, every_pixel: bool = False
) -> np.ndarray:
    """A batch's masks at native size; given a list, their probabilities are appended to it, for post-processing by
    probability: where a mask is set (what the mean-probability step reads), or `every_pixel`'s (the outline step)."""
    if probabilities is None:
        return logits_to_masks(logits, threshold=threshold)
    masks, batch_probabilities = masks_and_probabilities(logits, threshold=threshold, every_pixel=every_pixel)
    probabilities.append(batch_probabilities)
    return masks


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
    postprocess: PostProcess | None = None,
) -> dict:
    """Metrics of `runner` on `slices`, scored at the native 256x256.

    `on_logits(logits, batch)` sees each batch's logits, for extra figures from the same pass (validation loss).
    `postprocess` (the checkpoint's or engine's, postprocess.py) is applied to each patient's predicted volume
    before scoring, so the figures are the deployed pipeline's; the figures without it are kept beside them
    (`dice_without_postprocess` per patient, `mean_patient_dice_without_postprocess` and
    `patients_missed_without_postprocess`). `largest_component` also scores each patient after keeping only the
    largest 3-D connected component of its predicted volume (Buda et al.'s post-processing):
    `dice_largest_component` per patient, and its mean.
    """
    postprocess = postprocess if postprocess is not None and postprocess.active else None
    probabilities: list[np.ndarray] | None = [] if postprocess and postprocess.needs_probabilities else None
    scores = SegmentationScores()
    kept: list[np.ndarray] = []
    with progress_bar(show_progress) as bar:
        task = bar.add_task(description, total=len(slices), info="")
        for batch, logits in infer_batches(runner, slices.images, img_size, normalization, batch_size):
            masks = thresholded(logits, threshold, probabilities, postprocess is not None and postprocess.needs_images)
            scores.add(masks, slices.masks[batch], slices.patients[batch])
            if largest_component or postprocess:
                kept.append(masks)
            if on_logits:
                on_logits(logits, batch)
            bar.advance(task, len(logits))
    summary = scores.summary()
    predicted = np.concatenate(kept) if kept else None
    if postprocess:
        processed = postprocess.apply_per_patient(
            predicted, slices.patients, np.concatenate(probabilities) if probabilities else None, slices.images
        )
        summary = with_postprocess(summary, processed, slices)
    if largest_component:
        add_largest_component(summary, predicted, slices)
    return summary


def with_postprocess(raw: dict, processed: np.ndarray, slices: SliceArrays) -> dict:
    """The summary of the post-processed masks `processed`, with `raw`'s figures (the same masks before
    post-processing) kept beside them under `..._without_postprocess`."""
    summary = summarize(confusion_counts(processed, slices.masks), slices.patients)
    for row, before in zip(summary["per_patient"], raw["per_patient"]):
        row["dice_without_postprocess"] = before["dice"]
    summary["aggregates"]["mean_patient_dice_without_postprocess"] = raw["aggregates"]["mean_patient_dice"]
    summary["aggregates"]["patients_missed_without_postprocess"] = raw["aggregates"]["patients_missed"]
    return summary


def add_largest_component(summary: dict, predicted: np.ndarray, slices: SliceArrays) -> dict:
    """Score each patient again after keeping the largest 3-D component of its predicted volume: per-patient
    `dice_largest_component` and their mean, added to `summary` (rows in the order of `slices`' patients)."""
    for row in summary["per_patient"]:
        sel = slices.patients == row["patient"]
        counts = confusion_counts(largest_connected_component(predicted[sel]), slices.masks[sel]).sum(axis=0)
        row["dice_largest_component"] = float(dice_from_counts(*counts[:3]))
    summary["aggregates"]["mean_patient_dice_largest_component"] = float(
        np.mean([r["dice_largest_component"] for r in summary["per_patient"]])
    )
    return summary


def largest_connected_component(volume: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected 3-D component of a (slices, H, W) mask (Buda et al.'s post-processing)."""
    return PostProcess(LARGEST).apply(volume)
