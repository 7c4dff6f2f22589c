"""The decision threshold, tuned on the validation patients and stored in the checkpoint.

A model's probabilities are not calibrated: 0.5 is not necessarily where its mean per-patient Dice peaks. Training
sweeps a coarse grid on the val patients' logits of the checkpoint it keeps and stores the best threshold as the
checkpoint's `threshold`, which eval, export, build, bench and the runtime read. The grid is coarse (steps of
0.05) and a move away from the training threshold must gain at least `min_gain` Dice, so that five val patients
do not pick noise.
"""

from __future__ import annotations

import numpy as np

from lggdeploy.data.transforms import native_logits
from lggdeploy.metrics import confusion_counts, summarize

# 0.05-0.95: with today's recipe (per-image Dice, tumor oversampling) the val sweeps of the 34-patient runs rose to
# the old grid's edge (0.9), so the grid was widened on that val evidence (benchmarks/results/recipe/README.md).
GRID = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def sweep(logits: np.ndarray, masks: np.ndarray, patients: np.ndarray, grid=GRID) -> list[dict]:
    """Mean per-patient Dice (and patients missed) at each threshold of `grid`, from (N, 1, s, s) logits."""
    native = native_logits(logits, masks.shape[-1])
    rows = []
    for t in grid:
        predicted = native > np.float32(np.log(t / (1 - t)))
        aggregates = summarize(confusion_counts(predicted, masks), patients)["aggregates"]
        rows.append(
            {
                "threshold": float(t),
                "mean_patient_dice": aggregates["mean_patient_dice"],
                "patients_missed": aggregates["patients_missed"],
            }
        )
    return rows


def choose(rows: list[dict], default: float, min_gain: float = 0.005) -> dict:
    """The threshold to store: the best of the sweep if it beats `default` by `min_gain`, else `default`.
    Ties and near-ties go to the threshold nearest `default`."""
    at_default = min(rows, key=lambda r: abs(r["threshold"] - default))
    best = max(rows, key=lambda r: (round(r["mean_patient_dice"], 6), -abs(r["threshold"] - default)))
    chosen = best if best["mean_patient_dice"] >= at_default["mean_patient_dice"] + min_gain else at_default
    return {
        "threshold": chosen["threshold"],
        "val_mean_patient_dice": chosen["mean_patient_dice"],
        "val_mean_patient_dice_at_default": at_default["mean_patient_dice"],
        "default": float(default),
        "min_gain": min_gain,
        "sweep": rows,
    }


def tune(logits: np.ndarray, masks: np.ndarray, patients: np.ndarray, default: float, min_gain: float = 0.005) -> dict:
    """sweep + choose; the record stored in the checkpoint as `threshold_tuning` (with the val patients)."""
    grid = sorted({*GRID, round(float(default), 4)})
    record = choose(sweep(logits, masks, patients, grid), default, min_gain)
    record["patients"] = list(dict.fromkeys(np.asarray(patients).tolist()))
    return record
