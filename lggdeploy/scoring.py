"""Scoring any Runner on slices: per-patient rows plus aggregates. numpy only (runtime, bench, gate, eval share it)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from lggdeploy.data.arrays import SliceArrays
from lggdeploy.data.transforms import Normalization, logits_to_masks, preprocess
from lggdeploy.metrics import SegmentationScores
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
) -> dict:
    """Metrics of `runner` on `slices`, scored at the native 256x256.

    `on_logits(logits, batch)` sees each batch's logits, for extra figures from the same pass (validation loss).
    """
    scores = SegmentationScores()
    with progress_bar(show_progress) as bar:
        task = bar.add_task(description, total=len(slices), info="")
        for start in range(0, len(slices), batch_size):
            stop = min(start + batch_size, len(slices))
            logits = runner.infer(preprocess(slices.images[start:stop], img_size, normalization))
            if not np.isfinite(logits).all():
                raise NonFiniteOutput(f"non-finite logits (NaN/Inf) in slices {start}..{stop - 1}")
            scores.add(logits_to_masks(logits, threshold=threshold), slices.masks[start:stop], slices.patients[start:stop])
            if on_logits:
                on_logits(logits, slice(start, stop))
            bar.advance(task, stop - start)
    return scores.summary()
